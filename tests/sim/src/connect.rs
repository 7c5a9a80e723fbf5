//! How long a whole tree takes to connect: a deterministic projection from
//! per-hop costs measured in the lab (`deploy/bench/connect.py`).
//!
//! Every node is a real [`arbor_core::Node`]: spawn requests go down and
//! each child's announcement (`RouteAdd`) goes up through the real routers,
//! over links with a latency and a bandwidth (frames on a link are sent one
//! after the other; the controller's WAN uplink is one link shared by all
//! its first hops). What the frames stand for costs time as measured:
//! - a relay's (or the controller's) ssh client: CPU on its host, whose
//!   cores serve work first come first served;
//! - the ssh handshake: `handshake_rtts` round trips of the link;
//! - authentication behind the first hop: `auth_rtts` round trips from the
//!   parent to the controller (the forwarded agent signs there);
//! - the code upload: the relay binary, sent by the controller to first
//!   hops over the WAN and by a parent relay to its child relays; the
//!   agent's code, pinned once per relay (over the relay's own uplink);
//! - the child's start: CPU on its own host.
//!
//! The controller asks for every host at once (Ansible with forks at least
//! the number of hosts); each relay connects at most `max_connecting`
//! children at once, the rest in order, as the real relay does.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use arbor_core::{Event, Limits, LinkId, Node, Role};
use arbor_wire::{Frame, Kind, NodeId, StreamId};

use crate::Rng;

/// Per-hop costs. Times in seconds, sizes in bytes, rates in bytes/s.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    pub wan_rtt: f64,
    pub wan_up_rate: f64,
    pub wan_down_rate: f64,
    pub lan_rtt: f64,
    pub lan_rate: f64,
    /// Round trips of an ssh connection's own setup (TCP, key exchange,
    /// auth, channel), on its link.
    pub handshake_rtts: f64,
    /// Further round trips of a first hop's upload of the relay binary
    /// (TCP's slow start), besides its bytes at the link's rate.
    pub upload_rtts: f64,
    /// Time of a connection that is neither CPU nor the network (process
    /// starts, scheduling), calibrated against the lab.
    pub fixed: f64,
    /// Round trips to the controller per connection behind the first hop
    /// (the forwarded agent's identities and signature).
    pub auth_rtts: f64,
    /// CPU of one ssh client connecting, on the parent's host.
    pub cpu_client: f64,
    /// CPU on the child's host: sshd's session and the child's start.
    pub cpu_child_agent: f64,
    pub cpu_child_relay: f64,
    pub cores: usize,
    /// All hosts share one pool of `cores` (the lab: one machine).
    pub shared_cores: bool,
    /// On the wire (ssh -C): the relay binary, the agent's code, one spawn
    /// request, one announcement.
    pub relay_bytes: f64,
    pub agent_code_bytes: f64,
    pub spawn_bytes: f64,
    pub hello_bytes: f64,
    pub max_connecting: usize,
    /// Spread of every latency and CPU cost drawn per seed (0.1: ±10 %).
    pub jitter: f64,
}

/// The shape: bastions behind the WAN, racks behind each, hosts per rack
/// (racks = 0: hosts directly behind each bastion).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub bastions: usize,
    pub racks: usize,
    pub hosts: usize,
}

impl Shape {
    pub fn targets(&self) -> usize {
        self.bastions * self.racks.max(1) * self.hosts
    }
}

