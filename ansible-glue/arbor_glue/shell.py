"""`arbor ssh HOST [COMMAND...]`: a shell or a command on an inventory host,
through arbor's tree. The host is reached as a task reaches it: an ad-hoc
run of the action `arbor_shell` in this process (Ansible's own CLI, so
inventory, vias, users, keys, become and password prompts are Ansible's)
connects and hands back, in memory, where to send the pipe; then the
shell or command streams through the run's daemon, which lives as long as
this process does (or, with ARBOR_PERSIST, is the kept tree, reused)."""

import argparse
import json
import os
import socket
import sys

from arbor_glue import pipe, wire

GLUE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USAGE = """arbor ssh [options] HOST [COMMAND...]

Opens a shell on HOST (an inventory host; the pattern must name one) or runs
COMMAND there, through arbor's tree: HOST's vias, user, keys and become
settings are the inventory's, as for a task. Reuses a tree kept by
ARBOR_PERSIST. Exit status: COMMAND's; 255 if HOST cannot be reached."""

# Options passed on to Ansible's ad-hoc CLI as they are: (flags, takes a value).
PASSED = [(("-i", "--inventory"), True), (("-u", "--user"), True), (("-e", "--extra-vars"), True),
          (("-l", "--limit"), True), (("--become-user",), True), (("--become-method",), True),
          (("--private-key", "--key-file"), True), (("-c", "--connection"), True),
          (("-b", "--become"), False), (("-K", "--ask-become-pass"), False),
          (("-k", "--ask-pass"), False)]


def parse(argv):
    p = argparse.ArgumentParser(prog="arbor ssh", usage=USAGE)
    for flags, value in PASSED:
        if value:
            p.add_argument(*flags, action="append", default=[], dest=flags[-1].lstrip("-").replace("-", "_"))
        else:
            p.add_argument(*flags, action="store_true", dest=flags[-1].lstrip("-").replace("-", "_"))
    p.add_argument("-t", dest="tty", action="store_const", const=True, default=None,
                   help="a pty even for a command")
    p.add_argument("-T", dest="tty", action="store_const", const=False, help="no pty, even for a shell")
    p.add_argument("-v", dest="verbose", action="count", default=0, help="Ansible's verbosity")
    p.add_argument("host", help="an inventory host")
    p.add_argument("command", nargs=argparse.REMAINDER, help="run this instead of a shell")
    return p.parse_args(argv)


def adhoc_args(opts):
    args = ["ansible", opts.host, "-m", "arbor_shell"]
    for flags, value in PASSED:
        got = getattr(opts, flags[-1].lstrip("-").replace("-", "_"))
        if value:
            for v in got:
                args += [flags[-1], v]
        elif got:
            args.append(flags[-1])
    if opts.verbose:
        args.append("-" + "v" * opts.verbose)
    return args


class Refused(Exception):
    """The host pattern does not name exactly one host."""


def resolve(opts):
    """Connects to the host as an ad-hoc task would: {"sock", "target"},
    or None (the reason printed)."""
    from ansible.cli.adhoc import AdHocCLI
    from ansible.errors import AnsibleError
    from ansible.plugins.loader import action_loader, callback_loader, connection_loader

    class Resolve(AdHocCLI):
        def get_host_list(self, inventory, subset, pattern="all"):
            try:
                hosts = super(Resolve, self).get_host_list(inventory, subset, pattern)
            except AnsibleError:
                hosts = []
            if len(hosts) != 1:
                # Before the play runs: it would reach every host matched.
                raise Refused("no inventory host matches %r" % pattern if not hosts else
                              "%r names %d hosts (%s); name one"
                              % (pattern, len(hosts), ", ".join(h.name for h in hosts[:5])))
            return hosts

    for loader, kind in ((connection_loader, "connection"), (action_loader, "action"),
                         (callback_loader, "callback")):
        loader.add_directory(os.path.join(GLUE, "plugins", kind))
    parent, child = socket.socketpair()
    os.environ["ARBOR_SHELL_FD"] = str(child.fileno())
    try:
        cli = Resolve(adhoc_args(opts))
        cli.callback = "arbor_shell"
        try:
            rc = cli.run()
        except (Refused, AnsibleError) as e:
            sys.stderr.write("arbor ssh: %s\n" % e)
            return None
        child.close()
        got = b""
        parent.setblocking(False)
        try:
            while True:
                part = parent.recv(65536)
                if not part:
                    break
                got += part
        except BlockingIOError:
            pass
        if rc != 0 or not got:
            if rc == 0:  # (a failure has been told by the callback)
                sys.stderr.write("arbor ssh: %s: not reached\n" % opts.host)
            return None
        return json.loads(got.decode())
    finally:
        os.environ.pop("ARBOR_SHELL_FD", None)
        parent.close()
        child.close()


def main(argv):
    opts = parse(argv)
    where = resolve(opts)
    if where is None:
        return 255
    cmd = " ".join(opts.command)
    tty = opts.tty if opts.tty is not None else (not cmd and os.isatty(0))
    req = dict(where["target"], op="pipe", cmd=cmd)
    name = "arbor ssh: %s" % where["target"]["chain"][-1]["name"]
    return pipe.run(wire.Client(where["sock"]), req, name=name, tty=tty)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        # The daemon hangs up on the command when this connection goes.
        sys.exit(130)
