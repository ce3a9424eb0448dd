//! Keeps every configured certificate issued, served and renewed.
//!
//! One loop owns the schedule: per certificate, when to act next
//! (`entry.rs`). Acting is a job on its own task (`job.rs`): restore from the
//! store, install a certificate waiting for a step, or look whether an order
//! is due (`trigger.rs`) and place it within the CA-limit budget
//! (`ledger.rs`). Config changes arrive on a watch channel; results come back
//! to the loop, which alone changes entries, and persists each one's status
//! (which is also its schedule) after every change.

mod agenda;
mod entry;
mod job;
mod ledger;
mod recency;
mod restore;
pub mod trigger;
mod writes;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};

use crate::Error;
use crate::certificate::Leaf;
use crate::config::{Acme as AcmeConfig, Config};
use crate::domain::budget::{Blocked, Limit};
use crate::domain::schedule::{self, Backoff};
use crate::domain::spec::{Certificate, KeyType};
use crate::metrics::Metrics;
use crate::on_demand::Idle;
use crate::ports::events::{Events, Happened, NoEvents};
use crate::ports::issuer::Issuer;
use crate::ports::leader::Leader;
use crate::ports::requests::{Refusal, RenewRefused, Request};
use crate::ports::sink::CertificateSink;
use crate::ports::solver::Solvers;
use crate::ports::store::StateStore;
use crate::time::{Clock, unix};

use agenda::{Agenda, Slot};
use entry::{Awaiting, Entry, Restored};
use job::{ARI_RECHECK_MAX, Job, OnDemandJob, Outcome, Task};
use ledger::SharedLedger;
use recency::Recency;
use trigger::Reason;
use writes::StatusWrites;

/// Only a served certificate is withdrawn from SDS: one not got yet serves
/// nothing, so for the idle rule it is withdrawn already.
fn as_good_as_withdrawn(entry: &Entry) -> bool {
    entry.withdrawn || entry.served.is_none()
}

/// When an on-demand certificate no handshake asked for is withdrawn from
/// SDS, and when it is removed.
fn idle_periods(od: &crate::config::OnDemand) -> (Duration, Duration) {
    (od.withdraw_after(), Duration::from_secs(od.idle_seconds))
}

/// The one-name certificate an on-demand `domain` gets.
fn on_demand_spec(domain: &str, key_type: crate::domain::spec::KeyType) -> Certificate {
    Certificate {
        name: crate::domain::names::name_for(domain),
        domains: vec![domain.to_owned()],
        key_type,
        challenge: Default::default(),
        dns: None,
        profile: None,
        adopt: false,
    }
}

/// When `entry`'s served certificate expires (none served: as urgent as can
/// be).
fn expires(entry: &Entry) -> SystemTime {
    entry
        .served
        .as_ref()
        .map_or(SystemTime::UNIX_EPOCH, |s| s.leaf.not_after)
}

/// Where `entry` stands in the agenda: a withdrawn on-demand certificate is
/// not renewed, it waits for a handshake (or its removal).
fn slot_of(entry: &Entry) -> Slot {
    let restore = !entry.restored;
    if entry.job.is_some() {
        Slot::Running { restore }
    } else if entry.withdrawn {
        Slot::Idle
    } else {
        Slot::Waiting {
            at: entry.due,
            expires: expires(entry),
            restore,
        }
    }
}

/// Restores running at once: each is a few reads and a parse.
const MAX_RESTORING: usize = 64;
/// Other jobs running at once (looks, orders waiting for a permit, installs).
const MAX_JOBS: usize = 256;

/// What an entry's next job does: restore it from the store first, then
/// finish installing a certificate that waits for a step, else look whether
/// an order is due.
fn task_of(entry: &Entry) -> Task {
    if !entry.restored {
        Task::Restore
    } else if let Some(awaiting) = &entry.awaiting {
        Task::Install(awaiting.clone())
    } else {
        Task::Look {
            served: entry.served.clone(),
            reason: entry.static_reason(),
            two_thirds: entry.two_thirds(),
            jitter: entry.jitter,
        }
    }
}

/// Runs `job`, holding one of the order permits when given them; a
/// failure that says nothing of when to retry takes the CA's `Retry-After`,
/// or the error's own.
async fn run_job(job: Job, permits: Option<Arc<Semaphore>>) -> Outcome {
    // A closed semaphore is never used; if it were, run unbounded.
    let _permit = match permits {
        Some(p) => p.acquire_owned().await.ok(),
        None => None,
    };
    match job.run().await {
        Outcome::Failed {
            error,
            retry_after: None,
            ordered,
            reason,
            awaiting,
        } => Outcome::Failed {
            retry_after: error.retry_after(),
            error,
            ordered,
            reason,
            awaiting,
        },
        other => other,
    }
}

