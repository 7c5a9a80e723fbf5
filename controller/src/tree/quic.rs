//! A relay's link moved to QUIC (`arbor_transport: quic`): once the relay
//! is up over ssh, it is asked to listen (`QuicListen`), its offer comes
//! back over ssh, and its parent connects, pinning the certificate and
//! proving the secret: the daemon for a first hop, else the relay before
//! it, asked with `QuicConnect`. Until then the hop is not settled, so
//! nothing else is sent to that relay but its keepalive and pings. If QUIC
//! does not get through within [`CONNECT_TIMEOUT`], the hop stays on ssh
//! and its `-vvv` line says why. Either way ssh stays the control channel:
//! when it goes, the relay and its endpoint go.
//!
//! Frames to an upgraded link go in lanes, one per child subtree of its
//! relay: a frame's lane is the child of the relay it is for (a request
//! to the relay about a child, that child's), so a lost packet or a long
//! transfer for one host does not hold up another's frames.

use super::*;
use arbor_wire::control::QuicOffer;

/// How long the daemon tries to reach a relay's endpoint before the hop
/// stays on ssh (README, "QUIC hops").
#[cfg_attr(not(feature = "quic"), allow(dead_code))]
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the relay's endpoint waits for the daemon (past the daemon's
/// own bound).
const ACCEPT_WINDOW: Duration = Duration::from_secs(10);

/// Links moving to QUIC, and those that have.
#[derive(Default)]
pub(super) struct Upgrades {
    /// Relays started with `arbor_transport: quic`, until they are up.
    wanted: HashSet<NodeId>,
    /// A `QuicListen` request's stream, and the relay asked.
    asked: HashMap<StreamId, NodeId>,
    /// Relays whose upgrade is under way, by their ssh link.
    connecting: HashMap<LinkId, NodeId>,
    /// A `QuicConnect` request's stream, the relay below whose link it
    /// moves, and the endpoint's address.
    below: HashMap<StreamId, (NodeId, String)>,
    /// Links whose frames go over QUIC, and the relay at their far end.
    lanes: HashMap<LinkId, NodeId>,
    /// Requests to a relay over QUIC about a node below it (see
    /// `TreeHandle::post_about`), until sent: at most one frame each.
    about: HashMap<StreamId, NodeId>,
}

impl Upgrades {
    pub(super) fn want(&mut self, node: NodeId) {
        self.wanted.insert(node);
    }

    /// `node`'s link is moving to QUIC: its hop is settled when it has
    /// (a relay below the first hop must not be sent anything first).
    pub(super) fn pending(&self, node: NodeId) -> bool {
        self.wanted.contains(&node)
            || self.asked.values().any(|n| *n == node)
            || self.below.values().any(|(n, _)| *n == node)
    }

    /// `node` is gone: its upgrade with it.
    pub(super) fn forget(&mut self, node: NodeId) {
        self.wanted.remove(&node);
        self.asked.retain(|_, n| *n != node);
        self.below.retain(|_, (n, _)| *n != node);
    }

    pub(super) fn is_lanes(&self, link: LinkId) -> bool {
        self.lanes.contains_key(&link)
    }

    /// `frame` went out: a request's subject is no longer needed.
    pub(super) fn sent(&mut self, frame: &Frame) {
        if frame.kind == Kind::Request && !self.about.is_empty() {
            self.about.remove(&frame.stream);
        }
    }
}

impl Tree {
    /// A relay just came up: true if its upgrade has started (the hop is
    /// settled when it ends).
    pub(super) fn upgrade_started(&mut self, node: NodeId) -> bool {
        if !self.upgrades.wanted.remove(&node) {
            return false;
        }
        let idle_ms = ssh::keepalive_secs().saturating_mul(1000);
        let req = Request::QuicListen {
            accept_ms: ACCEPT_WINDOW.as_millis() as u32,
            idle_ms,
        };
        let stream = self.stream_id();
        self.upgrades.asked.insert(stream, node);
        let f = Frame::new(
            Kind::Request,
            node,
            NodeId::CONTROLLER,
            stream,
            control::encode(&req),
        );
        self.core.send(Instant::now(), f);
        true
    }

    /// The relay's answer to `QuicListen`, or its parent relay's to
    /// `QuicConnect`, if `frame` is one (consumed).
    pub(super) fn upgrade_answer(&mut self, frame: &Frame) -> bool {
        if let Some((node, addr)) = self.upgrades.below.remove(&frame.stream) {
            let outcome = match control::decode::<Reply>(&frame.payload) {
                Ok(Reply::Done) => Ok(format!("QUIC {addr}")),
                Ok(Reply::Error { message }) => Err(message),
                other => Err(format!("unexpected answer {other:?}")),
            };
            self.upgraded(node, outcome);
            return true;
        }
        let Some(node) = self.upgrades.asked.remove(&frame.stream) else {
            return false;
        };
        let Some(link) = self.local_link_of(node) else {
            self.connect_below(node, frame);
            return true;
        };
        match control::decode::<Reply>(&frame.payload) {
            Ok(Reply::QuicOffer(offer)) => {
                self.upgrades.connecting.insert(link, node);
                let host = self.hops.of(node).map(|i| i.host.clone());
                let inbox = self.inbox_tx.clone();
                let idle = Duration::from_secs(u64::from(ssh::keepalive_secs()));
                tokio::spawn(connect(offer, host, idle, inbox, link));
            }
            Ok(Reply::Error { message }) => self.upgrade_done(link, Err(message)),
            other => self.upgrade_done(link, Err(format!("unexpected answer {other:?}"))),
        }
        true
    }

