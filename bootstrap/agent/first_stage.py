# arbor's first stage, run as `python3 -c <this, base64>` (over ssh, or
# under a become command by a parent agent). Skips stdin up to the marker
# NUL "arbor" NUL (a become command may have left a password line there),
# then reads an 8-byte header (node id, payload length: little-endian u32
# each) and exactly that many bytes of the zlib-compressed agent, no more,
# so the frames that follow stay unread, and runs the agent from memory.
import os, sys, zlib
def r(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit(71)
        b += c
    return b
m = b"\0arbor\0"
s = b""
while not s.endswith(m):
    s = (s + r(1))[-4096:]
    if len(s) == 4096:
        sys.exit(72)
h = r(8)
node = int.from_bytes(h[:4], "little")
b = r(int.from_bytes(h[4:], "little"))
exec(compile(zlib.decompress(b), "arbor_agent", "exec"),
     {"__name__": "__arbor__", "ARBOR_NODE": node, "ARBOR_PAYLOAD": b})
