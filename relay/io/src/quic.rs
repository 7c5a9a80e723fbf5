//! A link over QUIC (feature `quic`): a relay's parent link, moved off its
//! ssh channel once both ends agree.
//!
//! The relay listens on an ephemeral UDP port with a certificate made in
//! RAM ([`listen`]) and tells its parent, over the ssh channel only, the
//! port, the certificate's SHA-256 and a one-time secret
//! ([`QuicOffer`]). The parent connects pinning that certificate (no CA,
//! no name) and proves the secret on the connection's first stream
//! ([`connect`]); the relay takes the first connection that does and
//! closes any other ([`Listener::accept`]), then takes no more.
//!
//! Frames then flow in lanes ([`spawn_lanes`]): each lane is a QUIC stream
//! of its own, keeping the order of the frames put in it, so a lost packet
//! or a long transfer in one lane does not hold up another. The node
//! chooses a frame's lane (one per child subtree: see the shells); frames
//! with none go by their destination (toward a child) or source (toward
//! the parent). At most [`LANES`] lanes each way.
//!
//! Each lane is a deflate stream (flushed at every write), as an ssh
//! session with `-C` is one zlib stream: a host's requests repeat much of
//! each other (a module's zip manifest, its arguments' shape), and a
//! stream's dictionary carries across them where a frame's own lz4 cannot.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arbor_core::LinkId;
use arbor_wire::control::QuicOffer;
use arbor_wire::link::{Encoder, READ_CHUNK_BYTES};
use arbor_wire::Frame;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::mpsc;

use crate::{LinkEvent, LinkRx, LinkTx};
use tls::provider;

/// Lanes each way on one link; frames of more subtrees share them. Each
/// holds a deflate state (about 300 KiB sending, 50 KiB receiving).
pub const LANES: u32 = 64;
/// Deflate's level on the lanes (ssh's `-C` is zlib's 6; 3 costs the relay
/// less CPU for most of the gain on frames this small).
const DEFLATE_LEVEL: u32 = 3;
/// How long a new connection may take to prove the secret.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// A QUIC PING when nothing else was sent this long.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Bytes in flight per lane, and per link, before the sender waits.
const LANE_WINDOW_BYTES: u32 = 2 << 20;
const LINK_WINDOW_BYTES: u32 = 32 << 20;
/// The name in the certificate (nothing checks it: the hash is pinned).
const NAME: &str = "arbor-relay";
const AUTH_OK: u8 = 0xa5;
/// Why a connection was closed, as the peer sees it.
const CLOSE_REFUSED: u32 = 1;
const CLOSE_DONE: u32 = 0;
const CLOSE_MALFORMED: u32 = 2;

fn transport(idle: Duration) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok())
        .max_concurrent_uni_streams(VarInt::from_u32(LANES))
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .stream_receive_window(VarInt::from_u32(LANE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(LINK_WINDOW_BYTES))
        .send_window(u64::from(LINK_WINDOW_BYTES))
        .datagram_receive_buffer_size(Some(dup::RECV_BUFFER_BYTES))
        .datagram_send_buffer_size(dup::SEND_BUFFER_BYTES);
    // BBR, not quinn's default (CUBIC): a link chosen for QUIC is lossy,
    // and a loss-based controller holds a 2 %-loss, 300 ms link to about
    // nine packets a round trip, so a small request waits for a slot behind
    // a transfer. BBR paces at what the path delivers (deploy/bench/hol.py:
    // a copy 8x faster, and the small requests beside it at one RTT).
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    Arc::new(t)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8; 32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A relay's endpoint, waiting for its parent.
pub struct Listener {
    endpoint: Endpoint,
    secret: [u8; 32],
}

/// Opens an endpoint on an ephemeral UDP port of `ip`, with a certificate
/// and key made here, in RAM. Connections idle for `idle` are dead.
pub fn listen(ip: IpAddr, idle: Duration) -> Result<(Listener, QuicOffer), String> {
    use ring::rand::{SecureRandom, SystemRandom};
    let (der, key) = tls::self_signed(NAME)?;
    let cert_sha256 = sha256(&der);
    let tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("QUIC TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .map_err(|e| format!("QUIC TLS: {e}"))?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| format!("QUIC TLS: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport(idle));
    let endpoint = Endpoint::server(server, SocketAddr::new(ip, 0))
        .map_err(|e| format!("QUIC endpoint on {ip}: {e}"))?;
    let port = endpoint
        .local_addr()
        .map_err(|e| format!("QUIC endpoint: {e}"))?
        .port();
    let mut secret = [0u8; 32];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "QUIC secret: no randomness".to_string())?;
    let offer = QuicOffer {
        ip: None,
        port,
        cert_sha256,
        secret,
    };
    Ok((Listener { endpoint, secret }, offer))
}

