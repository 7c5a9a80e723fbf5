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
//! the next request that is answered (see bootstrap/agent/arbor_agent.py).
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

mod modput;
mod zipcache;

use crate::tree::{BecomeSlot, HopRole, TreeHandle};
pub use zipcache::{ZipCache, RELAY_CACHE_BYTES_DEFAULT};

/// Largest API message; bigger data is split into data messages.
pub const MESSAGE_BYTES_MAX: usize = 8 << 20;
/// Largest command output gathered for one reply.
pub const OUTPUT_BYTES_MAX: usize = 256 << 20;
/// How long a glue connection may stay silent between messages.
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub struct ApiError {
    message: String,
    unreachable: bool,
    /// The agent no longer holds a module zip it was sent before.
    zip_miss: bool,
    /// The request's become agent is not up (see `become`).
    become_needed: bool,
}

impl ApiError {
    fn failed(message: impl Into<String>) -> Self {
        ApiError {
            message: message.into(),
            unreachable: false,
            zip_miss: false,
            become_needed: false,
        }
    }
    fn unreachable(message: impl Into<String>) -> Self {
        ApiError {
            message: message.into(),
            unreachable: true,
            zip_miss: false,
            become_needed: false,
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

/// Serves one glue connection until it closes.
pub async fn serve(conn: UnixStream, tree: TreeHandle, zips: ZipCache) {
    let lane = NEXT_LANE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    LANE.scope(lane, serve_lane(conn, tree, zips)).await
}

async fn serve_lane(mut conn: UnixStream, tree: TreeHandle, zips: ZipCache) {
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
            "exec" => match exec(&mut conn, &tree, &zips, &req, blob).await {
                Err(e) if e.zip_miss && modput::put_again(&tree, &req, &last_put).await => {
                    exec(&mut conn, &tree, &zips, &req, Vec::new()).await
                }
                other => other,
            },
            "put" if modput::is_module_put(&req) => {
                let done =
                    modput::put_module(&mut conn, &tree, &zips, &req, blob, &mut last_put).await;
                match done {
                    Err(e) if noreply(&req) => {
                        tracing::debug!(error = %e.message, "module put without reply failed");
                        Ok(())
                    }
                    other => other,
                }
            }
            "put" if noreply(&req) => {
                if let Err(e) = put(&mut conn, &tree, &zips, &req, blob).await {
                    tracing::debug!(error = %e.message, "put without reply failed");
                }
                Ok(())
            }
            "put" => put(&mut conn, &tree, &zips, &req, blob).await,
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
            "choose" => choose(&mut conn, &tree, &zips, &req, blob).await,
            other => Err(ApiError::failed(format!("unknown API request {other:?}"))),
        };
        tracing::debug!(%op, %host, ok = result.is_ok(), ms = started.elapsed().as_millis() as u64, "answered");
        if let Err(e) = result {
            let v = json!({"error": e.message, "unreachable": e.unreachable,
                           "become_needed": e.become_needed});
            if write_message(&mut conn, &v, b"").await.is_err() {
                return;
            }
        }
    }
}

fn noreply(req: &Value) -> bool {
    req.get("noreply").and_then(Value::as_bool) == Some(true)
}

/// The agent's hello, with `"hops"`: every hop's hello (label, node,
/// connect time), first hop first, then the become agent's if asked for.
async fn info(conn: &mut UnixStream, tree: &TreeHandle, req: &Value) -> Result<(), ApiError> {
    let node = agent_for(tree, req).await?;
    let t: Target = serde_json::from_value(req.clone())
        .map_err(|e| ApiError::failed(format!("bad chain: {e}")))?;
    let mut path = tree
        .ensure_path(&t.chain, HopRole::Agent, t.task.as_deref())
        .await
        .map_err(ApiError::unreachable)?;
    if path.last() != Some(&node) {
        path.push(node);
    }
    let mut hello = tree.hello(node).unwrap_or_else(|| json!({}));
    hello["hops"] = Value::Array(
        path.iter()
            .map(|n| tree.hello(*n).unwrap_or_else(|| json!({"node": n.0})))
            .collect(),
    );
    write_message(conn, &hello, b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
}

/// `meta: reset_connection` and friends: the host's interpreters end, and
/// its next task connects afresh.
async fn reset(conn: &mut UnixStream, tree: &TreeHandle, req: &Value) -> Result<(), ApiError> {
    let host = req
        .get("host")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::failed("reset without a host"))?;
    let ended = tree.reset(host).await.map_err(ApiError::failed)?;
    write_message(conn, &json!({ "ended": ended }), b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
}

/// A process of one of the target's become interpreters stands in the way
/// of a command (`userdel: user X is currently used by process N`): that
/// interpreter ends (awaited), and the next task that becomes X starts a
/// new one. Answers whether `pid` was one of arbor's.
async fn release(conn: &mut UnixStream, tree: &TreeHandle, req: &Value) -> Result<(), ApiError> {
    let pid = req
        .get("pid")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::failed("release without a pid"))?;
    let login = login_agent(tree, req).await?;
    let node = tree
        .release_pid(login, pid)
        .await
        .map_err(ApiError::failed)?;
    if let Some(node) = node {
        let (stream, mut rx) =
            send_request(tree, login, json!({"op": "unbecome", "node": node.0}), b"").await?;
        gather_reply(tree, stream, &mut rx).await?;
    }
    write_message(conn, &json!({ "released": node.is_some() }), b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
}

/// Agent operations the glue may call directly.
const CALL_OPS: &[&str] = &["stat", "mkdtemp", "rmtree", "chmod", "sync", "ping"];

fn agent_call(req: &Value) -> Result<Value, ApiError> {
    let r = req
        .get("req")
        .filter(|r| r.is_object())
        .cloned()
        .ok_or_else(|| ApiError::failed("call without a request"))?;
    match r.get("op").and_then(Value::as_str) {
        Some(op) if CALL_OPS.contains(&op) => Ok(r),
        other => Err(ApiError::failed(format!("call of unknown op {other:?}"))),
    }
}

async fn call(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    req: &Value,
    blob: Vec<u8>,
) -> Result<(), ApiError> {
    let agent_req = agent_call(req)?;
    let node = agent_for(tree, req).await?;
    let (stream, mut rx) = send_request(tree, node, agent_req, &blob).await?;
    let (v, out) = gather_reply(tree, stream, &mut rx).await?;
    send_chunked(conn, v, &out).await
}

/// A call nobody waits for: failures here surface on the next call.
async fn call_noreply(tree: &TreeHandle, req: &Value, blob: Vec<u8>) {
    let Ok(mut agent_req) = agent_call(req) else {
        return;
    };
    let Ok(node) = agent_for(tree, req).await else {
        return;
    };
    agent_req["noreply"] = json!(true);
    if let Ok(stream) = tree.post(node, first_frame(agent_req, &blob)).await {
        let _ = rest_of_body(tree, node, stream, &blob).await;
    }
}

#[derive(Deserialize)]
struct Target {
    chain: Vec<Hop>,
    /// The Ansible task asking (its uuid): a hop that failed during it
    /// fails again at once; for another task it is connected again.
    #[serde(default)]
    task: Option<String>,
}

/// The agent a request is for: the target's login agent, or the nested
/// agent its `"become": {"key"}` names, which must be up.
async fn agent_for(tree: &TreeHandle, req: &Value) -> Result<NodeId, ApiError> {
    let login = login_agent(tree, req).await?;
    let Some(key) = become_key(req) else {
        return Ok(login);
    };
    let key = key.as_str();
    match tree
        .become_slot(login, key, "", false)
        .await
        .map_err(ApiError::failed)?
    {
        Some(BecomeSlot::Ready(node)) => Ok(node),
        _ => {
            let mut e = ApiError::failed("the become interpreter is not up");
            e.become_needed = true;
            Err(e)
        }
    }
}

async fn login_agent(tree: &TreeHandle, req: &Value) -> Result<NodeId, ApiError> {
    let t: Target = serde_json::from_value(req.clone())
        .map_err(|e| ApiError::failed(format!("bad chain: {e}")))?;
    tree.ensure(&t.chain, HopRole::Agent, t.task.as_deref())
        .await
        .map_err(ApiError::unreachable)
}

/// The become interpreter a request names: the glue's key (plugin, user,
/// exe, flags) and, if the task gives a become password, a digest of it
/// under a secret of this daemon's. So a task with another password (a
/// wrong one) gets an interpreter of its own, started with that password,
/// which the become tool then checks as it does for vanilla on every task.
fn become_key(req: &Value) -> Option<String> {
    let b = req.get("become")?;
    let key = b.get("key")?.as_str()?;
    Some(match b.get("pass").and_then(Value::as_str) {
        Some(pass) if !pass.is_empty() => format!("{key}|pass:{}", password_digest(pass)),
        _ => key.to_string(),
    })
}

/// A keyed digest of a password: equal for equal passwords within this
/// daemon, and of no use to a reader of a log (the key never leaves it).
fn password_digest(pass: &str) -> String {
    use sha2::{Digest, Sha256};
    static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let secret = SECRET.get_or_init(|| {
        let mut b = [0u8; 32];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = std::io::Read::read_exact(&mut f, &mut b);
        }
        b
    });
    let mut h = Sha256::new();
    h.update(secret);
    h.update(pass.as_bytes());
    hex(&h.finalize()[..16])
}

/// Longest a become command may take to prompt or succeed.
const BECOME_TIMEOUT_S_MAX: u64 = 600;

/// Starts the nested agent a request's `become` names, unless it is up or
/// another caller is starting it (then waits for that).
async fn become_agent(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    req: &Value,
) -> Result<(), ApiError> {
    let login = login_agent(tree, req).await?;
    let key = become_key(req).ok_or_else(|| ApiError::failed("become without a key"))?;
    let key = key.as_str();
    let label = req
        .get("label")
        .and_then(Value::as_str)
        .unwrap_or("become")
        .to_string();
    let slot = tree
        .become_slot(login, key, &label, true)
        .await
        .map_err(ApiError::failed)?;
    let mut log = Value::Null;
    let node = match slot {
        Some(BecomeSlot::Ready(node)) => node,
        Some(BecomeSlot::Start(node)) => {
            let outcome = drive_become(conn, tree, login, node, req).await;
            let labelled = outcome.map_err(|mut e| {
                if !e.message.starts_with(&label) {
                    e.message = format!("{label}: {}", e.message);
                }
                e
            });
            tree.become_done(
                node,
                labelled.as_ref().map(|_| ()).map_err(|e| e.message.clone()),
            )
            .await;
            log = labelled?;
            node
        }
        None => return Err(ApiError::failed(format!("{label}: not started"))),
    };
    write_message(conn, &json!({ "node": node.0, "log": log }), b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
}

/// The become handshake: the agent's output goes to the glue, the glue's
/// answers (a password, or giving up) to the agent, until the agent says
/// the nested agent is up or failed. Passwords pass through, never logged.
/// Returns what the agent logged.
async fn drive_become(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    login: NodeId,
    node: NodeId,
    req: &Value,
) -> Result<Value, ApiError> {
    let timeout = req
        .get("timeout_s")
        .and_then(Value::as_u64)
        .unwrap_or(30)
        .min(BECOME_TIMEOUT_S_MAX);
    let agent_req = json!({
        "op": "become",
        "node": node.0,
        "cmd": req.get("cmd").cloned().unwrap_or(Value::Null),
        "success": req.get("success").cloned().unwrap_or(Value::Null),
        "timeout_s": timeout,
    });
    let (stream, mut rx) = send_request(tree, login, agent_req, b"").await?;
    // The agent gives up after `timeout`; this is a backstop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout + 30);
    loop {
        let f = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => return Err(ApiError::unreachable("the tree closed during become")),
            Err(_) => {
                tree.forget(stream).await;
                return Err(ApiError::failed(format!(
                    "no answer to become within {}s",
                    timeout + 30
                )));
            }
        };
        match f.kind {
            Kind::Data => {
                let (j, _) = msg::split(&f.payload).map_err(|e| ApiError::failed(e.to_string()))?;
                let out: Value =
                    serde_json::from_slice(j).map_err(|e| ApiError::failed(e.to_string()))?;
                let io = |e: std::io::Error| ApiError::failed(e.to_string());
                write_message(
                    conn,
                    &json!({"op": "output", "output": out.get("output").cloned().unwrap_or(json!(""))}),
                    b"",
                )
                .await
                .map_err(io)?;
                let answer = match read_message(conn).await {
                    Ok(Some((a, _))) if a.get("op").and_then(Value::as_str) == Some("answer") => a,
                    _ => json!({"abort": "the Ansible worker went away during become"}),
                };
                let mut fwd = serde_json::Map::new();
                for k in ["password", "abort"] {
                    if let Some(v) = answer.get(k) {
                        fwd.insert(k.to_string(), v.clone());
                    }
                }
                if !fwd.is_empty() {
                    let payload = msg::encode(Value::Object(fwd).to_string().as_bytes(), b"");
                    tree.send_part(login, stream, Kind::Data, payload)
                        .await
                        .map_err(ApiError::failed)?;
                }
            }
            Kind::Reply => {
                let (j, _) = msg::split(&f.payload).map_err(|e| ApiError::failed(e.to_string()))?;
                let v: Value =
                    serde_json::from_slice(j).map_err(|e| ApiError::failed(e.to_string()))?;
                return match v.get("error").and_then(Value::as_str) {
                    Some(err) => Err(ApiError::failed(err.to_string())),
                    None => Ok(v.get("log").cloned().unwrap_or(Value::Null)),
                };
            }
            _ => {
                return Err(ApiError::unreachable(
                    String::from_utf8_lossy(&f.payload).into_owned(),
                ))
            }
        }
    }
}

/// Reads the rest of a request body sent in data messages, up to `size`.
async fn read_body(
    conn: &mut UnixStream,
    mut body: Vec<u8>,
    size: usize,
) -> Result<Vec<u8>, ApiError> {
    if size > OUTPUT_BYTES_MAX {
        return Err(ApiError::failed(format!(
            "request body of {size} bytes over the limit"
        )));
    }
    while body.len() < size {
        match read_message(conn).await {
            Ok(Some((m, part))) if m.get("op").and_then(Value::as_str) == Some("data") => {
                body.extend(part)
            }
            _ => return Err(ApiError::failed("request body ended early")),
        }
    }
    Ok(body)
}

/// A request's first frame: its JSON and the first chunk of its body,
/// marked "streamed" if more of the body follows (see [`rest_of_body`]).
fn first_frame(req: Value, body: &[u8]) -> Vec<u8> {
    let mut req = in_lane(req);
    if body.len() > CHUNK_BYTES {
        req["streamed"] = Value::Bool(true);
    }
    msg::encode(
        req.to_string().as_bytes(),
        &body[..body.len().min(CHUNK_BYTES)],
    )
}

/// What follows a request's first frame: the rest of its body, then End.
async fn rest_of_body(
    tree: &TreeHandle,
    node: NodeId,
    stream: StreamId,
    body: &[u8],
) -> Result<(), ApiError> {
    if body.len() > CHUNK_BYTES {
        send_data(tree, node, stream, &body[CHUNK_BYTES..]).await?;
        tree.send_part(node, stream, Kind::End, Vec::new())
            .await
            .map_err(ApiError::failed)?;
    }
    Ok(())
}

/// Sends `data` on `stream` as Data frames of at most one chunk each.
async fn send_data(
    tree: &TreeHandle,
    node: NodeId,
    stream: StreamId,
    data: &[u8],
) -> Result<(), ApiError> {
    for part in data.chunks(CHUNK_BYTES) {
        tree.send_part(node, stream, Kind::Data, part.to_vec())
            .await
            .map_err(ApiError::failed)?;
    }
    Ok(())
}

/// Sends a request to an agent, its body streamed in chunks if large.
async fn send_request(
    tree: &TreeHandle,
    node: NodeId,
    req: Value,
    body: &[u8],
) -> Result<(StreamId, mpsc::Receiver<Frame>), ApiError> {
    let (stream, rx) = tree
        .open(node, first_frame(req, body))
        .await
        .map_err(ApiError::unreachable)?;
    rest_of_body(tree, node, stream, body).await?;
    Ok((stream, rx))
}

/// The agent's reply: its JSON, and its whole blob (gathered if streamed).
async fn gather_reply(
    tree: &TreeHandle,
    stream: StreamId,
    rx: &mut mpsc::Receiver<Frame>,
) -> Result<(Value, Vec<u8>), ApiError> {
    let (v, mut blob) = first_reply(rx).await?;
    if v.get("streamed").and_then(Value::as_bool) == Some(true) {
        loop {
            let Some(f) = rx.recv().await else {
                return Err(ApiError::unreachable("the agent's reply was cut off"));
            };
            match f.kind {
                Kind::Data if blob.len() + f.payload.len() <= OUTPUT_BYTES_MAX => {
                    blob.extend(f.payload)
                }
                Kind::Data => {
                    tree.forget(stream).await;
                    return Err(ApiError::failed(format!(
                        "output over {OUTPUT_BYTES_MAX} bytes"
                    )));
                }
                Kind::End => break,
                _ => {
                    return Err(ApiError::unreachable(
                        String::from_utf8_lossy(&f.payload).into_owned(),
                    ))
                }
            }
        }
    }
    Ok((v, blob))
}

async fn first_reply(rx: &mut mpsc::Receiver<Frame>) -> Result<(Value, Vec<u8>), ApiError> {
    let Some(f) = rx.recv().await else {
        return Err(ApiError::unreachable(
            "the tree closed before the agent answered",
        ));
    };
    if f.kind != Kind::Reply {
        return Err(ApiError::unreachable(
            String::from_utf8_lossy(&f.payload).into_owned(),
        ));
    }
    let (j, blob) = msg::split(&f.payload).map_err(|e| ApiError::failed(e.to_string()))?;
    let v: Value = serde_json::from_slice(j).map_err(|e| ApiError::failed(e.to_string()))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        let mut e = ApiError::failed(err.to_string());
        e.zip_miss = v.get("zip_miss").and_then(Value::as_bool) == Some(true);
        return Err(e);
    }
    Ok((v, blob.to_vec()))
}

