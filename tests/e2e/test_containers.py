"""Containers on a container host behind the bastion, as arbor hops:
controller -> bastion1 -> chost1 (relay) -> container, with mitogen_via in
the inventory. chost1 runs 2 containers each of Docker, podman, buildah, LXC and LXD
(methods `docker`, `podman`, `buildah`, `lxc`, `lxd`), 2 namespace containers (method
`setns`, entered by PID), and 2 "pods" reached with a kubectl stand-in that
forwards `exec` to Docker (method `kubectl`; there is no Kubernetes here):
each
module crosses the WAN once for all of them, and a container that stops
mid-run fails only its own tasks, with a message naming it and its host."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from labkit import LAB, REPO, VENV, any_arbor, env_for, recap, run, ssh, wait_gone

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

WAN = REPO / "deploy" / "lab" / "wan"
METHODS = {"docker", "podman", "buildah", "lxc", "lxd", "setns", "kubectl"}
FLEET = """- hosts: containers
  gather_facts: false
  tasks:
    - command: mkdir -p /tmp/arbor-ct-e2e
    - copy: {content: "hello {{ inventory_hostname }}\\n", dest: /tmp/arbor-ct-e2e/motd, mode: "0640"}
    - lineinfile: {path: /tmp/arbor-ct-e2e/app.conf, line: "listen = 8080", create: true}
    - stat: {path: /tmp/arbor-ct-e2e/motd}
      register: st
    - assert: {that: [st.stat.exists, "st.stat.mode == '0640'"]}
    - slurp: {src: /etc/hostname}
      register: hn
    - assert: {that: ["(hn.content | b64decode | trim) == inventory_hostname"]}
    - file: {path: /tmp/arbor-ct-e2e/old, state: absent}
"""


@pytest.fixture(scope="module")
def lab():
    out = run(LAB / "up", "--targets", "1", "--container-host", "--no-python-bastion").stdout
    info = json.loads((Path(out.strip().splitlines()[-1]) / "lab.json").read_text())
    yield info
    run(LAB / "down")


def playbook(lab, tmp_path, text, limit=None, timeout=300):
    book = tmp_path / "book.yml"
    book.write_text(text)
    args = [str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book)]
    if limit:
        args += ["-l", limit]
    return subprocess.run(args, env=env_for("arbor"), capture_output=True, text=True, timeout=timeout)


def in_container(lab, name, cmd):
    """Runs `cmd` in container `name`, from its host, without arbor."""
    c = lab["containers"][name]
    enter = {
        "docker": lambda: f"{c['docker']} exec {name}",
        "kubectl": lambda: f"{c['docker']} exec {c['pod']}",
        "podman": lambda: f"{c['podman']} exec {name}",
        "buildah": lambda: f"{c['buildah']} run {name} --",
        "lxc": lambda: f"{c['lxc_attach']} --clear-env -n {name} --",
        "lxd": lambda: f"{c['lxc']} exec {name} --mode=non-interactive --",
        "setns": lambda: f"nsenter -t {c['pid']} -a -r -w",
    }[c["method"]]()
    return ssh(lab, c["host"], f"{enter} /bin/sh -c '{cmd}'")


def test_every_method_runs_the_playbook_in_its_containers(lab, tmp_path):
    names = sorted(lab["containers"])
    assert {c["method"] for c in lab["containers"].values()} == METHODS and len(names) == 2 * len(METHODS)
    res = playbook(lab, tmp_path, FLEET)
    assert res.returncode == 0, res.stdout[-3000:]
    r = recap(res.stdout)
    assert set(r) == set(names), r
    assert all(v == (8, 3, 0, 0) for v in r.values()), r
    for name in names:
        out = in_container(lab, name, "cat /tmp/arbor-ct-e2e/motd /tmp/arbor-ct-e2e/app.conf; uname -n")
        assert out.stdout == f"hello {name}\nlisten = 8080\n{name}\n", (name, out.stdout, out.stderr)
        # Not on the container host itself.
        assert ssh(lab, "chost1", "test -e /tmp/arbor-ct-e2e; echo $?").stdout.strip() == "1"
    assert not any_arbor(wait_gone(lab, 5.0))
    # In each container: its first process, and this check's shell and Python
    # (a buildah run starts afresh: no first process).
    count = 'python3 -c "import os; print(sum(p.isdigit() for p in os.listdir(chr(47) + chr(112) + chr(114) + chr(111) + chr(99))))"'
    left = {n: in_container(lab, n, count).stdout.strip() for n in names}
    want = {n: "2" if lab["containers"][n]["method"] == "buildah" else "3" for n in names}
    assert left == want, f"processes left: {left}"


def wan_up(lab, tmp_path, limit):
    subprocess.run([str(WAN), "reset"], check=True, capture_output=True)
    res = playbook(lab, tmp_path, "- hosts: containers\n  gather_facts: false\n  tasks:\n"
                                  "    - ping:\n    - stat: {path: /}\n    - file: {path: /tmp, state: directory}\n",
                   limit=limit)
    assert res.returncode == 0, res.stdout[-3000:]
    out = subprocess.run([str(WAN), "stats"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["up"]["bytes"]


def test_modules_cross_the_wan_once_for_all_containers(lab, tmp_path):
    one = wan_up(lab, tmp_path, "chost1-d1")
    n = len(lab["containers"])
    four = wan_up(lab, tmp_path, "containers")
    per_extra = (four - one) / (n - 1)
    print(f"WAN up: 1 container {one} B, {n} containers {four} B: {per_extra:.0f} B per further container")
    # The three modules' zips are about 120 KB; each further container costs
    # its spawn and its requests, not the modules again.
    assert per_extra < 20_000, (one, four)


def test_a_container_that_stops_fails_only_its_own_tasks(lab, tmp_path):
    book = tmp_path / "stop.yml"
    book.write_text("""- hosts: containers
  gather_facts: false
  tasks:
    - command: "true"
    - command: sleep 3
    - command: uname -n
      register: out
    - assert: {that: ["out.stdout == inventory_hostname"]}
