//! Relay caches under load: two relays in a chain (the relay rules the
//! binary runs, [`arbor_core::relay::Relay`]) and agents below the second,
//! with the daemon's mirror ([`arbor_core::cache::Mirror`]) planning every
//! put and forward, then injecting the entry into an agent's request, for
//! many entries of seeded sizes against a cache small enough that entries
//! are evicted all the time.
//!
//! Checked after every step: the mirror holds exactly what each relay
//! holds; every injected entry reaches its agent whole; no cache holds more
//! than its bound.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use arbor_core::cache::{Mirror, Step};
use arbor_core::relay::{Action, Relay, PARENT};
use arbor_core::LinkId;
use arbor_wire::control::{self, Request};
use arbor_wire::{Frame, Kind, NodeId, StreamId};

use crate::Rng;

#[derive(Clone, Copy, Debug)]
pub struct CacheScenario {
    pub agents: usize,
    pub keys: usize,
    pub requests: usize,
    pub cache_bytes: usize,
    /// Entries weigh between 1 byte and this.
    pub entry_max: usize,
}

#[derive(Debug, Default)]
pub struct CacheReport {
    pub injected: usize,
    /// Entries put into the first relay, and forwarded from it.
    pub puts: usize,
    pub forwards: usize,
    /// Requests during which the second relay evicted an entry.
    pub evictions_seen: usize,
    pub violations: Vec<String>,
}

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

struct Chain {
    now: Instant,
    a: Relay,
    b: Relay,
    /// a's link to b, b's links to each agent.
    a_to_b: Option<LinkId>,
    b_links: HashMap<LinkId, NodeId>,
    /// What reached the controller, and each agent.
    up: Vec<Frame>,
    agents: HashMap<NodeId, Vec<Frame>>,
}

