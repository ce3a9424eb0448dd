//! One look at one certificate, on its own task: restore it from the store,
//! install a certificate that is waiting for a step, or check whether an
//! order is due (renewal info, two thirds) and place it within the CA-limit
//! budget. What a failure means is decided here; the loop only records it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::CertificateIdentifier;
use tracing::{Instrument, info, info_span, warn};

use super::Shared;
use super::entry::{Awaiting, Restored};
use super::ledger::Refused;
use super::restore;
use super::trigger::{Reason, Served};
use crate::Error;
use crate::account::{self, HeldAccount};
use crate::certificate::Leaf;
use crate::config::OnDemand;
use crate::domain::budget::{Blocked, Finished, Spend};
use crate::domain::schedule;
use crate::domain::spec::{Certificate, KeyType};
use crate::order::{self, OrderContext};
use crate::sink::IssuedCertificate;
use crate::store::StoredCertificate;

/// Renewal info is fetched again at least this often ...
pub const ARI_RECHECK_MAX: Duration = Duration::from_secs(6 * 3600);
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
    fn failed(error: Error, reason: Option<Reason>) -> Self {
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
        served: Option<Served>,
        /// The reason that needs no clock (`trigger::reason`).
        reason: Option<Reason>,
        two_thirds: Option<SystemTime>,
    },
}

