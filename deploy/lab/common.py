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
