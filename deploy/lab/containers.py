"""The lab's container host: its namespace containers, and the Docker,
podman, buildah, LXC, LXD and kubectl (a stand-in) containers it runs, each
engine started inside the host's namespaces and cgroup."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from common import DOCKER_DIR, JOIN_CGROUP, LabError, sh

DOCKER_READY_TIMEOUT_S = 30.0

# A "container" of plain namespaces on a container host: its own root (a copy
# of this machine's Python, shell and a few tools, in the host's private
# /tmp), PID, mount, UTS and network namespaces; its first process reaps orphans (arbor-lab-init).
# Entered with `nsenter -t PID -a -r -w` (arbor's `setns` method, kind pid).
CONTAINER_ROOTFS = r"""
set -eu
R=${ROOT:-/tmp/arbor-ct/$CT}
mkdir -p "$R/tmp" "$R/proc" "$R/dev" "$R/root" "$R/etc" "$R/usr/lib"
chmod 1777 "$R/tmp"
copy() {
    for f in "$@"; do
        cp -L --parents "$f" "$R"
        ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r l; do cp -L --parents "$l" "$R"; done
    done
}
copy /usr/bin/python3.11 /bin/sh /usr/bin/sleep /usr/bin/mkdir /usr/bin/rm /usr/bin/cat /usr/bin/ls \
     /usr/bin/id /usr/bin/uname /usr/bin/env /usr/bin/chmod /usr/bin/mv /usr/bin/cp /usr/bin/echo \
     /usr/bin/true /usr/bin/su /usr/bin/dd /usr/bin/test /usr/bin/touch
ln -s python3.11 "$R/usr/bin/python3"
tar -C /usr/lib -c --exclude=test --exclude=idlelib --exclude=tkinter --exclude=ensurepip \
    --exclude=lib2to3 --exclude=turtledemo python3.11 | tar -C "$R/usr/lib" -x
