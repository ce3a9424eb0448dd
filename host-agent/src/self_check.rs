//! Before the CA is told a challenge is ready, fetch it the way the CA will:
//! through Envoy's plain-HTTP listener, with the domain as Host. A failed
//! validation counts against the CA's rate limits; a failed self-check costs
//! nothing.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;

use crate::{Error, http1};

/// How long a challenge may take to appear at Envoy: the filter learns it on
/// its next long-poll answer (milliseconds), or on its first tick after start.
pub const DEADLINE: Duration = Duration::from_secs(10);
const RETRY_EVERY: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

async fn fetch_once(target: &str, domain: &str, path: &str) -> Result<(u16, Bytes), String> {
    // An IPv6 identifier goes in brackets, as the CA sends it (RFC 8738).
    let host = match domain.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{domain}]"),
        Err(_) => domain.to_owned(),
    };
    let request = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "acme-agent self-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    http1::send(target, request, 4096).await
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
