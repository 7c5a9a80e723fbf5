//! The controller's local API, spoken by the Ansible glue over a private
//! UNIX socket (a 0700 directory; peers of another uid are refused).
//!
//! A message is `u32 length (LE)` then a [`arbor_wire::msg`] payload: a JSON
//! object and a blob. What the JSON may say, both ways, is typed in
//! [`protocol`]; a request is parsed once into a [`protocol::Request`].
//! `put` and `call` with `"noreply": true` get no answer at all: the agent
//! acts on them in order with what follows, and a failure is reported to
//! the next request that is answered (see bootstrap/agent/arbor_agent/__init__.py).
//! A failure is `{"error": message, "unreachable": bool, "become_needed":
//! bool}`; the message names the host and the hop.

use std::collections::HashSet;
use std::time::Duration;

use arbor_wire::{msg, Frame, Kind, NodeId, StreamId, CHUNK_BYTES};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::ansiballz::{hex, zip_key, zip_members, zip_span};

mod become_agent;
mod calls;
mod exec;
mod files;
mod forward;
mod holdings;
mod modput;
pub mod protocol;
mod relay_cache;
mod stream;

use become_agent::*;
use calls::*;
use exec::*;
use files::*;
use forward::forward;
use protocol::{Event, Follow, Request, Target};
use relay_cache::*;
use stream::*;

use crate::life::{Life, Open};
use crate::tree::{BecomeSlot, HopRole, TreeError, TreeHandle};
pub use holdings::{Holdings, RELAY_CACHE_BYTES_DEFAULT};

/// Largest API message; bigger data is split into data messages.
pub const MESSAGE_BYTES_MAX: usize = 8 << 20;
/// Largest command output gathered for one reply.
pub const OUTPUT_BYTES_MAX: usize = 256 << 20;
/// How long a glue connection may stay silent between messages.
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How a request failed, as the glue is told. Every message names the
/// host and the hop.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request failed (on the target, or here).
    #[error("{0}")]
    Failed(String),
    /// A hop could not be reached or was lost: Ansible's UNREACHABLE.
    #[error("{0}")]
    Unreachable(String),
    /// The agent no longer holds a module zip it was sent before.
    #[error("{0}")]
    ZipMiss(String),
    /// The request's become agent is not up (see `become`).
    #[error("{0}")]
    BecomeNeeded(String),
}

impl ApiError {
    fn failed(message: impl Into<String>) -> Self {
        ApiError::Failed(message.into())
    }

    fn unreachable(message: impl Into<String>) -> Self {
        ApiError::Unreachable(message.into())
    }

    fn message(&self) -> &str {
        match self {
            ApiError::Failed(m)
            | ApiError::Unreachable(m)
            | ApiError::ZipMiss(m)
            | ApiError::BecomeNeeded(m) => m,
        }
    }

    /// The same failure, its message starting with `label`.
    fn labelled(self, label: &str) -> Self {
        if self.message().starts_with(label) {
            return self;
        }
        let m = |m: String| format!("{label}: {m}");
        match self {
            ApiError::Failed(s) => ApiError::Failed(m(s)),
            ApiError::Unreachable(s) => ApiError::Unreachable(m(s)),
            ApiError::ZipMiss(s) => ApiError::ZipMiss(m(s)),
            ApiError::BecomeNeeded(s) => ApiError::BecomeNeeded(m(s)),
        }
    }

    /// The glue's form: `{"error", "unreachable", "become_needed"}`.
    fn to_json(&self) -> Value {
        json!({"error": self.message(),
               "unreachable": matches!(self, ApiError::Unreachable(_)),
               "become_needed": matches!(self, ApiError::BecomeNeeded(_))})
    }
}

