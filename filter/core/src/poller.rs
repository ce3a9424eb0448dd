//! The sync loop's state machine: when to long-poll the agent, and what a
//! response means. See `docs/challenge-sync.md` for the protocol.

use crate::Error;
use crate::auth;
use crate::backoff::Backoff;
use crate::config::FilterConfig;
use crate::snapshot::Snapshot;
use crate::store::Position;

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
    token: Option<String>,
    wait_seconds: u32,
    max_body: usize,
    backoff: Backoff,
    state: State,
    /// The nonce of the call in flight: its answer must be signed with it.
    nonce: Option<String>,
}

/// What the agent answered, as the host hands it over.
pub struct Answer<'a, F: FnOnce() -> Option<Vec<u8>>> {
    /// `None` when the call failed without a response (connection refused,
    /// reset, timeout).
    pub status: Option<u32>,
    /// The body's announced size.
    pub body_len: usize,
    /// The `x-acme-signature` header, if any.
    pub signature: Option<&'a str>,
    /// Reads the body; called only when its size is acceptable.
    pub read_body: F,
}

impl Poller {
    /// `None` when the configuration has no agent (stateless mode only).
    /// The token is `config.agent_token` (the host resolves
    /// `agent_token_env` into it first).
    pub fn new(config: &FilterConfig) -> Option<Self> {
        Some(Self {
            cluster: config.agent_cluster.clone()?,
            authority: config.agent_authority.clone(),
            token: config.agent_token.clone(),
            wait_seconds: config.poll_wait_seconds,
            max_body: config.max_sync_bytes,
            backoff: Backoff::new(config.backoff_initial_ms, config.backoff_max_ms),
            state: State::Idle,
            nonce: None,
        })
    }

    /// Whether a call is outstanding.
    pub fn in_flight(&self) -> bool {
        self.state == State::InFlight
    }

