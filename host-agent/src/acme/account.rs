//! The ACME account: one per directory URL, registered once and kept.
//!
//! Registering is the one step a failed write could repeat, so a registered
//! account stays in memory from the CA's answer on: if persisting its
//! credentials fails, that write is retried before every later use, and
//! nothing registers again. The credentials are written the moment the CA
//! answers; only a kill inside that write (milliseconds) can leave an account
//! at the CA that the agent does not know, which costs one of the CA's
//! registrations and nothing else. (Storing a key before registering with it
//! would close even that window, but the ACME library registers a caller's
//! key only without contact and EAB, which CAs such as acme2certifier and
//! ZeroSSL refuse.)

use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::Error;
use crate::acme::Http;
use crate::config::Acme as AcmeConfig;
use crate::metrics::Metrics;
use crate::nonce_retry;
use crate::ports::store::StateStore;

/// What the store keeps of the account. The directory URL is kept beside the
/// credentials so a changed `acme.directory` never reuses another CA's account.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

fn encoding(context: impl Into<String>) -> impl FnOnce(serde_json::Error) -> Error {
    let context = context.into();
    move |e| Error::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

/// The account in use, and its credentials while they are not persisted yet.
pub struct HeldAccount {
    pub account: Account,
    unpersisted: Option<Vec<u8>>,
}

impl HeldAccount {
    /// Writes credentials that could not be written before; an error leaves
    /// them held for the next try.
    pub async fn persist_pending(&mut self, config: &AcmeConfig, store: &dyn StateStore) {
        if let Some(bytes) = &self.unpersisted {
            match store.write_account(config.directory_url(), bytes).await {
                Ok(()) => {
                    info!("ACME account credentials stored");
                    self.unpersisted = None;
                }
                Err(e) => warn!("storing the ACME account (kept in memory, retried): {e}"),
            }
        }
    }
}

/// The account for the configured CA: loaded from the store, or registered
/// and stored. A store that cannot be read is an error, never taken for "no
/// account" (which would register another).
pub async fn open(
    config: &AcmeConfig,
    store: &dyn StateStore,
    http: &Http,
    metrics: &Metrics,
) -> Result<HeldAccount, Error> {
    let directory = config.directory_url().to_owned();
    let stored = store
        .read_account(&directory)
        .await?
        .map(|bytes| {
            serde_json::from_slice::<StoredAccount>(&bytes).map_err(encoding(format!(
                "reading the stored account for {directory}"
            )))
        })
        .transpose()?;
    if let Some(StoredAccount { credentials, .. }) = stored {
        let account = Account::builder_with_http(Box::new(http.clone()))
            .from_credentials(credentials)
            .await
            .map_err(Error::acme(format!(
                "loading the ACME directory {directory}"
            )))?;
        info!(account = account.id(), "ACME account loaded");
        return Ok(HeldAccount {
            account,
            unpersisted: None,
        });
    }
    let eab = match &config.eab {
        Some(eab) => Some(ExternalAccountKey::new(
            eab.key_id.clone(),
            &crate::config::decode_base64url(&eab.hmac_key).ok_or_else(|| Error::Config {
                path: "(config)".into(),
                field: "acme.eab.hmac_key".into(),
                reason: "must be base64url".into(),
            })?,
        )),
        None => None,
    };
    let contact = config.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new_account = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let (account, credentials) = nonce_retry!(
        "registering the ACME account",
        Account::builder_with_http(Box::new(http.clone())).create(
            &new_account,
            directory.clone(),
            eab.as_ref()
        )
    )?;
    let held = keep(account, credentials, config, store).await;
    metrics.account_registered();
    info!(account = held.account.id(), "ACME account registered");
    Ok(held)
}

/// Persists the new account's credentials; on failure keeps them to retry.
async fn keep(
    account: Account,
    credentials: AccountCredentials,
    config: &AcmeConfig,
    store: &dyn StateStore,
) -> HeldAccount {
    let record = StoredAccount {
        directory: config.directory_url().to_owned(),
        credentials,
    };
    let mut held = HeldAccount {
        account,
        unpersisted: None,
    };
    match serde_json::to_vec_pretty(&record) {
        Ok(json) => {
            held.unpersisted = Some(json);
            held.persist_pending(config, store).await;
        }
        Err(e) => warn!("serializing the account: {e}"),
    }
    held
}

/// Sets the stored account aside after the CA said it does not know it (a
/// reset test CA, a deactivated account): the next order registers anew, and
/// the old credentials stay in the store for the operator.
pub async fn forget(config: &AcmeConfig, store: &dyn StateStore) -> Result<(), Error> {
    store.forget_account(config.directory_url()).await?;
    warn!(
        "the CA does not know the stored account; registering a new one (the old one is kept aside)"
    );
    Ok(())
}
