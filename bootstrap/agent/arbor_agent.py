# arbor agent: one persistent interpreter per (host, account) on a target.
#
# Sent by the first stage (first_stage.py) over the ssh channel and run from
# memory: nothing of it is written to disk. It speaks arbor frames on fd 0
# and fd 1 (layout: relay/wire/src/lib.rs; golden frames: tests/golden/).
# Payloads are a JSON object plus a binary blob (relay/wire/src/msg.rs).
#
# Standard library only, Python 3.6 and later.
#
# Requests (JSON "op"):
#   exec   {"cmd", "cwd"?}, blob: stdin      -> {"rc", "stdout_len"}, blob: stdout + stderr
#          with "zip_key" and "zip_span": [a, b]: keep stdin[a:b] (a module's
#          zip literal) under that key; with "zip_key" and "zip_at": n: the
#          kept literal goes back in at offset n ({"zip_miss": true} if gone)
#   put    {"path", "size", "mode"?}, blob: first bytes; then Data frames and End
#                                            -> {"size"}
#   fetch  {"path"}                          -> {"size"}, blob: first bytes; then Data, End
#   stat   {"path", "follow", "checksum"}    -> {"stat": what the stat module says,
#                                               less mime type and attributes}
#   mkdtemp {"base", "name"}                 -> {"path"}: base/arbor-<pid>/name, 0700;
#                                               base/arbor-<pid> is this agent's own
#                                               temp dir, removed when it exits
#   rmtree {"path"}                          -> {}
#   chmod  {"paths", "mode"}                 -> {}: mode one symbolic clause, e.g. u+rwx
#   sync   {}                                -> {}, or what failed unanswered
#   ping   {}                                -> {"pid", "served"}
#   become {"node", "cmd", "success", "timeout_s"}
#                                            -> {"node", "pid"}: runs cmd (a become
#          plugin's command around the agent's own start command) with a pty
#          as its controlling terminal; each output it prints before the
#          success marker goes to the caller as Data {"output"}; the caller
#          may answer with Data {"password"} or {"abort"}. A password line
#          goes to both the terminal (sudo, doas) and stdin (su, sudo -S):
#          whichever the program reads; the pty's copy is flushed and the
#          first stage skips stdin's. On success the nested agent gets this
#          agent's own code, and its frames are routed through here.
#   unbecome {"node"}                        -> {}: ends that nested agent (EOF)
#   choose {"path", "checksum", "split", "same": exec request, "differs": exec request},
#          blob: same's stdin[:split] + differs' stdin -> {"stat", "branch", "rc",
#          "stdout_len"}: stats path (no follow) and runs "same" if its sha1 is
#          checksum, else "differs"; only {"stat"} if path is a directory
#          (copy's stat and module in one round trip)
#   pipe   {"cmd"}                           -> {"streamed": true} at once; then
#          the command's stdout and stderr as Data {"fd": 1|2} + bytes, as
#          they come, and Data {"rc"} and End when it ends. Data frames to
#          the stream are its stdin; End closes it. (rsync --rsh, tunnelled.)
# Errors come back as {"error": message}. Any reply may carry "log": what
# the agent logged since its last reply (shown by the glue at -vvv).
# A request with "noreply": true is answered only if it fails, and then not
# at once: its error is the answer to the next request that is answered, so
# a task's steps can be sent without waiting for each (rmtree only logs).
# A request whose JSON has "streamed": true continues in Data frames and an
# End; so does a reply (its blob is then only the first part).

import ast
import atexit
import base64
import collections
import errno
import fcntl
import gc
import grp
import hashlib
import importlib.abc
import importlib.util
import io
import json
import locale
import os
import pwd
import pty
import re
import select
import selectors
import shlex
import shutil
import signal
import stat as stat_
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback
import warnings
import zipfile

MAGIC = 0xA7
VERSION = 1
HEADER = struct.Struct("<BBBBIIII")
HEADER_BYTES = HEADER.size
PAYLOAD_MAX = 1 << 20
CHUNK_BYTES = 256 * 1024
READ_BYTES = 64 * 1024
# Largest request body (e.g. a module's stdin) gathered from a stream.
BODY_BYTES_MAX = 256 * 1024 * 1024
# Frames buffered while a command runs, before the link counts as abused.
PENDING_BYTES_MAX = 64 * 1024 * 1024
FLAG_LZ4 = 0x01
# pam_env files whose later edits commands see, as after a new login.
ENV_FILES = ("/etc/environment", "~/.pam_environment")
# Longest wait for a pipe's command to exit once its outputs are closed.
PIPE_EXIT_WAIT_S = 5
# Log lines kept for the next reply.
LOG_LINES_MAX = 64
# What precedes a nested agent's node id and code on its stdin.
AGENT_MARKER = b"\0arbor\0"
# Nested agents (become) one agent may route for.
CHILDREN_MAX = 64
# Temp dirs the sweeper holds before it forgets those already gone.
SWEEP_PATHS_MAX = 4096
# Frames queued toward one nested agent before the link is read no more.
CHILD_QUEUE_BYTES_MAX = 8 * 1024 * 1024
# Longest wait for a become command's prompt or success.
BECOME_TIMEOUT_S_MAX = 600
# Output of a become command kept for its error message.
BECOME_OUTPUT_MAX = 4096

REQUEST, REPLY, DATA, END, ROUTE_ADD, ROUTE_DEL, UNDELIVERABLE, PING, PONG, CREDIT = range(1, 11)
KINDS = frozenset(range(1, 11))
CREDIT_PAYLOAD = struct.Struct("<Q")
# Credit that tells the sender the stream was dropped.
CREDIT_ALL = (1 << 64) - 1
CONTROLLER = 0

