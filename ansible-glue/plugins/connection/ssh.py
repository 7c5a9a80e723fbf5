# arbor's Ansible glue: a connection plugin named `ssh` that shadows the
# builtin one when its directory is on `connection_plugins`. One line turns
# arbor on; playbooks and inventories stay as they are.
#
# Every ssh host is then reached through arbor's controller daemon (one per
# ansible-playbook run, started here on first use): hosts that declare
# `mitogen_via` / `arbor_via` go through a relay on their via host; the rest
# directly. The via host's own settings come from its own inventory
# variables, resolved by Ansible's config system exactly as for that host.
#
# Set `arbor_disable: true` on a host to use Ansible's own ssh for it.

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import sys

import ansible.constants as C
from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
import ansible.plugins.connection as _connection_pkg
from ansible.utils.display import Display

display = Display()

# What the glue's plugins share lives beside them, not as plugins.
_GLUE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _GLUE not in sys.path:
    sys.path.insert(0, _GLUE)
from arbor_glue import wire  # noqa: E402
from arbor_glue.daemon import connect_daemon, persist_secs, run_dir as _run_dir  # noqa: E402
from arbor_glue.chain import container_hop  # noqa: E402
from arbor_glue import actions, buildcache, docs, forwards, scancache  # noqa: E402
from arbor_glue.docs import yaml_load  # noqa: E402
from arbor_glue.become import Become, BecomeNeeded, BecomeProxy  # noqa: E402
from arbor_glue.hops import Hops  # noqa: E402
from arbor_glue.progress import Progress  # noqa: E402
import ansible.executor.module_common as _module_common  # noqa: E402
from ansible.release import __version__ as _ansible_version  # noqa: E402



