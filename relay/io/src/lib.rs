//! Tokio IO for the links of one node, shared by the relay and the
//! controller: a reader task that decodes frames, a writer task that
//! encodes them, and a task that owns a child process until it exits.
//! Each reports to the node's main loop as a [`LinkEvent`].

pub mod askpass;
#[cfg(feature = "quic")]
pub mod quic;
pub mod stage0;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbor_core::LinkId;
use arbor_wire::link::{Decoder, Encoder, READ_CHUNK_BYTES};
use arbor_wire::Frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStderr};
use tokio::sync::{mpsc, Notify};

/// Bytes waiting to be written to a parent link: beyond this the node's
/// main loop waits (it stops reading its children, which pushes back on
/// them).
pub const PARENT_QUEUE_BYTES: usize = 8 << 20;
/// Bytes waiting to be written to a child link: a node never waits for a
/// child (one child that stops reading must not stall the others), so a
/// child with more than this queued is cut off. Every stream is paced by
/// credit (a window of 1 MiB by default), so a child that reads never
/// comes near it.
pub const CHILD_QUEUE_BYTES: usize = 32 << 20;
/// Tail of a child's stderr kept for error messages.
pub const STDERR_TAIL_BYTES: usize = 4096;
/// How long a child may outlive the end of its stdout before it is killed
/// (its exit, with what it said, is what reports the link down).
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// What a link's tasks tell the node's main loop.
#[derive(Debug)]
pub enum LinkEvent {
    Frame(LinkId, Frame),
    /// The link's byte stream ended or broke; why.
    Closed(LinkId, String),
    /// The link's process exited: how, and the tail of its stderr.
    Exited(LinkId, String, Vec<u8>),
    /// From now on the link's frames go out through this writer (its QUIC
    /// lanes, described for messages); its process or stdio stays the
    /// control channel.
    Upgraded(LinkId, LinkTx, String),
    /// The link could not move off its channel: why (it stays on it).
    NotUpgraded(LinkId, String),
}

/// The sending side of a link's writer: frames queue without a frame
/// count, bounded by their bytes.
#[derive(Clone)]
pub struct LinkTx {
    tx: mpsc::UnboundedSender<(Frame, Option<u32>)>,
    queued: Arc<AtomicUsize>,
    room: Arc<Notify>,
    max: usize,
    /// When the writer last got bytes out ([`mono_ms`]).
    progress: Arc<AtomicU64>,
}

impl std::fmt::Debug for LinkTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTx")
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

/// Milliseconds on a monotonic clock private to this process.
pub fn mono_ms() -> u64 {
    static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let ms = T0
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The writer has gone (the link is closing).
    Closed,
    /// The link already holds this many bytes, at or past its bound.
    Full(usize),
}

