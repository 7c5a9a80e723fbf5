"""A persistent agent's memory stays flat over many module runs: each
in-process module imports its module_utils afresh and drops them, and their
cycles must be collected after it, not whenever a full collection comes
(ever later as the heap grows: the agent grew by about 1 MiB for every
three modules run before)."""

import os
import subprocess
import sys

from agentkit import REPO

RUNS = 60
GROWTH_KIB_MAX = 8 * 1024


def build(tmp_path, module, args):
    """A real AnsiballZ script, as ansible-core builds it."""
    d = tmp_path / module
    env = dict(os.environ, ANSIBLE_KEEP_REMOTE_FILES="1", ANSIBLE_PIPELINING="False",
               ANSIBLE_REMOTE_TMP=str(d))
    subprocess.run([str(REPO / ".venv" / "bin" / "ansible"), "localhost", "-c", "local", "-m", module,
                    "-a", args, "-e", f"ansible_python_interpreter={sys.executable}"],
                   env=env, check=True, capture_output=True)
    return next(d.glob(f"*/AnsiballZ_{module}.py")).read_bytes()


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_flat_over_many_in_process_modules(link, tmp_path):
    scripts = [build(tmp_path, m, a) for m, a in (
        ("stat", "path=/etc/hostname"), ("file", f"path={tmp_path}/x state=absent"),
        ("command", "echo hi"))]
    python = os.path.realpath(sys.executable)

    def run(n):
        for i in range(n):
            for s in scripts:
                res, blob = link.call({"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python,
                                       "lane": i}, s)
                assert res.get("rc") == 0, (res, blob[:500])
    run(5)  # warm: every module_util compiled and cached once
    before = rss_kib(link.proc.pid)
    run(RUNS)
    grown = rss_kib(link.proc.pid) - before
    print(f"{RUNS * len(scripts)} modules: {grown} KiB")
    assert grown < GROWTH_KIB_MAX, f"the agent grew {grown} KiB over {RUNS * len(scripts)} modules"