# Most bytes of module_utils sources kept in memory for warm imports.
WARM_BYTES_MAX = 64 * 1024 * 1024
# Most bytes of module zips (their AnsiballZ literal, decoded) kept for this run.
ZIP_CACHE_BYTES_MAX = 64 * 1024 * 1024
# Most bytes of zip members (as stored) kept for rebuilding module zips.
MEMBER_BYTES_MAX = 64 * 1024 * 1024
# Most bytes of module source whose compiled code is kept.
CODE_CACHE_BYTES_MAX = 64 * 1024 * 1024
# An AnsiballZ script's zip literal: ansible-core 2.19 and later pass it to
# their wrapper's call (`zip_data='…',`); 2.17 and 2.18 assign it in the
# wrapper (`    ZIPDATA = '…'`). A script with neither is a format arbor does
# not know: it runs as Ansible would run it, by a new interpreter.
ZIP_DATA = re.compile(rb"^(?:zip_data=|    ZIPDATA = )('[A-Za-z0-9+/=]*'),?$", re.M)
# What stands for the zip literal in a module's script while it runs here.
ZIP_NAME = b"__arbor_zip_data__"
# Where an AnsiballZ script's constant wrapper ends and its call begins.
WRAPPER_CALL = b'\nif __name__ == "__main__":\n'
WRAPPERS_MAX = 16
# Standard library modules a module imported are imported in the agent too,
# except these, whose import acts on the terminal or the process.
STDLIB = frozenset(getattr(sys, "stdlib_module_names", ()))
STDLIB_NEVER_WARM = frozenset((
    "__main__", "antigravity", "this", "readline", "rlcompleter", "curses",
    "tkinter", "turtle", "turtledemo", "idlelib", "pdb", "pydoc", "site",
    "sitecustomize", "usercustomize", "getpass", "tty", "pty", "webbrowser"))

# The command Ansible sends for a pipelined module: the interpreter reads the
# AnsiballZ script from stdin. Up to 2.20: `/bin/sh -c 'python3 && sleep 0'`;
# 2.21 leaves out `&& sleep 0`, and quotes only what needs it.
PIPELINED = re.compile(r"^/bin/sh -c (?:'(?P<python>/[^' ]+|python3?)(?: && sleep 0)?'"
                       r"|(?P<bare>/[^' ]+|python3?))$")
# How Ansible runs a module it has put in the task's temp dir.
MODULE_FILE = re.compile(r"^/bin/sh -c '(?P<python>/[^' ]+|python3?) "
                         r"(?P<path>/[^' ]+/AnsiballZ_[\w.]+\.py)(?: && sleep 0)?'$")
# Most module scripts remembered as not written (their zip was gone).
PUT_MISSED_MAX = 256
# Largest module script run from a file in this interpreter.
MODULE_FILE_BYTES_MAX = 64 * 1024 * 1024


class WireError(Exception):
    """Bytes that are not a frame; the link must close."""


class LinkGone(Exception):
    """The link to the tree ended (EOF): everything this agent runs stops."""


def decode(buf):
    """(frame, used) for the frame at the front of buf, or (None, needed).

    frame is (kind, flags, dst, src, stream, payload). Mirrors the Rust
    decoder: the header is checked before the payload is looked at.
    """
    if len(buf) >= 1 and buf[0] != MAGIC:
        raise WireError("BadMagic: %#04x" % buf[0])
    if len(buf) >= 2 and buf[1] != VERSION:
        raise WireError("BadVersion: %d" % buf[1])
    if len(buf) < HEADER_BYTES:
        return None, HEADER_BYTES
    _, _, kind, flags, dst, src, stream, length = HEADER.unpack_from(buf)
    if kind not in KINDS:
        raise WireError("UnknownKind: %d" % kind)
    if flags:
        # The only flag (lz4) is link-local between Rust nodes.
        raise WireError("UnknownFlags: %#04x" % flags)
    if length > PAYLOAD_MAX:
        raise WireError("TooLarge: %d" % length)
    total = HEADER_BYTES + length
    if len(buf) < total:
        return None, total
    return (kind, flags, dst, src, stream, bytes(buf[HEADER_BYTES:total])), total


def encode(kind, dst, src, stream, payload=b""):
    if len(payload) > PAYLOAD_MAX:
        raise ValueError("payload over the frame limit")
    return HEADER.pack(MAGIC, VERSION, kind, 0, dst, src, stream, len(payload)) + payload


def msg(obj, blob=b""):
    j = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return struct.pack("<I", len(j)) + j + blob


def split_msg(payload):
    if len(payload) < 4:
        raise WireError("BadPayload: message shorter than its length field")
    (n,) = struct.unpack_from("<I", payload)
    if n > len(payload) - 4:
        raise WireError("BadPayload: JSON length past the end")
    try:
        obj = json.loads(payload[4:4 + n].decode("utf-8"))
    except ValueError as e:  # bad UTF-8 or JSON
        raise WireError("BadPayload: %s" % e)
    if not isinstance(obj, dict):
        raise WireError("BadPayload: JSON is not an object")
    return obj, payload[4 + n:]


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]


def atomic_target(path):
    """A hidden temp file beside path, opened for writing."""
    d, base = os.path.split(path)
    for i in range(100):
        tmp = os.path.join(d or ".", ".%s.arbor-%d-%d.tmp" % (base, os.getpid(), i))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            return tmp, fd
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
    raise OSError(errno.EEXIST, "no free temp name beside %s" % path)


class _FollowPath(list):
    """A warm package's __path__: `<entry>/<package dir>` for each entry of
    sys.path, computed when searched, so a forked module still finds the
    package's other submodules in its own zip once that is on sys.path."""

    def __init__(self, rel_dir):
        list.__init__(self)
        self.rel_dir = rel_dir

    def _entries(self):
        return [os.path.join(p, self.rel_dir) for p in sys.path if p]

    def __iter__(self):
        return iter(self._entries())

    def __len__(self):
        return len(self._entries())

    def __getitem__(self, i):
        return self._entries()[i]


def module_path(files, fullname):
    """(path in the zip, is a package) of a module in `files`, or (None, False)."""
    rel = fullname.replace(".", "/")
    for cand, pkg in ((rel + "/__init__.py", True), (rel + ".py", False)):
        if cand in files:
            return cand, pkg
    return None, False


class CodeCache(object):
    """Compiled module code by (path in the zip, source digest): each source
    compiles once in this agent, and every fork inherits the result."""

    def __init__(self):
        self.codes = {}
        self.size = 0

    def get(self, rel, body, digest):
        key = (rel, digest)
        code = self.codes.get(key)
        if code is None:
            code = compile(body, "<arbor>/" + rel, "exec", dont_inherit=True)
            if self.size + len(body) > CODE_CACHE_BYTES_MAX:
                self.codes.clear()
                self.size = 0
            self.codes[key] = code
            self.size += len(body)
        return code


