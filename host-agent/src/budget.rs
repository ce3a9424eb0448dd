//! The CA-limit budget: the agent counts what it spends of the CA's published
//! limits and never places an order that would exceed one, whatever the
//! config or failure. Let's Encrypt's limits are the defaults
//! ([`crate::config::Limits`]).
//!
//! The ledger is state: it is persisted before an order is placed (a write
//! ahead, so a kill during an order still counts it) and survives restarts.
//! Windows slide: at most N events in any window of the limit's length, which
//! stays within a token bucket of capacity N refilled over the same window,
//! how Let's Encrypt computes its limits. Pure functions of their inputs and
//! `now`, so they are table-tested without a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::Limits;
use crate::store::{from_unix, unix};

/// New orders per account: Let's Encrypt counts them per 3 hours.
pub const ORDERS_WINDOW: Duration = Duration::from_secs(3 * 3600);
/// Certificates per exact set of names: per 7 days.
pub const CERTIFICATES_WINDOW: Duration = Duration::from_secs(7 * 86_400);
/// Failed authorizations per name per account: per hour.
pub const FAILED_AUTHORIZATIONS_WINDOW: Duration = Duration::from_secs(3600);

/// The limit a certificate waits for; also the metric's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    OrdersPerAccount,
    CertificatesPerNameSet,
    FailedAuthorizationsPerName,
}

impl Limit {
    pub fn from_label(label: &str) -> Option<Self> {
        [
            Self::OrdersPerAccount,
            Self::CertificatesPerNameSet,
            Self::FailedAuthorizationsPerName,
        ]
        .into_iter()
        .find(|l| l.label() == label)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::OrdersPerAccount => "orders_per_account",
            Self::CertificatesPerNameSet => "certificates_per_name_set",
            Self::FailedAuthorizationsPerName => "failed_authorizations_per_name",
        }
    }
}

/// An order that would exceed a limit: wait until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub limit: Limit,
    pub until: SystemTime,
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "waiting for the CA-limit budget ({}) until {}",
            self.limit.label(),
            crate::store::rfc3339(self.until).unwrap_or_else(|| unix(self.until).to_string())
        )
    }
}

/// How an order that was reserved ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// Finalized: the CA may have issued a certificate (counted as issued).
    Finalized,
    /// Ended before finalize: no certificate can exist; `failed_names` are the
    /// names whose authorization the CA found invalid.
    NotFinalized { failed_names: Vec<String> },
}

/// What the agent has spent with one CA (one directory URL), Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub orders: Vec<u64>,
    /// Exact name set (sorted, comma-joined) -> times a certificate for it was
    /// (or may have been) issued.
    #[serde(default)]
    pub certificates: BTreeMap<String, Vec<u64>>,
    #[serde(default)]
    pub failed_authorizations: BTreeMap<String, Vec<u64>>,
    /// Certificate name -> when its reserved order started; left set when the
    /// agent stopped during the order, so the next start counts that attempt
    /// as a failure.
    #[serde(default)]
    pub in_flight: BTreeMap<String, u64>,
    /// The CA accepts `replaces` but does not reflect it (RFC 9773 says it
    /// must); orders go without it.
    #[serde(default)]
    pub replaces_not_reflected: bool,
}

/// The sorted, deduplicated, lower-cased key of an exact name set.
pub fn name_set(domains: &[String]) -> String {
    let set: BTreeSet<String> = domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    set.into_iter().collect::<Vec<_>>().join(",")
}

/// When the oldest of `events` within `window` of `now` leaves it, if there
/// are already `limit` of them (else `None`: one more fits).
fn full_until(events: &[u64], limit: u32, window: Duration, now: SystemTime) -> Option<SystemTime> {
    let start = unix(now).saturating_sub(window.as_secs());
    let mut inside: Vec<u64> = events.iter().copied().filter(|t| *t > start).collect();
    if inside.len() < limit as usize {
        return None;
    }
    inside.sort_unstable();
    // The (len - limit + 1)-th oldest must leave before one more fits.
    let leaving = inside[inside.len() - limit as usize];
    Some(from_unix(leaving) + window)
}

fn prune(events: &mut Vec<u64>, window: Duration, now: SystemTime) {
    let start = unix(now).saturating_sub(window.as_secs());
    events.retain(|t| *t > start);
}

impl Ledger {
    /// Drops events every window has left behind, so the ledger stays small.
    pub fn prune(&mut self, now: SystemTime) {
        prune(&mut self.orders, ORDERS_WINDOW, now);
        for (map, window) in [
            (&mut self.certificates, CERTIFICATES_WINDOW),
            (
                &mut self.failed_authorizations,
                FAILED_AUTHORIZATIONS_WINDOW,
            ),
        ] {
            for events in map.values_mut() {
                prune(events, window, now);
            }
            map.retain(|_, events| !events.is_empty());
        }
    }

