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
    pub(super) fn forward(&mut self, now: Instant, dst: NodeId, keys: &[String], max_bytes: u64) {
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

    /// Sends cached entries to `dst` as the controller's Data frames, or,
    /// if some have not arrived yet, parks `dst` until they have (see
    /// [`crate::parked`]).
    pub(super) fn inject(
        &mut self,
        now: Instant,
        dst: NodeId,
        stream: StreamId,
        keys: Vec<String>,
    ) {
        if self.parked.holds(dst) {
            self.parked.push(dst, Held::Inject { stream, keys });
            return;
        }
        let missing: Vec<String> = keys
            .iter()
            .filter(|k| self.cache.get(k).is_none())
            .cloned()
            .collect();
        if missing.is_empty() {
            self.send_injected(now, dst, stream, &keys);
        } else {
            self.parked
                .park(now, dst, Held::Inject { stream, keys }, missing);
        }
    }

    /// Forwards `keys` to the relay `dst`, or parks `dst` behind the
    /// forward until this relay holds them (see [`Parked`]).
    pub(super) fn forward_or_park(
        &mut self,
        now: Instant,
        dst: NodeId,
        keys: Vec<String>,
        max_bytes: u64,
    ) {
        if self.parked.holds(dst) {
            self.parked.push(dst, Held::Forward { keys, max_bytes });
            return;
        }
        let missing: Vec<String> = keys
            .iter()
            .filter(|k| self.cache.get(k).is_none() && !self.pins.contains_key(*k))
            .cloned()
            .collect();
        if missing.is_empty() {
            self.forward(now, dst, &keys, max_bytes);
        } else {
            self.parked
                .park(now, dst, Held::Forward { keys, max_bytes }, missing);
        }
    }

    /// What a park held, in order; `expired`: its first inject sends what
    /// the cache holds (the agent asks again for the rest).
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
                Held::Inject { stream, keys } if first => {
                    self.send_injected(now, dst, stream, &keys);
                }
                Held::Inject { stream, keys } => self.inject(now, dst, stream, keys),
                Held::Forward { keys, max_bytes } if first => {
                    self.forward(now, dst, &keys, max_bytes);
                }
                Held::Forward { keys, max_bytes } => {
                    self.forward_or_park(now, dst, keys, max_bytes);
                }
                Held::Frame(f) => self.handle_frame(now, PARENT, f),
            }
            first = false;
        }
    }

    /// Sends cached entries to `dst` as the controller's Data frames,
    /// routed exactly as the controller's own frames from the parent.
    pub(super) fn send_injected(
        &mut self,
        now: Instant,
        dst: NodeId,
        stream: StreamId,
        keys: &[String],
    ) {
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
