//! Pure planning: connection specs of hosts and their `via` chains, turned
//! into a tree in which each hop exists once.
//!
//! The Ansible glue resolves, for a target, its own connection settings and
//! those of every host on its `mitogen_via` / `arbor_via` chain, exactly as
//! Ansible would for each of them, and sends the chain outermost first. This
//! crate checks the chain and names each hop by everything that makes its
//! connection distinct, so two targets behind the same bastion share one
//! relay, whoever declared it.

use std::fmt;

pub mod plan;

use serde::{Deserialize, Serialize};

/// Longest chain accepted (hops including the target).
pub const CHAIN_HOPS_MAX: usize = 16;

/// How one host is reached from the hop before it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hop {
    /// The inventory name, for messages.
    pub name: String,
    /// `ssh` for now; container methods come later.
    #[serde(default = "default_method")]
    pub method: String,
    /// Address or name given to ssh (ansible_host).
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub user: Option<String>,
    /// A private key file on the controller (never sent anywhere).
    #[serde(default)]
    pub key_file: Option<String>,
    /// ssh_args, ssh_common_args and ssh_extra_args, split into words.
    #[serde(default)]
    pub ssh_args: Vec<String>,
    /// The interpreter that runs the agent on a target.
    #[serde(default)]
    pub python: Option<String>,
    /// Ansible's host_key_checking for this host.
    #[serde(default = "yes")]
    pub host_key_checking: bool,
    /// Connect timeout in seconds (ansible_timeout).
    #[serde(default)]
    pub timeout_s: Option<u32>,
    /// Container methods: the program that enters the container (`docker`,
    /// `lxc-attach`, …), if not the method's default on the PATH.
    #[serde(default)]
    pub exe: Option<String>,
    /// Container methods: more arguments for that program.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// `setns`: what finds the container's first process (`docker`,
    /// `podman`, `lxc`, `lxd`, `machinectl`, or `pid`: `host` is the PID).
    #[serde(default)]
    pub kind: Option<String>,
    /// `sudo` as a hop: the password it asks for (never shown).
    #[serde(default)]
    pub password: Option<Secret>,
    /// How frames reach a via host's relay once ssh has started it:
    /// `ssh` (none: the same) or `quic` (`arbor_transport`).
    #[serde(default)]
    pub transport: Option<String>,
}

/// The transports a via host may ask for.
pub const TRANSPORTS: [&str; 2] = ["ssh", "quic"];

/// A password: carried, never printed.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// Methods that change the account on the host before them (Mitogen's
/// `mitogen_sudo`, `mitogen_su`, `mitogen_doas` connections).
pub const BECOME_METHODS: [&str; 3] = ["sudo", "su", "doas"];

/// Methods that enter a container (or jail) from the host before them.
pub const CONTAINER_METHODS: [&str; 10] = [
    "docker",
    "podman",
    "buildah",
    "lxc",
    "lxd",
    "incus",
    "setns",
    "kubectl",
    "machinectl",
    "jail",
];

/// What `setns` can find a container's first process with.
pub const SETNS_KINDS: [&str; 6] = ["docker", "podman", "lxc", "lxd", "machinectl", "pid"];

impl Hop {
    /// Its relay's parent link is to move to QUIC.
    pub fn quic(&self) -> bool {
        self.transport.as_deref() == Some("quic")
    }

    pub fn is_container(&self) -> bool {
        CONTAINER_METHODS.contains(&self.method.as_str())
    }

    /// Entered by a program on the host before it (a container tool or a
    /// become tool), not by ssh: no host key, no address.
    pub fn enters_locally(&self) -> bool {
        self.is_container() || BECOME_METHODS.contains(&self.method.as_str())
    }
}

fn default_method() -> String {
    "ssh".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("empty connection chain")]
    Empty,
    #[error("via chain of {0} hops is longer than the limit of {max}", max = CHAIN_HOPS_MAX)]
    TooLong(usize),
    #[error("via cycle: {0}")]
    Cycle(String),
    #[error("{host}: unsupported connection method {method:?}")]
    Method { host: String, method: String },
    #[error("{0}: no address to connect to")]
    NoHost(String),
    #[error("arbor_via_rules: {0}")]
    Rules(String),
    #[error("via host {0:?} is not in the inventory")]
    UnknownVia(String),
    #[error("a host with an empty name")]
    EmptyName,
    #[error("{host}: arbor_transport {transport:?} is neither ssh nor quic")]
    Transport { host: String, transport: String },
}

