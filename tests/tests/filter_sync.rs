//! Behaviour 4 on the built `.wasm`: long-poll sync with the agent, snapshot
//! replacement, last good data kept on every kind of failure, capped backoff.

mod support;

use acme_tests::proxy_wasm_host::Vm;
use acme_tests::{key_authorization, snapshot_json};
use support::*;

fn status_of(vm: &mut Vm, root: u32, token: &str, host: &str) -> u32 {
    answered(get(
        vm,
        root,
        &format!("/.well-known/acme-challenge/{token}"),
        host,
    ))
    .status
}

#[test]
fn long_poll_request_is_what_the_protocol_says() {
    let envoy = Envoy::new();
    let (mut vm, _root) = envoy.worker(&config(
        r#","agent_token":"s3cret","agent_authority":"agent.internal","poll_wait_seconds":20"#,
    ));
    let call = only_call(&mut vm);
    assert_eq!(call.cluster, CLUSTER);
    assert_eq!(call.header(":method"), Some("GET"));
    assert_eq!(
        call.header(":path"),
        Some("/v1/challenges?version=0&wait=20")
    );
    assert_eq!(call.header(":authority"), Some("agent.internal"));
    let proof = call.header("authorization").unwrap();
    assert!(!proof.contains("s3cret"), "the token is proven, never sent");
    let presented = acme_agent::api::auth::parse(proof).unwrap();
    assert!(acme_agent::api::auth::verify_request(
        "s3cret",
        &presented,
        "GET",
        "/v1/challenges?version=0&wait=20"
    ));
    assert!(
        call.timeout_ms > 20_000,
        "the call outlives the agent's hold: {}",
        call.timeout_ms
    );
}

#[test]
fn each_snapshot_replaces_the_view_and_polls_again_at_once() {
    let envoy = Envoy::new();
    let (mut vm, root) = envoy.worker(&config(""));
    let call = only_call(&mut vm);
    vm.respond(
        &call,
        Some((
            200,
            snapshot_json(7, &[("a", "a.test"), ("b", "b.test")]).as_bytes(),
        )),
    )
    .unwrap();
    assert_eq!(envoy.metric("tokens_known"), 2);
    let call = only_call(&mut vm);
    assert_eq!(
        call.header(":path"),
        Some("/v1/challenges?version=7&wait=30")
    );
    assert_eq!(status_of(&mut vm, root, "a", "a.test"), 200);

    vm.respond(
        &call,
        Some((
            200,
            snapshot_json(8, &[("b", "b.test"), ("c", "c.test")]).as_bytes(),
        )),
    )
    .unwrap();
    assert_eq!(status_of(&mut vm, root, "a", "a.test"), 404, "a is gone");
    assert_eq!(status_of(&mut vm, root, "b", "b.test"), 200);
    assert_eq!(status_of(&mut vm, root, "c", "c.test"), 200);
    assert_eq!(envoy.metric("tokens_known"), 2);
    assert!(
        !envoy
            .process
            .shared_keys()
            .iter()
            .any(|k| k.ends_with("/token/a")),
        "a's entry is emptied: {:?}",
        envoy.process.shared_keys()
    );

    let call = only_call(&mut vm);
    assert_eq!(
        call.header(":path"),
        Some("/v1/challenges?version=8&wait=30")
    );
    // 304: nothing changed; poll again at once with the same version.
    vm.respond(&call, Some((304, b""))).unwrap();
    let call = only_call(&mut vm);
    assert_eq!(
        call.header(":path"),
        Some("/v1/challenges?version=8&wait=30")
    );
    assert_eq!(envoy.metric("sync_success"), 3);
    assert_eq!(envoy.metric("sync_failure"), 0);

    vm.respond(&call, Some((200, snapshot_json(9, &[]).as_bytes())))
        .unwrap();
    assert_eq!(status_of(&mut vm, root, "b", "b.test"), 404);
    assert_eq!(envoy.metric("tokens_known"), 0);
    assert!(
        envoy
            .process
            .shared_keys()
            .iter()
            .all(|k| !k.contains("/token/"))
    );
}

