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
#   ping   {}                                -> {"pid", "served"}
# Errors come back as {"error": message}.
# A request whose JSON has "streamed": true continues in Data frames and an
# End; so does a reply (its blob is then only the first part).

import ast
import base64
import errno
import importlib.abc
import importlib.util
import io
import json
import os
import pwd
import re
import select
import signal
import struct
import subprocess
import sys
import traceback
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

REQUEST, REPLY, DATA, END, ROUTE_ADD, ROUTE_DEL, UNDELIVERABLE, PING, PONG = range(1, 10)
KINDS = frozenset(range(1, 10))
CONTROLLER = 0

# Most bytes of module_utils sources kept in memory for warm imports.
WARM_BYTES_MAX = 64 * 1024 * 1024
# Most bytes of module zips (their AnsiballZ literal) kept for this run.
ZIP_CACHE_BYTES_MAX = 64 * 1024 * 1024
ZIP_DATA = re.compile(rb"^zip_data=(.*),$", re.M)

# The command Ansible sends for a pipelined module: the interpreter reads the
# AnsiballZ script from stdin.
PIPELINED = re.compile(r"^/bin/sh -c '(?P<python>/[^' ]+|python3?) && sleep 0'$")


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
    obj = json.loads(payload[4:4 + n].decode("utf-8"))
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


