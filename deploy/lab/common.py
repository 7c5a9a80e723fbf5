"""What the lab's modules share: where the lab lives, running commands, the
lab's error."""

import os
import subprocess
import sys
from pathlib import Path

RUN_DIR = Path(os.environ.get("ARBOR_LAB_DIR", "/run/arbor-lab"))
# Docker engines of container hosts: outside the run dir, which hosts mask.
DOCKER_DIR = Path(f"{RUN_DIR}-docker")

# `sh -c JOIN_CGROUP CGROUP CMD...`: moves itself into CGROUP, then runs CMD.
JOIN_CGROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


REPO = Path(__file__).resolve().parents[2]
NS_PREFIX = "arb-"
ROOT_IF = "arb-wan0"
CONTROLLER_ADDR = "10.240.0.1"
WAN_NET = "10.240.0"
# Target LANs are unroutable from the controller: refused at once instead of
# leaking to the machine's real network. Only these ranges are blocked (a
# wider one could swallow the machine's own nameserver).
LAB_UNREACHABLE = ("10.241.0.0/16", "10.242.0.0/16")
LAB_RANGES = ("10.240.0.0/24",) + LAB_UNREACHABLE
BASTION_LAN = "10.241.{b}"
RACK_LAN = "10.242.{r}"
HOSTS_PER_LAN_MAX = 240
BASTIONS_MAX = 200
RACKS_MAX = 250
CGROUP_NAME = "arbor-lab"
SSHD_READY_TIMEOUT_S = 30.0
WAN_READY_TIMEOUT_S = 10.0
KILL_GRACE_S = 2.0


class LabError(Exception):
    pass


def log(msg):
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def sh(*args, check=True, capture=False, input=None, env=None):
    """Runs a command; raises LabError with its stderr on failure."""
    res = subprocess.run(
        [str(a) for a in args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
    )
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(map(str, args))}: {res.stderr.strip() or res.returncode}")
    return res.stdout if capture else res


def ns_exec(ns, *args, **kw):
    return sh("ip", "netns", "exec", ns, *args, **kw)