    /// Whether an order for `domains` fits every limit now. `exempt`: an ARI
    /// renewal the CA exempts from its limits.
    pub fn check(
        &self,
        limits: &Limits,
        domains: &[String],
        exempt: bool,
        now: SystemTime,
    ) -> Result<(), Blocked> {
        if exempt {
            return Ok(());
        }
        let mut blocked: Option<Blocked> = None;
        let mut consider = |limit, until: Option<SystemTime>| {
            if let Some(until) = until
                && blocked.is_none_or(|b| until > b.until)
            {
                blocked = Some(Blocked { limit, until });
            }
        };
        consider(
            Limit::OrdersPerAccount,
            full_until(&self.orders, limits.orders_per_3_hours, ORDERS_WINDOW, now),
        );
        let empty = Vec::new();
        consider(
            Limit::CertificatesPerNameSet,
            full_until(
                self.certificates.get(&name_set(domains)).unwrap_or(&empty),
                limits.certificates_per_name_set_per_week,
                CERTIFICATES_WINDOW,
                now,
            ),
        );
        for domain in domains {
            consider(
                Limit::FailedAuthorizationsPerName,
                full_until(
                    self.failed_authorizations.get(domain).unwrap_or(&empty),
                    limits.failed_authorizations_per_name_per_hour,
                    FAILED_AUTHORIZATIONS_WINDOW,
                    now,
                ),
            );
        }
        blocked.map_or(Ok(()), Err)
    }

    /// Checks, then counts an order for certificate `name` as placed and its
    /// certificate as issued (undone by [`Ledger::finish`] if it never gets
    /// that far). The caller persists the ledger before placing the order.
    pub fn reserve(
        &mut self,
        limits: &Limits,
        name: &str,
        domains: &[String],
        exempt: bool,
        now: SystemTime,
    ) -> Result<(), Blocked> {
        self.prune(now);
        self.check(limits, domains, exempt, now)?;
        let at = unix(now);
        if !exempt {
            self.orders.push(at);
            self.certificates
                .entry(name_set(domains))
                .or_default()
                .push(at);
        }
        self.in_flight.insert(name.to_owned(), at);
        Ok(())
    }

    /// One more order placed within a reservation (an order placed again
    /// without `replaces`), counted unless exempt.
    pub fn count_order(&mut self, exempt: bool, now: SystemTime) {
        if !exempt {
            self.orders.push(unix(now));
        }
    }

    /// Ends the reservation of certificate `name`.
    pub fn finish(&mut self, name: &str, domains: &[String], how: &Finished, now: SystemTime) {
        let reserved_at = self.in_flight.remove(name);
        if let Finished::NotFinalized { failed_names } = how {
            // No certificate can come of an order that was never finalized.
            if let Some(at) = reserved_at
                && let Some(events) = self.certificates.get_mut(&name_set(domains))
                && let Some(i) = events.iter().rposition(|t| *t == at)
            {
                events.remove(i);
            }
            for failed in failed_names {
                self.failed_authorizations
                    .entry(failed.clone())
                    .or_default()
                    .push(unix(now));
            }
        }
        self.prune(now);
    }