impl Listener {
    /// The parent's connection: the first, within `window`, that proves
    /// the secret. Any other is closed; afterwards the endpoint takes no
    /// new connection.
    pub async fn accept(self, window: Duration) -> Result<(Endpoint, Connection), String> {
        let deadline = tokio::time::Instant::now() + window;
        let found = tokio::time::timeout_at(deadline, async {
            while let Some(incoming) = self.endpoint.accept().await {
                let Ok(Ok(conn)) = tokio::time::timeout(AUTH_TIMEOUT, incoming).await else {
                    continue;
                };
                if proves(&conn, &self.secret).await {
                    return Some(conn);
                }
                conn.close(VarInt::from_u32(CLOSE_REFUSED), b"refused");
            }
            None
        })
        .await;
        self.endpoint.set_server_config(None);
        match found {
            Ok(Some(conn)) => Ok((self.endpoint, conn)),
            Ok(None) => Err("QUIC endpoint closed".into()),
            Err(_) => {
                self.endpoint.close(VarInt::from_u32(CLOSE_DONE), b"");
                Err(format!("no QUIC connection from the parent in {window:?}"))
            }
        }
    }
}

async fn proves(conn: &Connection, secret: &[u8; 32]) -> bool {
    let check = async {
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let mut got = [0u8; 32];
        recv.read_exact(&mut got).await.ok()?;
        if !same_secret(&got, secret) {
            return None;
        }
        send.write_all(&[AUTH_OK]).await.ok()?;
        send.finish().ok()
    };
    matches!(
        tokio::time::timeout(AUTH_TIMEOUT, check).await,
        Ok(Some(()))
    )
}

/// Accepts only the certificate whose SHA-256 is pinned (the relay's, made
/// for this link), and checks its signature of the handshake.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if sha256(end_entity) == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the certificate the relay announced".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects to a relay's endpoint at `addr`, pinning the offer's
/// certificate and proving its secret, within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    offer: &QuicOffer,
    timeout: Duration,
    idle: Duration,
) -> Result<(Endpoint, Connection), String> {
    let provider = provider();
    let verifier = Arc::new(Pinned {
        sha256: offer.cert_sha256,
        provider,
    });
    connect_with(addr, offer, verifier, timeout, idle).await
}

async fn connect_with(
    addr: SocketAddr,
    offer: &QuicOffer,
    verifier: Arc<dyn ServerCertVerifier>,
    timeout: Duration,
    idle: Duration,
) -> Result<(Endpoint, Connection), String> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("QUIC TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| format!("QUIC TLS: {e}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport(idle));
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = Endpoint::client(bind).map_err(|e| format!("QUIC socket: {e}"))?;
    endpoint.set_default_client_config(client);
    let attempt = async {
        let conn = endpoint
            .connect(addr, NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&offer.secret)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let mut ok = [0u8; 1];
        recv.read_exact(&mut ok)
            .await
            .map_err(|_| "the relay refused the secret".to_string())?;
        if ok[0] != AUTH_OK {
            return Err("the relay refused the secret".to_string());
        }
        Ok(conn)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(conn)) => Ok((endpoint, conn)),
        Ok(Err(e)) => {
            endpoint.close(VarInt::from_u32(CLOSE_DONE), b"");
            Err(format!("QUIC to {addr}: {e}"))
        }
        Err(_) => {
            endpoint.close(VarInt::from_u32(CLOSE_DONE), b"");
            Err(format!("QUIC to {addr}: no answer in {timeout:?}"))
        }
    }
}

