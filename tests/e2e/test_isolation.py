"""Task isolation through arbor: builtin modules known to keep to
themselves run in the target's persistent interpreter (no fork), every
other module forks, and `mitogen_task_isolation: fork` (or
`arbor_task_isolation: fork`) forks any task's module.

Which process ran a module is read from the module's own result: `slurp`
of /proc/self/stat gives the pid and parent pid of whoever read it."""

import base64
import json
import os
import subprocess

import pytest

from labkit import VENV, env_for, recap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

PLAY = """
- hosts: target1
  gather_facts: false
  tasks:
    - slurp: {src: /proc/self/stat}
      register: a
    - slurp: {src: /proc/self/stat}
      register: b
      vars: {mitogen_task_isolation: fork}
    - slurp: {src: /proc/self/stat}
      register: c
    - slurp: {src: /proc/self/stat}
      register: d
      vars: {arbor_task_isolation: fork}
    - command: cat /proc/self/stat
      register: e
    - slurp: {src: /proc/self/stat}
      register: bad
      vars: {arbor_task_isolation: sometimes}
      ignore_errors: true
    - copy:
        content: "{{ {'a': a.content, 'b': b.content, 'c': c.content, 'd': d.content,
                      'e': e.stdout, 'bad': bad.msg | default('')} | to_json }}"
        dest: "{{ out }}/result.json"
      delegate_to: localhost
"""


def pids(stat):
    """(pid, ppid) from /proc/<pid>/stat text."""
    pid, rest = stat.split(" ", 1)
    return int(pid), int(rest.rsplit(")", 1)[1].split()[1])


def test_persistent_interpreter_by_default_fork_on_request(lab, tmp_path):
    book = tmp_path / "isolation.yml"
    book.write_text(PLAY)
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book),
                          "-e", f"out={tmp_path}"], env=env_for("arbor"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert recap(res.stdout)["target1"][3] == 0  # failed (the bad value is ignored)
    got = json.loads((tmp_path / "result.json").read_text())
    stat = {k: base64.b64decode(v).decode() for k, v in got.items() if k in "abcd"}
    agent = pids(stat["a"])[0]
    # slurp runs in the persistent interpreter, the same one each time.
    assert pids(stat["c"])[0] == agent
    # With fork isolation, in a child of that interpreter, under either name.
    for k in "bd":
        pid, ppid = pids(stat[k])
        assert pid != agent and ppid == agent, (k, pid, ppid, agent)
    # command is not on the in-process list: its module forks from the agent,
    # and runs `cat` as its own child.
    cat_pid, cat_ppid = pids(got["e"])
    assert cat_ppid != agent and cat_pid != agent
    assert "arbor_task_isolation (or mitogen_task_isolation) must be 'fork' or unset" in got["bad"]
    assert "target1" in got["bad"]
