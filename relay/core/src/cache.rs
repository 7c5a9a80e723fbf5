//! A relay's content cache: entries by key, at most a bound of bytes in
//! all, the oldest put first out. The relay keeps the bytes; the controller
//! runs the same code with `()` values, fed the same puts in the same
//! order, so it knows exactly which keys each relay holds.

use std::collections::{HashMap, VecDeque};

use arbor_wire::NodeId;

#[derive(Debug)]
pub struct Fifo<V> {
    entries: HashMap<String, (V, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

impl<V> Default for Fifo<V> {
    fn default() -> Self {
        Fifo {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<V> Fifo<V> {
    /// Keeps `value` (weighing `weight` bytes) under `key`, the oldest
    /// entries going while the cache would hold more than `max` bytes. An
    /// entry already held stays where it is; one heavier than `max` is not
    /// kept. Returns whether `key` is held afterwards.
    pub fn put(&mut self, key: &str, value: V, weight: usize, max: usize) -> bool {
        if self.entries.contains_key(key) {
            return true;
        }
        if weight > max {
            return false;
        }
        while self.bytes + weight > max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, w)) = self.entries.remove(&old) {
                self.bytes -= w;
            }
        }
        self.bytes += weight;
        self.order.push_back(key.to_string());
        self.entries.insert(key.to_string(), (value, weight));
        true
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.entries.get(key).map(|(v, _)| v)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One step that moves an entry toward the last relay of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The controller puts the entry into `relay`'s cache (`CachePut`).
    Put { relay: NodeId },
    /// `via` puts its copy into the cache of `dst`, the relay below it
    /// (`Forward`).
    Forward { via: NodeId, dst: NodeId },
}

/// The daemon's mirror of every relay's content cache: each relay's own
/// rule ([`Fifo`]) fed the same puts in the same order, so it tells exactly
/// which keys each relay holds, and plans the fewest crossings.
#[derive(Debug, Default)]
pub struct Mirror {
    relays: HashMap<NodeId, Fifo<()>>,
}

impl Mirror {
    pub fn holds(&self, relay: NodeId, key: &str) -> bool {
        self.relays.get(&relay).is_some_and(|c| c.contains(key))
    }

    /// The steps that make the last of `relays` (a chain's relays, nearest
    /// the controller first) hold `key`, recorded as done: from the
    /// nearest relay that holds it, else put into the first and forwarded
    /// down, so its bytes cross each link at most once. None (and nothing
    /// recorded) if a cache cannot keep an entry of `weight` bytes.
    pub fn plan(
        &mut self,
        relays: &[NodeId],
        key: &str,
        weight: usize,
        max: usize,
    ) -> Option<Vec<Step>> {
        let &last = relays.last()?;
        if self.holds(last, key) {
            return Some(Vec::new());
        }
        if weight > max {
            return None;
        }
        let mut steps = Vec::new();
        let from = match relays.iter().rposition(|r| self.holds(*r, key)) {
            Some(i) => i,
            None => {
                steps.push(Step::Put { relay: relays[0] });
                0
            }
        };
        for pair in relays[from..].windows(2) {
            steps.push(Step::Forward {
                via: pair[0],
                dst: pair[1],
            });
        }
        for step in &steps {
            let relay = match *step {
                Step::Put { relay } => relay,
                Step::Forward { dst, .. } => dst,
            };
            self.relays
                .entry(relay)
                .or_default()
                .put(key, (), weight, max);
        }
        Some(steps)
    }

    /// Starts the mirrors of `relays` afresh (one missed an entry the
    /// mirror said it held: puts again are harmless).
    pub fn reset(&mut self, relays: &[NodeId]) {
        for r in relays {
            self.relays.remove(r);
        }
    }

    /// Keeps only the relays still in the tree.
    pub fn retain(&mut self, mut up: impl FnMut(NodeId) -> bool) {
        self.relays.retain(|r, _| up(*r));
    }

    pub fn knows(&self, relay: NodeId) -> bool {
        self.relays.contains_key(&relay)
    }

    /// What each relay's cache holds: (relay, bytes, entries), by node.
    pub fn usage(&self) -> Vec<(NodeId, usize, usize)> {
        let mut u: Vec<_> = self
            .relays
            .iter()
            .map(|(r, c)| (*r, c.bytes(), c.len()))
            .collect();
        u.sort();
        u
    }
}

#[cfg(test)]
mod tests {
    use super::{Fifo, Mirror, NodeId, Step};

    #[test]
    fn a_plan_crosses_each_link_once_from_the_nearest_holder() {
        let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
        let mut m = Mirror::default();
        assert_eq!(
            m.plan(&[a, b, c], "k", 10, 100),
            Some(vec![
                Step::Put { relay: a },
                Step::Forward { via: a, dst: b },
                Step::Forward { via: b, dst: c }
            ])
        );
        assert_eq!(m.plan(&[a, b, c], "k", 10, 100), Some(vec![]));
        m.reset(&[c]);
        assert_eq!(
            m.plan(&[a, b, c], "k", 10, 100),
            Some(vec![Step::Forward { via: b, dst: c }])
        );
        assert_eq!(m.plan(&[a], "big", 101, 100), None);
        assert!(!m.holds(a, "big"));
    }

    #[test]
    fn oldest_go_first_and_the_bound_holds() {
        let mut c = Fifo::default();
        assert!(c.put("a", 1, 4, 10));
        assert!(c.put("b", 2, 4, 10));
        assert!(c.put("a", 9, 4, 10), "held already");
        assert_eq!(c.get("a"), Some(&1));
        assert!(c.put("c", 3, 4, 10));
        assert!(!c.contains("a"));
        assert!(c.contains("b") && c.contains("c"));
        assert_eq!(c.bytes(), 8);
        assert!(!c.put("big", 4, 11, 10));
        assert_eq!(c.bytes(), 8);
        // A smaller bound later evicts down to it.
        assert!(c.put("d", 4, 3, 6));
        assert!(!c.contains("b") && !c.contains("c") && c.contains("d"));
        assert_eq!(c.bytes(), 3);
    }

    #[test]
    fn a_mirror_fed_the_same_puts_agrees() {
        let mut bytes: Fifo<Vec<u8>> = Fifo::default();
        let mut mirror: Fifo<()> = Fifo::default();
        let mut x = 7u64;
        for i in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = format!("k{}", (x >> 33) % 50);
            let w = ((x >> 20) % 300) as usize;
            let max = if i % 100 == 0 { 500 } else { 1000 };
            let a = bytes.put(&key, vec![0; w], w, max);
            let b = mirror.put(&key, (), w, max);
            assert_eq!(a, b);
            for k in 0..50 {
                let k = format!("k{k}");
                assert_eq!(bytes.contains(&k), mirror.contains(&k));
            }
            assert!(bytes.bytes() <= 1000);
        }
    }
}
