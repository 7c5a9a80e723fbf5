"""arbor's side-by-side benchmark: one playbook, several connection layers, interleaved.

    deploy/bench/run --workload seed:50x50|fleet|file3m --modes floor,vanilla,mitogen
                     --reps N [--targets N] [--wan-delay-ms D] --out DIR

It brings up the lab (deploy/lab) with the given settings, then runs the
workload's playbook in every mode, interleaved (A B C, B C A, ...), `reps`
times each, with a real ansible-playbook. Per run it records wall time, CPU
seconds of the controller side (a cgroup holding ansible-playbook and all it
spawns, ssh masters included) and of bastions, racks and targets (their
sshd cgroups), WAN bytes each way (the emulator's counters), and the play
recap, which must be all-ok: a run with a failed or unreachable host is
recorded as failed and never timed as a success.

Modes:
  floor    a connection plugin of the harness that answers every call at
           once: Ansible's own controller cost, the limit under any layer
  vanilla  ansible-core, pipelining, ControlMaster/ControlPersist, ProxyJump
  mitogen  mitogen from PyPI, strategy mitogen_linear, targets via mitogen_via;
           the hop's ssh uses a copy of the lab key on the bastion (lab
           --key-on-bastions), Mitogen's fastest common setup
  mitogen-agent  the same, but the hop authenticates with the controller's
           forwarded ssh-agent, as arbor does (one WAN round trip per target)
  arbor    arbor, switched on by one variable (ANSIBLE_CONNECTION_PLUGINS),
           targets via mitogen_via in the same inventory as mitogen; the
           controller daemon and its ssh processes count as controller CPU
  arbor-persist  arbor with ARBOR_PERSIST: every measured run is a second
           run, reusing the tree a warm-up run left (kept.py); the kept
           daemon's CPU during a run counts as that run's controller CPU
  arbor-quic, arbor-quic-persist  the same with ARBOR_TRANSPORT=quic: the
           bastion's relay link moves to QUIC once ssh has started it

Every mode runs with a tuned ansible.cfg (pipelining, ControlPersist) unless
--ansible-defaults is given, which leaves both at Ansible's defaults (the
ansible.cfg sets only forks, and the strategy for Mitogen). A mode written
MODE:defaults or MODE:tuned picks its own, so one run can hold both.
--venv names another virtualenv's ansible-core (and Mitogen, if installed).
"""

import argparse
import datetime
import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "deploy" / "lab"))
import lab  # noqa: E402  (deploy/lab/lab.py)
import teardown  # noqa: E402  (deploy/lab/teardown.py: cgroups, processes)
sys.path.insert(0, str(HERE))
from kept import KeptTree  # noqa: E402

VENV = REPO / ".venv"
CFG_STYLES = ("tuned", "defaults")
RUN_TIMEOUT_S_DEFAULT = 1800
# How long a run's processes may take to end after ansible-playbook does
# before they count as left over.
TEARDOWN_WAIT_S = 5.0
PAYLOAD_BYTES = 3 * 1024 * 1024
METRICS = ["wall_s", "cpu_controller_s", "cpu_bastions_s", "cpu_racks_s", "cpu_targets_s",
           "wan_up_bytes", "wan_down_bytes"]
RECAP = re.compile(
    r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
    r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)
# arbor-base: the arbor of another checkout (ARBOR_BENCH_BASE=DIR, with its
# own release build), to compare a change with the code before it.
ALL_MODES = ("floor", "vanilla", "mitogen", "mitogen-agent", "arbor", "arbor-base", "arbor-persist",
             "arbor-quic", "arbor-quic-persist")
ARBOR_BIN = REPO / "target" / "release" / "arbor"
GLUE = REPO / "ansible-glue" / "plugins" / "connection"


class BenchError(Exception):
    pass


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- workloads


