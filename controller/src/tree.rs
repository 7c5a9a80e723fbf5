//! The tree the controller owns: node 0 of the router, the ssh processes to
//! first hops, and which hop is which node.
//!
//! One task ([`Tree::run`]) owns all of it and is reached through
//! [`TreeHandle`]. Hops are started on demand, once each: a relay for every
//! intermediary, an agent for every target. Connects to different hosts
//! proceed in parallel; callers for a hop that is connecting wait for it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_core::{Event, Limits, LinkId, Node, Role};
use arbor_io::{start_child_link, stop_children, ChildLink, LinkEvent as Input};
use arbor_topology::{Hop, HopKey};
use arbor_wire::control::{self, Reply, Request, Spawn};
use arbor_wire::{Frame, Kind, NodeId, StreamId};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::ssh;

const INBOX_FRAMES: usize = 1024;
const CMD_QUEUE: usize = 1024;
/// Frames queued toward one caller before the tree waits for it.
pub const REPLY_QUEUE_FRAMES: usize = 64;
const KILL_GRACE: Duration = Duration::from_secs(2);

/// What a hop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role2 {
    Relay,
    Agent,
}

enum HopState {
    Connecting {
        node: NodeId,
        waiters: Vec<oneshot::Sender<Result<NodeId, String>>>,
    },
    Up(NodeId),
    Failed(String),
}

