"""arbor end to end in the lab: a real ansible-playbook through the
python-less bastion with arbor switched on by one environment variable,
compared with vanilla Ansible; the tree's processes and files observed on
every host while it runs and after it ends."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from labkit import (SSHD_AGENT, VENV, any_arbor, arbor_procs, bastion_files, env_for, host_procs, playbook,
                    recap, ssh, target_state, vanilla_modules, wait_gone)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def test_modules_match_vanilla_through_python_less_bastion(lab, tmp_path):
    assert not lab["hosts"]["bastion1"]["python3"]
    vanilla_recap, vanilla_state = vanilla_modules(lab, tmp_path)

    files_before = bastion_files(lab)
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((arbor_procs(lab), bastion_files(lab)))
            time.sleep(0.3)

    sampler = threading.Thread(target=sample)
    sampler.start()
    p = playbook(lab, "arbor", "modules.yml", "-e", f"fetch_dir={tmp_path / 'arbor'}")
    try:
        out, _ = p.communicate(timeout=600)
    finally:
        stop.set()
        sampler.join()
    ended = time.monotonic()
    assert p.returncode == 0, out
    assert recap(out) == vanilla_recap and len(vanilla_recap) == 3, out
    assert target_state(lab) == vanilla_state
    for t in ("target1", "target2", "target3"):
        a = (tmp_path / "arbor" / t / "tmp/arbor-e2e/app.conf").read_text()
        assert a == (tmp_path / "vanilla" / t / "tmp/arbor-e2e/app.conf").read_text()
        assert f"host = {t}" in a

    # While it ran: the relay ran from a memfd; the bastion's disk stayed
    # as it was; each target had one agent, the same one for every task.
    live = [s for s, _ in samples if s["bastion1"]["relays"]]
    assert live, "no sample saw the relay"
    for s in live:
        assert all(exe.startswith("/memfd:arbor-relay") for _, exe in s["bastion1"]["relays"]), s
    for _, files in samples:
        new_paths = set(files) - set(files_before)
        # Nothing new but sshd's forwarded-agent socket, private to the user.
        assert all(SSHD_AGENT.match(p) for p in new_paths), new_paths
        for p in new_paths:
            # Private through its 0700 directory (sshd leaves the socket 0755).
            assert files[p] == ("d", "700") or files[p][0] == "s", (p, files[p])
        assert not set(files_before) - set(files)
    for t in ("target1", "target2", "target3"):
        seen = {tuple(s[t]["agents"]) for s, _ in samples if s[t]["agents"]}
        assert len(seen) == 1 and len(next(iter(seen))) == 1, (t, seen)

    # After it: within 5 s no arbor process anywhere, no temp dir, no socket.
    procs = wait_gone(lab, 5.0 - (time.monotonic() - ended))
    assert not any_arbor(procs), procs
    assert not list(Path(f"/tmp/arbor-{os.getuid()}").glob("[0-9]*"))
    # ... and the bastion is exactly as it was, agent socket gone too.
    assert bastion_files(lab) == files_before
    for t in ("target1", "target2", "target3"):
        left = ssh(lab, t, "ls -a /tmp ~/.ansible/tmp 2>/dev/null | grep -E 'arbor|ansible_' || true").stdout
        assert left.strip() in ("", "arbor-e2e"), left


def test_sigint_mid_run_leaves_nothing(lab):
    p = playbook(lab, "arbor", "slow.yml", start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        procs = arbor_procs(lab)
        if all(procs[t]["agents"] for t in ("target1", "target2", "target3")) and any(
                "sleep" in c.decode(errors="replace") for t in ("target1",) for _, _, _, c in host_procs(lab, t)):
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("the run never reached its long task")
    os.killpg(p.pid, signal.SIGINT)
    t0 = time.monotonic()
    p.communicate(timeout=30)
    procs = wait_gone(lab, 5.0 - (time.monotonic() - t0))
    assert not any_arbor(procs), procs
    for t in ("target1",):
        assert not [c for _, _, _, c in host_procs(lab, t) if b"sleep" in c]
    assert not list(Path(f"/tmp/arbor-{os.getuid()}").glob("[0-9]*"))


def test_unreachable_target_and_unknown_via_are_named(lab, tmp_path):
    inv = tmp_path / "inventory.yml"
    base = Path(lab["inventory"]).read_text()
    inv.write_text(base + """
    broken:
      hosts:
        ghost: {ansible_host: "10.241.1.250", mitogen_via: bastion1}
        orphan: {ansible_host: "10.241.1.11", mitogen_via: nosuchbastion}
        impostor: {ansible_host: "10.241.1.10", mitogen_via: bastion1,
                    ansible_ssh_common_args: "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"}
""")
    p = subprocess.run([str(VENV / "ansible"), "-i", str(inv), "targets:broken", "-m", "ansible.builtin.command",
                        "-a", "hostname", "-o", "-T", "5"], env=env_for("arbor"), capture_output=True,
                       text=True, timeout=300)
    out = p.stdout + p.stderr
    for t in ("target1", "target2", "target3"):
        assert re.search(rf"^{t} \| CHANGED \| rc=0 \| \(stdout\) {t}$", out, re.M), out
    ghost = next(l for l in out.splitlines() if l.startswith("ghost"))
    assert "UNREACHABLE" in ghost and "bastion1" in ghost and "ghost" in ghost, ghost
    orphan = next(l for l in out.splitlines() if l.startswith("orphan"))
    assert "UNREACHABLE" in orphan and "nosuchbastion" in orphan, orphan
    # Host keys are checked on the hop as ProxyJump would: an unknown key is refused.
    impostor = next(l for l in out.splitlines() if l.startswith("impostor"))
    assert "UNREACHABLE" in impostor and re.search(
        r"Host key verification failed|No \S+ host key is known for 10.241.1.10", impostor), impostor


def test_a_host_without_python_is_named_and_the_run_goes_on(lab):
    """The bastion of this lab has no Python at all: as a target it fails
    at once, UNREACHABLE, saying so; its relay still carries the targets."""
    p = subprocess.run([str(VENV / "ansible"), "-i", lab["inventory"], "bastion1:targets", "-m",
                        "ansible.builtin.ping", "-o"], env=env_for("arbor"), capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    line = next(l for l in out.splitlines() if l.startswith("bastion1 |"))
    assert "UNREACHABLE" in line and "bastion1 (agent, from the controller)" in line, line
    assert re.search(r"python3: (No such file or directory|not found)", line), line
    for t in ("target1", "target2", "target3"):
        assert re.search(rf"^{t} \| SUCCESS", out, re.M), out
