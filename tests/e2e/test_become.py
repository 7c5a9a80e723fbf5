"""Become end to end: logged in as an unprivileged user (arbu) behind the
python-less bastion, tasks become root with sudo and a password, another
user with su and that user's password, and root with doas through a become
plugin arbor has no code for (playbooks/become_plugins/lab_doas.py). The
same playbook runs through vanilla Ansible and through arbor: every task's
result and the files left must match. Through arbor each (target, become
settings) gets one nested interpreter, started once over the target's one
connection."""

import collections
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from labkit import (GLUE, LOGIN, PLAYBOOKS, VENV, any_arbor, arbor_procs, by_task, env_for, recap, ssh,
                    wait_gone)

HERE = Path(__file__).resolve().parent
TARGETS = ("target1", "target2", "target3")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")




def run_become(lab, users, mode, out_dir):
    record = out_dir / "record.jsonl"
    env = env_for(mode)
    env.update(ARBOR_RECORD=str(record), ANSIBLE_CALLBACK_PLUGINS=str(HERE / "callback_plugins"),
               ANSIBLE_CALLBACKS_ENABLED="record",
               ANSIBLE_BECOME_PLUGINS=str(PLAYBOOKS / "become_plugins"))
    inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", inv, "-i", users["inventory"],
                          str(PLAYBOOKS / "become.yml"), "-vvv"],
                         env=env, capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    return res.returncode, res.stdout + res.stderr, lines


def clean(lab):
    for t in TARGETS:
        ssh(lab, t, "rm -f /root/arbor-become.txt /tmp/arbor-become-arbv.txt; "
                    "rm -rf /root/.ansible /home/arbu/.ansible /home/arbv/.ansible")


def files(lab):
    out = {}
    for t in TARGETS:
        out[t] = ssh(lab, t, "for f in /root/arbor-become.txt /tmp/arbor-become-arbv.txt; do "
                             "stat -c '%n %U %a %s' $f; cat $f; done").stdout
    return out


WRONG = ("a wrong sudo password", "a wrong sudo password where an interpreter is up")
FAILS = {"sudo without the password it needs": "Missing sudo password",
         "su with a wrong password": "Incorrect su password"}


def test_become_matches_vanilla(lab, users, tmp_path):
    clean(lab)
    (tmp_path / "vanilla").mkdir()
    (tmp_path / "arbor").mkdir()
    rc_v, out_v, lines_v = run_become(lab, users, "vanilla", tmp_path / "vanilla")
    files_v = files(lab)
    clean(lab)
    rc_a, out_a, lines_a = run_become(lab, users, "arbor", tmp_path / "arbor")
    files_a = files(lab)
    (tmp_path / "vanilla" / "out.txt").write_text(out_v)
    (tmp_path / "arbor" / "out.txt").write_text(out_a)
    assert rc_v == 0 and rc_a == 0, (out_v[-3000:], out_a[-3000:])
    assert recap(out_a) == recap(out_v) and len(recap(out_v)) == 3, out_a[-3000:]
    v, a = by_task(lines_v), by_task(lines_a)
    assert sorted(a) == sorted(v)
    for key in v:
        if key[1] in FAILS:
            # Both fail the task and say why; arbor's message also names
            # the host and the become hop.
            for res in a[key] + v[key]:
                assert res["status"] == "failed" and FAILS[key[1]] in res["msg"], res
            assert key[0] in a[key][0]["msg"]
            continue
        if key[1] in WRONG:
            # Both fail the task and say why; arbor's message also names
            # the host and the become hop.
            for res in a[key] + v[key]:
                assert res["status"] == "failed" and "Incorrect sudo password" in res["msg"], res
            assert key[0] in a[key][0]["msg"]
            continue
        assert a[key] == v[key], key
    assert files_a == files_v
    assert "root only" in files_a["target1"] and "arbv 640" in files_a["target1"]
    # Who ran what: arbu logged in, root and arbv through become.
    said = {t: [r.get("stdout") for r in a[(t, "who logs in")] + a[(t, "sudo to root with a password")]
                + a[(t, "su to another user with that user's password")]] for t in TARGETS}
    assert said["target2"] == [LOGIN, "root", "arbv\n/home/arbv"], said
    # -vvv shows each hop with its connect time, and what the agents logged.
    assert re.search(r"ARBOR HOP bastion1 \(relay, from the controller\): node \d+, up in \d+ ms",
                     out_a), out_a[:3000]
    assert re.search(r"ARBOR HOP target1 \(agent, via bastion1\): node \d+, up in \d+ ms, pid \d+",
                     out_a)
    assert re.search(r"<target1> ARBOR LOG n\d+: nested interpreter n\d+ started \(pid \d+\)", out_a)
    # No password reached the output at -vvv.
    for pw in users["passwords"].values():
        assert pw not in out_a
    # Each (target, become settings, password) started one nested
    # interpreter, once: sudo to root twice, with its password and then
    # with a wrong one (which sudo refused, as vanilla's does).
    started = re.findall(r"ARBOR BECOME (\S+) \(become (\S+) via ([^)]+)\)", out_a)
    counts = collections.Counter(started)
    assert all(n == (2 if (u, m) == ("root", "sudo -H -S -n") else 1) for (t, u, m), n in counts.items()), counts
    assert {(u, m) for t, u, m in started if t == "target1"} == {
        ("root", "sudo -H -S -n"), ("arbv", "su"), ("root", "lab_doas"), ("root", "sudo -H -S"),
        ("arbv", "sudo -H -S -n"), ("daemon", "sudo -H -S -n"), ("nobody", "su")}, started
    # The run left no interpreter behind, under any account.
    left = wait_gone(lab)
    assert not any_arbor(left), left


