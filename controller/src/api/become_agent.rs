//! `become`: a nested agent under another account, started once per target
//! and become settings with the become plugin's own command, its prompts
//! relayed to the glue.

use super::*;

/// The become interpreter a request names: the glue's key (plugin, user,
/// exe, flags) and, if the task gives a become password, a digest of it
/// under a secret of this daemon's. So a task with another password (a
/// wrong one) gets an interpreter of its own, started with that password,
/// which the become tool then checks as it does for vanilla on every task.
pub(super) fn become_key(req: &Value) -> Option<String> {
    let b = req.get("become")?;
    let key = b.get("key")?.as_str()?;
    Some(match b.get("pass").and_then(Value::as_str) {
        Some(pass) if !pass.is_empty() => format!("{key}|pass:{}", password_digest(pass)),
        _ => key.to_string(),
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

/// Starts the nested agent a request's `become` names, unless it is up or
/// another caller is starting it (then waits for that).
pub(super) async fn become_agent(
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
            let labelled = outcome.map_err(|e| e.labelled(&label));
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
    write_message(conn, &json!({ "node": node.0, "log": log }), b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
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