    /// A relay below the first hop offered its endpoint (`frame`): the
    /// relay before it is asked to connect.
    fn connect_below(&mut self, node: NodeId, frame: &Frame) {
        let offer = match control::decode::<Reply>(&frame.payload) {
            Ok(Reply::QuicOffer(offer)) => offer,
            Ok(Reply::Error { message }) => return self.upgraded(node, Err(message)),
            other => return self.upgraded(node, Err(format!("unexpected answer {other:?}"))),
        };
        let Some(parent) = self.relay_parent.get(&node).copied() else {
            return self.upgraded(node, Err("its via relay is gone".into()));
        };
        let addr = format!("{}:{}", offer.ip.as_deref().unwrap_or("?"), offer.port);
        let req = Request::QuicConnect {
            node,
            offer,
            timeout_ms: CONNECT_TIMEOUT.as_millis() as u32,
            idle_ms: ssh::keepalive_secs().saturating_mul(1000),
        };
        let stream = self.stream_id();
        self.upgrades.below.insert(stream, (node, addr));
        let f = Frame::new(
            Kind::Request,
            parent,
            NodeId::CONTROLLER,
            stream,
            control::encode(&req),
        );
        self.core.send(Instant::now(), f);
    }

    /// How the upgrade of `link` ended: the hop is settled either way.
    pub(super) fn upgrade_done(&mut self, link: LinkId, outcome: Result<String, String>) {
        let Some(node) = self.upgrades.connecting.remove(&link).or_else(|| {
            // Refused at once (no QUIC in that relay).
            self.local_nodes.get(&link).copied()
        }) else {
            return;
        };
        if outcome.is_ok() {
            self.upgrades.lanes.insert(link, node);
        }
        self.upgraded(node, outcome);
    }

    /// How the upgrade of `node`'s link ended: its `-vvv` line says which
    /// transport it is on, and the hop is settled either way.
    fn upgraded(&mut self, node: NodeId, outcome: Result<String, String>) {
        let transport = match outcome {
            Ok(channel) => channel,
            Err(why) => format!("ssh (QUIC: {why})"),
        };
        tracing::debug!(node = node.0, transport, "relay link");
        if let Ok(mut h) = self.hellos.lock() {
            if let Some(info) = h.get_mut(&node) {
                info["transport"] = serde_json::json!(transport);
            }
        }
        self.settle(node, Ok(()));
    }

    /// The lane of `frame` on the upgraded link to `relay`: the child
    /// subtree of `relay` its subject is in (the subject: a relay
    /// request's child, else its destination); `relay`'s own otherwise.
    pub(super) fn lane(&self, relay: NodeId, frame: &Frame) -> u32 {
        let about = (frame.kind == Kind::Request)
            .then(|| self.upgrades.about.get(&frame.stream).copied())
            .flatten();
        // Only a relay's requests are control payloads (an agent's are
        // JSON, which postcard might still decode as something).
        let to_relay = self.hops.of(frame.dst).map(|i| i.key.1) == Some(HopRole::Relay);
        let mut n = about
            .or_else(|| {
                (to_relay && frame.kind == Kind::Request)
                    .then(|| control::subject(&frame.payload))
                    .flatten()
            })
            .unwrap_or(frame.dst);
        let mut steps = 0;
        while let Some(&p) = self.node_parent.get(&n) {
            if p == relay || steps > 64 {
                break;
            }
            n = p;
            steps += 1;
        }
        n.0
    }

    /// Remembers what the request on `stream` to `relay` is about, if it
    /// goes over a QUIC link (else the order of one channel keeps it).
    pub(super) fn note_about(&mut self, relay: NodeId, stream: StreamId, about: NodeId) {
        if self
            .core
            .route(relay)
            .is_some_and(|l| self.upgrades.is_lanes(l))
        {
            self.upgrades.about.insert(stream, about);
        }
    }

    pub(super) fn lanes_relay(&self, link: LinkId) -> Option<NodeId> {
        self.upgrades.lanes.get(&link).copied()
    }

    fn local_link_of(&self, node: NodeId) -> Option<LinkId> {
        self.local_nodes
            .iter()
            .find(|(_, n)| **n == node)
            .map(|(l, _)| *l)
    }
}

/// Connects to the relay's endpoint; the link is upgraded, or stays on
/// ssh with why.
async fn connect(
    offer: QuicOffer,
    host: Option<String>,
    idle: Duration,
    inbox: mpsc::Sender<Input>,
    link: LinkId,
) {
    #[cfg(not(feature = "quic"))]
    let outcome: Result<(std::net::SocketAddr, arbor_io::LinkTx), String> = {
        let _ = (&offer, &host, idle);
        Err("this arbor is built without QUIC".to_string())
    };
    #[cfg(feature = "quic")]
    let outcome = async {
        let addr = address(&offer, host.as_deref()).await?;
        let inbox = inbox.clone();
        let tx =
            arbor_io::quic::connect_child(addr, &offer, CONNECT_TIMEOUT, idle, inbox, link).await?;
        Ok::<_, String>((addr, tx))
    }
    .await;
    let event = match outcome {
        Ok((addr, tx)) => Input::Upgraded(link, tx, format!("QUIC {addr}")),
        Err(why) => Input::NotUpgraded(link, why),
    };
    let _ = inbox.send(event).await;
}

/// Where the relay listens: the address its sshd was reached at, else
/// the hop's host as this controller resolves it.
#[cfg(feature = "quic")]
async fn address(offer: &QuicOffer, host: Option<&str>) -> Result<std::net::SocketAddr, String> {
    if let Some(ip) = offer.ip.as_deref().and_then(|i| i.parse().ok()) {
        return Ok(std::net::SocketAddr::new(ip, offer.port));
    }
    let host = host.ok_or("no address for the relay")?;
    tokio::net::lookup_host((host, offer.port))
        .await
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))
}