    /// The call to make now, if any. `stored` is the position of the
    /// snapshot in shared data, so a context that takes over the lease
    /// resumes where the previous poller was; `nonce` is fresh randomness
    /// for the token proof. Only the elected poller polls.
    pub fn poll(
        &mut self,
        now_ms: u64,
        leader: bool,
        stored: &Position,
        nonce: [u8; 16],
    ) -> Option<SyncRequest> {
        let due = match self.state {
            State::Idle => true,
            State::Waiting { until_ms } => now_ms >= until_ms,
            State::InFlight => false,
        };
        if !leader || !due {
            return None;
        }
        self.state = State::InFlight;
        let mut path = format!(
            "{SYNC_PATH}?version={}&wait={}",
            stored.version, self.wait_seconds
        );
        if let Some(instance) = &stored.instance {
            path.push_str("&instance=");
            path.push_str(instance);
        }
        let mut headers = vec![(":method", "GET".to_owned())];
        if let Some(token) = &self.token {
            let nonce = auth::nonce_hex(nonce);
            headers.push((
                "authorization",
                auth::authorization(token, &nonce, now_ms, &path),
            ));
            self.nonce = Some(nonce);
        }
        headers.push((":path", path));
        headers.push((":authority", self.authority.clone()));
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

    /// A snapshot arrived that was not stored (not newer than the stored
    /// one): wait the backoff rather than ask again at once, or an agent
    /// that keeps answering old data would have the filter spin. Returns
    /// the delay.
    pub fn stale(&mut self, now_ms: u64) -> u64 {
        self.fail(now_ms)
    }

    fn fail(&mut self, now_ms: u64) -> u64 {
        let delay = self.backoff.next_delay_ms();
        self.state = State::Waiting {
            until_ms: now_ms.saturating_add(delay),
        };
        delay
    }

    /// Whether the answer is the agent's: signed with the token and this
    /// call's nonce (always true without a token).
    fn signed(&self, status: u32, body: &[u8], signature: Option<&str>) -> bool {
        let (Some(token), Some(nonce)) = (&self.token, &self.nonce) else {
            return self.token.is_none();
        };
        signature.is_some_and(|sig| auth::verify_response(token, nonce, status, body, sig))
    }

    /// Interprets the agent's answer. On error the poller is backing off and
    /// the caller keeps its last good data.
    pub fn on_response<F: FnOnce() -> Option<Vec<u8>>>(
        &mut self,
        now_ms: u64,
        answer: Answer<'_, F>,
    ) -> Result<SyncOutcome, Error> {
        let unsigned = || {
            Error::Sync(
                "the answer is not signed with agent_token: a wrong token, or something other than the agent answers on its address".to_owned(),
            )
        };
        let outcome = match answer.status {
            Some(304) if self.signed(304, b"", answer.signature) => Ok(SyncOutcome::Unchanged),
            Some(304) => Err(unsigned()),
            Some(200) if answer.body_len > self.max_body => Err(Error::Sync(format!(
                "body of {} bytes exceeds max_sync_bytes ({})",
                answer.body_len, self.max_body
            ))),
            Some(200) => {
                let body = (answer.read_body)().unwrap_or_default();
                if self.signed(200, &body, answer.signature) {
                    Snapshot::parse(&body, self.max_body).map(SyncOutcome::Snapshot)
                } else {
                    Err(unsigned())
                }
            }
            Some(other) => Err(Error::Sync(format!("agent answered status {other}"))),
            None => Err(Error::Sync(
                "no response from the agent (connection failure or timeout)".to_owned(),
            )),
        };
        self.nonce = None;
        match &outcome {
            Ok(SyncOutcome::Unchanged) => {
                self.backoff.reset();
                self.state = State::Idle;
            }
            // The backoff is reset only once the snapshot is stored
            // ([`Poller::stored`]); a stale one backs off further.
            Ok(SyncOutcome::Snapshot(_)) => self.state = State::Idle,
            Err(_) => {
                self.fail(now_ms);
            }
        }
        outcome
    }

    /// The snapshot of the last answer was stored: the sync works again.
    pub fn stored(&mut self) {
        self.backoff.reset();
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

    fn at(version: u64) -> Position {
        Position {
            instance: None,
            version,
        }
    }

    const NONCE: [u8; 16] = [7; 16];

    fn header<'a>(r: &'a SyncRequest, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An answer with `status` and `body`, signed with `signature`.
    fn answer<'a>(
        status: Option<u32>,
        body: &'a [u8],
        signature: Option<&'a str>,
    ) -> Answer<'a, impl FnOnce() -> Option<Vec<u8>> + 'a> {
        Answer {
            status,
            body_len: body.len(),
            signature,
            read_body: move || Some(body.to_vec()),
        }
    }

    both_targets_test! {
        fn only_the_leader_polls_and_one_call_at_a_time() {
            let mut p = poller("");
            assert_eq!(p.poll(0, false, &at(0), NONCE), None);
            let r = p.poll(0, true, &at(0), NONCE).unwrap();
            assert_eq!(r.cluster, "agent");
            assert_eq!(header(&r, ":path"), Some("/v1/challenges?version=0&wait=30"));
            assert_eq!(header(&r, ":method"), Some("GET"));
            assert_eq!(header(&r, ":authority"), Some("acme-agent"));
            assert_eq!(header(&r, "authorization"), None);
            assert_eq!(r.timeout_ms, 35_000);
            assert!(p.in_flight());
            assert_eq!(p.poll(1, true, &at(0), NONCE), None);
        }
    }

    both_targets_test! {
        fn the_token_is_proven_never_sent_and_the_instance_is_named() {
            let mut p = poller(r#","agent_token":"s3cret-token","poll_wait_seconds":2"#);
            let stored = Position { instance: Some("abcd".into()), version: 42 };
            let r = p.poll(1_700_000_000_000, true, &stored, NONCE).unwrap();
            let path = "/v1/challenges?version=42&wait=2&instance=abcd";
            assert_eq!(header(&r, ":path"), Some(path));
            let proof = header(&r, "authorization").unwrap();
            assert!(!proof.contains("s3cret"), "{proof}");
            let nonce = auth::nonce_hex(NONCE);
            assert_eq!(proof, auth::authorization("s3cret-token", &nonce, 1_700_000_000_000, path));
        }
    }

    both_targets_test! {
        fn with_a_token_only_answers_signed_for_this_call_are_used() {
            let body = br#"{"version":5,"challenges":[]}"#;
            let nonce = auth::nonce_hex(NONCE);
            let sign = |status: u32, body: &[u8], nonce: &str| {
                // The agent's side of the scheme, from its shared test vector's
                // definition: the MAC over the status and the body.
                use hmac::Mac as _;
                let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret-token").unwrap();
                m.update(format!("acme-sync-response\n{nonce}\n{status}\n").as_bytes());
                m.update(body);
                m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()
            };
            let good = sign(200, body, &nonce);
            let other_call = sign(200, body, &"00".repeat(16));
            for (signature, ok) in [(None, false), (Some(other_call.as_str()), false), (Some("zz"), false), (Some(good.as_str()), true)] {
                let mut p = poller(r#","agent_token":"s3cret-token""#);
                p.poll(0, true, &at(0), NONCE).unwrap();
                let out = p.on_response(0, answer(Some(200), body, signature));
                assert_eq!(out.is_ok(), ok, "{signature:?}: {out:?}");
                if !ok {
                    assert!(out.unwrap_err().to_string().contains("not signed"));
                    assert_eq!(p.poll(1, true, &at(0), NONCE), None, "backs off");
                }
            }
            let unchanged = sign(304, b"", &nonce);
            let mut p = poller(r#","agent_token":"s3cret-token""#);
            p.poll(0, true, &at(0), NONCE).unwrap();
            assert!(p.on_response(0, answer(Some(304), b"", None)).is_err());
            p.poll(10_000, true, &at(0), NONCE).unwrap();
            assert_eq!(p.on_response(0, answer(Some(304), b"", Some(&unchanged))), Ok(SyncOutcome::Unchanged));
        }
    }

    both_targets_test! {
        fn success_polls_again_at_once_and_a_stale_answer_backs_off() {
            let mut p = poller(r#","backoff_initial_ms":100"#);
            p.poll(0, true, &at(0), NONCE).unwrap();
            let body = br#"{"version":5,"challenges":[]}"#;
            let out = p.on_response(10, answer(Some(200), body, None)).unwrap();
            assert!(matches!(out, SyncOutcome::Snapshot(s) if s.version == 5));
            assert!(p.poll(10, true, &at(5), NONCE).is_some());
            let no_body = Answer { status: Some(304), body_len: 0, signature: None, read_body: || -> Option<Vec<u8>> { panic!("no body to read") } };
            assert_eq!(p.on_response(20, no_body), Ok(SyncOutcome::Unchanged));
            assert!(p.poll(20, true, &at(5), NONCE).is_some());
            p.on_response(30, answer(Some(200), body, None)).unwrap();
            assert_eq!(p.stale(30), 100);
            assert_eq!(p.poll(129, true, &at(5), NONCE), None, "a stale answer is not asked again at once");
            assert!(p.poll(130, true, &at(5), NONCE).is_some());
            // Stale again and again: the delay keeps doubling.
            p.on_response(130, answer(Some(200), body, None)).unwrap();
            assert_eq!(p.stale(130), 200);
            p.poll(330, true, &at(5), NONCE).unwrap();
            p.on_response(330, answer(Some(200), body, None)).unwrap();
            assert_eq!(p.stale(330), 400);
            // Stored: back to the first delay.
            p.poll(730, true, &at(5), NONCE).unwrap();
            p.on_response(730, answer(Some(200), body, None)).unwrap();
            p.stored();
            assert_eq!(p.dispatch_failed(730), 100);
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
                p.poll(1000, true, &at(0), NONCE).unwrap();
                assert!(p.on_response(1000, answer(status, body, None)).is_err());
                assert_eq!(p.poll(1099, true, &at(0), NONCE), None, "{status:?} retried too early");
                assert!(p.poll(1100, true, &at(0), NONCE).is_some(), "{status:?} not retried after the delay");
            }
        }
    }

    both_targets_test! {
        fn backoff_sequence_is_capped_exponential() {
            let mut p = poller(r#","backoff_initial_ms":100,"backoff_max_ms":1000"#);
            let delays: Vec<u64> = (0..6).map(|_| p.dispatch_failed(0)).collect();
            assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
            p.poll(1000, true, &at(0), NONCE).unwrap();
            p.on_response(1000, answer(Some(304), b"", None)).unwrap();
            assert_eq!(p.dispatch_failed(1000), 100, "success resets the backoff");
        }
    }

    both_targets_test! {
        fn oversized_body_is_not_read() {
            let mut p = poller(r#","max_sync_bytes":1024"#);
            p.poll(0, true, &at(0), NONCE).unwrap();
            let big = Answer { status: Some(200), body_len: 1025, signature: None, read_body: || -> Option<Vec<u8>> { panic!("read") } };
            let err = p.on_response(0, big).unwrap_err();
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
