"""Streams: files put and fetched in parts, and the temp dirs of tasks."""

import os

from .wire import (CHUNK_BYTES, CREDIT, CREDIT_ALL, CREDIT_PAYLOAD, DATA, END, REPLY, WireError, msg,
                   split_msg)
from .bounds import BODY_BYTES_MAX
from .files import Put, sweep


class Transfer(object):
    """Agent methods: transfer."""

    def mkdtemp(self, req):
        """A task's temp dir, named as Ansible names it, where Ansible puts
        it (`remote_tmp/ansible-tmp-...`), made as Ansible's shell command
        makes it (umask 077); the sweeper removes it if the agent dies."""
        base, name = req["base"], req["name"]
        if not name or "/" in name or name in (".", ".."):
            raise ValueError("bad temp dir name %r" % (name,))
        umask = os.umask(0o077)
        try:
            os.makedirs(base, exist_ok=True)
            path = os.path.join(base, name)
            os.mkdir(path, 0o700)
        finally:
            os.umask(umask)
        self.track_tmp(path)
        return path

    def track_tmp(self, path):
        """`path` is removed when this agent ends, even by kill -9."""
        path = os.path.normpath(path)
        self.tmpdirs.add(path)
        sweep(self.sweeper, "+", path)

    def untrack_tmp(self, path):
        path = os.path.normpath(path)
        if path in self.tmpdirs:
            self.tmpdirs.discard(path)
            sweep(self.sweeper, "-", path)

    def stream_messages(self, src, stream):
        """JSON of the Data frames for (src, stream) in the inbox, taken out."""
        found = []
        for frame in list(self.inbox):
            kind, _, _, fsrc, fstream, payload = frame
            if kind == DATA and (fsrc, fstream) == (src, stream):
                self.inbox.remove(frame)
                self.inbox_bytes -= len(payload)
                try:
                    found.append(split_msg(payload)[0])
                except WireError:
                    pass
        return found

    def put_start(self, src, stream, req, blob):
        size = int(req["size"])
        # A module's script or copy's source in a task's temp dir: no fsync.
        durable = os.path.normpath(os.path.dirname(req["path"])) not in self.tmpdirs
        try:
            p = Put(req["path"], size, req.get("mode"), durable)
        except Exception:
            self.drop_stream(src, stream, req)
            raise
        p.req = req
        try:
            p.write(blob)
        except Exception:
            p.abort()
            self.drop_stream(src, stream, req)
            raise
        if p.done == size and not req.get("streamed"):
            self.put_finish(src, stream, p)
        else:
            old = self.puts.pop(stream, None)
            if old:
                old.abort()
            self.puts[stream] = (src, p)

    def put_finish(self, src, stream, p):
        try:
            p.finish()
        except Exception:
            p.abort()
            raise
        self.answer(src, stream, p.req, {"size": p.size})

    def stream_part(self, kind, src, stream, payload):
        if self.forwards.part(kind, src, stream, payload):
            return
        pipe = self.pipes.get(stream)
        if pipe is not None and pipe.src == src:
            if kind == DATA:
                if not pipe.eof:
                    pipe.inq += payload
            else:
                pipe.eof = True
            return
        body = self.bodies.get(stream)
        if body is not None and body[0] == src:
            _, req, parts, size = body
            if kind == DATA:
                size += len(payload)
                if size > BODY_BYTES_MAX:
                    del self.bodies[stream]
                    self.reply(src, stream, {"error": "request body over %d bytes" % BODY_BYTES_MAX})
                    return
                parts.append(payload)
                self.bodies[stream] = (src, req, parts, size)
            else:
                del self.bodies[stream]
                self.handle(src, stream, req, b"".join(parts))
            return
        entry = self.puts.get(stream)
        if entry is None or entry[0] != src:
            return
        p = entry[1]
        try:
            if kind == DATA:
                p.write(payload)
                # Paces the sender: it keeps at most a window in flight.
                self.send(CREDIT, src, stream, CREDIT_PAYLOAD.pack(p.done))
                return
            del self.puts[stream]
            self.put_finish(src, stream, p)
        except Exception as e:
            self.puts.pop(stream, None)
            p.abort()
            if kind == DATA:
                self.drop_stream(src, stream, p.req)
            self.fail(src, stream, p.req, "%s: %s" % (type(e).__name__, e))

    def drop_stream(self, src, stream, req):
        """Tells a paced sender to stop: the rest of the stream is dropped."""
        if req.get("streamed"):
            self.send(CREDIT, src, stream, CREDIT_PAYLOAD.pack(CREDIT_ALL))

    def fetch(self, src, stream, req):
        path = req["path"]
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(CHUNK_BYTES)
            if len(first) < CHUNK_BYTES:
                self.reply(src, stream, {"size": len(first)}, first)
                return
            # Streamed from the file, never whole in memory.
            self.send(REPLY, src, stream, msg({"size": size, "streamed": True}, first))
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                self.send(DATA, src, stream, chunk)
            self.send(END, src, stream, b"")
