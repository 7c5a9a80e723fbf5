//! `put`, `fetch` and `pipe`: files both ways, paced by the receiver's credit
//! window, and commands whose stdin and output stream.

use super::*;

pub(super) async fn put(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    holdings: &Holdings,
    p: &protocol::Put,
    first: Vec<u8>,
) -> Result<(), ApiError> {
    let size = p.size;
    // Connect first, but read the whole body even if that fails, so the
    // connection stays in step with the glue.
    let node = agent_for(tree, &p.to).await;
    let mut agent_req = json!({"op": "put", "path": p.path, "size": size, "streamed": true});
    if let Some(mode) = &p.mode {
        agent_req["mode"] = mode.clone();
    }
    let posted = p.noreply;
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
                    let relays = relays_of(tree, &p.to).await;
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
                Err(e) => Err(ApiError::from(e)),
            }
        }
        Err(e) => Err(e.clone()),
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
                o.send(tree, holdings, chunk).await?;
            }
        }
        if last {
            break;
        }
        match read_follow(conn).await {
            Some((Follow::Data, part)) => {
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
    tree.send_part(node, stream, Kind::End, Vec::new()).await?;
    put_answer(conn, tree, stream, &mut rx, posted).await
}

/// A put's end: nothing if the glue does not wait for it, else the agent's
/// answer passed on.
pub(super) async fn put_answer(
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
pub(super) const FILE_CACHE_SHARE: u64 = 4;

/// Most bytes of one stream's data in flight beyond what its receiver has
/// consumed (`ARBOR_STREAM_WINDOW_BYTES`).
pub(super) const STREAM_WINDOW_BYTES_DEFAULT: u64 = 1 << 20;

/// A stream's credit window (`arbor_core::window`), fed the credit the
/// tree routes to it.
pub(super) struct Window {
    consumed: tokio::sync::watch::Receiver<u64>,
    rules: arbor_core::window::Window,
}

/// Default of `ARBOR_STREAM_STALL_SECS`: how long a full window may wait
/// for its receiver (an agent that is stopped, or a disk that hangs).
pub(super) const STREAM_STALL_SECS_DEFAULT: u64 = 300;

impl Window {
    pub(super) fn new(consumed: tokio::sync::watch::Receiver<u64>) -> Window {
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
            rules: arbor_core::window::Window::new(size, Duration::from_secs(stall)),
        }
    }

    /// Waits until `len` more bytes fit. False if the receiver dropped the
    /// stream (it failed, and says why in its answer).
    pub(super) async fn reserve(&mut self, len: usize) -> Result<bool, ApiError> {
        use arbor_core::window::Reserve;
        loop {
            let now = std::time::Instant::now();
            self.rules.credit(now, *self.consumed.borrow_and_update());
            match self.rules.reserve(now, len) {
                Reserve::Go => return Ok(true),
                Reserve::Dropped => return Ok(false),
                Reserve::Stalled(stall) => {
                    return Err(ApiError::failed(format!(
                        "the agent took none of the file for {} s (ARBOR_STREAM_STALL_SECS): \
                         it is stopped or its disk hangs",
                        stall.as_secs()
                    )))
                }
                Reserve::Wait => {
                    let until = self.rules.poll_timeout().unwrap_or(now);
                    let changed = self.consumed.changed();
                    match tokio::time::timeout_at(until.into(), changed).await {
                        Ok(Ok(())) | Err(_) => {}
                        Ok(Err(_)) => return Ok(false),
                    }
                }
            }
        }
    }
}

/// A file on its way to an agent.
pub(super) struct Outgoing {
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
        holdings: &Holdings,
        chunk: Vec<u8>,
    ) -> Result<(), ApiError> {
        if self.dropped || !self.window.reserve(chunk.len()).await? {
            self.dropped = true;
            return Ok(());
        }
        if let Some(&relay) = self.relays.last() {
            let key = format!("f:{}", hex(&Sha256::digest(&chunk)));
            let _held = holdings.lock_relays(&self.relays).await;
            if ensure_cached(tree, holdings, &self.relays, self.node, &key, &chunk).await? {
                let mut keys = vec![key];
                return inject(tree, relay, self.node, self.stream, &mut keys).await;
            }
        }
        tree.send_part(self.node, self.stream, Kind::Data, chunk)
            .await
            .map_err(ApiError::from)
    }
}

