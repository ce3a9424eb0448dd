//! A year of renewals in seconds: the real certificate manager (its loop,
//! agenda, trigger, CA-limit budget and ledger, the real `FileStore` on
//! tmpfs) runs 365 days on tokio's paused clock against a simulated CA, with
//! every certificate issued at once on day 0 (so their renewals bunch), the
//! three Let's Encrypt profiles, ARI windows from the CA, 60 days in which
//! the CA offers no renewal info (renewals by the two-thirds rule, counted
//! against every limit: the only time the budget binds, ARI renewals being
//! exempt), a 24-hour CA outage and a week in which one order in ten fails
//! validation. The CA enforces Let's Encrypt's limits itself and records
//! every order with its virtual time, so what is asserted about the limits
//! is counted by the CA, not by the agent.
//!
//! The size (`CERTIFICATES`, or `YEAR_CERTIFICATES`) and the mix of
//! lifetimes are stated beside them; docs/testing.md has the figures.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use acme_agent::Error;
use acme_agent::certificate::{self, Leaf};
use acme_agent::config::Config;
use acme_agent::disk::store::FileStore;
use acme_agent::domain::budget::registered_domain;
use acme_agent::domain::spec::{Certificate, KeyPem, KeyType};
use acme_agent::error::CaFailure;
use acme_agent::manager::Manager;
use acme_agent::metrics::Metrics;
use acme_agent::ports::issuer::{Failure, Issued, Issuer, OrderRequest, RenewalWindow};
use acme_agent::ports::sink::{CertificateSink, IssuedCertificate};
use acme_agent::ports::solver::{Solver, Solvers};
use acme_agent::ports::store::{StateStore, StoredCertificate};
use acme_agent::time::Clock;
use rcgen::{CertificateParams, DistinguishedName, IsCa, KeyPair};
use tokio::sync::{mpsc, watch};

const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3_600);
const DAYS: u32 = 365;

/// How many certificates: 10,000 (the size the orders limit is scaled from)
/// in the optimized `sim` profile the test command runs it in (about a
/// minute on 2 cores: `cargo test --profile sim -p acme-agent --test year`);
/// 1,000 in an unoptimized build, where 10,000 would take ten minutes
/// (~40 s), see docs/testing.md.
const CERTIFICATES: usize = if cfg!(debug_assertions) {
    1_000
} else {
    10_000
};

