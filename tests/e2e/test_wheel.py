"""`pip install` of arbor's wheel: built by deploy/wheel/build, installed
into a fresh venv with ansible-core, and used with nothing from this
repository on any path: a playbook through the lab's bastion runs on the
wheel's `arbor` and glue alone."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from labkit import LAB, REPO, recap, run, ssh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

PLAY = """
- hosts: targets
  gather_facts: false
  tasks:
    - copy:
        content: "from the wheel {{ inventory_hostname }}\\n"
        dest: /tmp/arbor-wheel-test.txt
    - command: cat /tmp/arbor-wheel-test.txt
      register: c
    - assert:
        that: c.stdout == "from the wheel " ~ inventory_hostname
"""


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--targets", "2").stdout
    yield json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    run(LAB / "down")


@pytest.fixture(scope="module")
def wheels():
    """The wheels deploy/wheel/build makes: x86_64 and aarch64 controllers."""
    shutil.rmtree(REPO / "target" / "wheels", ignore_errors=True)
    built = {}
    for arch in ("x86_64", "aarch64"):
        subprocess.run([str(REPO / "deploy" / "wheel" / "build"), "--target", f"{arch}-unknown-linux-musl"],
                       check=True, timeout=1800, stdout=subprocess.DEVNULL)
        found = list((REPO / "target" / "wheels").glob(f"arbor_ansible-*_{arch}.whl"))
        assert len(found) == 1, found
        built[arch] = found[0]
    return built


@pytest.fixture(scope="module")
def wheel(wheels):
    return wheels["x86_64"]


def ansible_core_version():
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                          "import ansible.release; print(ansible.release.__version__)"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def daemons():
    """The exe of every running `arbor daemon`."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if (d / "cmdline").read_bytes().split(b"\0")[1:2] == [b"daemon"]:
                found.append(os.readlink(d / "exe"))
        except (OSError, IndexError):
            pass
    return found


