"""deploy/lab end to end: real namespaces, real sshd, real packets, real ansible.

Each test brings up the lab it needs (a few tenths of a second) and the
module ends with `down`, asserting nothing is left. Needs root.
"""

import json
import os
import re
import socket
import statistics
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "deploy" / "lab"
VENV_BIN = REPO / ".venv" / "bin"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def run(*args, check=True, timeout=120, **kw):
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                         timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def up(*flags):
    res = run(LAB / "up", *flags)
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    return run_dir, json.loads((run_dir / "lab.json").read_text())


def ssh(lab, *args, jump=None, timeout=30):
    cmd = ["ssh", "-F", lab["ssh_config"]]
    if jump:
        cmd += ["-J", jump]
    return run(*cmd, *args, check=False, timeout=timeout)


def ping_rtts_ms(addr, count=12, interval=0.2):
    res = run("ping", "-n", "-c", count, "-i", interval, addr, check=False)
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", res.stdout)], res.stdout


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
s.settimeout(30)
for _ in range(int(sys.argv[2])):
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""


def udp_rtts_ms(lab, count=10):
    """Round trips of UDP datagrams to an echo server on bastion1."""
    h = lab["hosts"]["bastion1"]
    server = subprocess.Popen(["ip", "netns", "exec", h["netns"], "python3", "-c", UDP_ECHO,
                               h["address"], str(count)])
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        rtts = []
        for i in range(count):
            t0 = time.monotonic()
            s.sendto(b"x%d" % i, (h["address"], 9999))
            try:
                if s.recvfrom(2048)[0] == b"x%d" % i:
                    rtts.append((time.monotonic() - t0) * 1e3)
            except socket.timeout:
                pass  # the server may still be starting
            time.sleep(0.05)
        return rtts
    finally:
        server.kill()
        server.wait()


def wan(*args):
    return json.loads(run(LAB / "wan", *args).stdout)


def iperf_mbit(lab, reverse=False, seconds=8):
    """Receiver-side TCP goodput between the controller and bastion1."""
    ns = lab["hosts"]["bastion1"]["netns"]
    server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addr = lab["hosts"]["bastion1"]["address"]
        for _ in range(50):
            probe = run("iperf3", "-c", addr, "-t", seconds, "-J", *(["-R"] if reverse else []),
                        check=False, timeout=seconds + 30)
            if probe.returncode == 0:
                data = json.loads(probe.stdout)
                return data["end"]["sum_received"]["bits_per_second"] / 1e6
            time.sleep(0.1)  # the server may not be listening yet
        raise AssertionError(f"iperf3 failed: {probe.stdout[-500:]} {probe.stderr}")
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module", autouse=True)
def lab_down_at_end():
    yield
    run(LAB / "down")
    assert_nothing_left()


def assert_nothing_left():
    netns = run("ip", "netns", "list").stdout
    assert not [l for l in netns.splitlines() if l.startswith("arb-")], netns
    links = run("ip", "-o", "link").stdout
    assert " arb" not in links, links
    routes = run("ip", "route", "show", "type", "unreachable").stdout
    assert "10.241." not in routes and "10.242." not in routes and "10.240." not in routes, routes
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "arbor-lab" not in mounts and "/run/netns/arb-" not in mounts
    procs = run("ps", "-eo", "pid,args").stdout
    assert "/run/arbor-lab" not in procs, procs
    assert not Path("/run/arbor-lab").exists()
    assert not Path("/sys/fs/cgroup/cpuacct/arbor-lab").exists()


