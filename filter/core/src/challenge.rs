//! What to do with one request: pass it on, or answer it as an HTTP-01 challenge.
//!
//! Only the path decides whether a request is ours. Anything under the challenge
//! prefix is answered here and never forwarded, whatever its shape: a malformed
//! token must not reach an upstream that might treat it as a file path.

use crate::config::FilterConfig;
use crate::request::RequestHeaders;
use crate::store::StoredChallenge;

/// RFC 8555 section 8.3: the path the CA fetches.
pub const PREFIX: &str = "/.well-known/acme-challenge/";
pub use crate::token::{MAX_TOKEN_LEN, is_valid_token};

/// Whether a request path is ours, and if so which token it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Not under the challenge prefix: pass untouched.
    Other,
    /// Under the prefix with a well-formed token.
    Token(&'a str),
    /// Under the prefix but not a well-formed token (empty, `..`, `%2e`, extra `/`, ...).
    Malformed,
}

/// Classifies a `:path` header value. The query string is ignored.
pub fn classify(path: &str) -> Target<'_> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match path.strip_prefix(PREFIX) {
        Some(token) if is_valid_token(token) => Target::Token(token),
        Some(_) => Target::Malformed,
        None if path == PREFIX.trim_end_matches('/') => Target::Malformed,
        None => Target::Other,
    }
}

/// The host a request was sent to: `:authority` without port, lower-cased, without a
/// trailing dot, IPv6 brackets removed (an IP identifier is stored without them).
pub fn request_host(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Which counter a local answer increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with the key authorization.
    Served,
    /// 404: well-formed token that is not known.
    NotFound,
    /// 404 or 405: malformed token, wrong host or wrong method.
    Rejected,
}

/// A local answer; the request never reaches an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u32,
    pub headers: Vec<(&'static str, &'static str)>,
    /// `None` sends no body (HEAD, and errors whose status says it all).
    pub body: Option<String>,
    pub outcome: Outcome,
}

impl Answer {
    fn not_found(outcome: Outcome) -> Self {
        Self {
            status: 404,
            headers: Vec::new(),
            body: None,
            outcome,
        }
    }
}

/// What the filter does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Continue down the filter chain untouched.
    Pass,
    /// Answer locally.
    Answer(Answer),
}

