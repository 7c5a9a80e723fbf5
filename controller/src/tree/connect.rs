//! Connecting hops: each hop once, a relay for an intermediary and an agent
//! for a target, started from here or by the relay before it; the keys, pins
//! and keepalive each needs.

use super::*;

/// Largest entry pinned at a relay (it travels in one frame).
pub(super) const PIN_BYTES_MAX: usize = 960 * 1024;

pub(super) fn pin_key(what: &str, data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(data);
    format!("pin:{what}:{}", crate::ansiballz::hex(&d[..16]))
}

impl Tree {
    pub(super) async fn ensure(
        &mut self,
        chain: Vec<Hop>,
        role: HopRole,
        task: Option<String>,
        quic_below: bool,
        done: oneshot::Sender<Result<NodeId, TreeError>>,
    ) {
        let key = (HopKey::of(&chain), role);
        let Some(done) = self.hops.lookup(&key, task.as_deref(), done) else {
            return;
        };
        let Some(hop) = chain.last().cloned() else {
            return;
        };
        let node = NodeId(self.next_node);
        self.next_node += 1;
        let label = hops::label(&chain, role);
        let info = hops::NodeInfo {
            key,
            label: label.clone(),
            host: hop.name.clone(),
        };
        self.hops.connecting(node, info, task.as_deref(), done);
        self.started.insert(node, Instant::now());
        // The agent signs while something connects (a deeper hop through
        // the forwarded socket, or this ssh with its keys).
        if let Some(a) = &self.ssh_agent {
            a.set_locked(false);
        }
        self.load_keys(&chain, role, node).await;
        let python = hop.python.as_deref().unwrap_or("python3");
        let parent_key = (HopKey::of(&chain[..chain.len() - 1]), HopRole::Relay);
        // The relay the stage-0 is sent: from here, the one for the
        // machine this host had before (else this controller's); from a
        // relay, that relay's own.
        // A relay with `arbor_transport: quic` moves its link there once
        // it is up (tree/quic.rs). A first hop's relay is the one built
        // with QUIC if it or a relay below it moves (those below are sent
        // the relay before them).
        let quic = role == HopRole::Relay && hop.quic();
        if quic {
            self.upgrades.want(node);
        }
        let relay = if chain.len() == 1 {
            relays::guess(
                self.host_machine.get(&hop.name).copied(),
                quic || quic_below,
            )
        } else {
            let parent = self.hops.up_node(&parent_key);
            relays::guess(
                parent.and_then(|p| self.machine_of(p)),
                parent.is_some_and(|p| self.has_quic(p)),
            )
        };
        let remote_cmd = match role {
            // A relay under another account (`root@bastion` as a via):
            // its ssh children still sign with the agent forwarded to the
            // relay before it, which its become tool took out of its
            // environment.
            HopRole::Relay if BECOME_METHODS.contains(&hop.method.as_str()) && chain.len() > 1 => {
                format!(
                    "export SSH_AUTH_SOCK='{}'; {}",
                    control::AUTH_SOCK_TOKEN,
                    arbor_bootstrap::relay_command(node, relay.bytes.len(), relay.machine)
                )
            }
            HopRole::Relay => {
                arbor_bootstrap::relay_command(node, relay.bytes.len(), relay.machine)
            }
            // Over ssh, a wrapper says how the agent ended.
            HopRole::Agent if hop.method == "ssh" => arbor_bootstrap::agent_ssh_command(python),
            HopRole::Agent => arbor_bootstrap::agent_command(python),
        };
        let result = if chain.len() == 1 {
            self.spawn_local(&hop, node, role, &remote_cmd, &label, relay)
        } else {
            match self.hops.up_node(&parent_key) {
                Some(parent) => self.spawn_remote(parent, &hop, node, role, &remote_cmd),
                None => Err("its via host is not connected".to_string()),
            }
        };
        if let Err(why) = result {
            self.settle(node, Err(why));
        }
    }

    /// Resolves a hop's waiters; a failed hop is remembered for its task.
    pub(super) fn settle(&mut self, node: NodeId, outcome: Result<(), String>) {
        self.askpass.remove(&node);
        let keys = self.hop_keys.remove(&node).unwrap_or_default();
        let outcome = outcome.map_err(|why| {
            self.started.remove(&node);
            self.upgrades.forget(node);
            self.with_key_hint(why, &keys)
        });
        self.hops.settle(node, outcome);
    }

    /// A refused login's message, with the key files that could not be
    /// used because they need a passphrase no agent supplies.
    pub(super) fn with_key_hint(&self, why: String, keys: &[PathBuf]) -> String {
        let Some(agent) = &self.ssh_agent else {
            return why;
        };
        let locked = agent.locked_files(keys);
        if locked.is_empty() || !why.contains("Permission denied") {
            return why;
        }
        let names: Vec<String> = locked.iter().map(|k| k.display().to_string()).collect();
        format!(
            "{why} (the key file {} needs a passphrase and no ssh-agent holds it: \
             add it to your agent with `ssh-add {}` before the run)",
            names.join(", "),
            names.join(" ")
        )
    }

