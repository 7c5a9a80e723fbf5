"""Security properties, checked while a run is under way (issue 7).

- Nothing arbor starts listens on a TCP or UDP port, on the controller or on
  any lab host: `ss` in every namespace, while relays and agents are up.
"""

import os
import subprocess
import time

import pytest

from test_arbor import VENV, arbor_procs, env_for, lab, run  # noqa: F401 (lab)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def listeners(netns=None):
    """(proto, local address, pids) of every listening TCP/UDP socket."""
    cmd = ["ss", "-Hltunp"]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    out = run(*cmd, check=False).stdout
    found = []
    for line in out.splitlines():
        f = line.split()
        pids = {int(p.split("=")[1].rstrip(",)")) for p in f[-1].split(",") if p.startswith("pid=")} \
            if "users:" in line else set()
        found.append((f[0], f[4], pids))
    return found


def arbor_pids(lab):
    """Every arbor process: the daemon and ssh clients on the controller,
    relays and agents on the hosts."""
    pids = set()
    for v in arbor_procs(lab).values():
        pids |= {p for p, _ in v["relays"]} | set(v["agents"]) | set(v["others"])
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/exe").endswith("/arbor"):
                    pids.add(int(d))
            except OSError:
                pass
    return pids


def test_nothing_listens_on_a_port_during_a_run(lab):
    p = subprocess.Popen([str(VENV / "ansible"), "-i", lab["inventory"], "targets", "-m",
                          "ansible.builtin.command", "-a", "sleep 4"],
                         env=env_for("arbor"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait for the whole tree: the bastion's relay and every agent.
        deadline = time.monotonic() + 60
        while True:
            procs = arbor_procs(lab)
            if procs["bastion1"]["relays"] and all(procs[t]["agents"] for t in ("target1", "target2", "target3")):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the tree did not come up: {procs}")
            time.sleep(0.1)
        pids = arbor_pids(lab)
        sockets = [(None, s) for s in listeners()]
        sockets += [(h["netns"], s) for h in lab["hosts"].values() for s in listeners(h["netns"])]
        ours = [(ns, s) for ns, s in sockets if s[2] & pids]
        assert len(pids) > 5, pids
        assert not ours, ours
    finally:
        out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