/// First wait before reading the store again after it failed at start;
/// doubled up to [`RESTORE_RETRY_MAX`].
const RESTORE_RETRY: Duration = Duration::from_secs(1);
const RESTORE_RETRY_MAX: Duration = Duration::from_secs(60);

/// What the jobs share.
pub struct Shared {
    acme: AcmeConfig,
    store: Arc<dyn StateStore>,
    sink: Arc<dyn CertificateSink>,
    metrics: Arc<Metrics>,
    /// The CA.
    issuer: Arc<dyn Issuer>,
    ledger: SharedLedger,
    /// The solver of each kind of challenge.
    solvers: Solvers,
    /// With several replicas: the Lease this one must hold to order.
    leader: std::sync::OnceLock<Arc<dyn Leader>>,
    /// Reservations of aborted jobs, ended in the background (a drop cannot
    /// await the ledger's write); awaited before the manager stops.
    endings: std::sync::Mutex<JoinSet<()>>,
    /// Where every date the manager decides on comes from.
    clock: Clock,
}

impl Shared {
    async fn take_interrupted_order(&self, name: &str) -> Result<Option<u64>, Error> {
        self.ledger
            .take_interrupted(self.store.as_ref(), name)
            .await
    }

    /// Runs `ending` on a task of its own, which aborting a job does not
    /// abort. Outside a runtime it is left to the next start, which finds
    /// the reservation and ends it as interrupted.
    fn end_later(&self, ending: impl std::future::Future<Output = ()> + Send + 'static) {
        if tokio::runtime::Handle::try_current().is_err() {
            warn!("a reservation in the CA-limit ledger is left for the next start");
            return;
        }
        let mut endings = self
            .endings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while endings.try_join_next().is_some() {}
        endings.spawn(ending);
    }

    /// Waits for every ending started by [`Shared::end_later`].
    async fn settle(&self) {
        let mut endings = std::mem::take(
            &mut *self
                .endings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        while endings.join_next().await.is_some() {}
    }
}

pub struct Manager {
    shared: Arc<Shared>,
    config: watch::Receiver<Arc<Config>>,
    entries: BTreeMap<String, Entry>,
    jobs: JoinSet<(String, u64, Outcome)>,
    /// Whose each running job is (its certificate and epoch): a job that
    /// panics returns nothing, and its entry must not wait for it forever.
    job_names: HashMap<tokio::task::Id, (String, u64)>,
    permits: Arc<Semaphore>,
    concurrency: usize,
    backoff: Backoff,
    /// Whether `[self_check]` is set (warned about once when it is not).
    self_checked: bool,
    requests: mpsc::Receiver<Request>,
    /// Kubernetes Events about each certificate (none outside Kubernetes).
    events: Arc<dyn Events>,
    /// Every on-demand certificate, by when a handshake last asked for it
    /// (the removal rule).
    asked: Recency,
    /// The on-demand certificates served over SDS, likewise (the withdrawal
    /// rules: time and `max_served`).
    in_sds: Recency,
    /// Every certificate by when its next job starts, and the running jobs.
    agenda: Agenda,
    /// Status records and removals, written off the loop.
    writes: StatusWrites,
}

impl Manager {
    /// `config` carries the running config and every reload. The `acme` and
    /// `state_dir` sections are read once: changing them needs a restart.
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        store: Arc<dyn StateStore>,
        sink: Arc<dyn CertificateSink>,
        metrics: Arc<Metrics>,
        requests: mpsc::Receiver<Request>,
        solvers: Solvers,
        issuer: Arc<dyn Issuer>,
    ) -> Self {
        let current = Arc::clone(&config.borrow());
        Self {
            shared: Arc::new(Shared {
                acme: current.acme.clone(),
                ledger: SharedLedger::new(current.acme.directory_url(), current.acme.limits),
                store,
                sink,
                metrics,
                issuer,
                solvers,
                leader: std::sync::OnceLock::new(),
                endings: std::sync::Mutex::new(JoinSet::new()),
                clock: Clock::system(),
            }),
            config,
            entries: BTreeMap::new(),
            jobs: JoinSet::new(),
            job_names: HashMap::new(),
            permits: Arc::new(Semaphore::new(current.order_concurrency)),
            concurrency: current.order_concurrency,
            backoff: current.retry.backoff(),
            self_checked: current.self_check.is_some(),
            requests,
            events: Arc::new(NoEvents),
            asked: Recency::default(),
            in_sds: Recency::default(),
            agenda: Agenda::default(),
            writes: StatusWrites::none(),
        }
    }

