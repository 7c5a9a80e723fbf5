"""Running commands and modules: pipelined AnsiballZ modules (their zip
kept by key), module files put with pipelining off, in a thread or a fork."""

import atexit
import gc
import hashlib
import os
import signal
import subprocess
import sys
import traceback

from .wire import LinkGone, WireError, write_all
from .bounds import (MODULES_WAITING_MAX, MODULE_FILE_BYTES_MAX, PUT_MISSED_MAX, WRAPPERS_MAX,
                     ZIP_CACHE_BYTES_MAX)
from .modules import (INPROCESS_MODULES, MODULE_FILE, MODULE_FQN, ModuleZip, PIPELINED, WRAPPER_CALL,
                      ZIP_DATA, ZIP_NAME, ZipModules, build_zip, warmable_stdlib)
from .jobs import InProcess, Job, ThreadJob, run_module_code


class Execute(object):
    """Agent methods: execute."""

    def module_file(self, path):
        """(script, ModuleZip, offset of its literal) of an AnsiballZ script
        on disk, its zip kept as a pipelined module's is; None if the file
        cannot be read or is not one."""
        try:
            with open(path, "rb") as f:
                script = f.read(MODULE_FILE_BYTES_MAX + 1)
        except OSError:
            return None
        if len(script) > MODULE_FILE_BYTES_MAX or b"_ansiballz_main(" not in script:
            return None
        m = ZIP_DATA.search(script)
        if m is None:
            return script, None, None
        a, b = m.span(1)
        key = "file:" + hashlib.sha1(script[a:b]).hexdigest()
        return self.with_zip({"zip_key": key, "zip_span": [a, b]}, script)

    def with_zip(self, req, stdin):
        """(script, ModuleZip or None, offset of its literal in script): the
        module's zip is cut out of its script and kept for later calls, or
        is a kept one; None if it is not kept here (the caller resends it)."""
        key = req.get("zip_key")
        if key is None:
            return stdin, None, None
        if "zip_members" in req:
            return self.zip_from_members(req, stdin)
        if "zip_at" in req:
            mz = self.zips.get(key)
            if mz is None:
                return None
            return stdin, mz, int(req["zip_at"])
        a, b = req["zip_span"]
        mz = self.zips.get(key)
        if mz is None:
            mz = ModuleZip(stdin[a:b])
            if sum(z.size for z in self.zips.values()) + mz.size > ZIP_CACHE_BYTES_MAX:
                self.zips.clear()
            self.zips[key] = mz
        return bytes(stdin[:a]) + bytes(stdin[b:]), mz, a

    def zip_from_members(self, req, stdin):
        """(script, ModuleZip, offset) from a manifest of the zip's members
        and the bytes of those this agent did not hold yet (after the
        script); None if one it should hold is gone (the caller resends)."""
        key = req["zip_key"]
        blob_len = int(req["zip_blob"])
        script = bytes(stdin[:len(stdin) - blob_len])
        blob = memoryview(stdin)[len(stdin) - blob_len:]
        members = []
        at = 0
        for m in req["zip_members"]:
            if "s" in m:
                data = bytes(blob[at:at + int(m["s"])])
                at += int(m["s"])
                self.members.put(m["k"], data)
            else:
                data = self.members.get(m["k"])
                if data is None:
                    return None
            members.append((m["n"], int(m["m"]), int(m["c"]), int(m["u"]), data))
        mz = ModuleZip.from_zip(build_zip(members))
        if sum(z.size for z in self.zips.values()) + mz.size > ZIP_CACHE_BYTES_MAX:
            self.zips.clear()
        self.zips[key] = mz
        return script, mz, int(req["zip_at"])

    def after_module(self, names, files, rels):
        """After a module's reply, while idle: what it imported is imported
        here, and what it compiled is kept, so the next module forks warm
        and compiles nothing."""
        self.warm.warm(names)
        for rel in rels:
            entry = files.get(rel) if files else None
            if entry is not None:
                try:
                    self.codes.get(rel, *entry)
                except Exception:
                    pass

    def exec_(self, src, stream, req, script, mz=None, at=None, extra=None):
        """Starts a command (or a pipelined module, forked); it runs while
        the agent serves other requests, and is answered when it ends."""
        for f in self.env_files:
            changed = f.check()
            if changed:
                self.log("%s changed: %s" % (f.path, " ".join(changed)))
        cmd = req["cmd"]
        m = PIPELINED.match(cmd)
        python = m and (m.group("python") or m.group("bare"))
        if (m and b"_ansiballz_main(" in script and self.same_python(python)
                and self.known_format(script, mz)):
            # The module sees the interpreter its command names, as it would
            # run under it (a symlink's name, not the agent's).
            req = dict(req, executable=self.which_python(python))
            return self.start_module(src, stream, req, script, mz, at, extra)
        m = MODULE_FILE.match(cmd)
        if m and not script and self.same_python(m.group("python")):
            # Pipelining off: Ansible put the module's script in the task's
            # temp dir and runs `python3 PATH`. It runs in this warm
            # interpreter all the same, from the file, as python3 runs it.
            found = self.module_file(m.group("path"))
            if found is not None and self.known_format(found[0], found[1]):
                req = dict(req, executable=self.which_python(m.group("python")), script_path=m.group("path"))
                return self.start_module(src, stream, req, *found, extra=extra)
        stdin = script if mz is None else script[:at] + mz.literal + script[at:]
        # Its own process group, so the whole command can be stopped.
        proc = self.popen([self.shell, "-c", cmd], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=req.get("cwd"), start_new_session=True)

        def finish(outs):
            out, err = outs
            rc = proc.wait()
            self.reply(src, stream, dict(extra or {}, rc=rc, stdout_len=len(out)), out + err)
        self.jobs.append(Job(proc.pid, [proc.stdout, proc.stderr], proc.stdin, stdin, finish))

    def known_format(self, script, mz):
        """Whether a module script is an AnsiballZ this agent can run warm
        (its zip literal found); if not, says so at -vvv: it then runs as
        Ansible runs it, by a new interpreter."""
        if mz is not None or ZIP_DATA.search(script) is not None:
            return True
        self.log("warning: a module script in an AnsiballZ format arbor does not know "
                 "(no zip_data= or ZIPDATA = literal): it runs in a new interpreter, "
                 "without arbor's module cache")
        return False

    def script_code(self, source):
        """Compiled parts of a module script: its AnsiballZ wrapper, the same
        for every module, compiled once; then its call. [None]: compile the
        whole script in the child."""
        i = source.rfind(WRAPPER_CALL)
        if i < 0:
            return [None]
        head = source[:i]
        digest = hashlib.sha1(head).digest()
        code = self.wrappers.get(digest)
        if code is None:
            try:
                code = compile(head, "<stdin>", "exec", dont_inherit=True)
                tail = compile(source[i:], "<stdin>", "exec", dont_inherit=True)
            except SyntaxError:
                return [None]
            if len(self.wrappers) >= WRAPPERS_MAX:
                self.wrappers.clear()
            self.wrappers[digest] = code
        else:
            tail = compile(source[i:], "<stdin>", "exec", dont_inherit=True)
        return [code, tail]

    def which_python(self, path):
        """The interpreter a command names, found as the shell would find it."""
        if "/" not in path:
            for d in os.environ.get("PATH", "").split(os.pathsep):
                cand = os.path.join(d, path)
                if os.access(cand, os.X_OK):
                    return cand
        return path

    def same_python(self, path):
        return os.path.realpath(self.which_python(path)) == self.python

    def start_module(self, src, stream, req, script, mz, at, extra):
        """Runs a pipelined module in-process if it is on the list and not
        to be isolated, else in a fork; waits while a module runs
        in-process (the agent never forks then)."""
        if self.inproc is not None:
            if len(self.waiting) >= MODULES_WAITING_MAX:
                raise ValueError("%d modules already wait for this agent" % len(self.waiting))
            self.waiting.append((src, stream, req, script, mz, at, extra))
            return
        fqn = MODULE_FQN.search(script, max(0, script.rfind(WRAPPER_CALL)))
        if (req.get("isolation") != "fork" and fqn is not None
                and fqn.group(1).decode() in INPROCESS_MODULES):
            return self.run_inprocess(src, stream, script, mz, at, extra, req)
        return self.run_forked(src, stream, script, mz, at, extra, req)

    def start_waiting(self):
        """Starts the modules that waited, in order, until one runs
        in-process again."""
        while self.waiting and self.inproc is None:
            src, stream, req, script, mz, at, extra = self.waiting.popleft()
            try:
                self.start_module(src, stream, req, script, mz, at, extra)
            except (WireError, LinkGone):
                raise
            except Exception as e:
                self.fail(src, stream, req, "%s: %s" % (type(e).__name__, e))

    def popen(self, argv, **kw):
        """subprocess.Popen; while a module runs in-process, with the
        agent's own cwd, umask and environment, whatever the module did to
        them."""
        ip = self.inproc
        if ip is not None:
            if kw.get("env") is None:
                kw["env"] = ip.environ
            if kw.get("cwd") is None:
                kw["cwd"] = ip.cwd
            if sys.version_info >= (3, 9):
                kw["umask"] = ip.umask
        return subprocess.Popen(argv, **kw)

    def module_parts(self, script, mz, at, path=None):
        """(globals, source, the zip's files, compiled code) of a module's
        script (run from the file `path`, or from stdin). With its zip kept
        here, the zip literal is not compiled again and the zip's modules
        come from memory (ZipModules)."""
        env = {"__name__": "__main__", "__builtins__": __builtins__}
        if path:
            env["__file__"] = path
        if mz is None:
            m = ZIP_DATA.search(script)
            mz = ModuleZip(m.group(1)) if m else None
            source = script
        else:
            env[ZIP_NAME.decode()] = mz.b64()
            source = script[:at] + ZIP_NAME + script[at:]
        files = mz.files() if mz is not None else {}
        self.warm.add_files(files)
        # A script run from a file is compiled under its name, as python3
        # names it; only stdin's wrapper is the same for every module.
        return env, source, files, [None] if path else self.script_code(source)

    def run_inprocess(self, src, stream, script, mz=None, at=None, extra=None, req=None):
        """Runs a module in a thread of this interpreter (see InProcess), in
        the request's `cwd` if given (the local connection runs modules in
        the playbook's directory); answered as `python3 < script` (or
        `python3 SCRIPT_PATH`) would be."""
        req = req or {}
        cwd, executable, path = req.get("cwd"), req.get("executable"), req.get("script_path")
        env, source, files, codes = self.module_parts(script, mz, at, path)
        zipmods = ZipModules(files, self.codes)
        r_done, w_done = os.pipe()
        ip = self.inproc = InProcess(self)
        try:
            if cwd:
                os.chdir(cwd)
            ip.start(codes, source, env, zipmods, self.warm, w_done, executable, path)
        except BaseException:
            self.inproc = None
            ip.end()
            os.close(w_done)
            os.close(r_done)
            raise

        def finish(_outs):
            self.inproc = None
            os.close(w_done)
            rc, out, err, names = ip.end()
            self.reply(src, stream, dict(extra or {}, rc=rc, stdout_len=len(out)), out + err)
            self.after_module(names, files, zipmods.served)
            if not self.waiting:
                # The module_utils it imported were dropped: their cycles
                # are collected now, after the reply, or the agent's memory
                # grows run after run (a full collection comes ever later
                # as the heap grows).
                gc.collect()
            self.start_waiting()
        self.jobs.append(ThreadJob(None, [os.fdopen(r_done, "rb", 0)], None, b"", finish))

    def run_forked(self, src, stream, script, mz=None, at=None, extra=None, req=None):
        """Runs a module in a fork of this warm interpreter, as
        `python3 < script` (or `python3 SCRIPT_PATH`) would: same stdout,
        stderr and exit status."""
        req = req or {}
        cwd, executable, path = req.get("cwd"), req.get("executable"), req.get("script_path")
        env, source, files, codes = self.module_parts(script, mz, at, path)
        zipmods = ZipModules(files, self.codes)
        assert self.inproc is None, "no fork while a module runs in-process"
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        r_names, w_names = os.pipe()
        # The agent's objects move to the permanent generation for the
        # fork: a collection in the module then never walks (and so never
        # copies) the agent's pages. The parent takes them back at once.
        gc.freeze()
        pid = None
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                gc.unfreeze()
        if pid == 0:
            rc = 1
            try:
                os.setpgid(0, 0)
                if cwd:
                    os.chdir(cwd)
                # The module's exit handlers run as python3 would run them
                # (AnsibleModule removes its temp dir in one); the agent's
                # are not the module's.
                atexit._clear()
                # What the module imports beyond the warm set comes from its
                # own zip's sources, exactly as without arbor.
                if self.warm in sys.meta_path:
                    sys.meta_path.remove(self.warm)
                sys.meta_path.insert(0, zipmods)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(w_out, 1)
                os.dup2(w_err, 2)
                for fd in (null, r_out, w_out, r_err, w_err, r_names, self.rfd, self.wfd):
                    if fd > 2:
                        os.close(fd)
                for j in self.jobs:
                    for fd in j.fds():
                        os.close(fd)
                for pipe in self.pipes.values():
                    for fd in pipe.fds():
                        os.close(fd)
                for fd in self.forwards.fds():
                    os.close(fd)
                # A nested agent must see EOF when this one goes, whatever
                # the module leaves running.
                for c in self.children.values():
                    for fd in c.fds():
                        os.close(fd)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                if executable:
                    sys.executable = executable
                sys.stdin = open(0, "r", closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                sys.argv = [path or ""]
                rc = run_module_code(codes, source, env, path)
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                try:
                    atexit._run_exitfuncs()
                except BaseException:
                    pass
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    names = [n for n in list(sys.modules)
                             if n.startswith("ansible.module_utils") or warmable_stdlib(n)]
                    served = ["@" + rel for rel in zipmods.served]
                    write_all(w_names, "\n".join(names + served).encode())
                except BaseException:
                    pass
                finally:
                    os._exit(rc)
        os.close(w_out)
        os.close(w_err)
        os.close(w_names)
        outputs = [os.fdopen(r_out, "rb", 0), os.fdopen(r_err, "rb", 0), os.fdopen(r_names, "rb", 0)]

        def finish(outs):
            out, err, names = outs
            _, status = os.waitpid(pid, 0)
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            self.reply(src, stream, dict(extra or {}, rc=rc, stdout_len=len(out)), out + err)
            names = names.decode("utf-8", "replace").split()
            self.after_module([n for n in names if not n.startswith("@")], files,
                              [n[1:] for n in names if n.startswith("@")])
        self.jobs.append(Job(pid, outputs, None, b"", finish))

    def put_module(self, src, stream, req, blob):
        """A module's AnsiballZ script put in a task's temp dir, sent as a
        pipelined module's script is (without the zip this agent holds, or
        with the zip's members it lacks): written with its zip put back, the
        same members (names, CRCs, bytes as stored; a zip rebuilt from
        members is dated 1980, as in the pipelined path). If the zip is
        gone, nothing is written, and the command that runs the file answers
        zip_miss (the controller then puts it again whole)."""
        path = req["path"]
        got = self.with_zip(req, blob)
        if got is None:
            if len(self.put_missed) >= PUT_MISSED_MAX:
                self.put_missed.clear()
            self.put_missed.add(path)
            if not req.get("noreply"):
                self.reply(src, stream, {"error": "module zip not cached", "zip_miss": True})
            return
        script, mz, at = got
        data = script if mz is None else bytes(script[:at]) + mz.literal + bytes(script[at:])
        self.put_missed.discard(path)
        self.put_start(src, stream, dict(req, size=len(data), streamed=False), data)
