"""delegate_to through arbor runs in parallel: three targets delegate a
2-second command to target1 at once, and target1's one agent runs the three
side by side (Mitogen serialises them per delegated host). Each command
records when it ran, on target1's clock; the three intervals must overlap.
Results otherwise equal vanilla's."""

import os
import subprocess

import pytest

from labkit import VENV, env_for, recap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

PLAY = """
- hosts: targets
  gather_facts: false
  tasks:
    - name: delegated to target1
      shell: 'date +%s.%N; sleep 2; date +%s.%N; hostname'
      delegate_to: target1
      register: r
    - name: keep when it ran
      copy:
        content: "{{ r.stdout }}"
        dest: "{{ out }}/{{ inventory_hostname }}"
      delegate_to: localhost
"""


@pytest.mark.parametrize("mode", ["arbor", "vanilla"])
def test_delegate_to_one_host_runs_in_parallel(lab, mode, tmp_path):
    book = tmp_path / "delegate.yml"
    book.write_text(PLAY)
    out = tmp_path / "out"
    out.mkdir()
    inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", inv, str(book), "-f", "5",
                          "-e", f"out={out}"], env=env_for(mode), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert recap(res.stdout) == {t: (2, 2, 0, 0) for t in ("target1", "target2", "target3")}, \
        res.stdout[-2000:]
    runs = {}
    for t in ("target1", "target2", "target3"):
        start, end, host = (out / t).read_text().split()
        assert host == "target1"
        runs[t] = (float(start), float(end))
    # Every run started before any ended: all three ran at once.
    assert max(s for s, _ in runs.values()) < min(e for _, e in runs.values()), runs
