//! arbor's router core: a sans-IO state machine, one per node of the tree.
//!
//! It is handed frames, link changes and the current time; it hands back
//! frames to send ([`Node::poll_transmit`]), events for the node's own code
//! ([`Node::poll_event`]) and when it next wants to be woken
//! ([`Node::poll_timeout`]). It never reads a clock, spawns a process or
//! touches a socket, so a whole tree runs deterministically in a simulator.
//!
//! # Routing
//! Every node has at most one parent link and any number of child links.
//! A node learns its descendants from [`Kind::RouteAdd`] frames, whose `src`
//! is the node that joined; each hop records `src → link` and passes the
//! frame up. A frame for a known descendant goes down its link; any other
//! frame from below goes up; a frame from above for an unknown node is
//! answered with [`Kind::Undeliverable`]. When a child link goes down, every
//! node behind it is announced lost with [`Kind::RouteDel`].
//!
//! A child link may only speak for the nodes announced below it: a frame
//! whose `src` is not routed through the link it came on is dropped.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

pub mod becomes;
pub mod cache;
pub mod hops;
pub mod liveness;
pub mod parked;
pub mod relay;
pub mod window;

use arbor_wire::{Frame, Kind, NodeId, StreamId};

/// A link of this node, numbered by the IO shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u32);

/// Which way a link points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Parent,
    Child,
}

/// What the node's own code must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A frame addressed to this node.
    Deliver(Frame),
    /// `node` joined the tree behind `link`; `hello` is its announcement.
    NodeUp {
        node: NodeId,
        link: LinkId,
        hello: Vec<u8>,
    },
    /// `node` left the tree.
    NodeDown { node: NodeId, reason: String },
    /// A frame could not be routed and was dropped (diagnostics).
    Dropped {
        frame_src: NodeId,
        frame_dst: NodeId,
        why: &'static str,
    },
    /// The parent link is gone: a relay shuts down.
    ParentLost,
}

/// Bounds of one node.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most descendants one node routes for.
    pub routes_max: usize,
    /// Most events waiting for the node's code.
    pub events_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            routes_max: 1 << 20,
            events_max: 1 << 16,
        }
    }
}

pub struct Node {
    id: NodeId,
    limits: Limits,
    parent: Option<LinkId>,
    children: HashMap<LinkId, Vec<NodeId>>,
    routes: HashMap<NodeId, LinkId>,
    transmit: VecDeque<(LinkId, Frame)>,
    events: VecDeque<Event>,
    /// Strict nodes (the controller) accept an announcement only for a
    /// node they expect, on the link they expect it on: a node below
    /// cannot claim an id that belongs to another subtree, even one not
    /// (or no longer) in the tree.
    expected: Option<HashMap<NodeId, LinkId>>,
}

impl Node {
    pub fn new(id: NodeId, limits: Limits) -> Self {
        Node {
            id,
            limits,
            parent: None,
            children: HashMap::new(),
            routes: HashMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            expected: None,
        }
    }

    /// Makes this node strict (see [`Node::expect`]).
    pub fn strict(mut self) -> Self {
        self.expected = Some(HashMap::new());
        self
    }

