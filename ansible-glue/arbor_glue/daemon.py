"""This run's arbor daemon, as the glue finds or starts it: one per
`ansible-playbook` run, in a private run dir (`$TMPDIR/arbor-UID/PID`)
that it removes when the run ends. Dirs of runs killed outright are swept
by the next run.

With `arbor_persist` (ARBOR_PERSIST), the daemon and its tree outlive the
run: it serves every run of this user with the same arbor binary and the
same settings (`$TMPDIR/arbor-UID/persist-DIGEST`), and ends once no run
has used it for that long."""

import fcntl
import hashlib
import multiprocessing
import os
import re
import shutil
import socket
import stat
import subprocess
import time

from ansible.errors import AnsibleConnectionFailure

from arbor_glue import wire

# How long a daemon may take to answer on its socket once started.
DAEMON_START_S = 15.0


def arbor_bin():
    """The `arbor` that goes with this glue: $ARBOR_BIN; else the wheel's,
    <prefix>/bin/arbor beside <prefix>/share/arbor/ansible-glue; else a
    checkout's release build; else `arbor` on PATH."""
    env = os.environ.get("ARBOR_BIN")
    if env:
        return env
    glue = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    above = os.path.dirname(glue)
    if os.path.basename(above) == "arbor" and os.path.basename(os.path.dirname(above)) == "share":
        own = os.path.join(os.path.dirname(os.path.dirname(above)), "bin", "arbor")
    else:
        own = os.path.join(above, "target", "release", "arbor")
    if os.access(own, os.X_OK):
        return own
    return shutil.which("arbor") or own


def run_pid():
    """The ansible-playbook process this worker serves."""
    if multiprocessing.current_process().name == "MainProcess":
        return os.getpid()
    return os.getppid()


def private_dir(path):
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise AnsibleConnectionFailure("arbor: %s is not a private directory of this user" % path)


def persist_secs(value):
    """`arbor_persist` in seconds: `90s`, `10m`, `1h`, `2d` or seconds; 0 for
    an empty value, 0, no or off."""
    text = ("%s" % (value if value is not None else "")).strip().lower()
    if text in ("", "0", "no", "off", "false"):
        return 0
    m = re.match(r"^(\d+)\s*([smhd]?)$", text)
    if m is None:
        raise AnsibleConnectionFailure("arbor: ARBOR_PERSIST (arbor_persist) must be a duration such as"
                                       " 90s, 10m or 1h, not %r" % value)
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# ARBOR_* settings that do not change what a daemon does: its idle time
# (that of its start holds), its log file, and `arbor ssh`'s own.
NOT_THE_DAEMONS = ("ARBOR_PERSIST", "ARBOR_LOG_FILE", "ARBOR_PYTHON", "ARBOR_SHELL_FD")


def _settings_digest():
    """What a persistent daemon was started with: the arbor binary (path,
    size, mtime), the ARBOR_* settings, the home and the user's ssh-agent.
    A run with other settings gets a daemon of its own."""
    binary = arbor_bin()
    try:
        st = os.stat(binary)
        ident = "%s %d %d" % (os.path.realpath(binary), st.st_size, st.st_mtime_ns)
    except OSError:
        ident = binary
    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith("ARBOR_") and k not in NOT_THE_DAEMONS)
    env += [("HOME", os.environ.get("HOME", "")), ("SSH_AUTH_SOCK", os.environ.get("SSH_AUTH_SOCK", ""))]
    return hashlib.sha256(repr((ident, env)).encode()).hexdigest()[:16]


def run_dir(persist=0):
    """The daemon's private dir: this run's, or the persistent one's."""
    base = os.path.join(os.environ.get("TMPDIR", "/tmp"), "arbor-%d" % os.getuid())
    if persist:
        return os.path.join(base, "persist-" + _settings_digest())
    return os.path.join(base, str(run_pid()))


def sweep_stale_runs(base, mine):
    """Removes the run dirs of runs that were killed outright (SIGKILL, a
    reboot), and those of persistent daemons killed while they ended: no
    process of that PID and nothing listening on its socket. A live run's
    dir is never touched; a reused PID keeps its dir."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        # A run's dir is its PID; a persistent daemon's, while it ends,
        # `ending-PID`.
        pid = name[len("ending-"):] if name.startswith("ending-") else name
        if not pid.isdigit() or name == mine:
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path = os.path.join(base, name)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.path.join(path, "sock"))
            continue
        except OSError:
            pass
        finally:
            probe.close()
        shutil.rmtree(path, ignore_errors=True)


# How long a persistent daemon that is ending may take to remove its socket.
ENDING_S = 5.0


def _connect(client, sock, persist):
    """A connection to the daemon on `sock`, or None if none is up. A
    persistent daemon must answer a ping: one that was ending when this
    connected (its idle time over) is waited for, and None says to start
    another."""
    try:
        c = client(sock)
    except OSError:
        return None
    if not persist:
        return c
    try:
        wire.send(c.sock, {"op": "ping"})
        if wire.recv(c.sock) is not None:
            return c
    except OSError:
        pass
    c.close()
    deadline = time.monotonic() + ENDING_S
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.02)
    return None


def connect_daemon(client, persist=0):
    """Connects to this run's daemon (`client(socket path)`), or with
    `persist` seconds to the user's persistent one, starting it if it is
    not up yet."""
    mine = run_dir(persist)
    base = os.path.dirname(mine)
    private_dir(base)
    sock = os.path.join(mine, "sock")
    c = _connect(client, sock, persist)
    if c is not None:
        return c
    sweep_stale_runs(base, os.path.basename(mine))
    private_dir(mine)
    with open(os.path.join(mine, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        c = _connect(client, sock, persist)
        if c is not None:
            return c
        binary = arbor_bin()
        # ARBOR_LOG_FILE keeps the daemon's log past the run (the run dir
        # goes with it); private to the user either way.
        log_path = os.environ.get("ARBOR_LOG_FILE") or os.path.join(mine, "daemon.log")
        try:
            log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        except OSError as e:
            raise AnsibleConnectionFailure("arbor: cannot open the daemon's log %s: %s" % (log_path, e))
        try:
            life = ["--idle-secs", str(persist)] if persist else ["--parent-pid", str(run_pid())]
            proc = subprocess.Popen([binary, "daemon", "--run-dir", mine] + life,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log, start_new_session=True, close_fds=True)
        except OSError as e:
            raise AnsibleConnectionFailure("arbor: cannot start %s: %s" % (binary, e))
        finally:
            log.close()
        deadline = time.monotonic() + DAEMON_START_S
        while True:
            try:
                return client(sock)
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AnsibleConnectionFailure("arbor: the controller daemon did not start (exit %s); "
                                                   "see %s" % (proc.poll(), log_path))
                time.sleep(0.01)