def fresh_venv(path):
    """A venv with the ansible-core of the repository's .venv, nothing else."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = subprocess.run([str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          f"ansible-core=={ansible_core_version()}"], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr
    return path


def run_play(lab, venv, plugins, work, match):
    """PLAY through the lab's bastion with `venv`'s ansible-playbook and the
    glue at `plugins`, nothing of the repository on any path: the output,
    and the daemons seen (the cmdlines `match` picks out)."""
    work.mkdir()
    (work / "play.yml").write_text(PLAY)
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "ANSIBLE_CONNECTION_PLUGINS": plugins, "ANSIBLE_NOCOLOR": "1"}
    seen = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.extend(match())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        res = subprocess.run([str(venv / "bin" / "ansible-playbook"), "-i", lab["inventory"], "play.yml",
                              "-vvv"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop.set()
        sampler.join()
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert recap(out) == {"target1": (3, 2, 0, 0), "target2": (3, 2, 0, 0)}, out[-2000:]
    assert "ARBOR HOP bastion1 (relay, from the controller)" in out
    assert str(REPO) not in out, "the run named the repository"
    for t in ("target1", "target2"):
        assert ssh(lab, t, "cat /tmp/arbor-wheel-test.txt").stdout == f"from the wheel {t}\n"
        ssh(lab, t, "rm -f /tmp/arbor-wheel-test.txt")
    return out, seen


def test_a_playbook_runs_on_what_the_wheel_installed(lab, wheel, tmp_path):
    # A portable Linux wheel: glibc (manylinux) and musl (musllinux) tags on
    # one static binary.
    tags = wheel.name.split("-")[-1]
    assert "manylinux2014_x86_64" in tags and "musllinux_1_2_x86_64" in tags, wheel.name

    venv = fresh_venv(tmp_path / "venv")
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr
    arbor = venv / "bin" / "arbor"
    ldd = subprocess.run(["ldd", str(arbor)], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr or "statically linked" in ldd.stdout, ldd
    version = subprocess.run([str(arbor), "version"], capture_output=True, text=True, check=True).stdout
    assert "x86_64: " in version and "aarch64: " in version, version
    # Every relay is built, with QUIC too (ring's C for aarch64 from the
    # cross compiler deploy/setup installs).
    relays = version.split("(relays: ", 1)[1].split("; ")
    assert not [r for r in relays if "not built" in r], version
    for m in ("x86_64", "aarch64"):
        assert any(r.startswith(f"{m} with QUIC: ") and "bytes" in r for r in relays), version
    plugins = subprocess.run([str(arbor), "plugin-path"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert plugins == str(venv / "share" / "arbor" / "ansible-glue" / "plugins" / "connection")
    _, seen = run_play(lab, venv, plugins, tmp_path / "work", daemons)
    assert seen and set(seen) == {str(arbor)}, seen
    # `arbor ssh` from the install alone: the venv's Python beside it runs
    # the glue beside it (no ARBOR_*, no ansible.cfg, the venv not on PATH).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBOR_", "ANSIBLE_"))}
    env.update(PATH="/usr/bin:/bin", HOME=str(tmp_path))
    res = subprocess.run([str(arbor), "ssh", "-i", lab["inventory"], "target1", "echo wheel-$((6*7))"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout == "wheel-42\n", res.stdout + res.stderr

def pip_for_platform(wheel, platform, target):
    """pip installing `wheel` as it would for `platform` (Python 3.12)."""
    return subprocess.run([str(REPO / ".venv" / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                           "--no-deps", "--only-binary=:all:", "--platform", platform, "--python-version", "3.12",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)


def test_pip_takes_each_wheel_for_its_machine_on_musl_too(wheels, tmp_path):
    """No Alpine here: pip is asked to choose for Alpine's platform
    (musllinux_1_2: musl 1.2, Alpine 3.13 and later) and installs the
    wheel of the machine's architecture; the binary is static, so the
    x86_64 one runs here as it would on musl. Each wheel is refused for the
    other machine."""
    for arch, other in (("x86_64", "aarch64"), ("aarch64", "x86_64")):
        res = pip_for_platform(wheels[arch], f"musllinux_1_2_{arch}", tmp_path / arch)
        assert res.returncode == 0, res.stderr
        assert (tmp_path / arch / "share" / "arbor" / "ansible-glue" / "plugins" / "connection" / "ssh.py").is_file()
        res = pip_for_platform(wheels[arch], f"musllinux_1_2_{other}", tmp_path / f"{arch}-on-{other}")
        assert res.returncode != 0 and "is not a supported wheel on this platform" in res.stderr, res.stderr
    version = subprocess.run([str(tmp_path / "x86_64" / "bin" / "arbor"), "version"], capture_output=True,
                             text=True, check=True).stdout
    assert "x86_64: " in version and "aarch64: " in version, version

def emulated_daemons(arbor):
    """`arbor daemon` processes of the aarch64 binary `arbor`, run by
    qemu-user through binfmt_misc: (exe, cmdline)."""
    def match():
        found = []
        for d in Path("/proc").glob("[0-9]*"):
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if str(arbor).encode() in cmd and b"daemon" in cmd:
                    found.append(os.readlink(d / "exe"))
            except OSError:
                pass
        return found
    return match


def test_an_aarch64_controller_runs_a_playbook_from_its_wheel(lab, wheels, tmp_path):
    """The aarch64 wheel, installed as pip would for an aarch64 (musl or
    glibc) controller, runs the daemon for a playbook: here under qemu-user
    through binfmt_misc, beside this machine's ansible-core and ssh."""
    target = tmp_path / "arm"
    res = pip_for_platform(wheels["aarch64"], "manylinux2014_aarch64", target)
    assert res.returncode == 0, res.stderr
    arbor = target / "bin" / "arbor"
    assert subprocess.run(["file", "-b", str(arbor)], capture_output=True, text=True).stdout.startswith(
        "ELF 64-bit LSB executable, ARM aarch64")
    version = subprocess.run([str(arbor), "version"], capture_output=True, text=True, check=True).stdout
    assert "x86_64: " in version and "aarch64: " in version, version
    venv = fresh_venv(tmp_path / "venv")
    plugins = str(target / "share" / "arbor" / "ansible-glue" / "plugins" / "connection")
    _, seen = run_play(lab, venv, plugins, tmp_path / "work", emulated_daemons(arbor))
    assert seen and all("qemu-aarch64" in exe for exe in seen), seen
