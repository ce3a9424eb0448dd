use std::time::Duration;

use thiserror::Error;

/// Everything the agent's library can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// The configuration file is unusable; `field` is the dotted path at fault.
    #[error("{path}: {field}: {reason}")]
    Config {
        path: String,
        field: String,
        reason: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The CA refused, failed or could not be reached.
    #[error("{context}: {}", with_causes(source))]
    Acme {
        context: String,
        #[source]
        source: instant_acme::Error,
    },
    /// An authorization or order ended `invalid`; `detail` is the CA's reason.
    #[error("{0}")]
    Validation(String),
    /// The challenge was not answered correctly through Envoy, so the CA was
    /// not asked to validate it (a failed validation counts against rate limits).
    #[error("self-check failed: {0}")]
    SelfCheck(String),
    /// The Kubernetes API refused or failed, or a Secret is not the agent's.
    #[error("kubernetes: {0}")]
    Kubernetes(String),
    /// An issued or stored certificate failed its checks.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The CA accepted an order with `replaces` but did not reflect it
    /// (RFC 9773 section 5 says it must); the order is placed again without.
    #[error("the CA did not reflect `replaces` in the order: {0}")]
    ReplacesNotReflected(String),
    /// The CA does not offer the certificate profile the config asks for.
    #[error("{0}")]
    Profile(String),
    /// A DNS-01 solver could not write, find or see a challenge record.
    #[error("dns-01: {0}")]
    Dns(String),
    /// The agent stopped during the step (a restart finds it in the ledger).
    #[error("{0}")]
    Interrupted(String),
    /// The on-demand policy (the `ask` URL) could not be asked.
    #[error("on-demand policy: {0}")]
    Policy(String),
    /// A CA behind the issuer seam (`ports::issuer`) other than the ACME
    /// client failed, typed by what the manager does about it.
    #[error("{detail}")]
    Ca { failure: CaFailure, detail: String },
}

/// How a CA failed, as the manager acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaFailure {
    /// No answer: retried after the backoff.
    Unreachable,
    /// A limit: retried after `retry_after`.
    RateLimited { retry_after: Duration },
    /// The CA will not issue for the order as it is.
    Refused,
    /// A name failed validation (counts as a failed authorization).
    FailedAuthorization,
}

/// `e` and its sources, joined: HTTP client errors say "client error
/// (Connect)" and keep the useful part ("Connection refused") in a source.
pub(crate) fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

impl Error {
    pub(crate) fn acme(context: impl Into<String>) -> impl FnOnce(instant_acme::Error) -> Self {
        let context = context.into();
        move |source| Self::Acme { context, source }
    }

    /// The ACME problem type (`urn:ietf:params:acme:error:<kind>`) when the CA
    /// sent one.
    pub fn problem_type(&self) -> Option<&str> {
        match self {
            Self::Acme {
                source: instant_acme::Error::Api(problem),
                ..
            } => problem.r#type.as_deref(),
            _ => None,
        }
    }

    /// A short, bounded label for metrics: the ACME problem kind
    /// (`badNonce`, `rateLimited`, ...) or the agent-side category.
    pub fn kind(&self) -> &'static str {
        const KNOWN: &[&str] = &[
            "accountDoesNotExist",
            "badNonce",
            "badCSR",
            "caa",
            "connection",
            "dns",
            "incorrectResponse",
            "malformed",
            "orderNotReady",
            "rateLimited",
            "rejectedIdentifier",
            "serverInternal",
            "unauthorized",
            "unsupportedIdentifier",
            "externalAccountRequired",
        ];
        match self {
            Self::Config { .. } => "config",
            Self::Io { .. } => "io",
            Self::Validation(_) => "validation",
            Self::SelfCheck(_) => "self_check",
            Self::Certificate(_) => "certificate",
            Self::Kubernetes(_) => "kubernetes",
            Self::ReplacesNotReflected(_) => "replaces_not_reflected",
            Self::Interrupted(_) => "interrupted",
            Self::Dns(_) => "dns_solver",
            Self::Profile(_) => "profile",
            Self::Policy(_) => "policy",
            Self::Ca { failure, .. } => match failure {
                CaFailure::Unreachable => "transport",
                CaFailure::RateLimited { .. } => "rateLimited",
                CaFailure::Refused => "rejectedIdentifier",
                CaFailure::FailedAuthorization => "validation",
            },
            Self::Acme { source, .. } => match source {
                instant_acme::Error::Api(p) => p
                    .r#type
                    .as_deref()
                    .and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:"))
                    .and_then(|k| KNOWN.iter().find(|known| **known == k).copied())
                    .unwrap_or("other_problem"),
                instant_acme::Error::Timeout(_) => "timeout",
                instant_acme::Error::Other(_) | instant_acme::Error::Hyper(_) => "transport",
                _ => "client",
            },
        }
    }

    pub fn is_bad_nonce(&self) -> bool {
        self.kind() == "badNonce"
    }

    /// Whether the failure is about the name itself (the CA could not
    /// validate it, or will not issue for it), not the CA, the network, a
    /// limit or Envoy (a failed self-check is as likely an Envoy that is
    /// down): what makes an on-demand name give up.
    pub fn is_about_the_name(&self) -> bool {
        matches!(
            self.kind(),
            "validation"
                | "caa"
                | "connection"
                | "dns"
                | "incorrectResponse"
                | "rejectedIdentifier"
                | "unauthorized"
                | "unsupportedIdentifier"
        )
    }

    pub fn is_rate_limited(&self) -> bool {
        self.kind() == "rateLimited"
    }

    /// How long the CA asked to wait, if it said so (an order timeout carries
    /// the next poll time).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Acme {
                source: instant_acme::Error::Timeout(Some(at)),
                ..
            } => Some(at.saturating_duration_since(std::time::Instant::now())),
            Self::Ca {
                failure: CaFailure::RateLimited { retry_after },
                ..
            } => Some(*retry_after),
            _ => None,
        }
    }
}
