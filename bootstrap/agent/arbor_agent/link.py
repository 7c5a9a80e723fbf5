"""The agent's link: frames in and out on its two fds, its loop over the
link, jobs, pipes and children, and requests dispatched and answered."""

import os
import pwd
import select
import signal
import subprocess
import sys
import time

from .wire import (CHUNK_BYTES, CONTROLLER, CREDIT, DATA, END, LinkGone, PING, PONG, READ_BYTES, REPLY,
                   REQUEST, ROUTE_ADD, WireError, decode, encode, msg, split_msg, write_all)
from .bounds import CHILD_QUEUE_BYTES_MAX, PENDING_BYTES_MAX, PIPE_EXIT_WAIT_S


class Link(object):
    """Agent methods: link."""

    def send(self, kind, dst, stream, payload=b""):
        self.write_link(encode(kind, dst, self.node, stream, payload))

    def write_link(self, data):
        """Writes to the link. Once the daemon has set a keepalive, the link
        is non-blocking and a write that makes no progress for that long
        means the link is dead (the agent then ends, as at EOF)."""
        if self.keepalive is None:
            write_all(self.wfd, data)
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                n = 0
            if n:
                view = view[n:]
                self.heard = time.monotonic()  # it took our bytes: the link moves
                continue
            left = self.heard + self.keepalive - time.monotonic()
            if left <= 0:
                self.log("the link took nothing for %.0f s; exiting" % self.keepalive)
                raise LinkGone()
            try:
                select.select([], [self.wfd], [], left)
            except InterruptedError:
                pass

    def log(self, message):
        """To stderr, and to the controller with the next reply (-vvv)."""
        line = "n%d: %s" % (self.node, message)
        self.logs.append(line[:1000])
        try:
            self.stderr.write("arbor agent %s\n" % line)
            self.stderr.flush()
        except Exception:
            pass

    def reply(self, src, stream, obj, blob=b""):
        """Replies; a blob over one chunk is streamed after the reply."""
        if self.logs:
            obj = dict(obj, log=list(self.logs))
            self.logs.clear()
        if len(blob) <= CHUNK_BYTES:
            self.send(REPLY, src, stream, msg(obj, blob))
            return
        obj = dict(obj, streamed=True)
        self.send(REPLY, src, stream, msg(obj, blob[:CHUNK_BYTES]))
        for i in range(CHUNK_BYTES, len(blob), CHUNK_BYTES):
            self.send(DATA, src, stream, blob[i:i + CHUNK_BYTES])
        self.send(END, src, stream, b"")

    def hello(self):
        info = {"pid": os.getpid(), "python": sys.version.split()[0],
                "uid": os.getuid(), "executable": sys.executable, "sweeper": self.sweeper_pid,
                "ppid": os.getppid()}
        try:
            pw = pwd.getpwuid(os.getuid())
            info.update(user=pw.pw_name, home=pw.pw_dir)
        except KeyError:
            pass
        self.send(ROUTE_ADD, CONTROLLER, 0, msg(info))

    def run(self):
        self.hello()
        try:
            while True:
                while self.inbox:
                    frame = self.inbox.popleft()
                    self.inbox_bytes -= len(frame[5])
                    self.dispatch(frame)
                self.wait_io()
        except LinkGone:
            return 0

    def wait_io(self, readers=(), writers=(), timeout=None):
        """Waits for the link, the nested agents and `readers`/`writers`;
        handles the link (frames for this agent go to the inbox, frames for
        a nested agent to its queue) and the nested agents. Returns the
        ready fds of `readers` and `writers`. Raises LinkGone at EOF."""
        watch = list(readers)
        wlist = list(writers)
        full = self.inbox_bytes >= PENDING_BYTES_MAX
        for c in self.children.values():
            if c.out is not None:
                watch.append(c.out)
            if c.tty is not None:
                watch.append(c.tty)
            if c.queue and c.inp is not None:
                wlist.append(c.inp)
            full = full or len(c.queue) >= CHILD_QUEUE_BYTES_MAX
        for j in self.jobs:
            watch.extend(j.readers)
            if j.writer() is not None:
                wlist.append(j.writer())
        watch.extend(self.forwards.readers())
        wlist.extend(self.forwards.writers())
        for pipe in self.pipes.values():
            watch.extend(pipe.outs)
            if pipe.writer() is not None:
                wlist.append(pipe.writer())
            full = full or len(pipe.inq) >= CHILD_QUEUE_BYTES_MAX
        if not full:
            watch.append(self.rfd)
            if self.keepalive is not None:
                left = self.heard + self.keepalive - time.monotonic()
                if left <= 0 and not select.select([self.rfd], [], [], 0)[0]:
                    # (Frames waiting unread mean we were busy, not it.)
                    self.log("nothing from the link for %.0f s; exiting" % self.keepalive)
                    raise LinkGone()
                left = max(left, 0.05)
                timeout = left if timeout is None else min(timeout, left)
        else:
            self.heard = time.monotonic()  # not reading: the silence is ours
        try:
            r, w, _ = select.select(watch, wlist, [], timeout)
        except InterruptedError:
            return [], []
        if self.jobs:
            self.service_jobs(r, w)
        if self.pipes:
            self.service_pipes(r, w)
        if self.forwards.listeners:
            self.forwards.service(r, w)
        for c in list(self.children.values()):
            if c.inp is not None and c.inp in w:
                self.child_flush(c)
            if c.tty is not None and c.tty in r:
                self.child_tty(c)
            if c.out is not None and c.out in r:
                self.child_output(c)
        if self.rfd in r:
            self.take_input()
        return [fd for fd in r if fd in readers], [fd for fd in w if fd in writers]

    def service_jobs(self, r, w):
        for j in list(self.jobs):
            for fd in list(j.readers):
                if fd in r:
                    j.on_read(fd)
            if j.writer() is not None and j.writer() in w:
                j.on_write()
            if j.done():
                self.jobs.remove(j)
                try:
                    j.finish([b"".join(j.outs[fd]) for fd in j.order])
                except (WireError, LinkGone):
                    raise
                except Exception as e:
                    self.log("finishing a command: %s: %s" % (type(e).__name__, e))

    def service_pipes(self, r, w):
        for pipe in list(self.pipes.values()):
            if pipe.wfd is not None and pipe.wfd in w:
                pipe.on_write()
            for fd in list(pipe.outs):
                if fd not in r:
                    continue
                got = pipe.on_read(fd)
                if got and got[1]:
                    self.send(DATA, pipe.src, pipe.stream, msg({"fd": got[0]}, got[1]))
            if not pipe.outs:
                # Its outputs are closed: it has exited, or will at once.
                pipe.eof = True
                pipe.writer()
                try:
                    rc = pipe.proc.wait(timeout=PIPE_EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    # Its outputs are closed but it lingers: ended, so the
                    # agent is not held.
                    try:
                        os.killpg(pipe.proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    rc = pipe.proc.wait()
                del self.pipes[pipe.stream]
                self.send(DATA, pipe.src, pipe.stream, msg({"rc": rc}))
                self.send(END, pipe.src, pipe.stream, b"")

    def take_input(self):
        try:
            chunk = os.read(self.rfd, READ_BYTES)
        except InterruptedError:
            return
        if not chunk:
            raise LinkGone()
        self.heard = time.monotonic()
        self.buf.extend(chunk)
        while True:
            frame, used = decode(self.buf)
            if frame is None:
                return
            del self.buf[:used]
            dst = frame[2]
            if dst == self.node:
                self.inbox.append(frame)
                self.inbox_bytes += len(frame[5])
                continue
            c = self.children.get(dst)
            if c is not None and c.inp is not None:
                kind, _, dst, src, stream, payload = frame
                c.queue.extend(encode(kind, dst, src, stream, payload))

    def dispatch(self, frame):
        kind, _, dst, src, stream, payload = frame
        if dst != self.node:
            return
        if kind == PING:
            self.send(PONG, src, stream, payload)
        elif kind == REQUEST:
            self.request(src, stream, payload)
        elif kind in (DATA, END):
            self.stream_part(kind, src, stream, payload)
        elif kind == CREDIT:
            self.forwards.credit(src, stream, payload)

    def request(self, src, stream, payload):
        try:
            req, blob = split_msg(payload)
        except WireError as e:
            # A whole frame with a bad message: answered, the link stays.
            self.reply(src, stream, {"error": "malformed request: %s" % e})
            return
        if req.get("streamed") and (req.get("op") != "put" or "zip_key" in req):
            self.bodies[stream] = (src, req, [blob], len(blob))
            return
        self.handle(src, stream, req, blob)

    def answer(self, src, stream, req, obj, blob=b""):
        if not req.get("noreply"):
            self.reply(src, stream, obj, blob)

    def fail(self, src, stream, req, message):
        """An error: the answer, or for a request sent without waiting, the
        answer to the next one (rmtree: only logged, as Ansible only warns)."""
        if not req.get("noreply"):
            self.reply(src, stream, {"error": message})
            return
        what = "%s %s" % (req.get("op"), req.get("path") or req.get("name") or "")
        message = "an earlier request (%s) failed: %s" % (what.strip(), message)
        if req.get("op") == "rmtree":
            self.log(message)
        else:
            errors = self.deferred.setdefault(req.get("lane"), [])
            if len(errors) < 16 and len(self.deferred) <= 1024:
                errors.append(message)
