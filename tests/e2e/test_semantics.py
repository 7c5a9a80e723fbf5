"""Semantics equal to vanilla Ansible's (issue 15), side by side through the
bastion: each task's interpreter (another path, `auto` discovery) is the
one its module runs under and reports; a user that was become-d can be
deleted by a later task (the user module, then userdel); a wrong become
password fails even where an interpreter for that user is up (in
test_become.py); temp paths under remote_tmp read as vanilla's at -vvv;
Mitogen's habits carry over: `mitogen_via: [method:]user@host` becomes
`user` on the via host, `strategy = mitogen_linear` runs, and
`ansible_connection: ansible.builtin.ssh` is carried by arbor."""

import json
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labkit import PLAYBOOKS, REPO, VENV, env_for, host_procs, outcomes, recap, run, run_recorded, ssh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

KEYS = ("status", "changed", "failed", "rc", "stdout", "msg")


def test_interpreters_and_deleting_a_become_user_match_vanilla(lab, tmp_path):
    other = Path.home() / ".pyenv/versions/3.12.1/bin/python3.12"
    if not other.exists():
        pytest.fail(f"{other} is missing: the lab gives targets this machine's pyenv Pythons")
    user = "arbtmp" + secrets.token_hex(2)
    results = {}
    try:
        for mode in ("vanilla", "arbor"):
            extra = ("-e", f"other_python={other}", "-e", f"temp_user={user}")
            results[mode] = run_recorded(lab, mode, "semantics.yml", tmp_path / mode, *extra,
                                         env={"ANSIBLE_LIBRARY": str(PLAYBOOKS / "library")})
            assert results[mode][0] == 0, results[mode][1][-4000:]
    finally:
        run("userdel", "--remove", user, check=False)
    (_, out_v, recs_v), (_, out_a, recs_a) = results["vanilla"], results["arbor"]
    assert recap(out_a) == recap(out_v), (out_v[-2000:], out_a[-2000:])
    assert outcomes(recs_a, KEYS) == outcomes(recs_v, KEYS)
    # What each module reported: the same interpreter as vanilla's.
    by = {mode: {r["task"]: r for r in recs} for mode, recs in (("vanilla", recs_v), ("arbor", recs_a))}
    for task in ("the host's interpreter", "another interpreter for one task", "discovery for one task",
                 "the host's interpreter again"):
        got = {m: (by[m][task].get("executable"), by[m][task].get("version")) for m in by}
        assert got["arbor"] == got["vanilla"], (task, got)
    assert by["arbor"]["another interpreter for one task"]["version"] == "3.12"


def test_temp_paths_under_remote_tmp_read_as_vanillas(lab, tmp_path):
    """Pipelining off, remote_tmp set: at -vvv the module goes to
    REMOTE_TMP/ansible-tmp-<time>-<pid>-<random>/AnsiballZ_<module>.py,
    with vanilla and with arbor, and nothing stays under remote_tmp."""
    book = tmp_path / "rt.yml"
    book.write_text("- hosts: target1\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.command: echo hi\n")
    rt = "/tmp/arbor-rt-test"
    paths = {}
    for mode in ("vanilla", "arbor"):
        e = env_for(mode)
        e.update(ANSIBLE_PIPELINING="False", ANSIBLE_REMOTE_TMP=rt)
        inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
        res = subprocess.run([str(VENV / "ansible-playbook"), "-i", inv, str(book), "-vvv"], env=e,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:]
        paths[mode] = re.findall(r"PUT \S+ TO (\S+)", res.stdout)
        assert ssh(lab, "target1", f"ls -A {rt}").stdout == "", mode
    pattern = re.compile(rf"^{rt}/ansible-tmp-\d+\.\d+-\d+-\d+/AnsiballZ_command\.py$")
    for mode, found in paths.items():
        assert found and all(pattern.match(p) for p in found), (mode, found)


@pytest.fixture
def via_user(lab):
    """arbvia: logs into the bastion with the lab's key and may sudo with
    its password (the hosts share /etc and /home)."""
    user, password = "arbvia", secrets.token_urlsafe(12)
    run("useradd", "--create-home", "--shell", "/bin/bash", user, check=False)
    run("chpasswd", input=f"{user}:{password}\n")
    home = Path("/home") / user
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    (home / ".ssh" / "authorized_keys").write_text(Path(lab["private_key"] + ".pub").read_text())
    run("chown", "-R", f"{user}:{user}", home / ".ssh")
    sudoers = Path("/etc/sudoers.d/arbor-via")
    sudoers.write_text(f"{user} ALL=(ALL:ALL) ALL\n")
    sudoers.chmod(0o440)
    yield user, password
    sudoers.unlink()
    run("pkill", "-KILL", "-u", user, check=False)
    time.sleep(0.2)
    run("userdel", "--remove", user, check=False)