enum Cmd {
    Ensure {
        chain: Vec<Hop>,
        role: Role2,
        done: oneshot::Sender<Result<NodeId, String>>,
    },
    Open {
        dst: NodeId,
        payload: Vec<u8>,
        replies: mpsc::Sender<Frame>,
        credit: Option<watch::Sender<u64>>,
        done: oneshot::Sender<StreamId>,
    },
    Send(Frame),
    Forget(StreamId),
    Become {
        parent: NodeId,
        key: String,
        label: String,
        start: bool,
        done: oneshot::Sender<Result<Option<BecomeSlot>, String>>,
    },
    BecomeDone {
        node: NodeId,
        outcome: Result<(), String>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// An open stream: its node, where its frames go, and its credit if paced.
type OpenStream = (NodeId, mpsc::Sender<Frame>, Option<watch::Sender<u64>>);

/// A passphrase for locking the private ssh-agent, never shown.
fn random_pass() -> String {
    let mut b = [0u8; 24];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Settings of the tree.
pub struct Config {
    pub relay_binary: &'static [u8],
    pub run_dir: PathBuf,
    pub home: PathBuf,
    /// Most interpreters per target (its login agent and its become
    /// agents); the least recently used become agent makes room.
    pub interpreters_max: usize,
    /// Most children of one relay connecting at once.
    pub connecting_max: u16,
}

/// Default of [`Config::interpreters_max`], as Mitogen's.
pub const INTERPRETERS_MAX_DEFAULT: usize = 20;
/// Default of [`Config::connecting_max`].
pub const CONNECTING_MAX_DEFAULT: u16 = 64;

/// A nested (become) agent, as asked for by [`TreeHandle::become_slot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BecomeSlot {
    /// It is up.
    Ready(NodeId),
    /// Nobody has started it: the caller starts it as this node on the
    /// parent agent, then reports with [`TreeHandle::become_done`].
    Start(NodeId),
}

enum BecomeState {
    Starting(Vec<oneshot::Sender<Result<Option<BecomeSlot>, String>>>),
    Up,
}

struct BecomeAgent {
    node: NodeId,
    state: BecomeState,
    last_used: u64,
}

/// What each node said when it joined the tree (an agent's hello: its pid,
/// user, home, Python), shared with the API without a trip to the tree task.
pub type Hellos = Arc<Mutex<HashMap<NodeId, serde_json::Value>>>;

/// A cheap handle to the tree task.
#[derive(Clone)]
pub struct TreeHandle {
    tx: mpsc::Sender<Cmd>,
    hellos: Hellos,
}

impl TreeHandle {
    /// Makes sure every hop of `chain` is up, the last running `role`;
    /// returns the last hop's node, or a message naming the host and hop.
    pub async fn ensure(&self, chain: &[Hop], role: Role2) -> Result<NodeId, String> {
        Ok(*self
            .ensure_path(chain, role)
            .await?
            .last()
            .unwrap_or(&NodeId::CONTROLLER))
    }

    /// As [`TreeHandle::ensure`], returning every hop's node, first first.
    pub async fn ensure_path(&self, chain: &[Hop], role: Role2) -> Result<Vec<NodeId>, String> {
        arbor_topology::validate(chain).map_err(|e| e.to_string())?;
        let mut nodes = Vec::with_capacity(chain.len());
        for i in 0..chain.len() {
            let r = if i + 1 == chain.len() {
                role
            } else {
                Role2::Relay
            };
            let (done, wait) = oneshot::channel();
            self.tx
                .send(Cmd::Ensure {
                    chain: chain[..=i].to_vec(),
                    role: r,
                    done,
                })
                .await
                .map_err(|_| "arbor controller is shutting down".to_string())?;
            nodes.push(
                wait.await
                    .map_err(|_| "arbor controller is shutting down".to_string())??,
            );
        }
        Ok(nodes)
    }

    /// Opens a stream to `dst` with a request; frames of its answer arrive
    /// on the returned receiver.
    pub async fn open(
        &self,
        dst: NodeId,
        payload: Vec<u8>,
    ) -> Result<(StreamId, mpsc::Receiver<Frame>), String> {
        self.open_with(dst, payload, None).await
    }

    /// As [`TreeHandle::open`], for a stream whose data the receiver paces
    /// with `Credit` frames: the returned watch holds the bytes it has
    /// consumed (`u64::MAX`: it dropped the stream); it closes with the stream.
    pub async fn open_credited(
        &self,
        dst: NodeId,
        payload: Vec<u8>,
    ) -> Result<(StreamId, mpsc::Receiver<Frame>, watch::Receiver<u64>), String> {
        let (credit, consumed) = watch::channel(0);
        let (stream, rx) = self.open_with(dst, payload, Some(credit)).await?;
        Ok((stream, rx, consumed))
    }

    async fn open_with(
        &self,
        dst: NodeId,
        payload: Vec<u8>,
        credit: Option<watch::Sender<u64>>,
    ) -> Result<(StreamId, mpsc::Receiver<Frame>), String> {
        fits(&payload)?;
        let (replies, rx) = mpsc::channel(REPLY_QUEUE_FRAMES);
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Open {
                dst,
                payload,
                replies,
                credit,
                done,
            })
            .await
            .map_err(|_| "arbor controller is shutting down".to_string())?;
        let stream = wait
            .await
            .map_err(|_| "arbor controller is shutting down".to_string())?;
        Ok((stream, rx))
    }

    /// Sends the next part (Data) or the end (End) of the controller's
    /// stream `stream` to `dst`.
    pub async fn send_part(
        &self,
        dst: NodeId,
        stream: StreamId,
        kind: Kind,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        fits(&payload)?;
        let frame = Frame::new(kind, dst, NodeId::CONTROLLER, stream, payload);
        self.tx
            .send(Cmd::Send(frame))
            .await
            .map_err(|_| "arbor controller is shutting down".to_string())
    }

    /// Opens a stream to `dst` with a request that gets no answer (the
    /// agent acts on it in order with the requests before and after it);
    /// its Data and End parts go on the returned stream.
    pub async fn post(&self, dst: NodeId, payload: Vec<u8>) -> Result<StreamId, String> {
        let (stream, _rx) = self.open(dst, payload).await?;
        self.forget(stream).await;
        Ok(stream)
    }

    /// The become agent `key` under the agent `parent`. Without `start`:
    /// `Ready` if it is up, else None. With `start`: waits for one that is
    /// starting, or hands out a node for the caller to start it as.
    pub async fn become_slot(
        &self,
        parent: NodeId,
        key: &str,
        label: &str,
        start: bool,
    ) -> Result<Option<BecomeSlot>, String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Become {
                parent,
                key: key.to_string(),
                label: label.to_string(),
                start,
                done,
            })
            .await
            .map_err(|_| "arbor controller is shutting down".to_string())?;
        wait.await
            .map_err(|_| "arbor controller is shutting down".to_string())?
    }

    /// How starting the become agent `node` ended.
    pub async fn become_done(&self, node: NodeId, outcome: Result<(), String>) {
        let _ = self.tx.send(Cmd::BecomeDone { node, outcome }).await;
    }

    /// The hello `node` sent when it joined, if it is up.
    pub fn hello(&self, node: NodeId) -> Option<serde_json::Value> {
        self.hellos.lock().ok()?.get(&node).cloned()
    }

    pub async fn forget(&self, stream: StreamId) {
        let _ = self.tx.send(Cmd::Forget(stream)).await;
    }

    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Cmd::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// A payload one frame can carry; callers chunk larger data.
