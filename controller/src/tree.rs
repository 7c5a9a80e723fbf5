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

const INBOX_FRAMES: usize = 1024;
const CMD_QUEUE: usize = 1024;
/// Frames queued toward one caller before the tree waits for it.
pub const REPLY_QUEUE_FRAMES: usize = 64;
const KILL_GRACE: Duration = Duration::from_secs(2);

pub use crate::becomes::BecomeSlot;
use crate::becomes::{Becomes, Decision};
pub use crate::hops::HopRole;
use crate::hops::{self, Hops};

enum Cmd {
    Ensure {
        chain: Vec<Hop>,
        role: HopRole,
        task: Option<String>,
        done: oneshot::Sender<Result<NodeId, String>>,
    },
    /// Forgets the become agent under `parent` whose process (or its
    /// sweeper's, or its parent shell's) is `pid`; answers its node, for
    /// the caller to end.
    ReleasePid {
        parent: NodeId,
        pid: u64,
        done: oneshot::Sender<Option<NodeId>>,
    },
    /// Ends the interpreters of the host with this inventory name.
    Reset {
        host: String,
        done: oneshot::Sender<usize>,
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

/// A cheap handle to the tree task.
#[derive(Clone)]
pub struct TreeHandle {
    tx: mpsc::Sender<Cmd>,
    hellos: Hellos,
    ssh_config: SshConfig,
}

impl TreeHandle {
    /// Makes sure every hop of `chain` is up, the last running `role`;
    /// returns the last hop's node, or a message naming the host and hop.
    /// `task` names the Ansible task asking: a hop that failed during that
    /// task fails again at once; for any other, it is connected again.
    pub async fn ensure(
        &self,
        chain: &[Hop],
        role: HopRole,
        task: Option<&str>,
    ) -> Result<NodeId, String> {
        Ok(*self
            .ensure_path(chain, role, task)
            .await?
            .last()
            .unwrap_or(&NodeId::CONTROLLER))
    }

    /// As [`TreeHandle::ensure`], returning every hop's node, first first.
    /// A failure names the last hop first, whichever hop failed.
    pub async fn ensure_path(
        &self,
        chain: &[Hop],
        role: HopRole,
        task: Option<&str>,
    ) -> Result<Vec<NodeId>, String> {
        arbor_topology::validate(chain).map_err(|e| e.to_string())?;
        let target = hops::label(chain, role);
        // The controller's ssh config, read before the tree starts a hop.
        for (i, hop) in chain.iter().enumerate() {
            if let Err(why) = self.ssh_config.resolve(hop).await {
                let r = if i + 1 == chain.len() {
                    role
                } else {
                    HopRole::Relay
                };
                let hop_label = hops::label(&chain[..=i], r);
                return Err(hops::labelled(&target, &hops::labelled(&hop_label, &why)));
            }
        }
        let mut nodes = Vec::with_capacity(chain.len());
        for i in 0..chain.len() {
            let r = if i + 1 == chain.len() {
                role
            } else {
                HopRole::Relay
            };
            let (done, wait) = oneshot::channel();
            self.tx
                .send(Cmd::Ensure {
                    chain: chain[..=i].to_vec(),
                    role: r,
                    task: task.map(str::to_string),
                    done,
                })
                .await
                .map_err(|_| "arbor controller is shutting down".to_string())?;
            let node = wait
                .await
                .map_err(|_| "arbor controller is shutting down".to_string())?
                .map_err(|why| hops::labelled(&target, &why))?;
            nodes.push(node);
        }
        Ok(nodes)
    }

    /// The become agent under `parent` whose process or sweeper is `pid`,
    /// forgotten (its next use starts a new one): the caller ends it.
    pub async fn release_pid(&self, parent: NodeId, pid: u64) -> Result<Option<NodeId>, String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::ReleasePid { parent, pid, done })
            .await
            .map_err(|_| "arbor controller is shutting down".to_string())?;
        wait.await
            .map_err(|_| "arbor controller is shutting down".to_string())
    }