impl LinkTx {
    fn new(max: usize) -> (LinkTx, LinkRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Notify::new());
        let progress = Arc::new(AtomicU64::new(mono_ms()));
        let rx = LinkRx {
            rx,
            queued: queued.clone(),
            room: room.clone(),
            progress: progress.clone(),
        };
        (
            LinkTx {
                tx,
                queued,
                room,
                max,
                progress,
            },
            rx,
        )
    }

    /// When the writer last got bytes out ([`mono_ms`]).
    pub fn progress_ms(&self) -> u64 {
        self.progress.load(Ordering::Acquire)
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Counts `len` more bytes in, unless the queue is at its bound (an
    /// empty queue always takes one frame).
    fn reserve(&self, len: usize) -> Result<(), SendError> {
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.max {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(SendError::Full(before));
        }
        Ok(())
    }

    fn push(&self, frame: Frame, lane: Option<u32>, len: usize) -> Result<(), SendError> {
        self.tx.send((frame, lane)).map_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            SendError::Closed
        })
    }

    /// Queues `frame` without waiting.
    pub fn try_send(&self, frame: Frame) -> Result<(), SendError> {
        self.try_send_lane(frame, None)
    }

    /// Queues `frame` without waiting, for `lane` on a link of lanes (a
    /// QUIC link keeps order within a lane only; other links ignore it).
    pub fn try_send_lane(&self, frame: Frame, lane: Option<u32>) -> Result<(), SendError> {
        let len = frame.wire_len();
        self.reserve(len)?;
        self.push(frame, lane, len)
    }

    /// Queues `frame`, waiting while the queue is full.
    pub async fn send(&self, frame: Frame) -> Result<(), SendError> {
        self.send_lane(frame, None).await
    }

    /// Queues `frame` for `lane` (see [`LinkTx::try_send_lane`]), waiting
    /// while the queue is full.
    pub async fn send_lane(&self, frame: Frame, lane: Option<u32>) -> Result<(), SendError> {
        let len = frame.wire_len();
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.reserve(len) {
                Ok(()) => return self.push(frame, lane, len),
                Err(SendError::Full(_)) if !self.tx.is_closed() => room.await,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The writer's side of a [`LinkTx`].
pub struct LinkRx {
    rx: mpsc::UnboundedReceiver<(Frame, Option<u32>)>,
    queued: Arc<AtomicUsize>,
    room: Arc<Notify>,
    progress: Arc<AtomicU64>,
}

impl LinkRx {
    async fn recv(&mut self) -> Option<Frame> {
        self.rx.recv().await.map(|(f, _)| f)
    }

    fn try_recv(&mut self) -> Option<Frame> {
        self.rx.try_recv().ok().map(|(f, _)| f)
    }

    /// `len` bytes have left the queue.
    fn written(&self, len: usize) {
        self.written_handle().written(len);
    }

    /// What a writer of part of the queue (a QUIC lane) reports through.
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    fn written_handle(&self) -> Written {
        Written {
            queued: self.queued.clone(),
            room: self.room.clone(),
            progress: self.progress.clone(),
        }
    }
}

/// Reports bytes that left a [`LinkTx`]'s queue.
#[derive(Clone)]
struct Written {
    queued: Arc<AtomicUsize>,
    room: Arc<Notify>,
    progress: Arc<AtomicU64>,
}

impl Written {
    fn written(&self, len: usize) {
        self.progress.store(mono_ms(), Ordering::Release);
        self.queued.fetch_sub(len, Ordering::AcqRel);
        self.room.notify_waiters();
    }
}

/// A child link as its node keeps it: the writer (never waited for), the
/// process, and why the link is going, for the message when it has gone.
pub struct ChildLink {
    writer: LinkTx,
    /// The process's own writer, kept open once frames go elsewhere.
    control: Option<LinkTx>,
    pid: u32,
    /// The program it runs (`ssh`, `docker`, …), for messages.
    program: String,
    /// Why it was cut off, if it was (it is then killed).
    cut_off: Option<String>,
    /// Why and when its stdout ended.
    closed: Option<(String, std::time::Instant)>,
    killed: bool,
}

impl ChildLink {
    /// For signals only; the child's own task waits for it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// From now on, frames go through `writer` (the link's QUIC lanes);
    /// the process stays the link's control channel (its stdin stays
    /// open: closing it would end the child).
    pub fn set_writer(&mut self, writer: LinkTx) {
        self.control = Some(std::mem::replace(&mut self.writer, writer));
    }

    /// Its frames go over QUIC lanes ([`ChildLink::set_writer`]).
    pub fn on_lanes(&self) -> bool {
        self.control.is_some()
    }

    /// Queues `frame` without waiting: a child that stops reading is cut
    /// off once its queue is full.
    pub fn send(&mut self, frame: Frame) {
        self.send_lane(frame, None);
    }

    /// [`ChildLink::send`] for `lane` (see [`LinkTx::try_send_lane`]).
    pub fn send_lane(&mut self, frame: Frame, lane: Option<u32>) {
        if let Err(SendError::Full(queued)) = self.writer.try_send_lane(frame, lane) {
            self.cut_off(format!(
                "stopped reading: {queued} bytes queued (bound {CHILD_QUEUE_BYTES})"
            ));
        }
    }

    /// Kills the child, remembering why (the first reason stands).
    pub fn cut_off(&mut self, why: String) {
        if self.cut_off.is_none() {
            self.cut_off = Some(why);
            signal(self.pid, libc::SIGKILL);
        }
    }

    /// Its stdout ended: the link goes down when the child has exited.
    pub fn stdout_closed(&mut self, why: String, now: std::time::Instant) {
        self.closed.get_or_insert((why, now));
    }

    /// Kills it if its stdout ended [`CLOSE_GRACE`] ago.
    pub fn kill_if_lingering(&mut self, now: std::time::Instant) {
        if let Some((_, at)) = &self.closed {
            if !self.killed && now.duration_since(*at) > CLOSE_GRACE {
                self.killed = true;
                signal(self.pid, libc::SIGKILL);
            }
        }
    }

    /// Why it went: the cause seen first (cut off, a read error or a
    /// malformed frame), then how the program exited and the tail of its
    /// stderr.
    pub fn lost_why(&self, label: &str, status: &str, tail: &[u8]) -> String {
        let mut why = format!("{label}: ");
        let closed = self.closed.as_ref().map(|(w, _)| w.as_str());
        if let Some(cause) = self.cut_off.as_deref().or(closed) {
            if cause != "connection closed" {
                why += cause;
                why += "; ";
            }
        }
        if self.killed && self.cut_off.is_none() {
            why += "(killed after its output ended) ";
        }
        why += &self.program;
        why += " ";
        why += status;
        let tail = tidy_tail(tail);
        if !tail.is_empty() {
            why += ": ";
            why += &tail;
        }
        why
    }
}

/// Reads frames from `r` until it ends or a frame is malformed.
pub fn spawn_reader<R>(r: R, inbox: mpsc::Sender<LinkEvent>, link: LinkId)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(read_frames(r, Vec::new(), inbox, link));
}

/// Decodes frames from `head` and then from `r` until it ends or a frame
/// is malformed.
pub async fn read_frames<R>(mut r: R, head: Vec<u8>, inbox: mpsc::Sender<LinkEvent>, link: LinkId)
where
    R: AsyncRead + Unpin,
{
    let mut dec = Decoder::new();
    dec.push(&head);
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut fresh = !head.is_empty();
    let why = loop {
        if !fresh {
            match r.read(&mut buf).await {
                Ok(0) => break "connection closed".to_string(),
                Ok(n) => dec.push(&buf[..n]),
                Err(e) => break format!("read error: {e}"),
            }
        }
        fresh = false;
        match hand_on(&mut dec, &inbox, link).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(why) => {
                let _ = inbox.send(LinkEvent::Closed(link, why)).await;
                return;
            }
        }
    };
    let _ = inbox.send(LinkEvent::Closed(link, why)).await;
}

