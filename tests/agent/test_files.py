"""Files through the agent: atomic puts that keep modes and stream, fetches,
stat as the stat module answers, private temp dirs removed when the agent
ends, requests not awaited, and pipes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentkit import F, REPO, W


def test_put_is_atomic_keeps_mode_and_streams(link, tmp_path):
    dest = tmp_path / "conf"
    dest.write_text("old")
    dest.chmod(0o640)
    res, _ = link.call({"op": "put", "path": str(dest), "size": 3}, b"new")
    assert res == {"size": 3}
    assert dest.read_text() == "new" and (dest.stat().st_mode & 0o777) == 0o640
    # Streamed: a 1.5 MiB file in chunks; nothing visible at dest until the end.
    big = os.urandom(3 * W.CHUNK_BYTES // 2 + 7)
    big_dest = tmp_path / "big.bin"
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(big_dest), "size": len(big),
                                "streamed": True}, big[:1000]))
    for i in range(1000, len(big), W.CHUNK_BYTES):
        link.send(W.DATA, big[i:i + W.CHUNK_BYTES])
        assert not big_dest.exists()
        # Each part consumed is credited back: the bytes written so far.
        kind, _, _, _, stream, payload = link.frame()
        assert (kind, stream) == (W.CREDIT, link.stream)
        assert W.CREDIT_PAYLOAD.unpack(payload)[0] == min(i + W.CHUNK_BYTES, len(big))
    link.send(W.END, b"")
    kind, _, _, _, _, payload = link.frame()
    assert kind == W.REPLY and W.split_msg(payload)[0] == {"size": len(big)}
    assert big_dest.read_bytes() == big
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "conf"]  # no temp left
    # A short stream leaves the old file and no temp file.
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(dest), "size": 10, "streamed": True}, b"abc"))
    link.send(W.END, b"")
    kind, _, _, _, _, payload = link.frame()
    assert "got 3 of 10 bytes" in W.split_msg(payload)[0]["error"]
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "conf"]
    # Too many bytes: the put fails, and the sender is told to stop (all
    # credit) before the error.
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(dest), "size": 2, "streamed": True}, b""))
    link.send(W.DATA, b"abc")
    kind, _, _, _, _, payload = link.frame()
    assert kind == W.CREDIT and W.CREDIT_PAYLOAD.unpack(payload)[0] == W.CREDIT_ALL
    kind, _, _, _, _, payload = link.frame()
    assert kind == W.REPLY and "more bytes than announced" in W.split_msg(payload)[0]["error"]
    # A put that cannot start stops its sender too.
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(tmp_path / "no" / "dir"), "size": 2,
                                "streamed": True}, b""))
    kind, _, _, _, _, payload = link.frame()
    assert kind == W.CREDIT and W.CREDIT_PAYLOAD.unpack(payload)[0] == W.CREDIT_ALL
    kind, _, _, _, _, payload = link.frame()
    assert kind == W.REPLY and "No such file" in W.split_msg(payload)[0]["error"]
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "conf"]


def test_fetch_small_and_streamed(link, tmp_path):
    (tmp_path / "small").write_bytes(b"hello")
    res, blob = link.call({"op": "fetch", "path": str(tmp_path / "small")})
    assert res == {"size": 5} and blob == b"hello"
    data = os.urandom(2 * W.CHUNK_BYTES + 5)
    (tmp_path / "large").write_bytes(data)
    res, got = link.call({"op": "fetch", "path": str(tmp_path / "large")})
    assert res["streamed"] and res["size"] == len(data)
    parts = [got]
    while True:
        kind, _, _, _, _, payload = link.frame()
        if kind == W.END:
            break
        assert kind == W.DATA
        parts.append(payload)
    assert b"".join(parts) == data
    res, _ = link.call({"op": "fetch", "path": str(tmp_path / "missing")})
    assert "No such file" in res["error"]


def test_streamed_request_body_and_streamed_reply(link):
    """stdin over one chunk arrives in Data frames; output over one chunk
    comes back in Data frames."""
    body = os.urandom(W.CHUNK_BYTES + 100)
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "exec", "cmd": "cat; cat >&2 </dev/null", "streamed": True},
                               body[:10]))
    link.send(W.DATA, body[10:])
    link.send(W.END, b"")
    kind, _, _, _, _, payload = link.frame()
    res, first = W.split_msg(payload)
    assert kind == W.REPLY and res["streamed"] and res["rc"] == 0
    parts = [first]
    while True:
        kind, _, _, _, _, payload = link.frame()
        if kind == W.END:
            break
        parts.append(payload)
    out = b"".join(parts)
    assert res["stdout_len"] == len(body) and out[:len(body)] == body


def test_link_loss_stops_a_running_command(link, tmp_path):
    """EOF while a command runs: the command's process group is killed and
    the agent exits at once."""
    marker = tmp_path / "started"
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "exec", "cmd": f"touch {marker}; sleep 60 & sleep 61; wait"}))
    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    assert link.close() == 0
    assert time.monotonic() - t0 < 5
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 60" not in ps and "sleep 61" not in ps


def test_stat_answers_as_the_stat_module(link, tmp_path):
    """The agent's own stat gives the fields Ansible's stat module gives
    (less mime type and attributes), checksum included."""
    f = tmp_path / "f"
    f.write_bytes(b"hello\n")
    os.chmod(f, 0o640)
    (tmp_path / "ln").symlink_to(f)
    res, _ = link.call({"op": "stat", "path": str(f), "follow": False, "checksum": True})
    st = res["stat"]
    import hashlib
    assert st["exists"] and st["isreg"] and not st["isdir"] and st["mode"] == "0640"
    assert st["checksum"] == hashlib.sha1(b"hello\n").hexdigest() and st["size"] == 6
    assert st["pw_name"] and st["readable"] and st["rusr"] and not st["roth"]
    res, _ = link.call({"op": "stat", "path": str(tmp_path / "ln"), "follow": False})
    assert res["stat"]["islnk"] and res["stat"]["lnk_source"] == str(f)
    res, _ = link.call({"op": "stat", "path": str(tmp_path / "ln"), "follow": True})
    assert res["stat"]["isreg"] and not res["stat"]["islnk"]
    res, _ = link.call({"op": "stat", "path": str(tmp_path / "nope")})
    assert res == {"stat": {"exists": False}}


def test_temp_dirs_are_private_and_removed_when_the_agent_exits(link, tmp_path):
    """A task's temp dir is where Ansible puts it (remote_tmp/ansible-tmp-...,
    as -vvv shows it) and made as Ansible's shell command makes it (umask
    077); removed by rmtree, or when the agent ends."""
    base = tmp_path / "rt" / "tmp"
    res, _ = link.call({"op": "mkdtemp", "base": str(base), "name": "ansible-tmp-1-2-3"})
    assert res["path"] == str(base / "ansible-tmp-1-2-3")
    for d in (base, base / "ansible-tmp-1-2-3"):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700, d
    res, _ = link.call({"op": "mkdtemp", "base": str(base), "name": "../escape"})
    assert "bad temp dir name" in res["error"]
    # A name that exists is not taken over.
    res, _ = link.call({"op": "mkdtemp", "base": str(base), "name": "ansible-tmp-1-2-3"})
    assert "exists" in res["error"], res
    (base / "ansible-tmp-1-2-3" / "x").write_text("x")
    res, _ = link.call({"op": "rmtree", "path": str(base / "ansible-tmp-1-2-3") + "/"})
    assert res == {} and not (base / "ansible-tmp-1-2-3").exists()
    link.call({"op": "mkdtemp", "base": str(base), "name": "ansible-tmp-4"})
    assert link.close() == 0
    assert list(base.iterdir()) == [], "a temp dir outlived the agent"


def test_temp_dirs_of_an_agent_killed_with_sigkill_are_removed(link, tmp_path):
    base = tmp_path / "rt"
    res, _ = link.call({"op": "mkdtemp", "base": str(base), "name": "ansible-tmp-9"})
    (Path(res["path"]) / "partial").write_bytes(b"x" * 1000)
    res, _ = link.call({"op": "mkdtemp", "base": str(base), "name": "ansible-tmp-10"})
    link.call({"op": "rmtree", "path": res["path"]})
    # A put in progress into a directory: its unnamed file goes with the agent.
    dest = tmp_path / "dest"
    dest.write_text("old")
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(dest), "size": 10, "streamed": True}, b"abc"))
    link.call({"op": "ping"})
    link.proc.kill()
    link.proc.wait()
    deadline = time.monotonic() + 5
    while list(base.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(base.iterdir()) == [], "the temp dir outlived the agent killed with SIGKILL"
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "rt"]


def test_a_modules_payload_dir_goes_when_the_agent_is_killed_mid_module(link, tmp_path):
    """The AnsiballZ wrapper unpacks a module into /tmp/ansible_*_payload_*
    and removes it when the module ends; killed with its agent (the relay
    or the session gone), it cannot: the agent's sweeper does."""
    script = (b"import json, os, sys, tempfile, time\n"
              b"def _ansiballz_main(): pass\nzip_data='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='\n"
              b"d = tempfile.mkdtemp(prefix='ansible_ansible.legacy.command_payload_', dir='%s')\n"
              b"open(os.path.join(d, 'payload.zip'), 'wb').write(b'z' * 4096)\n"
              b"other = tempfile.mkdtemp(prefix='mine_', dir='%s')\n"
              b"print(json.dumps([d, other]), flush=True)\n"
              b"time.sleep(60)\n" % (str(tmp_path).encode(), str(tmp_path).encode()))
    python = os.path.realpath(sys.executable)
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}, script))
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("ansible_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    payload = list(tmp_path.glob("ansible_*"))
    assert payload and (payload[0] / "payload.zip").exists()
    # The link gone (the relay or the session killed): the agent ends and
    # kills the module, whose own cleanup never runs.
    assert link.close() == 0
    deadline = time.monotonic() + 5
    while list(tmp_path.glob("ansible_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("ansible_*")) == [], "the module's payload dir outlived its agent"
    # A temp dir a module makes for itself under another name is its own.
    assert len(list(tmp_path.glob("mine_*"))) == 1


def test_requests_not_awaited_report_failures_on_the_next_answer(link, tmp_path):
    """put, mkdtemp and chmod sent with noreply get no answer when they work;
    a failure answers the next request instead, naming what failed."""
    d = tmp_path / "d"
    d.mkdir()
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(d / "a"), "size": 3, "noreply": True}, b"abc"))
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "chmod", "paths": [str(d / "a")], "mode": "u+x",
                                "noreply": True}))
    res, _ = link.call({"op": "sync"})
    assert res == {}, "nothing failed, so nothing to report"
    assert (d / "a").read_bytes() == b"abc" and os.stat(d / "a").st_mode & 0o100
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(tmp_path / "missing" / "b"), "size": 1,
                                "noreply": True}, b"b"))
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "rmtree", "path": str(tmp_path / "gone"), "noreply": True}))
    res, _ = link.call({"op": "stat", "path": str(d / "a")})
    assert "an earlier request (put %s) failed" % (tmp_path / "missing" / "b") in res["error"]
    assert "gone" not in res["error"], "a failed cleanup only warns, as in Ansible"
    res, _ = link.call({"op": "stat", "path": str(d / "a")})
    assert res["stat"]["exists"], "a failure is reported once"


