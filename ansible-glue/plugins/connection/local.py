# arbor's `local` connection: shadows the builtin one, as arbor's `ssh`
# does, when this directory is on `connection_plugins`. The controller's own
# tasks (localhost, `delegate_to: localhost`, `local_action`) then run in a
# persistent agent that the run's arbor daemon starts on the controller, as
# this user, with no ssh: everything else is arbor's ssh glue (temp dirs,
# uploads, the module zip cache, in-process modules, become as a nested
# agent). Modules and commands run in the playbook's directory, as with the
# builtin plugin.

from __future__ import annotations

import sys

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.loader import connection_loader

# arbor's ssh glue, as Ansible loaded it (this directory comes first).
_ArborSsh = connection_loader.get("ssh", class_only=True)
_builtin_local = sys.modules[_ArborSsh.__module__].load_builtin("local")


def _documentation():
    from arbor_glue import docs  # on the path once arbor's ssh plugin is loaded
    ours = sys.modules[_ArborSsh.__module__].ARBOR_OPTIONS
    names = ("arbor_inventory_hostname", "arbor_python", "arbor_task_isolation", "arbor_persist")
    return docs.with_options(_builtin_local.DOCUMENTATION, "run on the controller in a persistent arbor agent",
                             dict((name, ours[name]) for name in names))


DOCUMENTATION = _documentation()


class Connection(_ArborSsh):
    """The controller itself, as a one-hop arbor tree (method `local`)."""

    transport = "local"
    # The base class's test, not the ssh plugin's (which reads ssh options);
    # ansible-core 2.17 has none (its action plugins read the option).
    if hasattr(_builtin_local.Connection, "is_pipelining_enabled"):
        is_pipelining_enabled = _builtin_local.Connection.is_pipelining_enabled

    def __init__(self, *args, **kwargs):
        super(Connection, self).__init__(*args, **kwargs)
        # Set by Ansible for local connections: the playbook's directory.
        self.cwd = None

    def _enabled(self):
        return True

    def _arbor_name(self):
        # The host the connection is for: for `delegate_to: localhost` that
        # is localhost, whatever inventory_hostname says.
        return to_text(getattr(self._play_context, "remote_addr", None)
                       or self.get_option("arbor_inventory_hostname") or "localhost")

    def _build_chain(self):
        name = self._arbor_name()
        hop = {"name": name, "method": "local", "host": "localhost", "port": None, "user": None,
               "key_file": None, "ssh_args": [], "host_key_checking": True, "timeout_s": None}
        python = self.get_option("arbor_python")
        if python and not to_text(python).startswith("auto"):
            hop["python"] = to_text(python)
        return [hop]

    def _arbor_cwd(self):
        return to_text(self.cwd) if self.cwd else None
