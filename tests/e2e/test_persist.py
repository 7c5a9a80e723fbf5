"""A tree that outlives the run (ARBOR_PERSIST): the next run reuses its
relays and interpreters (no relay crosses the WAN again), a hop whose
settings changed is made anew, `arbor status` shows the tree, and the tree
goes down after its idle time or on `arbor stop`, leaving nothing on any
host. Each test has its own TMPDIR, so its persistent daemon is its own."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from labkit import ARBOR, VENV, arbor_procs, env_for, host_procs, in_host, recap, wait_gone

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

PLAY = """
- hosts: targets
  gather_facts: false
  tasks:
    - command: hostname
    - copy: {content: "persist\\n", dest: /tmp/arbor-persist-probe}
    - file: {path: /tmp/arbor-persist-probe, state: absent}
"""


@pytest.fixture
def persist(tmp_path):
    """An environment whose persistent daemon lives under its own TMPDIR (a
    short one: the daemon's sockets are in it); whatever a test leaves up
    is stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="ap", dir="/tmp"))
    (tmp_path / "play.yml").write_text(PLAY)

    def env(value):
        e = env_for("arbor")
        e.update(TMPDIR=str(tmp), ARBOR_PERSIST=value)
        return e

    yield env, tmp_path / "play.yml", tmp
    subprocess.run([str(ARBOR), "stop"], env=env("60"), capture_output=True, timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)


def play(lab, env, book, *extra):
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book), *extra],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return res.stdout


