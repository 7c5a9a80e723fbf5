//! A deterministic simulated network for arbor's router core.
//!
//! Every node of a tree (controller, relays, leaves) is a real
//! [`arbor_core::Node`]; links are ordered byte-free pipes with a latency
//! drawn from the seed; time is simulated. A relay can crash (all its links
//! drop), and its leaves then exit, as agents do on EOF. The controller's
//! small RPC layer fails pending calls when their node leaves the tree.
//!
//! Invariants checked while it runs: every frame delivered to a node is
//! addressed to it; every reply comes from the node that was asked; queues
//! stay under their bound. At the end: every call has exactly one outcome.
//! A failing seed is printed by the test and replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use arbor_core::{Event, Limits, LinkId, Node, Role};

pub mod cache;
pub mod connect;
pub mod relay;
pub mod streams;
use arbor_wire::{Frame, Kind, NodeId, StreamId};

/// The seeds a test runs: `ARBOR_SIM_SEED=S` replays one; else
/// `ARBOR_SIM_SEEDS` (default `default`) from 0.
pub fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("ARBOR_SIM_SEED") {
        return vec![s.parse().expect("ARBOR_SIM_SEED is a number")];
    }
    let n = std::env::var("ARBOR_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (0..n).collect()
}

/// A node's announcement, as a child sends it up on joining.
pub fn hello(node: NodeId) -> Frame {
    Frame::new(
        Kind::RouteAdd,
        NodeId::CONTROLLER,
        node,
        StreamId(0),
        b"{}".to_vec(),
    )
}

/// A spawn request for `node`, as the daemon asks a relay (the command is
/// an ssh the simulation stands for).
pub fn spawn_of(
    node: NodeId,
    connect_timeout_ms: u32,
    max_connecting: u16,
) -> arbor_wire::control::Spawn {
    arbor_wire::control::Spawn {
        node,
        label: format!("n{}", node.0),
        argv: vec!["ssh".into(), format!("n{}", node.0)],
        env: Vec::new(),
        preamble: Vec::new(),
        send_self: false,
        known_hosts: None,
        connect_timeout_ms,
        preamble_pinned: None,
        known_hosts_pinned: None,
        max_connecting,
        password: None,
    }
}

/// Small deterministic PRNG (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Controller,
    Relay,
    Leaf,
}

struct SimNode {
    core: Node,
    role: NodeKind,
    alive: bool,
    /// link → (peer node index, peer's link id, latency)
    links: BTreeMap<LinkId, (usize, LinkId, Duration)>,
}

enum Delivery {
    Frame {
        to: usize,
        link: LinkId,
        frame: Frame,
    },
    LinkDown {
        to: usize,
        link: LinkId,
    },
    Start {
        node: usize,
    },
    Crash {
        node: usize,
    },
    Partition {
        relay: usize,
        hold: Duration,
    },
    Forge {
        node: usize,
        victim: NodeId,
    },
}

/// The outcome of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Reply,
    Error(String),
}

/// Scenario settings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scenario {
    pub relays: usize,
    pub leaves: usize,
    pub calls_per_leaf: usize,
    /// Relays crashed at a random time during the run.
    pub relay_crashes: usize,
    /// Calls also sent to ids that were never in the tree.
    pub calls_to_strangers: usize,
    /// Leaves crashed at a random time during the run.
    pub leaf_crashes: usize,
    /// Relays whose parent link holds every frame for a random time
    /// (0.2 to 6 s): past `KEEPALIVE` both ends declare it dead, as ssh's
    /// probes do; shorter, the frames arrive late and in order.
    pub partitions: usize,
    /// Extra random delay per frame, up to this (links stay ordered).
    pub jitter_ms: u64,
    /// Leaves that also forge: replies in another leaf's name, requests to
    /// other leaves, and announcements of other leaves' ids.
    pub impostors: usize,
}

/// A held link past this is declared dead by both ends.
pub const KEEPALIVE: Duration = Duration::from_secs(3);

