//! The CA-limit ledger as the jobs share it: loaded from the store on first
//! use (a read error is an error, so nothing is ordered on a guess), each
//! change written before anything is done on it (write-ahead): one journal
//! line per change (`crate::domain::journal`), the whole ledger again only
//! when the journal has grown past it, so a change costs the same at 10
//! certificates as at 10,000.

use std::time::SystemTime;

use tokio::sync::{Mutex, MutexGuard};
use tracing::warn;

use crate::Error;
use crate::domain::budget::Limits;
use crate::domain::budget::{Blocked, Bucket, Finished, Ledger, Spend};
use crate::domain::journal;
use crate::ports::store::StateStore;
use crate::time::Clock;

/// The journal may grow to the snapshot's size (at least this much)
/// before the snapshot is written again: each byte is written at most
/// about twice, whatever the ledger's size.
const MIN_JOURNAL_BYTES: usize = 64 * 1024;

pub struct SharedLedger {
    directory: String,
    limits: Limits,
    /// An async lock, held from the read through the write of each change:
    /// a reservation is checked, made and persisted before any other can
    /// look, the store gets the changes in the order they were made.
    held: Mutex<Held>,
    /// What each count is dated with.
    clock: Clock,
}

#[derive(Default)]
struct Held {
    /// `None` until loaded, and again after a change that was not written:
    /// the next use reads what the store kept.
    loaded: Option<Loaded>,
    /// The next write is the whole ledger: after an append that failed or
    /// was cut off (the journal may end in a piece of a line) or a snapshot
    /// that failed.
    snapshot_due: bool,
}

struct Loaded {
    ledger: Ledger,
    /// Bytes of the journal since the snapshot, and the snapshot's size.
    journal_bytes: usize,
    snapshot_bytes: usize,
}

/// Why a reservation was not made.
pub enum Refused {
    Blocked(Blocked),
    Store(Error),
}

/// A change made in memory whose write has not succeeded yet: dropped before
/// [`Unwritten::kept`] (the write failed, or an aborted job dropped it
/// mid-write), it drops the ledger from memory, so the next use reads what
/// the store kept and nothing is done on the strength of a count that may
/// not have been kept. (A write that was cut off may still land: it then
/// counts one more, the safe side, or ends the journal in a piece of a
/// line, which loading ignores and the next write, a snapshot, replaces.)
struct Unwritten<'a> {
    held: MutexGuard<'a, Held>,
    kept: bool,
}

impl Unwritten<'_> {
    fn kept(mut self) {
        self.kept = true;
    }
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.held.loaded = None;
            self.held.snapshot_due = true;
        }
    }
}

