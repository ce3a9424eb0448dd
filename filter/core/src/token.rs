//! The shape of an ACME token (and of anything else base64url the filter
//! checks: thumbprints, instance ids). At the bottom: config, snapshot and
//! request decisions all use it.

/// Longest token accepted; CAs use 43 characters, 256 leaves room without inviting abuse.
pub const MAX_TOKEN_LEN: usize = 256;

/// `[A-Za-z0-9_-]{1,256}`: the base64url alphabet RFC 8555 requires of tokens.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
