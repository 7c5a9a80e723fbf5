#!/usr/bin/python
# A module that says which process runs it: its pid and its parent's.
import os
import sys

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec={})
    module.exit_json(changed=False, executable=sys.executable,
                     probe={"pid": os.getpid(), "ppid": os.getppid()})


if __name__ == "__main__":
    main()
