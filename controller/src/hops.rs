//! Which hop is which node, and what became of each: connecting (with the
//! callers waiting for it), up, or failed.
//!
//! Pure state, driven by the tree task. A failure is remembered only for
//! the task that met it (every host and loop item of that task gets it at
//! once, as a dead via host should cost one timeout, not one per item); the
//! next task connects again, so a restarted target, a reboot or a healed
//! link is picked up without restarting the run. `forget` drops a hop
//! (`meta: reset_connection`): its next use connects afresh.

use std::collections::HashMap;

use arbor_topology::{Hop, HopKey};
use arbor_wire::NodeId;
use tokio::sync::oneshot;

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

enum State {
    Connecting {
        node: NodeId,
        waiters: Vec<Waiter>,
        task: Option<String>,
    },
    Up {
        node: NodeId,
        /// The last task that used it: a loss is remembered for that task.
        task: Option<String>,
    },
    Failed {
        why: String,
        task: Option<String>,
    },
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

/// `why` as a message of `label`'s: prefixed with it unless it already is.
pub fn labelled(label: &str, why: &str) -> String {
    if why.starts_with(label) {
        why.to_string()
    } else {
        format!("{label}: {why}")
    }
}

/// A node this table started: its hop, label and host's inventory name.
#[derive(Clone)]
pub struct NodeInfo {
    pub key: Key,
    pub label: String,
    pub host: String,
}

#[derive(Default)]
pub struct Hops {
    states: HashMap<Key, State>,
    nodes: HashMap<NodeId, NodeInfo>,
    /// The host's inventory name of every hop ever connected (as many as
    /// the inventory has hops).
    hosts: HashMap<Key, String>,
}

impl Hops {
    /// Answers `waiter` (of `task`) about the hop `key`: its node if it is
    /// up, later if it is connecting, its failure if that was met by the
    /// same task. Otherwise hands the waiter back: the caller connects it.
    pub fn lookup(&mut self, key: &Key, task: Option<&str>, waiter: Waiter) -> Option<Waiter> {
        match self.states.get_mut(key) {
            Some(State::Up { node, task: last }) => {
                if task.is_some() {
                    *last = task.map(str::to_string);
                }
                let _ = waiter.send(Ok(*node));
            }
            Some(State::Connecting { waiters, .. }) => waiters.push(waiter),
            Some(State::Failed { why, task: t }) if task.is_some() && t.as_deref() == task => {
                let _ = waiter.send(Err(TreeError::Hop(why.clone())));
            }
            _ => return Some(waiter),
        }
        None
    }

    /// `node` is connecting as the hop `info.key`, for `waiter` (of `task`).
    pub fn connecting(&mut self, node: NodeId, info: NodeInfo, task: Option<&str>, waiter: Waiter) {
        let key = info.key.clone();
        self.hosts.insert(key.clone(), info.host.clone());
        self.nodes.insert(node, info);
        let task = task.map(str::to_string);
        let old = self.states.insert(
            key,
            State::Connecting {
                node,
                waiters: vec![waiter],
                task,
            },
        );
        debug_assert!(
            !matches!(old, Some(State::Connecting { .. } | State::Up { .. })),
            "a hop connects once at a time"
        );
    }

    /// The node the hop `key` is up as.
    pub fn up_node(&self, key: &Key) -> Option<NodeId> {
        match self.states.get(key) {
            Some(State::Up { node, .. }) => Some(*node),
            _ => None,
        }
    }

    /// What this table knows of a node it started.
    pub fn of(&self, node: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(&node)
    }

    /// The label of a node this table started.
    pub fn label_of(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(|i| i.label.as_str())
    }

    /// Whether any hop is connecting.
    pub fn any_connecting(&self) -> bool {
        self.states
            .values()
            .any(|s| matches!(s, State::Connecting { .. }))
    }

    /// `node` joined the tree, or failed to: its waiters learn which.
    /// Ignored unless `node` is what its hop is connecting as.
    pub fn settle(&mut self, node: NodeId, outcome: Result<(), String>) {
        let Some(NodeInfo { key, label, .. }) = self.nodes.get(&node).cloned() else {
            return;
        };
        let Some(State::Connecting { node: n, .. }) = self.states.get(&key) else {
            return;
        };
        if *n != node {
            return;
        }
        let Some(State::Connecting { waiters, task, .. }) = self.states.remove(&key) else {
            return;
        };
        let (state, answer) = match outcome {
            Ok(()) => (State::Up { node, task }, Ok(node)),
            Err(why) => {
                let why = labelled(&label, &why);
                self.nodes.remove(&node);
                (
                    State::Failed {
                        why: why.clone(),
                        task,
                    },
                    Err(TreeError::Hop(why)),
                )
            }
        };
        self.states.insert(key, state);
        for w in waiters {
            let _ = w.send(answer.clone());
        }
    }

    /// `node` left the tree (it was up, or still connecting): its hop fails
    /// for the rest of the task that last used it. Returns its label.
    pub fn lost(&mut self, node: NodeId, why: &str) -> Option<String> {
        let NodeInfo { key, label, .. } = self.nodes.get(&node).cloned()?;
        match self.states.get(&key) {
            Some(State::Connecting { node: n, .. }) if *n == node => {
                self.settle(node, Err(why.to_string()));
            }
            Some(State::Up { node: n, task }) if *n == node => {
                let task = task.clone();
                let why = labelled(&label, why);
                self.states.insert(key, State::Failed { why, task });
            }
            _ => {}
        }
        self.nodes.remove(&node);
        Some(label)
    }