/// Decides a request from its path; `lookup` reads a token from shared data and is
/// only called for well-formed tokens under the prefix. A request without a
/// path is not ours.
pub fn decide(
    config: &FilterConfig,
    request: &RequestHeaders<'_>,
    lookup: impl FnOnce(&str) -> Option<StoredChallenge>,
) -> Decision {
    let Some(path) = request.path() else {
        return Decision::Pass;
    };
    let target = classify(path);
    if target == Target::Other {
        return Decision::Pass;
    }
    let head = match request.method().unwrap_or_default() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return Decision::Answer(Answer {
                status: 405,
                headers: vec![("allow", "GET, HEAD")],
                body: None,
                outcome: Outcome::Rejected,
            });
        }
    };
    let Target::Token(token) = target else {
        return Decision::Answer(Answer::not_found(Outcome::Rejected));
    };
    let key_authorization = match lookup(token) {
        Some(stored) => {
            if config.host_check {
                let host = request.authority().map(request_host);
                if host.as_deref() != Some(stored.identifier.as_str()) {
                    return Decision::Answer(Answer::not_found(Outcome::Rejected));
                }
            }
            stored.key_authorization
        }
        None => match &config.account_thumbprint {
            Some(thumbprint) => format!("{token}.{thumbprint}"),
            None => return Decision::Answer(Answer::not_found(Outcome::NotFound)),
        },
    };
    Decision::Answer(Answer {
        status: 200,
        headers: vec![
            ("content-type", "text/plain"),
            ("cache-control", "no-store"),
        ],
        body: (!head).then_some(key_authorization),
        outcome: Outcome::Served,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::both_targets_test;

    fn req(
        method: &'static str,
        path: &'static str,
        authority: Option<&'static str>,
    ) -> RequestHeaders<'static> {
        RequestHeaders {
            path: Some(path.into()),
            method: Some(method.into()),
            authority: authority.map(Into::into),
        }
    }

    fn get(path: &'static str) -> RequestHeaders<'static> {
        req("GET", path, Some("www.example.com"))
    }

    fn config(extra: &str) -> FilterConfig {
        FilterConfig::parse(format!(r#"{{"agent_cluster":"a"{extra}}}"#).as_bytes()).unwrap()
    }

    fn known(token: &str) -> Option<StoredChallenge> {
        (token == "tok").then(|| StoredChallenge {
            identifier: "www.example.com".into(),
            key_authorization: "tok.thumb".into(),
        })
    }

    both_targets_test! {
        fn classify_shapes() {
            assert_eq!(classify("/"), Target::Other);
            assert_eq!(classify("/index.html?x=/.well-known/acme-challenge/a"), Target::Other);
            assert_eq!(classify("/.well-known/other"), Target::Other);
            assert_eq!(classify("/.well-known/acme-challenge/abc_-XYZ09"), Target::Token("abc_-XYZ09"));
            assert_eq!(classify("/.well-known/acme-challenge/abc?x=1&y=/"), Target::Token("abc"));
            for bad in [
                "/.well-known/acme-challenge",
                "/.well-known/acme-challenge/",
                "/.well-known/acme-challenge/?q",
                "/.well-known/acme-challenge/..",
                "/.well-known/acme-challenge/%2e%2e",
                "/.well-known/acme-challenge/a/b",
                "/.well-known/acme-challenge/a/",
                "/.well-known/acme-challenge/a.b",
                "/.well-known/acme-challenge/a=",
                "/.well-known/acme-challenge/ä",
                "/.well-known/acme-challenge/a b",
            ] {
                assert_eq!(classify(bad), Target::Malformed, "{bad}");
            }
            let longest = format!("{PREFIX}{}", "a".repeat(MAX_TOKEN_LEN));
            assert!(matches!(classify(&longest), Target::Token(_)));
            let too_long = format!("{PREFIX}{}", "a".repeat(MAX_TOKEN_LEN + 1));
            assert_eq!(classify(&too_long), Target::Malformed);
        }
    }

    both_targets_test! {
        fn request_host_strips_port_case_and_dot() {
            assert_eq!(request_host("WWW.Example.com:8080"), "www.example.com");
            assert_eq!(request_host("www.example.com."), "www.example.com");
            assert_eq!(request_host("[2001:db8::1]:80"), "2001:db8::1");
            assert_eq!(request_host("2001:db8::1"), "2001:db8::1");
            assert_eq!(request_host("127.0.0.1:5002"), "127.0.0.1");
        }
    }

    both_targets_test! {
        fn other_paths_and_pathless_requests_pass_without_a_lookup() {
            for r in [req("POST", "/api/v1", None), get("/.well-known/acme-challengeX/tok")] {
                assert_eq!(decide(&config(""), &r, |_| panic!("lookup")), Decision::Pass);
            }
            let pathless = RequestHeaders { path: None, ..get("/") };
            assert_eq!(decide(&config(""), &pathless, |_| panic!("lookup")), Decision::Pass);
        }
    }

    both_targets_test! {
        fn known_token_is_served_as_text() {
            let Decision::Answer(a) = decide(&config(""), &get("/.well-known/acme-challenge/tok"), known) else {
                panic!()
            };
            assert_eq!(a.status, 200);
            assert_eq!(a.body.as_deref(), Some("tok.thumb"));
            assert!(a.headers.contains(&("content-type", "text/plain")));
            assert_eq!(a.outcome, Outcome::Served);
        }
    }

    both_targets_test! {
        fn head_has_no_body() {
            let head = req("HEAD", "/.well-known/acme-challenge/tok", Some("www.example.com"));
            let Decision::Answer(a) = decide(&config(""), &head, known) else {
                panic!()
            };
            assert_eq!((a.status, a.body), (200, None));
        }
    }

    both_targets_test! {
        fn other_methods_get_405_with_allow() {
            for m in ["POST", "PUT", "DELETE", "OPTIONS", "get", ""] {
                let r = req(m, "/.well-known/acme-challenge/tok", Some("www.example.com"));
                let Decision::Answer(a) = decide(&config(""), &r, known) else {
                    panic!()
                };
                assert_eq!(a.status, 405, "{m}");
                assert_eq!(a.headers, vec![("allow", "GET, HEAD")]);
                assert_eq!(a.outcome, Outcome::Rejected);
            }
        }
    }

    both_targets_test! {
        fn unknown_and_malformed_tokens_get_404() {
            let Decision::Answer(a) = decide(&config(""), &get("/.well-known/acme-challenge/nope"), known) else {
                panic!()
            };
            assert_eq!((a.status, a.outcome), (404, Outcome::NotFound));
            let Decision::Answer(a) = decide(&config(""), &get("/.well-known/acme-challenge/.."), |_| panic!("lookup")) else {
                panic!()
            };
            assert_eq!((a.status, a.outcome), (404, Outcome::Rejected));
        }
    }

    both_targets_test! {
        fn host_check_compares_identifier() {
            let path = "/.well-known/acme-challenge/tok";
            for (authority, status) in [
                (Some("www.example.com"), 200),
                (Some("WWW.EXAMPLE.COM:80"), 200),
                (Some("www.example.com.:8080"), 200),
                (Some("evil.example.com"), 404),
                (Some("example.com"), 404),
                (None, 404),
            ] {
                let r = req("GET", path, authority);
                let Decision::Answer(a) = decide(&config(""), &r, known) else { panic!() };
                assert_eq!(a.status, status, "{authority:?}");
            }
            let off = config(r#","host_check":false"#);
            let r = req("GET", path, Some("evil.example.com"));
            let Decision::Answer(a) = decide(&off, &r, known) else { panic!() };
            assert_eq!(a.status, 200);
        }
    }

    both_targets_test! {
        fn stateless_mode_answers_any_wellformed_token() {
            let c = config(r#","account_thumbprint":"0123456789abcdefghijklmnopqrstuvwxyzABCDEFG""#);
            let Decision::Answer(a) = decide(&c, &get("/.well-known/acme-challenge/anything"), |_| None) else {
                panic!()
            };
            assert_eq!(a.status, 200);
            assert_eq!(a.body.as_deref(), Some("anything.0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"));
            let Decision::Answer(a) = decide(&c, &get("/.well-known/acme-challenge/a.b"), |_| None) else {
                panic!()
            };
            assert_eq!(a.status, 404);
        }
    }
}