/// Connects to `addr` as a stranger: any certificate, a made-up secret.
/// Ok if the endpoint let it in (it must not); why it did not otherwise.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    #[derive(Debug)]
    struct Any(Pinned);
    impl ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    let offer = QuicOffer {
        ip: None,
        port: addr.port(),
        cert_sha256: [0; 32],
        secret: [0x5a; 32],
    };
    let provider = provider();
    let verifier = Arc::new(Any(Pinned {
        sha256: [0; 32],
        provider: provider.clone(),
    }));
    connect_with(addr, &offer, verifier, timeout, Duration::from_secs(10))
        .await
        .map(|_| ())
}

/// Connects to a child relay's endpoint at `addr` (see [`connect`]) and
/// makes the connection that child's `link`: the writer for its frames.
pub async fn connect_child(
    addr: SocketAddr,
    offer: &QuicOffer,
    timeout: Duration,
    idle: Duration,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) -> Result<LinkTx, String> {
    let (endpoint, conn) = connect(addr, offer, timeout, idle).await?;
    Ok(spawn_lanes(
        endpoint,
        conn,
        false,
        Toward::Child,
        crate::CHILD_QUEUE_BYTES,
        inbox,
        link,
    ))
}

/// Which way a link's frames go, for their default lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toward {
    /// From a parent to its child: a frame's lane is its destination's.
    Child,
    /// From a child to its parent: its source's.
    Parent,
}

/// Makes `conn` a link: frames sent through the returned [`LinkTx`] go out
/// in lanes, frames read from the peer's lanes come in as `link`'s. When
/// the connection ends (closed, timed out, a malformed frame) `link` is
/// reported closed, once. `endpoint` lives as long as the link.
pub fn spawn_lanes(
    endpoint: Endpoint,
    conn: Connection,
    compress: bool,
    toward: Toward,
    queue_bytes: usize,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) -> LinkTx {
    let (tx, rx) = LinkTx::new(queue_bytes);
    tokio::spawn(write_lanes(conn.clone(), rx, compress, toward));
    tokio::spawn(read_lanes(endpoint, conn, inbox, link));
    tx
}

async fn write_lanes(conn: Connection, mut rx: LinkRx, compress: bool, toward: Toward) {
    let mut lanes: Vec<Option<mpsc::UnboundedSender<Frame>>> = vec![None; LANES as usize];
    while let Some((frame, lane)) = rx.rx.recv().await {
        let key = lane.unwrap_or(match toward {
            Toward::Child => frame.dst.0,
            Toward::Parent => frame.src.0,
        });
        let slot = &mut lanes[(key % LANES) as usize];
        if slot.as_ref().is_none_or(|tx| tx.is_closed()) {
            let Ok(send) = conn.open_uni().await else {
                return; // the reader reports the connection's end
            };
            let (tx, lane_rx) = mpsc::unbounded_channel();
            let copies = conn.clone();
            tokio::spawn(write_lane(
                send,
                copies,
                lane_rx,
                compress,
                rx.written_handle(),
            ));
            *slot = Some(tx);
        }
        if let Some(tx) = slot {
            let _ = tx.send(frame);
        }
    }
    // The node dropped the link.
    conn.close(VarInt::from_u32(CLOSE_DONE), b"");
}