def test_symbolic_modes():
    for start, mode, want in ((0o600, "u+rwx", 0o700), (0o777, "go-w", 0o755), (0o644, "a+x", 0o755),
                              (0o750, "o=r", 0o754), (0o640, "+r", 0o644)):
        import tempfile
        with tempfile.NamedTemporaryFile() as f:
            os.chmod(f.name, start)
            F.symbolic_mode(mode)(f.name)
            assert os.stat(f.name).st_mode & 0o7777 == want, (oct(start), mode)
    with pytest.raises(ValueError):
        F.symbolic_mode("u+s,g+w")


def test_stat_equals_ansibles_stat_module(tmp_path):
    """Field for field, the agent's stat equals the real stat module's (run
    by real ansible) on a file, a directory, a symlink and a missing path."""
    f = tmp_path / "f"
    f.write_bytes(b"some content\n")
    (tmp_path / "l").symlink_to(f)
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="False")
    for path, follow in ((f, False), (tmp_path, False), (tmp_path / "l", False),
                         (tmp_path / "l", True), (tmp_path / "missing", False)):
        res = subprocess.run([str(REPO / ".venv" / "bin" / "ansible"), "localhost", "-c", "local",
                              "-m", "stat", "-a", f"path={path} follow={follow} get_mime=false "
                              "get_attributes=false checksum_algorithm=sha1",
                              "-e", f"ansible_python_interpreter={sys.executable}"],
                             env=env, capture_output=True, text=True, check=True)
        want = json.loads(res.stdout.split("=>", 1)[1])["stat"]
        got = F.file_stat({"path": str(path), "follow": follow, "checksum": True})
        for volatile in ("atime",):
            want.pop(volatile, None)
            got.pop(volatile, None)
        assert got == want, path


