# arbor_shell: `arbor ssh`'s stdout callback: silent, but for why its host
# could not be reached, which it prints as `arbor ssh: HOST: message`.
from __future__ import annotations

import sys

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: arbor_shell
type: stdout
short_description: arbor ssh's resolving step, silent unless it fails
description: [Prints only why the host could not be reached.]
"""


class CallbackModule(CallbackBase):

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "arbor_shell"

    def _failed(self, result, what):
        msg = result._result.get("msg") or result._result.get("stderr") or what
        sys.stderr.write("arbor ssh: %s: %s%s\n" % (result._host.get_name(), what, ": " + msg if msg != what else ""))

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._failed(result, "failed")

    def v2_runner_on_unreachable(self, result):
        self._failed(result, "unreachable")
