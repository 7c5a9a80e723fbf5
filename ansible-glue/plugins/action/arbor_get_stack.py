# arbor_get_stack (also named mitogen_get_stack): the hops arbor would use
# to reach the task's host, and the become interpreter it would run the
# task in, without connecting. Needs `action_plugins` (or
# ANSIBLE_ACTION_PLUGINS) to include this directory.
from __future__ import annotations

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):

    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        conn = self._connection
        stack = getattr(conn, "arbor_stack", None)
        if stack is None or not conn.arbor_active():
            result.update(skipped=True, msg="arbor does not carry this host's connection "
                                            "(connection %r)" % conn.transport)
            return result
        result.update(changed=False, result=stack(self._become_applies()),
                      _ansible_verbose_always=True)
        return result

    def _become_applies(self):
        conn = self._connection
        if not (self._play_context.become and conn.become):
            return False
        ruser = self._get_remote_user()
        buser = self.get_become_option("become_user")
        from ansible import constants as C
        return bool(C.BECOME_ALLOW_SAME_USER or (buser != ruser or not any((ruser, buser))))