LRU_PLAY = """
- hosts: target1
  gather_facts: false
  tasks:
    - command: id -un
      become: true
      become_user: "{{ item }}"
      loop: [root, arbv, nobody, daemon, root]
      vars: {ansible_become_pass: "{{ arbu_password }}"}
"""


def test_interpreters_per_target_are_bounded_least_recently_used_first(lab, users, tmp_path):
    """ARBOR_MAX_INTERPRETERS=3: the login interpreter and two become ones.
    Each new become user evicts the least recently used: root, used first,
    is started again at the end. Sampled all along, target1 never holds
    more than 3 interpreters."""
    import threading
    book = tmp_path / "lru.yml"
    book.write_text(LRU_PLAY)
    env = env_for("arbor")
    env["ARBOR_MAX_INTERPRETERS"] = "3"
    seen, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            seen.append(len(arbor_procs(lab)["target1"]["agents"]))
            time.sleep(0.05)
    t = threading.Thread(target=sample)
    t.start()
    try:
        res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], "-i",
                              users["inventory"], str(book), "-vvv"],
                             env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        t.join()
    assert res.returncode == 0, res.stdout[-3000:]
    said = re.findall(r'"stdout": "(\w+)"', res.stdout)
    assert said == ["root", "arbv", "nobody", "daemon", "root"], said
    started = re.findall(r"ARBOR BECOME target1 \(become (\S+) via", res.stdout)
    assert started == ["root", "arbv", "nobody", "daemon", "root"], started
    assert max(seen) == 3, seen
    assert not any_arbor(wait_gone(lab))


STACK_PLAY = """
- hosts: target1
  gather_facts: false
  tasks:
    - arbor_get_stack:
      register: plain
    - mitogen_get_stack:
      become: true
      become_user: arbv
      vars: {ansible_become_pass: "{{ arbu_password }}"}
      register: nested
    - copy:
        content: "{{ {'plain': plain.result, 'nested': nested.result} | to_json }}"
        dest: "{{ out }}"
      delegate_to: localhost
"""


def test_get_stack_shows_the_resolved_hops(lab, users, tmp_path):
    """arbor_get_stack and its Mitogen name show the hops a task's host is
    reached through, with the via host's own settings, and the become
    interpreter, in Mitogen's shape; no password, and nothing is started."""
    book = tmp_path / "stack.yml"
    book.write_text(STACK_PLAY)
    out = tmp_path / "stack.json"
    env = env_for("arbor")
    env["ANSIBLE_ACTION_PLUGINS"] = str(GLUE.parent / "action")
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], "-i",
                          users["inventory"], str(book), "-e", f"out={out}", "-vvv"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    stack = json.loads(out.read_text())
    plain = stack["plain"]
    assert [(e["method"], e["kwargs"]["name"], e["kwargs"]["role"]) for e in plain] == [
        ("ssh", "bastion1", "relay"), ("ssh", "target1", "agent")], plain
    assert plain[0]["kwargs"]["user"] == "root" and plain[1]["kwargs"]["user"] == LOGIN
    assert plain[0]["kwargs"]["host"] == lab["hosts"]["bastion1"]["address"]
    assert stack["nested"][:2] == plain
    assert stack["nested"][2] == {"method": "sudo", "kwargs": {
        "role": "nested agent", "become_user": "arbv", "become_exe": "sudo",
        "become_flags": "-H -S -n", "password": True}}, stack["nested"]
    assert users["passwords"][LOGIN] not in out.read_text() + res.stdout
    # Nothing was connected: no arbor operation reached target1 (the copy
    # of the result, delegated to localhost, runs in arbor's local agent).
    assert "<target1> ARBOR" not in res.stdout and "<target1> ESTABLISH" not in res.stdout
    assert "<localhost> ARBOR HOP localhost (agent, from the controller)" in res.stdout