/// `CERTIFICATES`, or `YEAR_CERTIFICATES` from the environment (to try a
/// size by hand).
fn certificates() -> usize {
    std::env::var("YEAR_CERTIFICATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CERTIFICATES)
}

/// The share of each Let's Encrypt profile (classic 90 days, tlsserver 45
/// days, shortlived 160 hours). Short-lived certificates are few on purpose:
/// each renews every ~4 days, and without renewal info 10,000 of them alone
/// would need ~2,250 orders a day where 300 per 3 hours allows 2,400.
const PROFILES: [(&str, Duration, usize); 3] = [
    ("classic", Duration::from_secs(90 * 86_400), 60),
    ("tlsserver", Duration::from_secs(45 * 86_400), 30),
    ("shortlived", Duration::from_secs(160 * 3_600), 10),
];
/// Certificates per registered domain: 50 per domain per week is Let's
/// Encrypt's limit, and a short-lived certificate renews ~1.75 times a week.
const PER_DOMAIN: usize = 10;

/// When the CA offers no renewal info (an ARI outage, or a CA without it):
/// the day-0 classic and tlsserver certificates renew by the two-thirds
/// rule meanwhile, with orders that count against every limit.
const NO_ARI: (Duration, Duration) = (
    Duration::from_secs(20 * 86_400),
    Duration::from_secs(60 * 86_400),
);

/// The agent's longest wait between failed attempts (`retry.max_seconds`).
const MAX_BACKOFF: Duration = HOUR;

/// When the CA answers nothing, and when one order in ten fails.
const OUTAGE: (Duration, Duration) = (Duration::from_secs(100 * 86_400), DAY);
const FLAKY: (Duration, Duration) = (
    Duration::from_secs(200 * 86_400),
    Duration::from_secs(7 * 86_400),
);

/// A Let's Encrypt limit as it computes it (GCRA): `burst` at once, then
/// one more every `refill`.
#[derive(Clone, Copy)]
struct Limit {
    burst: u32,
    refill: Duration,
}

/// New orders per account: Let's Encrypt's 300 per 3 hours for 10,000
/// certificates, scaled with the number simulated, so a smaller run puts
/// the same load on its budget (the agent is configured with the same).
fn orders_limit() -> Limit {
    let burst = u32::try_from((300 * certificates()).div_ceil(10_000)).unwrap_or(300);
    Limit {
        burst,
        refill: 3 * HOUR / burst,
    }
}
const NAME_SET: Limit = Limit {
    burst: 5,
    refill: Duration::from_secs(7 * 86_400 / 5),
};
const DOMAIN: Limit = Limit {
    burst: 50,
    refill: Duration::from_secs(7 * 86_400 / 50),
};
const FAILED_AUTHZ: Limit = Limit {
    burst: 5,
    refill: Duration::from_secs(3_600 / 5),
};

/// One limit's theoretical arrival times, by key.
#[derive(Default)]
struct Gcra(HashMap<String, SystemTime>);

impl Gcra {
    fn allows(&self, limit: Limit, key: &str, now: SystemTime) -> bool {
        let tolerance = limit.refill * (limit.burst - 1);
        self.0
            .get(key)
            .is_none_or(|tat| tat.duration_since(now).unwrap_or_default() <= tolerance)
    }

    fn spend(&mut self, limit: Limit, key: &str, now: SystemTime) {
        let tat = self.0.entry(key.to_owned()).or_insert(now);
        *tat = (*tat).max(now) + limit.refill;
    }
}

/// An order as the CA saw it.
#[derive(Clone)]
struct Order {
    at: SystemTime,
    /// An ARI renewal inside its window: exempt from the limits.
    exempt: bool,
    outcome: &'static str,
}

struct Issuance {
    not_before: SystemTime,
    lifetime: Duration,
    replaced: bool,
}

#[derive(Default)]
struct CaState {
    orders: Vec<Order>,
    /// Orders refused because a limit would have been exceeded.
    refused: Vec<(SystemTime, &'static str, String)>,
    issued: HashMap<String, Issuance>,
    serial: u64,
    limits: [Gcra; 4],
}

/// A fake CA, for what no real one can do: a year in seconds, a 24-hour
/// outage and a week of 10 % failures on cue. It signs real certificates
/// (one CA key, one leaf key: signing is the cost, and the agent checks
/// chain, key, names and validity against the injected clock as it does any
/// CA's), answers ARI windows (the middle third of the last third of the
/// lifetime), and enforces Let's Encrypt's limits as Let's Encrypt counts
/// them, ARI renewals exempt.
struct SimCa {
    clock: Clock,
    start: SystemTime,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    leaf_key: KeyPair,
    state: Mutex<CaState>,
    /// Renewal-info requests left that panic (a bug in a job, on cue).
    panics: std::sync::atomic::AtomicUsize,
}

impl SimCa {
    fn new(clock: Clock, start: SystemTime) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "simulated CA");
        Self {
            clock,
            start,
            ca_params,
            ca_key: KeyPair::generate().expect("CA key"),
            leaf_key: KeyPair::generate().expect("leaf key"),
            state: Mutex::new(CaState::default()),
            panics: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CaState> {
        self.state.lock().expect("CA state")
    }

    fn since_start(&self, now: SystemTime) -> Duration {
        now.duration_since(self.start).unwrap_or_default()
    }

    fn down(&self, now: SystemTime) -> bool {
        let t = self.since_start(now);
        t >= OUTAGE.0 && t < OUTAGE.0 + OUTAGE.1
    }

    fn unreachable() -> Error {
        Error::Ca {
            failure: CaFailure::Unreachable,
            detail: "simulated outage: no answer from the CA".into(),
        }
    }

    /// A certificate for `domains` of `profile`, valid from `not_before`.
    fn sign(
        &self,
        domains: &[String],
        profile: &str,
        not_before: SystemTime,
    ) -> (String, KeyPem, Leaf) {
        let lifetime = lifetime(profile);
        let mut params = CertificateParams::new(domains.to_vec()).expect("leaf params");
        params.distinguished_name = DistinguishedName::new();
        params.not_before = not_before.into();
        params.not_after = (not_before + lifetime).into();
        params.use_authority_key_identifier_extension = true;
        let serial = {
            let mut state = self.state();
            state.serial += 1;
            state.serial
        };
        params.serial_number = Some(rcgen::SerialNumber::from(serial.to_be_bytes().to_vec()));
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&self.leaf_key, &issuer).expect("signing");
        let chain = cert.pem();
        let key = KeyPem::new(self.leaf_key.serialize_pem());
        // The agent's own check, at the injected clock.
        let leaf = certificate::verify(&chain, &key, domains, self.clock.now())
            .expect("the agent's check");
        let id = leaf.ari_id.clone().expect("an ARI identifier");
        self.state().issued.insert(
            id,
            Issuance {
                not_before,
                lifetime,
                replaced: false,
            },
        );
        (chain, key, leaf)
    }

    /// Checks and spends the limits of a new order, as Let's Encrypt does;
    /// `Err` names the limit that refused it.
    fn admit(
        &self,
        state: &mut CaState,
        domains: &[String],
        exempt: bool,
        now: SystemTime,
    ) -> Result<(), &'static str> {
        let set = name_set(domains);
        let domain = registered_domain(&domains[0]);
        if domains
            .iter()
            .any(|d| !state.limits[3].allows(FAILED_AUTHZ, d, now))
        {
            return Err("failed authorizations per name per hour");
        }
        if exempt {
            return Ok(());
        }
        if !state.limits[0].allows(orders_limit(), "account", now) {
            return Err("new orders per 3 hours");
        }
        if !state.limits[1].allows(NAME_SET, &set, now) {
            return Err("certificates per exact name set per 7 days");
        }
        if !state.limits[2].allows(DOMAIN, &domain, now) {
            return Err("certificates per registered domain per 7 days");
        }
        state.limits[0].spend(orders_limit(), "account", now);
        state.limits[1].spend(NAME_SET, &set, now);
        state.limits[2].spend(DOMAIN, &domain, now);
        Ok(())
    }

    /// Whether the order renews a certificate this CA issued, not replaced
    /// yet, inside its ARI window: exempt (and then marked replaced).
    fn exempt(&self, state: &mut CaState, replaces: Option<&str>, now: SystemTime) -> bool {
        let Some(issuance) = replaces.and_then(|id| state.issued.get_mut(id)) else {
            return false;
        };
        let (start, _) = window(issuance.not_before, issuance.lifetime);
        if issuance.replaced || now < start {
            return false;
        }
        issuance.replaced = true;
        true
    }

    /// One order in ten fails validation during the flaky week (by a hash
    /// of the order's number, so a run is repeatable).
    fn fails(&self, state: &CaState, now: SystemTime) -> bool {
        let t = self.since_start(now);
        let n = state.orders.len() as u64;
        t >= FLAKY.0
            && t < FLAKY.0 + FLAKY.1
            && n.wrapping_mul(0x9E37_79B9_7F4A_7C15).is_multiple_of(10)
    }
}

