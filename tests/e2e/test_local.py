"""The local connection through arbor: localhost tasks run in a persistent
agent the run's daemon starts on the controller (no ssh), with the same
results as Ansible's own local plugin: commands in the playbook's
directory, files, templates and a module run in-process and forked."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from labkit import VENV, env_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs as root like the rest")

PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  tasks:
    - command: ls
      register: ls
    - shell: pwd; echo "$HOME"
      register: sh
    - copy: {content: "one\\n", dest: "{{ work }}/a", mode: "0640"}
      register: c1
    - copy: {content: "one\\n", dest: "{{ work }}/a", mode: "0640"}
      register: c2
    - lineinfile: {path: "{{ work }}/a", line: two}
      register: li
    - template: {src: t.j2, dest: "{{ work }}/t"}
      register: tp
    - stat: {path: "{{ work }}/a"}
      register: st
    - file: {path: "{{ work }}/d", state: directory, mode: "0700"}
      register: fi
    - command: cat a
      args: {chdir: "{{ work }}"}
      register: cat
    - copy:
        content: "{{ {'ls': ls.stdout_lines, 'sh': sh.stdout_lines, 'c1': c1.changed,
                      'c2': c2.changed, 'li': li.changed, 'tp': tp.changed,
                      'mode': st.stat.mode, 'size': st.stat.size, 'fi': fi.mode,
                      'cat': cat.stdout} | to_json }}"
        dest: "{{ out }}"
"""


def run(mode, tmp_path):
    d = tmp_path / mode
    (d / "play").mkdir(parents=True)
    (d / "work").mkdir()
    book = d / "play" / "local.yml"
    book.write_text(PLAY)
    (d / "play" / "t.j2").write_text("host {{ inventory_hostname }}\n")
    env = env_for(mode)
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", "localhost,", str(book), "-vvv",
                          "-e", f"work={d / 'work'}", "-e", f"out={d / 'out.json'}"],
                         env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 0, res.stdout[-3000:]
    got = json.loads((d / "out.json").read_text())
    files = {p.name: p.read_text() for p in sorted((d / "work").iterdir()) if p.is_file()}
    return res.stdout, got, files


def test_local_tasks_run_in_an_arbor_agent_and_match_vanilla(tmp_path):
    out_v, got_v, files_v = run("vanilla", tmp_path)
    out_a, got_a, files_a = run("arbor", tmp_path)
    assert "ARBOR HOP localhost (agent, from the controller)" in out_a
    assert "ARBOR" not in out_v
    # `ls` lists the playbook's directory (its file and template), as vanilla.
    assert got_a["ls"] == got_v["ls"] == ["local.yml", "t.j2"]
    assert got_a["sh"][0].endswith("/arbor/play") and got_v["sh"][0].endswith("/vanilla/play")
    for k in ("c1", "c2", "li", "tp", "mode", "size", "fi", "cat"):
        assert got_a[k] == got_v[k], k
    assert files_a == files_v and files_a["a"] == "one\ntwo\n"
    # Within 5 s nothing of the run's daemon or agent is left (zombies are
    # PID 1's to reap), nor its run directory.
    deadline = time.monotonic() + 5.0
    while True:
        left = [p for p in subprocess.run(["pgrep", "-f", "arbor daemon|import base64;exec"],
                                          capture_output=True, text=True).stdout.split()
                if not state_is_zombie(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left
    assert not list(Path(f"/tmp/arbor-{os.getuid()}").glob("[0-9]*"))


def state_is_zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_runs_dir_is_swept_and_live_runs_are_kept(tmp_path):
    """A run killed outright (SIGKILL, a reboot) cannot remove its run dir;
    the next run does, and leaves alone the dirs of runs still going."""
    base = Path(f"/tmp/arbor-{os.getuid()}")
    base.mkdir(mode=0o700, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "120"])
    stale, running = base / str(dead.pid), base / str(live.pid)
    try:
        for d in (stale, running):
            d.mkdir(mode=0o700)
            (d / "daemon.log").write_text("x\n")
        run("arbor", tmp_path)
        assert not stale.exists()
        assert (running / "daemon.log").read_text() == "x\n"
    finally:
        live.kill()
        live.wait()
        subprocess.run(["rm", "-rf", str(stale), str(running)])
