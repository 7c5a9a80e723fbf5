#!/usr/bin/env python3
"""arbor's lab: a fleet behind bastions on one machine, across an emulated WAN.

Every host is a network namespace running its own sshd, in its own mount and
UTS namespace: its own /root (Debian's default dot files), /etc/ssh (its own
host keys), /tmp and /var/tmp. The lab's run directory, which holds the
controller's private key, is masked inside every host.

    controller (root ns, arb-wan0 10.240.0.1)
        |  veth
    arb-wan: arbor-wan bridges "wa" <-> "wb" with delay, rate and loss
        |  bridge "wbr"
    bastionB (10.240.0.(10+B), LAN bridge "lan" 10.241.B.1/24)
        |  --depth 2: rackR (10.241.B.x, LAN bridge "lan" 10.242.R.1/24)
    targetN (10.241.B.x or 10.242.R.x)

The root namespace has `unreachable` routes for the target LANs
(10.241.0.0/16, 10.242.0.0/16), so a target address is refused at once on the
controller instead of leaking to the machine's real network; only the WAN
/24 (10.240.0.0/24) is connected. `up` refuses to run if the machine already
uses any of these ranges (a route or a nameserver).

Commands: up, down, wan (stats|reset|set), cpu. Standard library only.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import DOCKER_DIR, JOIN_CGROUP, RUN_DIR, LabError, log, ns_exec, sh  # noqa: F401 (re-exported)
from containers import (start_docker, start_kubectl_standin, start_lxc, start_lxd, start_namespace_containers,
                        start_podman, stop_docker)

REPO = Path(__file__).resolve().parents[2]
NS_PREFIX = "arb-"
ROOT_IF = "arb-wan0"
CONTROLLER_ADDR = "10.240.0.1"
WAN_NET = "10.240.0"
# Target LANs are unroutable from the controller: refused at once instead of
# leaking to the machine's real network. Only these ranges are blocked (a
# wider one could swallow the machine's own nameserver).
LAB_UNREACHABLE = ("10.241.0.0/16", "10.242.0.0/16")
LAB_RANGES = ("10.240.0.0/24",) + LAB_UNREACHABLE
BASTION_LAN = "10.241.{b}"
RACK_LAN = "10.242.{r}"
HOSTS_PER_LAN_MAX = 240
BASTIONS_MAX = 200
RACKS_MAX = 250
CGROUP_NAME = "arbor-lab"
SSHD_READY_TIMEOUT_S = 30.0
WAN_READY_TIMEOUT_S = 10.0
KILL_GRACE_S = 2.0

SSHD_CONFIG = """\
# arbor lab host {name}
ListenAddress {addr}
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
UseDNS no
# Fleet tests open many connections and multiplexed sessions at once.
MaxStartups 1000:30:2000
MaxSessions 1000
AllowAgentForwarding yes
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
{extra}# The account of password logins (tests create it): passwords only.
Match User {password_user}
    PasswordAuthentication yes
    PubkeyAuthentication no
"""
# The account that logs in with a password only, on every host.
PASSWORD_USER = "arbpw"

# A host's `shutdown` and `reboot` (Debian's are systemd's): a reboot in
# the lab. They return at once; a second later every process of the host
# is killed, /tmp is emptied, the boot id changes, and after REBOOT_DOWN_S
# the host's sshd starts again. `shutdown -h`/`poweroff` stop the host for
# good; `shutdown -c` cancels nothing.
REBOOT_DOWN_S = 3
# An aarch64 `uname` (Debian's busybox-static:arm64, fetched by deploy/setup)
# and the binfmt_misc entry that runs it (Debian's qemu-user-static).
AARCH64_UNAME = Path("/var/cache/arbor-lab/busybox-aarch64")
QEMU_AARCH64 = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
SHUTDOWN = r"""#!/bin/sh
mode=reboot
for a in "$@"; do
    case "$a" in -c) exit 0 ;; -h|-P|--halt|--poweroff) mode=halt ;; esac
done
case "${0##*/}" in poweroff|halt) mode=halt ;; esac
# Run on a terminal (vanilla's ssh -tt), its end hangs up on us: the
# helper ignores that, in a session of its own.
trap '' HUP
setsid -f /usr/sbin/arbor-lab-reboot "$mode" </dev/null >/dev/null 2>&1
echo "arbor lab: $mode in 1 s"
"""
REBOOT = r"""#!/bin/sh
# Runs detached: the host's last process while it is down.
sleep 1
# Every process of this host: those in its network namespace.
me=$(readlink /proc/$$/ns/net)
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" != $$ ] && [ "$(readlink "$d/ns/net" 2>/dev/null)" = "$me" ] && kill -9 "$p" 2>/dev/null
done
[ "$1" = halt ] && exit 0
find /tmp /var/tmp /dev/shm -mindepth 1 -delete 2>/dev/null
cat /proc/sys/kernel/random/uuid > /proc/sys/kernel/random/boot_id
sleep {down_s}
exec /usr/sbin/sshd -D -f /etc/ssh/sshd_config
"""

# Runs inside the host's namespaces (after `ip netns exec` and `unshare`).
HOST_INIT = r"""
set -eu
exec >>"$HD/sshd.log" 2>&1
hostname "$NAME"
# This machine's other Pythons (pyenv's builds, under /root), read-only,
# at their own paths.
pythons=0
if [ -d "$PYENV_VERSIONS" ] && [ "$NOPYTHON" != 1 ]; then
    mount -o bind,ro "$PYENV_VERSIONS" "$HD/pythons"
    pythons=1
