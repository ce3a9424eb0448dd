//! What a certificate is: its names, key and how the CA validates it. Parsed
//! from the config, read by everything that orders, stores or serves one.

use serde::{Deserialize, Serialize};

/// A private key in PEM: zeroed when dropped, so no copy the agent is done
/// with lingers in freed memory.
pub type KeyPem = zeroize::Zeroizing<String>;

/// A certificate's key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Names the SDS secret, the output files and the metrics.
    pub name: String,
    pub domains: Vec<String>,
    #[serde(default)]
    pub key_type: KeyType,
    /// How the CA validates the names (wildcards always by dns-01).
    #[serde(default)]
    pub challenge: ChallengeKind,
    /// The `[dns.<name>]` solver for dns-01: required for a wildcard and
    /// for `challenge = "dns-01"`.
    pub dns: Option<String>,
    /// The CA's certificate profile to order (`classic`, `tlsserver`,
    /// `shortlived` at Let's Encrypt); the CA's default when unset.
    pub profile: Option<String>,
    /// Kubernetes mode: take over an existing Secret of this name that the
    /// agent did not write (cert-manager's, say), serving its certificate
    /// until its renewal time instead of ordering at once.
    #[serde(default)]
    pub adopt: bool,
}

impl Certificate {
    /// The challenge for one authorization: a wildcard can only be validated
    /// by dns-01; any other name by the certificate's `challenge`.
    pub fn challenge_for(&self, wildcard: bool) -> ChallengeKind {
        if wildcard {
            ChallengeKind::Dns01
        } else {
            self.challenge
        }
    }

    /// Whether an order for this certificate writes dns-01 records.
    pub fn uses_dns(&self) -> bool {
        self.challenge == ChallengeKind::Dns01 || self.domains.iter().any(|d| d.starts_with("*."))
    }
}

/// The ACME challenge a certificate is validated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum ChallengeKind {
    /// Answered by the filter on Envoy's plain-HTTP listener (port 80).
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// Answered by Envoy's TLS listener with an `acme-tls/1` filter chain fed
    /// by the agent's SDS server (port 443; port 80 may stay closed).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// A TXT record written by the certificate's `[dns.<name>]` solver (RFC
    /// 2136); the only challenge for a wildcard.
    #[serde(rename = "dns-01")]
    Dns01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http01 => "http-01",
            Self::TlsAlpn01 => "tls-alpn-01",
            Self::Dns01 => "dns-01",
        }
    }
}
