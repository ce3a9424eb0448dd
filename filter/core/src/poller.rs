//! The sync loop's state machine: when to long-poll the agent, and what a
//! response means. See `docs/challenge-sync.md` for the protocol.

use crate::Error;
use crate::backoff::Backoff;
use crate::config::FilterConfig;
use crate::snapshot::Snapshot;

/// Path of the agent's challenge API.
pub const SYNC_PATH: &str = "/v1/challenges";
/// Extra time the HTTP call gets on top of the agent's long-poll hold.
const TIMEOUT_MARGIN_MS: u64 = 5_000;

/// An HTTP call to dispatch to the agent cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    pub cluster: String,
    pub headers: Vec<(&'static str, String)>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Ready to poll.
    Idle,
    /// A call is outstanding; its response (or timeout) moves us on.
    InFlight,
    /// Backing off after a failure.
    Waiting { until_ms: u64 },
}

/// What a sync response amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// A new snapshot to store.
    Snapshot(Snapshot),
    /// 304: nothing changed while the agent held the poll.
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct Poller {
    cluster: String,
    authority: String,
    authorization: Option<String>,
    wait_seconds: u32,
    max_body: usize,
    backoff: Backoff,
    state: State,
}

impl Poller {
    /// `None` when the configuration has no agent (stateless mode only).
    pub fn new(config: &FilterConfig) -> Option<Self> {
        Some(Self {
            cluster: config.agent_cluster.clone()?,
            authority: config.agent_authority.clone(),
            authorization: config.agent_token.as_ref().map(|t| format!("Bearer {t}")),
            wait_seconds: config.poll_wait_seconds,
            max_body: config.max_sync_bytes,
            backoff: Backoff::new(config.backoff_initial_ms, config.backoff_max_ms),
            state: State::Idle,
        })
    }

    /// Whether a call is outstanding.
    pub fn in_flight(&self) -> bool {
        self.state == State::InFlight
    }

    /// The call to make now, if any. `version` is the version of the snapshot in
    /// shared data, so a context that takes over the lease resumes where the
    /// previous poller was. Only the elected poller polls.
    pub fn poll(&mut self, now_ms: u64, leader: bool, version: u64) -> Option<SyncRequest> {
        let due = match self.state {
            State::Idle => true,
            State::Waiting { until_ms } => now_ms >= until_ms,
            State::InFlight => false,
        };
        if !leader || !due {
            return None;
        }
        self.state = State::InFlight;
        let mut headers = vec![
            (":method", "GET".to_owned()),
            (
                ":path",
                format!("{SYNC_PATH}?version={version}&wait={}", self.wait_seconds),
            ),
            (":authority", self.authority.clone()),
        ];
        if let Some(auth) = &self.authorization {
            headers.push(("authorization", auth.clone()));
        }
        Some(SyncRequest {
            cluster: self.cluster.clone(),
            headers,
            timeout_ms: u64::from(self.wait_seconds) * 1000 + TIMEOUT_MARGIN_MS,
        })
    }

    /// The host refused to dispatch the call (e.g. unknown cluster); returns the
    /// backoff delay.
    pub fn dispatch_failed(&mut self, now_ms: u64) -> u64 {
        self.fail(now_ms)
    }

    fn fail(&mut self, now_ms: u64) -> u64 {
        let delay = self.backoff.next_delay_ms();
        self.state = State::Waiting {
            until_ms: now_ms.saturating_add(delay),
        };
        delay
    }