/// Hands every whole frame `dec` holds to the node as `link`'s: Ok(false)
/// if the node has gone, Err(why) at a malformed frame.
async fn hand_on(
    dec: &mut Decoder,
    inbox: &mpsc::Sender<LinkEvent>,
    link: LinkId,
) -> Result<bool, String> {
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => {
                if inbox.send(LinkEvent::Frame(link, f)).await.is_err() {
                    return Ok(false);
                }
            }
            Ok(None) => return Ok(true),
            Err(e) => return Err(format!("malformed frame: {e}")),
        }
    }
}

/// A writer task for `w`; `compress` only toward another Rust node.
/// Its queue holds [`PARENT_QUEUE_BYTES`].
pub fn spawn_writer<W>(w: W, compress: bool, inbox: mpsc::Sender<LinkEvent>, link: LinkId) -> LinkTx
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = LinkTx::new(PARENT_QUEUE_BYTES);
    tokio::spawn(write_frames(w, Vec::new(), rx, compress, inbox, link));
    tx
}

/// Writes `preamble`, then every frame from `rx`, coalescing what is queued.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    preamble: Vec<u8>,
    mut rx: LinkRx,
    compress: bool,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) {
    if w.write_all(&preamble).await.is_err() {
        return; // the peer's exit is reported by whoever watches it
    }
    let enc = Encoder::new(compress);
    let mut out = Vec::new();
    while let Some(frame) = rx.recv().await {
        let taken = coalesce(&enc, frame, &mut out, || rx.try_recv());
        if let Err(e) = w.write_all(&out).await {
            let _ = inbox
                .send(LinkEvent::Closed(link, format!("write error: {e}")))
                .await;
            return;
        }
        if w.flush().await.is_err() {
            return;
        }
        rx.written(taken);
    }
}

