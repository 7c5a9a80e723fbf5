"""arbor_forward: the sockets a task forwards while it runs. Each forward
is a connection of its own to the daemon (`forward`), held by the task's
connection plugin: when the task ends the plugin closes it, and when its
worker dies (Ctrl+C) the kernel does; either way the daemon has the
target's agent stop listening. Their declarations are checked here, so a
mistake fails the task that made it, naming the forward."""

from ansible.errors import AnsibleError
from ansible.module_utils.common.text.converters import to_text
from ansible.utils.display import Display

display = Display()


def specs(value):
    """The declared forwards as [(listen, connect)]: a list of (or one)
    mapping with `listen` and `connect`."""
    if not value:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise AnsibleError("arbor_forward: a list of {listen, connect}, not %r" % (value,))
    out = []
    for f in value:
        if not isinstance(f, dict) or not f.get("listen") or not f.get("connect"):
            raise AnsibleError("arbor_forward: each forward needs listen and connect, not %r" % (f,))
        out.append((to_text(f["listen"]), to_text(f["connect"])))
    return out


def open_all(client_class, sock, target, value):
    """Opens each declared forward; returns their daemon connections once
    every agent listens. A failure closes those opened and fails the task."""
    opened = []
    try:
        for listen, connect in specs(value):
            client = client_class(sock)
            opened.append(client)
            client.send(dict(target, op="forward", listen=listen, connect=connect))
            obj = client.recv()[0]  # an error is raised, naming the host and the forward
            display.vvv("ARBOR FORWARD %s on the target -> %s on the controller"
                        % (obj.get("listening"), connect), host=target["chain"][-1]["name"])
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(clients):
    for c in clients or ():
        try:
            c.close()
        except OSError:
            pass
