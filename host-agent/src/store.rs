//! Where the agent keeps its state: the ACME account, the last issued chain and
//! key of every certificate, and a status record per certificate that the
//! `status` subcommand reads. [`StateStore`] is the interface; [`Store`] keeps
//! it in a state directory (0700, every file replaced atomically), the
//! Kubernetes store (`kubernetes.rs`) in Secrets.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::domain::spec::KeyType;
use crate::files::write_atomically;
use crate::time::unix;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn json_error(context: String) -> impl FnOnce(serde_json::Error) -> Error {
    move |e| Error::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// Names the account of one CA: 16 hex digits of the directory URL's SHA-256,
/// so a changed `acme.directory` never reuses another CA's account.
pub fn account_id(directory_url: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, directory_url.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The agent's persistent state, wherever it lives.
pub trait StateStore: Send + Sync {
    /// The stored account for the CA at `directory_url`, as written.
    fn read_account(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Stores the account (it holds the account's private key).
    fn write_account(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error>;
    /// Sets the stored account aside (kept for the operator, no longer used).
    fn forget_account(&self, directory_url: &str) -> Result<(), Error>;
    fn load_certificate(&self, name: &str) -> Result<Option<StoredCertificate>, Error>;
    fn save_certificate(&self, name: &str, cert: &StoredCertificate) -> Result<(), Error>;
    fn load_status(&self, name: &str) -> Result<Option<Status>, Error>;
    fn save_status(&self, status: &Status) -> Result<(), Error>;
    /// Names of every certificate with a status record, sorted.
    fn status_names(&self) -> Result<Vec<String>, Error>;
    /// The CA-limit ledger (`crate::domain::budget`) for the CA at `directory_url`.
    fn read_ledger(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error>;
    fn write_ledger(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error>;
    /// Takes over the certificate stored under `name` by someone else (a
    /// Secret without the agent's label), when there is one: from now on it
    /// is the agent's. `None` when there is nothing to adopt (no such
    /// certificate, or it is the agent's already).
    fn adopt_certificate(
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
    fn remove_certificate(&self, name: &str) -> Result<(), Error> {
        Err(Error::Io {
            context: format!("removing certificate {name}"),
            source: std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this state store does not remove certificates",
            ),
        })
    }
    /// The dns-01 records added and not yet deleted (the dns-01 solver's journal).
    fn read_dns_journal(&self) -> Result<Option<Vec<u8>>, Error>;
    fn write_dns_journal(&self, bytes: &[u8]) -> Result<(), Error>;
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens `dir`, creating it (and `certificates/`) 0700 when missing.
    /// `certificates/` must be a real directory, not a symlink.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io(format!("setting the mode of {}", dir.display())))?;
        let certificates = dir.join("certificates");
        crate::files::create_private_dir(&certificates)?;
        for d in [&dir, &certificates] {
            crate::files::remove_stale_temporaries(d);
        }
        Ok(Self { dir })
    }

    /// Opens `dir` for reading only (the `status` subcommand): never creates.
    pub fn existing(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One account file per directory URL.
    pub fn account_path(&self, directory_url: &str) -> PathBuf {
        self.dir
            .join(format!("account-{}.json", account_id(directory_url)))
    }

    /// One ledger per directory URL, like the account.
    pub fn ledger_path(&self, directory_url: &str) -> PathBuf {
        self.dir
            .join(format!("ledger-{}.json", account_id(directory_url)))
    }

    fn certificate_path(&self, name: &str) -> PathBuf {
        self.dir.join("certificates").join(format!("{name}.json"))
    }

    fn status_path(&self, name: &str) -> PathBuf {
        self.dir
            .join("certificates")
            .join(format!("{name}.status.json"))
    }

    /// The file's bytes, or `None` when it does not exist. A symlink is an
    /// error: the agent never follows one it did not create.
    pub fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, Error> {
        crate::files::read_no_follow(path)
    }

    /// Writes a file holding a private key: 0600, atomically.
    pub fn write_secret(&self, path: &Path, bytes: &[u8]) -> Result<(), Error> {
        write_atomically(path, bytes, 0o600)
    }
}

impl StateStore for Store {
    fn read_account(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        self.read(&self.account_path(directory_url))
    }

    fn write_account(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        self.write_secret(&self.account_path(directory_url), bytes)
    }

    fn forget_account(&self, directory_url: &str) -> Result<(), Error> {
        let path = self.account_path(directory_url);
        let aside = path.with_extension(format!("lost-{}", unix(SystemTime::now())));
        fs::rename(&path, &aside).map_err(io(format!("moving {} aside", path.display())))
    }

    fn load_certificate(&self, name: &str) -> Result<Option<StoredCertificate>, Error> {
        let path = self.certificate_path(name);
        self.read(&path)?
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(json_error(format!("reading {}", path.display())))
            })
            .transpose()
    }

    fn save_certificate(&self, name: &str, cert: &StoredCertificate) -> Result<(), Error> {
        let path = self.certificate_path(name);
        let json = serde_json::to_vec(cert)
            .map_err(json_error(format!("serializing {}", path.display())))?;
        self.write_secret(&path, &json)
    }

    fn load_status(&self, name: &str) -> Result<Option<Status>, Error> {
        let path = self.status_path(name);
        self.read(&path)?
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(json_error(format!("reading {}", path.display())))
            })
            .transpose()
    }

    fn save_status(&self, status: &Status) -> Result<(), Error> {
        let path = self.status_path(&status.name);
        let json = serde_json::to_vec_pretty(status)
            .map_err(json_error(format!("serializing {}", path.display())))?;
        write_atomically(&path, &json, 0o600)
    }

    fn read_ledger(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        self.read(&self.ledger_path(directory_url))
    }

    fn write_ledger(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        write_atomically(&self.ledger_path(directory_url), bytes, 0o600)
    }

    fn read_dns_journal(&self) -> Result<Option<Vec<u8>>, Error> {
        self.read(&self.dir.join("dns-records.json"))
    }

    fn write_dns_journal(&self, bytes: &[u8]) -> Result<(), Error> {
        write_atomically(&self.dir.join("dns-records.json"), bytes, 0o600)
    }

    fn remove_certificate(&self, name: &str) -> Result<(), Error> {
        for path in [self.status_path(name), self.certificate_path(name)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(format!("removing {}", path.display()))(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn status_names(&self) -> Result<Vec<String>, Error> {
        let dir = self.dir.join("certificates");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("listing {}", dir.display()))(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".status.json"))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn directories_0700_and_secrets_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("state")).unwrap();
        assert_eq!(fs::metadata(store.dir()).unwrap().mode() & 0o777, 0o700);
        let cert = StoredCertificate {
            domains: vec!["a.example.com".into()],
            key_type: KeyType::EcdsaP256,
            chain_pem: "chain".into(),
            key_pem: String::from("key").into(),
        };
        store.save_certificate("www", &cert).unwrap();
        let path = store.certificate_path("www");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let back = store.load_certificate("www").unwrap().unwrap();
        assert_eq!(back.key_pem.as_str(), "key");
        assert!(!format!("{back:?}").contains("key\""));
        assert!(store.load_certificate("nope").unwrap().is_none());
    }

    #[test]
    fn status_round_trip_and_listing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        for name in ["b", "a"] {
            store
                .save_status(&Status {
                    name: name.into(),
                    failures: 2,
                    ..Status::default()
                })
                .unwrap();
        }
        assert_eq!(store.status_names().unwrap(), ["a", "b"]);
        assert_eq!(store.load_status("a").unwrap().unwrap().failures, 2);
    }

    #[test]
    fn one_account_file_per_directory() {
        let store = Store::existing("/nonexistent");
        let a = store.account_path("https://a.test/dir");
        let b = store.account_path("https://b.test/dir");
        assert_ne!(a, b);
        assert_eq!(a, store.account_path("https://a.test/dir"));
    }
}
