"""The bench's `arbor-persist` mode: arbor with ARBOR_PERSIST, measured on
second runs. One warm-up run per bench (not measured) starts the kept
daemon in a cgroup of its own, so the per-run cgroup's leftover sweep does
not kill it; each measured run then reuses the tree, and the CPU the kept
daemon (and its ssh processes) spent during the run counts as the run's
controller CPU. `arbor stop` at the end; whatever is left in its cgroup
after that is killed and reported."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import lab  # noqa: E402  (deploy/lab/lab.py, on sys.path by bench.py)
import teardown  # noqa: E402

# How long the kept tree may stay idle between runs of the bench.
PERSIST = "30m"


class KeptTree(object):
    def __init__(self, mode, cgroup_parent, arbor_bin):
        # A short TMPDIR: the daemon's socket path must stay under 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="abp-", dir="/tmp"))
        self.env = {"ARBOR_PERSIST": PERSIST, "TMPDIR": str(self.tmp)}
        self.cg = cgroup_parent / f"kept-{os.getpid()}-{mode.replace(':', '-')}"
        self.arbor_bin = arbor_bin
        self.warm = False

    def warm_up(self, cmd, env, log):
        """The first run, in the kept cgroup (its daemon stays there)."""
        if self.warm:
            return
        self.cg.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(["sh", "-c", lab.JOIN_CGROUP, str(self.cg), *cmd], env=env,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True).returncode
        if rc != 0:
            raise RuntimeError(f"the warm-up run failed (rc {rc}): see {log}")
        self.warm = True

    def cpu(self):
        return teardown.cgroup_cpu_seconds(self.cg) if self.warm else 0.0

    def alive(self):
        return bool(teardown.cgroup_pids(self.cg)) if self.warm else False

    def stop(self, env):
        """`arbor stop`; returns how many processes were left after it.
        Its TMPDIR goes too."""
        if not self.warm:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return 0
        subprocess.run([str(self.arbor_bin), "stop"], env=env, capture_output=True, timeout=120)
        t0 = time.monotonic()
        while teardown.cgroup_pids(self.cg) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        left = teardown.cgroup_pids(self.cg)
        teardown.kill_pids(left)
        teardown.rmdir_retry(self.cg)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return len(left)
