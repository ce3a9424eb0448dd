//! tls-alpn-01 (RFC 8737) answered by Envoy: for each identifier, a
//! self-signed challenge certificate carrying the critical `acmeIdentifier`
//! extension (the SHA-256 of the key authorization), served by the agent's
//! SDS server to Envoy's `acme-tls/1` filter chain while the order runs, so
//! port 80 may stay closed. The self-check performs the handshake the CA
//! will, before the CA is told.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::Error;
use crate::challenges::Challenge;
use crate::config::Config;
use crate::domain::spec::Certificate;
use crate::ports::secrets::SecretSet;
use crate::ports::solver::{Presented, Solver};

/// The ALPN protocol of tls-alpn-01.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// id-pe-acmeIdentifier (RFC 8737 section 6.1), dotted.
const ACME_IDENTIFIER_OID: &str = "1.3.6.1.5.5.7.1.31";

/// SHA-256 of the key authorization: what the extension must hold.
pub fn digest(key_authorization: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The SNI the CA sends for `identifier`: the name itself, or for an IP
/// address its reverse-DNS name (RFC 8738 section 6).
pub fn sni_for(identifier: &str) -> String {
    match identifier.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        Ok(std::net::IpAddr::V6(v6)) => {
            let mut labels = Vec::with_capacity(32);
            for byte in v6.octets().iter().rev() {
                labels.push(format!("{:x}", byte & 0x0f));
                labels.push(format!("{:x}", byte >> 4));
            }
            format!("{}.ip6.arpa", labels.join("."))
        }
        Err(_) => identifier.to_owned(),
    }
}

