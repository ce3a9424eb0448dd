//! Keeps every configured certificate issued, served and renewed.
//!
//! One loop owns the schedule: per certificate, when to act next. Acting is a
//! job on its own task (check renewal info, order if due, store, install),
//! bounded by `order_concurrency`. Config changes arrive on a watch channel;
//! results come back to the loop, which alone mutates the schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use instant_acme::{Account, CertificateIdentifier};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{Instrument, error, info, info_span, warn};

use crate::Error;
use crate::acme::{self, Http};
use crate::certificate::{self, Leaf};
use crate::challenges::ChallengeSet;
use crate::config::{Acme as AcmeConfig, Certificate, Config};
use crate::metrics::Metrics;
use crate::order::{self, OrderContext};
use crate::schedule::{self, Backoff};
use crate::sink::{CertificateSink, IssuedCertificate};
use crate::store::{StateStore, Status, StoredCertificate, unix};

/// With ARI, how often renewal info is fetched again at most.
const ARI_RECHECK_MAX: Duration = Duration::from_secs(24 * 3600);
/// With ARI, never sooner than this, whatever `Retry-After` says.
const ARI_RECHECK_MIN: Duration = Duration::from_secs(3600);

/// Why a renewal request was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewRefused {
    /// No certificate of that name is configured.
    Unknown,
    /// An order for it is already running.
    InProgress,
}

/// A request to the manager from outside its loop (the API).
pub enum Request {
    /// Order a new certificate now, whatever the schedule says.
    Renew {
        name: String,
        reply: oneshot::Sender<Result<(), RenewRefused>>,
    },
}

/// What the jobs share.
struct Shared {
    acme: AcmeConfig,
    store: Arc<dyn StateStore>,
    sink: Arc<dyn CertificateSink>,
    challenges: Arc<ChallengeSet>,
    metrics: Arc<Metrics>,
    http: Http,
    account: tokio::sync::Mutex<Option<Account>>,
    /// Learnt from the directory on first use: does the CA offer ARI?
    ari: AtomicBool,
}

/// What a job found or did.
enum Outcome {
    /// A new certificate is stored and installed.
    Issued(Leaf),
    /// Nothing to order yet: renew at `renew_at`, look again at `check_at`.
    Scheduled {
        renew_at: SystemTime,
        check_at: SystemTime,
    },
    Failed {
        error: Error,
        retry_after: Option<Duration>,
        /// An order was placed (so it counts in the orders metric).
        ordered: bool,
    },
}

/// One certificate's place in the schedule.
struct Entry {
    spec: Certificate,
    /// The certificate being served, if any.
    leaf: Option<Leaf>,
    /// Fixed per leaf, so the two-thirds time does not move between looks.
    jitter: f64,
    due: SystemTime,
    next_renewal: Option<SystemTime>,
    failures: u32,
    last_error: Option<String>,
    job: Option<AbortHandle>,
    /// Bumped when the spec changes, so a result for the old spec is ignored.
    epoch: u64,
    /// The next job orders whatever the schedule says (`renew`).
    force: bool,
}

impl Entry {
    fn two_thirds(&self) -> Option<SystemTime> {
        self.leaf
            .as_ref()
            .map(|l| schedule::two_thirds(l.not_before, l.not_after, self.jitter))
    }

    fn status(&self) -> Status {
        Status {
            name: self.spec.name.clone(),
            domains: self.spec.domains.clone(),
            not_after: self.leaf.as_ref().map(|l| unix(l.not_after)),
            next_renewal: self.next_renewal.map(unix),
            last_error: self.last_error.clone(),
            failures: self.failures,
            updated: unix(SystemTime::now()),
        }
    }
}

/// True when `leaf` names exactly `spec`'s domains.
fn matches_spec(leaf: &Leaf, spec: &Certificate) -> bool {
    let wanted: BTreeSet<&String> = spec.domains.iter().collect();
    leaf.dns_names.iter().collect::<BTreeSet<_>>() == wanted
}

