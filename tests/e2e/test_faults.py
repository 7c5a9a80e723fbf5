"""Faults injected mid-run in the lab (issue 7): two bastions with two
targets each, a real ansible-playbook through arbor. Each test kills or
stalls one part of the tree and checks that only the hosts behind it fail,
as UNREACHABLE naming the host and the dead hop, within the stated bound;
that the others finish; and that nothing of arbor's is left on any host."""

import fcntl
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from labkit import (AGENT_MARK, Api, LAB, PLAYBOOKS, VENV, any_arbor, env_for, host_procs, lab_chain, recap,
                    run, ssh, start_daemon, wait_gone)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

TARGETS = ("target1", "target2", "target3", "target4")
BEHIND = {"bastion1": ("target1", "target2"), "bastion2": ("target3", "target4")}
FATAL = re.compile(r"^fatal: \[(\S+)\]: UNREACHABLE! => (\{.*\})$", re.M)


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--bastions", "2", "--targets", "2").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


@pytest.fixture(autouse=True)
def clean(lab):
    for t in TARGETS:
        ssh(lab, t, "rm -f /tmp/arbor-fault-after")
    yield
    run(LAB / "wan", "set", "--loss-pct", "0", check=False)
    procs = wait_gone(lab, 30.0)
    assert not any_arbor(procs), procs
    # Whatever the fault, no temp dir of any kind is left on any host:
    # Ansible's module payloads, remote_tmp's task dirs, arbor's own.
    # sshd's forwarded-agent dir on a bastion goes when sshd's session ends,
    # and after a WAN cut that is when its TCP retransmission reaches the
    # controller (whose ssh is gone) and meets a reset: TCP's backoff can put
    # that 10-15 s after the WAN comes back.
    deadline = time.monotonic() + 30
    left = {}
    while time.monotonic() < deadline:
        left = {h: leftovers(lab, h) for h in lab["hosts"]}
        if not any(left.values()):
            break
        time.sleep(0.2)
    assert not any(left.values()), left