    pub(super) fn spawn_local(
        &mut self,
        hop: &Hop,
        node: NodeId,
        role: HopRole,
        remote_cmd: &str,
        label: &str,
        relay: &'static relays::Relay,
    ) -> Result<(), String> {
        // `local`: the agent runs here, as this user, with no ssh.
        let local = hop.method == "local" && role == HopRole::Agent;
        let password = hop
            .password
            .as_ref()
            .filter(|_| hop.method == "ssh")
            .map(|p| p.0.as_str());
        let argv = if local {
            vec!["/bin/sh".to_string(), "-c".into(), remote_cmd.to_string()]
        } else if hop.enters_locally() {
            crate::methods::argv(hop, remote_cmd)
        } else {
            let mode = ssh::Mode {
                local: true,
                forward_agent: role == HopRole::Relay,
                password: password.is_some(),
            };
            ssh::argv(hop, remote_cmd, mode, None)
        };
        let mut preamble = crate::methods::stdin_prefix(hop)?;
        match role {
            HopRole::Relay => preamble.extend_from_slice(relay.bytes),
            HopRole::Agent => preamble.extend(arbor_bootstrap::agent_preamble(node)),
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(a) = &self.ssh_agent {
            cmd.env("SSH_AUTH_SOCK", a.socket());
        }
        if let Some(pw) = password {
            let (fd, env) = arbor_io::askpass::for_ssh(pw)
                .map_err(|e| format!("{label}: password file in RAM: {e}"))?;
            cmd.envs(env);
            self.askpass.insert(node, fd);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{label}: cannot run {}: {e}", argv[0]))?;
        let link = LinkId(self.next_link);
        self.next_link += 1;
        // Only a relay understands compressed frames.
        let compress = role == HopRole::Relay;
        let relay_for: Option<arbor_io::stage0::RelayFor> = match role {
            HopRole::Relay => Some(Box::new(move |m: &str| relays::answer(m, relay.quic))),
            HopRole::Agent => None,
        };
        let child_link = start_child_link(
            child,
            &argv[0],
            preamble,
            compress,
            relay_for,
            self.inbox_tx.clone(),
            link,
        )
        .map_err(|e| format!("{label}: {e}"))?;
        self.core.handle_link_up(Instant::now(), link, Role::Child);
        self.core.expect(node, link);
        self.links.insert(link, child_link);
        self.local_nodes.insert(link, node);
        Ok(())
    }

    pub(super) fn spawn_remote(
        &mut self,
        parent: NodeId,
        hop: &Hop,
        node: NodeId,
        role: HopRole,
        remote_cmd: &str,
    ) -> Result<(), String> {
        // What every spawn carries crosses to each relay once: pinned there
        // (from its parent relay if that holds it), then named.
        let mut preamble = crate::methods::stdin_prefix(hop)?;
        let mut preamble_pinned = None;
        if role == HopRole::Agent {
            let code = arbor_bootstrap::agent_payload();
            let key = pin_key("agent", code);
            preamble.extend(arbor_bootstrap::agent_preamble_header(node, code.len()));
            if self.pin(parent, &key, code) {
                preamble_pinned = Some(key);
            } else {
                preamble.extend_from_slice(code);
            }
        }
        let resolved = self.cfg.ssh_config.get(hop);
        let password = hop
            .password
            .as_ref()
            .filter(|_| hop.method == "ssh")
            .map(|p| p.0.as_str());
        let (known_hosts, known_hosts_pinned) = if hop.enters_locally() {
            (None, None)
        } else {
            let hosts = ssh::known_hosts(hop, &self.cfg.home, resolved.as_deref());
            let key = pin_key("known_hosts", &hosts);
            if self.pin(parent, &key, &hosts) {
                (None, Some(key))
            } else {
                (Some(hosts), None)
            }
        };
        if role == HopRole::Relay {
            self.relay_parent.insert(node, parent);
        }
        self.node_parent.insert(node, parent);
        let spec = Spawn {
            node,
            label: hop.name.clone(),
            argv: if hop.enters_locally() {
                crate::methods::argv(hop, remote_cmd)
            } else {
                let mode = ssh::Mode {
                    local: false,
                    forward_agent: role == HopRole::Relay,
                    password: password.is_some(),
                };
                ssh::argv(hop, remote_cmd, mode, resolved.as_deref())
            },
            env: Vec::new(),
            preamble,
            send_self: role == HopRole::Relay,
            known_hosts,
            connect_timeout_ms: (hop.timeout_s.unwrap_or(ssh::CONNECT_TIMEOUT_S_DEFAULT) + 20)
                * 1000,
            max_connecting: self.cfg.connecting_max,
            preamble_pinned,
            known_hosts_pinned,
            password: password.map(|p| control::Password(p.to_string())),
        };
        // `parent` expects it on the link it starts; the relays above take
        // its announcement only from `parent`'s direction.
        self.expect_above(node, parent, self.relay_parent.get(&parent).copied());
        let stream = self.stream_id();
        self.spawns.insert(stream, node);
        let f = Frame::new(
            Kind::Request,
            parent,
            NodeId::CONTROLLER,
            stream,
            control::encode(&Request::Spawn(spec)),
        );
        self.core.send(Instant::now(), f);
        Ok(())
    }

    /// Loads the key files a hop may use into the private agent: those of
    /// the hop itself and, for a relay, those of the hops before it (the
    /// hosts behind a relay may be reached with its key). Remembers them
    /// for the hop's failure message.
    pub(super) async fn load_keys(&mut self, chain: &[Hop], role: HopRole, node: NodeId) {
        let Some(hop) = chain.last() else {
            return;
        };
        if hop.method != "ssh" {
            return;
        }
        let home = &self.cfg.home;
        let of = |h: &Hop| ssh::key_files(h, home, self.cfg.ssh_config.get(h).as_deref());
        let own = of(hop);
        let mut keys = own.clone();
        if role == HopRole::Relay {
            keys.extend(chain.iter().flat_map(of));
        }
        self.hop_keys.insert(node, own);
        if let Some(a) = &mut self.ssh_agent {
            a.load(keys).await;
        }
    }

    /// Makes `relay` hold `data` pinned under `key`: forwarded from its
    /// parent relay (pinned there first), or sent from here. False if it
    /// cannot (too many pins, or too large for one frame).
    pub(super) fn pin(&mut self, relay: NodeId, key: &str, data: &[u8]) -> bool {
        use arbor_wire::control::PINS_MAX;
        let held = self.pins.entry(relay).or_default();
        if held.contains(key) {
            return true;
        }
        if held.len() >= PINS_MAX || data.len() > PIN_BYTES_MAX {
            return false;
        }
        let req = match self.relay_parent.get(&relay).copied() {
            Some(up) if self.pin(up, key, data) => (
                up,
                Request::Forward {
                    dst: relay,
                    keys: vec![key.to_string()],
                    max_bytes: 0,
                },
            ),
            _ => (
                relay,
                Request::Pin {
                    key: key.to_string(),
                    data: data.to_vec(),
                },
            ),
        };
        let stream = self.stream_id();
        let f = Frame::new(
            Kind::Request,
            req.0,
            NodeId::CONTROLLER,
            stream,
            control::encode(&req.1),
        );
        self.core.send(Instant::now(), f);
        self.pins.entry(relay).or_default().insert(key.to_string());
        true
    }

    /// Tells `relay` and every relay above it, and this node, that `node`
    /// will announce itself from `via`'s direction (a strict node takes no
    /// other announcement of it). Sent before the request that starts it,
    /// on the same links, so it arrives first.
    pub(super) fn expect_above(&mut self, node: NodeId, via: NodeId, mut relay: Option<NodeId>) {
        if let Some(link) = self.core.route(via) {
            self.core.expect(node, link);
        }
        while let Some(r) = relay {
            let f = Frame::new(
                Kind::Request,
                r,
                NodeId::CONTROLLER,
                self.stream_id(),
                control::encode(&Request::Expect { node, via }),
            );
            self.core.send(Instant::now(), f);
            relay = self.relay_parent.get(&r).copied();
        }
    }

    /// A relay, or an agent on the first hop, just came up: it is told to
    /// end if the daemon falls silent for the keepalive, and pinged.
    pub(super) fn watch(&mut self, node: NodeId) {
        let Some(role) = self.hops.of(node).map(|i| i.key.1) else {
            return;
        };
        let secs = ssh::keepalive_secs();
        let payload = match role {
            HopRole::Relay => control::encode(&Request::Keepalive {
                silent_ms: secs.saturating_mul(1000),
            }),
            HopRole::Agent if self.local_nodes.values().any(|n| *n == node) => {
                let req = serde_json::json!({"op": "keepalive", "secs": secs, "noreply": true});
                arbor_wire::msg::encode(req.to_string().as_bytes(), b"")
            }
            HopRole::Agent => return,
        };
        let stream = self.stream_id();
        let f = Frame::new(Kind::Request, node, NodeId::CONTROLLER, stream, payload);
        self.core.send(Instant::now(), f);
        self.pinger.watch(node);
    }

    /// Pings the watched nodes when a round is due.
    pub(super) fn ping_watched(&mut self) {
        let now = Instant::now();
        for node in self.pinger.handle_timeout(now) {
            let f = Frame::new(
                Kind::Ping,
                node,
                NodeId::CONTROLLER,
                StreamId(0),
                Vec::new(),
            );
            self.core.send(now, f);
        }
    }

    pub(super) fn connecting(&self) -> bool {
        self.hops.any_connecting()
    }
}
