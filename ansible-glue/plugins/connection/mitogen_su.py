# arbor's `mitogen_su` connection (Mitogen's name): su to another account on the
# host before it in the chain (its mitogen_via/arbor_via), as a hop that
# further hops can follow. The work is in ssh.py's ContainerConnection.

from __future__ import annotations

import sys

from ansible.plugins.loader import connection_loader

_glue = sys.modules[connection_loader.get("ssh", class_only=True).__module__]

DOCUMENTATION = _glue.container_documentation("mitogen_su")


class Connection(_glue.ContainerConnection):
    transport = "mitogen_su"
    _arbor_method = "su"
