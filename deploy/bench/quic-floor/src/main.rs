//! A QUIC endpoint with the relay's TLS that accepts one connection and
//! echoes one stream: the floor under the relay's QUIC side, for its size.

use std::sync::Arc;

// The relay's own TLS, not a copy of it.
#[path = "../../../../relay/io/src/quic/tls.rs"]
mod tls;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (der, key) = tls::self_signed("arbor-relay").expect("certificate");
    let tls = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .expect("certificate");
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let addr = "127.0.0.1:0".parse().expect("address");
    let endpoint = quinn::Endpoint::server(server, addr).expect("endpoint");
    if let Some(incoming) = endpoint.accept().await {
        let conn = incoming.await.expect("connection");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut buf = [0u8; 32];
        recv.read_exact(&mut buf).await.expect("read");
        send.write_all(&buf).await.expect("write");
    }
}
