"""Fixtures of the agent's tests: a live agent on real pipes, and a real
AnsiballZ script built by ansible-core."""

import os
import subprocess
import sys

import pytest

from agentkit import NODE, REPO, W, Link


@pytest.fixture
def link(tmp_path):
    l = Link(tmp_path)
    kind, _, dst, src, _, payload = l.frame()
    assert (kind, dst, src) == (W.ROUTE_ADD, 0, NODE)
    assert W.split_msg(payload)[0]["pid"] == l.proc.pid
    yield l
    if l.proc.poll() is None:
        l.proc.kill()
        l.proc.wait()


@pytest.fixture(scope="module")
def ansiballz(tmp_path_factory):
    """Real AnsiballZ payloads (command module), built by real ansible."""
    d = tmp_path_factory.mktemp("kr")
    venv = REPO / ".venv" / "bin"
    env = dict(os.environ, ANSIBLE_KEEP_REMOTE_FILES="1", ANSIBLE_PIPELINING="False",
               ANSIBLE_REMOTE_TMP=str(d))
    subprocess.run([str(venv / "ansible"), "localhost", "-c", "local", "-m", "command", "-a", "echo hi",
                    "-e", f"ansible_python_interpreter={sys.executable}"],
                   env=env, check=True, capture_output=True)
    return next(d.glob("*/AnsiballZ_command.py")).read_bytes()