fn fits(payload: &[u8]) -> Result<(), String> {
    if payload.len() > arbor_wire::FRAME_PAYLOAD_BYTES_MAX {
        return Err(format!(
            "arbor internal error: a frame of {} bytes was about to be sent",
            payload.len()
        ));
    }
    Ok(())
}

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
    hops: HashMap<(HopKey, Role2), HopState>,
    node_hop: HashMap<NodeId, ((HopKey, Role2), String)>,
    streams: HashMap<StreamId, OpenStream>,
    spawns: HashMap<StreamId, NodeId>,
    agent: Option<Child>,
    agent_keys: Vec<PathBuf>,
    /// The agent is locked (with `agent_pass`) while no hop is connecting:
    /// its forwarded socket on a bastion then signs nothing.
    agent_locked: bool,
    agent_pass: String,
    hellos: Hellos,
    /// Become agents by (parent agent, key), and each one's key and label.
    becomes: HashMap<(NodeId, String), BecomeAgent>,
    /// When each node still connecting was started.
    started: HashMap<NodeId, Instant>,
    become_of: HashMap<NodeId, ((NodeId, String), String)>,
    use_clock: u64,
    /// What each relay holds pinned (see [`Tree::pin`]), and each relay's
    /// parent relay.
    pins: HashMap<NodeId, HashSet<String>>,
    relay_parent: HashMap<NodeId, NodeId>,
    /// The relay that started each node behind the first hop.
    node_parent: HashMap<NodeId, NodeId>,
    /// Relays and first-hop agents, pinged so that they end by themselves
    /// when the link to them dies (told the bound by `Keepalive`).
    watched: HashSet<NodeId>,
    pinged: Instant,
}

/// Largest entry pinned at a relay (it travels in one frame).
const PIN_BYTES_MAX: usize = 960 * 1024;

fn pin_key(what: &str, data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(data);
    let hex: String = d[..16].iter().map(|x| format!("{x:02x}")).collect();
    format!("pin:{what}:{hex}")
}

