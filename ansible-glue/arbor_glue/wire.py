"""The daemon's local API, as the glue speaks it: each message is
[u32 length][u32 JSON length][JSON][blob], little-endian, on the run's UNIX
socket. Standard library only (rsync's remote shell uses it too)."""

import json
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
