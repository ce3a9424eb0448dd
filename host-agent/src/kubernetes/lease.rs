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
    move |e| Error::Kubernetes(format!("{what}: {e}"))
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
