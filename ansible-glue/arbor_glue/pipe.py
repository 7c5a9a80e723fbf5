"""A pipe through the tree, from this process's stdin and to its stdout
and stderr: rsync's remote shell (arbor_rsh.py) and `arbor ssh`. The
daemon runs the command on the host's agent (`pipe`); its stdin and output
stream both ways as it runs. With a pty, this terminal is raw while it
runs, and its window size follows this one's."""

import os
import select
import signal
import struct
import sys
import threading


def window(fd):
    """(rows, cols) of the terminal `fd`, or None."""
    try:
        import fcntl
        import termios
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return rows, cols
    except (OSError, ImportError):
        return None


class _Sender(object):
    """The connection's sending side, shared by the stdin feeder and the
    window-size handler."""

    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()

    def send(self, obj, blob=b""):
        with self.lock:
            self.client.send(obj, blob)


def _feed(sender, fd):
    try:
        while True:
            try:
                data = os.read(fd, 256 * 1024)
            except BlockingIOError:
                select.select([fd], [], [])
                continue
            if not data:
                break
            sender.send({"op": "data"}, data)
        sender.send({"op": "end"})
    except OSError:
        pass


def _write(fd, blob):
    view = memoryview(blob)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            # rsync may make its end of the pipe non-blocking.
            select.select([], [fd], [])


def run(client, req, name="arbor", tty=False):
    """Sends `req` (op pipe: its target and cmd) and streams until the
    command ends. With `tty`, asks for a pty the size of stdin's terminal.
    Returns the command's exit status (255 if the tree failed, or the
    command was killed by a signal, as ssh does)."""
    sender = _Sender(client)
    if tty:
        rows, cols = window(0) or (24, 80)
        req = dict(req, pty={"rows": rows, "cols": cols, "term": os.environ.get("TERM") or "dumb"})
    restore = None
    if tty and os.isatty(0):
        import termios
        import tty as ttymod
        saved = termios.tcgetattr(0)
        ttymod.setraw(0)
        restore = lambda: termios.tcsetattr(0, termios.TCSADRAIN, saved)  # noqa: E731

        def resized(signum, frame):
            size = window(0)
            if size:
                sender.send({"op": "resize", "rows": size[0], "cols": size[1]})
        signal.signal(signal.SIGWINCH, resized)
    try:
        sender.send(req)
        threading.Thread(target=_feed, args=(sender, 0), daemon=True).start()
        while True:
            got = client.recv()
            if got is None:
                sys.stderr.write("%s: the controller daemon closed the connection\n" % name)
                return 255
            obj, blob = got
            if "error" in obj:
                sys.stderr.write("%s: %s\n" % (name, obj["error"]))
                return 255
            if obj.get("op") == "exit":
                rc = int(obj.get("rc") or 0)
                return rc & 0xFF if rc >= 0 else 255
            _write(2 if obj.get("fd") == 2 else 1, blob)
    finally:
        if restore is not None:
            signal.signal(signal.SIGWINCH, signal.SIG_DFL)
            restore()


