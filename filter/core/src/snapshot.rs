//! The body of a `200` sync response: a full snapshot of the challenge set.
//!
//! A snapshot is validated whole before anything is stored: one bad entry means
//! the agent is broken or something else answered, and the last good set is worth
//! more than a partial new one.

use miniserde::{Deserialize, json};

use crate::Error;
use crate::token::is_valid_token;

/// Longest key authorization accepted (token + '.' + 43-character thumbprint fits easily).
const MAX_KEY_AUTHORIZATION_LEN: usize = 512;
/// Longest identifier: a DNS name is at most 253 characters.
const MAX_IDENTIFIER_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub token: String,
    pub key_authorization: String,
    /// Lower-cased, without a trailing dot.
    pub identifier: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The agent process that made it (`docs/challenge-sync.md`): versions
    /// compare only within one instance.
    pub instance: Option<String>,
    pub version: u64,
    pub challenges: Vec<Challenge>,
}

/// Longest instance id accepted.
pub const MAX_INSTANCE_LEN: usize = 64;

// Unknown fields are ignored so the agent can add some without breaking older filters.
#[derive(Deserialize)]
struct RawSnapshot {
    instance: Option<String>,
    version: u64,
    challenges: Vec<RawChallenge>,
}

#[derive(Deserialize)]
struct RawChallenge {
    token: String,
    key_authorization: String,
    identifier: String,
}

fn sync_error(msg: impl Into<String>) -> Error {
    Error::Sync(msg.into())
}

impl Snapshot {
    /// Parses and validates a snapshot body of at most `max_bytes`.
    pub fn parse(body: &[u8], max_bytes: usize) -> Result<Self, Error> {
        if body.len() > max_bytes {
            return Err(sync_error(format!(
                "body of {} bytes exceeds max_sync_bytes ({max_bytes})",
                body.len()
            )));
        }
        let text = std::str::from_utf8(body).map_err(|_| sync_error("body is not UTF-8"))?;
        let raw: RawSnapshot = json::from_str(text).map_err(|_| {
            sync_error("malformed JSON, or version/challenges/token/key_authorization/identifier missing or of the wrong type")
        })?;
        if let Some(instance) = &raw.instance
            && (instance.len() > MAX_INSTANCE_LEN || !is_valid_token(instance))
        {
            return Err(sync_error(
                "instance is not base64url of 1 to 64 characters",
            ));
        }
        let mut challenges: Vec<Challenge> = Vec::with_capacity(raw.challenges.len());
        for c in raw.challenges {
            if !is_valid_token(&c.token) {
                return Err(sync_error(
                    "a token is not base64url of 1 to 256 characters",
                ));
            }
            let well_formed_key_auth = c.key_authorization.len() <= MAX_KEY_AUTHORIZATION_LEN
                && c.key_authorization
                    .strip_prefix(c.token.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|thumb| !thumb.is_empty() && is_valid_token(thumb));
            if !well_formed_key_auth {
                return Err(sync_error(format!(
                    "key_authorization of token {} is not <token>.<thumbprint>",
                    c.token
                )));
            }
            let identifier = c.identifier.trim_end_matches('.').to_ascii_lowercase();
            let well_formed_identifier = !identifier.is_empty()
                && identifier.len() <= MAX_IDENTIFIER_LEN
                && identifier
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
            if !well_formed_identifier {
                return Err(sync_error(format!(
                    "identifier of token {} is not a DNS name or IP address",
                    c.token
                )));
            }
            if challenges.iter().any(|seen| seen.token == c.token) {
                return Err(sync_error(format!("token {} appears twice", c.token)));
            }
            challenges.push(Challenge {
                token: c.token,
                key_authorization: c.key_authorization,
                identifier,
            });
        }
        Ok(Self {
            instance: raw.instance,
            version: raw.version,
            challenges,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;

    both_targets_test! {
        fn parses_a_snapshot_and_normalizes_identifiers() {
            let s = Snapshot::parse(
                br#"{"version":7,"challenges":[{"token":"abc","key_authorization":"abc.th-umb_","identifier":"WWW.Example.COM.","extra":1}],"extra":true}"#,
                1024,
            )
            .unwrap();
            assert_eq!(s.version, 7);
            assert_eq!(s.instance, None);
            assert_eq!(s.challenges[0].identifier, "www.example.com");
            let named = Snapshot::parse(br#"{"instance":"0a1b2c3d4e5f6a7b","version":7,"challenges":[]}"#, 1024).unwrap();
            assert_eq!(named.instance.as_deref(), Some("0a1b2c3d4e5f6a7b"));
            assert_eq!(s.challenges[0].key_authorization, "abc.th-umb_");
        }
    }

    both_targets_test! {
        fn empty_set_is_valid() {
            let s = Snapshot::parse(br#"{"version":1,"challenges":[]}"#, 1024).unwrap();
            assert!(s.challenges.is_empty());
        }
    }

    both_targets_test! {
        fn refuses_bad_snapshots() {
            let bad: &[&[u8]] = &[
                b"",
                b"not json",
                b"{\"version\":1}",
                br#"{"instance":"a/b","version":1,"challenges":[]}"#,
                br#"{"instance":"","version":1,"challenges":[]}"#,
                b"{\"version\":-1,\"challenges\":[]}",
                b"{\"version\":\"1\",\"challenges\":[]}",
                br#"{"version":1,"challenges":[{"token":"a/b","key_authorization":"a/b.x","identifier":"h"}]}"#,
                br#"{"version":1,"challenges":[{"token":"a","key_authorization":"b.x","identifier":"h"}]}"#,
                br#"{"version":1,"challenges":[{"token":"a","key_authorization":"a.","identifier":"h"}]}"#,
                br#"{"version":1,"challenges":[{"token":"a","key_authorization":"a.x\ny","identifier":"h"}]}"#,
                br#"{"version":1,"challenges":[{"token":"a","key_authorization":"a.x","identifier":""}]}"#,
                br#"{"version":1,"challenges":[{"token":"a","key_authorization":"a.x","identifier":"h\nx"}]}"#,
                br#"{"version":1,"challenges":[{"token":"a","key_authorization":"a.x","identifier":"h"},{"token":"a","key_authorization":"a.x","identifier":"h"}]}"#,
                br#"{"version":1,"challenges":[{"token":"a","identifier":"h"}]}"#,
            ];
            for body in bad {
                assert!(
                    matches!(Snapshot::parse(body, 1024), Err(Error::Sync(_))),
                    "{}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    both_targets_test! {
        fn refuses_oversized_body_before_parsing() {
            let body = br#"{"version":1,"challenges":[]}"#;
            assert!(Snapshot::parse(body, body.len()).is_ok());
            let err = Snapshot::parse(body, body.len() - 1).unwrap_err();
            assert!(err.to_string().contains("exceeds"), "{err}");
        }
    }
}