impl Chain {
    /// Delivers every frame and action until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            let mut to_b = VecDeque::new();
            while let Some((link, f)) = self.a.poll_transmit() {
                moved = true;
                if link == PARENT {
                    self.up.push(f);
                } else if Some(link) == self.a_to_b {
                    to_b.push_back(f);
                }
            }
            while let Some(action) = self.a.poll_action() {
                moved = true;
                if let Action::Spawn { link, .. } = action {
                    self.a_to_b = Some(link);
                    self.a.child_started(link, 2);
                    self.b.announce(self.now, b"{}".to_vec());
                }
            }
            for f in to_b {
                self.b.handle_frame(self.now, PARENT, f);
            }
            let mut to_a = VecDeque::new();
            while let Some((link, f)) = self.b.poll_transmit() {
                moved = true;
                if link == PARENT {
                    to_a.push_back(f);
                } else if let Some(node) = self.b_links.get(&link) {
                    self.agents.entry(*node).or_default().push(f);
                }
            }
            let mut joins = Vec::new();
            while let Some(action) = self.b.poll_action() {
                moved = true;
                if let Action::Spawn { link, spawn, .. } = action {
                    self.b_links.insert(link, spawn.node);
                    self.b.child_started(link, spawn.node.0);
                    joins.push((link, spawn.node));
                }
            }
            for (link, node) in joins {
                self.b.handle_frame(self.now, link, crate::hello(node));
            }
            if let Some(l) = self.a_to_b {
                for f in to_a {
                    self.a.handle_frame(self.now, l, f);
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn request(&mut self, to: NodeId, req: &Request) {
        let f = Frame::new(
            Kind::Request,
            to,
            NodeId::CONTROLLER,
            StreamId(0),
            control::encode(req),
        );
        self.a.handle_frame(self.now, PARENT, f);
        self.settle();
    }
}

fn spawn(node: NodeId) -> Request {
    Request::Spawn(crate::spawn_of(node, 10_000, 0))
}

fn entry(key: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (key * 31 + i * 7) as u8).collect()
}

pub fn run(seed: u64, s: CacheScenario) -> CacheReport {
    let mut rng = Rng::new(seed);
    let now = Instant::now();
    let mut chain = Chain {
        now,
        a: Relay::new(now, A),
        b: Relay::new(now, B),
        a_to_b: None,
        b_links: HashMap::new(),
        up: Vec::new(),
        agents: HashMap::new(),
    };
    let mut r = CacheReport::default();
    chain.request(A, &spawn(B));
    let agents: Vec<NodeId> = (0..s.agents).map(|i| NodeId(10 + i as u32)).collect();
    for &n in &agents {
        chain.request(B, &spawn(n));
    }
    let sizes: Vec<usize> = (0..s.keys)
        .map(|_| 1 + rng.below(s.entry_max as u64) as usize)
        .collect();
    let mut mirror = Mirror::default();
    for i in 0..s.requests {
        let k = rng.below(s.keys as u64) as usize;
        let key = format!("k{k}");
        let data = entry(k, sizes[k]);
        let held = |c: &Chain| -> Vec<bool> {
            (0..s.keys)
                .map(|j| c.b.cache().contains(&format!("k{j}")))
                .collect()
        };
        let before = held(&chain);
        let Some(steps) = mirror.plan(&[A, B], &key, data.len(), s.cache_bytes) else {
            r.violations.push(format!(
                "{key} ({} bytes) refused under a bound of {}",
                data.len(),
                s.cache_bytes
            ));
            continue;
        };
        for step in steps {
            match step {
                Step::Put { relay } => {
                    r.puts += 1;
                    let put = Request::CachePut {
                        key: key.clone(),
                        data: data.clone(),
                        max_bytes: s.cache_bytes as u64,
                    };
                    chain.request(relay, &put);
                }
                Step::Forward { via, dst } => {
                    r.forwards += 1;
                    let fwd = Request::Forward {
                        dst,
                        keys: vec![key.clone()],
                        max_bytes: s.cache_bytes as u64,
                    };
                    chain.request(via, &fwd);
                }
            }
        }
        let after = held(&chain);
        if before.iter().zip(&after).any(|(b, a)| *b && !*a) {
            r.evictions_seen += 1;
        }
        let agent = agents[rng.below(agents.len() as u64) as usize];
        let stream = StreamId(1000 + i as u32);
        chain.request(
            B,
            &Request::Inject {
                dst: agent,
                stream,
                keys: vec![key.clone()],
            },
        );
        let got: Vec<u8> = chain
            .agents
            .get_mut(&agent)
            .map(|fs| {
                let (mine, rest): (Vec<Frame>, Vec<Frame>) =
                    fs.drain(..).partition(|f| f.stream == stream);
                *fs = rest;
                mine.into_iter().flat_map(|f| f.payload).collect()
            })
            .unwrap_or_default();
        r.injected += 1;
        if got != data {
            r.violations.push(format!(
                "request {i}: {key} reached n{} as {} of {} bytes",
                agent.0,
                got.len(),
                data.len()
            ));
        }
        for j in 0..s.keys {
            let key = format!("k{j}");
            for (relay, cache) in [(A, chain.a.cache()), (B, chain.b.cache())] {
                if mirror.holds(relay, &key) != cache.contains(&key) {
                    r.violations.push(format!(
                        "request {i}: the mirror of n{} is wrong about {key}",
                        relay.0
                    ));
                }
            }
        }
        if chain.a.cache().bytes() > s.cache_bytes || chain.b.cache().bytes() > s.cache_bytes {
            r.violations
                .push(format!("request {i}: a cache holds more than its bound"));
        }
    }
    if chain.up.iter().any(|f| f.kind == Kind::Undeliverable) {
        r.violations.push("a frame was undeliverable".into());
    }
    r
}

/// Over QUIC lanes an `Inject` for one agent can overtake the `CachePut`
/// sent (in another agent's lane) for the entry it names. The relay under
/// test gets, for agent n11: the inject, then the rest of n11's request (a
/// Data frame), and only then the entry's `CachePut` (or never, if
/// `never_put`, until its park expires). What n11 must see, in order: the
/// entry's bytes, then the rest (after an expiry: the rest alone, the
/// agent then asks again). Returns the violations.
pub fn overtaken_inject(never_put: bool) -> Vec<String> {
    use arbor_core::parked::PARK_TIMEOUT;
    let mut v = Vec::new();
    let t0 = Instant::now();
    let mut relay = Relay::new(t0, A);
    let mut links: HashMap<LinkId, NodeId> = HashMap::new();
    let to_relay = |req: &Request| {
        Frame::new(
            Kind::Request,
            A,
            NodeId::CONTROLLER,
            StreamId(0),
            control::encode(req),
        )
    };
    for n in [NodeId(11), NodeId(12)] {
        relay.handle_frame(t0, PARENT, to_relay(&spawn(n)));
        while let Some(action) = relay.poll_action() {
            if let Action::Spawn { link, spawn, .. } = action {
                links.insert(link, spawn.node);
                relay.child_started(link, spawn.node.0);
                relay.handle_frame(t0, link, crate::hello(spawn.node));
            }
        }
    }
    let agent = NodeId(11);
    let stream = StreamId(77);
    let entry = entry(3, 100_000);
    let inject = Request::Inject {
        dst: agent,
        stream,
        keys: vec!["k".into()],
    };
    relay.handle_frame(t0, PARENT, to_relay(&inject));
    let rest = Frame::new(
        Kind::Data,
        agent,
        NodeId::CONTROLLER,
        stream,
        b"rest".to_vec(),
    );
    relay.handle_frame(t0, PARENT, rest);
    // Another agent's frames are not held up.
    let other = Frame::new(
        Kind::Data,
        NodeId(12),
        NodeId::CONTROLLER,
        stream,
        b"x".to_vec(),
    );
    relay.handle_frame(t0, PARENT, other);
    let mut got: HashMap<NodeId, Vec<u8>> = HashMap::new();
    let collect = |relay: &mut Relay, got: &mut HashMap<NodeId, Vec<u8>>| {
        while let Some((link, f)) = relay.poll_transmit() {
            if let Some(n) = links.get(&link) {
                if f.stream == stream {
                    got.entry(*n).or_default().extend_from_slice(&f.payload);
                }
            }
        }
    };
    collect(&mut relay, &mut got);
    if got.get(&NodeId(12)).map(Vec::as_slice) != Some(b"x".as_slice()) {
        v.push("the other agent's frame waited behind the park".into());
    }
    if got.contains_key(&agent) {
        v.push("n11's frames went before the entry arrived".into());
    }
    let want: Vec<u8> = if never_put {
        if relay.poll_timeout() > Some(t0 + PARK_TIMEOUT) {
            v.push("the park's deadline is past its bound".into());
        }
        relay.handle_timeout(t0 + PARK_TIMEOUT);
        b"rest".to_vec()
    } else {
        let put = Request::CachePut {
            key: "k".into(),
            data: entry.clone(),
            max_bytes: 1 << 20,
        };
        relay.handle_frame(t0, PARENT, to_relay(&put));
        [entry.as_slice(), b"rest"].concat()
    };
    collect(&mut relay, &mut got);
    let seen = got.get(&agent).cloned().unwrap_or_default();
    if seen != want {
        v.push(format!(
            "n11 saw {} bytes (want {}), in order: {}",
            seen.len(),
            want.len(),
            seen.ends_with(b"rest")
        ));
    }
    v
}