fn name_set(domains: &[String]) -> String {
    let mut sorted = domains.to_vec();
    sorted.sort();
    sorted.join(",")
}

fn lifetime(profile: &str) -> Duration {
    PROFILES
        .iter()
        .find(|(name, _, _)| *name == profile)
        .map_or(PROFILES[0].1, |p| p.1)
}

/// The ARI window for a certificate: from two thirds of its lifetime on,
/// for a tenth of it (Let's Encrypt's are of that shape).
fn window(not_before: SystemTime, lifetime: Duration) -> (SystemTime, SystemTime) {
    let start = not_before + lifetime * 2 / 3;
    (start, start + lifetime / 10)
}

#[async_trait::async_trait]
impl Issuer for SimCa {
    async fn open(&self) -> Result<(), Error> {
        if self.down(self.clock.now()) {
            return Err(Self::unreachable());
        }
        Ok(())
    }

    async fn check(&self, _spec: &Certificate) -> Result<(), Error> {
        Ok(())
    }

    async fn renewal_info(&self, leaf: &Leaf) -> Result<Option<RenewalWindow>, Error> {
        let panics = &self.panics;
        let take = |n: usize| n.checked_sub(1);
        use std::sync::atomic::Ordering::SeqCst;
        assert!(
            panics.fetch_update(SeqCst, SeqCst, take).is_err(),
            "a job panics on cue"
        );
        let now = self.clock.now();
        if self.down(now) {
            return Err(Self::unreachable());
        }
        let t = self.since_start(now);
        if t >= NO_ARI.0 && t < NO_ARI.0 + NO_ARI.1 {
            return Ok(None);
        }
        let state = self.state();
        let Some(issuance) = leaf.ari_id.as_deref().and_then(|id| state.issued.get(id)) else {
            return Ok(None);
        };
        let (start, end) = window(issuance.not_before, issuance.lifetime);
        Ok(Some(RenewalWindow {
            start,
            end,
            // Let's Encrypt asks clients to look at least daily.
            retry_after: DAY,
        }))
    }

