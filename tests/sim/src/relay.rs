//! One relay's rules ([`arbor_core::relay::Relay`], the code the relay
//! binary runs) under a seeded scenario: the controller sends a keepalive
//! and a burst of spawn requests and pings with the daemon's own
//! [`Pinger`]; each child
//! the relay starts joins, fails or hangs (a seeded fate and time); the
//! parent link can be held (a partition) for a while. Time is simulated.
//!
//! Checked while it runs: never more children connecting than the bound;
//! children start in the order they were asked for; a child is killed only
//! past its deadline. At the end: every request answered exactly once
//! (unless the relay ended first), and when the relay ended.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use arbor_core::liveness::Pinger;
use arbor_core::relay::{Action, Relay, PARENT};
use arbor_core::LinkId;
use arbor_wire::control::{self, Reply, Request};
use arbor_wire::{Frame, Kind, NodeId, StreamId};

use crate::Rng;

#[derive(Clone, Copy, Debug)]
pub struct RelayScenario {
    /// Spawn requests, sent at once.
    pub spawns: usize,
    pub max_connecting: u16,
    pub connect_timeout: Duration,
    /// Percent of children that never join (killed at their deadline),
    /// and that exit before joining (ssh refused).
    pub hang_percent: u64,
    pub fail_percent: u64,
    pub keepalive: Duration,
    /// The parent link holds every frame, both ways, from `.0` for `.1`.
    pub partition: Option<(Duration, Duration)>,
    /// How long the run lasts.
    pub run_for: Duration,
}

#[derive(Debug, Default)]
pub struct RelayReport {
    pub spawned: usize,
    pub failed: Vec<String>,
    pub unanswered: usize,
    pub most_connecting: usize,
    /// When the relay ended, from the start.
    pub exited_at: Option<Duration>,
    pub violations: Vec<String>,
}

enum Ev {
    ToRelay(Frame),
    ToController(Frame),
    Join(LinkId, NodeId),
    Exit(LinkId, String),
}

struct Sim {
    t0: Instant,
    now: Instant,
    rng: Rng,
    s: RelayScenario,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    relay: Relay,
    /// The controller's pings (the daemon's own rule).
    pinger: Pinger,
    exited: bool,
    /// Per request: the child node and how often it was answered.
    answers: HashMap<StreamId, (NodeId, usize)>,
    started: Vec<NodeId>,
    started_at: HashMap<LinkId, Instant>,
    report: RelayReport,
}

const LATENCY: Duration = Duration::from_millis(20);

