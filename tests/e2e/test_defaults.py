"""Ansible's defaults: no ansible.cfg, so no pipelining. Ansible then puts
each module's AnsiballZ script in the task's temp dir and runs
`python3 FILE`; through arbor that pair is answered by the target's warm
interpreter (the module forks from it, or runs in it), with every result,
`changed`, file and -vvv PUT/EXEC line as vanilla's. Run with ansible-core
2.19 (.venv) and 2.21 (.venv-2.21, Python 3.13), via the python-less
bastion to three targets."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from labkit import AGENT_MARK, PLAYBOOKS, REPO, clean_targets, env_for, outcomes, ssh, target_state

TARGETS = ("target1", "target2", "target3")
VENVS = {"2.19": REPO / ".venv" / "bin", "2.21": REPO / ".venv-2.21" / "bin"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def defaults_env(mode, venv, cwd):
    """The tests' environment minus every Ansible setting: Ansible's defaults."""
    env = {k: v for k, v in env_for(mode).items()
           if not k.startswith("ANSIBLE_") or k in ("ANSIBLE_CONNECTION_PLUGINS", "ANSIBLE_NOCOLOR")}
    env["PATH"] = f"{venv}:{env['PATH']}"
    assert not (cwd / "ansible.cfg").exists() and not Path("/etc/ansible/ansible.cfg").exists()
    return env


def run_defaults(lab, mode, venv, out_dir):
    out_dir.mkdir(parents=True)
    env = defaults_env(mode, venv, out_dir)
    # run_recorded adds only the record callback; ANSIBLE_PIPELINING is
    # dropped again (env_for sets it).
    env.update(ANSIBLE_CALLBACK_PLUGINS=str(PLAYBOOKS.parent / "callback_plugins"),
               ANSIBLE_CALLBACKS_ENABLED="record", ARBOR_RECORD=str(out_dir / "record.jsonl"))
    inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
    res = subprocess.run([str(venv / "ansible-playbook"), "-i", inv, str(PLAYBOOKS / "defaults.yml"),
                          "-vvv"], env=env, cwd=out_dir, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    (out_dir / "out.txt").write_text(out)
    lines = [json.loads(x) for x in (out_dir / "record.jsonl").read_text().splitlines()]
    return res.returncode, out, lines


@pytest.mark.parametrize("version", sorted(VENVS))
def test_without_pipelining_modules_run_in_the_warm_interpreter_as_vanilla(lab, tmp_path, version):
    venv = VENVS[version]
    assert (venv / "ansible-playbook").exists(), f"{venv} has no ansible-core {version}: run deploy/setup"
    got = subprocess.run([str(venv / "ansible"), "--version"], capture_output=True, text=True).stdout
    assert f"core {version}." in got, got

    clean_targets(lab)
    rc_v, out_v, lines_v = run_defaults(lab, "vanilla", venv, tmp_path / "vanilla")
    state_v = target_state(lab)
    clean_targets(lab)
    rc_a, out_a, lines_a = run_defaults(lab, "arbor", venv, tmp_path / "arbor")
    state_a = target_state(lab)
    assert rc_v == 0, out_v[-3000:]
    assert rc_a == 0, out_a[-3000:]
    assert "ARBOR HOP" in out_a and "ARBOR" not in out_v
    # copy in one round trip, pipelining or not: 2 copy tasks on 3 targets.
    assert out_a.count("ARBOR CHOOSE /tmp/arbor-e2e/a.conf") == 6, out_a[-3000:]

    # Ansible's non-pipelined path was taken in both: the script put in the
    # task's temp dir, then run from it.
    run_file = re.compile(r"EXEC .*/bin/sh -c .*python3\S* /\S+/ansible-tmp-[\d.-]+/AnsiballZ_arbor_probe\.py")
    for out in (out_v, out_a):
        assert re.search(r"PUT \S+ TO /\S+/ansible-tmp-[\d.-]+/AnsiballZ_arbor_probe\.py", out), out[-3000:]
        assert run_file.search(out), out[-3000:]

    # The same results, `changed` and failures, task by task, and the same files.
    keys = ("status", "changed", "failed", "rc", "stdout", "stderr", "msg", "checksum", "mode", "size",
            "stat", "ping", "executable")
    assert outcomes(lines_a, keys) == outcomes(lines_v, keys)
    assert state_a == state_v and all("a.conf" in state_a[t] for t in TARGETS)

    # Where the probe ran: with vanilla, each task's own fresh interpreter
    # (a new shell its parent); through arbor, a fork of the target's one
    # persistent agent, the same for both tasks.
    probes = {(line["host"], line["task"]): line["probe"] for line in lines_v + lines_a
              if "probe" in line}
    v = [line["probe"] for line in lines_v if "probe" in line]
    a = [line["probe"] for line in lines_a if "probe" in line]
    assert len(v) == len(a) == 6, probes
    for t in TARGETS:
        pv = [line["probe"] for line in lines_v if line["host"] == t and "probe" in line]
        pa = [line["probe"] for line in lines_a if line["host"] == t and "probe" in line]
        assert pv[0]["ppid"] != pv[1]["ppid"], pv
        assert pa[0]["ppid"] == pa[1]["ppid"] and pa[0]["pid"] != pa[1]["pid"], pa

    # Nothing left in the task temp dirs on any target.
    for t in TARGETS:
        res = ssh(lab, t, "ls -A ~/.ansible/tmp 2>/dev/null; ls -d /tmp/ansible_* 2>/dev/null")
        assert res.stdout.strip() == "", (t, res.stdout)


@pytest.mark.parametrize("version,pipelining", [(v, p) for v in sorted(VENVS) for p in ("off", "on")])
def test_a_module_is_a_fork_of_the_agent(lab, tmp_path, version, pipelining):
    """Each module runs as a fork of the target's agent (its own command
    line is the agent's, which carries the agent's bootstrap; a fresh
    interpreter's is `python3 …`), with pipelining off (Ansible's default)
    and on, on each ansible-core."""
    venv = VENVS[version]
    book = tmp_path / "pp.yml"
    book.write_text("- hosts: target1\n  gather_facts: false\n  tasks:\n"
                    "    - arbor_probe:\n      register: p\n"
                    "    - copy: {content: '{{ p.probe.cmdline }}', dest: '" + str(tmp_path) + "/cmd'}\n"
                    "      delegate_to: localhost\n")
    (tmp_path / "library").symlink_to(PLAYBOOKS / "library")
    for mode in ("vanilla", "arbor"):
        env = defaults_env(mode, venv, tmp_path)
        if pipelining == "on":
            env["ANSIBLE_PIPELINING"] = "True"
        inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
        res = subprocess.run([str(venv / "ansible-playbook"), "-i", inv, str(book), "-vvv"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-3000:]
        assert ("AnsiballZ_arbor_probe.py" in res.stdout) == (pipelining == "off"), res.stdout[-3000:]
        cmdline = (tmp_path / "cmd").read_text()
        assert (AGENT_MARK.decode() in cmdline) == (mode == "arbor"), (mode, cmdline)

