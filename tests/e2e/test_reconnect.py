"""Reconnects (issue 15), arbor beside vanilla Ansible through the bastion:
a target whose agent and sshd session are killed between two tasks is
reached again by the next task; `meta: reset_connection` ends the host's
interpreters (its login agent and its become agent) and the next task
connects afresh; the `reboot` module and `wait_for_connection` work against
a lab host that really goes down (every process killed, sshd back after a
few seconds, a new boot id); a via host that was down for one task is used
again by the next, while within the task that met the failure every loop
item fails at once."""

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labkit import AGENT_MARK, PLAYBOOKS, VENV, env_for, host_procs, outcomes, recap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def agent_pythons(lab, host):
    return [p for p, _, e, c in host_procs(lab, host) if AGENT_MARK in c and "python" in e]


def sshd_sessions(lab, host):
    """sshd's per-connection processes (not the listener)."""
    return [p for p, _, e, c in host_procs(lab, host) if e.endswith("sshd") and b"[listener]" not in c
            and not c.startswith(b"/usr/sbin/sshd")]


def run_watched(lab, mode, out_dir, on_line):
    """Runs reconnect.yml, calling on_line(line) for each line of output as
    it comes; returns (rc, output, records)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "record.jsonl"
    e = env_for(mode)
    e.update(ARBOR_RECORD=str(record), PYTHONUNBUFFERED="1",
             ANSIBLE_CALLBACK_PLUGINS=str(PLAYBOOKS.parent / "callback_plugins"),
             ANSIBLE_CALLBACKS_ENABLED="record")
    inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
    p = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", inv, str(PLAYBOOKS / "reconnect.yml")],
                         env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    timer = threading.Timer(300, p.kill)
    timer.start()
    try:
        for line in p.stdout:
            lines.append(line)
            on_line(line)
    finally:
        timer.cancel()
    p.wait()
    out = "".join(lines)
    (out_dir / "out.txt").write_text(out)
    recs = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    return p.returncode, out, recs


def test_kill_between_tasks_reset_connection_and_reboot_match_vanilla(lab, tmp_path):
    results = {}
    for mode in ("vanilla", "arbor"):
        seen = {"killed": [], "during_reset": None, "before_kill": None}

        def on_line(line, seen=seen, mode=mode):
            if "TASK [the test kills now]" in line:
                seen["before_kill"] = agent_pythons(lab, "target1")
                time.sleep(0.5)
                victims = agent_pythons(lab, "target1") + sshd_sessions(lab, "target1")
                for pid in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                seen["killed"] = victims
            elif "TASK [the test looks now]" in line:
                time.sleep(1.0)
                seen["during_reset"] = agent_pythons(lab, "target1")

        rc, out, recs = run_watched(lab, mode, tmp_path / mode, on_line)
        results[mode] = (rc, out, recs, seen)
        assert rc == 0, out[-4000:]
        assert seen["killed"], (mode, "nothing was killed on target1")

    rc_v, out_v, recs_v, _ = results["vanilla"]
    rc_a, out_a, recs_a, seen = results["arbor"]
    assert recap(out_a) == recap(out_v), (out_v[-2000:], out_a[-2000:])
    assert outcomes(recs_a, ("status", "changed", "failed", "rc")) == \
        outcomes(recs_v, ("status", "changed", "failed", "rc"))
    # arbor: target1 had its login agent and its become agent before the
    # kill; after `meta: reset_connection`, none until the next task.
    assert len(seen["before_kill"]) >= 2, seen
    assert seen["during_reset"] == [], seen
    after = {(r["host"], r["task"]): r for r in recs_a}
    assert after[("target1", "after the kill")]["stdout"] == "after"
    assert after[("target1", "become after the kill")]["stdout"] == "root"
    assert after[("target1", "after the reset")]["stdout"] == "reset"
    assert after[("target1", "after waiting")]["stdout"] == "back"


DOWN_VIA = """
- name: a via host that is down, then up
  hosts: target1
  gather_facts: false
  tasks:
    - name: while bastion1 is down
      ansible.builtin.command: "echo {{ item }}"
      loop: [1, 2, 3, 4, 5]
      ignore_unreachable: true
    - name: bring bastion1 back
      ansible.builtin.command: "touch {{ flag }}"
      delegate_to: localhost
      connection: local
    - name: wait for it
      ansible.builtin.wait_for:
        path: "{{ flag }}.done"
        timeout: 30
      delegate_to: localhost
      connection: local
    - name: once bastion1 is back
      ansible.builtin.command: echo back
"""


def test_a_via_host_down_for_one_task_is_used_again_by_the_next(lab, tmp_path):
    """bastion1's sshd stops answering (SIGSTOP: TCP connects, no banner):
    every loop item of the first task fails UNREACHABLE, the items after
    the first at once (one connect timeout per task, not per item); once
    sshd answers again, the next task reaches target1 through it (before,
    a failed hop stayed failed for the whole run)."""
    book = tmp_path / "down_via.yml"
    book.write_text(DOWN_VIA)
    flag = tmp_path / "flag"
    sshd = [p for p, _, e, c in host_procs(lab, "bastion1") if e.endswith("sshd") and b"[listener]" in c]
    assert len(sshd) == 1
    results = {}
    for mode in ("vanilla", "arbor"):
        for f in (flag, Path(f"{flag}.done")):
            f.unlink(missing_ok=True)
        for pid in sshd:
            os.kill(pid, signal.SIGSTOP)
        stop = threading.Event()

        def revive():
            while not stop.is_set():
                if flag.exists():
                    for pid in sshd:
                        os.kill(pid, signal.SIGCONT)
                    Path(f"{flag}.done").touch()
                    return
                time.sleep(0.1)
        t = threading.Thread(target=revive)
        t.start()
        inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
        t0 = time.monotonic()
        try:
            res = subprocess.run([str(VENV / "ansible-playbook"), "-i", inv, str(book), "-T", "3",
                                  "-e", f"flag={flag}"], env=env_for(mode), capture_output=True, text=True,
                                 timeout=300)
        finally:
            took = time.monotonic() - t0
            stop.set()
            t.join()
            for pid in sshd:
                os.kill(pid, signal.SIGCONT)
        results[mode] = (res.stdout + res.stderr, took)
        (tmp_path / f"{mode}.txt").write_text(results[mode][0])
    out_v, took_v = results["vanilla"]
    out_a, took_a = results["arbor"]
    assert recap(out_a) == recap(out_v), (out_v[-3000:], out_a[-3000:])
    assert "changed: [target1]" in out_a.split("TASK [once bastion1 is back]")[1], out_a[-2000:]
    first = out_a.split("TASK [while bastion1 is down]")[1].split("TASK [bring")[0]
    items = re.findall(r'^failed: \[target1\] \(item=(\d)\) => .*"msg": "Task failed: target1 \(agent, '
                       r'via bastion1\): bastion1 \(relay, from the controller\): [^"]+", "unreachable": true',
                       first, re.M)
    assert items == ["1", "2", "3", "4", "5"], first
    print(f"vanilla {took_v:.1f} s, arbor {took_a:.1f} s (5 items, -T 3)")
    # One connect timeout for the five items, where vanilla pays five.
    assert took_a < took_v - 6, (took_a, took_v)
