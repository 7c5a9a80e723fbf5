"""A lab host's own files and its start: host keys and sshd config, the
controller's key in authorized_keys, Debian's dot files, a lab reboot's
`shutdown`, then sshd in the host's namespaces."""

import os
import shutil
import subprocess
import time
from pathlib import Path

from common import DOCKER_DIR, JOIN_CGROUP, RUN_DIR, SSHD_READY_TIMEOUT_S, LabError, sh

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
