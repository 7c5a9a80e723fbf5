"""Built AnsiballZ payloads kept across runs, each with what it was built from.

ansible-core builds a Python module's AnsiballZ payload once per run: the
first task using the module locates every module_util it imports (1,000 and
more path lookups for the usual modules), zips them and keeps the result in
the run's local tmp (`ansiballz_cache`), which goes with the run. Each task
of a short playbook pays that build, 20-30 ms of the worker's CPU even with
`scancache` sparing the parses. With a kept tree the build is most of what a
repeat run still costs on the controller.

Here a payload Ansible built is kept with its inputs: the module's path and
digest, the payload's name (module, compression, extensions), the
module_utils and collection search paths, the versions of ansible-core and
Python, the digest of every source file that went into the zip, and every
directory where a lookup could have found something else (the module_utils
paths, and the involved collections' places in every collection path, with
their `meta/runtime.yml`). A later run reuses the payload only when all of
that is unchanged. A directory whose mtime differs (an entry added, removed
or renamed: a new util that would shadow, a new optional import) is a miss;
so is any source whose content differs (digested at each reuse, about a
millisecond for the usual modules' 50-odd files). On a hit the payload is
put where Ansible looks for the run's own built copy, so Ansible's code
loads it as if it had built it in this run. A payload with a source that
has no file (a redirect's shim, a 2.21 embedded resource) is not kept.

ansible-core 2.19 to 2.21 (the `_CachedModule` builders) only; 2.17 and
2.18 keep Ansible's own path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
import time

FORMAT = "arbor-ansiballz-1"
# Entries and bytes kept: past either, the older entries (by last use) are
# removed down to half of both.
ENTRIES_MAX = 256
CACHE_BYTES_MAX = 64 << 20
# A payload larger than this is not kept (the usual ones are 100-300 KB).
PAYLOAD_BYTES_MAX = 16 << 20
STAMPS_BYTES_MAX = 4 << 20
# A file or directory changed this close to a build (or after its start)
# keeps the payload out: the build may not have seen it.
SETTLE_NS = 1_000_000_000
# Sources from no file that every payload holds: Ansible's own package inits.
SYNTHETIC = ("ansible/__init__.py", "ansible/module_utils/__init__.py")


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "arbor", "ansiballz")


def _private_dir(path):
    """The directory, made 0700 if missing; None unless it is the user's own
    and private (an entry is a pickle Ansible loads)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return path


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns] if stat.S_ISDIR(st.st_mode) else ["not a dir"]


def _file_stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _walk_dirs(top, out):
    out[top] = _dir_stamp(top)
    for root, dirs, _files in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for d in dirs:
            p = os.path.join(root, d)
            out[p] = _dir_stamp(p)


class Build(object):
    """What one payload's build read: files (with the digest of what went
    into the zip), and collections looked in."""

    def __init__(self, module_path, module_data):
        self.module_path = module_path
        self.module_digest = hashlib.sha256(module_data).hexdigest()
        self.started_ns = time.time_ns()
        self.files = {}
        self.collections = set()
        self.keepable = True
        # The entry's key, worked out once per build (seed, then keep).
        self.key = None

    def wrote(self, name, source, origin_path):
        if origin_path:
            data = source.encode("utf-8", "surrogateescape") if isinstance(source, str) else source
            self.files[origin_path] = hashlib.sha256(data).hexdigest()
        elif name not in SYNTHETIC and source not in (b"", ""):
            self.keepable = False