    /// Orders still possible now (for the metric).
    pub fn orders_remaining(&self, limits: &Limits, now: SystemTime) -> u32 {
        let start = unix(now).saturating_sub(ORDERS_WINDOW.as_secs());
        let used = self.orders.iter().filter(|t| **t > start).count();
        limits
            .orders_per_3_hours
            .saturating_sub(u32::try_from(used).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        from_unix(1_000_000_000 + secs)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const LE: Limits = Limits {
        orders_per_3_hours: 300,
        certificates_per_name_set_per_week: 5,
        failed_authorizations_per_name_per_hour: 5,
        ari_renewals_exempt: true,
    };

    #[test]
    fn five_certificates_per_name_set_per_week_then_wait_for_the_oldest() {
        let mut ledger = Ledger::default();
        let www = names(&["www.example.com", "example.com"]);
        for i in 0..5 {
            ledger.reserve(&LE, "www", &www, false, t(i * 60)).unwrap();
            ledger.finish("www", &www, &Finished::Finalized, t(i * 60 + 1));
        }
        let blocked = ledger.reserve(&LE, "www", &www, false, t(600)).unwrap_err();
        assert_eq!(blocked.limit, Limit::CertificatesPerNameSet);
        assert_eq!(blocked.until, t(0) + CERTIFICATES_WINDOW);
        // The same names in another order are the same set; another set is free.
        let reordered = names(&["example.com", "WWW.example.com"]);
        assert!(ledger.check(&LE, &reordered, false, t(600)).is_err());
        assert!(
            ledger
                .check(&LE, &names(&["www.example.com"]), false, t(600))
                .is_ok()
        );
        // Once the oldest leaves the window, one more fits.
        assert!(
            ledger
                .reserve(
                    &LE,
                    "www",
                    &www,
                    false,
                    t(0) + CERTIFICATES_WINDOW + Duration::from_secs(1)
                )
                .is_ok()
        );
    }

    #[test]
    fn an_order_that_never_finalized_gives_its_certificate_back() {
        let mut ledger = Ledger::default();
        let www = names(&["www.example.com"]);
        for i in 0..10 {
            ledger.reserve(&LE, "www", &www, false, t(i)).unwrap();
            ledger.finish(
                "www",
                &www,
                &Finished::NotFinalized {
                    failed_names: vec![],
                },
                t(i),
            );
        }
        assert!(ledger.certificates.is_empty(), "{ledger:?}");
        assert_eq!(ledger.orders.len(), 10, "orders stay counted");
        assert!(ledger.in_flight.is_empty());
    }

    #[test]
    fn five_failed_authorizations_per_name_per_hour() {
        let mut ledger = Ledger::default();
        let bad = names(&["www.example.com", "bad.example.com"]);
        for i in 0..5 {
            ledger.reserve(&LE, "www", &bad, false, t(i * 100)).unwrap();
            ledger.finish(
                "www",
                &bad,
                &Finished::NotFinalized {
                    failed_names: names(&["bad.example.com"]),
                },
                t(i * 100 + 10),
            );
        }
        let blocked = ledger.check(&LE, &bad, false, t(500)).unwrap_err();
        assert_eq!(blocked.limit, Limit::FailedAuthorizationsPerName);
        assert_eq!(blocked.until, t(10) + FAILED_AUTHORIZATIONS_WINDOW);
        // A certificate without the failing name is not held back.
        assert!(
            ledger
                .check(&LE, &names(&["www.example.com"]), false, t(500))
                .is_ok()
        );
    }

    #[test]
    fn orders_per_account_and_the_latest_block_wins() {
        let limits = Limits {
            orders_per_3_hours: 3,
            ..LE
        };
        let mut ledger = Ledger::default();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let d = names(&[&format!("{name}.example.com")]);
            ledger
                .reserve(&limits, name, &d, false, t(i as u64))
                .unwrap();
        }
        assert_eq!(ledger.orders_remaining(&limits, t(3)), 0);
        let d = names(&["d.example.com"]);
        let blocked = ledger.reserve(&limits, "d", &d, false, t(3)).unwrap_err();
        assert_eq!(blocked.limit, Limit::OrdersPerAccount);
        assert_eq!(blocked.until, t(0) + ORDERS_WINDOW);
        assert!(
            !ledger.in_flight.contains_key("d"),
            "a refused order is not in flight"
        );
        // Exempt (ARI) renewals pass and are not counted.
        ledger.reserve(&limits, "d", &d, true, t(3)).unwrap();
        assert_eq!(ledger.orders.len(), 3);
        assert_eq!(ledger.in_flight["d"], unix(t(3)));
    }

    #[test]
    fn never_more_than_the_limit_in_any_window_whatever_the_attempts() {
        // An attempt every 7 minutes for two weeks: the ledger never lets more
        // than 5 certificates for one name set into any 7-day window.
        let mut ledger = Ledger::default();
        let www = names(&["www.example.com"]);
        let mut granted = Vec::new();
        let mut now = t(0);
        while now < t(0) + 2 * CERTIFICATES_WINDOW {
            if ledger.reserve(&LE, "www", &www, false, now).is_ok() {
                ledger.finish("www", &www, &Finished::Finalized, now);
                granted.push(unix(now));
            }
            now += Duration::from_secs(420);
        }
        for (i, start) in granted.iter().enumerate() {
            let inside = granted[i..]
                .iter()
                .filter(|g| **g < start + CERTIFICATES_WINDOW.as_secs())
                .count();
            assert!(inside <= 5, "{inside} in the window from {start}");
        }
        assert!(granted.len() >= 10, "{granted:?}");
    }

    #[test]
    fn ledger_survives_a_round_trip_and_old_files() {
        let mut ledger = Ledger::default();
        ledger
            .reserve(&LE, "www", &names(&["www.example.com"]), false, t(5))
            .unwrap();
        ledger.replaces_not_reflected = true;
        let json = serde_json::to_string(&ledger).unwrap();
        assert_eq!(serde_json::from_str::<Ledger>(&json).unwrap(), ledger);
        assert_eq!(
            serde_json::from_str::<Ledger>("{}").unwrap(),
            Ledger::default()
        );
    }
}
