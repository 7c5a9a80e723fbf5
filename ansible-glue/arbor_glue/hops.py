"""A host's hops as the connection plugin builds them: the target's own
ssh settings (Ansible's config system, as for vanilla's ssh), then each via
host's from its own variables, `arbor_via_rules`, and Mitogen's
`[method:]user@host` become hops (`Hops`, a mixin of the Connection)."""

from __future__ import annotations

import os

import ansible.constants as C
from ansible.errors import AnsibleConnectionFailure
from ansible.module_utils.common.text.converters import to_text
from ansible.utils.shlex import shlex_split

from arbor_glue.become import become_opt
from arbor_glue.chain import CONTAINER_CONNECTIONS, container_hop, parse_via, parse_via_rules, via_become_hop, via_for

# Longest chain of hops (the daemon's bound too).
HOP_MAX = 16


class Hops(object):
    """The connection's chain of hops: a mixin of arbor's ssh Connection."""

    def _hop_from(self, name, get):
        """One hop from a getter of the ssh plugin's options for that host."""
        for opt, var in (("sftp_extra_args", "ansible_sftp_extra_args"),
                         ("scp_extra_args", "ansible_scp_extra_args")):
            if get(opt):
                raise AnsibleConnectionFailure(
                    "%s: %s is set, but arbor runs no sftp or scp: files travel in the host's own"
                    " ssh session. Move ssh options to ansible_ssh_extra_args, or set"
                    " arbor_disable: true for this host." % (name, var))
        args = []
        for opt in ("ssh_args", "ssh_common_args", "ssh_extra_args"):
            value = get(opt)
            if value:
                args.extend(shlex_split(to_text(value)))
        host = get("host")
        if not host or host == "inventory_hostname":
            host = name
        port = get("port")
        timeout = get("timeout")
        exe = get("ssh_executable")
        # --ask-pass (-k) answers every host's ssh, as vanilla's does.
        password = get("password") or getattr(self._play_context, "password", None)
        hop = {
            "name": name,
            "method": "ssh",
            "host": to_text(host),
            "port": int(port) if port not in (None, "") else None,
            "user": to_text(get("remote_user")) if get("remote_user") else None,
            "key_file": os.path.expanduser(to_text(get("private_key_file"))) if get("private_key_file") else None,
            "ssh_args": args,
            "host_key_checking": bool(get("host_key_checking")) if get("host_key_checking") is not None else True,
            "timeout_s": int(timeout) if timeout not in (None, "") else None,
        }
        if exe and to_text(exe) != "ssh":
            hop["exe"] = os.path.expanduser(to_text(exe))
        transport = get("arbor_transport")
        if transport and to_text(transport) != "ssh":
            hop["transport"] = to_text(transport)
        if password:
            hop["password"] = to_text(password)
        return hop

    def _via_hop(self, name, hostvars):
        if name not in hostvars:
            raise AnsibleConnectionFailure("%s: via host %r is not in the inventory"
                                           % (self.get_option("arbor_inventory_hostname"), name))
        hv = hostvars[name]
        method = CONTAINER_CONNECTIONS.get(to_text(hv.get("ansible_connection") or "ssh"))
        if method:
            return container_hop(name, method, hv.get), hv

        def get(opt):
            try:
                return C.config.get_config_value(opt, plugin_type="connection", plugin_name="ssh",
                                                  variables=hv)
            except Exception:
                return None
        return self._hop_from(name, get), hv

    def _rule_via(self, name, hop, hv):
        """The via that `arbor_via_rules` (from the host's own variables)
        gives a host without a via of its own; never the host itself."""
        if "arbor_via" in hv or "mitogen_via" in hv:
            return None
        try:
            rules = parse_via_rules(hv.get("arbor_via_rules"))
        except ValueError as e:
            raise AnsibleConnectionFailure("%s: arbor_via_rules: %s" % (name, e))
        via = via_for(hop["host"], rules)
        if via is not None and via.rsplit("@", 1)[-1] == name:
            return None
        return via

    def _arbor_name(self):
        """The host's inventory name: the last hop of its chain."""
        return to_text(self.get_option("arbor_inventory_hostname") or self.get_option("host"))

    def _build_chain(self):
        name = self._arbor_name()
        target = self._hop_from(name, self.get_option)
        python = self.get_option("arbor_python")
        if python and not to_text(python).startswith("auto"):
            target["python"] = to_text(python)
        return self._with_vias(name, target)

    def _with_vias(self, name, target):
        """`target`'s chain: its via hosts (each one's own settings), then it."""
        chain = [target]
        # Every host's variables, as the task's own (lazy) hostvars, handed
        # over by the action (not a connection option: Ansible would template
        # every host's variables into it for every task).
        hostvars = self._arbor_hostvars if self._arbor_hostvars is not None else {}
        via = self.get_option("arbor_via")
        if via is None:
            via = self._rule_via(name, target, hostvars.get(name) or {})
        seen = [name]
        while via:
            via, become_method, become_user = parse_via(via)
            if via in seen:
                raise AnsibleConnectionFailure("%s: via cycle: %s" % (name, " -> ".join(seen + [via])))
            if len(chain) >= HOP_MAX:
                raise AnsibleConnectionFailure("%s: via chain longer than %d hops" % (name, HOP_MAX))
            hop, hv = self._via_hop(via, hostvars)
            if become_user:
                # Mitogen's `[method:]user@host`: become `user` on the via
                # host (its become settings), and relay from there.
                chain.insert(0, via_become_hop(hop, hv, become_method, become_user))
            chain.insert(0, hop)
            seen.append(via)
            if "arbor_via" in hv or "mitogen_via" in hv:
                via = hv.get("arbor_via") or hv.get("mitogen_via")
            else:
                via = self._rule_via(hop["name"], hop, hv)
        return chain

    def arbor_stack(self, become=False):
        """The hops to this host as arbor resolves them (Mitogen's
        `mitogen_get_stack` shape: [{"method", "kwargs"}]), first hop first,
        and the become interpreter last if the task uses one. No secrets."""
        stack = []
        for hop in self._build_chain():
            kwargs = dict((k, v) for k, v in hop.items() if k not in ("method", "password") and v not in (None, [], ""))
            stack.append({"method": hop["method"], "kwargs": kwargs})
        stack[-1]["kwargs"]["role"] = "agent"
        for entry in stack[:-1]:
            entry["kwargs"]["role"] = "relay"
        if become and self._arbor_become_real is not None:
            b = self._arbor_become_real
            stack.append({"method": b.name, "kwargs": {
                "role": "nested agent", "become_user": become_opt(b, "become_user"),
                "become_exe": become_opt(b, "become_exe"), "become_flags": become_opt(b, "become_flags"),
                "password": bool(become_opt(b, "become_pass"))}})
        return stack
