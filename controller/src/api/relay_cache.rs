//! The relays' content caches from the daemon's side: what goes into which
//! relay (mirrored exactly) and injecting entries into an agent's request.

use super::*;

pub(super) async fn inject(
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

pub(super) fn relay_cache_bytes() -> u64 {
    std::env::var("ARBOR_RELAY_CACHE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(RELAY_CACHE_BYTES_DEFAULT)
}

/// The relays an agent's frames pass, nearest the controller first.
pub(super) async fn relays_of(tree: &TreeHandle, req: &Value) -> Vec<NodeId> {
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
pub(super) async fn ensure_cached(
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
