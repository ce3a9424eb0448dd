//! The filter's JSON configuration, parsed once in `on_configure`.
//!
//! Unknown fields and out-of-range values are refused with an error that names
//! the field: a typo must stop Envoy from loading the plugin, not silently fall
//! back to a default.

use miniserde::json::{self, Number, Value};

use crate::Error;
use crate::token::is_valid_token;

/// Default for [`FilterConfig::agent_authority`].
pub const DEFAULT_AGENT_AUTHORITY: &str = "acme-agent";
/// Default for [`FilterConfig::poll_wait_seconds`].
pub const DEFAULT_POLL_WAIT_SECONDS: u32 = 30;
/// Default for [`FilterConfig::backoff_initial_ms`].
pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 100;
/// Default for [`FilterConfig::backoff_max_ms`].
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 10_000;
/// Default for [`FilterConfig::max_sync_bytes`].
pub const DEFAULT_MAX_SYNC_BYTES: usize = 1 << 20;

/// Parsed, validated filter configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    /// Envoy cluster that reaches the agent's challenge API; `None` disables sync
    /// (allowed only in stateless mode).
    pub agent_cluster: Option<String>,
    /// `:authority` sent with each sync request.
    pub agent_authority: String,
    /// The token shared with the agent: each sync request proves it and
    /// only answers signed with it are used (`crate::auth`).
    pub agent_token: Option<String>,
    /// The name of an environment variable that holds the token instead
    /// (Envoy passes it in with `vm_config.environment_variables`), so the
    /// token need not be written in Envoy's or Istio's configuration.
    pub agent_token_env: Option<String>,
    /// How long the agent may hold a long-poll before answering 304.
    pub poll_wait_seconds: u32,
    /// First retry delay after a failed sync.
    pub backoff_initial_ms: u64,
    /// Cap of the doubling retry delay.
    pub backoff_max_ms: u64,
    /// Largest sync response body accepted; larger ones are a failure.
    pub max_sync_bytes: usize,
    /// Answer a token only when the request's host is the challenge's identifier.
    pub host_check: bool,
    /// Stateless mode: answer any well-formed token with `<token>.<thumbprint>`.
    pub account_thumbprint: Option<String>,
}

/// The configuration as written, every field optional; built field by field from
/// the JSON object so that each error names its field.
#[derive(Default)]
struct RawConfig {
    agent_cluster: Option<String>,
    agent_authority: Option<String>,
    agent_token: Option<String>,
    agent_token_env: Option<String>,
    poll_wait_seconds: Option<u64>,
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    max_sync_bytes: Option<u64>,
    host_check: Option<bool>,
    account_thumbprint: Option<String>,
}

fn string(field: &str, value: Value) -> Result<String, Error> {
    match value {
        Value::String(s) => Ok(s),
        _ => Err(invalid(field, "must be a string")),
    }
}

fn unsigned(field: &str, value: Value) -> Result<u64, Error> {
    match value {
        Value::Number(Number::U64(n)) => Ok(n),
        _ => Err(invalid(field, "must be a non-negative integer")),
    }
}

fn boolean(field: &str, value: Value) -> Result<bool, Error> {
    match value {
        Value::Bool(b) => Ok(b),
        _ => Err(invalid(field, "must be true or false")),
    }
}

