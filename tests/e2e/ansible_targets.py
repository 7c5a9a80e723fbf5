"""ansible-core's own integration targets (from the sdist of the installed
ansible-core, `test/integration/targets`), run against a lab target behind
the bastion as `ansible-test integration --target ssh:...` runs them, with
vanilla Ansible (ProxyJump) or through arbor.

What ansible-test does, and this does too: the integration dir is copied to
a work dir; `test/integration/inventory` names one host, `testhost` (ssh,
pipelining on, its interpreter); a role target runs as a generated playbook
`{hosts: testhost, gather_facts, vars: {output_dir}, roles: [target]}` with
ANSIBLE_ROLES_PATH at the targets; a script target runs `./runme.sh` in its
own dir with INVENTORY_PATH and OUTPUT_DIR; the `setup/always/` and
`setup/once/` targets its aliases name run before it; Ansible's environment
is ansible-test's (an empty config, no default inventory, host key checking
off, the interpreter required from the inventory).

arbor's inventory also holds the bastion (as `arbor_vias`), which
`mitogen_via` names: the targets address `testhost` only.

    python tests/e2e/ansible_targets.py --mode arbor|vanilla TARGET...
    python tests/e2e/ansible_targets.py --fetch    # the sdist only (deploy/setup)
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GLUE = REPO / "ansible-glue" / "plugins" / "connection"
ARBOR = REPO / "target" / "release" / "arbor"
VENV = Path(os.environ.get("ARBOR_TEST_VENV") or REPO / ".venv" / "bin")
TARGET_TIMEOUT_S = 900
# The accounts the targets run here make for their tests.
TARGET_USERS = ("tmptest", "fetcher", "ansibletest0", "ansibletest1")


def shlex_split(s):
    return shlex.split(s)


def ansible_version():
    out = subprocess.run([str(VENV / "python"), "-c", "import ansible.release as r; print(r.__version__)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def sdist_targets(cache=None):
    """The integration targets of the installed ansible-core's sdist
    (downloaded once, from PyPI, into the cache)."""
    version = ansible_version()
    cache = Path(cache or REPO / ".venv" / "ansible-core-sdist")
    root = cache / f"ansible_core-{version}"
    targets = root / "test" / "integration" / "targets"
    if targets.is_dir():
        return targets
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(VENV / "pip"), "download", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-binary", ":all:", f"ansible-core=={version}", "-d", str(cache)], check=True)
    tarball = next(cache.glob(f"ansible_core-{version}.tar.gz"))
    subprocess.run(["tar", "-C", str(cache), "-xzf", str(tarball)], check=True)
    return targets


def aliases(targets, name):
    p = targets / name / "aliases"
    if not p.exists():
        return []
    return [line.split("#")[0].strip() for line in p.read_text().splitlines() if line.split("#")[0].strip()]


def inventory(lab, mode):
    """ansible-test's one host, `testhost`: the lab's target1 behind bastion1."""
    t = lab["hosts"]["target1"]
    b = lab["hosts"]["bastion1"]
    key = lab["private_key"]
    known = f"-o UserKnownHostsFile={lab['known_hosts']} -o GlobalKnownHostsFile=/dev/null"
    host = {"ansible_connection": "ssh", "ansible_pipelining": "yes",
            "ansible_python_interpreter": "/usr/bin/python3", "ansible_user": "root",
            "ansible_ssh_private_key_file": key}
    lines = ["[testgroup]"]
    if mode == "arbor":
        host.update(ansible_host=t["address"], ansible_ssh_extra_args=known, mitogen_via="bastion1")
        vias = ["[arbor_vias]", "bastion1 " + " ".join(f"{k}={json.dumps(v)}" for k, v in {
            "ansible_host": b["address"], "ansible_user": "root", "ansible_ssh_private_key_file": key,
            "ansible_ssh_extra_args": known + " -o IdentitiesOnly=yes"}.items())]
    else:
        # ProxyJump's hop through a ProxyCommand: the target's own ssh
        # arguments (a test's -F, say) still apply to the target.
        jump = f"ssh -F {lab['ssh_config']} -W %h:%p bastion1"
        host.update(ansible_host=t["address"], ansible_ssh_extra_args=f"{known} -o ProxyCommand='{jump}'")
        vias = []
    lines.append("testhost " + " ".join(f"{k}={json.dumps(v)}" for k, v in host.items()))
    return "\n".join(lines + [""] + vias) + "\n"


def own_inventory(text, lab, mode):
    """A target's own inventory, whose hosts ansible-test reaches over ssh
    at `localhost` (the test host of its ssh tests): here, the same lab
    target as testhost, through the bastion."""
    host = inventory(lab, mode).split("\n")[1].split(" ", 1)[1]
    out = []
    for line in text.splitlines():
        if line.strip() in ("ansible_host=localhost",):
            out += [f"{k}={json.dumps(v)}" for k, v in (kv.split("=", 1) for kv in shlex_split(host))
                    if k not in ("ansible_connection", "ansible_pipelining")]
            continue
        if line.startswith("ansible_python_interpreter="):
            continue
        out.append(line)
    text = "\n".join(out) + "\n"
    if mode == "arbor":
        text += "\n" + "\n".join(inventory(lab, mode).split("\n")[3:])
    return text


def environment(work, mode, output_dir):
    """Ansible's environment as ansible-test sets it (ansible_environment,
    integration_environment), plus arbor's one line in arbor mode."""
    integration = work / "test" / "integration"
    env = {
        "PATH": f"{VENV}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "ANSIBLE_FORCE_COLOR": "false",
        "ANSIBLE_FORCE_HANDLERS": "true",
        "ANSIBLE_HOST_PATTERN_MISMATCH": "error",
        "ANSIBLE_INVENTORY": "/dev/null",
        "ANSIBLE_DEPRECATION_WARNINGS": "false",
        "ANSIBLE_HOST_KEY_CHECKING": "false",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_CONFIG": str(integration / "integration.cfg"),
        "ANSIBLE_LIBRARY": "/dev/null",
        "ANSIBLE_DEVEL_WARNING": "false",
        "ANSIBLE_PYTHON_INTERPRETER": "/set/ansible_python_interpreter/in/inventory",
        "ANSIBLE_WORKER_SHUTDOWN_POLL_COUNT": "100",
        "ANSIBLE_WORKER_SHUTDOWN_POLL_DELAY": "0.1",
        "PAGER": "/bin/cat",
        "ANSIBLE_TEST_CI": "",
        "ANSIBLE_TEST_COVERAGE": "",
        "ANSIBLE_TEST_ANSIBLE_VERSION": ansible_version(),
        "OUTPUT_DIR": str(output_dir),
        "INVENTORY_PATH": str(integration / "inventory"),
    }
    if mode == "arbor":
        env.update(ANSIBLE_CONNECTION_PLUGINS=str(GLUE), ARBOR_BIN=str(ARBOR))
    return env


