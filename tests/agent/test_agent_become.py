"""Become as a nested agent started through a password prompt, and the
login environment a new command sees."""

import os
import sys
import time

from agentkit import F, W, Link, boot_code


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
