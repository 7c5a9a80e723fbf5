"""The Python agent, driven over real pipes through its real first stage.

It decodes the shared golden frames exactly as the Rust decoder does, runs
commands and pipelined modules (in a fork of its warm interpreter), writes
files atomically, and closes the link on malformed input.
"""

import base64
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT_DIR = REPO / "bootstrap" / "agent"
GOLDEN = REPO / "tests" / "golden"
sys.path.insert(0, str(AGENT_DIR))
from arbor_agent import files as F, modules as M, wire as W  # noqa: E402

NODE = 12


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


@pytest.fixture
def link(tmp_path):
    l = Link(tmp_path)
    kind, _, dst, src, _, payload = l.frame()
    assert (kind, dst, src) == (W.ROUTE_ADD, 0, NODE)
    assert W.split_msg(payload)[0]["pid"] == l.proc.pid
    yield l
    if l.proc.poll() is None:
        l.proc.kill()
        l.proc.wait()


def test_exec_returns_rc_stdout_stderr(link):
    res, blob = link.call({"op": "exec", "cmd": "cat; echo out; echo err >&2; exit 3"}, b"in:")
    assert res["rc"] == 3
    assert blob[:res["stdout_len"]] == b"in:out\n" and blob[res["stdout_len"]:] == b"err\n"
    assert link.close() == 0  # EOF ends the agent cleanly


