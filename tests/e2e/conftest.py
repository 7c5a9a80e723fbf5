"""The end-to-end tests' fixtures: the lab, and the become test's accounts.
Helpers are in labkit.py."""

import json
import os
import secrets
import time
from pathlib import Path

import pytest

from labkit import LAB, LOGIN, OTHER, run


@pytest.fixture(scope="module")
def lab():
    """The lab with three targets behind a python-less bastion, for one
    test module."""
    out = run(LAB / "up", "--targets", "3", "--no-python-bastion").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


@pytest.fixture(scope="module")
def users(lab):
    """Two accounts on the lab's machine (its hosts share /etc and /home):
    arbu logs in with the lab's key and may sudo and doas with its password;
    arbv is reached with su and its own password. Removed afterwards."""
    for tool in ("sudo", "doas"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in ("/usr/bin", "/usr/sbin")):
            pytest.fail(f"{tool} is not installed (deploy/setup installs it)")
    passwords = {LOGIN: secrets.token_urlsafe(12), OTHER: secrets.token_urlsafe(12)}
    for user, pw in passwords.items():
        run("useradd", "--create-home", "--shell", "/bin/bash", user)
        run("chpasswd", input=f"{user}:{pw}\n")
    home = Path("/home") / LOGIN
    (home / ".ssh").mkdir(mode=0o700)
    pub = run("ssh-keygen", "-y", "-f", lab["private_key"]).stdout
    (home / ".ssh" / "authorized_keys").write_text(pub)
    run("chown", "-R", f"{LOGIN}:{LOGIN}", home / ".ssh")
    sudoers = Path("/etc/sudoers.d/arbor-lab")
    sudoers.write_text(f"{LOGIN} ALL=(ALL:ALL) ALL\n")
    sudoers.chmod(0o440)
    doas = Path("/etc/doas.conf")
    old_doas = doas.read_bytes() if doas.exists() else None
    doas.write_text(f"permit {LOGIN} as root\n")
    doas.chmod(0o600)
    extra = Path(lab["run_dir"]) / "become-inventory.yml"
    extra.write_text(json.dumps({"targets": {"vars": {
        "ansible_user": LOGIN, "arbu_password": passwords[LOGIN],
        "arbv_password": passwords[OTHER]}}}))
    yield {"passwords": passwords, "inventory": str(extra)}
    sudoers.unlink()
    if old_doas is None:
        doas.unlink()
    else:
        doas.write_bytes(old_doas)
    for user in passwords:
        run("pkill", "-KILL", "-u", user, check=False)
        time.sleep(0.2)
        run("userdel", "--remove", user, check=False)