    async fn issue(&self, order: OrderRequest<'_>) -> Result<Issued, Failure> {
        let now = self.clock.now();
        if self.down(now) {
            return Err(Self::unreachable().into());
        }
        let domains = &order.spec.domains;
        let fails = {
            let mut state = self.state();
            let exempt = self.exempt(&mut state, order.replaces, now);
            if let Err(limit) = self.admit(&mut state, domains, exempt, now) {
                state.refused.push((now, limit, name_set(domains)));
                return Err(Error::Ca {
                    failure: CaFailure::RateLimited { retry_after: HOUR },
                    detail: format!("simulated CA: {limit} exceeded"),
                }
                .into());
            }
            let fails = self.fails(&state, now);
            state.orders.push(Order {
                at: now,
                exempt,
                outcome: if fails { "failed" } else { "issued" },
            });
            fails
        };
        order.trigger.trigger(domains).await?;
        if fails {
            let mut state = self.state();
            for d in domains {
                state.limits[3].spend(FAILED_AUTHZ, d, now);
            }
            return Err(Error::Ca {
                failure: CaFailure::FailedAuthorization,
                detail: format!("simulated CA: {} failed validation", domains[0]),
            }
            .into());
        }
        let profile = order.spec.profile.as_deref().unwrap_or("classic");
        let (chain_pem, key_pem, leaf) = self.sign(domains, profile, now);
        Ok(Issued {
            chain_pem,
            key_pem,
            leaf,
        })
    }
}

/// What Envoy would serve, by certificate name: the sink every install goes
/// through. It records, at each replacement, how much life the replaced
/// certificate had left (negative: it had lapsed).
struct Served {
    clock: Clock,
    profile_of: HashMap<String, &'static str>,
    state: Mutex<ServedState>,
}

#[derive(Default)]
struct ServedState {
    not_after: HashMap<String, SystemTime>,
    /// Per profile: the least life left at a renewal, and renewals.
    worst_left: BTreeMap<&'static str, (Duration, u32)>,
    lapsed: Vec<(String, SystemTime, SystemTime)>,
}

