"""A QUIC hop below the first (issue 20): target -> rack -> bastion, with
`arbor_transport: quic` on the rack only. The bastion's relay (started
over ssh, its own link staying there) connects to the rack relay's
endpoint, pinning its certificate and proving its secret. A playbook gives
vanilla's results; a stranger next to the rack is refused; a UDP path that
dies under a run fails the hosts behind the rack naming it, within the
keepalive; and no endpoint or process is left in any namespace."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from labkit import (ARBOR, LAB, PLAYBOOKS, VENV, any_arbor, arbor_procs, clean_targets, env_for, host_procs,
                    recap, run, target_state, udp_endpoints, vanilla_modules, wait_gone)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

HOP = re.compile(r"ARBOR HOP (\w+) \(relay, [^)]*\): node \d+, [^\n]*?relay(, over (QUIC ([\d.]+):(\d+)|ssh \(QUIC: [^)]*\)))?$",
                 re.M)
FATAL = re.compile(r"^fatal: \[(\S+)\]: UNREACHABLE!")
FATAL_MSG = re.compile(r'^fatal: \[\S+\]: UNREACHABLE! => \{\n(?:.*\n)*?\s*"msg": (".*"),?$', re.M)
TARGETS = ("target1", "target2", "target3")
PLAY = """
- hosts: targets
  gather_facts: false
  tasks:
    - command: hostname
    - copy: {content: "quic {{ inventory_hostname }}\\n", dest: /tmp/arbor-quic-probe}
    - file: {path: /tmp/arbor-quic-probe, state: absent}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = run(LAB / "up", "--depth", "2", "--racks", "1", "--targets", "3", "--no-python-bastion").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    assert [info["hosts"][t]["via_chain"] for t in TARGETS] == [["bastion1", "rack1"]] * 3
    extra = tmp_path_factory.mktemp("quic") / "quic.yml"
    extra.write_text("racks:\n  vars:\n    arbor_transport: quic\n")
    info["quic_inventory"] = str(extra)
    yield info
    run(LAB / "down")


@pytest.fixture(autouse=True)
def nothing_left(lab):
    yield
    left = wait_gone(lab, 15)
    assert not any_arbor(left), left
    assert udp_endpoints(lab) == []


def ansible(lab, env, book, *extra, timeout=600):
    return subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], "-i", lab["quic_inventory"],
                           str(book), *extra], env=env, capture_output=True, text=True, timeout=timeout)


def hops(out):
    """Each relay's link from -vvv: {host: None (ssh) | ('QUIC', ip, port) | ('ssh', why)}."""
    found = {}
    for m in HOP.finditer(out):
        found[m[1]] = None if not m[2] else ("QUIC", m[4], int(m[5])) if m[4] else ("ssh", m[3])
    assert found, out[-3000:]
    return found


