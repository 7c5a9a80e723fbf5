#!/usr/bin/env python3
# rsync's remote shell through arbor's tree: `rsync --rsh="python3 THIS SOCK
# CHAIN"` runs `THIS SOCK CHAIN [-l user] host command...`. The command runs
# on the host's agent, reached through the run's daemon (SOCK) along CHAIN
# (base64 JSON of the hops, as the glue resolved them), with its stdin and
# output streamed both ways: synchronize works through any via chain. The
# user and host rsync names are already part of CHAIN.
import base64
import json
import sys

from arbor_glue import pipe, wire


def main(argv):
    if len(argv) < 4:
        sys.stderr.write("usage: arbor_rsh.py SOCK CHAIN [-l user] host command...\n")
        return 255
    sock_path, chain = argv[1], json.loads(base64.b64decode(argv[2]))
    args = argv[3:]
    while args and args[0].startswith("-"):
        args = args[2:] if args[0] in ("-l", "-p", "-o") else args[1:]
    if len(args) < 2:
        sys.stderr.write("arbor rsh: no command\n")
        return 255
    cmd = " ".join(args[1:])
    return pipe.run(wire.Client(sock_path), {"op": "pipe", "chain": chain, "cmd": cmd}, name="arbor rsh")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