/// The challenge certificate for `identifier`: (chain PEM, key PEM).
pub fn challenge_certificate(
    identifier: &str,
    key_authorization: &str,
) -> Result<(String, String), Error> {
    fn bad(what: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
        move |e| Error::Certificate(format!("{what}: {e}"))
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(bad("generating a tls-alpn-01 key"))?;
    let mut params = CertificateParams::new(vec![identifier.to_owned()])
        .map_err(bad("tls-alpn-01 certificate names"))?;
    params
        .custom_extensions
        .push(CustomExtension::new_acme_identifier(&digest(
            key_authorization,
        )));
    let cert = params
        .self_signed(&key)
        .map_err(bad("signing the tls-alpn-01 certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The tls-alpn-01 solver: challenge certificates through the agent's SDS
/// server, self-checked at `[self_check] tls_target` when one is configured.
pub struct TlsAlpn01 {
    set: Arc<SecretSet>,
    target: std::sync::RwLock<Option<String>>,
}

impl TlsAlpn01 {
    pub fn new(set: Arc<SecretSet>) -> Self {
        Self {
            set,
            target: std::sync::RwLock::new(None),
        }
    }
}

#[async_trait::async_trait]
impl Solver for TlsAlpn01 {
    fn configure(&self, config: &Config) {
        *self
            .target
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config
            .self_check
            .as_ref()
            .and_then(|s| s.tls_target.clone());
    }

    async fn present(
        &self,
        _spec: &Certificate,
        challenges: &[Challenge],
    ) -> Result<Box<dyn Presented>, Error> {
        let mut published = Published {
            set: Arc::clone(&self.set),
            snis: Vec::new(),
            challenges: challenges.to_vec(),
            target: self
                .target
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        };
        for c in challenges {
            let (chain, key) = challenge_certificate(&c.identifier, &c.key_authorization)?;
            let sni = sni_for(&c.identifier);
            published.set.set(&sni, &[], &chain, &key);
            published.snis.push(sni);
        }
        Ok(Box::new(published))
    }
}

/// An order's challenge certificates while served; withdrawn when dropped
/// (success, failure, abort).
struct Published {
    set: Arc<SecretSet>,
    /// The names they are served under (the SNI the CA will send).
    snis: Vec<String>,
    challenges: Vec<Challenge>,
    target: Option<String>,
}

impl Drop for Published {
    fn drop(&mut self) {
        for sni in &self.snis {
            self.set.remove(sni);
        }
    }
}

#[async_trait::async_trait]
impl Presented for Published {
    async fn check(&self) -> Result<(), Error> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let checks = self
            .challenges
            .iter()
            .map(|c| check(target, &c.identifier, &c.key_authorization));
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .collect()
    }

    async fn clean_up(self: Box<Self>) {}
}

/// A TLS client verifier that accepts any certificate and remembers the
/// leaf: for handshakes whose check is the caller's (the challenge
/// certificate's digest here; what a server presents, in the tests).
#[derive(Debug, Default)]
pub struct LeafObserver {
    leaf: Mutex<Option<Vec<u8>>>,
}

impl LeafObserver {
    /// The leaf (DER) the server presented, taken.
    pub fn take_leaf(&self) -> Option<Vec<u8>> {
        self.leaf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl ServerCertVerifier for LeafObserver {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self
            .leaf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether `leaf` (DER) is a tls-alpn-01 certificate for `key_authorization`:
/// its critical acmeIdentifier extension holds the digest.
pub fn holds_digest(leaf: &[u8], key_authorization: &str) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(leaf) else {
        return false;
    };
    let want = digest(key_authorization);
    cert.extensions().iter().any(|ext| {
        ext.critical
            && ext.oid.to_id_string() == ACME_IDENTIFIER_OID
            // DER OCTET STRING of 32 bytes: tag 0x04, length 0x20.
            && ext.value.len() == 34
            && ext.value[0] == 0x04
            && ext.value[1] == 0x20
            && ext.value[2..] == want
    })
}

/// One handshake with `target` for `identifier`, offering only `acme-tls/1`:
/// the leaf presented, if the handshake completed with that protocol.
fn handshake_once(target: &str, identifier: &str) -> Result<Vec<u8>, String> {
    let observe = Arc::new(LeafObserver::default());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(Arc::clone(&observe) as Arc<dyn ServerCertVerifier>)
    .with_no_client_auth();
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    let name = ServerName::try_from(sni_for(identifier)).map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("resolving {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to nothing"))?;
    let timeout = Duration::from_secs(3);
    let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    let _ = conn.writer().flush();
    if conn.alpn_protocol() != Some(ACME_TLS_ALPN) {
        return Err("acme-tls/1 was not negotiated".into());
    }
    observe
        .take_leaf()
        .ok_or_else(|| "no certificate presented".into())
}

/// Performs the CA's handshake at `target` until Envoy presents the challenge
/// certificate for `identifier`, or the self-check deadline passes.
pub async fn check(target: &str, identifier: &str, key_authorization: &str) -> Result<(), Error> {
    let deadline = Instant::now() + crate::solvers::http01::DEADLINE;
    loop {
        let (t, i) = (target.to_owned(), identifier.to_owned());
        let outcome = tokio::task::spawn_blocking(move || handshake_once(&t, &i))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let problem = match outcome {
            Ok(leaf) if holds_digest(&leaf, key_authorization) => return Ok(()),
            Ok(_) => format!("{identifier}: {target} presented another certificate"),
            Err(e) => format!("{identifier}: {target}: {e}"),
        };
        if Instant::now() + Duration::from_millis(100) > deadline {
            return Err(Error::SelfCheck(format!(
                "{problem} (tls-alpn-01; does Envoy's TLS listener have the acme-tls/1 filter chain fed by this agent's SDS?)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_asked_for_by_its_reverse_name() {
        assert_eq!(sni_for("www.example.com"), "www.example.com");
        assert_eq!(sni_for("192.0.2.7"), "7.2.0.192.in-addr.arpa");
        // RFC 3596 section 2.5's example.
        assert_eq!(
            sni_for("4321:0:1:2:3:4:567:89ab"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa"
        );
    }

    #[test]
    fn the_challenge_certificate_holds_the_digest_critically() {
        let (chain, _) = challenge_certificate("www.example.com", "tok.thumb").unwrap();
        let der = crate::certificate::parse_chain(&chain).unwrap().remove(0);
        assert!(holds_digest(&der, "tok.thumb"));
        assert!(!holds_digest(&der, "tok.other"));
        let leaf = crate::certificate::leaf(&chain).unwrap();
        assert!(leaf.names.contains("www.example.com"));
    }
}