def parse_workload(spec):
    """'seed:FILESxEDITS' | 'fleet' | 'file3m' -> (name, playbook, extra vars)."""
    name, _, arg = spec.partition(":")
    if name == "seed":
        m = re.fullmatch(r"(\d+)x(\d+)", arg or "50x50")
        if not m:
            raise BenchError(f"seed wants FILESxEDITS, e.g. seed:50x50, got {spec!r}")
        return "seed", HERE / "workloads" / "seed.yml", {"files": int(m[1]), "edits": int(m[2])}
    if name in ("fleet", "file3m") and not arg:
        return name, HERE / "workloads" / f"{name}.yml", {}
    raise BenchError(f"unknown workload {spec!r}: seed:FxE, fleet or file3m")


def make_payload(out):
    path = out / "payload-3m.bin"
    if not path.exists():
        path.write_bytes(random.Random(3).randbytes(PAYLOAD_BYTES))
    return path


# ---------------------------------------------------------------- modes


def split_mode(mode, default_style):
    """'arbor:defaults' -> ('arbor', 'defaults'); 'arbor' -> ('arbor', default_style)."""
    base, _, style = mode.partition(":")
    style = style or default_style
    if base not in ALL_MODES:
        raise BenchError(f"unknown mode {base!r}; known: {', '.join(ALL_MODES)}")
    if style not in CFG_STYLES:
        raise BenchError(f"mode {mode!r}: the style after ':' is {' or '.join(CFG_STYLES)}")
    return base, style


def site_packages(venv):
    return next((venv / "lib").glob("python3*/site-packages"))


def ansible_cfg(base, style, forks, venv):
    lines = ["[defaults]", f"forks = {forks}"]
    if style == "tuned":
        lines += [
            "host_key_checking = True",
            "retry_files_enabled = False",
            "deprecation_warnings = False",
            "timeout = 30",
        ]
    if base.startswith("mitogen"):
        lines += [f"strategy_plugins = {site_packages(venv) / 'ansible_mitogen/plugins/strategy'}",
                  "strategy = mitogen_linear"]
    if base == "floor":
        lines.append(f"connection_plugins = {HERE / 'plugins/connection'}")
    if style == "defaults":
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "[connection]",
        "pipelining = True",
        "",
        "[ssh_connection]",
        "pipelining = True",
        "ssh_args = -C -o ControlMaster=auto -o ControlPersist=60s",
    ]
    return "\n".join(lines) + "\n"


def mode_setup(mode, style, labinfo, out, forks, agent_sock, venv):
    """(ansible.cfg path, inventory, extra args, extra env) for one mode."""
    cfg = out / "cfg" / f"{mode}-{style}.cfg"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(ansible_cfg(mode, style, forks, venv))
    if mode == "vanilla":
        return cfg, labinfo["inventory_vanilla"], [], {}
    if mode == "floor":
        return cfg, labinfo["inventory_vanilla"], ["-e", "ansible_connection=arbor_floor"], {}
    if mode == "mitogen":
        if not labinfo["settings"].get("key_on_bastions"):
            raise BenchError("mode mitogen needs a lab with --key-on-bastions")
        return cfg, labinfo["inventory"], [], {}
    if mode == "mitogen-agent":
        return cfg, labinfo["inventory"], [], {"SSH_AUTH_SOCK": str(agent_sock)}
    if mode in ("arbor", "arbor-persist", "arbor-quic", "arbor-quic-persist"):
        if not ARBOR_BIN.exists():
            raise BenchError(f"{ARBOR_BIN} not built: run deploy/setup")
        env = {"ANSIBLE_CONNECTION_PLUGINS": str(GLUE), "ARBOR_BIN": str(ARBOR_BIN)}
        if "quic" in mode:
            env["ARBOR_TRANSPORT"] = "quic"
        return cfg, labinfo["inventory"], [], env
    if mode == "arbor-base":
        base = Path(os.environ.get("ARBOR_BENCH_BASE") or "/nonexistent")
        binary = base / "target" / "release" / "arbor"
        if not binary.exists():
            raise BenchError(f"mode arbor-base: ARBOR_BENCH_BASE must name a checkout with a release "
                             f"build (no {binary})")
        return cfg, labinfo["inventory"], [], {
            "ANSIBLE_CONNECTION_PLUGINS": str(base / "ansible-glue" / "plugins" / "connection"),
            "ARBOR_BIN": str(binary)}
    raise BenchError(f"unknown mode {mode!r}; known: {', '.join(ALL_MODES)}")


