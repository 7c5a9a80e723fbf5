"""The relay's content cache: a module's zip members cross the WAN once per
relay, whatever the number of targets behind it; the relay injects them
into each agent's request. With a cache too small to hold them, the
controller (which mirrors each relay's cache) sends the members to each
agent itself: same results, more bytes."""

import json
import os
import subprocess

import pytest

from labkit import REPO, VENV, env_for, recap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

PLAY = "- hosts: targets\n  gather_facts: false\n  tasks:\n    - ping:\n    - stat: {path: /}\n"
WAN = REPO / "deploy" / "lab" / "wan"


def wan_up(lab, tmp_path, limit, **env):
    book = tmp_path / "cache.yml"
    book.write_text(PLAY)
    subprocess.run([str(WAN), "reset"], check=True, capture_output=True)
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book),
                          "-l", limit], env=dict(env_for("arbor"), **env), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    r = recap(res.stdout)
    assert all(v[0] == 2 and v[3] == 0 for v in r.values()) and len(r) == limit.count(",") + 1
    out = subprocess.run([str(WAN), "stats"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["up"]["bytes"]


def test_members_cross_the_wan_once_per_relay(lab, tmp_path):
    one = wan_up(lab, tmp_path, "target1")
    three = wan_up(lab, tmp_path, "target1,target2,target3")
    agent_code = len(__import__("zlib").compress(
        subprocess.run([str(REPO / "target" / "release" / "arbor"), "agent-code"], check=True,
                       capture_output=True).stdout, 9))
    per_extra = (three - one) / 2
    # Each further target costs its ssh session and agent code, and the
    # requests' scripts and manifests, not the ~120 KB of module members.
    assert per_extra < agent_code + 40_000, (one, three, per_extra)
    # No room in the relay's cache: the members go to each agent from the
    # controller; the run still succeeds, with more bytes.
    missed = wan_up(lab, tmp_path, "target1,target2,target3", ARBOR_RELAY_CACHE_BYTES="0")
    assert missed > three + 2 * 80_000, (three, missed)