#[async_trait::async_trait]
impl CertificateSink for Served {
    async fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let now = self.clock.now();
        let leaf = certificate::leaf(&certificate.chain_pem)?;
        let profile = self
            .profile_of
            .get(&certificate.name)
            .copied()
            .unwrap_or("?");
        let mut state = self.state.lock().expect("served");
        if let Some(old) = state
            .not_after
            .insert(certificate.name.clone(), leaf.not_after)
        {
            match old.duration_since(now) {
                Ok(left) => {
                    let worst = state.worst_left.entry(profile).or_insert((left, 0));
                    worst.0 = worst.0.min(left);
                    worst.1 += 1;
                }
                Err(_) => state.lapsed.push((certificate.name.clone(), old, now)),
            }
        }
        Ok(())
    }

    async fn installed(&self, name: &str) -> bool {
        self.state
            .lock()
            .expect("served")
            .not_after
            .contains_key(name)
    }
}

/// An http-01 solver that is never asked to present (the simulated CA
/// validates nothing); it only passes the preflight.
struct NoChallenges;

#[async_trait::async_trait]
impl Solver for NoChallenges {
    async fn present(
        &self,
        _spec: &Certificate,
        _challenges: &[acme_agent::challenges::Challenge],
    ) -> Result<Box<dyn acme_agent::ports::solver::Presented>, Error> {
        Err(Error::Validation(
            "the simulated CA asks for no challenge".into(),
        ))
    }
}

fn spec_of(i: usize) -> (String, Vec<String>, &'static str) {
    let total: usize = PROFILES.iter().map(|p| p.2).sum();
    let slot = i % total;
    let mut acc = 0;
    let profile = PROFILES
        .iter()
        .find(|p| {
            acc += p.2;
            slot < acc
        })
        .map_or("classic", |p| p.0);
    // Registered domains as the limits count them (one label under a
    // public suffix): `d0.example.com` would all count as example.com.
    let domain = format!("site{}.com", i / PER_DOMAIN);
    (format!("c{i}"), vec![format!("c{i}.{domain}")], profile)
}

fn config_text(state_dir: &Path, count: usize) -> String {
    let mut text = format!(
        "state_dir = {:?}\nsds_dir = {:?}\norder_concurrency = 16\n[acme]\ndirectory = \"https://ca.invalid/directory\"\n[acme.limits]\norders_per_3_hours = {}\n",
        state_dir.join("state"),
        state_dir.join("sds"),
        orders_limit().burst,
    );
    for i in 0..count {
        let (name, domains, profile) = spec_of(i);
        text.push_str(&format!(
            "[[certificate]]\nname = {name:?}\ndomains = {domains:?}\nprofile = {profile:?}\n"
        ));
    }
    text
}

/// Every certificate stored as issued at `start`, as the agent would have
/// stored it.
async fn issue_day_zero(ca: &SimCa, store: &FileStore, config: &Config, start: SystemTime) {
    for spec in &config.certificates {
        let profile = spec.profile.as_deref().unwrap_or("classic");
        let (chain_pem, key_pem, _) = ca.sign(&spec.domains, profile, start);
        let stored = StoredCertificate {
            domains: spec.domains.clone(),
            key_type: KeyType::EcdsaP256,
            chain_pem,
            key_pem,
        };
        store
            .save_certificate(&spec.name, &stored)
            .await
            .expect("storing day 0");
    }
}

/// Orders in each `width`-long slice of the year, from `start`.
fn histogram(orders: &[Order], start: SystemTime, width: Duration) -> Vec<u32> {
    let slots = (u64::from(DAYS) * DAY.as_secs()).div_ceil(width.as_secs()) as usize;
    let mut counts = vec![0; slots + 1];
    for order in orders {
        let t = order.at.duration_since(start).unwrap_or_default();
        counts[(t.as_secs() / width.as_secs()) as usize] += 1;
    }
    counts
}

