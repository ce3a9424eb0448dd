//! A TLS client for tests that need many handshakes (thousands, where
//! spawning `openssl s_client` per handshake would take minutes): one
//! handshake for an SNI, reporting the leaf certificate the server presented.
//! It verifies nothing, on purpose (the agent's `LeafObserver`): it only
//! observes what is served (tests that check trust use `openssl` against the
//! CA's root).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use acme_agent::solvers::tls_alpn01::LeafObserver;
use anyhow::{Context as _, Result};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;

/// One handshake with `addr` for `sni`: the leaf's DER when the server
/// presented one and the handshake completed, `None` when it refused (or
/// did not answer within `timeout`: [`outcome`] tells the two apart).
pub fn handshake(addr: SocketAddr, sni: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
    Ok(match outcome(addr, sni, timeout)? {
        Outcome::Served(leaf) => Some(leaf),
        Outcome::Refused | Outcome::StillHeld => None,
    })
}

/// How a handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Completed with this leaf (DER).
    Served(Vec<u8>),
    /// The server ended it (an alert, a close) without a certificate.
    Refused,
    /// Nothing came within the timeout: the server holds it.
    StillHeld,
}

/// One handshake with `addr` for `sni`, telling a refusal by the server
/// from a handshake still held when `timeout` expires: "refused at once"
/// is a refusal that came while a hold would still be holding.
pub fn outcome(addr: SocketAddr, sni: &str, timeout: Duration) -> Result<Outcome> {
    let observe = Arc::new(LeafObserver::default());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .dangerous()
    .with_custom_certificate_verifier(Arc::clone(&observe) as Arc<dyn ServerCertVerifier>)
    .with_no_client_auth();
    let name = ServerName::try_from(sni.to_owned()).context("not a server name")?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut tcp = TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            let timed_out = matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
            return Ok(if timed_out {
                Outcome::StillHeld
            } else {
                Outcome::Refused
            });
        }
    }
    let _ = conn.writer().flush();
    Ok(observe
        .take_leaf()
        .map_or(Outcome::Refused, Outcome::Served))
}

/// [`outcome`] for any SNI, also one rustls will not send (malformed or
/// oversized, as a client chooses it): `openssl s_client`, given `timeout`
/// to end the handshake. `Served` holds the presented subject's text.
pub fn outcome_any_sni(addr: SocketAddr, sni: &str, timeout: Duration) -> Result<Outcome> {
    use std::io::Read as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running openssl s_client")?;
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Outcome::StillHeld);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text)?;
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .map_or(Outcome::Refused, |s| {
            Outcome::Served(s.trim().as_bytes().to_vec())
        }))
}
