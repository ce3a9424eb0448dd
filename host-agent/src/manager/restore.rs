//! Loading a certificate's state at start (or when it is added): the stored
//! certificate is served again at once, without the network, and the status
//! record brings back the schedule. A read error is an error, never taken for
//! "nothing stored": the caller retries it and orders nothing meanwhile (a
//! Kubernetes API blip at start must not re-issue everything).

use std::sync::Arc;
use tracing::{error, info, warn};

use super::Shared;
use super::entry::{Awaiting, Restored};
use super::trigger::Served;
use crate::Error;
use crate::certificate;
use crate::domain::spec::Certificate;
use crate::ports::sink::IssuedCertificate;
use crate::time::from_unix;

/// Reads what the store has for `spec`, installs a stored certificate that is
/// still good, and a placeholder where the sink needs one.
pub async fn restore(shared: &Shared, spec: &Certificate) -> Result<Restored, Error> {
    let name = &spec.name;
    let now = shared.clock.now();
    // With the opt-in, a Secret someone else wrote (cert-manager's) is taken
    // over and its certificate kept, instead of ordering at once.
    let adopted = if spec.adopt {
        shared.store.adopt_certificate(name, &spec.domains).await?
    } else {
        None
    };
    let stored = match adopted {
        Some(adopted) => Some(adopted),
        None => shared.store.load_certificate(name).await?,
    };
    let status = shared.store.load_status(name).await?;
    let interrupted_order = shared.take_interrupted_order(name).await?.map(from_unix);
    let mut served = None;
    let mut awaiting = None;
    match stored {
        Some(stored) => {
            match certificate::verify(&stored.chain_pem, &stored.key_pem, &[], now) {
                Ok(leaf) => {
                    shared.metrics.set_expiry(name, leaf.not_after);
                    let issued = IssuedCertificate {
                        name: name.clone(),
                        chain_pem: stored.chain_pem.clone(),
                        key_pem: stored.key_pem.clone(),
                    };
                    match shared.sink.install(&issued).await {
                        Ok(()) => {
                            info!(certificate = %name, "serving the stored certificate");
                            served = Some(Arc::new(Served {
                                leaf,
                                key_type: stored.key_type,
                            }));
                        }
                        Err(e) => {
                            // Held and installed again later; never re-ordered for this.
                            error!(certificate = %name, "installing the stored certificate: {e}");
                            awaiting = Some(Awaiting {
                                chain_pem: stored.chain_pem,
                                key_pem: stored.key_pem,
                                leaf,
                                key_type: stored.key_type,
                                stored: true,
                                installed: false,
                                ordered: false,
                            });
                        }
                    }
                }
                Err(e) => warn!(certificate = %name, "stored certificate unusable: {e}"),
            }
        }
        None => info!(certificate = %name, "no stored certificate"),
    }
    if served.is_none() && shared.sink.wants_placeholder() && !shared.sink.installed(name).await {
        install_placeholder(shared, spec).await;
    }
    Ok(Restored {
        served,
        awaiting,
        status,
        interrupted_order,
    })
}

/// Lets Envoy start (and serve the plain-HTTP challenges) before the first
/// certificate exists: it refuses a missing SDS file.
async fn install_placeholder(shared: &Shared, spec: &Certificate) {
    let result = match certificate::placeholder(&spec.domains, spec.key_type) {
        Ok((chain_pem, key_pem)) => {
            shared
                .sink
                .install_placeholder(&IssuedCertificate {
                    name: spec.name.clone(),
                    chain_pem,
                    key_pem: key_pem.into(),
                })
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            info!(certificate = %spec.name, "placeholder installed until the first certificate is issued")
        }
        Err(e) => error!(certificate = %spec.name, "installing a placeholder: {e}"),
    }
}
