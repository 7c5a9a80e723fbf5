"""arbor's connection plugin patches Ansible's action code only when it
makes its first connection in a process, never on import: `ansible-doc`,
and a run that loads the plugin but connects with another, keep Ansible's
own code."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "ansible-glue" / "plugins" / "connection"

PROBE = """
import json
from ansible.plugins.action import ActionBase
from ansible.plugins.loader import connection_loader
from ansible.playbook.play_context import PlayContext
import ansible.executor.module_common as mc

def state():
    return {"make_tmp": ActionBase._make_tmp_path.__module__, "init": ActionBase.__init__.__module__,
            "stat": ActionBase._execute_remote_stat.__module__,
            "scan": "__new__" in vars(getattr(mc, "ModuleDepFinder"))}

cls = connection_loader.get("ssh", class_only=True)
loaded = state()
conn = connection_loader.get("ssh", PlayContext(), None)
made = state()
connection_loader.get("ssh", PlayContext(), None)
again = state()
print(json.dumps({"loaded": loaded, "made": made, "again": again, "cls": cls.__module__}))
"""


def test_the_plugin_patches_on_its_first_connection_not_on_import(tmp_path):
    env = dict(os.environ, ANSIBLE_CONNECTION_PLUGINS=str(PLUGINS), HOME=str(tmp_path))
    res = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", PROBE], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["cls"].startswith("ansible.plugins.connection.ssh") or "ssh" in got["cls"], got
    assert got["loaded"] == {"make_tmp": "ansible.plugins.action", "init": "ansible.plugins.action",
                             "stat": "ansible.plugins.action", "scan": False}, got
    assert got["made"] == {"make_tmp": "arbor_glue.actions", "init": "arbor_glue.actions",
                           "stat": "arbor_glue.actions", "scan": True}, got
    assert got["again"] == got["made"]
