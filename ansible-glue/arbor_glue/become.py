"""Become through arbor, the part of the connection plugin that does it: a
task's become is a nested persistent interpreter under the become user,
started once per target and become settings with the become plugin's own
command, its prompts answered by the plugin's own checks (`Become`), and
the command marked, not wrapped (`BecomeProxy`)."""

from __future__ import annotations

import json
import re

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.utils.display import Display

display = Display()

# `userdel` refusing because a process of the user runs (shadow-utils' words).
_USER_BUSY = re.compile(rb"user \S+ is currently used by process (\d+)")


class BecomeNeeded(AnsibleError):
    """The request's become interpreter is not up yet."""


def become_opt(plugin, name):
    """A become plugin's option as text; "" if it has no such option."""
    try:
        return to_text(plugin.get_option(name) or "")
    except KeyError:
        return ""


class BecomeProxy(object):
    """The task's become plugin as Ansible's action code sees it. Through
    arbor, become is a nested persistent interpreter under the become user,
    started once with the plugin's own command and prompt checks (see
    Become._arbor_become): so a command to run with become is not
    wrapped, only marked, and goes to that interpreter. Everything else is
    the plugin's."""

    def __init__(self, conn, real):
        object.__setattr__(self, "_arbor_conn", conn)
        object.__setattr__(self, "_arbor_real", real)

    def __getattr__(self, name):
        return getattr(self._arbor_real, name)

    def __setattr__(self, name, value):
        setattr(self._arbor_real, name, value)

    @property
    def pipelining(self):
        # The nested interpreter has its own terminal: a plugin that needs a
        # tty (su) still gets pipelined modules.
        if self._arbor_conn._enabled():
            return True
        return self._arbor_real.pipelining

    def build_become_command(self, cmd, shell):
        conn = self._arbor_conn
        if not conn._enabled():
            return self._arbor_real.build_become_command(cmd, shell)
        conn._arbor_sudo_next = True
        return cmd


class Become(object):
    """The connection's become: a mixin of arbor's ssh Connection."""

    def _arbor_become_spec(self):
        """Which become interpreter: its settings, and the task's password,
        which the daemon folds into the key (digested, never logged) so a
        task with another password is checked by the become tool anew."""
        spec = {"key": self._arbor_become_key()}
        password = become_opt(self._arbor_become_real, "become_pass")
        if password:
            spec["pass"] = password
        return spec

    def _arbor_become_key(self):
        """Everything that makes a become interpreter what it is: the plugin
        and all its options (the prompt it waits for, sudo's chdir, ...);
        the password apart (see _arbor_become_spec). A task whose become
        differs in any of them gets an interpreter of its own, started as
        vanilla would start its command."""
        b = self._arbor_become_real
        parts = [b.name or type(b).__name__]
        parts += [become_opt(b, opt) for opt in ("become_user", "become_exe", "become_flags")]
        others = getattr(b, "_options", None) or {}
        parts.append(sorted((k, to_text(v)) for k, v in others.items()
                            if k not in ("become_pass", "become_user", "become_exe", "become_flags")
                            and v not in (None, "")))
        return json.dumps(parts)

    def _arbor_become(self):
        """Makes sure the become interpreter for this task's become settings
        is up. The first time, the plugin builds its own command around the
        agent's start command, and its own checks read what that command
        prints: a password prompt gets `become_pass`, once."""
        b = self._arbor_become_real
        spec = self._arbor_become_spec()
        user = become_opt(b, "become_user")
        host = self._chain[-1]["name"]
        flags = become_opt(b, "become_flags")
        label = "%s (become %s via %s%s)" % (host, user or "default user", b.name,
                                              " " + flags if flags else "")
        python = self.arbor_info().get("executable") or "python3"
        self._arbor.send({"op": "agent_command", "python": python})
        agent_cmd = self._arbor.recv()[0]["cmd"]
        cmd = b.build_become_command(agent_cmd, self._shell)
        try:
            timeout = int(self.get_option("timeout") or 10)
        except (KeyError, TypeError, ValueError):  # the local plugin has no timeout
            timeout = 10
        display.vvv("ARBOR BECOME %s" % label, host=host)
        self._arbor.send(self._arbor_target({"op": "become", "become": spec,
                                             "label": label, "cmd": cmd, "success": b.success,
                                             "timeout_s": timeout + 10}))
        output = b""
        verdict = None
        answered = False
        try:
            while True:
                m = self._arbor.recv()[0]
                if m.get("op") != "output":
                    return
                output += to_bytes(m.get("output", ""), errors="surrogate_or_strict")
                answer = {"op": "answer"}
                if verdict is None:
                    if b.check_incorrect_password(output) or (answered and b.check_password_prompt(output)):
                        verdict = "Incorrect %s password" % b.name
                    elif b.check_missing_password(output):
                        verdict = "Missing %s password" % b.name
                    elif b.check_password_prompt(output):
                        password = b.get_option("become_pass")
                        if not password:
                            verdict = "Missing %s password" % b.name
                        else:
                            answer["password"] = to_text(password)
                            answered = True
                            output = b""
                    if verdict is not None:
                        answer["abort"] = verdict
                self._arbor.send(answer)
        except AnsibleConnectionFailure:
            raise
        except AnsibleError as e:
            if verdict is None:
                # The command may have ended before its last words were
                # relayed: they are in the error, for the plugin's checks.
                said = to_bytes(to_text(e), errors="surrogate_or_strict")
                if b.check_incorrect_password(said):
                    verdict = "Incorrect %s password" % b.name
                elif b.check_missing_password(said):
                    verdict = "Missing %s password" % b.name
            if verdict is not None:
                raise AnsibleError("%s: %s" % (label, verdict))
            if "no become prompt or success within" in to_text(e):
                # As vanilla's ssh says it: the host did not answer as the
                # become plugin expects (a prompt it does not know, a hang).
                raise AnsibleConnectionFailure("%s: Timeout (%ds) waiting for privilege escalation prompt: %s"
                                               % (label, timeout, to_text(output, errors="replace")))
            raise e

    def _arbor_released(self, output):
        """A command refused because one of arbor's become interpreters runs
        as the user it deletes (`userdel: user X is currently used by
        process N`, from userdel, deluser or the user module): that
        interpreter is ended, and True says to run the command again (it
        changed nothing). With vanilla, no process of the user is left."""
        m = _USER_BUSY.search(output)
        if m is None:
            return False
        self._arbor.send(self._arbor_target({"op": "release", "pid": int(m.group(1))}))
        if not self._arbor.recv()[0].get("released"):
            return False
        display.vvv("ARBOR RELEASE ended the interpreter (pid %s) that kept the user busy" % m.group(1),
                    host=self._chain[-1]["name"])
        return True
