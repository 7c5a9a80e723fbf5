# arbor_shell: `arbor ssh`'s resolving step, run as an ad-hoc task by
# arbor_glue/shell.py. It connects to the task's host as any task would (its
# vias, user, keys, become) and hands the parent process, through the
# inherited socket ARBOR_SHELL_FD (memory only: it may hold the become
# password), where to send the pipe. Its result holds nothing secret.
from __future__ import annotations

import json
import os
import socket

from ansible.plugins.action import ActionBase

from arbor_glue.actions import _arbor_conn, _become_applies


class ActionModule(ActionBase):

    TRANSFERS_FILES = False

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        fd = os.environ.get("ARBOR_SHELL_FD")
        conn = _arbor_conn(self)
        if fd is None:
            return dict(result, failed=True, msg="arbor_shell is arbor ssh's own step, not a module")
        if conn is None:
            return dict(result, failed=True, msg="arbor does not carry this host's connection (connection %r)"
                        % self._connection.transport)
        where = conn.arbor_shell_target(sudo=bool(self._play_context.become) and _become_applies(self))
        out = socket.socket(fileno=os.dup(int(fd)))
        try:
            out.sendall(json.dumps(where).encode() + b"\n")
        finally:
            out.close()
        return dict(result, changed=False, host=where["target"]["chain"][-1]["name"])
