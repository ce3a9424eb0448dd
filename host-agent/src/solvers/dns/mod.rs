//! dns-01 (RFC 8555 section 8.4): the configured solvers, each a zone
//! (`zone`: CNAMEs followed into it, every authoritative nameserver checked)
//! written by RFC 2136 dynamic updates (`rfc2136`) or the operator's
//! commands (`exec`); the records an order publishes, and their removal on
//! every path (success, failure, abort, crash) without touching a record the
//! agent did not add.

mod exchange;
pub mod exec;
pub mod journal;
pub mod rfc2136;
pub mod zone;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::Error;
use crate::config::Config;
pub use journal::Journal;
pub use rfc2136::{Rfc2136, TxtRecord};
use zone::Zone;

/// The journal is looked at this often; a leftover is retried after it ...
const SWEEP_FIRST: Duration = Duration::from_secs(2);
/// ... and, while it cannot be deleted, at most this far apart.
const SWEEP_MAX: Duration = Duration::from_secs(300);

/// The TXT value for a key authorization: base64url(SHA-256(it)).
pub fn txt_value(key_authorization: &str) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// One `[dns.<name>]`: its zone, and what writes the records into it.
pub struct Solver {
    zone: Zone,
    updater: Updater,
}

enum Updater {
    Rfc2136(Rfc2136),
    Exec(exec::Exec),
}

impl Solver {
    pub fn new(label: &str, config: &crate::config::DnsSolver) -> Result<Self, Error> {
        let updater = match exec::Exec::new(label, config) {
            Some(exec) => Updater::Exec(exec),
            None => Updater::Rfc2136(Rfc2136::new(label, config)?),
        };
        Ok(Self {
            zone: Zone::new(label, config)?,
            updater,
        })
    }

    /// Before an order is placed (a broken solver must not cost CA
    /// orders): RFC 2136 proves the key with an empty signed update; an
    /// `exec` solver's programs were checked when the config loaded.
    pub async fn preflight(&self) -> Result<(), Error> {
        match &self.updater {
            Updater::Rfc2136(u) => u.preflight().await,
            Updater::Exec(_) => Ok(()),
        }
    }

    pub async fn add(&self, record: &TxtRecord) -> Result<(), Error> {
        match &self.updater {
            Updater::Rfc2136(u) => u.add(record).await,
            Updater::Exec(u) => u.add(record).await,
        }
    }

    pub async fn delete(&self, record: &TxtRecord) -> Result<(), Error> {
        match &self.updater {
            Updater::Rfc2136(u) => u.delete(record).await,
            Updater::Exec(u) => u.delete(record).await,
        }
    }

    /// The owner name of the TXT record for `domain` ([`Zone::record_name`]).
    pub async fn record_name(&self, domain: &str) -> Result<hickory_proto::rr::Name, Error> {
        self.zone.record_name(domain).await
    }

    /// Waits until every authoritative nameserver serves every one of `records`.
    pub async fn wait_propagated(&self, records: &[&TxtRecord]) -> Result<(), Error> {
        self.zone.wait_propagated(records).await
    }
}

/// The solvers of the running config and the journal of records added.
pub struct Dns {
    solvers: RwLock<BTreeMap<String, Arc<Solver>>>,
    journal: Journal,
}

impl Dns {
    pub fn new(store: Arc<dyn crate::ports::store::StateStore>) -> Self {
        Self {
            solvers: RwLock::new(BTreeMap::new()),
            journal: Journal::new(store),
        }
    }

    /// Takes the solvers of `config` (at start and on every reload).
    pub fn configure(&self, config: &Config) {
        let mut built = BTreeMap::new();
        for (name, solver) in &config.dns {
            match Solver::new(name, solver) {
                Ok(s) => {
                    built.insert(name.clone(), Arc::new(s));
                }
                Err(e) => warn!(solver = name, "{e}"),
            }
        }
        *self
            .solvers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = built;
    }