def test_the_rack_moves_to_quic_below_the_bastion_with_vanilla_results(lab, tmp_path):
    vanilla_recap, vanilla_state = vanilla_modules(lab, tmp_path)
    res = ansible(lab, env_for("arbor"), PLAYBOOKS / "modules.yml", "-vvv", "-e", f"fetch_dir={tmp_path / 'arbor'}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    rack = lab["hosts"]["rack1"]["address"]
    seen = hops(out)
    assert seen["bastion1"] is None, seen
    assert seen["rack1"][:2] == ("QUIC", rack), seen
    assert recap(out) == vanilla_recap
    assert target_state(lab) == vanilla_state
    clean_targets(lab)


def test_the_racks_endpoint_is_the_two_relays_own_and_refuses_a_stranger(lab, tmp_path):
    (tmp_path / "play.yml").write_text(PLAY)
    tmp = Path(tempfile.mkdtemp(prefix="aq", dir="/tmp"))
    env = dict(env_for("arbor"), TMPDIR=str(tmp), ARBOR_PERSIST="5m")
    try:
        first = ansible(lab, env, tmp_path / "play.yml", "-vvv")
        assert first.returncode == 0, first.stdout[-3000:]
        kind, ip, port = hops(first.stdout)["rack1"]
        assert kind == "QUIC"
        procs = arbor_procs(lab)
        rack_relay = procs["rack1"]["relays"][0][0]
        bastion_relay = procs["bastion1"]["relays"][0][0]
        # The rack relay's endpoint and the bastion relay's socket (quinn's
        # are unconnected); nothing on the controller's side of the WAN.
        held = sorted(udp_endpoints(lab))
        assert [h for h, _ in held] == ["bastion1", "rack1"], held
        assert f"pid={bastion_relay}," in held[0][1], held
        assert f":{port} " in held[1][1] and f"pid={rack_relay}," in held[1][1], held
        # A stranger beside the bastion: refused, and the tree keeps going.
        probe = run("ip", "netns", "exec", lab["hosts"]["bastion1"]["netns"], ARBOR, "quic-probe",
                    f"{ip}:{port}", check=False)
        assert probe.returncode == 0 and "refused" in probe.stdout, (probe.stdout, probe.stderr)
        second = ansible(lab, env, tmp_path / "play.yml", "-vvv")
        assert second.returncode == 0, second.stdout[-3000:]
        assert hops(second.stdout)["rack1"] == ("QUIC", ip, port)
        assert arbor_procs(lab)["rack1"]["relays"][0][0] == rack_relay
        assert second.stdout.count("ok=3") == 3
    finally:
        subprocess.run([str(ARBOR), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def test_blocked_udp_at_the_rack_keeps_it_on_ssh_and_says_why(lab, tmp_path):
    (tmp_path / "play.yml").write_text(PLAY)
    ns = lab["hosts"]["rack1"]["netns"]
    rule = ["INPUT", "-p", "udp", "-j", "DROP"]
    run("ip", "netns", "exec", ns, "iptables", "-I", *rule)
    try:
        res = ansible(lab, env_for("arbor"), tmp_path / "play.yml", "-vvv")
    finally:
        run("ip", "netns", "exec", ns, "iptables", "-D", *rule)
    assert res.returncode == 0, res.stdout[-3000:]
    kind, why = hops(res.stdout)["rack1"]
    assert kind == "ssh" and "no answer in 3s" in why, why
    assert res.stdout.count("ok=3") == 3


@pytest.mark.parametrize("group,host,named", [
    ("racks", "rack1", "(agent, via rack1): rack1: "),
    ("bastions", "bastion1", "(agent, via rack1): bastion1 (relay, from the controller): "),
])
def test_a_udp_path_dying_under_a_run_fails_the_hosts_behind_the_hop_naming_it(lab, tmp_path, group, host, named):
    """The keepalive finds the dead path under a QUIC hop (the rack's, from
    the bastion's relay; the bastion's, from the daemon): the relay below
    hears nothing from its parent and ends, its parent ends the hop's ssh,
    and each host behind it is UNREACHABLE naming the hop, within the
    keepalive and a margin."""
    keepalive = 6
    quic = tmp_path / "quic.yml"
    quic.write_text(f"{group}:\n  vars:\n    arbor_transport: quic\n")
    (tmp_path / "play.yml").write_text("""
- hosts: targets
  gather_facts: false
  tasks:
    - command: hostname
    - command: sleep 60
""")
    env = dict(env_for("arbor"), ARBOR_KEEPALIVE_SECS=str(keepalive))
    p = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", lab["inventory"], "-i", str(quic),
                          str(tmp_path / "play.yml"), "-vvv"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, fatal_at = [], {}

    def read():
        for line in p.stdout:
            lines.append(line)
            m = FATAL.match(line.rstrip("\n"))
            if m:
                fatal_at[m[1]] = time.monotonic()

    th = threading.Thread(target=read, daemon=True)
    th.start()
    ns = lab["hosts"][host]["netns"]
    rule = ["INPUT", "-p", "udp", "-j", "DROP"]
    deadline = time.monotonic() + 120
    while not all(any(b"sleep" in c for _, _, _, c in host_procs(lab, t)) for t in TARGETS):
        assert time.monotonic() < deadline and p.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.2)
    run("ip", "netns", "exec", ns, "iptables", "-I", *rule)
    t0 = time.monotonic()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the run did not end:\n" + "".join(lines)[-3000:])
    finally:
        run("ip", "netns", "exec", ns, "iptables", "-D", *rule)
    th.join(10)
    out = "".join(lines)
    assert hops(out)[host][0] == "QUIC", out[-3000:]
    assert sorted(fatal_at) == list(TARGETS), out[-3000:]
    msgs = [json.loads(m[1]) for m in FATAL_MSG.finditer(out)]
    assert len(msgs) == 3, out[-3000:]
    for msg in msgs:
        # The rack's relay heard nothing from the bastion's for the
        # keepalive (or the bastion's relay found the QUIC link silent).
        assert named in msg and ("nothing from the parent" in msg or "QUIC" in msg), msg
    took = max(fatal_at.values()) - t0
    print(f"hosts behind {host} failed {took:.1f} s after its UDP path died")
    assert took < keepalive + 8, took
