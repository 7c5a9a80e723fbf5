"""The glue's patches of Ansible's action code, installed by arbor's
connection plugin when its first connection is made (`install`), never on
import: `ansible-doc` and other plugins loading the glue patch nothing.

The temp dir, home, stat and chmod fast paths of every action; rsync's
remote shell for ansible.posix's synchronize; copy in one round trip. Each
takes Ansible's own path for a connection that is not arbor's."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys

import ansible.constants as C
from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()


class Captured(Exception):
    """A module command was captured instead of run (copy in one round trip)."""


def install(connection_class):
    """Patches ActionBase (once per process) for `connection_class`'s
    connections."""
    global _connection_class
    if _connection_class is not None:
        return
    _connection_class = connection_class
    for name in _FAST_PATHS:
        setattr(ActionBase, name, globals()[name])
    setattr(ActionBase, "__init__", _action_init)


# ------------------------------------------------------------ action fast paths
#
# Ansible's action plugins make a task's temp dir (two shell commands), stat
# files with the stat module, upload files and remove the temp dir, each a
# round trip. Through arbor: the home dir is known from the agent's hello,
# the temp dir is made and removed by the agent without waiting, uploads are
# not awaited, and stat is answered by the agent itself. A module call is
# then the only round trip left. Anything these paths do not cover (become,
# async, another connection plugin) takes Ansible's own path.

_FAST_PATHS = ("_remote_expand_user", "_make_tmp_path", "_remove_tmp_path", "_execute_remote_stat",
               "_remote_chmod")
_vanilla_action = {name: getattr(ActionBase, name) for name in _FAST_PATHS}
# arbor's Connection class, given to install().
_connection_class = None
_SIMPLE_CHMOD = re.compile(r"^[ugoa]*[-+=][rwx]*$")


def _arbor_conn(action):
    conn = action._connection
    if isinstance(conn, _connection_class) and conn.arbor_active() and not getattr(conn, "_remote_is_local", False):
        return conn
    return None


def _become_applies(action):
    """Whether a sudoable command of this task runs with become: the test
    of ActionBase._low_level_execute_command."""
    conn = action._connection
    if not conn.become:
        return False
    ruser = action._get_remote_user()
    buser = action.get_become_option("become_user")
    return bool(C.BECOME_ALLOW_SAME_USER or (buser != ruser or not any((ruser, buser))))


def _remote_expand_user(self, path, sudoable=True, pathsep=None):
    conn = _arbor_conn(self)
    if conn is None or not path.startswith("~"):
        return _vanilla_action["_remote_expand_user"](self, path, sudoable=sudoable, pathsep=pathsep)
    split_path = path.split(os.path.sep, 1)
    expand = split_path[0]
    if expand == "~":
        become_user = self.get_become_option("become_user")
        if sudoable and conn.become and become_user:
            user = become_user
        else:
            user = self._get_remote_user() or ""
    else:
        user = expand[1:]
    info = conn.arbor_info()
    if (sudoable and expand == "~" and user and user != info.get("user")
            and _become_applies(self) and user == self.get_become_option("become_user")):
        info = conn.arbor_info(sudo=True)
    if not info.get("home") or user not in ("", info.get("user")):
        return _vanilla_action["_remote_expand_user"](self, path, sudoable=sudoable, pathsep=pathsep)
    if len(split_path) > 1:
        expanded = conn._shell.join_path(info["home"], *split_path[1:])
    else:
        expanded = info["home"]
    if ".." in os.path.dirname(expanded).split("/"):
        raise AnsibleError("'%s' returned an invalid relative home directory path containing '..'"
                           % self._get_remote_addr({}))
    return expanded


def _make_tmp_path(self, remote_user=None):
    conn = _arbor_conn(self)
    if conn is None or self._is_become_unprivileged() or getattr(self._task, "async_val", 0):
        return _vanilla_action["_make_tmp_path"](self, remote_user)
    base = self._remote_expand_user(self.get_shell_option("remote_tmp", default="~/.ansible/tmp"),
                                    sudoable=False)
    if base.startswith("~"):
        return _vanilla_action["_make_tmp_path"](self, remote_user)
    name = conn._shell._generate_temp_dir_name()
    conn.arbor_call({"op": "mkdtemp", "base": base, "name": name}, noreply=True)
    self._cleanup_remote_tmp = True
    tmp = conn._shell.join_path(base, name, "")
    conn._shell.tmpdir = tmp
    return tmp


def _remove_tmp_path(self, tmp_path, force=False):
    conn = _arbor_conn(self)
    if conn is None:
        return _vanilla_action["_remove_tmp_path"](self, tmp_path, force=force)
    if tmp_path is None and conn._shell.tmpdir:
        tmp_path = conn._shell.tmpdir
    if force or self._should_remove_tmp_path(tmp_path):
        conn.arbor_call({"op": "rmtree", "path": tmp_path}, noreply=True)
        conn._shell.tmpdir = None


def _execute_remote_stat(self, path, all_vars, follow, tmp=None, checksum=True):
    conn = _arbor_conn(self)
    if conn is None:
        return _vanilla_action["_execute_remote_stat"](self, path, all_vars, follow, tmp=tmp,
                                                       checksum=checksum)
    try:
        st = conn.arbor_call({"op": "stat", "path": path, "follow": bool(follow),
                              "checksum": bool(checksum)}, sudo=_become_applies(self))["stat"]
    except AnsibleConnectionFailure:
        raise
    except AnsibleError as e:
        raise AnsibleError("Failed to get information on remote file (%s): %s" % (path, e))
    if not st["exists"]:
        st["checksum"] = "1"
    if "checksum" not in st:
        st["checksum"] = ""
    return st


def _remote_chmod(self, paths, mode, sudoable=False):
    conn = _arbor_conn(self)
    if conn is None or (sudoable and conn.become) or not _SIMPLE_CHMOD.match(str(mode)):
        return _vanilla_action["_remote_chmod"](self, paths, mode, sudoable=sudoable)
    conn.arbor_call({"op": "chmod", "paths": [to_text(p) for p in paths], "mode": str(mode)},
                    noreply=True)
    return {"rc": 0, "stdout": "", "stdout_lines": [], "stderr": "", "stderr_lines": []}




# ------------------------------------------------------------ synchronize
#
# ansible.posix's synchronize runs rsync on the controller with ssh as its
# remote shell, which cannot reach a host behind a via chain. Through arbor,
# its remote shell is arbor_rsh.py: rsync's server runs on the host's agent,
# its data streamed through the tree. Only for hosts arbor carries, and
# only when the task names no --rsh of its own.

def _patch_synchronize(synchronize):
    vanilla_run = synchronize.ActionModule.run
    if getattr(vanilla_run, "_arbor", False):
        return

    def run(self, tmp=None, task_vars=None):
        conn = _arbor_conn(self)
        if conn is not None and self._task.delegate_to is None:
            opts = self._task.args.get("rsync_opts") or []
            if isinstance(opts, str):
                opts = opts.split(",")
            opts = list(opts)
            if not any("--rsh" in o for o in opts):
                rsh = conn.arbor_rsh()
                display.vvv("ARBOR SYNCHRONIZE through the tree: --rsh=%s" % rsh, host=conn._chain[-1]["name"])
                # The module runs rsync from one shell-quoted string.
                self._task.args["rsync_opts"] = opts + ["--rsh=" + shlex.quote(rsh)]
        return vanilla_run(self, tmp=tmp, task_vars=task_vars)
    run._arbor = True
    synchronize.ActionModule.run = run


# ------------------------------------------------------------ copy, one round trip
#
# Ansible's copy action stats the destination, then runs the copy module (if
# the checksum differs, after uploading the source) or the file module (if
# it is the same): two round trips. Through arbor, the source goes up
# without waiting, both module commands are built, and the agent stats and
# runs the right one in one request; the chosen module's answer then goes
# through Ansible's own result handling, so results and files are as
# vanilla's. Only the common case: no become, diff or check mode, raw,
# follow, force=no or a directory destination (a directory found at the
# destination falls back to Ansible's path); sources up to 256 KiB (a
# larger one is not uploaded before it is known to be needed).

_SPECULATIVE_BYTES_MAX = 256 * 1024


def _capture(conn, run):
    conn._arbor_capture = []
    try:
        run()
    except Captured:
        pass
    finally:
        got, conn._arbor_capture = conn._arbor_capture, None
    if len(got) != 1:
        raise AnsibleError("arbor: expected one module command, captured %d" % len(got))
    return got[0]


def _patch_copy(copy_action):
    from ansible.module_utils.parsing.convert_bool import boolean
    from ansible.utils.hashing import checksum as local_checksum_of
    import stat as stat_mod
    vanilla_copy_file = copy_action.ActionModule._copy_file
    if getattr(vanilla_copy_file, "_arbor", False):
        return

    def _copy_file(self, source_full, source_rel, content, content_tempfile, dest, task_vars, follow):
        conn = _arbor_conn(self)
        args = self._task.args

        def vanilla():
            return vanilla_copy_file(self, source_full, source_rel, content, content_tempfile, dest,
                                     task_vars, follow)
        if (conn is None or _become_applies(self) or self._task.diff or self._task.check_mode
                or not boolean(args.get("force", "yes"), strict=False)
                or boolean(args.get("raw", "no"), strict=False) or follow or args.get("checksum")
                or conn._shell.path_has_trailing_slash(dest) or not conn._shell.tmpdir
                or C.DEFAULT_KEEP_REMOTE_FILES):
            return vanilla()
        decrypt = boolean(args.get("decrypt", True), strict=False)
        try:
            real = self._loader.get_real_file(source_full, decrypt=decrypt)
        except AnsibleFileNotFound:
            return vanilla()
        if os.path.getsize(real) > _SPECULATIVE_BYTES_MAX:
            self._loader.cleanup_tmp_file(real)
            return vanilla()
        lmode = None
        if args.get("mode", None) == "preserve":
            lmode = "0%03o" % stat_mod.S_IMODE(os.stat(real).st_mode)
        local_checksum = local_checksum_of(real)
        tmp_src = conn._shell.join_path(conn._shell.tmpdir, ".source")
        suffix = os.path.splitext(dest)[1]
        if suffix:
            tmp_src += suffix
        copy_args = copy_action._create_remote_copy_args(args)
        copy_args.update(dict(src=tmp_src, dest=dest, _original_basename=source_rel, follow=follow,
                              checksum=local_checksum))
        file_args = copy_action._create_remote_file_args(args)
        file_args.update(dict(dest=dest, _original_basename=source_rel, recurse=False, state="file"))
        file_args.pop("src", None)
        if lmode:
            copy_args["mode"] = lmode
            file_args["mode"] = lmode
        # Uploaded before it is known to be needed: not awaited, and small.
        remote_path = self._transfer_file(real, tmp_src)
        self._fixup_perms2((conn._shell.tmpdir, remote_path))
        # Each module is built once, for the capture and for its answer.
        built = {}
        configure = self._configure_module

        def configure_once(module_name, module_args, task_vars=None):
            key = (module_name, json.dumps(module_args, sort_keys=True, default=repr))
            if key not in built:
                built[key] = configure(module_name=module_name, module_args=module_args,
                                       task_vars=task_vars)
            return built[key]
        self._configure_module = configure_once
        # The modules go up with the request whether pipelining is on or
        # not (with it off, Ansible would put each in the temp dir first):
        # arbor's agent runs them as Ansible would run either.
        self._is_pipelining_enabled = lambda module_style, wrap_async=False: module_style == "new"
        try:
            same = _capture(conn, lambda: self._execute_module(
                module_name="ansible.legacy.file", module_args=dict(file_args), task_vars=task_vars))
            differs = _capture(conn, lambda: self._execute_module(
                module_name="ansible.legacy.copy", module_args=dict(copy_args), task_vars=task_vars))
            st, branch, answer = conn.arbor_choose(dest, local_checksum, same, differs)
            if branch is not None:
                conn._arbor_canned = answer
                module_name, module_args = (("ansible.legacy.file", file_args) if branch == "same"
                                            else ("ansible.legacy.copy", copy_args))
                module_return = self._execute_module(module_name=module_name,
                                                     module_args=dict(module_args), task_vars=task_vars)
        except BaseException:
            # Nothing of the task stays on the controller either.
            self._remove_tempfile_if_content_defined(content, content_tempfile)
            self._loader.cleanup_tmp_file(real)
            raise
        finally:
            conn._arbor_canned = None
            self.__dict__.pop("_configure_module", None)
            self.__dict__.pop("_is_pipelining_enabled", None)
        if branch is None:
            # A directory: Ansible's own path (it stats again).
            self._loader.cleanup_tmp_file(real)
            return vanilla()
        self._remove_tempfile_if_content_defined(content, content_tempfile)
        self._loader.cleanup_tmp_file(real)
        if not module_return.get("checksum"):
            module_return["checksum"] = local_checksum
        result = {"diff": []}
        result.update(module_return)
        return result
    _copy_file._arbor = True
    copy_action.ActionModule._copy_file = _copy_file


# Each action class is patched when its first instance is made: nothing is
# imported for it (ansible.posix is loaded only by a task that uses it).
# Ansible loads the builtin copy action under more than one module name
# (`copy` is ansible.plugins.action.copy; `ansible.builtin.copy` its
# collection name).
_SYNCHRONIZE_MODULE = "ansible_collections.ansible.posix.plugins.action.synchronize"
_COPY_MODULES = ("ansible.plugins.action.copy", "ansible_collections.ansible.builtin.plugins.action.copy")
_vanilla_action_init = ActionBase.__init__


def _action_init(self, *args, **kwargs):
    _vanilla_action_init(self, *args, **kwargs)
    conn = getattr(self, "_connection", None)
    if isinstance(conn, _connection_class):
        conn._arbor_task = getattr(getattr(self, "_task", None), "_uuid", None)
        try:
            conn._arbor_hostvars = self._templar.available_variables.get("hostvars")
        except Exception:
            pass
    cls = type(self)
    if cls.__module__ in _COPY_MODULES and not getattr(cls._copy_file, "_arbor", False):
        _patch_copy(sys.modules[cls.__module__])
    if cls.__module__ == _SYNCHRONIZE_MODULE and not getattr(cls.run, "_arbor", False):
        _patch_synchronize(sys.modules[cls.__module__])

