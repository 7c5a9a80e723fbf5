"""Ansible modules in memory: AnsiballZ zips kept by key and rebuilt from
members, their code compiled once, imported from memory (module_utils and
the warm standard library)."""

import ast
import base64
import hashlib
import importlib.abc
import importlib.util
import io
import os
import re
import struct
import sys
import zipfile

from .bounds import CODE_CACHE_BYTES_MAX, MEMBER_BYTES_MAX, WARM_BYTES_MAX


# An AnsiballZ script's zip literal: ansible-core 2.19 and later pass it to
# their wrapper's call (`zip_data='…',`); 2.17 and 2.18 assign it in the
# wrapper (`    ZIPDATA = '…'`). A script with neither is a format arbor does
# not know: it runs as Ansible would run it, by a new interpreter.
ZIP_DATA = re.compile(rb"^(?:zip_data=|    ZIPDATA = )('[A-Za-z0-9+/=]*'),?$", re.M)


# What stands for the zip literal in a module's script while it runs here.
ZIP_NAME = b"__arbor_zip_data__"


# Where an AnsiballZ script's constant wrapper ends and its call begins.
WRAPPER_CALL = b'\nif __name__ == "__main__":\n'


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
