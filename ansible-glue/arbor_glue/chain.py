"""How arbor's glue names a host's hops: a container or become hop from its
host's variables (Ansible's and Mitogen's names), Mitogen's via specs
(`[[method:]user@]host`), and the CIDR rules of `arbor_via_rules`. Pure
functions of variables: no connection, no daemon."""

from __future__ import annotations

import ipaddress

from ansible.errors import AnsibleConnectionFailure
from ansible.module_utils.common.text.converters import to_text
from ansible.utils.shlex import shlex_split

# The container methods arbor carries as hops, by every connection name
# that means them (Ansible's collections', Mitogen's).
CONTAINER_CONNECTIONS = {}
for _m, _names in {
    "docker": ("community.docker.docker",),
    "podman": ("containers.podman.podman",),
    "buildah": ("containers.podman.buildah",),
    "lxc": ("community.general.lxc",),
    "lxd": ("community.general.lxd",),
    "incus": ("community.general.incus",),
    "setns": (),
    "kubectl": ("kubernetes.core.kubectl",),
    "machinectl": ("community.general.machinectl",),
    "jail": ("community.general.jail",),
}.items():
    for _n in (_m, "mitogen_" + _m) + _names:
        CONTAINER_CONNECTIONS[_n] = _m
# Become tools as hops (Mitogen's connections of these names).
for _m in ("sudo", "su", "doas"):
    CONTAINER_CONNECTIONS["mitogen_" + _m] = _m

# Per method: the variables that name its program, and its extra arguments
# (the collections' plugins' and Mitogen's names; the first set wins).
EXE_VARS = {
    "docker": ("mitogen_docker_path", "ansible_docker_path"),
    "podman": ("mitogen_podman_path", "ansible_podman_executable"),
    "buildah": ("mitogen_buildah_path",),
    "lxc": ("mitogen_lxc_attach_path",),
    "lxd": ("mitogen_lxc_path", "ansible_lxd_executable"),
    "incus": ("ansible_incus_executable",),
    "setns": ("mitogen_nsenter_path",),
    "kubectl": ("mitogen_kubectl_path", "ansible_kubectl_path"),
    "machinectl": ("mitogen_machinectl_path",),
    "jail": (),
    "sudo": ("ansible_sudo_exe", "ansible_become_exe"),
    "su": ("ansible_su_exe", "ansible_become_exe"),
    "doas": ("ansible_doas_exe", "ansible_become_exe"),
}
EXTRA_VARS = {
    "docker": ("ansible_docker_extra_args",),
    "podman": ("ansible_podman_extra_args",),
    "kubectl": ("ansible_kubectl_extra_args",),
    "sudo": ("sudo_flags", "ansible_sudo_flags"),
    "su": ("su_flags", "ansible_su_flags"),
}


def container_hop(name, method, get):
    """A container hop from a getter of its host's variables."""
    def first(names):
        for n in names:
            v = get(n)
            if v not in (None, ""):
                return to_text(v)
        return None
    hop = {
        "name": name,
        "method": method,
        "host": first(("ansible_%s_host" % method, "ansible_host")) or name,
        "port": None,
        "user": first(("ansible_%s_user" % method, "ansible_user")),
        "key_file": None,
        "ssh_args": [],
        "host_key_checking": True,
        "timeout_s": None,
        "exe": first(EXE_VARS.get(method, ())),
        "extra_args": shlex_split(first(EXTRA_VARS.get(method, ())) or ""),
        "kind": first(("arbor_kind", "mitogen_kind")),
    }
    if method == "kubectl":
        for var, flag in (("ansible_kubectl_namespace", "-n"), ("ansible_kubectl_container", "-c")):
            if get(var):
                hop["extra_args"] += [flag, to_text(get(var))]
    if method in ("sudo", "su", "doas"):
        pw = first(("ansible_%s_pass" % method, "ansible_password", "ansible_become_pass",
                    "ansible_become_password"))
        if pw:
            hop["password"] = pw
    python = first(("ansible_python_interpreter",))
    if python and not python.startswith("auto"):
        hop["python"] = python
    return hop


def parse_via(value):
    """(via host, become method, become user) from a via in Mitogen's form
    `[[become_method:]become_user@]inventory_hostname` (`ssh:host` is
    taken as the host)."""
    value = to_text(value)
    user, _, host = value.rpartition("@")
    method, _, user = user.rpartition(":")
    if ":" in host and host.split(":", 1)[0] == "ssh":
        host = host.split(":", 1)[1]
    return host, method or None, user or None


def via_become_hop(via_hop, hv, method, user):
    """The hop that becomes `user` on a via host, as Mitogen's via spec
    does: the method named, else the via host's become method, else sudo;
    the via host's become password, executable and flags."""
    method = to_text(method or hv.get("ansible_become_method") or "sudo")
    if method not in ("sudo", "su", "doas"):
        raise AnsibleConnectionFailure("%s@%s: become method %r cannot start a relay (sudo, su or doas)"
                                       % (user, via_hop["name"], method))

    def get(var):
        if var in ("ansible_%s_pass" % method, "ansible_password"):
            return (hv.get("ansible_become_pass") or hv.get("ansible_become_password")
                    or hv.get("ansible_%s_pass" % method))
        return hv.get(var)
    hop = container_hop("%s@%s" % (user, via_hop["name"]), method, get)
    hop["user"] = user
    hop["host"] = via_hop["host"]
    hop.pop("python", None)
    return hop


def parse_via_rules(value):
    """[(network, via)] from `arbor_via_rules`: a mapping of CIDR to via host,
    or a list of such mappings (topology's `parse_rules`, same golden cases)."""
    if value in (None, ""):
        return []
    maps = value if isinstance(value, list) else [value]
    rules = []
    for m in maps:
        if not isinstance(m, dict):
            raise ValueError("must be a mapping of CIDR to via host, not %r" % (m,))
        for cidr, via in m.items():
            try:
                net = ipaddress.ip_network(to_text(cidr).strip(), strict=False)
            except ValueError:
                raise ValueError("%r is not a CIDR network (like 10.1.0.0/16)" % (cidr,))
            if not isinstance(via, str) or not via.strip():
                raise ValueError("%s: the via host must be a name, not %r" % (cidr, via))
            if any(n == net for n, _ in rules):
                raise ValueError("%s appears twice" % net)
            rules.append((net, via.strip()))
    return rules


def via_for(address, rules):
    """The via of the most specific rule whose network holds `address` (an
    IP address; names never match), or None."""
    try:
        ip = ipaddress.ip_address(to_text(address).strip())
    except ValueError:
        return None
    best = None
    for net, via in rules:
        if ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, via)
    return best[1] if best else None