    /// Orders only while `leader` holds its Lease (checked right before
    /// each order). Call before `run`.
    pub fn with_leader(self, leader: Arc<dyn Leader>) -> Self {
        if self.shared.leader.set(leader).is_err() {
            warn!("a Lease was already set for this manager; keeping the first");
        }
        self
    }

    /// Reads every date from `clock` instead of the system's (a simulation
    /// runs a year on tokio's paused clock). Call before `run`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => {
                shared.clock = clock;
                shared.ledger.set_clock(clock);
            }
            None => warn!("the manager already runs: its clock is kept"),
        }
        self
    }

    /// Reports what happens to each certificate as Kubernetes Events too.
    pub fn with_events(mut self, events: Arc<dyn Events>) -> Self {
        self.events = events;
        self
    }

    /// Serves every valid stored certificate at once (no network needed), then
    /// keeps all of them issued until `shutdown` flips to true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.writes = StatusWrites::start(Arc::clone(&self.shared.store));
        let config = Arc::clone(&self.config.borrow_and_update());
        self.apply(&config);
        self.restore_on_demand(&config).await;
        loop {
            self.sweep_on_demand().await;
            let capped = self.start_due_jobs();
            let now = self.shared.clock.now();
            // When jobs are capped, the due ones left start as others end
            // (a join wakes the loop): no busy wait on them.
            let next = self
                .agenda
                .next(now, capped)
                .into_iter()
                .chain(self.next_idle_check())
                .min();
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                at.duration_since(self.shared.clock.now())
                    .unwrap_or(Duration::ZERO)
            });
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                Some(joined) = self.jobs.join_next_with_id() => self.joined(joined).await,
                changed = self.config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let config = Arc::clone(&self.config.borrow_and_update());
                    self.apply(&config);
                }
                Some(request) = self.requests.recv() => self.handle(request).await,
                // Unit, not the watch's guard: select!'s output is held
                // across the other branches' awaits, and a guard is not Send.
                () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            }
        }
        // Orders in flight are abandoned (the CA expires them; the ledger
        // counted them). Files are only ever replaced by rename, so stopping
        // here leaves none half-written.
        self.jobs.abort_all();
        while self.jobs.join_next().await.is_some() {}
        self.writes.flush().await;
        self.shared.settle().await;
        info!("certificate manager stopped");
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Renew { name, reply } => {
                let now = self.shared.clock.now();
                let answer = match self.entries.get_mut(&name) {
                    None => Err(RenewRefused::Unknown),
                    // While a job runs (a renewal-info check, an order), the
                    // request is kept: due as soon as the job ends.
                    Some(entry) => {
                        info!(certificate = name, "renewal requested");
                        entry.force(now);
                        Ok(())
                    }
                };
                if answer.is_ok() {
                    self.reindex(&name);
                    // Kept before it is answered: a restart still renews.
                    self.save_status(&name);
                    self.writes.written().await;
                }
                let _ = reply.send(answer);
            }
            Request::OnDemand {
                domain,
                key_type,
                reply,
            } => {
                let _ = reply.send(self.add_on_demand(&domain, key_type).await);
            }
            Request::Seen { domain } => {
                let name = crate::domain::names::name_for(&domain);
                if let Some(entry) = self.entries.get_mut(&name).filter(|e| e.on_demand) {
                    entry.requested(self.shared.clock.now());
                    self.reindex(&name);
                    self.save_status(&name);
                }
            }
        }
    }

    /// A certificate for one on-demand `domain`, managed like a configured
    /// one from now on (restored from its status after a restart), unless a
    /// cap or an earlier refusal says no. A known name is only noted as asked
    /// for (and served again if it was withdrawn).
    async fn add_on_demand(
        &mut self,
        domain: &str,
        key_type: crate::domain::spec::KeyType,
    ) -> Result<(), Refusal> {
        let now = self.shared.clock.now();
        let name = crate::domain::names::name_for(domain);
        if let Some(entry) = self.entries.get_mut(&name) {
            entry.requested(now);
            self.reindex(&name);
            self.save_status(&name);
            return Ok(());
        }
        let config = Arc::clone(&self.config.borrow());
        let od = config
            .on_demand
            .as_ref()
            .ok_or_else(|| Refusal::brief("on-demand TLS is not configured"))?;
        if !crate::domain::names::is_valid_domain(domain) {
            return Err(Refusal::brief(format!(
                "{domain:?} is not a DNS name the agent orders"
            )));
        }
        self.admit_on_demand(domain, od, now).await?;
        // A removal of this name still queued must land before its new
        // entry reads the store or stores a certificate, never after.
        self.writes.written().await;
        let spec = on_demand_spec(domain, key_type);
        info!(certificate = name, domain, "on-demand certificate added");
        self.entries
            .insert(name.clone(), Entry::on_demand(spec, now, false));
        self.reindex(&name);
        Ok(())
    }

    /// The bounds a new on-demand name must pass: not refused for failing,
    /// under `max_certificates`, and within `max_per_hour` (a bucket in the
    /// ledger, so a restart does not refill it).
    async fn admit_on_demand(
        &self,
        domain: &str,
        od: &crate::config::OnDemand,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let store = self.shared.store.as_ref();
        let ledger = &self.shared.ledger;
        let wait = |until: SystemTime| until.duration_since(now).unwrap_or(Duration::ZERO);
        match ledger.refused_until(store, domain).await {
            Ok(Some(until)) => {
                return Err(Refusal::new(
                    "it failed again and again (on_demand.max_failures)",
                    wait(until),
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(Refusal::brief(format!("the CA-limit ledger: {e}"))),
        }
        // `asked` holds every on-demand certificate.
        if self.asked.len() >= od.max_certificates {
            return Err(Refusal::brief("on_demand.max_certificates reached"));
        }
        let hourly = crate::domain::budget::Bucket::new(
            u32::try_from(od.max_per_hour).unwrap_or(u32::MAX),
            Duration::from_secs(3600),
            None,
        );
        match ledger.admit_on_demand(store, hourly).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(until)) => Err(Refusal::new("on_demand.max_per_hour reached", wait(until))),
            Err(e) => Err(Refusal::brief(format!("the CA-limit ledger: {e}"))),
        }
    }

    /// The on-demand certificates of earlier runs, from their status records:
    /// the policy's patterns, the idle rule, refusals and `max_certificates`
    /// apply again (the `ask` URL is asked by each one's first job).
    async fn restore_on_demand(&mut self, config: &Config) {
        let Some(on_demand) = &config.on_demand else {
            return;
        };
        let names = match self.shared.store.status_names().await {
            Ok(names) => names,
            Err(e) => {
                warn!("listing the on-demand certificates of earlier runs: {e}");
                return;
            }
        };
        let now = self.shared.clock.now();
        let periods = idle_periods(on_demand);
        let mut kept = Vec::new();
        for name in names {
            if !name.starts_with(crate::domain::names::NAME_PREFIX)
                || self.entries.contains_key(&name)
            {
                continue;
            }
            let status = match self.shared.store.load_status(&name).await {
                Ok(Some(status)) if status.domains.len() == 1 => status,
                Ok(_) => continue,
                Err(e) => {
                    warn!(
                        certificate = name,
                        "reading an on-demand certificate's status: {e}"
                    );
                    continue;
                }
            };
            let domain = status.domains[0].clone();
            // Written before the idle rule: counts as asked for now.
            let last = status.last_requested.map_or(now, crate::time::from_unix);
            let refused = self
                .shared
                .ledger
                .refused_until(self.shared.store.as_ref(), &domain)
                .await
                .ok()
                .flatten()
                .is_some();
            let why = if !crate::on_demand::allowed_by_patterns(on_demand, &domain) {
                Some("the policy no longer allows it")
            } else if crate::on_demand::idle(last, periods, false, now) == Idle::Remove {
                Some("no handshake asked for it in on_demand.idle_seconds")
            } else if refused {
                Some("it is refused for failing")
            } else {
                None
            };
            match why {
                Some(why) => self.remove_on_demand(&name, why).await,
                None => kept.push((last, name, domain)),
            }
        }
        // Over the cap (lowered since): the most recently asked for stay.
        // Beyond `max_served` they start withdrawn: not even read until a
        // handshake asks for them.
        kept.sort_by_key(|k| std::cmp::Reverse(k.0));
        for (i, (last, name, domain)) in kept.into_iter().enumerate() {
            if i >= on_demand.max_certificates {
                self.remove_on_demand(&name, "over on_demand.max_certificates")
                    .await;
                continue;
            }
            let spec = on_demand_spec(&domain, on_demand.key_type);
            let mut entry = Entry::on_demand(spec, last, true);
            entry.withdrawn = i >= on_demand.max_served;
            self.entries.insert(name.clone(), entry);
            self.reindex(&name);
        }
    }

    /// Stops renewing and serving on-demand certificate `name` and deletes it
    /// from the store and the sinks.
    async fn remove_on_demand(&mut self, name: &str, why: &str) {
        if let Some(job) = self.entries.remove(name).and_then(|e| e.job) {
            job.abort();
        }
        self.reindex(name);
        if let Err(e) = self.shared.sink.remove(name).await {
            warn!(
                certificate = name,
                "removing an on-demand certificate from the sinks: {e}"
            );
        }
        // Behind any record of it still queued.
        self.writes.remove(name);
        self.shared.metrics.forget(name);
        info!(certificate = name, "on-demand certificate removed: {why}");
    }

    /// Places certificate `name` in the indexes, as its entry is now (none
    /// when it is gone): the agenda, and for an on-demand one those the idle
    /// and count rules read. Called after every change to an entry.
    fn reindex(&mut self, name: &str) {
        let entry = self.entries.get(name);
        self.agenda.set(name, entry.map(slot_of));
        self.agenda.queue_for_budget(
            name,
            // A withdrawn on-demand certificate orders nothing: not queued.
            entry
                .filter(|e| !e.withdrawn)
                .filter(|e| {
                    e.blocked
                        .is_some_and(|b| b.limit == Limit::OrdersPerAccount)
                })
                .map(|e| (expires(e), e.on_demand)),
        );
        match entry.filter(|e| e.on_demand) {
            None => {
                self.asked.forget(name);
                self.in_sds.forget(name);
            }
            Some(entry) => {
                let at = entry
                    .last_requested
                    .unwrap_or_else(|| self.shared.clock.now());
                self.asked.set(name, at);
                if entry.restored && !as_good_as_withdrawn(entry) {
                    self.in_sds.set(name, at);
                } else {
                    self.in_sds.forget(name);
                }
            }
        }
    }

    /// Whether a rule may act on `name` now: a running job (a restore, a
    /// renewal) would install it again behind the rule's back.
    fn idle_now(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.job.is_none())
    }

    /// The rules on on-demand certificates without a job, oldest first (each
    /// looks only at the names it acts on): removed when no handshake asked
    /// for one in `idle_seconds`; withdrawn from SDS after `withdraw_seconds`
    /// (the next handshake brings it back), and beyond `max_served`, the
    /// least recently asked for.
    async fn sweep_on_demand(&mut self) {
        let Some(od) = self.config.borrow().on_demand.clone() else {
            return;
        };
        let (periods, now) = (idle_periods(&od), self.shared.clock.now());
        for name in self.expired(false, periods, now) {
            self.remove_on_demand(&name, "no handshake asked for it in on_demand.idle_seconds")
                .await;
        }
        for name in self.expired(true, periods, now) {
            self.withdraw_on_demand(&name, "on_demand.withdraw_seconds")
                .await;
        }
        let over = self.in_sds.len().saturating_sub(od.max_served);
        let least_recent: Vec<String> = self
            .in_sds
            .oldest()
            .filter(|(_, name)| self.idle_now(name))
            .take(over)
            .map(|(_, name)| name.to_owned())
            .collect();
        for name in least_recent {
            self.withdraw_on_demand(&name, "on_demand.max_served").await;
        }
    }

    /// The names without a job the idle rule acts on now, oldest first: to
    /// remove (of all), or to withdraw (of those served over SDS).
    fn expired(&self, in_sds: bool, periods: (Duration, Duration), now: SystemTime) -> Vec<String> {
        let index = if in_sds { &self.in_sds } else { &self.asked };
        index
            .oldest()
            .take_while(|(at, _)| {
                !matches!(
                    crate::on_demand::idle(*at, periods, !in_sds, now),
                    Idle::Keep { .. }
                )
            })
            .filter(|(_, name)| self.idle_now(name))
            .map(|(_, name)| name.to_owned())
            .collect()
    }

    /// Stops serving on-demand certificate `name` over SDS (Envoy drops it),
    /// keeping it in storage; the next handshake for it brings it back.
    async fn withdraw_on_demand(&mut self, name: &str, rule: &str) {
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        entry.withdrawn = true;
        if let Err(e) = self.shared.sink.remove(name).await {
            warn!(
                certificate = name,
                "withdrawing an on-demand certificate: {e}"
            );
        }
        self.reindex(name);
        info!(
            certificate = name,
            rule, "on-demand certificate withdrawn until a handshake asks for it"
        );
    }

    /// When the idle rule next has something to do (the oldest names without
    /// a job: at most the running jobs are passed over).
    fn next_idle_check(&self) -> Option<SystemTime> {
        let periods = idle_periods(self.config.borrow().on_demand.as_ref()?);
        let now = self.shared.clock.now();
        let first = |index: &Recency, withdrawn: bool| {
            let (at, _) = index.oldest().find(|(_, name)| self.idle_now(name))?;
            Some(match crate::on_demand::idle(at, periods, withdrawn, now) {
                Idle::Keep { until } => until,
                Idle::Withdraw | Idle::Remove => now,
            })
        };
        first(&self.asked, true)
            .into_iter()
            .chain(first(&self.in_sds, false))
            .min()
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
        self.shared.solvers.configure(config);
        let self_checked = config.self_check.is_some();
        if !self_checked && (self.self_checked || self.entries.is_empty()) {
            warn!("no [self_check] target: challenges go to the CA unchecked");
        }
        self.self_checked = self_checked;
        let wanted: BTreeMap<&str, &Certificate> = config
            .certificates
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        let removed: Vec<String> = self
            .entries
            .iter()
            .filter(|(name, entry)| !entry.on_demand && !wanted.contains_key(name.as_str()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in removed {
            if let Some(entry) = self.entries.remove(&name) {
                if let Some(job) = entry.job {
                    job.abort();
                }
                self.reindex(&name);
                self.shared.metrics.forget(&name);
                info!(
                    certificate = name,
                    "no longer configured: not renewed any more (files kept)"
                );
            }
        }
        let now = self.shared.clock.now();
        for (name, spec) in wanted {
            match self.entries.get_mut(name) {
                Some(entry) if *entry.spec == *spec => {}
                Some(entry) => {
                    info!(certificate = name, domains = ?spec.domains, "configuration changed");
                    if let Some(job) = entry.job.take() {
                        job.abort();
                    }
                    entry.respec(spec.clone(), now);
                }
                None => {
                    self.entries
                        .insert(name.to_owned(), Entry::new(spec.clone(), now));
                }
            }
            self.reindex(name);
        }
    }

    /// Starts a job for every entry that is due and has none running, at
    /// most [`MAX_RESTORING`] restores and [`MAX_JOBS`] others at once (each
    /// job holds its task's memory until it is recorded: 10,000 at once at
    /// start held ~120 MB). Per kind (restores, others): whether a due entry
    /// was left for later.
    fn start_due_jobs(&mut self) -> [bool; 2] {
        let now = self.shared.clock.now();
        let policy = self.config.borrow().on_demand.clone().map(Arc::new);
        let mut capped = [false; 2];
        for (kind, (restore, max)) in [(true, MAX_RESTORING), (false, MAX_JOBS)]
            .into_iter()
            .enumerate()
        {
            let room = max.saturating_sub(self.agenda.running(restore));
            let due = self.agenda.due(restore, now, room.saturating_add(1));
            capped[kind] = due.len() > room;
            for name in due.into_iter().take(room) {
                self.start_job(&name, policy.clone());
            }
        }
        capped
    }

    /// Starts the next job of entry `name` (which has none running).
    fn start_job(&mut self, name: &str, policy: Option<Arc<crate::config::OnDemand>>) {
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        let task = task_of(entry);
        // Only a look may order: it alone waits for a permit.
        let looks = matches!(task, Task::Look { .. });
        let job = Job {
            shared: Arc::clone(&self.shared),
            spec: entry.spec.clone(),
            task,
            on_demand: entry.on_demand.then_some(OnDemandJob {
                config: policy,
                recheck: entry.recheck,
            }),
        };
        // The decision of the handshake that added it covers its first
        // look; every later one asks the policy again.
        entry.recheck |= looks;
        let permits = looks.then(|| Arc::clone(&self.permits));
        let epoch = entry.epoch;
        let owned = name.to_owned();
        let span = info_span!("certificate", name = %name);
        let handle = self
            .jobs
            .spawn(async move { (owned, epoch, run_job(job, permits).await) }.instrument(span));
        self.job_names.insert(handle.id(), (name.to_owned(), epoch));
        entry.job = Some(handle);
        self.reindex(name);
    }

    /// A job ended: its outcome recorded. One that panicked (a bug) counts
    /// as a failed attempt, so its certificate stays due and is tried again
    /// after the backoff, never left waiting for a job that is gone; one
    /// aborted (its entry removed or changed) is only forgotten.
    async fn joined(
        &mut self,
        joined: Result<(tokio::task::Id, (String, u64, Outcome)), tokio::task::JoinError>,
    ) {
        let (id, name, epoch, outcome) = match joined {
            Ok((id, (name, epoch, outcome))) => {
                self.job_names.remove(&id);
                (id, name, epoch, outcome)
            }
            Err(e) => {
                let Some((name, epoch)) = self.job_names.remove(&e.id()) else {
                    return;
                };
                if !e.is_panic() {
                    self.reindex(&name);
                    return;
                }
                warn!(
                    certificate = name,
                    "a job for this certificate panicked: {e}"
                );
                let error = Error::Interrupted(format!("the agent's job panicked: {e}"));
                (e.id(), name, epoch, Outcome::failed(error, None))
            }
        };
        // Only the entry's own job: one removed and configured again since
        // starts at the same epoch, and an older job's result is not its.
        let current = self
            .entries
            .get(&name)
            .and_then(|e| e.job.as_ref())
            .map(tokio::task::AbortHandle::id);
        if current == Some(id) {
            self.record(&name, epoch, outcome).await;
        }
        self.reindex(&name);
    }

    /// Takes in what a job found or did: the entry's new schedule, its
    /// metrics and Events, and its status saved. The outcome of a job the
    /// entry has outlived (its spec changed since: another epoch) is dropped.
    async fn record(&mut self, name: &str, epoch: u64, outcome: Outcome) {
        let max_failures = self.max_failures();
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        entry.job = None;
        let report = Report {
            name,
            metrics: &self.shared.metrics,
            events: self.events.as_ref(),
            backoff: self.backoff,
            now: self.shared.clock.now(),
        };
        match outcome {
            Outcome::Restored(restored) => report.restored(entry, *restored),
            Outcome::RestoreFailed(error) => {
                report.restore_failed(entry, &error);
                return;
            }
            Outcome::Installed {
                leaf,
                key_type,
                ordered,
            } => report.installed(entry, leaf, key_type, ordered),
            Outcome::Wait { renew_at, check_at } => entry.wait(renew_at, check_at, report.now),
            Outcome::Disallowed(why) => {
                self.remove_on_demand(name, &why).await;
                return;
            }
            Outcome::Failed {
                error,
                retry_after,
                ordered,
                reason,
                awaiting,
            } => {
                if ordered {
                    report.metrics.order_failed(name, error.kind());
                }
                if entry.on_demand
                    && error.is_about_the_name()
                    && entry.failed_on_the_name(max_failures)
                {
                    warn!(certificate = name, "{error}");
                    self.give_up_on_demand(name).await;
                    return;
                }
                report.failed(entry, error, retry_after, reason, awaiting);
            }
            Outcome::Blocked {
                mut blocked,
                reason,
            } => {
                // Behind those queued for the account's orders that expire
                // first: back when its turn's order is free, and never past
                // its own expiry (it asks again then, whatever the queue).
                if blocked.limit == Limit::OrdersPerAccount {
                    let rank = self
                        .agenda
                        .budget_rank(name, expires(entry), entry.on_demand);
                    let refill = self.shared.ledger.limits().bucket(blocked.limit).refill;
                    let behind = refill.saturating_mul(u32::try_from(rank).unwrap_or(u32::MAX));
                    let turn = blocked.until.checked_add(behind).unwrap_or(blocked.until);
                    blocked.until = turn.min(expires(entry)).max(blocked.until);
                }
                report.blocked(entry, blocked, reason);
            }
        }
        report.schedule(entry, self.shared.ledger.orders_remaining().await);
        self.save_status(name);
    }

    /// `on_demand.max_failures` as configured now.
    fn max_failures(&self) -> u32 {
        self.config
            .borrow()
            .on_demand
            .as_ref()
            .map_or(1, |od| od.max_failures)
    }

    /// An on-demand name failed `max_failures` orders in a row: removed, and
    /// refused for `failed_refusal_seconds` (in the ledger: a restart keeps
    /// refusing it).
    async fn give_up_on_demand(&mut self, name: &str) {
        let refusal = self
            .config
            .borrow()
            .on_demand
            .as_ref()
            .map_or(0, |od| od.failed_refusal_seconds);
        if let Some(domain) = self
            .entries
            .get(name)
            .and_then(|e| e.spec.domains.first().cloned())
        {
            let until = self.shared.clock.now() + Duration::from_secs(refusal);
            self.shared
                .ledger
                .refuse(self.shared.store.as_ref(), &domain, until)
                .await;
        }
        self.remove_on_demand(name, "it failed on_demand.max_failures orders in a row; refused for on_demand.failed_refusal_seconds").await;
    }

    /// Persists an entry's status (queued to the writer): its schedule
    /// survives a restart.
    fn save_status(&mut self, name: &str) {
        let Some(entry) = self.entries.get_mut(name).filter(|e| e.restored) else {
            return;
        };
        let status = entry.status(self.shared.clock.now());
        let essence = status.essence();
        if entry.saved == Some(essence) {
            return;
        }
        // A failed write is warned about by the writer; the next change
        // writes the whole record again.
        self.writes.save(status);
        entry.saved = Some(essence);
    }
}

/// Recording one job's outcome: where it reports to (the certificate's
/// metrics and Events), the retry backoff, and one `now`.
struct Report<'a> {
    name: &'a str,
    metrics: &'a Metrics,
    events: &'a dyn Events,
    backoff: Backoff,
    now: SystemTime,
}