impl SharedLedger {
    pub fn new(directory: &str, limits: Limits) -> Self {
        Self {
            directory: directory.to_owned(),
            limits,
            held: Mutex::new(Held::default()),
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

    /// The ledger, locked and loaded from the store (its snapshot and
    /// journal) when it is not in memory; a read error is an error: nothing
    /// is decided on a guess.
    async fn loaded(&self, store: &dyn StateStore) -> Result<MutexGuard<'_, Held>, Error> {
        let mut held = self.held.lock().await;
        if held.loaded.is_none() {
            let snapshot = store.read_ledger(&self.directory).await?;
            let journal = store.read_ledger_journal(&self.directory).await?;
            let (mut ledger, journal_bytes) = Ledger::load(snapshot.as_deref(), &journal)
                .map_err(|e| context(e, &self.directory))?;
            ledger.prune(&self.limits, self.clock.now());
            // The first write of a new ledger is its snapshot, so the
            // journal always continues one the operator can read.
            held.snapshot_due |= snapshot.is_none();
            held.loaded = Some(Loaded {
                ledger,
                journal_bytes,
                snapshot_bytes: snapshot.map_or(0, |s| s.len()),
            });
        }
        Ok(held)
    }

    /// Runs `f` on the loaded ledger, in memory only.
    async fn with<T>(
        &self,
        store: &dyn StateStore,
        f: impl FnOnce(&mut Ledger) -> T,
    ) -> Result<T, Error> {
        let mut held = self.loaded(store).await?;
        Ok(f(ledger_of(&mut held)))
    }

    /// Writes the changes made since the last write: a journal line, or the
    /// whole ledger when one is due or the journal has outgrown it (or the
    /// store keeps no journal). On an error `snapshot_due` is set.
    async fn write(&self, store: &dyn StateStore, held: &mut Held) -> Result<(), Error> {
        let Some(loaded) = held.loaded.as_mut() else {
            return Ok(());
        };
        let changes = loaded.ledger.take_changes();
        let journal_full = loaded.journal_bytes >= loaded.snapshot_bytes.max(MIN_JOURNAL_BYTES);
        if !held.snapshot_due && !journal_full {
            if changes.is_empty() {
                return Ok(());
            }
            let line = journal::line(loaded.ledger.generation, changes)?;
            match store.append_ledger(&self.directory, &line).await {
                Ok(true) => {
                    loaded.journal_bytes += line.len();
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    held.snapshot_due = true;
                    return Err(e);
                }
            }
        }
        held.snapshot_due = true;
        let ledger = &mut loaded.ledger;
        ledger.prune(&self.limits, self.clock.now());
        ledger.generation += 1;
        let json = serde_json::to_vec(&*ledger).map_err(|e| Error::Io {
            context: "serializing the CA-limit ledger".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        store.write_ledger(&self.directory, &json).await?;
        loaded.snapshot_bytes = json.len();
        loaded.journal_bytes = 0;
        held.snapshot_due = false;
        Ok(())
    }

    /// Runs `f` and persists what it changed, the lock held throughout; a
    /// failed write leaves memory as it is (memory stays the authority, the
    /// next write is the whole ledger) and is only warned about.
    async fn update(
        &self,
        store: &dyn StateStore,
        what: &str,
        f: impl FnOnce(&mut Ledger),
    ) -> Result<(), Error> {
        let mut held = self.loaded(store).await?;
        f(ledger_of(&mut held));
        if let Err(e) = self.write(store, &mut held).await {
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
            at = l.interrupted(name, now);
        })
        .await?;
        Ok(at)
    }

    /// Applies `f` and persists what it changed, the lock held throughout;
    /// an error (not written) drops the ledger from memory, so nothing is
    /// done on the strength of a count that was not kept.
    async fn change<T>(
        &self,
        store: &dyn StateStore,
        f: impl FnOnce(&mut Ledger) -> T,
    ) -> Result<T, Error> {
        let held = self.loaded(store).await?;
        let mut unwritten = Unwritten { held, kept: false };
        let value = f(ledger_of(&mut unwritten.held));
        self.write(store, &mut unwritten.held).await?;
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
            l.replaces_are_not_reflected();
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
        let held = self.held.lock().await;
        held.loaded
            .as_ref()
            .map(|l| l.ledger.orders_remaining(&self.limits, self.clock.now()))
    }
}

/// The ledger of a [`Held`] just loaded.
fn ledger_of(held: &mut Held) -> &mut Ledger {
    &mut held
        .loaded
        .get_or_insert_with(|| Loaded {
            ledger: Ledger::default(),
            journal_bytes: 0,
            snapshot_bytes: 0,
        })
        .ledger
}

/// A ledger that could not be read, with the CA it is for.
fn context(e: Error, directory: &str) -> Error {
    match e {
        Error::Io { context, source } => Error::Io {
            context: format!("{context} for {directory}"),
            source,
        },
        other => other,
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
    /// do on cue; it keeps a journal when `journaled`. Everything else goes
    /// to a real `FileStore`.
    struct Gated {
        real: FileStore,
        _dir: tempfile::TempDir,
        journaled: bool,
        started: AtomicUsize,
        gate: Semaphore,
        fail: AtomicBool,
        snapshot: std::sync::Mutex<Option<Vec<u8>>>,
        journal: std::sync::Mutex<Vec<u8>>,
        /// The ledger as the store held it after each write.
        written: std::sync::Mutex<Vec<Ledger>>,
    }

    impl Gated {
        fn new() -> Arc<Self> {
            Self::with_journal(false)
        }

        fn with_journal(journaled: bool) -> Arc<Self> {
            let dir = tempfile::tempdir().unwrap();
            Arc::new(Self {
                real: FileStore::open(dir.path()).unwrap(),
                _dir: dir,
                journaled,
                started: AtomicUsize::new(0),
                gate: Semaphore::new(0),
                fail: AtomicBool::new(false),
                snapshot: std::sync::Mutex::new(None),
                journal: std::sync::Mutex::new(Vec::new()),
                written: std::sync::Mutex::new(Vec::new()),
            })
        }

        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }

        fn written(&self) -> Vec<Ledger> {
            self.written.lock().unwrap().clone()
        }

        /// Waits for the gate; `Err` when told to fail.
        async fn pass(&self) -> Result<(), Error> {
            self.started.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Kubernetes("injected".into()));
            }
            Ok(())
        }

        fn record(&self) {
            let snapshot = self.snapshot.lock().unwrap().clone();
            let journal = self.journal.lock().unwrap().clone();
            let (ledger, _) = Ledger::load(snapshot.as_deref(), &journal).unwrap();
            self.written.lock().unwrap().push(ledger);
        }
    }

