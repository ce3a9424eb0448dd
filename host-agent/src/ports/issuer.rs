//! The issuer seam: what the certificate manager needs from a CA, and
//! nothing of how it is asked (certmagic's `Issuer` interface, go-acme/lego's
//! `certificate` package). The ACME adapter (`acme::AcmeIssuer`, on
//! instant-acme) is the one production issuer; several issuers with a
//! fallback between them go behind this trait too, and a simulation puts a
//! simulated CA here.
//!
//! The manager decides when to order and keeps the CA-limit ledger; the
//! issuer only does what it is asked: open the account, say the renewal
//! window, order one certificate and hand back the chain and its key, or a
//! typed failure saying how far the order got.

use std::time::{Duration, SystemTime};

use crate::Error;
use crate::certificate::Leaf;
use crate::domain::spec::{Certificate, KeyPem};
use crate::ports::solver::Solvers;

/// An issued, checked certificate with its fresh key.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: KeyPem,
    pub leaf: Leaf,
}

/// Why an order failed, and how far it got (for the CA-limit ledger).
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    /// Finalize was sent: the CA may have issued a certificate.
    pub finalized: bool,
    /// Names whose authorization was seen valid after the failure: of the
    /// names handed to the CA, only these did not fail.
    pub valid_names: Vec<String>,
    /// How long the CA asked to wait (`Retry-After`), when it said.
    pub retry_after: Option<Duration>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self {
            error,
            finalized: false,
            valid_names: Vec::new(),
            retry_after: None,
        }
    }
}

/// The renewal window the CA suggests for a certificate (RFC 9773).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalWindow {
    pub start: SystemTime,
    pub end: SystemTime,
    /// When to ask again (the CA's `Retry-After`).
    pub retry_after: Duration,
}

/// Counts (persists) the names whose challenges are about to be handed to
/// the CA, before they are: each is a failed authorization unless seen
/// valid. An error stops the order before the CA is told.
#[async_trait::async_trait]
pub trait Trigger: Send + Sync {
    async fn trigger(&self, names: &[String]) -> Result<(), Error>;
}

/// One order as the manager asks for it.
pub struct OrderRequest<'a> {
    pub spec: &'a Certificate,
    /// The ARI identifier of the certificate this one renews, when the CA
    /// supports ARI (`Leaf::ari_id`).
    pub replaces: Option<&'a str>,
    /// The solver of each kind of challenge.
    pub solvers: &'a Solvers,
    pub trigger: &'a dyn Trigger,
}

/// A CA, as the certificate manager uses it.
#[async_trait::async_trait]
pub trait Issuer: Send + Sync {
    /// Opens the account (registering it the first time); an error means the
    /// CA cannot be reached or refuses the account, and nothing is ordered.
    async fn open(&self) -> Result<(), Error>;

    /// Refuses, before any order, what this CA would refuse: a profile it
    /// does not offer. Called after `open` succeeded.
    async fn check(&self, spec: &Certificate) -> Result<(), Error>;

    /// The CA's renewal window for `leaf`; `Ok(None)` when it offers none
    /// (no ARI, or the leaf has no ARI identifier).
    async fn renewal_info(&self, leaf: &Leaf) -> Result<Option<RenewalWindow>, Error>;

    /// Orders one certificate and checks it; a failure says how far it got.
    async fn issue(&self, order: OrderRequest<'_>) -> Result<Issued, Failure>;
}
