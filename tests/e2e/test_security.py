"""Security properties, checked while a run is under way (issue 7).

- Nothing arbor starts listens on a TCP or UDP port, on the controller or on
  any lab host: `ss` in every namespace, while relays and agents are up.
- Secrets (no_log data, become and ssh passwords) reach no log, at -vvvv
  and ARBOR_LOG=trace.
"""

import json
import os
import secrets
import subprocess
import time

import pytest

from labkit import PLAYBOOKS, VENV, arbor_procs, env_for, host_procs, in_host, run, ssh

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


def test_secrets_never_reach_a_log(lab, users, tmp_path):
    """no_log data, the become password and an ssh password variable appear
    in no log of the run: Ansible's output at -vvvv, its log file, and the
    daemon's log at ARBOR_LOG=trace (kept with ARBOR_LOG_FILE)."""
    nolog = "NOLOG-" + secrets.token_hex(8)
    sshpass = "SSHPASS-" + secrets.token_hex(8)
    become_pw = users["passwords"]["arbu"]
    extra = tmp_path / "secrets.yml"
    extra.write_text(json.dumps({"targets": {"vars": {"nolog_secret": nolog, "ansible_password": sshpass}}}))
    logs = {"daemon": tmp_path / "daemon.log", "ansible": tmp_path / "ansible.log"}
    env = dict(env_for("arbor"), ARBOR_LOG="trace", ARBOR_LOG_FILE=str(logs["daemon"]),
               ANSIBLE_LOG_PATH=str(logs["ansible"]))
    p = subprocess.run([str(VENV / "ansible-playbook"), "-vvvv", "-i", lab["inventory"], "-i", users["inventory"],
                        "-i", str(extra), str(PLAYBOOKS / "secrets.yml")],
                       env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    # The run did carry them: the file holds the secret, become worked.
    for t in ("target1", "target2", "target3"):
        assert ssh(lab, t, "cat /tmp/arbor-secret; rm -f /tmp/arbor-secret").stdout == nolog + "\n"
    texts = {"output": out, **{k: v.read_text(errors="replace") for k, v in logs.items()}}
    assert " TRACE " in texts["daemon"] and " DEBUG " in texts["daemon"], texts["daemon"][:500]
    assert len(texts["daemon"]) > 10000 and len(texts["output"]) > 10000, {k: len(v) for k, v in texts.items()}
    for name, text in texts.items():
        for secret in (nolog, sshpass, become_pw):
            assert secret not in text, f"{secret[:8]}… found in the {name} log"
    for path, kind in ((logs["daemon"], "daemon"),):
        assert (path.stat().st_mode & 0o777) == 0o600, kind
    print({k: len(v) for k, v in texts.items()})


def test_keys_stay_home_the_forwarded_agent_is_private_and_locked_when_idle(lab):
    """On the bastion, the forwarded agent's socket is sshd's (a 0700 dir of
    the user); between connects the daemon's agent is locked, so the socket
    signs nothing; no key file is on the bastion; the targets' temp dirs are
    0700 and the account's."""
    before = set(in_host(lab, "bastion1", "sh", "-c", "ls -d /tmp/ssh-*/agent.* 2>/dev/null").stdout.split())
    p = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(PLAYBOOKS / "secure_run.yml")],
                         env=env_for("arbor"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all(any(b"sleep" in c for _, _, _, c in host_procs(lab, t))
                      for t in ("target1", "target2", "target3")):
            assert time.monotonic() < deadline and p.poll() is None, "the run never reached its wait"
            time.sleep(0.1)
        socks = set(in_host(lab, "bastion1", "sh", "-c", "ls -d /tmp/ssh-*/agent.* 2>/dev/null").stdout.split())
        socks -= before
        assert len(socks) == 1, socks
        sock = socks.pop()
        st = in_host(lab, "bastion1", "stat", "-c", "%a %u %F", os.path.dirname(sock), sock).stdout.split("\n")
        assert st[0] == "700 0 directory" and st[1].split()[1:] == ["0", "socket"], st
        # Idle: every hop is up, the agent is locked, the socket lists nothing
        # and signs nothing.
        listed = in_host(lab, "bastion1", "ssh-add", "-l", env=[f"SSH_AUTH_SOCK={sock}"])
        assert listed.returncode == 1 and "no identities" in listed.stdout + listed.stderr, listed
        keys = in_host(lab, "bastion1", "sh", "-c", "grep -rl --exclude-dir=.pyenv 'PRIVATE KEY' /tmp /root /var/tmp /dev/shm 2>/dev/null")
        assert keys.stdout.strip() == "", keys.stdout
        for t in ("target1", "target2", "target3"):
            dirs = ssh(lab, t, "stat -c '%a %U %n' ~/.ansible/tmp ~/.ansible/tmp/*").stdout.split("\n")
            dirs = [d for d in dirs if d]
            assert dirs and all(d.startswith("700 root ") for d in dirs), (t, dirs)
    finally:
        out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
