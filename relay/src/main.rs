//! `arbor-relay`: the router that runs from RAM on an intermediary.
//!
//! Started by stage-0 with `--node N`. Its parent link is stdin/stdout; each
//! child (an `ssh` to a target, or another relay) is a process whose
//! stdin/stdout is a child link. The routing is `arbor_core::Node`; this file
//! is only the IO around it: reading and writing links, starting children in
//! parallel, and tearing everything down when the parent goes away.
//!
//! It resolves no names and reads no user database (no NSS): `ssh` does that.
//! It writes nothing to disk: a child's known_hosts is an in-RAM file (a
//! memfd) that the relay holds while the child lives; ssh reads it through
//! /proc/<relay>/fd/<n> (ssh closes inherited descriptors, so a path it is).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use arbor_core::cache::Fifo;
use arbor_core::{Event, Limits, LinkId, Node, Role};
use arbor_io::{
    mono_ms, signal, spawn_reader, spawn_writer, start_child_link, stop_children, ChildLink,
    LinkEvent as Input, LinkTx,
};
use arbor_wire::control::{
    self, Reply, Request, Spawn, AUTH_SOCK_TOKEN, KNOWN_HOSTS_TOKEN, PINS_MAX,
};
use arbor_wire::{Frame, Kind, NodeId, StreamId};
use tokio::process::Command;
use tokio::sync::mpsc;

/// Inputs (frames and link changes) waiting for the main loop.
const INBOX_FRAMES: usize = 1024;
/// How long children get to exit after SIGTERM.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Most spawn requests waiting for a connecting slot.
const WAITING_SPAWNS_MAX: usize = 8192;

struct Child {
    node: NodeId,
    label: String,
    link: ChildLink,
    /// The request that asked for it, answered when it joins or fails.
    pending: Option<(NodeId, StreamId, Instant)>,
    /// Its known_hosts, in RAM, open until the child is gone.
    _known_hosts: Option<OwnedFd>,
    /// Its ssh password, in RAM, open until it has joined (or is gone).
    askpass: Option<OwnedFd>,
}

fn main() {
    // Started again by a child ssh as its SSH_ASKPASS program.
    if let Some(code) = arbor_io::askpass::answer_from_env() {
        std::process::exit(code);
    }
    let mut args = std::env::args().skip(1);
    let mut node = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--node" => node = args.next().and_then(|v| v.parse::<u32>().ok()),
            "--version" => {
                println!("arbor-relay {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            _ => {}
        }
    }
    let Some(node) = node else {
        eprintln!("arbor-relay: usage: arbor-relay --node N (started by arbor's stage-0)");
        std::process::exit(64);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arbor-relay n{node}: runtime: {e}");
            std::process::exit(70);
        }
    };
    let code = rt.block_on(async move { Relay::new(NodeId(node)).run().await });
    std::process::exit(code);
}

struct Relay {
    core: Node,
    inbox_tx: mpsc::Sender<Input>,
    inbox: mpsc::Receiver<Input>,
    parent: LinkTx,
    children: HashMap<LinkId, Child>,
    next_link: u32,
    self_exe: Option<Vec<u8>>,
    /// Spawns waiting for fewer children to be connecting (in order).
    waiting: VecDeque<(NodeId, StreamId, Spawn)>,
    /// The bound the latest spawn request gave (0: none).
    max_connecting: usize,
    /// Content cache (module zip members, file chunks), oldest out first.
    cache: Fifo<Vec<u8>>,
    /// What every spawn uses (the agent's code, known_hosts): at most
    /// `PINS_MAX` entries, kept for the relay's life.
    pins: HashMap<String, Vec<u8>>,
    /// The last frame from the parent, and how long it may be silent.
    heard: Instant,
    keepalive: Option<Duration>,
}

const PARENT: LinkId = LinkId(0);

impl Relay {
    fn new(id: NodeId) -> Self {
        let (inbox_tx, inbox) = mpsc::channel(INBOX_FRAMES);
        // The parent is the controller or another relay: compressed frames.
        let parent = spawn_writer(tokio::io::stdout(), true, inbox_tx.clone(), PARENT);
        spawn_reader(tokio::io::stdin(), inbox_tx.clone(), PARENT);
        // Strict: a child's node is routed only on the link it was started
        // on (and a nested agent's only where the controller said).
        let mut core = Node::new(id, Limits::default()).strict();
        core.handle_link_up(Instant::now(), PARENT, Role::Parent);
        Relay {
            core,
            inbox_tx,
            inbox,
            parent,
            children: HashMap::new(),
            next_link: 1,
            self_exe: None,
            waiting: VecDeque::new(),
            max_connecting: 0,
            cache: Fifo::default(),
            pins: HashMap::new(),
            heard: Instant::now(),
            keepalive: None,
        }
    }

