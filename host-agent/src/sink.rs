//! Where issued certificates go. [`FileSink`] writes, per certificate, an SDS
//! file that Envoy watches (`path_config_source` + `watched_directory`) and
//! plain PEM files for other consumers. A Kubernetes Secret sink implements
//! the same trait later.
//!
//! Every file is replaced atomically (temporary file in the same directory,
//! fsync, rename, fsync of the directory), so Envoy never reads half a file or
//! a key that does not match its chain, and an interrupted write loses nothing.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::Error;

/// The `@type` of an SDS TLS secret.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A certificate ready to install: checked against its key and its domains.
#[derive(Clone)]
pub struct IssuedCertificate {
    /// The configured certificate name; names the SDS secret and the files.
    pub name: String,
    /// Leaf first, then intermediates, PEM.
    pub chain_pem: String,
    /// PKCS#8 PEM. Never logged (no `Debug` that shows it).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("name", &self.name)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A destination for certificates.
pub trait CertificateSink: Send + Sync {
    /// Installs (or replaces) `certificate`; on error the previous one stays.
    fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error>;

    /// True when something is installed for `name` (issued or placeholder).
    fn installed(&self, name: &str) -> bool;

    /// Whether a self-signed placeholder must be installed until the first
    /// certificate arrives (Envoy refuses to start on a missing SDS file).
    fn wants_placeholder(&self) -> bool {
        true
    }

    /// Fails when `name` could not be installed (a Kubernetes Secret of that
    /// name that is not the agent's), checked before an order is placed so no
    /// certificate is issued only to be refused.
    fn check_writable(&self, _name: &str) -> Result<(), Error> {
        Ok(())
    }
}

/// SDS and PEM files in one directory.
#[derive(Debug, Clone)]
pub struct FileSink {
    dir: PathBuf,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Replaces `path` with `contents` atomically, created with `mode`.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A leading dot keeps Envoy's watched_directory from acting on the temporary.
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(format!("creating {}", tmp.display())))?;
        // The mode given to open is masked by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(format!("setting the mode of {}", tmp.display())))?;
        file.write_all(contents)
            .map_err(io(format!("writing {}", tmp.display())))?;
        file.sync_all()
            .map_err(io(format!("syncing {}", tmp.display())))?;
        fs::rename(&tmp, path).map_err(io(format!("renaming into {}", path.display())))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing directory {}", dir.display())))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl FileSink {
    /// Uses `dir`, creating it if missing. The SDS files hold private keys and
    /// are 0600: Envoy must run as the same user as the agent.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(Self { dir })
    }

    /// The SDS file Envoy should watch for `name`.
    pub fn sds_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The directory holding `tls.crt` and `tls.key` for `name`.
    pub fn pem_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The SDS document for `certificate`: a resource list with one TLS secret.
    pub fn sds_document(certificate: &IssuedCertificate) -> String {
        json!({
            "resources": [{
                "@type": SECRET_TYPE,
                "name": certificate.name,
                "tls_certificate": {
                    "certificate_chain": { "inline_string": certificate.chain_pem },
                    "private_key": { "inline_string": certificate.key_pem },
                },
            }]
        })
        .to_string()
    }
}

impl CertificateSink for FileSink {
    fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let pem_dir = self.pem_dir(&certificate.name);
        fs::create_dir_all(&pem_dir).map_err(io(format!("creating {}", pem_dir.display())))?;
        fs::set_permissions(&pem_dir, fs::Permissions::from_mode(0o700))
            .map_err(io(format!("setting the mode of {}", pem_dir.display())))?;
        // Key before chain: a reader that sees the new chain finds its key.
        write_atomically(
            &pem_dir.join("tls.key"),
            certificate.key_pem.as_bytes(),
            0o600,
        )?;
        write_atomically(
            &pem_dir.join("tls.crt"),
            certificate.chain_pem.as_bytes(),
            0o644,
        )?;
        // The SDS file holds the key too: 0600.
        write_atomically(
            &self.sds_path(&certificate.name),
            Self::sds_document(certificate).as_bytes(),
            0o600,
        )
    }

    fn installed(&self, name: &str) -> bool {
        self.sds_path(name).is_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str, serial: u8) -> IssuedCertificate {
        IssuedCertificate {
            name: name.into(),
            chain_pem: format!(
                "-----BEGIN CERTIFICATE-----\nchain{serial}\n-----END CERTIFICATE-----\n"
            ),
            key_pem: format!(
                "-----BEGIN PRIVATE KEY-----\nkey{serial}\n-----END PRIVATE KEY-----\n"
            ),
        }
    }

    /// Temporary files left in `dir`.
    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_sds_and_pem_with_private_modes_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path().join("sds")).unwrap();
        sink.install(&cert("www", 1)).unwrap();
        sink.install(&cert("www", 2)).unwrap();

        let sds: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(sink.sds_path("www")).unwrap()).unwrap();
        let secret = &sds["resources"][0];
        assert_eq!(secret["@type"], SECRET_TYPE);
        assert_eq!(secret["name"], "www");
        assert!(
            secret["tls_certificate"]["certificate_chain"]["inline_string"]
                .as_str()
                .unwrap()
                .contains("chain2")
        );
        assert!(
            secret["tls_certificate"]["private_key"]["inline_string"]
                .as_str()
                .unwrap()
                .contains("key2")
        );
        assert_eq!(mode(&sink.sds_path("www")), 0o600);
        assert_eq!(mode(&sink.pem_dir("www").join("tls.key")), 0o600);
        assert_eq!(mode(&sink.pem_dir("www")), 0o700);
        assert!(
            fs::read_to_string(sink.pem_dir("www").join("tls.crt"))
                .unwrap()
                .contains("chain2")
        );
        let leftovers = leftovers(&dir.path().join("sds"));
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_failed_write_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("www.json");
        write_atomically(&target, b"old", 0o600).unwrap();
        // Renaming onto a directory fails after the temporary was written.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("child"), b"x").unwrap();
        assert!(write_atomically(&blocked, b"new", 0o600).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"old");
        let leftovers = leftovers(dir.path());
        assert!(leftovers.is_empty(), "temporary left behind: {leftovers:?}");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = cert("www", 7);
        assert!(!format!("{c:?}").contains("key7"));
    }
}