def start(lab, *extra, env=None, book="faults.yml"):
    e = env_for("arbor")
    e.update(env or {})
    return subprocess.Popen([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(PLAYBOOKS / book),
                             *extra], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_busy(lab, p):
    """Waits until every target runs the "wait" task's sleep."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if all(any(b"sleep" in c for _, _, _, c in host_procs(lab, t)) for t in TARGETS):
            return
        if p.poll() is not None:
            pytest.fail("the run ended early:\n" + (p.stdout.read() if p.stdout else ""))
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail("the run never reached its wait task")


def finish(p, timeout=150, seen=None):
    """The run's output once it ends; `seen` gets the time each host's
    UNREACHABLE line was printed."""
    lines, deadline = [], time.monotonic() + timeout
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), l)) for l in p.stdout], daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        os.killpg(p.pid, signal.SIGKILL)
        reader.join(10)
        pytest.fail("the run hung:\n" + "".join(l for _, l in lines))
    p.wait(max(1, deadline - time.monotonic()))
    if seen is not None:
        for t, l in lines:
            m = FATAL.match(l.rstrip("\n"))
            if m:
                seen.setdefault(m[1], t)
    return "".join(l for _, l in lines)


def unreachable(out):
    return {h: json.loads(body)["msg"] for h, body in FATAL.findall(out)}


def survived(lab, hosts):
    for t in hosts:
        got = ssh(lab, t, "cat /tmp/arbor-fault-after").stdout
        assert got == f"{t} survived\n", (t, got)


def assert_only_behind(lab, out, dead, names):
    """The hosts in `dead` failed UNREACHABLE with a message naming them and
    every name in `names`; the rest finished."""
    rc = recap(out)
    msgs = unreachable(out)
    assert set(msgs) == set(dead), out
    for t in TARGETS:
        if t in dead:
            assert rc[t] == (1, 1, 1, 0), (t, rc[t], out)
            for n in (t, *names):
                assert n in msgs[t], (t, msgs[t])
        else:
            assert rc[t] == (3, 3, 0, 0), (t, rc[t], out)
    survived(lab, [t for t in TARGETS if t not in dead])
    return msgs


def relays(procs):
    return [p for p, _, e, _ in procs if "arbor-relay" in e]


def agents(procs):
    pythons = {p for p, _, e, c in procs if AGENT_MARK in c and "python" in e}
    return [p for p, pp, _, _ in procs if p in pythons and pp not in pythons]


def sessions(procs):
    """sshd's per-connection process that owns an agent (its parent, or
    the parent of the shell that reports how the agent ended)."""
    ppid = {p: pp for p, pp, _, _ in procs}
    up = set()
    for p, pp, e, c in procs:
        if AGENT_MARK in c and "python" in e:
            up |= {pp, ppid.get(pp)}
    return [p for p, _, e, _ in procs if p in up and e.endswith("sshd")]


@pytest.mark.parametrize("host,pick,dead,names", [
    ("bastion1", relays, BEHIND["bastion1"], ["bastion1"]),
    ("target3", agents, ["target3"], ["bastion2", "the agent was killed by signal 9"]),
    ("target2", sessions, ["target2"], ["bastion1"]),
], ids=["relay-on-bastion", "agent", "sshd-session"])
def test_kill_9_fails_only_the_hosts_behind_it(lab, host, pick, dead, names):
    p = start(lab)
    wait_busy(lab, p)
    pids = pick(host_procs(lab, host))
    assert len(pids) == 1, (host, pids)
    os.kill(pids[0], signal.SIGKILL)
    t0 = time.monotonic()
    seen = {}
    out = finish(p, seen=seen)
    msgs = assert_only_behind(lab, out, dead, names)
    after = {h: round(seen[h] - t0, 2) for h in dead}
    print(f"{pick.__name__} on {host} killed: failed after {after} s; {msgs}")
    assert max(after.values()) < 3, after


def test_a_stalled_wan_fails_every_host_behind_it_within_the_keepalive(lab):
    keepalive = 6
    # The bastions too, as targets: their agents are on the first hop.
    p = start(lab, "-f", "10", "-e", "fault_wait=30 fault_hosts=all", env={"ARBOR_KEEPALIVE_SECS": str(keepalive)})
    wait_busy(lab, p)
    run(LAB / "wan", "set", "--loss-pct", "100")
    t0 = time.monotonic()
    seen = {}
    out = finish(p, timeout=120, seen=seen)
    took = time.monotonic() - t0
    print("failed after", {h: round(t - t0, 2) for h, t in seen.items()})
    # With the link still dead, the far side ends by itself: the relays and
    # agents hear no ping for the keepalive and exit, and their commands go.
    procs = wait_gone(lab, keepalive + 5)
    gone = time.monotonic() - t0
    tasks = [h for h in lab["hosts"] if any(b"sleep" in c for _, _, _, c in host_procs(lab, h))]
    run(LAB / "wan", "set", "--loss-pct", "0")
    print(f"far side gone {gone:.1f} s after the link died")
    assert not any_arbor(procs) and not tasks, (procs, tasks)
    msgs = unreachable(out)
    assert set(msgs) == set(TARGETS) | set(BEHIND), out
    for t, m in msgs.items():
        bastion = t if t in BEHIND else "bastion1" if t in BEHIND["bastion1"] else "bastion2"
        assert t in m and bastion in m and "not responding" in m, m
    print(f"WAN held: run ended {took:.1f} s later (keepalive {keepalive} s); {msgs}")
    # The bound: ssh's probes find the link dead after the keepalive, and
    # Ansible's result comes at once.
    assert took < keepalive + 10, (took, out)


def test_a_wan_that_stalls_for_a_minute_is_ridden_out_as_vanilla_does(lab):
    """Every packet on the WAN held for 60 s in the middle of a run, with
    arbor's defaults (ARBOR_KEEPALIVE_SECS unset): vanilla and arbor, run
    at the same time through the same outage, both finish every task on
    every host. (Before, with a 30 s keepalive, arbor failed every host.)"""
    runs = {}
    t_start = time.monotonic()
    for mode in ("vanilla", "arbor"):
        e = env_for(mode)
        e.pop("ARBOR_KEEPALIVE_SECS", None)
        inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
        runs[mode] = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", inv, str(PLAYBOOKS / "stall.yml"),
                                       "-e", f"mode={mode}"], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
    outs = {}
    try:
        # Both are well into their loops before the WAN goes.
        deadline = time.monotonic() + 120
        while not all(ssh(lab, "target4", f"test -e /tmp/arbor-stall-{m}-3").returncode == 0 for m in runs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in runs.values()), "no progress"
            time.sleep(0.5)
        run(LAB / "wan", "set", "--loss-pct", "100")
        t0 = time.monotonic()
        time.sleep(60)
        run(LAB / "wan", "set", "--loss-pct", "0")
        print(f"WAN held for {time.monotonic() - t0:.1f} s")
        ended = {}
        deadline = time.monotonic() + 400
        while len(ended) < len(runs) and time.monotonic() < deadline:
            for mode, p in runs.items():
                if mode not in ended and p.poll() is not None:
                    ended[mode] = time.monotonic()
            time.sleep(0.2)
        for mode, p in runs.items():
            outs[mode] = finish(p, timeout=30)
            print(f"{mode}: finished {ended.get(mode, time.monotonic()) - t0:.1f} s after the WAN went "
                  f"({ended.get(mode, time.monotonic()) - t_start:.1f} s in all)")
    finally:
        for p in runs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for t in TARGETS:
            ssh(lab, t, "rm -f /tmp/arbor-stall-*")
    for mode, p in runs.items():
        assert p.returncode == 0, (mode, outs[mode][-3000:])
    assert recap(outs["arbor"]) == recap(outs["vanilla"])
    assert all(r[0] == 3 and r[2:] == (0, 0) for r in recap(outs["arbor"]).values()), outs["arbor"][-2000:]


def test_a_via_host_that_never_answers_fails_once_then_at_once(lab, tmp_path):
    # A listener on the WAN side that accepts and then says nothing, as a
    # hung sshd or a firewall's tarpit would.
    tarpit = subprocess.Popen(
        ["ip", "netns", "exec", lab["hosts"]["bastion1"]["netns"], "python3", "-c",
         "import socket, time\n"
         "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind(('0.0.0.0', 2299)); s.listen(64); held = []\n"
         "while True: held.append(s.accept())\n"])
    try:
        inv = tmp_path / "inventory.yml"
        inv.write_text(Path(lab["inventory"]).read_text() + f"""
    tarpits:
      hosts:
        tarpit: {{ansible_host: "{lab['hosts']['bastion1']['address']}", ansible_port: 2299}}
    lost:
      hosts:
        lost1: {{ansible_host: "10.241.1.10", mitogen_via: tarpit}}
        lost2: {{ansible_host: "10.241.1.11", mitogen_via: tarpit}}