impl RawConfig {
    fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| invalid("configuration", "is not UTF-8"))?;
        let value: Value =
            json::from_str(text).map_err(|_| invalid("configuration", "is not valid JSON"))?;
        let Value::Object(object) = value else {
            return Err(invalid("configuration", "must be a JSON object"));
        };
        let mut raw = Self::default();
        for (key, value) in object {
            let field = key.as_str();
            match field {
                "agent_cluster" => raw.agent_cluster = Some(string(field, value)?),
                "agent_authority" => raw.agent_authority = Some(string(field, value)?),
                "agent_token" => raw.agent_token = Some(string(field, value)?),
                "agent_token_env" => raw.agent_token_env = Some(string(field, value)?),
                "poll_wait_seconds" => raw.poll_wait_seconds = Some(unsigned(field, value)?),
                "backoff_initial_ms" => raw.backoff_initial_ms = Some(unsigned(field, value)?),
                "backoff_max_ms" => raw.backoff_max_ms = Some(unsigned(field, value)?),
                "max_sync_bytes" => raw.max_sync_bytes = Some(unsigned(field, value)?),
                "host_check" => raw.host_check = Some(boolean(field, value)?),
                "account_thumbprint" => raw.account_thumbprint = Some(string(field, value)?),
                _ => return Err(invalid(field, "unknown field")),
            }
        }
        Ok(raw)
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// A header value must not smuggle a second header or a request line.
fn check_header_value(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

impl FilterConfig {
    /// Parses the plugin configuration bytes as Envoy hands them over.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(invalid(
                "configuration",
                "is empty: set agent_cluster (or account_thumbprint for stateless mode)",
            ));
        }
        let raw = RawConfig::from_json(bytes)?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, Error> {
        if let Some(cluster) = &raw.agent_cluster {
            check_header_value("agent_cluster", cluster)?;
        }
        let agent_authority = raw
            .agent_authority
            .unwrap_or_else(|| DEFAULT_AGENT_AUTHORITY.to_owned());
        check_header_value("agent_authority", &agent_authority)?;
        if let Some(token) = &raw.agent_token {
            check_header_value("agent_token", token)?;
        }
        if let Some(name) = &raw.agent_token_env {
            let valid = !name.is_empty()
                && name.len() <= 128
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(invalid(
                    "agent_token_env",
                    "must be an environment variable name ([A-Za-z0-9_], 1 to 128 characters)",
                ));
            }
            if raw.agent_token.is_some() {
                return Err(invalid(
                    "agent_token_env",
                    "set agent_token or agent_token_env, not both",
                ));
            }
        }
        let poll_wait_seconds = match raw.poll_wait_seconds {
            None => DEFAULT_POLL_WAIT_SECONDS,
            Some(n @ 1..=300) => n as u32,
            Some(_) => return Err(invalid("poll_wait_seconds", "must be between 1 and 300")),
        };
        let backoff_initial_ms = raw.backoff_initial_ms.unwrap_or(DEFAULT_BACKOFF_INITIAL_MS);
        if !(10..=60_000).contains(&backoff_initial_ms) {
            return Err(invalid(
                "backoff_initial_ms",
                "must be between 10 and 60000",
            ));
        }
        let backoff_max_ms = raw.backoff_max_ms.unwrap_or(DEFAULT_BACKOFF_MAX_MS);
        if !(backoff_initial_ms..=3_600_000).contains(&backoff_max_ms) {
            return Err(invalid(
                "backoff_max_ms",
                "must be at least backoff_initial_ms and at most 3600000",
            ));
        }
        let max_sync_bytes = match raw.max_sync_bytes {
            None => DEFAULT_MAX_SYNC_BYTES,
            Some(n @ 1024..=67_108_864) => n as usize,
            Some(_) => {
                return Err(invalid(
                    "max_sync_bytes",
                    "must be between 1024 and 67108864",
                ));
            }
        };
        if let Some(thumbprint) = &raw.account_thumbprint {
            // A JWK thumbprint is base64url(SHA-256) without padding: 43 characters.
            if thumbprint.len() != 43 || !is_valid_token(thumbprint) {
                return Err(invalid(
                    "account_thumbprint",
                    "must be the 43-character base64url SHA-256 JWK thumbprint of the ACME account key",
                ));
            }
        }
        if raw.agent_cluster.is_none() && raw.account_thumbprint.is_none() {
            return Err(invalid(
                "agent_cluster",
                "is required (unless account_thumbprint enables stateless mode)",
            ));
        }
        Ok(Self {
            agent_cluster: raw.agent_cluster,
            agent_authority,
            agent_token: raw.agent_token,
            agent_token_env: raw.agent_token_env,
            poll_wait_seconds,
            backoff_initial_ms,
            backoff_max_ms,
            max_sync_bytes,
            host_check: raw.host_check.unwrap_or(true),
            account_thumbprint: raw.account_thumbprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;

    fn field_of(json: &str) -> String {
        match FilterConfig::parse(json.as_bytes()) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error for {json}, got {other:?}"),
        }
    }

    both_targets_test! {
        fn minimal_config_gets_documented_defaults() {
            let c = FilterConfig::parse(br#"{"agent_cluster":"acme_agent"}"#).unwrap();
            assert_eq!(c.agent_cluster.as_deref(), Some("acme_agent"));
            assert_eq!(c.agent_authority, DEFAULT_AGENT_AUTHORITY);
            assert_eq!(c.agent_token, None);
            assert_eq!(c.poll_wait_seconds, 30);
            assert_eq!(c.backoff_initial_ms, 100);
            assert_eq!(c.backoff_max_ms, 10_000);
            assert_eq!(c.max_sync_bytes, 1 << 20);
            assert!(c.host_check);
            assert_eq!(c.account_thumbprint, None);
        }
    }

    both_targets_test! {
        fn every_field_is_read() {
            let c = FilterConfig::parse(
                br#"{"agent_cluster":"a","agent_authority":"agent.local","agent_token":"s3cret",
                    "poll_wait_seconds":5,"backoff_initial_ms":50,"backoff_max_ms":500,
                    "max_sync_bytes":4096,"host_check":false,
                    "account_thumbprint":"0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"}"#,
            )
            .unwrap();
            assert_eq!(c.agent_authority, "agent.local");
            assert_eq!(c.agent_token.as_deref(), Some("s3cret"));
            assert_eq!(c.poll_wait_seconds, 5);
            assert_eq!(c.backoff_initial_ms, 50);
            assert_eq!(c.backoff_max_ms, 500);
            assert_eq!(c.max_sync_bytes, 4096);
            assert!(!c.host_check);
            assert!(c.account_thumbprint.is_some());
            let c = FilterConfig::parse(br#"{"agent_cluster":"a","agent_token_env":"ACME_AGENT_TOKEN"}"#).unwrap();
            assert_eq!(c.agent_token_env.as_deref(), Some("ACME_AGENT_TOKEN"));
        }
    }

    both_targets_test! {
        fn errors_name_the_field() {
            assert_eq!(field_of(r#"{"agent_cluster":"a","agent_clustr":"b"}"#), "agent_clustr");
            assert_eq!(field_of(r#"{"agent_cluster":"a","poll_wait_seconds":"x"}"#), "poll_wait_seconds");
            assert_eq!(field_of(r#"{"agent_cluster":"a","poll_wait_seconds":0}"#), "poll_wait_seconds");
            assert_eq!(field_of(r#"{"agent_cluster":"a","poll_wait_seconds":-1}"#), "poll_wait_seconds");
            assert_eq!(field_of(r#"{"agent_cluster":"a","host_check":"yes"}"#), "host_check");
            assert_eq!(field_of(r#"{"agent_cluster":"a","backoff_initial_ms":5}"#), "backoff_initial_ms");
            assert_eq!(field_of(r#"{"agent_cluster":"a","backoff_initial_ms":500,"backoff_max_ms":100}"#), "backoff_max_ms");
            assert_eq!(field_of(r#"{"agent_cluster":"a","max_sync_bytes":10}"#), "max_sync_bytes");
            assert_eq!(field_of(r#"{"agent_cluster":"a","account_thumbprint":"short"}"#), "account_thumbprint");
            assert_eq!(field_of(r#"{"agent_cluster":"a","agent_token":"x\r\nhost: evil"}"#), "agent_token");
            assert_eq!(field_of(r#"{"agent_cluster":""}"#), "agent_cluster");
            assert_eq!(field_of(r#"{"agent_cluster":"a","agent_token_env":"A-B"}"#), "agent_token_env");
            assert_eq!(field_of(r#"{"agent_cluster":"a","agent_token":"t","agent_token_env":"T"}"#), "agent_token_env");
            assert_eq!(field_of(r#"{}"#), "agent_cluster");
            assert_eq!(field_of(""), "configuration");
            assert_eq!(field_of("[1,2]"), "configuration");
            assert_eq!(field_of(r#"["a"]"#), "configuration");
            assert_eq!(field_of("{not json"), "configuration");
        }
    }

    both_targets_test! {
        fn unknown_field_message_names_it() {
            let err = FilterConfig::parse(br#"{"agent_cluster":"a","agent_clustr":"b"}"#).unwrap_err();
            assert!(err.to_string().contains("agent_clustr"), "{err}");
        }
    }

    both_targets_test! {
        fn stateless_mode_needs_no_agent() {
            let c = FilterConfig::parse(
                br#"{"account_thumbprint":"0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"}"#,
            )
            .unwrap();
            assert_eq!(c.agent_cluster, None);
        }
    }
}
