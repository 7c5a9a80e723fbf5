//! Payloads between the controller and relays (postcard): the relay's own
//! requests. A relay decodes only frames addressed to itself.

use serde::{Deserialize, Serialize};

use crate::{NodeId, StreamId, WireError};

/// A request to a relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Start a child process and link it below this relay.
    Spawn(Spawn),
    /// Kill every child and exit.
    Shutdown,
    /// Keep `data` in this relay's content cache under `key` (in RAM, at
    /// most `max_bytes` in all: the oldest entries go first). No reply.
    CachePut {
        key: String,
        data: Vec<u8>,
        max_bytes: u64,
    },
    /// Send the cached entries `keys`, in order, as Data frames of the
    /// controller's stream `stream` to `dst` (below this relay), as if the
    /// controller had sent them. It stops at the first key it does not
    /// hold: `dst` then sees a short body and asks again. No reply.
    Inject {
        dst: NodeId,
        stream: StreamId,
        keys: Vec<String>,
    },
    /// Put the cached entries `keys` into the cache of the relay `dst`
    /// below this one, as the controller's `CachePut` requests (with
    /// `max_bytes`), so they cross the link above this relay once; pinned
    /// entries go as `Pin`. It stops at the first key it holds neither way.
    /// No reply.
    Forward {
        dst: NodeId,
        keys: Vec<String>,
        max_bytes: u64,
    },
    /// Keep `data` under `key` for the relay's life, outside the cache: what
    /// every spawn uses (the agent's code, known_hosts). At most
    /// [`PINS_MAX`] entries; more are refused (a spawn naming one fails).
    /// No reply.
    Pin { key: String, data: Vec<u8> },
    /// `node` will announce itself through `via` (a node below this relay:
    /// the agent that starts it, a nested become agent); until then this
    /// relay takes no announcement of `node`. No reply.
    Expect { node: NodeId, via: NodeId },
    /// Exit (ending every child) if nothing comes from the parent for
    /// `silent_ms`: the controller pings each relay well within it, so a
    /// relay on the far side of a dead link does not live on. No reply.
    Keepalive { silent_ms: u32 },
    /// Open a QUIC endpoint (a relay built with it) on an ephemeral UDP
    /// port, with a certificate made in RAM, and take, within
    /// `accept_ms`, the one connection that proves the secret: from then
    /// on the parent link's frames flow over it and this link stays the
    /// control channel. The endpoint goes with the link or the relay.
    /// Replied [`Reply::QuicOffer`] (the offer crosses only this link), or
    /// `Error`.
    QuicListen { accept_ms: u32, idle_ms: u32 },
    /// Move the link to this relay's child `node` (a relay that answered
    /// `QuicListen` with `offer`) to QUIC: connect to the offer's address
    /// within `timeout_ms`, pinning its certificate and proving its
    /// secret; the child's ssh stays the control channel. Replied `Done`
    /// once frames to `node` flow over QUIC, else `Error` (the link stays
    /// on ssh).
    QuicConnect {
        node: NodeId,
        offer: QuicOffer,
        timeout_ms: u32,
        idle_ms: u32,
    },
}

/// A relay's QUIC endpoint, as its parent needs it: where, the SHA-256 of
/// its certificate (pinned), and the one-time secret that proves the
/// parent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicOffer {
    /// The address the parent's ssh reached (from `SSH_CONNECTION`), if
    /// known, else none: the parent uses the host it connected to.
    pub ip: Option<String>,
    pub port: u16,
    pub cert_sha256: [u8; 32],
    pub secret: [u8; 32],
}

impl std::fmt::Debug for QuicOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicOffer")
            .field("ip", &self.ip)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Most entries a relay pins.
pub const PINS_MAX: usize = 16;

/// How to start one child. The relay resolves no names: `argv` is run as
/// given (`ssh` resolves the host itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawn {
    /// The node the child will be.
    pub node: NodeId,
    /// The host it stands for, for messages.
    pub label: String,
    pub argv: Vec<String>,
    /// Added to the relay's environment for this child.
    pub env: Vec<(String, String)>,
    /// Written to the child's stdin before any frame (the agent's code).
    pub preamble: Vec<u8>,
    /// Also write this relay's own binary after the preamble (the child is
    /// a relay whose stage-0 is reading it).
    pub send_self: bool,
    /// known_hosts content. The relay keeps it in an in-RAM file while the
    /// child lives and replaces [`KNOWN_HOSTS_TOKEN`] in `argv` with its path.
    pub known_hosts: Option<Vec<u8>>,
    /// How long the child may take to join the tree.
    pub connect_timeout_ms: u32,
    /// A pinned entry (see [`Request::Pin`]) written after `preamble`
    /// (the agent's code, sent to this relay once).
    pub preamble_pinned: Option<String>,
    /// A pinned entry used as `known_hosts` instead of that field.
    pub known_hosts_pinned: Option<String>,
    /// At most this many children of the relay connecting at once (0: no
    /// bound); the others wait, in order, for one to join or fail.
    pub max_connecting: u16,
    /// The password that answers the child ssh's prompt (through
    /// SSH_ASKPASS, from RAM).
    pub password: Option<Password>,
}

/// A password: carried, never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<password>")
    }
}

