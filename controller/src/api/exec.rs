//! `exec` and `choose`: commands and modules, a pipelined module's AnsiballZ
//! sent as the members the agent lacks.

use super::*;

/// A command or module to run (`Request::Exec`).
pub(super) struct Exec<'a> {
    pub(super) to: &'a Target,
    pub(super) cmd: &'a str,
    pub(super) run: &'a protocol::RunIn,
}

pub(super) async fn exec(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    holdings: &Holdings,
    e: &Exec<'_>,
    stdin: &[u8],
) -> Result<(), ApiError> {
    let node = agent_for(tree, e.to).await?;
    let agent_req = json!({
        "op": "exec",
        "cmd": e.cmd,
        "isolation": e.run.isolation,
        "cwd": e.run.cwd,
    });
    let relays = relays_of(tree, e.to).await;
    let answer = exec_zipped(tree, holdings, node, &relays, |whole| {
        let behind = !relays.is_empty();
        let (fields, body, keys) =
            zip_form(holdings, node, behind, stdin, whole, &mut HashSet::new());
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
pub(super) async fn exec_zipped(
    tree: &TreeHandle,
    holdings: &Holdings,
    node: NodeId,
    relays: &[NodeId],
    mut build: impl FnMut(bool) -> (Value, Body, Vec<String>),
) -> Result<(Value, Vec<u8>), ApiError> {
    for whole in [false, true] {
        let (req, body, keys) = build(whole);
        let injected = body.injects();
        match exec_body(tree, holdings, node, relays, req, body).await {
            Err(ApiError::ZipMiss(_)) if !whole && !keys.is_empty() => {
                if injected {
                    tracing::warn!(%node, "a relay missed an entry its mirror held");
                    holdings.relay_reset(relays);
                }
            }
            other => {
                let answer = other?;
                for k in &keys {
                    holdings.set(node, k);
                }
                return Ok(answer);
            }
        }
    }
    Err(ApiError::failed("the agent missed the module's zip twice"))
}

/// An agent's answer to the glue, without the stream marker.
pub(super) async fn send_answer(
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
pub(super) fn zip_form(
    holdings: &Holdings,
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
    if !whole && holdings.has(node, &key) {
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
                    if !holdings.has(node, &mk) && sending.insert(mk.clone()) {
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
pub(super) const RELAY_ENTRY_BYTES_MAX: usize = 512 * 1024;

/// A request body in parts: bytes sent from here, and entries of the
/// agent's relay's cache that the relay injects (`Inject`), put into the
/// cache first if it does not hold them yet.
#[derive(Default)]
pub(super) struct Body {
    parts: Vec<Part>,
}

pub(super) enum Part {
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
pub(super) async fn send_body(
    tree: &TreeHandle,
    holdings: &Holdings,
    node: NodeId,
    relays: &[NodeId],
    mut req: Value,
    body: Body,
) -> Result<(StreamId, mpsc::Receiver<Frame>), ApiError> {
    let (Some(&relay), true) = (relays.last(), body.injects()) else {
        return send_request(tree, node, req, &body.flat()).await;
    };
    let size = body.len();
    let _held = holdings.lock_relays(relays).await;
    for part in &body.parts {
        if let Part::Cached(key, data) = part {
            ensure_cached(tree, holdings, relays, node, key, data).await?;
        }
    }
    // What a later put pushed out again goes from here.
    let mut sent = Body::default();
    for part in body.parts {
        match part {
            Part::Cached(key, _) if holdings.relay_holds(relay, &key) => {
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
        .await?;
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
    tree.send_part(node, stream, Kind::End, Vec::new()).await?;
    Ok((stream, rx))
}

/// Copy in one round trip (`Request::Choose`).
pub(super) struct Choose<'a> {
    pub(super) to: &'a Target,
    pub(super) path: &'a str,
    pub(super) checksum: Option<&'a str>,
    pub(super) run: &'a protocol::RunIn,
}

pub(super) async fn choose(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    holdings: &Holdings,
    c: &Choose<'_>,
    branches: [&protocol::Branch; 2],
    blob: Vec<u8>,
) -> Result<(), ApiError> {
    let n_same = branches[0].size as usize;
    let n_differs = branches[1].size as usize;
    let body = read_body(conn, blob, n_same.saturating_add(n_differs)).await?;
    let node = agent_for(tree, c.to).await?;
    let stdins = [&body[..n_same], &body[n_same..]];
    let relays = relays_of(tree, c.to).await;
    let answer = exec_zipped(tree, holdings, node, &relays, |whole| {
        let mut agent_req = json!({
            "op": "choose",
            "path": c.path,
            "checksum": c.checksum,
            "isolation": c.run.isolation,
            "cwd": c.run.cwd,
        });
        let mut out = Body::default();
        let mut keys = Vec::new();
        let mut sending = HashSet::new();
        for ((name, stdin), branch) in ["same", "differs"].iter().zip(stdins).zip(branches) {
            let (mut fields, part, key) = zip_form(
                holdings,
                node,
                !relays.is_empty(),
                stdin,
                whole,
                &mut sending,
            );
            fields.insert("cmd".into(), json!(branch.cmd));
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

pub(super) async fn exec_body(
    tree: &TreeHandle,
    holdings: &Holdings,
    node: NodeId,
    relays: &[NodeId],
    agent_req: Value,
    body: Body,
) -> Result<(Value, Vec<u8>), ApiError> {
    let (stream, mut rx) = send_body(tree, holdings, node, relays, agent_req, body).await?;
    gather_reply(tree, stream, &mut rx).await
}
