//! What the daemon knows each agent and relay holds: the module zips (and
//! zip members) sent to each agent, and a mirror of each relay's content
//! cache, so requests send only what is missing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arbor_core::cache::{Mirror, Step};
use arbor_wire::NodeId;

use crate::tree::Hellos;

/// What the daemon knows each agent and relay holds. Module zips each
/// agent holds, for this run: a module's zip (the large, per-run constant
/// part of an AnsiballZ script) crosses to an agent once; later calls send
/// the rest of the script and the zip's key.
#[derive(Clone)]
pub struct Holdings(
    Arc<Mutex<HashMap<NodeId, HashSet<String>>>>,
    /// Per relay: held while a request that fills and injects from its
    /// cache is sent, so a put is never overtaken nor sent twice.
    Arc<Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>>,
    /// A mirror of every relay's content cache (`arbor_core::cache`).
    Arc<Mutex<Mirror>>,
    /// The nodes in the tree: what is kept for a node that left (a hop
    /// reconnected comes back as a new node) goes when a new one comes.
    Hellos,
);

/// Keys remembered per agent before the set starts afresh.
const ZIP_KEYS_PER_AGENT_MAX: usize = 4096;
/// Most bytes a relay keeps in its content cache (`ARBOR_RELAY_CACHE_BYTES`).
pub const RELAY_CACHE_BYTES_DEFAULT: u64 = 64 << 20;

impl Holdings {
    pub fn new(nodes: Hellos) -> Self {
        Holdings(Arc::default(), Arc::default(), Arc::default(), nodes)
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
        self.2.lock().map(|m| m.holds(relay, key)).unwrap_or(false)
    }

    /// The steps that put `key` into the last of `relays`, recorded in the
    /// mirror as the relays will do them (see `Mirror::plan`).
    pub(super) fn relay_plan(
        &self,
        relays: &[NodeId],
        key: &str,
        weight: usize,
        max: u64,
    ) -> Option<Vec<Step>> {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let mut m = self.2.lock().ok()?;
        if relays.iter().any(|r| !m.knows(*r)) {
            if let Ok(up) = self.3.lock() {
                m.retain(|r| up.contains_key(&r));
            }
            if let Ok(mut locks) = self.1.lock() {
                self.forget_gone(&mut locks);
            }
        }
        m.plan(relays, key, weight, max)
    }

    /// Starts the mirrors of `relays` afresh (a relay missed an entry the
    /// mirror said it held: puts again are harmless).
    pub(super) fn relay_reset(&self, relays: &[NodeId]) {
        if let Ok(mut m) = self.2.lock() {
            m.reset(relays);
        }
    }

    /// What each relay's content cache holds: (relay, bytes, entries).
    pub(super) fn relay_cache_use(&self) -> Vec<(NodeId, usize, usize)> {
        self.2.lock().map(|m| m.usage()).unwrap_or_default()
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