async fn exec(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    zips: &ZipCache,
    req: &Value,
    blob: Vec<u8>,
) -> Result<(), ApiError> {
    let size = req
        .get("stdin_size")
        .and_then(Value::as_u64)
        .unwrap_or(blob.len() as u64) as usize;
    let stdin = read_body(conn, blob, size).await?;
    let node = agent_for(tree, req).await?;
    let agent_req = json!({
        "op": "exec",
        "cmd": req.get("cmd").cloned().unwrap_or(Value::Null),
        "isolation": req.get("isolation").cloned().unwrap_or(Value::Null),
        "cwd": req.get("cwd").cloned().unwrap_or(Value::Null),
    });
    let relays = relays_of(tree, req).await;
    let answer = exec_zipped(tree, zips, node, &relays, |whole| {
        let behind = !relays.is_empty();
        let (fields, body, keys) = zip_form(zips, node, behind, &stdin, whole, &mut HashSet::new());
        let mut req = agent_req.clone();
        for (k, v) in fields {
            req[k] = v;
        }
        (req, body, keys)
    })
    .await?;
    send_answer(conn, answer).await
}

/// Runs a module request that `build(whole)` makes: in its short form
/// first and, if the agent (or its relay's cache) missed part of a zip,
/// once more whole. Then remembers what the agent holds.
async fn exec_zipped(
    tree: &TreeHandle,
    zips: &ZipCache,
    node: NodeId,
    relays: &[NodeId],
    mut build: impl FnMut(bool) -> (Value, Body, Vec<String>),
) -> Result<(Value, Vec<u8>), ApiError> {
    for whole in [false, true] {
        let (req, body, keys) = build(whole);
        let injected = body.injects();
        match exec_body(tree, zips, node, relays, req, body).await {
            Err(e) if e.zip_miss && !whole && !keys.is_empty() => {
                if injected {
                    tracing::warn!(%node, "a relay missed an entry its mirror held");
                    zips.relay_reset(relays);
                }
            }
            other => {
                let answer = other?;
                for k in &keys {
                    zips.set(node, k);
                }
                return Ok(answer);
            }
        }
    }
    Err(ApiError::failed("the agent missed the module's zip twice"))
}