    #[async_trait::async_trait]
    impl StateStore for Gated {
        async fn read_ledger(&self, _: &str) -> Result<Option<Vec<u8>>, Error> {
            Ok(self.snapshot.lock().unwrap().clone())
        }
        async fn write_ledger(&self, _: &str, bytes: &[u8]) -> Result<(), Error> {
            self.pass().await?;
            *self.snapshot.lock().unwrap() = Some(bytes.to_vec());
            self.journal.lock().unwrap().clear();
            self.record();
            Ok(())
        }
        async fn read_ledger_journal(&self, _: &str) -> Result<Vec<u8>, Error> {
            Ok(self.journal.lock().unwrap().clone())
        }
        async fn append_ledger(&self, _: &str, line: &[u8]) -> Result<bool, Error> {
            if !self.journaled {
                return Ok(false);
            }
            self.pass().await?;
            self.journal.lock().unwrap().extend_from_slice(line);
            self.record();
            Ok(true)
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

    #[tokio::test]
    async fn changes_go_to_the_journal_and_a_new_run_reads_the_same_ledger() {
        let (ledger, store) = (ledger(), Gated::with_journal(true));
        store.gate.add_permits(usize::MAX >> 4);
        let domains: Vec<Vec<String>> = (0..800).map(|i| vec![format!("n{i}.test")]).collect();
        for (i, names) in domains.iter().enumerate() {
            let name = format!("c{i}");
            let spend = Spend {
                domains: names,
                exempt: false,
                on_demand: false,
            };
            // Limits allow 300 orders: the rest are refused, not written.
            let _ = ledger.reserve(store.as_ref(), &name, spend).await;
            ledger.trigger(store.as_ref(), &name, names).await.unwrap();
            let how = Finished::NotFinalized {
                valid_names: vec![],
            };
            ledger.finish(store.as_ref(), &name, names, &how).await;
        }
        let snapshots = store.snapshot.lock().unwrap().clone().unwrap().len();
        let journal = store.journal.lock().unwrap().len();
        // The journal never grows much past the snapshot (or 64 KiB).
        assert!(journal > 0 && journal <= snapshots.max(MIN_JOURNAL_BYTES) + 4096);
        let written = store.written();
        assert!(written.len() > 1600, "a write per change");
        let snapshots_written = written
            .windows(2)
            .filter(|w| w[1].generation > w[0].generation);
        assert!(snapshots_written.count() >= 2, "compacted along the way");
        let mut memory = ledger.with(store.as_ref(), |l| l.clone()).await.unwrap();
        let again = SharedLedger::new("https://ca.test/dir", Limits::default());
        let mut read = again.with(store.as_ref(), |l| l.clone()).await.unwrap();
        memory.generation = 0;
        read.generation = 0;
        assert_eq!(read, memory);
        assert_eq!(read.failed_authorizations.len(), 800);
        assert_eq!(read.orders.len(), 300);
    }

    #[tokio::test]
    async fn after_a_failed_append_the_next_write_is_the_whole_ledger() {
        let (ledger, store) = (ledger(), Gated::with_journal(true));
        store.gate.add_permits(1);
        assert!(reserve(&ledger, &store, "a").await.unwrap());
        assert!(
            store.journal.lock().unwrap().is_empty(),
            "a new ledger's snapshot"
        );
        store.gate.add_permits(1);
        assert!(reserve(&ledger, &store, "a2").await.unwrap());
        assert!(!store.journal.lock().unwrap().is_empty(), "a journal line");
        store.fail.store(true, Ordering::SeqCst);
        store.gate.add_permits(1);
        assert!(!reserve(&ledger, &store, "b").await.unwrap());
        // What the store kept: a, and not b.
        assert_eq!(in_flight(&ledger, &store).await, ["a", "a2"]);
        store.fail.store(false, Ordering::SeqCst);
        store.gate.add_permits(1);
        assert!(reserve(&ledger, &store, "c").await.unwrap());
        assert!(store.journal.lock().unwrap().is_empty(), "a snapshot");
        let last = store.written().pop().unwrap();
        assert_eq!(
            last.in_flight.keys().collect::<Vec<_>>(),
            ["a", "a2", "c"],
            "the snapshot holds what the journal did"
        );
    }
}