impl Tree {
    pub fn new(cfg: Config) -> (Tree, TreeHandle) {
        let (tx, cmds) = mpsc::channel(CMD_QUEUE);
        let (inbox_tx, inbox) = mpsc::channel(INBOX_FRAMES);
        let hellos = Hellos::default();
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
            hops: HashMap::new(),
            node_hop: HashMap::new(),
            streams: HashMap::new(),
            spawns: HashMap::new(),
            agent: None,
            agent_keys: Vec::new(),
            agent_locked: false,
            agent_pass: random_pass(),
            hellos: hellos.clone(),
            becomes: HashMap::new(),
            started: HashMap::new(),
            become_of: HashMap::new(),
            use_clock: 0,
            pins: HashMap::new(),
            relay_parent: HashMap::new(),
            node_parent: HashMap::new(),
            watched: HashSet::new(),
            pinged: Instant::now(),
        };
        (tree, TreeHandle { tx, hellos })
    }

    pub async fn run(mut self) {
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
            if self.agent.is_some() && !self.agent_locked && !self.connecting() {
                self.lock_agent(true).await;
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
            Cmd::Ensure { chain, role, done } => self.ensure(chain, role, done).await,
            Cmd::Open {
                dst,
                payload,
                replies,
                credit,
                done,
            } => {
                let stream = self.stream_id();
                self.streams.insert(stream, (dst, replies, credit));
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
            Cmd::Shutdown(_) => {}
        }
    }

    fn become_slot(
        &mut self,
        parent: NodeId,
        key: String,
        label: String,
        start: bool,
        done: oneshot::Sender<Result<Option<BecomeSlot>, String>>,
    ) {
        self.use_clock += 1;
        let clock = self.use_clock;
        let k = (parent, key);
        if let Some(b) = self.becomes.get_mut(&k) {
            match &mut b.state {
                BecomeState::Up => {
                    b.last_used = clock;
                    let _ = done.send(Ok(Some(BecomeSlot::Ready(b.node))));
                }
                BecomeState::Starting(waiters) if start => waiters.push(done),
                BecomeState::Starting(_) => {
                    let _ = done.send(Ok(None));
                }
            }
            return;
        }
        if !start {
            let _ = done.send(Ok(None));
            return;
        }
        // Room for one more: the login agent counts as one interpreter.
        let siblings = self.becomes.keys().filter(|(p, _)| *p == parent).count();
        if siblings + 2 > self.cfg.interpreters_max.max(2) {
            let lru = self
                .becomes
                .iter()
                .filter(|((p, _), b)| *p == parent && matches!(b.state, BecomeState::Up))
                .min_by_key(|(_, b)| b.last_used)
                .map(|(k, b)| (k.clone(), b.node));
            if let Some((old_key, old)) = lru {
                tracing::debug!(node = %old, key = %old_key.1, "evicting the least recently used interpreter");
                self.becomes.remove(&old_key);
                self.become_of.remove(&old);
                let stream = self.stream_id();
                let req = serde_json::json!({"op": "unbecome", "node": old.0, "noreply": true});
                let payload = arbor_wire::msg::encode(req.to_string().as_bytes(), b"");
                let f = Frame::new(Kind::Request, parent, NodeId::CONTROLLER, stream, payload);
                self.core.send(Instant::now(), f);
            }
        }
        let node = NodeId(self.next_node);
        self.next_node += 1;
        self.becomes.insert(
            k.clone(),
            BecomeAgent {
                node,
                state: BecomeState::Starting(Vec::new()),
                last_used: clock,
            },
        );
        self.become_of.insert(node, (k, label));
        self.started.insert(node, Instant::now());
        // Every relay above the agent that starts it takes its
        // announcement only from that agent's link.
        self.expect_above(node, parent, self.node_parent.get(&parent).copied());
        let _ = done.send(Ok(Some(BecomeSlot::Start(node))));
    }

    /// A become agent started, or failed to: waiters learn which. A failed
    /// one is forgotten, so a later task (say with the right password) tries
    /// again.
    fn become_settle(&mut self, node: NodeId, outcome: Result<(), String>) {
        let Some((k, _)) = self.become_of.get(&node).cloned() else {
            return;
        };
        let waiters = match self.becomes.get_mut(&k) {
            Some(b) if b.node == node => match std::mem::replace(&mut b.state, BecomeState::Up) {
                BecomeState::Starting(w) => w,
                BecomeState::Up => Vec::new(),
            },
            _ => return,
        };
        if outcome.is_err() {
            self.becomes.remove(&k);
            self.become_of.remove(&node);
            self.started.remove(&node);
        }
        for w in waiters {
            let _ = w.send(outcome.clone().map(|_| Some(BecomeSlot::Ready(node))));
        }
    }

    fn stream_id(&mut self) -> StreamId {
        let s = StreamId(self.next_stream);
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        s
    }

    async fn ensure(
        &mut self,
        chain: Vec<Hop>,
        role: Role2,
        done: oneshot::Sender<Result<NodeId, String>>,
    ) {
        let key = (HopKey::of(&chain), role);
        match self.hops.get_mut(&key) {
            Some(HopState::Up(node)) => {
                let _ = done.send(Ok(*node));
                return;
            }
            Some(HopState::Failed(why)) => {
                let _ = done.send(Err(why.clone()));
                return;
            }
            Some(HopState::Connecting { waiters, .. }) => {
                waiters.push(done);
                return;
            }
            None => {}
        }
        let Some(hop) = chain.last().cloned() else {
            return;
        };
        let node = NodeId(self.next_node);
        self.next_node += 1;
        let what = match role {
            Role2::Relay => "relay",
            Role2::Agent => "agent",
        };
        let parent_name = (chain.len() > 1).then(|| chain[chain.len() - 2].name.clone());
        let label = match &parent_name {
            Some(p) => format!("{} ({what}, via {p})", hop.name),
            None => format!("{} ({what}, from the controller)", hop.name),
        };
        self.hops.insert(
            key.clone(),
            HopState::Connecting {
                node,
                waiters: vec![done],
            },
        );
        self.node_hop.insert(node, (key.clone(), label.clone()));
        self.started.insert(node, Instant::now());
        // The agent signs while something connects (a deeper hop through
        // the forwarded socket, or this ssh with its keys).
        self.lock_agent(false).await;

        if role == Role2::Relay {
            self.load_keys(&chain).await;
        }
        let remote_cmd = match role {
            Role2::Relay => arbor_bootstrap::relay_command(node, self.cfg.relay_binary.len()),
            Role2::Agent => {
                arbor_bootstrap::agent_command(hop.python.as_deref().unwrap_or("python3"))
            }
        };
        let result = if chain.len() == 1 {
            self.spawn_local(&hop, node, role, &remote_cmd, &label)
        } else {
            let parent_key = (HopKey::of(&chain[..chain.len() - 1]), Role2::Relay);
            match self.hops.get(&parent_key) {
                Some(HopState::Up(parent)) => {
                    let parent = *parent;
                    self.spawn_remote(parent, &hop, node, role, &remote_cmd)
                }
                _ => Err(format!("{label}: its via host is not connected")),
            }
        };
        if let Err(why) = result {
            self.settle(node, Err(why));
        }
    }

    /// Resolves a hop's waiters, and remembers the outcome for later callers.
    fn settle(&mut self, node: NodeId, outcome: Result<NodeId, String>) {
        let Some((key, _)) = self.node_hop.get(&node).cloned() else {
            return;
        };
        let new = match &outcome {
            Ok(n) => HopState::Up(*n),
            Err(why) => {
                self.started.remove(&node);
                HopState::Failed(why.clone())
            }
        };
        if let Some(HopState::Connecting { node: n, waiters }) = self.hops.insert(key, new) {
            debug_assert_eq!(n, node);
            for w in waiters {
                let _ = w.send(outcome.clone());
            }
        }
    }

    fn spawn_local(
        &mut self,
        hop: &Hop,
        node: NodeId,
        role: Role2,
        remote_cmd: &str,
        label: &str,
    ) -> Result<(), String> {
        // `local`: the agent runs here, as this user, with no ssh.
        let local = hop.method == "local" && role == Role2::Agent;
        let argv = if local {
            vec!["/bin/sh".to_string(), "-c".into(), remote_cmd.to_string()]
        } else if hop.enters_locally() {
            crate::methods::argv(hop, remote_cmd)
        } else {
            ssh::argv(hop, remote_cmd, true, role == Role2::Relay)
        };
        let mut preamble = crate::methods::stdin_prefix(hop)?;
        match role {
            Role2::Relay => preamble.extend_from_slice(self.cfg.relay_binary),
            Role2::Agent => preamble.extend(arbor_bootstrap::agent_preamble(node)),
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if self.agent.is_some() {
            cmd.env("SSH_AUTH_SOCK", self.agent_socket());
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{label}: cannot run {}: {e}", argv[0]))?;
        let link = LinkId(self.next_link);
        self.next_link += 1;
        // Only a relay understands compressed frames.
        let compress = role == Role2::Relay;
        let child_link = start_child_link(
            child,
            &argv[0],
            preamble,
            compress,
            self.inbox_tx.clone(),
            link,
        )
        .map_err(|e| format!("{label}: {e}"))?;
        self.core.handle_link_up(Instant::now(), link, Role::Child);
        self.core.expect(node, link);
        self.links.insert(link, child_link);
        self.local_nodes.insert(link, node);
        Ok(())
    }

    fn spawn_remote(
        &mut self,
        parent: NodeId,
        hop: &Hop,
        node: NodeId,
        role: Role2,
        remote_cmd: &str,
    ) -> Result<(), String> {
        // What every spawn carries crosses to each relay once: pinned there
        // (from its parent relay if that holds it), then named.
        let mut preamble = crate::methods::stdin_prefix(hop)?;
        let mut preamble_pinned = None;
        if role == Role2::Agent {
            let code = arbor_bootstrap::agent_payload();
            let key = pin_key("agent", code);
            preamble.extend(arbor_bootstrap::agent_preamble_header(node, code.len()));
            if self.pin(parent, &key, code) {
                preamble_pinned = Some(key);
            } else {
                preamble.extend_from_slice(code);
            }
        }
        let (known_hosts, known_hosts_pinned) = if hop.enters_locally() {
            (None, None)
        } else {
            let hosts = ssh::known_hosts(hop, &self.cfg.home);
            let key = pin_key("known_hosts", &hosts);
            if self.pin(parent, &key, &hosts) {
                (None, Some(key))
            } else {
                (Some(hosts), None)
            }
        };
        if role == Role2::Relay {
            self.relay_parent.insert(node, parent);
        }
        self.node_parent.insert(node, parent);
        let spec = Spawn {
            node,
            label: hop.name.clone(),
            argv: if hop.enters_locally() {
                crate::methods::argv(hop, remote_cmd)
            } else {
                ssh::argv(hop, remote_cmd, false, role == Role2::Relay)
            },
            env: Vec::new(),
            preamble,
            send_self: role == Role2::Relay,
            known_hosts,
            connect_timeout_ms: (hop.timeout_s.unwrap_or(ssh::CONNECT_TIMEOUT_S_DEFAULT) + 20)
                * 1000,
            max_connecting: self.cfg.connecting_max,
            preamble_pinned,
            known_hosts_pinned,
        };
        // `parent` expects it on the link it starts; the relays above take
        // its announcement only from `parent`'s direction.
        self.expect_above(node, parent, self.relay_parent.get(&parent).copied());
        let stream = self.stream_id();
        self.spawns.insert(stream, node);
        let f = Frame::new(
            Kind::Request,
            parent,
            NodeId::CONTROLLER,
            stream,
            control::encode(&Request::Spawn(spec)),
        );
        self.core.send(Instant::now(), f);
        Ok(())
    }

    /// Makes `relay` hold `data` pinned under `key`: forwarded from its
    /// parent relay (pinned there first), or sent from here. False if it
    /// cannot (too many pins, or too large for one frame).
    fn pin(&mut self, relay: NodeId, key: &str, data: &[u8]) -> bool {
        use arbor_wire::control::PINS_MAX;
        let held = self.pins.entry(relay).or_default();
        if held.contains(key) {
            return true;
        }
        if held.len() >= PINS_MAX || data.len() > PIN_BYTES_MAX {
            return false;
        }
        let req = match self.relay_parent.get(&relay).copied() {
            Some(up) if self.pin(up, key, data) => (
                up,
                Request::Forward {
                    dst: relay,
                    keys: vec![key.to_string()],
                    max_bytes: 0,
                },
            ),
            _ => (
                relay,
                Request::Pin {
                    key: key.to_string(),
                    data: data.to_vec(),
                },
            ),
        };
        let stream = self.stream_id();
        let f = Frame::new(
            Kind::Request,
            req.0,
            NodeId::CONTROLLER,
            stream,
            control::encode(&req.1),
        );
        self.core.send(Instant::now(), f);
        self.pins.entry(relay).or_default().insert(key.to_string());
        true
    }

    /// Tells `relay` and every relay above it, and this node, that `node`
    /// will announce itself from `via`'s direction (a strict node takes no
    /// other announcement of it). Sent before the request that starts it,
    /// on the same links, so it arrives first.
    fn expect_above(&mut self, node: NodeId, via: NodeId, mut relay: Option<NodeId>) {
        if let Some(link) = self.core.route(via) {
            self.core.expect(node, link);
        }
        while let Some(r) = relay {
            let f = Frame::new(
                Kind::Request,
                r,
                NodeId::CONTROLLER,
                self.stream_id(),
                control::encode(&Request::Expect { node, via }),
            );
            self.core.send(Instant::now(), f);
            relay = self.relay_parent.get(&r).copied();
        }
    }

    /// A relay, or an agent on the first hop, just came up: it is told to
    /// end if the daemon falls silent for the keepalive, and pinged.
    fn watch(&mut self, node: NodeId) {
        let Some(((_, role), _)) = self.node_hop.get(&node) else {
            return;
        };
        let secs = ssh::keepalive_secs();
        let payload = match role {
            Role2::Relay => control::encode(&Request::Keepalive {
                silent_ms: secs.saturating_mul(1000),
            }),
            Role2::Agent if self.local_nodes.values().any(|n| *n == node) => {
                let req = serde_json::json!({"op": "keepalive", "secs": secs, "noreply": true});
                arbor_wire::msg::encode(req.to_string().as_bytes(), b"")
            }
            Role2::Agent => return,
        };
        let stream = self.stream_id();
        let f = Frame::new(Kind::Request, node, NodeId::CONTROLLER, stream, payload);
        self.core.send(Instant::now(), f);
        self.watched.insert(node);
    }

    /// Pings the watched nodes, three times per keepalive.
    fn ping_watched(&mut self) {
        let every = Duration::from_secs(u64::from(ssh::keepalive_secs())) / 3;
        if self.pinged.elapsed() < every {
            return;
        }
        self.pinged = Instant::now();
        let now = Instant::now();
        for &node in &self.watched {
            let f = Frame::new(
                Kind::Ping,
                node,
                NodeId::CONTROLLER,
                StreamId(0),
                Vec::new(),
            );
            self.core.send(now, f);
        }
    }

    fn connecting(&self) -> bool {
        self.hops
            .values()
            .any(|h| matches!(h, HopState::Connecting { .. }))
    }

    /// Locks or unlocks the private ssh-agent (agent protocol LOCK and
    /// UNLOCK with a passphrase only this process knows), if it runs.
    async fn lock_agent(&mut self, lock: bool) {
        if self.agent.is_none() || self.agent_locked == lock {
            return;
        }
        let pass = self.agent_pass.as_bytes();
        let mut msg = Vec::with_capacity(9 + pass.len());
        msg.extend_from_slice(&(5 + pass.len() as u32).to_be_bytes());
        msg.push(if lock { 22 } else { 23 });
        msg.extend_from_slice(&(pass.len() as u32).to_be_bytes());
        msg.extend_from_slice(pass);
        let ask = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::UnixStream::connect(self.agent_socket()).await?;
            s.write_all(&msg).await?;
            let mut answer = [0u8; 5];
            s.read_exact(&mut answer).await?;
            Ok::<u8, std::io::Error>(answer[4])
        };
        if !matches!(
            tokio::time::timeout(Duration::from_secs(2), ask).await,
            Ok(Ok(6))
        ) {
            // Not retried on every turn of the loop: the next connect asks again.
            tracing::warn!(lock, "ssh-agent did not take the (un)lock");
        }
        self.agent_locked = lock;
    }

    fn agent_socket(&self) -> PathBuf {
        self.cfg.run_dir.join("agent.sock")
    }

    /// Starts the controller's private ssh-agent and loads the chain's key
    /// files into it, so hops behind the first can authenticate: the keys
    /// themselves never leave this machine.
    async fn load_keys(&mut self, chain: &[Hop]) {
        let keys: Vec<PathBuf> = chain
            .iter()
            .flat_map(|h| ssh::key_files(h, &self.cfg.home))
            .filter(|k| k.exists() && !self.agent_keys.contains(k))
            .collect();
        if keys.is_empty() {
            return;
        }
        if self.agent.is_none() {
            let sock = self.agent_socket();
            match Command::new("ssh-agent")
                .arg("-D")
                .arg("-a")
                .arg(&sock)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
            {
                Ok(child) => self.agent = Some(child),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start ssh-agent; hops behind the first need one");
                    return;
                }
            }
            for _ in 0..100 {
                if sock.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for key in keys {
            let ok = Command::new("ssh-add")
                .arg("-q")
                .arg(&key)
                .env("SSH_AUTH_SOCK", self.agent_socket())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                tracing::warn!(key = %key.display(), "ssh-add failed");
            }
            self.agent_keys.push(key);
        }
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
                // Down once its process has exited and said why.
                Some(l) => l.stdout_closed(why, now),
                None => self.core.handle_link_down(now, link, &why),
            },
            Input::Exited(link, status, tail) => {
                let child = self.links.remove(&link);
                let node = self.local_nodes.remove(&link);
                let label = node
                    .and_then(|n| self.node_hop.get(&n))
                    .map(|(_, l)| l.clone())
                    .unwrap_or_default();
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
                if let Some(l) = self.links.get_mut(&link) {
                    l.send(frame);
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
                    let label = self
                        .node_hop
                        .get(&node)
                        .map(|(_, l)| l.clone())
                        .or_else(|| self.become_of.get(&node).map(|(_, l)| l.clone()));
                    info["node"] = serde_json::json!(node.0);
                    if let Some(l) = label {
                        info["label"] = serde_json::json!(l);
                    }
                    if let Some(t) = self.started.remove(&node) {
                        info["connect_ms"] = serde_json::json!(t.elapsed().as_millis() as u64);
                    }
                    if let Ok(mut h) = self.hellos.lock() {
                        h.insert(node, info);
                    }
                    if self.node_hop.contains_key(&node) {
                        self.settle(node, Ok(node));
                    }
                    self.watch(node);
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

    /// A node left the tree: its hop fails for later callers, and every
    /// open stream to it gets an error now.
    fn node_lost(&mut self, node: NodeId, why: &str) {
        self.watched.remove(&node);
        if let Ok(mut h) = self.hellos.lock() {
            h.remove(&node);
        }
        let label = self
            .node_hop
            .get(&node)
            .map(|(_, l)| l.clone())
            .or_else(|| self.become_of.get(&node).map(|(_, l)| l.clone()));
        let why = match &label {
            Some(l) if !why.starts_with(l.as_str()) => format!("{l}: {why}"),
            _ => why.to_string(),
        };
        self.settle(node, Err(why.clone()));
        self.become_settle(node, Err(why.clone()));
        let lost: Vec<NodeId> = self
            .becomes
            .iter()
            .filter(|((p, _), b)| *p == node || b.node == node)
            .map(|(_, b)| b.node)
            .collect();
        for n in lost {
            self.become_settle(n, Err(why.clone()));
            if let Some((k, _)) = self.become_of.remove(&n) {
                self.becomes.remove(&k);
            }
        }
        if let Some((key, _)) = self.node_hop.get(&node) {
            self.hops.insert(key.clone(), HopState::Failed(why.clone()));
        }
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
            let label = self
                .node_hop
                .get(&node)
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            match outcome {
                Ok(n) => self.settle(node, Ok(n)),
                Err(why) => {
                    let why = if why.starts_with(&label) {
                        why
                    } else {
                        format!("{label}: {why}")
                    };
                    self.settle(node, Err(why));
                }
            }
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
        if let Some((_, tx, _)) = self.streams.get(&stream) {
            let tx = tx.clone();
            if done {
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
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill().await;
        }
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
