"""Interpreter discovery and a templated ansible_python_interpreter through
arbor, compared with vanilla: target1 discovers (`auto`), target2 has a
templated path, target3 `auto_silent`. Every host's module result and
discovered facts must be the same as vanilla's."""

import json
import os
import subprocess

import pytest

from labkit import VENV, env_for, recap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

PLAY = """
- hosts: targets
  gather_facts: false
  tasks:
    - ping:
      register: p
    - command: "true"
    - copy:
        content: "{{ {'facts': p.ansible_facts | default({}), 'ping': p.ping,
                      'warnings': p.warnings | default([])} | to_json }}"
        dest: "{{ out }}/{{ inventory_hostname }}"
      delegate_to: localhost
"""

HOSTS = {"targets": {"hosts": {
    "target1": {"ansible_python_interpreter": "auto"},
    "target2": {"ansible_python_interpreter": "{{ '/usr/bin/' ~ 'python3' }}"},
    "target3": {"ansible_python_interpreter": "auto_silent"},
}}}


def run_mode(lab, mode, tmp_path):
    out = tmp_path / mode
    out.mkdir()
    extra = tmp_path / "interp.yml"
    extra.write_text(json.dumps(HOSTS))
    book = tmp_path / "interp-play.yml"
    book.write_text(PLAY)
    inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", inv, "-i", str(extra), str(book),
                          "-e", f"out={out}"], env=env_for(mode), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    return recap(res.stdout), {t: json.loads((out / t).read_text())
                               for t in ("target1", "target2", "target3")}


def test_discovery_and_templated_interpreter_match_vanilla(lab, tmp_path):
    recap_v, got_v = run_mode(lab, "vanilla", tmp_path)
    recap_a, got_a = run_mode(lab, "arbor", tmp_path)
    assert recap_a == recap_v
    assert got_a == got_v
    assert got_a["target1"]["facts"]["discovered_interpreter_python"].startswith("/usr/bin/python3")
    assert got_a["target2"]["facts"] == {}