fi
mount --bind "$HD/home" /root
if [ $pythons = 1 ]; then
    mkdir -p "$PYENV_VERSIONS"
    mount --bind "$HD/pythons" "$PYENV_VERSIONS"
fi
mount --bind "$HD/etc-ssh" /etc/ssh
mount -t tmpfs -o mode=1777,size=2g tmpfs /tmp
mount -t tmpfs -o mode=1777,size=256m tmpfs /var/tmp
# Its own /dev/shm too: the controller's (shared) must not show as the host's.
mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm
# Its own boot id, which its reboot changes.
cat /proc/sys/kernel/random/uuid > "$HD/boot_id"
mount --bind "$HD/boot_id" /proc/sys/kernel/random/boot_id
# Its own shutdown and reboot (see SHUTDOWN), over Debian's.
mount -t tmpfs -o size=1m tmpfs "$HD/sbin"
mkdir "$HD/sbin/upper" "$HD/sbin/work"
cp "$HD/sbin-files/"* "$HD/sbin/upper/"
mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$HD/sbin/upper,workdir=$HD/sbin/work" /usr/sbin
if [ "$NOPYTHON" = 1 ] || [ -n "$UNAME_BIN" ]; then
    mount -t tmpfs -o size=8m tmpfs "$HD/ovl"
    mkdir "$HD/ovl/upper" "$HD/ovl/work"
    if [ "$NOPYTHON" = 1 ]; then
        # Whiteouts in an overlay make every python binary truly absent.
        for f in /usr/bin/python* /usr/bin/pydoc* /usr/bin/*-python3*; do
            [ -e "$f" ] || [ -L "$f" ] || continue
            mknod "$HD/ovl/upper/${f##*/}" c 0 0
        done
    fi
    # Another machine's `uname` (an aarch64 busybox, run by qemu-user
    # through binfmt_misc): the host says it is that machine, and gets
    # that machine's relay, which runs the same way.
    [ -n "$UNAME_BIN" ] && cp "$UNAME_BIN" "$HD/ovl/upper/uname"
    mount -t overlay overlay \
        -o "lowerdir=/usr/bin,upperdir=$HD/ovl/upper,workdir=$HD/ovl/work" /usr/bin
fi
# Hide the controller's private key and every host's secrets; the public
# files (known_hosts, inventories, lab.json) stay readable, as they would be.
mount -t tmpfs -o size=64k,mode=0700 tmpfs "$RUN/controller"
mount -t tmpfs -o size=64k,mode=0700 tmpfs "$RUN/hosts"
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config
"""


def cgroup_base():
    """Returns (kind, path) of the lab's cgroup parent for CPU accounting."""
    v1 = Path("/sys/fs/cgroup/cpuacct")
    if (v1 / "cpuacct.usage").exists():
        return "v1", v1 / CGROUP_NAME
    for v2 in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (v2 / "cgroup.procs").exists() and (v2 / "cgroup.controllers").exists():
            return "v2", v2 / CGROUP_NAME
    raise LabError("no cgroup hierarchy with CPU accounting found")


def cgroup_cpu_seconds(path):
    """CPU seconds used by every process that ever ran in the cgroup."""
    path = Path(path)
    usage = path / "cpuacct.usage"
    if usage.exists():
        return int(usage.read_text()) / 1e9
    for line in (path / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    raise LabError(f"no CPU usage in {path}")


def cgroup_pids(path):
    procs = Path(path) / "cgroup.procs"
    try:
        return [int(p) for p in procs.read_text().split()]
    except OSError:
        return []


def remove_cgroup_tree(path):
    path = Path(path)
    if not path.is_dir():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir():
            kill_pids(cgroup_pids(child))
            rmdir_retry(child)
    kill_pids(cgroup_pids(path))
    rmdir_retry(path)


# ---------------------------------------------------------------- processes


def kill_pids(pids):
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for p in pids:
            try:
                os.kill(p, sig)
                alive.append(p)
            except ProcessLookupError:
                pass
        reap(alive)
        if not alive:
            return
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline:
            reap(alive)
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and not is_zombie(p)]
            if not alive:
                return
            time.sleep(0.02)
        pids = alive


def reap(pids):
    """Reaps those of `pids` that are our own children and have exited."""
    for p in pids:
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass


def rmdir_retry(path):
    """rmdir a cgroup; its last processes may take a moment to be released."""
    deadline = time.monotonic() + KILL_GRACE_S
    while True:
        try:
            path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise LabError(f"cgroup {path} still holds {cgroup_pids(path)}")
            kill_pids(cgroup_pids(path))
            time.sleep(0.02)


def is_zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def lab_namespaces():
    out = sh("ip", "netns", "list", capture=True, check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(NS_PREFIX)]


def ns_pids(ns):
    out = sh("ip", "netns", "pids", ns, capture=True, check=False)
    return [int(p) for p in out.split()]


# ---------------------------------------------------------------- down


def lab_client_pids():
    """Controller-side processes using the lab's files, such as ssh
    ControlPersist masters' ProxyJump children: their links die with the lab."""
    needle = (str(RUN_DIR) + "/").encode()
    mine = {os.getpid(), os.getppid()}
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            if needle in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def down(_args=None):
    """Removes every trace of the lab; safe to run at any time."""
    stop_docker()
    for ns in lab_namespaces():
        kill_pids(ns_pids(ns))
    kill_pids(lab_client_pids())
    try:
        _, cg = cgroup_base()
        remove_cgroup_tree(cg)
    except LabError:
        pass
    for ns in lab_namespaces():
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", ROOT_IF, check=False)
    for route in lab_routes():
        sh("ip", "route", "del", *route.split(), check=False)
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    stop_docker()
    left = leftovers()
    if left:
        raise LabError("down left behind: " + "; ".join(left))
    log("down: no lab namespace, interface, process, cgroup, mount or route left")


