//! On-demand TLS: a certificate ordered at the first handshake for a name the
//! policy allows, while Envoy holds that handshake (the SDS server's
//! [`Gate`]). Whoever connects chooses the name, so everything is bounded:
//! the policy (`allow` patterns, and an optional `ask` URL that must answer
//! 200), a wait per handshake, a cap on orders at once, and a cache of
//! refused names (itself bounded) so a flood of one name costs one decision.
//! A refused name orders nothing and stores nothing.
//!
//! An allowed name becomes a certificate of its own (named [`name_for`]),
//! ordered, stored and renewed like a configured one, and served over SDS
//! from then on; the manager restores it after a restart from its status
//! record. The manager also holds what must survive a restart or outlive one
//! handshake: the total cap, the hourly cap (in the CA-limit ledger), names
//! refused after failing again and again, and when each name was last asked
//! for. Envoy asks the SDS server for a name only at its first handshake, so
//! to learn whether a name is still used the manager withdraws it from SDS
//! after `withdraw_seconds` (half of `idle_seconds` unless set: [`idle`]);
//! the next handshake asks again and gets it back at once, and a name nobody
//! asks for is removed. Envoy never drops a name by itself, so the manager
//! also withdraws the least recently asked for beyond `max_served`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Empty;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::OnDemand as Config;

use crate::domain::names::{is_valid_domain, on_demand_allows};
use crate::ports::requests::{CAP_REFUSAL, Request};
use crate::ports::secrets::Gate;

/// Most refused names remembered; beyond, a refusal is not cached (the next
/// handshake for it is decided again, still bounded by the caps).
const MAX_REFUSED: usize = 10_000;
/// How long the ask URL may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the idle rule says about an on-demand certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Nothing to do before `until`.
    Keep { until: SystemTime },
    /// Withdraw it from SDS (kept in storage): the next handshake asks for
    /// it again, which shows it is still used.
    Withdraw,
    /// No handshake asked for it in `idle_seconds`: remove it.
    Remove,
}

/// The idle rule: withdrawn from SDS once `withdraw` has passed since a
/// handshake last asked for it (`on_demand.withdraw_after`: half of `idle`
/// unless set), removed once `idle` has.
pub fn idle(
    last_requested: SystemTime,
    (withdraw, idle): (Duration, Duration),
    withdrawn: bool,
    now: SystemTime,
) -> Idle {
    let remove_at = last_requested + idle;
    let withdraw_at = last_requested + withdraw.min(idle);
    if now >= remove_at {
        Idle::Remove
    } else if now >= withdraw_at && !withdrawn {
        Idle::Withdraw
    } else if now >= withdraw_at {
        Idle::Keep { until: remove_at }
    } else {
        Idle::Keep { until: withdraw_at }
    }
}

/// Whether the patterns allow `name` (no network): a valid DNS name an
/// `allow` pattern matches (or any, when only `ask` decides).
pub fn allowed_by_patterns(config: &Config, name: &str) -> bool {
    is_valid_domain(name)
        && (config.allow.is_empty() || config.allow.iter().any(|p| on_demand_allows(p, name)))
}

/// The whole policy for `name`: the patterns, then the `ask` URL. `None`:
/// `[on_demand]` is not configured (any more), so nothing is allowed.
pub async fn allows(config: Option<&Config>, name: &str) -> Result<bool, String> {
    let Some(config) = config else {
        return Ok(false);
    };
    if !allowed_by_patterns(config, name) {
        return Ok(false);
    }
    match &config.ask {
        Some(url) => ask(url, name).await,
        None => Ok(true),
    }
}