def test_default_up_writes_the_run_dir_and_inventories():
    run_dir, lab = up()
    assert lab["run_dir"] == str(run_dir)
    roles = [h["role"] for h in lab["hosts"].values()]
    assert roles.count("bastion") == 1 and roles.count("target") == 3
    for f in ("lab.json", "ssh_config", "known_hosts", "inventory.yml", "inventory-vanilla.yml"):
        assert (run_dir / f).is_file(), f
    assert Path(lab["wan"]["stats_path"]).is_file()
    assert json.loads(Path(lab["wan"]["stats_path"]).read_text())["settings"]["rate_bps"] == 0
    # Both inventories parse with real ansible and say how targets are reached.
    inv = json.loads(run(VENV_BIN / "ansible-inventory", "-i", lab["inventory"], "--list").stdout)
    tvars = inv["_meta"]["hostvars"]["target3"]
    assert tvars["mitogen_via"] == "bastion1"
    assert tvars["ansible_host"] == lab["hosts"]["target3"]["address"]
    inv = json.loads(run(VENV_BIN / "ansible-inventory", "-i", lab["inventory_vanilla"], "--list").stdout)
    assert "ProxyJump=bastion1" in inv["_meta"]["hostvars"]["target3"]["ansible_ssh_common_args"]
    # Every host has its own home with Debian's dot files, not the machine's /root.
    res = ssh(lab, "target1", "cat ~/.bashrc; hostname", jump="bastion1")
    assert res.returncode == 0, res.stderr
    assert "pyenv" not in res.stdout and res.stdout.split()[-1] == "target1"
    # The controller's private key and the hosts' secrets are masked on
    # hosts; the public known_hosts is readable there.
    res = ssh(lab, "bastion1", f"ls {run_dir}/controller {run_dir}/hosts; ls ~/.ssh; "
                               f"grep -c . {run_dir}/known_hosts")
    assert res.returncode == 0, res.stderr
    assert "id_" not in res.stdout, res.stdout  # no private key on the bastion by default
    assert "bastion1" not in res.stdout.split()  # hosts/ is empty there
    assert res.stdout.split()[-1] == "4"  # 1 bastion + 3 targets
    assert Path(lab["private_key"]).parent.stat().st_mode & 0o777 == 0o700
    assert lab["settings"]["key_on_bastions"] is False


def test_target_needs_the_hop():
    _, lab = up("--targets", "3")
    direct = ssh(lab, "target3", "true", timeout=20)
    assert direct.returncode == 255
    assert "No route to host" in direct.stderr or "unreachable" in direct.stderr.lower()
    hop = ssh(lab, "target3", "hostname", jump="bastion1")
    assert hop.returncode == 0, hop.stderr
    assert hop.stdout.strip() == "target3"
    # Host keys are checked: an unknown key is refused, as OpenSSH does.
    res = run("ssh", "-F", lab["ssh_config"], "-o", "UserKnownHostsFile=/dev/null",
              "bastion1", "true", check=False)
    assert res.returncode == 255 and "Host key verification failed" in res.stderr


def test_wan_delay_rate_loss_and_counters():
    _, lab = up("--wan-delay-ms", "50", "--wan-rate-mbit", "10")
    addr = lab["hosts"]["bastion1"]["address"]
    rtts, out = ping_rtts_ms(addr)
    # The first ping also pays ARP across the WAN; the median is the link's RTT.
    rtt = statistics.median(rtts)
    assert abs(rtt - 100) <= 10, out
    # UDP crosses the same path and sees the same delay.
    rtts = udp_rtts_ms(lab)
    assert len(rtts) >= 5 and abs(statistics.median(rtts) - 100) <= 10, rtts

    wan("reset")
    down_rate = iperf_mbit(lab, reverse=True)
    up_rate = iperf_mbit(lab)
    for rate in (up_rate, down_rate):
        assert abs(rate - 10) <= 1.5, (up_rate, down_rate)
    stats = wan("stats")
    # 2 × 8 s at 10 Mbit/s is about 20 MB across the link, split by direction.
    assert stats["up"]["bytes"] > 8e6 and stats["down"]["bytes"] > 8e6, stats
    assert stats["up"]["packets"] > 5000 and stats["down"]["packets"] > 5000
    before = wan("reset")
    assert before["up"]["bytes"] >= stats["up"]["bytes"]  # reset returns what it zeroed
    after = wan("stats")
    assert after["up"]["bytes"] < 10_000 and after["seconds_since_reset"] < 5

    # Live changes, per direction: 30 + 10 ms.
    wan("set", "--delay-up-ms", "30", "--delay-down-ms", "10", "--rate-mbit", "0")
    rtt = statistics.median(ping_rtts_ms(addr, count=8)[0])
    assert abs(rtt - 40) <= 4, rtt
    # 10 % loss each way loses about 19 % of pings.
    wan("set", "--delay-ms", "1", "--loss-pct", "10")
    wan("reset")
    rtts, out = ping_rtts_ms(addr, count=200, interval=0.005)
    lost = 1 - len(rtts) / 200
    assert 0.08 <= lost <= 0.32, out
    stats = wan("stats")
    assert stats["up"]["dropped_loss"] + stats["down"]["dropped_loss"] > 0
    assert stats["settings"]["loss_pct"] == 10
    wan("set", "--loss-pct", "0")