    pub fn solver(&self, name: &str) -> Result<Arc<Solver>, Error> {
        self.solvers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Dns(format!("no [dns.{name}] solver is configured")))
    }

    /// Checks that `solver` can update its zone (before an order is placed).
    pub async fn preflight(&self, solver: &str) -> Result<(), Error> {
        self.solver(solver)?.preflight().await
    }

    /// Adds `record` to its zone, journaled first.
    async fn add(&self, solver: &Solver, record: &TxtRecord) -> Result<(), Error> {
        self.journal.add(record).await?;
        solver.add(record).await
    }

    /// Deletes `record` from its zone and forgets it.
    async fn delete(&self, record: &TxtRecord) -> Result<(), Error> {
        self.solver(&record.solver)?.delete(record).await?;
        self.journal.forget(record).await
    }

    /// Deletes every journaled record it can; the rest stay for later.
    pub async fn sweep(&self) -> usize {
        let pending = match self.journal.pending().await {
            Ok(pending) => pending,
            Err(e) => {
                warn!("DNS record journal: {e}");
                return 0;
            }
        };
        let mut left = 0;
        for record in pending {
            match self.delete(&record).await {
                Ok(()) => info!(name = record.name, "removed a leftover challenge record"),
                Err(e) => {
                    left += 1;
                    warn!(
                        name = record.name,
                        "leftover challenge record not removed yet: {e}"
                    );
                }
            }
        }
        left
    }

    /// Sweeps at start, then looks every [`SWEEP_FIRST`] for records left
    /// behind (a delete that failed); while some cannot be deleted, waits
    /// twice as long each time, up to [`SWEEP_MAX`].
    pub async fn sweep_until(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut wait = SWEEP_FIRST;
        loop {
            // Without a solver there is nothing to delete with (and, in
            // Kubernetes mode, no permission to read the journal's Secret).
            let any_solver = !self
                .solvers
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_empty();
            if any_solver && self.journal.pending().await.is_ok_and(|p| !p.is_empty()) {
                wait = if self.sweep().await > 0 {
                    (wait * 2).min(SWEEP_MAX)
                } else {
                    SWEEP_FIRST
                };
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// The records one order added; deleted by [`Published::remove`], or in the
/// background when dropped (a failed or aborted order).
pub struct Published {
    dns: Arc<Dns>,
    records: Vec<TxtRecord>,
}

impl Published {
    pub fn new(dns: Arc<Dns>) -> Self {
        Self {
            dns,
            records: Vec::new(),
        }
    }

    /// Adds the TXT record for `domain` (validated name, no `*.`) with
    /// `value` through solver `solver`; returns it.
    pub async fn add(&mut self, solver: &str, domain: &str, value: &str) -> Result<(), Error> {
        let writer = self.dns.solver(solver)?;
        let name = writer.record_name(domain).await?;
        let record = TxtRecord {
            solver: solver.to_owned(),
            name: name.to_ascii(),
            value: value.to_owned(),
        };
        self.dns.add(&writer, &record).await.inspect_err(|_| {
            // Journaled and maybe added: removed with the others.
            self.records.push(record.clone());
        })?;
        self.records.push(record);
        Ok(())
    }

    /// Waits until every authoritative nameserver serves every record.
    pub async fn wait_propagated(&self) -> Result<(), Error> {
        let mut by_solver: BTreeMap<&str, Vec<&TxtRecord>> = BTreeMap::new();
        for record in &self.records {
            by_solver.entry(&record.solver).or_default().push(record);
        }
        let checks = by_solver.iter().map(|(solver, records)| async move {
            self.dns.solver(solver)?.wait_propagated(records).await
        });
        for result in futures_util::future::join_all(checks).await {
            result?;
        }
        Ok(())
    }

    /// Deletes the records now; those that fail stay journaled for the sweeper.
    pub async fn remove(mut self) {
        let records = std::mem::take(&mut self.records);
        remove_all(&self.dns, records).await;
    }
}

async fn remove_all(dns: &Dns, records: Vec<TxtRecord>) {
    for record in records {
        if let Err(e) = dns.delete(&record).await {
            warn!(
                name = record.name,
                "challenge record not removed yet (retried): {e}"
            );
        }
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        let records = std::mem::take(&mut self.records);
        if records.is_empty() {
            return;
        }
        let dns = Arc::clone(&self.dns);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { remove_all(&dns, records).await });
            }
            Err(_) => warn!("challenge records left for the next start's sweep"),
        }
    }
}

/// The dns-01 solver: TXT records through the certificate's `[dns.<name>]`
/// solver, journaled, waited for on every authoritative nameserver.
pub struct Dns01(pub Arc<Dns>);

fn solver_of(spec: &crate::domain::spec::Certificate) -> Result<&str, Error> {
    spec.dns.as_deref().ok_or_else(|| {
        Error::Dns(format!(
            "certificate {} needs a dns-01 solver (dns = \"<name>\")",
            spec.name
        ))
    })
}

#[async_trait::async_trait]
impl crate::ports::solver::Solver for Dns01 {
    fn configure(&self, config: &Config) {
        self.0.configure(config);
    }

    async fn preflight(&self, spec: &crate::domain::spec::Certificate) -> Result<(), Error> {
        self.0.preflight(solver_of(spec)?).await
    }

    async fn present(
        &self,
        spec: &crate::domain::spec::Certificate,
        challenges: &[crate::challenges::Challenge],
    ) -> Result<Box<dyn crate::ports::solver::Presented>, Error> {
        let solver = solver_of(spec)?;
        let mut published = Published::new(Arc::clone(&self.0));
        for c in challenges {
            let base = c.identifier.strip_prefix("*.").unwrap_or(&c.identifier);
            published
                .add(solver, base, &txt_value(&c.key_authorization))
                .await?;
        }
        Ok(Box::new(published))
    }
}

#[async_trait::async_trait]
impl crate::ports::solver::Presented for Published {
    async fn check(&self) -> Result<(), Error> {
        self.wait_propagated().await
    }

    async fn clean_up(self: Box<Self>) {
        (*self).remove().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_value_is_the_rfc_8555_digest() {
        // RFC 8555 section 8.4: base64url(SHA-256(key authorization)), no padding.
        // Computed independently: Python's hashlib and base64.urlsafe_b64encode.
        assert_eq!(
            txt_value("token.thumbprint"),
            "61rBZ_4knHblO0MNoxFsXZ_eTFUHum0B6IVRbhvUn5I"
        );
    }
}
