//! Tokio IO for the links of one node, shared by the relay and the
//! controller: a reader task that decodes frames, a writer task that
//! encodes them, and a task that owns a child process until it exits.
//! Each reports to the node's main loop as a [`LinkEvent`].

use std::collections::HashMap;
use std::time::Duration;

use arbor_core::LinkId;
use arbor_wire::link::{Decoder, Encoder, READ_CHUNK_BYTES};
use arbor_wire::Frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStderr};
use tokio::sync::mpsc;

/// Frames waiting to be written to one link. A full queue makes the main
/// loop wait, so it stops reading, which pushes back on the senders.
pub const LINK_QUEUE_FRAMES: usize = 64;
/// Tail of a child's stderr kept for error messages.
pub const STDERR_TAIL_BYTES: usize = 4096;

/// What a link's tasks tell the node's main loop.
#[derive(Debug)]
pub enum LinkEvent {
    Frame(LinkId, Frame),
    /// The link's byte stream ended or broke; why.
    Closed(LinkId, String),
    /// The link's process exited: how, and the tail of its stderr.
    Exited(LinkId, String, Vec<u8>),
}

/// Reads frames from `r` until it ends or a frame is malformed.
pub fn spawn_reader<R>(mut r: R, inbox: mpsc::Sender<LinkEvent>, link: LinkId)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let why = loop {
            match r.read(&mut buf).await {
                Ok(0) => break "connection closed".to_string(),
                Ok(n) => dec.push(&buf[..n]),
                Err(e) => break format!("read error: {e}"),
            }
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => {
                        if inbox.send(LinkEvent::Frame(link, f)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = inbox
                            .send(LinkEvent::Closed(link, format!("malformed frame: {e}")))
                            .await;
                        return;
                    }
                }
            }
        };
        let _ = inbox.send(LinkEvent::Closed(link, why)).await;
    });
}

/// A writer task for `w`; `compress` only toward another Rust node.
pub fn spawn_writer<W>(
    w: W,
    compress: bool,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) -> mpsc::Sender<Frame>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(LINK_QUEUE_FRAMES);
    tokio::spawn(write_frames(w, Vec::new(), rx, compress, inbox, link));
    tx
}

/// Writes `preamble`, then every frame from `rx`, coalescing what is queued.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    preamble: Vec<u8>,
    mut rx: mpsc::Receiver<Frame>,
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
        out.clear();
        enc.encode(&frame, &mut out);
        while out.len() < READ_CHUNK_BYTES {
            match rx.try_recv() {
                Ok(f) => enc.encode(&f, &mut out),
                Err(_) => break,
            }
        }
        if let Err(e) = w.write_all(&out).await {
            let _ = inbox
                .send(LinkEvent::Closed(link, format!("write error: {e}")))
                .await;
            return;
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// Makes a child process a link: writes `preamble` and then the frames
/// sent on the returned sender to its stdin, reads frames from its stdout,
/// and watches it until it exits. Returns the sender and the child's pid.
pub fn start_child_link(
    mut child: Child,
    preamble: Vec<u8>,
    compress: bool,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) -> Result<(mpsc::Sender<Frame>, u32), String> {
    let (Some(stdin), Some(stdout), Some(stderr), Some(pid)) = (
        child.stdin.take(),
        child.stdout.take(),
        child.stderr.take(),
        child.id(),
    ) else {
        return Err("child pipes missing".into());
    };
    let (tx, rx) = mpsc::channel(LINK_QUEUE_FRAMES);
    tokio::spawn(write_frames(
        stdin,
        preamble,
        rx,
        compress,
        inbox.clone(),
        link,
    ));
    spawn_reader(stdout, inbox.clone(), link);
    tokio::spawn(watch_child(child, stderr, inbox, link));
    Ok((tx, pid))
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

/// Sends `sig` to a child of ours that its watcher has not reported gone.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not seen reaped.
    unsafe { libc::kill(pid as i32, sig) };
}
