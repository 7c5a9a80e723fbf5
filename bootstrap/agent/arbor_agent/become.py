"""Nested agents under another account: the become plugin's command run
around the agent's own start command with a pty as controlling terminal,
its prompts relayed, then its frames routed through this agent."""

import fcntl
import os
import pty
import pwd
import select
import signal
import struct
import subprocess
import termios
import time

from .wire import (AGENT_MARKER, CONTROLLER, DATA, READ_BYTES, ROUTE_ADD, ROUTE_DEL, WireError,
                   decode, encode, msg, write_all)
from .bounds import BECOME_OUTPUT_MAX, BECOME_TIMEOUT_S_MAX, CHILDREN_MAX


def login_shell():
    """The account's shell, which runs commands as sshd would run them; for
    an account without one (nologin, false: a nested agent under a system
    account), /bin/sh, as Ansible's become command uses."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    if not shell or os.path.basename(shell) in ("nologin", "false") or not os.access(shell, os.X_OK):
        return "/bin/sh"
    return shell


class BecomeFailed(Exception):
    pass


def _take_tty():
    """In a become command's child, after setsid: its stderr (a pty) becomes
    its controlling terminal, where sudo, su and doas ask for passwords."""
    fcntl.ioctl(2, termios.TIOCSCTTY, 0)


class Child(object):
    """A nested agent started by this one under another account (become).
    Frames addressed to it are queued to its stdin; frames it writes are
    checked (it speaks only for itself) and passed up. Its pty, its
    controlling terminal, is drained to this agent's stderr."""

    def __init__(self, node, proc, tty):
        self.node = node
        self.proc = proc
        self.inp = proc.stdin.fileno()
        self.out = proc.stdout.fileno()
        self.tty = tty
        self.buf = bytearray()
        self.queue = bytearray()
        self.up = False

    def fds(self):
        return [fd for fd in (self.inp, self.out, self.tty) if fd is not None]

    def close_input(self):
        """EOF on its link: the nested agent exits."""
        if self.inp is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.inp = None
        self.queue = bytearray()

    def close(self):
        self.close_input()
        if self.out is not None:
            self.proc.stdout.close()
            self.out = None
        if self.tty is not None:
            os.close(self.tty)
            self.tty = None

    def reap(self, wait_s):
        """Waits for it to exit; True if it did."""
        try:
            self.proc.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass  # it may run as another user; EOF ends it anyway
            return False


