"""arbor frames as the agent reads and writes them (layout:
relay/wire/src/lib.rs; golden frames: tests/golden/), and message payloads:
a JSON object plus a binary blob (relay/wire/src/msg.rs)."""

import json
import os
import struct


MAGIC = 0xA7


VERSION = 1


HEADER = struct.Struct("<BBBBIIII")


HEADER_BYTES = HEADER.size


PAYLOAD_MAX = 1 << 20


CHUNK_BYTES = 256 * 1024


READ_BYTES = 64 * 1024


FLAG_LZ4 = 0x01


# What precedes a nested agent's node id and code on its stdin.
AGENT_MARKER = b"\0arbor\0"


REQUEST, REPLY, DATA, END, ROUTE_ADD, ROUTE_DEL, UNDELIVERABLE, PING, PONG, CREDIT = range(1, 11)


KINDS = frozenset(range(1, 11))


CREDIT_PAYLOAD = struct.Struct("<Q")


# Credit that tells the sender the stream was dropped.
CREDIT_ALL = (1 << 64) - 1


CONTROLLER = 0


class WireError(Exception):
    """Bytes that are not a frame; the link must close."""


class LinkGone(Exception):
    """The link to the tree ended (EOF): everything this agent runs stops."""


def decode(buf):
    """(frame, used) for the frame at the front of buf, or (None, needed).

    frame is (kind, flags, dst, src, stream, payload). Mirrors the Rust
    decoder: the header is checked before the payload is looked at.
    """
    if len(buf) >= 1 and buf[0] != MAGIC:
        raise WireError("BadMagic: %#04x" % buf[0])
    if len(buf) >= 2 and buf[1] != VERSION:
        raise WireError("BadVersion: %d" % buf[1])
    if len(buf) < HEADER_BYTES:
        return None, HEADER_BYTES
    _, _, kind, flags, dst, src, stream, length = HEADER.unpack_from(buf)
    if kind not in KINDS:
        raise WireError("UnknownKind: %d" % kind)
    if flags:
        # The only flag (lz4) is link-local between Rust nodes.
        raise WireError("UnknownFlags: %#04x" % flags)
    if length > PAYLOAD_MAX:
        raise WireError("TooLarge: %d" % length)
    total = HEADER_BYTES + length
    if len(buf) < total:
        return None, total
    return (kind, flags, dst, src, stream, bytes(buf[HEADER_BYTES:total])), total


def encode(kind, dst, src, stream, payload=b""):
    if len(payload) > PAYLOAD_MAX:
        raise ValueError("payload over the frame limit")
    return HEADER.pack(MAGIC, VERSION, kind, 0, dst, src, stream, len(payload)) + payload


def msg(obj, blob=b""):
    j = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return struct.pack("<I", len(j)) + j + blob


def split_msg(payload):
    if len(payload) < 4:
        raise WireError("BadPayload: message shorter than its length field")
    (n,) = struct.unpack_from("<I", payload)
    if n > len(payload) - 4:
        raise WireError("BadPayload: JSON length past the end")
    try:
        obj = json.loads(payload[4:4 + n].decode("utf-8"))
    except ValueError as e:  # bad UTF-8 or JSON
        raise WireError("BadPayload: %s" % e)
    if not isinstance(obj, dict):
        raise WireError("BadPayload: JSON is not an object")
    return obj, payload[4 + n:]


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]
