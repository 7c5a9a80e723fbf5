//! Every rule of a relay, sans-IO: the router, the controller's requests
//! (spawns and their concurrency bound, the content cache, pins, injects
//! and forwards, expectations, the keepalive, shutdown), the children's
//! connect deadlines and the parent's liveness.
//!
//! The shell (`relay/src/main.rs`) moves bytes and time in, starts and
//! kills processes when told ([`Action`]) and reports what became of them.
//! Nothing here reads a clock or touches a process, so the simulator
//! (`tests/sim`) drives the same code the relay runs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use arbor_wire::control::{self, QuicOffer, Reply, Request, Spawn, PINS_MAX};
use arbor_wire::{Frame, Kind, NodeId, StreamId};

mod entries;

use crate::cache::Fifo;
use crate::liveness::Liveness;
use crate::parked::{Held, Parked};
use crate::{Event, Limits, LinkId, Node, Role};

/// The parent link's id.
pub const PARENT: LinkId = LinkId(0);
/// Most spawn requests waiting for a connecting slot.
pub const WAITING_SPAWNS_MAX: usize = 8192;

/// What the shell must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Start `spawn`'s command as the child on `link`, writing `preamble`
    /// (the pinned code resolved) to it first; `known_hosts` resolved too.
    /// Answer with [`Relay::child_started`] or [`Relay::child_not_started`].
    Spawn {
        link: LinkId,
        spawn: Box<Spawn>,
        preamble: Vec<u8>,
        known_hosts: Option<Vec<u8>>,
    },
    /// The child on `link` joined: what it needed only to connect (its
    /// password) can go.
    Joined { link: LinkId },
    /// Kill the child on `link` (past its connect deadline); its exit is
    /// reported as usual.
    Kill { link: LinkId },
    /// Stop reading `link` and kill its child: it broke a rule.
    CutOff { link: LinkId, why: String },
    /// Stop every child and end the relay; `why` is for its stderr.
    Exit { why: Option<String> },
    /// Open a QUIC endpoint for the parent link (`Request::QuicListen`),
    /// and answer `src`'s request with [`Relay::answer`].
    QuicListen {
        src: NodeId,
        stream: StreamId,
        accept_ms: u32,
        idle_ms: u32,
    },
    /// Connect to the QUIC endpoint of the relay on child `link`
    /// (`Request::QuicConnect`); from then on that link's frames go over
    /// it. Answer `src`'s request with [`Relay::answer`] once it did.
    QuicConnect {
        src: NodeId,
        stream: StreamId,
        link: LinkId,
        offer: Box<QuicOffer>,
        timeout_ms: u32,
        idle_ms: u32,
    },
}

struct Child {
    node: NodeId,
    pid: u32,
}

/// A child started and not yet joined: the request that asked for it,
/// answered when it joins or fails, and when it must have joined.
struct Connecting {
    src: NodeId,
    stream: StreamId,
    deadline: Instant,
    killed: bool,
}

pub struct Relay {
    node: Node,
    children: HashMap<LinkId, Child>,
    /// The children still connecting (at most the bound, when one is set).
    connecting: HashMap<LinkId, Connecting>,
    next_link: u32,
    /// Spawns waiting for fewer children to be connecting (in order).
    waiting: VecDeque<(NodeId, StreamId, Spawn)>,
    /// The bound the latest spawn request gave (0: none).
    max_connecting: usize,
    /// Content cache (module zip members, file chunks), oldest out first.
    cache: Fifo<Vec<u8>>,
    /// What every spawn uses (the agent's code, known_hosts): at most
    /// `PINS_MAX` entries, kept for the relay's life.
    pins: HashMap<String, Vec<u8>>,
    parent: Liveness,
    actions: VecDeque<Action>,
    exiting: bool,
    /// Destinations waiting for entries an inject or forward names (QUIC
    /// lanes).
    parked: Parked,
    /// The relays below this one (by their announcement), whose requests
    /// may name a subject (see [`Relay::subject`]). At most one per route.
    relays: HashSet<NodeId>,
}

