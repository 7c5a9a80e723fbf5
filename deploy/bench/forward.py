#!/usr/bin/env python3
"""A forwarded TCP stream (arbor_forward) through bastion -> target, against
the WAN it crosses: a server on the controller sends N bytes; a client on
the target reads them through the forward, timing from its connect to the
last byte. The same bytes sent down a plain `ssh -J bastion target` are
the reference, and the WAN emulator's rate the target (at least 80 %).
Interleaved (forward, ssh, forward, ssh, ...), medians.

    deploy/bench/forward.py --rounds 5 --out deploy/bench/results/forward-10mbit-100ms

Brings up the lab with one target (unless --reuse-lab) and a WAN of
--wan-rate-mbit and --wan-delay-ms each way.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "deploy" / "lab"
ARBOR = REPO / "target" / "release" / "arbor"
VENV = REPO / ".venv" / "bin"
GLUE = REPO / "ansible-glue" / "plugins" / "connection"

CLIENT = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 30)
t0 = time.monotonic(); n = 0
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    n += len(b)
print("%d %.4f" % (n, time.monotonic() - t0))
"""

PLAY = """
- hosts: target1
  gather_facts: false
  tasks:
    - copy: {{content: "{{{{ client }}}}", dest: /tmp/arbor-fwd-bench.py}}
      vars: {{client: {client}}}
    - command: python3 /tmp/arbor-fwd-bench.py {port}
      register: got
      vars: {{arbor_forward: [{{listen: "{port}", connect: "127.0.0.1:{sport}"}}]}}
    - debug: {{msg: "FORWARD {{{{ got.stdout }}}}"}}
"""


def serve(sock, size):
    block = os.urandom(1 << 16)
    while True:
        c, _ = sock.accept()
        left = size
        while left:
            left -= c.send(block[:min(left, len(block))])
        c.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mbytes", type=float, default=6)
    ap.add_argument("--wan-rate-mbit", type=float, default=10)
    ap.add_argument("--wan-delay-ms", type=float, default=50, help="one way")
    ap.add_argument("--reuse-lab", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    size = int(args.mbytes * 1e6)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.reuse_lab:
        up = subprocess.run([str(LAB / "up"), "--targets", "1", "--wan-delay-ms", str(args.wan_delay_ms),
                             "--wan-rate-mbit", str(args.wan_rate_mbit)], capture_output=True, text=True,
                            check=True)
        lab_dir = Path(up.stdout.strip().splitlines()[-1])
    else:
        lab_dir = Path("/run/arbor-lab")
    lab = json.loads((lab_dir / "lab.json").read_text())
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    threading.Thread(target=serve, args=(srv, size), daemon=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="arbor-fwd-bench-"))
    book = tmp / "play.yml"
    book.write_text(PLAY.format(client=json.dumps(CLIENT), port=17777,
                                sport=srv.getsockname()[1]))
    env = dict(os.environ, ANSIBLE_CONNECTION_PLUGINS=str(GLUE), ARBOR_BIN=str(ARBOR),
               ANSIBLE_NOCOLOR="1")
    env.pop("SSH_AUTH_SOCK", None)
    hop = lab["hosts"]["target1"]["via_chain"]
    rows = []
    payload = os.urandom(size)
    try:
        for i in range(args.rounds):
            res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book)],
                                 env=env, capture_output=True, text=True, timeout=600)
            line = [x for x in res.stdout.splitlines() if "FORWARD " in x]
            if res.returncode != 0 or not line:
                raise SystemExit(f"round {i + 1}: the forward failed:\n{res.stdout[-3000:]}")
            n, secs = line[0].split("FORWARD ", 1)[1].strip().strip('"').split()
            if int(n) != size:
                raise SystemExit(f"round {i + 1}: {n} bytes arrived of {size}")
            fwd = float(secs)
            ssh = ["ssh", "-F", lab["ssh_config"], "-J", ",".join(hop), "target1"]
            t0 = time.monotonic()
            subprocess.run(ssh + ["true"], check=True, timeout=600)
            setup = time.monotonic() - t0
            t0 = time.monotonic()
            subprocess.run(ssh + ["cat > /dev/null"], input=payload, check=True, timeout=600)
            # The stream alone: the same ssh's connection set-up (`true`) taken off.
            plain = time.monotonic() - t0 - setup
            row = {"round": i + 1, "forward_s": fwd, "forward_mbit": size * 8 / fwd / 1e6,
                   "ssh_setup_s": round(setup, 4), "ssh_s": round(plain, 4),
                   "ssh_mbit": size * 8 / plain / 1e6}
            rows.append(row)
            print(f"forward: round {i + 1}: forward {row['forward_mbit']:.2f} Mbit/s,"
                  f" ssh {row['ssh_mbit']:.2f} Mbit/s", file=sys.stderr, flush=True)
    finally:
        if not args.reuse_lab:
            subprocess.run([str(LAB / "down")], capture_output=True)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    summary = {"rounds": len(rows), "bytes": size, "wan_rate_mbit": args.wan_rate_mbit,
               "wan_rtt_ms": 2 * args.wan_delay_ms, "forward_mbit_median": round(med("forward_mbit"), 3),
               "ssh_mbit_median": round(med("ssh_mbit"), 3),
               "forward_of_wan_rate": round(med("forward_mbit") / args.wan_rate_mbit, 3),
               "forward_of_ssh": round(med("forward_mbit") / med("ssh_mbit"), 3)}
    (out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
