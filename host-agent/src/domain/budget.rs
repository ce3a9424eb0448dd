//! The CA-limit budget: the agent counts what it spends of the CA's published
//! limits and never places an order that would exceed one, whatever the
//! config or failure. Let's Encrypt's limits are the defaults
//! ([`crate::domain::budget::Limits`]).
//!
//! Each limit is a token bucket, as Let's Encrypt computes it: `burst`
//! events at once, then one more every `refill` (failed authorizations: 5,
//! then one every 12 minutes). The ledger keeps the events themselves (Unix
//! seconds) and replays them through the bucket (GCRA), so a changed limit
//! applies to the history as it is, and a ledger written before buckets
//! loads and means the same.
//!
//! The ledger is state: it is persisted before an order is placed and before
//! its challenges are handed to the CA (a write ahead, so a kill or a lost
//! answer still counts them) and survives restarts. Pure functions of their
//! inputs and `now`, so they are table-tested without a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::domain::journal::Change;
use crate::time::{from_unix, unix};

/// The CA's limits the agent keeps within (`crate::domain::budget`). The defaults are
/// Let's Encrypt's published limits; set another CA's here.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// New orders per account in any 3 hours.
    #[serde(default = "default_orders_per_3_hours")]
    pub orders_per_3_hours: u32,
    /// Certificates for one exact set of names in any 7 days.
    #[serde(default = "default_certificates_per_name_set_per_week")]
    pub certificates_per_name_set_per_week: u32,
    /// Failed authorizations per name (and account) in any hour.
    #[serde(default = "default_failed_authorizations_per_name_per_hour")]
    pub failed_authorizations_per_name_per_hour: u32,
    /// ARI renewals (with `replaces`, inside the CA's suggested window) are
    /// exempt from the limits above, as Let's Encrypt says they are.
    #[serde(default = "default_true")]
    pub ari_renewals_exempt: bool,
    /// Certificates with a name under one registered domain in any 7 days
    /// (Let's Encrypt's counts every client's; the agent counts its own).
    #[serde(default = "default_certificates_per_registered_domain_per_week")]
    pub certificates_per_registered_domain_per_week: u32,
    /// Each limit above is a bucket of that many, refilled one at a time
    /// (Let's Encrypt's model); by default evenly over its window (5 per
    /// hour: one every 12 minutes). These set another refill period.
    pub orders_refill_seconds: Option<u64>,
    pub certificates_per_name_set_refill_seconds: Option<u64>,
    pub failed_authorizations_refill_seconds: Option<u64>,
    pub certificates_per_registered_domain_refill_seconds: Option<u64>,
    /// Share (percent, rounded up, at least one) of the orders and
    /// registered-domain buckets that on-demand certificates leave to the
    /// configured ones.
    #[serde(default = "default_configured_reserve_percent")]
    pub configured_reserve_percent: u32,
}

fn default_orders_per_3_hours() -> u32 {
    300
}

fn default_certificates_per_name_set_per_week() -> u32 {
    5
}

fn default_failed_authorizations_per_name_per_hour() -> u32 {
    5
}

fn default_certificates_per_registered_domain_per_week() -> u32 {
    50
}

fn default_configured_reserve_percent() -> u32 {
    20
}

fn default_true() -> bool {
    true
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            orders_per_3_hours: default_orders_per_3_hours(),
            certificates_per_name_set_per_week: default_certificates_per_name_set_per_week(),
            failed_authorizations_per_name_per_hour:
                default_failed_authorizations_per_name_per_hour(),
            ari_renewals_exempt: true,
            certificates_per_registered_domain_per_week:
                default_certificates_per_registered_domain_per_week(),
            orders_refill_seconds: None,
            certificates_per_name_set_refill_seconds: None,
            failed_authorizations_refill_seconds: None,
            certificates_per_registered_domain_refill_seconds: None,
            configured_reserve_percent: default_configured_reserve_percent(),
        }
    }
}

/// New orders per account: Let's Encrypt counts them per 3 hours.
pub const ORDERS_WINDOW: Duration = Duration::from_secs(3 * 3600);
/// Certificates per exact set of names: per 7 days.
pub const CERTIFICATES_WINDOW: Duration = Duration::from_secs(7 * 86_400);
/// Failed authorizations per name per account: per hour.
pub const FAILED_AUTHORIZATIONS_WINDOW: Duration = Duration::from_secs(3600);
/// Certificates per registered domain: per 7 days.
pub const REGISTERED_DOMAIN_WINDOW: Duration = Duration::from_secs(7 * 86_400);

/// The ledger's format: 1 had no registered domains (derived on load).
pub const LEDGER_VERSION: u32 = 2;
/// Most names remembered as refused; beyond, the one expiring first goes.
const MAX_REFUSED: usize = 10_000;

/// The limit a certificate waits for; also the metric's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    OrdersPerAccount,
    CertificatesPerNameSet,
    FailedAuthorizationsPerName,
    CertificatesPerRegisteredDomain,
}

impl Limit {
    /// Every limit (the metric clears each one's series).
    pub const ALL: [Self; 4] = [
        Self::OrdersPerAccount,
        Self::CertificatesPerNameSet,
        Self::FailedAuthorizationsPerName,
        Self::CertificatesPerRegisteredDomain,
    ];

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.label() == label)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::OrdersPerAccount => "orders_per_account",
            Self::CertificatesPerNameSet => "certificates_per_name_set",
            Self::FailedAuthorizationsPerName => "failed_authorizations_per_name",
            Self::CertificatesPerRegisteredDomain => "certificates_per_registered_domain",
        }
    }
}

/// One limit as Let's Encrypt models it: `burst` at once, then one more
/// every `refill`. `window` is the limit's published period: the ledger
/// keeps at least that much history (for people and tests reading it), and
/// more when the bucket still needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub burst: u32,
    pub refill: Duration,
    pub window: Duration,
}

impl Bucket {
    /// `count` per `window`, refilled evenly (Let's Encrypt's published
    /// limits: 5 per hour is one every 12 minutes), unless `refill_seconds`
    /// says otherwise.
    pub fn new(count: u32, window: Duration, refill_seconds: Option<u64>) -> Self {
        let refill = match refill_seconds {
            Some(secs) => Duration::from_secs(secs),
            // Rounded up to the millisecond: never faster than the CA.
            None => Duration::from_millis(
                u64::try_from(window.as_millis())
                    .unwrap_or(u64::MAX)
                    .div_ceil(u64::from(count.max(1))),
            ),
        };
        Self {
            burst: count.max(1),
            refill,
            window,
        }
    }

