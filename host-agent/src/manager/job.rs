//! One look at one certificate, on its own task: restore it from the store,
//! install a certificate that is waiting for a step, or check whether an
//! order is due (renewal info, two thirds) and place it within the CA-limit
//! budget. What a failure means is decided here; the loop only records it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{Instrument, info, info_span, warn};

use super::Shared;
use super::entry::{Awaiting, Restored};
use super::ledger::Refused;
use super::restore;
use super::trigger::{Reason, Served};
use crate::Error;
use crate::certificate::Leaf;
use crate::config::OnDemand;
use crate::domain::budget::{Blocked, Finished, Spend};
use crate::domain::schedule;
use crate::domain::spec::{Certificate, KeyType};
use crate::ports::issuer::{OrderRequest, Trigger};
use crate::ports::sink::IssuedCertificate;
use crate::ports::store::StoredCertificate;

/// Renewal info is fetched again at least this often (Let's Encrypt asks
/// for at least daily; RFC 9773 section 4.3.2 treats a longer `Retry-After`
/// as a day), honouring a shorter `Retry-After` ...
pub const ARI_RECHECK_MAX: Duration = Duration::from_secs(86_400);
/// ... and, whatever its `Retry-After` says, not more often than this.
pub const ARI_RECHECK_MIN: Duration = Duration::from_secs(60);
/// Without a reachable CA, a certificate with nothing due looks again after this.
const UNREACHABLE_RECHECK: Duration = Duration::from_secs(3600);

/// What a job found or did.
pub enum Outcome {
    Restored(Box<Restored>),
    RestoreFailed(Error),
    /// A new certificate is stored and installed.
    Installed {
        leaf: Leaf,
        key_type: KeyType,
        /// It came from an order (counted as a successful one).
        ordered: bool,
    },
    /// Nothing to order yet: renew at `renew_at`, look again at `check_at`.
    Wait {
        renew_at: SystemTime,
        check_at: SystemTime,
    },
    Failed {
        error: Error,
        retry_after: Option<Duration>,
        /// An order was placed (so it counts in the orders metric).
        ordered: bool,
        reason: Option<Reason>,
        /// An issued certificate still waiting for a step.
        awaiting: Option<Awaiting>,
    },
    /// An order would exceed a CA limit.
    Blocked {
        blocked: Blocked,
        reason: Option<Reason>,
    },
    /// An on-demand certificate the policy no longer allows: removed.
    Disallowed(String),
}

impl Outcome {
    pub(super) fn failed(error: Error, reason: Option<Reason>) -> Self {
        Self::Failed {
            error,
            retry_after: None,
            ordered: false,
            reason,
            awaiting: None,
        }
    }
}

/// What a job needs to know of its entry.
pub enum Task {
    Restore,
    Install(Awaiting),
    Look {
        served: Option<Arc<Served>>,
        /// The reason that needs no clock (`trigger::reason`).
        reason: Option<Reason>,
        two_thirds: Option<SystemTime>,
        /// Where in the CA's renewal window to renew, fixed per served leaf:
        /// the same window gives the same time at every check (a new random
        /// point each time would move the schedule, and rewrite the status,
        /// at every check).
        jitter: f64,
    },
}

pub struct Job {
    pub shared: Arc<Shared>,
    pub spec: Arc<Certificate>,
    pub task: Task,
    /// Set for an on-demand certificate.
    pub on_demand: Option<OnDemandJob>,
}

/// An on-demand certificate's policy, asked again at restore and before an
/// order (a name allowed once is not allowed for good).
#[derive(Clone)]
pub struct OnDemandJob {
    /// `None`: `[on_demand]` is no longer configured, so nothing is allowed.
    pub config: Option<Arc<OnDemand>>,
    /// False right after the handshake that added it was decided.
    pub recheck: bool,
}

impl OnDemandJob {
    /// The policy's answer for the certificate's one name.
    async fn allows(&self, spec: &Certificate) -> Result<bool, Error> {
        let Some(domain) = spec.domains.first() else {
            return Ok(false);
        };
        crate::on_demand::allows(self.config.as_deref(), domain)
            .await
            .map_err(Error::Policy)
    }
}

