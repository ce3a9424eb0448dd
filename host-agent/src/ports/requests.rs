//! What reaches the certificate manager from outside its loop: the API's
//! renewals, the on-demand gate's names, and their answers.

use std::time::Duration;

use tokio::sync::oneshot;

/// How long a refusal for a cap (not the policy) is remembered.
pub const CAP_REFUSAL: Duration = Duration::from_secs(5);

/// Why a renewal request was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewRefused {
    /// No certificate of that name is configured.
    Unknown,
}

/// A request to the manager from outside its loop (the API).
pub enum Request {
    /// Order a new certificate now, whatever the schedule says.
    Renew {
        name: String,
        reply: oneshot::Sender<Result<(), RenewRefused>>,
    },
    /// Get a certificate for `domain` because a handshake asked for it and
    /// the on-demand policy allowed it (on-demand TLS).
    OnDemand {
        domain: String,
        key_type: crate::domain::spec::KeyType,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// A handshake asked for `domain`, which is served (an on-demand name
    /// in use is kept).
    Seen { domain: String },
}

/// Why the manager refused a name, and for how long to answer it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub why: String,
    pub for_how_long: Duration,
}

impl Refusal {
    pub fn new(why: impl Into<String>, for_how_long: Duration) -> Self {
        Self {
            why: why.into(),
            for_how_long,
        }
    }

    /// A refusal for a passing reason (a cap, a stop): remembered briefly.
    pub fn brief(why: impl Into<String>) -> Self {
        Self::new(why, CAP_REFUSAL)
    }
}