def build_zip(members):
    """A zip of `members` [(name, method, crc, size, stored bytes)], the
    bytes as stored in the zip they came from (no recompression)."""
    out = io.BytesIO()
    central = []
    for name, method, crc, size, data in members:
        raw = name.encode("utf-8")
        flags = 0 if len(raw) == len(name) else 0x800  # UTF-8 names
        offset = out.tell()
        # Dated 1980-01-01, as zip's earliest date.
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21,
                              crc, len(data), size, len(raw), 0))
        out.write(raw)
        out.write(data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0,
                                   0x21, crc, len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw)
    start = out.tell()
    for entry in central:
        out.write(entry)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central),
                          out.tell() - start, start, 0))
    return out.getvalue()


class MemberStore(object):
    """Zip members by content key (their bytes as stored), shared by every
    module zip: module_utils cross the link once. Bounded in bytes: when
    full it starts afresh (the controller then resends what is missing)."""

    def __init__(self):
        self.data = {}
        self.size = 0

    def get(self, key):
        return self.data.get(key)

    def put(self, key, data):
        if key in self.data:
            return
        if self.size + len(data) > MEMBER_BYTES_MAX:
            self.data.clear()
            self.size = 0
        self.data[key] = data
        self.size += len(data)


class ModuleZip(object):
    """One AnsiballZ zip as the controller sent it (its Python literal); its
    base64 text and its Python files are decoded once, on first use."""

    def __init__(self, literal):
        self.literal = bytes(literal)
        self._b64 = None
        self._files = None

    @classmethod
    def from_zip(cls, data):
        b64 = base64.b64encode(data).decode("ascii")
        mz = cls(("'%s'" % b64).encode("ascii"))
        mz._b64 = b64
        return mz

    @property
    def size(self):
        n = 2 * len(self.literal)
        if self._files:
            n += sum(len(body) for body, _ in self._files.values())
        return n

    def b64(self):
        if self._b64 is None:
            self._b64 = ast.literal_eval(self.literal.decode("ascii"))
        return self._b64

    def files(self):
        """{path in the zip: (source, digest)} of its .py files; {} if it is
        not a readable zip (the module then imports from its own copy)."""
        if self._files is None:
            files = {}
            try:
                with zipfile.ZipFile(io.BytesIO(base64.b64decode(self.b64()))) as z:
                    for name in z.namelist():
                        if name.endswith(".py"):
                            body = z.read(name)
                            files[name] = (body, hashlib.sha1(body).digest())
            except Exception:
                files = {}
            self._files = files
        return self._files


class MemoryModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder and loader of `ansible*` modules from sources held in memory
    (`files`: {path in a zip: (source, digest)}), with code from `codes`."""

    def __init__(self, files, codes):
        self.files = files
        self.codes = codes

    def origin(self, rel):
        raise NotImplementedError

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("ansible"):
            return None
        rel, pkg = module_path(self.files, fullname)
        if rel is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=self.origin(rel),
                                               is_package=pkg)
        spec.has_location = True  # __file__ is the origin
        return spec

    def create_module(self, spec):
        return None

    def is_package(self, fullname):
        return module_path(self.files, fullname)[1]

    def get_source(self, fullname):
        rel, _ = module_path(self.files, fullname)
        return self.files[rel][0].decode("utf-8") if rel else None

    def get_code(self, fullname):
        rel, _ = module_path(self.files, fullname)
        if rel is None:
            raise ImportError("arbor: %s is not held here" % fullname, name=fullname)
        body, digest = self.files[rel]
        return self.codes.get(rel, body, digest)

    def exec_module(self, module):
        rel, pkg = module_path(self.files, module.__name__)
        exec(self.get_code(module.__name__), module.__dict__)
        if pkg:
            # After the package's code: ansible/__init__.py replaces its
            # __path__ with a snapshot (pkgutil.extend_path).
            module.__path__ = _FollowPath(os.path.dirname(rel))


class ZipModules(MemoryModules):
    """In a forked module: the modules of its own zip, from memory, with
    code compiled once in the agent. The sources are the zip's own, so the
    module imports what zipimport would give it; only compiling is saved.
    Paths (`__file__`) are those inside the payload zip the wrapper made.
    What it served is reported to the agent, which compiles it for later."""

    def __init__(self, files, codes):
        MemoryModules.__init__(self, files, codes)
        self.served = []

    def origin(self, rel):
        root = sys.path[0] if sys.path and sys.path[0].endswith(".zip") else "<arbor>"
        return os.path.join(root, rel)

    def get_code(self, fullname):
        code = MemoryModules.get_code(self, fullname)
        self.served.append(module_path(self.files, fullname)[0])
        return code


# Modules that run in a thread of the persistent interpreter (no fork): the
# builtin ones that keep to themselves (no chdir, signals, daemons, locale
# or respawn of their own). Every other module forks: the default fork list
# is everything else. `arbor_task_isolation=fork` (or Mitogen's
# `mitogen_task_isolation=fork`) forks any module.
INPROCESS_MODULES = frozenset("ansible.modules." + m for m in (
    "assemble", "blockinfile", "copy", "file", "getent", "known_hosts",
    "lineinfile", "ping", "replace", "slurp", "stat", "tempfile"))
# Modules waiting for the in-process one to end (the agent never forks while
# a module's thread runs: the fork would inherit locks the thread holds).
MODULES_WAITING_MAX = 256
# The module an AnsiballZ script runs: in the call of 2.19 and later, in the
# wrapper's runpy call in 2.17 and 2.18.
MODULE_FQN = re.compile(rb"^(?:module_fqn=|        runpy\.run_module\(mod_name=)'([\w.]+)'", re.M)


def warmable_stdlib(name):
    """Whether `name` is a standard library module the agent may import for
    later modules (Python 3.10 and newer name them)."""
    top = name.partition(".")[0]
    return top in STDLIB and top not in STDLIB_NEVER_WARM and not top.startswith("_test")


class WarmImports(MemoryModules):
    """Keeps the module_utils and standard library modules that modules use
    imported in this interpreter, so a module forked from it does not import
    (or even look for) them again.

    Sources come from the AnsiballZ payloads themselves (their zip), held in
    memory. After a module has run, the `ansible.module_utils.*` modules it
    imported are imported here from those sources, and the standard library
    modules it imported are imported here as Python would; one that fails to
    import stays cold. Forked modules do not use this finder: whatever they import
    that is not warm comes from their own zip, as without arbor.
    """

    def __init__(self, codes):
        MemoryModules.__init__(self, {}, codes)
        self.size = 0
        self.cold = set()

    def origin(self, rel):
        return "<arbor-warm>/" + rel

    def add_files(self, files):
        for name, entry in files.items():
            if name.startswith("ansible/") and name not in self.files:
                if self.size + len(entry[0]) > WARM_BYTES_MAX:
                    return
                self.files[name] = entry
                self.size += len(entry[0])

    def warm(self, names):
        """Imports `names` here (parents first); never raises."""
        for name in sorted(set(names), key=lambda n: n.count(".")):
            if name in sys.modules or name in self.cold:
                continue
            if not (name.startswith("ansible.module_utils") or warmable_stdlib(name)):
                continue
            try:
                importlib.import_module(name)
            except BaseException:
                self.cold.add(name)
                sys.modules.pop(name, None)


class EnvFile(object):
    """A pam_env file (/etc/environment, ~/.pam_environment). sshd and sudo
    apply it at each login, so without arbor a task sees the edits earlier
    tasks made; a persistent interpreter would not. Before each command the
    file is checked, and a change applied where it is safe (the rules
    Mitogen documents):
    - a key new in the file is set if the environment lacks it;
    - a key whose value changed is updated, and a key removed from the file
      is removed, if the environment still holds the file's old value
      (otherwise something else set it after pam_env, e.g. /etc/profile:
      left alone).
    /etc/resolv.conf needs nothing: each module is a new process, and glibc
    reads it afresh (and again when it changes)."""

    environ = getattr(os, "environb", os.environ)

    def __init__(self, path):
        self.path = os.path.expanduser(path)
        self.st = self.stat()
        self.values = self.load()

    def stat(self):
        try:
            st = os.stat(self.path)
            return (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None

    def load(self):
        """{key: value} as pam_env reads it: KEY=VALUE lines, an optional
        `export`, shell quoting; comments and other lines skipped."""
        out = {}
        try:
            with open(self.path, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            return out
        for line in data.decode("latin-1").splitlines():
            try:
                bits = shlex.split(line, comments=True)
            except ValueError:
                continue
            if bits and bits[0] == "export":
                bits = bits[1:]
            key, sep, value = " ".join(bits).partition("=")
            if key and sep and " " not in key:
                out[key.encode("latin-1")] = value.encode("latin-1")
        return out

    def check(self):
        """Applies a change of the file; returns the keys it changed."""
        st = self.stat()
        if st == self.st:
            return []
        new = self.load()
        env = self.environ
        changed = []
        for key, old in self.values.items():
            if env.get(key) != old:
                continue
            if key not in new:
                del env[key]
                changed.append("-" + key.decode("latin-1"))
            elif new[key] != old:
                env[key] = new[key]
                changed.append(key.decode("latin-1"))
        for key, value in new.items():
            if key not in self.values and key not in env:
                env[key] = value
                changed.append("+" + key.decode("latin-1"))
        self.st, self.values = st, new
        return changed


class Put(object):
    """A file being written atomically: temp file, fsync, chmod, rename.
    Not `durable`: no fsync (a file in a task's temp dir, which goes with
    the task and which nothing reads after a crash)."""

    def __init__(self, path, size, mode, durable=True):
        self.path = path
        self.size = size
        self.durable = durable
        self.done = 0
        try:
            old = os.stat(path)
            self.mode = old.st_mode & 0o7777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            self.mode = mode if mode is not None else (0o666 & ~umask)
        # An unnamed file in the destination's filesystem where the kernel
        # offers one: a kill -9 mid-copy then leaves nothing behind. It is
        # given a name only when complete, and renamed over the old file.
        self.tmp, self.fd = None, None
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if tmpfile and os.path.isdir("/proc/self/fd"):
            try:
                self.fd = os.open(os.path.dirname(path) or ".", tmpfile | os.O_WRONLY, 0o600)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise self.error(e)
        if self.fd is None:
            try:
                self.tmp, self.fd = atomic_target(path)
            except OSError as e:
                raise self.error(e)

    def error(self, e):
        """An OSError that names the destination, and says so if the disk is full."""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return OSError(e.errno, "disk full: no space left for %s on its filesystem (%d of %d bytes "
                                    "written; the old file, if any, is unchanged)" % (self.path, self.done, self.size))
        return OSError(e.errno, "%s: %s" % (self.path, e.strerror or e))

    def write(self, data):
        if self.done + len(data) > self.size:
            raise ValueError("more bytes than announced for %s" % self.path)
        try:
            write_all(self.fd, data)
        except OSError as e:
            raise self.error(e)
        self.done += len(data)

    def finish(self):
        if self.done != self.size:
            raise ValueError("%s: got %d of %d bytes" % (self.path, self.done, self.size))
        try:
            if self.durable:
                os.fsync(self.fd)
            os.fchmod(self.fd, self.mode)
            if self.tmp is None:
                self.tmp = self.link_unnamed()
            os.close(self.fd)
            self.fd = None
            os.rename(self.tmp, self.path)
            if self.durable:
                dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise self.error(e)

    def link_unnamed(self):
        """Names the unnamed file (linkat through /proc/self/fd; a dir fd
        makes Python use linkat with AT_SYMLINK_FOLLOW, not link)."""
        d, base = os.path.split(self.path)
        procfd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(100):
                tmp = os.path.join(d or ".", ".%s.arbor-%d-%d.tmp" % (base, os.getpid(), i))
                try:
                    os.link(str(self.fd), tmp, src_dir_fd=procfd, follow_symlinks=True)
                    return tmp
                except OSError as e:
                    if e.errno != errno.EEXIST:
                        raise
        finally:
            os.close(procfd)
        raise OSError(errno.EEXIST, "no free temp name beside %s" % self.path)

    def abort(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


SYMBOLIC = re.compile(r"^([ugoa]*)([-+=])([rwx]*)$")


def symbolic_mode(mode):
    """A function applying one chmod clause like `u+rwx` to a path."""
    m = SYMBOLIC.match(mode)
    if not m:
        raise ValueError("unsupported mode %r" % (mode,))
    who, op, perms = m.groups()
    who = who or "a"
    mask = 0
    for w, shift in (("u", 6), ("g", 3), ("o", 0)):
        if w in who or "a" in who:
            for p, bit in (("r", 4), ("w", 2), ("x", 1)):
                if p in perms:
                    mask |= bit << shift
    clear = 0
    if op == "=":
        for w, shift in (("u", 6), ("g", 3), ("o", 0)):
            if w in who or "a" in who:
                clear |= 7 << shift

    def apply(path):
        cur = stat_.S_IMODE(os.stat(path).st_mode)
        if op == "+":
            new = cur | mask
        elif op == "-":
            new = cur & ~mask
        else:
            new = (cur & ~clear) | mask
        os.chmod(path, new)
    return apply


def file_stat(req):
    """What Ansible's stat module answers for `path` (without the mime type
    and file attributes, which need other programs and which no action
    plugin reads)."""
    path = os.path.expanduser(os.path.expandvars(req["path"]))
    try:
        st = os.stat(path) if req.get("follow") else os.lstat(path)
    except FileNotFoundError:
        return {"exists": False}
    mode = st.st_mode
    out = {
        "exists": True, "path": path, "mode": "%04o" % stat_.S_IMODE(mode),
        "isdir": stat_.S_ISDIR(mode), "ischr": stat_.S_ISCHR(mode), "isblk": stat_.S_ISBLK(mode),
        "isreg": stat_.S_ISREG(mode), "isfifo": stat_.S_ISFIFO(mode),
        "islnk": stat_.S_ISLNK(mode), "issock": stat_.S_ISSOCK(mode),
        "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size, "inode": st.st_ino,
        "dev": st.st_dev, "nlink": st.st_nlink,
        "atime": st.st_atime, "mtime": st.st_mtime, "ctime": st.st_ctime,
    }
    for name, bit in (("wusr", stat_.S_IWUSR), ("rusr", stat_.S_IRUSR), ("xusr", stat_.S_IXUSR),
                      ("wgrp", stat_.S_IWGRP), ("rgrp", stat_.S_IRGRP), ("xgrp", stat_.S_IXGRP),
                      ("woth", stat_.S_IWOTH), ("roth", stat_.S_IROTH), ("xoth", stat_.S_IXOTH),
                      ("isuid", stat_.S_ISUID), ("isgid", stat_.S_ISGID)):
        out[name] = bool(mode & bit)
    for attr, name in (("st_blocks", "blocks"), ("st_blksize", "block_size"), ("st_rdev", "device_type")):
        if hasattr(st, attr):
            out[name] = getattr(st, attr)
    for name, flag in (("readable", os.R_OK), ("writeable", os.W_OK), ("executable", os.X_OK)):
        out[name] = os.access(path, flag)
    if out["islnk"]:
        out["lnk_source"] = os.path.realpath(path)
        out["lnk_target"] = os.readlink(path)
    try:
        out["pw_name"] = pwd.getpwuid(st.st_uid).pw_name
    except (TypeError, KeyError):
        pass
    try:
        out["gr_name"] = grp.getgrgid(st.st_gid).gr_name
    except (KeyError, ValueError, OverflowError):
        pass
    if out["isreg"] and out["readable"] and req.get("checksum", True):
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(64 * 1024), b""):
                h.update(block)
        out["checksum"] = h.hexdigest()
    return out


def login_shell():
    """The account's shell, which runs commands as sshd would run them; for
    an account without one (nologin, false: a nested agent under a system
    account), /bin/sh, as Ansible's become command uses."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    if not shell or os.path.basename(shell) in ("nologin", "false") or not os.access(shell, os.X_OK):
        return "/bin/sh"
    return shell


