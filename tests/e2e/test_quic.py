"""A QUIC hop (`arbor_transport: quic`, here through ARBOR_TRANSPORT, the
ansible.cfg default's variable): the bastion's relay is started over ssh,
then its frames move to a QUIC connection. A playbook gives vanilla's
results and files; a stranger is refused by the endpoint while the tree
keeps using it; with UDP blocked the hop stays on ssh and -vvv says so;
and no endpoint is left in any namespace after the run."""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from labkit import (ARBOR, PLAYBOOKS, QUIC_PLAY, VENV, arbor_procs, clean_targets, env_for, recap, run,
                    target_state, udp_endpoints, vanilla_modules, wait_gone)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

OVER = re.compile(r"ARBOR HOP bastion1 \(relay, from the controller\): .*, over (QUIC ([\d.]+):(\d+)|ssh \(QUIC: [^)]*\))")
def quic_env(**more):
    e = env_for("arbor")
    e.update(ARBOR_TRANSPORT="quic", **more)
    return e


def ansible(lab, env, book, *extra, timeout=600):
    return subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book), *extra],
                          env=env, capture_output=True, text=True, timeout=timeout)


def over(out):
    """How the bastion's relay link went, from -vvv: ('QUIC', port) or ('ssh', why)."""
    m = OVER.search(out)
    assert m, out[-3000:]
    return ("QUIC", int(m[3])) if m[2] else ("ssh", m[1])


def test_a_playbook_over_quic_matches_vanilla_and_leaves_no_endpoint(lab, tmp_path):
    vanilla_recap, vanilla_state = vanilla_modules(lab, tmp_path)
    res = ansible(lab, quic_env(), PLAYBOOKS / "modules.yml", "-vvv", "-e", f"fetch_dir={tmp_path / 'arbor'}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert over(out)[0] == "QUIC", over(out)
    assert recap(out) == vanilla_recap
    assert target_state(lab) == vanilla_state
    clean_targets(lab)
    left = wait_gone(lab)
    assert not any(v["relays"] or v["agents"] for v in left.values()), left
    assert udp_endpoints(lab) == []


def test_a_stranger_is_refused_while_the_tree_keeps_its_quic_link(lab, tmp_path):
    (tmp_path / "play.yml").write_text(QUIC_PLAY)
    tmp = Path(tempfile.mkdtemp(prefix="aq", dir="/tmp"))
    env = quic_env(TMPDIR=str(tmp), ARBOR_PERSIST="5m")
    try:
        first = ansible(lab, env, tmp_path / "play.yml", "-vvv")
        assert first.returncode == 0, first.stdout[-3000:]
        kind, port = over(first.stdout)
        assert kind == "QUIC"
        held = udp_endpoints(lab)
        relay = arbor_procs(lab)["bastion1"]["relays"][0][0]
        assert [h for h, _ in held] == ["bastion1"], held
        assert f":{port} " in held[0][1] and f"pid={relay}," in held[0][1], held
        probe = run(ARBOR, "quic-probe", f"{lab['hosts']['bastion1']['address']}:{port}", check=False)
        assert probe.returncode == 0 and "refused" in probe.stdout, (probe.stdout, probe.stderr)
        relays = arbor_procs(lab)["bastion1"]["relays"]
        second = ansible(lab, env, tmp_path / "play.yml", "-vvv")
        assert second.returncode == 0, second.stdout[-3000:]
        assert over(second.stdout) == ("QUIC", port)
        assert arbor_procs(lab)["bastion1"]["relays"] == relays
        assert "ok=3" in second.stdout
    finally:
        subprocess.run([str(ARBOR), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    left = wait_gone(lab)
    assert not any(v["relays"] or v["agents"] for v in left.values()), left
    assert udp_endpoints(lab) == []


def test_blocked_udp_keeps_the_hop_on_ssh_and_says_why(lab, tmp_path):
    (tmp_path / "play.yml").write_text(QUIC_PLAY)
    ns = lab["hosts"]["bastion1"]["netns"]
    rule = ["INPUT", "-p", "udp", "-j", "DROP"]
    run("ip", "netns", "exec", ns, "iptables", "-I", *rule)
    try:
        res = ansible(lab, quic_env(), tmp_path / "play.yml", "-vvv")
    finally:
        run("ip", "netns", "exec", ns, "iptables", "-D", *rule)
    assert res.returncode == 0, res.stdout[-3000:]
    kind, why = over(res.stdout)
    assert kind == "ssh" and "no answer in 3s" in why, why
    assert res.stdout.count("ok=3") == 2
    left = wait_gone(lab)
    assert not any(v["relays"] or v["agents"] for v in left.values()), left
    assert udp_endpoints(lab) == []