impl Report<'_> {
    /// The stored certificate and schedule, read at start.
    fn restored(&self, entry: &mut Entry, restored: Restored) {
        entry.restore(restored, &self.backoff, self.now);
        if let Some(served) = &entry.served {
            self.metrics.set_expiry(self.name, served.leaf.not_after);
        }
    }

    /// The store did not answer at start: read again after a backoff of its
    /// own, and nothing is ordered until it answers.
    fn restore_failed(&self, entry: &mut Entry, error: &Error) {
        let name = self.name;
        let wait = Backoff {
            initial: RESTORE_RETRY,
            max: RESTORE_RETRY_MAX,
        }
        .delay(entry.restore_attempts.saturating_add(1), None, false);
        warn!(
            certificate = name,
            retry_in_seconds = wait.as_secs_f64(),
            "reading the stored state failed, nothing is ordered until it answers: {error}"
        );
        // A Secret that is not the agent's (refused, never ordered
        // for) shows up here too: say it where the operator looks.
        self.events.publish(
            name,
            Happened::Failed {
                kind: error.kind().to_owned(),
                message: error.to_string(),
            },
        );
        entry.restore_failed(error, wait, self.now);
        // Nothing else is known yet, and the store may not take a write.
        self.metrics.set_failures(name, entry.failures.max(1));
        entry.shown.failures = Some(entry.failures.max(1));
    }

    /// A new certificate is stored and served (from an order, or a step
    /// retried).
    fn installed(&self, entry: &mut Entry, leaf: Leaf, key_type: KeyType, ordered: bool) {
        let name = self.name;
        if ordered {
            self.metrics.order_succeeded(name);
            let not_after = leaf.not_after;
            self.events.publish(
                name,
                if entry.served.is_some() {
                    Happened::Renewed { not_after }
                } else {
                    Happened::Issued { not_after }
                },
            );
        }
        self.metrics.set_expiry(name, leaf.not_after);
        info!(
            certificate = name,
            not_after = unix(leaf.not_after),
            "certificate issued and installed"
        );
        entry.installed(leaf, key_type, ARI_RECHECK_MAX, self.now);
    }

    /// A failure: retried after the backoff (or the CA's `Retry-After`),
    /// never past the served certificate's life.
    fn failed(
        &self,
        entry: &mut Entry,
        error: Error,
        retry_after: Option<Duration>,
        reason: Option<Reason>,
        awaiting: Option<Awaiting>,
    ) {
        let name = self.name;
        let failures = entry.failures.saturating_add(1);
        let mut wait = self
            .backoff
            .delay(failures, retry_after, error.is_rate_limited());
        if let Some(served) = &entry.served {
            wait = schedule::within_life(wait, served.leaf.not_after, self.now);
        }
        warn!(
            certificate = name,
            failures,
            retry_in_seconds = wait.as_secs_f64(),
            "{error}"
        );
        self.events.publish(
            name,
            Happened::Failed {
                kind: error.kind().to_owned(),
                message: error.to_string(),
            },
        );
        entry.failed(
            error.to_string(),
            error.kind(),
            reason,
            awaiting,
            wait,
            self.now,
        );
    }

    /// An order would exceed a CA limit: no failure, a wait.
    fn blocked(&self, entry: &mut Entry, blocked: Blocked, reason: Option<Reason>) {
        self.events.publish(
            self.name,
            Happened::WaitingForBudget {
                limit: blocked.limit.label().to_owned(),
                until: blocked.until,
            },
        );
        entry.blocked(blocked, reason);
    }

    /// The entry's schedule, and the orders left in the budget; each
    /// metric set only when its value changed since it was last shown.
    fn schedule(&self, entry: &mut Entry, orders_remaining: Option<u32>) {
        let (metrics, name, shown) = (self.metrics, self.name, &mut entry.shown);
        if let Some(at) = entry.next_renewal
            && shown.next_renewal != Some(at)
        {
            metrics.set_next_renewal(name, at);
            shown.next_renewal = Some(at);
        }
        if shown.next_attempt != Some(entry.due) {
            metrics.set_next_attempt(name, entry.due);
            shown.next_attempt = Some(entry.due);
        }
        if shown.failures != Some(entry.failures) {
            metrics.set_failures(name, entry.failures);
            shown.failures = Some(entry.failures);
        }
        if shown.blocked != Some(entry.blocked) {
            metrics.set_blocked(name, entry.blocked);
            shown.blocked = Some(entry.blocked);
        }
        if let Some(remaining) = orders_remaining {
            metrics.set_orders_remaining(remaining);
        }
    }
}
