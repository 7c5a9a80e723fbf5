#!/usr/bin/env python3
"""The relay's size on the wire, with and without QUIC, against the least a
QUIC endpoint built from the same crates can be.

    deploy/bench/quicsize.py --out deploy/bench/results/quic-size.md

Writes each relay the arbor binary carries (`arbor relay-write`), builds
deploy/bench/quic-floor (quinn and rustls with ring, the relay's own TLS
module, tokio's current-thread runtime; one connection accepted, one stream
echoed) with the relay's size profile for x86_64 musl, and reports each
one's bytes, zlib level 6 (what `ssh -C` sends) and xz -9e (the best common
packer, for scale).
"""

import argparse
import json
import lzma
import os
import subprocess
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FLOOR = HERE / "quic-floor"
TARGET = "x86_64-unknown-linux-musl"


def sizes(data):
    xz = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    return len(data), len(zlib.compress(data, 6)), len(xz)


def relays(arbor):
    out = []
    info = json.loads(subprocess.check_output([arbor, "relay-info"], text=True))
    with tempfile.TemporaryDirectory() as tmp:
        for r in info:
            path = Path(tmp) / f"relay-{r['machine']}-{r['quic']}"
            cmd = [arbor, "relay-write", str(path), r["machine"]]
            subprocess.run(cmd + (["--quic"] if r["quic"] else []), check=True)
            name = f"arbor relay, {r['machine']}, " + ("with QUIC" if r["quic"] else "without QUIC")
            out.append((name, *sizes(path.read_bytes())))
    return out


def floor():
    target_dir = REPO / "target" / "quic-floor"
    subprocess.run(["cargo", "build", "--quiet", "--profile", "relay", "--target", TARGET,
                    "--manifest-path", str(FLOOR / "Cargo.toml"), "--target-dir", str(target_dir)],
                   check=True, env={**os.environ, "CARGO_ENCODED_RUSTFLAGS": ""})
    built = target_dir / TARGET / "relay" / "arbor-quic-floor"
    return ("QUIC floor (deploy/bench/quic-floor), x86_64", *sizes(built.read_bytes()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arbor", default=str(REPO / "target" / "release" / "arbor"))
    ap.add_argument("--bound-kb", type=int, default=450, help="the issue's bound on the wire")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = relays(a.arbor) + [floor()]
    lines = ["| binary | bytes | zlib -6 (ssh -C) | xz -9e | under %d KB on the wire |" % a.bound_kb,
             "|---|---|---|---|---|"]
    for name, raw, z, xz in rows:
        ok = "yes" if z <= a.bound_kb * 1000 else "no"
        lines.append(f"| {name} | {raw:,} | {z:,} | {xz:,} | {ok} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out:
        a.out.write_text(f"`deploy/bench/quicsize.py --out {a.out}`\n\n" + text)


if __name__ == "__main__":
    main()