    /// Drops the hop `key` whatever its state; returns the node it was up
    /// as, if it was. Callers waiting for it learn that it was reset.
    pub fn forget(&mut self, key: &Key) -> Option<NodeId> {
        match self.states.remove(key)? {
            State::Up { node, .. } => {
                self.nodes.remove(&node);
                Some(node)
            }
            State::Connecting { node, waiters, .. } => {
                let label = self
                    .nodes
                    .remove(&node)
                    .map(|i| i.label)
                    .unwrap_or_default();
                for w in waiters {
                    let _ = w.send(Err(TreeError::Hop(labelled(
                        &label,
                        "the connection was reset",
                    ))));
                }
                None
            }
            State::Failed { .. } => None,
        }
    }

    /// Drops every agent hop of the host named `host` (as [`Hops::forget`]);
    /// returns the nodes that were up.
    pub fn forget_host(&mut self, host: &str) -> Vec<NodeId> {
        let mut keys: Vec<Key> = self
            .hosts
            .iter()
            .filter(|(k, h)| *h == host && k.1 == HopRole::Agent)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        let mut up: Vec<NodeId> = keys.iter().filter_map(|k| self.forget(k)).collect();
        up.sort();
        up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> NodeInfo {
        NodeInfo {
            key: key(name),
            label: format!("{name} (agent)"),
            host: name.into(),
        }
    }

    fn key(name: &str) -> Key {
        let hop = Hop {
            name: name.into(),
            method: "ssh".into(),
            host: name.into(),
            ..Hop::default()
        };
        (HopKey::of(&[hop]), HopRole::Agent)
    }

    fn waiter() -> (Waiter, oneshot::Receiver<Result<NodeId, TreeError>>) {
        oneshot::channel()
    }

    fn absent(h: &mut Hops, k: &Key, task: Option<&str>) -> Waiter {
        h.lookup(k, task, waiter().0).expect("the hop is absent")
    }

    /// What a caller of `task` is answered at once.
    fn answer(h: &mut Hops, k: &Key, task: Option<&str>) -> Result<NodeId, TreeError> {
        let (w, mut rx) = waiter();
        assert!(h.lookup(k, task, w).is_none(), "answered");
        rx.try_recv().expect("answered at once")
    }

    #[test]
    fn a_connect_failure_is_remembered_for_its_task_only() {
        let mut h = Hops::default();
        let k = key("t1");
        let (w, mut rx) = waiter();
        h.connecting(NodeId(5), info("t1"), Some("task-a"), w);
        let (w2, mut rx2) = waiter();
        assert!(h.lookup(&k, Some("task-a"), w2).is_none());
        assert!(rx2.try_recv().is_err(), "waits while it connects");
        h.settle(NodeId(5), Err("refused".into()));
        assert_eq!(
            rx.try_recv().expect("answered"),
            Err(TreeError::Hop("t1 (agent): refused".into()))
        );
        assert!(rx2.try_recv().expect("answered").is_err());
        // The same task's next item: at once, with the same message.
        assert_eq!(
            answer(&mut h, &k, Some("task-a")),
            Err(TreeError::Hop("t1 (agent): refused".into()))
        );
        // Another task, or none: connect again.
        absent(&mut h, &k, Some("task-b"));
        absent(&mut h, &k, None);
    }

    #[test]
    fn a_lost_node_fails_its_last_task_and_is_reconnected_by_the_next() {
        let mut h = Hops::default();
        let k = key("t1");
        let (w, _rx) = waiter();
        h.connecting(NodeId(5), info("t1"), Some("a"), w);
        h.settle(NodeId(5), Ok(()));
        assert_eq!(answer(&mut h, &k, Some("b")), Ok(NodeId(5)));
        assert_eq!(h.lost(NodeId(5), "ssh exited"), Some("t1 (agent)".into()));
        assert_eq!(
            answer(&mut h, &k, Some("b")),
            Err(TreeError::Hop("t1 (agent): ssh exited".into()))
        );
        let w = absent(&mut h, &k, Some("c"));
        h.connecting(NodeId(9), info("t1"), Some("c"), w);
        // A late word about the old node changes nothing.
        assert_eq!(h.lost(NodeId(5), "late"), None);
        h.settle(NodeId(5), Ok(()));
        h.settle(NodeId(9), Ok(()));
        assert_eq!(h.up_node(&k), Some(NodeId(9)));
    }

    #[test]
    fn forget_drops_the_hop_and_answers_its_waiters() {
        let mut h = Hops::default();
        let k = key("t1");
        let (w, _rx) = waiter();
        h.connecting(NodeId(3), info("t1"), None, w);
        h.settle(NodeId(3), Ok(()));
        assert_eq!(h.forget(&k), Some(NodeId(3)));
        assert!(h.of(NodeId(3)).is_none());
        let w = absent(&mut h, &k, None);
        h.connecting(NodeId(7), info("t1"), None, w);
        h.settle(NodeId(7), Ok(()));
        assert_eq!(h.forget_host("t2"), vec![]);
        assert_eq!(h.forget_host("t1"), vec![NodeId(7)]);
        // A failure is forgotten too: the next caller of that task connects.
        let w = absent(&mut h, &k, Some("a"));
        h.connecting(NodeId(8), info("t1"), Some("a"), w);
        h.settle(NodeId(8), Err("refused".into()));
        assert!(answer(&mut h, &k, Some("a")).is_err());
        assert_eq!(h.forget_host("t1"), vec![]);
        absent(&mut h, &k, Some("a"));
        let w = absent(&mut h, &k, None);
        h.connecting(NodeId(4), info("t1"), None, w);
        let (w2, mut rx2) = waiter();
        assert!(h.lookup(&k, None, w2).is_none());
        assert_eq!(h.forget(&k), None);
        assert_eq!(
            rx2.try_recv().expect("answered"),
            Err(TreeError::Hop(
                "t1 (agent): the connection was reset".into()
            ))
        );
        assert!(!h.any_connecting());
    }
}