/// The `ask` URL's answer for `name`: only a 200 allows.
async fn ask(url: &str, name: &str) -> Result<bool, String> {
    let separator = if url.contains('?') { '&' } else { '?' };
    let uri: http::Uri = format!("{url}{separator}domain={name}")
        .parse()
        .map_err(|e| format!("ask URL: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let request = http::Request::get(uri)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(ASK_TIMEOUT, client.request(request)).await {
        Err(_) => Err(format!("ask URL did not answer within {ASK_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("ask URL: {e}")),
        Ok(Ok(response)) => Ok(response.status() == http::StatusCode::OK),
    }
}

#[derive(Default)]
struct State {
    /// Names being got, until when their handshakes are held.
    held: HashMap<String, Instant>,
    /// Refused names, until when.
    refused: HashMap<String, Instant>,
}

/// The on-demand policy as the SDS server's gate.
pub struct OnDemandGate {
    config: Config,
    manager: mpsc::Sender<Request>,
    /// What the SDS server serves: a held name is done once it is there.
    served: Arc<crate::ports::secrets::SecretSet>,
    state: Mutex<State>,
    refusals: watch::Sender<u64>,
}

impl OnDemandGate {
    pub fn new(
        config: Config,
        manager: mpsc::Sender<Request>,
        served: Arc<crate::ports::secrets::SecretSet>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            manager,
            served,
            state: Mutex::new(State::default()),
            refusals: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refuse(&self, name: &str, why: &str, for_how_long: Duration) {
        let now = Instant::now();
        let mut state = self.lock();
        state.held.remove(name);
        if state.refused.len() >= MAX_REFUSED {
            state.refused.retain(|_, until| *until > now);
        }
        if state.refused.len() < MAX_REFUSED {
            state.refused.insert(name.to_owned(), now + for_how_long);
        }
        drop(state);
        info!(name, "on-demand certificate refused: {why}");
        self.refusals.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn refused_for(&self) -> Duration {
        Duration::from_secs(self.config.refused_cache_seconds)
    }

    /// Decides the network part and asks the manager for the certificate
    /// (which applies the caps that must survive a restart).
    async fn get(self: Arc<Self>, name: String) {
        if let Some(url) = &self.config.ask {
            match ask(url, &name).await {
                Ok(true) => {}
                Ok(false) => return self.refuse(&name, "the ask URL said no", self.refused_for()),
                Err(e) => {
                    warn!(name, "{e}");
                    return self.refuse(&name, "the ask URL failed", CAP_REFUSAL);
                }
            }
        }
        let (reply, answer) = oneshot::channel();
        let request = Request::OnDemand {
            domain: name.clone(),
            key_type: self.config.key_type,
            reply,
        };
        if self.manager.send(request).await.is_err() {
            return self.refuse(&name, "the agent is stopping", CAP_REFUSAL);
        }
        match answer.await {
            Ok(Ok(())) => info!(name, "on-demand certificate requested"),
            Ok(Err(refusal)) => self.refuse(&name, &refusal.why, refusal.for_how_long),
            Err(_) => self.refuse(&name, "the agent is stopping", CAP_REFUSAL),
        }
    }
}

/// The gate as the SDS server calls it.
pub struct Handle(pub Arc<OnDemandGate>);

impl Gate for Handle {
    fn requested(&self, name: &str) -> Option<Duration> {
        let gate = &self.0;
        let now = Instant::now();
        let wait = Duration::from_secs(gate.config.max_wait_seconds);
        let mut state = gate.lock();
        if state.refused.get(name).is_some_and(|until| *until > now) {
            return None;
        }
        // Done (served) or timed out: no longer counts against max_concurrent.
        state
            .held
            .retain(|held, until| *until > now && !gate.served.contains(held));
        if let Some(until) = state.held.get(name) {
            return Some(until.duration_since(now));
        }
        if !allowed_by_patterns(&gate.config, name) {
            drop(state);
            gate.refuse(name, "not allowed by on_demand.allow", gate.refused_for());
            return None;
        }
        if state.held.len() >= gate.config.max_concurrent {
            return None;
        }
        state.held.insert(name.to_owned(), now + wait);
        drop(state);
        tokio::spawn(Arc::clone(gate).get(name.to_owned()));
        Some(wait)
    }

    fn refused(&self, name: &str) -> bool {
        self.0
            .lock()
            .refused
            .get(name)
            .is_some_and(|until| *until > Instant::now())
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.refusals.subscribe()
    }

    /// A handshake asked for a name that is served: the manager notes it (an
    /// on-demand name in use is kept and renewed). A held name served now is
    /// held no more (else, once withdrawn, its next handshake would only be
    /// held, and the manager never asked).
    fn seen(&self, name: &str) {
        self.0.lock().held.remove(name);
        let manager = self.0.manager.clone();
        let request = Request::Seen {
            domain: name.to_owned(),
        };
        // Never blocks the SDS stream; a full queue drops the note (the name
        // is then withdrawn once more and asked for again).
        if let Err(e) = manager.try_send(request) {
            debug!("on-demand request note dropped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_not_asked_for_is_withdrawn_halfway_and_removed_at_the_end() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s);
        let day = Duration::from_secs(86_400);
        // (last asked, withdrawn, now, what to do)
        let cases = [
            (
                0,
                false,
                0,
                Idle::Keep {
                    until: t(15 * 86_400),
                },
            ),
            (
                0,
                false,
                15 * 86_400 - 1,
                Idle::Keep {
                    until: t(15 * 86_400),
                },
            ),
            (0, false, 15 * 86_400, Idle::Withdraw),
            (
                0,
                true,
                15 * 86_400,
                Idle::Keep {
                    until: t(30 * 86_400),
                },
            ),
            (0, true, 30 * 86_400, Idle::Remove),
            (0, false, 40 * 86_400, Idle::Remove),
            // Asked again (the handshake after the withdrawal): kept again.
            (
                20 * 86_400,
                false,
                21 * 86_400,
                Idle::Keep {
                    until: t(35 * 86_400),
                },
            ),
        ];
        for (last, withdrawn, now, want) in cases {
            assert_eq!(
                idle(t(last), (15 * day, 30 * day), withdrawn, t(now)),
                want,
                "last {last} withdrawn {withdrawn} now {now}"
            );
        }
    }

    #[test]
    fn a_shorter_withdrawal_withdraws_sooner_and_removes_as_before() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s);
        let periods = (Duration::from_secs(3_600), Duration::from_secs(30 * 86_400));
        assert_eq!(
            idle(t(0), periods, false, t(3_599)),
            Idle::Keep { until: t(3_600) }
        );
        assert_eq!(idle(t(0), periods, false, t(3_600)), Idle::Withdraw);
        assert_eq!(
            idle(t(0), periods, true, t(3_600)),
            Idle::Keep {
                until: t(30 * 86_400)
            }
        );
        assert_eq!(idle(t(0), periods, true, t(30 * 86_400)), Idle::Remove);
    }

    fn gate(allow: &[&str], max_concurrent: usize) -> (Handle, mpsc::Receiver<Request>) {
        let (handle, rx, _) = gate_serving(allow, max_concurrent);
        (handle, rx)
    }

    fn gate_serving(
        allow: &[&str],
        max_concurrent: usize,
    ) -> (
        Handle,
        mpsc::Receiver<Request>,
        Arc<crate::ports::secrets::SecretSet>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let config = Config {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ask: None,
            max_wait_seconds: 10,
            max_concurrent,
            max_per_hour: 20,
            refused_cache_seconds: 300,
            key_type: Default::default(),
            max_certificates: 100,
            idle_seconds: 30 * 86_400,
            withdraw_seconds: None,
            max_served: 1_000,
            max_failures: 3,
            failed_refusal_seconds: 86_400,
        };
        let served = Arc::new(crate::ports::secrets::SecretSet::new());
        (
            Handle(OnDemandGate::new(config, tx, Arc::clone(&served))),
            rx,
            served,
        )
    }

    #[tokio::test]
    async fn only_allowed_names_are_held_and_asked_for_once() {
        let (gate, mut requests) = gate(&["*.shop.example.com"], 2);
        assert_eq!(gate.requested("evil.example.org"), None);
        assert!(gate.refused("evil.example.org"), "a refusal is remembered");
        assert_eq!(
            gate.requested("A.shop.example.com"),
            None,
            "not a lower-case name"
        );
        assert!(gate.requested("a.shop.example.com").is_some());
        // The same name again: held, not asked again.
        assert!(gate.requested("a.shop.example.com").is_some());
        let Some(Request::OnDemand { domain, reply, .. }) = requests.recv().await else {
            panic!("no request");
        };
        assert_eq!(domain, "a.shop.example.com");
        let _ = reply.send(Ok(()));
        // The concurrency cap: one more held name, then refusals (not cached).
        assert!(gate.requested("b.shop.example.com").is_some());
        assert_eq!(gate.requested("c.shop.example.com"), None);
        assert!(!gate.refused("c.shop.example.com"));
        drop(requests);
    }

    #[tokio::test]
    async fn a_served_name_frees_its_slot() {
        let (gate, _requests, served) = gate_serving(&["*.shop.example.com"], 1);
        assert!(gate.requested("a.shop.example.com").is_some());
        assert_eq!(gate.requested("b.shop.example.com"), None, "one at a time");
        let (chain, key) =
            crate::certificate::placeholder(&["a.shop.example.com".to_owned()], Default::default())
                .unwrap();
        served.set("od-a", &["a.shop.example.com".to_owned()], &chain, &key);
        assert!(gate.requested("b.shop.example.com").is_some());
    }

    #[tokio::test]
    async fn a_refusal_by_the_manager_is_remembered_briefly_and_wakes_streams() {
        let (gate, mut requests) = gate(&["a.example.com"], 4);
        let mut woken = gate.subscribe();
        assert!(gate.requested("a.example.com").is_some());
        let Some(Request::OnDemand { reply, .. }) = requests.recv().await else {
            panic!("no request");
        };
        let _ = reply.send(Err(crate::ports::requests::Refusal::new(
            "full",
            Duration::from_secs(60),
        )));
        woken.changed().await.unwrap();
        assert!(gate.refused("a.example.com"));
    }
}

#[cfg(test)]
mod expiry_tests {
    //! The refusal cache and the holds, across their expiry (real time, in
    //! seconds: the gate reads the monotonic clock). Each check before an
    //! edge comes milliseconds after its start, seconds before the edge; each
    //! check after one follows a sleep past it, and sleeps only run long.

    use super::*;
    use crate::ports::requests::Refusal;

    fn gate(
        max_wait_seconds: u64,
        max_concurrent: usize,
        refused_cache_seconds: u64,
    ) -> (Handle, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(16);
        let config = Config {
            allow: vec!["*.shop.example.com".into()],
            ask: None,
            max_wait_seconds,
            max_concurrent,
            max_per_hour: 20,
            refused_cache_seconds,
            key_type: Default::default(),
            max_certificates: 100,
            idle_seconds: 30 * 86_400,
            withdraw_seconds: None,
            max_served: 1_000,
            max_failures: 3,
            failed_refusal_seconds: 86_400,
        };
        let served = Arc::new(crate::ports::secrets::SecretSet::new());
        (Handle(OnDemandGate::new(config, tx, served)), rx)
    }

    /// The next request to the manager: its name, answered with `answer`.
    async fn next_request(
        requests: &mut mpsc::Receiver<Request>,
        answer: Result<(), Refusal>,
    ) -> String {
        let Some(Request::OnDemand { domain, reply, .. }) = requests.recv().await else {
            panic!("no on-demand request");
        };
        let _ = reply.send(answer);
        domain
    }

    #[tokio::test]
    async fn a_refusal_by_the_manager_is_cached_for_its_time_then_decided_again() {
        let (gate, mut requests) = gate(10, 4, 300);
        let mut refusals = gate.subscribe();
        assert!(gate.requested("a.shop.example.com").is_some());
        let asked = next_request(
            &mut requests,
            Err(Refusal::new("full", Duration::from_secs(2))),
        )
        .await;
        assert_eq!(asked, "a.shop.example.com");
        refusals.changed().await.expect("woken by the refusal");
        // Cached: refused at once, and the manager is not asked again.
        assert!(gate.refused("a.shop.example.com"));
        assert_eq!(gate.requested("a.shop.example.com"), None);
        assert!(requests.try_recv().is_err(), "asked again while cached");
        assert!(!refusals.has_changed().expect("open"), "no new decision");
        // Sleeps only last longer than asked: past the refusal's 2 s.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        // Expired: decided again, which asks the manager again.
        assert!(!gate.refused("a.shop.example.com"));
        assert!(gate.requested("a.shop.example.com").is_some());
        assert_eq!(
            next_request(&mut requests, Ok(())).await,
            "a.shop.example.com"
        );
    }

    #[tokio::test]
    async fn a_name_the_patterns_refuse_is_cached_for_refused_cache_seconds() {
        let (gate, _requests) = gate(10, 4, 2);
        let refusals = gate.subscribe();
        assert_eq!(gate.requested("evil.example.org"), None);
        assert_eq!(*refusals.borrow(), 1, "one decision");
        for _ in 0..5 {
            assert_eq!(gate.requested("evil.example.org"), None);
        }
        assert_eq!(*refusals.borrow(), 1, "the cache answered the others");
        assert!(gate.refused("evil.example.org"));
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert!(
            !gate.refused("evil.example.org"),
            "past refused_cache_seconds"
        );
        assert_eq!(gate.requested("evil.example.org"), None);
        assert_eq!(*refusals.borrow(), 2, "decided again once expired");
    }

    #[tokio::test]
    async fn a_hold_ends_at_max_wait_and_frees_its_slot() {
        let (gate, mut requests) = gate(2, 1, 300);
        let wait = gate.requested("a.shop.example.com").expect("held");
        assert_eq!(wait, Duration::from_secs(2));
        assert_eq!(
            next_request(&mut requests, Ok(())).await,
            "a.shop.example.com"
        );
        // Held: the same name waits out the rest of its hold, asked once;
        // another name finds no slot (max_concurrent = 1), uncached.
        let rest = gate.requested("a.shop.example.com").expect("still held");
        assert!(rest <= wait, "{rest:?}");
        assert_eq!(gate.requested("b.shop.example.com"), None);
        assert!(
            !gate.refused("b.shop.example.com"),
            "a full gate is no refusal"
        );
        assert!(requests.try_recv().is_err(), "asked twice for one hold");
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        // The hold ended with nothing served: the slot is free again.
        assert!(gate.requested("b.shop.example.com").is_some());
        assert_eq!(
            next_request(&mut requests, Ok(())).await,
            "b.shop.example.com"
        );
    }

    #[tokio::test]
    async fn a_seen_name_is_held_no_more() {
        let (gate, mut requests) = gate(10, 1, 300);
        assert!(gate.requested("a.shop.example.com").is_some());
        next_request(&mut requests, Ok(())).await;
        gate.seen("a.shop.example.com");
        let Some(Request::Seen { domain }) = requests.recv().await else {
            panic!("the manager is told the name was seen");
        };
        assert_eq!(domain, "a.shop.example.com");
        assert!(
            gate.requested("b.shop.example.com").is_some(),
            "the slot of a seen name is free"
        );
    }

    #[tokio::test]
    async fn the_refusal_cache_is_bounded_and_makes_room_from_expired_entries() {
        let (gate, _requests) = gate(10, 4, 300);
        let for_long = Duration::from_secs(300);
        for i in 0..MAX_REFUSED {
            gate.0
                .refuse(&format!("n{i}.example.org"), "test", for_long);
        }
        // Full of live refusals: one more is not cached (decided again).
        gate.0.refuse("extra.example.org", "test", for_long);
        assert!(!gate.refused("extra.example.org"));
        assert!(gate.refused("n0.example.org"));
        assert_eq!(gate.0.lock().refused.len(), MAX_REFUSED);
        // Full of expired ones: they make room.
        let (gate, _requests) = super::expiry_tests::gate(10, 4, 300);
        for i in 0..MAX_REFUSED {
            gate.0
                .refuse(&format!("n{i}.example.org"), "test", Duration::ZERO);
        }
        gate.0.refuse("extra.example.org", "test", for_long);
        assert!(gate.refused("extra.example.org"));
        assert_eq!(gate.0.lock().refused.len(), 1);
    }
}
