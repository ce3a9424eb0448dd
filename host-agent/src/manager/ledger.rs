//! The CA-limit ledger as the jobs share it: loaded from the store on first
//! use (a read error is an error, so nothing is ordered on a guess), written
//! back before every order (write-ahead) and after it.

use std::time::SystemTime;

use tokio::sync::{Mutex, MutexGuard};
use tracing::warn;

use crate::Error;
use crate::domain::budget::Limits;
use crate::domain::budget::{Blocked, Bucket, Finished, Ledger, Spend};
use crate::ports::store::StateStore;
use crate::time::Clock;

pub struct SharedLedger {
    directory: String,
    limits: Limits,
    /// `None` until loaded. An async lock, held from the read through the
    /// write of each change: a reservation is checked, made and persisted
    /// before any other can look, the store gets the ledgers in the order
    /// they were made, and undoing a change never undoes another.
    ledger: Mutex<Option<Ledger>>,
    /// What each count is dated with.
    clock: Clock,
}

/// Why a reservation was not made.
pub enum Refused {
    Blocked(Blocked),
    Store(Error),
}

/// A change made in memory whose write has not succeeded yet: dropped before
/// [`Unwritten::kept`] (the write failed, or an aborted job dropped it
/// mid-write), it puts the ledger back as it was, so nothing is done on the
/// strength of a count that may not have been kept. (A dropped write may
/// still land, the disk store's runs to its end: the store then holds one
/// count more than memory until the next write, which is the safe side.)
struct Unwritten<'a> {
    slot: MutexGuard<'a, Option<Ledger>>,
    before: Option<Ledger>,
}

impl Unwritten<'_> {
    fn kept(mut self) {
        self.before = None;
    }
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if let Some(before) = self.before.take() {
            *self.slot = Some(before);
        }
    }
}

impl SharedLedger {
    pub fn new(directory: &str, limits: Limits) -> Self {
        Self {
            directory: directory.to_owned(),
            limits,
            ledger: Mutex::new(None),
            clock: Clock::system(),
        }
    }

    /// Dates every count with `clock` (a simulation's) instead of the system's.
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The ledger, locked and loaded from the store on first use (a read
    /// error is an error: nothing is decided on a guess).
    async fn loaded(
        &self,
        store: &dyn StateStore,
    ) -> Result<MutexGuard<'_, Option<Ledger>>, Error> {
        let mut slot = self.ledger.lock().await;
        if slot.is_none() {
            let ledger = match store.read_ledger(&self.directory).await? {
                Some(bytes) => Ledger::from_json(&bytes).map_err(|e| Error::Io {
                    context: format!("reading the CA-limit ledger for {}", self.directory),
                    source: std::io::Error::other(e.to_string()),
                })?,
                None => Ledger::default(),
            };
            *slot = Some(ledger);
        }
        Ok(slot)
    }

    /// Runs `f` on the loaded ledger, in memory only.
    async fn with<T>(
        &self,
        store: &dyn StateStore,
        f: impl FnOnce(&mut Ledger) -> T,
    ) -> Result<T, Error> {
        let mut slot = self.loaded(store).await?;
        Ok(f(slot.get_or_insert_with(Ledger::default)))
    }