impl Sim {
    fn at(&mut self, t: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// When a frame sent now over the parent link arrives: a partition
    /// holds it until it ends (the link stays ordered).
    fn parent_arrival(&self) -> Instant {
        let mut t = self.now;
        if let Some((from, hold)) = self.s.partition {
            let (a, b) = (self.t0 + from, self.t0 + from + hold);
            if t >= a && t < b {
                t = b;
            }
        }
        t + LATENCY
    }

    fn send_down(&mut self, req: &Request, stream: u32) {
        let f = Frame::new(
            Kind::Request,
            self.relay.id(),
            NodeId::CONTROLLER,
            StreamId(stream),
            control::encode(req),
        );
        let t = self.parent_arrival();
        self.at(t, Ev::ToRelay(f));
    }

    fn step_relay(&mut self) {
        while let Some((link, frame)) = self.relay.poll_transmit() {
            if link == PARENT {
                let t = self.parent_arrival();
                self.at(t, Ev::ToController(frame));
            }
        }
        while let Some(action) = self.relay.poll_action() {
            match action {
                Action::Spawn { link, spawn, .. } => self.start(link, spawn.node),
                Action::Kill { link } => {
                    let t = self.started_at[&link];
                    if self.now < t + self.s.connect_timeout {
                        self.violation(format!("{link:?} killed before its deadline"));
                    }
                    let at = self.now + Duration::from_millis(5);
                    self.at(at, Ev::Exit(link, "killed: it did not join in time".into()));
                }
                Action::CutOff { link, why } => self.violation(format!("{link:?} cut off: {why}")),
                Action::Joined { .. } => {}
                Action::QuicListen { .. } | Action::QuicConnect { .. } => {
                    self.violation("a QUIC link nobody asked for".into())
                }
                Action::Exit { .. } => {
                    self.exited = true;
                    self.report.exited_at = Some(self.now - self.t0);
                    return;
                }
            }
        }
        let connecting = self.relay.connecting();
        self.report.most_connecting = self.report.most_connecting.max(connecting);
        let bound = usize::from(self.s.max_connecting);
        if bound > 0 && connecting > bound {
            self.violation(format!("{connecting} children connecting, bound {bound}"));
        }
    }

    fn start(&mut self, link: LinkId, node: NodeId) {
        if self.started.last().is_some_and(|last| last.0 > node.0) {
            self.violation(format!(
                "n{} started after n{}",
                node.0,
                self.started.last().map_or(0, |n| n.0)
            ));
        }
        self.started.push(node);
        self.started_at.insert(link, self.now);
        self.relay.child_started(link, 1000 + node.0);
        let fate = self.rng.below(100);
        let after = self.rng.ms(30, 1500);
        let t = self.now + after;
        if fate < self.s.hang_percent {
            // Never joins: the deadline kills it.
        } else if fate < self.s.hang_percent + self.s.fail_percent {
            self.at(
                t,
                Ev::Exit(link, format!("n{}: ssh: Connection refused", node.0)),
            );
        } else {
            self.at(t, Ev::Join(link, node));
        }
    }

    fn violation(&mut self, v: String) {
        let at = (self.now - self.t0).as_millis();
        self.report.violations.push(format!("at {at} ms: {v}"));
    }

    fn controller_gets(&mut self, frame: Frame) {
        if frame.kind != Kind::Reply {
            return;
        }
        let Some((node, count)) = self.answers.get_mut(&frame.stream) else {
            return self.violation(format!("a reply on unknown stream {:?}", frame.stream));
        };
        *count += 1;
        let node = *node;
        if *count > 1 {
            return self.violation(format!("n{} answered twice", node.0));
        }
        match control::decode::<Reply>(&frame.payload) {
            Ok(Reply::Spawned { node: n, .. }) if n == node => self.report.spawned += 1,
            Ok(Reply::Failed { node: n, message }) if n == node => self.report.failed.push(message),
            other => self.violation(format!("n{}: unexpected reply {other:?}", node.0)),
        }
    }
}

pub fn run(seed: u64, s: RelayScenario) -> RelayReport {
    let t0 = Instant::now();
    let mut sim = Sim {
        t0,
        now: t0,
        rng: Rng::new(seed),
        s,
        queue: BinaryHeap::new(),
        events: HashMap::new(),
        seq: 0,
        relay: Relay::new(t0, NodeId(1)),
        pinger: Pinger::new(t0, s.keepalive),
        exited: false,
        answers: HashMap::new(),
        started: Vec::new(),
        started_at: HashMap::new(),
        report: RelayReport::default(),
    };
    let silent_ms = u32::try_from(s.keepalive.as_millis()).unwrap_or(u32::MAX);
    sim.send_down(&Request::Keepalive { silent_ms }, 0);
    for i in 0..s.spawns {
        let node = NodeId(100 + i as u32);
        let stream = 1 + i as u32;
        sim.answers.insert(StreamId(stream), (node, 0));
        let timeout = u32::try_from(s.connect_timeout.as_millis()).unwrap_or(u32::MAX);
        let spawn = crate::spawn_of(node, timeout, s.max_connecting);
        sim.send_down(&Request::Spawn(spawn), stream);
    }
    sim.pinger.watch(sim.relay.id());
    let end = t0 + s.run_for;
    let mut steps = 0u64;
    while !sim.exited {
        let next_ev = sim.queue.peek().map(|Reverse((t, _))| *t);
        let wake = [sim.relay.poll_timeout(), sim.pinger.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let t = match (next_ev, wake) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => break,
            },
        };
        if t > end {
            break;
        }
        // Each wake moves time on or handles an event: a rule that asks to
        // be woken again at the same instant would spin.
        steps += 1;
        if t == sim.now && next_ev != Some(t) && steps > 1 {
            sim.violation("woken at a timeout it did not act on".into());
            break;
        }
        sim.now = t;
        if next_ev == Some(t) {
            let Some(Reverse((_, seq))) = sim.queue.pop() else {
                break;
            };
            match sim.events.remove(&seq) {
                Some(Ev::ToRelay(f)) => sim.relay.handle_frame(t, PARENT, f),
                Some(Ev::ToController(f)) => sim.controller_gets(f),
                Some(Ev::Join(link, node)) => {
                    sim.relay.handle_frame(t, link, crate::hello(node));
                }
                Some(Ev::Exit(link, why)) => sim.relay.child_exited(t, link, why),
                None => {}
            }
        }
        for node in sim.pinger.handle_timeout(t) {
            let ping = Frame::new(
                Kind::Ping,
                node,
                NodeId::CONTROLLER,
                StreamId(0),
                Vec::new(),
            );
            let at = sim.parent_arrival();
            sim.at(at, Ev::ToRelay(ping));
        }
        sim.relay.handle_timeout(t);
        sim.step_relay();
    }
    let mut report = sim.report;
    report.unanswered = sim.answers.values().filter(|(_, n)| *n == 0).count();
    report
}
