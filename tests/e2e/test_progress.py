"""A long transfer shows its progress at -v, as users of copy and fetch on
slow links expect: through a 100 Mbit/s WAN, a 40 MiB copy and its fetch
back print the bytes moved, the size and the rate about once a second,
then the total; the files arrive whole."""

import hashlib
import os
import re
import subprocess

import pytest

from labkit import LAB, VENV, env_for, run, ssh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

SIZE_MIB = 40


def ansible(lab, *args):
    res = subprocess.run([str(VENV / "ansible"), "-i", lab["inventory"], "target1", "-v", *args],
                         env=env_for("arbor"), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    return out


def check_progress(out, verb):
    steps = [float(m) for m in re.findall(rf"ARBOR {verb} \S+: ([\d.]+) MiB of {SIZE_MIB}.0 MiB, "
                                          r"[\d.]+ MiB/s", out)]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] <= SIZE_MIB, out[-3000:]
    end = re.search(rf"ARBOR {verb} \S+: {SIZE_MIB}.0 MiB in ([\d.]+) s, ([\d.]+) MiB/s", out)
    assert end and float(end.group(1)) >= 2 and 1 < float(end.group(2)) < 15, out[-3000:]


def test_a_long_copy_and_fetch_show_progress_at_v(lab, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(SIZE_MIB << 20))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    run(LAB / "wan", "set", "--rate-mbit", "100")
    try:
        out = ansible(lab, "-m", "copy", "-a", f"src={big} dest=/tmp/arbor-big.bin")
        check_progress(out, "PUT")
        back = tmp_path / "back.bin"
        out = ansible(lab, "-m", "fetch", "-a", f"src=/tmp/arbor-big.bin dest={back} flat=yes")
        check_progress(out, "FETCH")
    finally:
        run(LAB / "wan", "set", "--rate-mbit", "0")
        ssh(lab, "target1", "rm -f /tmp/arbor-big.bin")
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
