# arbor's `podman` connection: a podman container reached through the arbor relay
# on the host named in its mitogen_via/arbor_via (or from the controller if
# it has none). Generated alike for every container method; the work is in
# ssh.py's ContainerConnection.

from __future__ import annotations

import sys

from ansible.plugins.loader import connection_loader

_glue = sys.modules[connection_loader.get("ssh", class_only=True).__module__]

DOCUMENTATION = _glue.container_documentation("podman")


class Connection(_glue.ContainerConnection):
    transport = "podman"
    _arbor_method = "podman"