class BecomeFailed(Exception):
    pass


def _take_tty():
    """In a become command's child, after setsid: its stderr (a pty) becomes
    its controlling terminal, where sudo, su and doas ask for passwords."""
    fcntl.ioctl(2, termios.TIOCSCTTY, 0)


class Child(object):
    """A nested agent started by this one under another account (become).
    Frames addressed to it are queued to its stdin; frames it writes are
    checked (it speaks only for itself) and passed up. Its pty, its
    controlling terminal, is drained to this agent's stderr."""

    def __init__(self, node, proc, tty):
        self.node = node
        self.proc = proc
        self.inp = proc.stdin.fileno()
        self.out = proc.stdout.fileno()
        self.tty = tty
        self.buf = bytearray()
        self.queue = bytearray()
        self.up = False

    def fds(self):
        return [fd for fd in (self.inp, self.out, self.tty) if fd is not None]

    def close_input(self):
        """EOF on its link: the nested agent exits."""
        if self.inp is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.inp = None
        self.queue = bytearray()

    def close(self):
        self.close_input()
        if self.out is not None:
            self.proc.stdout.close()
            self.out = None
        if self.tty is not None:
            os.close(self.tty)
            self.tty = None

    def reap(self, wait_s):
        """Waits for it to exit; True if it did."""
        try:
            self.proc.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass  # it may run as another user; EOF ends it anyway
            return False


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


class Pipe(object):
    """A command whose stdin and outputs stream both ways while it runs
    (`pipe`): what arrives for its stream is written to its stdin, what it
    prints goes out at once."""

    def __init__(self, src, stream, proc):
        self.src = src
        self.stream = stream
        self.proc = proc
        self.outs = {proc.stdout.fileno(): (1, proc.stdout), proc.stderr.fileno(): (2, proc.stderr)}
        self.inq = bytearray()
        self.eof = False
        os.set_blocking(proc.stdin.fileno(), False)

    def writer(self):
        if self.proc.stdin is None:
            return None
        if self.inq:
            return self.proc.stdin.fileno()
        if self.eof:
            self.proc.stdin.close()
            self.proc.stdin = None
        return None

    def on_write(self):
        try:
            n = os.write(self.proc.stdin.fileno(), self.inq[:4 * READ_BYTES])
            del self.inq[:n]
        except BlockingIOError:
            pass
        except OSError:
            # It stopped reading (exited): what it did not read is dropped.
            self.inq = bytearray()
            self.eof = True

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        for _, f in self.outs.values():
            f.close()
        self.outs = {}
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.stdin = None
        self.proc.wait()


