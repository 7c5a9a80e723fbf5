"""deploy/bench end to end: the harness runs real playbooks in every mode,
interleaved, records what it measured, and never times a failed run as a success."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "deploy" / "bench" / "run"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


def bench(*args, timeout=600):
    return subprocess.run([str(RUN), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def runs(out):
    return [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def lab_down_at_end():
    yield
    subprocess.run([str(REPO / "deploy/lab/down")], check=True, capture_output=True)


def test_all_modes_interleaved_with_outputs(tmp_path):
    out = tmp_path / "smoke"
    res = bench("--workload", "seed:2x2", "--modes", "floor,vanilla,mitogen,mitogen-agent,arbor",
                "--reps", "2", "--targets", "2", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    rs = runs(out)
    assert [r["mode"] for r in rs] == ["floor", "vanilla", "mitogen", "mitogen-agent", "arbor",
                                       "vanilla", "mitogen", "mitogen-agent", "arbor", "floor"]
    for r in rs:
        assert r["ok"], r
        # temp dir, 2 copies, 2 edits, cleanup: 4 tasks, each ok on both targets
        assert set(r["recap"]) == {"target1", "target2"}
        assert all(h["ok"] == 4 and h["changed"] == 4 for h in r["recap"].values()), r["recap"]
        assert r["wall_s"] > 0 and r["cpu_controller_s"] > 0
    by_mode = {m: [r for r in rs if r["mode"] == m]
               for m in ("floor", "vanilla", "mitogen", "mitogen-agent", "arbor")}
    # What a run leaves on the controller is counted after its teardown:
    # vanilla's ControlPersist masters stay (that is what they are for);
    # arbor's daemon takes its tree down when ansible-playbook is gone.
    for r in by_mode["vanilla"]:
        assert r["controller_leftover_processes"] > 0 and r["controller_teardown_s"] is None, r
    for r in by_mode["arbor"]:
        assert r["controller_leftover_processes"] == 0 and r["controller_teardown_s"] < 5, r
    # The floor touches no host: next to no bytes cross the WAN. Its
    # targets' CPU is not zero: the run before it ends its agents and sshd
    # sessions within the floor's window (0.059 s seen after an arbor run),
    # so that bound only catches work on a scale the WAN bound would too.
    # The others cross the WAN and run on targets.
    for r in by_mode["floor"]:
        assert r["wan_up_bytes"] < 10_000 and r["cpu_targets_s"] < 0.2, r
    for r in by_mode["vanilla"] + by_mode["mitogen"] + by_mode["mitogen-agent"] + by_mode["arbor"]:
        assert r["wan_up_bytes"] > 50_000 and r["wan_down_bytes"] > 1_000, r
        assert r["cpu_targets_s"] > 0, r
    # Mitogen runs an interpreter on the bastion; vanilla only forwards through sshd.
    for r in by_mode["mitogen"] + by_mode["mitogen-agent"]:
        assert r["cpu_bastions_s"] > 0.05, r

    summary = json.loads((out / "summary.json").read_text())
    for mode in ("floor", "vanilla", "mitogen", "mitogen-agent"):
        e = summary["modes"][mode]
        assert e["runs_ok"] == 2 and e["runs_failed"] == 0
        walls = sorted(r["wall_s"] for r in by_mode[mode])
        assert e["wall_s"]["min"] == walls[0] and e["wall_s"]["max"] == walls[-1]
    assert "mitogen/vanilla" in summary["ratios"]
    table = (out / "summary.md").read_text()
    assert table.count("| floor |") == table.count("| vanilla |") == table.count("| mitogen |") == 1
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_host_makes_a_failed_run(tmp_path):
    up = subprocess.run([str(REPO / "deploy/lab/up"), "--targets", "2"], capture_output=True,
                        text=True, check=True)
    lab = json.loads((Path(up.stdout.strip().splitlines()[-1]) / "lab.json").read_text())
    # Kill target2's sshd: a real unreachable host.
    pids = subprocess.run(["ip", "netns", "pids", lab["hosts"]["target2"]["netns"]],
                          capture_output=True, text=True, check=True).stdout.split()
    subprocess.run(["kill", "-9", *pids], check=True)
    out = tmp_path / "fail"
    res = bench("--workload", "fleet", "--modes", "vanilla", "--reps", "1", "--reuse-lab",
                "--out", out)
    assert res.returncode == 1, res.stdout + res.stderr
    (r,) = runs(out)
    assert not r["ok"] and "target2" in r["error"], r
    assert r["recap"]["target2"]["unreachable"] == 1 and r["recap"]["target1"]["failed"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modes"]["vanilla"]["runs_failed"] == 1
    assert "wall_s" not in summary["modes"]["vanilla"]  # never timed as a success
    assert "Failed vanilla runs" in (out / "summary.md").read_text()