/// The most orders in any 3 hours (a sliding window over the CA's record).
fn most_in_3_hours(orders: &[&Order]) -> usize {
    let mut most = 0;
    let mut first = 0;
    for (i, order) in orders.iter().enumerate() {
        while order
            .at
            .duration_since(orders[first].at)
            .unwrap_or_default()
            >= 3 * HOUR
        {
            first += 1;
        }
        most = most.max(i + 1 - first);
    }
    most
}

/// What a simulation leaves to look at: the CA's record, what was served,
/// and when it ended.
struct Run {
    ca: Arc<SimCa>,
    served: Arc<Served>,
    start: SystemTime,
    end: SystemTime,
    day_zero: Duration,
}

/// Day 0 is a fixed date, so a run is the same every time.
const DAY_ZERO: u64 = 1_800_000_000;

/// `count` certificates issued on day 0, managed for `days` on the paused
/// clock; `panics` renewal-info requests panic first.
async fn simulate(count: usize, days: u32, panics: usize) -> Run {
    let wall = std::time::Instant::now();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(DAY_ZERO);
    let clock = Clock::following_tokio(start);
    let dir = tempfile::tempdir_in(shm()).expect("tempdir");
    let text = config_text(dir.path(), count);
    let config = Config::parse(&text, Path::new("year.toml")).expect("config");
    let store = FileStore::open(dir.path().join("state"))
        .expect("store")
        .on_the_calling_thread();
    let ca = Arc::new(SimCa::new(clock, start));
    issue_day_zero(&ca, &store, &config, start).await;
    ca.panics.store(panics, std::sync::atomic::Ordering::SeqCst);
    let day_zero = wall.elapsed();
    let served = Arc::new(Served {
        clock,
        profile_of: config
            .certificates
            .iter()
            .map(|c| (c.name.clone(), profile_name(c)))
            .collect(),
        state: Mutex::new(ServedState::default()),
    });
    let (_config_tx, config_rx) = watch::channel(Arc::new(config));
    let (_requests_tx, requests_rx) = mpsc::channel(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let solvers = Solvers {
        http01: Some(Arc::new(NoChallenges)),
        ..Solvers::default()
    };
    let manager = Manager::new(
        config_rx,
        Arc::new(store),
        Arc::clone(&served) as Arc<dyn CertificateSink>,
        Arc::new(Metrics::new()),
        requests_rx,
        solvers,
        Arc::clone(&ca) as Arc<dyn Issuer>,
    )
    .with_clock(clock);
    let running = tokio::spawn(manager.run(stop_rx));
    tokio::time::sleep(DAY * days).await;
    let end = clock.now();
    stop_tx.send(true).expect("stop");
    running.await.expect("manager");
    Run {
        ca,
        served,
        start,
        end,
        day_zero,
    }
}

#[tokio::test(start_paused = true)]
async fn a_year_of_renewals() {
    let wall = std::time::Instant::now();
    let run = simulate(certificates(), DAYS, 0).await;
    report(&run, wall.elapsed());
}

/// A job that panics (a bug) leaves its certificate due, tried again after
/// the backoff: before, its entry waited for the dead job forever and the
/// certificate lapsed.
#[tokio::test(start_paused = true)]
async fn a_job_that_panics_leaves_its_certificate_due() {
    // Ten classic (90-day) certificates over 100 days; the first three
    // looks panic.
    let run = simulate(10, 100, 3).await;
    let served = run.served.state.lock().expect("served");
    assert_eq!(run.ca.panics.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(served.lapsed.is_empty(), "lapsed: {:?}", served.lapsed);
    assert_eq!(served.not_after.len(), 10);
    assert!(
        served.not_after.values().all(|at| *at > run.end),
        "a certificate expired: {:?}",
        served.not_after
    );
    assert_eq!(served.worst_left.get("classic").map(|w| w.1), Some(10));
}

fn profile_name(spec: &Certificate) -> &'static str {
    let profile = spec.profile.as_deref().unwrap_or("classic");
    PROFILES
        .iter()
        .find(|p| p.0 == profile)
        .map_or("classic", |p| p.0)
}

/// tmpfs when there is one: the store fsyncs every write, as it must.
fn shm() -> &'static Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { shm } else { Path::new("/tmp") }
}