/// What the glue is told of a tree failure: a hop that cannot be reached
/// (or a daemon shutting down) is Ansible's UNREACHABLE; the rest fail.
impl From<TreeError> for ApiError {
    fn from(e: TreeError) -> ApiError {
        match e {
            TreeError::Hop(m) | TreeError::Chain(m) => ApiError::Unreachable(m),
            TreeError::ShuttingDown => ApiError::Unreachable(e.to_string()),
            TreeError::Become(m) => ApiError::Failed(m),
            TreeError::FrameTooBig(_) => ApiError::Failed(e.to_string()),
        }
    }
}

pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    conn: &mut R,
) -> std::io::Result<Option<(Value, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match tokio::time::timeout(IDLE_TIMEOUT, conn.read_exact(&mut len)).await {
        Err(_) => return Ok(None),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => {}
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MESSAGE_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("API message of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    conn.read_exact(&mut buf).await?;
    let (j, blob) = msg::split(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let v: Value = serde_json::from_slice(j)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((v, blob.to_vec())))
}

pub async fn write_message<W: tokio::io::AsyncWrite + Unpin>(
    conn: &mut W,
    v: &Value,
    blob: &[u8],
) -> std::io::Result<()> {
    let body = msg::encode(v.to_string().as_bytes(), blob);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    conn.write_all(&out).await
}

tokio::task_local! {
    /// The lane of the glue connection being served: each Ansible worker
    /// connection has its own, so an agent reports a failure of a request
    /// sent without waiting to that worker's next request only.
    static LANE: u64;
}

static NEXT_LANE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// `req` marked with the lane of the connection it came in on.
fn in_lane(mut req: Value) -> Value {
    if let Ok(lane) = LANE.try_with(|l| *l) {
        req["lane"] = json!(lane);
    }
    req
}

/// Serves one glue connection until it closes. `open` counts it in the
/// daemon's life from its accept: while it is open a persistent daemon is
/// not idle; if it asks for work (not `arbor status` or `stop`), its end
/// starts the idle time afresh.
pub async fn serve(conn: UnixStream, tree: TreeHandle, holdings: Holdings, open: Open) {
    let lane = NEXT_LANE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    LANE.scope(lane, serve_lane(conn, tree, holdings, open))
        .await
}

async fn serve_lane(mut conn: UnixStream, tree: TreeHandle, holdings: Holdings, mut open: Open) {
    let mut last_put = None;
    loop {
        let (raw, blob) = match read_message(&mut conn).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad API message; closing the connection");
                return;
            }
        };
        let silent = raw.get("noreply").and_then(Value::as_bool) == Some(true);
        let req = match Request::parse(raw) {
            Ok(req) => req,
            Err(e) if silent => {
                tracing::warn!(error = %e, "bad API request without reply");
                continue;
            }
            Err(e) => match write_message(&mut conn, &e.to_json(), b"").await {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        // Names and sizes only: requests carry module arguments, file
        // contents and passwords, and none of it is ever logged.
        let (op, host) = (req.op(), req.target().map(Target::host).unwrap_or(""));
        let host = host.to_string();
        let started = std::time::Instant::now();
        tracing::debug!(%op, %host, blob = blob.len(), "request");
        if !matches!(req, Request::Status | Request::Stop) {
            open.worked();
        }
        let result = answer(
            &mut conn,
            &tree,
            &holdings,
            open.life(),
            req,
            blob,
            &mut last_put,
        )
        .await;
        tracing::debug!(%op, %host, ok = result.is_ok(), ms = started.elapsed().as_millis() as u64, "answered");
        if let Err(e) = result {
            if write_message(&mut conn, &e.to_json(), b"").await.is_err() {
                return;
            }
        }
    }
}

/// Serves one request. A request without reply has none, even if it failed.
async fn answer(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    holdings: &Holdings,
    life: &Life,
    req: Request,
    blob: Vec<u8>,
    last_put: &mut Option<modput::LastPut>,
) -> Result<(), ApiError> {
    match req {
        Request::Ping => {
            let pong = protocol::Pong {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION"),
            };
            reply(conn, &pong).await
        }
        Request::AgentCommand { python } => {
            let cmd = arbor_bootstrap::agent_command(&python);
            reply(conn, &protocol::AgentCommand { cmd }).await
        }
        Request::Reset { host } => reset(conn, tree, &host).await,
        Request::Exec {
            to,
            cmd,
            stdin_size,
            run,
        } => {
            let e = Exec {
                to: &to,
                cmd: &cmd,
                run: &run,
            };
            let size = stdin_size.unwrap_or(blob.len() as u64) as usize;
            let stdin = read_body(conn, blob, size).await?;
            match exec(conn, tree, holdings, &e, &stdin).await {
                Err(ApiError::ZipMiss(_)) if modput::put_again(tree, &cmd, last_put).await => {
                    exec(conn, tree, holdings, &e, &stdin).await
                }
                other => other,
            }
        }
        Request::Choose {
            to,
            path,
            checksum,
            run,
            same,
            differs,
        } => {
            let c = Choose {
                to: &to,
                path: &path,
                checksum: checksum.as_deref(),
                run: &run,
            };
            choose(conn, tree, holdings, &c, [&same, &differs], blob).await
        }
        Request::Put(p) if modput::is_module_put(&p) => {
            let noreply = p.noreply;
            match modput::put_module(conn, tree, holdings, p, blob, last_put).await {
                Err(e) if noreply => {
                    tracing::debug!(error = %e, "module put without reply failed");
                    Ok(())
                }
                other => other,
            }
        }
        Request::Put(p) => match put(conn, tree, holdings, &p, blob).await {
            Err(e) if p.noreply => {
                tracing::debug!(error = %e, "put without reply failed");
                Ok(())
            }
            other => other,
        },
        Request::Fetch { to, path } => fetch(conn, tree, &to, &path).await,
        Request::Info { to } => info(conn, tree, &to).await,
        Request::Call {
            to,
            call,
            noreply: true,
        } => {
            call_noreply(tree, &to, call, blob).await;
            Ok(())
        }
        Request::Call { to, call, .. } => agent_call(conn, tree, &to, call, blob).await,
        Request::Become {
            to,
            label,
            cmd,
            success,
            timeout_s,
        } => {
            let b = Become {
                label: label.as_deref().unwrap_or("become"),
                cmd: &cmd,
                success: success.as_deref(),
                timeout_s,
            };
            become_agent(conn, tree, &to, &b).await
        }
        Request::Release { to, pid } => release(conn, tree, &to, pid).await,
        Request::Pipe { to, cmd, pty } => pipe(conn, tree, &to, &cmd, pty).await,
        Request::Forward {
            to,
            listen,
            connect,
        } => forward(conn, tree, &to, &listen, &connect).await,
        Request::Status => status(conn, tree, holdings, life).await,
        Request::Stop => {
            life.stop();
            reply(conn, &protocol::Stopping { stopping: true }).await
        }
    }
}

/// One of the daemon's own replies.
async fn reply<T: serde::Serialize>(conn: &mut UnixStream, v: &T) -> Result<(), ApiError> {
    let v = serde_json::to_value(v).map_err(|e| ApiError::failed(e.to_string()))?;
    write_message(conn, &v, b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
}

/// A message of the daemon's during a request.
async fn write_event<W: tokio::io::AsyncWrite + Unpin>(
    conn: &mut W,
    event: &protocol::Event,
    blob: &[u8],
) -> std::io::Result<()> {
    let v = serde_json::to_value(event).map_err(std::io::Error::other)?;
    write_message(conn, &v, blob).await
}

/// The next message continuing a request, or None if the glue sent
/// something else or went away.
async fn read_follow<R: tokio::io::AsyncRead + Unpin>(conn: &mut R) -> Option<(Follow, Vec<u8>)> {
    match read_message(conn).await {
        Ok(Some((v, blob))) => Follow::parse(v).map(|f| (f, blob)),
        _ => None,
    }
}
