//! The become agents of each login agent: which are up, which are starting
//! (and who waits for them), and which go first when a target holds as
//! many interpreters as it may (the least recently used).
//!
//! Sans-IO state, driven by the daemon's tree task, which allocates node
//! ids and sends what these decisions call for. Waiters are the caller's
//! type, answered by the function it gives [`Becomes::new`].

use std::collections::HashMap;

use arbor_wire::NodeId;

/// A nested (become) agent, as asked for by `TreeHandle::become_slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BecomeSlot {
    /// It is up.
    Ready(NodeId),
    /// Nobody has started it: the caller starts it as this node on the
    /// parent agent, then reports with `TreeHandle::become_done`.
    Start(NodeId),
}

/// What a waiter is told: the slot (None: not up, and not to be started
/// by this caller), or why its start failed.
pub type Outcome = Result<Option<BecomeSlot>, String>;

/// (login agent, become key).
type Key = (NodeId, String);

enum State<W> {
    Starting(Vec<W>),
    Up,
}

struct Agent<W> {
    node: NodeId,
    state: State<W>,
    last_used: u64,
}

/// What [`Becomes::slot`] decided.
pub enum Decision {
    /// The caller was answered (up, starting, or not up and not to start).
    Answered,
    /// The caller starts `node`; `evict`, if any, is to be ended first.
    Start { node: NodeId, evict: Option<NodeId> },
}

pub struct Becomes<W> {
    agents: HashMap<Key, Agent<W>>,
    /// Each become agent's key and label.
    of: HashMap<NodeId, (Key, String)>,
    clock: u64,
    /// Most interpreters per target, the login agent's included.
    interpreters_max: usize,
    answer: fn(W, Outcome),
}

impl<W> Becomes<W> {
    /// No become agents yet; at most `interpreters_max` interpreters per
    /// target; waiters are answered by `answer`.
    pub fn new(interpreters_max: usize, answer: fn(W, Outcome)) -> Self {
        Becomes {
            agents: HashMap::new(),
            of: HashMap::new(),
            clock: 0,
            interpreters_max: interpreters_max.max(2),
            answer,
        }
    }

    /// The become agent `key` under `parent`: answers `done` if it is up
    /// (or, without `start`, if it is not), queues it if it is starting,
    /// and otherwise has the caller start it as a new node from `new_node`.
    pub fn slot(
        &mut self,
        parent: NodeId,
        key: String,
        label: String,
        start: bool,
        new_node: impl FnOnce() -> NodeId,
        done: W,
    ) -> Decision {
        self.clock += 1;
        let clock = self.clock;
        let k = (parent, key);
        if let Some(b) = self.agents.get_mut(&k) {
            match &mut b.state {
                State::Up => {
                    b.last_used = clock;
                    (self.answer)(done, Ok(Some(BecomeSlot::Ready(b.node))));
                }
                State::Starting(waiters) if start => waiters.push(done),
                State::Starting(_) => {
                    (self.answer)(done, Ok(None));
                }
            }
            return Decision::Answered;
        }
        if !start {
            (self.answer)(done, Ok(None));
            return Decision::Answered;
        }
        // Room for one more: the login agent counts as one interpreter.
        let siblings = self.agents.keys().filter(|(p, _)| *p == parent).count();
        let mut evict = None;
        if siblings + 2 > self.interpreters_max {
            let lru = self
                .agents
                .iter()
                .filter(|((p, _), b)| *p == parent && matches!(b.state, State::Up))
                .min_by_key(|(_, b)| b.last_used)
                .map(|(k, b)| (k.clone(), b.node));
            if let Some((old_key, old)) = lru {
                self.agents.remove(&old_key);
                self.of.remove(&old);
                evict = Some(old);
            }
        }
        let node = new_node();
        self.agents.insert(
            k.clone(),
            Agent {
                node,
                state: State::Starting(Vec::new()),
                last_used: clock,
            },
        );
        self.of.insert(node, (k, label));
        (self.answer)(done, Ok(Some(BecomeSlot::Start(node))));
        Decision::Start { node, evict }
    }

    /// A become agent started, or failed to: waiters learn which. A failed
    /// one is forgotten, so a later task (say with the right password)
    /// tries again. False if `node` was not starting.
    pub fn settle(&mut self, node: NodeId, outcome: Result<(), String>) -> bool {
        let Some((k, _)) = self.of.get(&node).cloned() else {
            return false;
        };
        let waiters = match self.agents.get_mut(&k) {
            Some(b) if b.node == node => match std::mem::replace(&mut b.state, State::Up) {
                State::Starting(w) => w,
                State::Up => Vec::new(),
            },
            _ => return false,
        };
        if outcome.is_err() {
            self.agents.remove(&k);
            self.of.remove(&node);
        }
        for w in waiters {
            let answer = outcome.clone().map(|()| Some(BecomeSlot::Ready(node)));
            (self.answer)(w, answer);
        }
        true
    }

