//! The ACME account: one per directory URL, registered once and kept.
//!
//! Registering is the one step a restart or a failed write could repeat, so
//! the account key is stored *before* the CA hears of it: the agent generates
//! the key, persists it as pending, then registers with it. A restart that
//! finds a pending key registers with that same key again, and the CA answers
//! with the account it already has (RFC 8555 section 7.3.1), so one key never
//! becomes two accounts. Once registered, the account stays in memory; if
//! persisting its credentials fails, that write is retried before every later
//! use, and nothing registers again.
//!
//! External Account Binding needs the CA's key binding at creation, which the
//! ACME library offers only with a key it generates itself: with EAB the
//! credentials are persisted right after registering (the window between the
//! CA's answer and the write is the one a kill could still hit).

use instant_acme::{Account, AccountCredentials, ExternalAccountKey, Key, NewAccount};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::Error;
use crate::acme::Http;
use crate::config::Acme as AcmeConfig;
use crate::metrics::Metrics;
use crate::nonce_retry;
use crate::store::StateStore;

/// What the store keeps of the account. The directory URL is kept beside the
/// credentials so a changed `acme.directory` never reuses another CA's account.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    #[serde(default)]
    credentials: Option<AccountCredentials>,
    /// A PKCS#8 key (base64) stored before registering with it.
    #[serde(default)]
    pending_key: Option<String>,
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
    pub fn persist_pending(&mut self, config: &AcmeConfig, store: &dyn StateStore) {
        if let Some(bytes) = &self.unpersisted {
            match store.write_account(config.directory_url(), bytes) {
                Ok(()) => {
                    info!("ACME account credentials stored");
                    self.unpersisted = None;
                }
                Err(e) => warn!("storing the ACME account (kept in memory, retried): {e}"),
            }
        }
    }
}

fn pkcs8_base64(der: &PrivatePkcs8KeyDer<'_>) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der.secret_pkcs8_der())
}

fn pkcs8_from_base64(text: &str) -> Option<PrivatePkcs8KeyDer<'static>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .map(PrivatePkcs8KeyDer::from)
}

/// The account for the configured CA: loaded from the store, or registered
/// (see the module comment). A store that cannot be read is an error, never
/// taken for "no account".
pub async fn open(
    config: &AcmeConfig,
    store: &dyn StateStore,
    http: &Http,
    metrics: &Metrics,
) -> Result<HeldAccount, Error> {
    let directory = config.directory_url().to_owned();
    let stored = store
        .read_account(&directory)?
        .map(|bytes| {
            serde_json::from_slice::<StoredAccount>(&bytes).map_err(encoding(format!(
                "reading the stored account for {directory}"
            )))
        })
        .transpose()?;
    if let Some(StoredAccount {
        credentials: Some(credentials),
        ..
    }) = stored
    {
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
    if let Some(eab) = &config.eab {
        return register_with_eab(config, eab, store, http, metrics).await;
    }
    let pending = stored.as_ref().and_then(|s| s.pending_key.as_deref());
    let (key_der, resumed) = match pending.and_then(pkcs8_from_base64) {
        Some(der) => (der, true),
        None => {
            let (_, der) =
                Key::generate_pkcs8().map_err(Error::acme("generating the account key"))?;
            let record = StoredAccount {
                directory: directory.clone(),
                credentials: None,
                pending_key: Some(pkcs8_base64(&der)),
            };
            let json = serde_json::to_vec_pretty(&record)
                .map_err(encoding("serializing the account key"))?;
            // No registration without a stored key: else a restart could not
            // find the account again.
            store.write_account(&directory, &json)?;
            (der, false)
        }
    };
    let (account, credentials) = nonce_retry!("registering the ACME account", async {
        let key = Key::from_pkcs8_der(key_der.clone_key())?;
        Account::builder_with_http(Box::new(http.clone()))
            .create_from_key(
                (key, PrivateKeyDer::Pkcs8(key_der.clone_key())),
                directory.clone(),
            )
            .await
    })?;
    if let Some(email) = &config.email {
        let contact = format!("mailto:{email}");
        if let Err(e) = nonce_retry!(
            "setting the account's contact",
            account.update_contacts(&[contact.as_str()])
        ) {
            warn!("{e}");
        }
    }
    if resumed {
        info!(
            account = account.id(),
            "ACME account registered with the stored key"
        );
    } else {
        metrics.account_registered();
        info!(account = account.id(), "ACME account registered");
    }
    Ok(keep(account, credentials, config, store))
}

async fn register_with_eab(
    config: &AcmeConfig,
    eab: &crate::config::Eab,
    store: &dyn StateStore,
    http: &Http,
    metrics: &Metrics,
) -> Result<HeldAccount, Error> {
    let directory = config.directory_url().to_owned();
    let hmac = crate::config::decode_base64url(&eab.hmac_key).ok_or_else(|| Error::Config {
        path: "(config)".into(),
        field: "acme.eab.hmac_key".into(),
        reason: "must be base64url".into(),
    })?;
    let eab = ExternalAccountKey::new(eab.key_id.clone(), &hmac);
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
            Some(&eab)
        )
    )?;
    metrics.account_registered();
    info!(account = account.id(), "ACME account registered (EAB)");
    Ok(keep(account, credentials, config, store))
}

/// Persists the new account's credentials; on failure keeps them to retry.
fn keep(
    account: Account,
    credentials: AccountCredentials,
    config: &AcmeConfig,
    store: &dyn StateStore,
) -> HeldAccount {
    let record = StoredAccount {
        directory: config.directory_url().to_owned(),
        credentials: Some(credentials),
        pending_key: None,
    };
    let mut held = HeldAccount {
        account,
        unpersisted: None,
    };
    match serde_json::to_vec_pretty(&record) {
        Ok(json) => {
            held.unpersisted = Some(json);
            held.persist_pending(config, store);
        }
        Err(e) => warn!("serializing the account: {e}"),
    }
    held
}

/// Sets the stored account aside after the CA said it does not know it (a
/// reset test CA, a deactivated account): the next order registers anew, and
/// the old credentials stay in the store for the operator.
pub fn forget(config: &AcmeConfig, store: &dyn StateStore) -> Result<(), Error> {
    store.forget_account(config.directory_url())?;
    warn!(
        "the CA does not know the stored account; registering a new one (the old one is kept aside)"
    );
    Ok(())
}