impl Relay {
    pub fn new(now: Instant, id: NodeId) -> Self {
        // Strict: a child's node is routed only on the link it was started
        // on (and a nested agent's only where the controller said).
        let mut node = Node::new(id, Limits::default()).strict();
        node.handle_link_up(now, PARENT, Role::Parent);
        Relay {
            node,
            children: HashMap::new(),
            connecting: HashMap::new(),
            next_link: 1,
            waiting: VecDeque::new(),
            max_connecting: 0,
            cache: Fifo::default(),
            pins: HashMap::new(),
            parent: Liveness::new(now),
            actions: VecDeque::new(),
            exiting: false,
            parked: Parked::default(),
            relays: HashSet::new(),
        }
    }

    /// The link `node` is reached through, if it is known here.
    pub fn route(&self, node: NodeId) -> Option<LinkId> {
        self.node.route(node)
    }

    pub fn id(&self) -> NodeId {
        self.node.id()
    }

    /// Announces this relay to the controller with `hello`.
    pub fn announce(&mut self, now: Instant, hello: Vec<u8>) {
        let f = Frame::new(
            Kind::RouteAdd,
            NodeId::CONTROLLER,
            self.id(),
            StreamId(0),
            hello,
        );
        self.node.send(now, f);
    }

    pub fn handle_frame(&mut self, now: Instant, link: LinkId, frame: Frame) {
        if link == PARENT {
            self.parent.heard(now);
            if self.parked.holds(frame.dst) {
                self.parked.push(frame.dst, Held::Frame(frame));
                return;
            }
        }
        self.node.handle_frame(now, link, frame);
        self.drain(now);
    }

    /// The parent took bytes from us at `at`.
    pub fn parent_took_bytes(&mut self, at: Instant) {
        self.parent.heard(at);
    }

    /// `link` closed (for a child: once its process is gone, see
    /// [`Relay::child_exited`]); the parent's closing ends the relay.
    pub fn link_down(&mut self, now: Instant, link: LinkId, why: &str) {
        self.node.handle_link_down(now, link, why);
        self.drain(now);
    }

    /// The shell started the child on `link` as process `pid`.
    pub fn child_started(&mut self, link: LinkId, pid: u32) {
        if let Some(c) = self.children.get_mut(&link) {
            c.pid = pid;
        }
    }

    /// The shell could not start the child on `link`.
    pub fn child_not_started(&mut self, now: Instant, link: LinkId, message: String) {
        self.child_exited(now, link, message);
    }

