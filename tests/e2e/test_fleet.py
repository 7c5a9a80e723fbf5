"""Fleet scale through a depth-2 tree (controller -> bastion -> 2 rack
relays -> 10 targets), read off the WAN emulator's byte counters:
- the relay binary crosses the WAN once (the bastion's relay serves it to
  the rack relays) and a module's zip members cross it once for all
  targets;
- a 3 MB file copied to every target crosses the WAN once (chunks go
  through the relays' caches, put at the bastion and forwarded);
- an RPC to one target stays fast while 100 MB stream to another behind
  the same rack relay (the receiver paces each stream with credit)."""

import hashlib
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labkit import ARBOR, Api, LAB, REPO, VENV, any_arbor, env_for, recap, run, ssh, wait_gone
from labkit import lab_chain as chain

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

WAN = REPO / "deploy" / "lab" / "wan"
FLEET = REPO / "deploy" / "bench" / "workloads" / "fleet.yml"
TARGETS = [f"target{i}" for i in range(1, 11)]
COPY = """- hosts: targets
  gather_facts: false
  tasks:
    - copy: {src: "{{ src }}", dest: /tmp/arbor-fleet-copy.bin, mode: "0600"}
"""


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--depth", "2", "--racks", "2", "--targets", "10", "--no-python-bastion").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    for t in TARGETS:
        ssh(info, t, "rm -f /tmp/arbor-fleet-copy.bin /tmp/arbor-fleet-big.bin")
    run(LAB / "down")