/// Encodes `first` and what `more` has queued behind it into `out` (up to
/// about one read's worth); the frames' bytes as the queue counts them.
fn coalesce(
    enc: &Encoder,
    first: Frame,
    out: &mut Vec<u8>,
    mut more: impl FnMut() -> Option<Frame>,
) -> usize {
    out.clear();
    let mut taken = first.wire_len();
    enc.encode(&first, out);
    while out.len() < READ_CHUNK_BYTES {
        match more() {
            Some(f) => {
                taken += f.wire_len();
                enc.encode(&f, out);
            }
            None => break,
        }
    }
    taken
}

/// Makes a child process (running `program`) a link: writes `preamble`
/// and then the frames sent through the returned [`ChildLink`] to its stdin
/// (at most [`CHILD_QUEUE_BYTES`] queued, never waited for), reads frames
/// from its stdout, and watches it until it exits. For a relay's stage-0
/// (`relay_for`), the preamble is a relay for the machine guessed; if the
/// stage-0 asks for another machine's, it gets it (or the link closes
/// with why not) before any frame.
pub fn start_child_link(
    mut child: Child,
    program: &str,
    preamble: Vec<u8>,
    compress: bool,
    relay_for: Option<stage0::RelayFor>,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) -> Result<ChildLink, String> {
    let (Some(stdin), Some(stdout), Some(stderr), Some(pid)) = (
        child.stdin.take(),
        child.stdout.take(),
        child.stderr.take(),
        child.id(),
    ) else {
        return Err("child pipes missing".into());
    };
    let (tx, rx) = LinkTx::new(CHILD_QUEUE_BYTES);
    match relay_for {
        None => {
            tokio::spawn(write_frames(
                stdin,
                preamble,
                rx,
                compress,
                inbox.clone(),
                link,
            ));
            spawn_reader(stdout, inbox.clone(), link);
        }
        Some(relay_for) => {
            let (ask_tx, ask_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(stage0::write_relay_then_frames(
                stdin,
                preamble,
                (ask_rx, relay_for),
                rx,
                compress,
                inbox.clone(),
                link,
            ));
            tokio::spawn(stage0::read_ask_then_frames(
                stdout,
                ask_tx,
                inbox.clone(),
                link,
            ));
        }
    }
    tokio::spawn(watch_child(child, stderr, inbox, link));
    Ok(ChildLink {
        writer: tx,
        control: None,
        pid,
        program: program.rsplit('/').next().unwrap_or(program).to_string(),
        cut_off: None,
        closed: None,
        killed: false,
    })
}

/// Owns a child: keeps the tail of its stderr and, once it has exited,
/// reports how, with what it said.
pub async fn watch_child(
    mut child: Child,
    mut stderr: ChildStderr,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) {
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 1024];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        let over = tail.len().saturating_sub(STDERR_TAIL_BYTES);
        tail.drain(..over);
    }
    let status = match child.wait().await {
        Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "exited".to_string(),
        },
        Err(e) => format!("wait failed: {e}"),
    };
    let _ = inbox.send(LinkEvent::Exited(link, status, tail)).await;
}

