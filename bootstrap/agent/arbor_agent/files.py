"""Files on the target: puts written beside their destination and renamed
into place, modes, the stat module's answer, login environment files and
the sweep of an agent's own temp dirs."""

import errno
import grp
import hashlib
import os
import pwd
import re
import shlex
import stat as stat_

from .wire import write_all


# pam_env files whose later edits commands see, as after a new login.
ENV_FILES = ("/etc/environment", "~/.pam_environment")


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
