//! Certificates as files: per certificate, an SDS file that Envoy watches
//! (`path_config_source` + `watched_directory`) and plain PEM files for
//! other consumers.
//!
//! Every file is replaced atomically (`crate::files`), so Envoy never reads
//! half a file or a key that does not match its chain, and an interrupted
//! write loses nothing.

use std::fs;
use std::path::PathBuf;

use serde_json::json;

use super::off_runtime;
use crate::Error;
use crate::files::{create_private_dir, write_atomically};
use crate::ports::sink::{CertificateSink, IssuedCertificate, SECRET_TYPE};

/// SDS and PEM files in one directory.
#[derive(Debug, Clone)]
pub struct FileSink {
    dir: PathBuf,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

impl FileSink {
    /// Uses `dir`, creating it if missing. The SDS files hold private keys and
    /// are 0600: Envoy must run as the same user as the agent.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, Error> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        // What a killed agent left: its temporaries, here and in each
        // certificate's directory (symlinks are not followed).
        crate::files::remove_stale_temporaries(&dir);
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    crate::files::remove_stale_temporaries(&entry.path());
                }
            }
        }
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

#[async_trait::async_trait]
impl CertificateSink for FileSink {
    async fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let (sink, certificate) = (self.clone(), certificate.clone());
        off_runtime("installing a certificate", move || {
            sink.install_now(&certificate)
        })
        .await
    }

    async fn installed(&self, name: &str) -> bool {
        let (sink, name) = (self.clone(), name.to_owned());
        off_runtime("looking for a certificate", move || {
            Ok(sink.installed_now(&name))
        })
        .await
        .unwrap_or(false)
    }

    async fn check_writable(&self, _name: &str) -> Result<(), Error> {
        let sink = self.clone();
        off_runtime("probing the SDS directory", move || {
            sink.check_writable_now()
        })
        .await
    }

    async fn remove(&self, name: &str) -> Result<(), Error> {
        let (sink, name) = (self.clone(), name.to_owned());
        off_runtime("removing a certificate", move || sink.remove_now(&name)).await
    }
}

/// The sink's operations as the blocking pool runs them (see
/// [`super::off_runtime`]).
impl FileSink {
    fn install_now(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let pem_dir = self.pem_dir(&certificate.name);
        create_private_dir(&pem_dir)?;
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

    fn installed_now(&self, name: &str) -> bool {
        fs::symlink_metadata(self.sds_path(name)).is_ok_and(|m| m.is_file())
    }

    /// A file can be created in the directory (a read-only or full `sds_dir`
    /// is found before an order, not after).
    fn check_writable_now(&self) -> Result<(), Error> {
        crate::files::probe_writable(&self.dir)
    }

    /// The SDS file first (what Envoy watches), then the PEM files.
    fn remove_now(&self, name: &str) -> Result<(), Error> {
        let pem_dir = self.pem_dir(name);
        for path in [
            self.sds_path(name),
            pem_dir.join("tls.key"),
            pem_dir.join("tls.crt"),
        ] {
            remove_if_there(&path)?;
        }
        match fs::remove_dir(&pem_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("removing {}", pem_dir.display()))(e))
            }
            _ => Ok(()),
        }
    }
}

/// Deletes `path`; a file already gone is no error.
fn remove_if_there(path: &std::path::Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn cert(name: &str, serial: u8) -> IssuedCertificate {
        IssuedCertificate {
            name: name.into(),
            chain_pem: format!(
                "-----BEGIN CERTIFICATE-----\nchain{serial}\n-----END CERTIFICATE-----\n"
            ),
            key_pem: format!(
                "-----BEGIN PRIVATE KEY-----\nkey{serial}\n-----END PRIVATE KEY-----\n"
            )
            .into(),
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

    #[tokio::test]
    async fn writes_sds_and_pem_with_private_modes_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path().join("sds")).unwrap();
        sink.install(&cert("www", 1)).await.unwrap();
        sink.install(&cert("www", 2)).await.unwrap();

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

    #[tokio::test]
    async fn a_symlinked_certificate_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path().join("sds")).unwrap();
        std::os::unix::fs::symlink(outside.path(), sink.pem_dir("www")).unwrap();
        let err = sink.install(&cert("www", 1)).await.unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let c = cert("www", 7);
        assert!(!format!("{c:?}").contains("key7"));
    }
}
