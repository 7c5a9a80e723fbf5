//! The tree the controller owns: node 0 of the router, the ssh processes to
//! first hops, and which hop is which node.
//!
//! One task ([`Tree::run`]) owns all of it and is reached through
//! [`TreeHandle`]. Hops are started on demand, once each: a relay for every
//! intermediary, an agent for every target. Connects to different hosts
//! proceed in parallel; callers for a hop that is connecting wait for it.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_core::liveness::Pinger;
use arbor_core::{Event, Limits, LinkId, Node, Role};
use arbor_io::{start_child_link, stop_children, ChildLink, LinkEvent as Input};
use arbor_topology::{Hop, HopKey, BECOME_METHODS};
use arbor_wire::control::{self, Reply, Request, Spawn};
use arbor_wire::{Frame, Kind, NodeId, StreamId};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

use crate::relays;
use crate::ssh;
use crate::sshagent::SshAgent;
use crate::sshconfig::SshConfig;

mod connect;
mod error;
mod handle;
mod quic;

pub use error::TreeError;
pub use handle::*;

const INBOX_FRAMES: usize = 1024;
const CMD_QUEUE: usize = 1024;
/// Frames queued toward one caller before the tree waits for it.
pub const REPLY_QUEUE_FRAMES: usize = 64;
const KILL_GRACE: Duration = Duration::from_secs(2);

pub use crate::becomes::BecomeSlot;
use crate::becomes::{Becomes, Decision};
pub use crate::hops::HopRole;
use crate::hops::{self, Hops};

/// Settings of the tree.
pub struct Config {
    pub run_dir: PathBuf,
    pub home: PathBuf,
    /// Most interpreters per target (its login agent and its become
    /// agents); the least recently used become agent makes room.
    pub interpreters_max: usize,
    /// Most children of one relay connecting at once.
    pub connecting_max: u16,
    /// What the controller's ssh config makes of each ssh hop.
    pub ssh_config: SshConfig,
    /// The user's own ssh-agent, if the run has one.
    pub user_agent: Option<PathBuf>,
}

/// Default of [`Config::interpreters_max`], as Mitogen's.
pub const INTERPRETERS_MAX_DEFAULT: usize = 20;
/// Default of [`Config::connecting_max`].
pub const CONNECTING_MAX_DEFAULT: u16 = 64;

/// What each node said when it joined the tree (an agent's hello: its pid,
/// user, home, Python), shared with the API without a trip to the tree task.
pub type Hellos = Arc<Mutex<HashMap<NodeId, serde_json::Value>>>;

pub struct Tree {
    cfg: Config,
    core: Node,
    cmds: mpsc::Receiver<Cmd>,
    inbox: mpsc::Receiver<Input>,
    inbox_tx: mpsc::Sender<Input>,
    links: HashMap<LinkId, ChildLink>,
    /// The node each local ssh link carries.
    local_nodes: HashMap<LinkId, NodeId>,
    next_link: u32,
    next_node: u32,
    next_stream: u32,
    hops: Hops,
    streams: HashMap<StreamId, OpenStream>,
    spawns: HashMap<StreamId, NodeId>,
    /// The ssh-agent socket the tree's ssh use and forward, locked while
    /// no hop is connecting (see [`SshAgent`]).
    ssh_agent: Option<SshAgent>,
    /// Key files each connecting ssh hop may use, for its failure message.
    hop_keys: HashMap<NodeId, Vec<PathBuf>>,
    /// ssh passwords of connecting first hops, in RAM (SSH_ASKPASS).
    askpass: HashMap<NodeId, OwnedFd>,
    hellos: Hellos,
    /// Become agents by (parent agent, key).
    becomes: Becomes,
    /// When each node still connecting was started.
    started: HashMap<NodeId, Instant>,
    /// What each relay holds pinned (see [`Tree::pin`]), and each relay's
    /// parent relay.
    pins: HashMap<NodeId, HashSet<String>>,
    relay_parent: HashMap<NodeId, NodeId>,
    /// The machine each relay host said it was (its stage-0 gets that
    /// machine's relay next time).
    host_machine: HashMap<String, &'static str>,
    /// The relay that started each node behind the first hop.
    node_parent: HashMap<NodeId, NodeId>,
    /// Relays and first-hop agents, pinged so that they end by themselves
    /// when the link to them dies (told the bound by `Keepalive`).
    pinger: Pinger,
    /// Frame bytes sent to and received from each node (`arbor status`).
    traffic: HashMap<NodeId, Traffic>,
    /// First-hop relays moving to QUIC, and the links that have.
    upgrades: quic::Upgrades,
}

