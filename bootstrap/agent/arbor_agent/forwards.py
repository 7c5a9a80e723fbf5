"""Forwards (arbor_forward): the agent listens on its host's loopback, or on
a private UNIX socket, for the daemon (`listen`); each connection accepted
is told on the listener's stream (`{"accepted": id}`) and bound by the
daemon to a stream of its own (`fwd_conn`) whose data flows both ways:
what arrives is written to the socket, credited back as it is, so the
daemon keeps at most its window in flight; what the socket sends goes out
as it comes, up to FORWARD_WINDOW_BYTES beyond what the daemon credited. The listener closes when the daemon hangs up on it (its run,
task or client went), or when a new listen takes its address."""

import ipaddress
import os
import socket
import stat

from .bounds import FORWARD_CONNS_MAX, FORWARD_WINDOW_BYTES, FORWARDS_MAX
from .wire import CREDIT, CREDIT_PAYLOAD, DATA, END, READ_BYTES, REPLY, msg


def listen_socket(spec):
    """A listening socket for `spec`: `PATH` (a UNIX socket, created 0600;
    it must not exist), `PORT` or `HOST:PORT` with a loopback HOST."""
    spec = str(spec)
    if spec.startswith("/"):
        if os.path.lexists(spec):
            raise OSError("%s exists already" % spec)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(spec)
        finally:
            os.umask(old)
        return s, spec
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        raise OSError("a forward listens on the loopback only, not on %s" % host)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    return s, "%s:%s" % (host, s.getsockname()[1])


class Conn(object):
    def __init__(self, sock):
        self.sock = sock
        self.stream = None  # the daemon's stream, once bound
        self.outq = bytearray()  # from the daemon, to write to the socket
        self.written = 0
        self.in_done = False  # the daemon's side ended
        self.out_done = False  # the socket's side ended
        self.shut = False  # its writing side is shut (after in_done)
        self.sent = 0  # read from the socket and sent to the daemon
        self.credited = 0  # of which the daemon has written out


class Listener(object):
    def __init__(self, src, stream, sock, where):
        self.src = src
        self.stream = stream
        self.sock = sock
        self.where = where
        self.conns = {}  # id -> Conn
        self.next_id = 1

    def close(self):
        for c in self.conns.values():
            c.sock.close()
        self.conns = {}
        self.sock.close()
        if self.where.startswith("/"):
            try:
                if stat.S_ISSOCK(os.lstat(self.where).st_mode):
                    os.unlink(self.where)
            except OSError:
                pass


class Forwards(object):
    """The agent's listeners (by the stream that asked) and their
    connections; `send(kind, dst, stream, payload)` is the link's."""

    def __init__(self, send):
        self.send = send
        self.listeners = {}  # stream -> Listener
        self.bound = {}  # the daemon's conn stream -> (Listener, Conn)

    def listen(self, src, stream, req):
        if len(self.listeners) >= FORWARDS_MAX:
            raise OSError("%d forwards are open already" % FORWARDS_MAX)
        spec = str(req["listen"])
        for old in list(self.listeners.values()):
            if old.where == spec or old.where.endswith(":" + spec):
                self.hangup(old.src, old.stream)  # the address is declared anew
        sock, where = listen_socket(spec)
        sock.listen(64)
        sock.setblocking(False)
        self.listeners[stream] = Listener(src, stream, sock, where)
        self.send(REPLY, src, stream, msg({"streamed": True, "listening": where}))

    def hangup(self, src, stream):
        lst = self.listeners.get(stream)
        if lst is None or lst.src != src:
            return False
        del self.listeners[stream]
        for c in lst.conns.values():
            self.bound.pop(c.stream, None)
        lst.close()
        self.send(END, src, stream, b"")
        return True

    def bind(self, src, stream, req):
        """`fwd_conn`: the daemon's stream for an accepted connection."""
        lst = self.listeners.get(req.get("listener"))
        c = lst.conns.get(req.get("conn")) if lst is not None and lst.src == src else None
        if c is None or c.stream is not None:
            self.send(REPLY, src, stream, msg({"error": "no such forwarded connection"}))
            return
        c.stream = stream
        self.bound[stream] = (lst, c)
        self.send(REPLY, src, stream, msg({"streamed": True}))

    def drop(self, req):
        """`fwd_close`: the daemon could not reach the other end."""
        lst = self.listeners.get(req.get("listener"))
        c = lst.conns.pop(req.get("conn"), None) if lst is not None else None
        if c is not None:
            c.sock.close()

    def part(self, kind, src, stream, payload):
        """A Data or End for a bound connection: True if it was one."""
        got = self.bound.get(stream)
        if got is None or got[0].src != src:
            return False
        c = got[1]
        if kind == DATA:
            c.outq += payload
        else:
            c.in_done = True
        return True

    def credit(self, src, stream, payload):
        """The daemon has written out this much of a connection's data."""
        got = self.bound.get(stream)
        if got is not None and got[0].src == src and len(payload) >= 8:
            got[1].credited = max(got[1].credited, CREDIT_PAYLOAD.unpack(payload[:8])[0])

    def fds(self):
        fds = []
        for lst in self.listeners.values():
            fds.append(lst.sock.fileno())
            fds.extend(c.sock.fileno() for c in lst.conns.values())
        return fds

    def readers(self):
        out = []
        for lst in self.listeners.values():
            out.append(lst.sock)
            out.extend(c.sock for c in lst.conns.values() if c.stream is not None and not c.out_done
                       and c.sent - c.credited < FORWARD_WINDOW_BYTES)
        return out

    def writers(self):
        return [c.sock for _, c in self.bound.values() if c.outq or (c.in_done and not c.shut)]

    def service(self, r, w):
        for lst in list(self.listeners.values()):
            if lst.sock in r:
                self._accept(lst)
            for cid, c in list(lst.conns.items()):
                if c.sock in w:
                    self._write(lst.src, c)
                if c.sock in r:
                    self._read(lst.src, c)
                if c.out_done and c.shut:
                    self._end(lst, cid, c)

    def _accept(self, lst):
        try:
            sock, _ = lst.sock.accept()
        except OSError:
            return
        if len(lst.conns) >= FORWARD_CONNS_MAX:
            sock.close()
            return
        sock.setblocking(False)
        cid = lst.next_id
        lst.next_id += 1
        lst.conns[cid] = Conn(sock)
        self.send(DATA, lst.src, lst.stream, msg({"accepted": cid}))

    def _write(self, src, c):
        if c.outq:
            try:
                n = c.sock.send(c.outq[:4 * READ_BYTES])
            except BlockingIOError:
                return
            except OSError:
                # The socket is gone both ways: the daemon's side ends too.
                c.outq = bytearray()
                c.in_done = c.shut = True
                self._read_end(src, c)
                return
            del c.outq[:n]
            c.written += n
            self.send(CREDIT, src, c.stream, CREDIT_PAYLOAD.pack(c.written))
        if not c.outq and c.in_done and not c.shut:
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            c.shut = True

    def _read(self, src, c):
        try:
            chunk = c.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            c.sent += len(chunk)
            self.send(DATA, src, c.stream, chunk)
        else:
            self._read_end(src, c)

    def _read_end(self, src, c):
        if not c.out_done:
            c.out_done = True
            self.send(END, src, c.stream, b"")

    def _end(self, lst, cid, c):
        del lst.conns[cid]
        self.bound.pop(c.stream, None)
        c.sock.close()

    def close(self):
        for lst in self.listeners.values():
            lst.close()
        self.listeners = {}
        self.bound = {}