    /// Ends every interpreter of the host named `host` (its login agents
    /// and their become agents); its next use connects afresh. Returns how
    /// many login agents were ended.
    pub async fn reset(&self, host: &str) -> Result<usize, String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Reset {
                host: host.to_string(),
                done,
            })
            .await
            .map_err(|_| "arbor controller is shutting down".to_string())?;
        wait.await
            .map_err(|_| "arbor controller is shutting down".to_string())
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

    /// Every node up, with its hello.
    pub fn hellos(&self) -> Hellos {
        self.hellos.clone()
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
    hops: Hops,
    streams: HashMap<StreamId, OpenStream>,
    spawns: HashMap<StreamId, NodeId>,
    /// The ssh-agent socket the tree's ssh use and forward, locked while
    /// no hop is connecting (see [`SshAgent`]).
    agent: Option<SshAgent>,
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
            hops: Hops::default(),
            streams: HashMap::new(),
            spawns: HashMap::new(),
            agent: None,
            hop_keys: HashMap::new(),
            askpass: HashMap::new(),
            hellos: hellos.clone(),
            becomes: Becomes::new(interpreters_max),
            started: HashMap::new(),
            pins: HashMap::new(),
            relay_parent: HashMap::new(),
            host_machine: HashMap::new(),
            node_parent: HashMap::new(),
            watched: HashSet::new(),
            pinged: Instant::now(),
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
            Ok(a) => self.agent = Some(a),
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
            if let Some(a) = &self.agent {
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
                done,
            } => self.ensure(chain, role, task, done).await,
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

    async fn ensure(
        &mut self,
        chain: Vec<Hop>,
        role: HopRole,
        task: Option<String>,
        done: oneshot::Sender<Result<NodeId, String>>,
    ) {
        let key = (HopKey::of(&chain), role);
        let Some(done) = self.hops.lookup(&key, task.as_deref(), done) else {
            return;
        };
        let Some(hop) = chain.last().cloned() else {
            return;
        };
        let node = NodeId(self.next_node);
        self.next_node += 1;
        let label = hops::label(&chain, role);
        let info = hops::NodeInfo {
            key,
            label: label.clone(),
            host: hop.name.clone(),
        };
        self.hops.connecting(node, info, task.as_deref(), done);
        self.started.insert(node, Instant::now());
        // The agent signs while something connects (a deeper hop through
        // the forwarded socket, or this ssh with its keys).
        if let Some(a) = &self.agent {
            a.set_locked(false);
        }
        self.load_keys(&chain, role, node).await;
        let python = hop.python.as_deref().unwrap_or("python3");
        let parent_key = (HopKey::of(&chain[..chain.len() - 1]), HopRole::Relay);
        // The relay the stage-0 is sent: from here, the one for the
        // machine this host had before (else this controller's); from a
        // relay, that relay's own.
        let relay = if chain.len() == 1 {
            relays::guess(self.host_machine.get(&hop.name).copied())
        } else {
            relays::guess(
                self.hops
                    .up_node(&parent_key)
                    .and_then(|p| self.machine_of(p)),
            )
        };
        let remote_cmd = match role {
            // A relay under another account (`root@bastion` as a via):
            // its ssh children still sign with the agent forwarded to the
            // relay before it, which its become tool took out of its
            // environment.
            HopRole::Relay if BECOME_METHODS.contains(&hop.method.as_str()) && chain.len() > 1 => {
                format!(
                    "export SSH_AUTH_SOCK='{}'; {}",
                    control::AUTH_SOCK_TOKEN,
                    arbor_bootstrap::relay_command(node, relay.bytes.len(), relay.machine)
                )
            }
            HopRole::Relay => {
                arbor_bootstrap::relay_command(node, relay.bytes.len(), relay.machine)
            }
            // Over ssh, a wrapper says how the agent ended.
            HopRole::Agent if hop.method == "ssh" => arbor_bootstrap::agent_ssh_command(python),
            HopRole::Agent => arbor_bootstrap::agent_command(python),
        };
        let result = if chain.len() == 1 {
            self.spawn_local(&hop, node, role, &remote_cmd, &label, relay)
        } else {
            match self.hops.up_node(&parent_key) {
                Some(parent) => self.spawn_remote(parent, &hop, node, role, &remote_cmd),
                None => Err("its via host is not connected".to_string()),
            }
        };
        if let Err(why) = result {
            self.settle(node, Err(why));
        }
    }

    /// Resolves a hop's waiters; a failed hop is remembered for its task.
    fn settle(&mut self, node: NodeId, outcome: Result<(), String>) {
        self.askpass.remove(&node);
        let keys = self.hop_keys.remove(&node).unwrap_or_default();
        let outcome = outcome.map_err(|why| {
            self.started.remove(&node);
            self.with_key_hint(why, &keys)
        });
        self.hops.settle(node, outcome);
    }

    /// A refused login's message, with the key files that could not be
    /// used because they need a passphrase no agent supplies.
    fn with_key_hint(&self, why: String, keys: &[PathBuf]) -> String {
        let Some(agent) = &self.agent else {
            return why;
        };
        let locked = agent.locked_files(keys);
        if locked.is_empty() || !why.contains("Permission denied") {
            return why;
        }
        let names: Vec<String> = locked.iter().map(|k| k.display().to_string()).collect();
        format!(
            "{why} (the key file {} needs a passphrase and no ssh-agent holds it: \
             add it to your agent with `ssh-add {}` before the run)",
            names.join(", "),
            names.join(" ")
        )
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
        let nodes = self.hops.forget_host(host);
        for &node in &nodes {
            let req = serde_json::json!({"op": "exit", "noreply": true});
            let payload = arbor_wire::msg::encode(req.to_string().as_bytes(), b"");
            let stream = self.stream_id();
            let f = Frame::new(Kind::Request, node, NodeId::CONTROLLER, stream, payload);
            self.core.send(Instant::now(), f);
        }
        nodes.len()
    }

    fn spawn_local(
        &mut self,
        hop: &Hop,
        node: NodeId,
        role: HopRole,
        remote_cmd: &str,
        label: &str,
        relay: &'static relays::Relay,
    ) -> Result<(), String> {
        // `local`: the agent runs here, as this user, with no ssh.
        let local = hop.method == "local" && role == HopRole::Agent;
        let password = hop
            .password
            .as_ref()
            .filter(|_| hop.method == "ssh")
            .map(|p| p.0.as_str());
        let argv = if local {
            vec!["/bin/sh".to_string(), "-c".into(), remote_cmd.to_string()]
        } else if hop.enters_locally() {
            crate::methods::argv(hop, remote_cmd)
        } else {
            let mode = ssh::Mode {
                local: true,
                forward_agent: role == HopRole::Relay,
                password: password.is_some(),
            };
            ssh::argv(hop, remote_cmd, mode, None)
        };
        let mut preamble = crate::methods::stdin_prefix(hop)?;
        match role {
            HopRole::Relay => preamble.extend_from_slice(relay.bytes),
            HopRole::Agent => preamble.extend(arbor_bootstrap::agent_preamble(node)),
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(a) = &self.agent {
            cmd.env("SSH_AUTH_SOCK", a.socket());
        }
        if let Some(pw) = password {
            let (fd, env) = arbor_io::askpass::for_ssh(pw)
                .map_err(|e| format!("{label}: password file in RAM: {e}"))?;
            cmd.envs(env);
            self.askpass.insert(node, fd);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{label}: cannot run {}: {e}", argv[0]))?;
        let link = LinkId(self.next_link);
        self.next_link += 1;
        // Only a relay understands compressed frames.
        let compress = role == HopRole::Relay;
        let relay_for: Option<arbor_io::stage0::RelayFor> = match role {
            HopRole::Relay => Some(Box::new(|m: &str| relays::answer(m))),
            HopRole::Agent => None,
        };
        let child_link = start_child_link(
            child,
            &argv[0],
            preamble,
            compress,
            relay_for,
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
        role: HopRole,
        remote_cmd: &str,
    ) -> Result<(), String> {
        // What every spawn carries crosses to each relay once: pinned there
        // (from its parent relay if that holds it), then named.
        let mut preamble = crate::methods::stdin_prefix(hop)?;
        let mut preamble_pinned = None;
        if role == HopRole::Agent {
            let code = arbor_bootstrap::agent_payload();
            let key = pin_key("agent", code);
            preamble.extend(arbor_bootstrap::agent_preamble_header(node, code.len()));
            if self.pin(parent, &key, code) {
                preamble_pinned = Some(key);
            } else {
                preamble.extend_from_slice(code);
            }
        }
        let resolved = self.cfg.ssh_config.get(hop);
        let password = hop
            .password
            .as_ref()
            .filter(|_| hop.method == "ssh")
            .map(|p| p.0.as_str());
        let (known_hosts, known_hosts_pinned) = if hop.enters_locally() {
            (None, None)
        } else {
            let hosts = ssh::known_hosts(hop, &self.cfg.home, resolved.as_deref());
            let key = pin_key("known_hosts", &hosts);
            if self.pin(parent, &key, &hosts) {
                (None, Some(key))
            } else {
                (Some(hosts), None)
            }
        };
        if role == HopRole::Relay {
            self.relay_parent.insert(node, parent);
        }
        self.node_parent.insert(node, parent);
        let spec = Spawn {
            node,
            label: hop.name.clone(),
            argv: if hop.enters_locally() {
                crate::methods::argv(hop, remote_cmd)
            } else {
                let mode = ssh::Mode {
                    local: false,
                    forward_agent: role == HopRole::Relay,
                    password: password.is_some(),
                };
                ssh::argv(hop, remote_cmd, mode, resolved.as_deref())
            },
            env: Vec::new(),
            preamble,
            send_self: role == HopRole::Relay,
            known_hosts,
            connect_timeout_ms: (hop.timeout_s.unwrap_or(ssh::CONNECT_TIMEOUT_S_DEFAULT) + 20)
                * 1000,
            max_connecting: self.cfg.connecting_max,
            preamble_pinned,
            known_hosts_pinned,
            password: password.map(|p| control::Password(p.to_string())),
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
        let Some(role) = self.hops.of(node).map(|i| i.key.1) else {
            return;
        };
        let secs = ssh::keepalive_secs();
        let payload = match role {
            HopRole::Relay => control::encode(&Request::Keepalive {
                silent_ms: secs.saturating_mul(1000),
            }),
            HopRole::Agent if self.local_nodes.values().any(|n| *n == node) => {
                let req = serde_json::json!({"op": "keepalive", "secs": secs, "noreply": true});
                arbor_wire::msg::encode(req.to_string().as_bytes(), b"")
            }
            HopRole::Agent => return,
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
        self.hops.any_connecting()
    }

    /// Loads the key files a hop may use into the private agent: those of
    /// the hop itself and, for a relay, those of the hops before it (the
    /// hosts behind a relay may be reached with its key). Remembers them
    /// for the hop's failure message.
    async fn load_keys(&mut self, chain: &[Hop], role: HopRole, node: NodeId) {
        let Some(hop) = chain.last() else {
            return;
        };
        if hop.method != "ssh" {
            return;
        }
        let home = &self.cfg.home;
        let of = |h: &Hop| ssh::key_files(h, home, self.cfg.ssh_config.get(h).as_deref());
        let own = of(hop);
        let mut keys = own.clone();
        if role == HopRole::Relay {
            keys.extend(chain.iter().flat_map(of));
        }
        self.hop_keys.insert(node, own);
        if let Some(a) = &mut self.agent {
            a.load(keys).await;
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
                    let label = self.label_of(node);
                    info["node"] = serde_json::json!(node.0);
                    if let Some(l) = label {
                        info["label"] = serde_json::json!(l);
                    }
                    if let Some(t) = self.started.remove(&node) {
                        info["connect_ms"] = serde_json::json!(t.elapsed().as_millis() as u64);
                    }
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
                    self.settle(node, Ok(()));
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

    /// The machine a relay node said it runs (its hello).
    fn machine_of(&self, node: NodeId) -> Option<&'static str> {
        let hellos = self.hellos.lock().ok()?;
        let m = hellos.get(&node)?.get("machine")?.as_str()?;
        relays::for_machine(m).map(|r| r.machine)
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
        self.watched.remove(&node);
        self.started.remove(&node);
        self.pins.remove(&node);
        self.relay_parent.remove(&node);
        self.node_parent.remove(&node);
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
        self.agent = None;
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
