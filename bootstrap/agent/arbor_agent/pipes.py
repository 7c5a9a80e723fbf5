"""Piped commands (`pipe`): a command whose stdin and output stream both
ways while it runs, for rsync's remote shell and `arbor ssh`. With a pty
(`arbor ssh -t`, or a shell), the command runs in a new session on the
pty's slave side, its window the size the client's is, resized as the
client's is; stdout and stderr are then one stream, as over ssh."""

import fcntl
import os
import signal
import struct
import subprocess
import termios

from .wire import READ_BYTES


def _winsize(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


def _take_tty():
    """In the child: a new session, the pty its controlling terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pipe(object):
    """What arrives for its stream is written to its stdin (`inq`), what it
    prints goes out at once (`outs`: fd -> 1 or 2)."""

    def __init__(self, src, stream, proc, master=None):
        self.src = src
        self.stream = stream
        self.proc = proc
        self.master = master
        self.inq = bytearray()
        self.eof = False
        self.files = {}  # fd -> the file to close (not for a pty)
        if master is None:
            self.files = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
            self.outs = {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2}
            self.wfd = proc.stdin.fileno()
        else:
            self.outs = {master: 1}
            self.wfd = master
        os.set_blocking(self.wfd, False)

    @classmethod
    def start(cls, agent, src, stream, req):
        """Starts `req["cmd"]` with the account's shell; with `req["pty"]`
        ({rows, cols, term}) on a new pty, and with no command the shell
        itself, as a login shell (as sshd starts it)."""
        cmd = req.get("cmd") or ""
        shell = agent.shell
        argv = [shell, "-c", cmd] if cmd else ["-" + os.path.basename(shell)]
        pty_req = req.get("pty")
        if not pty_req:
            proc = agent.popen(argv, executable=shell, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
            return cls(src, stream, proc)
        master, slave = os.openpty()
        try:
            _winsize(slave, pty_req.get("rows") or 24, pty_req.get("cols") or 80)
            env = dict(agent.inproc.environ if agent.inproc is not None else os.environ)
            env["TERM"] = pty_req.get("term") or "dumb"
            home = env.get("HOME")
            cwd = home if home and os.path.isdir(home) else None
            proc = agent.popen(argv, executable=shell, stdin=slave, stdout=slave, stderr=slave,
                               env=env, cwd=cwd, preexec_fn=_take_tty)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return cls(src, stream, proc, master)

    def resize(self, rows, cols):
        if self.master is not None:
            _winsize(self.master, rows, cols)

    def fds(self):
        """The fds it holds open (closed in a forked module)."""
        fds = set(self.outs)
        if self.wfd is not None:
            fds.add(self.wfd)
        return sorted(fds)

    def writer(self):
        if self.wfd is None:
            return None
        if self.inq:
            return self.wfd
        if self.eof and self.master is None:
            # The end of its stdin; on a pty there is none to send.
            self.proc.stdin.close()
            self.proc.stdin = self.wfd = None
        return None

    def on_write(self):
        try:
            n = os.write(self.wfd, self.inq[:4 * READ_BYTES])
            del self.inq[:n]
        except BlockingIOError:
            pass
        except OSError:
            # It stopped reading (exited): what it did not read is dropped.
            self.inq = bytearray()
            self.eof = True

    def on_read(self, fd):
        """(1 or 2, bytes) read from `fd`, or None at its end (on a pty: EIO
        once every process on its slave side has gone)."""
        try:
            chunk = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return self.outs[fd], b""
        except OSError:
            chunk = b""
        if chunk:
            return self.outs[fd], chunk
        self._close_out(fd)
        return None

    def _close_out(self, fd):
        del self.outs[fd]
        if fd == self.master:
            os.close(fd)
            self.wfd = self.master = None
        else:
            self.files.pop(fd).close()

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        for fd in list(self.outs):
            self._close_out(fd)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None
        self.wfd = None
        self.proc.wait()