/// An agent's answer to the glue, without the stream marker.
async fn send_answer(
    conn: &mut UnixStream,
    (mut v, out): (Value, Vec<u8>),
) -> Result<(), ApiError> {
    if let Some(o) = v.as_object_mut() {
        o.remove("streamed");
    }
    send_chunked(conn, v, &out).await
}

/// A module's stdin in the form its agent needs, and the cache keys to
/// remember for the agent once it has answered:
/// - the agent holds the zip: the script without its zip literal
///   (`zip_key`, `zip_at`);
/// - else, if the zip can be read: the script without its literal, then
///   the compressed bytes of the zip's members the agent does not hold
///   (`zip_members`, a manifest of every member; `zip_blob`, how many bytes
///   of members follow the script). The agent rebuilds the zip. Modules
///   share most members (module_utils), so each crosses a link once;
/// - else, or `whole` (after the agent missed something): the script as it
///   is (`zip_span`, so the agent keeps the zip).
fn zip_form(
    zips: &ZipCache,
    node: NodeId,
    behind_relay: bool,
    stdin: &[u8],
    whole: bool,
    sending: &mut HashSet<String>,
) -> (serde_json::Map<String, Value>, Body, Vec<String>) {
    let mut fields = serde_json::Map::new();
    let Some((a, b)) = zip_span(stdin) else {
        return (fields, Body::raw(stdin.to_vec()), Vec::new());
    };
    let key = zip_key(&stdin[a..b]);
    fields.insert("zip_key".into(), json!(key));
    let short = || [&stdin[..a], &stdin[b..]].concat();
    if !whole && zips.has(node, &key) {
        fields.insert("zip_at".into(), json!(a));
        return (fields, Body::raw(short()), vec![key]);
    }
    if !whole {
        if let Some(members) = zip_members(&stdin[a..b]) {
            let mut body = Body::raw(short());
            let mut blob = 0;
            let mut keys = vec![key];
            let manifest: Vec<Value> = members
                .into_iter()
                .map(|m| {
                    let mk = format!("m:{}", m.key);
                    let mut e =
                        json!({"n": m.name, "k": m.key, "m": m.method, "c": m.crc, "u": m.size});
                    if !zips.has(node, &mk) && sending.insert(mk.clone()) {
                        e["s"] = json!(m.data.len());
                        blob += m.data.len();
                        keys.push(mk);
                        // Behind a relay: from the relay's cache, which gets
                        // it once (it crosses the WAN once per relay).
                        if behind_relay && m.data.len() <= RELAY_ENTRY_BYTES_MAX {
                            body.parts.push(Part::Cached(m.key, m.data));
                        } else {
                            body.push_raw(&m.data);
                        }
                    }
                    e
                })
                .collect();
            fields.insert("zip_at".into(), json!(a));
            fields.insert("zip_members".into(), Value::Array(manifest));
            fields.insert("zip_blob".into(), json!(blob));
            return (fields, body, keys);
        }
    }
    fields.insert("zip_span".into(), json!([a, b]));
    (fields, Body::raw(stdin.to_vec()), vec![key])
}

