"""ARBOR_PERSIST as the glue reads it: a duration, and the persistent
daemon a run uses: one per user, arbor binary and settings."""

import os
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleConnectionFailure

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible-glue"))
from arbor_glue import daemon  # noqa: E402


def test_durations():
    got = [daemon.persist_secs(v) for v in ("", None, "0", "off", "90", "90s", "10m", " 1h ", "2d")]
    assert got == [0, 0, 0, 0, 90, 90, 600, 3600, 172800]
    for bad in ("ten minutes", "10 m s", "-5", "1.5h"):
        with pytest.raises(AnsibleConnectionFailure, match="must be a duration"):
            daemon.persist_secs(bad)


def test_a_run_without_persist_has_its_own_dir_and_settings_pick_the_persistent_one(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("ARBOR_PERSIST", "10m")
    base = tmp_path / ("arbor-%d" % os.getuid())
    assert daemon.run_dir() == str(base / str(daemon.run_pid()))
    first = daemon.run_dir(600)
    assert Path(first).parent == base and Path(first).name.startswith("persist-")
    # The idle time and the log file are not part of it; any other setting is.
    monkeypatch.setenv("ARBOR_PERSIST", "1h")
    monkeypatch.setenv("ARBOR_LOG_FILE", str(tmp_path / "log"))
    # Nor `arbor ssh`'s own: it finds the tree a playbook run kept.
    monkeypatch.setenv("ARBOR_PYTHON", "/usr/bin/python3")
    monkeypatch.setenv("ARBOR_SHELL_FD", "7")
    assert daemon.run_dir(3600) == first
    monkeypatch.setenv("ARBOR_KEEPALIVE_SECS", "60")
    assert daemon.run_dir(600) != first
    monkeypatch.delenv("ARBOR_KEEPALIVE_SECS")
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
    assert daemon.run_dir(600) != first
