"""What runs beside the agent's loop: commands and forked modules (Job),
and modules in a thread of the agent (InProcess, with the process state
they may touch saved and put back). Piped commands are in pipes.py."""

import atexit
import io
import locale
import os
import signal
import sys
import threading
import traceback
import warnings

from .wire import READ_BYTES
from .modules import warmable_stdlib


class Job(object):
    """A command or forked module running while the agent serves others:
    its stdin is fed and its outputs read from the agent's loop; `finish`
    gets (exit status, outputs) when all outputs are at EOF."""

    def __init__(self, pid, outputs, stdin, data, finish):
        self.pid = pid
        self.files = dict((f.fileno(), f) for f in outputs)
        self.order = [f.fileno() for f in outputs]
        self.outs = dict((fd, []) for fd in self.order)
        self.readers = list(self.order)
        self.stdin = stdin
        self.view = memoryview(data)
        self.finish = finish
        if stdin is not None:
            if self.view:
                os.set_blocking(stdin.fileno(), False)
            else:
                stdin.close()
                self.stdin = None

    def writer(self):
        return self.stdin.fileno() if self.stdin is not None else None

    def fds(self):
        fds = list(self.files)
        if self.stdin is not None:
            fds.append(self.stdin.fileno())
        return fds

    def on_read(self, fd):
        chunk = os.read(fd, READ_BYTES)
        if chunk:
            self.outs[fd].append(chunk)
        else:
            self.readers.remove(fd)
            self.files.pop(fd).close()

    def on_write(self):
        try:
            n = os.write(self.stdin.fileno(), self.view[:READ_BYTES])
            self.view = self.view[n:]
        except BlockingIOError:
            return
        except BrokenPipeError:
            self.view = self.view[:0]
        if not self.view:
            self.stdin.close()
            self.stdin = None

    def done(self):
        return not self.readers and self.stdin is None

    def kill(self):
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        for f in self.files.values():
            f.close()
        self.files = {}
        if self.stdin is not None:
            self.stdin.close()
            self.stdin = None
        try:
            if self.pid is not None:
                os.waitpid(self.pid, 0)
        except OSError:
            pass


def _saved_globals():
    """Each imported ansible module's globals, and a copy of each dict,
    list and set among them, to be put back after an in-process module."""
    saved = []
    kinds = (dict, list, set)
    for name, mod in list(sys.modules.items()):
        d = getattr(mod, "__dict__", None) if name.startswith("ansible") else None
        if d is None:
            continue
        skip = d.get("__builtins__")
        boxes = [(v, v.copy()) for v in d.values() if type(v) in kinds and v is not skip]
        saved.append((d, d.copy(), boxes))
    return saved


def _restore_globals(saved):
    for d, copy, boxes in saved:
        d.clear()
        d.update(copy)
        for box, old in boxes:
            if type(box) is list:
                box[:] = old
            else:
                box.clear()
                box.update(old)


class ThreadJob(Job):
    """The Job of an in-process module: done at its thread's one byte."""

    def on_read(self, fd):
        os.read(fd, 1)
        self.readers.remove(fd)
        self.files.pop(fd).close()


