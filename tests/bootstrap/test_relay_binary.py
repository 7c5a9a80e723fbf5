"""The relay carried inside `arbor` is one static x86_64 binary that never
calls NSS (no getaddrinfo, no getpwnam): it runs on any x86_64 Linux."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARBOR = REPO / "target" / "release" / "arbor"
RELAY_BYTES_MAX = 1_500_000


def test_embedded_relay_is_static_without_nss(tmp_path):
    relay = tmp_path / "arbor-relay"
    subprocess.run([ARBOR, "relay-write", relay], check=True)
    data = relay.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF, 64-bit
    assert int.from_bytes(data[18:20], "little") == 0x3E  # x86_64
    ldd = subprocess.run(["ldd", relay], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr or "statically linked" in ldd.stdout, ldd
    for symbol in (b"getaddrinfo", b"getpwnam", b"getpwuid", b"nsswitch.conf", b"gethostbyname"):
        assert symbol not in data, symbol
    assert len(data) < RELAY_BYTES_MAX, len(data)
    out = subprocess.run([relay, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("arbor-relay ")
    info = subprocess.run([ARBOR, "version"], capture_output=True, text=True, check=True).stdout
    assert f"relay: {len(data)} bytes" in info
