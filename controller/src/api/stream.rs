//! A request's body and reply as frames of one stream: reading the rest of a
//! body from the glue, sending it on, gathering the reply.

use super::*;

/// Reads the rest of a request body sent in data messages, up to `size`.
pub(super) async fn read_body(
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
        match read_follow(conn).await {
            Some((Follow::Data, part)) => body.extend(part),
            _ => return Err(ApiError::failed("request body ended early")),
        }
    }
    Ok(body)
}

/// A request's first frame: its JSON and the first chunk of its body,
/// marked "streamed" if more of the body follows (see [`rest_of_body`]).
pub(super) fn first_frame(req: Value, body: &[u8]) -> Vec<u8> {
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
pub(super) async fn rest_of_body(
    tree: &TreeHandle,
    node: NodeId,
    stream: StreamId,
    body: &[u8],
) -> Result<(), ApiError> {
    if body.len() > CHUNK_BYTES {
        send_data(tree, node, stream, &body[CHUNK_BYTES..]).await?;
        tree.send_part(node, stream, Kind::End, Vec::new()).await?;
    }
    Ok(())
}

/// Sends `data` on `stream` as Data frames of at most one chunk each.
pub(super) async fn send_data(
    tree: &TreeHandle,
    node: NodeId,
    stream: StreamId,
    data: &[u8],
) -> Result<(), ApiError> {
    for part in data.chunks(CHUNK_BYTES) {
        tree.send_part(node, stream, Kind::Data, part.to_vec())
            .await?;
    }
    Ok(())
}

/// Sends a request to an agent, its body streamed in chunks if large.
pub(super) async fn send_request(
    tree: &TreeHandle,
    node: NodeId,
    req: Value,
    body: &[u8],
) -> Result<(StreamId, mpsc::Receiver<Frame>), ApiError> {
    let (stream, rx) = tree.open(node, first_frame(req, body)).await?;
    rest_of_body(tree, node, stream, body).await?;
    Ok((stream, rx))
}

/// The agent's reply: its JSON, and its whole blob (gathered if streamed).
pub(super) async fn gather_reply(
    tree: &TreeHandle,
    stream: StreamId,
    rx: &mut mpsc::Receiver<Frame>,
) -> Result<(Value, Vec<u8>), ApiError> {
    let (v, mut blob) = first_reply(rx).await?;
    if v.get("streamed").and_then(Value::as_bool) == Some(true) {
        while let Some(part) = next_part(rx, "the agent's reply was cut off").await? {
            if blob.len() + part.len() > OUTPUT_BYTES_MAX {
                tree.forget(stream).await;
                return Err(ApiError::failed(format!(
                    "output over {OUTPUT_BYTES_MAX} bytes"
                )));
            }
            blob.extend(part);
        }
    }
    Ok((v, blob))
}

/// The next part of a streamed reply: its bytes, or None at its end. A
/// failure frame, or the tree closing the stream (`cut`), is the hop's loss.
pub(super) async fn next_part(
    rx: &mut mpsc::Receiver<Frame>,
    cut: &str,
) -> Result<Option<Vec<u8>>, ApiError> {
    let Some(f) = rx.recv().await else {
        return Err(ApiError::unreachable(cut));
    };
    match f.kind {
        Kind::Data => Ok(Some(f.payload)),
        Kind::End => Ok(None),
        _ => Err(ApiError::unreachable(
            String::from_utf8_lossy(&f.payload).into_owned(),
        )),
    }
}

pub(super) async fn first_reply(
    rx: &mut mpsc::Receiver<Frame>,
) -> Result<(Value, Vec<u8>), ApiError> {
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
        let err = err.to_string();
        if v.get("zip_miss").and_then(Value::as_bool) == Some(true) {
            return Err(ApiError::ZipMiss(err));
        }
        return Err(ApiError::Failed(err));
    }
    Ok((v, blob.to_vec()))
}

/// Replies to the glue, splitting a large blob into data messages.
pub(super) async fn send_chunked(
    conn: &mut UnixStream,
    mut v: Value,
    blob: &[u8],
) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::failed(e.to_string());
    let part = MESSAGE_BYTES_MAX / 2;
    v["size"] = json!(v.get("size").cloned().unwrap_or(json!(blob.len())));
    v["blob_size"] = json!(blob.len());
    write_message(conn, &v, &blob[..blob.len().min(part)])
        .await
        .map_err(io)?;
    if blob.len() > part {
        for p in blob[part..].chunks(part) {
            write_event(conn, &Event::Data { fd: None }, p)
                .await
                .map_err(io)?;
        }
    }
    Ok(())
}
