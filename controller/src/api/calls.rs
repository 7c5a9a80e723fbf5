//! Requests answered by the target's agent itself: its hello, resets, pid
//! releases, agent calls; and finding the agent a request is for.

use super::*;

/// The agent's hello, with `"hops"`: every hop's hello (label, node,
/// connect time), first hop first, then the become agent's if asked for.
pub(super) async fn info(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    req: &Value,
) -> Result<(), ApiError> {
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
pub(super) async fn reset(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    req: &Value,
) -> Result<(), ApiError> {
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
pub(super) async fn release(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    req: &Value,
) -> Result<(), ApiError> {
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
pub(super) const CALL_OPS: &[&str] = &["stat", "mkdtemp", "rmtree", "chmod", "sync", "ping"];

pub(super) fn agent_call(req: &Value) -> Result<Value, ApiError> {
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

pub(super) async fn call(
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
pub(super) async fn call_noreply(tree: &TreeHandle, req: &Value, blob: Vec<u8>) {
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
pub(super) struct Target {
    pub(super) chain: Vec<Hop>,
    /// The Ansible task asking (its uuid): a hop that failed during it
    /// fails again at once; for another task it is connected again.
    #[serde(default)]
    pub(super) task: Option<String>,
}

/// The agent a request is for: the target's login agent, or the nested
/// agent its `"become": {"key"}` names, which must be up.
pub(super) async fn agent_for(tree: &TreeHandle, req: &Value) -> Result<NodeId, ApiError> {
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
        _ => Err(ApiError::BecomeNeeded(
            "the become interpreter is not up".into(),
        )),
    }
}

pub(super) async fn login_agent(tree: &TreeHandle, req: &Value) -> Result<NodeId, ApiError> {
    let t: Target = serde_json::from_value(req.clone())
        .map_err(|e| ApiError::failed(format!("bad chain: {e}")))?;
    tree.ensure(&t.chain, HopRole::Agent, t.task.as_deref())
        .await
        .map_err(ApiError::unreachable)
}
