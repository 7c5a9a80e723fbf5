//! The daemon's hops: a hop's path and role as the key of
//! [`arbor_core::hops::Hops`] (which hop is which node, and the reconnect
//! rule), its waiters oneshot senders, and the labels a hop's messages
//! start with.

use arbor_topology::{Hop, HopKey};
use arbor_wire::NodeId;
use tokio::sync::oneshot;

pub use arbor_core::hops::labelled;

use crate::tree::TreeError;

/// What a hop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HopRole {
    Relay,
    Agent,
}

/// The tree's name of a hop: its whole path and what it runs.
pub type Key = (HopKey, HopRole);

/// A caller waiting for a hop: its node, or why it failed.
pub type Waiter = oneshot::Sender<Result<NodeId, TreeError>>;

/// The daemon's table of hops.
pub type Hops = arbor_core::hops::Hops<Key, Waiter>;

/// A node the table started: its hop, label and host's inventory name.
pub type NodeInfo = arbor_core::hops::NodeInfo<Key>;

/// An empty table.
pub fn table() -> Hops {
    Hops::new(|w, outcome| {
        let _ = w.send(outcome.map_err(TreeError::Hop));
    })
}

/// Whether a hop is a target's agent (what `reset` ends).
pub fn is_agent(key: &Key) -> bool {
    key.1 == HopRole::Agent
}

/// The label a hop's messages start with: `target1 (agent, via bastion1)`.
pub fn label(chain: &[Hop], role: HopRole) -> String {
    let what = match role {
        HopRole::Relay => "relay",
        HopRole::Agent => "agent",
    };
    let name = chain.last().map(|h| h.name.as_str()).unwrap_or("?");
    match chain.len() {
        0 | 1 => format!("{name} ({what}, from the controller)"),
        n => format!("{name} ({what}, via {})", chain[n - 2].name),
    }
}
