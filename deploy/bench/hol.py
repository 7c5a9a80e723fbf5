#!/usr/bin/env python3
"""Head-of-line blocking: the latency of small requests to one target while
a big file goes to another target behind the same bastion.

    deploy/bench/hol.py --modes ssh,quic --reps 3 --wan-delay-ms 150 --wan-loss-pct 2 \
        --out deploy/bench/results/hol-2t-150ms-2pct

One playbook, strategy free, arbor on both hosts: target1 copies a file of
--mbytes random bytes; target2 meanwhile runs `ping` --pings times (one
task, a loop). A callback plugin of this harness notes the moment each
loop item's result arrives; an item's latency is the time since the one
before it (the first --skip items, before the transfer is under way, are
left out). Once target2's loop is done, or --run-limit-s has passed (then
the items seen so far count, if at least 5), the run is stopped: the copy
has no need to finish (at 2 % loss it would take most of an hour). The
harness then waits for arbor's daemon and relays to be gone.

Modes: `ssh` (the bastion's link is its ssh session, one TCP stream) and
`quic` (ARBOR_TRANSPORT=quic: a QUIC stream per host); `ssh-idle` and
`quic-idle` run the same pings with no copy, for the latency the link and
Ansible's own per-item work give with nothing in the way. Interleaved,
A B A B; p50 and p90 per mode over every measured item, in ms and in RTTs.

Brings up the lab with two targets (unless --reuse-lab) and a WAN of
--wan-delay-ms each way and --wan-loss-pct loss.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LAB = REPO / "deploy" / "lab"
sys.path.insert(0, str(HERE))
from bench import ARBOR_BIN, GLUE, VENV, wan_ctl  # noqa: E402  (the side-by-side harness's)
# A run is stopped this long after it starts even if target2's loop is
# not done (over a stalled link it may not be for a long time); the items
# seen by then are its measurements.
RUN_LIMIT_S_DEFAULT = 300
MODES = ("ssh", "quic", "ssh-idle", "quic-idle")
TEARDOWN_WAIT_S = 15

PLAY = """
- hosts: target1,target2
  gather_facts: false
  strategy: free
  tasks:
    - ping:
    - name: big
      copy: {src: "{{ big }}", dest: /tmp/arbor-hol-big}
      when: inventory_hostname == big_host
    - name: small
      ping:
      loop: "{{ range(pings | int) | list }}"
      when: inventory_hostname == 'target2'
