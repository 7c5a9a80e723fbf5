//! The relay's side of QUIC links: a parent link (`Request::QuicListen`:
//! the endpoint, its offer answered over the ssh channel, the parent's
//! connection taken as the parent link's writer) and a child relay's link
//! (`Request::QuicConnect`: this relay connects, as the daemon does to a
//! first hop), and each frame's lane.

use arbor_io::LinkEvent;
use arbor_wire::control::{self, Reply};
use arbor_wire::{Frame, Kind, NodeId};
use tokio::sync::mpsc;

/// The address this host's sshd was reached at (`SSH_CONNECTION`'s third
/// field), parsed without any name lookup.
#[cfg_attr(not(feature = "quic"), allow(dead_code))]
fn sshd_address() -> Option<std::net::IpAddr> {
    let conn = std::env::var("SSH_CONNECTION").ok()?;
    conn.split_whitespace().nth(2)?.parse().ok()
}

/// Opens the endpoint and answers with its offer; the parent's connection,
/// once it proves the secret, becomes the parent link's writer
/// ([`LinkEvent::Upgraded`]).
#[cfg(feature = "quic")]
pub fn listen(inbox: mpsc::Sender<LinkEvent>, accept_ms: u32, idle_ms: u32) -> Reply {
    use std::time::Duration;
    let ip = sshd_address();
    let any = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    let idle = Duration::from_millis(u64::from(idle_ms));
    let (listener, mut offer) = match arbor_io::quic::listen(ip.unwrap_or(any), idle) {
        Ok(l) => l,
        Err(message) => return Reply::Error { message },
    };
    offer.ip = ip.map(|a| a.to_string());
    let window = Duration::from_millis(u64::from(accept_ms));
    tokio::spawn(async move {
        match listener.accept(window).await {
            Ok((endpoint, conn)) => {
                let tx = arbor_io::quic::spawn_lanes(
                    endpoint,
                    conn,
                    false,
                    arbor_io::quic::Toward::Parent,
                    arbor_io::PARENT_QUEUE_BYTES,
                    inbox.clone(),
                    arbor_core::relay::PARENT,
                );
                let up = LinkEvent::Upgraded(arbor_core::relay::PARENT, tx, String::new());
                let _ = inbox.send(up).await;
            }
            // The parent's attempt failed too: the link stays on ssh.
            Err(why) => eprintln!("arbor-relay: {why}"),
        }
    });
    Reply::QuicOffer(offer)
}

/// Connects to the endpoint of the relay on child `link` (its `offer`);
/// the link's frames then go over it ([`LinkEvent::Upgraded`]), or it
/// stays on ssh ([`LinkEvent::NotUpgraded`], with why).
#[cfg(feature = "quic")]
pub fn connect(
    inbox: mpsc::Sender<LinkEvent>,
    link: arbor_core::LinkId,
    offer: arbor_wire::control::QuicOffer,
    timeout_ms: u32,
    idle_ms: u32,
) {
    use std::time::Duration;
    tokio::spawn(async move {
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let idle = Duration::from_millis(u64::from(idle_ms));
        // No name lookup here: the child said where its sshd was reached.
        let addr = offer
            .ip
            .as_deref()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| std::net::SocketAddr::new(ip, offer.port));
        let event = match addr {
            None => LinkEvent::NotUpgraded(link, "the relay gave no address".into()),
            Some(addr) => {
                let to = inbox.clone();
                match arbor_io::quic::connect_child(addr, &offer, timeout, idle, to, link).await {
                    Ok(tx) => LinkEvent::Upgraded(link, tx, format!("QUIC {addr}")),
                    Err(why) => LinkEvent::NotUpgraded(link, why),
                }
            }
        };
        let _ = inbox.send(event).await;
    });
}

#[cfg(not(feature = "quic"))]
pub fn connect(
    inbox: mpsc::Sender<LinkEvent>,
    link: arbor_core::LinkId,
    _offer: arbor_wire::control::QuicOffer,
    _timeout_ms: u32,
    _idle_ms: u32,
) {
    let why = "this relay is built without QUIC".to_string();
    let _ = inbox.try_send(LinkEvent::NotUpgraded(link, why));
}

#[cfg(not(feature = "quic"))]
pub fn listen(_inbox: mpsc::Sender<LinkEvent>, _accept_ms: u32, _idle_ms: u32) -> Reply {
    Reply::Error {
        message: "this relay is built without QUIC".into(),
    }
}

/// The lane of a frame going up: that of the child subtree it comes from
/// (or, for this relay's answer about a child, that child's), so one
/// host's frames never wait behind another's.
pub fn lane_up(rules: &arbor_core::relay::Relay, f: &Frame) -> Option<u32> {
    let subject = if f.src == rules.id() {
        about(f)?
    } else {
        f.src
    };
    rules.route(subject).map(|link| link.0)
}

/// The child a relay's reply is about.
fn about(f: &Frame) -> Option<NodeId> {
    if f.kind != Kind::Reply {
        return None;
    }
    match control::decode::<Reply>(&f.payload).ok()? {
        Reply::Spawned { node, .. } | Reply::Failed { node, .. } => Some(node),
        _ => None,
    }
}