    fn refill_ms(&self) -> u64 {
        u64::try_from(self.refill.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// When the bucket is full again after `events` (sorted Unix seconds), in
    /// Unix milliseconds: GCRA's theoretical arrival time. Events are stamped
    /// rounded up, so one of this very second may lie ahead of `now`: taken
    /// at `now`, which is still no earlier than it was.
    fn full_at(&self, events: &[u64], now: SystemTime) -> u64 {
        let refill = self.refill_ms();
        let now = millis(now);
        events.iter().fold(0u64, |tat, at| {
            tat.max(at.saturating_mul(1000).min(now))
                .saturating_add(refill)
        })
    }

    /// When one more event fits while `reserve` tokens stay in the bucket,
    /// if it does not fit now.
    pub fn blocked_until(
        &self,
        events: &[u64],
        reserve: u32,
        now: SystemTime,
    ) -> Option<SystemTime> {
        let spare = self.burst.saturating_sub(1).saturating_sub(reserve);
        let allowed_from = self
            .full_at(events, now)
            .saturating_sub(u64::from(spare).saturating_mul(self.refill_ms()));
        (allowed_from > millis(now)).then(|| UNIX_EPOCH + Duration::from_millis(allowed_from))
    }

    /// Tokens left now (for the metric).
    pub fn remaining(&self, events: &[u64], now: SystemTime) -> u32 {
        let debt = self.full_at(events, now).saturating_sub(millis(now));
        let used = debt.div_ceil(self.refill_ms());
        self.burst
            .saturating_sub(u32::try_from(used).unwrap_or(u32::MAX))
    }

    /// Drops the events older than `window` from before the bucket was last
    /// full: they no longer change any decision. `events` ends sorted.
    pub fn prune(&self, events: &mut Vec<u64>, now: SystemTime) {
        events.sort_unstable();
        let refill = self.refill_ms();
        let now_ms = millis(now);
        let mut tat = 0u64;
        let mut needed_from = 0;
        for (i, at) in events.iter().enumerate() {
            let at_ms = at.saturating_mul(1000).min(now_ms);
            if tat <= at_ms {
                needed_from = i;
            }
            tat = tat.max(at_ms).saturating_add(refill);
        }
        if tat <= millis(now) {
            needed_from = events.len();
        }
        let window_start =
            millis(now).saturating_sub(u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX));
        let recent_from = events.partition_point(|at| at.saturating_mul(1000) <= window_start);
        events.drain(..needed_from.min(recent_from));
    }
}

/// `t` in Unix seconds, rounded up: an event is never taken for earlier than
/// it was (an earlier one would refill its bucket too soon).
fn stamp(t: SystemTime) -> u64 {
    millis(t).div_ceil(1000)
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Limits {
    /// The bucket of `limit` as configured.
    pub fn bucket(&self, limit: Limit) -> Bucket {
        match limit {
            Limit::OrdersPerAccount => Bucket::new(
                self.orders_per_3_hours,
                ORDERS_WINDOW,
                self.orders_refill_seconds,
            ),
            Limit::CertificatesPerNameSet => Bucket::new(
                self.certificates_per_name_set_per_week,
                CERTIFICATES_WINDOW,
                self.certificates_per_name_set_refill_seconds,
            ),
            Limit::FailedAuthorizationsPerName => Bucket::new(
                self.failed_authorizations_per_name_per_hour,
                FAILED_AUTHORIZATIONS_WINDOW,
                self.failed_authorizations_refill_seconds,
            ),
            Limit::CertificatesPerRegisteredDomain => Bucket::new(
                self.certificates_per_registered_domain_per_week,
                REGISTERED_DOMAIN_WINDOW,
                self.certificates_per_registered_domain_refill_seconds,
            ),
        }
    }

    /// Tokens of `limit` that on-demand orders must leave to configured
    /// certificates: `configured_reserve_percent` of the burst, rounded up,
    /// and at least one, so on-demand never spends the last. Only the limits
    /// they share with configured certificates have a reserve.
    pub fn on_demand_reserve(&self, limit: Limit) -> u32 {
        match limit {
            Limit::OrdersPerAccount | Limit::CertificatesPerRegisteredDomain => {
                let burst = self.bucket(limit).burst;
                let share = u64::from(burst) * u64::from(self.configured_reserve_percent);
                u32::try_from(share.div_ceil(100)).unwrap_or(burst).max(1)
            }
            Limit::CertificatesPerNameSet | Limit::FailedAuthorizationsPerName => 0,
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
            crate::time::rfc3339(self.until).unwrap_or_else(|| unix(self.until).to_string())
        )
    }
}

/// What an order asks of the budget.
#[derive(Debug, Clone, Copy)]
pub struct Spend<'a> {
    pub domains: &'a [String],
    /// An ARI renewal the CA exempts from its limits.
    pub exempt: bool,
    /// An on-demand certificate: it must leave the configured ones their
    /// reserve.
    pub on_demand: bool,
}

/// How an order that was reserved ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// Finalized (every authorization was valid): the CA may have issued a
    /// certificate (counted as issued).
    Finalized,
    /// Ended before finalize: no certificate can exist. Every name whose
    /// challenge was handed to the CA counts as a failed authorization
    /// unless it is in `valid_names` (seen valid afterwards).
    NotFinalized { valid_names: Vec<String> },
    /// Not known how far it got (the job was aborted, the agent stopped): a
    /// certificate is counted, and every name handed to the CA failed.
    Unknown,
}