pub struct Job {
    pub shared: Arc<Shared>,
    pub spec: Certificate,
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

/// Ends a ledger reservation when dropped (an aborted job included), as
/// [`Finished::Unknown`] unless told otherwise: a job aborted mid-order may
/// have been issued a certificate and had its challenges fail, and counting
/// both is the safe side.
struct Reservation<'a> {
    shared: &'a Shared,
    name: &'a str,
    domains: &'a [String],
    how: Option<Finished>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let how = self.how.take().unwrap_or(Finished::Unknown);
        self.shared
            .ledger
            .finish(self.shared.store.as_ref(), self.name, self.domains, &how);
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
                match restore::restore(&shared, &spec) {
                    Ok(restored) => Outcome::Restored(Box::new(restored)),
                    Err(e) => Outcome::RestoreFailed(e),
                }
            }
            Task::Install(awaiting) => install(&shared, &spec, awaiting, None),
            Task::Look {
                served,
                reason,
                two_thirds,
            } => {
                let look = Look {
                    shared: &shared,
                    spec: &spec,
                    served: served.as_ref(),
                    reason,
                    two_thirds,
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
fn install(
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
        match shared.store.save_certificate(name, &stored) {
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
        match shared.sink.install(&certificate) {
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
    shared: &'a Shared,
    spec: &'a Certificate,
    served: Option<&'a Served>,
    reason: Option<Reason>,
    two_thirds: Option<SystemTime>,
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
    async fn account(&self) -> Result<instant_acme::Account, Error> {
        let s = self.shared;
        let mut slot = s.account.lock().await;
        if let Some(held) = slot.as_mut() {
            held.persist_pending(&s.acme, s.store.as_ref());
            return Ok(held.account.clone());
        }
        let held: HeldAccount =
            account::open(&s.acme, s.store.as_ref(), &s.http, &s.metrics).await?;
        let account = held.account.clone();
        *slot = Some(held);
        Ok(account)
    }

    async fn run(self) -> Outcome {
        let now = SystemTime::now();
        let account = match self.account().await {
            Ok(account) => account,
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
            match self.renewal_info(&account, &served.leaf, now).await {
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
        self.order(&account, reason, replaces, ari_due).await
    }

    /// With ARI: the CA's window for the served leaf.
    async fn renewal_info(
        &self,
        account: &instant_acme::Account,
        leaf: &Leaf,
        now: SystemTime,
    ) -> Ari {
        let Some((aki, serial)) = leaf.ari_id.as_deref().and_then(|id| id.split_once('.')) else {
            return Ari::None;
        };
        let cert_id = CertificateIdentifier {
            authority_key_identifier: aki.into(),
            serial: serial.into(),
        };
        match account.renewal_info(&cert_id).await {
            Err(instant_acme::Error::Unsupported(_)) => Ari::None,
            Err(e) => Ari::Failed(Error::acme("fetching renewal info")(e)),
            Ok((info, retry_after)) => {
                let start = SystemTime::from(info.suggested_window.start);
                let end = SystemTime::from(info.suggested_window.end);
                let Some(renew_at) =
                    schedule::in_window(start, end, schedule::random_fraction(), now)
                else {
                    return Ari::Failed(Error::Validation(
                        "renewal info window ends before it starts".into(),
                    ));
                };
                let check_at = now + retry_after.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX);
                Ari::Window {
                    renew_at,
                    check_at: renew_at.min(check_at),
                }
            }
        }
    }

    async fn order(
        &self,
        account: &instant_acme::Account,
        reason: Option<Reason>,
        mut replaces: Option<String>,
        ari_due: bool,
    ) -> Outcome {
        let s = self.shared;
        let store = s.store.as_ref();
        let name = self.spec.name.as_str();
        let domains = self.spec.domains.as_slice();
        if let Err(e) = s.sink.check_writable(name) {
            return Outcome::failed(e, reason);
        }
        if let Err(e) = s.solvers.preflight(self.spec).await {
            return Outcome::failed(e, reason);
        }
        if let Err(e) = order::check_profile(account, self.spec) {
            return Outcome::failed(e, reason);
        }
        // Several replicas: right before the order, this one must still
        // hold the Lease (a replica paused past it must not order).
        if let Some(leader) = s.leader.get()
            && !leader.still_holds().await
        {
            return Outcome::failed(
                Error::Kubernetes(format!(
                    "{} does not hold the Lease any more: no order",
                    leader.identity()
                )),
                reason,
            );
        }
        if replaces.is_some() && s.ledger.replaces_not_reflected(store) {
            replaces = None;
        }
        let exempt = ari_due && replaces.is_some() && s.ledger.limits().ari_renewals_exempt;
        let spend = Spend {
            domains,
            exempt,
            on_demand: self.on_demand.is_some(),
        };
        match s.ledger.reserve(store, name, spend) {
            Ok(()) => {}
            Err(Refused::Blocked(blocked)) => {
                info!("{blocked}");
                return Outcome::Blocked { blocked, reason };
            }
            Err(Refused::Store(e)) => return Outcome::failed(e, reason),
        }
        let mut reservation = Reservation {
            shared: s,
            name,
            domains,
            how: None,
        };
        let cx = OrderContext {
            account,
            solvers: &s.solvers,
            trigger: &|names: &[String]| s.ledger.trigger(store, name, names),
        };
        let span = info_span!("order", domains = ?domains);
        let mut result = order::issue(&cx, self.spec, replaces.as_deref())
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
            match s.ledger.extra_order(store, again) {
                Ok(()) => {
                    result = order::issue(&cx, self.spec, None).instrument(span).await;
                }
                Err(Refused::Blocked(blocked)) => {
                    reservation.how = Some(Finished::NotFinalized {
                        valid_names: Vec::new(),
                    });
                    return Outcome::Blocked { blocked, reason };
                }
                Err(Refused::Store(e)) => {
                    reservation.how = Some(Finished::NotFinalized {
                        valid_names: Vec::new(),
                    });
                    return Outcome::failed(e, reason);
                }
            }
        }
        let issued = match result {
            Ok(issued) => {
                reservation.how = Some(Finished::Finalized);
                issued
            }
            Err(failure) => {
                reservation.how = Some(if failure.finalized {
                    Finished::Finalized
                } else {
                    Finished::NotFinalized {
                        valid_names: failure.valid_names,
                    }
                });
                if failure.error.kind() == "accountDoesNotExist" {
                    *s.account.lock().await = None;
                    if let Err(forget) = account::forget(&s.acme, store) {
                        warn!("{forget}");
                    }
                }
                return Outcome::Failed {
                    error: failure.error,
                    retry_after: None,
                    ordered: true,
                    reason,
                    awaiting: None,
                };
            }
        };
        drop(reservation);
        let awaiting = Awaiting {
            chain_pem: issued.chain_pem,
            key_pem: issued.key_pem,
            leaf: issued.leaf,
            key_type: self.spec.key_type,
            stored: false,
            installed: false,
            ordered: true,
        };
        install(s, self.spec, awaiting, reason)
    }
}