class WarmImports(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Keeps the module_utils that modules use imported in this interpreter,
    so a module forked from it does not import them again.

    Sources come from the AnsiballZ payloads themselves (their zip), held in
    memory. After a module has run, the `ansible.module_utils.*` modules it
    imported are imported here from those sources; one that fails to import
    stays cold. Forked modules do not use this finder: whatever they import
    that is not warm comes from their own zip, as without arbor.
    """

    def __init__(self):
        self.files = {}
        self.size = 0
        self.cold = set()

    def add_payload(self, script):
        m = ZIP_DATA.search(script)
        if not m:
            return
        try:
            data = base64.b64decode(ast.literal_eval(m.group(1).decode("ascii")))
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for name in z.namelist():
                    if name.startswith("ansible/") and name.endswith(".py") and name not in self.files:
                        body = z.read(name)
                        if self.size + len(body) > WARM_BYTES_MAX:
                            return
                        self.files[name] = body
                        self.size += len(body)
        except Exception:
            return

    def _path(self, fullname):
        rel = fullname.replace(".", "/")
        for cand, pkg in ((rel + "/__init__.py", True), (rel + ".py", False)):
            if cand in self.files:
                return cand, pkg
        return None, False

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("ansible"):
            return None
        rel, pkg = self._path(fullname)
        if rel is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin="<arbor-warm>/" + rel,
                                               is_package=pkg)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        rel, pkg = self._path(module.__name__)
        module.__file__ = "<arbor-warm>/" + rel
        exec(compile(self.files[rel], module.__file__, "exec"), module.__dict__)
        if pkg:
            # After the package's code: ansible/__init__.py replaces its
            # __path__ with a snapshot (pkgutil.extend_path).
            module.__path__ = _FollowPath(os.path.dirname(rel))

    def warm(self, names):
        """Imports `names` here (parents first); never raises."""
        for name in sorted(set(names), key=lambda n: n.count(".")):
            if name in sys.modules or name in self.cold or not name.startswith("ansible"):
                continue
            try:
                importlib.import_module(name)
            except BaseException:
                self.cold.add(name)
                sys.modules.pop(name, None)


class Put(object):
    """A file being written atomically: temp file, fsync, chmod, rename."""

    def __init__(self, path, size, mode):
        self.path = path
        self.size = size
        self.done = 0
        try:
            old = os.stat(path)
            self.mode = old.st_mode & 0o7777
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            self.mode = mode if mode is not None else (0o666 & ~umask)
        self.tmp, self.fd = atomic_target(path)

    def write(self, data):
        if self.done + len(data) > self.size:
            raise ValueError("more bytes than announced for %s" % self.path)
        write_all(self.fd, data)
        self.done += len(data)

    def finish(self):
        if self.done != self.size:
            raise ValueError("%s: got %d of %d bytes" % (self.path, self.done, self.size))
        os.fsync(self.fd)
        os.fchmod(self.fd, self.mode)
        os.close(self.fd)
        self.fd = None
        os.rename(self.tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class Agent(object):
    def __init__(self, node, rfd=0, wfd=1):
        self.node = node
        self.rfd = rfd
        self.wfd = wfd
        self.buf = bytearray()
        self.puts = {}  # stream -> (src, Put)
        self.bodies = {}  # stream -> (src, request, [parts], size)
        self.served = 0
        self.shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
        self.python = os.path.realpath(sys.executable)
        self.zips = {}  # zip_key -> the zip literal of an AnsiballZ script
        self.zips_size = 0
        self.warm = WarmImports()
        sys.meta_path.insert(0, self.warm)
        self.to_warm = []  # module_utils the last module imported

    def send(self, kind, dst, stream, payload=b""):
        write_all(self.wfd, encode(kind, dst, self.node, stream, payload))

    def reply(self, src, stream, obj, blob=b""):
        """Replies; a blob over one chunk is streamed after the reply."""
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
                "uid": os.getuid(), "executable": sys.executable}
        self.send(ROUTE_ADD, CONTROLLER, 0, msg(info))

    def run(self):
        self.hello()
        while True:
            try:
                chunk = os.read(self.rfd, READ_BYTES)
            except InterruptedError:
                continue
            if not chunk:
                return 0
            self.buf.extend(chunk)
            # Frames that arrived while a command ran are in buf too.
            while True:
                frame, used = decode(self.buf)
                if frame is None:
                    break
                del self.buf[:used]
                try:
                    self.dispatch(frame)
                except LinkGone:
                    return 0

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
        req, blob = split_msg(payload)
        if req.get("streamed") and req.get("op") != "put":
            self.bodies[stream] = (src, req, [blob], len(blob))
            return
        self.handle(src, stream, req, blob)

    def handle(self, src, stream, req, blob):
        try:
            op = req.get("op")
            if op == "exec":
                blob = self.with_zip(req, blob)
                if blob is None:
                    self.reply(src, stream, {"error": "module zip not cached", "zip_miss": True})
                    return
                rc, out, err = self.exec_(req, blob)
                self.reply(src, stream, {"rc": rc, "stdout_len": len(out)}, out + err)
                # After the reply, while idle: the next module forks warm.
                names, self.to_warm = self.to_warm, []
                self.warm.warm(names)
            elif op == "put":
                self.put_start(src, stream, req, blob)
            elif op == "fetch":
                self.fetch(src, stream, req)
            elif op == "ping":
                self.reply(src, stream, {"pid": os.getpid(), "served": self.served})
            else:
                self.reply(src, stream, {"error": "unknown op %r" % (op,)})
            self.served += 1
        except (WireError, LinkGone):
            raise
        except Exception as e:
            self.reply(src, stream, {"error": "%s: %s" % (type(e).__name__, e)})

    # ------------------------------------------------------------ exec

    def with_zip(self, req, stdin):
        """The whole stdin: a cached module zip put back, or kept for later.
        None if the zip is not here (the caller resends it whole)."""
        key = req.get("zip_key")
        if key is None:
            return stdin
        if "zip_at" in req:
            z = self.zips.get(key)
            if z is None:
                return None
            at = int(req["zip_at"])
            return stdin[:at] + z + stdin[at:]
        a, b = req["zip_span"]
        if key not in self.zips:
            if self.zips_size + (b - a) > ZIP_CACHE_BYTES_MAX:
                self.zips.clear()
                self.zips_size = 0
            self.zips[key] = bytes(stdin[a:b])
            self.zips_size += b - a
        return stdin

    def exec_(self, req, stdin):
        cmd = req["cmd"]
        m = PIPELINED.match(cmd)
        if m and b"_ansiballz_main(" in stdin and self.same_python(m.group("python")):
            return self.run_forked(stdin)
        # Its own process group, so the whole command can be stopped.
        proc = subprocess.Popen([self.shell, "-c", cmd], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=req.get("cwd"), start_new_session=True)
        try:
            out, err = self.pump(proc.pid, proc.stdin, stdin, [proc.stdout, proc.stderr])
        finally:
            proc.stdout.close()
            proc.stderr.close()
        return proc.wait(), out, err

    def pump(self, pgid, stdin, data, outputs):
        """Feeds `data` to stdin and reads `outputs` to EOF, while watching
        the link: frames that arrive are kept for later, and if the link
        ends, the process group is killed and LinkGone raised."""
        outs = dict((f.fileno(), []) for f in outputs)
        readers = list(outs)
        view = memoryview(data)
        writers = []
        if stdin is not None:
            if view:
                os.set_blocking(stdin.fileno(), False)
                writers = [stdin.fileno()]
            else:
                stdin.close()
        while readers or writers:
            watch = readers + ([self.rfd] if len(self.buf) < PENDING_BYTES_MAX else [])
            r, w, _ = select.select(watch, writers, [])
            if self.rfd in r:
                chunk = os.read(self.rfd, READ_BYTES)
                if not chunk:
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except OSError:
                        pass
                    raise LinkGone()
                self.buf.extend(chunk)
            for fd in r:
                if fd == self.rfd:
                    continue
                chunk = os.read(fd, READ_BYTES)
                if chunk:
                    outs[fd].append(chunk)
                else:
                    readers.remove(fd)
            if w:
                try:
                    n = os.write(writers[0], view[:READ_BYTES])
                    view = view[n:]
                except BrokenPipeError:
                    view = view[:0]
                if not view:
                    writers = []
                    stdin.close()
        return [b"".join(outs[f.fileno()]) for f in outputs]

    def same_python(self, path):
        if "/" not in path:
            for d in os.environ.get("PATH", "").split(os.pathsep):
                cand = os.path.join(d, path)
                if os.access(cand, os.X_OK):
                    path = cand
                    break
        return os.path.realpath(path) == self.python

    def run_forked(self, script):
        """Runs a pipelined module in a fork of this warm interpreter, as
        `python3 < script` would: same stdout, stderr and exit status."""
        self.warm.add_payload(script)
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        r_names, w_names = os.pipe()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                os.setpgid(0, 0)
                # What the module imports beyond the warm set comes from its
                # own zip, exactly as without arbor.
                if self.warm in sys.meta_path:
                    sys.meta_path.remove(self.warm)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(w_out, 1)
                os.dup2(w_err, 2)
                for fd in (null, r_out, w_out, r_err, w_err, r_names, self.rfd, self.wfd):
                    if fd > 2:
                        os.close(fd)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                sys.stdin = open(0, "r", closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                sys.argv = [""]
                code = compile(script, "<stdin>", "exec")
                exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
                rc = 0
            except SystemExit as e:
                if e.code is None:
                    rc = 0
                elif isinstance(e.code, int):
                    rc = e.code & 0xFF
                else:
                    sys.stderr.write("%s\n" % (e.code,))
                    rc = 1
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    names = [n for n in list(sys.modules) if n.startswith("ansible.module_utils")]
                    write_all(w_names, "\n".join(names).encode())
                except BaseException:
                    pass
                finally:
                    os._exit(rc)
        os.close(w_out)
        os.close(w_err)
        os.close(w_names)
        r_out, r_err = os.fdopen(r_out, "rb", 0), os.fdopen(r_err, "rb", 0)
        r_names = os.fdopen(r_names, "rb", 0)
        try:
            out, err, names = self.pump(pid, None, b"", [r_out, r_err, r_names])
            self.to_warm = names.decode("utf-8", "replace").split()
        except LinkGone:
            os.waitpid(pid, 0)
            raise
        finally:
            r_out.close()
            r_err.close()
            r_names.close()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status), out, err
        return os.WEXITSTATUS(status), out, err

    # ------------------------------------------------------------ files

    def put_start(self, src, stream, req, blob):
        size = int(req["size"])
        p = Put(req["path"], size, req.get("mode"))
        try:
            p.write(blob)
        except Exception:
            p.abort()
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
        self.reply(src, stream, {"size": p.size})

    def stream_part(self, kind, src, stream, payload):
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
                return
            del self.puts[stream]
            self.put_finish(src, stream, p)
        except Exception as e:
            self.puts.pop(stream, None)
            p.abort()
            self.reply(src, stream, {"error": "%s: %s" % (type(e).__name__, e)})

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


def main(node):
    # Frames own fds 0 and 1; nothing else may write to them.
    agent = Agent(node)
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