/// What the agent has spent with one CA (one directory URL), Unix seconds.
/// A new one is of the current version ([`Ledger::default`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// [`LEDGER_VERSION`] once written by this code; 0 for older ledgers.
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub orders: Vec<u64>,
    /// Exact name set (sorted, comma-joined) -> times a certificate for it was
    /// (or may have been) issued.
    #[serde(default)]
    pub certificates: BTreeMap<String, Vec<u64>>,
    /// Registered domain -> times a certificate with a name under it was
    /// (or may have been) issued.
    #[serde(default)]
    pub registered_domains: BTreeMap<String, Vec<u64>>,
    #[serde(default)]
    pub failed_authorizations: BTreeMap<String, Vec<u64>>,
    /// Certificate name -> when its reserved order started; left set when the
    /// agent stopped during the order, so the next start counts that attempt
    /// as a failure.
    #[serde(default)]
    pub in_flight: BTreeMap<String, u64>,
    /// Certificate name -> the names whose challenges its order in flight
    /// handed (or was about to hand) to the CA: written before they are, and
    /// counted as failed authorizations when the order ends, except those
    /// seen valid.
    #[serde(default)]
    pub triggered: BTreeMap<String, BTreeSet<String>>,
    /// The CA accepts `replaces` but does not reflect it (RFC 9773 says it
    /// must); orders go without it.
    #[serde(default)]
    pub replaces_not_reflected: bool,
    /// When on-demand names were admitted (`on_demand.max_per_hour`), so a
    /// restart does not refill that bucket.
    #[serde(default)]
    pub on_demand_admitted: Vec<u64>,
    /// On-demand names refused after failing again and again -> until when.
    #[serde(default)]
    pub refused: BTreeMap<String, u64>,
    /// Which journal continues this snapshot: a journal line of another
    /// generation (one the snapshot already holds) is never replayed.
    #[serde(default)]
    pub generation: u64,
    /// The changes made since they were last taken
    /// ([`Ledger::take_changes`]), for the journal.
    #[serde(skip)]
    pub changes: Vec<Change>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            version: LEDGER_VERSION,
            orders: Vec::new(),
            certificates: BTreeMap::new(),
            registered_domains: BTreeMap::new(),
            failed_authorizations: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            triggered: BTreeMap::new(),
            replaces_not_reflected: false,
            on_demand_admitted: Vec::new(),
            refused: BTreeMap::new(),
            generation: 0,
            changes: Vec::new(),
        }
    }
}

/// The sorted, deduplicated, lower-cased key of an exact name set.
pub fn name_set(domains: &[String]) -> String {
    let set: BTreeSet<String> = domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    set.into_iter().collect::<Vec<_>>().join(",")
}

/// The registered domain `name` counts under at Let's Encrypt: its public
/// suffix and one more label (Public Suffix List); an IPv4 address alone,
/// an IPv6 address its /64; a name that is itself a suffix, itself.
pub fn registered_domain(name: &str) -> String {
    let name = name.strip_prefix("*.").unwrap_or(name).to_ascii_lowercase();
    match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.to_string(),
        Ok(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => psl::domain_str(&name).unwrap_or(&name).to_owned(),
    }
}

/// The registered domains of a certificate's names, each once.
pub fn registered_domains(domains: &[String]) -> BTreeSet<String> {
    domains.iter().map(|d| registered_domain(d)).collect()
}