fn report(run: &Run, wall: Duration) {
    let (start, end, day_zero) = (run.start, run.end, run.day_zero);
    let state = run.ca.state();
    let served = run.served.state.lock().expect("served");
    let per_day = histogram(&state.orders, start, DAY);
    println!(
        "orders per day ({} in all, {} exempt ARI renewals, {} failed):",
        state.orders.len(),
        state.orders.iter().filter(|o| o.exempt).count(),
        state
            .orders
            .iter()
            .filter(|o| o.outcome == "failed")
            .count()
    );
    for (week, days) in per_day.chunks(14).enumerate() {
        let row: Vec<String> = days.iter().map(|n| format!("{n:4}")).collect();
        println!("  day {:3}: {}", week * 14, row.join(""));
    }
    let all: Vec<&Order> = state.orders.iter().collect();
    let counted: Vec<&Order> = state.orders.iter().filter(|o| !o.exempt).collect();
    let (most_all, most_counted) = (most_in_3_hours(&all), most_in_3_hours(&counted));
    println!("most orders in any 3 hours: {most_all} ({most_counted} counted against the limit)");
    for (profile, (left, renewals)) in &served.worst_left {
        println!(
            "{profile}: {renewals} renewals, least life left at a renewal {:.1} h",
            left.as_secs_f64() / 3600.0
        );
    }
    println!(
        "refused by a limit: {}; lapsed: {}; wall time {:.1} s ({:.1} s signing day 0)",
        state.refused.len(),
        served.lapsed.len(),
        wall.as_secs_f64(),
        day_zero.as_secs_f64()
    );
    assert!(
        state.refused.is_empty(),
        "the CA refused orders over a limit: {:?}",
        &state.refused[..state.refused.len().min(5)]
    );
    assert!(
        served.lapsed.is_empty(),
        "certificates lapsed before renewal: {:?}",
        &served.lapsed[..served.lapsed.len().min(5)]
    );
    let still: Vec<&String> = served
        .not_after
        .iter()
        .filter(|(_, at)| **at <= end)
        .map(|(n, _)| n)
        .collect();
    assert!(
        still.is_empty(),
        "certificates expired by the end: {still:?}"
    );
    assert_eq!(
        served.not_after.len(),
        certificates(),
        "every certificate served"
    );
    // Within the bucket: at most its burst plus what refills in 3 hours.
    let budget = orders_limit().burst as usize
        + (3 * HOUR).as_secs() as usize / orders_limit().refill.as_secs() as usize;
    assert!(
        most_counted <= budget,
        "{most_counted} counted orders in 3 hours, over {budget}"
    );
    // Every profile renewed, and no later than the end of the CA's window,
    // pushed back at most by the outage and one step of the agent's backoff
    // after it (the least life left that no schedule can avoid).
    for (profile, lifetime, _) in PROFILES {
        let (left, renewals) = served.worst_left.get(profile).copied().unwrap_or_default();
        let (_, end) = window(SystemTime::UNIX_EPOCH, lifetime);
        let after_window = lifetime.saturating_sub(
            end.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let floor = after_window.saturating_sub(OUTAGE.1 + MAX_BACKOFF);
        assert!(renewals > 0, "{profile} never renewed");
        assert!(
            left >= floor,
            "{profile}: renewed with only {left:?} left, less than {floor:?}"
        );
    }
}
