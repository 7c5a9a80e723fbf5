"""Faults injected mid-run in the lab (issue 7): two bastions with two
targets each, a real ansible-playbook through arbor. Each test kills or
stalls one part of the tree and checks that only the hosts behind it fail,
as UNREACHABLE naming the host and the dead hop, within the stated bound;
that the others finish; and that nothing of arbor's is left on any host."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_arbor import (AGENT_MARK, LAB, PLAYBOOKS, VENV, any_arbor, arbor_procs, env_for, host_procs,
                        recap, run, ssh, wait_gone)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

TARGETS = ("target1", "target2", "target3", "target4")
BEHIND = {"bastion1": ("target1", "target2"), "bastion2": ("target3", "target4")}
FATAL = re.compile(r"^fatal: \[(\S+)\]: UNREACHABLE! => (\{.*\})$", re.M)


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--bastions", "2", "--targets", "2").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


@pytest.fixture(autouse=True)
def clean(lab):
    for t in TARGETS:
        ssh(lab, t, "rm -f /tmp/arbor-fault-after")
    yield
    run(LAB / "wan", "set", "--loss-pct", "0", check=False)
    procs = wait_gone(lab, 30.0)
    assert not any_arbor(procs), procs


def start(lab, *extra, env=None, book="faults.yml"):
    e = env_for("arbor")
    e.update(env or {})
    return subprocess.Popen([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(PLAYBOOKS / book),
                             *extra], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_busy(lab, p):
    """Waits until every target runs the "wait" task's sleep."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if all(any(b"sleep" in c for _, _, _, c in host_procs(lab, t)) for t in TARGETS):
            return
        if p.poll() is not None:
            pytest.fail("the run ended early:\n" + p.stdout.read())
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail("the run never reached its wait task")


def finish(p, timeout=150):
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the run hung:\n" + p.communicate()[0])
    return out


def unreachable(out):
    return {h: json.loads(body)["msg"] for h, body in FATAL.findall(out)}


def survived(lab, hosts):
    for t in hosts:
        got = ssh(lab, t, "cat /tmp/arbor-fault-after").stdout
        assert got == f"{t} survived\n", (t, got)


def assert_only_behind(lab, out, dead, names):
    """The hosts in `dead` failed UNREACHABLE with a message naming them and
    every name in `names`; the rest finished."""
    rc = recap(out)
    msgs = unreachable(out)
    assert set(msgs) == set(dead), out
    for t in TARGETS:
        if t in dead:
            assert rc[t] == (1, 1, 1, 0), (t, rc[t], out)
            for n in (t, *names):
                assert n in msgs[t], (t, msgs[t])
        else:
            assert rc[t] == (3, 3, 0, 0), (t, rc[t], out)
    survived(lab, [t for t in TARGETS if t not in dead])
    return msgs


def kill_one(lab, host, pick):
    pids = [p for p, pp, e, c in host_procs(lab, host) if pick(p, pp, e, c)]
    assert len(pids) == 1, (host, pids)
    os.kill(pids[0], signal.SIGKILL)
    return time.monotonic()


def test_kill_9_of_a_bastions_relay_fails_only_the_hosts_behind_it(lab):
    p = start(lab)
    wait_busy(lab, p)
    t0 = kill_one(lab, "bastion1", lambda p, pp, e, c: "arbor-relay" in e)
    out = finish(p)
    msgs = assert_only_behind(lab, out, BEHIND["bastion1"], ["bastion1"])
    print(f"relay killed: run ended {time.monotonic() - t0:.1f} s later; {msgs}")


def test_kill_9_of_an_agent_fails_only_its_host(lab):
    p = start(lab)
    wait_busy(lab, p)
    pythons = {pid for pid, _, e, c in host_procs(lab, "target3") if AGENT_MARK in c and "python" in e}
    kill_one(lab, "target3", lambda p, pp, e, c: p in pythons and pp not in pythons)
    out = finish(p)
    msgs = assert_only_behind(lab, out, ["target3"], ["bastion2"])
    print(msgs)


def test_kill_9_of_the_targets_sshd_session_fails_only_its_host(lab):
    p = start(lab)
    wait_busy(lab, p)
    procs = host_procs(lab, "target2")
    agent_parents = {pp for pid, pp, e, c in procs if AGENT_MARK in c and "python" in e}
    # The session process that owns the agent (sshd's per-connection child).
    kill_one(lab, "target2", lambda p, pp, e, c: p in agent_parents and e.endswith("sshd"))
    out = finish(p)
    msgs = assert_only_behind(lab, out, ["target2"], ["bastion1"])
    print(msgs)


def test_a_stalled_wan_fails_every_host_behind_it_within_the_keepalive(lab):
    keepalive = 6
    p = start(lab, "-e", "fault_wait=30", env={"ARBOR_KEEPALIVE_SECS": str(keepalive)})
    wait_busy(lab, p)
    run(LAB / "wan", "set", "--loss-pct", "100")
    t0 = time.monotonic()
    out = finish(p, timeout=120)
    took = time.monotonic() - t0
    run(LAB / "wan", "set", "--loss-pct", "0")
    msgs = unreachable(out)
    assert set(msgs) == set(TARGETS), out
    for t, m in msgs.items():
        bastion = "bastion1" if t in BEHIND["bastion1"] else "bastion2"
        assert t in m and bastion in m, m
    print(f"WAN held: run ended {took:.1f} s later (keepalive {keepalive} s); {msgs}")
    # The bound: ssh's probes find the link dead after the keepalive, and
    # Ansible's result comes at once.
    assert took < keepalive + 10, (took, out)


def test_a_via_host_that_never_answers_fails_once_then_at_once(lab, tmp_path):
    # A listener on the WAN side that accepts and then says nothing, as a
    # hung sshd or a firewall's tarpit would.
    tarpit = subprocess.Popen(
        ["ip", "netns", "exec", lab["hosts"]["bastion1"]["netns"], "python3", "-c",
         "import socket, time\n"
         "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind(('0.0.0.0', 2299)); s.listen(64); held = []\n"
         "while True: held.append(s.accept())\n"])
    try:
        inv = tmp_path / "inventory.yml"
        inv.write_text(Path(lab["inventory"]).read_text() + f"""
    tarpits:
      hosts:
        tarpit: {{ansible_host: "{lab['hosts']['bastion1']['address']}", ansible_port: 2299}}
    lost:
      hosts:
        lost1: {{ansible_host: "10.241.1.10", mitogen_via: tarpit}}
        lost2: {{ansible_host: "10.241.1.11", mitogen_via: tarpit}}
""")
        t0 = time.monotonic()
        p = subprocess.run([str(VENV / "ansible-playbook"), "-i", str(inv), str(PLAYBOOKS / "dead_via.yml"),
                            "-T", "5"], env=env_for("arbor"), capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t0
        out = p.stdout + p.stderr
        msgs = re.findall(r"^failed: \[(lost\d)\] \(item=(\d)\) => (\{.*\})$",
                          out, re.M)
        assert len(msgs) == 20, out
        texts = {json.loads(body)["msg"] for _, _, body in msgs}
        # One message for all 20 items: the hop, named, and why.
        assert len(texts) == 1, texts
        text = texts.pop()
        assert all(json.loads(body)["unreachable"] for _, _, body in msgs)
        assert "tarpit" in text and "timed out" in text, text
        print(f"10 items x 2 hosts behind a silent via host: {took:.1f} s; {text}")
        assert took < 5 + 15, (took, out)
    finally:
        tarpit.kill()
        tarpit.wait()
