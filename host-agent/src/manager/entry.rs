//! One certificate's place in the schedule, and its transitions. Each
//! transition takes `now` and is the only way the loop changes an entry, so
//! the rules (a failure stays until a success clears it, a forced renewal
//! stays until done, an issued certificate is kept until installed) live in
//! one place and are tested with a fixed clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::AbortHandle;

use super::trigger::{self, Reason, Served};
use crate::certificate::Leaf;
use crate::domain::budget::{Blocked, Limit};
use crate::domain::schedule::{self, Backoff};
use crate::domain::spec::{Certificate, KeyType};
use crate::ports::store::Status;
use crate::time::{from_unix, unix};

/// An issued certificate whose store or install step has not succeeded yet:
/// only the missing step is retried, never the order.
#[derive(Clone)]
pub struct Awaiting {
    pub chain_pem: String,
    pub key_pem: crate::domain::spec::KeyPem,
    pub leaf: Leaf,
    pub key_type: KeyType,
    /// Kept in the state store (the next start installs it from there).
    pub stored: bool,
    /// Handed to the sink (Envoy serves it).
    pub installed: bool,
    /// Came from an order of this process (counted as a successful order once
    /// installed), not from the store at start.
    pub ordered: bool,
}

impl std::fmt::Debug for Awaiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Awaiting")
            .field("stored", &self.stored)
            .field("installed", &self.installed)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What restoring an entry from the store found.
pub struct Restored {
    pub served: Option<Arc<Served>>,
    /// A stored certificate the sink refused at start: installed again later.
    pub awaiting: Option<Awaiting>,
    pub status: Option<Status>,
    /// When an order of the previous run was still in flight as it stopped.
    pub interrupted_order: Option<SystemTime>,
}

pub struct Entry {
    /// Shared with the jobs (one clone per daily look otherwise).
    pub spec: Arc<Certificate>,
    /// The store has answered for this certificate; until then nothing is ordered.
    pub restored: bool,
    /// Failed reads of the store since the entry was created (their backoff).
    pub restore_attempts: u32,
    pub served: Option<Arc<Served>>,
    pub awaiting: Option<Awaiting>,
    /// Fixed per served leaf, so the two-thirds time does not move between looks.
    pub jitter: f64,
    /// When the loop starts the next job.
    pub due: SystemTime,
    pub next_renewal: Option<SystemTime>,
    /// A forced renewal not done yet (persisted).
    pub forced: bool,
    /// Why an order is due, as the last job found it.
    pub reason: Option<Reason>,
    pub failures: u32,
    pub last_error: Option<String>,
    pub last_error_kind: Option<String>,
    pub last_failure: Option<SystemTime>,
    pub blocked: Option<Blocked>,
    pub job: Option<AbortHandle>,
    /// Bumped when the spec changes, so a result for the old spec is ignored.
    pub epoch: u64,
    /// Added by an on-demand handshake, not by the config.
    pub on_demand: bool,
    /// [`Status::essence`] of the record last read or written: an unchanged
    /// one is not written again (10,000 fsyncs at every start otherwise).
    pub saved: Option<u64>,
    /// On-demand: when a handshake last asked for it (persisted).
    pub last_requested: Option<SystemTime>,
    /// On-demand: withdrawn from SDS until a handshake asks for it again;
    /// nothing is ordered meanwhile.
    pub withdrawn: bool,
    /// On-demand: orders in a row that failed on the name (persisted).
    pub name_failures: u32,
    /// On-demand: ask the policy again before the next restore or order
    /// (false right after a handshake's request was decided).
    pub recheck: bool,
    /// The schedule as its metrics show it: an unchanged value is not set
    /// again (a daily renewal-info look changes only the next attempt).
    pub shown: Shown,
}

/// What [`Entry::shown`] holds: the value each schedule metric was last set to.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    pub next_renewal: Option<SystemTime>,
    pub next_attempt: Option<SystemTime>,
    pub failures: Option<u32>,
    /// `Some(None)`: shown as not waiting.
    pub blocked: Option<Option<Blocked>>,
}