def start_agent(out, key):
    """An ssh-agent holding the lab key, for modes whose hops use a forwarded agent."""
    sock = Path(tempfile.mkdtemp(prefix="arbor-bench-agent-")) / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.02)
    res = subprocess.run(["ssh-add", "-q", key], env=dict(os.environ, SSH_AUTH_SOCK=str(sock)),
                         capture_output=True, text=True)
    if res.returncode != 0:
        proc.kill()
        raise BenchError(f"ssh-add: {res.stderr.strip()}")
    return proc, sock


# ---------------------------------------------------------------- one run


def wan_ctl(labinfo, verb):
    res = subprocess.run([labinfo["wan"]["binary"], "ctl", "--control",
                          labinfo["wan"]["control_socket"], verb],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def host_cpu(labinfo):
    by_role = {"bastion": 0.0, "rack": 0.0, "target": 0.0}
    for h in labinfo["hosts"].values():
        by_role[h["role"]] += teardown.cgroup_cpu_seconds(h["cgroup"])
    return by_role


def parse_recap(text):
    return {m[1]: dict(zip(("ok", "changed", "unreachable", "failed", "skipped", "rescued",
                             "ignored"), map(int, m.groups()[1:])))
            for m in RECAP.finditer(text)}


def check_recap(recap, rc, expected_hosts):
    """None if the run is all-ok, else what went wrong, naming hosts first."""
    unreachable = sorted(h for h, r in recap.items() if r["unreachable"])
    failed = sorted(h for h, r in recap.items() if r["failed"])
    missing = sorted(set(expected_hosts) - set(recap))
    problems = [f"{what}: {', '.join(hosts[:5])}" + (" …" if len(hosts) > 5 else "")
                for what, hosts in (("unreachable", unreachable), ("failed", failed),
                                    ("no recap", missing)) if hosts]
    idle = sorted(h for h, r in recap.items() if r["ok"] == 0)
    if idle and not problems:
        problems.append(f"ran no task: {', '.join(idle[:5])}")
    if rc != 0:
        problems.append(f"ansible-playbook exited {rc}")
    return "; ".join(problems) or None


def controller_cgroup():
    """The cgroup that holds one run's ansible-playbook and all it spawns."""
    _, cg_root = teardown.cgroup_base()
    return cg_root.parent / "arbor-bench" / f"run-{os.getpid()}"


def wait_exact(proc, timeout):
    """`proc`'s exit status, seen the moment it exits. (Popen.wait with a
    timeout polls, sleeping up to 50 ms between looks, which put every
    wall time up to 50 ms late, on a 50 ms grid.)"""
    fd = os.pidfd_open(proc.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    return proc.wait()


def run_once(mode, rep, order, ctx):
    labinfo, out = ctx["lab"], ctx["out"]
    cfg, inventory, extra, env_extra = ctx["modes"][mode]
    venv = ctx["venv"]
    run_id = f"{rep:02d}-{order}-{mode.replace(':', '-')}"
    logfile = out / "logs" / f"{run_id}.log"
    cp_dir = Path(tempfile.mkdtemp(prefix="abcp-"))
    cg = controller_cgroup()
    cg.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ANSIBLE_CONFIG=str(cfg), ANSIBLE_SSH_CONTROL_PATH_DIR=str(cp_dir),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PATH=f"{venv / 'bin'}:{os.environ['PATH']}",
               **env_extra)
    if "SSH_AUTH_SOCK" not in env_extra:
        env.pop("SSH_AUTH_SOCK", None)  # only the modes that ask for an agent get one
    cmd = [str(venv / "bin" / "ansible-playbook"), "-i", inventory, str(ctx["playbook"]),
           *[a for k, v in ctx["extra_vars"].items() for a in ("-e", f"{k}={v}")], *extra]

    kept = ctx["kept"].get(mode)
    if kept is not None:
        env.update(kept.env)
        try:
            kept.warm_up(cmd, env, out / "logs" / f"{mode.replace(':', '-')}-warm-up.log")
        except RuntimeError as e:
            raise BenchError(f"{mode}: {e}")
    kept_cpu0 = kept.cpu() if kept else 0.0
    wan_ctl(labinfo, "reset")
    cpu0 = host_cpu(labinfo)
    t0 = time.monotonic()
    with open(logfile, "w") as f:
        proc = subprocess.Popen(["sh", "-c", lab.JOIN_CGROUP, str(cg), *cmd], env=env,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = wait_exact(proc, ctx["run_timeout_s"])
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    wall = time.monotonic() - t0
    wan = wan_ctl(labinfo, "stats")
    cpu1 = host_cpu(labinfo)
    # What the run leaves on the controller: a layer's own teardown (arbor's
    # daemon ends its tree when it sees ansible-playbook gone) is waited for
    # up to TEARDOWN_WAIT_S and timed; what is still there then is left over
    # (ssh ControlPersist masters, stray helpers) and killed.
    t_end = time.monotonic()
    at_exit = len(teardown.cgroup_pids(cg))
    while teardown.cgroup_pids(cg) and time.monotonic() - t_end < TEARDOWN_WAIT_S:
        time.sleep(0.01)
    teardown_s = time.monotonic() - t_end
    leftover = teardown.cgroup_pids(cg)
    teardown.kill_pids(leftover)
    cpu_controller = teardown.cgroup_cpu_seconds(cg)
    if kept is not None:
        cpu_controller += kept.cpu() - kept_cpu0
    teardown.rmdir_retry(cg)
    shutil.rmtree(cp_dir, ignore_errors=True)

    text = logfile.read_text(errors="replace")
    recap = parse_recap(text)
    error = "timed out" if timed_out else check_recap(recap, rc, ctx["targets"])
    return {
        "workload": ctx["workload_spec"], "mode": mode, "rep": rep, "order": order,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ok": error is None, "error": error, "rc": rc,
        "wall_s": round(wall, 3),
        "cpu_controller_s": round(cpu_controller, 3),
        "cpu_bastions_s": round(cpu1["bastion"] - cpu0["bastion"], 3),
        "cpu_racks_s": round(cpu1["rack"] - cpu0["rack"], 3),
        "cpu_targets_s": round(cpu1["target"] - cpu0["target"], 3),
        "wan_up_bytes": wan["up"]["bytes"], "wan_down_bytes": wan["down"]["bytes"],
        "wan_up_packets": wan["up"]["packets"], "wan_down_packets": wan["down"]["packets"],
        "wan_dropped": sum(wan[d]["dropped_loss"] + wan[d]["dropped_queue"] for d in ("up", "down")),
        "controller_processes_at_exit": at_exit,
        "controller_teardown_s": round(teardown_s, 3) if not leftover else None,
        "controller_leftover_processes": len(leftover),
        "hosts": len(recap), "recap": recap, "log": str(logfile.relative_to(out)),
        **({"kept_tree_alive": kept.alive()} if kept is not None else {}),
    }


# ---------------------------------------------------------------- summary


def summarize(runs, config):
    modes = {}
    for mode in config["modes"]:
        mine = [r for r in runs if r["mode"] == mode]
        ok = [r for r in mine if r["ok"]]
        entry = {"runs_ok": len(ok), "runs_failed": len(mine) - len(ok),
                 "errors": sorted({r["error"] for r in mine if not r["ok"]})}
        for m in METRICS:
            vals = [r[m] for r in ok]
            if vals:
                entry[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        modes[mode] = entry
    ratios = {}
    for base in modes:
        if "wall_s" not in modes[base]:
            continue
        for mode, entry in modes.items():
            if mode == base or "wall_s" not in entry:
                continue
            ratios[f"{mode}/{base}"] = {
                m: round(entry[m]["median"] / modes[base][m]["median"], 3)
                for m in METRICS if m in entry and modes[base][m]["median"] > 0}
    return {"config": config, "modes": modes, "ratios": ratios}


def human_bytes(n):
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def ratio_bases(modes):
    """The modes others are compared with: vanilla's and Mitogen's, and
    arbor's tuned run when arbor also runs with Ansible's defaults."""
    bases = [m for m in modes if m.partition(":")[0] in ("vanilla", "mitogen", "arbor-base")]
    arbors = [m for m in modes if m.partition(":")[0] == "arbor"]
    if len(arbors) > 1:
        bases += [m for m in arbors if m.endswith(":tuned")]
    return bases


def markdown(summary):
    c = summary["config"]
    bases = ratio_bases(list(summary["modes"]))
    lines = [
        (f"### {c['workload']} — localhost (ansible_connection=local; target work counts as controller CPU)"
         if c.get("local") else
         f"### {c['workload']} — {c['targets']} target(s) behind {c['bastions']} bastion(s), "
         f"WAN {c['wan_delay_ms']:g} ms one-way"
         + (f", {c['wan_rate_mbit']:g} Mbit/s" if c["wan_rate_mbit"] else "")
         + (f", {c['wan_loss_pct']:g} % loss" if c.get("wan_loss_pct") else ""))
        + f", forks={c['forks']}",
        "",
        f"{c['reps']} interleaved reps per mode; median (min–max). "
        f"ansible-core {c['versions']['ansible_core']} (Python {c['versions'].get('python', '?')}), "
        f"mitogen {c['versions']['mitogen']}, {c['date']}. "
        + ("ansible.cfg: Ansible's defaults (no pipelining) unless a mode says :tuned."
           if c.get("ansible_defaults") else
           "ansible.cfg: pipelining and ControlPersist on unless a mode says :defaults."),
        "",
        "| mode | ok runs | wall s | controller CPU s | bastion CPU s | target CPU s "
        "| WAN up | WAN down |" + "".join(f" vs {b} (wall, ctl CPU) |" for b in bases),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(bases),
    ]
    for mode, e in summary["modes"].items():
        def cell(m, fmt=lambda v: f"{v:.2f}"):
            if m not in e:
                return "–"
            v = e[m]
            return f"{fmt(v['median'])} ({fmt(v['min'])}–{fmt(v['max'])})"
        def ratio(base):
            if mode == base:
                return "1×" if "wall_s" in e else "–"
            r = summary["ratios"].get(f"{mode}/{base}", {})
            if "wall_s" not in r:
                return "–"
            cpu = r.get("cpu_controller_s")
            return f"{r['wall_s']:.2f}×" + (f" ({cpu:.2f}×)" if cpu is not None else "")
        lines.append(
            f"| {mode} | {e['runs_ok']}/{e['runs_ok'] + e['runs_failed']} | {cell('wall_s')} "
            f"| {cell('cpu_controller_s')} | {cell('cpu_bastions_s')} | {cell('cpu_targets_s')} "
            f"| {human_bytes(e['wan_up_bytes']['median']) if 'wan_up_bytes' in e else '–'} "
            f"| {human_bytes(e['wan_down_bytes']['median']) if 'wan_down_bytes' in e else '–'} "
            f"|" + "".join(f" {ratio(b)} |" for b in bases))
    errors = [(m, e["errors"]) for m, e in summary["modes"].items() if e["errors"]]
    for mode, errs in errors:
        lines.append(f"\nFailed {mode} runs: {'; '.join(errs)}")
    return "\n".join(lines) + "\n"


def chart(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, e in summary["modes"].items() if "wall_s" in e]
    if not modes:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    c = summary["config"]
    fig.suptitle(f"{c['workload']}: {c['targets']} target(s), WAN {c['wan_delay_ms']:g} ms one-way "
                 f"(median of {c['reps']}, bars min–max)")
    e = summary["modes"]
    wall = [e[m]["wall_s"]["median"] for m in modes]
    err = [[w - e[m]["wall_s"]["min"] for m, w in zip(modes, wall)],
           [e[m]["wall_s"]["max"] - w for m, w in zip(modes, wall)]]
    axes[0].bar(modes, wall, yerr=err, capsize=4, color="#4878a8")
    axes[0].set_ylabel("wall time, s")
    bottom = [0.0] * len(modes)
    for metric, label, color in (("cpu_controller_s", "controller", "#4878a8"),
                                 ("cpu_bastions_s", "bastions", "#e0a030"),
                                 ("cpu_targets_s", "targets", "#60a060")):
        vals = [e[m][metric]["median"] for m in modes]
        axes[1].bar(modes, vals, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set_ylabel("CPU, s")
    axes[1].legend()
    up = [e[m]["wan_up_bytes"]["median"] / 1e6 for m in modes]
    down = [e[m]["wan_down_bytes"]["median"] / 1e6 for m in modes]
    axes[2].bar(modes, up, label="up", color="#a05050")
    axes[2].bar(modes, down, bottom=up, label="down", color="#d09090")
    axes[2].set_ylabel("WAN MB")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main


def versions(venv):
    probe = ("import importlib.metadata as m, sys, json\n"
             "def v(n):\n"
             "    try:\n        return m.version(n)\n"
             "    except Exception:\n        return None\n"
             "print(json.dumps({'ansible_core': v('ansible-core'), 'mitogen': v('mitogen'),"
             " 'python': sys.version.split()[0]}))")
    got = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    if got.returncode != 0:
        raise BenchError(f"{venv}: not a virtualenv with Python: {got.stderr.strip()}")
    found = json.loads(got.stdout)
    if not found["ansible_core"]:
        raise BenchError(f"{venv}: ansible-core is not installed there")
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    return dict(found, openssh=ssh, kernel=os.uname().release, arbor_git=rev)


def main(argv=None):
    p = argparse.ArgumentParser(prog="deploy/bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, help="seed:FILESxEDITS | fleet | file3m")
    p.add_argument("--modes", default="floor,vanilla,mitogen")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--targets", type=int, default=None,
                   help="targets behind each bastion (default: 1 for seed, else 10)")
    p.add_argument("--bastions", type=int, default=1)
    p.add_argument("--wan-delay-ms", type=float, default=0.0)
    p.add_argument("--wan-rate-mbit", type=float, default=0.0, help="0 = unlimited")
    p.add_argument("--wan-loss-pct", type=float, default=0.0, help="packets lost each way, in percent")
    p.add_argument("--forks", type=int, default=None, help="default: max(targets, 5), at most 50")
    p.add_argument("--run-timeout-s", type=float, default=RUN_TIMEOUT_S_DEFAULT)
    p.add_argument("--keep-lab", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--reuse-lab", action="store_true",
                   help="run against the lab that is up now, as it is (implies --keep-lab)")
    p.add_argument("--local", action="store_true",
                   help="run on localhost with ansible_connection=local (the lab is not used)")
    p.add_argument("--ansible-defaults", action="store_true",
                   help="ansible.cfg at Ansible's defaults (no pipelining, no ssh_args) for every "
                        "mode not written MODE:tuned")
    p.add_argument("--venv", type=Path, default=VENV,
                   help="the virtualenv whose ansible-playbook runs (default: the repo's .venv)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    try:
        name, playbook, extra_vars = parse_workload(args.workload)
        style = "defaults" if args.ansible_defaults else "tuned"
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        styled = {m: split_mode(m, style) for m in modes}
        venv = args.venv.resolve()
        found = versions(venv)
        if args.reps < 1:
            raise BenchError("--reps must be at least 1")
        targets = args.targets if args.targets is not None else (1 if name == "seed" else 10)
        out = args.out.resolve()
        (out / "logs").mkdir(parents=True, exist_ok=True)
        if name == "file3m":
            extra_vars["payload"] = str(make_payload(out))

        if args.reuse_lab:
            args.keep_lab = True
            try:
                labinfo = lab.load_lab()
            except lab.LabError as e:
                raise BenchError(str(e))
            s = labinfo["settings"]
            targets, args.bastions = s["targets_per_bastion"], s["bastions"]
            args.wan_delay_ms, args.wan_rate_mbit = s["wan"]["delay_ms"], s["wan"]["rate_mbit"]
            args.wan_loss_pct = s["wan"].get("loss_pct", 0.0)
        else:
            up = subprocess.run(
                [str(REPO / "deploy/lab/up"), "--bastions", str(args.bastions),
                 "--targets", str(targets), "--wan-delay-ms", str(args.wan_delay_ms),
                 "--wan-rate-mbit", str(args.wan_rate_mbit), "--wan-loss-pct", str(args.wan_loss_pct),
                 *(["--key-on-bastions"] if any(b == "mitogen" for b, _ in styled.values()) else [])],
                capture_output=True, text=True)
            if up.returncode != 0:
                raise BenchError(f"lab up failed: {up.stderr.strip()}")
            labinfo = json.loads(
                (Path(up.stdout.strip().splitlines()[-1]) / "lab.json").read_text())
        forks = args.forks or min(max(targets * args.bastions, 5), 50)
        if args.local:
            # Every mode on the controller itself: Mitogen's strategy and
            # arbor's glue take over `local` as they take over `ssh`.
            local_inv = out / "local-inventory.yml"
            local_inv.write_text(json.dumps({"targets": {"hosts": {"localhost": {
                "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}}}))
            labinfo = dict(labinfo, inventory=str(local_inv), inventory_vanilla=str(local_inv))
        agent = ctx = None
        try:
            agent, agent_sock = start_agent(out, labinfo["private_key"])
            ctx = {
                "lab": labinfo, "out": out, "playbook": playbook, "extra_vars": extra_vars,
                "workload_spec": args.workload, "run_timeout_s": args.run_timeout_s,
                "targets": (["localhost"] if args.local else
                            [h for h, v in labinfo["hosts"].items() if v["role"] == "target"]),
                "venv": venv,
                "modes": {m: mode_setup(*styled[m], labinfo, out, forks, agent_sock, venv)
                          for m in modes},
                "kept": {m: KeptTree(m, controller_cgroup().parent, ARBOR_BIN)
                         for m in modes if styled[m][0].endswith("-persist")},
            }
            config = {
                "workload": args.workload, "modes": modes, "reps": args.reps, "targets": targets,
                "bastions": args.bastions, "wan_delay_ms": args.wan_delay_ms,
                "wan_rate_mbit": args.wan_rate_mbit, "wan_loss_pct": args.wan_loss_pct,
                "forks": forks, "local": args.local,
                "date": datetime.date.today().isoformat(), "versions": found,
                "ansible_defaults": args.ansible_defaults,
                "command": "deploy/bench/run " + " ".join(argv if argv is not None else sys.argv[1:]),
            }
            runs = []
            with open(out / "runs.jsonl", "w") as jl:
                for rep in range(args.reps):
                    # Rotate the order each rep so no mode always runs first.
                    order = modes[rep % len(modes):] + modes[:rep % len(modes)]
                    for i, mode in enumerate(order):
                        r = run_once(mode, rep, i, ctx)
                        runs.append(r)
                        jl.write(json.dumps(r) + "\n")
                        jl.flush()
                        log(f"rep {rep + 1}/{args.reps} {mode:8s} "
                            + (f"{r['wall_s']:7.2f} s  ctl CPU {r['cpu_controller_s']:6.2f} s  "
                               f"WAN {human_bytes(r['wan_up_bytes'])} up / "
                               f"{human_bytes(r['wan_down_bytes'])} down"
                               if r["ok"] else f"FAILED: {r['error']} (see {out / r['log']})"))
        finally:
            for m, kept in (ctx["kept"].items() if ctx else ()):
                env = dict(os.environ, ARBOR_BIN=str(ARBOR_BIN), **kept.env)
                left = kept.stop(env)
                if left:
                    log(f"{m}: {left} processes of the kept tree were left after arbor stop (killed)")
            if agent:
                agent.kill()
                agent.wait()
                shutil.rmtree(agent_sock.parent, ignore_errors=True)
            if not args.keep_lab:
                subprocess.run([str(REPO / "deploy/lab/down")], capture_output=True)
            try:
                controller_cgroup().parent.rmdir()
            except OSError:
                pass  # another bench is running, or it was never made

        summary = summarize(runs, config)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        md = markdown(summary)
        (out / "summary.md").write_text(md)
        chart(summary, out / "chart.png")
        print(md)
        log(f"wrote {out}/runs.jsonl, summary.json, summary.md, chart.png")
        failed = sum(e["runs_failed"] for e in summary["modes"].values())
        return 1 if failed else 0
    except BenchError as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
