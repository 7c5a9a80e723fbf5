"""What Ansible's module builder finds in a module_util's source, kept
across runs.

To build a module's AnsiballZ, ansible-core parses the module and every
module_util it imports, transitively, to find the next imports
(`recursive_finder`: `ast` parse, then `ModuleDepFinder`'s walk). Ansible
keeps the built zip only for the run, so every run parses basic.py and its
imports again for each module it uses: about 60-90 ms of the task worker's
CPU per module here, on the path of every first task.

The walk's result depends only on the util's fully qualified name, whether
it is a package, the source text, and the versions of ansible-core and
Python. Here it is kept under that digest, one small JSON file per source in
the user's cache directory (0700), and the parse is skipped when a file
holds it. A changed source has another digest, so an entry is never stale;
the module itself (whose METADATA Ansible also reads from the parse) is
always parsed. The zip Ansible builds is the same either way.

ansible-core 2.19 and 2.20 parse in `_compile_module_ast` and pass the tree
to `ModuleDepFinder`; 2.21 parses inside `ModuleDepFinder`. 2.17 and 2.18
parse inline: they keep Ansible's own path. A 2.21 util that embeds
resources (`EmbedManager.embed`) is not kept.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import tempfile

# Entries kept: past this, the older half (by last use) is removed.
ENTRIES_MAX = 4096
# A cache file larger than this is not read (an entry is a few KB).
ENTRY_BYTES_MAX = 1 << 20
FORMAT = "arbor-modscan-1"


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "arbor", "modscan")


def is_module_util(fqn):
    parts = fqn.split(".")
    return "module_utils" in parts[:5] and parts[-1] != "module_utils"


class Scanned(ast.Module):
    """Stands for a util's tree when its walk is cached (2.19/2.20): an
    empty module that carries the source and the cached entry."""

    def __init__(self, fqn, source, entry):
        super().__init__(body=[], type_ignores=[])
        self.arbor_fqn = fqn
        self.arbor_source = source
        self.arbor_entry = entry


class Found(object):
    """A finder's result, as the builder reads it."""

    def __init__(self, submodules, optional_imports):
        self.submodules = submodules
        self.optional_imports = optional_imports
        self.embeds = set()
        self.tree = None


class ScanCache(object):
    def __init__(self, directory, version):
        self.dir = directory
        self.version = version

    def key(self, fqn, source):
        h = hashlib.sha256()
        for part in (FORMAT, self.version, "%d.%d" % sys.version_info[:2], fqn):
            h.update(part.encode("utf-8", "surrogateescape") + b"\0")
        h.update(source if isinstance(source, bytes) else str(source).encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def get(self, fqn, source):
        """(Found, is_pkg) kept for this source, or None."""
        path = os.path.join(self.dir, self.key(fqn, source) + ".json")
        try:
            with open(path, "rb") as f:
                raw = f.read(ENTRY_BYTES_MAX + 1)
            if len(raw) > ENTRY_BYTES_MAX:
                return None
            entry = json.loads(raw)
            found = Found(set(tuple(m) for m in entry["submodules"]),
                          set(tuple(m) for m in entry["optional"]))
            is_pkg = entry["is_pkg"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return found, is_pkg

    def put(self, fqn, source, is_pkg, finder):
        if getattr(finder, "embeds", None):
            return
        entry = {"fqn": fqn, "is_pkg": bool(is_pkg),
                 "submodules": sorted(list(m) for m in finder.submodules),
                 "optional": sorted(list(m) for m in finder.optional_imports)}
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, os.path.join(self.dir, self.key(fqn, source) + ".json"))
            self.trim()
        except (OSError, TypeError, ValueError):
            pass

    def trim(self):
        names = [n for n in os.listdir(self.dir) if n.endswith(".json")]
        if len(names) <= ENTRIES_MAX:
            return
        aged = []
        for n in names:
            try:
                aged.append((os.stat(os.path.join(self.dir, n)).st_mtime, n))
            except OSError:
                pass
        for _, n in sorted(aged)[:len(aged) - ENTRIES_MAX // 2]:
            try:
                os.unlink(os.path.join(self.dir, n))
            except OSError:
                pass


def install(module_common, version, directory=None):
    """Patches ansible-core's module builder to use the cache; False (and
    nothing patched) for a builder shaped otherwise."""
    parse = getattr(module_common, "_compile_module_ast", None)
    finder_cls = getattr(module_common, "ModuleDepFinder", None)
    if parse is None or finder_cls is None or "__new__" in vars(finder_cls):
        return False
    names = finder_cls.__init__.__code__.co_varnames[:3]
    takes_tree = names == ("self", "module_fqn", "tree")
    if not takes_tree and names != ("self", "module_fqn", "module_data"):
        return False
    cache = ScanCache(directory or cache_dir(), version)
    real_init = finder_cls.__init__

    def compile_module_ast(module_name, source_code):
        if takes_tree and is_module_util(module_name):
            entry = cache.get(module_name, source_code)
            if entry is not None:
                return Scanned(module_name, source_code, entry)
            tree = parse(module_name, source_code)
            tree.arbor_fqn, tree.arbor_source = module_name, source_code
            return tree
        return parse(module_name, source_code)

    def new(cls, module_fqn, arg, is_pkg_init=False, *args, **kwargs):
        if cls is finder_cls and is_module_util(module_fqn):
            entry = arg.arbor_entry if isinstance(arg, Scanned) else (
                None if takes_tree else cache.get(module_fqn, arg))
            if entry is not None and entry[1] == bool(is_pkg_init):
                return entry[0]
        return object.__new__(cls)

    def init(self, module_fqn, arg, is_pkg_init=False, *args, **kwargs):
        if isinstance(arg, Scanned):
            # Kept as a module of the other kind (package or not): parse.
            source = arg.arbor_source
            arg = parse(module_fqn, source)
            arg.arbor_fqn, arg.arbor_source = module_fqn, source
        real_init(self, module_fqn, arg, is_pkg_init, *args, **kwargs)
        if not is_module_util(module_fqn):
            return
        if not takes_tree:
            cache.put(module_fqn, arg, is_pkg_init, self)
        elif getattr(arg, "arbor_fqn", None) == module_fqn:
            cache.put(module_fqn, arg.arbor_source, is_pkg_init, self)

    finder_cls.__new__ = staticmethod(new)
    finder_cls.__init__ = init
    module_common._compile_module_ast = compile_module_ast
    return True
