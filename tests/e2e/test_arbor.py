"""arbor end to end in the lab: a real ansible-playbook through the
python-less bastion with arbor switched on by one environment variable,
compared with vanilla Ansible; the tree's processes and files observed on
every host while it runs and after it ends."""

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "deploy" / "lab"
# ARBOR_TEST_VENV: another venv (e.g. an older ansible-core) to run Ansible from.
VENV = Path(os.environ.get("ARBOR_TEST_VENV") or REPO / ".venv" / "bin")
HERE = Path(__file__).resolve().parent
PLAYBOOKS = HERE / "playbooks"
GLUE = REPO / "ansible-glue" / "plugins" / "connection"
ARBOR = REPO / "target" / "release" / "arbor"
AGENT_MARK = b"exec(base64.b64decode("
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def run(*args, check=True, timeout=300, **kw):
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--targets", "3", "--no-python-bastion").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


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


def test_modules_match_vanilla_through_python_less_bastion(lab, tmp_path):
    assert not lab["hosts"]["bastion1"]["python3"]
    vanilla_recap, vanilla_state = vanilla_modules(lab, tmp_path)

    files_before = bastion_files(lab)
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((arbor_procs(lab), bastion_files(lab)))
            time.sleep(0.3)

    sampler = threading.Thread(target=sample)
    sampler.start()
    p = playbook(lab, "arbor", "modules.yml", "-e", f"fetch_dir={tmp_path / 'arbor'}")
    try:
        out, _ = p.communicate(timeout=600)
    finally:
        stop.set()
        sampler.join()
    ended = time.monotonic()
    assert p.returncode == 0, out
    assert recap(out) == vanilla_recap and len(vanilla_recap) == 3, out
    assert target_state(lab) == vanilla_state
    for t in ("target1", "target2", "target3"):
        a = (tmp_path / "arbor" / t / "tmp/arbor-e2e/app.conf").read_text()
        assert a == (tmp_path / "vanilla" / t / "tmp/arbor-e2e/app.conf").read_text()
        assert f"host = {t}" in a

    # While it ran: the relay ran from a memfd; the bastion's disk stayed
    # as it was; each target had one agent, the same one for every task.
    live = [s for s, _ in samples if s["bastion1"]["relays"]]
    assert live, "no sample saw the relay"
    for s in live:
        assert all(exe.startswith("/memfd:arbor-relay") for _, exe in s["bastion1"]["relays"]), s
    for _, files in samples:
        new_paths = set(files) - set(files_before)
        # Nothing new but sshd's forwarded-agent socket, private to the user.
        assert all(SSHD_AGENT.match(p) for p in new_paths), new_paths
        for p in new_paths:
            # Private through its 0700 directory (sshd leaves the socket 0755).
            assert files[p] == ("d", "700") or files[p][0] == "s", (p, files[p])
        assert not set(files_before) - set(files)
    for t in ("target1", "target2", "target3"):
        seen = {tuple(s[t]["agents"]) for s, _ in samples if s[t]["agents"]}
        assert len(seen) == 1 and len(next(iter(seen))) == 1, (t, seen)

    # After it: within 5 s no arbor process anywhere, no temp dir, no socket.
    procs = wait_gone(lab, 5.0 - (time.monotonic() - ended))
    assert not any_arbor(procs), procs
    assert not list(Path(f"/tmp/arbor-{os.getuid()}").glob("[0-9]*"))
    # ... and the bastion is exactly as it was, agent socket gone too.
    assert bastion_files(lab) == files_before
    for t in ("target1", "target2", "target3"):
        left = ssh(lab, t, "ls -a /tmp ~/.ansible/tmp 2>/dev/null | grep -E 'arbor|ansible_' || true").stdout
        assert left.strip() in ("", "arbor-e2e"), left


def test_sigint_mid_run_leaves_nothing(lab):
    p = playbook(lab, "arbor", "slow.yml", start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        procs = arbor_procs(lab)
        if all(procs[t]["agents"] for t in ("target1", "target2", "target3")) and any(
                "sleep" in c.decode(errors="replace") for t in ("target1",) for _, _, _, c in host_procs(lab, t)):
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("the run never reached its long task")
    os.killpg(p.pid, signal.SIGINT)
    t0 = time.monotonic()
    p.communicate(timeout=30)
    procs = wait_gone(lab, 5.0 - (time.monotonic() - t0))
    assert not any_arbor(procs), procs
    for t in ("target1",):
        assert not [c for _, _, _, c in host_procs(lab, t) if b"sleep" in c]
    assert not list(Path(f"/tmp/arbor-{os.getuid()}").glob("[0-9]*"))


def test_unreachable_target_and_unknown_via_are_named(lab, tmp_path):
    inv = tmp_path / "inventory.yml"
    base = Path(lab["inventory"]).read_text()
    inv.write_text(base + f"""
    broken:
      hosts:
        ghost: {{ansible_host: "10.241.1.250", mitogen_via: bastion1}}
        orphan: {{ansible_host: "10.241.1.11", mitogen_via: nosuchbastion}}
        impostor: {{ansible_host: "10.241.1.10", mitogen_via: bastion1,
                    ansible_ssh_common_args: "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes"}}
""")
    p = subprocess.run([str(VENV / "ansible"), "-i", str(inv), "targets:broken", "-m", "ansible.builtin.command",
                        "-a", "hostname", "-o", "-T", "5"], env=env_for("arbor"), capture_output=True,
                       text=True, timeout=300)
    out = p.stdout + p.stderr
    for t in ("target1", "target2", "target3"):
        assert re.search(rf"^{t} \| CHANGED \| rc=0 \| \(stdout\) {t}$", out, re.M), out
    ghost = next(l for l in out.splitlines() if l.startswith("ghost"))
    assert "UNREACHABLE" in ghost and "bastion1" in ghost and "ghost" in ghost, ghost
    orphan = next(l for l in out.splitlines() if l.startswith("orphan"))
    assert "UNREACHABLE" in orphan and "nosuchbastion" in orphan, orphan
    # Host keys are checked on the hop as ProxyJump would: an unknown key is refused.
    impostor = next(l for l in out.splitlines() if l.startswith("impostor"))
    assert "UNREACHABLE" in impostor and re.search(
        r"Host key verification failed|No \S+ host key is known for 10.241.1.10", impostor), impostor


def test_a_host_without_python_is_named_and_the_run_goes_on(lab):
    """The bastion of this lab has no Python at all: as a target it fails
    at once, UNREACHABLE, saying so; its relay still carries the targets."""
    p = subprocess.run([str(VENV / "ansible"), "-i", lab["inventory"], "bastion1:targets", "-m",
                        "ansible.builtin.ping", "-o"], env=env_for("arbor"), capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    line = next(l for l in out.splitlines() if l.startswith("bastion1 |"))
    assert "UNREACHABLE" in line and "bastion1 (agent, from the controller)" in line, line
    assert re.search(r"python3: (No such file or directory|not found)", line), line
    for t in ("target1", "target2", "target3"):
        assert re.search(rf"^{t} \| SUCCESS", out, re.M), out