copy /usr/lib/python3.11/lib-dynload/*.so
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
echo "$CT" > "$R/etc/hostname"
# The containers' first process: reaps orphans, as a real init (or tini) does.
cat > "$R/usr/bin/arbor-lab-init" <<'INIT'
#!/usr/bin/python3
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
INIT
chmod 755 "$R/usr/bin/arbor-lab-init"
"""
CONTAINER_INIT = r"""
set -eu
R=/tmp/arbor-ct/$CT
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
hostname "$CT"
exec chroot "$R" /usr/bin/arbor-lab-init
"""


def start_namespace_containers(h, count):
    """`count` namespace containers on host `h` (in its namespaces and its
    cgroup, so `down` ends them with it): {name: pid of its first process}."""
    enter = ["sh", "-c", JOIN_CGROUP, str(h.cgroup), "nsenter", "-t", str(h.proc.pid), "-m", "-n", "-u", "--"]
    found = {}
    for i in range(1, count + 1):
        name = f"{h.name}-ns{i}"
        sh(*enter, "sh", "-c", CONTAINER_ROOTFS, env=dict(os.environ, CT=name))
        p = subprocess.Popen([*enter, "unshare", "--fork", "--pid", "--mount", "--uts", "--net",
                              "--propagation", "private", "sh", "-c", CONTAINER_INIT],
                             env=dict(os.environ, CT=name), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=open(h.dir / f"{name}.log", "wb"),
                             start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children")
            pid = kids.read_text().split() if kids.exists() else []
            if pid and Path(f"/proc/{pid[0]}/exe").exists() and \
                    b"arbor-lab-init" in Path(f"/proc/{pid[0]}/cmdline").read_bytes():
                found[name] = int(pid[0])
                break
            time.sleep(0.02)
        else:
            raise LabError(f"container {name} did not start: {(h.dir / f'{name}.log').read_text()[-400:]}")
    return found


def docker_cli(h):
    return ["docker", "-H", f"unix://{DOCKER_DIR / h.name / 'docker.sock'}"]


def start_docker(h, count):
    """A Docker engine in host `h`'s network namespace and cgroup (its own
    data root and socket; no bridge, no iptables) and `count` containers of
    a local image (the same rootfs as the namespace containers), each with
    no network. Returns {name: how to reach it}."""
    d = DOCKER_DIR / h.name
    d.mkdir(parents=True)
    wrapper = d / "docker"
    wrapper.write_text(f"#!/bin/sh\nexec docker -H unix://{d / 'docker.sock'} \"$@\"\n")
    wrapper.chmod(0o755)
    subprocess.Popen(
        ["sh", "-c", JOIN_CGROUP, str(h.cgroup), "nsenter", f"--net=/run/netns/{h.ns}", "--",
         "dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false",
         "--data-root", str(d / "data"), "--exec-root", str(d / "exec"), "-H", f"unix://{d / 'docker.sock'}",
         "--pidfile", str(d / "docker.pid"), f"--cgroup-parent=/{h.cgroup.parent.name}/{h.name}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(d / "dockerd.log", "wb"),
        start_new_session=True)
    deadline = time.monotonic() + DOCKER_READY_TIMEOUT_S
    while sh(*docker_cli(h), "version", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise LabError(f"dockerd did not start on {h.name}: {(d / 'dockerd.log').read_text()[-400:]}")
        time.sleep(0.2)
    sh("sh", "-c", CONTAINER_ROOTFS, env=dict(os.environ, CT="image", ROOT=str(d / "rootfs")))
    tar = subprocess.Popen(["tar", "-C", str(d / "rootfs"), "-c", "."], stdout=subprocess.PIPE)
    res = subprocess.run([*docker_cli(h), "import", "-", "arbor-ct"], stdin=tar.stdout, capture_output=True)
    tar.wait()
    if res.returncode != 0:
        raise LabError(f"docker import on {h.name}: {res.stderr.decode()[-400:]}")
    shutil.rmtree(d / "rootfs")
    found = {}
    for i in range(1, count + 1):
        name = f"{h.name}-d{i}"
        sh(*docker_cli(h), "run", "-d", "--network", "none", "--hostname", name, "--name", name,
           "arbor-ct", "/usr/bin/arbor-lab-init")
        found[name] = {"method": "docker", "host": h.name, "docker": str(wrapper)}
    return found


PODMAN_CONF = """[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

LXC_CONF = """lxc.uts.name = {name}
lxc.rootfs.path = dir:{root}
lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
lxc.mount.auto = proc:mixed sys:ro
lxc.autodev = 1
lxc.init.cmd = /usr/bin/arbor-lab-init
lxc.cgroup.relative = 1
"""


def in_host(h, *cmd, mounts=False, **kw):
    """Runs `cmd` in host `h`'s network namespace and cgroup, and with
    `mounts` in its mount and UTS namespaces too (where what it mounts is
    seen by the host's own processes)."""
    ns = ["-t", str(h.proc.pid), "-m", "-n", "-u"] if mounts else [f"--net=/run/netns/{h.ns}"]
    return sh("sh", "-c", JOIN_CGROUP, str(h.cgroup), "nsenter", *ns, "--", *cmd, **kw)


def engine_image(h, d):
    """The containers' root: a copy of this machine's Python, shell and tools."""
    sh("sh", "-c", CONTAINER_ROOTFS, env=dict(os.environ, CT="image", ROOT=str(d)))


def mount_cgroups(h):
    """Mounts this machine's cgroup hierarchies in host `h`'s mount
    namespace (`ip netns exec` gave it a /sys without them), as container
    runtimes started there need them."""
    lines = [l.split() for l in Path("/proc/self/mountinfo").read_text().splitlines()]
    script = ["set -e", "mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup"]
    for f in lines:
        sep = f.index("-")
        fstype, opts, path = f[sep + 1], f[sep + 3], f[4]
        if not path.startswith("/sys/fs/cgroup/"):
            continue
        if fstype == "cgroup":
            subs = ",".join(o for o in opts.split(",") if o not in ("rw", "ro"))
            script.append(f"mkdir -p {path} && mount -t cgroup -o {subs} cgroup {path}")
        elif fstype == "cgroup2":
            script.append(f"mkdir -p {path} && mount -t cgroup2 cgroup2 {path}")
    in_host(h, "sh", "-c", "\n".join(script), mounts=True)


def start_podman(h, count, buildah=0):
    """Podman (runc, cgroupfs, its own storage) with `count` containers of
    the local image; entered through a wrapper that names that storage."""
    d = DOCKER_DIR / h.name / "podman"
    d.mkdir(parents=True)
    import resource
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    (d / "containers.conf").write_text(PODMAN_CONF.format(nofile=nofile))
    wrapper = d / "podman"
    wrapper.write_text(f"#!/bin/sh\nCONTAINERS_CONF={d / 'containers.conf'} exec podman "
                       f"--root {d / 'root'} --runroot {d / 'run'} --tmpdir {d / 'tmp'} \"$@\"\n")
    wrapper.chmod(0o755)
    engine_image(h, d / "rootfs")
    tarball = d / "rootfs.tar"
    sh("tar", "-C", d / "rootfs", "-cf", tarball, ".")
    # podman mounts each container's root itself: in the host's own mount
    # namespace, so that its `podman exec` finds them.
    mount_cgroups(h)
    in_host(h, wrapper, "import", tarball, "arbor-ct", mounts=True)
    tarball.unlink()
    shutil.rmtree(d / "rootfs")
    found = {}
    for i in range(1, count + 1):
        name = f"{h.name}-p{i}"
        in_host(h, wrapper, "run", "-d", "--network", "none", "--hostname", name, "--name", name,
                f"--cgroup-parent=/{h.cgroup.parent.name}/{h.name}", "arbor-ct", "/usr/bin/arbor-lab-init",
                mounts=True)
        found[name] = {"method": "podman", "host": h.name, "podman": str(wrapper)}
    # buildah's working containers, in the same storage: each `buildah run`
    # starts the command in a fresh runtime over the container's root.
    bwrapper = d / "buildah"
    bwrapper.write_text(f"#!/bin/sh\nCONTAINERS_CONF={d / 'containers.conf'} exec buildah "
                        f"--root {d / 'root'} --runroot {d / 'run'} \"$@\"\n")
    bwrapper.chmod(0o755)
    for i in range(1, buildah + 1):
        name = f"{h.name}-b{i}"
        in_host(h, bwrapper, "from", "--name", name, "arbor-ct", mounts=True)
        in_host(h, bwrapper, "config", "--hostname", name, name, mounts=True)
        found[name] = {"method": "buildah", "host": h.name, "buildah": str(bwrapper)}
    return found


def start_lxc(h, count):
    """LXC containers (lxc-start, a hand-written config, a local root, no
    network) under their own lxcpath; entered through an lxc-attach wrapper
    that names it."""
    d = DOCKER_DIR / h.name / "lxc"
    d.mkdir(parents=True)
    wrapper = d / "lxc-attach"
    wrapper.write_text(f"#!/bin/sh\nexec lxc-attach -P {d} \"$@\"\n")
    wrapper.chmod(0o755)
    found = {}
    for i in range(1, count + 1):
        name = f"{h.name}-l{i}"
        (d / name).mkdir()
        engine_image(h, d / name / "rootfs")
        (d / name / "rootfs" / "etc" / "hostname").write_text(name + "\n")
        (d / name / "config").write_text(LXC_CONF.format(name=name, root=d / name / "rootfs"))
        in_host(h, "lxc-start", "-P", d, "-n", name, "-d", "-l", "INFO", "-o", d / name / "lxc.log")
        found[name] = {"method": "lxc", "host": h.name, "lxc_attach": str(wrapper)}
    return found


KUBECTL_STANDIN = """#!/bin/sh
# A stand-in for kubectl (there is no Kubernetes here): `kubectl exec -i
# [-n NS] [-c CONTAINER] POD -- CMD...` runs CMD in the Docker container
# named POD, on this host's lab engine. Only what arbor's kubectl method uses.
[ "$1" = exec ] || {{ echo "kubectl stand-in: only exec" >&2; exit 2; }}
shift
while [ $# -gt 0 ]; do
    case "$1" in
        -i) shift ;;
        -n|-c|--namespace|--container) shift 2 ;;
        --) shift; break ;;
        *) pod=$1; shift ;;
    esac
done
exec {docker} exec -i "$pod" "$@"
"""


def start_kubectl_standin(h, count):
    """"Pods" for the kubectl method: Docker containers of their own on the
    host's engine, entered through the stand-in."""
    d = DOCKER_DIR / h.name
    standin = d / "kubectl"
    standin.write_text(KUBECTL_STANDIN.format(docker=d / "docker"))
    standin.chmod(0o755)
    found = {}
    for i in range(1, count + 1):
        name = f"{h.name}-k{i}"
        sh(*docker_cli(h), "run", "-d", "--network", "none", "--hostname", name, "--name", name,
           "arbor-ct", "/usr/bin/arbor-lab-init")
        found[name] = {"method": "kubectl", "host": h.name, "kubectl": str(standin), "pod": name,
                       "docker": str(d / "docker")}
    return found


LXD_PRESEED = """storage_pools:
- name: default
  driver: dir
  config:
    source: {pool}
profiles:
- name: default
  devices:
    root: {{path: /, pool: default, type: disk}}
"""


def start_lxd(h, count):
    """An LXD daemon (its own LXD_DIR, a dir storage pool, no network) in
    host `h`'s network namespace and cgroup, a local image of the same root,
    and `count` privileged containers whose first process reaps orphans; entered
    through an `lxc` wrapper that names that LXD_DIR."""
    d = DOCKER_DIR / h.name / "lxd"
    d.mkdir(parents=True)
    (DOCKER_DIR / h.name / "storage-for-lxd").mkdir()
    wrapper = DOCKER_DIR / h.name / "lxd-lxc"
    wrapper.write_text(f"#!/bin/sh\nLXD_DIR={d} exec lxc \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, LXD_DIR=str(d))
    subprocess.Popen(["sh", "-c", JOIN_CGROUP, str(h.cgroup), "nsenter", f"--net=/run/netns/{h.ns}", "--",
                      "lxd", "--group", "root", "--logfile", str(d / "lxd.log")],
                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=open(DOCKER_DIR / h.name / "lxd.err", "wb"), start_new_session=True)
    sh("lxd", "waitready", "--timeout", "30", env=env)
    sh("lxd", "init", "--preseed", input=LXD_PRESEED.format(pool=DOCKER_DIR / h.name / "storage-for-lxd"), env=env)
    img = DOCKER_DIR / h.name / "lxd-image"
    engine_image(h, img / "rootfs")
    (img / "metadata.yaml").write_text(f"architecture: x86_64\ncreation_date: {int(time.time())}\n"
                                       "properties: {description: arbor lab, os: debian}\n")
    sh("tar", "-C", img, "-czf", img / "meta.tar.gz", "metadata.yaml")
    sh("tar", "-C", img / "rootfs", "-czf", img / "rootfs.tar.gz", ".")
    sh(wrapper, "image", "import", img / "meta.tar.gz", img / "rootfs.tar.gz", "--alias", "arbor-ct")
    shutil.rmtree(img)
    found = {}
    for i in range(1, count + 1):
        name = f"{h.name}-x{i}"
        sh(wrapper, "launch", "arbor-ct", name, "-c", "security.privileged=true",
           "-c", "raw.lxc=lxc.init.cmd = /usr/bin/arbor-lab-init")
        sh(wrapper, "exec", name, "--", "/bin/sh", "-c", f"echo {name} > /etc/hostname")
        found[name] = {"method": "lxd", "host": h.name, "lxc": str(wrapper)}
    return found


def stop_docker():
    """Removes the container hosts' containers and engines, their mounts and
    their files."""
    if not DOCKER_DIR.exists():
        return
    # podman's containers and mounts live in their host's mount namespace:
    # they end with the host's processes.
    for wrapper in DOCKER_DIR.glob("*/lxd-lxc"):
        if wrapper.is_file():
            names = sh(wrapper, "list", "-c", "n", "--format", "csv", capture=True, check=False).split()
            if names:
                sh(wrapper, "delete", "-f", *names, check=False)
            sh("lxd", "shutdown", env=dict(os.environ, LXD_DIR=str(wrapper.parent / "lxd")), check=False)
    for cfg in DOCKER_DIR.glob("*/lxc/*/config"):
        sh("lxc-stop", "-P", cfg.parent.parent, "-n", cfg.parent.name, "-k", check=False)
    for sock in DOCKER_DIR.glob("*/docker.sock"):
        cli = ["docker", "-H", f"unix://{sock}"]
        ids = sh(*cli, "ps", "-aq", capture=True, check=False).split()
        if ids:
            sh(*cli, "rm", "-f", *ids, check=False)
        pidfile = sock.parent / "docker.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            except (ValueError, ProcessLookupError):
                pass
    mounts = [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()
              if l.split()[4].startswith(str(DOCKER_DIR))]
    for m in sorted(mounts, key=len, reverse=True):
        sh("umount", "-l", m, check=False)
    shutil.rmtree(DOCKER_DIR, ignore_errors=True)
