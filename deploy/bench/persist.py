#!/usr/bin/env python3
"""A persistent tree (ARBOR_PERSIST) over many runs: each run's wall time,
the WAN bytes it cost, and the memory of the daemon, the relay and the
agents after it. The first run builds the tree; every later one reuses it,
so its cost is requests and replies only, and the memory of a long-lived
tree must stay flat.

    deploy/bench/persist.py --runs 200 --targets 3 --out deploy/bench/results/persist-200

Brings up the lab (unless --reuse-lab), runs the fleet workload's small
playbook N times with its own TMPDIR, then `arbor stop`, and checks that
nothing is left on any host.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "deploy" / "lab"
ARBOR = REPO / "target" / "release" / "arbor"
VENV = REPO / ".venv" / "bin"
GLUE = REPO / "ansible-glue" / "plugins" / "connection"

PLAY = """
- hosts: targets
  gather_facts: false
  tasks:
    - command: hostname
    - copy: {content: "persist {{ 1000 | random }}\\n", dest: /tmp/arbor-persist-bench}
    - stat: {path: /tmp/arbor-persist-bench}
    - file: {path: /tmp/arbor-persist-bench, state: absent}
"""


def rss_kib(pid):
    """A process's resident memory in KiB, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def wan(lab, verb):
    res = subprocess.run([lab["wan"]["binary"], "ctl", "--control", lab["wan"]["control_socket"], verb],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def status(env):
    res = subprocess.run([str(ARBOR), "status", "--json"], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--wan-delay-ms", type=int, default=0)
    ap.add_argument("--reuse-lab", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.reuse_lab:
        up = subprocess.run([str(LAB / "up"), "--targets", str(args.targets),
                             "--wan-delay-ms", str(args.wan_delay_ms)],
                            capture_output=True, text=True, check=True)
        lab_dir = Path(up.stdout.strip().splitlines()[-1])
    else:
        lab_dir = Path("/run/arbor-lab")
    lab = json.loads((lab_dir / "lab.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="arbor-persist-bench-"))
    book = tmp / "play.yml"
    book.write_text(PLAY)
    env = dict(os.environ, ANSIBLE_CONNECTION_PLUGINS=str(GLUE), ARBOR_BIN=str(ARBOR), ARBOR_PERSIST="10m",
               ANSIBLE_PIPELINING="True", ANSIBLE_NOCOLOR="1", TMPDIR=str(tmp))
    env.pop("SSH_AUTH_SOCK", None)
    rows = []
    try:
        for i in range(args.runs):
            wan(lab, "reset")
            t0 = time.monotonic()
            res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book)],
                                 env=env, capture_output=True, text=True, timeout=600)
            wall = time.monotonic() - t0
            if res.returncode != 0:
                raise SystemExit(f"run {i + 1} failed:\n{res.stdout[-3000:]}")
            stats = wan(lab, "stats")
            [tree] = status(env)
            pids = {"daemon": tree["pid"]}
            for h in tree["hops"]:
                if h.get("pid"):
                    pids[h["label"]] = h["pid"]
            row = {"run": i + 1, "wall_s": round(wall, 3), "wan_up_bytes": stats["up"]["bytes"],
                   "wan_down_bytes": stats["down"]["bytes"], "hops": len(tree["hops"]),
                   "rss_kib": {k: rss_kib(p) for k, p in pids.items()}}
            rows.append(row)
            print(f"persist: run {i + 1}/{args.runs}: {wall:.2f} s, WAN {row['wan_up_bytes'] / 1024:.1f} KiB up,"
                  f" daemon {row['rss_kib']['daemon']} KiB", file=sys.stderr, flush=True)
    finally:
        subprocess.run([str(ARBOR), "stop"], env=env, capture_output=True, timeout=120)
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    later = rows[1:]
    procs = sorted(rows[-1]["rss_kib"])
    summary = {
        "runs": len(rows), "targets": args.targets, "wan_delay_ms": args.wan_delay_ms,
        "first_wall_s": rows[0]["wall_s"], "later_wall_s_median": statistics.median(r["wall_s"] for r in later),
        "first_wan_up_bytes": rows[0]["wan_up_bytes"],
        "later_wan_up_bytes_median": statistics.median(r["wan_up_bytes"] for r in later),
        "hops_first": rows[0]["hops"], "hops_last": rows[-1]["hops"],
        # Memory after run 10 (warm) and after the last run, per process.
        "rss_kib": {p: {"after_10": rows[min(9, len(rows) - 1)]["rss_kib"].get(p),
                        "last": rows[-1]["rss_kib"].get(p)} for p in procs},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    # Nothing of the tree is left on any host.
    if not args.reuse_lab:
        subprocess.run([str(LAB / "down")], capture_output=True)


if __name__ == "__main__":
    main()
