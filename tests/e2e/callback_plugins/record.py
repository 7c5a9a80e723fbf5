# Records every task result as a JSON line in $ARBOR_RECORD, so the e2e
# tests can compare arbor with vanilla Ansible task by task.
from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: record
type: aggregate
short_description: task results as JSON lines
description: [Task results as JSON lines in $ARBOR_RECORD.]
"""

# Result keys that are compared; anything else (timings, paths of temp
# files, invocation details) differs between runs by nature.
KEPT = ("changed", "failed", "skipped", "rc", "stdout", "stderr", "msg", "content", "checksum",
        "md5sum", "dest", "mode", "size", "state", "greeting", "style", "said", "echo", "args_bytes",
        "finished", "diff", "censored", "ping", "path", "uid", "gid", "owner",
        "group", "results", "environment_seen", "exists", "executable", "version", "real",
        "probe")


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, status):
        path = os.environ.get("ARBOR_RECORD")
        if not path:
            return
        res = dict(result._result)
        line = {"host": result._host.get_name(), "task": result._task.get_name(), "status": status}
        for k in KEPT:
            if k in res:
                line[k] = res[k]
        if "stat" in res:
            line["stat"] = {k: res["stat"].get(k) for k in ("exists", "isreg", "isdir", "mode", "size",
                                                            "checksum")}
        with open(path, "a") as f:
            f.write(json.dumps(line, sort_keys=True, default=str) + "\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")