""")
        t0 = time.monotonic()
        p = subprocess.run([str(VENV / "ansible-playbook"), "-i", str(inv), str(PLAYBOOKS / "dead_via.yml"),
                            "-T", "5"], env=env_for("arbor"), capture_output=True, text=True, timeout=300)
        took = time.monotonic() - t0
        out = p.stdout + p.stderr
        msgs = re.findall(r"^failed: \[(lost\d)\] \(item=(\d)\) => (\{.*\})$",
                          out, re.M)
        assert len(msgs) == 20, out
        texts = {host: {json.loads(body)["msg"] for h, _, body in msgs if h == host} for host in ("lost1", "lost2")}
        # One message per host for all its items: the host, the hop, and why.
        for host, got in texts.items():
            assert len(got) == 1, texts
            text = next(iter(got))
            # ansible-core 2.19+ puts "Task failed: " before an unreachable host's message.
            assert text.removeprefix("Task failed: ").startswith(
                f"{host} (agent, via tarpit): tarpit (relay, from the controller)"), text
            assert "timed out" in text, text
        assert all(json.loads(body)["unreachable"] for _, _, body in msgs)
        print(f"10 items x 2 hosts behind a silent via host: {took:.1f} s; {text}")
        assert took < 5 + 15, (took, out)
    finally:
        tarpit.kill()
        tarpit.wait()


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_stopped_agent_holds_bounded_memory_and_stalls_no_one_else(lab, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # 14 streams with 2 MiB windows: 28 MiB for the stopped agent, more than
    # a queue of 64 frames (16 MiB) and the pipes could hold, less than the
    # relay's bound for one child (32 MiB).
    window, streams, size, part = 2 << 20, 14, 16 << 20, os.urandom(1 << 20)
    monkeypatch.setenv("ARBOR_STREAM_WINDOW_BYTES", str(window))
    d = start_daemon(run_dir, open(tmp_path / "daemon.log", "wb"))
    try:
        busy, quiet = lab_chain(lab, "target1"), lab_chain(lab, "target2")
        pinger = Api(run_dir / "sock")
        senders = [Api(run_dir / "sock") for _ in range(streams)]
        for api, c in [(pinger, quiet)] + [(s, busy) for s in senders]:
            api.send({"op": "call", "chain": c, "req": {"op": "ping"}})
            assert "pid" in api.recv()[0]

        def ping():
            t0 = time.monotonic()
            pinger.send({"op": "call", "chain": quiet, "req": {"op": "ping"}})
            assert "pid" in pinger.recv()[0]
            return time.monotonic() - t0

        relay = relays(host_procs(lab, "bastion1"))[0]
        agent = agents(host_procs(lab, "target1"))[0]
        base = {"relay": rss_kib(relay), "daemon": rss_kib(d.pid)}
        os.kill(agent, signal.SIGSTOP)
        results = [None] * streams

        def transfer(i):
            s = senders[i]
            s.send({"op": "put", "chain": busy, "path": f"/tmp/arbor-stopped-{i}.bin", "size": size}, b"")
            for _ in range(size // len(part)):
                s.send({"op": "data"}, part)
            results[i] = s.recv()[0]

        threads = [threading.Thread(target=transfer, args=(i,), daemon=True) for i in range(streams)]
        for t in threads:
            t.start()
        # While the agent is stopped: the senders stall on their windows,
        # the queues hold at most a window each, and target2 answers.
        lats, peak = [], dict(base)
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end:
            lats.append(ping())
            peak = {"relay": max(peak["relay"], rss_kib(relay)), "daemon": max(peak["daemon"], rss_kib(d.pid))}
            time.sleep(0.05)
        assert all(r is None for r in results), results
        grow = {k: (peak[k] - base[k]) / 1024 for k in base}
        med = statistics.median(lats)
        print(f"agent stopped, {streams} x {size >> 20} MiB queued: ping target2 median {med * 1000:.1f} ms, "
              f"max {max(lats) * 1000:.1f} ms ({len(lats)}); RSS growth MiB {grow}")
        assert med < 0.1 and max(lats) < 1.0, lats
        # Each stream holds at most its window beyond what the agent took:
        # the relay's queue for the child stays within its bound (32 MiB),
        # the daemon's within a window and an API message per stream.
        assert grow["relay"] < 34 and grow["daemon"] < streams * (window + (1 << 20)) / (1 << 20) + 16, grow
        # Resumed, every byte arrives.
        os.kill(agent, signal.SIGCONT)
        for t in threads:
            t.join(timeout=120)
        assert results == [{"size": size}] * streams, results
        want = hashlib.sha256(part * (size // len(part))).hexdigest()
        got = ssh(lab, "target1", "sha256sum /tmp/arbor-stopped-*.bin").stdout.split()[::2]
        assert got == [want] * streams, got
    finally:
        try:
            os.kill(agent, signal.SIGCONT)
        except (OSError, UnboundLocalError):
            pass
        d.terminate()
        d.wait(timeout=15)
        ssh(lab, "target1", "rm -f /tmp/arbor-stopped-*.bin")


def leftovers(lab, host):
    """What a run may leave in the places it writes: remote_tmp's task
    dirs, modules' payload dirs and their own temp dirs, partial puts,
    arbor's files, forwarded agent sockets."""
    res = ssh(lab, host, "ls -d ~/.ansible/tmp/* /tmp/ansible_* /tmp/ansible-* /tmp/*arbor* /tmp/.*arbor* "
                         "/dev/shm/* /tmp/ssh-* 2>/dev/null | grep -v arbor-fault-after || true")
    return res.stdout.split()