/// Stands in `Spawn::argv` for the path of the child's known_hosts file.
pub const KNOWN_HOSTS_TOKEN: &str = "@ARBOR_KNOWN_HOSTS@";
/// Stands in `Spawn::argv` for the relay's own `SSH_AUTH_SOCK` (the agent
/// forwarded to it), for a child that changes the account (sudo, su, doas
/// clear the environment) and still authenticates its own children with it.
pub const AUTH_SOCK_TOKEN: &str = "@ARBOR_AUTH_SOCK@";

/// A relay's reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The child joined the tree.
    Spawned { node: NodeId, pid: u32 },
    /// The child could not be started or did not join; `message` carries
    /// what it said (the tail of its stderr) and how it ended.
    Failed { node: NodeId, message: String },
    /// The request was done.
    Done,
    /// The request could not be decoded or done.
    Error { message: String },
    /// The relay listens for its parent over QUIC (see
    /// [`Request::QuicListen`]).
    QuicOffer(QuicOffer),
}

/// The node a request to a relay is about, where its order with that
/// node's own frames matters: an `Inject`'s or `Forward`'s `dst`, an
/// `Expect`'s `via`. Only those (postcard's variant index comes first) are
/// decoded: a `CachePut` is not copied to learn it names none.
pub fn subject(payload: &[u8]) -> Option<NodeId> {
    const INJECT: u8 = 3;
    const FORWARD: u8 = 4;
    const EXPECT: u8 = 6;
    if !matches!(payload.first(), Some(&(INJECT | FORWARD | EXPECT))) {
        return None;
    }
    match decode::<Request>(payload).ok()? {
        Request::Inject { dst, .. } | Request::Forward { dst, .. } => Some(dst),
        Request::Expect { via, .. } => Some(via),
        _ => None,
    }
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain types to a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    postcard::from_bytes(bytes).map_err(|e| WireError::BadPayload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_roundtrips() {
        let req = Request::Spawn(Spawn {
            node: NodeId(4),
            label: "target1".into(),
            argv: vec!["ssh".into(), "target1".into()],
            env: vec![("A".into(), "b".into())],
            preamble: b"code".to_vec(),
            send_self: false,
            known_hosts: Some(b"target1 ssh-ed25519 AAAA".to_vec()),
            connect_timeout_ms: 30_000,
            max_connecting: 64,
            preamble_pinned: Some("pin:agent:00".into()),
            known_hosts_pinned: None,
            password: Some(Password("pw".into())),
        });
        let bytes = encode(&req);
        assert_eq!(decode::<Request>(&bytes), Ok(req.clone()));
        assert!(
            !format!("{req:?}").contains("\"pw\""),
            "a password is never printed"
        );
    }

    #[test]
    fn cache_requests_roundtrip() {
        for req in [
            Request::CachePut {
                key: "k1".into(),
                data: vec![1, 2, 3],
                max_bytes: 64 << 20,
            },
            Request::Inject {
                dst: NodeId(7),
                stream: StreamId(9),
                keys: vec!["k1".into(), "k2".into()],
            },
            Request::Forward {
                dst: NodeId(8),
                keys: vec!["k1".into()],
                max_bytes: 1 << 20,
            },
            Request::Expect {
                node: NodeId(9),
                via: NodeId(4),
            },
            Request::Keepalive { silent_ms: 30_000 },
            Request::QuicListen {
                accept_ms: 10_000,
                idle_ms: 30_000,
            },
            Request::Pin {
                key: "pin:agent:00".into(),
                data: vec![4, 5],
            },
            Request::QuicConnect {
                node: NodeId(9),
                offer: QuicOffer {
                    ip: Some("10.0.0.2".into()),
                    port: 4433,
                    cert_sha256: [1; 32],
                    secret: [2; 32],
                },
                timeout_ms: 3000,
                idle_ms: 30_000,
            },
        ] {
            assert_eq!(decode::<Request>(&encode(&req)), Ok(req));
        }
    }

    #[test]
    fn a_quic_offer_roundtrips_and_never_prints_its_secret() {
        let offer = QuicOffer {
            ip: Some("10.0.0.1".into()),
            port: 4433,
            cert_sha256: [7; 32],
            secret: [0xab; 32],
        };
        let reply = Reply::QuicOffer(offer);
        assert_eq!(decode::<Reply>(&encode(&reply)), Ok(reply.clone()));
        let shown = format!("{reply:?}");
        assert!(shown.contains("4433") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn a_subject_is_read_from_the_requests_that_have_one() {
        let inject = Request::Inject {
            dst: NodeId(7),
            stream: StreamId(1),
            keys: vec!["k".into()],
        };
        let forward = Request::Forward {
            dst: NodeId(8),
            keys: vec![],
            max_bytes: 1,
        };
        let expect = Request::Expect {
            node: NodeId(9),
            via: NodeId(4),
        };
        assert_eq!(subject(&encode(&inject)), Some(NodeId(7)));
        assert_eq!(subject(&encode(&forward)), Some(NodeId(8)));
        assert_eq!(subject(&encode(&expect)), Some(NodeId(4)));
        for other in [
            Request::CachePut {
                key: "k".into(),
                data: vec![3; 100],
                max_bytes: 1,
            },
            Request::Shutdown,
            Request::Keepalive { silent_ms: 1 },
        ] {
            assert_eq!(subject(&encode(&other)), None, "{other:?}");
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode::<Request>(&[0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode::<Reply>(&[]).is_err());
    }
}
