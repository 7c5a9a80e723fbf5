#!/usr/bin/python
# A module that says which process runs it: its pid, its parent's, and its
# own command line (a fork of arbor's agent carries the agent's).
import os
import sys

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec={})
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    module.exit_json(changed=False, executable=sys.executable,
                     probe={"pid": os.getpid(), "ppid": os.getppid(), "cmdline": cmdline[:300]})


if __name__ == "__main__":
    main()
