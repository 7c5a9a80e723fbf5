//! The controller's local API, spoken by the Ansible glue over a private
//! UNIX socket (a 0700 directory; peers of another uid are refused).
//!
//! A message is `u32 length (LE)` then a [`arbor_wire::msg`] payload: a JSON
//! object and a blob. Requests:
//!
//! ```text
//! exec   {"chain":[hop...], "cmd", "stdin_size"}, blob: stdin (first part)
//!        -> {"rc", "stdout_len"}, blob: stdout + stderr
//! put    {"chain", "path", "size", "mode"?}, blob: first part
//!        -> {"size"}
//! fetch  {"chain", "path"} -> {"size", "parts"}, blob: first part
//! info   {"chain"} -> the agent's hello: {"pid", "user", "home", "python", ...}
//! call   {"chain", "req": {agent request}}, blob -> the agent's reply
//! ping   {} -> {"pid", "version"}
//! agent_command {"python"} -> {"cmd"}: the command that starts an agent
//! become {"chain", "become": {"key", "pass"}, "label", "cmd", "success", "timeout_s"}
//!        -> {"node"}
//! ```
//! choose {"chain", "path", "checksum", "same": {"cmd", "size"}, "differs": {"cmd", "size"}},
//!        blob: both stdins -> {"stat", "branch"?, "rc"?, "stdout_len"?}, blob: output
//!        (copy in one round trip: the agent stats `path` and runs `same`
//!        if its checksum is `checksum`, else `differs`; nothing if a dir)
//! pipe   {"chain", "cmd"}: a command whose stdin and output stream both
//!        ways: the glue sends `{"op":"data"}` (blob: stdin) and `{"op":"end"}`;
//!        it gets `{"op":"data","fd":1|2}` (blob: output) and `{"op":"exit","rc"}`.
//! `become` starts (once per target and key) a nested agent under another
//! account: `cmd` is the become plugin's command around `agent_command`.
//! Until it is up, each output of that command comes to the glue as
//! `{"op":"output","output"}`, and the glue must answer each with
//! `{"op":"answer"}`, adding `"password"` to type one or `"abort"` to give
//! up: the glue runs the plugin's own prompt checks. Any request with
//! `"become": {"key"}` then goes to that nested agent; if it is not up, the
//! error has `"become_needed": true`.
//! `put` and `call` with `"noreply": true` get no answer at all: the agent
//! acts on them in order with what follows, and a failure is reported to
//! the next request that is answered (see bootstrap/agent/arbor_agent/__init__.py).
//! A request or reply larger than one message continues in `{"op":"data"}`
//! messages (blob: the next part) and ends with `{"op":"end"}`. A failure
//! is `{"error": message, "unreachable": bool}`; the message names the host
//! and the hop.

use std::collections::HashSet;
use std::time::Duration;

use arbor_topology::Hop;
use arbor_wire::{msg, Frame, Kind, NodeId, StreamId, CHUNK_BYTES};
use serde::Deserialize;
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
mod holdings;
mod modput;
mod relay_cache;
mod stream;

use become_agent::*;
use calls::*;
use exec::*;
use files::*;
use relay_cache::*;
use stream::*;

use crate::tree::{BecomeSlot, HopRole, TreeHandle};
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

/// Serves one glue connection until it closes.
pub async fn serve(conn: UnixStream, tree: TreeHandle, holdings: Holdings) {
    let lane = NEXT_LANE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    LANE.scope(lane, serve_lane(conn, tree, holdings)).await
}

async fn serve_lane(mut conn: UnixStream, tree: TreeHandle, holdings: Holdings) {
    let mut last_put = None;
    loop {
        let (req, blob) = match read_message(&mut conn).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad API message; closing the connection");
                return;
            }
        };
        let op = req
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // Names and sizes only: requests carry module arguments, file
        // contents and passwords, and none of it is ever logged.
        let host = req
            .get("chain")
            .and_then(Value::as_array)
            .and_then(|c| c.last())
            .and_then(|h| h.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let started = std::time::Instant::now();
        tracing::debug!(%op, %host, blob = blob.len(), "request");
        let result = match op.as_str() {
            "ping" => write_message(
                &mut conn,
                &json!({"pid": std::process::id(), "version": env!("CARGO_PKG_VERSION")}),
                b"",
            )
            .await
            .map_err(|e| ApiError::failed(e.to_string())),
            "exec" => match exec(&mut conn, &tree, &holdings, &req, blob).await {
                Err(ApiError::ZipMiss(_)) if modput::put_again(&tree, &req, &last_put).await => {
                    exec(&mut conn, &tree, &holdings, &req, Vec::new()).await
                }
                other => other,
            },
            "put" if modput::is_module_put(&req) => {
                let done =
                    modput::put_module(&mut conn, &tree, &holdings, &req, blob, &mut last_put)
                        .await;
                match done {
                    Err(e) if noreply(&req) => {
                        tracing::debug!(error = %e, "module put without reply failed");
                        Ok(())
                    }
                    other => other,
                }
            }
            "put" if noreply(&req) => {
                if let Err(e) = put(&mut conn, &tree, &holdings, &req, blob).await {
                    tracing::debug!(error = %e, "put without reply failed");
                }
                Ok(())
            }
            "put" => put(&mut conn, &tree, &holdings, &req, blob).await,
            "fetch" => fetch(&mut conn, &tree, &req).await,
            "info" => info(&mut conn, &tree, &req).await,
            "call" if noreply(&req) => {
                call_noreply(&tree, &req, blob).await;
                Ok(())
            }
            "call" => call(&mut conn, &tree, &req, blob).await,
            "agent_command" => {
                let python = req
                    .get("python")
                    .and_then(Value::as_str)
                    .unwrap_or("python3");
                let cmd = arbor_bootstrap::agent_command(python);
                write_message(&mut conn, &json!({ "cmd": cmd }), b"")
                    .await
                    .map_err(|e| ApiError::failed(e.to_string()))
            }
            "become" => become_agent(&mut conn, &tree, &req).await,
            "reset" => reset(&mut conn, &tree, &req).await,
            "release" => release(&mut conn, &tree, &req).await,
            "pipe" => pipe(&mut conn, &tree, &req).await,
            "choose" => choose(&mut conn, &tree, &holdings, &req, blob).await,
            other => Err(ApiError::failed(format!("unknown API request {other:?}"))),
        };
        tracing::debug!(%op, %host, ok = result.is_ok(), ms = started.elapsed().as_millis() as u64, "answered");
        if let Err(e) = result {
            if write_message(&mut conn, &e.to_json(), b"").await.is_err() {
                return;
            }
        }
    }
}

fn noreply(req: &Value) -> bool {
    req.get("noreply").and_then(Value::as_bool) == Some(true)
}
