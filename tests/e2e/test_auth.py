"""Authentication as OpenSSH does it, on every hop (issue 15). Each test
gives the controller's user a ~/.ssh of its own (a private mount over
/root/.ssh, for the run only), as a new user's would be, with one way of
logging in, and runs the same playbook through vanilla Ansible (ProxyJump
through the bastion, from the same ~/.ssh) and through arbor, which must
reach the same hosts with the same results.

The lab's hosts share /etc and /home with the controller: `arbctl` logs
into the bastion with its own key, while the targets' root accepts only
the lab's key."""

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from labkit import ARBOR, GLUE, VENV, recap, run, run_in_pty

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

USER = "arbctl"  # a login on the bastion (the hosts share /home)
PWUSER = "arbpw"  # deploy/lab: password logins only, on every host
HOME = Path("/home") / USER
BOOK = """
- name: auth
  hosts: targets
  gather_facts: false
  tasks:
    - name: who
      ansible.builtin.command: whoami
"""


WORK = Path("/run/arbor-auth-test")  # the controller user's files in these tests
SSH_DIR = WORK / "ssh"  # mounted over ~/.ssh for each run


def as_user(args, env=None, timeout=300, input=None):
    """Runs `args` as the controller's user with SSH_DIR as its ~/.ssh
    (and vanilla's ControlPersist masters of its own)."""
    Path("/root/.ssh").mkdir(mode=0o700, exist_ok=True)
    base = {"HOME": "/root", "PATH": f"{VENV}:/usr/bin:/bin:/usr/sbin:/sbin", "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "False", "ANSIBLE_PIPELINING": "True", "LANG": "C.UTF-8",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(SSH_DIR / "cp")}
    base.update(env or {})
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /root/.ssh && exec "$@"', str(SSH_DIR)]
    return subprocess.run(wrap + [str(a) for a in args], env=base, cwd=WORK, capture_output=True, text=True,
                          timeout=timeout, input=input)


def write(path, text, mode=0o600, owner=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    if owner:
        shutil.chown(path, owner, owner)


def keygen(path, passphrase=""):
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", path)


@pytest.fixture(scope="module")
def ctl(lab):
    """The keys: `lab` (the lab's own, root's on every host) and `jump`
    (arbctl's on the bastion)."""
    run("useradd", "--create-home", "--shell", "/bin/bash", USER, check=False)
    # Not locked (sshd refuses locked accounts), but no password known.
    run("chpasswd", input=f"{USER}:{secrets.token_urlsafe(16)}\n")
    WORK.mkdir(mode=0o700, exist_ok=True)
    keys = WORK / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    lab_key = keys / "lab"
    shutil.copy(lab["private_key"], lab_key)
    shutil.copy(lab["private_key"] + ".pub", f"{lab_key}.pub")
    lab_key.chmod(0o600)
    jump_key = keys / "jump"
    if not jump_key.exists():
        keygen(jump_key)
    # The bastion accepts arbctl with its jump key (its home is shared).
    (HOME / ".ssh").mkdir(mode=0o700, exist_ok=True)
    shutil.chown(HOME / ".ssh", USER, USER)
    write(HOME / ".ssh" / "authorized_keys", Path(f"{jump_key}.pub").read_text(), owner=USER)
    yield {"lab_key": lab_key, "jump_key": jump_key, "lab": lab}
    run("pkill", "-KILL", "-u", USER, check=False)
    time.sleep(0.3)
    run("userdel", "--remove", USER, check=False)
    shutil.rmtree(WORK, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_ssh_dir(ctl):
    """Each test starts with a ~/.ssh holding only known_hosts."""
    shutil.rmtree(SSH_DIR, ignore_errors=True)
    SSH_DIR.mkdir(mode=0o700)
    write(SSH_DIR / "known_hosts", Path(ctl["lab"]["known_hosts"]).read_text())
    yield
    run("pkill", "-KILL", "-f", f"ssh-agent -a {WORK}", check=False)
    # vanilla's ControlPersist masters: each test logs in afresh.
    run("pkill", "-KILL", "-f", f"ControlPath={SSH_DIR}", check=False)


def inventories(ctl, tmp, target_vars="", bastion_vars="", all_vars="", jump=None):
    """(arbor's inventory, vanilla's) for the lab's targets behind bastion1,
    with the given extra variables (YAML flow mappings' inner text). Vanilla
    reaches the targets with `jump`: ProxyJump to root@bastion1 unless
    given (another ProxyJump or a ProxyCommand)."""
    hosts = {n: h for n, h in ctl["lab"]["hosts"].items() if h["role"] == "target"}
    bastion = ctl["lab"]["hosts"]["bastion1"]["address"]
    jump = jump or f"-o ProxyJump=root@{bastion}"

    def inv(kind):
        lines = ["all:", "  vars: {ansible_python_interpreter: /usr/bin/python3%s}" % all_vars,
                 "  children:", "    bastions:", "      hosts:",
                 f"        bastion1: {{ansible_host: {bastion}{bastion_vars}}}",
                 "    targets:", "      hosts:"]
        for name, h in sorted(hosts.items()):
            how = ", mitogen_via: bastion1" if kind == "arbor" else f", ansible_ssh_common_args: {json.dumps(jump)}"
            lines.append(f"        {name}: {{ansible_host: {h['address']}{how}{target_vars}}}")
        return "\n".join(lines) + "\n"
    a, v = tmp / "inv-arbor.yml", tmp / "inv-vanilla.yml"
    write(a, inv("arbor"), 0o644)
    write(v, inv("vanilla"), 0o644)
    return a, v


def playbook(mode, inventory, *extra, env=None, book=BOOK, input=None):
    write(WORK / "book.yml", book, 0o644)
    e = dict(env or {})
    if mode == "arbor":
        e.update(ANSIBLE_CONNECTION_PLUGINS=str(GLUE), ARBOR_BIN=str(ARBOR))
    res = as_user([VENV / "ansible-playbook", "-i", inventory, WORK / "book.yml", *extra], env=e,
                  input=input)
    return res.returncode, res.stdout + res.stderr


def whoami(out):
    """{host: what `whoami` printed} from the default callback at -v."""
    return dict(re.findall(r'^changed: \[(\S+)\] => .*"stdout": "([^"]*)"', out, re.M))


def both(a, v, env=None):
    """(vanilla's (rc, output), arbor's) for the same playbook."""
    return playbook("vanilla", v, "-v", env=env), playbook("arbor", a, "-v", env=env)


def assert_same_and_ok(v, a, user="root"):
    (rc_v, out_v), (rc_a, out_a) = v, a
    assert rc_v == 0, out_v[-3000:]
    assert rc_a == 0, out_a[-3000:]
    assert recap(out_a) == recap(out_v) and len(recap(out_a)) == 3, (out_v[-2000:], out_a[-2000:])
    assert set(whoami(out_a).values()) == {user} and whoami(out_a) == whoami(out_v), out_a[-2000:]


def default_key(ctl, passphrase=None):
    """The lab's key as the user's ~/.ssh/id_ed25519 (and its .pub);
    returns its path as ssh sees it."""
    key = SSH_DIR / "id_ed25519"
    shutil.copy(ctl["lab_key"], key)
    shutil.copy(f"{ctl['lab_key']}.pub", f"{key}.pub")
    key.chmod(0o600)
    if passphrase:
        run("ssh-keygen", "-q", "-p", "-N", passphrase, "-P", "", "-f", key)
    return Path("/root/.ssh/id_ed25519")


def test_the_default_key_file_reaches_every_hop(ctl, tmp_path):
    """~/.ssh/id_ed25519 only: no agent, no ansible_ssh_private_key_file.
    (Before: the bastion was reached, every target behind it refused.)"""
    default_key(ctl)
    assert_same_and_ok(*both(*inventories(ctl, tmp_path, all_vars=", ansible_user: root")))


def test_the_users_ssh_config_applies_to_deeper_hops(ctl, tmp_path):
    """~/.ssh/config names the bastion by an alias (HostName), logs into it
    as arbctl with its jump key, and into the targets as root with the lab
    key (User, IdentityFile, IdentitiesOnly, Port): the inventory says
    none of it. arbor resolves each hop with the controller's ssh -G and
    carries user, address, port and key to the hops its relay starts."""
    lab = ctl["lab"]
    net = ".".join(lab["hosts"]["target1"]["address"].split(".")[:3])
    write(SSH_DIR / "config", f"""
Host jump
    HostName {lab['hosts']['bastion1']['address']}
    User {USER}
    Port 22
    IdentityFile {ctl['jump_key']}
    IdentitiesOnly yes
Host {net}.*
    User root
    Port 22
    IdentityFile {ctl['lab_key']}
    IdentitiesOnly yes
""")
    a, v = inventories(ctl, tmp_path, jump="-o ProxyJump=jump")
    write(a, a.read_text().replace(f"ansible_host: {lab['hosts']['bastion1']['address']}", "ansible_host: jump"),
          0o644)
    assert_same_and_ok(*both(a, v))


def start_agent(*keys, passphrase=None):
    """The user's own ssh-agent holding `keys`; returns SSH_AUTH_SOCK."""
    sock = WORK / f"agent-{secrets.token_hex(4)}.sock"
    run("ssh-agent", "-a", sock)
    env = {"SSH_AUTH_SOCK": str(sock)}
    if passphrase is not None:
        askpass = WORK / "askpass.sh"
        write(askpass, f"#!/bin/sh\necho '{passphrase}'\n", 0o700)
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
    for k in keys:
        res = subprocess.run(["ssh-add", str(k)], env=dict(os.environ, **env), capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=30)
        assert res.returncode == 0, res.stderr
    return str(sock)


def test_a_key_only_in_the_users_agent_works_beside_key_files(ctl, tmp_path):
    """The targets' key is only in arbctl's own ssh-agent; the bastion's is
    a key file (ansible_ssh_private_key_file). Deeper hops sign with both
    through arbor's agent socket, which lists the user's agent's keys
    beside its own. (Before: once a key file was loaded, the user's agent
    was no longer seen.)"""
    env = {"SSH_AUTH_SOCK": start_agent(ctl["lab_key"])}
    bastion = ctl["lab"]["hosts"]["bastion1"]["address"]
    a, v = inventories(
        ctl, tmp_path, target_vars=", ansible_user: root",
        bastion_vars=f", ansible_user: {USER}, ansible_ssh_private_key_file: {ctl['jump_key']}",
        jump=f"-o ProxyCommand='ssh -i {ctl['jump_key']} -W %h:%p {USER}@{bastion}'")
    assert_same_and_ok(*both(a, v, env=env))


def test_a_key_only_in_the_users_agent(ctl, tmp_path):
    """No key file at all: one key, in the user's agent (worked before too)."""
    env = {"SSH_AUTH_SOCK": start_agent(ctl["lab_key"])}
    assert_same_and_ok(*both(*inventories(ctl, tmp_path, all_vars=", ansible_user: root"), env=env))


def test_a_passphrase_protected_key_file(ctl, tmp_path):
    """~/.ssh/id_ed25519 needs a passphrase. Without an agent holding it,
    every host fails, vanilla's and arbor's, and arbor's message names the
    key file and says to ssh-add it; once it is in the user's agent, every
    host works."""
    phrase = secrets.token_urlsafe(10)
    key = default_key(ctl, passphrase=phrase)
    a, v = inventories(ctl, tmp_path, all_vars=", ansible_user: root")
    (rc_v, out_v), (rc_a, out_a) = both(a, v)
    assert rc_v != 0 and rc_a != 0
    assert recap(out_a) == recap(out_v), (out_v[-2000:], out_a[-2000:])
    msgs = re.findall(r"^fatal: \[(\S+)\]: UNREACHABLE! => (\{.*\})$", out_a, re.M)
    assert len(msgs) == 3, out_a[-3000:]
    for host, body in msgs:
        msg = json.loads(body)["msg"]
        assert host in msg and "bastion1" in msg and "Permission denied" in msg, msg
        assert f"{key} needs a passphrase" in msg and f"ssh-add {key}" in msg, msg
    env = {"SSH_AUTH_SOCK": start_agent(SSH_DIR / "id_ed25519", passphrase=phrase)}
    assert_same_and_ok(*both(a, v, env=env))


@pytest.fixture
def pwuser():
    """arbpw: a password and no key, on every host (deploy/lab's sshd_config)."""
    password = secrets.token_urlsafe(12)
    run("useradd", "--create-home", "--shell", "/bin/bash", PWUSER, check=False)
    run("chpasswd", input=f"{PWUSER}:{password}\n")
    yield password
    run("pkill", "-KILL", "-u", PWUSER, check=False)
    time.sleep(0.3)
    run("userdel", "--remove", PWUSER, check=False)


def test_password_logins_on_every_hop(ctl, pwuser, tmp_path):
    """The bastion and the targets accept arbpw with its password only:
    `ansible_password` for both, then `--ask-pass` typed at the prompt.
    Vanilla answers ssh (and the ProxyJump's ssh) through SSH_ASKPASS
    (password_mechanism=ssh_askpass); arbor through its daemon and its relay,
    from RAM. The password is in no process's argv or environment."""
    pw = pwuser
    env = {"ANSIBLE_SSH_PASSWORD_MECHANISM": "ssh_askpass"}
    creds = f", ansible_user: {PWUSER}, ansible_password: '{pw}'"
    bastion = ctl["lab"]["hosts"]["bastion1"]["address"]
    a, v = inventories(ctl, tmp_path, bastion_vars=creds, target_vars=creds,
                       jump=f"-o ProxyJump={PWUSER}@{bastion}")
    seen = []
    stop = []

    def scan():
        while not stop:
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    for f in ("cmdline", "environ"):
                        try:
                            if pw.encode() in (d / f).read_bytes():
                                seen.append((d.name, f, (d / "cmdline").read_bytes()[:80]))
                        except OSError:
                            pass
            time.sleep(0.05)
    import threading
    t = threading.Thread(target=scan)
    t.start()
    try:
        assert_same_and_ok(*both(a, v, env=env), user=PWUSER)
        # --ask-pass: the same password typed once, for every hop.
        a2, v2 = (tmp_path / "a2.yml", tmp_path / "v2.yml")
        write(a2, a.read_text().replace(f", ansible_password: '{pw}'", ""), 0o644)
        write(v2, v.read_text().replace(f", ansible_password: '{pw}'", ""), 0o644)
        assert_same_and_ok(ask_pass(v2, "vanilla", pw, env), ask_pass(a2, "arbor", pw, env), user=PWUSER)
    finally:
        stop.append(1)
        t.join()
    # Vanilla's own askpass helper reads it from shared memory; only the
    # playbook itself (which holds it in its variables) may show it, in no
    # argv or environment of any process.
    assert not seen, seen


def ask_pass(inventory, mode, password, env):
    """ansible-playbook -k, with the password typed at its prompt (a pty)."""
    write(WORK / "book.yml", BOOK, 0o644)
    e = {"HOME": "/root", "PATH": f"{VENV}:/usr/bin:/bin:/usr/sbin:/sbin", "ANSIBLE_NOCOLOR": "1",
         "ANSIBLE_PIPELINING": "True", "LANG": "C.UTF-8", "ANSIBLE_SSH_CONTROL_PATH_DIR": str(SSH_DIR / "cp"),
         **env}
    if mode == "arbor":
        e.update(ANSIBLE_CONNECTION_PLUGINS=str(GLUE), ARBOR_BIN=str(ARBOR))
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /root/.ssh && exec "$@"', str(SSH_DIR)]
    rc, out = run_in_pty(wrap + [str(VENV / "ansible-playbook"), "-k", "-v", "-i", str(inventory),
                                 str(WORK / "book.yml")], e, cwd=WORK, send=password.encode() + b"\n",
                         when=b"SSH password:", timeout=180)
    return rc, out.replace("\r\n", "\n")


def test_ssh_executable_and_extra_args_and_sftp_args(ctl, tmp_path):
    """ansible_ssh_executable runs the first hop (the hops a relay starts
    use their host's ssh, as ProxyJump's target hop uses the controller's);
    ansible_ssh_extra_args reach ssh; sftp/scp extra arguments, which arbor
    cannot honour (it runs no sftp or scp), are refused naming the host."""
    default_key(ctl)
    log = WORK / "ssh-wrapper.log"
    wrapper = WORK / "bin" / "myssh"
    write(wrapper, f"#!/bin/sh\necho \"$@\" >> {log}\nexec ssh \"$@\"\n", 0o755)
    extra = ", ansible_ssh_executable: " + str(wrapper) + ", ansible_ssh_extra_args: '-o ServerAliveInterval=7'"
    a, v = inventories(ctl, tmp_path, all_vars=", ansible_user: root" + extra)
    rc_v, out_v = playbook("vanilla", v, "-v")
    logged_v = log.read_text() if log.exists() else ""
    log.unlink(missing_ok=True)
    rc_a, out_a = playbook("arbor", a, "-v")
    logged_a = log.read_text() if log.exists() else ""
    assert_same_and_ok((rc_v, out_v), (rc_a, out_a))
    assert "ServerAliveInterval=7" in logged_v, logged_v
    # arbor: the first hop (the bastion's relay) through the wrapper, with the extra args.
    lines = [l for l in logged_a.splitlines() if l]
    bastion = ctl["lab"]["hosts"]["bastion1"]["address"]
    assert any(bastion in l and "ServerAliveInterval=7" in l for l in lines), logged_a
    # sftp/scp arguments: refused, naming the host and what to do.
    a2, _ = inventories(ctl, tmp_path, all_vars=", ansible_user: root, ansible_sftp_extra_args: '-l 8000'")
    rc, out = playbook("arbor", a2, "-v")
    assert rc != 0
    for t in ("target1", "target2", "target3"):
        assert re.search(rf"{t}: ansible_sftp_extra_args is set, but arbor runs no sftp or scp", out), out[-2000:]


def test_failure_reasons_survive_a_quiet_ssh_config(ctl, tmp_path):
    """LogLevel QUIET in the user's ssh config: a refused first hop and a
    refused deeper hop still say why, with the host and hop named; a hop
    started without host key checking does not give ssh's "Permanently
    added" notice as its reason."""
    default_key(ctl)
    write(SSH_DIR / "config", "Host *\n    LogLevel QUIET\n")
    a, _ = inventories(ctl, tmp_path, all_vars=", ansible_user: root")
    text = a.read_text()
    text = text.replace("target1: {ansible_host", "target1: {ansible_user: nobody-here, ansible_host")
    text = text.replace("target2: {ansible_host", "target2: {ansible_host_key_checking: false, "
                        "ansible_user: nobody-here, ansible_host")
    text += "    direct:\n      hosts:\n        wrongbastion: {ansible_host: %s, ansible_user: nobody-here}\n" % (
        ctl["lab"]["hosts"]["bastion1"]["address"])
    write(a, text, 0o644)
    rc, out = playbook("arbor", a, "-v", book=BOOK.replace("hosts: targets", "hosts: all:!bastion1"))
    msgs = {h: json.loads(b)["msg"] for h, b in re.findall(r"^fatal: \[(\S+)\]: UNREACHABLE! => (\{.*\})$",
                                                             out, re.M)}
    assert set(msgs) == {"target1", "target2", "wrongbastion"}, out[-3000:]
    for host, msg in msgs.items():
        assert msg.startswith(f"Task failed: {host} (agent, ") and "Permission denied" in msg, msg
        assert "Permanently added" not in msg, msg
    assert "changed: [target3]" in out
