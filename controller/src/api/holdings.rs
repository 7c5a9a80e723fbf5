//! What the daemon knows each agent and relay holds: the module zips (and
//! zip members) sent to each agent, and a mirror of each relay's content
//! cache, so requests send only what is missing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arbor_core::cache::Fifo;
use arbor_wire::NodeId;

use crate::tree::Hellos;

/// Module zips each agent holds, for this run: a module's zip (the large,
/// per-run constant part of an AnsiballZ script) crosses to an agent once;
/// later calls send the rest of the script and the zip's key.
#[derive(Clone)]
pub struct ZipCache(
    Arc<Mutex<HashMap<NodeId, HashSet<String>>>>,
    /// Per relay: held while a request that fills and injects from its
    /// cache is sent, so a put is never overtaken nor sent twice.
    Arc<Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>>,
    /// Per relay: a mirror of its content cache, fed the same puts in the
    /// same order, so it tells exactly which keys the relay holds.
    Arc<Mutex<HashMap<NodeId, Fifo<()>>>>,
    /// The nodes in the tree: what is kept for a node that left (a hop
    /// reconnected comes back as a new node) goes when a new one comes.
    Hellos,
);

/// Keys remembered per agent before the set starts afresh.
const ZIP_KEYS_PER_AGENT_MAX: usize = 4096;
/// Most bytes a relay keeps in its content cache (`ARBOR_RELAY_CACHE_BYTES`).
pub const RELAY_CACHE_BYTES_DEFAULT: u64 = 64 << 20;

impl ZipCache {
    pub fn new(nodes: Hellos) -> Self {
        ZipCache(Arc::default(), Arc::default(), Arc::default(), nodes)
    }

    /// Drops from `m` the nodes no longer in the tree.
    fn forget_gone<V>(&self, m: &mut HashMap<NodeId, V>) {
        if let Ok(up) = self.3.lock() {
            m.retain(|n, _| up.contains_key(n));
        }
    }

    pub(super) fn has(&self, node: NodeId, key: &str) -> bool {
        self.0
            .lock()
            .map(|m| m.get(&node).is_some_and(|s| s.contains(key)))
            .unwrap_or(false)
    }

    pub(super) fn relay_lock(&self, relay: NodeId) -> Arc<tokio::sync::Mutex<()>> {
        match self.1.lock() {
            Ok(mut m) => m.entry(relay).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Holds the locks of `relays`, a chain's relays, nearest first: every
    /// caller takes them in that order.
    pub(super) async fn lock_relays(
        &self,
        relays: &[NodeId],
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut held = Vec::with_capacity(relays.len());
        for r in relays {
            held.push(self.relay_lock(*r).lock_owned().await);
        }
        held
    }

    pub(super) fn relay_holds(&self, relay: NodeId, key: &str) -> bool {
        self.2
            .lock()
            .map(|m| m.get(&relay).is_some_and(|c| c.contains(key)))
            .unwrap_or(false)
    }

    /// Records a put into `relay`'s cache, as the relay will do it.
    pub(super) fn relay_put(&self, relay: NodeId, key: &str, weight: usize, max: u64) -> bool {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let Ok(mut m) = self.2.lock() else {
            return false;
        };
        if !m.contains_key(&relay) {
            self.forget_gone(&mut m);
            if let Ok(mut locks) = self.1.lock() {
                self.forget_gone(&mut locks);
            }
        }
        m.entry(relay).or_default().put(key, (), weight, max)
    }

    /// Starts the mirrors of `relays` afresh (a relay missed an entry the
    /// mirror said it held: puts again are harmless).
    pub(super) fn relay_reset(&self, relays: &[NodeId]) {
        if let Ok(mut m) = self.2.lock() {
            for r in relays {
                m.remove(r);
            }
        }
    }

    pub(super) fn set(&self, node: NodeId, key: &str) {
        if let Ok(mut m) = self.0.lock() {
            if !m.contains_key(&node) {
                self.forget_gone(&mut m);
            }
            let keys = m.entry(node).or_default();
            if keys.len() >= ZIP_KEYS_PER_AGENT_MAX {
                keys.clear();
            }
            keys.insert(key.to_string());
        }
    }
}
