"""The relays carried inside `arbor`, for x86_64 and aarch64, are static
binaries that never call NSS (no getaddrinfo, no getpwnam): each runs on any
Linux of its machine (aarch64's here under qemu-user, through binfmt_misc,
which deploy/setup installs)."""

import json
import subprocess

import pytest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARBOR = REPO / "target" / "release" / "arbor"
RELAY_BYTES_MAX = 1_500_000
# With quinn, rustls and ring (see README, "QUIC hops": its size).
RELAY_QUIC_BYTES_MAX = 3_000_000


@pytest.mark.parametrize("machine,e_machine,quic", [("x86_64", 0x3E, False), ("aarch64", 0xB7, False),
                                                    ("x86_64", 0x3E, True)])
def test_embedded_relay_is_static_without_nss(tmp_path, machine, e_machine, quic):
    relay = tmp_path / "arbor-relay"
    subprocess.run([ARBOR, "relay-write", relay, machine] + (["--quic"] if quic else []), check=True)
    data = relay.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF, 64-bit
    assert int.from_bytes(data[18:20], "little") == e_machine
    ldd = subprocess.run(["ldd", relay], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr or "statically linked" in ldd.stdout, ldd
    for symbol in (b"getaddrinfo", b"getpwnam", b"getpwuid", b"nsswitch.conf", b"gethostbyname"):
        assert symbol not in data, symbol
    assert len(data) < (RELAY_QUIC_BYTES_MAX if quic else RELAY_BYTES_MAX), len(data)
    out = subprocess.run([relay, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("arbor-relay ")
    info = json.loads(subprocess.run([ARBOR, "relay-info"], capture_output=True, text=True, check=True).stdout)
    assert {"machine": machine, "quic": quic, "bytes": len(data), "build": "musl static"} in info
    version = subprocess.run([ARBOR, "version"], capture_output=True, text=True, check=True).stdout
    name = f"{machine} with QUIC" if quic else machine
    assert f"{name}: {len(data)} bytes, musl static" in version