def run_role(work, name, env, gather_facts, log):
    integration = work / "test" / "integration"
    play = [{"hosts": "testhost", "gather_facts": gather_facts, "vars_files": [],
             "vars": {"output_dir": env["OUTPUT_DIR"]}, "roles": [name]}]
    book = integration / f"{name}-play.yml"
    book.write_text(json.dumps(play, indent=4))
    e = dict(env, ANSIBLE_ROLES_PATH=str(integration / "targets"), ANSIBLE_PLAYBOOK_DIR=str(integration))
    return run_logged(["ansible-playbook", book.name, "-i", "inventory"], integration, e, log)


def run_script(work, name, env, log):
    cwd = work / "test" / "integration" / "targets" / name
    return run_logged(["./runme.sh"], cwd, dict(env, ANSIBLE_PLAYBOOK_DIR=str(cwd)), log)


def run_logged(cmd, cwd, env, log):
    """Runs `cmd` as ansible-test's controller would, with a ~/.ssh of its
    own (the controller's authorized_keys holds the test key, which some
    targets copy to the users they make): a private mount over ~/.ssh."""
    ssh_dir = Path(env["OUTPUT_DIR"]).parent / "ssh"
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$HOME/.ssh" && exec "$@"', str(ssh_dir)]
    with open(log, "ab") as f:
        f.write(f"\n$ (cd {cwd} && {' '.join(cmd)})\n".encode())
        f.flush()
        try:
            return subprocess.run(wrap + cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=TARGET_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n(timed out after {TARGET_TIMEOUT_S} s)\n".encode())
            return 124


def clean(lab, output_dir):
    """A fresh test host, as ansible-test's would be: nothing left in the
    target's home, /tmp and /var/tmp by an earlier run, nor in the
    controller's /tmp by the targets that write there; the output dir on
    both (role targets write to it on the test host)."""
    subprocess.run(["ssh", "-F", lab["ssh_config"], "-J", "bastion1", "target1",
                    "find /root -mindepth 1 -maxdepth 1 ! -name '.*' -exec rm -rf {} +; rm -rf /root/.ansible "
                    f"/tmp/* /tmp/.[!.]* /var/tmp/*; mkdir -p {shlex.quote(str(output_dir))}"],
                   capture_output=True, timeout=60)
    # Users the targets make (the lab's hosts share /etc and /home with the
    # controller): a home left by an earlier run would be reused as is.
    for user in TARGET_USERS:
        subprocess.run(["userdel", "--remove", user], capture_output=True)
        shutil.rmtree(Path("/home") / user, ignore_errors=True)
    for p in Path("/tmp").glob("ansible-test-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def run_target(lab, targets, name, mode, out_dir):
    """Runs one target (and the setup targets it needs) in a fresh copy of
    the integration dir; returns (passed, seconds, log path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{name}.{mode}.log"
    log.write_text("")
    work = Path(tempfile.mkdtemp(prefix=f"arbor-it-{name}-"))
    t0 = time.monotonic()
    try:
        integration = work / "test" / "integration"
        shutil.copytree(targets, integration / "targets", symlinks=True)
        (integration / "integration.cfg").write_text("[defaults]\n")
        (integration / "inventory").write_text(inventory(lab, mode))
        output_dir = work / "output"
        output_dir.mkdir()
        ssh_dir = work / "ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(Path(lab["private_key"] + ".pub").read_text())
        (ssh_dir / "known_hosts").write_text(Path(lab["known_hosts"]).read_text())
        (Path.home() / ".ssh").mkdir(mode=0o700, exist_ok=True)
        clean(lab, output_dir)
        env = environment(work, mode, output_dir)
        al = aliases(targets, name)
        for setup in [a.split("/", 2)[2] for a in al if a.startswith(("setup/always/", "setup/once/"))]:
            if (targets / setup / "runme.sh").exists():
                rc = run_script(work, setup, env, log)
            else:
                rc = run_role(work, setup, env, True, log)
            if rc != 0:
                return False, time.monotonic() - t0, log
        for inv in (integration / "targets" / name).glob("*.inventory"):
            inv.write_text(own_inventory(inv.read_text(), lab, mode))
        if (targets / name / "runme.sh").exists():
            rc = run_script(work, name, env, log)
        else:
            gather = "gather_facts/no" not in al
            rc = run_role(work, name, env, gather, log)
        return rc == 0, time.monotonic() - t0, log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["arbor", "vanilla"], default="arbor")
    p.add_argument("--out", default="/tmp/arbor-ansible-targets")
    p.add_argument("--fetch", action="store_true", help="only fetch the installed ansible-core's sdist")
    p.add_argument("targets", nargs="*")
    args = p.parse_args(argv)
    if args.fetch:
        print(sdist_targets())
        return 0
    lab = json.loads((Path(os.environ.get("ARBOR_LAB_DIR", "/run/arbor-lab")) / "lab.json").read_text())
    targets = sdist_targets()
    failed = 0
    for name in args.targets:
        ok, took, log = run_target(lab, targets, name, args.mode, args.out)
        failed += not ok
        print(f"{name}: {'pass' if ok else 'FAIL'} ({took:.0f} s, {args.mode}) {log}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
