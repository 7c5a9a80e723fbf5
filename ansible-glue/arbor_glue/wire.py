"""The daemon's local API, as the glue speaks it: each message is
[u32 length][u32 JSON length][JSON][blob], little-endian, on the run's UNIX
socket. Standard library only. The one implementation: the glue, rsync's
remote shell, the bench and the tests all speak through it."""

import json
import socket
import struct


def send(sock, obj, blob=b""):
    """Sends one message."""
    j = json.dumps(obj).encode()
    body = struct.pack("<I", len(j)) + j + blob
    sock.sendall(struct.pack("<I", len(body)) + body)


def exact(sock, n):
    """Exactly `n` bytes from `sock`, or None if it ends first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf.extend(chunk)
    return bytes(buf)


def recv(sock):
    """One message: (obj, blob), or None if the daemon closed the socket."""
    head = exact(sock, 4)
    if head is None:
        return None
    (n,) = struct.unpack("<I", head)
    body = exact(sock, n)
    if body is None:
        return None
    (jn,) = struct.unpack_from("<I", body)
    return json.loads(body[4:4 + jn]), body[4 + jn:]


class Client(object):
    """One connection to the daemon's socket."""

    def __init__(self, path):
        self.path = str(path)  # the daemon's socket, for other connections to it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except Exception:
            self.sock.close()
            raise

    def send(self, obj, blob=b""):
        send(self.sock, obj, blob)

    def recv(self):
        """(obj, blob), or None if the daemon closed the connection."""
        return recv(self.sock)

    def close(self):
        self.sock.close()