pub(super) async fn fetch(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    to: &Target,
    path: &str,
) -> Result<(), ApiError> {
    let node = agent_for(tree, to).await?;
    let agent_req = json!({"op": "fetch", "path": path});
    let (_stream, mut rx) = send_request(tree, node, agent_req, b"").await?;
    let (v, first) = first_reply(&mut rx).await?;
    let streamed = v.get("streamed").and_then(Value::as_bool) == Some(true);
    let io = |e: std::io::Error| ApiError::failed(e.to_string());
    let size = v.get("size").cloned().unwrap_or(Value::Null);
    let head = serde_json::to_value(protocol::FetchHead { size, streamed })
        .map_err(|e| ApiError::failed(e.to_string()))?;
    write_message(conn, &head, &first).await.map_err(io)?;
    if streamed {
        while let Some(part) = next_part(&mut rx, "the agent's file was cut off").await? {
            let data = Event::Data { fd: None };
            write_event(conn, &data, &part).await.map_err(io)?;
        }
        write_event(conn, &Event::End, b"").await.map_err(io)?;
    }
    Ok(())
}

/// A command with stdin and output streaming both ways (rsync's --rsh).
pub(super) async fn pipe(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    to: &Target,
    cmd: &str,
    pty: Option<protocol::Pty>,
) -> Result<(), ApiError> {
    let node = agent_for(tree, to).await?;
    let agent_req = json!({"op": "pipe", "cmd": cmd, "pty": pty});
    let (stream, mut rx) = send_request(tree, node, agent_req, b"").await?;
    first_reply(&mut rx).await?;
    let (mut rd, mut wr) = conn.split();
    // Ends with true if the glue went away (the command is then hung up
    // on, as sshd does when its client goes), false at the end of stdin.
    let upstream = async {
        loop {
            match read_follow(&mut rd).await {
                Some((Follow::Data, blob)) => {
                    if send_data(tree, node, stream, &blob).await.is_err() {
                        return false;
                    }
                }
                Some((Follow::Resize { rows, cols }, _)) => {
                    let req = json!({"op": "resize", "pipe": stream, "rows": rows, "cols": cols,
                                     "noreply": true});
                    if tree.post(node, first_frame(req, b"")).await.is_err() {
                        return false;
                    }
                }
                Some((Follow::End, _)) => {
                    let _ = tree.send_part(node, stream, Kind::End, Vec::new()).await;
                    return false;
                }
                Some((Follow::Answer { .. }, _)) => {}
                None => {
                    let req = json!({"op": "hangup", "pipe": stream, "noreply": true});
                    let _ = tree.post(node, first_frame(req, b"")).await;
                    return true;
                }
            }
        }
    };
    let downstream = async {
        let io = |e: std::io::Error| ApiError::failed(e.to_string());
        while let Some(part) = next_part(&mut rx, "the tree closed during the command").await? {
            let (j, blob) = msg::split(&part).map_err(|e| ApiError::failed(e.to_string()))?;
            let v: Value =
                serde_json::from_slice(j).map_err(|e| ApiError::failed(e.to_string()))?;
            let event = match v.get("rc") {
                Some(rc) => Event::Exit {
                    rc: rc.as_i64().unwrap_or(-1),
                },
                None => Event::Data {
                    fd: Some(v.get("fd").and_then(Value::as_u64).unwrap_or(1) as u8),
                },
            };
            write_event(&mut wr, &event, blob).await.map_err(io)?;
        }
        Ok(())
    };
    tokio::pin!(upstream);
    tokio::pin!(downstream);
    // Once the command has ended, its stdin is of no more use.
    let down = tokio::select! {
        d = &mut downstream => d,
        gone = &mut upstream => if gone { Ok(()) } else { downstream.await },
    };
    tree.forget(stream).await;
    down
}