def test_python_absent_on_masked_bastion_present_on_targets():
    _, lab = up("--bastions", "2", "--targets", "2", "--no-python-bastion")
    assert lab["hosts"]["bastion2"]["python3"] is False
    for b in ("bastion1", "bastion2"):
        res = ssh(lab, b, "command -v python3 python3.11; ls /usr/bin/python3.11; "
                          "/usr/bin/python3 -c 1; echo END")
        assert res.stdout.strip() == "END", res.stdout
        assert "No such file" in res.stderr
    res = ssh(lab, "target4", "python3 -c 'import sys; print(sys.version_info[0])'", jump="bastion2")
    assert res.returncode == 0 and res.stdout.strip() == "3", res.stderr
    # Targets of bastion2 are behind bastion2 only.
    res = ssh(lab, "target4", "hostname", jump="bastion1")
    assert res.returncode != 0


def test_depth_two_chain_with_real_ansible():
    _, lab = up("--depth", "2", "--racks", "2", "--targets", "4")
    t = lab["hosts"]["target4"]
    assert t["via_chain"] == ["bastion1", "rack2"] and t["via"] == "rack2"
    res = ssh(lab, "target4", "hostname", jump="bastion1,rack2")
    assert res.returncode == 0 and res.stdout.strip() == "target4", res.stderr
    # vanilla ansible through the generated ProxyJump inventory
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_PIPELINING="True")
    res = run(VENV_BIN / "ansible", "-i", lab["inventory_vanilla"], "targets", "-m",
              "ansible.builtin.command", "-a", "hostname", "-o", env=env, check=False, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    for i in range(1, 5):
        assert re.search(rf"^target{i} \| CHANGED \| rc=0 \| \(stdout\) target{i}$", res.stdout, re.M), res.stdout


def test_fifty_targets_behind_one_bastion():
    _, lab = up("--targets", "50")
    procs = []
    for i in range(1, 51):
        procs.append(subprocess.Popen(
            ["ssh", "-F", lab["ssh_config"], "-J", "bastion1", f"target{i}", "hostname"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    names = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        names.add(out.strip())
    assert names == {f"target{i}" for i in range(1, 51)}
    cpu = json.loads(run(LAB / "cpu").stdout)
    assert cpu["bastion1"] > 0 and all(cpu[f"target{i}"] > 0 for i in range(1, 51))


def test_up_and_down_are_idempotent_and_survive_a_crash():
    up("--targets", "2")
    up("--targets", "2")  # twice in a row: the second replaces the first
    # A crash: processes die and the run dir vanishes, namespaces stay.
    wan_pids = run("ip", "netns", "pids", "arb-wan").stdout.split()
    run("kill", "-9", *wan_pids)
    run("rm", "-rf", "/run/arbor-lab")
    run_dir, lab = up("--targets", "2")
    assert ssh(lab, "target2", "true", jump="bastion1").returncode == 0
    run(LAB / "down")
    assert_nothing_left()
    run(LAB / "down")  # twice in a row
    assert_nothing_left()