class Become(object):
    """Agent methods: become."""

    def child_flush(self, c):
        try:
            n = os.write(c.inp, c.queue[:4 * READ_BYTES])
        except BlockingIOError:
            return
        except OSError:
            self.child_gone(c, "its link closed")
            return
        del c.queue[:n]

    def child_tty(self, c):
        try:
            data = os.read(c.tty, READ_BYTES)
        except OSError:
            data = b""
        if not data:
            os.close(c.tty)
            c.tty = None
            return
        text = data.decode("utf-8", "replace").strip()
        if text:
            self.log("n%d's terminal: %s" % (c.node, text))

    def child_output(self, c):
        try:
            chunk = os.read(c.out, READ_BYTES)
        except OSError:
            chunk = b""
        if not chunk:
            self.child_gone(c, "its interpreter exited")
            return
        c.buf.extend(chunk)
        while True:
            try:
                frame, used = decode(c.buf)
            except WireError as e:
                self.child_gone(c, "malformed frame: %s" % e)
                return
            if frame is None:
                return
            del c.buf[:used]
            kind, _, dst, src, stream, payload = frame
            if src != c.node or kind == ROUTE_DEL:
                self.child_gone(c, "it spoke for node %d" % src)
                return
            if kind == ROUTE_ADD:
                c.up = True
            if dst != self.node:
                self.write_link(encode(kind, dst, src, stream, payload))

    def child_gone(self, c, why):
        """A nested agent left: its route is withdrawn up the tree."""
        if self.children.get(c.node) is not c:
            return
        del self.children[c.node]
        self.log("nested interpreter n%d (pid %d) left: %s" % (c.node, c.proc.pid, why))
        c.close()
        self.leaving.append(c)
        self.write_link(encode(ROUTE_DEL, CONTROLLER, c.node, 0, why.encode()))
        self.leaving = [x for x in self.leaving if x.proc.poll() is None]

    def become(self, src, stream, req):
        """Starts a nested agent through a become command (see the header)."""
        node = int(req["node"])
        payload = self.payload
        if payload is None:
            raise BecomeFailed("this agent has no copy of its own code")
        if node in self.children or node in (self.node, CONTROLLER):
            raise BecomeFailed("node %d is taken" % node)
        if len(self.children) >= CHILDREN_MAX:
            raise BecomeFailed("more than %d nested interpreters" % CHILDREN_MAX)
        success = req["success"].encode()
        timeout = min(float(req.get("timeout_s") or 30), BECOME_TIMEOUT_S_MAX)
        master, slave = pty.openpty()
        try:
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            proc = self.popen([self.shell, "-c", req["cmd"]], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=slave, close_fds=True,
                              start_new_session=True, preexec_fn=_take_tty)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        c = Child(node, proc, master)
        seen = bytearray()  # output so far, for the error message
        out = bytearray()  # stdout until the success marker
        deadline = time.monotonic() + timeout
        try:
            while True:
                new = bytearray()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BecomeFailed("no become prompt or success within %ds" % timeout)
                r, _ = self.wait_io([c.out, c.tty], [], left)
                if c.tty in r:
                    try:
                        new += os.read(c.tty, READ_BYTES)
                    except OSError:
                        pass
                if c.out in r:
                    chunk = os.read(c.out, READ_BYTES)
                    if not chunk:
                        seen += new
                        status = proc.wait()
                        # What it said last, on its terminal.
                        while select.select([c.tty], [], [], 0.05)[0]:
                            try:
                                last = os.read(c.tty, READ_BYTES)
                            except OSError:
                                break
                            if not last:
                                break
                            seen += last
                        raise BecomeFailed("the become command exited with status %s" % status)
                    out += chunk
                    i = out.find(success)
                    if i >= 0 and out.find(b"\n", i) >= 0:
                        new += out[:i]
                        c.buf += out[out.find(b"\n", i) + 1:]
                        break
                    if i < 0:
                        keep = len(success)
                        new += out[:-keep] if len(out) > keep else b""
                        del out[:max(0, len(out) - keep)]
                if new:
                    seen += new
                    del seen[:max(0, len(seen) - BECOME_OUTPUT_MAX)]
                    self.send(DATA, src, stream,
                              msg({"output": new.decode("utf-8", "replace")}))
                for obj in self.stream_messages(src, stream):
                    if "abort" in obj:
                        raise BecomeFailed(str(obj["abort"]))
                    if "password" in obj:
                        line = obj["password"].encode("utf-8") + b"\n"
                        write_all(c.tty, line)
                        write_all(c.inp, line)
            # Nothing typed may stay for a later reader of the terminal.
            termios.tcflush(c.tty, termios.TCIOFLUSH)
            os.set_blocking(c.inp, False)
            c.queue += AGENT_MARKER + struct.pack("<II", node, len(payload)) + payload
            self.children[node] = c
            while not c.up:
                left = deadline - time.monotonic()
                if self.children.get(node) is not c:
                    raise BecomeFailed("the nested interpreter exited before it started")
                if left <= 0:
                    raise BecomeFailed("the nested interpreter did not start within %ds"
                                       % timeout)
                self.wait_io([], [], left)
        except BaseException as e:
            self.children.pop(node, None)
            c.close()
            c.reap(1.0)
            if isinstance(e, BecomeFailed):
                text = seen.decode("utf-8", "replace").strip()
                raise BecomeFailed("%s%s" % (e, "; output: %s" % text if text else ""))
            raise
        self.log("nested interpreter n%d started (pid %d)" % (node, proc.pid))
        return {"node": node, "pid": proc.pid}