@pytest.mark.parametrize("spec", ["root@bastion1", "sudo:root@bastion1"])
def test_mitogen_via_user_at_host_becomes_the_user_on_the_via_host(lab, via_user, tmp_path, spec):
    """`mitogen_via: root@bastion1` with bastion1 logged into as arbvia: as
    with Mitogen, the relay the targets are reached from runs as root on
    bastion1 (become with bastion1's become settings and password), not as
    an ssh user root. The targets still authenticate with the forwarded
    agent. Results equal vanilla's (which jumps as arbvia)."""
    user, password = via_user
    key = lab["private_key"]
    bastion = lab["hosts"]["bastion1"]["address"]
    targets = {n: h for n, h in lab["hosts"].items() if h["role"] == "target"}
    common = "-o UserKnownHostsFile=%s -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes" % (
        lab["known_hosts"])
    inv = {"all": {"vars": {"ansible_python_interpreter": "/usr/bin/python3", "ansible_ssh_common_args": common},
                   "children": {
                       "bastions": {"hosts": {"bastion1": {
                           "ansible_host": bastion, "ansible_user": user, "ansible_ssh_private_key_file": key,
                           "ansible_become_pass": password}}},
                       "targets": {"hosts": {n: {"ansible_host": h["address"], "ansible_user": "root",
                                                 "mitogen_via": spec} for n, h in targets.items()}}}}}
    (tmp_path / "inv.json").write_text(json.dumps(inv))
    book = tmp_path / "who.yml"
    book.write_text("- hosts: targets\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.command: whoami\n    - ansible.builtin.command: sleep 2\n")
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for p, _, e, _ in host_procs(lab, "bastion1"):
                if "arbor-relay" in e:
                    try:
                        seen.append(os.stat(f"/proc/{p}").st_uid)
                    except OSError:
                        pass
            time.sleep(0.1)
    t = threading.Thread(target=watch)
    t.start()
    try:
        e = env_for("arbor")
        res = subprocess.run([str(VENV / "ansible-playbook"), "-i", str(tmp_path / "inv.json"), str(book), "-v"],
                             env=e, capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        t.join()
    out_a = res.stdout + res.stderr
    assert res.returncode == 0, out_a[-3000:]
    # Two relays on bastion1: arbvia's (the login) and root's (sudo).
    uid = int(run("id", "-u", user).stdout)
    assert set(seen) == {uid, 0}, seen
    for n in targets:
        assert re.search(rf'^changed: \[{n}\] => .*"stdout": "root"', out_a, re.M), out_a[-3000:]
    # Vanilla jumps as arbvia: the same results.
    vinv = {"all": {"vars": inv["all"]["vars"], "children": {"targets": {"hosts": {
        n: {"ansible_host": h["address"], "ansible_user": "root", "ansible_ssh_private_key_file": key,
            "ansible_ssh_common_args": common + f" -o ProxyCommand='ssh {common} -i {key} -W %h:%p {user}@{bastion}'"}
        for n, h in targets.items()}}}}}
    (tmp_path / "vinv.json").write_text(json.dumps(vinv))
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", str(tmp_path / "vinv.json"), str(book), "-v"],
                         env=env_for("vanilla"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert recap(out_a) == recap(res.stdout)


def test_mitogen_strategy_names_and_the_fqcn_ssh_connection(lab, tmp_path):
    """An ansible.cfg written for Mitogen (`strategy = mitogen_linear`, its
    strategy_plugins replaced by arbor's) runs, and the FQCN
    `ansible.builtin.ssh` is carried by arbor: the same results as
    vanilla's linear strategy, and arbor's hops at -vvv."""
    cfg = tmp_path / "ansible.cfg"
    cfg.write_text(f"[defaults]\nstrategy = mitogen_linear\n"
                   f"strategy_plugins = {REPO / 'ansible-glue' / 'plugins' / 'strategy'}\n")
    book = tmp_path / "fq.yml"
    book.write_text("- hosts: targets\n  gather_facts: false\n  vars:\n    ansible_connection: ansible.builtin.ssh\n"
                    "  tasks:\n    - ansible.builtin.command: hostname\n")
    e = env_for("arbor")
    e["ANSIBLE_CONFIG"] = str(cfg)
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book), "-vvv"], env=e,
                         capture_output=True, text=True, timeout=300)
    out_a = res.stdout + res.stderr
    assert res.returncode == 0, out_a[-3000:]
    assert "ARBOR HOP target1 (agent, via bastion1)" in out_a
    assert "arbor: strategy mitogen_linear is Ansible's own linear" in out_a
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory_vanilla"], str(book)],
                         env=env_for("vanilla"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    assert recap(out_a) == recap(res.stdout)
    # Without arbor's strategy directory, Ansible itself says what is missing.
    cfg.write_text("[defaults]\nstrategy = mitogen_linear\n")
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book)], env=e,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "mitogen_linear" in res.stdout + res.stderr
