"""ansible-core's own integration targets through the bastion with arbor
(issue 15): each target's playbooks assert what Ansible users rely on
(temp dirs, interpreter discovery, async, copy, fetch, become, reconnects);
they run here as ansible-test runs them against an ssh target
(ansible_targets.py), with testhost behind the bastion. The list is the
README's: every target in it passes through arbor (each also passes with
vanilla Ansible through ProxyJump in this lab)."""

import json
import os
from pathlib import Path

import pytest

import ansible_targets
from labkit import LAB, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

# The README's list of targets that pass through arbor.
PASSING = ["ping", "raw", "command_shell", "shell", "remote_tmp", "interpreter_discovery_python",
           "wait_for_connection", "async", "async_fail", "async_extra_data", "copy", "file", "lineinfile",
           "stat", "become_sudo", "become_su"]


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--targets", "1").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


@pytest.fixture(scope="module")
def targets():
    return ansible_targets.sdist_targets()


@pytest.mark.parametrize("name", PASSING)
def test_ansible_core_target_passes_through_arbor(lab, targets, name, tmp_path):
    ok, took, log = ansible_targets.run_target(lab, targets, name, "arbor", tmp_path)
    print(f"{name}: {took:.0f} s")
    assert ok, f"{name} failed through arbor; its log:\n" + log.read_text()[-6000:]
