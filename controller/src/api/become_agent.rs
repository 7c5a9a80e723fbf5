//! `become`: a nested agent under another account, started once per target
//! and become settings with the become plugin's own command, its prompts
//! relayed to the glue.

use super::*;

/// The become interpreter a request names: the glue's key (plugin, user,
/// exe, flags) and, if the task gives a become password, a digest of it
/// under a secret of this daemon's. So a task with another password (a
/// wrong one) gets an interpreter of its own, started with that password,
/// which the become tool then checks as it does for vanilla on every task.
pub(super) fn become_key(to: &Target) -> Option<String> {
    let b = to.become_as.as_ref()?;
    Some(match b.pass.as_deref() {
        Some(pass) if !pass.is_empty() => format!("{}|pass:{}", b.key, password_digest(pass)),
        _ => b.key.clone(),
    })
}

/// A keyed digest of a password: equal for equal passwords within this
/// daemon, and of no use to a reader of a log (the key never leaves it).
pub(super) fn password_digest(pass: &str) -> String {
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
pub(super) const BECOME_TIMEOUT_S_MAX: u64 = 600;

/// How to start a become interpreter (`Request::Become`).
pub(super) struct Become<'a> {
    /// Names the interpreter in messages (host, user, plugin).
    pub(super) label: &'a str,
    /// The become plugin's command around the agent's.
    pub(super) cmd: &'a str,
    /// The plugin's success marker.
    pub(super) success: Option<&'a str>,
    pub(super) timeout_s: Option<u64>,
}

/// Starts the nested agent a request's `become` names, unless it is up or
/// another caller is starting it (then waits for that).
pub(super) async fn become_agent(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    to: &Target,
    b: &Become<'_>,
) -> Result<(), ApiError> {
    let login = login_agent(tree, to).await?;
    let key = become_key(to).ok_or_else(|| ApiError::failed("become without a key"))?;
    let label = b.label;
    let slot = tree.become_slot(login, &key, label, true).await?;
    let mut log = Value::Null;
    let node = match slot {
        Some(BecomeSlot::Ready(node)) => node,
        Some(BecomeSlot::Start(node)) => {
            let outcome = drive_become(conn, tree, login, node, b).await;
            let labelled = outcome.map_err(|e| e.labelled(label));
            tree.become_done(
                node,
                labelled
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| e.message().to_string()),
            )
            .await;
            log = labelled?;
            node
        }
        None => return Err(ApiError::failed(format!("{label}: not started"))),
    };
    reply(conn, &protocol::BecomeUp { node: node.0, log }).await
}

/// The become handshake: the agent's output goes to the glue, the glue's
/// answers (a password, or giving up) to the agent, until the agent says
/// the nested agent is up or failed. Passwords pass through, never logged.
/// Returns what the agent logged.
pub(super) async fn drive_become(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    login: NodeId,
    node: NodeId,
    b: &Become<'_>,
) -> Result<Value, ApiError> {
    let timeout = b.timeout_s.unwrap_or(30).min(BECOME_TIMEOUT_S_MAX);
    let agent_req = json!({
        "op": "become",
        "node": node.0,
        "cmd": b.cmd,
        "success": b.success,
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
                let output = out.get("output").and_then(Value::as_str).unwrap_or("");
                let output = Event::Output {
                    output: output.to_string(),
                };
                write_event(conn, &output, b"").await.map_err(io)?;
                let (password, abort) = match read_follow(conn).await {
                    Some((Follow::Answer { password, abort }, _)) => (password, abort),
                    _ => (
                        None,
                        Some("the Ansible worker went away during become".into()),
                    ),
                };
                let mut fwd = serde_json::Map::new();
                if let Some(p) = password {
                    fwd.insert("password".into(), json!(p));
                }
                if let Some(a) = abort {
                    fwd.insert("abort".into(), json!(a));
                }
                if !fwd.is_empty() {
                    let payload = msg::encode(Value::Object(fwd).to_string().as_bytes(), b"");
                    tree.send_part(login, stream, Kind::Data, payload).await?;
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
