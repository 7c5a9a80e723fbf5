"""The agent's link: it decodes the shared golden frames exactly as the Rust
decoder does, closes the link on malformed input, answers a malformed
request with an error, and exits when its link falls silent."""

import json
import os
import struct
import time

import pytest

from agentkit import GOLDEN, NODE, W


def test_golden_frames_decode_as_in_rust():
    cases = json.loads((GOLDEN / "frames.json").read_text())["frames"]
    assert len(cases) >= 10
    for c in cases:
        data = (GOLDEN / c["file"]).read_bytes()
        if c["valid"]:
            frame, used = W.decode(bytearray(data))
            assert used == len(data), c["name"]
            assert frame == (c["kind"], c["flags"], c["dst"], c["src"], c["stream"],
                             bytes.fromhex(c["payload_hex"])), c["name"]
            assert W.encode(*frame[:1], *frame[2:5], frame[5]) == data, c["name"]
        else:
            with pytest.raises(W.WireError) as e:
                W.decode(bytearray(data))
            assert str(e.value).startswith(c["error"]), (c["name"], str(e.value))


def test_golden_message_payloads_split():
    req = json.loads((GOLDEN / "frames.json").read_text())["frames"][0]
    obj, blob = W.split_msg(bytes.fromhex(req["payload_hex"]))
    assert obj == {"op": "exec", "cmd": "/bin/sh -c 'echo hi && sleep 0'"} and blob == b"stdin bytes"


def test_malformed_frame_closes_the_link_with_an_error(link):
    link.proc.stdin.write(b"SSH-2.0-not-a-frame\r\n")
    link.proc.stdin.flush()
    assert link.proc.wait(timeout=10) == 65
    err = link.proc.stderr.read().decode()
    assert "malformed frame" in err and "BadMagic" in err and "Traceback" not in err


def test_oversized_frame_is_refused_before_reading_it(link):
    link.proc.stdin.write(struct.pack("<BBBBIIII", W.MAGIC, W.VERSION, W.DATA, 0, NODE, 0, 1,
                                      (1 << 20) + 1))
    link.proc.stdin.flush()
    assert link.proc.wait(timeout=10) == 65
    assert "TooLarge" in link.proc.stderr.read().decode()


def test_random_and_mutated_frames_decode_or_fail_cleanly():
    """The agent's decoder, as the Rust property test: random bytes and
    single-byte mutations of valid frames decode, ask for more (never past
    the frame bound) or raise WireError; never anything else."""
    import random
    rnd = random.Random(7)
    valid = [W.encode(k, NODE, 0, rnd.randrange(1 << 32), bytes(rnd.randrange(256) for _ in range(n)))
             for k in sorted(W.KINDS) for n in (0, 1, 40)]
    for i in range(6000):
        if i % 2:
            buf = bytearray(rnd.choice(valid))
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        else:
            buf = bytearray(rnd.randrange(256) for _ in range(rnd.randrange(64)))
        try:
            frame, n = W.decode(buf)
        except W.WireError:
            continue
        assert n <= W.HEADER_BYTES + W.PAYLOAD_MAX
        if frame is not None:
            assert n <= len(buf) and len(frame[5]) == n - W.HEADER_BYTES
            try:
                W.split_msg(frame[5])
            except (W.WireError, ValueError):
                pass


@pytest.mark.parametrize("payload", [b"", b"\xff\xff\xff\xff", b"\x03\x00\x00\x00{{{", b"\x02\x00\x00\x00[]",
                                     b"\x04\x00\x00\x00\xff\xfe\xfd\xfc", b"\x02\x00\x00\x00{}"])
def test_a_malformed_request_gets_an_error_and_the_agent_lives(link, payload):
    link.stream += 1
    link.send(W.REQUEST, payload)
    kind, _, _, _, stream, body = link.frame()
    assert (kind, stream) == (W.REPLY, link.stream)
    assert "error" in W.split_msg(body)[0]
    res, _ = link.call({"op": "ping"})
    assert "pid" in res or res == {}, res
    assert link.close() == 0


def test_an_agent_told_a_keepalive_exits_when_the_link_falls_silent(link, tmp_path):
    base = tmp_path / "rt"
    link.call({"op": "mkdtemp", "base": str(base), "name": "t"})
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "keepalive", "secs": 1, "noreply": True}))
    # Pinged within the bound, it stays.
    for _ in range(6):
        time.sleep(0.4)
        link.stream += 1
        link.send(W.PING, b"x")
        assert link.frame()[0] == W.PONG
    assert link.proc.poll() is None
    # Silent past it, it ends as at EOF: cleanly, its temp dirs removed.
    t0 = time.monotonic()
    assert link.proc.wait(timeout=5) == 0
    assert 0.5 < time.monotonic() - t0 < 2.5
    assert list(base.iterdir()) == []
    assert b"nothing from the link" in link.proc.stderr.read()


def test_an_agent_whose_link_takes_nothing_exits_within_the_keepalive(link, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "keepalive", "secs": 1, "noreply": True}))
    # A fetch streams 8 MiB back, and nothing reads the link: the pipe fills
    # and the agent's writes stop moving (as toward a dead WAN).
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "fetch", "path": str(big)}))
    t0 = time.monotonic()
    assert link.proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 4
    assert b"took nothing" in link.proc.stderr.read()
