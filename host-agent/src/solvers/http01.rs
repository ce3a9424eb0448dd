//! HTTP-01 answered by the filters in Envoy: the challenges go into the set
//! the filters long-poll, and before the CA is told they are fetched the way
//! the CA will: through Envoy's plain-HTTP listener, with the domain as Host.
//! A failed validation counts against the CA's rate limits; a failed
//! self-check costs nothing.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;

use crate::challenges::{Challenge, ChallengeSet};
use crate::config::Config;
use crate::domain::spec::Certificate;
use crate::ports::solver::{Presented, Solver};
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

/// The HTTP-01 solver: the filters' challenge set, self-checked at
/// `[self_check] target` when one is configured.
pub struct Http01 {
    challenges: Arc<ChallengeSet>,
    target: RwLock<Option<String>>,
}

impl Http01 {
    pub fn new(challenges: Arc<ChallengeSet>) -> Self {
        Self {
            challenges,
            target: RwLock::new(None),
        }
    }
}

#[async_trait::async_trait]
impl Solver for Http01 {
    fn configure(&self, config: &Config) {
        *self
            .target
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            config.self_check.as_ref().map(|s| s.target.clone());
    }

    async fn present(
        &self,
        _spec: &Certificate,
        challenges: &[Challenge],
    ) -> Result<Box<dyn Presented>, Error> {
        // One publish: one new version, one sync for the filters.
        self.challenges.publish(challenges.iter().cloned());
        let target = self
            .target
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(Box::new(Published {
            set: Arc::clone(&self.challenges),
            challenges: challenges.to_vec(),
            target,
        }))
    }
}

/// An order's HTTP-01 challenges while the filters answer them; withdrawn
/// when dropped (success, failure, an aborted order).
struct Published {
    set: Arc<ChallengeSet>,
    challenges: Vec<Challenge>,
    target: Option<String>,
}

impl Drop for Published {
    fn drop(&mut self) {
        self.set
            .remove(self.challenges.iter().map(|c| c.token.as_str()));
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
            .map(|c| check(target, &c.identifier, &c.token, &c.key_authorization));
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .collect()
    }

    async fn clean_up(self: Box<Self>) {}
}
