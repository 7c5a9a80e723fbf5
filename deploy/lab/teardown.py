"""Taking the lab down: its cgroups, its processes (whatever namespace or
session they moved to), its routes; and what a run left behind."""

import os
import shutil
import signal
import time
from pathlib import Path

from common import CGROUP_NAME, DOCKER_DIR, KILL_GRACE_S, LAB_RANGES, NS_PREFIX, ROOT_IF, RUN_DIR, LabError, log, sh
from containers import stop_docker


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
