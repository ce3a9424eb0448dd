//! The token scheme of the challenge API (`docs/challenge-sync.md`,
//! "Authentication"): both sides prove they hold the token without ever
//! sending it, so whoever answers in the agent's place learns nothing it
//! could use, and its answers are refused.
//!
//! Request: `authorization: ACME-HMAC-SHA256 nonce=<hex>, time=<ms>,
//! mac=<hex>`, the MAC over `acme-sync-request`, the nonce, the time and
//! `<METHOD> <path and query>`. Answer: `x-acme-signature: <hex>`, the MAC over
//! `acme-sync-response`, the same nonce, the status code and the body.

use ring::hmac;

/// The request header's scheme name.
pub const SCHEME: &str = "ACME-HMAC-SHA256";
/// The answer's signature header.
pub const SIGNATURE_HEADER: &str = "x-acme-signature";

/// A nonce is 16 to 64 hex digits.
const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// The parts of a request's `authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub nonce: String,
    pub time_ms: u64,
    pub mac: Vec<u8>,
}

fn key(token: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn request_message(nonce: &str, time_ms: u64, method: &str, path_and_query: &str) -> String {
    format!("acme-sync-request\n{nonce}\n{time_ms}\n{method} {path_and_query}")
}

fn response_message(nonce: &str, status: u16, body: &[u8]) -> Vec<u8> {
    let mut message = format!("acme-sync-response\n{nonce}\n{status}\n").into_bytes();
    message.extend_from_slice(body);
    message
}

/// Parses `ACME-HMAC-SHA256 nonce=..., time=..., mac=...`.
pub fn parse(header: &str) -> Option<Presented> {
    let rest = header.strip_prefix(SCHEME)?.strip_prefix(' ')?;
    let (mut nonce, mut time_ms, mut mac) = (None, None, None);
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        match name {
            "nonce" if NONCE_LEN.contains(&value.len()) && unhex(value).is_some() => {
                nonce = Some(value.to_owned());
            }
            "time" => time_ms = value.parse().ok(),
            "mac" => mac = unhex(value),
            _ => return None,
        }
    }
    Some(Presented {
        nonce: nonce?,
        time_ms: time_ms?,
        mac: mac?,
    })
}

/// The `authorization` header value for a request (the client side).
pub fn authorization(
    token: &str,
    nonce: &str,
    time_ms: u64,
    method: &str,
    path_and_query: &str,
) -> String {
    let message = request_message(nonce, time_ms, method, path_and_query);
    let mac = hmac::sign(&key(token), message.as_bytes());
    format!(
        "{SCHEME} nonce={nonce}, time={time_ms}, mac={}",
        hex(mac.as_ref())
    )
}

/// Whether `presented` was made with `token` for this request. Constant
/// time (ring's verify).
pub fn verify_request(
    token: &str,
    presented: &Presented,
    method: &str,
    path_and_query: &str,
) -> bool {
    let message = request_message(&presented.nonce, presented.time_ms, method, path_and_query);
    hmac::verify(&key(token), message.as_bytes(), &presented.mac).is_ok()
}

/// The signature of an answer, for [`SIGNATURE_HEADER`].
pub fn sign_response(token: &str, nonce: &str, status: u16, body: &[u8]) -> String {
    let mac = hmac::sign(&key(token), &response_message(nonce, status, body));
    hex(mac.as_ref())
}

/// Whether an answer's signature is the agent's (the client side).
pub fn verify_response(
    token: &str,
    nonce: &str,
    status: u16,
    body: &[u8],
    signature: &str,
) -> bool {
    unhex(signature).is_some_and(|mac| {
        hmac::verify(&key(token), &response_message(nonce, status, body), &mac).is_ok()
    })
}

/// A fresh random nonce (32 hex digits).
pub fn nonce() -> String {
    let mut bytes = [0u8; 16];
    // Without the system's random source, a nonce from the clock and pid
    // still never repeats within a process.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos ^ (u128::from(std::process::id()) << 96)).to_be_bytes();
    }
    hex(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    #[test]
    fn a_request_made_with_the_token_verifies_and_nothing_else_does() {
        let header = authorization(
            TOKEN,
            "00112233445566778899aabbccddeeff",
            42,
            "GET",
            "/v1/challenges?version=1&wait=30",
        );
        let presented = parse(&header).unwrap();
        assert_eq!(presented.time_ms, 42);
        assert!(verify_request(
            TOKEN,
            &presented,
            "GET",
            "/v1/challenges?version=1&wait=30"
        ));
        assert!(!verify_request(
            "another-token-entirely",
            &presented,
            "GET",
            "/v1/challenges?version=1&wait=30"
        ));
        assert!(!verify_request(
            TOKEN,
            &presented,
            "GET",
            "/v1/challenges?version=2&wait=30"
        ));
        assert!(!verify_request(
            TOKEN,
            &presented,
            "POST",
            "/v1/challenges?version=1&wait=30"
        ));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            "",
            "Bearer abc",
            "ACME-HMAC-SHA256 nonce=xyz, time=1, mac=00",
            "ACME-HMAC-SHA256 nonce=0011, time=1, mac=00",
            "ACME-HMAC-SHA256 nonce=00112233445566778899aabbccddeeff, time=x, mac=00",
            "ACME-HMAC-SHA256 nonce=00112233445566778899aabbccddeeff, time=1",
            "ACME-HMAC-SHA256 nonce=00112233445566778899aabbccddeeff, time=1, mac=0g",
            "ACME-HMAC-SHA256 nonce=00112233445566778899aabbccddeeff, time=1, mac=00, extra=1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_answer_is_bound_to_the_nonce_status_and_body() {
        let nonce = nonce();
        let signature = sign_response(TOKEN, &nonce, 200, b"{}");
        assert!(verify_response(TOKEN, &nonce, 200, b"{}", &signature));
        assert!(!verify_response(TOKEN, &nonce, 200, b"{ }", &signature));
        assert!(!verify_response(TOKEN, &nonce, 304, b"{}", &signature));
        assert!(!verify_response(
            TOKEN,
            &super::nonce(),
            200,
            b"{}",
            &signature
        ));
        assert!(!verify_response(
            "wrong-token-wrong-token",
            &nonce,
            200,
            b"{}",
            &signature
        ));
    }

    /// The filter (`filter/core/src/auth.rs`) computes the same values; this
    /// vector is asserted on both sides.
    #[test]
    fn the_shared_test_vector() {
        assert_eq!(
            authorization(
                "test-token-0123456789",
                "000102030405060708090a0b0c0d0e0f",
                1_700_000_000_000,
                "GET",
                "/v1/challenges?version=0&wait=30"
            ),
            format!(
                "{SCHEME} nonce=000102030405060708090a0b0c0d0e0f, time=1700000000000, mac={}",
                REQUEST_VECTOR_MAC
            )
        );
        assert_eq!(
            sign_response(
                "test-token-0123456789",
                "000102030405060708090a0b0c0d0e0f",
                200,
                b"{\"version\":1}"
            ),
            RESPONSE_VECTOR_MAC
        );
    }

    const REQUEST_VECTOR_MAC: &str =
        "51a2af04d42619e55df226d22e13ac962dccded2bc7de12bb5d44be1bc03075d";
    const RESPONSE_VECTOR_MAC: &str =
        "98a643d65773e39100d188f402e244b573261dc6cc60e391b7f945e105ab16d7";
}
