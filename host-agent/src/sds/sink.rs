//! The sink that installs certificates into the served secret set.

use std::sync::Arc;

use crate::Error;
use crate::ports::secrets::SecretSet;
use crate::ports::sink::{CertificateSink, IssuedCertificate};

/// A sink that hands certificates to the SDS server.
pub struct SdsSink {
    set: Arc<SecretSet>,
}

impl SdsSink {
    pub fn new(set: Arc<SecretSet>) -> Self {
        Self { set }
    }
}

#[async_trait::async_trait]
impl CertificateSink for SdsSink {
    async fn install(&self, certificate: &IssuedCertificate) -> Result<(), Error> {
        let leaf = crate::certificate::leaf(&certificate.chain_pem)?;
        let names: Vec<String> = leaf.names.into_iter().collect();
        self.set.set(
            &certificate.name,
            &names,
            &certificate.chain_pem,
            &certificate.key_pem,
        );
        Ok(())
    }

    async fn installed(&self, name: &str) -> bool {
        self.set.contains(name)
    }

    /// Every stream subscribed to its names is told they are removed.
    async fn remove(&self, name: &str) -> Result<(), Error> {
        self.set.remove(name);
        Ok(())
    }

    /// A name not served yet is answered as removed: Envoy needs no file.
    fn wants_placeholder(&self) -> bool {
        false
    }
}