def test_pipelined_module_runs_in_a_fork_of_the_warm_interpreter(link):
    script = (b"import json, os, sys\n"
              b"def _ansiballz_main(): pass\nzip_data='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='\n"
              b"print(json.dumps({'ppid': os.getppid(), 'argv': sys.argv, 'name': __name__}))\n"
              b"sys.stderr.write('warn\\n')\n"
              b"sys.exit(2)\n")
    python = os.path.realpath(sys.executable)
    res, blob = link.call({"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}, script)
    out = json.loads(blob[:res["stdout_len"]])
    assert res["rc"] == 2 and blob[res["stdout_len"]:] == b"warn\n"
    assert out["ppid"] == link.proc.pid, "forked from the agent, not a new interpreter"
    assert out["argv"] == [""] and out["name"] == "__main__"
    # The same script through a fresh interpreter gives the same result.
    fresh = subprocess.run(["/bin/sh", "-c", "%s && sleep 0" % python], input=script,
                           capture_output=True)
    assert fresh.returncode == 2 and fresh.stderr == b"warn\n"
    assert json.loads(fresh.stdout)["argv"] == [""]
    # An exception gives a traceback and rc 1, as python3 does.
    res, blob = link.call({"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python},
                          b"def _ansiballz_main(): pass\nzip_data='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='\nraise ValueError('boom')\n")
    assert res["rc"] == 1 and b"ValueError: boom" in blob


def test_a_module_put_then_run_from_its_file_runs_in_the_warm_interpreter(link, tmp_path):
    """Pipelining off: Ansible puts the module's script in the task's temp
    dir and runs `python3 PATH`. The agent runs it in a fork of itself, as
    python3 would run the file: the same output, exit status, argv and
    __file__ as a fresh interpreter gives."""
    path = tmp_path / "AnsiballZ_probe.py"
    path.write_bytes(b"import json, os, sys\n"
                     b"def _ansiballz_main(): pass\nzip_data='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='\n"
                     b"print(json.dumps({'ppid': os.getppid(), 'argv': sys.argv, 'file': __file__,"
                     b" 'exe': sys.executable}))\n"
                     b"sys.stderr.write('warn\\n')\n"
                     b"sys.exit(3)\n")
    python = os.path.realpath(sys.executable)
    cmd = "/bin/sh -c '%s %s && sleep 0'" % (python, path)
    res, blob = link.call({"op": "exec", "cmd": cmd})
    out = json.loads(blob[:res["stdout_len"]])
    assert res["rc"] == 3 and blob[res["stdout_len"]:] == b"warn\n"
    assert out["ppid"] == link.proc.pid, "forked from the agent, not a new interpreter"
    fresh = subprocess.run(["/bin/sh", "-c", "%s %s && sleep 0" % (python, path)], capture_output=True)
    want = json.loads(fresh.stdout)
    assert fresh.returncode == 3 and fresh.stderr == b"warn\n"
    assert (out["argv"], out["file"], out["exe"]) == (want["argv"], want["file"], want["exe"])
    # Not a module: run by the shell as any command.
    other = tmp_path / "AnsiballZ_plain.py"
    other.write_bytes(b"import os; print(os.getppid())\n")
    res, blob = link.call({"op": "exec", "cmd": "/bin/sh -c '%s %s && sleep 0'" % (python, other)})
    assert res["rc"] == 0 and int(blob[:res["stdout_len"]]) != link.proc.pid


def test_ansible_2_17_scripts_run_warm_and_unknown_formats_run_as_ansible_runs_them(link, tmp_path):
    """ansible-core 2.17 and 2.18 assign their zip in the wrapper
    (`    ZIPDATA = '…'`), and name the module in a runpy call: such a script
    runs in the warm interpreter. A script with no zip literal is an
    AnsiballZ format the agent does not know: it runs in a new interpreter,
    with a warning at -vvv, and answers as python3 does."""
    python = os.path.realpath(sys.executable)
    cmd = {"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}
    old = (b"import json, os, sys\n"
           b"def _ansiballz_main():\n"
           b"    ZIPDATA = " + EMPTY_ZIP + b"\n"
           b"    print(json.dumps({'ppid': os.getppid(), 'zip': len(ZIPDATA)}))\n"
           b"    if False:\n"
           b"        runpy.run_module(mod_name='ansible.modules.command', init_globals=None)\n"
           b"    sys.exit(5)\n"
           b"\nif __name__ == '__main__':\n    _ansiballz_main()\n")
    res, blob = link.call(cmd, old)
    assert res["rc"] == 5 and not res.get("log"), (res, blob)
    out = json.loads(blob[:res["stdout_len"]])
    assert out == {"ppid": link.proc.pid, "zip": len(EMPTY_ZIP) - 2}
    unknown = (b"import json, os, sys\n"
               b"def _ansiballz_main(payload): print(json.dumps({'ppid': os.getppid(), 'p': payload}))\n"
               b"_ansiballz_main(payload='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==')\n")
    res, blob = link.call(cmd, unknown)
    out = json.loads(blob[:res["stdout_len"]])
    assert res["rc"] == 0 and out["ppid"] != link.proc.pid, "a new interpreter"
    fresh = subprocess.run(["/bin/sh", "-c", "%s && sleep 0" % python], input=unknown, capture_output=True)
    assert json.loads(fresh.stdout)["p"] == out["p"]
    assert any("AnsiballZ format arbor does not know" in line for line in res["log"]), res


def test_ansible_2_21_commands_without_sleep_0_run_warm(link, tmp_path):
    """ansible-core 2.21 runs modules with `/bin/sh -c python3` (quoted
    only if need be) and `/bin/sh -c 'python3 FILE'`, without `&& sleep 0`:
    both run in the agent."""
    python = os.path.realpath(sys.executable)
    script = (b"import os\ndef _ansiballz_main(): pass\nzip_data=" + EMPTY_ZIP + b"\n"
              b"print(os.getppid())\n")
    for cmd in ("/bin/sh -c '%s'" % python, "/bin/sh -c %s" % python):
        res, blob = link.call({"op": "exec", "cmd": cmd}, script)
        assert res["rc"] == 0 and int(blob[:res["stdout_len"]]) == link.proc.pid, cmd
    path = tmp_path / "AnsiballZ_ping.py"
    path.write_bytes(script)
    res, blob = link.call({"op": "exec", "cmd": "/bin/sh -c '%s %s'" % (python, path)})
    assert res["rc"] == 0 and int(blob[:res["stdout_len"]]) == link.proc.pid


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


@pytest.fixture(scope="module")
def ansiballz(tmp_path_factory):
    """Real AnsiballZ payloads (command module), built by real ansible."""
    d = tmp_path_factory.mktemp("kr")
    venv = REPO / ".venv" / "bin"
    env = dict(os.environ, ANSIBLE_KEEP_REMOTE_FILES="1", ANSIBLE_PIPELINING="False",
               ANSIBLE_REMOTE_TMP=str(d))
    subprocess.run([str(venv / "ansible"), "localhost", "-c", "local", "-m", "command", "-a", "echo hi",
                    "-e", f"ansible_python_interpreter={sys.executable}"],
                   env=env, check=True, capture_output=True)
    return next(d.glob("*/AnsiballZ_command.py")).read_bytes()


def test_a_module_script_put_without_its_kept_zip_is_written_whole(link, ansiballz, tmp_path):
    """Pipelining off, the controller puts a module's script without the
    zip the agent holds: the agent writes it with its zip put back, the same
    bytes as Ansible made them, and runs it warm. If the zip is gone, nothing
    is written, and the command that runs the file answers zip_miss."""
    python = os.path.realpath(sys.executable)
    start = ansiballz.index(b"\nzip_data=") + len(b"\nzip_data=")
    end = ansiballz.index(b",\n", start)
    first, second = tmp_path / "AnsiballZ_command.py", tmp_path / "d2" / "AnsiballZ_command.py"
    second.parent.mkdir()
    res, _ = link.call({"op": "put", "path": str(first), "size": len(ansiballz), "zip_key": "kp",
                        "zip_span": [start, end]}, ansiballz)
    assert "error" not in res, res
    assert first.read_bytes() == ansiballz
    short = ansiballz[:start] + ansiballz[end:]
    res, _ = link.call({"op": "put", "path": str(second), "size": len(ansiballz), "zip_key": "kp",
                        "zip_at": start}, short)
    assert "error" not in res, res
    assert second.read_bytes() == ansiballz
    res, blob = link.call({"op": "exec", "cmd": "/bin/sh -c '%s %s'" % (python, second)})
    assert res["rc"] == 0 and json.loads(blob[:res["stdout_len"]])["stdout"] == "hi", blob
    # A zip the agent does not hold: nothing written; running it says so.
    gone = tmp_path / "d3" / "AnsiballZ_command.py"
    gone.parent.mkdir()
    res, _ = link.call({"op": "put", "path": str(gone), "size": len(ansiballz), "zip_key": "nope",
                        "zip_at": start}, short)
    assert res.get("zip_miss") and not gone.exists(), res
    res, _ = link.call({"op": "exec", "cmd": "/bin/sh -c '%s %s && sleep 0'" % (python, gone)})
    assert res.get("zip_miss") and str(gone) in res["error"], res


def test_module_utils_stay_warm_between_modules(link, ansiballz):
    """The second module finds ansible.module_utils already imported in the
    agent it forks from, and answers as the first did."""
    python = os.path.realpath(sys.executable)
    cmd = {"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}
    results = []
    for _ in range(2):
        res, blob = link.call(cmd, ansiballz)
        assert res["rc"] == 0, blob
        out = json.loads(blob[:res["stdout_len"]])
        for volatile in ("start", "end", "delta"):
            out.pop(volatile, None)
        results.append(out)
    assert results[0] == results[1] and results[0]["stdout"] == "hi"
    probe = (b"import sys\ndef _ansiballz_main(): pass\nzip_data='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='\n"
             b"print('ansible.module_utils.basic' in sys.modules)\n")
    res, blob = link.call(cmd, probe)
    assert blob[:res["stdout_len"]] == b"True\n"


def test_module_zip_is_kept_and_put_back(link, ansiballz):
    """The controller sends a module's zip once; later the agent puts it
    back into the script and the module answers the same."""
    python = os.path.realpath(sys.executable)
    cmd = "/bin/sh -c '%s && sleep 0'" % python
    start = ansiballz.index(b"\nzip_data=") + len(b"\nzip_data=")
    end = ansiballz.index(b",\n", start)
    res, full = link.call({"op": "exec", "cmd": cmd, "zip_key": "k1", "zip_span": [start, end]}, ansiballz)
    assert res["rc"] == 0
    short = ansiballz[:start] + ansiballz[end:]
    res, blob = link.call({"op": "exec", "cmd": cmd, "zip_key": "k1", "zip_at": start}, short)
    assert res["rc"] == 0 and json.loads(blob[:res["stdout_len"]])["stdout"] == "hi"
    res, _ = link.call({"op": "exec", "cmd": cmd, "zip_key": "unknown", "zip_at": start}, short)
    assert res == {"error": "module zip not cached", "zip_miss": True}


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


def test_a_modules_zip_is_served_from_memory_with_zip_paths(link, ansiballz):
    """With its zip kept, a module imports the zip's own sources, compiled
    once in the agent; __file__ is inside the payload zip, as with zipimport."""
    python = os.path.realpath(sys.executable)
    cmd = "/bin/sh -c '%s && sleep 0'" % python
    start = ansiballz.index(b"\nzip_data=") + len(b"\nzip_data=")
    end = ansiballz.index(b",\n", start)
    link.call({"op": "exec", "cmd": cmd, "zip_key": "kz", "zip_span": [start, end]}, ansiballz)
    # A probe in the module's place: the same wrapper, a module that reports
    # where its imports came from.
    short = ansiballz[:start] + ansiballz[end:]
    res, blob = link.call({"op": "exec", "cmd": cmd, "zip_key": "kz", "zip_at": start}, short)
    out = json.loads(blob[:res["stdout_len"]])
    assert res["rc"] == 0 and out["stdout"] == "hi"
    probe = (b"import sys\ndef _ansiballz_main(): pass\nzip_data='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='\n"
             b"print(sys.meta_path[0].__class__.__name__)\n")
    res, blob = link.call({"op": "exec", "cmd": cmd}, probe)
    assert blob[:res["stdout_len"]] == b"ZipModules\n"


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


def test_a_forked_modules_exit_handlers_run(link, tmp_path):
    """AnsibleModule removes its temp dir in an atexit handler: a forked
    module runs its handlers as python3 would, and not the agent's."""
    mark = tmp_path / "atexit-ran"
    python = os.path.realpath(sys.executable)
    script = (b"import atexit, sys\ndef _ansiballz_main(): pass\nzip_data='UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='\n"
              b"atexit.register(lambda: open(%r, 'w').write('yes'))\n"
              b"sys.exit(3)\n" % str(mark).encode())
    res, _ = link.call({"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}, script)
    assert res["rc"] == 3 and mark.read_text() == "yes"


# A become command as sudo/su/doas behave: asks on the controlling terminal,
# reads the answer there, then prints the success marker and runs the rest.
FAKE_BECOME = r"""
printf 'Password: ' > /dev/tty
IFS= read -r pw < /dev/tty
[ "$pw" = "s3cret" ] || { sleep 0.2; echo 'Sorry, try again.' > /dev/tty; exit 1; }
echo BECOME-SUCCESS-k1
exec "$@"
"""


def become(link, child, password):
    """Runs the become handshake for node `child`; returns the frames seen
    (kind, src, obj) and the final reply."""
    import shlex
    cmd = "/bin/sh -c %s fake %s -c %s" % (shlex.quote(FAKE_BECOME), shlex.quote(sys.executable),
                                           shlex.quote(boot_code()))
    link.stream += 1
    stream = link.stream
    link.send(W.REQUEST, W.msg({"op": "become", "node": child, "cmd": cmd,
                                "success": "BECOME-SUCCESS-k1", "timeout_s": 10}))
    seen = []
    while True:
        kind, _, dst, src, fstream, payload = link.frame()
        if kind == W.DATA and fstream == stream:
            obj = W.split_msg(payload)[0]
            seen.append(("output", obj["output"]))
            if "Password:" in obj["output"]:
                link.send(W.DATA, W.msg({"password": password}), stream=stream)
        elif kind == W.ROUTE_ADD:
            seen.append(("route_add", src))
        elif kind == W.REPLY and fstream == stream:
            return seen, W.split_msg(payload)[0]


def test_become_starts_a_nested_agent_through_a_password_prompt(link):
    seen, res = become(link, 40, "s3cret")
    assert res.get("node") == 40, res
    assert ("route_add", 40) in seen
    # The password was asked for on the terminal, and never echoed back.
    assert any("Password:" in o for k, o in seen if k == "output")
    assert not any("s3cret" in str(o) for _, o in seen)
    # Requests to the nested agent are routed through this one.
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "ping"}), dst=40)
    kind, _, dst, src, stream, payload = link.frame()
    assert (kind, dst, src, stream) == (W.REPLY, 0, 40, link.stream)
    child_pid = W.split_msg(payload)[0]["pid"]
    assert child_pid != link.proc.pid
    res, blob = link.call({"op": "ping"})
    assert res["pid"] == link.proc.pid
    # Ending it withdraws its route.
    res, _ = link.call({"op": "unbecome", "node": 40})
    kind, _, dst, src, _, payload = link.frame()
    assert (kind, src) == (W.ROUTE_DEL, 40), payload
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists("/proc/%d" % child_pid):
        time.sleep(0.05)
    assert not os.path.exists("/proc/%d" % child_pid)


def test_become_with_a_wrong_password_fails_with_the_commands_output(link):
    seen, res = become(link, 41, "wrong")
    assert "exited with status 1" in res["error"] and "Sorry, try again." in res["error"], res
    assert not any(k == "route_add" for k, _ in seen)
    # The agent still serves.
    assert link.call({"op": "ping"})[0]["pid"] == link.proc.pid


def test_nested_agents_end_with_their_parent(link):
    _, res = become(link, 42, "s3cret")
    link.stream += 1
    link.send(W.REQUEST, W.msg({"op": "ping"}), dst=42)
    child_pid = W.split_msg(link.frame()[5])[0]["pid"]
    assert link.close() == 0
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists("/proc/%d" % child_pid):
        time.sleep(0.05)
    assert not os.path.exists("/proc/%d" % child_pid)


def test_commands_run_concurrently_and_answer_as_they_end(link):
    """Two workers' commands on one agent (delegate_to many hosts to one)
    run side by side: the quick one is answered while the slow one runs."""
    link.send(W.REQUEST, W.msg({"op": "exec", "cmd": "sleep 1.5; echo slow"}), stream=101)
    link.send(W.REQUEST, W.msg({"op": "exec", "cmd": "echo fast"}), stream=102)
    link.send(W.REQUEST, W.msg({"op": "ping"}), stream=103)
    answers = []
    for _ in range(3):
        kind, _, _, _, stream, payload = link.frame()
        res, blob = W.split_msg(payload)
        answers.append((stream, blob[:res.get("stdout_len", 0)]))
    assert answers[0][0] in (102, 103) and answers[1][0] in (102, 103), answers
    assert answers[2] == (101, b"slow\n")
    assert dict(answers)[102] == b"fast\n"


def test_failures_not_awaited_are_told_to_their_own_lane(link, tmp_path):
    """A failed put sent without waiting by one worker (lane 1) is reported
    to that worker's next request, not to another worker's (lane 2)."""
    link.send(W.REQUEST, W.msg({"op": "put", "path": str(tmp_path / "no" / "such"), "size": 1,
                                "noreply": True, "lane": 1}, b"x"), stream=201)
    res, _ = link.call({"op": "exec", "cmd": "true", "lane": 2})
    assert res.get("rc") == 0, res
    res, _ = link.call({"op": "exec", "cmd": "true", "lane": 1})
    assert "an earlier request (put" in res["error"], res


def test_env_file_edits_reach_later_commands_as_after_a_new_login(tmp_path, monkeypatch):
    """The rules for pam_env files (EnvFile): new keys are added, changed and
    removed keys follow the file only while the environment still holds the
    file's old value."""
    f = tmp_path / "environment"
    f.write_text('KEEP=1\nOWNED="old value"\nGONE=x\nSHADOWED=file\n')
    env = {b"KEEP": b"1", b"OWNED": b"old value", b"GONE": b"x", b"SHADOWED": b"profile"}
    monkeypatch.setattr(F.EnvFile, "environ", env)
    w = F.EnvFile(str(f))
    w.check()
    assert env[b"OWNED"] == b"old value"  # unchanged file: nothing done
    f.write_text('# a comment\nKEEP=1\nexport OWNED=new\nSHADOWED=other\nNEW="a b"\nnot a line\n')
    os.utime(f, ns=(1, 1))
    w.check()
    assert env == {b"KEEP": b"1", b"OWNED": b"new", b"SHADOWED": b"profile", b"NEW": b"a b"}


def test_pam_environment_edits_are_seen_by_the_next_command(tmp_path):
    """Through a real agent: ~/.pam_environment written after the agent
    started is in the environment of its next command, as sshd would give a
    new session."""
    home = tmp_path / "home"
    home.mkdir()
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        l = Link(tmp_path)
    finally:
        os.environ["HOME"] = old
    try:
        assert l.frame()[0] == W.ROUTE_ADD
        res, blob = l.call({"op": "exec", "cmd": "echo \"[$ARBOR_TEST_PROXY]\""})
        assert blob[:res["stdout_len"]] == b"[]\n"
        (home / ".pam_environment").write_text("ARBOR_TEST_PROXY=http://proxy:3128\n")
        res, blob = l.call({"op": "exec", "cmd": "echo \"[$ARBOR_TEST_PROXY]\""})
        assert blob[:res["stdout_len"]] == b"[http://proxy:3128]\n"
    finally:
        l.close()


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


# The literal of an empty zip: fake AnsiballZ scripts carry one, as real
# ones carry their zip (a script without is a format the agent does not know).
EMPTY_ZIP = b"'UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=='"


def fake_ansiballz(body, fqn="ansible.modules.ping"):
    """A script shaped as ansible-core 2.19's AnsiballZ (its call names the
    module), whose `_ansiballz_main` runs `body`."""
    return (b"import atexit, json, os, sys, warnings\n"
            b"def _ansiballz_main(**kw):\n"
            + b"".join(b"    " + line + b"\n" for line in body.splitlines())
            + b'\nif __name__ == "__main__":\n    _ansiballz_main(\n'
            + b"module_fqn='" + fqn.encode() + b"',\n" + b"zip_data=" + EMPTY_ZIP + b",\n)\n")


PROBE = (b"print(json.dumps({'pid': os.getpid(), 'cwd': os.getcwd(), 'umask': os.umask(0),\n"
         b"    'env': os.environ.get('ARBOR_LEAK'), 'argv': sys.argv, 'name': __name__,\n"
         b"    'leak_mod': 'ansible_leak' in sys.modules,\n"
         b"    'path': [p for p in sys.path if 'leak' in p],\n"
         b"    'filters': len([f for f in warnings.filters if f[0] == 'error'])}))\n"
         b"sys.stderr.write('probe\\n')\n")


def test_listed_modules_run_in_process_and_leave_nothing_behind(link, tmp_path):
    """A module on the in-process list runs in the agent itself; what it
    changes in the process is put back before the next one, its exit
    handlers run, and its stdout, stderr and status are its own."""
    python = os.path.realpath(sys.executable)
    cmd = {"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}
    mark = tmp_path / "atexit-ran"
    leaky = fake_ansiballz(
        b"os.environ['ARBOR_LEAK'] = '1'\n"
        b"os.chdir('/')\n"
        b"os.umask(0o077)\n"
        b"sys.path.append('/leak')\n"
        b"warnings.simplefilter('error')\n"
        b"sys.modules['ansible_leak'] = sys\n"
        b"atexit.register(os.mkdir, %r)\n"
        b"print('{\"leaked\": true}')\n"
        b"sys.stderr.write('err\\n')\n"
        b"sys.exit(3)\n" % str(mark).encode())
    res, blob = link.call(cmd, leaky)
    assert res["rc"] == 3
    assert blob[:res["stdout_len"]] == b'{"leaked": true}\n' and blob[res["stdout_len"]:] == b"err\n"
    assert mark.is_dir(), "the module's exit handler did not run"
    res, blob = link.call(cmd, fake_ansiballz(PROBE))
    assert res["rc"] == 0 and blob[res["stdout_len"]:] == b"probe\n"
    got = json.loads(blob[:res["stdout_len"]])
    assert got["pid"] == link.proc.pid, "not run in the agent's own process"
    assert got["cwd"] == str(tmp_path) and got["umask"] == 0o022
    assert got["env"] is None and got["path"] == [] and got["filters"] == 0
    assert not got["leak_mod"]
    assert got["argv"] == [""] and got["name"] == "__main__"
    # A command started afterwards sees none of it either.
    res, blob = link.call({"op": "exec", "cmd": "pwd; umask; echo ${ARBOR_LEAK:-unset}"})
    assert blob[:res["stdout_len"]].split() == [str(tmp_path).encode(), b"0022", b"unset"]


def test_unlisted_modules_and_fork_isolation_fork(link):
    python = os.path.realpath(sys.executable)
    cmd = {"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}
    for script, req in ((fake_ansiballz(PROBE, "ansible.modules.command"), cmd),
                        (fake_ansiballz(PROBE), dict(cmd, isolation="fork"))):
        res, blob = link.call(req, script)
        got = json.loads(blob[:res["stdout_len"]])
        assert res["rc"] == 0 and got["pid"] != link.proc.pid


def test_modules_arriving_while_one_runs_in_process_wait_and_commands_do_not(link):
    """One in-process module at a time, and no fork while it runs (the fork
    would inherit the locks its thread holds): modules sent meanwhile wait
    for it, forked or not, and then see the process as it was before it; a
    command overtakes it."""
    python = os.path.realpath(sys.executable)
    cmd = {"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python}
    slow = fake_ansiballz(b"import time\nos.environ['ARBOR_LEAK'] = '1'\ntime.sleep(1)\n"
                          b"print(json.dumps({'pid': os.getpid()}))\n")
    sent = []
    for req, script in ((cmd, slow), (cmd, fake_ansiballz(PROBE)),
                        (dict(cmd, isolation="fork"), fake_ansiballz(PROBE)),
                        ({"op": "exec", "cmd": "echo ${ARBOR_LEAK:-unset}"}, b"")):
        link.stream += 1
        sent.append(link.stream)
        link.send(W.REQUEST, W.msg(req, script))
        time.sleep(0.2)
    replies = {}
    while len(replies) < 4:
        kind, _, _, _, stream, payload = link.frame()
        replies[stream] = W.split_msg(payload)
    assert list(replies) == [sent[3], sent[0], sent[1], sent[2]], "only the command overtakes"
    out = {s: r[1][:r[0]["stdout_len"]] for s, r in replies.items()}
    assert out[sent[3]] == b"unset\n"
    assert json.loads(out[sent[0]])["pid"] == link.proc.pid
    inproc, forked = json.loads(out[sent[1]]), json.loads(out[sent[2]])
    assert inproc["pid"] == link.proc.pid and forked["pid"] != link.proc.pid
    assert inproc["env"] is None and forked["env"] is None


def test_zips_rebuilt_from_members_read_as_the_originals(link, ansiballz):
    """The controller sends a module zip as members the agent does not hold
    yet; the agent rebuilds a zip with the same contents, keeps members for
    the next zip, and asks again (zip_miss) for one it no longer holds."""
    import zlib
    raw = {"ansible/__init__.py": b"", "ansible/module_utils/x.py": b"X = 1\n" * 50,
           "ansible/modules/m.py": "print('ok é')\n".encode()}
    members = []
    for name, body in raw.items():
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = c.compress(body) + c.flush()
        members.append((name, 8, zlib.crc32(body), len(body), data))
    import io, zipfile
    z = zipfile.ZipFile(io.BytesIO(M.build_zip(members)))
    assert z.testzip() is None and {n: z.read(n) for n in z.namelist()} == raw
    # Through the agent: a real module, its zip sent as members.
    python = os.path.realpath(sys.executable)
    start = ansiballz.index(b"\nzip_data=") + len(b"\nzip_data=")
    end = ansiballz.index(b",\n", start)
    lit = ansiballz[start:end]
    zf = zipfile.ZipFile(io.BytesIO(base64.b64decode(eval(lit))))
    manifest, blob = [], b""
    for i, info in enumerate(zf.infolist()):
        body = zf.read(info.filename)
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = c.compress(body) + c.flush()
        manifest.append({"n": info.filename, "k": "k%d" % i, "m": 8, "c": zlib.crc32(body),
                         "u": len(body), "s": len(data)})
        blob += data
    short = ansiballz[:start] + ansiballz[end:]
    req = {"op": "exec", "cmd": "/bin/sh -c '%s && sleep 0'" % python, "zip_key": "zk",
           "zip_at": start, "zip_members": manifest, "zip_blob": len(blob)}
    res, out = link.call(req, short + blob)
    assert res["rc"] == 0 and json.loads(out[:res["stdout_len"]])["stdout"] == "hi", out
    # A second zip naming the same members sends none of their bytes.
    again = dict(req, zip_key="zk2", zip_members=[{k: v for k, v in m.items() if k != "s"}
                                                  for m in manifest], zip_blob=0)
    res, out = link.call(again, short)
    assert res["rc"] == 0 and json.loads(out[:res["stdout_len"]])["stdout"] == "hi"
    gone = dict(again, zip_key="zk3", zip_members=again["zip_members"] + [
        {"n": "ansible/extra.py", "k": "never-sent", "m": 8, "c": 0, "u": 0}])
    res, _ = link.call(gone, short)
    assert res == {"error": "module zip not cached", "zip_miss": True}


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


RACE = r'''
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from arbor_agent.agent import skip_empty_select
if sys.argv[2] == "agent":
    skip_empty_select()
from ansible.module_utils import basic
basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": {}}).encode()
basic._ANSIBLE_PROFILE = "legacy"
module = basic.AnsibleModule(argument_spec={})
real_poll = subprocess.Popen.poll
polls = []

def poll(self):
    # The race: both pipes have ended, the first poll still finds the
    # command running, the next finds it reaped.
    polls.append(1)
    if len(polls) == 1:
        self.wait()
        return None
    return real_poll(self)

subprocess.Popen.poll = poll
start = time.monotonic()
rc, out, err = module.run_command(["sh", "-c", "echo out; echo err >&2"])
print(json.dumps({"rc": rc, "out": out, "err": err, "s": time.monotonic() - start}))
'''


@pytest.mark.parametrize("mode", ["vanilla", "agent"])
def test_run_command_does_not_sleep_on_no_pipes(mode):
    """ansible-core's run_command loop, with its cmd.poll() racing the
    command's exit as it does on a busy host: vanilla sleeps a second in a
    select on no pipes; in the agent the same loop ends at once, with the
    same result."""
    p = subprocess.run([sys.executable, "-c", RACE, str(AGENT_DIR), mode],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert (r["rc"], r["out"], r["err"]) == (0, "out\n", "err\n")
    if mode == "vanilla":
        assert r["s"] >= 0.9, r
    else:
        assert r["s"] < 0.5, r
