//! Frames held back at a relay until its cache holds what an `Inject`
//! (or its cache and pins what a `Forward`) needs.
//!
//! Over one ssh channel the controller's `CachePut` of an entry always
//! arrives before an `Inject` that names it. Over QUIC each child subtree
//! has a lane of its own: an entry put for one host (in its lane) can be
//! named by another host's `Inject` (in that host's lane) that overtakes
//! it. So an `Inject` naming an entry this relay does not hold yet parks
//! its destination: the inject and every later frame from the parent to
//! that node wait, in order, until the entries arrive or
//! [`PARK_TIMEOUT`] passes (then the inject sends what it can and the
//! agent asks again for a short body, as before). A `Forward` to a relay
//! below is the same: the entry (a pin for the agent's code, say) may be
//! put here in the lane of this relay while the forward comes in the lane
//! of the relay below, ahead of it; that relay's spawn then waits behind
//! the forward, as it must. At most
//! [`PARKED_BYTES_MAX`] wait in all; past that the oldest park is let go.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use arbor_wire::{Frame, NodeId, StreamId};

/// How long a destination waits for the entries its inject names: they are
/// on their way (the daemon sent them first, in another lane), and a big one
/// takes a while through a lossy link.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of frames parked at one relay, in all.
pub const PARKED_BYTES_MAX: usize = 16 << 20;

/// Something held for a parked destination, in arrival order.
#[derive(Debug, PartialEq, Eq)]
pub enum Held {
    /// The parent's frame to that node.
    Frame(Frame),
    /// An inject into that node's stream.
    Inject { stream: StreamId, keys: Vec<String> },
    /// A forward of entries into that relay's cache and pins.
    Forward { keys: Vec<String>, max_bytes: u64 },
}

struct Park {
    since: Instant,
    /// Entries the first held inject waits for.
    missing: Vec<String>,
    held: VecDeque<Held>,
}

#[derive(Default)]
pub struct Parked {
    parks: HashMap<NodeId, Park>,
    bytes: usize,
}

impl Parked {
    /// Whether frames to `dst` must wait behind an inject.
    pub fn holds(&self, dst: NodeId) -> bool {
        self.parks.contains_key(&dst)
    }

    /// Parks `dst` behind an inject that waits for `missing`.
    pub fn park(&mut self, now: Instant, dst: NodeId, inject: Held, missing: Vec<String>) {
        let park = self.parks.entry(dst).or_insert_with(|| Park {
            since: now,
            missing,
            held: VecDeque::new(),
        });
        park.held.push_back(inject);
    }

    /// Holds `item` behind `dst`'s park; false if there is none.
    pub fn push(&mut self, dst: NodeId, item: Held) -> bool {
        let Some(park) = self.parks.get_mut(&dst) else {
            return false;
        };
        if let Held::Frame(f) = &item {
            self.bytes += f.payload.len();
        }
        park.held.push_back(item);
        true
    }

    /// The entry `key` arrived: the destinations no longer waiting, each
    /// with what it held, in order.
    pub fn arrived(&mut self, key: &str) -> Vec<(NodeId, VecDeque<Held>)> {
        let ready: Vec<NodeId> = self
            .parks
            .iter_mut()
            .filter_map(|(dst, p)| {
                p.missing.retain(|k| k != key);
                p.missing.is_empty().then_some(*dst)
            })
            .collect();
        ready.into_iter().filter_map(|d| self.release(d)).collect()
    }