/// A ledger reservation, ended by [`Reservation::end`] as `how` says, or
/// when dropped (an aborted job) in the background, as [`Finished::Unknown`]
/// unless told otherwise: a job aborted mid-order may have been issued a
/// certificate and had its challenges fail, and counting both is the safe
/// side.
struct Reservation<'a> {
    shared: &'a Arc<Shared>,
    name: &'a str,
    domains: &'a [String],
    how: Option<Finished>,
    ended: bool,
}

impl Reservation<'_> {
    /// Ends it now, the ledger written when this returns. Dropped half-way
    /// (the job aborted), the drop ends it again: ending twice changes
    /// nothing more.
    async fn end(mut self) {
        let how = self.how.clone().unwrap_or(Finished::Unknown);
        let s = self.shared;
        s.ledger
            .finish(s.store.as_ref(), self.name, self.domains, &how)
            .await;
        self.ended = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let how = self.how.take().unwrap_or(Finished::Unknown);
        let shared = Arc::clone(self.shared);
        let (name, domains) = (self.name.to_owned(), self.domains.to_vec());
        self.shared.end_later(async move {
            shared
                .ledger
                .finish(shared.store.as_ref(), &name, &domains, &how)
                .await;
        });
    }
}

/// Counts the names an order is about to hand to the CA in the ledger.
struct Triggered<'a> {
    shared: &'a Shared,
    name: &'a str,
}

#[async_trait::async_trait]
impl Trigger for Triggered<'_> {
    async fn trigger(&self, names: &[String]) -> Result<(), Error> {
        let s = self.shared;
        s.ledger.trigger(s.store.as_ref(), self.name, names).await
    }
}

impl Job {
    pub async fn run(self) -> Outcome {
        let Self {
            shared,
            spec,
            task,
            on_demand,
        } = self;
        match task {
            Task::Restore => {
                if let Some(od) = on_demand.as_ref().filter(|od| od.recheck) {
                    match od.allows(&spec).await {
                        Ok(true) => {}
                        Ok(false) => {
                            return Outcome::Disallowed("the policy no longer allows it".into());
                        }
                        // Serving what is stored costs the CA nothing; the
                        // policy is asked again before any order.
                        Err(e) => warn!("on-demand policy not checked at restore: {e}"),
                    }
                }
                match restore::restore(&shared, &spec).await {
                    Ok(restored) => Outcome::Restored(Box::new(restored)),
                    Err(e) => Outcome::RestoreFailed(e),
                }
            }
            Task::Install(awaiting) => install(&shared, &spec, awaiting, None).await,
            Task::Look {
                served,
                reason,
                two_thirds,
                jitter,
            } => {
                let look = Look {
                    shared: &shared,
                    spec: &spec,
                    served: served.as_deref(),
                    reason,
                    two_thirds,
                    jitter,
                    on_demand: on_demand.as_ref(),
                };
                look.run().await
            }
        }
    }
}

/// Stores and installs an issued certificate, each step only if not done yet.
/// Both are tried even when the first fails: a certificate Envoy can serve is
/// served, whatever the state store says.
async fn install(
    shared: &Shared,
    spec: &Certificate,
    mut awaiting: Awaiting,
    reason: Option<Reason>,
) -> Outcome {
    let name = spec.name.as_str();
    let mut error = None;
    if !awaiting.stored {
        let stored = StoredCertificate {
            domains: spec.domains.clone(),
            key_type: awaiting.key_type,
            chain_pem: awaiting.chain_pem.clone(),
            key_pem: awaiting.key_pem.clone(),
        };
        match shared.store.save_certificate(name, &stored).await {
            Ok(()) => awaiting.stored = true,
            Err(e) => error = Some(e),
        }
    }
    if !awaiting.installed {
        let certificate = IssuedCertificate {
            name: name.to_owned(),
            chain_pem: awaiting.chain_pem.clone(),
            key_pem: awaiting.key_pem.clone(),
        };
        match shared.sink.install(&certificate).await {
            Ok(()) => awaiting.installed = true,
            Err(e) => error = error.or(Some(e)),
        }
    }
    match error {
        None => Outcome::Installed {
            leaf: awaiting.leaf,
            key_type: awaiting.key_type,
            ordered: awaiting.ordered,
        },
        Some(error) => {
            warn!(
                certificate = name,
                stored = awaiting.stored,
                installed = awaiting.installed,
                "issued certificate held, only the failed step is retried: {error}"
            );
            Outcome::Failed {
                error,
                retry_after: None,
                ordered: false,
                reason,
                awaiting: Some(awaiting),
            }
        }
    }
}

