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
import subprocess
import sys
import time
from pathlib import Path

from common import (BASTION_LAN, BASTIONS_MAX, CONTROLLER_ADDR, HOSTS_PER_LAN_MAX, JOIN_CGROUP, LAB_UNREACHABLE,
                    NS_PREFIX, RACK_LAN, RACKS_MAX, REPO, ROOT_IF, RUN_DIR, WAN_NET, WAN_READY_TIMEOUT_S, LabError,
                    log, ns_exec, sh)
from containers import (start_docker, start_kubectl_standin, start_lxc, start_lxd, start_namespace_containers,
                        start_podman)
from hostinit import AARCH64_UNAME, QEMU_AARCH64, make_keys_and_configs, start_host, wait_sshd
from inventory import write_files
from teardown import cgroup_base, cgroup_cpu_seconds, check_ranges_free, down


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