#[derive(Debug)]
pub struct Projection {
    /// Seconds from the first request until each target's agent was up,
    /// as the controller saw it (its announcement arrived).
    pub first_target: f64,
    pub last_target: f64,
    pub last_relay: f64,
    pub targets_up: usize,
    pub relays_up: usize,
    /// Bytes over the WAN, up and down.
    pub wan_up_bytes: f64,
    pub wan_down_bytes: f64,
    /// Most CPU work queued on one host at once.
    pub max_cpu_queue: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind2 {
    Controller,
    Relay,
    Target,
}

struct SimNode {
    core: Node,
    kind: Kind2,
    parent: Option<usize>,
    children: Vec<usize>,
    /// Link to the parent: its id here and at the parent.
    up_link: LinkId,
    parent_link: LinkId,
    /// Seconds one way to the parent, and bytes/s.
    latency: f64,
    rate: f64,
    /// Whether its link to the parent is the WAN.
    wan: bool,
    /// When each core of its host is next free.
    cores: Vec<f64>,
    /// Children waiting to connect (beyond `max_connecting`).
    waiting: VecDeque<usize>,
    connecting: usize,
    /// When the agent's code reached it (pinned), if it was sent.
    code_at: Option<f64>,
}

enum Ev {
    /// A frame arrives at node `to` on its link `link`.
    Frame {
        to: usize,
        link: LinkId,
        frame: Frame,
    },
    /// The parent's ssh client has done its CPU work: the network part.
    Connected { parent: usize, child: usize },
    /// The child's code has arrived: its start's CPU work.
    Started { child: usize },
    /// Child `child` has finished connecting: it announces itself.
    Up { child: usize },
}

pub struct ConnectSim {
    rng: Rng,
    c: Costs,
    t0: Instant,
    now: f64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    nodes: Vec<SimNode>,
    /// When each link direction is next free: (node, towards parent?).
    link_free: HashMap<(usize, bool), f64>,
    wan_up_free: f64,
    wan_down_free: f64,
    wan_up_bytes: f64,
    wan_down_bytes: f64,
    up_at: BTreeMap<usize, f64>,
    max_cpu_queue: usize,
}

fn micros(s: f64) -> u64 {
    (s * 1e6).round().max(0.0) as u64
}

impl ConnectSim {
    fn jit(&mut self, v: f64) -> f64 {
        if self.c.jitter <= 0.0 {
            return v;
        }
        let u = (self.rng.below(2001) as f64 - 1000.0) / 1000.0;
        v * (1.0 + self.c.jitter * u)
    }

    fn at(&self, s: f64) -> Instant {
        self.t0 + Duration::from_micros(micros(s))
    }

