//! Which hop is which node, and what became of each: connecting (with the
//! callers waiting for it), up, or failed. The tree's reconnect rule:
//! a failure is remembered only for the task that met it (every host and
//! loop item of that task gets it at once, as a dead via host should cost
//! one timeout, not one per item); the next task connects again, so a
//! restarted target, a reboot or a healed link is picked up without
//! restarting the run. `forget` drops a hop (`meta: reset_connection`): its
//! next use connects afresh.
//!
//! Sans-IO: keys and waiters are the caller's types (the daemon's are a
//! hop's path and a oneshot sender), and answering a waiter is the
//! function it gives [`Hops::new`].

use std::collections::HashMap;
use std::hash::Hash;

use arbor_wire::NodeId;

/// What a waiter is told: the hop's node, or why it failed (a message
/// starting with the hop's label).
pub type Outcome = Result<NodeId, String>;

enum State<W> {
    Connecting {
        node: NodeId,
        waiters: Vec<W>,
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

/// `why` as a message of `label`'s: prefixed with it unless it already is.
pub fn labelled(label: &str, why: &str) -> String {
    if why.starts_with(label) {
        why.to_string()
    } else {
        format!("{label}: {why}")
    }
}

/// A node this table started: its hop, label and host's inventory name.
#[derive(Clone, Debug)]
pub struct NodeInfo<K> {
    pub key: K,
    pub label: String,
    pub host: String,
}

pub struct Hops<K, W> {
    states: HashMap<K, State<W>>,
    nodes: HashMap<NodeId, NodeInfo<K>>,
    /// The host's inventory name of every hop ever connected (as many as
    /// the inventory has hops).
    hosts: HashMap<K, String>,
    answer: fn(W, Outcome),
}

impl<K: Clone + Eq + Hash + Ord, W> Hops<K, W> {
    /// An empty table whose waiters are answered by `answer`.
    pub fn new(answer: fn(W, Outcome)) -> Self {
        Hops {
            states: HashMap::new(),
            nodes: HashMap::new(),
            hosts: HashMap::new(),
            answer,
        }
    }

    /// Answers `waiter` (of `task`) about the hop `key`: its node if it is
    /// up, later if it is connecting, its failure if that was met by the
    /// same task. Otherwise hands the waiter back: the caller connects it.
    pub fn lookup(&mut self, key: &K, task: Option<&str>, waiter: W) -> Option<W> {
        match self.states.get_mut(key) {
            Some(State::Up { node, task: last }) => {
                if task.is_some() {
                    *last = task.map(str::to_string);
                }
                (self.answer)(waiter, Ok(*node));
            }
            Some(State::Connecting { waiters, .. }) => waiters.push(waiter),
            Some(State::Failed { why, task: t }) if task.is_some() && t.as_deref() == task => {
                (self.answer)(waiter, Err(why.clone()));
            }
            _ => return Some(waiter),
        }
        None
    }

    /// `node` is connecting as the hop `info.key`, for `waiter` (of `task`).
    pub fn connecting(&mut self, node: NodeId, info: NodeInfo<K>, task: Option<&str>, waiter: W) {
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
    pub fn up_node(&self, key: &K) -> Option<NodeId> {
        match self.states.get(key) {
            Some(State::Up { node, .. }) => Some(*node),
            _ => None,
        }
    }

    /// What this table knows of a node it started.
    pub fn of(&self, node: NodeId) -> Option<&NodeInfo<K>> {
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
                    Err(why),
                )
            }
        };
        self.states.insert(key, state);
        for w in waiters {
            (self.answer)(w, answer.clone());
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
    pub fn forget(&mut self, key: &K) -> Option<NodeId> {
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
                    (self.answer)(w, Err(labelled(&label, "the connection was reset")));
                }
                None
            }
            State::Failed { .. } => None,
        }
    }

    /// Drops every hop of the host named `host` that `pick` picks (as
    /// [`Hops::forget`]);
    /// returns the nodes that were up.
    pub fn forget_host(&mut self, host: &str, pick: impl Fn(&K) -> bool) -> Vec<NodeId> {
        let mut keys: Vec<K> = self
            .hosts
            .iter()
            .filter(|(k, h)| *h == host && pick(k))
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
    use std::sync::mpsc;

    type Key = (String, u8);
    type Waiter = mpsc::Sender<Outcome>;

    fn table() -> Hops<Key, Waiter> {
        Hops::new(|w, outcome| {
            let _ = w.send(outcome);
        })
    }

    fn info(name: &str) -> NodeInfo<Key> {
        NodeInfo {
            key: key(name),
            label: format!("{name} (agent)"),
            host: name.into(),
        }
    }

    /// A target's agent hop (role 1; 0 would be a relay).
    fn key(name: &str) -> Key {
        (name.to_string(), 1)
    }

    fn is_agent(k: &Key) -> bool {
        k.1 == 1
    }

    fn waiter() -> (Waiter, mpsc::Receiver<Outcome>) {
        mpsc::channel()
    }

    fn absent(h: &mut Hops<Key, Waiter>, k: &Key, task: Option<&str>) -> Waiter {
        h.lookup(k, task, waiter().0).expect("the hop is absent")
    }

    /// What a caller of `task` is answered at once.
    fn answer(h: &mut Hops<Key, Waiter>, k: &Key, task: Option<&str>) -> Outcome {
        let (w, rx) = waiter();
        assert!(h.lookup(k, task, w).is_none(), "answered");
        rx.try_recv().expect("answered at once")
    }

    #[test]
    fn a_connect_failure_is_remembered_for_its_task_only() {
        let mut h = table();
        let k = key("t1");
        let (w, rx) = waiter();
        h.connecting(NodeId(5), info("t1"), Some("task-a"), w);
        let (w2, rx2) = waiter();
        assert!(h.lookup(&k, Some("task-a"), w2).is_none());
        assert!(rx2.try_recv().is_err(), "waits while it connects");
        h.settle(NodeId(5), Err("refused".into()));
        assert_eq!(
            rx.try_recv().expect("answered"),
            Err("t1 (agent): refused".into())
        );
        assert!(rx2.try_recv().expect("answered").is_err());
        // The same task's next item: at once, with the same message.
        assert_eq!(
            answer(&mut h, &k, Some("task-a")),
            Err("t1 (agent): refused".into())
        );
        // Another task, or none: connect again.
        absent(&mut h, &k, Some("task-b"));
        absent(&mut h, &k, None);
    }

    #[test]
    fn a_lost_node_fails_its_last_task_and_is_reconnected_by_the_next() {
        let mut h = table();
        let k = key("t1");
        let (w, _rx) = waiter();
        h.connecting(NodeId(5), info("t1"), Some("a"), w);
        h.settle(NodeId(5), Ok(()));
        assert_eq!(answer(&mut h, &k, Some("b")), Ok(NodeId(5)));
        assert_eq!(h.lost(NodeId(5), "ssh exited"), Some("t1 (agent)".into()));
        assert_eq!(
            answer(&mut h, &k, Some("b")),
            Err("t1 (agent): ssh exited".into())
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
        let mut h = table();
        let k = key("t1");
        let (w, _rx) = waiter();
        h.connecting(NodeId(3), info("t1"), None, w);
        h.settle(NodeId(3), Ok(()));
        assert_eq!(h.forget(&k), Some(NodeId(3)));
        assert!(h.of(NodeId(3)).is_none());
        let w = absent(&mut h, &k, None);
        h.connecting(NodeId(7), info("t1"), None, w);
        h.settle(NodeId(7), Ok(()));
        assert_eq!(h.forget_host("t2", is_agent), vec![]);
        assert_eq!(h.forget_host("t1", is_agent), vec![NodeId(7)]);
        // A failure is forgotten too: the next caller of that task connects.
        let w = absent(&mut h, &k, Some("a"));
        h.connecting(NodeId(8), info("t1"), Some("a"), w);
        h.settle(NodeId(8), Err("refused".into()));
        assert!(answer(&mut h, &k, Some("a")).is_err());
        assert_eq!(h.forget_host("t1", is_agent), vec![]);
        absent(&mut h, &k, Some("a"));
        let w = absent(&mut h, &k, None);
        h.connecting(NodeId(4), info("t1"), None, w);
        let (w2, rx2) = waiter();
        assert!(h.lookup(&k, None, w2).is_none());
        assert_eq!(h.forget(&k), None);
        assert_eq!(
            rx2.try_recv().expect("answered"),
            Err("t1 (agent): the connection was reset".into())
        );
        assert!(!h.any_connecting());
    }
}
