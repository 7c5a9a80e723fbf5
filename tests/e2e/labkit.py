"""What the end-to-end tests share: the lab's paths, running Ansible (vanilla
or through arbor) and commands on lab hosts, and observing every host's
processes and files. Fixtures are in conftest.py."""

import json
import os
import re
import subprocess
import time
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "deploy" / "lab"
# ARBOR_TEST_VENV: another venv (e.g. an older ansible-core) to run Ansible from.
VENV = Path(os.environ.get("ARBOR_TEST_VENV") or REPO / ".venv" / "bin")
HERE = Path(__file__).resolve().parent
PLAYBOOKS = HERE / "playbooks"
GLUE = REPO / "ansible-glue" / "plugins" / "connection"
ARBOR = REPO / "target" / "release" / "arbor"
AGENT_MARK = b"exec(base64.b64decode("
# The become test's accounts (conftest.py's `users`).
LOGIN, OTHER = "arbu", "arbv"
sys.path.insert(0, str(REPO / "deploy" / "bench"))
from connect import Api, lab_chain, start_daemon  # noqa: E402,F401 (the daemon's API client, one implementation)

RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def run(*args, check=True, timeout=300, **kw):
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res



def env_for(mode):
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_PIPELINING="True",
               ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_RETRY_FILES_ENABLED="False")
    env.pop("SSH_AUTH_SOCK", None)  # arbor must bring its own agent
    if mode == "arbor":
        env["ANSIBLE_CONNECTION_PLUGINS"] = str(GLUE)  # the one line that turns arbor on
        env["ARBOR_BIN"] = str(ARBOR)
    return env


def playbook(lab, mode, book, *extra, inventory=None, **kw):
    inv = inventory or (lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"])
    return subprocess.Popen([str(VENV / "ansible-playbook"), "-i", inv, str(PLAYBOOKS / book), *extra],
                            env=env_for(mode), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def run_recorded(lab, mode, book, out_dir, *extra, inventory=None, env=None, timeout=600):
    """Runs a playbook with the `record` callback: (rc, output, the task
    results as dicts, in order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "record.jsonl"
    e = env_for(mode)
    e.update(ARBOR_RECORD=str(record), ANSIBLE_CALLBACK_PLUGINS=str(HERE / "callback_plugins"),
             ANSIBLE_CALLBACKS_ENABLED="record")
    e.update(env or {})
    inv = inventory or (lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"])
    res = subprocess.run([str(VENV / "ansible-playbook"), "-i", str(inv), str(PLAYBOOKS / book), *extra],
                         env=e, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    (out_dir / "out.txt").write_text(out)
    lines = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    return res.returncode, out, lines


def outcomes(lines, keys=("status", "changed", "failed", "rc", "stdout")):
    """(host, task) -> the compared fields of each of its results."""
    out = {}
    for line in lines:
        out.setdefault((line["host"], line["task"]), []).append({k: line.get(k) for k in keys})
    return out


def recap(text):
    return {m[1]: tuple(map(int, m.groups()[1:])) for m in RECAP.finditer(text)}


def ssh(lab, host, cmd):
    h = lab["hosts"][host]
    hop = ["-J", ",".join(h["via_chain"])] if h["via_chain"] else []
    return run("ssh", "-F", lab["ssh_config"], *hop, host, cmd, check=False)


def target_state(lab):
    """Every file under /tmp/arbor-e2e on every target: content hash and mode."""
    state = {}
    for t in ("target1", "target2", "target3"):
        res = ssh(lab, t, "cd /tmp/arbor-e2e 2>/dev/null && find . -type f -o -type d | sort | "
                          "while read f; do echo \"$f $(stat -c %a \"$f\") "
                          "$( [ -f \"$f\" ] && sha256sum < \"$f\" | cut -c1-16)\"; done")
        state[t] = res.stdout
    return state


def clean_targets(lab):
    for t in ("target1", "target2", "target3"):
        ssh(lab, t, "rm -rf /tmp/arbor-e2e")


def host_procs(lab, host):
    """(pid, ppid, exe, cmdline) of every process in a lab host's namespace."""
    out = []
    for pid in run("ip", "netns", "pids", lab["hosts"][host]["netns"], check=False).stdout.split():
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = ""
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.append((int(pid), ppid, exe, cmd))
    return out


def in_host(lab, host, *cmd, env=None):
    """Runs `cmd` inside a lab host's mount and network namespaces."""
    pid = next(p for p, _, e, _ in host_procs(lab, host) if e.endswith("sshd"))
    return run("nsenter", "-t", pid, "-m", "-n", "env", "-i", "PATH=/usr/bin:/bin:/usr/sbin:/sbin",
               *(env or []), *cmd, check=False)


def run_in_pty(argv, env, rows=24, cols=80, send=b"", when=b"", timeout=60, cwd=None):
    """Runs argv with a pty of rows x cols as its terminal, typing `send`
    once `when` (a prompt) has been printed; (exit status, output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    sent = False
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if send and not sent and when in out:
            os.write(master, send)
            sent = True
        if proc.poll() is not None and not r:
            break
    os.close(master)
    if proc.poll() is None:
        proc.kill()
    return proc.wait(timeout=10), out.decode(errors="replace")


def arbor_procs(lab):
    """arbor's processes on every lab host: relays (memfd), agents (python
    interpreters) and any other process carrying arbor's commands (the ssh
    hops a relay runs, stage-0)."""
    found = {}
    for host in lab["hosts"]:
        procs = host_procs(lab, host)
        pythons = {p for p, _, e, c in procs if AGENT_MARK in c and "python" in e}
        found[host] = {
            "relays": [(p, e) for p, _, e, _ in procs if "arbor-relay" in e],
            # an agent's forks (modules running) have an agent as parent
            "agents": sorted(p for p, pp, _, _ in procs if p in pythons and pp not in pythons),
            "others": sorted(p for p, _, e, c in procs if p not in pythons and "arbor-relay" not in e
                             and (AGENT_MARK in c or b"arbor-stage0" in c)),
        }
    return found


def any_arbor(procs):
    return any(v["relays"] or v["agents"] or v["others"] for v in procs.values())


def wait_gone(lab, seconds=5.0):
    """Waits up to `seconds` for every arbor process on every host to end."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and any_arbor(arbor_procs(lab)):
        time.sleep(0.1)
    return arbor_procs(lab)


