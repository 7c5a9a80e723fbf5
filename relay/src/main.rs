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

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use arbor_core::relay::{Action, Relay, PARENT};
use arbor_core::LinkId;
use arbor_io::{
    mono_ms, signal, spawn_reader, spawn_writer, start_child_link, stop_children, ChildLink,
    LinkEvent as Input, LinkTx,
};
use arbor_wire::control::{Reply, Spawn, AUTH_SOCK_TOKEN, KNOWN_HOSTS_TOKEN};

mod quic;
use arbor_wire::NodeId;
use tokio::process::Command;
use tokio::sync::mpsc;

/// Inputs (frames and link changes) waiting for the main loop.
const INBOX_FRAMES: usize = 1024;
/// How long children get to exit after SIGTERM.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How often the shell looks at its children and the parent's progress.
const TICK: Duration = Duration::from_millis(250);

struct Child {
    label: String,
    link: ChildLink,
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
    let code = rt.block_on(async move { Shell::new(NodeId(node)).run().await });
    std::process::exit(code);
}

/// The IO around [`Relay`]: links, processes, signals and the clock.
struct Shell {
    rules: Relay,
    inbox_tx: mpsc::Sender<Input>,
    inbox: mpsc::Receiver<Input>,
    parent: LinkTx,
    /// The stdout writer, kept open once the parent link is on QUIC.
    control: Option<LinkTx>,
    children: HashMap<LinkId, Child>,
    self_exe: Option<Vec<u8>>,
    /// `QuicConnect` requests under way, by the child link they move.
    quic_asks: HashMap<LinkId, (NodeId, arbor_wire::StreamId)>,
}

impl Shell {
    fn new(id: NodeId) -> Self {
        let (inbox_tx, inbox) = mpsc::channel(INBOX_FRAMES);
        // The parent is the controller or another relay: compressed frames.
        let parent = spawn_writer(tokio::io::stdout(), true, inbox_tx.clone(), PARENT);
        spawn_reader(tokio::io::stdin(), inbox_tx.clone(), PARENT);
        Shell {
            rules: Relay::new(Instant::now(), id),
            inbox_tx,
            inbox,
            parent,
            control: None,
            children: HashMap::new(),
            self_exe: None,
            quic_asks: HashMap::new(),
        }
    }