    /// A strict node will accept `node`'s announcement once, on `link`.
    pub fn expect(&mut self, node: NodeId, link: LinkId) {
        if let Some(e) = &mut self.expected {
            e.insert(node, link);
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The link a frame for `node` would leave on, if any.
    pub fn route(&self, node: NodeId) -> Option<LinkId> {
        self.routes.get(&node).copied().or(self.parent)
    }

    /// Frames and events waiting to be polled.
    pub fn queued(&self) -> usize {
        self.transmit.len() + self.events.len()
    }

    /// Descendants currently routed.
    pub fn routes_len(&self) -> usize {
        self.routes.len()
    }

    pub fn handle_link_up(&mut self, _now: Instant, link: LinkId, role: Role) {
        match role {
            Role::Parent => {
                assert!(self.parent.is_none(), "a node has one parent link");
                self.parent = Some(link);
            }
            Role::Child => {
                self.children.insert(link, Vec::new());
            }
        }
    }

    pub fn handle_link_down(&mut self, _now: Instant, link: LinkId, reason: &str) {
        if self.parent == Some(link) {
            self.parent = None;
            self.event(Event::ParentLost);
            return;
        }
        let Some(lost) = self.children.remove(&link) else {
            return;
        };
        for node in lost {
            if self.routes.get(&node) == Some(&link) {
                self.routes.remove(&node);
                self.lost(node, reason.to_string());
            }
        }
    }

    /// Sends a frame of this node's own.
    pub fn send(&mut self, _now: Instant, frame: Frame) {
        debug_assert_eq!(frame.src, self.id, "own frames carry this node's id");
        if frame.dst == self.id {
            self.event(Event::Deliver(frame));
        } else {
            self.forward(None, frame);
        }
    }

    pub fn handle_frame(&mut self, _now: Instant, link: LinkId, frame: Frame) {
        let from_child = self.children.contains_key(&link);
        if !from_child && self.parent != Some(link) {
            return; // a link the shell already closed
        }
        if from_child {
            match frame.kind {
                Kind::RouteAdd => return self.route_add(link, frame),
                Kind::RouteDel => return self.route_del(link, frame),
                _ if self.routes.get(&frame.src) != Some(&link) => {
                    return self.drop(&frame, "source not announced on its link");
                }
                _ => {}
            }
        }
        if frame.dst == self.id {
            self.event(Event::Deliver(frame));
        } else {
            self.forward(Some(link), frame);
        }
    }

    pub fn handle_timeout(&mut self, _now: Instant) {}

    pub fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    pub fn poll_transmit(&mut self) -> Option<(LinkId, Frame)> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn route_add(&mut self, link: LinkId, frame: Frame) {
        let node = frame.src;
        if node == self.id || node == NodeId::CONTROLLER {
            return self.drop(&frame, "announcement of a reserved id");
        }
        if let Some(e) = &mut self.expected {
            if e.get(&node) != Some(&link) {
                return self.drop(&frame, "announcement of a node not expected on its link");
            }
            e.remove(&node);
        }
        match self.routes.get(&node) {
            Some(&l) if l == link => {}
            Some(_) => return self.drop(&frame, "announcement of a node routed elsewhere"),
            None if self.routes.len() >= self.limits.routes_max => {
                return self.drop(&frame, "route table full");
            }
            None => {
                self.routes.insert(node, link);
                if let Some(v) = self.children.get_mut(&link) {
                    v.push(node);
                }
            }
        }
        self.event(Event::NodeUp {
            node,
            link,
            hello: frame.payload.clone(),
        });
        if let Some(p) = self.parent {
            self.transmit.push_back((p, frame));
        }
    }

    fn route_del(&mut self, link: LinkId, frame: Frame) {
        if self.routes.get(&frame.src) != Some(&link) {
            return self.drop(&frame, "withdrawal of a node not routed on its link");
        }
        self.routes.remove(&frame.src);
        if let Some(v) = self.children.get_mut(&link) {
            v.retain(|n| *n != frame.src);
        }
        let reason = String::from_utf8_lossy(&frame.payload).into_owned();
        self.event(Event::NodeDown {
            node: frame.src,
            reason,
        });
        if let Some(p) = self.parent {
            self.transmit.push_back((p, frame));
        }
    }

    /// Announces upward that `node` is gone.
    fn lost(&mut self, node: NodeId, reason: String) {
        if let Some(p) = self.parent {
            let f = Frame::new(
                Kind::RouteDel,
                NodeId::CONTROLLER,
                node,
                StreamId(0),
                reason.clone().into_bytes(),
            );
            self.transmit.push_back((p, f));
        }
        self.event(Event::NodeDown { node, reason });
    }

    fn forward(&mut self, came_from: Option<LinkId>, frame: Frame) {
        let out = match self.routes.get(&frame.dst) {
            Some(&l) => Some(l),
            // Unknown destinations go up, unless the frame came from above.
            None if came_from.is_some() && came_from == self.parent => None,
            None => self.parent,
        };
        // Frames from below only go up: no child may address another
        // subtree (nothing of arbor's talks sideways; only the controller
        // directs nodes).
        if let (Some(from), Some(to)) = (came_from, out) {
            if Some(from) != self.parent && Some(to) != self.parent {
                return self.drop(&frame, "a child may not address another subtree");
            }
        }
        match out {
            Some(l) if Some(l) != came_from => self.transmit.push_back((l, frame)),
            _ => self.undeliverable(frame),
        }
    }

    /// Tells the sender that its frame went nowhere, so every request gets
    /// a reply or an error. Never answers route or error frames.
    fn undeliverable(&mut self, frame: Frame) {
        if matches!(
            frame.kind,
            Kind::Undeliverable | Kind::RouteAdd | Kind::RouteDel | Kind::Pong | Kind::Credit
        ) {
            return self.drop(&frame, "no route");
        }
        let reason = format!("{} is not in the tree (seen at {})", frame.dst, self.id);
        let back = Frame::new(
            Kind::Undeliverable,
            frame.src,
            self.id,
            frame.stream,
            reason.into_bytes(),
        );
        self.drop(&frame, "no route");
        if back.dst == self.id {
            self.event(Event::Deliver(back));
        } else {
            self.forward(None, back);
        }
    }

    fn drop(&mut self, frame: &Frame, why: &'static str) {
        self.event(Event::Dropped {
            frame_src: frame.src,
            frame_dst: frame.dst,
            why,
        });
    }

    fn event(&mut self, e: Event) {
        // Diagnostics give way first when the node's code falls behind.
        if self.events.len() >= self.limits.events_max {
            if matches!(e, Event::Dropped { .. }) {
                return;
            }
            if let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, Event::Dropped { .. }))
            {
                self.events.remove(i);
            }
        }
        self.events.push_back(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    fn hello(node: u32) -> Frame {
        Frame::new(
            Kind::RouteAdd,
            NodeId(0),
            NodeId(node),
            StreamId(0),
            b"hi".to_vec(),
        )
    }

    fn relay() -> Node {
        let mut n = Node::new(NodeId(1), Limits::default());
        n.handle_link_up(now(), LinkId(0), Role::Parent);
        n.handle_link_up(now(), LinkId(1), Role::Child);
        n
    }

    #[test]
    fn announcement_is_learned_and_passed_up() {
        let mut n = relay();
        n.handle_frame(now(), LinkId(1), hello(5));
        assert_eq!(n.poll_transmit(), Some((LinkId(0), hello(5))));
        assert!(matches!(
            n.poll_event(),
            Some(Event::NodeUp {
                node: NodeId(5),
                ..
            })
        ));
        let req = Frame::new(Kind::Request, NodeId(5), NodeId(0), StreamId(3), vec![]);
        n.handle_frame(now(), LinkId(0), req.clone());
        assert_eq!(n.poll_transmit(), Some((LinkId(1), req)));
    }

    #[test]
    fn spoofed_source_is_dropped() {
        let mut n = relay();
        n.handle_frame(now(), LinkId(1), hello(5));
        while n.poll_transmit().is_some() {}
        let forged = Frame::new(Kind::Reply, NodeId(0), NodeId(9), StreamId(1), vec![]);
        n.handle_frame(now(), LinkId(1), forged);
        assert_eq!(n.poll_transmit(), None);
    }

    #[test]
    fn a_child_cannot_address_another_subtree() {
        let mut n = relay();
        n.handle_link_up(now(), LinkId(2), Role::Child);
        n.handle_frame(now(), LinkId(1), hello(5));
        n.handle_frame(now(), LinkId(2), hello(6));
        while n.poll_transmit().is_some() {}
        // 6 asks 5, and 5 asks itself through the relay: neither goes anywhere.
        let sideways = Frame::new(Kind::Request, NodeId(5), NodeId(6), StreamId(1), vec![]);
        n.handle_frame(now(), LinkId(2), sideways);
        let back = Frame::new(Kind::Request, NodeId(5), NodeId(5), StreamId(1), vec![]);
        n.handle_frame(now(), LinkId(1), back);
        assert_eq!(n.poll_transmit(), None);
        // Up is the only way.
        let up = Frame::new(Kind::Reply, NodeId(0), NodeId(6), StreamId(1), vec![]);
        n.handle_frame(now(), LinkId(2), up.clone());
        assert_eq!(n.poll_transmit(), Some((LinkId(0), up)));
    }

    #[test]
    fn a_strict_node_takes_only_the_announcements_it_expects() {
        let mut n = Node::new(NodeId(0), Limits::default()).strict();
        n.handle_link_up(now(), LinkId(1), Role::Child);
        n.handle_link_up(now(), LinkId(2), Role::Child);
        n.expect(NodeId(5), LinkId(1));
        n.handle_frame(now(), LinkId(2), hello(5));
        n.handle_frame(now(), LinkId(1), hello(6));
        assert_eq!(n.route(NodeId(5)), None);
        assert_eq!(n.route(NodeId(6)), None);
        n.handle_frame(now(), LinkId(1), hello(5));
        assert_eq!(n.route(NodeId(5)), Some(LinkId(1)));
        // Once: after a withdrawal it is not taken back.
        let del = Frame::new(Kind::RouteDel, NodeId(0), NodeId(5), StreamId(0), vec![]);
        n.handle_frame(now(), LinkId(1), del);
        n.handle_frame(now(), LinkId(1), hello(5));
        assert_eq!(n.route(NodeId(5)), None);
    }

    #[test]
    fn unknown_destination_from_above_is_answered() {
        let mut n = relay();
        let req = Frame::new(Kind::Request, NodeId(77), NodeId(0), StreamId(3), vec![]);
        n.handle_frame(now(), LinkId(0), req);
        let (link, back) = n.poll_transmit().expect("answer");
        assert_eq!(link, LinkId(0));
        assert_eq!(
            (back.kind, back.dst, back.stream),
            (Kind::Undeliverable, NodeId(0), StreamId(3))
        );
    }

    #[test]
    fn child_link_down_withdraws_its_nodes() {
        let mut n = relay();
        n.handle_frame(now(), LinkId(1), hello(5));
        while n.poll_transmit().is_some() {}
        n.handle_link_down(now(), LinkId(1), "ssh exited");
        let (link, del) = n.poll_transmit().expect("withdrawal");
        assert_eq!(
            (link, del.kind, del.src),
            (LinkId(0), Kind::RouteDel, NodeId(5))
        );
        assert_eq!(n.route(NodeId(5)), Some(LinkId(0)));
    }
}
