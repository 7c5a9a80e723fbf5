//! Requests answered by the target's agent itself: its hello, resets, pid
//! releases, agent calls; and finding the agent a request is for.

use super::*;

/// The agent's hello, with `"hops"`: every hop's hello (label, node,
/// connect time), first hop first, then the become agent's if asked for.
pub(super) async fn info(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    to: &Target,
) -> Result<(), ApiError> {
    let node = agent_for(tree, to).await?;
    let mut path = tree
        .ensure_path(&to.chain, HopRole::Agent, to.task.as_deref())
        .await?;
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
pub(super) async fn reset(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    host: &str,
) -> Result<(), ApiError> {
    let ended = tree.reset(host).await?;
    reply(conn, &protocol::Reset { ended }).await
}

/// A process of one of the target's become interpreters stands in the way
/// of a command (`userdel: user X is currently used by process N`): that
/// interpreter ends (awaited), and the next task that becomes X starts a
/// new one. Answers whether `pid` was one of arbor's.
pub(super) async fn release(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    to: &Target,
    pid: u64,
) -> Result<(), ApiError> {
    let login = login_agent(tree, to).await?;
    let node = tree.release_pid(login, pid).await?;
    if let Some(node) = node {
        let (stream, mut rx) =
            send_request(tree, login, json!({"op": "unbecome", "node": node.0}), b"").await?;
        gather_reply(tree, stream, &mut rx).await?;
    }
    let released = node.is_some();
    reply(conn, &protocol::Released { released }).await
}

/// One of the agent's own operations, its reply passed on.
pub(super) async fn agent_call(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    to: &Target,
    call: protocol::AgentCall,
    blob: Vec<u8>,
) -> Result<(), ApiError> {
    let node = agent_for(tree, to).await?;
    let (stream, mut rx) = send_request(tree, node, Value::Object(call.0), &blob).await?;
    let (v, out) = gather_reply(tree, stream, &mut rx).await?;
    send_chunked(conn, v, &out).await
}

/// A call nobody waits for: failures here surface on the next call.
pub(super) async fn call_noreply(
    tree: &TreeHandle,
    to: &Target,
    call: protocol::AgentCall,
    blob: Vec<u8>,
) {
    let Ok(node) = agent_for(tree, to).await else {
        return;
    };
    let mut agent_req = Value::Object(call.0);
    agent_req["noreply"] = json!(true);
    if let Ok(stream) = tree.post(node, first_frame(agent_req, &blob)).await {
        let _ = rest_of_body(tree, node, stream, &blob).await;
    }
}

/// The agent a request is for: the target's login agent, or the nested
/// agent its `"become": {"key"}` names, which must be up.
pub(super) async fn agent_for(tree: &TreeHandle, to: &Target) -> Result<NodeId, ApiError> {
    let login = login_agent(tree, to).await?;
    let Some(key) = become_key(to) else {
        return Ok(login);
    };
    match tree.become_slot(login, &key, "", false).await? {
        Some(BecomeSlot::Ready(node)) => Ok(node),
        _ => Err(ApiError::BecomeNeeded(
            "the become interpreter is not up".into(),
        )),
    }
}

pub(super) async fn login_agent(tree: &TreeHandle, to: &Target) -> Result<NodeId, ApiError> {
    tree.ensure(&to.chain, HopRole::Agent, to.task.as_deref())
        .await
        .map_err(ApiError::from)
}

/// `arbor status`: the daemon's life, every node's hello with its age, and
/// each relay's cache use. Names, pids and sizes only.
pub(super) async fn status(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    holdings: &Holdings,
    life: &Life,
) -> Result<(), ApiError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cache: std::collections::HashMap<u32, (usize, usize)> = holdings
        .relay_cache_use()
        .into_iter()
        .map(|(n, b, e)| (n.0, (b, e)))
        .collect();
    let traffic = tree.traffic().await;
    let mut hops: Vec<Value> = tree
        .hellos()
        .lock()
        .map(|h| h.values().cloned().collect())
        .unwrap_or_default();
    hops.sort_by_key(|h| h.get("node").and_then(Value::as_u64).unwrap_or(0));
    let hops: Vec<Value> = hops
        .into_iter()
        .map(|h| {
            let node = h.get("node").and_then(Value::as_u64).unwrap_or(0);
            let since = h.get("up_since").and_then(Value::as_u64).unwrap_or(now);
            let mut v = json!({"node": node, "label": h.get("label"), "pid": h.get("pid"),
                               "python": h.get("python"), "machine": h.get("machine"),
                               "age_s": now.saturating_sub(since)});
            if let Some(t) = traffic.get(&NodeId(node as u32)) {
                v["sent_bytes"] = json!(t.sent);
                v["received_bytes"] = json!(t.received);
            }
            if let Some((bytes, entries)) = cache.get(&(node as u32)) {
                v["cache"] = json!({"bytes": bytes, "entries": entries});
            }
            v
        })
        .collect();
    let v = json!({
        "pid": std::process::id(),
        "uptime_s": life.uptime().as_secs(),
        "idle_s": life.idle_for(1).as_secs(),
        "idle_limit_s": life.idle_bound().map(|d| d.as_secs()),
        // Runs connected, this one aside.
        "connections": life.connections().saturating_sub(1),
        "hops": hops,
    });
    write_message(conn, &v, b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))
}