def lab_routes():
    """The lab's unreachable routes in the root namespace, as `ip route`
    arguments (also the 10.240.0.0/12 of earlier versions)."""
    out = sh("ip", "route", "show", "type", "unreachable", capture=True, check=False)
    routes = []
    for line in out.splitlines():
        words = line.split()
        prefix = words[1] if words[:1] == ["unreachable"] and len(words) > 1 else ""
        if prefix.startswith("10.24"):
            routes.append(f"unreachable {prefix}")
    return routes


def check_ranges_free():
    """Refuses to build the lab over addresses this machine already uses."""
    import ipaddress
    lab_nets = [ipaddress.ip_network(r) for r in LAB_RANGES]
    used = []
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            if line.startswith("nameserver"):
                used.append(("nameserver", line.split()[1]))
    except OSError:
        pass
    for line in sh("ip", "-4", "route", "show", capture=True, check=False).splitlines():
        dst = line.split()[0]
        if dst != "default" and not line.startswith("unreachable") and ROOT_IF not in line:
            used.append(("route", dst))
    for what, addr in used:
        try:
            net = ipaddress.ip_network(addr, strict=False)
        except ValueError:
            continue
        if any(net.overlaps(n) for n in lab_nets):
            raise LabError(f"this machine's {what} {addr} overlaps the lab's ranges {', '.join(LAB_RANGES)}")


def leftovers():
    """Everything of the lab still present, as readable strings."""
    left = [f"netns {n}" for n in lab_namespaces()]
    left += [f"process {p}" for p in lab_client_pids()]
    links = sh("ip", "-o", "link", "show", capture=True, check=False)
    left += [f"interface {l.split(':')[1].strip()}" for l in links.splitlines()
             if l.split(":")[1].strip().split("@")[0].startswith("arb")]
    left += [f"route {r}" for r in lab_routes()]
    mounts = Path("/proc/self/mountinfo").read_text()
    left += [f"mount {l.split()[4]}" for l in mounts.splitlines()
             if str(RUN_DIR) in l or "/run/netns/" + NS_PREFIX in l]
    try:
        _, cg = cgroup_base()
        if cg.exists():
            left.append(f"cgroup {cg}")
    except LabError:
        pass
    if RUN_DIR.exists():
        left.append(f"run dir {RUN_DIR}")
    if DOCKER_DIR.exists():
        left.append(f"docker dir {DOCKER_DIR}")
    return left


# ---------------------------------------------------------------- up


class Host:
    def __init__(self, name, role, addr, via, lan_bridge_ns, python3, machine=None):
        self.name = name
        self.machine = machine  # another machine's uname (see HOST_INIT), or None
        self.role = role
        self.addr = addr
        self.via = via
        self.parent_ns = lan_bridge_ns
        self.python3 = python3
        self.ns = NS_PREFIX + name
        self.lan = None  # "a.b.c" prefix of the LAN it serves, if any
        self.cgroup = None
        self.proc = None  # the host's init, which becomes its sshd

    @property
    def dir(self):
        return RUN_DIR / "hosts" / self.name