    fn schedule(&mut self, when: f64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((micros(when), self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn add(&mut self, kind: Kind2, parent: Option<usize>, wan: bool) -> usize {
        let i = self.nodes.len();
        let (latency, rate) = if wan {
            (self.c.wan_rtt / 2.0, self.c.wan_up_rate)
        } else {
            (self.c.lan_rtt / 2.0, self.c.lan_rate)
        };
        let latency = self.jit(latency);
        let parent_link = LinkId(parent.map_or(0, |p| self.nodes[p].children.len() as u32 + 1));
        self.nodes.push(SimNode {
            core: Node::new(NodeId(i as u32), Limits::default()),
            kind,
            parent,
            children: Vec::new(),
            up_link: LinkId(0),
            parent_link,
            latency,
            rate,
            wan,
            cores: vec![0.0; self.c.cores.max(1)],
            waiting: VecDeque::new(),
            connecting: 0,
            code_at: None,
        });
        if let Some(p) = parent {
            self.nodes[p].children.push(i);
            let now = self.at(self.now);
            self.nodes[p]
                .core
                .handle_link_up(now, parent_link, Role::Child);
            self.nodes[i]
                .core
                .handle_link_up(now, LinkId(0), Role::Parent);
        }
        i
    }

    /// Work of `secs` CPU on node `i`'s host, starting no earlier than
    /// `from`; returns when it is done.
    fn cpu(&mut self, i: usize, from: f64, secs: f64) -> f64 {
        let secs = self.jit(secs);
        let i = if self.c.shared_cores { 0 } else { i };
        let cores = &mut self.nodes[i].cores;
        let busy = cores.iter().filter(|&&t| t > from).count();
        let (k, free) = cores
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0));
        let done = free.max(from) + secs;
        cores[k] = done;
        self.max_cpu_queue = self.max_cpu_queue.max(busy + 1);
        done
    }

    /// Sends `bytes` over the link between `child` and its parent, in the
    /// direction given; returns when the last byte arrives.
    fn transfer(&mut self, child: usize, towards_parent: bool, from: f64, bytes: f64) -> f64 {
        let n = &self.nodes[child];
        let (latency, wan) = (n.latency, n.wan);
        let rate = if wan && towards_parent {
            self.c.wan_down_rate
        } else {
            n.rate
        };
        let free = if wan {
            if towards_parent {
                &mut self.wan_down_free
            } else {
                &mut self.wan_up_free
            }
        } else {
            self.link_free.entry((child, towards_parent)).or_insert(0.0)
        };
        let start = free.max(from);
        let end = start + bytes / rate;
        *free = end;
        if wan {
            if towards_parent {
                self.wan_down_bytes += bytes;
            } else {
                self.wan_up_bytes += bytes;
            }
        }
        end + latency
    }

    /// Round trip time from node `i` to the controller.
    fn rtt_to_controller(&self, mut i: usize) -> f64 {
        let mut rtt = 0.0;
        while let Some(p) = self.nodes[i].parent {
            rtt += 2.0 * self.nodes[i].latency;
            i = p;
        }
        rtt
    }

    /// The controller sends frame `f` from node `from` on `link`.
    fn send_on(&mut self, from: usize, link: LinkId, frame: Frame, bytes: f64) {
        let (to, to_link, child, towards_parent) = if link == LinkId(0) {
            let p = self.nodes[from].parent.unwrap_or(0);
            (p, self.nodes[from].parent_link, from, true)
        } else {
            let Some(&c) = self.nodes[from]
                .children
                .iter()
                .find(|&&c| self.nodes[c].parent_link == link)
            else {
                return;
            };
            (c, LinkId(0), c, false)
        };
        let when = self.transfer(child, towards_parent, self.now, bytes);
        self.schedule(
            when,
            Ev::Frame {
                to,
                link: to_link,
                frame,
            },
        );
    }

    fn pump(&mut self, i: usize) {
        loop {
            if let Some((link, frame)) = self.nodes[i].core.poll_transmit() {
                let bytes = match frame.kind {
                    Kind::RouteAdd => self.c.hello_bytes,
                    _ => self.c.spawn_bytes,
                };
                self.send_on(i, link, frame, bytes);
                continue;
            }
            let Some(ev) = self.nodes[i].core.poll_event() else {
                return;
            };
            match ev {
                Event::Deliver(f) if f.kind == Kind::Request => {
                    let child = u32::from_le_bytes(f.payload[..4].try_into().unwrap_or([0; 4]));
                    self.request_connect(i, child as usize);
                }
                Event::NodeUp { node, .. } if i == 0 => {
                    let n = node.0 as usize;
                    self.up_at.insert(n, self.now);
                    if self.nodes[n].kind == Kind2::Relay {
                        // Every host behind it was asked for: spawn its children.
                        let kids = self.nodes[n].children.clone();
                        for k in kids {
                            self.spawn_request(n, k);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The controller asks relay `relay` to start `child`.
    fn spawn_request(&mut self, relay: usize, child: usize) {
        let f = Frame::new(
            Kind::Request,
            NodeId(relay as u32),
            NodeId::CONTROLLER,
            StreamId(child as u32),
            (child as u32).to_le_bytes().to_vec(),
        );
        let now = self.at(self.now);
        self.nodes[0].core.send(now, f);
        self.pump(0);
    }

    /// A relay (or the controller) was asked to start `child`: at most
    /// `max_connecting` at once, the rest in order.
    fn request_connect(&mut self, parent: usize, child: usize) {
        if self.c.max_connecting > 0 && self.nodes[parent].connecting >= self.c.max_connecting {
            self.nodes[parent].waiting.push_back(child);
            return;
        }
        self.nodes[parent].connecting += 1;
        self.connect(parent, child);
    }

    /// A connection in three steps, each one an event at the time it can
    /// start, so CPU is given out in time order: the parent's ssh client,
    /// then the network (handshake, authentication, the code), then the
    /// child's start.
    fn connect(&mut self, parent: usize, child: usize) {
        let done = self.cpu(parent, self.now, self.c.cpu_client);
        self.schedule(done, Ev::Connected { parent, child });
    }

    fn connected(&mut self, parent: usize, child: usize) {
        let c = self.c;
        let link_rtt = 2.0 * self.nodes[child].latency;
        let mut t = self.now + c.handshake_rtts * link_rtt + self.jit(c.fixed);
        if self.nodes[child].kind == Kind2::Relay {
            t += c.upload_rtts * link_rtt;
        }
        if parent != 0 {
            t += self.jit(c.auth_rtts * self.rtt_to_controller(parent));
        }
        // The code: the relay's binary from its parent; the agent's code
        // from the parent's pin, which crosses each link above once.
        let kind = self.nodes[child].kind;
        let code = match kind {
            Kind2::Relay => c.relay_bytes,
            _ => c.agent_code_bytes,
        };
        if kind == Kind2::Target && parent != 0 {
            let now = self.now;
            t = t.max(self.ensure_code(parent, now));
        }
        t = self.transfer(child, false, t, code);
        self.schedule(t, Ev::Started { child });
    }

    fn started(&mut self, child: usize) {
        let work = match self.nodes[child].kind {
            Kind2::Relay => self.c.cpu_child_relay,
            _ => self.c.cpu_child_agent,
        };
        let done = self.cpu(child, self.now, work);
        self.schedule(done, Ev::Up { child });
    }

    /// When relay `i` holds the agent's code: pinned from its parent relay
    /// (itself served first), or sent from the controller.
    fn ensure_code(&mut self, i: usize, from: f64) -> f64 {
        if let Some(t) = self.nodes[i].code_at {
            return t;
        }
        let start = match self.nodes[i].parent {
            Some(p) if p != 0 => self.ensure_code(p, from),
            _ => from,
        };
        let bytes = self.c.agent_code_bytes;
        let t = self.transfer(i, false, start, bytes);
        self.nodes[i].code_at = Some(t);
        t
    }

    /// Projects the connect time of `shape` with `costs`, for one seed.
    pub fn run(seed: u64, costs: Costs, shape: Shape) -> Projection {
        let mut sim = ConnectSim {
            rng: Rng::new(seed),
            c: costs,
            t0: Instant::now(),
            now: 0.0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes: Vec::new(),
            link_free: HashMap::new(),
            wan_up_free: 0.0,
            wan_down_free: 0.0,
            wan_up_bytes: 0.0,
            wan_down_bytes: 0.0,
            up_at: BTreeMap::new(),
            max_cpu_queue: 0,
        };
        let ctl = sim.add(Kind2::Controller, None, false);
        let mut bastions = Vec::new();
        for _ in 0..shape.bastions {
            let b = sim.add(Kind2::Relay, Some(ctl), true);
            bastions.push(b);
            if shape.racks == 0 {
                for _ in 0..shape.hosts {
                    sim.add(Kind2::Target, Some(b), false);
                }
                continue;
            }
            for _ in 0..shape.racks {
                let r = sim.add(Kind2::Relay, Some(b), false);
                for _ in 0..shape.hosts {
                    sim.add(Kind2::Target, Some(r), false);
                }
            }
        }
        for b in bastions {
            sim.request_connect(ctl, b);
        }
        let limit = 600_000_000u64;
        while let Some(Reverse((at, seq))) = sim.queue.pop() {
            if at > limit {
                break;
            }
            sim.now = at as f64 / 1e6;
            let Some(ev) = sim.events.remove(&seq) else {
                continue;
            };
            match ev {
                Ev::Frame { to, link, frame } => {
                    let now = sim.at(sim.now);
                    sim.nodes[to].core.handle_frame(now, link, frame);
                    sim.pump(to);
                }
                Ev::Connected { parent, child } => sim.connected(parent, child),
                Ev::Started { child } => sim.started(child),
                Ev::Up { child } => {
                    let parent = sim.nodes[child].parent.unwrap_or(0);
                    sim.nodes[parent].connecting -= 1;
                    if let Some(next) = sim.nodes[parent].waiting.pop_front() {
                        sim.nodes[parent].connecting += 1;
                        sim.connect(parent, next);
                    }
                    let id = NodeId(child as u32);
                    let hello =
                        Frame::new(Kind::RouteAdd, NodeId::CONTROLLER, id, StreamId(0), vec![]);
                    let up = sim.nodes[child].up_link;
                    sim.send_on(child, up, hello, costs.hello_bytes);
                }
            }
        }
        let up = |kind: Kind2| -> Vec<f64> {
            sim.up_at
                .iter()
                .filter(|(n, _)| sim.nodes[**n].kind == kind)
                .map(|(_, t)| *t)
                .collect()
        };
        let (targets, relays) = (up(Kind2::Target), up(Kind2::Relay));
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        Projection {
            first_target: targets.iter().copied().fold(f64::INFINITY, f64::min),
            last_target: max(&targets),
            last_relay: max(&relays),
            targets_up: targets.len(),
            relays_up: relays.len(),
            wan_up_bytes: sim.wan_up_bytes,
            wan_down_bytes: sim.wan_down_bytes,
            max_cpu_queue: sim.max_cpu_queue,
        }
    }
}
