//! The CA-limit ledger as the jobs share it: loaded from the store on first
//! use (a read error is an error, so nothing is ordered on a guess), written
//! back before every order (write-ahead) and after it.

use std::sync::Mutex;
use std::time::SystemTime;

use tracing::warn;

use crate::Error;
use crate::budget::{Blocked, Finished, Ledger};
use crate::config::Limits;
use crate::store::StateStore;

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
                Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Io {
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
    /// (Unix seconds); cleared.
    pub fn take_interrupted(
        &self,
        store: &dyn StateStore,
        name: &str,
    ) -> Result<Option<u64>, Error> {
        let taken = self.with(store, |l| {
            let at = l.in_flight.remove(name);
            (at, at.is_some().then(|| l.clone()))
        })?;
        if let (_, Some(ledger)) = &taken
            && let Err(e) = self.write(store, ledger)
        {
            warn!("writing the CA-limit ledger: {e}");
        }
        Ok(taken.0)
    }

    /// Reserves an order for certificate `name` and persists that before the
    /// order is placed; refused when a limit would be exceeded or the ledger
    /// cannot be written (an order it could not count is not placed).
    pub fn reserve(
        &self,
        store: &dyn StateStore,
        name: &str,
        domains: &[String],
        exempt: bool,
    ) -> Result<(), Refused> {
        let now = SystemTime::now();
        let limits = self.limits;
        let reserved = self
            .with(store, |l| {
                let before = l.clone();
                l.reserve(&limits, name, domains, exempt, now)
                    .map(|()| (before, l.clone()))
            })
            .map_err(Refused::Store)?
            .map_err(Refused::Blocked)?;
        let (before, after) = reserved;
        if let Err(e) = self.write(store, &after) {
            // Not written, not placed: take the reservation back.
            let _ = self.with(store, |l| *l = before);
            return Err(Refused::Store(e));
        }
        Ok(())
    }

    /// One more order inside a reservation (placed again without `replaces`
    /// because the CA does not reflect it); checked, counted and persisted.
    pub fn extra_order(&self, store: &dyn StateStore, domains: &[String]) -> Result<(), Refused> {
        let now = SystemTime::now();
        let limits = self.limits;
        let after = self
            .with(store, |l| {
                l.check(&limits, domains, false, now)?;
                l.count_order(false, now);
                l.replaces_not_reflected = true;
                Ok(l.clone())
            })
            .map_err(Refused::Store)?
            .map_err(Refused::Blocked)?;
        self.write(store, &after).map_err(Refused::Store)
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

    /// Orders left in the current 3-hour window, when the ledger is loaded.
    pub fn orders_remaining(&self) -> Option<u32> {
        let slot = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref()
            .map(|l| l.orders_remaining(&self.limits, SystemTime::now()))
    }
}