def load_builtin(name):
    """Ansible's own connection plugin `name`, loaded from its file under a
    private name: Ansible imports arbor's shadowing file as
    `ansible.plugins.connection.<name>`, so a plain import of that name
    would return arbor's module."""
    path = os.path.join(os.path.dirname(_connection_pkg.__file__), name + ".py")
    spec = importlib.util.spec_from_file_location("ansible.plugins.connection._arbor_builtin_" + name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_vanilla = load_builtin("ssh")


# What `ansible-doc -t connection ssh` shows with arbor's plugin path (it
# reads this literal, not what runs): arbor's own options and settings. At
# run time the plugin has the builtin ssh plugin's options too (below).
DOCUMENTATION = r"""
name: ssh
short_description: connect via ssh through arbor's relay tree
description:
  - arbor's C(ssh) connection, shadowing the builtin one when its directory is on
    C(connection_plugins) (C(arbor plugin-path) prints it). Every ssh host is reached
    through arbor's controller daemon, one per ansible-playbook run; hosts with a via
    go through a relay, in RAM, on the via host; modules run in a persistent Python
    interpreter on each target.
  - Every option of the builtin ssh plugin applies as documented for it
    (C(ansible-doc -t connection ansible.builtin.ssh)); the ones below are arbor's.
author: arbor
notes:
  - "Settings read from the controller's environment: C(ARBOR_BIN) (the arbor binary;
    default the one beside this glue), C(ARBOR_MAX_INTERPRETERS) (interpreters per
    target, login and become, default 20; Mitogen's C(MITOGEN_MAX_INTERPRETERS) too),
    C(ARBOR_CONNECT_CONCURRENCY) (hops a relay connects at once, default 64),
    C(ARBOR_KEEPALIVE_SECS) (a silent link is dead after this, default 180),
    C(ARBOR_STREAM_WINDOW_BYTES) (bytes in flight per transfer, default 1 MiB),
    C(ARBOR_STREAM_STALL_SECS) (a transfer with no credit this long fails, default 300),
    C(ARBOR_RELAY_CACHE_BYTES) (each relay's content cache, default 64 MiB),
    C(ARBOR_LOG) and C(ARBOR_LOG_FILE) (the daemon's log level and file),
    C(ARBOR_PYTHON) (the Python C(arbor ssh) runs Ansible with)."
  - "On the target: C(ARBOR_STAGE0_LOADER) (perl, python or shm) and
    C(ARBOR_STAGE0_VERBOSE) in a relay host's environment choose and show the loader."
options:
  arbor_via:
    description:
      - The host to reach this one through (an inventory host, or Mitogen's
        C([method:]user@host)). Mitogen's spelling is honoured.
    type: str
    vars:
      - name: arbor_via
      - name: mitogen_via
  arbor_via_rules:
    description:
      - Networks mapped to via hosts (a list of C({network, via})), usually in
        group_vars/all; a host with no via of its own goes through the via of the most
        specific network holding its C(ansible_host).
    type: raw
    vars:
      - name: arbor_via_rules
  arbor_inventory_hostname:
    description: The host's inventory name, for messages and via cycles.
    type: str
    vars:
      - name: inventory_hostname
  arbor_python:
    description: The interpreter that runs arbor's agent on the target.
    type: str
    vars:
      - name: ansible_python_interpreter
  arbor_task_isolation:
    description:
      - C(fork) runs every module of the task in a fork of the target's interpreter; by
        default the builtin modules known to keep to themselves run in the persistent
        interpreter and the rest fork. Mitogen's spelling is honoured.
    type: str
    vars:
      - name: arbor_task_isolation
      - name: mitogen_task_isolation
  arbor_forward:
    description:
      - Sockets forwarded while a task that sets it (in its C(vars), or its block's)
        runs on this host, each a C({listen, connect}); the target's agent listens on
        C(listen) (C(PORT) or C(HOST:PORT) on the loopback only, or a UNIX socket
        C(/PATH), made 0600), and each connection to it is carried through the tree to
        C(connect) on the controller (C(PORT), C(HOST:PORT) or C(/PATH)). Gone when the
        task ends, fails, or the run is interrupted.
    type: raw
    vars:
      - name: arbor_forward
  arbor_disable:
    description: Use Ansible's own ssh for this host.
    type: bool
    default: false
    vars:
      - name: arbor_disable
    env:
      - name: ARBOR_DISABLE
  arbor_persist:
    description:
      - Keep arbor's tree (the daemon, its relays and its interpreters) after the run,
        and reuse it in the next run of this user with the same arbor and settings; it
        goes down once no run has used it for this long, or on C(arbor stop)
        (C(arbor status) shows it). A duration (C(90s), C(10m), C(1h), or seconds);
        empty or C(0) keeps the tree for the run only.
      - A hop is reused only if everything that defines it is equal (host, port, user,
        keys, ssh options, via chain, become settings, interpreter).
    type: str
    default: ""
    env:
      - name: ARBOR_PERSIST
    ini:
      - section: arbor
        key: persist
  arbor_transport:
    description:
      - How arbor's frames reach this host's relay when it is a via host reached from
        the controller. C(ssh) (the default) keeps them in its ssh session; C(quic) has
        the relay (then its build with QUIC) listen on an ephemeral UDP port with a
        certificate made in RAM, and moves the frames to a QUIC connection that pins it
        and proves a one-time secret, each host behind the relay in a stream of its own.
        The ssh session stays the control channel. If QUIC does not get through in 3
        seconds the hop stays on ssh, and C(-vvv) says why.
    type: str
    default: ssh
    choices: [ssh, quic]
    vars:
      - name: arbor_transport
    env:
      - name: ARBOR_TRANSPORT
    ini:
      - section: arbor
        key: transport
"""

# arbor's own options, beside the builtin ssh plugin's.
ARBOR_OPTIONS = yaml_load(DOCUMENTATION)["options"]


def _run_time_documentation():
    # Set in a function: ansible-doc reads the module's assignments, and
    # keeps the literal above.
    global DOCUMENTATION
    DOCUMENTATION = docs.with_options(_vanilla.DOCUMENTATION, "connect via ssh through arbor's relay tree",
                                      ARBOR_OPTIONS)


_run_time_documentation()


def container_documentation(method):
    """The documentation of arbor's plugin for a container method."""
    return docs.container_documentation(method, ARBOR_OPTIONS)


# Interpreters of one user ended for one command, at most (and its sweeper).
_RELEASE_TRIES_MAX = 4
_PART_BYTES = 4 << 20

class _Client(wire.Client):
    """The daemon's local API, with its failures as Ansible's errors."""

    def __init__(self, path):
        super(_Client, self).__init__(path)
        self.host = None

    def recv(self):
        got = super(_Client, self).recv()
        if got is None:
            raise AnsibleConnectionFailure("arbor: the controller daemon closed the connection")
        obj, blob = got
        # What the agent logged: forwarded target-side logging, at -vvv.
        for line in obj.pop("log", None) or ():
            display.vvv("ARBOR LOG %s" % line, host=self.host)
        if "error" in obj:
            if obj.get("unreachable"):
                raise AnsibleConnectionFailure(obj["error"])
            if obj.get("become_needed"):
                raise BecomeNeeded(obj["error"])
            raise AnsibleError("arbor: %s" % obj["error"])
        return obj, blob


class Connection(Hops, Become, _vanilla.Connection):
    """Ansible's ssh plugin, carried by arbor's tree unless disabled."""

    has_pipelining = True

    def __init__(self, *args, **kwargs):
        super(Connection, self).__init__(*args, **kwargs)
        # Ansible's action code patched, once per process, when a
        # connection is first made (Ansible makes a task's connection
        # before its action): the fast paths, and a module_util's imports
        # found once per source, not once per run, and a module's built
        # payload kept across runs while what it was built from is unchanged.
        actions.install(Connection)
        scancache.install(_module_common, _ansible_version)
        buildcache.install(_module_common, _ansible_version)
        self._arbor = None
        self._arbor_forwards = None
        self._chain = None
        self._arbor_hostvars = None
        self._arbor_hello = None
        # A put or mkdtemp was sent and no answered request followed it yet.
        self._arbor_unacked = False
        # The next command runs with become (see BecomeProxy).
        self._arbor_sudo_next = False
        # Copy in one round trip: module commands captured, or an answer
        # already had for the next one.
        self._arbor_capture = None
        self._arbor_canned = None
        self._arbor_become_real = None
        # The task this connection serves (its uuid, the same for every
        # loop item): a hop that failed during it fails again at once.
        self._arbor_task = None

    def set_become_plugin(self, plugin):
        self._arbor_become_real = plugin
        super(Connection, self).set_become_plugin(
            BecomeProxy(self, plugin) if plugin is not None else None)

    def _enabled(self):
        return not self.get_option("arbor_disable")

    # ---------------------------------------------------------------- calls

    def _connect(self):
        if not self._enabled():
            return super(Connection, self)._connect()
        if self._arbor is None:
            self._chain = self._build_chain()
            self._arbor = connect_daemon(_Client, self._arbor_persist())
            self._arbor.host = self._chain[-1]["name"]
            self._connected = True
            if display.verbosity >= 3:
                self.arbor_info()  # shows each hop and its connect time
            self._arbor_forwards = forwards.open_all(
                _Client, self._arbor.path, self._arbor_target({}), self._arbor_option("arbor_forward"))
        return self

    def _arbor_option(self, name):
        try:
            return self.get_option(name)
        except KeyError:  # a plugin without the option
            return None

    def _arbor_persist(self):
        """Seconds the tree outlives the run (`arbor_persist`); 0: it does not."""
        return persist_secs(self._arbor_option("arbor_persist"))

    def arbor_active(self):
        return self._enabled()

    def arbor_rsh(self):
        """rsync's --rsh value that reaches this host through arbor's tree
        (ansible-glue/arbor_rsh.py, run by this Python)."""
        self._connect()
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "arbor_rsh.py")
        chain = base64.b64encode(json.dumps(self._chain).encode()).decode()
        return " ".join(shlex.quote(a) for a in (sys.executable, script,
                                                   self._arbor.path, chain))

    def arbor_shell_target(self, sudo=False):
        """Where `arbor ssh` sends its pipe: the run's socket, and this host
        (with sudo: its become interpreter, started here if need be, with
        the task's password, which the caller must keep in memory)."""
        self._connect()
        self.arbor_info()  # reached now: a failure is this task's, unreachable
        target = {"chain": self._chain}
        if sudo:
            self.arbor_info(sudo=True)
            target["become"] = self._arbor_become_spec()
        return {"sock": self._arbor.path, "target": target}

    def arbor_info(self, sudo=False):
        """The target agent's hello (pid, user, home): the daemon has it, so
        this costs no round trip to the target once it is connected. With
        sudo: the become interpreter's (started if need be)."""
        if sudo:
            self._connect()
            return self._arbor_roundtrip(lambda: self._arbor_send({"op": "info"}, sudo=True), True)[0]
        if self._arbor_hello is None:
            self._connect()
            self._arbor.send(self._arbor_target({"op": "info"}))
            self._arbor_hello = self._arbor.recv()[0]
            if display.verbosity >= 3:
                for hop in self._arbor_hello.get("hops", ()):
                    display.vvv("ARBOR HOP %s: node %s%s%s%s%s%s" % (
                        hop.get("label", "?"), hop.get("node"),
                        ", up in %s ms" % hop["connect_ms"] if "connect_ms" in hop else "",
                        ", pid %s" % hop["pid"] if "pid" in hop else "",
                        ", %s relay" % hop["machine"] if hop.get("machine") else "",
                        ", python %s" % hop["python"] if hop.get("python") else "",
                        ", over %s" % hop["transport"] if hop.get("transport") else ""),
                        host=self._chain[-1]["name"])
        return self._arbor_hello

    def arbor_call(self, req, noreply=False, sudo=False):
        """An agent operation (stat, mkdtemp, rmtree, sync). With noreply,
        nothing is awaited: a failure answers the next request instead.
        With sudo, the become interpreter does it."""
        self._connect()
        display.vvv("ARBOR %s %s%s%s" % (req.get("op", "").upper(), req.get("path") or req.get("paths") or req.get("name", ""),
                                         " (not awaited)" if noreply else "", " (become)" if sudo else ""),
                    host=self._chain[-1]["name"])
        send = lambda: self._arbor_send({"op": "call", "req": req, "noreply": noreply}, sudo=sudo)  # noqa: E731
        if noreply:
            if sudo:
                raise AnsibleError("arbor: a request for the become interpreter must be answered")
            send()
            if req.get("op") != "rmtree":
                self._arbor_unacked = True
            return None
        self._arbor_unacked = False
        return self._arbor_roundtrip(send, sudo)[0]

    def _arbor_target(self, obj):
        """`obj` addressed to this host: its chain, and the task asking."""
        return dict(obj, chain=self._chain, task=self._arbor_task)

    def _arbor_send(self, obj, blob=b"", sudo=False):
        """Sends a request for the login interpreter, or with sudo for the
        become interpreter."""
        obj = self._arbor_target(obj)
        if sudo:
            obj["become"] = self._arbor_become_spec()
        self._arbor.send(obj, blob)

    def _arbor_roundtrip(self, send, sudo):
        """The first answer to what send() sends. If it was for a become
        interpreter that is not up, that is started and send() repeated."""
        try:
            send()
            return self._arbor.recv()
        except BecomeNeeded:
            if not sudo:
                raise
        self._arbor_become()
        send()
        return self._arbor.recv()

    def exec_command(self, cmd, in_data=None, sudoable=True):
        if not self._enabled():
            return super(Connection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        if in_data and b"_ansiballz_main(" in in_data:
            if self._arbor_capture is not None:
                self._arbor_sudo_next = False
                self._arbor_capture.append((to_text(cmd), in_data))
                raise actions.Captured()
            if self._arbor_canned is not None:
                canned, self._arbor_canned = self._arbor_canned, None
                self._arbor_sudo_next = False
                return canned
        sudo = sudoable and self._arbor_sudo_next and self._arbor_become_real is not None
        self._arbor_sudo_next = False
        shown = "(no_log: command not shown)" if getattr(self._play_context, "no_log", False) else cmd
        display.vvv("ARBOR EXEC%s %s" % (" (become)" if sudo else "", shown), host=self._chain[-1]["name"])
        data = in_data or b""

        def send():
            self._arbor_send_body({"op": "exec", "cmd": to_text(cmd), "stdin_size": len(data),
                                   "isolation": self._arbor_isolation(), "cwd": self._arbor_cwd()},
                                  data, sudo=sudo)
        self._arbor_unacked = False
        for _ in range(_RELEASE_TRIES_MAX):
            res, blob = self._arbor_gather(*self._arbor_roundtrip(send, sudo))
            if not (res["rc"] and self._arbor_released(blob)):
                break
        n = res["stdout_len"]
        return res["rc"], blob[:n], blob[n:]

    def _arbor_cwd(self):
        """Where commands and modules run: the login directory (the local
        plugin's runs in the playbook's directory)."""
        return None

    def _arbor_isolation(self):
        """"fork" if the task asks for it, else None (the agent's default)."""
        value = self.get_option("arbor_task_isolation")
        if value in (None, ""):
            return None
        if to_text(value) != "fork":
            raise AnsibleError("%s: arbor_task_isolation (or mitogen_task_isolation) must be"
                               " 'fork' or unset, not %r" % (self._chain[-1]["name"], value))
        return "fork"

    def _arbor_send_body(self, obj, data, sudo=False):
        """A request whose body may be larger than one message: the first
        part with it, the rest in data messages."""
        self._arbor_send(obj, data[:_PART_BYTES], sudo=sudo)
        for i in range(_PART_BYTES, len(data), _PART_BYTES):
            self._arbor.send({"op": "data"}, data[i:i + _PART_BYTES])

    def _arbor_gather(self, res, blob):
        """A reply and its whole blob, whose rest follows in data messages."""
        parts = [blob]
        got = len(blob)
        while got < res.get("blob_size", got):
            _, more = self._arbor.recv()
            parts.append(more)
            got += len(more)
        return res, b"".join(parts)

    def arbor_choose(self, path, checksum, same, differs):
        """One round trip for copy: the agent stats `path` and runs the
        `same` module command (cmd, stdin) if the file's sha1 is `checksum`,
        else `differs`. Returns (stat, branch or None if a directory,
        (rc, stdout, stderr))."""
        self._connect()
        display.vvv("ARBOR CHOOSE %s" % path, host=self._chain[-1]["name"])
        self._arbor_send_body({"op": "choose", "path": to_text(path), "checksum": checksum,
                               "isolation": self._arbor_isolation(), "cwd": self._arbor_cwd(),
                               "same": {"cmd": same[0], "size": len(same[1])},
                               "differs": {"cmd": differs[0], "size": len(differs[1])}},
                              same[1] + differs[1])
        self._arbor_unacked = False
        res, blob = self._arbor_gather(*self._arbor.recv())
        if "branch" not in res:
            return res["stat"], None, None
        n = res["stdout_len"]
        return res["stat"], res["branch"], (res["rc"], blob[:n], blob[n:])

    def put_file(self, in_path, out_path):
        if not self._enabled():
            return super(Connection, self).put_file(in_path, out_path)
        self._connect()
        display.vvv("ARBOR PUT %s TO %s" % (in_path, out_path), host=self._chain[-1]["name"])
        b_in = to_bytes(in_path, errors="surrogate_or_strict")
        if not os.path.exists(b_in):
            raise AnsibleFileNotFound("file or module does not exist: %s" % in_path)
        # Not awaited: the agent writes it before it runs what follows, and a
        # failure is the answer to the next request.
        with open(b_in, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(_PART_BYTES)
            progress = Progress(display, self._chain[-1]["name"], "PUT", to_text(out_path), size)
            # keep_remote_files: the user reads the module's script as
            # Ansible made it, byte for byte (else arbor may send it as a
            # pipelined module's, without the zip the agent holds).
            self._arbor.send(self._arbor_target({"op": "put", "path": to_text(out_path), "size": size,
                                                 "noreply": True, "exact": C.DEFAULT_KEEP_REMOTE_FILES}),
                             first)
            progress.add(len(first))
            while True:
                chunk = f.read(_PART_BYTES)
                if not chunk:
                    break
                self._arbor.send({"op": "data"}, chunk)
                progress.add(len(chunk))
            progress.end()
        self._arbor_unacked = True

    def fetch_file(self, in_path, out_path):
        if not self._enabled():
            return super(Connection, self).fetch_file(in_path, out_path)
        self._connect()
        display.vvv("ARBOR FETCH %s TO %s" % (in_path, out_path), host=self._chain[-1]["name"])
        self._arbor.send(self._arbor_target({"op": "fetch", "path": to_text(in_path)}))
        res, first = self._arbor.recv()
        b_out = to_bytes(out_path, errors="surrogate_or_strict")
        progress = Progress(display, self._chain[-1]["name"], "FETCH", to_text(in_path), res.get("size"))
        with open(b_out, "wb") as f:
            f.write(first)
            progress.add(len(first))
            if res.get("streamed"):
                while True:
                    m, blob = self._arbor.recv()
                    if m.get("op") == "end":
                        break
                    f.write(blob)
                    progress.add(len(blob))
        progress.end()

    def close(self):
        if self._arbor is not None:
            if self._arbor_unacked:
                try:
                    self.arbor_call({"op": "sync"})
                except AnsibleError as e:
                    display.warning("arbor: %s" % e, host=self._chain[-1]["name"])
            self._arbor.close()
            self._arbor = None
        forwards.close_all(self._arbor_forwards)
        self._arbor_forwards = None
        # The next connect asks again: after a reset, the host's agent is new.
        self._arbor_hello = None
        self._connected = False
        if not self._enabled():
            return super(Connection, self).close()

    def reset(self):
        """`meta: reset_connection`, and the reboot and wait_for_connection
        actions between their attempts: the host's interpreters end (its
        login agents and their become agents), and its next task connects
        afresh. Without a daemon up, there is nothing to reset."""
        if not self._enabled():
            return super(Connection, self).reset()
        self.close()
        name = self._arbor_name()
        try:
            client = _Client(os.path.join(_run_dir(self._arbor_persist()), "sock"))
        except OSError:
            return
        try:
            client.host = name
            client.send({"op": "reset", "host": name})
            ended = client.recv()[0].get("ended", 0)
        finally:
            client.close()
        display.vvv("ARBOR RESET %d interpreter%s ended" % (ended, "" if ended == 1 else "s"), host=name)


class ContainerConnection(Connection):
    """Base of arbor's container plugins (docker.py, …): the container as the
    last hop, entered by the relay on the host in its via."""

    _arbor_method = None
    has_pipelining = True

    def _enabled(self):
        return True

    def is_pipelining_enabled(self, wrap_async=False):
        return not wrap_async

    def _arbor_name(self):
        return to_text(self.get_option("arbor_inventory_hostname"))

    def _build_chain(self):
        name = self._arbor_name()
        hostvars = self._arbor_hostvars if self._arbor_hostvars is not None else {}
        own = hostvars.get(name) or {}

        def get(var):
            # The task's own values for the host and user, the rest from the host's variables.
            if var in ("ansible_host", "ansible_%s_host" % self._arbor_method):
                return self.get_option("remote_addr")
            if var in ("ansible_user", "ansible_%s_user" % self._arbor_method):
                return self.get_option("remote_user")
            if var == "ansible_python_interpreter":
                return self.get_option("arbor_python")
            return own.get(var)
        target = container_hop(name, self._arbor_method, get)
        return self._with_vias(name, target)