def run_dir_entries():
    base = Path(f"/tmp/arbor-{os.getuid()}")
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


def start_on_tty(lab, *extra):
    """The faults playbook on a terminal of its own, as a person runs it
    (Ctrl+C then reaches its whole foreground process group)."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(PLAYBOOKS / "faults.yml"),
                          *extra], env=env_for("arbor"), stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    threading.Thread(target=lambda: _drain(master), daemon=True).start()
    return p, master


def _drain(fd):
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL, "ctrl-c"],
                         ids=["sigint", "sigkill-group", "ctrl-c-on-a-tty"])
def test_interrupted_run_leaves_nothing_within_5_s(lab, sig):
    before = run_dir_entries()
    if sig == "ctrl-c":
        p, tty = start_on_tty(lab, "-e", "fault_wait=60")
    else:
        p = start(lab, "-e", "fault_wait=60")
    wait_busy(lab, p)
    daemons = [int(d) for d in os.listdir("/proc") if d.isdigit() and _exe(d).endswith("/arbor")]
    assert daemons
    if sig == "ctrl-c":
        os.write(tty, b"\x03")
    else:
        os.killpg(p.pid, sig)
    t0 = time.monotonic()
    p.wait(timeout=30)
    if sig != "ctrl-c":
        p.communicate(timeout=30)
    procs = wait_gone(lab, 5.0 - (time.monotonic() - t0))
    took = time.monotonic() - t0
    assert not any_arbor(procs), procs
    # The daemon saw its run end (SIGKILL leaves it no signal: it watches
    # ansible-playbook's pid) and took its socket and run dir with it.
    while time.monotonic() - t0 < 5 and any(Path(f"/proc/{d}").exists() for d in daemons):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{d}").exists() for d in daemons)
    assert run_dir_entries() == before, (before, run_dir_entries())
    print(f"{sig}: every arbor process gone {took:.1f} s after")
    for h in lab["hosts"]:
        assert not [c for _, _, _, c in host_procs(lab, h) if b"sleep" in c], h
        assert leftovers(lab, h) == [], (h, leftovers(lab, h))
    # Nothing kept acting on the targets: the task after the wait never ran.
    time.sleep(2)
    for t in TARGETS:
        assert ssh(lab, t, "cat /tmp/arbor-fault-after").returncode != 0


def _exe(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def agent_pid(lab, host):
    found = agents(host_procs(lab, host))
    return found[0] if len(found) == 1 else None


def test_a_copy_cut_by_kill_9_leaves_the_old_file_and_nothing_else(lab, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(160):
            f.write(os.urandom(1 << 20))
    ssh(lab, "target3", "echo old > /tmp/arbor-fault-dest")
    before = leftovers(lab, "target3")
    p = start(lab, "-e", f"target=target3 src={src} dest=/tmp/arbor-fault-dest", book="copy_one.yml")
    deadline, killed = time.monotonic() + 90, None
    while time.monotonic() < deadline and killed is None:
        pid = agent_pid(lab, "target3")
        try:
            written = int(re.search(r"wchar: (\d+)", Path(f"/proc/{pid}/io").read_text())[1]) if pid else 0
        except (OSError, TypeError):
            written = 0
        if written > 20 << 20:
            os.kill(pid, signal.SIGKILL)
            killed = written
        time.sleep(0.02)
    out = finish(p)
    assert killed, "the copy never got under way:\n" + out
    msgs = unreachable(out)
    assert list(msgs) == ["target3"] and "target3" in msgs["target3"], out
    print(f"agent killed after {killed >> 20} MiB written: {msgs['target3']}")
    assert ssh(lab, "target3", "cat /tmp/arbor-fault-dest").stdout == "old\n"
    deadline = time.monotonic() + 5
    while leftovers(lab, "target3") != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(lab, "target3") == before
    assert ssh(lab, "target3", "rm /tmp/arbor-fault-dest").returncode == 0


def test_a_copy_to_a_full_disk_says_so_and_keeps_the_old_file(lab, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))
    mnt = "/mnt/arbor-small"
    assert ssh(lab, "target1", f"mkdir -p {mnt} && mount -t tmpfs -o size=1m arbor-small {mnt} && "
                               f"echo old > {mnt}/conf").returncode == 0
    try:
        # The file itself does not fit (the copy module's own move fails),
        # then the upload into a temp dir on the full disk (arbor's put).
        for dest, extra, want in ((f"{mnt}/conf", "", "No space left on device"),
                                  (f"{mnt}/new", f"ansible_remote_tmp={mnt}/tmp", "disk full: no space left for")):
            p = start(lab, "-e", f"target=target1 src={src} dest={dest} {extra}", book="copy_one.yml")
            out = finish(p)
            assert recap(out)["target1"][3] == 1, out
            m = re.search(r"^fatal: \[target1\]: FAILED! => (\{.*\})$", out, re.M)
            assert m, out
            msg = json.loads(m[1])["msg"]
            print(f"full disk: {msg}")
            assert want in msg and mnt in msg, msg
            assert ssh(lab, "target1", f"cat {mnt}/conf; find {mnt} -mindepth 1 ! -path {mnt}/tmp").stdout \
                == f"old\n{mnt}/conf\n"
    finally:
        ssh(lab, "target1", f"umount {mnt}; rmdir {mnt}")


def test_bad_configuration_gives_clear_errors_naming_host_and_hop(lab, tmp_path):
    # A known_hosts where target2's address carries another host's key.
    lines = Path(lab["known_hosts"]).read_text().splitlines()
    t2 = lab["hosts"]["target2"]["address"]
    other = next(l for l in lines if l.startswith("target3,"))
    swapped = tmp_path / "known_hosts"
    swapped.write_text("\n".join([l for l in lines if not l.startswith("target2,")]
                                 + [t2 + " " + other.split(" ", 1)[1]]) + "\n")
    stranger = tmp_path / "id_stranger"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger)
    b1 = lab["hosts"]["bastion1"]["address"]
    inv = tmp_path / "inventory.yml"
    inv.write_text(Path(lab["inventory"]).read_text() + f"""
    broken:
      hosts:
        wronguser: {{ansible_host: "{lab['hosts']['target1']['address']}", mitogen_via: bastion1,
                     ansible_user: nosuchuser}}
        wrongkey: {{ansible_host: "{b1}", ansible_ssh_private_key_file: "{stranger}",
                    ansible_ssh_common_args: "-o UserKnownHostsFile={lab['known_hosts']} -o IdentitiesOnly=yes"}}
        swappedkey: {{ansible_host: "{t2}", mitogen_via: bastion1,
                      ansible_ssh_common_args: "-o UserKnownHostsFile={swapped} -o StrictHostKeyChecking=yes"}}
        nopython: {{ansible_host: "{lab['hosts']['target4']['address']}", mitogen_via: bastion2,
                    ansible_python_interpreter: /usr/bin/python3-missing}}
        loop1: {{ansible_host: "{lab['hosts']['target3']['address']}", mitogen_via: loop2}}
        loop2: {{ansible_host: "{lab['hosts']['target4']['address']}", mitogen_via: loop1}}
