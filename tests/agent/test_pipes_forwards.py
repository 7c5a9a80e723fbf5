"""The agent's pty pipes (`arbor ssh`) and forwards (arbor_forward), on a
live agent over real pipes: a pty of the asked size that follows resizes,
a hang-up that ends the command, and a forward that listens on the
loopback or a private UNIX socket only, carries a connection both ways with
credit for what it wrote, and is gone once hung up."""

import os
import socket
import stat
import time

import pytest

from agentkit import W


def start(link, req):
    link.stream += 1
    s = link.stream
    link.send(W.REQUEST, W.msg(req))
    kind, _, _, _, stream, payload = link.frame()
    assert (kind, stream) == (W.REPLY, s), W.split_msg(payload)
    return s, W.split_msg(payload)[0]


def output_until_exit(link, s):
    out, rc = b"", None
    while True:
        kind, _, _, _, stream, payload = link.frame()
        if stream != s:
            continue
        if kind == W.END:
            return out, rc
        obj, blob = W.split_msg(payload)
        if "rc" in obj:
            rc = obj["rc"]
        out += blob


def test_a_pty_pipe_has_its_size_and_follows_a_resize(link):
    s, head = start(link, {"op": "pipe", "cmd": "tty; stty size; echo TERM=$TERM; read x; stty size",
                           "pty": {"rows": 30, "cols": 90, "term": "xterm-test"}})
    assert head == {"streamed": True}
    got = b""
    while b"TERM=" not in got or not got.endswith(b"\n"):
        kind, _, _, _, _, payload = link.frame()
        got += W.split_msg(payload)[1]
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "resize", "pipe": s, "rows": 50, "cols": 132, "noreply": True}))
    link.send(W.DATA, b"go\r", stream=s)
    out, rc = output_until_exit(link, s)
    text = (got + out).decode()
    assert rc == 0, text
    assert "/dev/pts/" in text and "30 90" in text and "TERM=xterm-test" in text, text
    assert "50 132" in text, text


def test_a_hangup_ends_the_command(link, tmp_path):
    mark = tmp_path / "pid"
    s, _ = start(link, {"op": "pipe", "cmd": "echo $$ > %s; exec sleep 100" % mark})
    deadline = time.monotonic() + 10
    while not (mark.exists() and mark.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(mark.read_text())
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "hangup", "pipe": s, "noreply": True}))
    res, _ = link.call({"op": "sync"})
    assert res == {}
    assert not os.path.exists("/proc/%d" % pid) or open("/proc/%d/stat" % pid).read().split()[2] == "Z"


def accept(link, lstream):
    kind, _, _, _, stream, payload = link.frame()
    assert (kind, stream) == (W.DATA, lstream)
    return W.split_msg(payload)[0]["accepted"]


def test_a_forward_carries_a_connection_both_ways_then_hangs_up(link):
    ls, head = start(link, {"op": "listen", "listen": "127.0.0.1:0"})
    host, port = head["listening"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    client = socket.create_connection((host, int(port)), 5)
    cid = accept(link, ls)
    cs, head = start(link, {"op": "fwd_conn", "listener": ls, "conn": cid})
    assert head == {"streamed": True}
    link.send(W.DATA, b"hello", stream=cs)
    assert client.recv(100) == b"hello"
    kind, _, _, _, stream, payload = link.frame()
    assert (kind, stream) == (W.CREDIT, cs) and W.CREDIT_PAYLOAD.unpack(payload)[0] == 5
    client.sendall(b"world")
    client.shutdown(socket.SHUT_WR)
    got = []
    while True:
        kind, _, _, _, stream, payload = link.frame()
        assert stream == cs
        got.append((kind, payload))
        if kind == W.END:
            break
    assert got == [(W.DATA, b"world"), (W.END, b"")], got
    link.send(W.END, b"", stream=cs)
    client.settimeout(5)
    assert client.recv(100) == b""  # the controller's side ended: EOF here
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "hangup", "pipe": ls, "noreply": True}))
    kind, _, _, _, stream, _ = link.frame()
    assert (kind, stream) == (W.END, ls)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), 5)


def test_a_forward_listens_on_the_loopback_or_a_private_unix_socket_only(link, tmp_path):
    for beyond in ("0.0.0.0:0", "10.0.0.1:3128"):
        res, _ = link.call({"op": "listen", "listen": beyond})
        assert "loopback only" in res["error"], res
    path = str(tmp_path / "fwd.sock")
    ls, head = start(link, {"op": "listen", "listen": path})
    assert head["listening"] == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "hangup", "pipe": ls, "noreply": True}))
    kind, _, _, _, stream, _ = link.frame()
    assert (kind, stream) == (W.END, ls)
    assert not os.path.exists(path)
    c = socket.socket(socket.AF_UNIX)
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        c.connect(path)


def test_a_listen_on_an_address_held_takes_it_over(link):
    first, head = start(link, {"op": "listen", "listen": "127.0.0.1:0"})
    where = head["listening"]
    link.stream += 1
    second = link.stream
    link.send(W.REQUEST, W.msg({"op": "listen", "listen": where}))
    kind, _, _, _, stream, _ = link.frame()
    assert (kind, stream) == (W.END, first)
    kind, _, _, _, stream, payload = link.frame()
    assert (kind, stream) == (W.REPLY, second) and W.split_msg(payload)[0]["listening"] == where
