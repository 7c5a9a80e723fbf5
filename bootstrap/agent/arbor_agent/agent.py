"""The agent: one persistent interpreter per (host, account), its request
handling, teardown, and `main`."""

import collections
import os
import selectors
import shutil
import signal
import sys
import tempfile
import time

from .wire import LinkGone, REPLY, WireError, msg
from .bounds import LOG_LINES_MAX, SWEEP_PATHS_MAX
from .files import ENV_FILES, EnvFile, file_stat, sweep, symbolic_mode
from .modules import CodeCache, MODULE_FILE, MemberStore, WarmImports
from .pipes import Pipe
from .forwards import Forwards
from .become import Become, login_shell
from .link import Link
from .execute import Execute
from .transfer import Transfer


class Agent(Link, Become, Execute, Transfer):
    def __init__(self, node, rfd=0, wfd=1):
        self.node = node
        self.rfd = rfd
        self.wfd = wfd
        self.buf = bytearray()
        # Frames for this agent read off the link, not yet handled.
        self.inbox = collections.deque()
        self.inbox_bytes = 0
        self.children = {}  # node -> Child (nested agents, become)
        self.leaving = []  # children told to exit, not yet reaped
        self.puts = {}  # stream -> (src, Put)
        self.bodies = {}  # stream -> (src, request, [parts], size)
        self.served = 0
        # Errors of requests sent without waiting, by lane (the daemon gives
        # each Ansible worker connection its own lane).
        self.deferred = {}
        self.jobs = []  # commands and modules running
        self.pipes = {}  # stream -> Pipe
        self.forwards = Forwards(self.send)
        self.env_files = [EnvFile(p) for p in ENV_FILES]
        self.logs = collections.deque(maxlen=LOG_LINES_MAX)
        self.tmpdirs = set()  # the temp dirs this agent made and has not removed
        self.sweeper = None  # pipe to the child that removes them if we die
        self.payload = None  # this agent's own code, for nested agents (see main)
        self.sweeper_pid = None
        self.keepalive = None  # seconds the link may be silent (set by the daemon)
        self.heard = time.monotonic()
        self.shell = login_shell()
        self.python = os.path.realpath(sys.executable)
        self.zips = {}  # zip_key -> ModuleZip
        self.put_missed = set()  # module scripts not written: their zip was gone
        self.members = MemberStore()
        self.codes = CodeCache()
        self.wrappers = {}  # digest -> compiled AnsiballZ wrapper
        self.warm = WarmImports(self.codes)
        sys.meta_path.insert(0, self.warm)
        self.inproc = None  # the InProcess module running, if any
        self.waiting = collections.deque()  # modules waiting for it to end
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        # The agent's own stderr: an in-process module has its own.
        self.stderr = sys.stderr

    def handle(self, src, stream, req, blob):
        size = req.get("body_size")
        if size is not None and len(blob) != int(size):
            # Part of it was to come from a relay's cache, which missed.
            self.reply(src, stream, {"error": "request body of %d bytes, not %d" % (len(blob), int(size)),
                                     "zip_miss": True})
            return
        op = req.get("op")
        noreply = bool(req.get("noreply"))
        lane = req.get("lane")
        if self.deferred.get(lane) and not noreply and op != "ping":
            errors = self.deferred.pop(lane)
            self.reply(src, stream, {"error": "; ".join(errors)})
            return
        try:
            if op == "exec" and self.put_missed:
                m = MODULE_FILE.match(req.get("cmd") or "")
                if m and m.group("path") in self.put_missed:
                    self.put_missed.discard(m.group("path"))
                    self.reply(src, stream, {"error": "module script %s not written: its zip was not "
                                                      "cached" % m.group("path"), "zip_miss": True})
                    return
            if op == "put" and "zip_key" in req:
                self.put_module(src, stream, req, blob)
            elif op == "exec":
                script = self.with_zip(req, blob)
                if script is None:
                    self.reply(src, stream, {"error": "module zip not cached", "zip_miss": True})
                    return
                self.exec_(src, stream, req, *script)
            elif op == "put":
                self.put_start(src, stream, req, blob)
            elif op == "choose":
                n = int(req["split"])
                cands = {}
                for name, body in (("same", blob[:n]), ("differs", blob[n:])):
                    sub = dict(req[name])
                    script = self.with_zip(sub, body)
                    if script is None:
                        self.reply(src, stream, {"error": "module zip not cached", "zip_miss": True})
                        return
                    cands[name] = (sub, script)
                path = os.path.join(req.get("cwd") or os.getcwd(), req["path"])
                st = file_stat({"path": path, "follow": False, "checksum": True})
                if st["exists"] and st["isdir"]:
                    self.reply(src, stream, {"stat": st})
                else:
                    branch = "same" if st.get("checksum") == req["checksum"] else "differs"
                    sub, script = cands[branch]
                    sub["lane"] = req.get("lane")
                    sub["isolation"] = req.get("isolation")
                    sub["cwd"] = req.get("cwd")
                    self.exec_(src, stream, sub, *script, extra={"stat": st, "branch": branch})
            elif op == "pipe":
                self.pipes[stream] = Pipe.start(self, src, stream, req)
                self.send(REPLY, src, stream, msg({"streamed": True}))
            elif op == "resize":
                pipe = self.pipes.get(req.get("pipe"))
                if pipe is not None and pipe.src == src:
                    pipe.resize(req["rows"], req["cols"])
            elif op == "hangup":
                # The client went: the command goes, as sshd's does; or a
                # forward is no longer declared.
                pipe = self.pipes.get(req.get("pipe"))
                if pipe is not None and pipe.src == src:
                    del self.pipes[pipe.stream]
                    pipe.kill()
                else:
                    self.forwards.hangup(src, req.get("pipe"))
            elif op == "listen":
                self.forwards.listen(src, stream, req)
            elif op == "fwd_conn":
                self.forwards.bind(src, stream, req)
            elif op == "fwd_close":
                self.forwards.drop(req)
            elif op == "fetch":
                self.fetch(src, stream, req)
            elif op == "stat":
                self.answer(src, stream, req, {"stat": file_stat(req)})
            elif op == "mkdtemp":
                self.answer(src, stream, req, {"path": self.mkdtemp(req)})
            elif op == "chmod":
                bits = symbolic_mode(req["mode"])
                for path in req["paths"]:
                    bits(path)
                self.answer(src, stream, req, {})
            elif op == "rmtree":
                self.untrack_tmp(req["path"])
                shutil.rmtree(req["path"])
                self.answer(src, stream, req, {})
            elif op == "become":
                self.reply(src, stream, self.become(src, stream, req))
            elif op == "unbecome":
                # EOF ends it; waited for, so the interpreter bound holds.
                c = self.children.get(int(req["node"]))
                if c is not None:
                    c.close_input()
                    c.reap(2.0)
                self.answer(src, stream, req, {})
            elif op == "sync":
                self.reply(src, stream, {})
            elif op == "exit":
                # meta: reset_connection: end as at the end of the link.
                self.log("told to exit (the connection was reset)")
                raise LinkGone()
            elif op == "ping":
                self.reply(src, stream, {"pid": os.getpid(), "served": self.served})
            elif op == "keepalive":
                # The daemon pings well within this; silence past it means
                # the link is dead though the session still looks open.
                self.keepalive = max(1.0, float(req["secs"]))
                self.heard = time.monotonic()
                os.set_blocking(self.wfd, False)
            else:
                self.fail(src, stream, req, "unknown op %r" % (op,))
            self.served += 1
        except (WireError, LinkGone):
            raise
        except Exception as e:
            self.fail(src, stream, req, "%s: %s" % (type(e).__name__, e))

    def close(self):
        for _, p in self.puts.values():
            p.abort()
        self.puts.clear()
        jobs, self.jobs = self.jobs, []
        for j in jobs:
            j.kill()
        pipes, self.pipes = self.pipes, {}
        for pipe in pipes.values():
            pipe.kill()
        self.forwards.close()
        children = list(self.children.values()) + self.leaving
        self.children = {}
        self.leaving = []
        for c in children:
            c.close()
        deadline = time.monotonic() + 2.0
        for c in children:
            c.reap(max(0.05, deadline - time.monotonic()))
        for d in self.tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        self.tmpdirs = set()
        self.stop_sweeper()

    def stop_sweeper(self):
        """Ends the sweeper with the agent (its pipe closed, nothing left to
        sweep), waited for a little: no process of the agent's user lingers
        (a `userdel` of a become user runs right after)."""
        if self.sweeper is None:
            return
        os.close(self.sweeper)
        self.sweeper = None
        deadline = time.monotonic() + 2.0
        while self.sweeper_pid is not None and time.monotonic() < deadline:
            try:
                if os.waitpid(self.sweeper_pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.005)


