#!/usr/bin/python
# A module that says which interpreter runs it.
import os
import sys

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(argument_spec={})
    module.exit_json(changed=False, executable=sys.executable, real=os.path.realpath(sys.executable),
                     version="%d.%d" % sys.version_info[:2])


if __name__ == "__main__":
    main()
