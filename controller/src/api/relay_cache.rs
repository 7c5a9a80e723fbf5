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
    tree.post_about(relay, dst, control::encode(&req))
        .await
        .map(|_| ())
        .map_err(ApiError::from)
}

pub(super) fn relay_cache_bytes() -> u64 {
    std::env::var("ARBOR_RELAY_CACHE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(RELAY_CACHE_BYTES_DEFAULT)
}

/// The relays an agent's frames pass, nearest the controller first.
pub(super) async fn relays_of(tree: &TreeHandle, t: &Target) -> Vec<NodeId> {
    let n = t.chain.len();
    if n < 2 {
        return Vec::new();
    }
    tree.ensure_path(&t.chain[..n - 1], HopRole::Relay, t.task.as_deref())
        .await
        .unwrap_or_default()
}

/// Makes sure the last of `relays` (a chain's relays, nearest first) holds
/// `key`, as the mirror plans it: from the nearest relay that holds it
/// (`Forward`), or put into the first relay and forwarded down, so the bytes
/// cross each link at most once. The caller holds the relays' locks. False
/// if the cache cannot keep it (then the caller sends the bytes itself).
/// `about` is the node the entry is put for (its frames and these requests
/// keep one order on a QUIC link).
pub(super) async fn ensure_cached(
    tree: &TreeHandle,
    holdings: &Holdings,
    relays: &[NodeId],
    about: NodeId,
    key: &str,
    data: &[u8],
) -> Result<bool, ApiError> {
    use arbor_core::cache::Step;
    use arbor_wire::control::{self, Request};
    let max_bytes = relay_cache_bytes();
    let Some(steps) = holdings.relay_plan(relays, key, data.len(), max_bytes) else {
        return Ok(false);
    };
    for step in steps {
        let (to, req) = match step {
            Step::Put { relay } => (
                relay,
                Request::CachePut {
                    key: key.to_string(),
                    data: data.to_vec(),
                    max_bytes,
                },
            ),
            Step::Forward { via, dst } => (
                via,
                Request::Forward {
                    dst,
                    keys: vec![key.to_string()],
                    max_bytes,
                },
            ),
        };
        tree.post_about(to, about, control::encode(&req)).await?;
    }
    Ok(true)
}