impl Entry {
    /// Not restored yet: the first job reads the store.
    pub fn new(spec: Certificate, now: SystemTime) -> Self {
        Self {
            spec: Arc::new(spec),
            restored: false,
            restore_attempts: 0,
            served: None,
            awaiting: None,
            jitter: schedule::random_fraction(),
            due: now,
            next_renewal: None,
            forced: false,
            reason: None,
            failures: 0,
            last_error: None,
            last_error_kind: None,
            last_failure: None,
            blocked: None,
            job: None,
            epoch: 0,
            on_demand: false,
            last_requested: None,
            withdrawn: false,
            name_failures: 0,
            recheck: true,
            saved: None,
            shown: Shown::default(),
        }
    }

    /// An on-demand entry a handshake asked for at `now`.
    pub fn on_demand(spec: Certificate, now: SystemTime, recheck: bool) -> Self {
        Self {
            on_demand: true,
            last_requested: Some(now),
            recheck,
            ..Self::new(spec, now)
        }
    }

    /// A handshake asked for this on-demand certificate (its policy decided
    /// just now). A withdrawn one is read from the store and served again.
    pub fn requested(&mut self, now: SystemTime) {
        self.last_requested = Some(self.last_requested.map_or(now, |l| l.max(now)));
        if self.withdrawn {
            self.withdrawn = false;
            self.restored = false;
            self.recheck = false;
            self.due = now;
        }
    }

    /// Counts an on-demand order that failed on the name; whether it has now
    /// failed `max` times in a row.
    pub fn failed_on_the_name(&mut self, max: u32) -> bool {
        self.name_failures = self.name_failures.saturating_add(1);
        self.name_failures >= max
    }

    pub fn two_thirds(&self) -> Option<SystemTime> {
        self.served
            .as_ref()
            .map(|s| schedule::two_thirds(s.leaf.not_before, s.leaf.not_after, self.jitter))
    }

    /// The reason that needs no clock (see `trigger`).
    pub fn static_reason(&self) -> Option<Reason> {
        trigger::reason(&self.spec, self.served.as_deref(), self.forced)
    }

    /// The store answered. The schedule picks up where the last run left it:
    /// failures, a pending forced renewal, and the next attempt of a backoff,
    /// so a restart during a backoff places no order. An order the last run
    /// was placing when it stopped counts as one more failure.
    pub fn restore(&mut self, restored: Restored, backoff: &Backoff, now: SystemTime) {
        self.restored = true;
        self.served = restored.served;
        self.awaiting = restored.awaiting;
        self.due = now;
        self.saved = restored.status.as_ref().map(Status::essence);
        if let Some(status) = restored.status {
            // A record of other names is another certificate's history.
            if status.domains == self.spec.domains {
                self.failures = status.failures;
                self.last_error = status.last_error;
                self.last_error_kind = status.last_error_kind;
                self.last_failure = status.last_failure.map(from_unix);
                // A `renew` taken before the store answered stays too.
                self.forced |= status.forced;
                self.name_failures = self.name_failures.max(status.name_failures);
                if let Some(at) = status.last_requested.map(from_unix) {
                    self.last_requested = Some(self.last_requested.map_or(at, |l| l.max(at)));
                }
                let next_attempt = status.next_attempt.map(from_unix);
                let limit = status.waiting_for.as_deref().and_then(Limit::from_label);
                match (limit, next_attempt) {
                    // Shown at once; the ledger (also state) is asked again
                    // now, so a raised limit applies without waiting.
                    (Some(limit), Some(until)) => {
                        self.blocked = Some(Blocked { limit, until });
                    }
                    (None, Some(at)) if status.failures > 0 => self.due = self.due.max(at),
                    _ => {}
                }
            }
        }
        if let Some(at) = restored.interrupted_order {
            self.failures = self.failures.saturating_add(1);
            self.last_error = Some("the agent stopped while an order was in flight".into());
            self.last_error_kind = Some("interrupted".into());
            self.last_failure = Some(at);
            self.due = self.due.max(at + backoff.delay(self.failures, None, false));
        }
        self.next_renewal = self.two_thirds();
    }

