//! A relay's cache entries going on: forwards into the cache of a relay
//! below, injects into an agent's stream, and both parked until the
//! entries they name have arrived (see [`Parked`](crate::parked::Parked)).

use std::collections::VecDeque;
use std::time::Instant;

use arbor_wire::control::{self, Request};
use arbor_wire::{Frame, Kind, NodeId, StreamId};

use super::{Relay, PARENT};
use crate::parked::Held;

impl Relay {
    /// Puts cached entries into the cache of the relay `dst` below, as the
    /// controller's own requests (pinned entries as pins).
    fn forward(&mut self, now: Instant, dst: NodeId, keys: &[String], max_bytes: u64) {
        for key in keys {
            let put = match (self.cache.get(key), self.pins.get(key)) {
                (Some(data), _) => Request::CachePut {
                    key: key.clone(),
                    data: data.clone(),
                    max_bytes,
                },
                (None, Some(data)) => Request::Pin {
                    key: key.clone(),
                    data: data.clone(),
                },
                (None, None) => return,
            };
            let f = Frame::new(
                Kind::Request,
                dst,
                NodeId::CONTROLLER,
                StreamId(0),
                control::encode(&put),
            );
            self.node.handle_frame(now, PARENT, f);
        }
    }

    /// An inject into `dst`'s stream or a forward into the relay `dst`:
    /// done now, or held behind `dst`'s park, or parking `dst` until this
    /// relay holds the entries it names (an inject's in the cache, a
    /// forward's in the cache or the pins; see [`crate::parked`]).
    pub(super) fn enter(&mut self, now: Instant, dst: NodeId, item: Held) {
        if self.parked.holds(dst) {
            self.parked.push(dst, item);
            return;
        }
        let (keys, pinned_too) = match &item {
            Held::Inject { keys, .. } => (keys.as_slice(), false),
            Held::Forward { keys, .. } => (keys.as_slice(), true),
            Held::Frame(_) => (&[][..], false),
        };
        let missing: Vec<String> = keys
            .iter()
            .filter(|k| self.cache.get(k).is_none() && !(pinned_too && self.pins.contains_key(*k)))
            .cloned()
            .collect();
        if missing.is_empty() {
            self.go(now, dst, item);
        } else {
            self.parked.park(now, dst, item, missing);
        }
    }

    /// Does `item` with what this relay holds now.
    fn go(&mut self, now: Instant, dst: NodeId, item: Held) {
        match item {
            Held::Inject { stream, keys } => self.send_injected(now, dst, stream, &keys),
            Held::Forward { keys, max_bytes } => self.forward(now, dst, &keys, max_bytes),
            Held::Frame(f) => self.handle_frame(now, PARENT, f),
        }
    }

    /// What a park held, in order; `expired`: its first item goes with
    /// what this relay holds (an agent asks again for a short body).
    pub(super) fn replay(
        &mut self,
        now: Instant,
        dst: NodeId,
        held: VecDeque<Held>,
        expired: bool,
    ) {
        let mut first = expired;
        for item in held {
            match item {
                Held::Frame(f) => self.handle_frame(now, PARENT, f),
                item if first => self.go(now, dst, item),
                item => self.enter(now, dst, item),
            }
            first = false;
        }
    }

    /// Sends cached entries to `dst` as the controller's Data frames,
    /// routed exactly as the controller's own frames from the parent.
    fn send_injected(&mut self, now: Instant, dst: NodeId, stream: StreamId, keys: &[String]) {
        for key in keys {
            let Some(data) = self.cache.get(key) else {
                return;
            };
            let frames: Vec<Frame> = data
                .chunks(arbor_wire::CHUNK_BYTES)
                .map(|part| Frame::new(Kind::Data, dst, NodeId::CONTROLLER, stream, part.to_vec()))
                .collect();
            for f in frames {
                self.node.handle_frame(now, PARENT, f);
            }
        }
    }
}