    async fn write(&self, store: &dyn StateStore, ledger: &Ledger) -> Result<(), Error> {
        let json = serde_json::to_vec(ledger).map_err(|e| Error::Io {
            context: "serializing the CA-limit ledger".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        store.write_ledger(&self.directory, &json).await
    }

    /// Runs `f` and persists the result, the lock held throughout; a failed
    /// write leaves memory as it is (memory stays the authority) and is
    /// only warned about.
    async fn update(
        &self,
        store: &dyn StateStore,
        what: &str,
        f: impl FnOnce(&mut Ledger) -> bool,
    ) -> Result<(), Error> {
        let mut slot = self.loaded(store).await?;
        let ledger = slot.get_or_insert_with(Ledger::default);
        if f(ledger)
            && let Err(e) = self.write(store, ledger).await
        {
            warn!("{what}: {e}");
        }
        Ok(())
    }

    /// The order the last run was placing for `name` when it stopped, if any
    /// (Unix seconds); ended, its names handed to the CA counted as failed.
    pub async fn take_interrupted(
        &self,
        store: &dyn StateStore,
        name: &str,
    ) -> Result<Option<u64>, Error> {
        let now = self.clock.now();
        let mut at = None;
        self.update(store, "writing the CA-limit ledger", |l| {
            let changed = l.in_flight.contains_key(name) || l.triggered.contains_key(name);
            at = l.interrupted(name, now);
            changed
        })
        .await?;
        Ok(at)
    }

    /// Applies `f` and persists the result, the lock held throughout; an
    /// error (not written) undoes it, so nothing is done on the strength of
    /// a count that was not kept.
    async fn change<T>(
        &self,
        store: &dyn StateStore,
        f: impl FnOnce(&mut Ledger) -> T,
    ) -> Result<T, Error> {
        let mut slot = self.loaded(store).await?;
        let ledger = slot.get_or_insert_with(Ledger::default);
        let before = ledger.clone();
        let value = f(ledger);
        let after = ledger.clone();
        let unwritten = Unwritten {
            slot,
            before: Some(before),
        };
        self.write(store, &after).await?;
        unwritten.kept();
        Ok(value)
    }

    /// The order of certificate `name` is about to hand the challenges of
    /// `names` to the CA: counted (written) before it does, so no failed
    /// authorization can be missed; an error means the CA must not be told.
    pub async fn trigger(
        &self,
        store: &dyn StateStore,
        name: &str,
        names: &[String],
    ) -> Result<(), Error> {
        self.change(store, |l| l.trigger(name, names)).await
    }

    /// Admits a new on-demand name within `bucket` (`on_demand.max_per_hour`),
    /// persisted so a restart does not refill it; `Ok(Err(until))` when full.
    pub async fn admit_on_demand(
        &self,
        store: &dyn StateStore,
        bucket: Bucket,
    ) -> Result<Result<(), SystemTime>, Error> {
        let now = self.clock.now();
        self.change(store, |l| l.admit_on_demand(bucket, now)).await
    }

    /// Remembers `domain` as refused until `until` (persisted).
    pub async fn refuse(&self, store: &dyn StateStore, domain: &str, until: SystemTime) {
        let now = self.clock.now();
        if let Err(e) = self.change(store, |l| l.refuse(domain, until, now)).await {
            warn!(domain, "remembering a refused on-demand name: {e}");
        }
    }

    /// Until when `domain` stays refused, if it is.
    pub async fn refused_until(
        &self,
        store: &dyn StateStore,
        domain: &str,
    ) -> Result<Option<SystemTime>, Error> {
        let now = self.clock.now();
        self.with(store, |l| l.refused_until(domain, now)).await
    }

    /// Reserves an order for certificate `name` and persists that before the
    /// order is placed; refused when a limit would be exceeded or the ledger
    /// cannot be written (an order it could not count is not placed).
    pub async fn reserve(
        &self,
        store: &dyn StateStore,
        name: &str,
        spend: Spend<'_>,
    ) -> Result<(), Refused> {
        let now = self.clock.now();
        let limits = self.limits;
        self.change(store, |l| l.reserve(&limits, name, spend, now))
            .await
            .map_err(Refused::Store)?
            .map_err(Refused::Blocked)
    }

    /// One more order inside a reservation (placed again without `replaces`
    /// because the CA does not reflect it); checked, counted and persisted.
    pub async fn extra_order(
        &self,
        store: &dyn StateStore,
        spend: Spend<'_>,
    ) -> Result<(), Refused> {
        let now = self.clock.now();
        let limits = self.limits;
        self.change(store, |l| {
            l.check(&limits, spend, now)?;
            l.count_order(false, now);
            l.replaces_not_reflected = true;
            Ok(())
        })
        .await
        .map_err(Refused::Store)?
        .map_err(Refused::Blocked)
    }

    /// Ends the reservation of `name`.
    pub async fn finish(
        &self,
        store: &dyn StateStore,
        name: &str,
        domains: &[String],
        how: &Finished,
    ) {
        let now = self.clock.now();
        let ended = self.update(store, "writing the CA-limit ledger", |l| {
            l.finish(name, domains, how, now);
            true
        });
        if let Err(e) = ended.await {
            warn!("updating the CA-limit ledger: {e}");
        }
    }

    /// Whether the CA is known not to reflect `replaces`.
    pub async fn replaces_not_reflected(&self, store: &dyn StateStore) -> bool {
        self.with(store, |l| l.replaces_not_reflected)
            .await
            .unwrap_or(false)
    }

    /// Orders the bucket allows now, when the ledger is loaded.
    pub async fn orders_remaining(&self) -> Option<u32> {
        let slot = self.ledger.lock().await;
        slot.as_ref()
            .map(|l| l.orders_remaining(&self.limits, self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    //! The ledger against a store that holds each ledger write until told
    //! to go on: what another job sees while a write is under way.

    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::Semaphore;

    use crate::disk::store::FileStore;
    use crate::ports::store::{Status, StoredCertificate};

    /// A fake, for fault injection only: ledger writes wait for a permit of
    /// `gate` and `fail` makes them fail, which no real store can be made to
    /// do on cue. Everything else goes to a real `FileStore`.
    struct Gated {
        real: FileStore,
        _dir: tempfile::TempDir,
        started: AtomicUsize,
        gate: Semaphore,
        fail: AtomicBool,
        written: std::sync::Mutex<Vec<Ledger>>,
    }

    impl Gated {
        fn new() -> Arc<Self> {
            let dir = tempfile::tempdir().unwrap();
            Arc::new(Self {
                real: FileStore::open(dir.path()).unwrap(),
                _dir: dir,
                started: AtomicUsize::new(0),
                gate: Semaphore::new(0),
                fail: AtomicBool::new(false),
                written: std::sync::Mutex::new(Vec::new()),
            })
        }

        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }

        fn written(&self) -> Vec<Ledger> {
            self.written.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl StateStore for Gated {
        async fn read_ledger(&self, _: &str) -> Result<Option<Vec<u8>>, Error> {
            Ok(None)
        }
        async fn write_ledger(&self, _: &str, bytes: &[u8]) -> Result<(), Error> {
            self.started.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Kubernetes("injected".into()));
            }
            self.written
                .lock()
                .unwrap()
                .push(Ledger::from_json(bytes).unwrap());
            Ok(())
        }
        async fn read_account(&self, a: &str) -> Result<Option<Vec<u8>>, Error> {
            self.real.read_account(a).await
        }
        async fn write_account(&self, a: &str, b: &[u8]) -> Result<(), Error> {
            self.real.write_account(a, b).await
        }
        async fn forget_account(&self, a: &str) -> Result<(), Error> {
            self.real.forget_account(a).await
        }
        async fn load_certificate(&self, a: &str) -> Result<Option<StoredCertificate>, Error> {
            self.real.load_certificate(a).await
        }
        async fn save_certificate(&self, a: &str, b: &StoredCertificate) -> Result<(), Error> {
            self.real.save_certificate(a, b).await
        }
        async fn load_status(&self, a: &str) -> Result<Option<Status>, Error> {
            self.real.load_status(a).await
        }
        async fn save_status(&self, a: &Status) -> Result<(), Error> {
            self.real.save_status(a).await
        }
        async fn status_names(&self) -> Result<Vec<String>, Error> {
            self.real.status_names().await
        }
        async fn read_dns_journal(&self) -> Result<Option<Vec<u8>>, Error> {
            self.real.read_dns_journal().await
        }
        async fn write_dns_journal(&self, a: &[u8]) -> Result<(), Error> {
            self.real.write_dns_journal(a).await
        }
    }

    fn spend(domains: &[String]) -> Spend<'_> {
        Spend {
            domains,
            exempt: false,
            on_demand: false,
        }
    }

    fn ledger() -> Arc<SharedLedger> {
        Arc::new(SharedLedger::new("https://ca.test/dir", Limits::default()))
    }

    /// Reserves an order for certificate `name` (one name, `name`.test) on
    /// a task of its own.
    fn reserve(
        ledger: &Arc<SharedLedger>,
        store: &Arc<Gated>,
        name: &'static str,
    ) -> tokio::task::JoinHandle<bool> {
        let (ledger, store) = (Arc::clone(ledger), Arc::clone(store));
        tokio::spawn(async move {
            let domains = vec![format!("{name}.test")];
            ledger
                .reserve(store.as_ref(), name, spend(&domains))
                .await
                .is_ok()
        })
    }

    async fn in_flight(ledger: &SharedLedger, store: &Gated) -> Vec<String> {
        ledger
            .with(store, |l| l.in_flight.keys().cloned().collect())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_reservation_is_written_before_another_is_made() {
        let (ledger, store) = (ledger(), Gated::new());
        let first = reserve(&ledger, &store, "a");
        while store.started() == 0 {
            tokio::task::yield_now().await;
        }
        let second = reserve(&ledger, &store, "b");
        // The test's runtime has one thread: these yields run the second
        // task until it waits, and the first's write is still held.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(store.started(), 1, "no second change during a write");
        store.gate.add_permits(2);
        assert!(first.await.unwrap());
        assert!(second.await.unwrap());
        let written = store.written();
        let keys = |l: &Ledger| l.in_flight.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&written[0]), ["a"]);
        assert_eq!(keys(&written[1]), ["a", "b"], "written in the order made");
    }

    #[tokio::test]
    async fn a_change_not_written_is_undone() {
        let (ledger, store) = (ledger(), Gated::new());
        store.fail.store(true, Ordering::SeqCst);
        store.gate.add_permits(1);
        assert!(!reserve(&ledger, &store, "a").await.unwrap());
        assert!(in_flight(&ledger, &store).await.is_empty(), "failed write");

        // Dropped mid-write (an aborted job): undone too.
        let domains = vec!["b.test".to_owned()];
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            ledger.reserve(store.as_ref(), "b", spend(&domains)),
        )
        .await;
        assert!(dropped.is_err(), "the write is held");
        assert!(in_flight(&ledger, &store).await.is_empty(), "dropped write");
    }
}