async fn write_lane(
    mut send: quinn::SendStream,
    conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    compress: bool,
    written: crate::Written,
) {
    // The lane's deflate stream compresses; lz4 per frame only if asked
    // (it would leave deflate less to find).
    let enc = Encoder::new(compress);
    let mut z = flate2::Compress::new(flate2::Compression::new(DEFLATE_LEVEL), false);
    let mut out = Vec::new();
    let mut packed = Vec::new();
    let index = send.id().index();
    let mut sent = 0u64;
    while let Some(frame) = rx.recv().await {
        let taken = crate::coalesce(&enc, frame, &mut out, || rx.try_recv().ok());
        if deflate(&mut z, &out, &mut packed).is_err() || send.write_all(&packed).await.is_err() {
            return;
        }
        written.written(taken);
        let at = sent;
        sent += packed.len() as u64;
        if let Some(copy) = dup::copy(index, at, &packed, conn.max_datagram_size()) {
            tokio::time::sleep(dup::DELAY).await;
            // Dropped if the connection has no room: the stream has it.
            let _ = conn.send_datagram(copy.into());
        }
    }
}

/// `input`, deflated and flushed (the reader gets every byte of it now).
fn deflate(z: &mut flate2::Compress, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    let start = z.total_in();
    loop {
        out.reserve(input.len() / 2 + 1024);
        let used = (z.total_in() - start) as usize;
        z.compress_vec(&input[used..], out, flate2::FlushCompress::Sync)
            .map_err(|e| e.to_string())?;
        // The flush is whole once a call leaves room to spare.
        if (z.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

async fn read_lanes(
    endpoint: Endpoint,
    conn: Connection,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
) {
    let (bad_tx, mut bad_rx) = mpsc::channel::<String>(1);
    let lanes = dup::Lanes::default();
    let copies = tokio::spawn(read_copies(
        conn.clone(),
        lanes.clone(),
        inbox.clone(),
        link,
        bad_tx.clone(),
    ));
    let why = loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(recv) => {
                    let lanes = lanes.clone();
                    tokio::spawn(read_lane(recv, lanes, inbox.clone(), link, bad_tx.clone()));
                }
                Err(e) => break format!("QUIC: {e}"),
            },
            Some(why) = bad_rx.recv() => {
                conn.close(VarInt::from_u32(CLOSE_MALFORMED), b"malformed frame");
                break why;
            }
        }
    };
    copies.abort();
    let _ = inbox.send(LinkEvent::Closed(link, why)).await;
    endpoint.close(VarInt::from_u32(CLOSE_DONE), b"");
}

/// Takes each datagram copy's bytes its lane has not taken yet.
async fn read_copies(
    conn: Connection,
    lanes: dup::Lanes,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
    bad: mpsc::Sender<String>,
) {
    while let Ok(d) = conn.read_datagram().await {
        let taken = match dup::parse(&d) {
            Ok((index, at, bytes)) => match lanes.datagram(index) {
                Some(lane) => lane.lock().await.take(at, bytes, &inbox, link).await,
                None => Ok(true),
            },
            Err(why) => Err(why),
        };
        match taken {
            Ok(true) => {}
            Ok(false) => return,
            Err(why) => {
                let _ = bad.try_send(why);
                return;
            }
        }
    }
}

async fn read_lane(
    mut recv: quinn::RecvStream,
    lanes: dup::Lanes,
    inbox: mpsc::Sender<LinkEvent>,
    link: LinkId,
    bad: mpsc::Sender<String>,
) {
    let index = recv.id().index();
    let lane = lanes.stream(index);
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut at = 0u64;
    loop {
        let n = match recv.read(&mut buf).await {
            Ok(Some(n)) => n,
            // A lane ends with its sender; the link's end is the
            // connection's.
            Ok(None) | Err(_) => break,
        };
        match lane.lock().await.take(at, &buf[..n], &inbox, link).await {
            Ok(true) => at += n as u64,
            Ok(false) => break,
            Err(why) => {
                let _ = bad.try_send(why);
                break;
            }
        }
    }
    lane.lock().await.end();
    lanes.end(index);
}

mod dup;
mod tls;

#[cfg(test)]
mod tests;
