"""Commands and modules in the agent: pipelined modules in a fork of the
warm interpreter, module scripts put then run, zips kept and rebuilt from
members, listed modules in process, commands concurrent."""

import base64
import json
import os
import subprocess
import sys
import time

import pytest

from agentkit import AGENT_DIR, M, W


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
