"""`ansible-doc -t connection ssh`, with arbor's plugin path, documents
every arbor option, the variables that set them and arbor's environment
settings; at run time the plugin has the builtin ssh plugin's options and
arbor's."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "ansible-glue" / "plugins" / "connection"
VENVS = {"2.19": REPO / ".venv", "2.21": REPO / ".venv-2.21"}
OPTIONS = ["arbor_via", "arbor_via_rules", "arbor_inventory_hostname", "arbor_python",
           "arbor_task_isolation", "arbor_disable", "arbor_persist", "arbor_forward"]
VARIABLES = ["arbor_via", "mitogen_via", "arbor_via_rules", "arbor_task_isolation",
             "mitogen_task_isolation", "arbor_disable", "arbor_forward"]


def settings_in_code():
    """Every ARBOR_* environment setting the daemon, relay and glue read."""
    found = set()
    for d in ("controller/src", "relay/src", "relay/io/src", "ansible-glue"):
        for f in (REPO / d).rglob("*"):
            if f.suffix in (".rs", ".py"):
                found |= set(re.findall(r'"(ARBOR_[A-Z_]+)"', f.read_text(errors="replace")))
    # Set by arbor for its own children, not by users.
    return found - {"ARBOR_ASKPASS", "ARBOR_KNOWN_HOSTS", "ARBOR_NODE", "ARBOR_PAYLOAD",
                    "ARBOR_ANSIBLE_INVENTORY", "ARBOR_RECORD", "ARBOR_SHELL_FD"}


@pytest.mark.parametrize("version", sorted(VENVS))
def test_ansible_doc_shows_every_arbor_option_and_setting(version, tmp_path):
    venv = VENVS[version]
    env = dict(os.environ, ANSIBLE_CONNECTION_PLUGINS=str(PLUGINS), ANSIBLE_NOCOLOR="1")
    res = subprocess.run([str(venv / "bin" / "ansible-doc"), "-t", "connection", "ssh"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr + res.stdout, res.stderr
    out = res.stdout
    assert str(PLUGINS / "ssh.py") in out
    for name in OPTIONS:
        assert re.search(rf"^(- |\s+){name}\s", out, re.M), name
    for var in VARIABLES:
        assert f"name: {var}" in out, var
    words = " ".join(out.split())
    for setting in sorted(settings_in_code()):
        assert setting in words, setting
    assert "ansible-doc -t connection ansible.builtin.ssh" in words


def test_at_run_time_the_plugin_has_the_builtin_options_and_arbors(tmp_path):
    script = (
        "from ansible.plugins.loader import init_plugin_loader, connection_loader\n"
        "init_plugin_loader()\n"
        f"connection_loader.add_directory({str(PLUGINS)!r})\n"
        "import sys, yaml\n"
        "cls = connection_loader.get('ssh', class_only=True)\n"
        "print(yaml.safe_dump(sorted(yaml.safe_load(sys.modules[cls.__module__].DOCUMENTATION)['options'])))\n"
    )
    res = subprocess.run([str(VENVS["2.19"] / "bin" / "python"), "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    options = set(yaml.safe_load(res.stdout))
    assert set(OPTIONS) <= options
    assert {"host", "port", "remote_user", "ssh_args", "host_key_checking", "pipelining"} <= options