    /// The child on `link` is gone (`why` names the host and what it said).
    pub fn child_exited(&mut self, now: Instant, link: LinkId, why: String) {
        let Some(c) = self.children.remove(&link) else {
            return;
        };
        if let Some(Connecting { src, stream, .. }) = self.connecting.remove(&link) {
            let node = c.node;
            self.reply(
                now,
                src,
                stream,
                &Reply::Failed {
                    node,
                    message: why.clone(),
                },
            );
        }
        self.node.handle_link_down(now, link, &why);
        self.start_waiting(now);
        self.drain(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.exiting && self.parent.is_dead(now) {
            let why = format!(
                "arbor-relay n{}: nothing from the parent for {:?}; exiting",
                self.id().0,
                self.parent.limit().unwrap_or_default()
            );
            self.exit(Some(why));
        }
        for (&link, c) in &mut self.connecting {
            if !c.killed && now >= c.deadline {
                c.killed = true;
                self.actions.push_back(Action::Kill { link });
            }
        }
        for (dst, held) in self.parked.expired(now) {
            self.replay(now, dst, held, true);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let connect = self
            .connecting
            .values()
            .filter(|c| !c.killed)
            .map(|c| c.deadline)
            .min();
        [self.parent.deadline(), connect, self.parked.deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<(LinkId, Frame)> {
        self.node.poll_transmit()
    }

    /// Frames wait to be polled.
    pub fn has_transmit(&self) -> bool {
        self.node.queued() > 0
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Children connecting now (started, not yet joined).
    pub fn connecting(&self) -> usize {
        self.connecting.len()
    }

    /// Spawns waiting for a connecting slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn cache(&self) -> &Fifo<Vec<u8>> {
        &self.cache
    }

    fn exit(&mut self, why: Option<String>) {
        if !self.exiting {
            self.exiting = true;
            self.actions.push_back(Action::Exit { why });
        }
    }

    /// Acts on what the router has for this relay.
    fn drain(&mut self, now: Instant) {
        while let Some(event) = self.node.poll_event() {
            match event {
                Event::Deliver(frame) => self.on_frame(now, frame),
                Event::NodeUp { node, link, hello } => {
                    if is_relay_hello(&hello) {
                        self.relays.insert(node);
                    }
                    self.on_node_up(now, node, link)
                }
                Event::ParentLost => self.exit(None),
                Event::NodeDown { node, .. } => {
                    self.relays.remove(&node);
                }
                Event::Dropped { .. } => {}
            }
        }
    }

    fn on_node_up(&mut self, now: Instant, node: NodeId, link: LinkId) {
        let Some(c) = self.children.get(&link) else {
            return;
        };
        // A child's first announcement is the node started on it; only
        // after that may it route for others (an agent's nested become
        // agents).
        if self.connecting.contains_key(&link) && c.node != node {
            let why = format!("announced n{} before itself (n{})", node.0, c.node.0);
            self.actions.push_back(Action::CutOff { link, why });
            return;
        }
        if c.node != node {
            return;
        }
        self.actions.push_back(Action::Joined { link });
        let pid = c.pid;
        if let Some(Connecting { src, stream, .. }) = self.connecting.remove(&link) {
            self.reply(now, src, stream, &Reply::Spawned { node, pid });
            self.start_waiting(now);
        }
    }

    fn on_frame(&mut self, now: Instant, frame: Frame) {
        if frame.kind != Kind::Request {
            if frame.kind == Kind::Ping {
                let pong = frame.reply_to(Kind::Pong, frame.payload.clone());
                self.node.send(now, pong);
            }
            return;
        }
        // Only the controller directs a relay: a node below it (whose
        // source the router has checked against its link) may not start
        // processes, fill the cache or have frames sent in the
        // controller's name.
        let (src, stream) = (frame.src, frame.stream);
        if src != NodeId::CONTROLLER {
            let message = format!("n{}: only the controller may ask a relay", src.0);
            return self.reply(now, src, stream, &Reply::Error { message });
        }
        match control::decode::<Request>(&frame.payload) {
            Ok(Request::Spawn(spec)) => {
                self.max_connecting = usize::from(spec.max_connecting);
                if self.waiting.len() >= WAITING_SPAWNS_MAX {
                    let message = format!(
                        "{}: {} children already wait to connect through this relay",
                        spec.label,
                        self.waiting.len()
                    );
                    let node = spec.node;
                    self.reply(now, src, stream, &Reply::Failed { node, message });
                } else {
                    self.waiting.push_back((src, stream, spec));
                    self.start_waiting(now);
                }
            }
            Ok(Request::CachePut {
                key,
                data,
                max_bytes,
            }) => {
                let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
                let weight = data.len();
                self.cache.put(&key, data, weight, max);
                for (dst, held) in self.parked.arrived(&key) {
                    self.replay(now, dst, held, false);
                }
            }
            Ok(Request::Inject { dst, stream, keys }) => {
                self.enter(now, dst, Held::Inject { stream, keys })
            }
            Ok(Request::Forward {
                dst,
                keys,
                max_bytes,
            }) => self.enter(now, dst, Held::Forward { keys, max_bytes }),
            Ok(Request::Expect { node, via }) => {
                if let Some(link) = self.node.route(via).filter(|l| *l != PARENT) {
                    self.node.expect(node, link);
                }
            }
            Ok(Request::Keepalive { silent_ms }) => {
                let limit = Duration::from_millis(u64::from(silent_ms));
                self.parent.set_limit(now, limit);
            }
            Ok(Request::Pin { key, data }) => {
                if self.pins.len() < PINS_MAX || self.pins.contains_key(&key) {
                    self.pins.insert(key.clone(), data);
                    for (dst, held) in self.parked.arrived(&key) {
                        self.replay(now, dst, held, false);
                    }
                }
            }
            Ok(Request::QuicListen { accept_ms, idle_ms }) => {
                self.actions.push_back(Action::QuicListen {
                    src,
                    stream,
                    accept_ms,
                    idle_ms,
                });
            }
            Ok(Request::QuicConnect {
                node,
                offer,
                timeout_ms,
                idle_ms,
            }) => {
                let child = self.children.iter().find(|(l, c)| {
                    c.node == node
                        && !self.connecting.contains_key(l)
                        && self.relays.contains(&node)
                });
                match child {
                    Some((&link, _)) => self.actions.push_back(Action::QuicConnect {
                        src,
                        stream,
                        link,
                        offer: Box::new(offer),
                        timeout_ms,
                        idle_ms,
                    }),
                    None => {
                        let message = format!("n{} is no relay started by this one", node.0);
                        self.reply(now, src, stream, &Reply::Error { message });
                    }
                }
            }
            Ok(Request::Shutdown) => {
                self.reply(now, src, stream, &Reply::Done);
                self.exit(None);
            }
            Err(e) => {
                let message = e.to_string();
                self.reply(now, src, stream, &Reply::Error { message });
            }
        }
    }

    /// The node a frame going down to `frame.dst` is about, where its order
    /// with that node's own frames matters (see [`control::subject`]): a
    /// relay's request may name one; an agent's payload is not decoded.
    pub fn subject(&self, frame: &Frame) -> Option<NodeId> {
        (frame.kind == Kind::Request && self.relays.contains(&frame.dst))
            .then(|| control::subject(&frame.payload))
            .flatten()
    }

    /// Answers a request the shell carried out (see [`Action`]).
    pub fn answer(&mut self, now: Instant, dst: NodeId, stream: StreamId, reply: &Reply) {
        self.reply(now, dst, stream, reply);
    }

    fn reply(&mut self, now: Instant, dst: NodeId, stream: StreamId, reply: &Reply) {
        let f = Frame::new(Kind::Reply, dst, self.id(), stream, control::encode(reply));
        self.node.send(now, f);
    }

    /// Starts waiting children while fewer than the bound are connecting.
    fn start_waiting(&mut self, now: Instant) {
        while self.max_connecting == 0 || self.connecting() < self.max_connecting {
            let Some((src, stream, spec)) = self.waiting.pop_front() else {
                return;
            };
            let node = spec.node;
            if let Err(message) = self.start(now, src, stream, spec) {
                self.reply(now, src, stream, &Reply::Failed { node, message });
            }
        }
    }

    /// Has the shell start a child, without waiting for it: children
    /// start in parallel, and the request is answered when the child
    /// joins, fails or passes its deadline.
    fn start(
        &mut self,
        now: Instant,
        src: NodeId,
        stream: StreamId,
        mut spec: Spawn,
    ) -> Result<(), String> {
        let pinned = |key: &Option<String>| -> Result<Option<&Vec<u8>>, String> {
            match key {
                None => Ok(None),
                Some(k) => self
                    .pins
                    .get(k)
                    .map(Some)
                    .ok_or_else(|| format!("this relay does not hold {k}")),
            }
        };
        let code = pinned(&spec.preamble_pinned)?;
        let hosts = pinned(&spec.known_hosts_pinned)?.cloned();
        let mut preamble = std::mem::take(&mut spec.preamble);
        if let Some(code) = code {
            preamble.extend_from_slice(code);
        }
        let known_hosts = hosts.or_else(|| spec.known_hosts.take());
        let link = LinkId(self.next_link);
        self.next_link += 1;
        self.node.handle_link_up(now, link, Role::Child);
        self.node.expect(spec.node, link);
        let deadline = now + Duration::from_millis(u64::from(spec.connect_timeout_ms));
        self.children.insert(
            link,
            Child {
                node: spec.node,
                pid: 0,
            },
        );
        self.connecting.insert(
            link,
            Connecting {
                src,
                stream,
                deadline,
                killed: false,
            },
        );
        self.actions.push_back(Action::Spawn {
            link,
            spawn: Box::new(spec),
            preamble,
            known_hosts,
        });
        Ok(())
    }
}

/// A relay's announcement (its JSON has a `relay` key; an agent's has
/// none, and a JSON string cannot hold the key's unescaped quotes).
fn is_relay_hello(hello: &[u8]) -> bool {
    arbor_wire::msg::split(hello).is_ok_and(|(json, _)| json.windows(8).any(|w| w == b"\"relay\":"))
}