    /// The store could not be read: nothing is ordered, the read is retried.
    pub fn restore_failed(&mut self, error: &crate::Error, wait: Duration, now: SystemTime) {
        self.restore_attempts = self.restore_attempts.saturating_add(1);
        self.last_error = Some(format!("reading the stored state: {error}"));
        self.last_error_kind = Some(error.kind().to_owned());
        self.due = now + wait;
    }

    /// A new certificate is stored and installed: everything is cleared.
    pub fn installed(&mut self, leaf: Leaf, key_type: KeyType, recheck: Duration, now: SystemTime) {
        self.served = Some(Arc::new(Served { leaf, key_type }));
        self.awaiting = None;
        self.jitter = schedule::random_fraction();
        self.forced = false;
        self.reason = None;
        self.failures = 0;
        self.name_failures = 0;
        self.last_error = None;
        self.last_error_kind = None;
        self.last_failure = None;
        self.blocked = None;
        let renew_at = self.two_thirds().unwrap_or(now);
        self.next_renewal = Some(renew_at);
        // The CA's renewal info is looked at again long before two thirds.
        self.due = renew_at.min(now + recheck);
    }

    /// Nothing is due before `renew_at`; look again at `check_at`. Only now,
    /// with nothing due, does an earlier failure stop mattering. A renewal
    /// requested while the look ran is due at once.
    pub fn wait(&mut self, renew_at: SystemTime, check_at: SystemTime, now: SystemTime) {
        self.next_renewal = Some(renew_at);
        self.due = if self.forced { now } else { check_at };
        if !self.forced {
            self.reason = None;
        }
        self.blocked = None;
        if !self.forced && self.awaiting.is_none() {
            self.failures = 0;
            self.last_error = None;
            self.last_error_kind = None;
            self.last_failure = None;
        }
    }

    /// A failed attempt: counted, kept visible, retried after `wait`. What was
    /// due stays due; an issued certificate waiting for a step stays held.
    pub fn failed(
        &mut self,
        message: String,
        kind: &str,
        reason: Option<Reason>,
        awaiting: Option<Awaiting>,
        wait: Duration,
        now: SystemTime,
    ) {
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(message);
        self.last_error_kind = Some(kind.to_owned());
        self.last_failure = Some(now);
        self.blocked = None;
        if reason.is_some() {
            self.reason = reason;
        }
        if awaiting.is_some() {
            self.awaiting = awaiting;
        }
        self.due = now + wait;
        if self.served.is_none() {
            self.next_renewal = Some(self.due);
        }
    }

    /// An order would exceed a CA limit: wait for it, visibly. Not a failure.
    pub fn blocked(&mut self, blocked: Blocked, reason: Option<Reason>) {
        self.blocked = Some(blocked);
        self.reason = reason.or(self.reason);
        self.due = blocked.until;
        if self.served.is_none() {
            self.next_renewal = Some(self.due);
        }
    }

    /// `renew`: order now, and keep it due until an order succeeds.
    pub fn force(&mut self, now: SystemTime) {
        self.forced = true;
        self.reason = Some(Reason::Forced);
        if self.blocked.is_none() {
            self.due = now;
        }
    }

    /// The config changed this certificate: the old spec's failures and
    /// waits are about another request. A held certificate that does not fit
    /// the new spec is dropped (it could not be served for it anyway).
    pub fn respec(&mut self, spec: Certificate, now: SystemTime) {
        self.epoch += 1;
        self.spec = Arc::new(spec);
        if let Some(awaiting) = &self.awaiting {
            let fits = trigger::reason(
                &self.spec,
                Some(&Served {
                    leaf: awaiting.leaf.clone(),
                    key_type: awaiting.key_type,
                }),
                false,
            )
            .is_none();
            if !fits {
                self.awaiting = None;
            }
        }
        self.failures = 0;
        self.last_error = None;
        self.last_error_kind = None;
        self.last_failure = None;
        self.reason = self.static_reason();
        if self.blocked.is_none() {
            self.due = now;
        }
    }