/// Largest zip member kept in a relay's cache (one control frame).
const RELAY_ENTRY_BYTES_MAX: usize = 512 * 1024;

/// A request body in parts: bytes sent from here, and entries of the
/// agent's relay's cache that the relay injects (`Inject`), put into the
/// cache first if it does not hold them yet.
#[derive(Default)]
struct Body {
    parts: Vec<Part>,
}

enum Part {
    Raw(Vec<u8>),
    Cached(String, Vec<u8>),
}

impl Body {
    fn raw(data: Vec<u8>) -> Body {
        Body {
            parts: vec![Part::Raw(data)],
        }
    }

    fn push_raw(&mut self, data: &[u8]) {
        match self.parts.last_mut() {
            Some(Part::Raw(r)) => r.extend_from_slice(data),
            _ => self.parts.push(Part::Raw(data.to_vec())),
        }
    }

    fn append(&mut self, other: Body) {
        for p in other.parts {
            match p {
                Part::Raw(r) => self.push_raw(&r),
                c => self.parts.push(c),
            }
        }
    }

    fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Raw(r) => r.len(),
                Part::Cached(_, d) => d.len(),
            })
            .sum()
    }

    fn injects(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Cached(..)))
    }

    /// All of it as bytes, sent from here.
    fn flat(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for Part::Raw(data) | Part::Cached(_, data) in self.parts {
            out.extend(data);
        }
        out
    }
}

