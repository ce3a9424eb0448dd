//! Behaviour 1-3 on the built `.wasm`: challenge answers, 404/405 shapes, host
//! check, and untouched pass-through.

mod support;

use acme_tests::key_authorization;
use acme_tests::proxy_wasm_host::RequestOutcome;
use support::*;

const TOKEN: &str = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";
const HOST: &str = "www.example.com";

fn path(token: &str) -> String {
    format!("/.well-known/acme-challenge/{token}")
}

#[test]
fn known_token_is_answered_inline_as_text() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    vm.take_host_calls();
    let r = answered(get(&mut vm, root, &path(TOKEN), HOST));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, key_authorization(TOKEN).as_bytes());
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(envoy.metric("challenges_served"), 1);
    // Each host call that returns data costs Envoy a VM entry to allocate
    // it: an answer reads the headers once and the token once.
    assert_eq!(
        vm.take_host_calls(),
        [
            "proxy_get_header_map_pairs",
            "proxy_get_shared_data",
            "proxy_increment_metric",
            "proxy_send_local_response"
        ]
    );
    // The upstream is never touched: no HTTP call besides the sync long-poll.
    assert!(vm.take_http_calls().is_empty());
}

#[test]
fn query_string_is_ignored() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    let r = answered(get(
        &mut vm,
        root,
        &format!("{}?x=1&y=../z", path(TOKEN)),
        HOST,
    ));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, key_authorization(TOKEN).as_bytes());
}

#[test]
fn head_is_answered_without_body() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    let r = answered(request(&mut vm, root, "HEAD", &path(TOKEN), HOST));
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-type"), Some("text/plain"));
}

#[test]
fn other_methods_get_405_with_allow() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT"] {
        let r = answered(request(&mut vm, root, method, &path(TOKEN), HOST));
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
    }
    assert_eq!(envoy.metric("challenges_rejected"), 6);
    assert_eq!(envoy.metric("challenges_served"), 0);
}

#[test]
fn unknown_token_gets_404_and_is_not_forwarded() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    let r = answered(get(&mut vm, root, &path("unknownToken"), HOST));
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    assert_eq!(envoy.metric("challenges_not_found"), 1);
}

#[test]
fn every_malformed_token_shape_gets_404_and_is_not_forwarded() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    let too_long = "a".repeat(257);
    let shapes = [
        "/.well-known/acme-challenge".to_owned(),
        "/.well-known/acme-challenge/".to_owned(),
        "/.well-known/acme-challenge/?x=1".to_owned(),
        "/.well-known/acme-challenge/..".to_owned(),
        "/.well-known/acme-challenge/../../etc/passwd".to_owned(),
        "/.well-known/acme-challenge/%2e%2e".to_owned(),
        format!("/.well-known/acme-challenge/{TOKEN}%2F"),
        format!("/.well-known/acme-challenge/{TOKEN}/"),
        format!("/.well-known/acme-challenge/{TOKEN}/extra"),
        format!("/.well-known/acme-challenge/{TOKEN}.txt"),
        "/.well-known/acme-challenge/a b".to_owned(),
        "/.well-known/acme-challenge/a+b".to_owned(),
        "/.well-known/acme-challenge/a=".to_owned(),
        "/.well-known/acme-challenge/ünïcode".to_owned(),
        format!("/.well-known/acme-challenge/{too_long}"),
    ];
    for shape in &shapes {
        let r = answered(get(&mut vm, root, shape, HOST));
        assert_eq!(r.status, 404, "{shape}");
    }
    assert_eq!(envoy.metric("challenges_rejected"), shapes.len() as i64);
    // The longest valid token is still a token (unknown here).
    let r = answered(get(&mut vm, root, &path(&"a".repeat(256)), HOST));
    assert_eq!(r.status, 404);
    assert_eq!(envoy.metric("challenges_not_found"), 1);
}

#[test]
fn non_utf8_path_under_prefix_is_404_and_does_not_trap() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    let mut raw = b"/.well-known/acme-challenge/".to_vec();
    raw.extend_from_slice(&[0xff, 0xfe, b'a']);
    let outcome = vm
        .request_bytes(
            root,
            &[
                (":method", b"GET"),
                (":path", &raw),
                (":authority", &[0xc3, 0x28]),
            ],
        )
        .expect("no trap on non-UTF-8 headers");
    assert_eq!(answered(outcome).status, 404);
    // And a known token with a non-UTF-8 host is a host mismatch, not a trap.
    let outcome = vm
        .request_bytes(
            root,
            &[
                (":method", b"GET"),
                (":path", path(TOKEN).as_bytes()),
                (":authority", &[0xff]),
            ],
        )
        .expect("no trap");
    assert_eq!(answered(outcome).status, 404);
}

#[test]
fn host_check_answers_only_the_identifier() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    for (authority, status) in [
        ("www.example.com", 200),
        ("WWW.Example.Com", 200),
        ("www.example.com:80", 200),
        ("www.example.com.", 200),
        ("other.example.com", 404),
        ("example.com", 404),
        ("127.0.0.1", 404),
        ("", 404),
    ] {
        let r = answered(get(&mut vm, root, &path(TOKEN), authority));
        assert_eq!(r.status, status, "{authority:?}");
    }
    assert_eq!(envoy.metric("challenges_rejected"), 4);
    // Without :authority at all.
    let outcome = vm
        .request(root, &[(":method", "GET"), (":path", &path(TOKEN))])
        .unwrap();
    assert_eq!(answered(outcome).status, 404);
}

#[test]
fn host_check_can_be_turned_off() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(r#","host_check":false"#), &[(TOKEN, HOST)]);
    let r = answered(get(&mut vm, root, &path(TOKEN), "anything.example.net"));
    assert_eq!(r.status, 200);
}

#[test]
fn other_requests_pass_untouched_after_one_host_call() {
    let envoy = Envoy::new();
    let (mut vm, root) = synced_worker(&envoy, &config(""), &[(TOKEN, HOST)]);
    vm.take_host_calls();
    for p in [
        "/",
        "/index.html",
        "/.well-known/openid-configuration",
        "/.well-known/acme-challengeX/abc",
        "/api?next=/.well-known/acme-challenge/abc",
    ] {
        assert_eq!(get(&mut vm, root, p, HOST), RequestOutcome::Continue, "{p}");
        assert_eq!(
            vm.take_host_calls(),
            ["proxy_get_header_map_pairs"],
            "{p}: a pass-through request must cost one host call and nothing else"
        );
    }
    // POST to other paths passes too: only the path decides.
    assert_eq!(
        request(&mut vm, root, "POST", "/upload", HOST),
        RequestOutcome::Continue
    );
    assert_eq!(envoy.metric("challenges_served"), 0);
    assert_eq!(envoy.metric("challenges_rejected"), 0);
    assert_eq!(envoy.metric("challenges_not_found"), 0);
}
