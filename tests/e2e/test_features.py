"""Issue 4's behaviour list end to end: the same playbook (playbooks/
features.yml) through vanilla Ansible and through arbor, via the
python-less bastion to three targets. Every task's result (changed, failed,
output, diff) and every file left on the targets must be the same; arbor
must leave no temp dir behind on any target."""

import json
import time
import os
import random
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from labkit import PLAYBOOKS, by_task, clean_targets, playbook, recap, run, ssh, target_state, wait_gone

HERE = Path(__file__).resolve().parent
TARGETS = ("target1", "target2", "target3")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A library of module styles (the binary one compiled here), a local
    archive, and a file over 1 MiB."""
    d = tmp_path_factory.mktemp("inputs")
    # Script modules come from playbooks/library (beside the playbook);
    # the binary one is built here.
    lib = d / "library"
    lib.mkdir()
    run("gcc", "-O2", "-o", lib / "binary_mod", HERE / "src" / "binary_mod.c")
    archive = d / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(PLAYBOOKS / "files" / "tree", arcname="unpacked")
    big = d / "big.bin"
    big.write_bytes(random.Random(4).randbytes(1536 * 1024 + 7))
    return {"library": lib, "archive": archive, "big": big}


def run_features(lab, mode, inputs, out_dir):
    record = out_dir / "record.jsonl"
    fetch = out_dir / "fetched"
    env_extra = {"ARBOR_RECORD": str(record), "ANSIBLE_LIBRARY": str(inputs["library"]),
                 "ANSIBLE_CALLBACK_PLUGINS": str(HERE / "callback_plugins"),
                 "ANSIBLE_CALLBACKS_ENABLED": "record"}
    os.environ.update(env_extra)
    try:
        # arbor's run at -vvv: no_log data must stay out of its logs too.
        verbose = ["-vvv"] if mode == "arbor" else []
        # Another Python on the targets (deploy/test runs the oldest and the
        # newest that the supported ansible-core versions accept).
        python = os.environ.get("ARBOR_TEST_TARGET_PYTHON")
        interp = ["-e", f"ansible_python_interpreter={python}"] if python else []
        p = playbook(lab, mode, "features.yml", *verbose, *interp, "-e", f"fetch_dir={fetch}",
                     "-e", f"archive={inputs['archive']}", "-e", f"big_file={inputs['big']}")
        out, _ = p.communicate(timeout=600)
    finally:
        for k in env_extra:
            os.environ.pop(k, None)
    lines = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    if python and mode == "arbor":
        # Each target's agent runs in that Python (its hello says which).
        version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        for t in TARGETS:
            assert re.search(rf"ARBOR HOP {t} \(agent, via bastion1\): .*, python {re.escape(version)}$",
                             out, re.M), (t, version)
    # Paths on the controller differ between the two runs by construction.
    text = json.dumps(lines).replace(str(fetch), "FETCH")
    text = re.sub(r"ansible-local-\w+/tmp\w+", "LOCAL-TMP", text)
    return p.returncode, out, json.loads(text), fetch






def test_features_match_vanilla(lab, inputs, tmp_path):
    clean_targets(lab)
    (tmp_path / "vanilla").mkdir()
    (tmp_path / "arbor").mkdir()
    rc_v, out_v, lines_v, fetch_v = run_features(lab, "vanilla", inputs, tmp_path / "vanilla")
    assert rc_v == 0, out_v
    state_v = target_state(lab)
    left_v = {t: remote_tmp(lab, t) for t in TARGETS}
    clean_targets(lab)
    rc_a, out_a, lines_a, fetch_a = run_features(lab, "arbor", inputs, tmp_path / "arbor")
    assert rc_a == 0, out_a
    assert recap(out_a) == recap(out_v) and len(recap(out_v)) == 3, out_a
    v, a = by_task(lines_v), by_task(lines_a)
    assert sorted(a) == sorted(v)
    for key in v:
        assert a[key] == v[key], key
    assert target_state(lab) == state_v
    for t in TARGETS:
        assert (fetch_a / t / "tmp/arbor-e2e/app.conf").read_text() == \
            (fetch_v / t / "tmp/arbor-e2e/app.conf").read_text()
    # copy and template ran in one round trip each (stat and module at once).
    assert "ARBOR CHOOSE" in out_a
    # no_log kept the output out of the results, as vanilla does.
    assert "secret-value" not in out_a and "secret-value" not in json.dumps(lines_a)
    # Once the run is over, nothing of arbor's is left in the remote temp
    # dir, and no more of Ansible's than vanilla leaves (ansible-core keeps
    # the temp dir of an async task whose job outlives the task).
    # An async job removes its temp dir itself, just after it reports
    # finished: give it a few seconds.
    wait_gone(lab)
    deadline = time.monotonic() + 10
    for t in TARGETS:
        while True:
            left = remote_tmp(lab, t, remove=False)
            if len(left) <= len(left_v[t]) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        remote_tmp(lab, t)
        assert not [x for x in left if not x.startswith("ansible-tmp-")], (t, left)
        assert len(left) <= len(left_v[t]), (t, left, left_v[t])


def remote_tmp(lab, host, remove=True):
    cmd = "ls -A /root/.ansible/tmp 2>/dev/null" + ("; rm -rf /root/.ansible/tmp" if remove else "")
    return ssh(lab, host, cmd).stdout.split()