class BuildCache(object):
    def __init__(self, directory, version, module_common):
        self.dir = directory
        self.version = version
        self.mc = module_common

    # -- what a payload depends on --

    def _mu_paths(self):
        loader = self.mc.module_utils_loader
        return list(loader._get_paths(subdirs=False)) + [self.mc._MODULE_UTILS_PATH]

    def _collection_paths(self):
        try:
            from ansible.utils.collection_loader import AnsibleCollectionConfig
            return list(AnsibleCollectionConfig.collection_finder._n_collection_paths)
        except Exception:
            return None

    def key(self, name, build):
        if build.key is None:
            build.key = self._key(name, build)
        return build.key

    def _key(self, name, build):
        coll_paths = self._collection_paths()
        if coll_paths is None:
            return None
        h = hashlib.sha256()
        for part in (FORMAT, self.version, "%d.%d.%d" % sys.version_info[:3], name,
                     build.module_path, build.module_digest,
                     json.dumps(self._mu_paths()), json.dumps(coll_paths)):
            h.update(str(part).encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()

    def stamps(self, build):
        """What `build` depends on, now; None if something changed during
        it (a file no longer what went into the zip, or anything too new)."""
        dirs, files = {}, {}
        for p in self._mu_paths():
            _walk_dirs(p, dirs)
        colls = set(build.collections)
        own = module_collection(build.module_path)
        if own:
            colls.add(own)
        for ns, coll in sorted(colls):
            for base in self._collection_paths() or ():
                ac = os.path.join(base, "ansible_collections")
                for p in (base, ac, os.path.join(ac, ns)):
                    dirs[p] = _dir_stamp(p)
                top = os.path.join(ac, ns, coll)
                dirs[top] = _dir_stamp(top)
                if dirs[top] is None:
                    continue
                for p in (os.path.join(top, "meta"), os.path.join(top, "plugins")):
                    dirs[p] = _dir_stamp(p)
                _walk_dirs(os.path.join(top, "plugins", "module_utils"), dirs)
                runtime = os.path.join(top, "meta", "runtime.yml")
                st = _file_stamp(runtime)
                files[runtime] = [st, _digest(runtime) if st else None]
        for p, embedded in build.files.items():
            st = _file_stamp(p)
            if st is None or _digest(p) != embedded:
                return None
            files[p] = [st, embedded]
        newest = max([s[1] for s in dirs.values() if s and len(s) == 2] +
                     [s[0][2] for s in files.values() if s[0]] + [0])
        if newest >= build.started_ns - SETTLE_NS:
            return None
        return {"dirs": dirs, "files": files}

    @staticmethod
    def unchanged(stamps):
        for p, want in stamps["dirs"].items():
            if _dir_stamp(p) != want:
                return False
        for p, (want, digest) in stamps["files"].items():
            # Always by content: an edit can keep a file's size, inode and
            # (within the clock's step, or put back) its mtime.
            if (want is None) != (_file_stamp(p) is None):
                return False
            try:
                if want is not None and _digest(p) != digest:
                    return False
            except OSError:
                return False
        return True

    # -- the entries --

    def seed(self, name, build, target):
        """Writes a kept payload to `target` (Ansible's per-run path) when it
        is still what Ansible would build; True if it did."""
        key = self.key(name, build)
        if key is None or _private_dir(self.dir) is None:
            return False
        base = os.path.join(self.dir, key)
        try:
            with open(base + ".json", "rb") as f:
                raw = f.read(STAMPS_BYTES_MAX + 1)
            if len(raw) > STAMPS_BYTES_MAX:
                return False
            stamps = json.loads(raw)
            if not self.unchanged(stamps):
                return False
            with open(base + ".payload", "rb") as f:
                payload = f.read(PAYLOAD_BYTES_MAX + 1)
            if len(payload) > PAYLOAD_BYTES_MAX or hashlib.sha256(payload).hexdigest() != stamps["payload"]:
                return False
            _atomic_write(os.path.dirname(target), target, payload)
            os.utime(base + ".json")
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    def keep(self, name, build, source):
        if not build.keepable:
            return
        key = self.key(name, build)
        if key is None or _private_dir(self.dir) is None:
            return
        try:
            if os.path.getsize(source) > PAYLOAD_BYTES_MAX:
                return
            with open(source, "rb") as f:
                payload = f.read()
            stamps = self.stamps(build)
            if stamps is None:
                return
            stamps["payload"] = hashlib.sha256(payload).hexdigest()
            stamps["name"] = name
            base = os.path.join(self.dir, key)
            _atomic_write(self.dir, base + ".payload", payload)
            _atomic_write(self.dir, base + ".json", json.dumps(stamps).encode())
            self.trim()
        except (OSError, ValueError, TypeError):
            pass

    def trim(self):
        aged, total = [], 0
        for n in os.listdir(self.dir):
            if not n.endswith(".json"):
                continue
            try:
                st = os.stat(os.path.join(self.dir, n))
                size = st.st_size + os.path.getsize(os.path.join(self.dir, n[:-5] + ".payload"))
            except OSError:
                size = 0
                st = None
            aged.append((st.st_mtime if st else 0, n[:-5], size))
            total += size
        if len(aged) <= ENTRIES_MAX and total <= CACHE_BYTES_MAX:
            return
        aged.sort()
        while aged and (len(aged) > ENTRIES_MAX // 2 or total > CACHE_BYTES_MAX // 2):
            _, n, size = aged.pop(0)
            total -= size
            for ext in (".json", ".payload"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, n + ext))


def module_collection(module_path):
    """(namespace, collection) of a module file inside a collection."""
    parts = os.path.normpath(module_path).split(os.sep)
    if "ansible_collections" in parts:
        i = len(parts) - 1 - parts[::-1].index("ansible_collections")
        if len(parts) > i + 2:
            return parts[i + 1], parts[i + 2]
    return None


def _atomic_write(directory, path, data):
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _RecordingZip(object):
    """The zip Ansible writes a payload's sources to, telling `build` each."""

    def __init__(self, zf, build, origin):
        self._zf, self._build, self._origin = zf, build, origin

    def writestr(self, zinfo, data, *args, **kwargs):
        name = getattr(zinfo, "filename", zinfo)
        tag = self._origin.get_tag(data) if isinstance(data, (str, bytes)) else None
        self._build.wrote(name, data, getattr(tag, "path", None))
        return self._zf.writestr(zinfo, data, *args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._zf, attr)


def install(module_common, version, directory=None):
    """Patches ansible-core's module builder to keep payloads across runs;
    False (and nothing patched) for a builder shaped otherwise."""
    mc = module_common
    needed = ("_find_module_utils", "recursive_finder", "_locking", "_CachedModule",
              "CollectionModuleUtilLocator", "Origin", "module_utils_loader", "_MODULE_UTILS_PATH")
    if any(not hasattr(mc, n) for n in needed) or getattr(mc, "_arbor_buildcache", False):
        return False
    cache = BuildCache(directory or cache_dir(), version, mc)
    state = {"build": None}
    real_find, real_finder = mc._find_module_utils, mc.recursive_finder
    real_locking, real_locator = mc._locking, mc.CollectionModuleUtilLocator

    def find_module_utils(**kwargs):
        data = kwargs.get("b_module_data")
        path = kwargs.get("module_path")
        state["build"] = Build(path, data) if isinstance(data, bytes) and path else None
        try:
            return real_find(**kwargs)
        finally:
            state["build"] = None

    def recursive_finder(name, module_fqn, module_data, zf, *args, **kwargs):
        build = state["build"]
        if build is not None:
            zf = _RecordingZip(zf, build, mc.Origin)
        return real_finder(name, module_fqn, module_data, zf, *args, **kwargs)

    real_locator_init = real_locator.__init__

    def locator_init(self, fq_name_parts, *args, **kwargs):
        # Patched in place: ansible-core's locator names its own class.
        build = state["build"]
        if build is not None and len(fq_name_parts) >= 3:
            build.collections.add(tuple(fq_name_parts[1:3]))
        real_locator_init(self, fq_name_parts, *args, **kwargs)

    @contextlib.contextmanager
    def named_mutex(lock_path):
        with real_locking.named_mutex(lock_path):
            build = state["build"]
            target = lock_path[:-len(".lock")] if lock_path.endswith(".lock") else None
            name = os.path.basename(target) if target else None
            if build is not None and target and not os.path.exists(target):
                fresh = not cache.seed(name, build, target)
            else:
                fresh = False
            yield
            if fresh and os.path.exists(target):
                cache.keep(name, build, target)

    class Locking(object):
        pass

    locking = Locking()
    locking.__dict__.update(vars(real_locking))
    locking.named_mutex = named_mutex
    mc._find_module_utils = find_module_utils
    mc.recursive_finder = recursive_finder
    real_locator.__init__ = locator_init
    mc._locking = locking
    mc._arbor_buildcache = True
    return True
