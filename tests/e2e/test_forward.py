"""arbor_forward: a server on the controller is reachable from target1
(behind the bastion), on its loopback or a private UNIX socket, only while
a task that declares the forward runs (a task's vars, or a block's), and
not after it ends, fails, or the run is interrupted; a forward that would
listen beyond the loopback is refused."""

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from labkit import VENV, any_arbor, arbor_procs, env_for, outcomes, run_recorded, ssh, wait_gone

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

BIG = 5_000_000
PROBE = "/tmp/arbor-fwd-probe.py"
PROBE_SRC = r"""
import hashlib, socket, sys
where, what = sys.argv[1], sys.argv[2].encode()
if where.startswith("/"):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(where)
else:
    host, port = where.rsplit(":", 1); s = socket.create_connection((host, int(port)), 10)
s.sendall(what); s.shutdown(socket.SHUT_WR)
got = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
print(hashlib.sha256(got).hexdigest() if what == b"big" else got.decode())
"""


def big():
    return bytes(range(256)) * (BIG // 256)


class Server(object):
    """The controller's server: `pong DATA` for DATA, `big()` for `big`."""

    def __init__(self, family, addr):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(addr)
        self.sock.listen(16)
        self.addr = self.sock.getsockname()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.one, args=(c,), daemon=True).start()

    def one(self, c):
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        c.sendall(big() if data == b"big" else b"pong " + data)
        c.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


PLAY = """
- hosts: target1
  gather_facts: false
  vars:
    tcp_fwd: [{{listen: "127.0.0.1:{port}", connect: "127.0.0.1:{sport}"}}]
  tasks:
    - copy: {{content: "{{{{ probe_src }}}}", dest: {probe}}}
      vars: {{probe_src: {probe_src}}}
    - name: before
      command: python3 {probe} 127.0.0.1:{port} one
      failed_when: false
    - name: during
      command: python3 {probe} 127.0.0.1:{port} two
      vars: {{arbor_forward: "{{{{ tcp_fwd }}}}"}}
    - name: after
      command: python3 {probe} 127.0.0.1:{port} three
      failed_when: false
    - block:
        - name: unix stat
          stat: {{path: /tmp/arbor-fwd.sock}}
        - name: unix probe
          command: python3 {probe} /tmp/arbor-fwd.sock four
        - name: unix big
          command: python3 {probe} /tmp/arbor-fwd.sock big
      vars:
        arbor_forward: [{{listen: /tmp/arbor-fwd.sock, connect: "{unix}"}}]
    - name: unix after
      stat: {{path: /tmp/arbor-fwd.sock}}
    - name: failing
      command: "false"
      vars: {{arbor_forward: "{{{{ tcp_fwd }}}}"}}
      ignore_errors: true
    - name: after failure
      command: python3 {probe} 127.0.0.1:{port} five
      failed_when: false
    - name: beyond loopback
      command: "true"
      vars: {{arbor_forward: [{{listen: "0.0.0.0:{port}", connect: "{sport}"}}]}}
      ignore_errors: true
"""


def test_a_forward_is_up_only_while_its_task_or_block_runs(lab, tmp_path):
    tcp = Server(socket.AF_INET, ("127.0.0.1", 0))
    unix = Server(socket.AF_UNIX, str(tmp_path / "srv.sock"))
    port = free_port()
    import json
    book = tmp_path / "fwd.yml"
    book.write_text(PLAY.format(port=port, sport=tcp.addr[1], unix=unix.addr, probe=PROBE,
                                probe_src=json.dumps(PROBE_SRC)))
    rc, out, lines = run_recorded(lab, "arbor", str(book), tmp_path / "rec", "-vvv")
    got = {task: rs[0] for (_, task), rs in outcomes(lines, ("status", "rc", "stdout", "msg", "stat")).items()}
    assert rc == 0, out[-4000:]
    assert got["before"]["rc"] != 0, got["before"]
    assert got["during"]["stdout"] == "pong two", got["during"]
    assert got["after"]["rc"] != 0, got["after"]
    assert got["unix stat"]["stat"]["exists"] and got["unix stat"]["stat"]["mode"] == "0600", got["unix stat"]
    assert got["unix probe"]["stdout"] == "pong four"
    assert got["unix big"]["stdout"] == hashlib.sha256(big()).hexdigest()
    assert got["unix after"]["stat"]["exists"] is False
    assert got["failing"]["status"] == "failed" and got["after failure"]["rc"] != 0, \
        (got["failing"], got["after failure"])
    assert got["beyond loopback"]["status"] == "failed" and "loopback" in got["beyond loopback"]["msg"], \
        got["beyond loopback"]
    assert "ARBOR FORWARD 127.0.0.1:%d on the target" % port in out
    assert not any_arbor(wait_gone(lab)), arbor_procs(lab)


def test_ctrl_c_takes_the_forward_down(lab, tmp_path):
    tcp = Server(socket.AF_INET, ("127.0.0.1", 0))
    port = free_port()
    book = tmp_path / "hold.yml"
    book.write_text(f"""
- hosts: target1
  gather_facts: false
  tasks:
    - command: sleep 120
      vars: {{arbor_forward: [{{listen: "{port}", connect: "127.0.0.1:{tcp.addr[1]}"}}]}}
""")
    ssh(lab, "target1", "cat > %s <<'EOF'\n%s\nEOF" % (PROBE, PROBE_SRC))
    proc = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book)],
                            env=env_for("arbor"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = ssh(lab, "target1", f"python3 {PROBE} 127.0.0.1:{port} up")
            if res.stdout.strip() == "pong up":
                break
            time.sleep(0.5)
        else:
            pytest.fail("the forward never came up")
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl+C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = ssh(lab, "target1", f"python3 {PROBE} 127.0.0.1:{port} down")
    assert res.returncode != 0, res.stdout
    assert not any_arbor(wait_gone(lab, 10)), arbor_procs(lab)
