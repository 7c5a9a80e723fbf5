"""CIDR via rules (`arbor_via_rules`) and `arbor plan`.

The glue's rule matching and topology's (Rust, ipnet) are checked against
the same golden cases; `arbor plan` prints the tree of an inventory and
refuses a cycle; and in the lab, targets with no `mitogen_via` of their own
are reached through the bastion their address's rule names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from labkit import ARBOR, REPO, VENV, env_for, recap

GOLDEN = json.loads((REPO / "tests" / "golden" / "via_rules.json").read_text())


def load_glue():
    """The glue's via rules (ansible-glue/arbor_glue/chain.py)."""
    if str(REPO / "ansible-glue") not in sys.path:
        sys.path.insert(0, str(REPO / "ansible-glue"))
    from arbor_glue import chain
    return chain


def test_glue_rules_match_the_golden_cases():
    glue = load_glue()
    rules = glue.parse_via_rules(GOLDEN["rules"])
    for address, want in GOLDEN["cases"]:
        assert glue.via_for(address, rules) == want, address
    for bad in GOLDEN["bad"]:
        with pytest.raises(ValueError):
            glue.parse_via_rules(bad)


def arbor_plan(*args):
    env = dict(os.environ, PATH=f"{VENV}:{os.environ['PATH']}")
    return subprocess.run([str(ARBOR), "plan", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_plan_prints_the_tree_and_refuses_cycles(tmp_path):
    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump({"all": {
        "vars": {"arbor_via_rules": {"10.1.0.0/16": "gw", "10.1.7.0/24": "rack7"}},
        "hosts": {
            "gw": {"ansible_host": "192.0.2.1"},
            "rack7": {"ansible_host": "10.1.0.7"},
            "a": {"ansible_host": "10.1.2.3"},
            "b": {"ansible_host": "10.1.7.9"},
            "c": {"ansible_host": "10.9.0.1", "mitogen_via": "root@rack7"},
            "d": {"ansible_host": "10.1.2.4", "arbor_via": ""},
        }}}))
    res = arbor_plan("-i", str(inv))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "controller",
        "├─ d (10.1.2.4)",
        "└─ gw (192.0.2.1) relay, 2 behind",
        "   ├─ a (10.1.2.3)",
        "   └─ rack7 (10.1.0.7) relay, 2 behind",
        "      ├─ b (10.1.7.9)",
        "      └─ c (10.9.0.1)",
        "6 hosts, 2 relays, 2 direct, deepest chain 3 hop(s)",
    ]
    res = arbor_plan("-i", str(inv), "--json")
    assert json.loads(res.stdout)["chains"]["c"] == ["gw", "rack7", "c"]

    inv.write_text(yaml.safe_dump({"all": {
        "vars": {"arbor_via_rules": {"10.1.0.0/16": "b2", "10.2.0.0/16": "b1"}},
        "hosts": {"b1": {"ansible_host": "10.1.0.1"}, "b2": {"ansible_host": "10.2.0.1"}}}}))
    res = arbor_plan("-i", str(inv))
    assert res.returncode == 1 and "via cycle: b1 -> b2 -> b1" in res.stderr
    inv.write_text(yaml.safe_dump({"all": {"hosts": {"t": {"mitogen_via": "nowhere"}}}}))
    res = arbor_plan("-i", str(inv))
    assert res.returncode == 1 and 'via host "nowhere" is not in the inventory' in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")
def test_targets_reached_through_the_bastion_their_rule_names(lab, tmp_path):
    inv = yaml.safe_load(Path(lab["inventory"]).read_text())
    targets = inv["all"]["children"]["targets"]["hosts"]
    for hv in targets.values():
        assert hv.pop("mitogen_via") == "bastion1"
    inv["all"]["vars"]["arbor_via_rules"] = {"10.241.0.0/16": "bastion1"}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(inv))
    # The plan names the bastion for each target...
    res = arbor_plan("-i", str(path))
    assert res.returncode == 0, res.stderr
    assert "bastion1 (10.240.0.11) relay, 3 behind" in res.stdout, res.stdout
    # ... and a run goes through it: the targets' LAN is unroutable from the
    # controller, so only a relay on the bastion can reach them.
    book = tmp_path / "rules-play.yml"
    book.write_text("- hosts: targets\n  gather_facts: false\n  tasks:\n"
                    "    - ping:\n    - command: 'true'\n")
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", str(path), str(book), "-vvv"],
                         env=env_for("arbor"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    assert all(v[3] == 0 and v[0] == 2 for v in recap(res.stdout).values())
    for t in targets:
        assert f"ARBOR HOP {t} (agent, via bastion1)" in res.stdout, [
            line for line in res.stdout.splitlines() if "ARBOR HOP" in line]