/// Sends a request with a body that may come partly from the cache of the
/// last of `relays`: the cache is filled first, then the request and its raw
/// parts go from here, with the relay injecting the cached parts in their
/// place. The agent checks the body's size (`body_size`) and asks again if
/// the relay missed one.
async fn send_body(
    tree: &TreeHandle,
    zips: &ZipCache,
    node: NodeId,
    relays: &[NodeId],
    mut req: Value,
    body: Body,
) -> Result<(StreamId, mpsc::Receiver<Frame>), ApiError> {
    let (Some(&relay), true) = (relays.last(), body.injects()) else {
        return send_request(tree, node, req, &body.flat()).await;
    };
    let size = body.len();
    let _held = zips.lock_relays(relays).await;
    for part in &body.parts {
        if let Part::Cached(key, data) = part {
            ensure_cached(tree, zips, relays, key, data).await?;
        }
    }
    // What a later put pushed out again goes from here.
    let mut sent = Body::default();
    for part in body.parts {
        match part {
            Part::Cached(key, _) if zips.relay_holds(relay, &key) => {
                sent.parts.push(Part::Cached(key, Vec::new()))
            }
            Part::Cached(_, data) | Part::Raw(data) => sent.push_raw(&data),
        }
    }
    let parts = sent.parts;
    req["body_size"] = json!(size);
    let mut req = in_lane(req);
    req["streamed"] = Value::Bool(true);
    let mut parts = parts.into_iter().peekable();
    let head = match parts.peek_mut() {
        Some(Part::Raw(r)) => {
            let n = r.len().min(CHUNK_BYTES);
            r.drain(..n).collect::<Vec<u8>>()
        }
        _ => Vec::new(),
    };
    let (stream, rx) = tree
        .open(node, msg::encode(req.to_string().as_bytes(), &head))
        .await
        .map_err(ApiError::unreachable)?;
    let mut keys = Vec::new();
    for part in parts {
        match part {
            Part::Cached(k, _) => keys.push(k),
            Part::Raw(r) => {
                inject(tree, relay, node, stream, &mut keys).await?;
                send_data(tree, node, stream, &r).await?;
            }
        }
    }
    inject(tree, relay, node, stream, &mut keys).await?;
    tree.send_part(node, stream, Kind::End, Vec::new())
        .await
        .map_err(ApiError::failed)?;
    Ok((stream, rx))
}

