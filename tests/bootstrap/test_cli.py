"""`arbor`'s command line: `--help` on every subcommand, usage errors exit
64 with the usage, and `--version` names the relays it carries."""

import subprocess
from pathlib import Path

import pytest

ARBOR = Path(__file__).resolve().parents[2] / "target" / "release" / "arbor"
SUBCOMMANDS = ["daemon", "plan", "plugin-path", "quic-probe", "relay-info", "relay-write", "version"]


def arbor(*args):
    return subprocess.run([str(ARBOR), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub):
    top = arbor("--help")
    assert top.returncode == 0 and f"  {sub} " in top.stdout, top.stdout
    res = arbor(sub, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(next(line.split(None, 1)[1] for line in top.stdout.splitlines()
                                      if line.startswith(f"  {sub} ")).strip()), res.stdout
    assert f"Usage: arbor {sub}" in res.stdout


def test_usage_errors_exit_64_with_the_usage():
    for args in (["bogus"], ["plan"], ["daemon"], ["relay-write"], ["daemon", "--run-dir"]):
        res = arbor(*args)
        assert res.returncode == 64, (args, res)
        assert res.stderr.startswith("error: ") and "'--help'" in res.stderr and res.stdout == "", (args, res)


def test_version_names_the_relays():
    out = arbor("--version").stdout
    assert out == arbor("version").stdout
    assert out.startswith("arbor 0.")
    for machine in ("x86_64", "aarch64"):
        assert f"{machine}: " in out and " bytes, musl static" in out, out
