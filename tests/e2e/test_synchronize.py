"""synchronize (ansible.posix) through arbor's tree: rsync's remote shell
is the tree itself (ansible-glue/arbor_rsh.py), so it reaches targets
behind the python-less bastion, where Mitogen leaves it unsupported.
Vanilla reaches them with its ssh args (ProxyJump, use_ssh_args). Push a
tree with a 2 MiB file, push again (unchanged), and pull a file back: the
same `changed`, the same files on the targets and on the controller."""

import json
import os
import random
import shutil
import subprocess

import pytest

from labkit import PLAYBOOKS, VENV, env_for, recap, ssh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")
TARGETS = ("target1", "target2", "target3")

PLAY = """
- hosts: targets
  gather_facts: false
  tasks:
    - name: push a tree
      ansible.posix.synchronize: {src: "{{ tree }}/", dest: /tmp/arbor-sync/, use_ssh_args: true}
      register: push
    - name: push it again
      ansible.posix.synchronize: {src: "{{ tree }}/", dest: /tmp/arbor-sync/, use_ssh_args: true}
      register: again
    - name: pull a file back
      ansible.posix.synchronize:
        mode: pull
        src: /tmp/arbor-sync/big.bin
        # One directory per host: rsync's --delay-updates shares .~tmp~.
        dest: "{{ pulled }}/{{ inventory_hostname }}/"
        use_ssh_args: true
      register: pull
    - copy:
        content: "{{ [push.changed, again.changed, pull.changed, push.rc] | to_json }}"
        dest: "{{ pulled }}/{{ inventory_hostname }}.json"
      delegate_to: localhost
"""


def state(lab):
    return {t: ssh(lab, t, "cd /tmp/arbor-sync && find . | sort | while read f; do "
                           "echo \"$f $(stat -c %a \"$f\") $( [ -f \"$f\" ] && md5sum < \"$f\")\"; "
                           "done").stdout for t in TARGETS}


def run_mode(lab, mode, tmp_path, tree):
    for t in TARGETS:
        ssh(lab, t, "rm -rf /tmp/arbor-sync")
    pulled = tmp_path / mode
    pulled.mkdir()
    book = tmp_path / "sync.yml"
    book.write_text(PLAY)
    inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", inv, str(book), "-vvv",
                          "-e", f"tree={tree}", "-e", f"pulled={pulled}"],
                         env=env_for(mode), capture_output=True, text=True, timeout=300)
    (tmp_path / f"{mode}.out").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stdout[-4000:]
    flags = {t: json.loads((pulled / f"{t}.json").read_text()) for t in TARGETS}
    files = {t: (pulled / t / "big.bin").read_bytes() for t in TARGETS}
    return recap(res.stdout), flags, files, state(lab), res.stdout


def test_synchronize_through_the_tree_matches_vanilla(lab, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(PLAYBOOKS / "files" / "tree", tree)
    (tree / "big.bin").write_bytes(random.Random(7).randbytes(2 * 1024 * 1024 + 3))
    recap_v, flags_v, files_v, state_v, _ = run_mode(lab, "vanilla", tmp_path, tree)
    recap_a, flags_a, files_a, state_a, out_a = run_mode(lab, "arbor", tmp_path, tree)
    assert recap_a == recap_v
    assert flags_a == flags_v == {t: [True, False, True, 0] for t in TARGETS}
    assert state_a == state_v and "big.bin" in state_a["target1"]
    assert files_a == files_v and files_a["target1"] == (tree / "big.bin").read_bytes()
    # It went through the tree: rsync's remote shell was arbor's.
    assert "ARBOR SYNCHRONIZE through the tree" in out_a and "arbor_rsh.py" in out_a