def status(env):
    res = subprocess.run([str(ARBOR), "status", "--json"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def wan(lab, verb):
    res = subprocess.run([lab["wan"]["binary"], "ctl", "--control", lab["wan"]["control_socket"], verb],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def tree_pids(lab):
    procs = arbor_procs(lab)
    return {h: (sorted(p for p, _ in v["relays"]), v["agents"]) for h, v in procs.items()
            if v["relays"] or v["agents"]}


def test_the_next_run_reuses_the_tree_and_arbor_stop_leaves_nothing(lab, persist):
    env, book, tmp = persist
    wan(lab, "reset")
    first = play(lab, env("60"), book)
    first_sent = wan(lab, "stats")["up"]["bytes"]
    assert all(ok and not unreachable and not failed for ok, _, unreachable, failed in recap(first).values())
    up = tree_pids(lab)
    assert set(up) == {"bastion1", "target1", "target2", "target3"}, up
    [daemon] = status(env("60"))
    labels = sorted(h["label"] for h in daemon["hops"])
    assert labels == ["bastion1 (relay, from the controller)", "target1 (agent, via bastion1)",
                      "target2 (agent, via bastion1)", "target3 (agent, via bastion1)"], labels
    assert daemon["idle_limit_s"] == 60

    wan(lab, "reset")
    second = play(lab, env("60"), book)
    assert recap(second) == recap(first)
    sent = wan(lab, "stats")["up"]["bytes"]
    # The same relay and interpreters; no relay, agent or module zip
    # crossed again (a relay alone is about 330 KB on the wire).
    assert tree_pids(lab) == up
    assert sent < 120_000 and sent < first_sent / 4, (sent, first_sent)
    [again] = status(env("60"))
    assert again["pid"] == daemon["pid"]
    assert sorted((h["node"], h["pid"]) for h in again["hops"]) == \
        sorted((h["node"], h["pid"]) for h in daemon["hops"])

    text = subprocess.run([str(ARBOR), "status"], env=env("60"), capture_output=True, text=True).stdout
    assert "target2 (agent, via bastion1)" in text and "idle" in text, text
    res = subprocess.run([str(ARBOR), "stop"], env=env("60"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "stopped" in res.stdout, res.stdout + res.stderr
    left = wait_gone(lab, 10)
    assert not any(v["relays"] or v["agents"] or v["others"] for v in left.values()), left
    assert not list(tmp.glob("arbor-*/persist-*")), list(tmp.glob("arbor-*/*"))
    assert status(env("60")) == []


def test_a_hop_whose_settings_changed_is_made_anew(lab, persist):
    env, book, _ = persist
    play(lab, env("60"), book, "-l", "target1")
    before = tree_pids(lab)["target1"][1]
    assert len(before) == 1
    play(lab, env("60"), book, "-l", "target1", "-e", "ansible_ssh_extra_args='-o ServerAliveCountMax=7'")
    after = tree_pids(lab)["target1"][1]
    assert len(after) == 2 and before[0] in after, (before, after)
    hops = [h["label"] for h in status(env("60"))[0]["hops"]]
    assert hops.count("target1 (agent, via bastion1)") == 2, hops
    # The first hop again, unchanged: reused, nothing new.
    play(lab, env("60"), book, "-l", "target1")
    assert tree_pids(lab)["target1"][1] == after


def test_an_idle_tree_goes_down_and_leaves_nothing(lab, persist):
    env, book, tmp = persist
    play(lab, env("3s"), book, "-l", "target1")
    [daemon] = status(env("3s"))
    assert daemon["idle_limit_s"] == 3
    deadline = time.monotonic() + 20
    while list(tmp.glob("arbor-*/persist-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(tmp.glob("arbor-*/persist-*")), "the daemon outlived its idle time"
    assert not Path(f"/proc/{daemon['pid']}").exists() or \
        b"daemon" not in Path(f"/proc/{daemon['pid']}/cmdline").read_bytes()
    left = wait_gone(lab, 10)
    assert not any(v["relays"] or v["agents"] or v["others"] for v in left.values()), left


def test_a_bad_persist_value_is_refused_with_its_name(lab, persist):
    env, book, _ = persist
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book), "-l", "target1"],
                         env=env("ten minutes"), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "ARBOR_PERSIST (arbor_persist) must be a duration" in res.stdout, res.stdout[-2000:]


def test_a_host_whose_key_changed_is_checked_again_as_on_a_first_run(lab, persist):
    """target1's host key changes and its agent dies (as when the machine is
    replaced): the kept hop is not trusted, the next run connects again and
    fails the host key check as a first run would; target2 keeps its
    interpreter. With the old key back, target1 is reached again."""
    env, book, _ = persist
    play(lab, env("60"), book, "-l", "target1,target2")
    before = tree_pids(lab)
    key = Path(lab["hosts"]["target1"]["home"]).parent / "etc-ssh" / "ssh_host_ed25519_key"
    saved = {p: p.read_bytes() for p in (key, Path(f"{key}.pub"))}
    listener = [p for p, _, e, c in host_procs(lab, "target1") if e.endswith("sshd") and b"[listener]" in c]
    assert len(listener) == 1, host_procs(lab, "target1")
    try:
        key.unlink()
        Path(f"{key}.pub").unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        os.kill(listener[0], signal.SIGHUP)  # sshd re-reads its host keys
        for pid in before["target1"][1]:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book),
                              "-l", "target1,target2"], env=env("60"), capture_output=True, text=True,
                             timeout=300)
        out = res.stdout + res.stderr
        assert recap(out)["target1"][2] == 1, out[-3000:]  # unreachable
        assert "Host key verification failed" in out or "HOST IDENTIFICATION HAS CHANGED" in out, out[-3000:]
        assert recap(out)["target2"][2:] == (0, 0), out[-3000:]
        assert tree_pids(lab)["target2"] == before["target2"]
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
        key.chmod(0o600)
        os.kill(listener[0], signal.SIGHUP)
    time.sleep(1)
    play(lab, env("60"), book, "-l", "target1")


def bastion_agent_socks(lab):
    return set(in_host(lab, "bastion1", "sh", "-c", "ls -d /tmp/ssh-*/agent.* 2>/dev/null").stdout.split())


def test_between_runs_the_kept_trees_ssh_agent_is_locked(lab, persist):
    """While no hop is connecting, the daemon's ssh-agent, forwarded to the
    bastion, lists and signs nothing: after a run, for as long as the tree
    is kept; the next run still connects a new hop through it."""
    env, book, _ = persist
    before = bastion_agent_socks(lab)
    play(lab, env("60"), book, "-l", "target1")
    socks = bastion_agent_socks(lab) - before
    assert len(socks) == 1, socks
    sock = socks.pop()
    for _ in range(2):
        listed = in_host(lab, "bastion1", "ssh-add", "-l", env=[f"SSH_AUTH_SOCK={sock}"])
        assert listed.returncode == 1 and "no identities" in listed.stdout + listed.stderr, listed
        play(lab, env("60"), book, "-l", "target2")  # a new hop through the kept relay
    assert tree_pids(lab)["target2"][1]