    async fn run(mut self) -> i32 {
        let hello = format!(
            r#"{{"pid":{},"relay":"{}","machine":"{}"}}"#,
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH
        );
        let hello = Frame::new(
            Kind::RouteAdd,
            NodeId::CONTROLLER,
            self.core.id(),
            StreamId(0),
            arbor_wire::msg::encode(hello.as_bytes(), b""),
        );
        if self.parent.send(hello).await.is_err() {
            return 74;
        }
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut sighup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                input = self.inbox.recv() => {
                    let Some(input) = input else { break };
                    if !self.handle(input) { break }
                }
                _ = tick.tick() => if !self.check_deadlines() { break },
                _ = recv_signal(&mut sigterm) => break,
                _ = recv_signal(&mut sighup) => break,
            }
            if !self.pump().await {
                break;
            }
        }
        self.shutdown().await;
        0
    }

    /// Feeds one input to the core; false when the relay must stop.
    fn handle(&mut self, input: Input) -> bool {
        let now = Instant::now();
        match input {
            Input::Frame(link, frame) => {
                if link == PARENT {
                    self.heard = now;
                }
                self.core.handle_frame(now, link, frame)
            }
            Input::Closed(link, why) => {
                if link == PARENT {
                    return false;
                }
                // The routes go when the process has exited and its
                // stderr says why.
                match self.children.get_mut(&link) {
                    Some(c) => c.link.stdout_closed(why, now),
                    None => self.core.handle_link_down(now, link, &why),
                }
            }
            Input::Exited(link, status, tail) => {
                let Some(c) = self.children.remove(&link) else {
                    return true;
                };
                let why = c.link.lost_why(&c.label, &status, &tail);
                if let Some((src, stream, _)) = c.pending {
                    self.reply(
                        src,
                        stream,
                        &Reply::Failed {
                            node: c.node,
                            message: why.clone(),
                        },
                    );
                }
                self.core.handle_link_down(now, link, &why);
                self.start_waiting();
            }
        }
        true
    }

    /// Sends what the core wants sent and acts on its events.
    async fn pump(&mut self) -> bool {
        loop {
            if let Some((link, frame)) = self.core.poll_transmit() {
                if link == PARENT {
                    // Waits for room, but not past the keepalive: a parent
                    // link that takes nothing that long is dead.
                    let send = self.parent.send(frame);
                    tokio::pin!(send);
                    loop {
                        tokio::select! {
                            _ = &mut send => break,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                                if self.parent_silent() {
                                    return false;
                                }
                            }
                        }
                    }
                } else if let Some(c) = self.children.get_mut(&link) {
                    // Never waits for a child (one that stops reading is
                    // cut off).
                    c.link.send(frame);
                }
                continue;
            }
            let Some(event) = self.core.poll_event() else {
                return true;
            };
            match event {
                Event::Deliver(frame) => {
                    if !self.on_request(frame).await {
                        return false;
                    }
                }
                Event::NodeUp { node, link, .. } => {
                    if let Some(c) = self.children.get_mut(&link) {
                        // A child's first announcement is the node started
                        // on it; only after that may it route for others
                        // (an agent's nested become agents).
                        if c.pending.is_some() && c.node != node {
                            c.link.cut_off(format!(
                                "announced n{} before itself (n{})",
                                node.0, c.node.0
                            ));
                        }
                        if c.node == node {
                            // Joined: its password is of no more use.
                            c.askpass = None;
                            if let Some((src, stream, _)) = c.pending.take() {
                                let pid = c.link.pid();
                                self.reply(src, stream, &Reply::Spawned { node, pid });
                                self.start_waiting();
                            }
                        }
                    }
                }
                Event::ParentLost => return false,
                Event::NodeDown { .. } | Event::Dropped { .. } => {}
            }
        }
    }

    async fn on_request(&mut self, frame: Frame) -> bool {
        if frame.kind != Kind::Request {
            if frame.kind == Kind::Ping {
                let pong = frame.reply_to(Kind::Pong, frame.payload.clone());
                self.core.send(Instant::now(), pong);
            }
            return true;
        }
        // Only the controller directs a relay: a node below it (whose
        // source the core has checked against its link) may not start
        // processes, fill the cache or have frames sent in the
        // controller's name.
        if frame.src != NodeId::CONTROLLER {
            let message = format!("n{}: only the controller may ask a relay", frame.src.0);
            self.reply(frame.src, frame.stream, &Reply::Error { message });
            return true;
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
                    self.reply(frame.src, frame.stream, &Reply::Failed { node, message });
                } else {
                    self.waiting.push_back((frame.src, frame.stream, spec));
                    self.start_waiting();
                }
                true
            }
            Ok(Request::CachePut {
                key,
                data,
                max_bytes,
            }) => {
                self.cache_put(key, data, max_bytes);
                true
            }
            Ok(Request::Inject { dst, stream, keys }) => {
                self.inject(dst, stream, &keys);
                true
            }
            Ok(Request::Forward {
                dst,
                keys,
                max_bytes,
            }) => {
                self.forward(dst, &keys, max_bytes);
                true
            }
            Ok(Request::Expect { node, via }) => {
                if let Some(link) = self.core.route(via).filter(|l| *l != PARENT) {
                    self.core.expect(node, link);
                }
                true
            }
            Ok(Request::Keepalive { silent_ms }) => {
                self.keepalive = Some(Duration::from_millis(u64::from(silent_ms.max(1000))));
                self.heard = Instant::now();
                true
            }
            Ok(Request::Pin { key, data }) => {
                if self.pins.len() < PINS_MAX || self.pins.contains_key(&key) {
                    self.pins.insert(key, data);
                }
                true
            }
            Ok(Request::Shutdown) => {
                self.reply(frame.src, frame.stream, &Reply::Done);
                false
            }
            Err(e) => {
                self.reply(
                    frame.src,
                    frame.stream,
                    &Reply::Error {
                        message: e.to_string(),
                    },
                );
                true
            }
        }
    }

    fn reply(&mut self, dst: NodeId, stream: StreamId, reply: &Reply) {
        let f = Frame::new(
            Kind::Reply,
            dst,
            self.core.id(),
            stream,
            control::encode(reply),
        );
        self.core.send(Instant::now(), f);
    }

    /// Keeps `data` under `key`, the oldest entries going while the cache
    /// would hold more than `max_bytes` (the controller mirrors this).
    fn cache_put(&mut self, key: String, data: Vec<u8>, max_bytes: u64) {
        let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let weight = data.len();
        self.cache.put(&key, data, weight, max);
    }

    /// Puts cached entries into the cache of the relay `dst` below, as the
    /// controller's own requests.
    fn forward(&mut self, dst: NodeId, keys: &[String], max_bytes: u64) {
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
            self.core.handle_frame(Instant::now(), PARENT, f);
        }
    }

    /// Sends cached entries to `dst` as the controller's Data frames.
    fn inject(&mut self, dst: NodeId, stream: StreamId, keys: &[String]) {
        for key in keys {
            let Some(data) = self.cache.get(key) else {
                return;
            };
            let frames: Vec<Frame> = data
                .chunks(arbor_wire::CHUNK_BYTES)
                .map(|part| Frame::new(Kind::Data, dst, NodeId::CONTROLLER, stream, part.to_vec()))
                .collect();
            // Routed exactly as the controller's own frames from the parent.
            for f in frames {
                self.core.handle_frame(Instant::now(), PARENT, f);
            }
        }
    }

    /// Starts waiting children while fewer than the bound are connecting.
    fn start_waiting(&mut self) {
        loop {
            let connecting = self
                .children
                .values()
                .filter(|c| c.pending.is_some())
                .count();
            if self.max_connecting != 0 && connecting >= self.max_connecting {
                return;
            }
            let Some((src, stream, spec)) = self.waiting.pop_front() else {
                return;
            };
            let node = spec.node;
            if let Err(message) = self.spawn(src, stream, spec) {
                self.reply(src, stream, &Reply::Failed { node, message });
            }
        }
    }

    /// Starts a child without waiting for it: children start in parallel,
    /// and the request is answered when the child joins, fails or times out.
    fn spawn(&mut self, src: NodeId, stream: StreamId, spec: Spawn) -> Result<(), String> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err("empty command".into());
        };
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
        let mut preamble = spec.preamble.clone();
        if let Some(code) = pinned(&spec.preamble_pinned)? {
            preamble.extend_from_slice(code);
        }
        let known_hosts = match pinned(&spec.known_hosts_pinned)? {
            Some(hosts) => Some(hosts.clone()),
            None => spec.known_hosts.clone(),
        };
        if spec.send_self {
            match self.own_binary() {
                Ok(bin) => preamble.extend_from_slice(bin),
                Err(e) => return Err(format!("cannot read this relay's binary: {e}")),
            }
        }
        // Held open while the child lives; ssh opens it by path (it closes
        // inherited descriptors at start).
        let known_hosts = match &known_hosts {
            Some(hosts) => Some(
                arbor_io::askpass::ram_file("arbor-known-hosts", hosts)
                    .map_err(|e| format!("known_hosts: {e}"))?,
            ),
            None => None,
        };
        let (askpass, askpass_env) = match &spec.password {
            Some(pw) => {
                let (fd, env) = arbor_io::askpass::for_ssh(&pw.0)
                    .map_err(|e| format!("password file in RAM: {e}"))?;
                (Some(fd), env)
            }
            None => (None, Vec::new()),
        };
        let kh_path = known_hosts
            .as_ref()
            .map(|fd| format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()))
            .unwrap_or_else(|| "/dev/null".into());
        // Only a plain path goes into the child's (quoted) command line.
        let auth_sock = std::env::var("SSH_AUTH_SOCK")
            .ok()
            .filter(|s| !s.contains(['\'', '\n']))
            .unwrap_or_default();
        let mut cmd = Command::new(program);
        cmd.args(args.iter().map(|a| {
            a.replace(KNOWN_HOSTS_TOKEN, &kh_path)
                .replace(AUTH_SOCK_TOKEN, &auth_sock)
        }))
        .envs(spec.env.iter().cloned())
        .envs(askpass_env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let link = LinkId(self.next_link);
        self.next_link += 1;
        // Only another relay understands compressed frames.
        // A child relay is sent this relay; a host of another machine
        // asks for its own, which this relay does not carry.
        let relay_for: Option<arbor_io::stage0::RelayFor> = spec.send_self.then(|| {
            Box::new(|m: &str| {
                Err(format!(
                    "its machine is {m}; the relay it is reached through is {} and carries no {m} relay",
                    std::env::consts::ARCH
                ))
            }) as arbor_io::stage0::RelayFor
        });
        let child_link = start_child_link(
            child,
            program,
            preamble,
            spec.send_self,
            relay_for,
            self.inbox_tx.clone(),
            link,
        )?;

        self.core.handle_link_up(Instant::now(), link, Role::Child);
        self.core.expect(spec.node, link);
        let deadline = Instant::now() + Duration::from_millis(u64::from(spec.connect_timeout_ms));
        self.children.insert(
            link,
            Child {
                node: spec.node,
                label: spec.label,
                link: child_link,
                pending: Some((src, stream, deadline)),
                _known_hosts: known_hosts,
                askpass,
            },
        );
        Ok(())
    }

    /// The parent has been silent past the keepalive. Alive: a frame came
    /// from it, or bytes went to it (a slow link busy with our output
    /// delays the pings behind it).
    fn parent_silent(&self) -> bool {
        let wrote = Duration::from_millis(mono_ms().saturating_sub(self.parent.progress_ms()));
        let silent = self.heard.elapsed().min(wrote);
        self.keepalive.is_some_and(|k| silent > k)
    }

    /// Kills children past their deadlines; false if the parent has been
    /// silent past the keepalive (the relay then ends).
    fn check_deadlines(&mut self) -> bool {
        let now = Instant::now();
        if self.parent_silent() {
            eprintln!(
                "arbor-relay n{}: nothing from the parent for {:?}; exiting",
                self.core.id().0,
                self.keepalive.unwrap_or_default()
            );
            return false;
        }
        for c in self.children.values_mut() {
            c.link.kill_if_lingering(now);
            if c.pending.is_some_and(|(_, _, d)| now > d) {
                // Its exit is then reported with what it said.
                signal(c.link.pid(), libc::SIGKILL);
            }
        }
        true
    }

    fn own_binary(&mut self) -> std::io::Result<&[u8]> {
        if self.self_exe.is_none() {
            self.self_exe = Some(std::fs::read("/proc/self/exe")?);
        }
        Ok(self.self_exe.as_deref().unwrap_or_default())
    }

    /// Stops every child (SIGTERM, then SIGKILL after a grace period) and
    /// waits until each has been reaped.
    async fn shutdown(&mut self) {
        let pids = self
            .children
            .drain()
            .map(|(l, c)| (l, c.link.pid()))
            .collect();
        stop_children(pids, &mut self.inbox, KILL_GRACE).await;
    }
}

async fn recv_signal(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
