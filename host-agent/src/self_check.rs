//! Before the CA is told a challenge is ready, fetch it the way the CA will:
//! through Envoy's plain-HTTP listener, with the domain as Host. A failed
//! validation counts against the CA's rate limits; a failed self-check costs
//! nothing.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Error;

/// How long a challenge may take to appear at Envoy: the filter learns it on
/// its next long-poll answer (milliseconds), or on its first tick after start.
pub const DEADLINE: Duration = Duration::from_secs(10);
const RETRY_EVERY: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

async fn fetch_once(target: &str, domain: &str, path: &str) -> Result<(u16, Bytes), String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    // One small request, then wait for the answer: no Nagle delay.
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {target}: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, domain)
        .header(http::header::USER_AGENT, "acme-agent self-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path} at {target}: {e}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), 4096)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// GETs `/.well-known/acme-challenge/<token>` at `target` with `domain` as
/// Host until the body is `key_authorization`, or [`DEADLINE`] passes.
pub async fn check(
    target: &str,
    domain: &str,
    token: &str,
    key_authorization: &str,
) -> Result<(), Error> {
    let path = format!("/.well-known/acme-challenge/{token}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, fetch_once(target, domain, &path))
            .await
            .unwrap_or_else(|_| Err(format!("no answer from {target} in {REQUEST_TIMEOUT:?}")));
        let problem = match outcome {
            Ok((200, body)) if body.as_ref() == key_authorization.as_bytes() => return Ok(()),
            Ok((200, _)) => format!("{domain}: {target} answered 200 with another body"),
            Ok((status, _)) => format!("{domain}: {target} answered {status}"),
            Err(e) => format!("{domain}: {e}"),
        };
        if Instant::now() + RETRY_EVERY > deadline {
            return Err(Error::SelfCheck(format!(
                "{problem} (for {DEADLINE:?}; is the filter first in Envoy's plain-HTTP chain and synced with this agent?)"
            )));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