impl Ledger {
    /// Reads a stored ledger, bringing an older format up to date.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut ledger: Self = serde_json::from_slice(bytes)?;
        ledger.migrate();
        Ok(ledger)
    }

    /// Version 1 counted no registered domains: every certificate it counted
    /// counts for the registered domains of its names too.
    fn migrate(&mut self) {
        if self.version < 2 {
            for (set, events) in &self.certificates {
                let names: Vec<String> = set.split(',').map(str::to_owned).collect();
                for domain in registered_domains(&names) {
                    self.registered_domains
                        .entry(domain)
                        .or_default()
                        .extend(events.iter().copied());
                }
            }
            for events in self.registered_domains.values_mut() {
                events.sort_unstable();
            }
        }
        self.version = LEDGER_VERSION;
    }

    /// Drops events no bucket needs any more, so the ledger stays small.
    pub fn prune(&mut self, limits: &Limits, now: SystemTime) {
        limits
            .bucket(Limit::OrdersPerAccount)
            .prune(&mut self.orders, now);
        for (map, limit) in [
            (&mut self.certificates, Limit::CertificatesPerNameSet),
            (
                &mut self.registered_domains,
                Limit::CertificatesPerRegisteredDomain,
            ),
            (
                &mut self.failed_authorizations,
                Limit::FailedAuthorizationsPerName,
            ),
        ] {
            let bucket = limits.bucket(limit);
            for events in map.values_mut() {
                bucket.prune(events, now);
            }
            map.retain(|_, events| !events.is_empty());
        }
        let now = unix(now);
        self.refused.retain(|_, until| *until > now);
    }

    /// Whether an order fits every limit now.
    pub fn check(&self, limits: &Limits, spend: Spend<'_>, now: SystemTime) -> Result<(), Blocked> {
        if spend.exempt {
            return Ok(());
        }
        let mut blocked: Option<Blocked> = None;
        let empty = Vec::new();
        let mut consider = |limit: Limit, events: &Vec<u64>| {
            let reserve = if spend.on_demand {
                limits.on_demand_reserve(limit)
            } else {
                0
            };
            if let Some(until) = limits.bucket(limit).blocked_until(events, reserve, now)
                && blocked.is_none_or(|b| until > b.until)
            {
                blocked = Some(Blocked { limit, until });
            }
        };
        consider(Limit::OrdersPerAccount, &self.orders);
        consider(
            Limit::CertificatesPerNameSet,
            self.certificates
                .get(&name_set(spend.domains))
                .unwrap_or(&empty),
        );
        for domain in registered_domains(spend.domains) {
            consider(
                Limit::CertificatesPerRegisteredDomain,
                self.registered_domains.get(&domain).unwrap_or(&empty),
            );
        }
        for domain in spend.domains {
            consider(
                Limit::FailedAuthorizationsPerName,
                self.failed_authorizations.get(domain).unwrap_or(&empty),
            );
        }
        blocked.map_or(Ok(()), Err)
    }

    /// Makes `change` and keeps it for the journal.
    fn record(&mut self, change: Change) {
        self.apply(&change);
        self.changes.push(change);
    }

    /// The changes made since the last call, oldest first.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Prunes what an order for `domains` looks at ([`Ledger::prune`] does
    /// it all, which costs a pass over every name; this stays per order).
    fn prune_for(&mut self, limits: &Limits, domains: &[String], now: SystemTime) {
        limits
            .bucket(Limit::OrdersPerAccount)
            .prune(&mut self.orders, now);
        let keys = [
            (
                &mut self.certificates,
                Limit::CertificatesPerNameSet,
                vec![name_set(domains)],
            ),
            (
                &mut self.registered_domains,
                Limit::CertificatesPerRegisteredDomain,
                registered_domains(domains).into_iter().collect(),
            ),
            (
                &mut self.failed_authorizations,
                Limit::FailedAuthorizationsPerName,
                domains.to_vec(),
            ),
        ];
        for (map, limit, keys) in keys {
            let bucket = limits.bucket(limit);
            for key in keys {
                if let Some(events) = map.get_mut(&key) {
                    bucket.prune(events, now);
                    if events.is_empty() {
                        map.remove(&key);
                    }
                }
            }
        }
    }

    /// Checks, then counts an order for certificate `name` as placed and its
    /// certificate as issued (undone by [`Ledger::finish`] if it never gets
    /// that far). The caller persists the ledger before placing the order.
    pub fn reserve(
        &mut self,
        limits: &Limits,
        name: &str,
        spend: Spend<'_>,
        now: SystemTime,
    ) -> Result<(), Blocked> {
        self.prune_for(limits, spend.domains, now);
        let at = stamp(now);
        // Names handed to the CA by an order nobody finished (never expected:
        // the restore takes them first) count before anything else.
        if let Some(left) = self.triggered.get(name).cloned() {
            self.record(Change::Untriggered {
                name: name.to_owned(),
            });
            for name in left {
                self.record(Change::FailedAuthorization { name, at });
            }
        }
        self.check(limits, spend, now)?;
        if !spend.exempt {
            self.record(Change::Order { at });
            self.record(Change::Certificate {
                set: name_set(spend.domains),
                at,
            });
            for domain in registered_domains(spend.domains) {
                self.record(Change::RegisteredDomain { domain, at });
            }
        }
        self.record(Change::InFlight {
            name: name.to_owned(),
            at,
        });
        Ok(())
    }

    /// One more order placed within a reservation (an order placed again
    /// without `replaces`), counted unless exempt.
    pub fn count_order(&mut self, exempt: bool, now: SystemTime) {
        if !exempt {
            self.record(Change::Order { at: stamp(now) });
        }
    }

    /// Remembers that the CA accepts `replaces` without reflecting it.
    pub fn replaces_are_not_reflected(&mut self) {
        if !self.replaces_not_reflected {
            self.record(Change::ReplacesNotReflected);
        }
    }

    /// The order of certificate `name` is about to hand the challenges of
    /// `names` to the CA: from now on each counts as a failed authorization
    /// unless it is seen valid.
    pub fn trigger(&mut self, name: &str, names: &[String]) {
        self.record(Change::Triggered {
            name: name.to_owned(),
            names: names.to_vec(),
        });
    }

    /// Ends the reservation of certificate `name`.
    pub fn finish(&mut self, name: &str, domains: &[String], how: &Finished, now: SystemTime) {
        let reserved_at = self.in_flight.get(name).copied();
        if reserved_at.is_some() {
            self.record(Change::Landed {
                name: name.to_owned(),
            });
        }
        let triggered = self.triggered.get(name).cloned().unwrap_or_default();
        if self.triggered.contains_key(name) {
            self.record(Change::Untriggered {
                name: name.to_owned(),
            });
        }
        let failed: Vec<String> = match how {
            Finished::Finalized => Vec::new(),
            Finished::Unknown => triggered.into_iter().collect(),
            Finished::NotFinalized { valid_names } => triggered
                .into_iter()
                .filter(|n| !valid_names.contains(n))
                .collect(),
        };
        if let (Finished::NotFinalized { .. }, Some(at)) = (how, reserved_at) {
            // No certificate can come of an order that was never finalized.
            self.record(Change::CertificateGivenBack {
                set: name_set(domains),
                at,
            });
            for domain in registered_domains(domains) {
                self.record(Change::RegisteredDomainGivenBack { domain, at });
            }
        }
        let at = stamp(now);
        for name in failed {
            self.record(Change::FailedAuthorization { name, at });
        }
    }

    /// The order the last run was placing for `name` when it stopped, if any
    /// (Unix seconds): ended as [`Finished::Unknown`].
    pub fn interrupted(&mut self, name: &str, now: SystemTime) -> Option<u64> {
        let at = self.in_flight.get(name).copied();
        if at.is_some() || self.triggered.contains_key(name) {
            self.finish(name, &[], &Finished::Unknown, now);
        }
        at
    }

    /// Orders still possible now (for the metric).
    pub fn orders_remaining(&self, limits: &Limits, now: SystemTime) -> u32 {
        limits
            .bucket(Limit::OrdersPerAccount)
            .remaining(&self.orders, now)
    }

    /// Admits one more on-demand name when `bucket` (`on_demand.max_per_hour`)
    /// has a token; else says when it will.
    pub fn admit_on_demand(&mut self, bucket: Bucket, now: SystemTime) -> Result<(), SystemTime> {
        bucket.prune(&mut self.on_demand_admitted, now);
        if let Some(until) = bucket.blocked_until(&self.on_demand_admitted, 0, now) {
            return Err(until);
        }
        self.record(Change::OnDemandAdmitted { at: stamp(now) });
        Ok(())
    }

    /// Remembers `domain` as refused until `until`.
    pub fn refuse(&mut self, domain: &str, until: SystemTime, now: SystemTime) {
        let now = unix(now);
        self.refused.retain(|_, u| *u > now);
        if self.refused.len() >= MAX_REFUSED
            && let Some(first) = self
                .refused
                .iter()
                .min_by_key(|(_, u)| **u)
                .map(|(d, _)| d.clone())
        {
            self.record(Change::Unrefused { domain: first });
        }
        self.record(Change::Refused {
            domain: domain.to_owned(),
            until: unix(until),
        });
    }

    /// Until when `domain` stays refused, if it is.
    pub fn refused_until(&self, domain: &str, now: SystemTime) -> Option<SystemTime> {
        self.refused
            .get(domain)
            .filter(|until| **until > unix(now))
            .map(|until| from_unix(*until))
    }
}