def start_sweeper():
    """A child that outlives the agent only to remove its temp dirs: the
    agent (and its forks) write each dir made ("+path") and each removed
    ("-path") to the child's pipe, and when the pipe ends (the agent and
    its forks have exited, however: even kill -9) the child removes what
    is left and exits. It holds no other descriptor, so it keeps no link
    or session open. Dirs it holds are bounded: past SWEEP_PATHS_MAX, those
    already gone are forgotten."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, r)
            os.closerange(r + 1, max(r + 2, os.sysconf("SC_OPEN_MAX")))
            paths = set()
            buf = b""
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    p = line[1:].decode("utf-8", "surrogateescape")
                    if line[:1] == b"+":
                        paths.add(p)
                    elif line[:1] == b"-":
                        paths.discard(p)
                if len(paths) > SWEEP_PATHS_MAX:
                    paths = set(p for p in paths if os.path.lexists(p))
            for d in paths:
                shutil.rmtree(d, ignore_errors=True)
        finally:
            os._exit(0)
    os.close(r)
    return w, pid


def track_module_tempdirs(agent):
    """The AnsiballZ wrapper unpacks a module into `ansible_*_payload_*`
    (and AnsibleModule makes `ansible-moduletmp-*`) with tempfile.mkdtemp,
    and removes it at the end; a module killed with its agent cannot.
    Each such dir is told to the sweeper, from the agent or any fork."""
    real = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        path = real(suffix, prefix, dir)
        if isinstance(prefix, str) and prefix.startswith("ansible"):
            sweep(agent.sweeper, "+", os.path.abspath(path))
        return path
    mkdtemp.__doc__ = real.__doc__
    tempfile.mkdtemp = mkdtemp


def skip_empty_select():
    """ansible-core's run_command (2.17 to 2.21) can select for a second on
    no pipes at all: when both pipes end while the command is still being
    reaped, its first cmd.poll() finds it running, the second finds it
    ended, neither branch breaks, and the next select(1) has nothing to
    wait for but its timeout. Vanilla meets it too (1 in 16 here); a module
    forked warm meets it more often. Called from run_command, a select on
    no pipes returns at once: the loop then ends as it does after the
    second, with the same result."""
    real = selectors.PollSelector.select

    def select(self, timeout=None):
        if not self.get_map() and sys._getframe(1).f_code.co_name == "run_command":
            return []
        return real(self, timeout)
    select.__doc__ = real.__doc__
    selectors.PollSelector.select = select


def main(node, payload=None):
    """Runs the agent as node `node`; `payload` is its own code as it came
    (compressed), which nested agents are sent."""
    # A nested agent's terminal hangs up when its parent lets go of it; the
    # end of its link (EOF) is what ends it, after its cleanup. (A handler,
    # not SIG_IGN, so the commands it runs get the default back.)
    signal.signal(signal.SIGHUP, lambda *_: None)
    # The link moves off fds 0 and 1, which become /dev/null: nothing a
    # module or a command inherits or writes can reach the link.
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    sweeper, sweeper_pid = start_sweeper()
    agent = Agent(node, rfd, wfd)
    agent.payload = payload
    agent.sweeper = sweeper
    agent.sweeper_pid = sweeper_pid
    track_module_tempdirs(agent)
    skip_empty_select()
    sys.stdout = sys.stderr
    try:
        code = agent.run()
    except WireError as e:
        sys.stderr.write("arbor agent n%d: malformed frame, closing the link: %s\n" % (node, e))
        code = 65
    finally:
        agent.close()
    return code