/// Deciding whether to order, and ordering.
struct Look<'a> {
    shared: &'a Arc<Shared>,
    spec: &'a Certificate,
    served: Option<&'a Served>,
    reason: Option<Reason>,
    two_thirds: Option<SystemTime>,
    jitter: f64,
    on_demand: Option<&'a OnDemandJob>,
}

/// What renewal info (RFC 9773) said about the served certificate.
enum Ari {
    /// The CA has no ARI, or the leaf no identifier.
    None,
    Failed(Error),
    Window {
        renew_at: SystemTime,
        check_at: SystemTime,
    },
}

impl Look<'_> {
    async fn run(self) -> Outcome {
        let now = self.shared.clock.now();
        match self.shared.issuer.open().await {
            Ok(()) => {}
            // Nothing due: an unreachable CA is no failure of this certificate.
            Err(e) if self.reason.is_none() && self.two_thirds.is_some_and(|at| at > now) => {
                warn!("cannot reach the CA to check renewal info ({e}); looking again later");
                return Outcome::Wait {
                    renew_at: self.two_thirds.unwrap_or(now),
                    check_at: now + UNREACHABLE_RECHECK,
                };
            }
            Err(e) => return Outcome::failed(e, self.reason),
        };
        let mut reason = self.reason;
        let mut replaces = None;
        let mut ari_due = false;
        if let Some(served) = self.served {
            match self.renewal_info(&served.leaf, now).await {
                Ari::Window { renew_at, check_at } => {
                    if renew_at <= now {
                        ari_due = true;
                        reason = reason.or(Some(Reason::RenewalDue));
                    } else if reason.is_none() {
                        return Outcome::Wait { renew_at, check_at };
                    }
                    if reason.is_some_and(Reason::replaces_served) {
                        replaces = served.leaf.ari_id.clone();
                    }
                }
                Ari::Failed(e) => warn!("renewal info unavailable, using the 2/3 rule: {e}"),
                Ari::None => {}
            }
            if reason.is_none() {
                match self.two_thirds {
                    Some(renew_at) if renew_at > now => {
                        // Looked at again well before: a CA may start offering
                        // renewal info, or move its window earlier.
                        return Outcome::Wait {
                            renew_at,
                            check_at: renew_at.min(now + ARI_RECHECK_MAX),
                        };
                    }
                    _ => reason = Some(Reason::RenewalDue),
                }
            }
        }
        if let Some(od) = self.on_demand.filter(|od| od.recheck) {
            match od.allows(self.spec).await {
                Ok(true) => {}
                Ok(false) => return Outcome::Disallowed("the policy no longer allows it".into()),
                Err(e) => return Outcome::failed(e, reason),
            }
        }
        info!(reason = reason.map_or("due", Reason::text), "ordering");
        self.order(reason, replaces, ari_due).await
    }

    /// With ARI: the CA's window for the served leaf.
    async fn renewal_info(&self, leaf: &Leaf, now: SystemTime) -> Ari {
        match self.shared.issuer.renewal_info(leaf).await {
            Ok(None) => Ari::None,
            Err(e) => Ari::Failed(e),
            Ok(Some(window)) => {
                let Some(renew_at) =
                    schedule::in_window(window.start, window.end, self.jitter, now)
                else {
                    return Ari::Failed(Error::Validation(
                        "renewal info window ends before it starts".into(),
                    ));
                };
                let check_at = now + window.retry_after.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX);
                Ari::Window {
                    renew_at,
                    check_at: renew_at.min(check_at),
                }
            }
        }
    }

    /// Orders a new certificate: checks what would fail the order before
    /// placing it, reserves it in the CA-limit budget, then places it.
    async fn order(
        &self,
        reason: Option<Reason>,
        mut replaces: Option<String>,
        ari_due: bool,
    ) -> Outcome {
        let s = self.shared;
        let store = s.store.as_ref();
        if let Err(e) = self.preflight().await {
            return Outcome::failed(e, reason);
        }
        if replaces.is_some() && s.ledger.replaces_not_reflected(store).await {
            replaces = None;
        }
        let exempt = ari_due && replaces.is_some() && s.ledger.limits().ari_renewals_exempt;
        let spend = Spend {
            domains: self.spec.domains.as_slice(),
            exempt,
            on_demand: self.on_demand.is_some(),
        };
        match s.ledger.reserve(store, &self.spec.name, spend).await {
            Ok(()) => {}
            Err(Refused::Blocked(blocked)) => {
                info!("{blocked}");
                return Outcome::Blocked { blocked, reason };
            }
            Err(Refused::Store(e)) => return Outcome::failed(e, reason),
        }
        self.place(spend, replaces.as_deref(), reason).await
    }

    /// What would fail the order, checked before it is placed: the sink
    /// can write, the challenges' solvers are ready, the CA offers the
    /// profile, and (several replicas) this one still holds the Lease, as a
    /// replica paused past it must not order.
    async fn preflight(&self) -> Result<(), Error> {
        let s = self.shared;
        s.sink.check_writable(&self.spec.name).await?;
        s.solvers.preflight(self.spec).await?;
        s.issuer.check(self.spec).await?;
        if let Some(leader) = s.leader.get()
            && !leader.still_holds().await
        {
            return Err(Error::Kubernetes(format!(
                "{} does not hold the Lease any more: no order",
                leader.identity()
            )));
        }
        Ok(())
    }

    /// Places the order reserved as `spend` and installs what is issued.
    /// The reservation ends with what the CA was told, whichever way this
    /// returns (an abort included).
    async fn place(
        &self,
        spend: Spend<'_>,
        replaces: Option<&str>,
        reason: Option<Reason>,
    ) -> Outcome {
        let s = self.shared;
        let store = s.store.as_ref();
        let name = self.spec.name.as_str();
        let mut reservation = Reservation {
            shared: s,
            name,
            domains: spend.domains,
            how: None,
            ended: false,
        };
        let trigger = Triggered { shared: s, name };
        let request = |replaces| OrderRequest {
            spec: self.spec,
            replaces,
            solvers: &s.solvers,
            trigger: &trigger,
        };
        let span = info_span!("order", domains = ?spend.domains);
        let mut result = s
            .issuer
            .issue(request(replaces))
            .instrument(span.clone())
            .await;
        if let Err(failure) = &result
            && matches!(failure.error, Error::ReplacesNotReflected(_))
        {
            // Counted once under its own kind, remembered for this CA, and the
            // order placed again without `replaces` (a certificate must not
            // expire because a CA deviates from RFC 9773).
            warn!(
                "{}; this CA's orders go without `replaces` from now on",
                failure.error
            );
            s.metrics.order_failed(name, failure.error.kind());
            let again = Spend {
                exempt: false,
                ..spend
            };
            if let Err(refused) = s.ledger.extra_order(store, again).await {
                reservation.how = Some(Finished::NotFinalized {
                    valid_names: Vec::new(),
                });
                reservation.end().await;
                return match refused {
                    Refused::Blocked(blocked) => Outcome::Blocked { blocked, reason },
                    Refused::Store(e) => Outcome::failed(e, reason),
                };
            }
            result = s.issuer.issue(request(None)).instrument(span).await;
        }
        let failure = match result {
            Ok(issued) => {
                reservation.how = Some(Finished::Finalized);
                reservation.end().await;
                let awaiting = Awaiting {
                    chain_pem: issued.chain_pem,
                    key_pem: issued.key_pem,
                    leaf: issued.leaf,
                    key_type: self.spec.key_type,
                    stored: false,
                    installed: false,
                    ordered: true,
                };
                return install(s, self.spec, awaiting, reason).await;
            }
            Err(failure) => failure,
        };
        reservation.how = Some(if failure.finalized {
            Finished::Finalized
        } else {
            Finished::NotFinalized {
                valid_names: failure.valid_names,
            }
        });
        reservation.end().await;
        Outcome::Failed {
            error: failure.error,
            retry_after: failure.retry_after,
            ordered: true,
            reason,
            awaiting: None,
        }
    }
}