pub struct Report {
    pub outcomes: HashMap<StreamId, Outcome>,
    pub calls: usize,
    pub replies: usize,
    pub errors: usize,
    pub crashed: Vec<NodeId>,
    pub frames_delivered: u64,
    pub max_queue: usize,
    pub violations: Vec<String>,
}

pub struct Sim {
    rng: Rng,
    t0: Instant,
    now: Instant,
    seq: u64,
    nodes: Vec<SimNode>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Delivery>,
    /// Last delivery time per (node, link), so links stay ordered.
    link_clock: HashMap<(usize, LinkId), Instant>,
    /// Links (by receiving end) holding frames until then.
    held: HashMap<(usize, LinkId), Instant>,
    jitter_ms: u64,
    // controller RPC state
    calls: HashMap<StreamId, NodeId>,
    outcomes: HashMap<StreamId, Outcome>,
    up: HashSet<NodeId>,
    violations: Vec<String>,
    frames_delivered: u64,
    max_queue: usize,
}

/// Bound on frames waiting in one node's transmit queue between polls.
pub const QUEUE_BOUND: usize = 10_000;

impl Sim {
    pub fn new(seed: u64) -> Self {
        let t0 = Instant::now();
        Sim {
            rng: Rng::new(seed),
            t0,
            now: t0,
            seq: 0,
            nodes: Vec::new(),
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            link_clock: HashMap::new(),
            held: HashMap::new(),
            jitter_ms: 0,
            calls: HashMap::new(),
            outcomes: HashMap::new(),
            up: HashSet::new(),
            violations: Vec::new(),
            frames_delivered: 0,
            max_queue: 0,
        }
    }

    fn add_node(&mut self, role: NodeKind) -> usize {
        let id = NodeId(self.nodes.len() as u32);
        let core = Node::new(id, Limits::default());
        self.nodes.push(SimNode {
            // The controller and relays are strict, as arbor's: a node is
            // routed only where it was started.
            core: if role == NodeKind::Leaf {
                core
            } else {
                core.strict()
            },
            role,
            alive: role == NodeKind::Controller,
            links: BTreeMap::new(),
        });
        self.nodes.len() - 1
    }

    fn connect(&mut self, parent: usize, child: usize) {
        let latency = self.rng.ms(1, 40);
        let pl = LinkId(self.nodes[parent].links.len() as u32 + 1);
        let cl = LinkId(0);
        self.nodes[parent].links.insert(pl, (child, cl, latency));
        self.nodes[child].links.insert(cl, (parent, pl, latency));
        let now = self.now;
        self.nodes[parent].core.handle_link_up(now, pl, Role::Child);
        let child_id = self.nodes[child].core.id();
        self.nodes[parent].core.expect(child_id, pl);
        self.nodes[child].core.handle_link_up(now, cl, Role::Parent);
    }

