"""A via host with its own via: target -> rack -> bastion (depth 2), with
arbor, every hop's settings from its own inventory variables."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from labkit import LAB, VENV, any_arbor, arbor_procs, env_for, run, wait_gone

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


@pytest.fixture(scope="module")
def lab2():
    out = run(LAB / "up", "--depth", "2", "--racks", "2", "--targets", "4", "--no-python-bastion").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


def test_two_level_chain(lab2):
    assert lab2["hosts"]["target4"]["via_chain"] == ["bastion1", "rack2"]
    res = subprocess.run([str(VENV / "ansible"), "-i", lab2["inventory"], "targets", "-m",
                          "ansible.builtin.command", "-a", "uname -n", "-o"],
                         env=env_for("arbor"), capture_output=True, text=True, timeout=300)
    ended = time.monotonic()
    for i in range(1, 5):
        assert re.search(rf"^target{i} \| CHANGED \| rc=0 \| \(stdout\) target{i}$", res.stdout, re.M), \
            res.stdout + res.stderr
    # Within 5 s of the run's end the whole tree is gone, on every level.
    procs = wait_gone(lab2, 5.0 - (time.monotonic() - ended))
    assert not any_arbor(procs), procs


def test_relays_at_each_level_while_running(lab2):
    p = subprocess.Popen([str(VENV / "ansible"), "-i", lab2["inventory"], "targets", "-m",
                          "ansible.builtin.command", "-a", "sleep 3"],
                         env=env_for("arbor"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {}
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        for host, v in arbor_procs(lab2).items():
            if v["relays"]:
                seen[host] = v["relays"][0][1]
        time.sleep(0.2)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert set(seen) == {"bastion1", "rack1", "rack2"}, seen
    assert all(exe.startswith("/memfd:arbor-relay") for exe in seen.values()), seen