/// Takes back the event at `at` of `key` (the latest one if several).
pub(crate) fn give_back(map: &mut BTreeMap<String, Vec<u64>>, key: &str, at: u64) {
    if let Some(events) = map.get_mut(key)
        && let Some(i) = events.iter().rposition(|t| *t == at)
    {
        events.remove(i);
        if events.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;

    fn t(secs: u64) -> SystemTime {
        from_unix(1_000_000_000 + secs)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn le() -> Limits {
        Limits::default()
    }

    fn spend(domains: &[String]) -> Spend<'_> {
        Spend {
            domains,
            exempt: false,
            on_demand: false,
        }
    }

    fn failed(ledger: &mut Ledger, cert: &str, domains: &[String], at: SystemTime) {
        ledger.reserve(&le(), cert, spend(domains), at).unwrap();
        ledger.trigger(cert, domains);
        ledger.finish(
            cert,
            domains,
            &Finished::NotFinalized {
                valid_names: vec![],
            },
            at,
        );
    }

    #[test]
    fn buckets_refill_one_token_at_a_time() {
        let five_per_hour = Bucket::new(5, FAILED_AUTHORIZATIONS_WINDOW, None);
        assert_eq!(five_per_hour.refill, Duration::from_secs(12 * MIN));
        let base = 1_000_000_000;
        let at = |list: &[u64]| list.iter().map(|s| base + s).collect::<Vec<u64>>();
        // (events, now, reserve, blocked until)
        let cases: &[(&[u64], u64, u32, Option<u64>)] = &[
            (&[], 0, 0, None),
            (&[0, 1, 2, 3], 4, 0, None),
            // Five at once: the sixth after 12 minutes, not an hour.
            (&[0, 1, 2, 3, 4], 5, 0, Some(12 * MIN)),
            (&[0, 1, 2, 3, 4], 12 * MIN, 0, None),
            // Then one every 12 minutes.
            (&[0, 1, 2, 3, 4, 12 * MIN], 12 * MIN + 1, 0, Some(24 * MIN)),
            // Spread out: never more than the burst is in debt.
            (&[0, 20 * MIN, 40 * MIN], 40 * MIN, 0, None),
            // A reserve of 2 leaves two tokens: 3 of 5 were usable.
            (&[0, 1, 2], 3, 2, Some(12 * MIN)),
            (&[0, 1], 2, 2, None),
        ];
        for (events, now, reserve, want) in cases {
            assert_eq!(
                five_per_hour.blocked_until(&at(events), *reserve, t(*now)),
                want.map(t),
                "{events:?} at {now} reserve {reserve}"
            );
        }
        assert_eq!(five_per_hour.remaining(&at(&[0, 1]), t(2)), 3);
        assert_eq!(five_per_hour.remaining(&at(&[0, 1]), t(12 * MIN + 2)), 4);
        // Stamped rounded up, an event of this very second is no later than
        // now: the burst is there at once.
        let now = t(0) + Duration::from_millis(300);
        assert_eq!(five_per_hour.blocked_until(&[stamp(now); 4], 0, now), None);
        assert!(
            five_per_hour
                .blocked_until(&[stamp(now); 5], 0, now)
                .is_some()
        );
        let custom = Bucket::new(2, FAILED_AUTHORIZATIONS_WINDOW, Some(3));
        assert_eq!(custom.blocked_until(&at(&[0, 0]), 0, t(1)), Some(t(3)));
    }

    #[test]
    fn never_more_than_a_bucket_allows_whatever_the_attempts() {
        // An attempt every 7 minutes for two weeks: in any interval, at most
        // the burst plus one per refill period (Let's Encrypt's guarantee).
        let limits = le();
        let bucket = limits.bucket(Limit::CertificatesPerNameSet);
        let mut ledger = Ledger::default();
        let www = names(&["www.example.com"]);
        let mut granted = Vec::new();
        let mut now = t(0);
        while now < t(0) + 2 * CERTIFICATES_WINDOW {
            if ledger.reserve(&limits, "www", spend(&www), now).is_ok() {
                ledger.finish("www", &www, &Finished::Finalized, now);
                granted.push(unix(now));
            }
            now += Duration::from_secs(7 * MIN);
        }
        for (i, start) in granted.iter().enumerate() {
            for (j, end) in granted.iter().enumerate().skip(i) {
                let allowed = u64::from(bucket.burst) + (end - start) / bucket.refill.as_secs();
                assert!(
                    (j - i + 1) as u64 <= allowed,
                    "{} from {start} to {end}",
                    j - i + 1
                );
            }
        }
        // 5 at once, then one every 33.6 hours: 14 in two weeks.
        assert!(granted.len() >= 14, "{}", granted.len());
    }

    #[test]
    fn pruning_keeps_the_window_and_never_changes_a_decision() {
        let bucket = Bucket::new(3, Duration::from_secs(30), None);
        let mut events = vec![t(0), t(1), t(40), t(100)]
            .into_iter()
            .map(unix)
            .collect();
        bucket.prune(&mut events, t(110));
        assert_eq!(events, vec![unix(t(100))], "older than 30 s and not needed");
        let mut events = vec![unix(t(0)), unix(t(1))];
        bucket.prune(&mut events, t(25));
        assert_eq!(events.len(), 2, "within the window");
        let histories: &[&[u64]] = &[&[0, 1, 2, 50, 51, 52, 53], &[0, 5, 10, 100], &[7, 7, 7, 7]];
        for history in histories {
            let events: Vec<u64> = history.iter().map(|s| 1_000_000_000 + s).collect();
            for now in [53, 60, 75, 90, 200] {
                let mut pruned = events.clone();
                bucket.prune(&mut pruned, t(now));
                for later in [now, now + 5, now + 20, now + 100] {
                    assert_eq!(
                        bucket.blocked_until(&pruned, 0, t(later)),
                        bucket.blocked_until(&events, 0, t(later)),
                        "{history:?} pruned at {now}, asked at {later}: {pruned:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn five_certificates_per_name_set_then_one_every_33_6_hours() {
        let limits = le();
        let mut ledger = Ledger::default();
        let www = names(&["www.example.com", "example.com"]);
        for i in 0..5 {
            ledger
                .reserve(&limits, "www", spend(&www), t(i * MIN))
                .unwrap();
            ledger.finish("www", &www, &Finished::Finalized, t(i * MIN + 1));
        }
        let blocked = ledger
            .reserve(&limits, "www", spend(&www), t(10 * MIN))
            .unwrap_err();
        assert_eq!(blocked.limit, Limit::CertificatesPerNameSet);
        assert_eq!(blocked.until, t(120_960));
        // The same names in another order are the same set; another set is free.
        let reordered = names(&["example.com", "WWW.example.com"]);
        assert!(ledger.check(&limits, spend(&reordered), t(600)).is_err());
        let other = names(&["www.example.com"]);
        assert!(ledger.check(&limits, spend(&other), t(600)).is_ok());
        assert!(
            ledger
                .reserve(&limits, "www", spend(&www), t(120_960))
                .is_ok()
        );
    }

    #[test]
    fn an_order_that_never_finalized_gives_its_certificate_back() {
        let limits = le();
        let mut ledger = Ledger::default();
        let www = names(&["www.example.com"]);
        for i in 0..10 {
            ledger.reserve(&limits, "www", spend(&www), t(i)).unwrap();
            ledger.finish(
                "www",
                &www,
                &Finished::NotFinalized {
                    valid_names: vec![],
                },
                t(i),
            );
        }
        assert!(ledger.certificates.is_empty(), "{ledger:?}");
        assert!(ledger.registered_domains.is_empty(), "{ledger:?}");
        assert_eq!(ledger.orders.len(), 10, "orders stay counted");
        assert!(ledger.in_flight.is_empty());
        assert!(
            ledger.failed_authorizations.is_empty(),
            "nothing was handed to the CA"
        );
    }

    #[test]
    fn every_name_handed_to_the_ca_fails_unless_seen_valid() {
        let both = names(&["www.example.com", "bad.example.com"]);
        // (how the order ended, names counted as failed)
        let cases: Vec<(Finished, Vec<&str>)> = vec![
            (Finished::Finalized, vec![]),
            (
                Finished::NotFinalized {
                    valid_names: names(&["www.example.com"]),
                },
                vec!["bad.example.com"],
            ),
            // The names could not be read back: both count.
            (
                Finished::NotFinalized {
                    valid_names: vec![],
                },
                vec!["bad.example.com", "www.example.com"],
            ),
            (
                Finished::Unknown,
                vec!["bad.example.com", "www.example.com"],
            ),
        ];
        for (how, want) in cases {
            let mut ledger = Ledger::default();
            ledger.reserve(&le(), "www", spend(&both), t(0)).unwrap();
            ledger.trigger("www", &both);
            ledger.finish("www", &both, &how, t(1));
            let counted: Vec<&str> = ledger
                .failed_authorizations
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(counted, want, "{how:?}");
            assert!(ledger.triggered.is_empty());
        }
    }

    #[test]
    fn an_order_interrupted_by_a_stop_counts_its_triggered_names_and_its_certificate() {
        let mut ledger = Ledger::default();
        let bad = names(&["bad.example.com"]);
        ledger.reserve(&le(), "bad", spend(&bad), t(0)).unwrap();
        ledger.trigger("bad", &bad);
        // The agent is killed here; the ledger was written; the next start:
        let json = serde_json::to_vec(&ledger).unwrap();
        let mut restarted = Ledger::from_json(&json).unwrap();
        assert_eq!(restarted.interrupted("bad", t(30)), Some(unix(t(0))));
        assert_eq!(
            restarted.failed_authorizations["bad.example.com"],
            vec![unix(t(30))]
        );
        assert_eq!(restarted.certificates.len(), 1, "it may have been issued");
        assert!(restarted.in_flight.is_empty() && restarted.triggered.is_empty());
        assert_eq!(restarted.interrupted("bad", t(31)), None);
    }

    #[test]
    fn five_failed_authorizations_per_name_then_one_every_12_minutes() {
        let mut ledger = Ledger::default();
        let bad = names(&["bad.example.com"]);
        for i in 0..5 {
            failed(&mut ledger, "bad", &bad, t(i * 10));
        }
        let blocked = ledger.check(&le(), spend(&bad), t(50)).unwrap_err();
        assert_eq!(blocked.limit, Limit::FailedAuthorizationsPerName);
        assert_eq!(blocked.until, t(12 * MIN));
        // A certificate without the failing name is not held back.
        let www = names(&["www.example.com"]);
        assert!(ledger.check(&le(), spend(&www), t(50)).is_ok());
        failed(&mut ledger, "bad", &bad, t(12 * MIN));
        assert_eq!(
            ledger
                .check(&le(), spend(&bad), t(12 * MIN))
                .unwrap_err()
                .until,
            t(24 * MIN)
        );
    }

    #[test]
    fn registered_domains_from_the_public_suffix_list() {
        for (name, want) in [
            ("a.shop.example.com", "example.com"),
            ("*.shop.example.com", "example.com"),
            ("www.example.co.uk", "example.co.uk"),
            ("x.y.foo.github.io", "foo.github.io"),
            ("Example.COM", "example.com"),
            ("192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3::1", "2001:db8:1:2::/64"),
            ("co.uk", "co.uk"),
        ] {
            assert_eq!(registered_domain(name), want, "{name}");
        }
    }

    #[test]
    fn fifty_certificates_per_registered_domain_and_on_demand_leaves_a_reserve() {
        let limits = le();
        let mut ledger = Ledger::default();
        // On-demand names under one registered domain: 80 % of 50 (40).
        let mut ordered = 0;
        for i in 0..60 {
            let one = names(&[&format!("n{i}.shop.example.com")]);
            let od = Spend {
                domains: &one,
                exempt: false,
                on_demand: true,
            };
            match ledger.reserve(&limits, &format!("od-{i}"), od, t(i)) {
                Ok(()) => {
                    ledger.finish(&format!("od-{i}"), &one, &Finished::Finalized, t(i));
                    ordered += 1;
                }
                Err(blocked) => assert_eq!(blocked.limit, Limit::CertificatesPerRegisteredDomain),
            }
        }
        assert_eq!(ordered, 40);
        // Configured certificates under it get the rest, then wait too.
        for i in 0..10 {
            let www = names(&[&format!("w{i}.example.com")]);
            ledger.reserve(&limits, "www", spend(&www), t(100)).unwrap();
            ledger.finish("www", &www, &Finished::Finalized, t(100));
        }
        let www = names(&["www.example.com", "example.org"]);
        let blocked = ledger.check(&limits, spend(&www), t(100)).unwrap_err();
        assert_eq!(blocked.limit, Limit::CertificatesPerRegisteredDomain);
        assert_eq!(blocked.until, t(0) + REGISTERED_DOMAIN_WINDOW / 50);
        // Another registered domain is not held back.
        assert!(
            ledger
                .check(&limits, spend(&names(&["example.org"])), t(100))
                .is_ok()
        );
    }

    #[test]
    fn on_demand_never_spends_the_last_orders() {
        let limits = Limits {
            orders_per_3_hours: 10,
            configured_reserve_percent: 20,
            ..le()
        };
        assert_eq!(limits.on_demand_reserve(Limit::OrdersPerAccount), 2);
        let tiny = Limits {
            orders_per_3_hours: 3,
            configured_reserve_percent: 1,
            ..le()
        };
        assert_eq!(
            tiny.on_demand_reserve(Limit::OrdersPerAccount),
            1,
            "at least one"
        );
        let mut ledger = Ledger::default();
        let mut on_demand = 0;
        for i in 0..20 {
            let one = names(&[&format!("n{i}.example.net")]);
            let od = Spend {
                domains: &one,
                exempt: false,
                on_demand: true,
            };
            if ledger.reserve(&limits, "od", od, t(i)).is_ok() {
                on_demand += 1;
            }
        }
        assert_eq!(on_demand, 8);
        let www = names(&["www.example.com"]);
        ledger.reserve(&limits, "www", spend(&www), t(30)).unwrap();
        ledger
            .reserve(&limits, "api", spend(&names(&["api.example.com"])), t(30))
            .unwrap();
        let blocked = ledger
            .reserve(&limits, "x", spend(&names(&["x.example.com"])), t(30))
            .unwrap_err();
        assert_eq!(blocked.limit, Limit::OrdersPerAccount);
        assert_eq!(ledger.orders_remaining(&limits, t(30)), 0);
    }

    #[test]
    fn exempt_renewals_pass_and_are_not_counted() {
        let limits = Limits {
            orders_per_3_hours: 1,
            ..le()
        };
        let mut ledger = Ledger::default();
        let d = names(&["d.example.com"]);
        ledger.reserve(&limits, "d", spend(&d), t(0)).unwrap();
        assert!(ledger.reserve(&limits, "d", spend(&d), t(1)).is_err());
        let exempt = Spend {
            exempt: true,
            ..spend(&d)
        };
        ledger.reserve(&limits, "d", exempt, t(2)).unwrap();
        assert_eq!(ledger.orders.len(), 1);
        assert_eq!(ledger.in_flight["d"], unix(t(2)));
    }

    #[test]
    fn the_hourly_on_demand_cap_is_a_bucket_in_the_ledger() {
        let three_per_hour = Bucket::new(3, Duration::from_secs(3600), None);
        let mut ledger = Ledger::default();
        for i in 0..3 {
            ledger.admit_on_demand(three_per_hour, t(i)).unwrap();
        }
        assert_eq!(
            ledger.admit_on_demand(three_per_hour, t(3)),
            Err(t(20 * MIN))
        );
        // It is state: a restart does not refill it.
        let json = serde_json::to_vec(&ledger).unwrap();
        let mut restarted = Ledger::from_json(&json).unwrap();
        assert!(restarted.admit_on_demand(three_per_hour, t(10)).is_err());
        assert!(
            restarted
                .admit_on_demand(three_per_hour, t(20 * MIN))
                .is_ok()
        );
    }

    #[test]
    fn refused_names_are_remembered_until_their_time() {
        let mut ledger = Ledger::default();
        ledger.refuse("bad.example.com", t(100), t(0));
        assert_eq!(ledger.refused_until("bad.example.com", t(50)), Some(t(100)));
        assert_eq!(ledger.refused_until("bad.example.com", t(100)), None);
        assert_eq!(ledger.refused_until("ok.example.com", t(50)), None);
        ledger.prune(&le(), t(101));
        assert!(ledger.refused.is_empty());
    }

    /// A ledger as the agent wrote it before buckets and registered domains
    /// (no `version`): it loads, keeps its events, and counts its
    /// certificates for their registered domains.
    #[test]
    fn an_old_ledger_loads_and_is_migrated() {
        let old = br#"{"orders":[1000000000,1000000060],"certificates":{"example.com,www.example.com":[1000000000],"a.example.org":[1000000060]},"failed_authorizations":{"bad.example.com":[1000000030]},"in_flight":{"www":1000000060},"replaces_not_reflected":true}"#;
        let ledger = Ledger::from_json(old).unwrap();
        assert_eq!(ledger.version, LEDGER_VERSION);
        assert_eq!(ledger.orders, vec![1_000_000_000, 1_000_000_060]);
        assert_eq!(
            ledger.failed_authorizations["bad.example.com"],
            vec![1_000_000_030]
        );
        assert_eq!(ledger.in_flight["www"], 1_000_000_060);
        assert!(ledger.replaces_not_reflected);
        assert_eq!(
            ledger.registered_domains["example.com"],
            vec![1_000_000_000]
        );
        assert_eq!(
            ledger.registered_domains["example.org"],
            vec![1_000_000_060]
        );
        // Written back, it is the new format and is not migrated twice.
        let again = Ledger::from_json(&serde_json::to_vec(&ledger).unwrap()).unwrap();
        assert_eq!(again, ledger);
        assert_eq!(Ledger::from_json(b"{}").unwrap().version, LEDGER_VERSION);
    }

    #[test]
    fn a_new_ledger_is_never_migrated() {
        let mut ledger = Ledger::default();
        let www = names(&["www.example.com"]);
        ledger.reserve(&le(), "www", spend(&www), t(0)).unwrap();
        ledger.finish("www", &www, &Finished::Finalized, t(1));
        ledger.take_changes();
        let again = Ledger::from_json(&serde_json::to_vec(&ledger).unwrap()).unwrap();
        assert_eq!(again.registered_domains["example.com"], vec![unix(t(0))]);
        assert_eq!(again, ledger);
    }
}

#[cfg(test)]
mod edge_tests {
    //! The buckets and windows at their exact edges: one millisecond before a
    //! token refills and at it, an event exactly at the window's start and
    //! one second inside, an event stamped ahead of the clock.

    use super::*;

    const BASE: u64 = 1_000_000_000;

    fn at(secs: u64) -> SystemTime {
        from_unix(BASE + secs)
    }

    fn ms(t: SystemTime, delta: i64) -> SystemTime {
        if delta >= 0 {
            t + Duration::from_millis(delta.unsigned_abs())
        } else {
            t - Duration::from_millis(delta.unsigned_abs())
        }
    }

    #[test]
    fn a_refill_is_rounded_up_to_the_millisecond_and_a_bucket_holds_at_least_one() {
        let thirds = Bucket::new(3, Duration::from_secs(10), None);
        assert_eq!(thirds.refill, Duration::from_millis(3_334), "never faster");
        let none = Bucket::new(0, Duration::from_secs(60), None);
        assert_eq!((none.burst, none.refill), (1, Duration::from_secs(60)));
        let custom = Bucket::new(5, ORDERS_WINDOW, Some(7));
        assert_eq!(
            (custom.burst, custom.refill, custom.window),
            (5, Duration::from_secs(7), ORDERS_WINDOW)
        );
    }

    #[test]
    fn the_next_token_is_there_exactly_one_refill_after_a_full_burst() {
        let bucket = Bucket::new(5, FAILED_AUTHORIZATIONS_WINDOW, None);
        let refill = bucket.refill;
        let burst = [BASE; 5];
        let full_at = at(0) + refill;
        // One millisecond short: blocked until exactly then, nothing left.
        let before = ms(full_at, -1);
        assert_eq!(bucket.blocked_until(&burst, 0, before), Some(full_at));
        assert_eq!(bucket.remaining(&burst, before), 0);
        // At it: one token, no more.
        assert_eq!(bucket.blocked_until(&burst, 0, full_at), None);
        assert_eq!(bucket.remaining(&burst, full_at), 1);
        let mut six = burst.to_vec();
        six.push(BASE + refill.as_secs());
        assert_eq!(
            bucket.blocked_until(&six, 0, full_at),
            Some(full_at + refill)
        );
        // Empty again after burst × refill: every token back.
        assert_eq!(bucket.remaining(&burst, at(0) + refill * 5), 5);
        assert_eq!(bucket.remaining(&burst, ms(at(0) + refill * 5, -1)), 4);
    }

    #[test]
    fn a_reserve_moves_the_edge_by_one_refill_per_token_kept() {
        let bucket = Bucket::new(5, FAILED_AUTHORIZATIONS_WINDOW, None);
        let refill = bucket.refill;
        let three = [BASE; 3];
        // Three spent, two kept in reserve: the fourth waits one refill.
        assert_eq!(bucket.blocked_until(&three, 2, at(0)), Some(at(0) + refill));
        assert_eq!(bucket.blocked_until(&three, 2, at(0) + refill), None);
        assert_eq!(bucket.blocked_until(&three, 1, at(0)), None);
    }

    #[test]
    fn an_event_exactly_at_the_window_start_is_pruned_and_one_inside_is_kept() {
        // A one-second refill: the bucket itself needs nothing after a second,
        // so only the window decides what the ledger keeps.
        let bucket = Bucket::new(3, Duration::from_secs(30), Some(1));
        let now = at(100);
        let mut events = vec![BASE + 70, BASE + 71, BASE + 99];
        bucket.prune(&mut events, now);
        assert_eq!(events, [BASE + 71, BASE + 99], "70 is the window's start");
        // An event still needed by the bucket is kept however old.
        let slow = Bucket::new(1, Duration::from_secs(30), Some(3_600));
        let mut events = vec![BASE];
        slow.prune(&mut events, at(100));
        assert_eq!(events, [BASE], "the bucket is not full again yet");
        slow.prune(&mut events, at(3_600));
        assert!(events.is_empty(), "full again and out of the window");
    }

    #[test]
    fn an_event_stamped_ahead_of_the_clock_counts_as_now() {
        // The clock stepped back after two events were stamped at 50: asked
        // before 50 they count as spent at that moment, never earlier (which
        // would refill sooner than the CA does).
        let bucket = Bucket::new(2, Duration::from_secs(60), None);
        let ahead = [BASE + 50, BASE + 50];
        for asked in [10, 30, 49, 50] {
            let spent_then = [BASE + asked, BASE + asked];
            assert_eq!(
                bucket.blocked_until(&ahead, 0, at(asked)),
                bucket.blocked_until(&spent_then, 0, at(asked)),
                "asked at {asked}"
            );
            assert_eq!(
                bucket.blocked_until(&ahead, 0, at(asked)),
                Some(at(asked) + bucket.refill)
            );
        }
        assert_eq!(
            bucket.blocked_until(&ahead, 0, at(50) + bucket.refill),
            None
        );
    }

    #[test]
    fn the_ledger_refuses_one_millisecond_before_the_edge_and_admits_at_it() {
        let limits = Limits::default();
        let refill = limits.bucket(Limit::CertificatesPerNameSet).refill;
        let www = vec!["www.example.com".to_owned()];
        let spend = Spend {
            domains: &www,
            exempt: false,
            on_demand: false,
        };
        let mut ledger = Ledger::default();
        for _ in 0..5 {
            ledger
                .reserve(&limits, "www", spend, at(0))
                .expect("a burst of 5");
            ledger.finish("www", &www, &Finished::Finalized, at(0));
        }
        let edge = at(0) + refill;
        let blocked = ledger
            .check(&limits, spend, ms(edge, -1))
            .expect_err("the sixth, a millisecond early");
        assert_eq!(
            blocked,
            Blocked {
                limit: Limit::CertificatesPerNameSet,
                until: edge
            }
        );
        assert_eq!(ledger.check(&limits, spend, edge), Ok(()));
        // An exempt renewal passes either way and spends nothing.
        let exempt = Spend {
            exempt: true,
            ..spend
        };
        assert_eq!(ledger.check(&limits, exempt, ms(edge, -1)), Ok(()));
    }

    #[test]
    fn every_limit_has_its_own_bucket_and_label() {
        let limits = Limits {
            orders_refill_seconds: Some(11),
            certificates_per_name_set_refill_seconds: Some(12),
            failed_authorizations_refill_seconds: Some(13),
            certificates_per_registered_domain_refill_seconds: Some(14),
            ..Limits::default()
        };
        let refills: Vec<u64> = Limit::ALL
            .iter()
            .map(|l| limits.bucket(*l).refill.as_secs())
            .collect();
        assert_eq!(refills, [11, 12, 13, 14]);
        let windows: Vec<Duration> = Limit::ALL
            .iter()
            .map(|l| Limits::default().bucket(*l).window)
            .collect();
        assert_eq!(
            windows,
            [
                ORDERS_WINDOW,
                CERTIFICATES_WINDOW,
                FAILED_AUTHORIZATIONS_WINDOW,
                REGISTERED_DOMAIN_WINDOW
            ]
        );
        for limit in Limit::ALL {
            assert_eq!(Limit::from_label(limit.label()), Some(limit));
        }
        assert_eq!(Limit::from_label("orders"), None);
    }
}
