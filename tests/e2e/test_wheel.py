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

from test_arbor import LAB, REPO, recap, run, ssh

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
def wheel():
    shutil.rmtree(REPO / "target" / "wheels", ignore_errors=True)
    subprocess.run([str(REPO / "deploy" / "wheel" / "build")], check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)
    wheels = list((REPO / "target" / "wheels").glob("arbor_ansible-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


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


def test_a_playbook_runs_on_what_the_wheel_installed(lab, wheel, tmp_path):
    # A portable Linux wheel: glibc (manylinux) and musl (musllinux) tags on
    # one static binary.
    tags = wheel.name.split("-")[-1]
    assert "manylinux2014_x86_64" in tags and "musllinux_1_2_x86_64" in tags, wheel.name

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                          f"ansible-core=={ansible_core_version()}", str(wheel)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr
    arbor = venv / "bin" / "arbor"
    ldd = subprocess.run(["ldd", str(arbor)], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr or "statically linked" in ldd.stdout, ldd
    version = subprocess.run([str(arbor), "version"], capture_output=True, text=True, check=True).stdout
    assert "x86_64: " in version and "aarch64: " in version and "not built" not in version, version
    plugins = subprocess.run([str(arbor), "plugin-path"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert plugins == str(venv / "share" / "arbor" / "ansible-glue" / "plugins" / "connection")

    work = tmp_path / "work"
    work.mkdir()
    (work / "play.yml").write_text(PLAY)
    # Nothing of the repository: no PYTHONPATH, no ARBOR_BIN, a PATH of
    # the system's, the venv's tools by their own paths, run from elsewhere.
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "ANSIBLE_CONNECTION_PLUGINS": plugins, "ANSIBLE_NOCOLOR": "1"}
    seen = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.extend(daemons())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        res = subprocess.run([str(venv / "bin" / "ansible-playbook"), "-i", lab["inventory"], "play.yml",
                              "-vvv"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        sampler.join()
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert recap(out) == {"target1": (3, 2, 0, 0), "target2": (3, 2, 0, 0)}, out[-2000:]
    assert "ARBOR HOP bastion1 (relay, from the controller)" in out
    assert str(REPO) not in out, "the run named the repository"
    assert seen and set(seen) == {str(arbor)}, seen
    for t in ("target1", "target2"):
        assert ssh(lab, t, "cat /tmp/arbor-wheel-test.txt").stdout == f"from the wheel {t}\n"