/// Checks a chain (outermost hop first, the target last).
pub fn validate(chain: &[Hop]) -> Result<(), TopologyError> {
    if chain.is_empty() {
        return Err(TopologyError::Empty);
    }
    if chain.len() > CHAIN_HOPS_MAX {
        return Err(TopologyError::TooLong(chain.len()));
    }
    for (i, hop) in chain.iter().enumerate() {
        if let Some(j) = chain[..i].iter().position(|h| h.name == hop.name) {
            let names: Vec<&str> = chain[j..=i].iter().map(|h| h.name.as_str()).collect();
            return Err(TopologyError::Cycle(names.join(" -> ")));
        }
        // `local`: the controller itself, so only as a chain's one hop.
        let local_ok = hop.method == "local" && chain.len() == 1;
        let kind_ok = hop.method != "setns"
            || hop
                .kind
                .as_deref()
                .is_some_and(|k| SETNS_KINDS.contains(&k));
        let become_ok = BECOME_METHODS.contains(&hop.method.as_str()) && i > 0;
        if !(hop.method == "ssh" || local_ok || become_ok || hop.is_container() && kind_ok) {
            return Err(TopologyError::Method {
                host: hop.name.clone(),
                method: hop.method.clone(),
            });
        }
        if hop.host.is_empty() {
            return Err(TopologyError::NoHost(hop.name.clone()));
        }
        if let Some(t) = hop.transport.as_deref().filter(|t| !TRANSPORTS.contains(t)) {
            return Err(TopologyError::Transport {
                host: hop.name.clone(),
                transport: t.to_string(),
            });
        }
    }
    Ok(())
}

/// The identity of a hop in the tree: the whole path to it, each step named
/// by everything that changes the connection. Equal keys share one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HopKey(String);

impl fmt::Display for HopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl HopKey {
    /// The key of the last hop of `chain`, which must be valid.
    pub fn of(chain: &[Hop]) -> HopKey {
        let steps: Vec<String> = chain
            .iter()
            .map(|h| {
                format!(
                    "{}:{}@{}:{}[{}][{}|{}|{}]{}",
                    h.method,
                    h.user.as_deref().unwrap_or(""),
                    h.host,
                    h.port.map(|p| p.to_string()).unwrap_or_default(),
                    h.ssh_args.join(" "),
                    h.exe.as_deref().unwrap_or(""),
                    h.extra_args.join(" "),
                    h.kind.as_deref().unwrap_or(""),
                    if h.quic() { "+quic" } else { "" }
                )
            })
            .collect();
        HopKey(steps.join(" / "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(name: &str) -> Hop {
        Hop {
            name: name.into(),
            method: "ssh".into(),
            host: format!("{name}.example"),
            host_key_checking: true,
            ..Hop::default()
        }
    }

    #[test]
    fn valid_chain_and_shared_prefix_keys() {
        let a = [hop("bastion1"), hop("target1")];
        let b = [hop("bastion1"), hop("target2")];
        validate(&a).expect("valid");
        assert_eq!(HopKey::of(&a[..1]), HopKey::of(&b[..1]));
        assert_ne!(HopKey::of(&a), HopKey::of(&b));
    }

    #[test]
    fn same_host_with_other_settings_is_another_hop() {
        let mut other = hop("bastion1");
        other.user = Some("admin".into());
        assert_ne!(HopKey::of(&[hop("bastion1")]), HopKey::of(&[other]));
    }

    #[test]
    fn a_quic_via_is_another_hop_and_a_transport_must_be_known() {
        let mut quic = hop("bastion1");
        quic.transport = Some("quic".into());
        let mut ssh = hop("bastion1");
        ssh.transport = Some("ssh".into());
        assert_ne!(HopKey::of(&[hop("bastion1")]), HopKey::of(&[quic.clone()]));
        assert_eq!(HopKey::of(&[hop("bastion1")]), HopKey::of(&[ssh]));
        validate(&[quic, hop("target1")]).expect("valid");
        let mut bad = hop("bastion1");
        bad.transport = Some("udp".into());
        assert_eq!(
            validate(&[bad, hop("target1")]),
            Err(TopologyError::Transport {
                host: "bastion1".into(),
                transport: "udp".into()
            })
        );
    }

    #[test]
    fn cycles_are_named() {
        let chain = [hop("gw"), hop("bastion1"), hop("rack"), hop("bastion1")];
        assert_eq!(
            validate(&chain),
            Err(TopologyError::Cycle("bastion1 -> rack -> bastion1".into()))
        );
    }

    #[test]
    fn bounds_and_methods() {
        let long: Vec<Hop> = (0..=CHAIN_HOPS_MAX)
            .map(|i| hop(&format!("h{i}")))
            .collect();
        assert_eq!(
            validate(&long),
            Err(TopologyError::TooLong(CHAIN_HOPS_MAX + 1))
        );
        assert_eq!(validate(&[]), Err(TopologyError::Empty));
        let mut d = hop("c1");
        d.method = "rsh".into();
        assert!(matches!(validate(&[d]), Err(TopologyError::Method { .. })));
        // Container methods anywhere; setns only with a kind it knows.
        let mut c = hop("app1");
        c.method = "docker".into();
        assert_eq!(validate(&[hop("bastion1"), hop("web1"), c.clone()]), Ok(()));
        c.method = "setns".into();
        assert!(matches!(
            validate(&[hop("web1"), c.clone()]),
            Err(TopologyError::Method { .. })
        ));
        c.kind = Some("docker".into());
        assert_eq!(validate(&[hop("web1"), c.clone()]), Ok(()));
        let mut other = c.clone();
        other.kind = Some("pid".into());
        assert_ne!(HopKey::of(&[c]), HopKey::of(&[other]));
        let mut l = hop("localhost");
        l.method = "local".into();
        assert_eq!(validate(std::slice::from_ref(&l)), Ok(()));
        assert!(matches!(
            validate(&[hop("bastion1"), l]),
            Err(TopologyError::Method { .. })
        ));
    }
}
