"""An aarch64 bastion: the lab's bastion says it is aarch64 (its `uname` is
an aarch64 busybox) and runs aarch64 binaries through qemu-user and
binfmt_misc. arbor's stage-0 there skips the x86_64 relay it was sent first,
asks for the aarch64 one, and the playbook runs through it with vanilla's
results; the next hop to it gets the aarch64 relay at once. Its QUIC hop
works too (the aarch64 relay built with QUIC: ring's C from a cross
compiler). A host of a machine arbor has no relay for is named with its
machine."""

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labkit import (LAB, QUIC_PLAY, VENV, any_arbor, env_for, host_procs, playbook, recap, run, ssh, target_state,
                    udp_endpoints, vanilla_modules, wait_gone)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--targets", "3", "--aarch64-bastion", "--no-python-bastion").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


def relays_on(lab, host):
    """(exe, cmdline) of the arbor relays running on a lab host (its
    stage-0 loading one names it too, inside its script: not counted)."""
    return [(exe, cmd) for _, _, exe, cmd in host_procs(lab, host)
            if b"\0arbor-relay\0--node\0" in cmd]


@contextlib.contextmanager
def bastion_relays(lab):
    """The relays seen on the bastion while the block runs, sampled every
    0.2 s: a list of (exe, cmdline), filled in as they are seen."""
    seen = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.extend(relays_on(lab, "bastion1"))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()


def test_the_playbook_runs_through_an_aarch64_relay(lab, tmp_path):
    assert ssh(lab, "bastion1", "uname -m").stdout.strip() == "aarch64"
    vanilla_recap, vanilla_state = vanilla_modules(lab, tmp_path)

    with bastion_relays(lab) as seen:
        p = playbook(lab, "arbor", "modules.yml", "-vvv", "-e", f"fetch_dir={tmp_path / 'arbor'}")
        out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-5000:]
    assert recap(out) == vanilla_recap and len(vanilla_recap) == 3, out[-3000:]
    assert target_state(lab) == vanilla_state
    assert re.search(r"ARBOR HOP bastion1 \(relay, from the controller\): node \d+, up in \d+ ms, "
                     r"pid \d+, aarch64 relay", out), out[:5000]
    # The relay on the bastion ran as an aarch64 binary: qemu-user ran it
    # (binfmt_misc's interpreter is the process's exe), from a memfd.
    assert seen, "no sample saw the relay"
    for exe, cmd in seen:
        assert "aarch64" in exe and "qemu" in exe, (exe, cmd)


def test_a_machine_without_a_relay_is_named(lab, tmp_path):
    # The bastion says it is riscv64 for this run (a bind mount in its own
    # mount namespace, undone after).
    fake = "/tmp/arbor-riscv64-uname"
    ssh(lab, "bastion1", f"printf '#!/bin/sh\\necho riscv64\\n' > {fake} && chmod 755 {fake} && "
                         f"mount --bind {fake} /usr/bin/uname")
    try:
        assert ssh(lab, "bastion1", "uname -m").stdout.strip() == "riscv64"
        p = subprocess.run([str(VENV / "ansible"), "-i", lab["inventory"], "target1", "-m", "ping"],
                           env=env_for("arbor"), capture_output=True, text=True, timeout=300)
        out = p.stdout + p.stderr
    finally:
        ssh(lab, "bastion1", f"umount /usr/bin/uname; rm -f {fake}")
    assert p.returncode != 0
    assert "UNREACHABLE" in out, out[-3000:]
    line = next((x for x in out.splitlines() if "riscv64" in x), "")
    assert "target1" in line and "bastion1" in line, out[-3000:]
    assert "this host's machine is riscv64; arbor's relays are built for x86_64 and aarch64" in line


def test_an_aarch64_bastion_takes_a_quic_hop(lab, tmp_path):
    (tmp_path / "play.yml").write_text(QUIC_PLAY)
    with bastion_relays(lab) as seen:
        res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(tmp_path / "play.yml"),
                              "-vvv"], env=dict(env_for("arbor"), ARBOR_TRANSPORT="quic"),
                             capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert re.search(r"ARBOR HOP bastion1 \(relay, from the controller\): node \d+, up in \d+ ms, "
                     r"pid \d+, aarch64 relay, over QUIC [\d.]+:\d+$", out, re.M), out[-4000:]
    assert out.count("ok=3") == 2, out[-3000:]
    assert seen and all("aarch64" in exe and "qemu" in exe for exe, _ in seen), seen
    left = wait_gone(lab, 10)
    assert not any_arbor(left), left
    assert udp_endpoints(lab) == []