pub struct Manager {
    shared: Arc<Shared>,
    config: watch::Receiver<Arc<Config>>,
    entries: BTreeMap<String, Entry>,
    jobs: JoinSet<(String, u64, Outcome)>,
    permits: Arc<Semaphore>,
    concurrency: usize,
    backoff: Backoff,
    self_check: Option<String>,
    requests: mpsc::Receiver<Request>,
}

impl Manager {
    /// `config` carries the running config and every reload. The `acme` and
    /// `state_dir` sections are read once: changing them needs a restart.
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        store: Arc<dyn StateStore>,
        sink: Arc<dyn CertificateSink>,
        challenges: Arc<ChallengeSet>,
        metrics: Arc<Metrics>,
        requests: mpsc::Receiver<Request>,
    ) -> Result<Self, Error> {
        let current = Arc::clone(&config.borrow());
        let http = Http::new(current.acme.ca_root.as_deref(), Arc::clone(&metrics))?;
        Ok(Self {
            shared: Arc::new(Shared {
                acme: current.acme.clone(),
                store,
                sink,
                challenges,
                metrics,
                http,
                account: tokio::sync::Mutex::new(None),
                ari: AtomicBool::new(false),
            }),
            config,
            entries: BTreeMap::new(),
            jobs: JoinSet::new(),
            permits: Arc::new(Semaphore::new(current.order_concurrency)),
            concurrency: current.order_concurrency,
            backoff: current.retry.backoff(),
            self_check: current.self_check.as_ref().map(|s| s.target.clone()),
            requests,
        })
    }

    /// Serves every valid stored certificate at once (no network needed), then
    /// keeps all of them issued until `shutdown` flips to true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let config = Arc::clone(&self.config.borrow_and_update());
        self.apply(&config);
        loop {
            self.start_due_jobs();
            let next = self
                .entries
                .values()
                .filter(|e| e.job.is_none())
                .map(|e| e.due)
                .min();
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            });
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                Some(joined) = self.jobs.join_next() => {
                    if let Ok((name, epoch, outcome)) = joined {
                        self.record(&name, epoch, outcome);
                    }
                }
                changed = self.config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let config = Arc::clone(&self.config.borrow_and_update());
                    self.apply(&config);
                }
                Some(request) = self.requests.recv() => self.handle(request),
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        // Orders in flight are abandoned (the CA expires them). Files are only
        // ever replaced by rename, so stopping here leaves none half-written.
        self.jobs.abort_all();
        while self.jobs.join_next().await.is_some() {}
        info!("certificate manager stopped");
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Renew { name, reply } => {
                let answer = match self.entries.get_mut(&name) {
                    None => Err(RenewRefused::Unknown),
                    Some(entry) if entry.job.is_some() => Err(RenewRefused::InProgress),
                    Some(entry) => {
                        info!(certificate = name, "renewal requested");
                        entry.force = true;
                        entry.due = SystemTime::now();
                        Ok(())
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Brings the schedule in line with `config`.
    fn apply(&mut self, config: &Config) {
        if config.acme != self.shared.acme {
            warn!("changes to [acme] take effect after a restart");
        }
        if self.concurrency != config.order_concurrency {
            // Jobs already running keep their permits from the old bound.
            self.concurrency = config.order_concurrency;
            self.permits = Arc::new(Semaphore::new(config.order_concurrency));
        }
        self.backoff = config.retry.backoff();
        let self_check = config.self_check.as_ref().map(|s| s.target.clone());
        if self_check.is_none() && (self.self_check.is_some() || self.entries.is_empty()) {
            warn!("no [self_check] target: challenges go to the CA unchecked");
        }
        self.self_check = self_check;
        let wanted: BTreeMap<&str, &Certificate> = config
            .certificates
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        let removed: Vec<String> = self
            .entries
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in removed {
            if let Some(entry) = self.entries.remove(&name) {
                if let Some(job) = entry.job {
                    job.abort();
                }
                self.shared.metrics.forget(&name);
                info!(
                    certificate = name,
                    "no longer configured: not renewed any more (files kept)"
                );
            }
        }
        for (name, spec) in wanted {
            match self.entries.get_mut(name) {
                Some(entry) if entry.spec == *spec => {}
                Some(entry) => {
                    info!(certificate = name, domains = ?spec.domains, "configuration changed");
                    if let Some(job) = entry.job.take() {
                        job.abort();
                    }
                    entry.epoch += 1;
                    let same_key = entry.spec.key_type == spec.key_type;
                    entry.spec = spec.clone();
                    let fits = entry.leaf.as_ref().is_some_and(|l| matches_spec(l, spec));
                    if !(fits && same_key) {
                        // The certificate being served no longer fits: order
                        // now, whatever its renewal time.
                        entry.force = true;
                        entry.due = SystemTime::now();
                        entry.failures = 0;
                        entry.last_error = None;
                    }
                }
                None => {
                    let entry = self.load(spec);
                    self.entries.insert(name.to_owned(), entry);
                }
            }
        }
    }

    /// A new entry for `spec`, serving its stored certificate if it is still
    /// good. Its first job runs at once: it only orders when needed.
    fn load(&self, spec: &Certificate) -> Entry {
        let name = &spec.name;
        let now = SystemTime::now();
        let mut leaf = None;
        match self.shared.store.load_certificate(name) {
            Ok(Some(stored)) => {
                match certificate::verify(&stored.chain_pem, &stored.key_pem, &stored.domains, now)
                {
                    Ok(found) => {
                        let issued = IssuedCertificate {
                            name: name.clone(),
                            chain_pem: stored.chain_pem.clone(),
                            key_pem: stored.key_pem.clone(),
                        };
                        match self.shared.sink.install(&issued) {
                            Ok(()) => info!(certificate = %name, "serving the stored certificate"),
                            Err(e) => {
                                error!(certificate = %name, "installing the stored certificate: {e}")
                            }
                        }
                        self.shared.metrics.set_expiry(name, found.not_after);
                        if stored.key_type == spec.key_type && matches_spec(&found, spec) {
                            leaf = Some(found);
                        } else {
                            info!(certificate = %name, "stored certificate does not match the configuration: ordering");
                        }
                    }
                    Err(e) => {
                        warn!(certificate = %name, "stored certificate unusable, ordering: {e}")
                    }
                }
            }
            Ok(None) => info!(certificate = %name, "no stored certificate: ordering"),
            Err(e) => warn!(certificate = %name, "{e}: ordering"),
        }
        if leaf.is_none()
            && self.shared.sink.wants_placeholder()
            && !self.shared.sink.installed(name)
        {
            self.install_placeholder(spec);
        }
        let previous = self.shared.store.load_status(name).ok().flatten();
        Entry {
            spec: spec.clone(),
            leaf,
            jitter: schedule::random_fraction(),
            due: now,
            next_renewal: None,
            failures: previous.as_ref().map_or(0, |s| s.failures),
            last_error: previous.and_then(|s| s.last_error),
            job: None,
            epoch: 0,
            force: false,
        }
    }

    /// Lets Envoy start (and serve the plain-HTTP challenges) before the first
    /// certificate exists: it refuses a missing SDS file.
    fn install_placeholder(&self, spec: &Certificate) {
        let result = certificate::placeholder(&spec.domains, spec.key_type).and_then(
            |(chain_pem, key_pem)| {
                self.shared.sink.install(&IssuedCertificate {
                    name: spec.name.clone(),
                    chain_pem,
                    key_pem,
                })
            },
        );
        match result {
            Ok(()) => {
                info!(certificate = %spec.name, "placeholder installed until the first certificate is issued")
            }
            Err(e) => error!(certificate = %spec.name, "installing a placeholder: {e}"),
        }
    }

    fn start_due_jobs(&mut self) {
        let now = SystemTime::now();
        for (name, entry) in &mut self.entries {
            if entry.job.is_some() || entry.due > now {
                continue;
            }
            let job = Job {
                shared: Arc::clone(&self.shared),
                spec: entry.spec.clone(),
                leaf: entry.leaf.clone(),
                two_thirds: entry.two_thirds(),
                self_check: self.self_check.clone(),
                force: std::mem::take(&mut entry.force),
            };
            let permits = Arc::clone(&self.permits);
            let epoch = entry.epoch;
            let name = name.clone();
            let span = info_span!("certificate", name = %name);
            let handle = self.jobs.spawn(
                async move {
                    // A closed semaphore is never used; if it were, run unbounded.
                    let _permit = permits.acquire_owned().await.ok();
                    let (outcome, retry_after) = acme::capturing_retry_after(job.run()).await;
                    let outcome = match outcome {
                        Outcome::Failed {
                            error,
                            retry_after: None,
                            ordered,
                        } => Outcome::Failed {
                            retry_after: retry_after.or(error.retry_after()),
                            error,
                            ordered,
                        },
                        other => other,
                    };
                    (name, epoch, outcome)
                }
                .instrument(span),
            );
            entry.job = Some(handle);
        }
    }

    fn record(&mut self, name: &str, epoch: u64, outcome: Outcome) {
        let metrics = Arc::clone(&self.shared.metrics);
        let backoff = self.backoff;
        let ari = self.shared.ari.load(Ordering::Relaxed);
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        entry.job = None;
        let now = SystemTime::now();
        match outcome {
            Outcome::Issued(leaf) => {
                metrics.order_succeeded(name);
                metrics.set_expiry(name, leaf.not_after);
                info!(
                    certificate = name,
                    not_after = unix(leaf.not_after),
                    "certificate issued and installed"
                );
                entry.leaf = Some(leaf);
                entry.jitter = schedule::random_fraction();
                entry.failures = 0;
                entry.last_error = None;
                let renew_at = entry.two_thirds().unwrap_or(now);
                entry.next_renewal = Some(renew_at);
                entry.due = if ari {
                    renew_at.min(now + ARI_RECHECK_MIN * 6)
                } else {
                    renew_at
                };
            }
            Outcome::Scheduled { renew_at, check_at } => {
                entry.next_renewal = Some(renew_at);
                entry.due = check_at;
                entry.failures = 0;
                entry.last_error = None;
            }
            Outcome::Failed {
                error,
                retry_after,
                ordered,
            } => {
                if ordered {
                    metrics.order_failed(name, error.kind());
                }
                entry.failures = entry.failures.saturating_add(1);
                let wait = backoff.delay(entry.failures, retry_after, error.is_rate_limited());
                warn!(
                    certificate = name,
                    failures = entry.failures,
                    retry_in_seconds = wait.as_secs_f64(),
                    "{error}"
                );
                entry.last_error = Some(error.to_string());
                entry.due = now + wait;
                entry.next_renewal = Some(entry.due);
            }
        }
        if let Some(at) = entry.next_renewal {
            metrics.set_next_renewal(name, at);
        }
        if let Err(e) = self.shared.store.save_status(&entry.status()) {
            warn!(certificate = name, "saving status: {e}");
        }
    }
}

/// One look at one certificate, on its own task.
struct Job {
    shared: Arc<Shared>,
    spec: Certificate,
    leaf: Option<Leaf>,
    two_thirds: Option<SystemTime>,
    self_check: Option<String>,
    force: bool,
}

impl Job {
    async fn account(&self) -> Result<Account, Error> {
        let mut slot = self.shared.account.lock().await;
        if let Some(account) = slot.as_ref() {
            return Ok(account.clone());
        }
        let s = &self.shared;
        let account = acme::open_account(&s.acme, s.store.as_ref(), &s.http, &s.metrics).await?;
        *slot = Some(account.clone());
        Ok(account)
    }

    fn failed(error: Error, ordered: bool) -> Outcome {
        Outcome::Failed {
            error,
            retry_after: None,
            ordered,
        }
    }

    async fn run(self) -> Outcome {
        let account = match self.account().await {
            Ok(account) => account,
            Err(e) => return Self::failed(e, false),
        };
        let now = SystemTime::now();
        let mut replaces = None;
        if let Some(leaf) = &self.leaf
            && self.force
        {
            // Asked to renew now: still tell an ARI CA which certificate this replaces.
            if self
                .renewal_info(&account, leaf, now)
                .await
                .is_some_and(|r| r.is_ok())
            {
                replaces = leaf.ari_id.clone();
            }
        } else if let Some(leaf) = &self.leaf {
            match self.renewal_info(&account, leaf, now).await {
                Some(Ok((renew_at, check_at))) if renew_at > now => {
                    return Outcome::Scheduled { renew_at, check_at };
                }
                Some(Ok(_)) => replaces = leaf.ari_id.clone(),
                Some(Err(e)) => warn!("renewal info unavailable, using the 2/3 rule: {e}"),
                None => {}
            }
            if replaces.is_none()
                && let Some(renew_at) = self.two_thirds
                && renew_at > now
            {
                return Outcome::Scheduled {
                    renew_at,
                    check_at: renew_at,
                };
            }
        }
        if let Err(e) = self.shared.sink.check_writable(&self.spec.name) {
            return Self::failed(e, false);
        }
        let span = info_span!("order", domains = ?self.spec.domains);
        let cx = OrderContext {
            account: &account,
            challenges: &self.shared.challenges,
            self_check: self.self_check.as_deref(),
        };
        let issued = match order::issue(&cx, &self.spec, replaces.as_deref())
            .instrument(span)
            .await
        {
            Ok(issued) => issued,
            Err(e) => {
                if e.kind() == "accountDoesNotExist" {
                    *self.shared.account.lock().await = None;
                    if let Err(forget) =
                        acme::forget_account(&self.shared.acme, self.shared.store.as_ref())
                    {
                        warn!("{forget}");
                    }
                }
                return Self::failed(e, true);
            }
        };
        let stored = StoredCertificate {
            domains: self.spec.domains.clone(),
            key_type: self.spec.key_type,
            chain_pem: issued.chain_pem.clone(),
            key_pem: issued.key_pem.clone(),
        };
        // The state directory first: if the sink fails, the next start installs
        // from there without a new order.
        if let Err(e) = self.shared.store.save_certificate(&self.spec.name, &stored) {
            return Self::failed(e, true);
        }
        let certificate = IssuedCertificate {
            name: self.spec.name.clone(),
            chain_pem: issued.chain_pem,
            key_pem: issued.key_pem,
        };
        if let Err(e) = self.shared.sink.install(&certificate) {
            return Self::failed(e, true);
        }
        Outcome::Issued(issued.leaf)
    }

    /// With ARI: `(renew_at, check_at)` from the CA's window. `None` when the
    /// CA has no ARI or the leaf no identifier.
    async fn renewal_info(
        &self,
        account: &Account,
        leaf: &Leaf,
        now: SystemTime,
    ) -> Option<Result<(SystemTime, SystemTime), Error>> {
        let id = leaf.ari_id.as_deref()?;
        let (aki, serial) = id.split_once('.')?;
        let cert_id = CertificateIdentifier {
            authority_key_identifier: aki.into(),
            serial: serial.into(),
        };
        match account.renewal_info(&cert_id).await {
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                self.shared.ari.store(true, Ordering::Relaxed);
                Some(Err(Error::acme("fetching renewal info")(e)))
            }
            Ok((info, retry_after)) => {
                self.shared.ari.store(true, Ordering::Relaxed);
                let start = SystemTime::from(info.suggested_window.start);
                let end = SystemTime::from(info.suggested_window.end);
                let Some(renew_at) =
                    schedule::in_window(start, end, schedule::random_fraction(), now)
                else {
                    return Some(Err(Error::Validation(
                        "renewal info window ends before it starts".into(),
                    )));
                };
                let check_at = now + retry_after.clamp(ARI_RECHECK_MIN, ARI_RECHECK_MAX);
                Some(Ok((renew_at, renew_at.min(check_at))))
            }
        }
    }
}