"""

CALLBACK = '''
import json, os, time
from ansible.plugins.callback import CallbackBase

class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "arbor_hol"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._out = open(os.environ["ARBOR_HOL_OUT"], "a", buffering=1)

    def _note(self, what, result):
        if result._task.get_name() == "small" and result._host.get_name() == "target2":
            self._out.write(json.dumps({"t": time.monotonic(), "what": what}) + "\\n")

    def v2_runner_on_start(self, host, task):
        if task.get_name() == "small" and host.get_name() == "target2":
            self._out.write(json.dumps({"t": time.monotonic(), "what": "start"}) + "\\n")

    def v2_runner_item_on_ok(self, result):
        self._note("item", result)

    def v2_runner_item_on_failed(self, result):
        self._note("failed", result)

    def v2_runner_on_ok(self, result):
        self._note("done", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._note("failed", result)

    def v2_runner_on_unreachable(self, result):
        self._note("failed", result)
'''


def arbor_pids():
    """Pids of arbor's daemon on the controller and relays in the lab's namespaces."""
    out = subprocess.run(["pgrep", "-f", "arbor( |-relay)"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def run_once(mode, rep, args, ctx):
    notes = ctx["tmp"] / f"{rep:02d}-{mode}.jsonl"
    env = dict(os.environ, ANSIBLE_CONNECTION_PLUGINS=str(GLUE), ARBOR_BIN=str(ARBOR_BIN),
               ANSIBLE_NOCOLOR="1", ANSIBLE_CALLBACK_PLUGINS=str(ctx["tmp"]),
               ANSIBLE_CALLBACKS_ENABLED="arbor_hol", ARBOR_HOL_OUT=str(notes))
    env.pop("SSH_AUTH_SOCK", None)
    env.pop("ARBOR_TRANSPORT", None)
    if mode.startswith("quic"):
        env["ARBOR_TRANSPORT"] = "quic"
    log = ctx["out"] / "logs" / f"{rep:02d}-{mode}.log"
    cmd = [str(VENV / "bin" / "ansible-playbook"), "-vvv", "-i", ctx["inventory"], str(ctx["book"]),
           "-e", f"big={ctx['big']}", "-e", f"pings={args.pings}",
           "-e", "big_host=" + ("none" if mode.endswith("-idle") else "target1")]
    wan_ctl(ctx["lab"], "reset")
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        done = None
        while time.monotonic() - t0 < args.run_limit_s and proc.poll() is None:
            if notes.exists():
                ends = [json.loads(x) for x in notes.read_text().splitlines()]
                done = next((e["what"] for e in ends if e["what"] in ("done", "failed")), None)
                if done:
                    break
            time.sleep(0.2)
        # What crossed the WAN toward the bastion while the pings ran: the
        # copy's pace beside them.
        up = wan_ctl(ctx["lab"], "stats")["up"]["bytes"]
        secs = time.monotonic() - t0
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # the playbook ended by itself (no copy to stop)
        proc.wait()
    t_end = time.monotonic()
    while arbor_pids() and time.monotonic() - t_end < TEARDOWN_WAIT_S:
        time.sleep(0.1)
    left = arbor_pids()
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = log.read_text(errors="replace")
    over = ("over QUIC" in text) if mode.startswith("quic") else ("over QUIC" not in text)
    events = [json.loads(x) for x in notes.read_text().splitlines()] if notes.exists() else []
    times = [e["t"] for e in events if e["what"] in ("start", "item")]
    lat = [round((b - a) * 1000, 1) for a, b in zip(times, times[1:])][args.skip:]
    # A run cut by the limit counts with the items it saw (at least 5).
    ok = over and done != "failed" and (done == "done" or len(lat) >= 5)
    return {"mode": mode, "rep": rep, "ok": ok, "end": done or f"cut at {args.run_limit_s} s",
            "link_as_asked": over, "wan_up_bytes": up, "wan_up_mbit_s": round(up * 8 / secs / 1e6, 3),
            "latencies_ms": lat, "leftover_processes": len(left), "log": str(log.relative_to(ctx["out"]))}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="ssh,quic")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pings", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--mbytes", type=int, default=100, help="MiB copied to target1")
    ap.add_argument("--wan-delay-ms", type=float, default=150, help="one way")
    ap.add_argument("--wan-loss-pct", type=float, default=2)
    ap.add_argument("--run-limit-s", type=float, default=RUN_LIMIT_S_DEFAULT)
    ap.add_argument("--reuse-lab", action="store_true")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"modes are {', '.join(MODES)}")
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if not args.reuse_lab:
        subprocess.run([str(REPO / "deploy" / "setup")], check=True, stdout=subprocess.DEVNULL)
        up = subprocess.run([str(LAB / "up"), "--targets", "2", "--wan-delay-ms", str(args.wan_delay_ms),
                             "--wan-loss-pct", str(args.wan_loss_pct)], capture_output=True, text=True)
        if up.returncode:
            raise SystemExit(f"lab up failed: {up.stderr.strip()}")
        lab_dir = Path(up.stdout.strip().splitlines()[-1])
    else:
        lab_dir = Path("/run/arbor-lab")
    lab = json.loads((lab_dir / "lab.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="arbor-hol-"))
    (tmp / "arbor_hol.py").write_text(CALLBACK)
    book = tmp / "play.yml"
    book.write_text(PLAY)
    big = tmp / "big"
    with open(big, "wb") as f:
        for _ in range(args.mbytes):
            f.write(os.urandom(1 << 20))
    ctx = {"out": out, "tmp": tmp, "book": book, "big": big, "inventory": lab["inventory"],
           "lab": lab}
    rows = []
    try:
        with open(out / "runs.jsonl", "w") as jl:
            for rep in range(args.reps):
                order = modes[rep % len(modes):] + modes[:rep % len(modes)]
                for mode in order:
                    r = run_once(mode, rep, args, ctx)
                    rows.append(r)
                    jl.write(json.dumps(r) + "\n")
                    jl.flush()
                    lat = r["latencies_ms"]
                    print(f"hol: rep {rep + 1} {mode}: " + (
                        f"p50 {pct(lat, 50):.0f} ms, p90 {pct(lat, 90):.0f} ms over {len(lat)}, "
                        f"WAN up {r['wan_up_mbit_s']} Mbit/s"
                        if r["ok"] else f"FAILED ({r['end']}, as asked: {r['link_as_asked']}, "
                                        f"{len(lat)} items; see {out / r['log']})"),
                          file=sys.stderr, flush=True)
    finally:
        subprocess.run(["rm", "-rf", str(tmp)])
        if not args.reuse_lab:
            subprocess.run([str(LAB / "down")], capture_output=True)
    rtt = 2 * args.wan_delay_ms
    summary = {"command": "deploy/bench/hol.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rtt_ms": rtt, "loss_pct": args.wan_loss_pct, "mbytes": args.mbytes,
               "pings": args.pings, "skip": args.skip, "modes": {}}
    for m in modes:
        runs = [r for r in rows if r["mode"] == m]
        lat = [x for r in runs if r["ok"] for x in r["latencies_ms"]]
        summary["modes"][m] = {
            "runs": len(runs), "runs_ok": sum(r["ok"] for r in runs),
            "leftover_processes": sum(r["leftover_processes"] for r in runs),
            "wan_up_mbit_s_median": statistics.median(r["wan_up_mbit_s"] for r in runs),
            **({"p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "max_ms": max(lat),
                "p90_rtts": round(pct(lat, 90) / rtt, 2),
                "p90_per_run_ms": [pct(r["latencies_ms"], 90) for r in runs if r["ok"]],
                "median_of_run_p90s_ms": statistics.median(
                    pct(r["latencies_ms"], 90) for r in runs if r["ok"])} if lat else {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if all(r["ok"] and not r["leftover_processes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
