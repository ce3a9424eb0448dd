//! The CA-limit ledger as the jobs share it: loaded from the store on first
//! use (a read error is an error, so nothing is ordered on a guess), written
//! back before every order (write-ahead) and after it.

use std::sync::Mutex;
use std::time::SystemTime;

use tracing::warn;

use crate::Error;
use crate::domain::budget::Limits;
use crate::domain::budget::{Blocked, Bucket, Finished, Ledger, Spend};
use crate::ports::store::StateStore;

pub struct SharedLedger {
    directory: String,
    limits: Limits,
    ledger: Mutex<Option<Ledger>>,
}

/// Why a reservation was not made.
pub enum Refused {
    Blocked(Blocked),
    Store(Error),
}

impl SharedLedger {
    pub fn new(directory: &str, limits: Limits) -> Self {
        Self {
            directory: directory.to_owned(),
            limits,
            ledger: Mutex::new(None),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `f` on the loaded ledger; `write` persists it afterwards (an
    /// error then undoes nothing in memory: memory stays the authority).
    fn with<T>(
        &self,
        store: &dyn StateStore,
        f: impl FnOnce(&mut Ledger) -> T,
    ) -> Result<T, Error> {
        let mut slot = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            let ledger = match store.read_ledger(&self.directory)? {
                Some(bytes) => Ledger::from_json(&bytes).map_err(|e| Error::Io {
                    context: format!("reading the CA-limit ledger for {}", self.directory),
                    source: std::io::Error::other(e.to_string()),
                })?,
                None => Ledger::default(),
            };
            *slot = Some(ledger);
        }
        let ledger = slot.get_or_insert_with(Ledger::default);
        Ok(f(ledger))
    }

    fn write(&self, store: &dyn StateStore, ledger: &Ledger) -> Result<(), Error> {
        let json = serde_json::to_vec(ledger).map_err(|e| Error::Io {
            context: "serializing the CA-limit ledger".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        store.write_ledger(&self.directory, &json)
    }

    /// The order the last run was placing for `name` when it stopped, if any
    /// (Unix seconds); ended, its names handed to the CA counted as failed.
    pub fn take_interrupted(
        &self,
        store: &dyn StateStore,
        name: &str,
    ) -> Result<Option<u64>, Error> {
        let now = SystemTime::now();
        let taken = self.with(store, |l| {
            let changed = l.in_flight.contains_key(name) || l.triggered.contains_key(name);
            let at = l.interrupted(name, now);
            (at, changed.then(|| l.clone()))
        })?;
        if let (_, Some(ledger)) = &taken
            && let Err(e) = self.write(store, ledger)
        {
            warn!("writing the CA-limit ledger: {e}");
        }
        Ok(taken.0)
    }

    /// Applies `f` and persists the result; an error (not written) undoes it,
    /// so nothing is done on the strength of a count that was not kept.
    fn change<T>(
        &self,
        store: &dyn StateStore,
        f: impl FnOnce(&mut Ledger) -> T,
    ) -> Result<T, Error> {
        let (before, after, value) = self.with(store, |l| {
            let before = l.clone();
            let value = f(l);
            (before, l.clone(), value)
        })?;
        if let Err(e) = self.write(store, &after) {
            let _ = self.with(store, |l| *l = before);
            return Err(e);
        }
        Ok(value)
    }

    /// The order of certificate `name` is about to hand the challenges of
    /// `names` to the CA: counted (written) before it does, so no failed
    /// authorization can be missed; an error means the CA must not be told.
    pub fn trigger(
        &self,
        store: &dyn StateStore,
        name: &str,
        names: &[String],
    ) -> Result<(), Error> {
        self.change(store, |l| l.trigger(name, names))
    }

    /// Admits a new on-demand name within `bucket` (`on_demand.max_per_hour`),
    /// persisted so a restart does not refill it; `Ok(Err(until))` when full.
    pub fn admit_on_demand(
        &self,
        store: &dyn StateStore,
        bucket: Bucket,
    ) -> Result<Result<(), SystemTime>, Error> {
        let now = SystemTime::now();
        self.change(store, |l| l.admit_on_demand(bucket, now))
    }

    /// Remembers `domain` as refused until `until` (persisted).
    pub fn refuse(&self, store: &dyn StateStore, domain: &str, until: SystemTime) {
        let now = SystemTime::now();
        if let Err(e) = self.change(store, |l| l.refuse(domain, until, now)) {
            warn!(domain, "remembering a refused on-demand name: {e}");
        }
    }

    /// Until when `domain` stays refused, if it is.
    pub fn refused_until(
        &self,
        store: &dyn StateStore,
        domain: &str,
    ) -> Result<Option<SystemTime>, Error> {
        let now = SystemTime::now();
        self.with(store, |l| l.refused_until(domain, now))
    }

    /// Reserves an order for certificate `name` and persists that before the
    /// order is placed; refused when a limit would be exceeded or the ledger
    /// cannot be written (an order it could not count is not placed).
    pub fn reserve(
        &self,
        store: &dyn StateStore,
        name: &str,
        spend: Spend<'_>,
    ) -> Result<(), Refused> {
        let now = SystemTime::now();
        let limits = self.limits;
        self.change(store, |l| l.reserve(&limits, name, spend, now))
            .map_err(Refused::Store)?
            .map_err(Refused::Blocked)
    }

    /// One more order inside a reservation (placed again without `replaces`
    /// because the CA does not reflect it); checked, counted and persisted.
    pub fn extra_order(&self, store: &dyn StateStore, spend: Spend<'_>) -> Result<(), Refused> {
        let now = SystemTime::now();
        let limits = self.limits;
        self.change(store, |l| {
            l.check(&limits, spend, now)?;
            l.count_order(false, now);
            l.replaces_not_reflected = true;
            Ok(())
        })
        .map_err(Refused::Store)?
        .map_err(Refused::Blocked)
    }

    /// Ends the reservation of `name`.
    pub fn finish(&self, store: &dyn StateStore, name: &str, domains: &[String], how: &Finished) {
        let now = SystemTime::now();
        match self.with(store, |l| {
            l.finish(name, domains, how, now);
            l.clone()
        }) {
            Ok(ledger) => {
                if let Err(e) = self.write(store, &ledger) {
                    warn!("writing the CA-limit ledger: {e}");
                }
            }
            Err(e) => warn!("updating the CA-limit ledger: {e}"),
        }
    }

    /// Whether the CA is known not to reflect `replaces`.
    pub fn replaces_not_reflected(&self, store: &dyn StateStore) -> bool {
        self.with(store, |l| l.replaces_not_reflected)
            .unwrap_or(false)
    }

    /// Orders the bucket allows now, when the ledger is loaded.
    pub fn orders_remaining(&self) -> Option<u32> {
        let slot = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref()
            .map(|l| l.orders_remaining(&self.limits, SystemTime::now()))
    }
}
