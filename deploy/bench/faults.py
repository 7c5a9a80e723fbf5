#!/usr/bin/env python3
"""How vanilla Ansible, Mitogen and arbor behave under two faults, side by
side in one lab (1 bastion, 4 targets behind it; modes interleaved):

- wan-held: every target is in a long task when the WAN emulator starts
  dropping every packet; measured: time from then until ansible-playbook
  ends (capped: a run still going at the cap is killed and reported so),
  and how many targets still run the task a keepalive after that, the
  link still dead.
- silent-via: 2 hosts behind a via host that accepts TCP and never answers,
  a 10-item loop with ignore_unreachable; measured: the whole run.

Usage: deploy/bench/faults.py --out DIR [--modes vanilla,mitogen,arbor]
       [--reps 1] [--cap-s 150] [--keepalive-s 30]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402
from bench import REPO, VENV, mode_setup, start_agent  # noqa: E402

WAIT_PLAY = """- hosts: targets
  gather_facts: false
  tasks:
    - command: hostname
    - command: sleep 600
"""
LOOP_PLAY = """- hosts: lost
  gather_facts: false
  tasks:
    - command: "echo {{ item }}"
      loop: "{{ range(10) | list }}"
      ignore_unreachable: true
"""


def leftover_sleeps(labinfo):
    found = []
    for v in labinfo["hosts"].values():
        pids = subprocess.run(["ip", "netns", "pids", v["netns"]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                if b"sleep\x00600" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def busy(labinfo, n):
    """True once every target runs its sleep."""
    count = 0
    for h, v in labinfo["hosts"].items():
        if v["role"] != "target":
            continue
        pids = subprocess.run(["ip", "netns", "pids", v["netns"]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                if b"sleep\x00600" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    count += 1
                    break
            except OSError:
                pass
    return count >= n


def run(mode, scenario, ctx):
    cfg, inventory, extra, env_extra = ctx["modes"][mode]
    env = dict(os.environ, ANSIBLE_CONFIG=str(cfg), ANSIBLE_NOCOLOR="1",
               ANSIBLE_SSH_CONTROL_PATH_DIR=tempfile.mkdtemp(prefix="abcp-"),
               PATH=f"{VENV / 'bin'}:{os.environ['PATH']}", ARBOR_KEEPALIVE_SECS=str(ctx["keepalive"]),
               **env_extra)
    if "SSH_AUTH_SOCK" not in env_extra:
        env.pop("SSH_AUTH_SOCK", None)
    out = ctx["out"]
    if scenario == "wan-held":
        book, invs = out / "wait.yml", [inventory]
    else:
        book, invs = out / "loop.yml", [inventory, str(out / f"tarpit-{'vanilla' if mode == 'vanilla' else 'via'}.yml")]
    cmd = [str(VENV / "bin" / "ansible-playbook"), *[a for i in invs for a in ("-i", i)], str(book), *extra]
    if scenario == "silent-via":
        cmd += ["-T", "10"]
    log = open(out / f"{scenario}-{mode}-{ctx['rep']}.log", "w")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    start = t0
    if scenario == "wan-held":
        while not busy(ctx["lab"], 4):
            if p.poll() is not None or time.monotonic() - t0 > 120:
                break
            time.sleep(0.2)
        bench.wan_ctl(ctx["lab"], "reset")
        subprocess.run([str(REPO / "deploy/lab/wan"), "set", "--loss-pct", "100"], check=True,
                       capture_output=True)
        start = time.monotonic()
    try:
        bench.wait_exact(p, ctx["cap"])
        ended, secs = True, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        ended, secs = False, time.monotonic() - start
    if scenario == "wan-held":
        # The link stays dead a keepalive longer: does the far side stop?
        time.sleep(ctx["keepalive"])
    left = leftover_sleeps(ctx["lab"])
    subprocess.run([str(REPO / "deploy/lab/wan"), "set", "--loss-pct", "0"], capture_output=True)
    log.close()
    text = (out / f"{scenario}-{mode}-{ctx['rep']}.log").read_text(errors="replace")
    msg = next((l for l in text.splitlines() if "UNREACHABLE" in l or "failed: [" in l), "")
    # Whatever a killed run left goes before the next: ssh masters, relays,
    # and the task still running on the targets (counted first: vanilla's
    # commands outlive its client).
    for pid in left + leftover_sleeps(ctx["lab"]):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    subprocess.run(["pkill", "-9", "-f", "ControlPersist|arbor-relay"], capture_output=True)
    time.sleep(3)
    return {"targets_still_running_the_task": len(left),"mode": mode, "scenario": scenario, "rep": ctx["rep"], "seconds": round(secs, 1), "ended": ended,
            "rc": p.returncode, "first_error": msg[:300]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--modes", default="vanilla,mitogen,arbor")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cap-s", type=float, default=150)
    ap.add_argument("--keepalive-s", type=int, default=30)
    ap.add_argument("--scenarios", default="silent-via,wan-held")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    up = subprocess.run([str(REPO / "deploy/lab/up"), "--bastions", "1", "--targets", "4", "--key-on-bastions"],
                        capture_output=True, text=True, check=True)
    labinfo = json.loads((Path(up.stdout.strip().splitlines()[-1]) / "lab.json").read_text())
    (out / "wait.yml").write_text(WAIT_PLAY)
    (out / "loop.yml").write_text(LOOP_PLAY)
    b1 = labinfo["hosts"]["bastion1"]
    # The tarpit: a listener in the bastion's namespace that accepts and never speaks.
    tarpit = subprocess.Popen(["ip", "netns", "exec", b1["netns"], "python3", "-c",
                               "import socket\ns = socket.socket(); s.setsockopt(1, 2, 1)\n"
                               "s.bind(('0.0.0.0', 2299)); s.listen(64); held = []\n"
                               "while True: held.append(s.accept())\n"])
    t1, t2 = labinfo["hosts"]["target1"]["address"], labinfo["hosts"]["target2"]["address"]
    (out / "tarpit-via.yml").write_text(json.dumps({"all": {"children": {
        "tarpits": {"hosts": {"tarpit": {"ansible_host": b1["address"], "ansible_port": 2299}}},
        "lost": {"hosts": {"lost1": {"ansible_host": t1, "mitogen_via": "tarpit"},
                           "lost2": {"ansible_host": t2, "mitogen_via": "tarpit"}}}}}}))
    known = labinfo["known_hosts"]
    jump = (f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes "
            f"-o ProxyJump=root@{b1['address']}:2299")
    (out / "tarpit-vanilla.yml").write_text(json.dumps({"all": {"children": {"lost": {
        "vars": {"ansible_ssh_common_args": jump},
        "hosts": {"lost1": {"ansible_host": t1}, "lost2": {"ansible_host": t2}}}}}}))
    agent, sock = start_agent(out, labinfo["private_key"])
    modes = [m.strip() for m in args.modes.split(",")]
    ctx = {"lab": labinfo, "out": out, "cap": args.cap_s, "keepalive": args.keepalive_s,
           "modes": {m: mode_setup(m, labinfo, out, 10, sock) for m in modes}}
    results = []
    try:
        for rep in range(args.reps):
            ctx["rep"] = rep
            for scenario in args.scenarios.split(","):
                order = modes if rep % 2 == 0 else modes[::-1]
                for m in order:
                    r = run(m, scenario, ctx)
                    print(json.dumps(r), flush=True)
                    results.append(r)
    finally:
        tarpit.kill()
        agent.kill()
        (out / "results.json").write_text(json.dumps(results, indent=1))
        subprocess.run([str(REPO / "deploy/lab/down")], capture_output=True)


if __name__ == "__main__":
    main()