    /// Interprets the agent's answer. `status` is `None` when the call failed
    /// without a response (connection refused, reset, timeout). The body is read
    /// through `read_body` only when its announced size is acceptable. On error
    /// the poller is backing off and the caller keeps its last good data.
    pub fn on_response(
        &mut self,
        now_ms: u64,
        status: Option<u32>,
        body_len: usize,
        read_body: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<SyncOutcome, Error> {
        let outcome = match status {
            Some(304) => Ok(SyncOutcome::Unchanged),
            Some(200) if body_len > self.max_body => Err(Error::Sync(format!(
                "body of {body_len} bytes exceeds max_sync_bytes ({})",
                self.max_body
            ))),
            Some(200) => {
                let body = read_body().unwrap_or_default();
                Snapshot::parse(&body, self.max_body).map(SyncOutcome::Snapshot)
            }
            Some(other) => Err(Error::Sync(format!("agent answered status {other}"))),
            None => Err(Error::Sync(
                "no response from the agent (connection failure or timeout)".to_owned(),
            )),
        };
        match &outcome {
            Ok(_) => {
                self.backoff.reset();
                self.state = State::Idle;
            }
            Err(_) => {
                self.fail(now_ms);
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;

    fn poller(extra: &str) -> Poller {
        let c = FilterConfig::parse(format!(r#"{{"agent_cluster":"agent"{extra}}}"#).as_bytes())
            .unwrap();
        Poller::new(&c).unwrap()
    }

    fn header<'a>(r: &'a SyncRequest, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    both_targets_test! {
        fn only_the_leader_polls_and_one_call_at_a_time() {
            let mut p = poller("");
            assert_eq!(p.poll(0, false, 0), None);
            let r = p.poll(0, true, 0).unwrap();
            assert_eq!(r.cluster, "agent");
            assert_eq!(header(&r, ":path"), Some("/v1/challenges?version=0&wait=30"));
            assert_eq!(header(&r, ":method"), Some("GET"));
            assert_eq!(header(&r, ":authority"), Some("acme-agent"));
            assert_eq!(header(&r, "authorization"), None);
            assert_eq!(r.timeout_ms, 35_000);
            assert!(p.in_flight());
            assert_eq!(p.poll(1, true, 0), None);
        }
    }

    both_targets_test! {
        fn bearer_token_and_version_are_sent() {
            let mut p = poller(r#","agent_token":"s3cret","poll_wait_seconds":2"#);
            let r = p.poll(0, true, 42).unwrap();
            assert_eq!(header(&r, "authorization"), Some("Bearer s3cret"));
            assert_eq!(header(&r, ":path"), Some("/v1/challenges?version=42&wait=2"));
        }
    }

    both_targets_test! {
        fn success_polls_again_at_once() {
            let mut p = poller("");
            p.poll(0, true, 0).unwrap();
            let body = br#"{"version":5,"challenges":[]}"#.to_vec();
            let out = p.on_response(10, Some(200), body.len(), || Some(body.clone())).unwrap();
            assert!(matches!(out, SyncOutcome::Snapshot(s) if s.version == 5));
            assert!(p.poll(10, true, 5).is_some());
            assert_eq!(p.on_response(20, Some(304), 0, || panic!("no body to read")), Ok(SyncOutcome::Unchanged));
            assert!(p.poll(20, true, 5).is_some());
        }
    }

    both_targets_test! {
        fn every_failure_kind_waits_the_backoff_before_the_next_poll() {
            let failures: [(Option<u32>, &[u8]); 6] = [
                (None, b""),
                (Some(500), b""),
                (Some(401), b""),
                (Some(204), b""),
                (Some(200), b"{not json"),
                (Some(200), br#"{"version":1,"challenges":[{"token":"a"}]}"#),
            ];
            for (status, body) in failures {
                let mut p = poller(r#","backoff_initial_ms":100"#);
                p.poll(1000, true, 0).unwrap();
                assert!(p.on_response(1000, status, body.len(), || Some(body.to_vec())).is_err());
                assert_eq!(p.poll(1099, true, 0), None, "{status:?} retried too early");
                assert!(p.poll(1100, true, 0).is_some(), "{status:?} not retried after the delay");
            }
        }
    }

    both_targets_test! {
        fn backoff_sequence_is_capped_exponential() {
            let mut p = poller(r#","backoff_initial_ms":100,"backoff_max_ms":1000"#);
            let delays: Vec<u64> = (0..6).map(|_| p.dispatch_failed(0)).collect();
            assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
            p.poll(1000, true, 0).unwrap();
            p.on_response(1000, Some(304), 0, || None).unwrap();
            assert_eq!(p.dispatch_failed(1000), 100, "success resets the backoff");
        }
    }

    both_targets_test! {
        fn oversized_body_is_not_read() {
            let mut p = poller(r#","max_sync_bytes":1024"#);
            p.poll(0, true, 0).unwrap();
            let err = p.on_response(0, Some(200), 1025, || panic!("read")).unwrap_err();
            assert!(err.to_string().contains("max_sync_bytes"), "{err}");
        }
    }

    both_targets_test! {
        fn stateless_only_config_has_no_poller() {
            let c = FilterConfig::parse(br#"{"account_thumbprint":"0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"}"#).unwrap();
            assert!(Poller::new(&c).is_none());
        }
    }
}