# Three tasks on two targets, for a QUIC hop's tests (ok=3 each).
QUIC_PLAY = """
- hosts: target1,target2
  gather_facts: false
  tasks:
    - command: hostname
    - copy: {content: "quic {{ inventory_hostname }}\\n", dest: /tmp/arbor-quic-probe}
    - file: {path: /tmp/arbor-quic-probe, state: absent}
"""


def udp_endpoints(lab):
    """Every UDP socket in every lab namespace (`ss`; the lab has none of
    its own): (host, line)."""
    found = []
    for host, h in lab["hosts"].items():
        out = run("ip", "netns", "exec", h["netns"], "ss", "-Huanp", check=False).stdout
        found += [(host, line) for line in out.splitlines()]
    return found


# sshd's socket for a forwarded agent: made by sshd for the session, in a
# 0700 directory, removed when the session ends.
SSHD_AGENT = re.compile(r"^/tmp/ssh-\w+(/agent\.\d+)?$")


def bastion_files(lab, detail=False):
    """Files in the bastion's writable places, seen from inside its mounts:
    {path: (type, mode)} where type is f(ile), d(irectory), s(ocket)."""
    pid = next(p for p, _, e, _ in host_procs(lab, "bastion1") if e.endswith("sshd"))
    res = run("nsenter", "-t", pid, "-m", "find", "/tmp", "/var/tmp", "/dev/shm", "/root",
              "-printf", "%p %y %m\n", check=False)
    out = {}
    for line in res.stdout.splitlines():
        path, kind, mode = line.rsplit(" ", 2)
        out[path] = (kind, mode)
    return out


def vanilla_modules(lab, tmp_path):
    """modules.yml through vanilla on clean targets: its recap and the
    targets' files; the targets are clean again after."""
    clean_targets(lab)
    p = playbook(lab, "vanilla", "modules.yml", "-e", f"fetch_dir={tmp_path / 'vanilla'}")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    result = recap(out), target_state(lab)
    clean_targets(lab)
    return result


SHARED_CLOSED = re.compile(r"Shared connection to \S+ closed\.\r?\n")


def by_task(lines):
    """Results by (host, task). Vanilla runs `script` and `raw` on a tty
    (ssh -tt): its output ends lines in CR LF and its stderr carries ssh's
    "Shared connection ... closed."; arbor's has no tty, as Mitogen's has
    none. Those two artefacts are taken out; everything else must match."""
    out = {}
    for line in lines:
        for k in ("stdout", "stderr"):
            if isinstance(line.get(k), str):
                line[k] = SHARED_CLOSED.sub("", line[k]).replace("\r\n", "\n")
        line.pop("stdout_lines", None)
        out.setdefault((line["host"], line["task"]), []).append(line)
    return out