/// Stops children: SIGTERM to each, SIGKILL to those left after `grace`,
/// until every one has been reported exited on `inbox` (its watcher reaps
/// it) or the inbox closes. Other events that arrive meanwhile are dropped.
pub async fn stop_children(
    mut pids: HashMap<LinkId, u32>,
    inbox: &mut mpsc::Receiver<LinkEvent>,
    grace: Duration,
) {
    for pid in pids.values() {
        signal(*pid, libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    let mut killed = false;
    while !pids.is_empty() {
        match tokio::time::timeout_at(deadline, inbox.recv()).await {
            Ok(Some(LinkEvent::Exited(link, ..))) => {
                pids.remove(&link);
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) if !killed => {
                killed = true;
                for pid in pids.values() {
                    signal(*pid, libc::SIGKILL);
                }
            }
            Err(_) => break,
        }
    }
}

/// Lines ssh prints that never say why a connection failed.
const NOISE: [&str; 7] = [
    "Warning: Permanently added",
    "Pseudo-terminal will not be allocated",
    "** WARNING: connection is not using a post-quantum",
    "** This session may be vulnerable",
    "** The server may need to be upgraded",
    "debug",
    "OpenSSH_",
];

/// A child's stderr tail as one line for an error message: banner lines
/// of `@` dropped, each line trimmed of them, ssh's noise (known-hosts
/// notices, debug lines) dropped, lines joined by spaces.
pub fn tidy_tail(tail: &[u8]) -> String {
    let text = String::from_utf8_lossy(tail);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_matches('@').trim())
        .filter(|l| !l.is_empty() && !NOISE.iter().any(|n| l.starts_with(n)))
        .collect();
    lines.join(" ")
}

/// Sends `sig` to a child of ours that its watcher has not reported gone.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not seen reaped.
    unsafe { libc::kill(pid as i32, sig) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_wire::{Kind, NodeId, StreamId};

    fn frame(len: usize) -> Frame {
        Frame::new(Kind::Data, NodeId(2), NodeId(0), StreamId(1), vec![7; len])
    }

    #[tokio::test]
    async fn a_queue_is_bounded_by_bytes_and_frees_as_it_is_written() {
        let (tx, rx) = LinkTx::new(1 << 20);
        // Nothing reads the other end of a small pipe: the writer stalls.
        let (w, mut r) = tokio::io::duplex(1024);
        let (inbox, _events) = mpsc::channel(4);
        tokio::spawn(write_frames(w, Vec::new(), rx, false, inbox, LinkId(1)));
        let mut sent = 0;
        let full = loop {
            match tx.try_send(frame(64 << 10)) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            tokio::task::yield_now().await;
        };
        let SendError::Full(queued) = full else {
            panic!("{full:?}")
        };
        assert!(queued <= 1 << 20 && sent >= 15, "{queued} {sent}");
        // A waiting send goes through once the reader drains the pipe.
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(frame(64 << 10)).await }
        });
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        while !waiting.is_finished() {
            got += tokio::io::AsyncReadExt::read(&mut r, &mut buf)
                .await
                .expect("read");
        }
        assert_eq!(waiting.await.expect("join"), Ok(()));
        assert!(got > 0 && tx.queued() <= 1 << 20);
    }

    #[tokio::test]
    async fn a_child_links_loss_names_the_cause_the_program_and_its_words() {
        let child = tokio::process::Command::new("/bin/sh")
            .args(["-c", "read x; echo 'fatal: no route' >&2; exit 3"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let (inbox, mut events) = mpsc::channel(8);
        let mut link = start_child_link(
            child,
            "/bin/sh",
            b"go\n".to_vec(),
            false,
            None,
            inbox,
            LinkId(4),
        )
        .expect("link");
        let (mut closed, mut exited) = (None, None);
        while exited.is_none() {
            match events.recv().await.expect("event") {
                LinkEvent::Closed(_, why) => closed = Some(why),
                LinkEvent::Exited(_, status, tail) => exited = Some((status, tail)),
                LinkEvent::Frame(..) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let (status, tail) = exited.expect("exit");
        if let Some(why) = closed {
            link.stdout_closed(why, std::time::Instant::now());
        }
        assert_eq!(
            link.lost_why("t1 (agent, via b1)", &status, &tail),
            "t1 (agent, via b1): sh exited with status 3: fatal: no route"
        );
    }

    #[test]
    fn tails_become_one_line_without_banners() {
        let tail =
            b"@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@@@@@\r\n\
IT IS POSSIBLE\nHost key verification failed.\n";
        assert_eq!(
            super::tidy_tail(tail),
            "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! IT IS POSSIBLE Host key verification failed."
        );
        assert_eq!(super::tidy_tail(b"\n \n"), "");
        let tail = b"Warning: Permanently added '10.98.0.12' (ED25519) to the list of known hosts.\r\n\
debug1: Authentications that can continue: publickey\nroot@10.98.0.12: Permission denied (publickey).\n";
        assert_eq!(
            super::tidy_tail(tail),
            "root@10.98.0.12: Permission denied (publickey)."
        );
    }
}
