//! The agent's persistent state, wherever it lives: the ACME account, the
//! last issued chain and key of every certificate, and a status record per
//! certificate that the `status` subcommand reads. [`StateStore`] is the
//! interface; `crate::disk::store` keeps it in a state directory, the
//! Kubernetes store (`crate::kubernetes`) in Secrets.

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::domain::spec::KeyType;

/// A certificate as last issued: chain and key in one file, so they can never
/// be replaced one without the other.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredCertificate {
    pub domains: Vec<String>,
    pub key_type: KeyType,
    pub chain_pem: String,
    pub key_pem: crate::domain::spec::KeyPem,
}

impl std::fmt::Debug for StoredCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCertificate")
            .field("domains", &self.domains)
            .field("key_type", &self.key_type)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What the agent last knew and decided about a certificate. It is state, not
/// only a report: the schedule (next attempt, failures, a pending forced
/// renewal) is restored from it after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub domains: Vec<String>,
    /// Unix seconds.
    pub not_after: Option<u64>,
    /// When the served certificate is planned to be renewed.
    pub next_renewal: Option<u64>,
    /// When the agent acts on this certificate next: a retry, the end of a
    /// CA-limit wait, or the next renewal-info check.
    #[serde(default)]
    pub next_attempt: Option<u64>,
    /// Why an order is due (`forced`, `names changed`, ...), kept until one
    /// succeeds.
    #[serde(default)]
    pub due: Option<String>,
    /// A forced renewal (`acme-agent renew`) that has not succeeded yet.
    #[serde(default)]
    pub forced: bool,
    pub last_error: Option<String>,
    /// The error's kind, as in the `error` label of the orders metric.
    #[serde(default)]
    pub last_error_kind: Option<String>,
    #[serde(default)]
    pub last_failure: Option<u64>,
    /// Consecutive failures since the last success.
    pub failures: u32,
    /// The CA-limit budget the certificate waits for (`crate::domain::budget::Limit`).
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// An issued certificate is waiting for its store or install step.
    #[serde(default)]
    pub awaiting_install: bool,
    pub updated: u64,
    /// On-demand: when a handshake last asked for it (the idle rule).
    #[serde(default)]
    pub last_requested: Option<u64>,
    /// On-demand: orders in a row that failed on the name.
    #[serde(default)]
    pub name_failures: u32,
}

impl Status {
    /// What the record says that a restart acts on, as one number: the
    /// write time left out, and the next attempt too when it only says
    /// "look again" (no failure, no CA-limit wait, no forced renewal: a
    /// restart looks at once whatever it says). Equal means a save can be
    /// skipped.
    pub fn essence(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let quiet = self.failures == 0 && self.waiting_for.is_none() && !self.forced;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        Status {
            updated: 0,
            next_attempt: if quiet { None } else { self.next_attempt },
            ..self.clone()
        }
        .hash(&mut hasher);
        hasher.finish()
    }
}

/// Names the account of one CA: 16 hex digits of the directory URL's SHA-256,
/// so a changed `acme.directory` never reuses another CA's account.
pub fn account_id(directory_url: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, directory_url.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The agent's persistent state, wherever it lives. Async: the Kubernetes
/// store calls the API server, and the disk store runs its fsync'd writes
/// off the runtime's workers.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    /// The stored account for the CA at `directory_url`, as written.
    async fn read_account(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Stores the account (it holds the account's private key).
    async fn write_account(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error>;
    /// Sets the stored account aside (kept for the operator, no longer used).
    async fn forget_account(&self, directory_url: &str) -> Result<(), Error>;
    async fn load_certificate(&self, name: &str) -> Result<Option<StoredCertificate>, Error>;
    async fn save_certificate(&self, name: &str, cert: &StoredCertificate) -> Result<(), Error>;
    async fn load_status(&self, name: &str) -> Result<Option<Status>, Error>;
    async fn save_status(&self, status: &Status) -> Result<(), Error>;
    /// Names of every certificate with a status record, sorted.
    async fn status_names(&self) -> Result<Vec<String>, Error>;
    /// The CA-limit ledger (`crate::domain::budget`) for the CA at `directory_url`.
    async fn read_ledger(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Replaces the ledger's snapshot; a store with a journal clears it
    /// after (its lines are of an older generation from then on).
    async fn write_ledger(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error>;
    /// The ledger's journal (`crate::domain::journal`) as written; empty
    /// from a store that keeps none.
    async fn read_ledger_journal(&self, directory_url: &str) -> Result<Vec<u8>, Error> {
        let _ = directory_url;
        Ok(Vec::new())
    }
    /// Appends `line` to the ledger's journal, durably, before returning
    /// `Ok(true)`; `Ok(false)`: this store keeps no journal, write the
    /// whole ledger instead.
    async fn append_ledger(&self, directory_url: &str, line: &[u8]) -> Result<bool, Error> {
        let _ = (directory_url, line);
        Ok(false)
    }
    /// Takes over the certificate stored under `name` by someone else (a
    /// Secret without the agent's label), when there is one: from now on it
    /// is the agent's. `None` when there is nothing to adopt (no such
    /// certificate, or it is the agent's already).
    async fn adopt_certificate(
        &self,
        name: &str,
        domains: &[String],
    ) -> Result<Option<StoredCertificate>, Error> {
        let _ = (name, domains);
        Ok(None)
    }
    /// Deletes certificate `name` and its status record (an on-demand
    /// certificate removed): the status first, so a crash in between leaves
    /// nothing that would bring it back at the next start. Stores that never
    /// hold on-demand certificates (Kubernetes) refuse.
    async fn remove_certificate(&self, name: &str) -> Result<(), Error> {
        Err(Error::Io {
            context: format!("removing certificate {name}"),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this state store does not remove certificates",
            ),
        })
    }
    /// The dns-01 records added and not yet deleted (the dns-01 solver's journal).
    async fn read_dns_journal(&self) -> Result<Option<Vec<u8>>, Error>;
    async fn write_dns_journal(&self, bytes: &[u8]) -> Result<(), Error>;
}