""")
    t0 = time.monotonic()
    out = ""
    # nopython alone: in the same run its address would share target4's
    # agent (one interpreter per host and account), and only the module's
    # interpreter would be missing, as in vanilla.
    for pattern in ("targets:broken:!nopython", "nopython"):
        p = subprocess.run([str(VENV / "ansible"), "-i", str(inv), pattern, "-m", "ansible.builtin.ping",
                            "-o", "-T", "10"], env=env_for("arbor"), capture_output=True, text=True, timeout=300)
        out += p.stdout + p.stderr
    took = time.monotonic() - t0
    lines = {l.split(" | ")[0]: l for l in out.splitlines() if " | " in l}
    print(f"{took:.1f} s")
    for t in TARGETS:
        assert "SUCCESS" in lines[t], out
    want = {
        "wronguser": ("UNREACHABLE", ["wronguser", "bastion1", "Permission denied"]),
        "wrongkey": ("UNREACHABLE", ["wrongkey", "Permission denied"]),
        "swappedkey": ("UNREACHABLE", ["swappedkey", "bastion1", "HOST IDENTIFICATION HAS CHANGED"]),
        "nopython": ("UNREACHABLE", ["nopython", "bastion2", "/usr/bin/python3-missing"]),
        "loop1": ("UNREACHABLE", ["loop1", "loop2", "cycle"]),
        "loop2": ("UNREACHABLE", ["loop1", "loop2", "cycle"]),
    }
    for host, (status, words) in want.items():
        line = lines[host]
        print(line[:400])
        assert status in line, line
        for w in words:
            assert w in line, (w, line)
    assert took < 60, took


def test_a_wan_held_under_a_large_fetch_ends_the_far_side_too(lab, tmp_path, monkeypatch):
    """The relay on the bastion is busy pushing a fetch up when the WAN dies:
    its queue toward the controller fills and stops moving, and it must
    still end within the keepalive (not wait for TCP's own timeout)."""
    keepalive = 6
    monkeypatch.setenv("ARBOR_KEEPALIVE_SECS", str(keepalive))
    assert ssh(lab, "target1", "head -c 300M /dev/urandom > /tmp/arbor-fetch-big.bin").returncode == 0
    run_dir = tmp_path / "run"
    d = start_daemon(run_dir, open(tmp_path / "daemon.log", "wb"))
    try:
        api = Api(run_dir / "sock")
        api.send({"op": "fetch", "chain": lab_chain(lab, "target1"), "path": "/tmp/arbor-fetch-big.bin"})
        head, _ = api.recv()
        assert head.get("streamed"), head
        got, end = [0], {}

        def read():
            while True:
                msg, blob = api.recv()
                if msg.get("op") != "data":
                    end.update(msg, at=time.monotonic())
                    return
                got[0] += len(blob)

        th = threading.Thread(target=read, daemon=True)
        th.start()
        while got[0] < 20 << 20:
            time.sleep(0.05)
        run(LAB / "wan", "set", "--loss-pct", "100")
        t0 = time.monotonic()
        th.join(keepalive + 15)
        assert "error" in end and "bastion1" in end["error"], end
        print(f"fetch failed {end['at'] - t0:.1f} s after the cut, {got[0] >> 20} MiB in: {end['error']}")
        procs = wait_gone(lab, keepalive + 8)
        print(f"far side gone {time.monotonic() - t0:.1f} s after the cut")
        assert not any_arbor(procs), procs
    finally:
        run(LAB / "wan", "set", "--loss-pct", "0")
        d.terminate()
        d.wait(timeout=15)
        ssh(lab, "target1", "rm -f /tmp/arbor-fetch-big.bin")