/// Frame bytes (headers included) the controller sent to a node and
/// received from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

impl Tree {
    pub fn new(cfg: Config) -> (Tree, TreeHandle) {
        let (tx, cmds) = mpsc::channel(CMD_QUEUE);
        let (inbox_tx, inbox) = mpsc::channel(INBOX_FRAMES);
        let hellos = Hellos::default();
        let ssh_config = cfg.ssh_config.clone();
        let interpreters_max = cfg.interpreters_max;
        let tree = Tree {
            cfg,
            // Strict: a node is routed only where it was started.
            core: Node::new(NodeId::CONTROLLER, Limits::default()).strict(),
            cmds,
            inbox,
            inbox_tx,
            links: HashMap::new(),
            local_nodes: HashMap::new(),
            next_link: 1,
            next_node: 1,
            next_stream: 1,
            hops: hops::table(),
            streams: HashMap::new(),
            spawns: HashMap::new(),
            ssh_agent: None,
            hop_keys: HashMap::new(),
            askpass: HashMap::new(),
            hellos: hellos.clone(),
            becomes: crate::becomes::table(interpreters_max),
            started: HashMap::new(),
            pins: HashMap::new(),
            relay_parent: HashMap::new(),
            host_machine: HashMap::new(),
            node_parent: HashMap::new(),
            pinger: Pinger::new(
                Instant::now(),
                Duration::from_secs(u64::from(ssh::keepalive_secs())),
            ),
            traffic: HashMap::new(),
            upgrades: quic::Upgrades::default(),
        };
        (
            tree,
            TreeHandle {
                tx,
                hellos,
                ssh_config,
            },
        )
    }