def plan(args):
    """Names and addresses for every host, in creation order."""
    hosts = []
    rack_no = 0
    target_no = 0
    for b in range(1, args.bastions + 1):
        bastion = Host(f"bastion{b}", "bastion", f"{WAN_NET}.{10 + b}", None, None,
                       python3=not args.no_python_bastion,
                       machine="aarch64" if args.aarch64_bastion else None)
        bastion.lan = BASTION_LAN.format(b=b)
        hosts.append(bastion)
        parents = [bastion]
        if args.depth == 2:
            parents = []
            for k in range(args.racks):
                rack_no += 1
                rack = Host(f"rack{rack_no}", "rack", f"{bastion.lan}.{10 + k}", bastion.name,
                            bastion.ns, python3=True)
                rack.lan = RACK_LAN.format(r=rack_no)
                hosts.append(rack)
                parents.append(rack)
        counts = [args.targets // len(parents)] * len(parents)
        for i in range(args.targets % len(parents)):
            counts[i] += 1
        for parent, count in zip(parents, counts):
            for k in range(count):
                target_no += 1
                hosts.append(Host(f"target{target_no}", "target", f"{parent.lan}.{10 + k}",
                                  parent.name, parent.ns, python3=True))
        if b == 1 and args.container_host:
            hosts.append(Host("chost1", "chost", f"{bastion.lan}.250", bastion.name, bastion.ns,
                              python3=True))
    return hosts


def check_args(args):
    if not 1 <= args.bastions <= BASTIONS_MAX:
        raise LabError(f"--bastions must be 1..{BASTIONS_MAX}")
    if args.depth not in (1, 2):
        raise LabError("--depth must be 1 or 2")
    per_lan = args.targets if args.depth == 1 else -(-args.targets // max(args.racks, 1))
    if args.targets < 0 or per_lan > HOSTS_PER_LAN_MAX:
        raise LabError(f"at most {HOSTS_PER_LAN_MAX} targets per LAN")
    if args.depth == 2 and not 1 <= args.racks * args.bastions <= RACKS_MAX:
        raise LabError(f"--racks × --bastions must be 1..{RACKS_MAX}")
    if args.wan_delay_ms < 0 or args.wan_rate_mbit < 0 or not 0 <= args.wan_loss_pct <= 100:
        raise LabError("WAN settings must be non-negative, loss at most 100")
    if args.aarch64_bastion:
        if not AARCH64_UNAME.exists():
            raise LabError(f"--aarch64-bastion needs {AARCH64_UNAME}: run deploy/setup")
        entry = QEMU_AARCH64.read_text() if QEMU_AARCH64.exists() else ""
        flags = next((x.split()[1] for x in entry.splitlines() if x.startswith("flags:")), "")
        if not entry.startswith("enabled") or "O" not in flags or "F" not in flags:
            raise LabError(f"--aarch64-bastion needs qemu-user through binfmt_misc ({QEMU_AARCH64}, "
                           "flags O and F): run deploy/setup")
    for tool in ("ip", "ssh-keygen", "ethtool", "unshare"):
        if not shutil.which(tool):
            raise LabError(f"{tool} not found: run deploy/setup first")
    if not Path("/usr/sbin/sshd").exists():
        raise LabError("/usr/sbin/sshd not found: run deploy/setup first")


def wan_binary():
    env = os.environ.get("ARBOR_WAN_BIN")
    if env:
        return Path(env)
    built = REPO / "target" / "release" / "arbor-wan"
    cargo = shutil.which("cargo") or shutil.which(Path.home() / ".cargo" / "bin" / "cargo")
    if cargo:
        sh(cargo, "build", "--quiet", "--release", "-p", "arbor-wanem",
           "--manifest-path", REPO / "Cargo.toml")
    elif not built.exists():
        raise LabError("cargo not found and arbor-wan not built: run deploy/setup")
    return built


def offloads_off(ns, dev):
    """Segmentation and checksum offloads make veth frames bigger than the MTU
    or leave checksums for hardware; the emulator needs plain frames."""
    cmd = ["ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off"]
    if ns:
        ns_exec(ns, *cmd, check=False)
    else:
        sh(*cmd, check=False)


def host_sysctls(ns):
    ns_exec(ns, "sh", "-c",
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 "
            "net.ipv4.ip_forward=0 && ip link set lo up")


def make_network(hosts):
    sh("ip", "netns", "add", "arb-wan")
    host_sysctls("arb-wan")
    sh("ip", "link", "add", ROOT_IF, "type", "veth", "peer", "name", "wa", "netns", "arb-wan")
    sh("ip", "addr", "add", f"{CONTROLLER_ADDR}/24", "dev", ROOT_IF)
    sh("sysctl", "-qw", f"net.ipv6.conf.{ROOT_IF}.disable_ipv6=1")
    sh("ip", "link", "set", ROOT_IF, "up")
    for net in LAB_UNREACHABLE:
        sh("ip", "route", "add", "unreachable", net)
    offloads_off(None, ROOT_IF)
    w = ["ip", "-n", "arb-wan"]
    sh(*w, "link", "add", "wb", "type", "veth", "peer", "name", "wbp")
    sh(*w, "link", "add", "wbr", "type", "bridge")
    sh(*w, "link", "set", "wbp", "master", "wbr")
    for dev in ("wa", "wb", "wbp", "wbr"):
        sh(*w, "link", "set", dev, "up")
    for dev in ("wa", "wb"):
        sh(*w, "link", "set", dev, "promisc", "on")
        offloads_off("arb-wan", dev)

    for h in hosts:
        sh("ip", "netns", "add", h.ns)
        host_sysctls(h.ns)
        if h.role == "bastion":
            sh("ip", "link", "add", "eth0", "netns", h.ns, "type", "veth",
               "peer", "name", h.name[:15], "netns", "arb-wan")
            sh("ip", "-n", "arb-wan", "link", "set", h.name[:15], "master", "wbr", "up")
            offloads_off(h.ns, "eth0")
        else:
            peer = ("t" if h.role == "target" else "r") + h.name.lstrip("targetrack")
            sh("ip", "link", "add", "eth0", "netns", h.ns, "type", "veth",
               "peer", "name", peer, "netns", h.parent_ns)
            sh("ip", "-n", h.parent_ns, "link", "set", peer, "master", "lan", "up")
        n = ["ip", "-n", h.ns]
        sh(*n, "addr", "add", f"{h.addr}/24", "dev", "eth0")
        sh(*n, "link", "set", "eth0", "up")
        if h.lan:
            sh(*n, "link", "add", "lan", "type", "bridge")
            sh(*n, "addr", "add", f"{h.lan}.1/24", "dev", "lan")
            sh(*n, "link", "set", "lan", "up")


def debian_dotfiles():
    """Debian's default dot files for root (base-files), else /etc/skel."""
    base = Path("/usr/share/base-files")
    files = {".bashrc": base / "dot.bashrc", ".profile": base / "dot.profile"}
    if not all(p.exists() for p in files.values()):
        files = {p.name: p for p in Path("/etc/skel").iterdir() if p.is_file()}
    return files


def make_keys_and_configs(hosts, args):
    RUN_DIR.mkdir(mode=0o755, parents=True)
    (RUN_DIR / "controller").mkdir(mode=0o700)
    key = RUN_DIR / "controller" / "id_lab"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "arbor-lab", "-f", key)
    pub = Path(str(key) + ".pub").read_text()

    known = []
    for h in hosts:
        etc = h.dir / "etc-ssh"
        etc.mkdir(parents=True)
        for entry in Path("/etc/ssh").iterdir():
            if entry.name.startswith("ssh_host_") or entry.name == "sshd_config":
                continue
            if entry.is_dir():
                shutil.copytree(entry, etc / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, etc / entry.name)
        hk = etc / "ssh_host_ed25519_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f", hk)
        extra = ""
        if h.role == "chost":
            # Sessions on the container host use its lab Docker engine (so
            # vanilla's `docker -H ssh://chost1` reaches it too).
            extra = f"SetEnv DOCKER_HOST=unix://{DOCKER_DIR / h.name / 'docker.sock'}\n"
        config = SSHD_CONFIG.format(name=h.name, addr=h.addr, password_user=PASSWORD_USER,
                                    extra=extra)
        (etc / "sshd_config").write_text(config)
        kind, blob = (Path(str(hk) + ".pub").read_text().split()[:2])
        known.append(f"{h.name},{h.addr} {kind} {blob}\n")
    (RUN_DIR / "known_hosts").write_text("".join(known))

    dotfiles = debian_dotfiles()
    for h in hosts:
        home = h.dir / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        home.chmod(0o700)
        for name, src in dotfiles.items():
            shutil.copy(src, home / name)
        (home / ".ssh" / "authorized_keys").write_text(pub)
        if args.key_on_bastions and h.role in ("bastion", "rack"):
            # Off by default: the controller's key stays on the controller.
            shutil.copy(key, home / ".ssh" / "id_ed25519")
        (home / ".ssh" / "known_hosts").write_text("".join(known))
        for f in (home / ".ssh").iterdir():
            f.chmod(0o600)
        (h.dir / "ovl").mkdir()
        (h.dir / "pythons").mkdir()
        (h.dir / "sbin").mkdir()
        files = h.dir / "sbin-files"
        files.mkdir()
        for name in ("shutdown", "reboot", "poweroff", "halt"):
            (files / name).write_text(SHUTDOWN)
        (files / "arbor-lab-reboot").write_text(REBOOT.replace("{down_s}", str(REBOOT_DOWN_S)))
        for f in files.iterdir():
            f.chmod(0o755)


