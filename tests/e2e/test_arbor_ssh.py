"""`arbor ssh HOST [COMMAND]`: a command or a shell on an inventory host,
through the tree (target1 is behind the bastion), with the inventory's via,
user and become settings: its output, stdin and exit status as ssh gives
them, a pty of the caller's window size, become, a host that cannot be
reached, and nothing left on any host afterwards (or, with ARBOR_PERSIST,
the kept tree reused)."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from labkit import ARBOR, VENV, arbor_procs, any_arbor, env_for, run_in_pty, wait_gone

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def arbor_env(**extra):
    e = env_for("arbor")
    e["ARBOR_PYTHON"] = str(VENV / "python")
    e["PATH"] = f"{VENV}:{e['PATH']}"
    e.update(extra)
    return e


def arbor_ssh(lab, *args, env=None, stdin=b""):
    return subprocess.run([str(ARBOR), "ssh", "-i", lab["inventory"], *args], env=env or arbor_env(),
                          input=stdin, capture_output=True, timeout=120)


def test_a_command_gives_its_output_and_exit_status_and_leaves_nothing(lab):
    res = arbor_ssh(lab, "target1", "echo out; echo err >&2; hostname; exit 3")
    assert res.returncode == 3, res.stderr.decode()
    lines = res.stdout.decode().splitlines()
    assert lines[0] == "out" and len(lines) == 2, lines
    assert b"err\n" in res.stderr
    # its stdin streams in, whole
    data = os.urandom(300_000)
    res = arbor_ssh(lab, "target1", "sha256sum", stdin=data)
    assert res.returncode == 0, res.stderr.decode()
    import hashlib
    assert res.stdout.decode().split()[0] == hashlib.sha256(data).hexdigest()
    # the daemon lived as long as `arbor ssh`: nothing stays on any host
    left = wait_gone(lab)
    assert not any_arbor(left), left


def test_become_runs_the_command_as_the_become_user(lab):
    res = arbor_ssh(lab, "-b", "--become-user", "nobody", "target2", "id -un")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().strip() == "nobody"
    res = arbor_ssh(lab, "target2", "id -un")
    assert res.stdout.decode().strip() == "root"


def test_an_unknown_or_unreachable_host_is_255_with_its_name(lab, tmp_path):
    res = arbor_ssh(lab, "no-such-host", "true")
    assert res.returncode == 255
    assert b"no-such-host" in res.stderr
    res = arbor_ssh(lab, "targets", "true")
    assert res.returncode == 255 and b"names 3 hosts" in res.stderr, res.stderr
    inv = tmp_path / "inv.yml"
    inv.write_text(Path(lab["inventory"]).read_text().replace('"10.241.1.12"', '"10.241.1.99"'))
    env = arbor_env(ANSIBLE_TIMEOUT="3")
    res = subprocess.run([str(ARBOR), "ssh", "-i", str(inv), "target3", "true"], env=env,
                         capture_output=True, timeout=120)
    assert res.returncode == 255
    err = res.stderr.decode()
    assert "target3" in err and "unreachable" in err, err
    assert not any_arbor(wait_gone(lab)), arbor_procs(lab)


def test_a_pty_has_the_callers_window_and_a_shell_reads_the_terminal(lab):
    env = arbor_env(TERM="xterm")
    base = [str(ARBOR), "ssh", "-i", lab["inventory"]]
    rc, out = run_in_pty(base + ["-t", "target1", "tty; stty size; echo term=$TERM"], env, 33, 101)
    assert rc == 0, out
    assert "/dev/pts/" in out and "33 101" in out and "term=xterm" in out, out
    # without -t a command has no pty, as over ssh
    rc, out = run_in_pty(base + ["target1", "tty || echo none"], env, 33, 101)
    assert "none" in out and "/dev/pts/" not in out, out
    # a shell: interactive on the pty, its exit status the last command's
    rc, out = run_in_pty(base + ["target1"], env, 40, 120,
                         send=b"echo shell-$((6*7)); stty size; exit 5\r", when=b"# ")
    assert rc == 5, out
    assert "shell-42" in out and "40 120" in out, out
    assert not any_arbor(wait_gone(lab)), arbor_procs(lab)


def test_a_kept_tree_is_reused(lab):
    tmp = Path(tempfile.mkdtemp(prefix="as", dir="/tmp"))
    env = arbor_env(TMPDIR=str(tmp), ARBOR_PERSIST="60")
    try:
        # A playbook run keeps the tree; `arbor ssh` finds it (no ARBOR_BIN:
        # each finds the binary its own way, and they must agree).
        env.pop("ARBOR_BIN", None)
        book = tmp / "play.yml"
        book.write_text("- hosts: target1\n  gather_facts: false\n  tasks: [{command: 'true'}]\n")
        res = subprocess.run([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:]
        kept = arbor_procs(lab)["target1"]["agents"]
        agent = "ps -o ppid= -p $$"
        first = arbor_ssh(lab, "target1", agent, env=env)
        second = arbor_ssh(lab, "target1", agent, env=env)
        assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
        # the same agent served both: its tree was kept and reused
        assert first.stdout.strip() == second.stdout.strip(), (first.stdout, second.stdout)
        assert [int(first.stdout)] == kept == arbor_procs(lab)["target1"]["agents"], (first.stdout, kept)
    finally:
        subprocess.run([str(ARBOR), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not any_arbor(wait_gone(lab)), arbor_procs(lab)
