//! One agent of several replicas orders and renews: the holder of a
//! `coordination.k8s.io/v1` Lease. Every write names the resourceVersion it
//! read, so the API server's optimistic concurrency (409 on a stale version)
//! decides a race: two replicas can never both take the Lease. Expiry is
//! judged on the local monotonic clock only, never by comparing another
//! machine's timestamps: a follower takes over when it has seen the Lease
//! unchanged for its whole duration; a holder knows it holds only while its
//! last successful renewal is younger than the duration, and checks the API
//! again right before each order, so a paused former holder (SIGSTOP, a
//! long GC, a frozen VM) places no order after it wakes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::info;

use crate::Error;
use crate::ports::leader::Leader;

#[derive(Default)]
struct Held {
    /// The Lease's version after our last successful write.
    version: Option<String>,
    /// When that write succeeded (local monotonic clock).
    renewed_at: Option<Instant>,
    /// Another holder's version, and when we first saw it.
    observed: Option<(String, Instant)>,
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    held: Mutex<Held>,
}

fn failed(what: &str) -> impl FnOnce(kube::Error) -> Error + '_ {
    move |e| Error::Kubernetes(format!("{what}: {}", super::describe(&e)))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            held: Mutex::new(Held::default()),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = now_micro();
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn wrote(&self, lease: &Lease, at: Instant) {
        let mut held = self.held();
        held.version = lease.metadata.resource_version.clone();
        held.renewed_at = Some(at);
        held.observed = None;
    }

    /// One round: takes the Lease if it is free or has expired, renews it if
    /// it is ours. Whether we hold it afterwards.
    pub async fn acquire_or_renew(&self) -> Result<bool, Error> {
        let started = Instant::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(failed("reading the Lease"))?;
        let Some(lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.wrote(&created, started);
                    info!(identity = self.identity, "took the Lease (created it)");
                    Ok(true)
                }
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(failed("creating the Lease")(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() {
            // Someone else's: expired only once we have seen this very
            // version for its whole duration, by our own clock.
            let their = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            );
            let mut held = self.held();
            held.version = None;
            held.renewed_at = None;
            match &held.observed {
                Some((seen, since)) if *seen == version => {
                    if since.elapsed() < their {
                        return Ok(false);
                    }
                }
                _ => {
                    held.observed = Some((version, started));
                    return Ok(false);
                }
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut next = lease.clone();
        next.spec = Some(self.spec(transitions, acquired));
        // The version we read goes with the write: a stale one is refused.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.wrote(&written, started);
                if !ours {
                    info!(
                        identity = self.identity,
                        from = holder,
                        "took the Lease over"
                    );
                }
                Ok(true)
            }
            Err(e) if is_conflict(&e) => {
                let mut held = self.held();
                held.version = None;
                held.renewed_at = None;
                Ok(false)
            }
            Err(e) => Err(failed("writing the Lease")(e)),
        }
    }

    /// Whether our last renewal is younger than the Lease's duration (local
    /// clock): false for a holder that was paused past it.
    pub fn holds_locally(&self) -> bool {
        self.held()
            .renewed_at
            .is_some_and(|at| at.elapsed() < self.duration)
    }

    /// Right before an order: holds locally, and the API still shows the
    /// Lease as ours at the version we last wrote.
    pub async fn still_holds(&self) -> bool {
        if !self.holds_locally() {
            return false;
        }
        let expected = self.held().version.clone();
        match self.api.get_opt(&self.name).await {
            Ok(Some(lease)) => {
                lease.metadata.resource_version == expected
                    && lease
                        .spec
                        .and_then(|s| s.holder_identity)
                        .is_some_and(|h| h == self.identity)
            }
            _ => false,
        }
    }
}

#[async_trait::async_trait]
impl Leader for Elector {
    fn identity(&self) -> &str {
        Elector::identity(self)
    }

    async fn still_holds(&self) -> bool {
        Elector::still_holds(self).await
    }
}

#[cfg(test)]
mod tests {
    //! The elector against an in-process fake of the Lease endpoints (get,
    //! create, replace with optimistic concurrency), which can be told to
    //! fail a method: no API server runs in a unit test.

    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use serde_json::{Value, json};
    use std::sync::Arc;

    const NS: &str = "ns";
    const NAME: &str = "acme-agent";

