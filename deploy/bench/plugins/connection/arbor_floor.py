# The benchmark's "floor": a connection that answers every call at once.
#
# It runs nothing anywhere. Each call returns a plausible result (a module's
# JSON result shaped by its arguments, a temp path for mkdir, a home for
# `echo ~`), so a playbook completes and the wall and CPU time left are
# Ansible's own controller cost per task: the limit under any connection layer.

from __future__ import annotations

DOCUMENTATION = """
    name: arbor_floor
    short_description: answers every call at once (benchmark floor)
    description:
        - Runs nothing. Returns plausible results so that only Ansible's own
          controller cost is measured.
    author: arbor
    options:
        become_success_timeout:
            type: int
            default: 10
            description: Unused; present so become can be configured.
            vars:
                - name: ansible_floor_become_success_timeout
    extends_documentation_fragment:
        - connection_pipelining
"""

import ast
import json
import re

from ansible.plugins.connection import ConnectionBase

_HOME = "/root"
_MKTEMP = re.compile(r'echo (ansible-tmp-[\w.-]+)="` echo ([^`]+?) `"')
_ARG = re.compile(rb"^(ansible_module|params)=(.*),$", re.M)
_SCRIPT = re.compile(r"AnsiballZ_(\w+)\.py")


def _module_call(in_data):
    """(module name, module args) from a pipelined AnsiballZ payload."""
    found = {k.decode(): v.decode() for k, v in _ARG.findall(in_data or b"")}
    if "ansible_module" not in found:
        return None, {}
    # 'ansible.legacy.copy' -> 'copy'
    name = ast.literal_eval(found["ansible_module"]).rsplit(".", 1)[-1]
    try:
        params = json.loads(ast.literal_eval(found.get("params", "'{}'")))
    except (ValueError, SyntaxError):
        params = {}
    return name, params.get("ANSIBLE_MODULE_ARGS", {})


def _module_result(name, args):
    path = args.get("path") or args.get("dest")
    if name == "stat":
        return {"changed": False, "stat": {"exists": False}}
    if name == "tempfile":
        return {"changed": True, "path": "/tmp/ansible.floor", "state": args.get("state", "file")}
    if name == "file":
        return {"changed": True, "path": path, "state": args.get("state") or "file"}
    if name in ("copy", "template"):
        return {"changed": True, "dest": path, "checksum": "0" * 40, "size": 0}
    if name == "lineinfile":
        return {"changed": True, "msg": "line added", "backup": ""}
    if name in ("command", "shell", "raw"):
        return {"changed": True, "rc": 0, "stdout": "", "stderr": "",
                "cmd": args.get("_raw_params", ""), "start": "", "end": "", "delta": "0:00:00"}
    return {"changed": False}


class Connection(ConnectionBase):
    transport = "arbor_floor"
    has_pipelining = True

    def _connect(self):
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        name, args = _module_call(in_data)
        if name is None:
            script = _SCRIPT.search(cmd)
            if script:
                name, args = script.group(1), {}
        if name is not None:
            return 0, json.dumps(_module_result(name, args)).encode(), b""
        made = _MKTEMP.search(cmd)
        if made:
            path = made.group(2).replace("~", _HOME, 1)
            return 0, f"{made.group(1)}={path}\n".encode(), b""
        if "echo ~" in cmd:
            return 0, f"{_HOME}\n".encode(), b""
        return 0, b"", b""

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        open(out_path, "wb").close()

    def close(self):
        self._connected = False
