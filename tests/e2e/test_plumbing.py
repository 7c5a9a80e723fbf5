"""The controller daemon, the relay and the agent together, without the lab.

The only stand-in is `ssh`: a script on PATH that runs its last argument
(the remote command) locally, so stage-0, the memfd relay, the relay's own
child spawning and the agent all run for real, fast, on this machine. The
lab tests (test_arbor.py) do the same through real sshd and a real bastion.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from labkit import ARBOR, Api, REPO

# `ssh -G` (the daemon reading the ssh configuration): what a config-less
# ssh resolves.
SSH_G = """for a; do last=$a; done
if [ "$1" = -G ]; then
    printf 'host %s\nhostname %s\nuser %s\nport 22\n' "$last" "$last" "$(id -un)"
    exit 0
fi
"""
FAKE_SSH = "#!/bin/sh\n# runs the remote command (the last argument) here\n" + SSH_G + "exec /bin/sh -c \"$last\"\n"


def procs():
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = (os.readlink(d / "exe"), (d / "cmdline").read_bytes())
            except OSError:
                pass
    return out


def ppid(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def under(pid, root):
    """Whether `pid` descends from `root`."""
    for _ in range(64):
        if pid == root:
            return True
        if pid <= 1:
            return False
        pid = ppid(pid)
    return False


@pytest.fixture
def daemon(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(FAKE_SSH)
    (bindir / "ssh").chmod(0o755)
    # A traversable parent, so only the daemon's own 0700 dir guards the socket.
    parent = Path(tempfile.mkdtemp(prefix="arbor-plumb-"))
    parent.chmod(0o711)
    run_dir = parent / "run"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    d = subprocess.Popen([str(ARBOR), "daemon", "--run-dir", str(run_dir), "--parent-pid", str(os.getpid())],
                         env=env, stderr=open(tmp_path / "daemon.log", "wb"))
    for _ in range(200):
        if (run_dir / "sock").exists():
            break
        time.sleep(0.02)
    yield d, run_dir, Api(run_dir / "sock")
    if d.poll() is None:
        d.kill()
        d.wait()
    shutil.rmtree(parent, ignore_errors=True)


CHAIN = [{"name": "b1", "host": "b1"}, {"name": "t1", "host": "t1", "python": sys.executable}]


def test_exec_put_fetch_through_a_relay(daemon, tmp_path):
    d, run_dir, api = daemon
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    api.send({"op": "exec", "chain": CHAIN, "cmd": "echo out; echo err >&2; exit 4", "stdin_size": 0})
    res, blob = api.recv()
    assert res["rc"] == 4 and blob[:res["stdout_len"]] == b"out\n" and blob[res["stdout_len"]:] == b"err\n"
    # The relay runs from a memfd; the agent is its child, not the daemon's.
    # Only this daemon's tree counts (an earlier test's agent sweeper may
    # still be finishing, reparented).
    mine = {p: v for p, v in procs().items() if under(p, d.pid)}
    relays = [p for p, (exe, _) in mine.items() if exe.startswith("/memfd:arbor-relay")]
    assert len(relays) == 1
    pythons = {p for p, (_, cmd) in mine.items() if b"exec(base64.b64decode(" in cmd and b"/bin/sh" not in cmd}
    # (The agent's sweeper, a fork of it, waits to remove its temp dirs.)
    agent = [p for p in pythons if ppid(p) not in pythons]
    assert len(agent) == 1

    big = os.urandom(3 * 256 * 1024 + 11)
    api.send({"op": "exec", "chain": CHAIN, "cmd": "cat", "stdin_size": len(big)}, big)
    res, blob = api.recv()
    assert res["rc"] == 0 and blob == big  # streamed both ways through the relay

    dest = tmp_path / "put.bin"
    api.send({"op": "put", "chain": CHAIN, "path": str(dest), "size": len(big)}, big)
    assert api.recv()[0] == {"size": len(big)}
    assert dest.read_bytes() == big
    api.send({"op": "fetch", "chain": CHAIN, "path": str(dest)})
    h, first = api.recv()
    parts = [first]
    while True:
        m, b = api.recv()
        if m.get("op") == "end":
            break
        parts.append(b)
    assert h["streamed"] and b"".join(parts) == big


def test_failures_name_the_host_and_the_hop(daemon):
    _, _, api = daemon
    api.send({"op": "exec", "chain": [CHAIN[0], {"name": "t9", "host": "t9", "python": "/no/python"}],
              "cmd": "true"})
    res, _ = api.recv()
    assert res["unreachable"] and "t9" in res["error"] and "via b1" in res["error"]
    assert "/no/python: not found" in res["error"]
    api.send({"op": "exec", "chain": [CHAIN[0], CHAIN[1], CHAIN[0]], "cmd": "true"})
    res, _ = api.recv()
    assert "via cycle: b1 -> t1 -> b1" in res["error"]
    # The healthy target is still served.
    api.send({"op": "exec", "chain": CHAIN, "cmd": "echo ok"})
    assert api.recv()[1] == b"ok\n"


def test_daemon_exit_leaves_no_process_and_no_run_dir(daemon):
    d, run_dir, api = daemon
    api.send({"op": "exec", "chain": CHAIN, "cmd": "true"})
    assert api.recv()[0]["rc"] == 0
    d.terminate()
    assert d.wait(timeout=10) == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [p for p, (exe, cmd) in procs().items()
                if exe.startswith("/memfd:arbor-relay") or b"exec(base64.b64decode(" in cmd]
        if not left:
            break
        time.sleep(0.05)
    assert not left
    assert not run_dir.exists()


PROBE = """
import sys
sys.path.insert(0, sys.argv[2])
from arbor_glue import wire
c = wire.Client(sys.argv[1])
try:
    c.send({"op": "ping"})
    print("answer" if c.recv() else "refused")