""")
    p = subprocess.Popen([str(VENV / "ansible-playbook"), "-i", lab["inventory"], str(book)],
                         env=env_for("arbor"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(4)  # into the sleep
    c = lab["containers"]["chost1-d2"]
    ssh(lab, "chost1", f"{c['docker']} kill chost1-d2")
    out, _ = p.communicate(timeout=120)
    r = recap(out)
    assert r["chost1-d2"][2] + r["chost1-d2"][3] == 1, out  # unreachable or failed, once
    for other in sorted(set(lab["containers"]) - {"chost1-d2"}):
        assert r[other] == (4, 3, 0, 0), (other, out)
    lines = [l for l in out.splitlines() if "chost1-d2" in l and ("UNREACHABLE" in l or "FAILED" in l)]
    assert lines and all("chost1" in l for l in lines), out
    msg = " ".join(lines)
    print("container stopped mid-run:", msg)
    assert "via chost1" in msg or "chost1-d2 (agent" in msg, msg
    ssh(lab, "chost1", f"{c['docker']} start chost1-d2")


@pytest.fixture
def sudoer(lab):
    """An account (arbc) that logs in with the lab's key and may sudo with
    its password; removed afterwards. The lab's hosts share /etc and /home."""
    import secrets
    user, pw = "arbc", secrets.token_urlsafe(12)
    run("useradd", "--create-home", "--shell", "/bin/sh", user)
    run("chpasswd", input=f"{user}:{pw}\n")
    ssh_dir = Path("/home") / user / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(run("ssh-keygen", "-y", "-f", lab["private_key"]).stdout)
    run("chown", "-R", f"{user}:{user}", ssh_dir)
    rule = Path("/etc/sudoers.d/arbor-lab-containers")
    rule.write_text(f"{user} ALL=(ALL:ALL) ALL\n")
    rule.chmod(0o440)
    yield user, pw
    rule.unlink()
    run("pkill", "-KILL", "-u", user, check=False)
    time.sleep(0.2)
    run("userdel", "--remove", user, check=False)


def test_ssh_then_sudo_then_docker(lab, sudoer, tmp_path):
    """ssh as an unprivileged account, sudo (with its password) to root, then
    into a Docker container whose socket only root may use."""
    user, pw = sudoer
    c = lab["containers"]["chost1-d1"]
    chost = lab["hosts"]["chost1"]["address"]

    def inventory(password):
        inv = tmp_path / f"chain-{len(password)}.yml"
        inv.write_text(json.dumps({"all": {"children": {"chain": {"hosts": {
            "chost1-user": {"ansible_host": chost, "ansible_user": user, "mitogen_via": "bastion1"},
            "chost1-root": {"ansible_connection": "mitogen_sudo", "ansible_user": "root",
                            "ansible_sudo_pass": password, "mitogen_via": "chost1-user"},
            "app-via-sudo": {"ansible_connection": "docker", "ansible_host": "chost1-d1",
                             "mitogen_docker_path": c["docker"], "mitogen_via": "chost1-root"},
        }}}}}))
        return inv

    def ask(password, *args):
        return subprocess.run([str(VENV / "ansible"), "-i", lab["inventory"], "-i", str(inventory(password)),
                               "app-via-sudo", *args], env=dict(env_for("arbor"),
                               ANSIBLE_ACTION_PLUGINS=str(REPO / "ansible-glue" / "plugins" / "action")),
                              capture_output=True, text=True, timeout=120)

    res = ask(pw, "-m", "ansible.builtin.shell", "-a", "id -u; uname -n")
    assert res.returncode == 0 and res.stdout.split("\n")[1:3] == ["0", "chost1-d1"], res.stdout + res.stderr
    stack = ask(pw, "-m", "arbor_get_stack")
    assert stack.returncode == 0, stack.stdout
    methods = [h["method"] for h in json.loads(stack.stdout.split("=>", 1)[1])["result"]]
    assert methods == ["ssh", "ssh", "sudo", "docker"], methods
    assert pw not in stack.stdout
    # A wrong password fails the hop that asked for it, by name.
    bad = ask("not-" + pw, "-m", "ansible.builtin.command", "-a", "true")
    assert bad.returncode != 0 and "chost1-root (relay, via chost1-user)" in bad.stdout, bad.stdout
    assert "incorrect password" in bad.stdout, bad.stdout
    assert pw not in bad.stdout + bad.stderr


