#!/usr/bin/env python3
# rsync's remote shell through arbor's tree: `rsync --rsh="python3 THIS SOCK
# CHAIN"` runs `THIS SOCK CHAIN [-l user] host command...`. The command runs
# on the host's agent, reached through the run's daemon (SOCK) along CHAIN
# (base64 JSON of the hops, as the glue resolved them), with its stdin and
# output streamed both ways: synchronize works through any via chain. The
# user and host rsync names are already part of CHAIN.
import base64
import json
import os
import select
import sys
import threading

from arbor_glue import wire


def send(client, lock, obj, blob=b""):
    with lock:
        client.send(obj, blob)


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
    sock = wire.Client(sock_path)
    lock = threading.Lock()
    send(sock, lock, {"op": "pipe", "chain": chain, "cmd": cmd})

    def feed():
        try:
            while True:
                try:
                    data = os.read(0, 256 * 1024)
                except BlockingIOError:
                    select.select([0], [], [])
                    continue
                if not data:
                    break
                send(sock, lock, {"op": "data"}, data)
            send(sock, lock, {"op": "end"})
        except OSError:
            pass
    threading.Thread(target=feed, daemon=True).start()
    while True:
        got = sock.recv()
        if got is None:
            sys.stderr.write("arbor rsh: the controller daemon closed the connection\n")
            return 255
        obj, blob = got
        if "error" in obj:
            sys.stderr.write("arbor rsh: %s\n" % obj["error"])
            return 255
        if obj.get("op") == "exit":
            return int(obj.get("rc") or 0) & 0xFF
        fd = 2 if obj.get("fd") == 2 else 1
        view = memoryview(blob)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                # rsync may make its end of the pipe non-blocking.
                select.select([], [fd], [])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