def pyenv_versions():
    """Where this machine's pyenv keeps its Python builds, if it has any."""
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    return Path(root) / "versions"


def start_host(h, cg_kind, cg_root):
    h.cgroup = cg_root / h.name
    h.cgroup.mkdir()
    env = dict(os.environ, CGROUP=str(h.cgroup), HD=str(h.dir), NAME=h.name,
               RUN=str(RUN_DIR), NOPYTHON="0" if h.python3 else "1",
               UNAME_BIN=str(AARCH64_UNAME) if h.machine == "aarch64" else "",
               PYENV_VERSIONS=str(pyenv_versions()))
    # Join the cgroup first: `ip netns exec` remounts /sys without the cgroup mounts.
    h.proc = subprocess.Popen(
        ["sh", "-c", JOIN_CGROUP, str(h.cgroup),
         "ip", "netns", "exec", h.ns, "unshare", "--mount", "--uts", "--propagation", "private",
         "sh", "-c", HOST_INIT],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(h.dir / "init.log", "wb"), start_new_session=True)


def wait_sshd(hosts):
    deadline = time.monotonic() + SSHD_READY_TIMEOUT_S
    pending = list(hosts)
    while pending:
        still = []
        for h in pending:
            out = sh("ss", "-N", h.ns, "-Hltn", "sport = :22", capture=True, check=False)
            if not out.strip():
                still.append(h)
        pending = still
        dead = [h for h in pending if h.proc.poll() is not None]
        if dead or (pending and time.monotonic() > deadline):
            pending = dead or pending
            details = []
            for h in pending[:5]:
                for f in ("init.log", "sshd.log"):
                    p = h.dir / f
                    if p.exists() and p.read_text().strip():
                        details.append(f"{h.name} {f}: {p.read_text().strip()[-400:]}")
            raise LabError("sshd did not start (or died) on " + ", ".join(h.name for h in pending)
                           + ("\n" + "\n".join(details) if details else ""))
        if pending:
            time.sleep(0.05)


def start_wan(args, cg_root):
    binary = wan_binary()
    if not binary.exists():
        raise LabError(f"WAN emulator {binary} missing")
    local = RUN_DIR / "arbor-wan"
    shutil.copy2(binary, local)
    cg = cg_root / "wan"
    cg.mkdir()
    ctl = RUN_DIR / "wan.sock"
    cmd = ["ip", "netns", "exec", "arb-wan", str(local), "run", "--a", "wa", "--b", "wb",
           "--control", str(ctl), "--stats-file", str(RUN_DIR / "wan-stats.json"),
           "--delay-ms", str(args.wan_delay_ms), "--rate-mbit", str(args.wan_rate_mbit),
           "--loss-pct", str(args.wan_loss_pct)]
    if args.wan_delay_up_ms is not None:
        cmd += ["--delay-up-ms", str(args.wan_delay_up_ms)]
    if args.wan_delay_down_ms is not None:
        cmd += ["--delay-down-ms", str(args.wan_delay_down_ms)]
    cmd = ["sh", "-c", JOIN_CGROUP, str(cg)] + cmd
    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=open(RUN_DIR / "wan.log", "wb"), start_new_session=True)
    deadline = time.monotonic() + WAN_READY_TIMEOUT_S
    while True:
        res = sh(local, "ctl", "--control", ctl, "stats", check=False)
        if res.returncode == 0:
            return local, ctl
        if time.monotonic() > deadline:
            raise LabError("WAN emulator did not start: " + (RUN_DIR / "wan.log").read_text())
        time.sleep(0.05)