COMPARE = """- hosts: chost1-d1,chost1-d2
  gather_facts: false
  tasks:
    - command: mkdir -p /tmp/arbor-ct-cmp
    - copy: {content: "hello {{ inventory_hostname }}\\n", dest: /tmp/arbor-ct-cmp/motd, mode: "0640"}
    - copy: {content: "hello {{ inventory_hostname }}\\n", dest: /tmp/arbor-ct-cmp/motd, mode: "0640"}
    - lineinfile: {path: /tmp/arbor-ct-cmp/app.conf, line: "listen = 8080", create: true, mode: "0600"}
    - stat: {path: /tmp/arbor-ct-cmp/motd}
    - slurp: {src: /tmp/arbor-ct-cmp/app.conf}
    - shell: "id -u; uname -n; echo err >&2; exit 3"
      ignore_errors: true
    - file: {path: /tmp/arbor-ct-cmp/motd, state: absent}
"""


def test_docker_results_equal_vanilla_through_the_bastion(lab, tmp_path):
    """Vanilla reaches a Docker container behind a bastion with the docker CLI
    over ssh (`docker -H ssh://chost1`, jumping through bastion1); the same
    playbook through arbor gives the same task results and leaves the same
    files. (Vanilla cannot reach the podman, LXC, namespace or kubectl
    containers through a bastion: those plugins run their tool on the
    controller.)"""
    from labkit import by_task
    book = tmp_path / "cmp.yml"
    book.write_text(COMPARE)
    results = {}
    for mode in ("vanilla", "arbor"):
        for n in ("chost1-d1", "chost1-d2"):
            in_container(lab, n, "rm -rf /tmp/arbor-ct-cmp")
        record = tmp_path / f"{mode}.jsonl"
        env = dict(env_for(mode), ARBOR_RECORD=str(record), ANSIBLE_CALLBACKS_ENABLED="record",
                   ANSIBLE_CALLBACK_PLUGINS=str(Path(__file__).resolve().parent / "callback_plugins"))
        if mode == "vanilla":
            env["PATH"] = f"{lab['vanilla_path']}:{env['PATH']}"
        inv = lab["inventory"] if mode == "arbor" else lab["inventory_vanilla"]
        res = subprocess.run([str(VENV / "ansible-playbook"), "-i", inv, str(book)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (mode, res.stdout[-3000:])
        state = {n: in_container(lab, n, "cd /tmp/arbor-ct-cmp && for f in *; do echo $f; cat $f; done").stdout
                 for n in ("chost1-d1", "chost1-d2")}
        lines = [json.loads(x) for x in record.read_text().splitlines()]
        results[mode] = (recap(res.stdout), by_task(lines), state)
    (rv, tv, sv), (ra, ta, sa) = results["vanilla"], results["arbor"]
    assert ra == rv and rv["chost1-d1"] == (8, 5, 0, 0), (ra, rv)
    assert sorted(ta) == sorted(tv)
    for key in tv:
        assert ta[key] == tv[key], key
    assert sa == sv and sa["chost1-d1"] == "app.conf\nlisten = 8080\n", sa


def test_ansible_user_is_the_user_in_the_container(lab, tmp_path):
    """The user inside the container (`ansible_user`, or the method's own
    `ansible_docker_user`, … as Ansible's plugins name it, here so as not to
    change the ssh hops' user): docker and podman pass it to `exec -u`,
    buildah to `run --user`."""
    names = sorted(n for n, c in lab["containers"].items() if c["method"] in ("docker", "podman", "buildah"))
    users = [a for m in ("docker", "podman", "buildah") for a in ("-e", f"ansible_{m}_user=nobody")]
    res = subprocess.run([str(VENV / "ansible"), "-i", lab["inventory"], ",".join(names), *users,
                          "-m", "ansible.builtin.command", "-a", "id -u"],
                         env=env_for("arbor"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for n in names:
        assert f"{n} | CHANGED | rc=0 >>\n65534\n" in res.stdout, (n, res.stdout)
