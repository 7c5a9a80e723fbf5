#!/usr/bin/env python3
"""Connect cost of an arbor tree in the lab, measured hop by hop.

Brings up a lab (fresh per rep), starts `arbor daemon`, and asks for every
target's agent at once (one API connection per target, as Ansible's forks
do), with the chains the glue would send. Reports, per rep:
- when each target's agent was ready (from the first request), and the
  connect spread: first to last target ready;
- each node's own connect time as the daemon saw it (`connect_ms`: from
  its spawn to its hello);
- CPU seconds per lab host role while connecting (cgroups).

These are the simulator's measured inputs (tests/sim, `connect` module).

    deploy/bench/connect.py --targets 30 --wan-delay-ms 50 --reps 3 --out results/connect-30t-50ms.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "deploy" / "lab"
ARBOR = Path(os.environ.get("ARBOR_BIN") or REPO / "target" / "release" / "arbor")
sys.path.insert(0, str(REPO / "ansible-glue"))
from arbor_glue import wire  # noqa: E402 (the daemon's API framing, one implementation)


class Api(wire.Client):
    """The daemon's API (the glue's own client); `recv` raises at EOF."""

    def recv(self):
        got = super().recv()
        if got is None:
            raise EOFError("daemon closed the connection")
        return got


def lab_hop(lab, name, extra=()):
    """The chain entry the glue sends for lab host `name` (its inventory
    settings), with `extra` ssh arguments."""
    h = lab["hosts"][name]
    # Ansible's default ssh_args start with -C (ControlMaster/Persist arbor drops).
    args = ["-C", "-o", f"UserKnownHostsFile={lab['known_hosts']}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", *extra]
    entry = {"name": name, "host": h["address"], "user": "root"}
    if h["role"] == "bastion":
        entry["key_file"] = lab["private_key"]
        args += ["-o", "IdentitiesOnly=yes"]
    if h["role"] in ("bastion", "rack"):
        args += ["-o", "ForwardAgent=yes"]
    else:
        entry["python"] = "/usr/bin/python3"
    entry["ssh_args"] = args
    return entry


def lab_chain(lab, target, extra=()):
    return [lab_hop(lab, n, extra) for n in lab["hosts"][target]["via_chain"] + [target]]


def start_daemon(run_dir, log):
    d = subprocess.Popen([str(ARBOR), "daemon", "--run-dir", str(run_dir), "--parent-pid", str(os.getpid())],
                         env=dict(os.environ, SSH_AUTH_SOCK=""), stderr=log)
    for _ in range(250):
        if (run_dir / "sock").exists():
            return d
        time.sleep(0.02)
    d.kill()
    raise RuntimeError("arbor daemon did not start")


def cpu():
    out = subprocess.run([str(LAB / "cpu")], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def lab_up(args):
    cmd = [str(LAB / "up"), "--targets", str(args.targets), "--depth", str(args.depth),
           "--racks", str(args.racks), "--wan-delay-ms", str(args.wan_delay_ms), "--no-python-bastion"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())


def one_rep(args):
    lab = lab_up(args)
    targets = sorted((n for n, h in lab["hosts"].items() if h["role"] == "target"),
                     key=lambda n: int(n[len("target"):]))
    tmp = Path(tempfile.mkdtemp(prefix="arbor-connect-"))
    with open(tmp / "daemon.log", "wb") as log:
        d = start_daemon(tmp / "run", log)
        try:
            apis = {t: Api(tmp / "run" / "sock") for t in targets}
            subprocess.run([str(LAB / "wan"), "reset"], check=True, capture_output=True)
            before = cpu()
            ready, hellos, errors = {}, {}, {}
            go = threading.Event()
            t0 = [0.0]

            def ask(t):
                go.wait()
                apis[t].send({"op": "info", "chain": lab_chain(lab, t, args.ssh_arg)})
                res, _ = apis[t].recv()
                ready[t] = time.monotonic() - t0[0]
                if "error" in res:
                    errors[t] = res["error"]
                else:
                    hellos[t] = res

            threads = [threading.Thread(target=ask, args=(t,)) for t in targets]
            for th in threads:
                th.start()
            t0[0] = time.monotonic()
            go.set()
            for th in threads:
                th.join(timeout=300)
            after = cpu()
            wan = json.loads(subprocess.run([str(LAB / "wan"), "stats"], check=True, capture_output=True,
                                            text=True).stdout)
        finally:
            d.terminate()
            d.wait(timeout=30)
    subprocess.run([str(LAB / "down")], check=True, capture_output=True)
    if errors:
        raise RuntimeError(f"targets failed: {errors}")
    nodes = {}
    for t, h in hellos.items():
        for hop, name in zip(h["hops"], lab["hosts"][t]["via_chain"] + [t]):
            nodes[name] = hop.get("connect_ms")
    spent = {k: round(after[k] - before[k], 3) for k in after}
    role = {n: h["role"] for n, h in lab["hosts"].items()}
    times = sorted(ready.values())
    return {
        "first_ready_s": round(times[0], 3),
        "last_ready_s": round(times[-1], 3),
        "spread_s": round(times[-1] - times[0], 3),
        "ready_s": {t: round(v, 3) for t, v in sorted(ready.items())},
        "connect_ms": nodes,
        "cpu_s": {r: round(sum(v for n, v in spent.items() if role.get(n) == r), 3)
                  for r in ("bastion", "rack", "target")},
        "cpu_s_wan_emulator": spent.get("wan"),
        "wan_bytes": {"up": wan["up"]["bytes"], "down": wan["down"]["bytes"]},
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, default=30)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--racks", type=int, default=2)
    p.add_argument("--wan-delay-ms", type=float, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ssh-arg", action="append", default=[],
                   help="an extra ssh argument for every hop (e.g. -o KexAlgorithms=curve25519-sha256)")
    p.add_argument("--out")
    args = p.parse_args()
    reps = []
    for i in range(args.reps):
        r = one_rep(args)
        reps.append(r)
        print(f"rep {i + 1}: first {r['first_ready_s']} s, last {r['last_ready_s']} s, spread {r['spread_s']} s; "
              f"CPU bastion {r['cpu_s']['bastion']} s, racks {r['cpu_s']['rack']} s, "
              f"targets {r['cpu_s']['target']} s", file=sys.stderr)
    med = lambda k: statistics.median(r[k] for r in reps)  # noqa: E731
    summary = {
        "settings": vars(args),
        "median": {k: med(k) for k in ("first_ready_s", "last_ready_s", "spread_s")},
        "median_cpu_s": {r: statistics.median(x["cpu_s"][r] for x in reps) for r in ("bastion", "rack", "target")},
        "median_wan_bytes": {d: statistics.median(x["wan_bytes"][d] for x in reps) for d in ("up", "down")},
        "reps": reps,
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: summary[k] for k in ("median", "median_cpu_s", "median_wan_bytes")}))


if __name__ == "__main__":
    main()
