//! A module's AnsiballZ script put in a task's temp dir (Ansible's path
//! with pipelining off: put `AnsiballZ_x.py`, then run `python3 FILE`).
//! It goes to the agent in the form a pipelined module's script takes
//! (`zip_form`): without the zip the agent already holds, or with only the
//! zip members it lacks. The agent writes the file byte for byte as it was.
//!
//! If the agent no longer holds what it was told it does, it writes
//! nothing and the `exec` of that file answers `zip_miss`; the lane then
//! puts the script again whole (kept here until the next put) and runs
//! the command once more.

use std::collections::HashSet;

use serde_json::json;
use tokio::net::UnixStream;

use super::protocol::{Put, Target};
use super::{
    agent_for, put_answer, read_body, relays_of, send_body, send_request, zip_form, ApiError,
    Holdings,
};
use crate::tree::TreeHandle;

/// Largest script sent so; a bigger one is put as any file.
const MODULE_PUT_BYTES_MAX: u64 = 16 << 20;

/// The last module script this lane put, for a put again after a miss.
pub struct LastPut {
    path: String,
    to: Target,
    script: Vec<u8>,
}

/// Whether a put is a module's script: `…/AnsiballZ_*.py`, not too big,
/// and not to be kept byte for byte (`exact`: keep_remote_files).
pub fn is_module_put(p: &Put) -> bool {
    let name = p.path.rsplit('/').next().unwrap_or("");
    !p.exact
        && name.starts_with("AnsiballZ_")
        && name.ends_with(".py")
        && p.size <= MODULE_PUT_BYTES_MAX
}

/// Puts a module's script (see the module's header).
pub async fn put_module(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    holdings: &Holdings,
    p: Put,
    first: Vec<u8>,
    last: &mut Option<LastPut>,
) -> Result<(), ApiError> {
    let size = p.size as usize;
    let script = read_body(conn, first, size).await?;
    let node = agent_for(tree, &p.to).await?;
    let relays = relays_of(tree, &p.to).await;
    let (fields, body, keys) = zip_form(
        holdings,
        node,
        !relays.is_empty(),
        &script,
        false,
        &mut HashSet::new(),
    );
    let posted = p.noreply;
    let mut agent_req = json!({"op": "put", "path": p.path, "size": size, "noreply": posted});
    if let Some(mode) = &p.mode {
        agent_req["mode"] = mode.clone();
    }
    for (k, v) in fields {
        agent_req[k] = v;
    }
    *last = Some(LastPut {
        path: p.path,
        to: p.to,
        script,
    });
    let (stream, mut rx) = send_body(tree, holdings, node, &relays, agent_req, body).await?;
    // The agent keeps what it was sent even if its put fails later.
    for k in &keys {
        holdings.set(node, k);
    }
    put_answer(conn, tree, stream, &mut rx, posted).await
}

/// After an `exec` of `cmd` answered `zip_miss`: if it runs the script this
/// lane put last, puts it again whole (the agent writes it as any file) and
/// says to run the command again.
pub async fn put_again(tree: &TreeHandle, cmd: &str, last: &Option<LastPut>) -> bool {
    let Some(last) = last else {
        return false;
    };
    if last.path.is_empty() || !cmd.contains(&last.path) {
        return false;
    }
    let Ok(node) = agent_for(tree, &last.to).await else {
        return false;
    };
    let req = json!({"op": "put", "path": last.path, "size": last.script.len(), "noreply": true});
    match send_request(tree, node, req, &last.script).await {
        Ok((stream, _rx)) => {
            tree.forget(stream).await;
            tracing::debug!(path = %last.path, "a module script put again whole after a miss");
            true
        }
        Err(_) => false,
    }
}