    async fn run(mut self) -> i32 {
        // `quic`: it is built with QUIC (the relays it starts are too).
        let hello = format!(
            r#"{{"pid":{},"relay":"{}","machine":"{}","quic":{}}}"#,
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH,
            cfg!(feature = "quic")
        );
        self.rules.announce(
            Instant::now(),
            arbor_wire::msg::encode(hello.as_bytes(), b""),
        );
        if !self.pump().await {
            return 74;
        }
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut sighup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(TICK);
        loop {
            let wake = self
                .rules
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                input = self.inbox.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    for c in self.children.values_mut() {
                        c.link.kill_if_lingering(now);
                    }
                }
                _ = sleep_until(wake) => {}
                _ = recv_signal(&mut sigterm) => break,
                _ = recv_signal(&mut sighup) => break,
            }
            self.pass_time();
            if !self.pump().await {
                break;
            }
        }
        self.shutdown().await;
        0
    }

    /// Tells the rules what the parent link took and what time it is.
    fn pass_time(&mut self) {
        let now = Instant::now();
        let ago = Duration::from_millis(mono_ms().saturating_sub(self.parent.progress_ms()));
        if let Some(at) = now.checked_sub(ago) {
            self.rules.parent_took_bytes(at);
        }
        self.rules.handle_timeout(now);
    }

    fn handle(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Frame(link, frame) => self.rules.handle_frame(now, link, frame),
            // A child's routes go when its process has exited and its
            // stderr says why.
            Input::Closed(link, why) => match self.children.get_mut(&link) {
                // A link over QUIC ends with either channel: its ssh is
                // ended with why.
                Some(c) if c.link.on_lanes() => c.link.cut_off(why),
                Some(c) => c.link.stdout_closed(why, now),
                None => self.rules.link_down(now, link, &why),
            },
            Input::Exited(link, status, tail) => {
                if let Some(c) = self.children.remove(&link) {
                    let why = c.link.lost_why(&c.label, &status, &tail);
                    self.rules.child_exited(now, link, why);
                }
            }
            // The parent's QUIC connection: frames go up through it.
            // Its stdout stays open (the ssh session is the control
            // channel).
            Input::Upgraded(link, tx, _) if link == PARENT => {
                self.control = Some(std::mem::replace(&mut self.parent, tx));
            }
            // A child relay's link: its frames go over QUIC from now on
            // (its ssh stays the control channel); or it stays on ssh.
            Input::Upgraded(link, tx, _) => {
                if let Some(c) = self.children.get_mut(&link) {
                    c.link.set_writer(tx);
                    self.answer_quic(link, Reply::Done);
                } else {
                    self.answer_quic(
                        link,
                        Reply::Error {
                            message: "the relay is gone".into(),
                        },
                    );
                }
            }
            Input::NotUpgraded(link, message) => self.answer_quic(link, Reply::Error { message }),
        }
    }

    /// Sends what the rules want sent and does what they ask; false when
    /// the relay must end.
    async fn pump(&mut self) -> bool {
        loop {
            if let Some((link, frame)) = self.rules.poll_transmit() {
                if link == PARENT {
                    // Waits for room, but not past the keepalive: a parent
                    // link that takes nothing that long is dead.
                    let parent = self.parent.clone();
                    let lane = quic::lane_up(&self.rules, &frame);
                    let send = parent.send_lane(frame, lane);
                    tokio::pin!(send);
                    loop {
                        tokio::select! {
                            r = &mut send => {
                                if r.is_err() {
                                    return false;
                                }
                                break;
                            }
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                                self.pass_time();
                                if !self.act() {
                                    return false;
                                }
                            }
                        }
                    }
                } else if let Some(c) = self.children.get_mut(&link) {
                    // Never waits for a child (one that stops reading is
                    // cut off). Over QUIC, a frame's lane is what it is
                    // about, else its destination's.
                    let lane = self.rules.subject(&frame).map(|n| n.0);
                    c.link.send_lane(frame, lane);
                }
                continue;
            }
            if !self.act() {
                return false;
            }
            if self.rules.has_transmit() {
                continue;
            }
            return true;
        }
    }

    /// Does what the rules ask; false when the relay must end.
    fn act(&mut self) -> bool {
        while let Some(action) = self.rules.poll_action() {
            match action {
                Action::Spawn {
                    link,
                    spawn,
                    preamble,
                    known_hosts,
                } => match self.start(link, *spawn, preamble, known_hosts) {
                    Ok(pid) => self.rules.child_started(link, pid),
                    Err(message) => self.rules.child_not_started(Instant::now(), link, message),
                },
                Action::Joined { link } => {
                    if let Some(c) = self.children.get_mut(&link) {
                        c.askpass = None;
                    }
                }
                Action::Kill { link } => {
                    // Its exit is then reported with what it said.
                    if let Some(c) = self.children.get(&link) {
                        signal(c.link.pid(), libc::SIGKILL);
                    }
                }
                Action::CutOff { link, why } => {
                    if let Some(c) = self.children.get_mut(&link) {
                        c.link.cut_off(why);
                    }
                }
                Action::QuicListen {
                    src,
                    stream,
                    accept_ms,
                    idle_ms,
                } => {
                    let reply = quic::listen(self.inbox_tx.clone(), accept_ms, idle_ms);
                    self.rules.answer(Instant::now(), src, stream, &reply);
                }
                Action::QuicConnect {
                    src,
                    stream,
                    link,
                    offer,
                    timeout_ms,
                    idle_ms,
                } => {
                    self.quic_asks.insert(link, (src, stream));
                    quic::connect(self.inbox_tx.clone(), link, *offer, timeout_ms, idle_ms);
                }
                Action::Exit { why } => {
                    if let Some(why) = why {
                        eprintln!("{why}");
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Answers the `QuicConnect` request that moved `link`, if one did.
    fn answer_quic(&mut self, link: LinkId, reply: Reply) {
        if let Some((src, stream)) = self.quic_asks.remove(&link) {
            self.rules.answer(Instant::now(), src, stream, &reply);
        }
    }

    /// Starts a child process on `link`; its pid.
    fn start(
        &mut self,
        link: LinkId,
        spec: Spawn,
        mut preamble: Vec<u8>,
        known_hosts: Option<Vec<u8>>,
    ) -> Result<u32, String> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err("empty command".into());
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
        let pid = child_link.pid();
        self.children.insert(
            link,
            Child {
                label: spec.label,
                link: child_link,
                _known_hosts: known_hosts,
                askpass,
            },
        );
        Ok(pid)
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

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