def wan_run(lab, book, limit=None, **extra_vars):
    """Runs `book` through arbor; the WAN's bytes up (controller to bastion)."""
    subprocess.run([str(WAN), "reset"], check=True, capture_output=True)
    args = [str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book), "-f", "20"]
    if limit:
        args += ["-l", limit]
    for k, v in extra_vars.items():
        args += ["-e", f"{k}={v}"]
    res = subprocess.run(args, env=env_for("arbor"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    r = recap(res.stdout)
    assert set(r) == set(limit.split(",") if limit else TARGETS), r
    assert all(v[2] == 0 and v[3] == 0 for v in r.values()), r
    out = subprocess.run([str(WAN), "stats"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["up"]["bytes"], res.stdout


def relay_on_the_wire(tmp_path):
    """The embedded relay binary's size as it crosses the WAN (ssh -C: zlib)."""
    import zlib
    run(ARBOR, "relay-write", tmp_path / "relay")
    return len(zlib.compress((tmp_path / "relay").read_bytes(), 6))


def test_fleet_through_two_levels_crosses_the_wan_once(lab, tmp_path):
    assert {lab["hosts"][t]["via_chain"][1] for t in TARGETS} == {"rack1", "rack2"}
    one, _ = wan_run(lab, FLEET, "target1")
    ten, out = wan_run(lab, FLEET)
    r = recap(out)
    assert all(r[t][0] == 5 and r[t][1] == 4 for t in TARGETS), r
    # The playbook's effects on every target: the last task removed the dir.
    for t in TARGETS:
        assert ssh(lab, t, "test -e /tmp/arbor-bench-fleet; echo $?").stdout.strip() == "1", t
    relay = relay_on_the_wire(tmp_path)
    per_target = (ten - one) / 9
    print(f"WAN up: 1 target {one} B, 10 targets {ten} B, {per_target:.0f} B per further "
          f"target; relay on the wire {relay} B")
    # One target's run carries the relay once (two relays started); the
    # ten-target run starts a third relay (rack2) and nine more agents, and
    # adds less than one relay's bytes in all: the binary crossed once.
    assert one > relay
    assert ten - one < relay, (one, ten, relay)
    # Module members (about 120 KB for these 5 modules) crossed once: each
    # further target costs its agent's code (zlib'd by ssh, sent with the
    # spawn), its ssh session and its requests.
    assert per_target < 30_000, per_target


def test_a_3mb_file_to_every_target_crosses_the_wan_once(lab, tmp_path):
    big = os.urandom(3_000_000)
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "small.bin").write_bytes(os.urandom(1000))
    book = tmp_path / "copy.yml"
    book.write_text(COPY)
    small, _ = wan_run(lab, book, src=tmp_path / "small.bin")
    large, _ = wan_run(lab, book, src=tmp_path / "big.bin")
    want = hashlib.sha256(big).hexdigest()
    for t in TARGETS:
        got = ssh(lab, t, "sha256sum /tmp/arbor-fleet-copy.bin; stat -c %a /tmp/arbor-fleet-copy.bin").stdout.split()
        assert got[0] == want and got[-1] == "600", (t, got)
    extra = large - small
    print(f"WAN up: 1 KB file {small} B, 3 MB file {large} B: {extra} B for 3,000,000 B to 10 targets")
    assert extra <= 1.1 * len(big), (small, large)
    # And the tree is gone after the run.
    assert not any_arbor(wait_gone(lab, 5.0))


def test_an_rpc_stays_fast_while_100mb_stream_to_another_target(lab, tmp_path):
    run_dir = tmp_path / "run"
    log = open(tmp_path / "daemon.log", "wb")
    d = subprocess.Popen([str(ARBOR), "daemon", "--run-dir", str(run_dir), "--parent-pid", str(os.getpid())],
                         env=dict(os.environ, SSH_AUTH_SOCK=""), stderr=log)
    try:
        for _ in range(250):
            if (run_dir / "sock").exists():
                break
            time.sleep(0.02)
        pinger, sender = Api(run_dir / "sock"), Api(run_dir / "sock")
        busy, quiet = chain(lab, "target1"), chain(lab, "target2")
        assert busy[1]["name"] == quiet[1]["name"] == "rack1"

        def ping():
            t0 = time.monotonic()
            pinger.send({"op": "call", "chain": quiet, "req": {"op": "ping"}})
            res, _ = pinger.recv()
            assert "pid" in res, res
            return time.monotonic() - t0

        for api, c in ((pinger, quiet), (sender, busy)):
            api.send({"op": "call", "chain": c, "req": {"op": "ping"}})
            assert "pid" in api.recv()[0]
        before = [ping() for _ in range(30)]

        size, part = 100 << 20, os.urandom(1 << 20)
        dest = "/tmp/arbor-fleet-big.bin"
        span = {}

        def transfer():
            span["start"] = time.monotonic()
            sender.send({"op": "put", "chain": busy, "path": dest, "size": size}, b"")
            for _ in range(size // len(part)):
                sender.send({"op": "data"}, part)
            span["sent"] = time.monotonic()
            span["reply"] = sender.recv()[0]
            span["end"] = time.monotonic()

        th = threading.Thread(target=transfer)
        th.start()
        during = []
        while th.is_alive():
            t0 = time.monotonic()
            lat = ping()
            if th.is_alive():
                during.append((t0, lat))
        th.join()
        assert span["reply"] == {"size": size}, span
        got = ssh(lab, "target1", f"stat -c %s {dest}; tail -c 1048576 {dest} | sha256sum").stdout.split()
        assert got[0] == str(size) and got[1] == hashlib.sha256(part).hexdigest(), got
        lats = [lat for _, lat in during]
        secs = span["end"] - span["start"]
        b_med, d_med = statistics.median(before), statistics.median(lats)
        d_p90 = sorted(lats)[int(0.9 * (len(lats) - 1))]
        print(f"100 MiB to target1 in {secs:.2f} s ({size / secs / 1e6:.1f} MB/s); ping to target2: "
              f"{len(before)} before, median {b_med * 1000:.1f} ms; {len(lats)} during, median "
              f"{d_med * 1000:.1f} ms, p90 {d_p90 * 1000:.1f} ms, max {max(lats) * 1000:.1f} ms")
        assert len(lats) >= 10, (secs, lats)
        # Credit keeps at most a window (1 MiB) of the stream in the
        # queues the ping shares, so it waits for little.
        assert d_med < max(0.1, 10 * b_med), (b_med, lats)
        assert d_p90 < 0.25, lats
    finally:
        d.terminate()
        d.wait(timeout=15)
        ssh(lab, "target1", "rm -f /tmp/arbor-fleet-big.bin")