#[test]
fn every_kind_of_bad_response_keeps_the_last_good_data() {
    let envoy = Envoy::new();
    let (mut vm, root, mut call) = synced_worker_with_call(
        &envoy,
        &config(r#","max_sync_bytes":2048"#),
        &[("tok", "h.test")],
    );
    let oversized = snapshot_json(
        5,
        &(0..100)
            .map(|i| {
                (
                    Box::leak(format!("t{i}").into_boxed_str()) as &str,
                    "h.test",
                )
            })
            .collect::<Vec<_>>(),
    );
    assert!(oversized.len() > 2048);
    let bad: Vec<(Option<u16>, Vec<u8>)> = vec![
        (None, vec![]),
        (Some(500), b"oops".to_vec()),
        (Some(401), vec![]),
        (Some(404), vec![]),
        (Some(200), b"<html>not json</html>".to_vec()),
        (Some(200), br#"{"version":3}"#.to_vec()),
        (Some(200), br#"{"version":3,"challenges":[{"token":"../x","key_authorization":"../x.t","identifier":"h"}]}"#.to_vec()),
        (Some(200), oversized.into_bytes()),
    ];
    let mut failures = 0;
    for (status, body) in bad {
        vm.clear_logs();
        vm.respond(&call, status.map(|s| (s, body.as_slice())))
            .unwrap();
        failures += 1;
        assert_eq!(envoy.metric("sync_failure"), failures, "{status:?}");
        let warnings: Vec<_> = vm.logs().into_iter().filter(|l| l.level >= 3).collect();
        assert_eq!(warnings.len(), 1, "one log line per failure: {warnings:?}");
        assert_eq!(
            status_of(&mut vm, root, "tok", "h.test"),
            200,
            "last good data kept after {status:?}"
        );
        assert!(
            vm.take_http_calls().is_empty(),
            "no immediate retry after {status:?}"
        );
        call = next_poll(&envoy, &mut vm, root);
    }
    assert_eq!(envoy.metric("tokens_known"), 1);
    let r = answered(get(
        &mut vm,
        root,
        "/.well-known/acme-challenge/tok",
        "h.test",
    ));
    assert_eq!(r.body, key_authorization("tok").as_bytes());
}

#[test]
fn agent_errors_back_off_exponentially_to_the_cap_and_reset_on_success() {
    let envoy = Envoy::new();
    let (mut vm, root) = envoy.worker(&config(
        r#","backoff_initial_ms":100,"backoff_max_ms":1600"#,
    ));
    let mut call = only_call(&mut vm);
    let mut waits = Vec::new();
    for _ in 0..7 {
        let failed_at = envoy.process.now_ms();
        vm.respond(&call, None).unwrap();
        call = next_poll(&envoy, &mut vm, root);
        waits.push(envoy.process.now_ms() - failed_at);
    }
    assert_eq!(waits, [100, 200, 400, 800, 1600, 1600, 1600]);
    assert_eq!(envoy.metric("sync_failure"), 7);
    // The agent is back: success resets the backoff.
    vm.respond(&call, Some((200, snapshot_json(1, &[]).as_bytes())))
        .unwrap();
    let call = only_call(&mut vm);
    let failed_at = envoy.process.now_ms();
    vm.respond(&call, Some((503, b""))).unwrap();
    next_poll(&envoy, &mut vm, root);
    assert_eq!(envoy.process.now_ms() - failed_at, 100);
}

#[test]
fn unknown_cluster_is_a_failure_with_backoff_not_a_crash() {
    let envoy = Envoy::new();
    let (engine, module) = acme_tests::filter_module().unwrap();
    let mut vm = Vm::load(&engine, &module, std::sync::Arc::clone(&envoy.process)).unwrap();
    let (root, ok) = vm
        .start_root(br#"{"agent_cluster":"no_such_cluster"}"#)
        .unwrap();
    assert!(
        ok,
        "a missing cluster is a runtime condition (it may appear later via CDS)"
    );
    vm.tick(root).unwrap();
    assert!(vm.take_http_calls().is_empty());
    assert_eq!(envoy.metric("sync_failure"), 1);
    // Retries follow the backoff, not every tick.
    for _ in 0..10 {
        envoy.process.advance_ms(100);
        vm.tick(root).unwrap();
    }
    assert_eq!(
        envoy.metric("sync_failure"),
        4,
        "retries at +100, +300, +700 ms"
    );
}

#[test]
fn every_worker_reads_what_the_poller_stored() {
    let envoy = Envoy::new();
    let (mut poller, _) = synced_worker(&envoy, &config(""), &[("tok", "h.test")]);
    let (mut other, other_root) = envoy.worker(&config(""));
    assert!(
        other.take_http_calls().is_empty(),
        "only one poller per process"
    );
    assert_eq!(status_of(&mut other, other_root, "tok", "h.test"), 200);
    let _ = poller.take_http_calls();
}
