//! The ACME issuer: `ports::issuer::Issuer` on instant-acme. It holds the
//! account (opened or registered on first use, set aside when the CA no
//! longer knows it), asks for renewal info, and runs each order
//! (`order.rs`) with the CA's `Retry-After` captured for that order alone.

use std::sync::Arc;

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
    /// What an issued certificate's validity is checked against.
    clock: Clock,
}

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
        let held =
            account::open(&self.config, self.store.as_ref(), &self.http, &self.metrics).await?;
        let account = held.account.clone();
        *slot = Some(held);
        Ok(account)
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