except (ConnectionResetError, BrokenPipeError):
    print("refused")
"""


def as_nobody(*args):
    # The system python: nobody cannot run an interpreter under /root.
    return subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           "/usr/bin/python3", "-c", PROBE, *args, str(REPO / "ansible-glue")],
                          capture_output=True, text=True)


def test_a_foreign_uid_is_refused(daemon, tmp_path):
    _, run_dir, api = daemon
    sock = str(run_dir / "sock")
    # The 0700 directory already stops another user at connect().
    res = as_nobody(sock)
    assert res.returncode != 0 and "Permission denied" in res.stderr, res.stderr
    # With the directory and socket opened up, the daemon itself refuses
    # the peer (SO_PEERCRED) and says so in its log.
    run_dir.chmod(0o755)
    (run_dir / "sock").chmod(0o777)
    res = as_nobody(sock)
    assert res.returncode == 0 and res.stdout.strip() == "refused", res.stdout + res.stderr
    assert "refused a connection from another user" in (tmp_path / "daemon.log").read_text()
    # Its own user is still served.
    api.send({"op": "ping"})
    assert api.recv()[0]["pid"] > 0


SLOW_SSH = ("#!/bin/sh\n# takes a second to connect to a target, then runs the remote command here\n"
            + SSH_G +
            "case \"$last\" in *arbor-stage0*) ;; *) echo \"$(date +%s.%N) start\" >> \"$SSH_LOG\"; sleep 1 ;; esac\n"
            "exec /bin/sh -c \"$last\"\n")


@pytest.mark.parametrize("bound", [2, 64])
def test_a_relay_connects_its_children_in_parallel_within_the_bound(tmp_path, bound):
    """Six targets behind one relay, each ssh taking a second to connect:
    with ARBOR_CONNECT_CONCURRENCY=2 at most two connect at once (three
    rounds); with the default bound all six connect together."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(SLOW_SSH)
    (bindir / "ssh").chmod(0o755)
    log = tmp_path / "ssh.log"
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SSH_LOG=str(log),
               ARBOR_CONNECT_CONCURRENCY=str(bound))
    d = subprocess.Popen([str(ARBOR), "daemon", "--run-dir", str(run_dir), "--parent-pid", str(os.getpid())],
                         env=env, stderr=open(tmp_path / "daemon.log", "wb"))
    try:
        for _ in range(200):
            if (run_dir / "sock").exists():
                break
            time.sleep(0.02)
        # The relay first, so only the targets' connects are timed.
        api = Api(run_dir / "sock")
        api.send({"op": "exec", "chain": [CHAIN[0]] + [dict(CHAIN[1], name="t0", host="t0")], "cmd": "true"})
        assert api.recv()[0]["rc"] == 0
        t0 = time.monotonic()
        apis = []
        for i in range(1, 7):
            a = Api(run_dir / "sock")
            a.send({"op": "exec", "chain": [CHAIN[0], dict(CHAIN[1], name=f"t{i}", host=f"t{i}")],
                    "cmd": "echo t%d" % i})
            apis.append(a)
        for i, a in enumerate(apis, 1):
            assert a.recv()[1] == b"t%d\n" % i
        took = time.monotonic() - t0
    finally:
        d.kill()
        d.wait()
    starts = sorted(float(line.split()[0]) for line in log.read_text().splitlines())[1:]
    assert len(starts) == 6
    # At most `bound` ssh connections were under way at any moment.
    most = max(sum(1 for s in starts if t <= s < t + 0.95) for t in starts)
    if bound == 2:
        assert most == 2 and took >= 2.9, (most, took, starts)
    else:
        assert most == 6 and took < 2.5, (most, took, starts)