def yaml_scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML scalar


def write_yaml(path, groups, all_vars):
    """Writes an Ansible YAML inventory: {group: (group_vars, {host: vars})}."""
    lines = ["# Generated by deploy/lab/up; do not edit.", "all:", "  vars:"]
    lines += [f"    {k}: {yaml_scalar(v)}" for k, v in all_vars.items()]
    lines.append("  children:")
    for group, (gvars, hosts) in groups.items():
        if not hosts:
            continue
        lines.append(f"    {group}:")
        if gvars:
            lines.append("      vars:")
            lines += [f"        {k}: {yaml_scalar(v)}" for k, v in gvars.items()]
        lines.append("      hosts:")
        for name, hvars in hosts.items():
            inner = ", ".join(f"{k}: {yaml_scalar(v)}" for k, v in hvars.items())
            lines.append(f"        {name}: {{{inner}}}")
    Path(path).write_text("\n".join(lines) + "\n")


def via_chain(hosts_by_name, h):
    chain = []
    while h.via:
        h = hosts_by_name[h.via]
        chain.append(h.name)
    return list(reversed(chain))  # outermost first


def write_files(hosts, args, cg_kind, cg_root, wan_bin, wan_ctl, containers=None):
    by_name = {h.name: h for h in hosts}
    key = RUN_DIR / "controller" / "id_lab"
    known = RUN_DIR / "known_hosts"
    cfg = RUN_DIR / "ssh_config"

    blocks = [f"# Generated by deploy/lab/up. Targets need a hop: ssh -F {cfg} -J bastion1 target1\n"]
    for h in hosts:
        blocks.append(f"Host {h.name}\n    HostName {h.addr}\n")
    blocks.append(
        "Host *\n    User root\n"
        f"    IdentityFile {key}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known}\n    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n    BatchMode yes\n    ConnectTimeout 10\n")
    cfg.write_text("\n".join(blocks))

    base_vars = {"ansible_user": "root", "ansible_python_interpreter": "/usr/bin/python3"}
    strict = (f"-o UserKnownHostsFile={known} -o GlobalKnownHostsFile=/dev/null "
              "-o StrictHostKeyChecking=yes")

    def group(role):
        return [h for h in hosts if h.role == role]

    # inventory.yml: hops declared with mitogen_via; the controller holds the
    # key, and hops behind the first authenticate with the forwarded agent.
    # Every host's key is checked against the lab's known_hosts (a public
    # file, readable on the hosts too).
    groups = {
        "bastions": ({"ansible_ssh_private_key_file": str(key),
                      "ansible_ssh_common_args": strict + " -o IdentitiesOnly=yes -o ForwardAgent=yes"},
                     {h.name: {"ansible_host": h.addr} for h in group("bastion")}),
        "racks": ({"ansible_ssh_common_args": strict + " -o ForwardAgent=yes"},
                  {h.name: {"ansible_host": h.addr, "mitogen_via": h.via} for h in group("rack")}),
        "targets": ({}, {h.name: {"ansible_host": h.addr, "mitogen_via": h.via}
                         for h in group("target")}),
    }
    containers = containers or {}
    if group("chost"):
        groups["chosts"] = ({}, {h.name: {"ansible_host": h.addr, "mitogen_via": h.via}
                                 for h in group("chost")})
    if containers:
        def reach(name, c):
            if c["method"] == "docker":
                return {"ansible_connection": "docker", "mitogen_docker_path": c["docker"],
                        "mitogen_via": c["host"]}
            if c["method"] == "kubectl":
                return {"ansible_connection": "kubectl", "ansible_host": c["pod"],
                        "mitogen_kubectl_path": c["kubectl"], "ansible_kubectl_namespace": "default",
                        "mitogen_via": c["host"]}
            if c["method"] == "buildah":
                return {"ansible_connection": "buildah", "mitogen_buildah_path": c["buildah"],
                        "mitogen_via": c["host"]}
            if c["method"] == "lxd":
                return {"ansible_connection": "lxd", "mitogen_lxc_path": c["lxc"], "mitogen_via": c["host"]}
            if c["method"] == "podman":
                return {"ansible_connection": "podman", "mitogen_podman_path": c["podman"],
                        "mitogen_via": c["host"]}
            if c["method"] == "lxc":
                return {"ansible_connection": "lxc", "mitogen_lxc_attach_path": c["lxc_attach"],
                        "mitogen_via": c["host"]}
            return {"ansible_connection": "setns", "mitogen_kind": "pid",
                    "ansible_host": str(c["pid"]), "mitogen_via": c["host"]}
        groups["containers"] = ({}, {name: reach(name, c) for name, c in containers.items()})
    write_yaml(RUN_DIR / "inventory.yml", groups, dict(base_vars, ansible_ssh_common_args=strict))

    # inventory-vanilla.yml: plain OpenSSH, ProxyJump through the chain.
    common = f"-F {cfg}"
    vgroups = {
        "bastions": ({}, {h.name: {"ansible_host": h.name} for h in group("bastion")}),
        "racks": ({}, {h.name: {"ansible_host": h.name,
                                "ansible_ssh_common_args": f"{common} -o ProxyJump={','.join(via_chain(by_name, h))}"}
                       for h in group("rack")}),
        "targets": ({}, {h.name: {"ansible_host": h.name,
                                  "ansible_ssh_common_args": f"{common} -o ProxyJump={','.join(via_chain(by_name, h))}"}
                         for h in group("target")}),
    }
    vcontainers = {name: {"ansible_connection": "community.docker.docker", "ansible_host": name,
                          "ansible_docker_extra_args": f"-H ssh://root@{c['host']}"}
                   for name, c in (containers or {}).items() if c["method"] == "docker"}
    shim_dir = RUN_DIR / "vanilla-bin"
    if vcontainers:
        # Vanilla reaches Docker containers with the docker CLI over ssh
        # (`docker -H ssh://`), which runs plain `ssh`: lab.json's
        # `vanilla_path` holds an `ssh` that adds this lab's config and the
        # jump through the container host's via chain; put it first on PATH.
        vgroups["containers"] = ({}, vcontainers)
        shim_dir.mkdir()
        jumps = {c["host"]: ",".join(via_chain(by_name, by_name[c["host"]])) for c in containers.values()}
        jump = next(iter(jumps.values()))
        (shim_dir / "ssh").write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {cfg} -o ProxyJump={jump} \"$@\"\n")
        (shim_dir / "ssh").chmod(0o755)
    if group("chost"):
        vgroups["chosts"] = ({}, {h.name: {"ansible_host": h.name,
                                           "ansible_ssh_common_args": f"{common} -o ProxyJump={','.join(via_chain(by_name, h))}"}
                                  for h in group("chost")})
    write_yaml(RUN_DIR / "inventory-vanilla.yml", vgroups,
               dict(base_vars, ansible_ssh_private_key_file=str(key), ansible_ssh_common_args=common))

    lab = {
        "run_dir": str(RUN_DIR),
        "settings": {
            "bastions": args.bastions, "targets_per_bastion": args.targets, "depth": args.depth,
            "racks_per_bastion": args.racks if args.depth == 2 else 0,
            "no_python_bastion": args.no_python_bastion,
            "aarch64_bastion": args.aarch64_bastion,
            "key_on_bastions": args.key_on_bastions,
            "wan": {"delay_ms": args.wan_delay_ms,
                    "delay_up_ms": args.wan_delay_up_ms if args.wan_delay_up_ms is not None else args.wan_delay_ms,
                    "delay_down_ms": args.wan_delay_down_ms if args.wan_delay_down_ms is not None else args.wan_delay_ms,
                    "rate_mbit": args.wan_rate_mbit, "loss_pct": args.wan_loss_pct},
        },
        "controller": {"address": CONTROLLER_ADDR, "interface": ROOT_IF},
        "wan": {"namespace": "arb-wan", "binary": str(wan_bin), "control_socket": str(wan_ctl),
                "stats_path": str(RUN_DIR / "wan-stats.json"), "log": str(RUN_DIR / "wan.log"),
                "cgroup": str(cg_root / "wan"),
                "directions": {"up": "controller to bastions", "down": "bastions to controller"}},
        "cgroups": {"kind": cg_kind, "root": str(cg_root)},
        "ssh_config": str(cfg), "known_hosts": str(known), "private_key": str(key),
        "inventory": str(RUN_DIR / "inventory.yml"),
        "inventory_vanilla": str(RUN_DIR / "inventory-vanilla.yml"),
        "agent_note": "hops behind the first authenticate with a forwarded agent: ssh-add " + str(key),
        "hosts": {h.name: {"role": h.role, "address": h.addr, "via": h.via,
                           "via_chain": via_chain(by_name, h), "netns": h.ns,
                           "python3": h.python3, "cgroup": str(h.cgroup),
                           "lan": f"{h.lan}.0/24" if h.lan else None,
                           "home": str(h.dir / "home")}
                  for h in hosts},
        # Containers on container hosts: how arbor enters each one.
        "containers": containers,
        "vanilla_path": str(shim_dir) if vcontainers else None,
    }
    (RUN_DIR / "lab.json").write_text(json.dumps(lab, indent=2) + "\n")