    pub async fn run(mut self) {
        match SshAgent::start(&self.cfg.run_dir, self.cfg.user_agent.clone()) {
            Ok(a) => self.ssh_agent = Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "no ssh-agent socket: hops behind the first need one")
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(Cmd::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.command(cmd).await,
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                Some(input) = self.inbox.recv() => self.input(input),
                _ = tick.tick() => {
                    self.kill_closed();
                    self.ping_watched();
                }
            }
            if let Some(a) = &self.ssh_agent {
                a.set_locked(!self.connecting());
            }
            self.pump().await;
        }
    }

    /// Kills the processes of links whose stdout ended a while ago (their
    /// exit then reports them down).
    fn kill_closed(&mut self) {
        let now = Instant::now();
        for l in self.links.values_mut() {
            l.kill_if_lingering(now);
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ensure {
                chain,
                role,
                task,
                quic_below,
                done,
            } => self.ensure(chain, role, task, quic_below, done).await,
            Cmd::Reset { host, done } => {
                let _ = done.send(self.reset(&host));
            }
            Cmd::ReleasePid { parent, pid, done } => {
                let _ = done.send(self.release_pid(parent, pid));
            }
            Cmd::Open {
                dst,
                payload,
                replies,
                credit,
                about,
                done,
            } => {
                let stream = self.stream_id();
                self.streams.insert(stream, (dst, replies, credit));
                if let Some(about) = about {
                    self.note_about(dst, stream, about);
                }
                let f = Frame::new(Kind::Request, dst, NodeId::CONTROLLER, stream, payload);
                self.core.send(Instant::now(), f);
                let _ = done.send(stream);
            }
            Cmd::Send(frame) => self.core.send(Instant::now(), frame),
            Cmd::Forget(stream) => {
                self.streams.remove(&stream);
            }
            Cmd::Become {
                parent,
                key,
                label,
                start,
                done,
            } => self.become_slot(parent, key, label, start, done),
            Cmd::BecomeDone { node, outcome } => self.become_settle(node, outcome),
            Cmd::Traffic(done) => {
                let up = self
                    .hellos
                    .lock()
                    .map(|h| h.keys().copied().collect::<HashSet<_>>());
                if let Ok(up) = up {
                    self.traffic.retain(|n, _| up.contains(n));
                }
                let _ = done.send(self.traffic.clone());
            }
            Cmd::Shutdown(_) => {}
        }
    }

    fn become_slot(
        &mut self,
        parent: NodeId,
        key: String,
        label: String,
        start: bool,
        done: oneshot::Sender<Result<Option<BecomeSlot>, TreeError>>,
    ) {
        let next = &mut self.next_node;
        let new_node = || {
            let n = NodeId(*next);
            *next += 1;
            n
        };
        let Decision::Start { node, evict } =
            self.becomes.slot(parent, key, label, start, new_node, done)
        else {
            return;
        };
        if let Some(old) = evict {
            tracing::debug!(node = %old, "evicting the least recently used interpreter");
            let stream = self.stream_id();
            let req = serde_json::json!({"op": "unbecome", "node": old.0, "noreply": true});
            let payload = arbor_wire::msg::encode(req.to_string().as_bytes(), b"");
            let f = Frame::new(Kind::Request, parent, NodeId::CONTROLLER, stream, payload);
            self.core.send(Instant::now(), f);
        }
        self.started.insert(node, Instant::now());
        // Every relay above the agent that starts it takes its
        // announcement only from that agent's link.
        self.expect_above(node, parent, self.node_parent.get(&parent).copied());
    }

    /// A become agent started, or failed to: its waiters learn which.
    fn become_settle(&mut self, node: NodeId, outcome: Result<(), String>) {
        if outcome.is_err() {
            self.started.remove(&node);
        }
        self.becomes.settle(node, outcome);
    }

    fn stream_id(&mut self) -> StreamId {
        let s = StreamId(self.next_stream);
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        s
    }

    fn release_pid(&mut self, parent: NodeId, pid: u64) -> Option<NodeId> {
        let hellos = self.hellos.lock().ok()?;
        self.becomes.release(parent, |n| {
            hellos.get(&n).is_some_and(|h| {
                // The agent, its sweeper, and the shell a become command
                // may have left between it and the become tool.
                ["pid", "sweeper", "ppid"]
                    .iter()
                    .any(|k| h.get(*k).and_then(serde_json::Value::as_u64) == Some(pid))
            })
        })
    }

    /// Ends the login agents of `host` (their become agents end with them)
    /// and forgets their hops; returns how many were up.
    fn reset(&mut self, host: &str) -> usize {
        let nodes = self.hops.forget_host(host, hops::is_agent);
        for &node in &nodes {
            let req = serde_json::json!({"op": "exit", "noreply": true});
            let payload = arbor_wire::msg::encode(req.to_string().as_bytes(), b"");
            let stream = self.stream_id();
            let f = Frame::new(Kind::Request, node, NodeId::CONTROLLER, stream, payload);
            self.core.send(Instant::now(), f);
        }
        nodes.len()
    }

    fn input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Frame(link, frame) => {
                // Headers only: payloads are never logged.
                tracing::trace!(link = link.0, kind = ?frame.kind, src = frame.src.0, dst = frame.dst.0,
                                stream = frame.stream.0, len = frame.payload.len(), "frame in");
                self.core.handle_frame(now, link, frame)
            }
            Input::Closed(link, why) => match self.links.get_mut(&link) {
                _ if {
                    tracing::debug!(link = link.0, why, "link closed");
                    false
                } => {}
                // A link over QUIC ends with either channel: its ssh is
                // ended with why.
                Some(l) if self.upgrades.is_lanes(link) => l.cut_off(why),
                // Down once its process has exited and said why.
                Some(l) => l.stdout_closed(why, now),
                None => self.core.handle_link_down(now, link, &why),
            },
            Input::Upgraded(link, tx, channel) => {
                if let Some(l) = self.links.get_mut(&link) {
                    l.set_writer(tx);
                    self.upgrade_done(link, Ok(channel));
                }
            }
            Input::NotUpgraded(link, why) => self.upgrade_done(link, Err(why)),
            Input::Exited(link, status, tail) => {
                tracing::debug!(link = link.0, status, tail = %String::from_utf8_lossy(&tail), "link exited");
                let child = self.links.remove(&link);
                let node = self.local_nodes.remove(&link);
                let label = node
                    .and_then(|n| self.hops.label_of(n))
                    .unwrap_or_default()
                    .to_string();
                let why = match &child {
                    Some(c) => c.lost_why(&label, &status, &tail),
                    None => format!("{label}: {status}"),
                };
                self.core.handle_link_down(now, link, &why);
                if let Some(node) = node {
                    self.node_lost(node, &why);
                }
            }
        }
    }

    async fn pump(&mut self) {
        loop {
            if let Some((link, frame)) = self.core.poll_transmit() {
                // Never wait for one link: one that stops reading is cut
                // off once its queue is full.
                tracing::trace!(link = link.0, kind = ?frame.kind, src = frame.src.0, dst = frame.dst.0,
                                stream = frame.stream.0, len = frame.payload.len(), "frame out");
                self.traffic.entry(frame.dst).or_default().sent +=
                    (arbor_wire::HEADER_BYTES + frame.payload.len()) as u64;
                let lane = self.lanes_relay(link).map(|r| self.lane(r, &frame));
                self.upgrades.sent(&frame);
                if let Some(l) = self.links.get_mut(&link) {
                    l.send_lane(frame, lane);
                }
                continue;
            }
            let Some(event) = self.core.poll_event() else {
                return;
            };
            match event {
                Event::Deliver(frame) => self.deliver(frame).await,
                Event::NodeUp { node, hello, .. } => {
                    let mut info = arbor_wire::msg::split(&hello)
                        .ok()
                        .and_then(|(j, _)| serde_json::from_slice::<serde_json::Value>(j).ok())
                        .filter(|v| v.is_object())
                        .unwrap_or_else(|| serde_json::json!({}));
                    // For -vvv: which hop this is and how long it took.
                    let label = self.label_of(node);
                    info["node"] = serde_json::json!(node.0);
                    if let Some(l) = label {
                        info["label"] = serde_json::json!(l);
                    }
                    if let Some(t) = self.started.remove(&node) {
                        info["connect_ms"] = serde_json::json!(t.elapsed().as_millis() as u64);
                    }
                    // For `arbor status`: how long it has been up.
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                    info["up_since"] = serde_json::json!(now.map(|d| d.as_secs()).unwrap_or(0));
                    if let Some(m) = info.get("machine").and_then(|m| m.as_str()) {
                        if let (Some(r), Some(host)) = (
                            relays::for_machine(m),
                            self.hops.of(node).map(|i| i.host.as_str()),
                        ) {
                            self.host_machine.insert(host.to_string(), r.machine);
                        }
                    }
                    if let Ok(mut h) = self.hellos.lock() {
                        h.insert(node, info);
                    }
                    self.watch(node);
                    // A relay moving to QUIC is settled when it has (or
                    // has stayed on ssh).
                    if !self.upgrade_started(node) {
                        self.settle(node, Ok(()));
                    }
                }
                Event::NodeDown { node, reason } => self.node_lost(node, &reason),
                Event::Dropped {
                    frame_src,
                    frame_dst,
                    why,
                } => {
                    tracing::debug!(%frame_src, %frame_dst, why, "frame dropped");
                }
                Event::ParentLost => {}
            }
        }
    }

    /// The machine a relay node said it runs (its hello).
    fn machine_of(&self, node: NodeId) -> Option<&'static str> {
        let hellos = self.hellos.lock().ok()?;
        let m = hellos.get(&node)?.get("machine")?.as_str()?;
        relays::for_machine(m).map(|r| r.machine)
    }

    /// The relay node is built with QUIC (its hello), so the relays it
    /// starts, which are sent its own binary, are too.
    fn has_quic(&self, node: NodeId) -> bool {
        let Ok(hellos) = self.hellos.lock() else {
            return false;
        };
        hellos
            .get(&node)
            .and_then(|h| h.get("quic"))
            .and_then(|q| q.as_bool())
            .unwrap_or(false)
    }

    /// The label of a hop or become agent.
    fn label_of(&self, node: NodeId) -> Option<String> {
        self.hops
            .label_of(node)
            .map(str::to_string)
            .or_else(|| self.becomes.label_of(node).map(str::to_string))
    }

    /// A node left the tree: its hop fails for the rest of the task that
    /// last used it, every open stream to it gets an error now, and what
    /// was kept about it goes.
    fn node_lost(&mut self, node: NodeId, why: &str) {
        self.pinger.forget(node);
        self.started.remove(&node);
        self.pins.remove(&node);
        self.relay_parent.remove(&node);
        self.node_parent.remove(&node);
        self.upgrades.forget(node);
        self.traffic.remove(&node);
        if let Ok(mut h) = self.hellos.lock() {
            h.remove(&node);
        }
        let why = match self.label_of(node) {
            Some(l) => hops::labelled(&l, why),
            None => why.to_string(),
        };
        self.askpass.remove(&node);
        let keys = self.hop_keys.remove(&node).unwrap_or_default();
        let why = self.with_key_hint(why, &keys);
        self.hops.lost(node, &why);
        self.becomes.lost(node, &why);
        let lost: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, (n, _, _))| *n == node)
            .map(|(s, _)| *s)
            .collect();
        for s in lost {
            if let Some((_, tx, _)) = self.streams.remove(&s) {
                let f = Frame::new(
                    Kind::Undeliverable,
                    NodeId::CONTROLLER,
                    node,
                    s,
                    why.clone().into_bytes(),
                );
                let _ = tx.try_send(f);
            }
        }
    }

    async fn deliver(&mut self, frame: Frame) {
        self.traffic.entry(frame.src).or_default().received +=
            (arbor_wire::HEADER_BYTES + frame.payload.len()) as u64;
        if self.upgrade_answer(&frame) {
            return;
        }
        if let Some(node) = self.spawns.remove(&frame.stream) {
            let outcome = match frame.kind {
                Kind::Reply => match control::decode::<Reply>(&frame.payload) {
                    Ok(Reply::Spawned { .. }) => Ok(node),
                    Ok(Reply::Failed { message, .. }) => Err(message),
                    Ok(other) => Err(format!("unexpected reply {other:?}")),
                    Err(e) => Err(format!("bad reply: {e}")),
                },
                _ => Err(String::from_utf8_lossy(&frame.payload).into_owned()),
            };
            // A relay moving to QUIC is settled when it has.
            if outcome.is_ok() && self.upgrades.pending(node) {
                return;
            }
            self.settle(node, outcome.map(|_| ()));
            return;
        }
        if frame.kind == Kind::Credit {
            // Never queued behind replies: a sender waits on it.
            if let Some((_, _, Some(credit))) = self.streams.get(&frame.stream) {
                if let Some(b) = frame.payload.get(..8) {
                    let n = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                    credit.send_if_modified(|c| {
                        let more = n > *c;
                        *c = (*c).max(n);
                        more
                    });
                }
            }
            return;
        }
        let done = matches!(frame.kind, Kind::End | Kind::Undeliverable)
            || (frame.kind == Kind::Reply && !is_streamed_reply(&frame.payload));
        let stream = frame.stream;
        if let Some((_, tx, credit)) = self.streams.get(&stream) {
            let tx = tx.clone();
            // A credited stream whose far side ended its half (a forwarded
            // connection, half-closed) still takes credit for ours: its
            // owner forgets it.
            let half_closed = frame.kind == Kind::End && credit.is_some();
            if done && !half_closed {
                self.streams.remove(&stream);
            }
            let _ = tx.send(frame).await;
        }
    }

    async fn shutdown(&mut self) {
        let pids = self
            .links
            .drain()
            .map(|(l, link)| (l, link.pid()))
            .collect();
        stop_children(pids, &mut self.inbox, KILL_GRACE).await;
        self.ssh_agent = None;
    }
}

/// Whether an agent reply announces that Data frames and an End follow.
fn is_streamed_reply(payload: &[u8]) -> bool {
    arbor_wire::msg::split(payload)
        .ok()
        .and_then(|(json, _)| serde_json::from_slice::<serde_json::Value>(json).ok())
        .and_then(|v| v.get("streamed").and_then(|s| s.as_bool()))
        .unwrap_or(false)
}