class Agent(object):
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
        self.env_files = [EnvFile(p) for p in ENV_FILES]
        self.logs = collections.deque(maxlen=LOG_LINES_MAX)
        self.tmpdirs = set()  # the temp dirs this agent made and has not removed
        self.sweeper = None  # pipe to the child that removes them if we die
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

    def send(self, kind, dst, stream, payload=b""):
        self.write_link(encode(kind, dst, self.node, stream, payload))

    def write_link(self, data):
        """Writes to the link. Once the daemon has set a keepalive, the link
        is non-blocking and a write that makes no progress for that long
        means the link is dead (the agent then ends, as at EOF)."""
        if self.keepalive is None:
            write_all(self.wfd, data)
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                n = 0
            if n:
                view = view[n:]
                self.heard = time.monotonic()  # it took our bytes: the link moves
                continue
            left = self.heard + self.keepalive - time.monotonic()
            if left <= 0:
                self.log("the link took nothing for %.0f s; exiting" % self.keepalive)
                raise LinkGone()
            try:
                select.select([], [self.wfd], [], left)
            except InterruptedError:
                pass

    def log(self, message):
        """To stderr, and to the controller with the next reply (-vvv)."""
        line = "n%d: %s" % (self.node, message)
        self.logs.append(line[:1000])
        try:
            self.stderr.write("arbor agent %s\n" % line)
            self.stderr.flush()
        except Exception:
            pass

    def reply(self, src, stream, obj, blob=b""):
        """Replies; a blob over one chunk is streamed after the reply."""
        if self.logs:
            obj = dict(obj, log=list(self.logs))
            self.logs.clear()
        if len(blob) <= CHUNK_BYTES:
            self.send(REPLY, src, stream, msg(obj, blob))
            return
        obj = dict(obj, streamed=True)
        self.send(REPLY, src, stream, msg(obj, blob[:CHUNK_BYTES]))
        for i in range(CHUNK_BYTES, len(blob), CHUNK_BYTES):
            self.send(DATA, src, stream, blob[i:i + CHUNK_BYTES])
        self.send(END, src, stream, b"")

    def hello(self):
        info = {"pid": os.getpid(), "python": sys.version.split()[0],
                "uid": os.getuid(), "executable": sys.executable, "sweeper": self.sweeper_pid,
                "ppid": os.getppid()}
        try:
            pw = pwd.getpwuid(os.getuid())
            info.update(user=pw.pw_name, home=pw.pw_dir)
        except KeyError:
            pass
        self.send(ROUTE_ADD, CONTROLLER, 0, msg(info))

    def run(self):
        self.hello()
        try:
            while True:
                while self.inbox:
                    frame = self.inbox.popleft()
                    self.inbox_bytes -= len(frame[5])
                    self.dispatch(frame)
                self.wait_io()
        except LinkGone:
            return 0

    # ------------------------------------------------------------ the link

    def wait_io(self, readers=(), writers=(), timeout=None):
        """Waits for the link, the nested agents and `readers`/`writers`;
        handles the link (frames for this agent go to the inbox, frames for
        a nested agent to its queue) and the nested agents. Returns the
        ready fds of `readers` and `writers`. Raises LinkGone at EOF."""
        watch = list(readers)
        wlist = list(writers)
        full = self.inbox_bytes >= PENDING_BYTES_MAX
        for c in self.children.values():
            if c.out is not None:
                watch.append(c.out)
            if c.tty is not None:
                watch.append(c.tty)
            if c.queue and c.inp is not None:
                wlist.append(c.inp)
            full = full or len(c.queue) >= CHILD_QUEUE_BYTES_MAX
        for j in self.jobs:
            watch.extend(j.readers)
            if j.writer() is not None:
                wlist.append(j.writer())
        for pipe in self.pipes.values():
            watch.extend(pipe.outs)
            if pipe.writer() is not None:
                wlist.append(pipe.writer())
            full = full or len(pipe.inq) >= CHILD_QUEUE_BYTES_MAX
        if not full:
            watch.append(self.rfd)
            if self.keepalive is not None:
                left = self.heard + self.keepalive - time.monotonic()
                if left <= 0 and not select.select([self.rfd], [], [], 0)[0]:
                    # (Frames waiting unread mean we were busy, not it.)
                    self.log("nothing from the link for %.0f s; exiting" % self.keepalive)
                    raise LinkGone()
                left = max(left, 0.05)
                timeout = left if timeout is None else min(timeout, left)
        else:
            self.heard = time.monotonic()  # not reading: the silence is ours
        try:
            r, w, _ = select.select(watch, wlist, [], timeout)
        except InterruptedError:
            return [], []
        if self.jobs:
            self.service_jobs(r, w)
        if self.pipes:
            self.service_pipes(r, w)
        for c in list(self.children.values()):
            if c.inp is not None and c.inp in w:
                self.child_flush(c)
            if c.tty is not None and c.tty in r:
                self.child_tty(c)
            if c.out is not None and c.out in r:
                self.child_output(c)
        if self.rfd in r:
            self.take_input()
        return [fd for fd in r if fd in readers], [fd for fd in w if fd in writers]

    def service_jobs(self, r, w):
        for j in list(self.jobs):
            for fd in list(j.readers):
                if fd in r:
                    j.on_read(fd)
            if j.writer() is not None and j.writer() in w:
                j.on_write()
            if j.done():
                self.jobs.remove(j)
                try:
                    j.finish([b"".join(j.outs[fd]) for fd in j.order])
                except (WireError, LinkGone):
                    raise
                except Exception as e:
                    self.log("finishing a command: %s: %s" % (type(e).__name__, e))

    def service_pipes(self, r, w):
        for pipe in list(self.pipes.values()):
            if pipe.proc.stdin is not None and pipe.proc.stdin.fileno() in w:
                pipe.on_write()
            for fd in list(pipe.outs):
                if fd not in r:
                    continue
                which, f = pipe.outs[fd]
                chunk = os.read(fd, READ_BYTES)
                if chunk:
                    self.send(DATA, pipe.src, pipe.stream, msg({"fd": which}, chunk))
                else:
                    f.close()
                    del pipe.outs[fd]
            if not pipe.outs:
                # Its outputs are closed: it has exited, or will at once.
                pipe.eof = True
                pipe.writer()
                try:
                    rc = pipe.proc.wait(timeout=PIPE_EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    # Its outputs are closed but it lingers: ended, so the
                    # agent is not held.
                    try:
                        os.killpg(pipe.proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    rc = pipe.proc.wait()
                del self.pipes[pipe.stream]
                self.send(DATA, pipe.src, pipe.stream, msg({"rc": rc}))
                self.send(END, pipe.src, pipe.stream, b"")

    def take_input(self):
        try:
            chunk = os.read(self.rfd, READ_BYTES)
        except InterruptedError:
            return
        if not chunk:
            raise LinkGone()
        self.heard = time.monotonic()
        self.buf.extend(chunk)
        while True:
            frame, used = decode(self.buf)
            if frame is None:
                return
            del self.buf[:used]
            dst = frame[2]
            if dst == self.node:
                self.inbox.append(frame)
                self.inbox_bytes += len(frame[5])
                continue
            c = self.children.get(dst)
            if c is not None and c.inp is not None:
                kind, _, dst, src, stream, payload = frame
                c.queue.extend(encode(kind, dst, src, stream, payload))

    def child_flush(self, c):
        try:
            n = os.write(c.inp, c.queue[:4 * READ_BYTES])
        except BlockingIOError:
            return
        except OSError:
            self.child_gone(c, "its link closed")
            return
        del c.queue[:n]

    def child_tty(self, c):
        try:
            data = os.read(c.tty, READ_BYTES)
        except OSError:
            data = b""
        if not data:
            os.close(c.tty)
            c.tty = None
            return
        text = data.decode("utf-8", "replace").strip()
        if text:
            self.log("n%d's terminal: %s" % (c.node, text))

    def child_output(self, c):
        try:
            chunk = os.read(c.out, READ_BYTES)
        except OSError:
            chunk = b""
        if not chunk:
            self.child_gone(c, "its interpreter exited")
            return
        c.buf.extend(chunk)
        while True:
            try:
                frame, used = decode(c.buf)
            except WireError as e:
                self.child_gone(c, "malformed frame: %s" % e)
                return
            if frame is None:
                return
            del c.buf[:used]
            kind, _, dst, src, stream, payload = frame
            if src != c.node or kind == ROUTE_DEL:
                self.child_gone(c, "it spoke for node %d" % src)
                return
            if kind == ROUTE_ADD:
                c.up = True
            if dst != self.node:
                self.write_link(encode(kind, dst, src, stream, payload))

    def child_gone(self, c, why):
        """A nested agent left: its route is withdrawn up the tree."""
        if self.children.get(c.node) is not c:
            return
        del self.children[c.node]
        self.log("nested interpreter n%d (pid %d) left: %s" % (c.node, c.proc.pid, why))
        c.close()
        self.leaving.append(c)
        self.write_link(encode(ROUTE_DEL, CONTROLLER, c.node, 0, why.encode()))
        self.leaving = [x for x in self.leaving if x.proc.poll() is None]

    def dispatch(self, frame):
        kind, _, dst, src, stream, payload = frame
        if dst != self.node:
            return
        if kind == PING:
            self.send(PONG, src, stream, payload)
        elif kind == REQUEST:
            self.request(src, stream, payload)
        elif kind in (DATA, END):
            self.stream_part(kind, src, stream, payload)

    def request(self, src, stream, payload):
        try:
            req, blob = split_msg(payload)
        except WireError as e:
            # A whole frame with a bad message: answered, the link stays.
            self.reply(src, stream, {"error": "malformed request: %s" % e})
            return
        if req.get("streamed") and (req.get("op") != "put" or "zip_key" in req):
            self.bodies[stream] = (src, req, [blob], len(blob))
            return
        self.handle(src, stream, req, blob)

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
                proc = self.popen([self.shell, "-c", req["cmd"]], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
                self.pipes[stream] = Pipe(src, stream, proc)
                self.send(REPLY, src, stream, msg({"streamed": True}))
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

    def answer(self, src, stream, req, obj, blob=b""):
        if not req.get("noreply"):
            self.reply(src, stream, obj, blob)

    def fail(self, src, stream, req, message):
        """An error: the answer, or for a request sent without waiting, the
        answer to the next one (rmtree: only logged, as Ansible only warns)."""
        if not req.get("noreply"):
            self.reply(src, stream, {"error": message})
            return
        what = "%s %s" % (req.get("op"), req.get("path") or req.get("name") or "")
        message = "an earlier request (%s) failed: %s" % (what.strip(), message)
        if req.get("op") == "rmtree":
            self.log(message)
        else:
            errors = self.deferred.setdefault(req.get("lane"), [])
            if len(errors) < 16 and len(self.deferred) <= 1024:
                errors.append(message)

    def mkdtemp(self, req):
        """A task's temp dir, named as Ansible names it, where Ansible puts
        it (`remote_tmp/ansible-tmp-...`), made as Ansible's shell command
        makes it (umask 077); the sweeper removes it if the agent dies."""
        base, name = req["base"], req["name"]
        if not name or "/" in name or name in (".", ".."):
            raise ValueError("bad temp dir name %r" % (name,))
        umask = os.umask(0o077)
        try:
            os.makedirs(base, exist_ok=True)
            path = os.path.join(base, name)
            os.mkdir(path, 0o700)
        finally:
            os.umask(umask)
        self.track_tmp(path)
        return path

    def track_tmp(self, path):
        """`path` is removed when this agent ends, even by kill -9."""
        path = os.path.normpath(path)
        self.tmpdirs.add(path)
        sweep(self.sweeper, "+", path)

    def untrack_tmp(self, path):
        path = os.path.normpath(path)
        if path in self.tmpdirs:
            self.tmpdirs.discard(path)
            sweep(self.sweeper, "-", path)

    # ------------------------------------------------------------ become

    def become(self, src, stream, req):
        """Starts a nested agent through a become command (see the header)."""
        node = int(req["node"])
        payload = globals().get("ARBOR_PAYLOAD")
        if payload is None:
            raise BecomeFailed("this agent has no copy of its own code")
        if node in self.children or node in (self.node, CONTROLLER):
            raise BecomeFailed("node %d is taken" % node)
        if len(self.children) >= CHILDREN_MAX:
            raise BecomeFailed("more than %d nested interpreters" % CHILDREN_MAX)
        success = req["success"].encode()
        timeout = min(float(req.get("timeout_s") or 30), BECOME_TIMEOUT_S_MAX)
        master, slave = pty.openpty()
        try:
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            proc = self.popen([self.shell, "-c", req["cmd"]], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=slave, close_fds=True,
                              start_new_session=True, preexec_fn=_take_tty)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        c = Child(node, proc, master)
        seen = bytearray()  # output so far, for the error message
        out = bytearray()  # stdout until the success marker
        deadline = time.monotonic() + timeout
        try:
            while True:
                new = bytearray()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BecomeFailed("no become prompt or success within %ds" % timeout)
                r, _ = self.wait_io([c.out, c.tty], [], left)
                if c.tty in r:
                    try:
                        new += os.read(c.tty, READ_BYTES)
                    except OSError:
                        pass
                if c.out in r:
                    chunk = os.read(c.out, READ_BYTES)
                    if not chunk:
                        seen += new
                        status = proc.wait()
                        # What it said last, on its terminal.
                        while select.select([c.tty], [], [], 0.05)[0]:
                            try:
                                last = os.read(c.tty, READ_BYTES)
                            except OSError:
                                break
                            if not last:
                                break
                            seen += last
                        raise BecomeFailed("the become command exited with status %s" % status)
                    out += chunk
                    i = out.find(success)
                    if i >= 0 and out.find(b"\n", i) >= 0:
                        new += out[:i]
                        c.buf += out[out.find(b"\n", i) + 1:]
                        break
                    if i < 0:
                        keep = len(success)
                        new += out[:-keep] if len(out) > keep else b""
                        del out[:max(0, len(out) - keep)]
                if new:
                    seen += new
                    del seen[:max(0, len(seen) - BECOME_OUTPUT_MAX)]
                    self.send(DATA, src, stream,
                              msg({"output": new.decode("utf-8", "replace")}))
                for obj in self.stream_messages(src, stream):
                    if "abort" in obj:
                        raise BecomeFailed(str(obj["abort"]))
                    if "password" in obj:
                        line = obj["password"].encode("utf-8") + b"\n"
                        write_all(c.tty, line)
                        write_all(c.inp, line)
            # Nothing typed may stay for a later reader of the terminal.
            termios.tcflush(c.tty, termios.TCIOFLUSH)
            os.set_blocking(c.inp, False)
            c.queue += AGENT_MARKER + struct.pack("<II", node, len(payload)) + payload
            self.children[node] = c
            while not c.up:
                left = deadline - time.monotonic()
                if self.children.get(node) is not c:
                    raise BecomeFailed("the nested interpreter exited before it started")
                if left <= 0:
                    raise BecomeFailed("the nested interpreter did not start within %ds"
                                       % timeout)
                self.wait_io([], [], left)
        except BaseException as e:
            self.children.pop(node, None)
            c.close()
            c.reap(1.0)
            if isinstance(e, BecomeFailed):
                text = seen.decode("utf-8", "replace").strip()
                raise BecomeFailed("%s%s" % (e, "; output: %s" % text if text else ""))
            raise
        self.log("nested interpreter n%d started (pid %d)" % (node, proc.pid))
        return {"node": node, "pid": proc.pid}

    def stream_messages(self, src, stream):
        """JSON of the Data frames for (src, stream) in the inbox, taken out."""
        found = []
        for frame in list(self.inbox):
            kind, _, _, fsrc, fstream, payload = frame
            if kind == DATA and (fsrc, fstream) == (src, stream):
                self.inbox.remove(frame)
                self.inbox_bytes -= len(payload)
                try:
                    found.append(split_msg(payload)[0])
                except WireError:
                    pass
        return found

    # ------------------------------------------------------------ exec

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
                    for fd in list(pipe.outs) + ([pipe.proc.stdin.fileno()] if pipe.proc.stdin else []):
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

    # ------------------------------------------------------------ files

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

    def put_start(self, src, stream, req, blob):
        size = int(req["size"])
        # A module's script or copy's source in a task's temp dir: no fsync.
        durable = os.path.normpath(os.path.dirname(req["path"])) not in self.tmpdirs
        try:
            p = Put(req["path"], size, req.get("mode"), durable)
        except Exception:
            self.drop_stream(src, stream, req)
            raise
        p.req = req
        try:
            p.write(blob)
        except Exception:
            p.abort()
            self.drop_stream(src, stream, req)
            raise
        if p.done == size and not req.get("streamed"):
            self.put_finish(src, stream, p)
        else:
            old = self.puts.pop(stream, None)
            if old:
                old.abort()
            self.puts[stream] = (src, p)

    def put_finish(self, src, stream, p):
        try:
            p.finish()
        except Exception:
            p.abort()
            raise
        self.answer(src, stream, p.req, {"size": p.size})

    def stream_part(self, kind, src, stream, payload):
        pipe = self.pipes.get(stream)
        if pipe is not None and pipe.src == src:
            if kind == DATA:
                if not pipe.eof:
                    pipe.inq += payload
            else:
                pipe.eof = True
            return
        body = self.bodies.get(stream)
        if body is not None and body[0] == src:
            _, req, parts, size = body
            if kind == DATA:
                size += len(payload)
                if size > BODY_BYTES_MAX:
                    del self.bodies[stream]
                    self.reply(src, stream, {"error": "request body over %d bytes" % BODY_BYTES_MAX})
                    return
                parts.append(payload)
                self.bodies[stream] = (src, req, parts, size)
            else:
                del self.bodies[stream]
                self.handle(src, stream, req, b"".join(parts))
            return
        entry = self.puts.get(stream)
        if entry is None or entry[0] != src:
            return
        p = entry[1]
        try:
            if kind == DATA:
                p.write(payload)
                # Paces the sender: it keeps at most a window in flight.
                self.send(CREDIT, src, stream, CREDIT_PAYLOAD.pack(p.done))
                return
            del self.puts[stream]
            self.put_finish(src, stream, p)
        except Exception as e:
            self.puts.pop(stream, None)
            p.abort()
            if kind == DATA:
                self.drop_stream(src, stream, p.req)
            self.fail(src, stream, p.req, "%s: %s" % (type(e).__name__, e))

    def drop_stream(self, src, stream, req):
        """Tells a paced sender to stop: the rest of the stream is dropped."""
        if req.get("streamed"):
            self.send(CREDIT, src, stream, CREDIT_PAYLOAD.pack(CREDIT_ALL))

    def fetch(self, src, stream, req):
        path = req["path"]
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(CHUNK_BYTES)
            if len(first) < CHUNK_BYTES:
                self.reply(src, stream, {"size": len(first)}, first)
                return
            # Streamed from the file, never whole in memory.
            self.send(REPLY, src, stream, msg({"size": size, "streamed": True}, first))
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                self.send(DATA, src, stream, chunk)
            self.send(END, src, stream, b"")

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


def sweep(fd, sign, path):
    """Tells the sweeper (see start_sweeper) to remove `path` at the end
    ("+") or not ("-"). One write of a short line: atomic on a pipe, so
    forks may write too."""
    if fd is None:
        return
    line = (sign + path + "\n").encode("utf-8", "surrogateescape")
    if len(line) <= 4096:
        try:
            write_all(fd, line)
        except OSError:
            pass


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


def main(node):
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


if __name__ == "__arbor__":
    sys.exit(main(ARBOR_NODE))  # noqa: F821 (set by the first stage)
