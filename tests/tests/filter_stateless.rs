//! Behaviour 5 on the built `.wasm`: stateless mode answers any well-formed token
//! with `<token>.<thumbprint>`.

mod support;

use acme_tests::THUMBPRINT;
use support::*;

#[test]
fn any_wellformed_token_is_answered_with_the_thumbprint() {
    let envoy = Envoy::new();
    let (mut vm, root) = envoy.worker(&format!(r#"{{"account_thumbprint":"{THUMBPRINT}"}}"#));
    for token in ["abc", "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA", "_-_"] {
        let r = answered(get(
            &mut vm,
            root,
            &format!("/.well-known/acme-challenge/{token}"),
            "any.host",
        ));
        assert_eq!(r.status, 200);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            format!("{token}.{THUMBPRINT}")
        );
    }
    // Malformed tokens are still refused.
    let r = answered(get(
        &mut vm,
        root,
        "/.well-known/acme-challenge/a.b",
        "any.host",
    ));
    assert_eq!(r.status, 404);
    assert_eq!(envoy.metric("challenges_served"), 3);
    assert_eq!(envoy.metric("challenges_rejected"), 1);
}

#[test]
fn synced_tokens_keep_their_host_check_in_stateless_mode() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(
        &envoy,
        &config(&format!(r#","account_thumbprint":"{THUMBPRINT}""#)),
        &[("known", "www.example.com")],
    );
    let r = answered(get(
        &mut vm,
        root,
        "/.well-known/acme-challenge/known",
        "www.example.com",
    ));
    assert_eq!(r.status, 200);
    let r = answered(get(
        &mut vm,
        root,
        "/.well-known/acme-challenge/known",
        "evil.example.com",
    ));
    assert_eq!(r.status, 404);
    let r = answered(get(
        &mut vm,
        root,
        "/.well-known/acme-challenge/other",
        "evil.example.com",
    ));
    assert_eq!(
        r.status, 200,
        "unknown tokens fall back to the stateless answer"
    );
}