    /// The label of a become agent.
    pub fn label_of(&self, node: NodeId) -> Option<&str> {
        self.of.get(&node).map(|(_, l)| l.as_str())
    }

    /// Forgets the become agent under `parent` that `is_it` picks (by its
    /// processes): the caller ends it; its next use starts a new one.
    pub fn release(&mut self, parent: NodeId, is_it: impl Fn(NodeId) -> bool) -> Option<NodeId> {
        let (key, node) = self
            .agents
            .iter()
            .find(|((p, _), b)| *p == parent && is_it(b.node))
            .map(|(k, b)| (k.clone(), b.node))?;
        self.agents.remove(&key);
        self.of.remove(&node);
        Some(node)
    }

    /// `node` left the tree: it, and every become agent under it, fail
    /// (their waiters learn why) and are forgotten.
    pub fn lost(&mut self, node: NodeId, why: &str) {
        let lost: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|((p, _), b)| *p == node || b.node == node)
            .map(|(_, b)| b.node)
            .collect();
        for n in lost {
            self.settle(n, Err(why.to_string()));
            if let Some((k, _)) = self.of.remove(&n) {
                self.agents.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    type Waiter = mpsc::Sender<Outcome>;

    fn table(interpreters_max: usize) -> Becomes<Waiter> {
        Becomes::new(interpreters_max, |w, outcome| {
            let _ = w.send(outcome);
        })
    }

    fn ask(
        b: &mut Becomes<Waiter>,
        parent: u32,
        key: &str,
        start: bool,
        next: u32,
    ) -> (Decision, Option<BecomeSlot>) {
        let (tx, rx) = mpsc::channel();
        let d = b.slot(
            NodeId(parent),
            key.into(),
            key.into(),
            start,
            || NodeId(next),
            tx,
        );
        let got = rx.try_recv().ok().and_then(|r| r.ok()).flatten();
        (d, got)
    }

    #[test]
    fn one_start_then_ready_and_the_least_recently_used_makes_room() {
        let mut b = table(3); // the login agent and two become agents
        assert!(ask(&mut b, 1, "root", false, 0).1.is_none());
        let (d, slot) = ask(&mut b, 1, "root", true, 10);
        assert!(matches!(
            d,
            Decision::Start {
                node: NodeId(10),
                evict: None
            }
        ));
        assert_eq!(slot, Some(BecomeSlot::Start(NodeId(10))));
        assert!(b.settle(NodeId(10), Ok(())));
        assert_eq!(
            ask(&mut b, 1, "root", true, 99).1,
            Some(BecomeSlot::Ready(NodeId(10)))
        );
        ask(&mut b, 1, "www", true, 11);
        b.settle(NodeId(11), Ok(()));
        ask(&mut b, 1, "www", true, 99); // www is now the more recent
        let (d, _) = ask(&mut b, 1, "db", true, 12);
        assert!(matches!(
            d,
            Decision::Start {
                node: NodeId(12),
                evict: Some(NodeId(10))
            }
        ));
        assert_eq!(b.label_of(NodeId(10)), None);
        assert_eq!(b.label_of(NodeId(12)), Some("db"));
    }

    #[test]
    fn a_failed_start_is_forgotten_and_a_lost_parent_takes_its_children() {
        let mut b = table(20);
        ask(&mut b, 1, "root", true, 10);
        let (tx, rx) = mpsc::channel();
        b.slot(
            NodeId(1),
            "root".into(),
            "root".into(),
            true,
            || NodeId(0),
            tx,
        );
        b.settle(NodeId(10), Err("Incorrect sudo password".into()));
        assert_eq!(
            rx.try_recv().expect("answered"),
            Err("Incorrect sudo password".into())
        );
        assert!(matches!(
            ask(&mut b, 1, "root", true, 11).0,
            Decision::Start {
                node: NodeId(11),
                ..
            }
        ));
        b.settle(NodeId(11), Ok(()));
        assert_eq!(b.release(NodeId(1), |n| n == NodeId(11)), Some(NodeId(11)));
        assert_eq!(b.release(NodeId(1), |n| n == NodeId(11)), None);
        ask(&mut b, 1, "www", true, 12);
        b.lost(NodeId(1), "gone");
        assert_eq!(b.label_of(NodeId(12)), None);
    }
}
