//! The ACME issuer: `ports::issuer::Issuer` on instant-acme. It holds the
//! account (opened or registered on first use, set aside when the CA no
//! longer knows it), asks for renewal info, and runs each order
//! (`order.rs`) with the CA's `Retry-After` captured for that order alone.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::CertificateIdentifier;
use tokio::sync::Mutex;
use tracing::warn;

use crate::Error;
use crate::acme::account::{self, HeldAccount};
use crate::acme::order::{self, OrderContext};
use crate::acme::{Http, capturing_retry_after};
use crate::certificate::Leaf;
use crate::config::Acme as AcmeConfig;
use crate::domain::spec::Certificate;
use crate::metrics::Metrics;
use crate::ports::issuer::{Failure, Issued, Issuer, OrderRequest, RenewalWindow};
use crate::ports::store::StateStore;
use crate::time::Clock;

pub struct AcmeIssuer {
    config: AcmeConfig,
    store: Arc<dyn StateStore>,
    http: Http,
    metrics: Arc<Metrics>,
    account: Mutex<Option<HeldAccount>>,
    /// When opening the account last found the CA unreachable, and why:
    /// every job waiting for the account gets that answer until
    /// [`UNREACHABLE_FOR`] has passed, instead of each trying the CA in
    /// turn (100,000 looks at a start with the CA down were 100,000
    /// connection attempts, one after another behind the lock).
    unreachable: std::sync::Mutex<Option<(SystemTime, String)>>,
    /// What an issued certificate's validity is checked against.
    clock: Clock,
}

/// How long a failure to reach the CA while opening the account stands for
/// every caller: long enough for the jobs queued behind the attempt to take
/// its answer, short enough that a CA back up is asked again within the
/// shortest retry backoff anyone configures.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

impl AcmeIssuer {
    /// The CA of `config` (its directory, account and EAB); the account is
    /// opened on first use.
    pub fn new(
        config: &AcmeConfig,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        Ok(Self {
            config: config.clone(),
            http: Http::new(config.ca_root.as_deref(), Arc::clone(&metrics))?,
            store,
            metrics,
            account: Mutex::new(None),
            unreachable: std::sync::Mutex::new(None),
            clock: Clock::system(),
        })
    }

    /// The account, opened (or registered) on first use; credentials that
    /// could not be written before are written first.
    async fn account(&self) -> Result<instant_acme::Account, Error> {
        let mut slot = self.account.lock().await;
        if let Some(held) = slot.as_mut() {
            held.persist_pending(&self.config, self.store.as_ref())
                .await;
            return Ok(held.account.clone());
        }
        if let Some(error) = self.recently_unreachable() {
            return Err(error);
        }
        let opened =
            account::open(&self.config, self.store.as_ref(), &self.http, &self.metrics).await;
        let held = opened.inspect_err(|e| {
            if matches!(e.kind(), "transport" | "timeout") {
                *self.unreachable_slot() = Some((self.clock.now(), e.to_string()));
            }
        })?;
        let account = held.account.clone();
        *slot = Some(held);
        Ok(account)
    }

    fn unreachable_slot(&self) -> std::sync::MutexGuard<'_, Option<(SystemTime, String)>> {
        self.unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The CA found unreachable less than [`UNREACHABLE_FOR`] ago, as an
    /// error of the same kind.
    fn recently_unreachable(&self) -> Option<Error> {
        let slot = self.unreachable_slot();
        let (at, why) = slot.as_ref()?;
        let age = self.clock.now().duration_since(*at).unwrap_or_default();
        (age < UNREACHABLE_FOR).then(|| Error::Ca {
            failure: crate::error::CaFailure::Unreachable,
            detail: format!(
                "{why} ({} s ago; the CA is asked again {} s after)",
                age.as_secs(),
                UNREACHABLE_FOR.as_secs()
            ),
        })
    }
}

#[async_trait::async_trait]
impl Issuer for AcmeIssuer {
    async fn open(&self) -> Result<(), Error> {
        self.account().await.map(|_| ())
    }

    async fn check(&self, spec: &Certificate) -> Result<(), Error> {
        order::check_profile(&self.account().await?, spec)
    }

    async fn renewal_info(&self, leaf: &Leaf) -> Result<Option<RenewalWindow>, Error> {
        let Some((aki, serial)) = leaf.ari_id.as_deref().and_then(|id| id.split_once('.')) else {
            return Ok(None);
        };
        let cert_id = CertificateIdentifier {
            authority_key_identifier: aki.into(),
            serial: serial.into(),
        };
        match self.account().await?.renewal_info(&cert_id).await {
            Err(instant_acme::Error::Unsupported(_)) => Ok(None),
            Err(e) => Err(Error::acme("fetching renewal info")(e)),
            Ok((info, retry_after)) => Ok(Some(RenewalWindow {
                start: info.suggested_window.start.into(),
                end: info.suggested_window.end.into(),
                retry_after,
            })),
        }
    }

    async fn issue(&self, request: OrderRequest<'_>) -> Result<Issued, Failure> {
        let account = self.account().await?;
        let cx = OrderContext {
            account: &account,
            solvers: request.solvers,
            trigger: request.trigger,
            clock: self.clock,
        };
        let (result, retry_after) =
            capturing_retry_after(order::issue(&cx, request.spec, request.replaces)).await;
        let Err(mut failure) = result else {
            return result;
        };
        failure.retry_after = failure
            .retry_after
            .or(retry_after)
            .or(failure.error.retry_after());
        if failure.error.kind() == "accountDoesNotExist" {
            // Opened (or registered) anew for the next order.
            *self.account.lock().await = None;
            if let Err(forget) = account::forget(&self.config, self.store.as_ref()).await {
                warn!("{forget}");
            }
        }
        Err(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::store::FileStore;

    /// A CA that refuses connections: the first caller tries it, the next
    /// ones within [`UNREACHABLE_FOR`] get that answer without trying.
    #[tokio::test]
    async fn an_unreachable_ca_is_tried_once_for_every_waiting_caller() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "state_dir = {:?}\nsds_dir = {:?}\n[acme]\ndirectory = \"https://127.0.0.1:9/directory\"\n",
            dir.path(),
            dir.path().join("sds")
        );
        let config =
            crate::config::Config::parse(&text, std::path::Path::new("agent.toml")).unwrap();
        let store: Arc<dyn StateStore> = Arc::new(FileStore::open(dir.path()).unwrap());
        let issuer = AcmeIssuer::new(&config.acme, store, Arc::new(Metrics::new())).unwrap();
        let first = issuer.open().await.unwrap_err();
        assert_eq!(first.kind(), "transport", "{first}");
        assert!(!matches!(first, Error::Ca { .. }), "{first}");
        let second = issuer.open().await.unwrap_err();
        assert!(
            matches!(
                second,
                Error::Ca {
                    failure: crate::error::CaFailure::Unreachable,
                    ..
                }
            ),
            "{second}"
        );
        assert_eq!(second.kind(), "transport");
        assert!(second.to_string().contains("asked again 5 s after"));
    }
}
