"""What the agent's tests share: the agent as the daemon sends it, started
through its real first stage over real pipes (`Link`)."""

import base64
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AGENT_DIR = REPO / "bootstrap" / "agent"
GOLDEN = REPO / "tests" / "golden"
sys.path.insert(0, str(AGENT_DIR))
from arbor_agent import files as F, modules as M, wire as W  # noqa: E402,F401


NODE = 12


def agent_code():
    """The agent as the daemon sends it: the package bundled by bootstrap."""
    out = subprocess.run([str(REPO / "target" / "release" / "arbor"), "agent-code"], check=True,
                         capture_output=True).stdout
    assert out.startswith(b"_SOURCES = {")
    return out


def boot_code():
    stage = (AGENT_DIR / "first_stage.py").read_bytes()
    return "import base64;exec(base64.b64decode(%r))" % base64.b64encode(stage).decode()


class Link:
    """An agent process started through the first stage, and its frames."""

    def __init__(self, tmp_path):
        code = zlib.compress(agent_code(), 9)
        boot = boot_code()
        self.proc = subprocess.Popen([sys.executable, "-c", boot],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=tmp_path)
        self.proc.stdin.write(b"leftover password line\n" + W.AGENT_MARKER
                              + struct.pack("<II", NODE, len(code)) + code)
        self.proc.stdin.flush()
        self.buf = bytearray()
        self.stream = 0

    def frame(self):
        while True:
            frame, need = W.decode(self.buf)
            if frame:
                del self.buf[:need]
                return frame
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, "agent closed its stdout: %s" % self.proc.stderr.read()
            self.buf.extend(chunk)

    def send(self, kind, payload, stream=None, dst=NODE):
        self.proc.stdin.write(W.encode(kind, dst, 0, stream or self.stream, payload))
        self.proc.stdin.flush()

    def call(self, obj, blob=b""):
        self.stream += 1
        self.send(W.REQUEST, W.msg(obj, blob))
        kind, _, dst, src, stream, payload = self.frame()
        assert (kind, dst, src, stream) == (W.REPLY, 0, NODE, self.stream)
        return W.split_msg(payload)

    def close(self):
        self.proc.stdin.close()
        return self.proc.wait(timeout=10)