class InProcess(object):
    """One module run in a thread of the persistent interpreter, as Mitogen
    runs modules by default: no fork, no copy-on-write, nothing imported
    again. The agent's loop goes on serving frames meanwhile.

    What a module may change in the process is saved before and put back
    after: cwd, umask, environment, locale, sys.path, argv, meta_path and
    stdio, warnings filters, the path importer cache, exit handlers (the
    module's run when it ends, as python3 would run them), and the globals
    of the ansible modules already imported (rebound names, and the contents
    of their dicts, lists and sets). The ansible modules it imported are
    dropped again; the agent then imports them warm, afresh, for the next.
    While it runs, commands the agent starts get the saved cwd, umask and
    environment. One at a time: modules that come meanwhile wait for it
    (the agent never forks while a module's thread runs, as the fork would
    inherit whatever locks the thread holds); commands do not wait."""

    def __init__(self, agent):
        try:
            self.cwd = os.getcwd()
        except OSError:
            self.cwd = None
        self.umask = agent.umask
        self.environ = dict(os.environ)
        self.locale = locale.setlocale(locale.LC_ALL)
        self.path = sys.path
        self.path_items = list(sys.path)
        self.argv = sys.argv
        self.executable = sys.executable
        self.meta_path = list(sys.meta_path)
        self.importers = set(sys.path_importer_cache)
        self.stdio = (sys.stdin, sys.stdout, sys.stderr)
        self.filters = list(warnings.filters)
        self.modules = set(sys.modules)
        self.globals = _saved_globals()
        self.register = atexit.register
        self.unregister = atexit.unregister
        self.exits = []
        self.rc = 1
        self.out = io.BytesIO()
        self.err = io.BytesIO()

    def start(self, codes, source, env, finder, warm, done, executable=None, path=None):
        """Runs `codes` in a thread, which writes a byte to `done` (a pipe
        the agent's loop owns and closes) when the module has ended;
        `sys.executable` is `executable` meanwhile, and `sys.argv` the
        script's path if it ran from a file."""
        self.done = done
        if executable:
            sys.executable = executable
        if warm in sys.meta_path:
            sys.meta_path.remove(warm)
        sys.meta_path.insert(0, finder)

        def text(raw, like, errors):
            return io.TextIOWrapper(raw, encoding=getattr(like, "encoding", None) or "utf-8",
                                    errors=errors, write_through=True)
        real = sys.__stderr__
        sys.stdin = open(os.devnull, "r")
        sys.stdout = text(self.out, real, getattr(sys.__stdout__, "errors", None) or "strict")
        sys.stderr = text(self.err, real, "backslashreplace")
        sys.argv = [path or ""]
        atexit.register = self.on_exit
        atexit.unregister = self.no_exit

        def body():
            try:
                self.rc = run_module_code(codes, source, env, path)
                for func, args, kwargs in reversed(self.exits):
                    try:
                        func(*args, **kwargs)
                    except SystemExit:
                        pass
                    except BaseException:
                        traceback.print_exc()
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                except BaseException:
                    pass
            finally:
                try:
                    os.write(done, b"x")
                except OSError:
                    pass
        t = threading.Thread(target=body, name="arbor-module")
        t.daemon = True
        t.start()

    def on_exit(self, func, *args, **kwargs):
        self.exits.append((func, args, kwargs))
        return func

    def no_exit(self, func):
        self.exits = [e for e in self.exits if e[0] != func]

    def end(self):
        """Puts the process back; (exit status, stdout, stderr, names of the
        module_utils and standard library modules it imported)."""
        # Read before the module's stdio goes: closing it closes these.
        out, err = self.out.getvalue(), self.err.getvalue()
        new = [n for n in list(sys.modules) if n not in self.modules]
        names = [n for n in new if n.startswith("ansible.module_utils") or warmable_stdlib(n)]
        for n in new:
            if n.startswith("ansible"):
                sys.modules.pop(n, None)
        _restore_globals(self.globals)
        sys.stdin.close()
        sys.stdin, sys.stdout, sys.stderr = self.stdio
        sys.argv = self.argv
        sys.executable = self.executable
        sys.path = self.path
        sys.path[:] = self.path_items
        sys.meta_path[:] = self.meta_path
        for k in [k for k in sys.path_importer_cache if k not in self.importers]:
            del sys.path_importer_cache[k]
        warnings.filters[:] = self.filters
        getattr(warnings, "_filters_mutated", lambda: None)()
        atexit.register = self.register
        atexit.unregister = self.unregister
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        try:
            if self.cwd is not None and os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError:
            pass
        os.umask(self.umask)
        try:
            if locale.setlocale(locale.LC_ALL) != self.locale:
                locale.setlocale(locale.LC_ALL, self.locale)
        except locale.Error:
            pass
        return self.rc, out, err, names


def run_module_code(codes, source, env, path=None):
    """Runs a module's compiled script as python3 would; its exit status."""
    try:
        for code in codes:
            exec(code if code is not None else compile(source, path or "<stdin>", "exec", dont_inherit=True), env)
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code & 0xFF
        sys.stderr.write("%s\n" % (e.code,))
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