def up(args):
    check_args(args)
    down()
    check_ranges_free()
    t0 = time.monotonic()
    hosts = plan(args)
    try:
        cg_kind, cg_root = cgroup_base()
        cg_root.mkdir()
        make_keys_and_configs(hosts, args)
        make_network(hosts)
        # sshd's privilege separation directory; shared by every host.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        wan_bin, wan_ctl = start_wan(args, cg_root)
        for h in hosts:
            start_host(h, cg_kind, cg_root)
        wait_sshd(hosts)
        containers = {}
        for h in hosts:
            if h.role == "chost":
                for name, pid in start_namespace_containers(h, args.ns_containers).items():
                    containers[name] = {"method": "setns", "kind": "pid", "pid": pid, "host": h.name,
                                        "root": f"/tmp/arbor-ct/{name}"}
                if args.docker_containers:
                    containers.update(start_docker(h, args.docker_containers))
                    containers.update(start_kubectl_standin(h, 2))
                if args.podman_containers:
                    containers.update(start_podman(h, args.podman_containers, args.buildah_containers))
                if args.lxc_containers:
                    containers.update(start_lxc(h, args.lxc_containers))
                if args.lxd_containers:
                    containers.update(start_lxd(h, args.lxd_containers))
        write_files(hosts, args, cg_kind, cg_root, wan_bin, wan_ctl, containers)
    except BaseException:
        log("up failed; removing the partial lab")
        try:
            down()
        except LabError as e:
            log(str(e))
        raise
    log(f"up: {len(hosts)} hosts in {time.monotonic() - t0:.1f} s; "
        f"WAN {args.wan_delay_ms} ms one-way, "
        f"{args.wan_rate_mbit or 'unlimited'} Mbit/s, {args.wan_loss_pct}% loss")
    print(RUN_DIR)