async fn inject(
    tree: &TreeHandle,
    relay: NodeId,
    dst: NodeId,
    stream: StreamId,
    keys: &mut Vec<String>,
) -> Result<(), ApiError> {
    use arbor_wire::control::{self, Request};
    if keys.is_empty() {
        return Ok(());
    }
    let req = Request::Inject {
        dst,
        stream,
        keys: std::mem::take(keys),
    };
    tree.post(relay, control::encode(&req))
        .await
        .map(|_| ())
        .map_err(ApiError::unreachable)
}

fn relay_cache_bytes() -> u64 {
    std::env::var("ARBOR_RELAY_CACHE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(RELAY_CACHE_BYTES_DEFAULT)
}

/// The relays an agent's frames pass, nearest the controller first.
async fn relays_of(tree: &TreeHandle, req: &Value) -> Vec<NodeId> {
    let Ok(t) = serde_json::from_value::<Target>(req.clone()) else {
        return Vec::new();
    };
    let n = t.chain.len();
    if n < 2 {
        return Vec::new();
    }
    tree.ensure_path(&t.chain[..n - 1], HopRole::Relay, t.task.as_deref())
        .await
        .unwrap_or_default()
}

/// Makes sure the last of `relays` (a chain's relays, nearest first) holds
/// `key`: from the nearest relay that holds it (`Forward`), or put into the
/// first relay and forwarded down, so the bytes cross each link at most
/// once. The caller holds the relays' locks. False if the cache cannot
/// keep it (then the caller sends the bytes itself).
async fn ensure_cached(
    tree: &TreeHandle,
    zips: &ZipCache,
    relays: &[NodeId],
    key: &str,
    data: &[u8],
) -> Result<bool, ApiError> {
    use arbor_wire::control::{self, Request};
    let Some(&last) = relays.last() else {
        return Ok(false);
    };
    if zips.relay_holds(last, key) {
        return Ok(true);
    }
    let max_bytes = relay_cache_bytes();
    let from = match relays.iter().rposition(|r| zips.relay_holds(*r, key)) {
        Some(i) => i,
        None => {
            let put = Request::CachePut {
                key: key.to_string(),
                data: data.to_vec(),
                max_bytes,
            };
            if !zips.relay_put(relays[0], key, data.len(), max_bytes) {
                return Ok(false);
            }
            tree.post(relays[0], control::encode(&put))
                .await
                .map_err(ApiError::unreachable)?;
            0
        }
    };
    for pair in relays[from..].windows(2) {
        let (via, dst) = (pair[0], pair[1]);
        if !zips.relay_put(dst, key, data.len(), max_bytes) {
            return Ok(false);
        }
        let fwd = Request::Forward {
            dst,
            keys: vec![key.to_string()],
            max_bytes,
        };
        tree.post(via, control::encode(&fwd))
            .await
            .map_err(ApiError::unreachable)?;
    }
    Ok(true)
}

/// Copy in one round trip (see the module doc).
async fn choose(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    zips: &ZipCache,
    req: &Value,
    blob: Vec<u8>,
) -> Result<(), ApiError> {
    let size_of = |k: &str| {
        req.get(k)
            .and_then(|c| c.get("size"))
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize
    };
    let (n_same, n_differs) = (size_of("same"), size_of("differs"));
    let body = read_body(conn, blob, n_same + n_differs).await?;
    let node = agent_for(tree, req).await?;
    let stdins = [&body[..n_same], &body[n_same..]];
    let relays = relays_of(tree, req).await;
    let answer = exec_zipped(tree, zips, node, &relays, |whole| {
        let mut agent_req = json!({
            "op": "choose",
            "path": req.get("path").cloned().unwrap_or(Value::Null),
            "checksum": req.get("checksum").cloned().unwrap_or(Value::Null),
            "isolation": req.get("isolation").cloned().unwrap_or(Value::Null),
            "cwd": req.get("cwd").cloned().unwrap_or(Value::Null),
        });
        let mut out = Body::default();
        let mut keys = Vec::new();
        let mut sending = HashSet::new();
        for (name, stdin) in ["same", "differs"].iter().zip(stdins) {
            let (mut fields, part, key) =
                zip_form(zips, node, !relays.is_empty(), stdin, whole, &mut sending);
            fields.insert(
                "cmd".into(),
                req.get(*name)
                    .and_then(|c| c.get("cmd"))
                    .cloned()
                    .unwrap_or(Value::Null),
            );
            agent_req[*name] = Value::Object(fields);
            if *name == "same" {
                agent_req["split"] = json!(part.len());
            }
            out.append(part);
            keys.extend(key);
        }
        (agent_req, out, keys)
    })
    .await?;
    send_answer(conn, answer).await
}

async fn exec_body(
    tree: &TreeHandle,
    zips: &ZipCache,
    node: NodeId,
    relays: &[NodeId],
    agent_req: Value,
    body: Body,
) -> Result<(Value, Vec<u8>), ApiError> {
    let (stream, mut rx) = send_body(tree, zips, node, relays, agent_req, body).await?;
    gather_reply(tree, stream, &mut rx).await
}

/// Replies to the glue, splitting a large blob into data messages.
async fn send_chunked(conn: &mut UnixStream, mut v: Value, blob: &[u8]) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::failed(e.to_string());
    let part = MESSAGE_BYTES_MAX / 2;
    v["size"] = json!(v.get("size").cloned().unwrap_or(json!(blob.len())));
    v["blob_size"] = json!(blob.len());
    write_message(conn, &v, &blob[..blob.len().min(part)])
        .await
        .map_err(io)?;
    if blob.len() > part {
        for p in blob[part..].chunks(part) {
            write_message(conn, &json!({"op": "data"}), p)
                .await
                .map_err(io)?;
        }
    }
    Ok(())
}

