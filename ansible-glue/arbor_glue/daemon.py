"""This run's arbor daemon, as the glue finds or starts it: one per
`ansible-playbook` run, in a private run dir (`$TMPDIR/arbor-UID/PID`)
that it removes when the run ends. Dirs of runs killed outright are swept
by the next run."""

import fcntl
import multiprocessing
import os
import shutil
import socket
import stat
import subprocess
import time

from ansible.errors import AnsibleConnectionFailure

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


def run_dir():
    return os.path.join(os.environ.get("TMPDIR", "/tmp"), "arbor-%d" % os.getuid(), str(run_pid()))


def sweep_stale_runs(base, mine):
    """Removes the run dirs of runs that were killed outright (SIGKILL, a
    reboot): no process of that PID and nothing listening on its socket.
    A live run's dir is never touched; a reused PID keeps its dir."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if not name.isdigit() or name == mine:
            continue
        try:
            os.kill(int(name), 0)
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


def connect_daemon(client):
    """Connects to this run's daemon (`client(socket path)`), starting it if
    it is not up yet."""
    mine = run_dir()
    base = os.path.dirname(mine)
    private_dir(base)
    sock = os.path.join(mine, "sock")
    try:
        return client(sock)
    except OSError:
        pass
    sweep_stale_runs(base, os.path.basename(mine))
    private_dir(mine)
    with open(os.path.join(mine, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return client(sock)
        except OSError:
            pass
        binary = arbor_bin()
        # ARBOR_LOG_FILE keeps the daemon's log past the run (the run dir
        # goes with it); private to the user either way.
        log_path = os.environ.get("ARBOR_LOG_FILE") or os.path.join(mine, "daemon.log")
        try:
            log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        except OSError as e:
            raise AnsibleConnectionFailure("arbor: cannot open the daemon's log %s: %s" % (log_path, e))
        try:
            proc = subprocess.Popen([binary, "daemon", "--run-dir", mine,
                                     "--parent-pid", str(run_pid())],
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