    pub fn status(&self, now: SystemTime) -> Status {
        let reason = self
            .reason
            .or_else(|| self.static_reason().filter(|_| self.restored));
        Status {
            name: self.spec.name.clone(),
            domains: self.spec.domains.clone(),
            not_after: self.served.as_ref().map(|s| unix(s.leaf.not_after)),
            next_renewal: self.next_renewal.map(unix),
            // Rounded up: a restart must never act before the wait ends.
            next_attempt: Some(unix(self.due + Duration::from_millis(999))),
            due: reason.map(|r| r.text().to_owned()),
            forced: self.forced,
            last_error: self.last_error.clone(),
            last_error_kind: self.last_error_kind.clone(),
            last_failure: self.last_failure.map(unix),
            failures: self.failures,
            waiting_for: self.blocked.map(|b| b.limit.label().to_owned()),
            awaiting_install: self.awaiting.is_some(),
            updated: unix(now),
            last_requested: self.last_requested.map(unix),
            name_failures: self.name_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn t(secs: u64) -> SystemTime {
        from_unix(1_700_000_000 + secs)
    }

    fn spec(domains: &[&str]) -> Certificate {
        Certificate {
            name: "www".into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            key_type: KeyType::EcdsaP256,
            challenge: Default::default(),
            dns: None,
            profile: None,
            adopt: false,
        }
    }

    fn leaf(domains: &[&str], from: SystemTime) -> Leaf {
        Leaf {
            not_before: from,
            not_after: from + 90 * DAY,
            names: domains.iter().map(|d| d.to_string()).collect(),
            ari_id: None,
        }
    }

    fn issued_entry(now: SystemTime) -> Entry {
        let mut e = Entry::new(spec(&["www.example.com"]), now);
        e.restore(
            Restored {
                served: Some(Arc::new(Served {
                    leaf: leaf(&["www.example.com"], now),
                    key_type: KeyType::EcdsaP256,
                })),
                awaiting: None,
                status: None,
                interrupted_order: None,
            },
            &Backoff::default(),
            now,
        );
        e
    }

    #[test]
    fn a_failed_order_after_adding_a_name_stays_due_and_visible() {
        let mut e = issued_entry(t(0));
        e.respec(spec(&["www.example.com", "bad.example.com"]), t(10));
        assert_eq!(e.static_reason(), Some(Reason::NamesChanged));
        e.failed(
            "bad.example.com: connection refused".into(),
            "validation",
            e.static_reason(),
            None,
            Duration::from_secs(60),
            t(20),
        );
        // Still due after the failure, whatever the old leaf's renewal time.
        assert_eq!(e.static_reason(), Some(Reason::NamesChanged));
        assert_eq!(e.due, t(80));
        let s = e.status(t(21));
        assert_eq!(s.failures, 1);
        assert_eq!(s.due.as_deref(), Some("names changed"));
        assert_eq!(s.last_error_kind.as_deref(), Some("validation"));
        assert_eq!(s.next_attempt, Some(unix(t(80))));
    }

    #[test]
    fn a_forced_renewal_survives_failures_and_is_cleared_by_success_only() {
        let mut e = issued_entry(t(0));
        e.force(t(5));
        assert_eq!(e.due, t(5));
        e.failed(
            "CA down".into(),
            "transport",
            Some(Reason::Forced),
            None,
            Duration::from_secs(60),
            t(6),
        );
        assert!(e.forced);
        // A later look that finds the renewal time far away does not clear it.
        e.wait(t(60 * 86_400), t(3600), t(70));
        assert!(e.forced, "the forced renewal was dropped");
        assert_eq!(e.due, t(70), "the forced renewal is due at once");
        assert_eq!(e.failures, 1, "the failure was hidden");
        assert_eq!(e.static_reason(), Some(Reason::Forced));
        e.installed(
            leaf(&["www.example.com"], t(100)),
            KeyType::EcdsaP256,
            6 * 3600 * Duration::from_secs(1),
            t(100),
        );
        assert!(!e.forced);
        assert_eq!(e.failures, 0);
        assert_eq!(e.last_error, None);
        assert_eq!(e.static_reason(), None);
        assert!(e.due <= t(100) + Duration::from_secs(6 * 3600));
    }

    #[test]
    fn nothing_due_clears_an_old_failure() {
        let mut e = issued_entry(t(0));
        e.failed(
            "renewal info: timeout".into(),
            "timeout",
            None,
            None,
            Duration::from_secs(60),
            t(1),
        );
        e.wait(t(60 * 86_400), t(3600), t(2));
        assert_eq!(e.failures, 0);
        assert_eq!(e.due, t(3600));
        assert_eq!(e.status(t(2)).last_error, None);
    }

    #[test]
    fn a_restart_during_a_backoff_waits_for_it() {
        let backoff = Backoff::default();
        let mut before = Entry::new(spec(&["www.example.com"]), t(0));
        before.restore(
            Restored {
                served: None,
                awaiting: None,
                status: None,
                interrupted_order: None,
            },
            &backoff,
            t(0),
        );
        before.failed(
            "CA down".into(),
            "transport",
            Some(Reason::NoCertificate),
            None,
            Duration::from_secs(20),
            t(10),
        );
        let saved = before.status(t(10));
        let mut after = Entry::new(spec(&["www.example.com"]), t(12));
        after.restore(
            Restored {
                served: None,
                awaiting: None,
                status: Some(saved.clone()),
                interrupted_order: None,
            },
            &backoff,
            t(12),
        );
        assert_eq!(after.due, t(30), "the backoff was forgotten");
        assert_eq!(after.failures, 1);
        // A record for other names is not this certificate's history.
        let mut other = Entry::new(spec(&["api.example.com"]), t(12));
        other.restore(
            Restored {
                served: None,
                awaiting: None,
                status: Some(saved),
                interrupted_order: None,
            },
            &backoff,
            t(12),
        );
        assert_eq!(other.due, t(12));
        assert_eq!(other.failures, 0);
    }

    #[test]
    fn an_order_interrupted_by_a_stop_counts_as_a_failure() {
        let backoff = Backoff::default();
        let mut e = Entry::new(spec(&["www.example.com"]), t(100));
        e.restore(
            Restored {
                served: None,
                awaiting: None,
                status: None,
                interrupted_order: Some(t(90)),
            },
            &backoff,
            t(100),
        );
        assert_eq!(e.failures, 1);
        assert_eq!(e.due, t(150));
        assert_eq!(e.last_error_kind.as_deref(), Some("interrupted"));
    }

    #[test]
    fn an_issued_certificate_is_held_until_installed() {
        let mut e = issued_entry(t(0));
        e.force(t(1));
        let awaiting = Awaiting {
            chain_pem: "chain".into(),
            key_pem: String::from("key").into(),
            leaf: leaf(&["www.example.com"], t(2)),
            key_type: KeyType::EcdsaP256,
            stored: true,
            installed: false,
            ordered: true,
        };
        e.failed(
            "sds_dir read-only".into(),
            "io",
            Some(Reason::Forced),
            Some(awaiting),
            Duration::from_secs(60),
            t(3),
        );
        assert!(e.awaiting.is_some());
        assert!(e.status(t(3)).awaiting_install);
        // A look that finds nothing else due keeps it and its failure.
        e.wait(t(60 * 86_400), t(100), t(50));
        assert!(e.awaiting.is_some());
        assert_eq!(e.failures, 1);
        // A spec it no longer fits drops it.
        e.respec(spec(&["api.example.com"]), t(4));
        assert!(e.awaiting.is_none());
    }

    #[test]
    fn a_budget_wait_is_no_failure_and_outlasts_a_forced_renewal() {
        let mut e = issued_entry(t(0));
        let blocked = Blocked {
            limit: Limit::CertificatesPerNameSet,
            until: t(7 * 86_400),
        };
        e.blocked(blocked, Some(Reason::Forced));
        assert_eq!(e.failures, 0);
        e.force(t(10));
        assert_eq!(e.due, t(7 * 86_400), "renew must not jump a CA-limit wait");
        let s = e.status(t(10));
        assert_eq!(s.waiting_for.as_deref(), Some("certificates_per_name_set"));
        assert_eq!(s.next_attempt, Some(unix(t(7 * 86_400))));
    }
}
