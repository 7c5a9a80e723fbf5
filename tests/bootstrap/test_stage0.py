"""stage-0 (bootstrap/stage0.sh) loads a binary from stdin into RAM and runs
it, with each loader: memfd via perl, memfd via python, an unlinked /dev/shm
file; sent a binary for another machine, it skips it and asks for its own. The probe binary reports what it sees: its /proc/self/exe, its argv,
and the stdin left for it, which must be exactly the bytes after the binary.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGE0 = (REPO / "bootstrap" / "stage0.sh").read_text()
MACHINE = os.uname().machine
OTHER = "aarch64" if MACHINE == "x86_64" else "x86_64"

PROBE_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char exe[256] = {0};
    readlink("/proc/self/exe", exe, sizeof exe - 1);
    printf("exe=%s\n", exe);
    for (int i = 0; i < argc; i++) printf("arg=%s\n", argv[i]);
    char buf[4096]; ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) { fwrite("rest=", 1, 5, stdout); fwrite(buf, 1, n, stdout); }
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-O1", "-o", d / "probe", d / "probe.c"], check=True)
    # Pad to relay-like size so the loaders loop over many reads.
    data = (d / "probe").read_bytes()
    return data + b"\0" * (1_500_000 - len(data))


def shm_files():
    return sorted(os.listdir("/dev/shm"))


@pytest.mark.parametrize("loader,exe_prefix", [
    ("perl", "/memfd:arbor-relay"),
    ("python", "/memfd:arbor-relay"),
    ("shm", "/dev/shm/.arbor-relay."),
])
def test_loader_runs_from_ram_and_leaves_the_stream(probe, loader, exe_prefix):
    before = shm_files()
    env = dict(os.environ, ARBOR_STAGE0_LOADER=loader, ARBOR_STAGE0_VERBOSE="1")
    t0 = time.monotonic()
    res = subprocess.run(["/bin/sh", "-c", STAGE0, "arbor-stage0", str(len(probe)), "42", MACHINE],
                         input=probe + b"FRAMES-AFTER", capture_output=True, env=env, timeout=30)
    elapsed = time.monotonic() - t0
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr
    assert f"loader={loader}" in res.stderr.decode()
    exe = out.splitlines()[0][len("exe="):]
    assert exe.startswith(exe_prefix) and exe.endswith("(deleted)"), exe
    # POSIX sh cannot set argv[0] (the shm loader's is /proc/self/fd/4).
    assert "\narg=--node\narg=42\n" in out
    assert out.endswith("rest=FRAMES-AFTER"), out[-200:]
    assert shm_files() == before, "no file left in /dev/shm"
    print(f"stage0 loader {loader}: {len(probe)} bytes loaded and started in {elapsed * 1e3:.0f} ms")


def test_short_input_is_a_clear_error(probe):
    res = subprocess.run(["/bin/sh", "-c", STAGE0, "arbor-stage0", str(len(probe)), "42", MACHINE],
                         input=probe[:1000], capture_output=True, timeout=30)
    assert res.returncode != 0
    assert b"stdin closed after 1000 of" in res.stderr


@pytest.mark.parametrize("loader", ["perl", "python", "shm"])
def test_another_machines_relay_is_skipped_and_its_own_asked_for(probe, loader):
    """The parent guessed wrong: the stage-0 drops those bytes, asks for
    its machine's relay on stdout, and loads what comes after the size."""
    env = dict(os.environ, ARBOR_STAGE0_LOADER=loader)
    wrong = b"\x7fELF-not-this-machine" * 40000
    p = subprocess.Popen(["/bin/sh", "-c", STAGE0, "arbor-stage0", str(len(wrong)), "42", OTHER],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdin.write(wrong)
    p.stdin.flush()
    ask = p.stdout.readline()
    assert ask == f"ARBOR-STAGE0 MACHINE {MACHINE}\n".encode(), ask
    p.stdin.write(b"%d\n" % len(probe) + probe + b"FRAMES-AFTER")
    p.stdin.close()
    out = p.stdout.read().decode()
    assert p.wait(timeout=30) == 0, p.stderr.read()
    assert "\narg=--node\narg=42\n" in out
    assert out.endswith("rest=FRAMES-AFTER"), out[-200:]


def test_an_ask_left_unanswered_is_a_clear_error():
    p = subprocess.run(["/bin/sh", "-c", STAGE0, "arbor-stage0", "5", "42", OTHER],
                       input=b"12345", capture_output=True, timeout=30)
    assert p.stdout == f"ARBOR-STAGE0 MACHINE {MACHINE}\n".encode()
    assert p.returncode == 70 and f"no relay for {MACHINE} came".encode() in p.stderr, p.stderr


def test_an_unknown_machine_is_named(tmp_path):
    (tmp_path / "uname").write_text("#!/bin/sh\necho riscv64\n")
    (tmp_path / "uname").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    p = subprocess.run(["/bin/sh", "-c", STAGE0, "arbor-stage0", "5", "42", "x86_64"],
                       input=b"12345", capture_output=True, env=env, timeout=30)
    assert p.returncode == 70 and p.stdout == b""
    assert b"this host's machine is riscv64; arbor's relays are built for x86_64 and aarch64" in p.stderr
