//! The state store in a directory: 0700, every file replaced atomically
//! (`crate::files`), no symlink followed.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::off_runtime;
use crate::Error;
use crate::files::write_atomically;
use crate::ports::store::{StateStore, Status, StoredCertificate, account_id};
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

#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// Reads and writes on the calling thread instead of the blocking pool
    /// ([`FileStore::on_the_calling_thread`]).
    inline: bool,
    /// The ledger journal open for appending, kept open between changes
    /// (an open and a close less per change); closed when a snapshot
    /// replaces it or an append fails.
    journal: Arc<Mutex<Option<(PathBuf, File)>>>,
}

impl FileStore {
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
        Ok(Self {
            dir,
            inline: false,
            journal: Arc::default(),
        })
    }

    /// Reads and writes on the calling thread, for a simulation on tmpfs
    /// (`host-agent/tests/year.rs`): there a write takes microseconds and
    /// handing it to the blocking pool and back costs more than the write,
    /// millions of times over. The agent never does this: it would hold up
    /// a runtime worker for as long as a busy disk takes to fsync.
    #[must_use]
    pub fn on_the_calling_thread(mut self) -> Self {
        self.inline = true;
        self
    }

    /// `f` on the blocking pool ([`super::off_runtime`]), or here when inline.
    async fn off_runtime<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        if self.inline {
            f()
        } else {
            off_runtime(what, f).await
        }
    }

    /// Opens `dir` for reading only (the `status` subcommand): never creates.
    pub fn existing(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            inline: false,
            journal: Arc::default(),
        }
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

    /// The ledger's journal, beside its snapshot.
    pub fn ledger_journal_path(&self, directory_url: &str) -> PathBuf {
        self.dir
            .join(format!("ledger-{}.journal", account_id(directory_url)))
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

#[async_trait::async_trait]
impl StateStore for FileStore {
    async fn read_account(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        let url = directory_url.to_owned();
        let s = self.clone();
        self.off_runtime("reading the ACME account", move || s.read_account_now(&url))
            .await
    }

    async fn write_account(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        let (url, bytes) = (directory_url.to_owned(), bytes.to_vec());
        let s = self.clone();
        self.off_runtime("writing the ACME account", move || {
            s.write_account_now(&url, &bytes)
        })
        .await
    }

    async fn forget_account(&self, directory_url: &str) -> Result<(), Error> {
        let url = directory_url.to_owned();
        let s = self.clone();
        self.off_runtime("setting the ACME account aside", move || {
            s.forget_account_now(&url)
        })
        .await
    }

    async fn load_certificate(&self, name: &str) -> Result<Option<StoredCertificate>, Error> {
        let name = name.to_owned();
        let s = self.clone();
        self.off_runtime("reading a certificate", move || {
            s.load_certificate_now(&name)
        })
        .await
    }

    async fn save_certificate(&self, name: &str, cert: &StoredCertificate) -> Result<(), Error> {
        let (name, cert) = (name.to_owned(), cert.clone());
        let s = self.clone();
        self.off_runtime("writing a certificate", move || {
            s.save_certificate_now(&name, &cert)
        })
        .await
    }

    async fn load_status(&self, name: &str) -> Result<Option<Status>, Error> {
        let name = name.to_owned();
        let s = self.clone();
        self.off_runtime("reading a status", move || s.load_status_now(&name))
            .await
    }

    async fn save_status(&self, status: &Status) -> Result<(), Error> {
        let status = status.clone();
        let s = self.clone();
        self.off_runtime("writing a status", move || s.save_status_now(&status))
            .await
    }

    async fn read_ledger(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        let url = directory_url.to_owned();
        let s = self.clone();
        self.off_runtime("reading the CA-limit ledger", move || {
            s.read_ledger_now(&url)
        })
        .await
    }

    async fn write_ledger(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        let (url, bytes) = (directory_url.to_owned(), bytes.to_vec());
        let s = self.clone();
        self.off_runtime("writing the CA-limit ledger", move || {
            s.write_ledger_now(&url, &bytes)
        })
        .await
    }

    async fn read_ledger_journal(&self, directory_url: &str) -> Result<Vec<u8>, Error> {
        let path = self.ledger_journal_path(directory_url);
        let s = self.clone();
        self.off_runtime("reading the CA-limit ledger's journal", move || {
            Ok(s.read(&path)?.unwrap_or_default())
        })
        .await
    }

    async fn append_ledger(&self, directory_url: &str, line: &[u8]) -> Result<bool, Error> {
        let (path, line) = (self.ledger_journal_path(directory_url), line.to_vec());
        let s = self.clone();
        self.off_runtime("appending to the CA-limit ledger's journal", move || {
            s.append_ledger_now(&path, &line)
        })
        .await?;
        Ok(true)
    }

    async fn read_dns_journal(&self) -> Result<Option<Vec<u8>>, Error> {
        let s = self.clone();
        self.off_runtime("reading the DNS record journal", move || {
            s.read_dns_journal_now()
        })
        .await
    }

    async fn write_dns_journal(&self, bytes: &[u8]) -> Result<(), Error> {
        let bytes = bytes.to_vec();
        let s = self.clone();
        self.off_runtime("writing the DNS record journal", move || {
            s.write_dns_journal_now(&bytes)
        })
        .await
    }

    async fn remove_certificate(&self, name: &str) -> Result<(), Error> {
        let name = name.to_owned();
        let s = self.clone();
        self.off_runtime("removing a certificate", move || {
            s.remove_certificate_now(&name)
        })
        .await
    }

    async fn status_names(&self) -> Result<Vec<String>, Error> {
        let s = self.clone();
        self.off_runtime("listing the status records", move || s.status_names_now())
            .await
    }
}

/// The store's operations as the blocking pool runs them (see
/// [`super::off_runtime`]).
impl FileStore {
    fn read_account_now(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        self.read(&self.account_path(directory_url))
    }

    fn write_account_now(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        self.write_secret(&self.account_path(directory_url), bytes)
    }

    fn forget_account_now(&self, directory_url: &str) -> Result<(), Error> {
        let path = self.account_path(directory_url);
        let aside = path.with_extension(format!("lost-{}", unix(SystemTime::now())));
        fs::rename(&path, &aside).map_err(io(format!("moving {} aside", path.display())))
    }

    fn load_certificate_now(&self, name: &str) -> Result<Option<StoredCertificate>, Error> {
        let path = self.certificate_path(name);
        self.read(&path)?
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(json_error(format!("reading {}", path.display())))
            })
            .transpose()
    }

    fn save_certificate_now(&self, name: &str, cert: &StoredCertificate) -> Result<(), Error> {
        let path = self.certificate_path(name);
        let json = serde_json::to_vec(cert)
            .map_err(json_error(format!("serializing {}", path.display())))?;
        self.write_secret(&path, &json)
    }

    fn load_status_now(&self, name: &str) -> Result<Option<Status>, Error> {
        let path = self.status_path(name);
        self.read(&path)?
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(json_error(format!("reading {}", path.display())))
            })
            .transpose()
    }

    fn save_status_now(&self, status: &Status) -> Result<(), Error> {
        let path = self.status_path(&status.name);
        let json = serde_json::to_vec_pretty(status)
            .map_err(json_error(format!("serializing {}", path.display())))?;
        write_atomically(&path, &json, 0o600)
    }

    fn read_ledger_now(&self, directory_url: &str) -> Result<Option<Vec<u8>>, Error> {
        self.read(&self.ledger_path(directory_url))
    }

    fn append_ledger_now(&self, path: &Path, line: &[u8]) -> Result<(), Error> {
        let mut open = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        let file = match open.take() {
            Some((p, file)) if p == path => file,
            _ => crate::files::open_for_appending(path, 0o600)?,
        };
        crate::files::append_durably(&file, path, line)?;
        *open = Some((path.to_owned(), file));
        Ok(())
    }

    /// The snapshot, then the journal it makes old removed (left behind by
    /// a stop in between, its lines are of an older generation: skipped).
    fn write_ledger_now(&self, directory_url: &str, bytes: &[u8]) -> Result<(), Error> {
        write_atomically(&self.ledger_path(directory_url), bytes, 0o600)?;
        let journal = self.ledger_journal_path(directory_url);
        let mut open = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        *open = None;
        match fs::remove_file(&journal) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("removing {}", journal.display()))(e))
            }
            _ => Ok(()),
        }
    }

    fn read_dns_journal_now(&self) -> Result<Option<Vec<u8>>, Error> {
        self.read(&self.dir.join("dns-records.json"))
    }

    fn write_dns_journal_now(&self, bytes: &[u8]) -> Result<(), Error> {
        write_atomically(&self.dir.join("dns-records.json"), bytes, 0o600)
    }

    fn remove_certificate_now(&self, name: &str) -> Result<(), Error> {
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

    fn status_names_now(&self) -> Result<Vec<String>, Error> {
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
    use crate::domain::spec::KeyType;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn the_ledger_journal_appends_until_a_snapshot_replaces_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path().join("state")).unwrap();
        let url = "https://ca.test/dir";
        assert!(store.read_ledger_journal(url).await.unwrap().is_empty());
        assert!(store.append_ledger(url, b"one\n").await.unwrap());
        assert!(store.append_ledger(url, b"two\n").await.unwrap());
        let path = store.ledger_journal_path(url);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // Another store on the directory (a restart) reads both lines.
        let again = FileStore::open(store.dir()).unwrap();
        assert_eq!(again.read_ledger_journal(url).await.unwrap(), b"one\ntwo\n");
        store.write_ledger(url, b"{}").await.unwrap();
        assert!(!path.exists(), "the snapshot replaces the journal");
        assert!(store.append_ledger(url, b"three\n").await.unwrap());
        assert_eq!(again.read_ledger_journal(url).await.unwrap(), b"three\n");
        assert_eq!(again.read_ledger(url).await.unwrap().unwrap(), b"{}");
    }

    #[tokio::test]
    async fn directories_0700_and_secrets_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path().join("state")).unwrap();
        assert_eq!(fs::metadata(store.dir()).unwrap().mode() & 0o777, 0o700);
        let cert = StoredCertificate {
            domains: vec!["a.example.com".into()],
            key_type: KeyType::EcdsaP256,
            chain_pem: "chain".into(),
            key_pem: String::from("key").into(),
        };
        store.save_certificate("www", &cert).await.unwrap();
        let path = store.certificate_path("www");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let back = store.load_certificate("www").await.unwrap().unwrap();
        assert_eq!(back.key_pem.as_str(), "key");
        assert!(!format!("{back:?}").contains("key\""));
        assert!(store.load_certificate("nope").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn status_round_trip_and_listing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        for name in ["b", "a"] {
            store
                .save_status(&Status {
                    name: name.into(),
                    failures: 2,
                    ..Status::default()
                })
                .await
                .unwrap();
        }
        assert_eq!(store.status_names().await.unwrap(), ["a", "b"]);
        assert_eq!(store.load_status("a").await.unwrap().unwrap().failures, 2);
    }

    #[test]
    fn one_account_file_per_directory() {
        let store = FileStore::existing("/nonexistent");
        let a = store.account_path("https://a.test/dir");
        let b = store.account_path("https://b.test/dir");
        assert_ne!(a, b);
        assert_eq!(a, store.account_path("https://a.test/dir"));
    }
}