async fn put(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    zips: &ZipCache,
    req: &Value,
    first: Vec<u8>,
) -> Result<(), ApiError> {
    let size = req
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::failed("put without size"))?;
    let path = req
        .get("path")
        .cloned()
        .ok_or_else(|| ApiError::failed("put without path"))?;
    // Connect first, but read the whole body even if that fails, so the
    // connection stays in step with the glue.
    let node = agent_for(tree, req).await;
    let mut agent_req = json!({"op": "put", "path": path, "size": size, "streamed": true});
    if let Some(mode) = req.get("mode") {
        agent_req["mode"] = mode.clone();
    }
    let posted = noreply(req);
    if posted {
        agent_req["noreply"] = json!(true);
    }
    let mut out = match &node {
        Ok(node) => {
            let payload = msg::encode(in_lane(agent_req).to_string().as_bytes(), b"");
            match tree.open_credited(*node, payload).await {
                Ok((stream, rx, credit)) => {
                    // A file the relay's cache can keep goes through it: a
                    // file copied to many hosts behind a relay crosses the
                    // links above it once.
                    let relays = relays_of(tree, req).await;
                    let cached =
                        !relays.is_empty() && size <= relay_cache_bytes() / FILE_CACHE_SHARE;
                    Ok(Outgoing {
                        node: *node,
                        stream,
                        rx,
                        window: Window::new(credit),
                        relays: if cached { relays } else { Vec::new() },
                        dropped: false,
                    })
                }
                Err(e) => Err(ApiError::unreachable(e)),
            }
        }
        Err(e) => Err(ApiError {
            message: e.message.clone(),
            ..*e
        }),
    };
    // Chunks cut at fixed offsets, so the same file gives the same keys.
    let mut pending = first;
    let mut read = pending.len() as u64;
    loop {
        let last = read >= size;
        while pending.len() >= CHUNK_BYTES || (last && !pending.is_empty()) {
            let rest = pending.split_off(pending.len().min(CHUNK_BYTES));
            let chunk = std::mem::replace(&mut pending, rest);
            if let Ok(o) = out.as_mut() {
                o.send(tree, zips, chunk).await?;
            }
        }
        if last {
            break;
        }
        match read_message(conn).await {
            Ok(Some((m, part))) if m.get("op").and_then(Value::as_str) == Some("data") => {
                read += part.len() as u64;
                pending.extend(part);
            }
            _ => return Err(ApiError::failed("file data ended early")),
        }
    }
    let Outgoing {
        node,
        stream,
        mut rx,
        ..
    } = out?;
    tree.send_part(node, stream, Kind::End, Vec::new())
        .await
        .map_err(ApiError::failed)?;
    put_answer(conn, tree, stream, &mut rx, posted).await
}

