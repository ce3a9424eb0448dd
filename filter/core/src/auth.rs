//! The filter's side of the token scheme (`docs/challenge-sync.md`,
//! "Authentication"): it proves the token to the agent without sending it,
//! and believes only an answer the agent signed with the same token, so
//! whoever holds the agent's port while the agent is down can neither learn
//! the token nor get a key authorization served.
//!
//! The agent computes the same values (`host-agent/src/api/auth.rs`); the
//! test vector below is asserted on both sides.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The `authorization` scheme name.
pub const SCHEME: &str = "ACME-HMAC-SHA256";
/// The answer's signature header.
pub const SIGNATURE_HEADER: &str = "x-acme-signature";

type HmacSha256 = Hmac<Sha256>;

/// HMAC takes a key of any length, so this is always `Some`; the caller
/// treats `None` as a failed proof rather than panicking.
fn mac(token: &str) -> Option<HmacSha256> {
    HmacSha256::new_from_slice(token.as_bytes()).ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => {
                let digit = |c: &u8| char::from(*c).to_digit(16);
                u8::try_from(digit(hi)? * 16 + digit(lo)?).ok()
            }
            _ => None,
        })
        .collect()
}

/// A nonce for one request: 16 bytes as 32 hex digits.
pub fn nonce_hex(bytes: [u8; 16]) -> String {
    hex(&bytes)
}

/// The `authorization` header value for `GET <path_and_query>` at `time_ms`.
pub fn authorization(token: &str, nonce: &str, time_ms: u64, path_and_query: &str) -> String {
    let Some(mut m) = mac(token) else {
        return String::new();
    };
    m.update(format!("acme-sync-request\n{nonce}\n{time_ms}\nGET {path_and_query}").as_bytes());
    format!(
        "{SCHEME} nonce={nonce}, time={time_ms}, mac={}",
        hex(&m.finalize().into_bytes())
    )
}

/// Whether `signature` is the agent's for this answer (constant time).
pub fn verify_response(
    token: &str,
    nonce: &str,
    status: u32,
    body: &[u8],
    signature: &str,
) -> bool {
    let (Some(expected), Some(mut m)) = (unhex(signature), mac(token)) else {
        return false;
    };
    m.update(format!("acme-sync-response\n{nonce}\n{status}\n").as_bytes());
    m.update(body);
    m.verify_slice(&expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;

    both_targets_test! {
        fn the_shared_test_vector() {
            assert_eq!(
                authorization("test-token-0123456789", "000102030405060708090a0b0c0d0e0f", 1_700_000_000_000, "/v1/challenges?version=0&wait=30"),
                "ACME-HMAC-SHA256 nonce=000102030405060708090a0b0c0d0e0f, time=1700000000000, mac=51a2af04d42619e55df226d22e13ac962dccded2bc7de12bb5d44be1bc03075d"
            );
            assert!(verify_response(
                "test-token-0123456789",
                "000102030405060708090a0b0c0d0e0f",
                200,
                b"{\"version\":1}",
                "98a643d65773e39100d188f402e244b573261dc6cc60e391b7f945e105ab16d7"
            ));
        }
    }

    both_targets_test! {
        fn a_forged_or_altered_answer_is_refused() {
            let good = "98a643d65773e39100d188f402e244b573261dc6cc60e391b7f945e105ab16d7";
            let nonce = "000102030405060708090a0b0c0d0e0f";
            assert!(!verify_response("another-token-0123456", nonce, 200, b"{\"version\":1}", good));
            assert!(!verify_response("test-token-0123456789", nonce, 200, b"{\"version\":2}", good));
            assert!(!verify_response("test-token-0123456789", nonce, 304, b"{\"version\":1}", good));
            assert!(!verify_response("test-token-0123456789", "000102030405060708090a0b0c0d0e00", 200, b"{\"version\":1}", good));
            assert!(!verify_response("test-token-0123456789", nonce, 200, b"{\"version\":1}", ""));
            assert!(!verify_response("test-token-0123456789", nonce, 200, b"{\"version\":1}", "zz"));
        }
    }

    both_targets_test! {
        fn hex_round_trips() {
            assert_eq!(nonce_hex([0xab; 16]), "ab".repeat(16));
            assert_eq!(unhex("00ff10"), Some(vec![0, 255, 16]));
            assert_eq!(unhex("0"), None);
            assert_eq!(unhex("0g"), None);
        }
    }
}