    fn schedule(&mut self, at: Instant, d: Delivery) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.pending.insert(self.seq, d);
    }

    fn send_on(&mut self, from: usize, link: LinkId, frame: Frame) {
        let Some(&(to, peer_link, latency)) = self.nodes[from].links.get(&link) else {
            return;
        };
        let key = (to, peer_link);
        let jitter = Duration::from_millis(self.rng.below(self.jitter_ms + 1));
        let held = self.held.get(&key).copied().unwrap_or(self.t0);
        let at = (self.now + latency + jitter)
            .max(held)
            .max(self.link_clock.get(&key).copied().unwrap_or(self.t0));
        self.link_clock.insert(key, at);
        self.schedule(
            at,
            Delivery::Frame {
                to,
                link: peer_link,
                frame,
            },
        );
    }

    /// Drains a node's outputs: transmits, and its application's reactions.
    fn pump(&mut self, i: usize) {
        loop {
            let q = self.nodes[i].core.queued();
            self.max_queue = self.max_queue.max(q);
            if q > QUEUE_BOUND {
                self.violations
                    .push(format!("node {i} queue {q} over bound"));
            }
            if let Some((link, frame)) = self.nodes[i].core.poll_transmit() {
                self.send_on(i, link, frame);
                continue;
            }
            let Some(event) = self.nodes[i].core.poll_event() else {
                break;
            };
            self.on_event(i, event);
        }
    }

    fn on_event(&mut self, i: usize, event: Event) {
        let me = self.nodes[i].core.id();
        match event {
            Event::Deliver(frame) => {
                self.frames_delivered += 1;
                if frame.dst != me {
                    self.violations
                        .push(format!("{me} was handed a frame for {}", frame.dst));
                }
                if self.nodes[i].role != NodeKind::Controller && frame.src != NodeId::CONTROLLER {
                    self.violations
                        .push(format!("{me} was handed a frame from {}", frame.src));
                }
                match (self.nodes[i].role, frame.kind) {
                    (NodeKind::Leaf | NodeKind::Relay, Kind::Request) => {
                        let reply = frame.reply_to(Kind::Reply, frame.payload.clone());
                        let now = self.now;
                        self.nodes[i].core.send(now, reply);
                    }
                    (NodeKind::Controller, Kind::Reply) => match self.calls.get(&frame.stream) {
                        Some(&asked) if asked != frame.src => self.violations.push(format!(
                            "call {:?} to {asked} answered by {}",
                            frame.stream, frame.src
                        )),
                        Some(_) if frame.payload != frame.stream.0.to_le_bytes() => {
                            self.violations.push(format!(
                                "call {:?} got another call's payload",
                                frame.stream
                            ))
                        }
                        Some(_) => self.finish(frame.stream, Outcome::Reply),
                        None => self
                            .violations
                            .push(format!("reply to unknown call {:?}", frame.stream)),
                    },
                    (NodeKind::Controller, Kind::Undeliverable) => {
                        let why = String::from_utf8_lossy(&frame.payload).into_owned();
                        self.finish(frame.stream, Outcome::Error(why));
                    }
                    _ => {}
                }
            }
            Event::NodeUp { node, .. } if self.nodes[i].role == NodeKind::Controller => {
                self.up.insert(node);
            }
            Event::NodeDown { node, reason } if self.nodes[i].role == NodeKind::Controller => {
                self.up.remove(&node);
                let lost: Vec<StreamId> = self
                    .calls
                    .iter()
                    .filter(|(s, n)| **n == node && !self.outcomes.contains_key(s))
                    .map(|(s, _)| *s)
                    .collect();
                for s in lost {
                    self.finish(s, Outcome::Error(format!("{node} left the tree: {reason}")));
                }
            }
            Event::ParentLost => self.kill(i),
            _ => {}
        }
    }

    fn finish(&mut self, stream: StreamId, outcome: Outcome) {
        // A call may also be failed by NodeDown before a late answer; the
        // first outcome stands, a second one for a finished call is fine
        // only if it is an error racing a node's departure.
        if let Some(prev) = self.outcomes.get(&stream) {
            if *prev == Outcome::Reply || outcome == Outcome::Reply {
                self.violations
                    .push(format!("call {stream:?} finished twice"));
            }
            return;
        }
        self.outcomes.insert(stream, outcome);
    }

    fn kill(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        self.nodes[i].alive = false;
        let links: Vec<_> = self.nodes[i].links.values().copied().collect();
        for (peer, peer_link, latency) in links {
            let at = self.now + latency;
            self.schedule(
                at,
                Delivery::LinkDown {
                    to: peer,
                    link: peer_link,
                },
            );
        }
    }

    /// Holds both directions of a relay's parent link for `hold`; past
    /// `KEEPALIVE` both ends then see it dead.
    fn partition(&mut self, relay: usize, hold: Duration) {
        if !self.nodes[relay].alive {
            return;
        }
        let Some(&(parent, parent_link, _)) = self.nodes[relay].links.get(&LinkId(0)) else {
            return;
        };
        let until = self.now + hold;
        self.held.insert((relay, LinkId(0)), until);
        self.held.insert((parent, parent_link), until);
        if hold > KEEPALIVE {
            let at = self.now + KEEPALIVE;
            self.schedule(
                at,
                Delivery::LinkDown {
                    to: parent,
                    link: parent_link,
                },
            );
            self.schedule(
                at,
                Delivery::LinkDown {
                    to: relay,
                    link: LinkId(0),
                },
            );
        }
    }

    /// An impostor leaf sends what it must not be able to: a reply in
    /// `victim`'s name to the victim's call, a request to the victim, and
    /// an announcement of the victim's id.
    fn forge(&mut self, node: usize, victim: NodeId) {
        if !self.nodes[node].alive || victim == NodeId(node as u32) {
            return;
        }
        let stream = self
            .calls
            .iter()
            .find(|(_, n)| **n == victim)
            .map(|(s, _)| *s)
            .unwrap_or(StreamId(1));
        let mut forged = vec![
            Frame::new(
                Kind::Reply,
                NodeId::CONTROLLER,
                victim,
                stream,
                stream.0.to_le_bytes().to_vec(),
            ),
            Frame::new(
                Kind::Request,
                victim,
                NodeId(node as u32),
                StreamId(9999),
                vec![],
            ),
            Frame::new(
                Kind::Reply,
                NodeId::CONTROLLER,
                NodeId::CONTROLLER,
                stream,
                vec![],
            ),
        ];
        // Announcing another node, up or not yet (strict nodes refuse it).
        forged.push(Frame::new(
            Kind::RouteAdd,
            NodeId::CONTROLLER,
            victim,
            StreamId(0),
            b"me too".to_vec(),
        ));
        for f in forged {
            self.send_on(node, LinkId(0), f);
        }
    }

    pub fn call(&mut self, stream: StreamId, dst: NodeId) {
        self.calls.insert(stream, dst);
        let f = Frame::new(
            Kind::Request,
            dst,
            NodeId::CONTROLLER,
            stream,
            stream.0.to_le_bytes().to_vec(),
        );
        let now = self.now;
        self.nodes[0].core.send(now, f);
        self.pump(0);
    }

    /// Runs a whole scenario and reports.
    pub fn run(seed: u64, s: Scenario) -> Report {
        let mut sim = Sim::new(seed);
        let controller = sim.add_node(NodeKind::Controller);
        let relays: Vec<usize> = (0..s.relays)
            .map(|_| sim.add_node(NodeKind::Relay))
            .collect();
        for &r in &relays {
            sim.connect(controller, r);
        }
        let mut leaves = Vec::new();
        for k in 0..s.leaves {
            let l = sim.add_node(NodeKind::Leaf);
            sim.connect(relays[k % relays.len()], l);
            leaves.push(l);
        }
        for &n in relays.iter().chain(&leaves) {
            let first = if n < 1 + relays.len() {
                n
            } else {
                relays[(n - 1 - relays.len()) % relays.len()]
            };
            let link = sim.nodes[controller]
                .links
                .iter()
                .find(|(_, (peer, _, _))| *peer == first)
                .map(|(l, _)| *l);
            if let Some(link) = link {
                sim.nodes[controller].core.expect(NodeId(n as u32), link);
            }
        }
        // Relays start first; leaves join once their relay is up.
        for &r in &relays {
            let at = sim.now + sim.rng.ms(1, 20);
            sim.schedule(at, Delivery::Start { node: r });
        }
        for &l in &leaves {
            let at = sim.now + sim.rng.ms(60, 200);
            sim.schedule(at, Delivery::Start { node: l });
        }
        sim.jitter_ms = s.jitter_ms;
        for _ in 0..s.leaf_crashes.min(leaves.len()) {
            let l = leaves[sim.rng.below(leaves.len() as u64) as usize];
            let at = sim.now + sim.rng.ms(250, 900);
            sim.schedule(at, Delivery::Crash { node: l });
        }
        for _ in 0..s.partitions.min(relays.len()) {
            let r = relays[sim.rng.below(relays.len() as u64) as usize];
            let at = sim.now + sim.rng.ms(250, 900);
            let hold = sim.rng.ms(200, 6000);
            sim.schedule(at, Delivery::Partition { relay: r, hold });
        }
        for k in 0..s.impostors.min(leaves.len()) {
            let node = leaves[k];
            for _ in 0..4 {
                let victim = NodeId(leaves[sim.rng.below(leaves.len() as u64) as usize] as u32);
                let at = sim.now + sim.rng.ms(200, 700);
                sim.schedule(at, Delivery::Forge { node, victim });
            }
        }
        let mut crashed = Vec::new();
        for _ in 0..s.relay_crashes.min(relays.len()) {
            let r = relays[sim.rng.below(relays.len() as u64) as usize];
            let at = sim.now + sim.rng.ms(300, 900);
            sim.schedule(at, Delivery::Crash { node: r });
            crashed.push(NodeId(r as u32));
        }

        let mut next_stream = 1u32;
        let mut issued = false;
        let deadline = sim.t0 + Duration::from_secs(60);
        while let Some(Reverse((at, seq))) = sim.queue.pop() {
            if at > deadline {
                sim.violations
                    .push("simulation did not settle in 60 simulated seconds".into());
                break;
            }
            sim.now = at;
            let Some(d) = sim.pending.remove(&seq) else {
                continue;
            };
            match d {
                Delivery::Start { node } => {
                    sim.nodes[node].alive = true;
                    let id = sim.nodes[node].core.id();
                    let hello = Frame::new(
                        Kind::RouteAdd,
                        NodeId::CONTROLLER,
                        id,
                        StreamId(0),
                        b"up".to_vec(),
                    );
                    // A node announces itself on its parent link.
                    sim.send_on(node, LinkId(0), hello);
                }
                Delivery::Crash { node } => sim.kill(node),
                Delivery::Partition { relay, hold } => sim.partition(relay, hold),
                Delivery::Forge { node, victim } => sim.forge(node, victim),
                Delivery::Frame { to, link, frame } => {
                    if !sim.nodes[to].alive || !sim.nodes[to].links.contains_key(&link) {
                        continue;
                    }
                    let now = sim.now;
                    sim.nodes[to].core.handle_frame(now, link, frame);
                    sim.pump(to);
                }
                Delivery::LinkDown { to, link } => {
                    if sim.nodes[to].links.remove(&link).is_none() {
                        continue;
                    }
                    let now = sim.now;
                    sim.nodes[to]
                        .core
                        .handle_link_down(now, link, "peer crashed");
                    sim.pump(to);
                }
            }
            // Once every leaf is up (or the first crash is near), fire the calls.
            if !issued
                && (sim.up.len() >= leaves.len() + relays.len()
                    || sim.now > sim.t0 + Duration::from_millis(280))
            {
                issued = true;
                for &l in &leaves {
                    for _ in 0..s.calls_per_leaf {
                        sim.call(StreamId(next_stream), NodeId(l as u32));
                        next_stream += 1;
                    }
                }
                for k in 0..s.calls_to_strangers {
                    sim.call(StreamId(next_stream), NodeId(1_000_000 + k as u32));
                    next_stream += 1;
                }
            }
        }
        if !issued {
            sim.violations.push("calls were never issued".into());
        }
        for (stream, node) in &sim.calls {
            if !sim.outcomes.contains_key(stream) {
                sim.violations.push(format!(
                    "call {stream:?} to {node} got no reply and no error"
                ));
            }
        }
        let replies = sim
            .outcomes
            .values()
            .filter(|o| **o == Outcome::Reply)
            .count();
        Report {
            calls: sim.calls.len(),
            replies,
            errors: sim.outcomes.len() - replies,
            outcomes: sim.outcomes,
            crashed,
            frames_delivered: sim.frames_delivered,
            max_queue: sim.max_queue,
            violations: sim.violations,
        }
    }
}