/// A put's end: nothing if the glue does not wait for it, else the agent's
/// answer passed on.
async fn put_answer(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    stream: StreamId,
    rx: &mut mpsc::Receiver<Frame>,
    posted: bool,
) -> Result<(), ApiError> {
    if posted {
        tree.forget(stream).await;
        return Ok(());
    }
    let (v, _) = first_reply(rx).await?;
    write_message(conn, &v, b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
}

/// A file goes through a relay's cache if it is at most this share of it.
const FILE_CACHE_SHARE: u64 = 4;
/// Most bytes of one stream's data in flight beyond what its receiver has
/// consumed (`ARBOR_STREAM_WINDOW_BYTES`).
const STREAM_WINDOW_BYTES_DEFAULT: u64 = 1 << 20;

/// Bytes a sender may have in flight, paced by the receiver's credit.
struct Window {
    consumed: tokio::sync::watch::Receiver<u64>,
    sent: u64,
    size: u64,
    /// Longest wait for the receiver to take anything.
    stall: Duration,
}

/// Default of `ARBOR_STREAM_STALL_SECS`: how long a full window may wait
/// for its receiver (an agent that is stopped, or a disk that hangs).
const STREAM_STALL_SECS_DEFAULT: u64 = 300;

impl Window {
    fn new(consumed: tokio::sync::watch::Receiver<u64>) -> Window {
        let size = std::env::var("ARBOR_STREAM_WINDOW_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(STREAM_WINDOW_BYTES_DEFAULT)
            .clamp(CHUNK_BYTES as u64, 1 << 30);
        let stall = std::env::var("ARBOR_STREAM_STALL_SECS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(STREAM_STALL_SECS_DEFAULT)
            .max(1);
        Window {
            consumed,
            sent: 0,
            size,
            stall: Duration::from_secs(stall),
        }
    }

    /// Waits until `len` more bytes fit. False if the receiver dropped the
    /// stream (it failed, and says why in its answer).
    async fn reserve(&mut self, len: usize) -> Result<bool, ApiError> {
        loop {
            let consumed = *self.consumed.borrow_and_update();
            if consumed == u64::MAX {
                return Ok(false);
            }
            if self.sent + len as u64 <= consumed + self.size {
                self.sent += len as u64;
                return Ok(true);
            }
            match tokio::time::timeout(self.stall, self.consumed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(false),
                Err(_) => {
                    return Err(ApiError::failed(format!(
                        "the agent took none of the file for {} s (ARBOR_STREAM_STALL_SECS): \
                         it is stopped or its disk hangs",
                        self.stall.as_secs()
                    )))
                }
            }
        }
    }
}

/// A file on its way to an agent.
struct Outgoing {
    node: NodeId,
    stream: StreamId,
    rx: mpsc::Receiver<Frame>,
    window: Window,
    /// The relays whose caches it goes through (none: sent from here).
    relays: Vec<NodeId>,
    /// The agent gave up on it (the rest is read and dropped).
    dropped: bool,
}

impl Outgoing {
    async fn send(
        &mut self,
        tree: &TreeHandle,
        zips: &ZipCache,
        chunk: Vec<u8>,
    ) -> Result<(), ApiError> {
        if self.dropped || !self.window.reserve(chunk.len()).await? {
            self.dropped = true;
            return Ok(());
        }
        if let Some(&relay) = self.relays.last() {
            let key = format!("f:{}", hex(&Sha256::digest(&chunk)));
            let _held = zips.lock_relays(&self.relays).await;
            if ensure_cached(tree, zips, &self.relays, &key, &chunk).await? {
                let mut keys = vec![key];
                return inject(tree, relay, self.node, self.stream, &mut keys).await;
            }
        }
        tree.send_part(self.node, self.stream, Kind::Data, chunk)
            .await
            .map_err(ApiError::failed)
    }
}

async fn fetch(conn: &mut UnixStream, tree: &TreeHandle, req: &Value) -> Result<(), ApiError> {
    let node = agent_for(tree, req).await?;
    let agent_req = json!({"op": "fetch", "path": req.get("path").cloned().unwrap_or(Value::Null)});
    let (_stream, mut rx) = send_request(tree, node, agent_req, b"").await?;
    let (v, first) = first_reply(&mut rx).await?;
    let streamed = v.get("streamed").and_then(Value::as_bool) == Some(true);
    let io = |e: std::io::Error| ApiError::failed(e.to_string());
    write_message(
        conn,
        &json!({"size": v.get("size"), "streamed": streamed}),
        &first,
    )
    .await
    .map_err(io)?;
    if streamed {
        loop {
            let Some(f) = rx.recv().await else {
                return Err(ApiError::unreachable("the agent's file was cut off"));
            };
            match f.kind {
                Kind::Data => write_message(conn, &json!({"op": "data"}), &f.payload)
                    .await
                    .map_err(io)?,
                Kind::End => break,
                _ => {
                    return Err(ApiError::unreachable(
                        String::from_utf8_lossy(&f.payload).into_owned(),
                    ))
                }
            }
        }
        write_message(conn, &json!({"op": "end"}), b"")
            .await
            .map_err(io)?;
    }
    Ok(())
}

/// A command with stdin and output streaming both ways (rsync's --rsh).
async fn pipe(conn: &mut UnixStream, tree: &TreeHandle, req: &Value) -> Result<(), ApiError> {
    let node = agent_for(tree, req).await?;
    let agent_req = json!({"op": "pipe", "cmd": req.get("cmd").cloned().unwrap_or(Value::Null)});
    let (stream, mut rx) = send_request(tree, node, agent_req, b"").await?;
    first_reply(&mut rx).await?;
    let (mut rd, mut wr) = conn.split();
    let upstream = async {
        loop {
            match read_message(&mut rd).await {
                Ok(Some((m, blob))) if m.get("op").and_then(Value::as_str) == Some("data") => {
                    if send_data(tree, node, stream, &blob).await.is_err() {
                        break;
                    }
                }
                // "end", or the glue went away: the command's stdin ends.
                _ => {
                    let _ = tree.send_part(node, stream, Kind::End, Vec::new()).await;
                    break;
                }
            }
        }
    };
    let downstream = async {
        let io = |e: std::io::Error| ApiError::failed(e.to_string());
        loop {
            let Some(f) = rx.recv().await else {
                return Err(ApiError::unreachable("the tree closed during the command"));
            };
            match f.kind {
                Kind::Data => {
                    let (j, blob) =
                        msg::split(&f.payload).map_err(|e| ApiError::failed(e.to_string()))?;
                    let v: Value =
                        serde_json::from_slice(j).map_err(|e| ApiError::failed(e.to_string()))?;
                    let out = match v.get("rc") {
                        Some(rc) => json!({"op": "exit", "rc": rc}),
                        None => {
                            json!({"op": "data", "fd": v.get("fd").cloned().unwrap_or(json!(1))})
                        }
                    };
                    write_message(&mut wr, &out, blob).await.map_err(io)?;
                }
                Kind::End => return Ok(()),
                _ => {
                    return Err(ApiError::unreachable(
                        String::from_utf8_lossy(&f.payload).into_owned(),
                    ))
                }
            }
        }
    };
    tokio::pin!(upstream);
    tokio::pin!(downstream);
    // Once the command has ended, its stdin is of no more use.
    let down = tokio::select! {
        d = &mut downstream => d,
        _ = &mut upstream => downstream.await,
    };
    tree.forget(stream).await;
    down
}