def test_failures_not_awaited_are_told_to_their_own_lane(link, tmp_path):
    """A failed put sent without waiting by one worker (lane 1) is reported
    to that worker's next request, not to another worker's (lane 2)."""
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(tmp_path / "no" / "such"), "size": 1,
                                "noreply": True, "lane": 1}, b"x"), stream=201)
    res, _ = link.call({"op": "exec", "cmd": "true", "lane": 2})
    assert res.get("rc") == 0, res
    res, _ = link.call({"op": "exec", "cmd": "true", "lane": 1})
    assert "an earlier request (put" in res["error"], res


def test_pipe_streams_stdin_and_output_both_ways(link):
    """A pipe's stdin arrives in parts while it runs, and its output comes
    back as it is printed: an interactive exchange is possible."""
    link.stream += 1
    s = link.stream
    link.send(W.REQUEST, W.msg({"op": "pipe", "cmd": "read a; echo got $a; read b; echo got $b >&2; exit 4"}))
    kind, _, _, _, stream, payload = link.frame()
    assert (kind, stream) == (W.REPLY, s) and W.split_msg(payload)[0] == {"streamed": True}
    link.send(W.DATA, b"one\n", stream=s)
    kind, _, _, _, _, payload = link.frame()
    assert kind == W.DATA and W.split_msg(payload) == ({"fd": 1}, b"got one\n")
    link.send(W.DATA, b"two\n", stream=s)
    link.send(W.END, b"", stream=s)
    got = []
    while True:
        kind, _, _, _, _, payload = link.frame()
        if kind == W.END:
            break
        got.append(W.split_msg(payload))
    assert got == [({"fd": 2}, b"got two\n"), ({"rc": 4}, b"")], got
