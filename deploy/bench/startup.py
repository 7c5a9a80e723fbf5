"""Where a short run's first task goes, and what arbor's plugin directory
costs a play that uses none of its plugins.

    deploy/bench/startup.py [--pairs N] [--venv DIR] [--out FILE.md]

Measured on the controller alone (localhost), interleaved, medians:
  - plugin dir: a play of one `debug` task (no connection), with and without
    ANSIBLE_CONNECTION_PLUGINS set to arbor's glue, in alternating pairs;
  - glue import: Ansible's plugin loader loading arbor's ssh plugin, and
    each container plugin after it (their documentation included);
  - daemon start: `arbor daemon` until its socket answers;
  - first task: a one-task play with `connection: local` through arbor at
    -vvv, with the agent's connect time as the daemon reports it
    (`ARBOR HOP … up in N ms`), beside vanilla's local connection.
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GLUE = REPO / "ansible-glue" / "plugins" / "connection"
ARBOR_BIN = REPO / "target" / "release" / "arbor"

DEBUG_PLAY = "- hosts: localhost\n  gather_facts: false\n  tasks:\n    - debug: {msg: hi}\n"
ONE_TASK = ("- hosts: localhost\n  connection: local\n  gather_facts: false\n"
            "  vars: {ansible_python_interpreter: /usr/bin/python3}\n"
            "  tasks:\n    - command: 'true'\n")
HOP = re.compile(r"ARBOR HOP localhost .*?up in (\d+) ms")

LOADER_PROBE = """
import sys, time
from ansible.plugins.loader import connection_loader
connection_loader.add_directory(sys.argv[1])
t = time.perf_counter()
connection_loader.get('ssh', class_only=True)
first = time.perf_counter() - t
import os
names = sorted(f[:-3] for f in os.listdir(sys.argv[1])
               if f.endswith('.py') and f not in ('ssh.py', 'local.py'))
t = time.perf_counter()
for name in names:
    connection_loader.get(name, class_only=True)
print(first, time.perf_counter() - t, len(names))
"""


def env(venv, arbor):
    e = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    e.update(ANSIBLE_NOCOLOR="1", PATH=f"{venv / 'bin'}:{e['PATH']}")
    e.pop("SSH_AUTH_SOCK", None)
    if arbor:
        e.update(ANSIBLE_CONNECTION_PLUGINS=str(GLUE), ARBOR_BIN=str(ARBOR_BIN))
    return e


def timed(cmd, e, cwd):
    t = time.monotonic()
    res = subprocess.run(cmd, env=e, cwd=cwd, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return wall, res.stdout


def daemon_start(work):
    run_dir = Path(tempfile.mkdtemp(prefix="arbor-startup-", dir=work))
    t = time.monotonic()
    proc = subprocess.Popen([str(ARBOR_BIN), "daemon", "--run-dir", str(run_dir / "d"),
                             "--parent-pid", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(run_dir / "d" / "sock"))
                return time.monotonic() - t
            except OSError:
                if time.monotonic() - t > 10:
                    raise SystemExit("arbor daemon did not start in 10 s")
                time.sleep(0.001)
            finally:
                s.close()
    finally:
        proc.terminate()
        proc.wait()


def med(xs):
    return statistics.median(xs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--venv", type=Path, default=REPO / ".venv")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    venv = args.venv.resolve()
    playbook = str(venv / "bin" / "ansible-playbook")
    version = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import ansible.release as r, sys; print(r.__version__, sys.version.split()[0])"],
                             capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory(prefix="arbor-startup-") as work:
        w = Path(work)
        (w / "debug.yml").write_text(DEBUG_PLAY)
        (w / "one.yml").write_text(ONE_TASK)
        plain, glued, loads, starts, first_v, first_a, hops = [], [], [], [], [], [], []
        for i in range(args.pairs):
            for arbor in ((False, True) if i % 2 == 0 else (True, False)):
                wall, _ = timed([playbook, "-i", "localhost,", "debug.yml"], env(venv, arbor), w)
                (glued if arbor else plain).append(wall)
            loads.append([float(x) for x in subprocess.run(
                [str(venv / "bin" / "python"), "-c", LOADER_PROBE, str(GLUE)], env=env(venv, False),
                capture_output=True, text=True, check=True).stdout.split()])
            starts.append(daemon_start(w))
            for arbor in ((False, True) if i % 2 == 0 else (True, False)):
                wall, out = timed([playbook, "-i", "localhost,", "one.yml", "-vvv"], env(venv, arbor), w)
                if arbor:
                    first_a.append(wall)
                    m = HOP.search(out)
                    if m is None:
                        raise SystemExit("no ARBOR HOP line in arbor's -vvv output")
                    hops.append(int(m.group(1)) / 1000)
                else:
                    first_v.append(wall)
    lines = [
        f"### Start-up, ansible-core {version[0]} (Python {version[1]}), {args.pairs} interleaved pairs, medians",
        "",
        f"Command: `deploy/bench/startup.py --pairs {args.pairs}"
        + (f" --venv {args.venv}" if args.venv != REPO / ".venv" else "") + "`",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| one `debug` task, Ansible alone | {med(plain):.3f} |",
        f"| the same with arbor's plugin dir on the path | {med(glued):.3f} |",
        f"| **cost of the plugin dir** (median of pair differences) | "
        f"**{med([g - p for g, p in zip(glued, plain)]):+.3f}** |",
        f"| loading arbor's ssh plugin (its documentation included) | {med([x[0] for x in loads]):.3f} |",
        f"| loading the other {int(loads[0][2])} plugins of the dir after it | {med([x[1] for x in loads]):.3f} |",
        f"| `arbor daemon` until its socket answers | {med(starts):.3f} |",
        f"| one `command` task, `connection: local`, vanilla | {med(first_v):.3f} |",
        f"| the same through arbor | {med(first_a):.3f} |",
        f"| of which the local agent's connect (ARBOR HOP … up in) | {med(hops):.3f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
