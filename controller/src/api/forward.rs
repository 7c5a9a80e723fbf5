//! `forward` (arbor_forward): the target's agent listens on its loopback or
//! a private UNIX socket, and each connection made to it is carried through
//! the tree to `connect` here on the controller. The forward lasts as long
//! as the glue's connection that asked for it: the task that declared it
//! ends, or its worker dies (Ctrl+C), and the agent is told to hang up.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::*;

/// Connections carried at once by one forward; past it, the agent is told
/// to close the newcomer.
pub(super) const FORWARD_CONNS_MAX: usize = 256;

/// Where the controller's end of a forward connects.
#[derive(Clone, Debug)]
enum Dest {
    Tcp(String),
    Unix(std::path::PathBuf),
}

impl Dest {
    fn parse(spec: &str) -> Result<Dest, ApiError> {
        if spec.starts_with('/') {
            return Ok(Dest::Unix(spec.into()));
        }
        match spec.rsplit_once(':') {
            Some((_, port)) if port.parse::<u16>().is_ok() => Ok(Dest::Tcp(spec.to_string())),
            _ if spec.parse::<u16>().is_ok() => Ok(Dest::Tcp(format!("127.0.0.1:{spec}"))),
            _ => Err(ApiError::failed(format!(
                "forward: connect {spec:?} is neither HOST:PORT, PORT nor a /path"
            ))),
        }
    }
}

pub(super) async fn forward(
    conn: &mut UnixStream,
    tree: &TreeHandle,
    to: &Target,
    listen: &str,
    connect: &str,
) -> Result<(), ApiError> {
    let dest = Dest::parse(connect)?;
    let node = agent_for(tree, to).await?;
    let req = json!({"op": "listen", "listen": listen});
    let (listener, mut rx) = tree
        .open(node, msg::encode(req.to_string().as_bytes(), b""))
        .await?;
    let (v, _) = first_reply(&mut rx)
        .await
        .map_err(|e| ApiError::failed(format!("{}: forward {listen}: {e}", to.host())))?;
    let head = json!({"listening": v.get("listening"), "connect": connect});
    write_message(conn, &head, b"")
        .await
        .map_err(|e| ApiError::failed(e.to_string()))?;
    tracing::info!(host = to.host(), listen, connect, "forward up");
    let mut conns = JoinSet::new();
    // Told to every connection when the forward ends: each forgets its stream.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let ended = loop {
        tokio::select! {
            // Nothing more is said on this connection: it ending ends the forward.
            _ = read_follow(conn) => break Ok(()),
            part = next_part(&mut rx, "the tree closed the forward") => match part {
                Ok(Some(p)) => {
                    let id = msg::split(&p)
                        .ok()
                        .and_then(|(j, _)| serde_json::from_slice::<Value>(j).ok())
                        .and_then(|v| v.get("accepted").cloned());
                    let Some(id) = id else { continue };
                    if conns.len() >= FORWARD_CONNS_MAX {
                        drop_conn(tree, node, listener, &id).await;
                        continue;
                    }
                    let at = Conn { tree: tree.clone(), node, listener, id };
                    conns.spawn(carry(at, dest.clone(), stopped.clone()));
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    };
    let req = json!({"op": "hangup", "pipe": listener, "noreply": true});
    let _ = tree.post(node, first_frame(req, b"")).await;
    tree.forget(listener).await;
    let _ = stop.send(true);
    while conns.join_next().await.is_some() {}
    tracing::info!(host = to.host(), listen, "forward down");
    ended
}

/// An accepted connection: the agent's node, its listener's stream, its id.
struct Conn {
    tree: TreeHandle,
    node: NodeId,
    listener: StreamId,
    id: Value,
}

async fn drop_conn(tree: &TreeHandle, node: NodeId, listener: StreamId, id: &Value) {
    let req = json!({"op": "fwd_close", "listener": listener, "conn": id, "noreply": true});
    let _ = tree.post(node, first_frame(req, b"")).await;
}

/// One accepted connection: `dest` here, joined to the agent's socket,
/// until both ends have ended or the forward stops.
async fn carry(at: Conn, dest: Dest, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let Conn {
        tree,
        node,
        listener,
        id,
    } = at;
    let connected = tokio::select! {
        c = connect(&dest) => c,
        _ = stopped.wait_for(|s| *s) => return,
    };
    let sock = match connected {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(?dest, error = %e, "forward: connecting here failed");
            return drop_conn(&tree, node, listener, &id).await;
        }
    };
    let req = json!({"op": "fwd_conn", "listener": listener, "conn": id});
    // Opened, the stream is forgotten whatever happens next.
    let Ok((stream, mut rx, credit)) = tree
        .open_credited(node, msg::encode(req.to_string().as_bytes(), b""))
        .await
    else {
        return;
    };
    tokio::select! {
        _ = join(&tree, node, stream, &mut rx, credit, sock) => {}
        _ = stopped.wait_for(|s| *s) => {}
    }
    tree.forget(stream).await;
}

async fn connect(dest: &Dest) -> std::io::Result<Box<dyn Duplex>> {
    Ok(match dest {
        Dest::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
        Dest::Unix(p) => Box::new(UnixStream::connect(p).await?),
    })
}

/// Joins the agent's side (`stream`) and the socket here, both ways.
async fn join(
    tree: &TreeHandle,
    node: NodeId,
    stream: StreamId,
    rx: &mut mpsc::Receiver<Frame>,
    credit: tokio::sync::watch::Receiver<u64>,
    sock: Box<dyn Duplex>,
) {
    if first_reply(rx).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = tokio::io::split(sock);
    let mut window = Window::new(credit);
    let up = async {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = rd.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                let _ = tree.send_part(node, stream, Kind::End, Vec::new()).await;
                return;
            }
            if !matches!(window.reserve(n).await, Ok(true))
                || tree
                    .send_part(node, stream, Kind::Data, buf[..n].to_vec())
                    .await
                    .is_err()
            {
                return;
            }
        }
    };
    // What the agent sends is credited as it is written here: it keeps at
    // most its window unwritten.
    let down = async {
        let mut written = 0u64;
        while let Ok(Some(part)) = next_part(rx, "the tree closed the forward").await {
            if wr.write_all(&part).await.is_err() {
                return;
            }
            written += part.len() as u64;
            let credit = written.to_le_bytes().to_vec();
            if tree
                .send_part(node, stream, Kind::Credit, credit)
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(up, down);
}

trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controllers_end_is_a_port_an_address_or_a_path() {
        assert!(matches!(Dest::parse("3128"), Ok(Dest::Tcp(a)) if a == "127.0.0.1:3128"));
        assert!(matches!(Dest::parse("proxy.lan:3128"), Ok(Dest::Tcp(a)) if a == "proxy.lan:3128"));
        assert!(matches!(Dest::parse("[::1]:80"), Ok(Dest::Tcp(_))));
        assert!(matches!(Dest::parse("/run/proxy.sock"), Ok(Dest::Unix(_))));
        for bad in ["", "proxy.lan", "host:http", "70000"] {
            assert!(Dest::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
