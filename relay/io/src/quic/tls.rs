//! The TLS a QUIC link needs, and no more: every byte of it is uploaded
//! to each relay with QUIC, over the link QUIC is there to relieve.
//!
//! One cipher suite (TLS_AES_128_GCM_SHA256, which QUIC's Initial packets
//! need anyway), one key exchange (X25519), one signature (Ed25519), so
//! that ring's P-256/P-384, RSA and ChaCha20 are not linked; and the
//! relay's certificate written here, as DER, rather than by a certificate
//! library: its hash is pinned by the parent, so it only has to parse.

use std::sync::Arc;

use ring::rand::SecureRandom as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls::crypto::{
    CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::SigningKey;
use rustls::SignatureScheme;

/// The crypto both ends of a QUIC link use.
pub(super) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    Arc::new(CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![kx_group::X25519],
        signature_verification_algorithms: ED25519,
        secure_random: &Ring,
        key_provider: &Ring,
    })
}

static ED25519: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[webpki::ring::ED25519],
    mapping: &[(SignatureScheme::ED25519, &[webpki::ring::ED25519])],
};

#[derive(Debug)]
struct Ring;

impl SecureRandom for Ring {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        ring::rand::SystemRandom::new()
            .fill(buf)
            .map_err(|_| GetRandomFailed)
    }
}

impl KeyProvider for Ring {
    fn load_private_key(
        &self,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        match key {
            PrivateKeyDer::Pkcs8(k) => rustls::crypto::ring::sign::any_eddsa_type(&k),
            _ => Err(rustls::Error::General("not an Ed25519 key".into())),
        }
    }
}

/// Ed25519's object identifier, 1.3.101.112, as DER.
const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
/// Validity: from 2025 to the end of 9999 (nothing checks it: the
/// certificate lives as long as its link and is pinned by hash).
const NOT_BEFORE: &[u8] = b"250101000000Z";
const NOT_AFTER: &[u8] = b"99991231235959Z";

/// One DER element: `tag`, its length, `content` (under 64 KiB: a
/// certificate of one short name and one key).
fn der(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(len <= 0xffff, "a DER element of {len} bytes");
    let mut out = vec![tag];
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend([0x81, len as u8]),
        _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// A new Ed25519 key and a self-signed X.509 v3 certificate for it named
/// `name` (under 100 bytes), both DER, made in RAM.
pub(super) fn self_signed(
    name: &str,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "QUIC key: no randomness")?;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| "QUIC key: unusable")?;
    let mut serial = [0u8; 8];
    rng.fill(&mut serial)
        .map_err(|_| "QUIC key: no randomness")?;
    serial[0] = (serial[0] & 0x7f) | 0x40; // positive, eight bytes
    let alg = der(0x30, &[&ED25519_OID]);
    let cn = der(
        0x30,
        &[&der(
            0x31,
            &[&der(
                0x30,
                &[
                    &[0x06, 0x03, 0x55, 0x04, 0x03],
                    &der(0x0c, &[name.as_bytes()]),
                ],
            )],
        )],
    );
    let tbs = der(
        0x30,
        &[
            &der(0xa0, &[&der(0x02, &[&[2]])]),
            &der(0x02, &[&serial]),
            &alg,
            &cn,
            &der(0x30, &[&der(0x17, &[NOT_BEFORE]), &der(0x18, &[NOT_AFTER])]),
            &cn,
            &der(
                0x30,
                &[&alg, &der(0x03, &[&[0], key.public_key().as_ref()])],
            ),
        ],
    );
    let sig = key.sign(&tbs);
    let cert = der(0x30, &[&tbs, &alg, &der(0x03, &[&[0], sig.as_ref()])]);
    Ok((
        CertificateDer::from(cert),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_parses_and_its_signature_checks() {
        let (cert, _) = self_signed("arbor-relay").expect("certificate");
        let ee = webpki::EndEntityCert::try_from(&cert).expect("webpki parses it");
        // Self-signed: its own key verifies its signature over the TBS.
        let (tbs, sig) = split_signed(cert.as_ref());
        ee.verify_signature(webpki::ring::ED25519, tbs, sig)
            .expect("signed by its own key");
    }

    #[test]
    fn rustls_takes_the_certificate_and_key() {
        let (cert, key) = self_signed("arbor-relay").expect("certificate");
        rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("key and certificate match");
    }

    #[test]
    fn each_certificate_is_new() {
        let (a, _) = self_signed("arbor-relay").expect("certificate");
        let (b, _) = self_signed("arbor-relay").expect("certificate");
        assert_ne!(a.as_ref(), b.as_ref());
    }

    /// The TBS (with its header) and the signature's bits of a DER
    /// certificate whose lengths are in two-byte long form.
    fn split_signed(cert: &[u8]) -> (&[u8], &[u8]) {
        let body = &cert[2..];
        let body = if cert[1] & 0x80 != 0 {
            &cert[2 + usize::from(cert[1] & 0x7f)..]
        } else {
            body
        };
        let tbs_len = match body[1] {
            l if l < 0x80 => 2 + usize::from(l),
            0x81 => 3 + usize::from(body[2]),
            _ => 4 + (usize::from(body[2]) << 8 | usize::from(body[3])),
        };
        let tbs = &body[..tbs_len];
        let sig = &cert[cert.len() - 64..];
        (tbs, sig)
    }
}
