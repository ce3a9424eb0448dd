//! Where issued certificates go: [`CertificateSink`] is the interface, with
//! [`Sinks`] to deliver to several at once. The adapters: SDS files and PEM
//! (`crate::disk::sink`), the agent's SDS server (`crate::sds`), Kubernetes
//! Secrets (`crate::kubernetes`).

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
    pub key_pem: crate::domain::spec::KeyPem,
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
#[async_trait::async_trait]
pub trait CertificateSink: Send + Sync {
    /// Installs (or replaces) `certificate`; on error the previous one stays.
    async fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error>;

    /// True when something is installed for `name` (issued or placeholder).
    async fn installed(&self, name: &str) -> bool;

    /// Whether a self-signed placeholder must be installed until the first
    /// certificate arrives (Envoy refuses to start on a missing SDS file).
    fn wants_placeholder(&self) -> bool {
        true
    }

    /// Installs a self-signed stand-in where [`wants_placeholder`] (a sink
    /// that answers "no such certificate" by itself ignores it).
    ///
    /// [`wants_placeholder`]: CertificateSink::wants_placeholder
    async fn install_placeholder(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        if self.wants_placeholder() {
            self.install(certificate).await
        } else {
            Ok(())
        }
    }

    /// Fails when `name` could not be installed (a Kubernetes Secret of that
    /// name that is not the agent's), checked before an order is placed so no
    /// certificate is issued only to be refused.
    async fn check_writable(&self, _name: &str) -> Result<(), Error> {
        Ok(())
    }

    /// Stops serving `name` and deletes what was installed for it (an
    /// on-demand certificate withdrawn or removed). Sinks that never hold
    /// on-demand certificates (Kubernetes) keep the default.
    async fn remove(&self, _name: &str) -> Result<(), Error> {
        Ok(())
    }
}

/// Several sinks at once (SDS files and the SDS server, say): each gets every
/// certificate; a failure of one is reported after the others were tried.
pub struct Sinks(pub Vec<std::sync::Arc<dyn CertificateSink>>);

#[async_trait::async_trait]
impl CertificateSink for Sinks {
    async fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let mut first_error = None;
        for sink in &self.0 {
            if let Err(e) = sink.install(certificate).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn installed(&self, name: &str) -> bool {
        for sink in &self.0 {
            if !sink.installed(name).await {
                return false;
            }
        }
        true
    }

    fn wants_placeholder(&self) -> bool {
        self.0.iter().any(|s| s.wants_placeholder())
    }

    async fn install_placeholder(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        for sink in &self.0 {
            sink.install_placeholder(certificate).await?;
        }
        Ok(())
    }

    async fn check_writable(&self, name: &str) -> Result<(), Error> {
        for sink in &self.0 {
            sink.check_writable(name).await?;
        }
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<(), Error> {
        let mut first_error = None;
        for sink in &self.0 {
            if let Err(e) = sink.remove(name).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