    #[derive(Default)]
    struct Fake {
        lease: Option<Value>,
        version: u64,
        /// Method -> status answered instead.
        faults: std::collections::BTreeMap<String, u16>,
        writes: usize,
    }

    type Shared = Arc<Mutex<Fake>>;

    fn status(code: u16, reason: &str) -> http::Response<Full<Bytes>> {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "message": reason, "code": code});
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a response")
    }

    fn object(code: u16, value: &Value) -> http::Response<Full<Bytes>> {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(value.to_string())))
            .expect("a response")
    }

    fn answer(fake: &Shared, method: &str, body: &[u8]) -> http::Response<Full<Bytes>> {
        let mut fake = fake.lock().expect("the fake");
        if let Some(code) = fake.faults.get(method) {
            return status(*code, "Injected");
        }
        match (method, fake.lease.clone()) {
            ("GET", Some(lease)) => object(200, &lease),
            ("GET", None) | ("PUT", None) => status(404, "NotFound"),
            ("POST", Some(_)) => status(409, "AlreadyExists"),
            ("POST", None) | ("PUT", Some(_)) => {
                let mut lease: Value = serde_json::from_slice(body).expect("a Lease");
                if let Some(current) = &fake.lease
                    && lease["metadata"]["resourceVersion"]
                        != current["metadata"]["resourceVersion"]
                {
                    return status(409, "Conflict");
                }
                fake.version += 1;
                fake.writes += 1;
                lease["metadata"]["resourceVersion"] = json!(fake.version.to_string());
                fake.lease = Some(lease.clone());
                object(if method == "POST" { 201 } else { 200 }, &lease)
            }
            _ => status(405, "MethodNotAllowed"),
        }
    }

    fn client(fake: &Shared) -> Client {
        let fake = Arc::clone(fake);
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let fake = Arc::clone(&fake);
            async move {
                let method = request.method().as_str().to_owned();
                let path = request.uri().path().to_owned();
                assert!(
                    path.starts_with(&format!(
                        "/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
                    )),
                    "{path}"
                );
                let body = request.into_body().collect().await?.to_bytes();
                Ok::<_, kube::Error>(answer(&fake, &method, &body))
            }
        });
        Client::new(service, NS)
    }

    fn elector(fake: &Shared, identity: &str, duration: Duration) -> Elector {
        Elector::new(client(fake), NS, NAME, identity, duration)
    }

    /// Puts a Lease held by `holder` for `seconds` in place, as another
    /// replica would have written it.
    fn held_by(fake: &Shared, holder: &str, seconds: i32) {
        let mut fake = fake.lock().expect("the fake");
        fake.version += 1;
        fake.lease = Some(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS, "resourceVersion": fake.version.to_string()},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds,
                     "leaseTransitions": 4, "renewTime": "2026-01-01T00:00:00.000000Z"},
        }));
    }

    fn spec(fake: &Shared) -> Value {
        fake.lock()
            .expect("the fake")
            .lease
            .clone()
            .expect("a Lease")["spec"]
            .clone()
    }

    fn fail(fake: &Shared, method: &str, code: u16) {
        fake.lock()
            .expect("the fake")
            .faults
            .insert(method.to_owned(), code);
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_held_and_renewed_keeping_its_acquire_time() {
        let fake = Shared::default();
        let a = elector(&fake, "a", Duration::from_secs(15));
        assert!(!a.holds_locally(), "nothing written yet");
        assert!(a.acquire_or_renew().await.expect("created"));
        assert!(a.holds_locally());
        assert!(a.still_holds().await);
        let created = spec(&fake);
        assert_eq!(created["holderIdentity"], "a");
        assert_eq!(created["leaseDurationSeconds"], 15);
        assert_eq!(created["leaseTransitions"], 0);
        assert!(a.acquire_or_renew().await.expect("renewed"));
        let renewed = spec(&fake);
        assert_eq!(renewed["acquireTime"], created["acquireTime"]);
        assert_eq!(renewed["leaseTransitions"], 0, "a renewal is no transition");
        assert_eq!(fake.lock().expect("the fake").writes, 2);
        assert!(a.still_holds().await);
    }

    #[tokio::test]
    async fn a_create_race_lost_is_no_error_and_no_hold() {
        let fake = Shared::default();
        fail(&fake, "POST", 409);
        let b = elector(&fake, "b", Duration::from_secs(15));
        assert!(!b.acquire_or_renew().await.expect("a lost race"));
        assert!(!b.holds_locally());
        assert!(!b.still_holds().await);
        fail(&fake, "POST", 500);
        assert!(
            b.acquire_or_renew().await.is_err(),
            "another failure is one"
        );
    }

    #[tokio::test]
    async fn another_holders_lease_is_taken_only_once_seen_unchanged_for_its_duration() {
        // The other holder's Lease lasts 3 s. Sleeps only ever last longer
        // than asked, so the margins are on the side that waits: a check that
        // it is "not expired yet" comes 1.5 s before the edge.
        let fake = Shared::default();
        held_by(&fake, "other", 3);
        let b = elector(&fake, "b", Duration::from_secs(15));
        // First sight, and at once again: not expired by our clock.
        assert!(!b.acquire_or_renew().await.expect("read"));
        assert!(!b.acquire_or_renew().await.expect("read"));
        assert_eq!(spec(&fake)["holderIdentity"], "other");
        // The holder renews (a new version) 2 s on: the observation starts
        // over, though the first one is older than the Lease 1.5 s later.
        tokio::time::sleep(Duration::from_secs(2)).await;
        held_by(&fake, "other", 3);
        assert!(!b.acquire_or_renew().await.expect("read"));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(
            !b.acquire_or_renew().await.expect("read"),
            "seen unchanged for 1.5 s of 3 s: not expired"
        );
        assert_eq!(fake.lock().expect("the fake").writes, 0, "never written");
        tokio::time::sleep(Duration::from_millis(1_600)).await;
        assert!(b.acquire_or_renew().await.expect("taken over"));
        let taken = spec(&fake);
        assert_eq!(taken["holderIdentity"], "b");
        assert_eq!(taken["leaseTransitions"], 5, "one transition more");
        assert_eq!(taken["leaseDurationSeconds"], 15, "our duration now");
        assert!(b.still_holds().await);
    }

    #[tokio::test]
    async fn a_write_refused_as_stale_drops_the_hold_at_once() {
        let fake = Shared::default();
        let a = elector(&fake, "a", Duration::from_secs(15));
        assert!(a.acquire_or_renew().await.expect("created"));
        fail(&fake, "PUT", 409);
        assert!(!a.acquire_or_renew().await.expect("a conflict is no error"));
        assert!(!a.holds_locally(), "no longer ours");
        assert!(!a.still_holds().await);
    }

    #[tokio::test]
    async fn a_failing_write_keeps_the_hold_only_until_the_duration_has_passed() {
        let fake = Shared::default();
        // 2 s: the in-process calls before the "still young" checks take
        // milliseconds; the sleep past the edge only ever lasts longer.
        let a = elector(&fake, "a", Duration::from_secs(2));
        assert!(a.acquire_or_renew().await.expect("created"));
        fail(&fake, "PUT", 500);
        let error = a.acquire_or_renew().await.expect_err("a failed write");
        assert!(error.to_string().contains("writing the Lease"), "{error}");
        assert!(a.holds_locally(), "the last renewal is still young");
        assert!(a.still_holds().await, "the API still shows our version");
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert!(!a.holds_locally(), "the duration passed without a renewal");
        assert!(!a.still_holds().await, "never asked once not held locally");
    }

    #[tokio::test]
    async fn still_holds_asks_the_api_and_fails_closed() {
        let fake = Shared::default();
        let a = elector(&fake, "a", Duration::from_secs(15));
        assert!(a.acquire_or_renew().await.expect("created"));
        // Another replica wrote the Lease meanwhile (a new version).
        held_by(&fake, "a", 15);
        assert!(!a.still_holds().await, "not the version we wrote");
        assert!(a.acquire_or_renew().await.expect("renewed"));
        assert!(a.still_holds().await);
        held_by(&fake, "b", 15);
        assert!(!a.still_holds().await, "another holder");
        fake.lock().expect("the fake").lease = None;
        assert!(!a.still_holds().await, "no Lease");
        assert!(a.acquire_or_renew().await.expect("created again"));
        fail(&fake, "GET", 500);
        assert!(!a.still_holds().await, "an unanswered read is no hold");
        assert!(a.acquire_or_renew().await.is_err());
    }
}
