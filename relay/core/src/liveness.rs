//! Whether the link to a parent is alive: a link is alive while something
//! crossed it, either way, within the keepalive. Frames from the parent
//! count, and so do bytes the parent took from us (a slow link busy with
//! our output delays the pings queued behind it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use arbor_wire::NodeId;

/// The least keepalive a relay accepts, whatever it is told.
pub const KEEPALIVE_MIN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// The last time a frame came from the parent or the parent took bytes.
    last: Instant,
    /// How long the link may be silent; none until the parent says.
    limit: Option<Duration>,
}

impl Liveness {
    pub fn new(now: Instant) -> Self {
        Liveness {
            last: now,
            limit: None,
        }
    }

    /// A frame came from the parent, or the parent took bytes, at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.last = self.last.max(now);
    }

    /// The parent's bound: silent longer than `limit` (at least
    /// [`KEEPALIVE_MIN`]), the link is dead. Counts as hearing from it.
    pub fn set_limit(&mut self, now: Instant, limit: Duration) {
        self.limit = Some(limit.max(KEEPALIVE_MIN));
        self.heard(now);
    }

    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// When the link is declared dead if nothing crosses it before.
    pub fn deadline(&self) -> Option<Instant> {
        self.limit.map(|k| self.last + k)
    }

    pub fn is_dead(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }
}

/// Pings per keepalive: a node is pinged well within its bound, so one
/// late ping does not end it.
pub const PINGS_PER_KEEPALIVE: u32 = 3;

/// The controller's side of the keepalive: the nodes told a keepalive
/// (relays, first-hop agents), each pinged [`PINGS_PER_KEEPALIVE`] times
/// per keepalive.
#[derive(Debug)]
pub struct Pinger {
    every: Duration,
    next: Instant,
    watched: BTreeSet<NodeId>,
}

impl Pinger {
    pub fn new(now: Instant, keepalive: Duration) -> Self {
        let every = (keepalive / PINGS_PER_KEEPALIVE).max(Duration::from_millis(1));
        Pinger {
            every,
            next: now + every,
            watched: BTreeSet::new(),
        }
    }

    pub fn watch(&mut self, node: NodeId) {
        self.watched.insert(node);
    }

    pub fn forget(&mut self, node: NodeId) {
        self.watched.remove(&node);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.watched.is_empty()).then_some(self.next)
    }

    /// The nodes to ping now (none before the next round is due).
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<NodeId> {
        if now < self.next {
            return Vec::new();
        }
        self.next = now + self.every;
        self.watched.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_dead_only_past_its_limit_of_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        assert!(!l.is_dead(t0 + Duration::from_secs(3600)), "no limit yet");
        l.set_limit(t0, Duration::from_millis(10));
        assert_eq!(l.limit(), Some(KEEPALIVE_MIN));
        assert!(!l.is_dead(t0 + KEEPALIVE_MIN - Duration::from_millis(1)));
        assert!(l.is_dead(t0 + KEEPALIVE_MIN), "dead at its deadline");
        l.heard(t0 + Duration::from_millis(900));
        assert!(!l.is_dead(t0 + Duration::from_millis(1800)));
        // An older report does not move it back.
        l.heard(t0);
        assert_eq!(
            l.deadline(),
            Some(t0 + Duration::from_millis(900) + KEEPALIVE_MIN)
        );
    }

    #[test]
    fn watched_nodes_are_pinged_three_times_per_keepalive() {
        let t0 = Instant::now();
        let mut p = Pinger::new(t0, Duration::from_secs(15));
        assert_eq!(p.poll_timeout(), None, "nothing to ping");
        p.watch(NodeId(2));
        p.watch(NodeId(1));
        assert_eq!(p.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        assert!(p.handle_timeout(t0 + Duration::from_secs(4)).is_empty());
        let t = t0 + Duration::from_secs(5);
        assert_eq!(p.handle_timeout(t), vec![NodeId(1), NodeId(2)]);
        assert!(p.handle_timeout(t).is_empty(), "once per round");
        p.forget(NodeId(1));
        assert_eq!(
            p.handle_timeout(t + Duration::from_secs(5)),
            vec![NodeId(2)]
        );
    }
}