# ---------------------------------------------------------------- wan, cpu


def load_lab():
    path = RUN_DIR / "lab.json"
    if not path.exists():
        raise LabError(f"no lab is up ({path} missing): run deploy/lab/up")
    return json.loads(path.read_text())


def wan(args):
    lab = load_lab()
    cmd = [lab["wan"]["binary"], "ctl", "--control", lab["wan"]["control_socket"], args.verb]
    if args.verb == "set":
        for flag in ("delay_ms", "delay_up_ms", "delay_down_ms", "rate_mbit", "loss_pct"):
            v = getattr(args, flag)
            if v is not None:
                cmd += ["--" + flag.replace("_", "-"), str(v)]
    res = sh(*cmd, check=False)
    if res.returncode != 0:
        raise LabError(res.stderr.strip())
    sys.stdout.write(res.stdout)
    if args.verb == "set":
        s = json.loads(res.stdout)["settings"]
        lab["settings"]["wan"].update(
            delay_ms=s["delay_up_ms"], delay_up_ms=s["delay_up_ms"],
            delay_down_ms=s["delay_down_ms"], rate_mbit=s["rate_bps"] / 1e6,
            loss_pct=s["loss_pct"])
        (RUN_DIR / "lab.json").write_text(json.dumps(lab, indent=2) + "\n")


def cpu(_args):
    """Prints CPU seconds per lab host (and the WAN emulator) as JSON."""
    lab = load_lab()
    out = {name: cgroup_cpu_seconds(h["cgroup"]) for name, h in lab["hosts"].items()}
    out["wan"] = cgroup_cpu_seconds(lab["wan"]["cgroup"])
    print(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(prog="deploy/lab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create the lab (removing any old one first)")
    u.add_argument("--bastions", type=int, default=int(os.environ.get("LAB_BASTIONS", 1)))
    u.add_argument("--targets", type=int, default=int(os.environ.get("LAB_TARGETS", 3)),
                   help="targets behind each bastion (spread over its racks at depth 2)")
    u.add_argument("--depth", type=int, default=int(os.environ.get("LAB_DEPTH", 1)),
                   help="1: bastion -> targets; 2: bastion -> rack -> targets")
    u.add_argument("--racks", type=int, default=int(os.environ.get("LAB_RACKS", 2)),
                   help="rack relay hosts behind each bastion at depth 2")
    u.add_argument("--wan-delay-ms", type=float, default=float(os.environ.get("LAB_WAN_DELAY_MS", 0)))
    u.add_argument("--wan-delay-up-ms", type=float, default=None, help="controller to bastions")
    u.add_argument("--wan-delay-down-ms", type=float, default=None, help="bastions to controller")
    u.add_argument("--wan-rate-mbit", type=float, default=float(os.environ.get("LAB_WAN_RATE_MBIT", 0)),
                   help="0 = unlimited")
    u.add_argument("--wan-loss-pct", type=float, default=float(os.environ.get("LAB_WAN_LOSS_PCT", 0)))
    u.add_argument("--key-on-bastions", action="store_true",
                   default=os.environ.get("LAB_KEY_ON_BASTIONS") == "1",
                   help="also install the lab's private key on bastions and racks, for peers "
                        "that reach targets with a key stored on the hop (Mitogen's fast setup)")
    u.add_argument("--container-host", action="store_true",
                   default=os.environ.get("LAB_CONTAINER_HOST") == "1",
                   help="add chost1 behind bastion1, a host running containers")
    u.add_argument("--ns-containers", type=int, default=2,
                   help="namespace containers on the container host")
    u.add_argument("--docker-containers", type=int, default=2,
                   help="Docker containers on the container host (0: no Docker engine)")
    u.add_argument("--podman-containers", type=int, default=2,
                   help="podman containers on the container host")
    u.add_argument("--lxc-containers", type=int, default=2,
                   help="LXC containers on the container host")
    u.add_argument("--buildah-containers", type=int, default=2,
                   help="buildah working containers (with podman's storage)")
    u.add_argument("--lxd-containers", type=int, default=2,
                   help="LXD containers on the container host")
    u.add_argument("--aarch64-bastion", action="store_true",
                   default=os.environ.get("LAB_AARCH64_BASTION") == "1",
                   help="every bastion an aarch64 host (its uname and its relay run under qemu-user)")
    u.add_argument("--no-python-bastion", action="store_true",
                   default=os.environ.get("LAB_NO_PYTHON_BASTION") == "1",
                   help="mask python3 on every bastion")
    sub.add_parser("down", help="remove the lab and everything it made")
    w = sub.add_parser("wan", help="read or change the WAN link")
    w.add_argument("verb", choices=["stats", "reset", "set"])
    for flag in ("--delay-ms", "--delay-up-ms", "--delay-down-ms", "--rate-mbit", "--loss-pct"):
        w.add_argument(flag, type=float)
    sub.add_parser("cpu", help="CPU seconds per host as JSON")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("lab: must run as root (namespaces, mounts, cgroups)", file=sys.stderr)
        return 1
    try:
        {"up": up, "down": down, "wan": wan, "cpu": cpu}[args.cmd](args)
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
