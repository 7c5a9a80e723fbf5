# A become plugin arbor has no code for: OpenBSD's doas (as packaged by
# Debian), written here as any user could write one. arbor drives it through
# its generic become path: the plugin's own command, prompt check and
# failure strings. (community.general has a doas plugin; this lab has only
# ansible-core.)
from __future__ import annotations

DOCUMENTATION = """
name: lab_doas
short_description: doas, for arbor's lab
description: Runs commands as another user with doas.
options:
  become_user:
    description: User you become.
    default: root
    ini: [{section: privilege_escalation, key: become_user}]
    vars: [{name: ansible_become_user}]
    keyword: [{name: become_user}]
  become_exe:
    description: doas executable.
    default: doas
    vars: [{name: ansible_become_exe}]
  become_flags:
    description: Options to pass to doas.
    default: ''
    vars: [{name: ansible_become_flags}]
    keyword: [{name: become_flags}]
  become_pass:
    description: Password for doas prompt.
    required: false
    vars: [{name: ansible_become_password}, {name: ansible_become_pass}]
"""

import re

from ansible.plugins.become import BecomeBase


class BecomeModule(BecomeBase):

    name = "lab_doas"
    fail = ("Permission denied",)
    missing = ("Authorization required",)
    # doas reads its password from the terminal.
    pipelining = False

    def check_password_prompt(self, b_output):
        return bool(re.search(rb"doas \(\S+\) password: ?", b_output))

    def build_become_command(self, cmd, shell):
        super(BecomeModule, self).build_become_command(cmd, shell)
        if not cmd:
            return cmd
        self.prompt = True
        flags = self.get_option("become_flags") or ""
        if not self.get_option("become_pass") and "-n" not in flags:
            flags += " -n"
        user = self.get_option("become_user")
        user = "-u %s" % user if user else ""
        executable = getattr(shell, "executable", shell.SHELL_FAMILY)
        return "%s %s %s %s -c %s" % (self.get_option("become_exe"), flags, user, executable,
                                      self._build_success_command(cmd, shell, noexe=True))