    /// Parks past their time (or beyond the byte bound, oldest first):
    /// released as they are.
    pub fn expired(&mut self, now: Instant) -> Vec<(NodeId, VecDeque<Held>)> {
        let mut out: Vec<NodeId> = self
            .parks
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= PARK_TIMEOUT)
            .map(|(d, _)| *d)
            .collect();
        let mut by_age: Vec<(Instant, NodeId)> = self
            .parks
            .iter()
            .filter(|(d, _)| !out.contains(d))
            .map(|(d, p)| (p.since, *d))
            .collect();
        by_age.sort();
        let mut bytes = self.bytes - self.bytes_of(&out);
        for (_, d) in by_age {
            if bytes <= PARKED_BYTES_MAX {
                break;
            }
            bytes -= self.bytes_of(&[d]);
            out.push(d);
        }
        out.into_iter().filter_map(|d| self.release(d)).collect()
    }

    /// When the oldest park expires.
    pub fn deadline(&self) -> Option<Instant> {
        self.parks.values().map(|p| p.since + PARK_TIMEOUT).min()
    }

    fn bytes_of(&self, dsts: &[NodeId]) -> usize {
        dsts.iter()
            .filter_map(|d| self.parks.get(d))
            .flat_map(|p| p.held.iter())
            .map(|h| match h {
                Held::Frame(f) => f.payload.len(),
                Held::Inject { .. } | Held::Forward { .. } => 0,
            })
            .sum()
    }

    fn release(&mut self, dst: NodeId) -> Option<(NodeId, VecDeque<Held>)> {
        let bytes = self.bytes_of(&[dst]);
        let park = self.parks.remove(&dst)?;
        self.bytes -= bytes;
        Some((dst, park.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_wire::Kind;

    fn data(dst: u32, n: u8, len: usize) -> Held {
        Held::Frame(Frame::new(
            Kind::Data,
            NodeId(dst),
            NodeId(0),
            StreamId(9),
            vec![n; len],
        ))
    }

    fn inject(keys: &[&str]) -> Held {
        Held::Inject {
            stream: StreamId(9),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn a_destination_waits_for_every_key_then_goes_in_order() {
        let t0 = Instant::now();
        let mut p = Parked::default();
        assert!(!p.push(NodeId(5), data(5, 1, 10)), "nothing parked yet");
        p.park(
            t0,
            NodeId(5),
            inject(&["a", "b"]),
            vec!["a".into(), "b".into()],
        );
        assert!(p.holds(NodeId(5)) && !p.holds(NodeId(6)));
        assert!(p.push(NodeId(5), data(5, 1, 10)));
        assert!(p.push(NodeId(5), data(5, 2, 10)));
        assert!(p.arrived("a").is_empty(), "b is still missing");
        let out = p.arrived("b");
        assert_eq!(out.len(), 1);
        let (dst, held) = &out[0];
        assert_eq!(*dst, NodeId(5));
        assert_eq!(
            held.iter().collect::<Vec<_>>(),
            [&inject(&["a", "b"]), &data(5, 1, 10), &data(5, 2, 10)]
        );
        assert!(!p.holds(NodeId(5)));
        assert_eq!(p.bytes, 0);
    }

    #[test]
    fn a_park_ends_at_its_time_or_past_the_byte_bound() {
        let t0 = Instant::now();
        let mut p = Parked::default();
        p.park(t0, NodeId(5), inject(&["a"]), vec!["a".into()]);
        assert_eq!(p.deadline(), Some(t0 + PARK_TIMEOUT));
        assert!(p.expired(t0 + PARK_TIMEOUT / 2).is_empty());
        let out = p.expired(t0 + PARK_TIMEOUT);
        assert_eq!(out.len(), 1);
        assert_eq!(p.deadline(), None);

        p.park(t0, NodeId(7), inject(&["x"]), vec!["x".into()]);
        p.park(
            t0 + Duration::from_millis(1),
            NodeId(8),
            inject(&["y"]),
            vec!["y".into()],
        );
        let chunk = 1 << 20;
        for _ in 0..(PARKED_BYTES_MAX / chunk) {
            p.push(NodeId(7), data(7, 0, chunk));
        }
        p.push(NodeId(8), data(8, 0, chunk));
        let out = p.expired(t0 + Duration::from_millis(2));
        assert_eq!(out.len(), 1, "the oldest goes");
        assert_eq!(out[0].0, NodeId(7));
        assert!(p.holds(NodeId(8)));
        assert!(p.bytes <= PARKED_BYTES_MAX);
    }
}
