//! Behaviour 6 on the built `.wasm`: configuration parsed once in
//! `on_configure`; bad configuration refused with a log line naming the field.

mod support;

use std::sync::Arc;

use acme_tests::filter_module;
use acme_tests::proxy_wasm_host::{Process, Vm};
use support::*;

fn configure(config: &str) -> (bool, Vec<String>) {
    let (engine, module) = filter_module().unwrap();
    let mut vm = Vm::load(&engine, &module, Process::new(START_MS, &[CLUSTER])).unwrap();
    let (_, ok) = vm
        .start_root(config.as_bytes())
        .expect("on_configure must not trap");
    let logs = vm.logs().iter().map(|l| l.message.to_owned()).collect();
    (ok, logs)
}

#[test]
fn bad_configuration_is_refused_naming_the_field() {
    let cases = [
        ("", "configuration"),
        ("   ", "configuration"),
        ("not json", "configuration"),
        (r#"["acme_agent"]"#, "configuration"),
        ("{}", "agent_cluster"),
        (
            r#"{"agent_cluster":"a","agent_clustr":"b"}"#,
            "agent_clustr",
        ),
        (r#"{"agent_cluster":42}"#, "agent_cluster"),
        (
            r#"{"agent_cluster":"a","poll_wait_seconds":0}"#,
            "poll_wait_seconds",
        ),
        (
            r#"{"agent_cluster":"a","poll_wait_seconds":"30"}"#,
            "poll_wait_seconds",
        ),
        (
            r#"{"agent_cluster":"a","backoff_initial_ms":1}"#,
            "backoff_initial_ms",
        ),
        (
            r#"{"agent_cluster":"a","backoff_max_ms":50}"#,
            "backoff_max_ms",
        ),
        (
            r#"{"agent_cluster":"a","max_sync_bytes":1}"#,
            "max_sync_bytes",
        ),
        (r#"{"agent_cluster":"a","host_check":1}"#, "host_check"),
        (
            r#"{"agent_cluster":"a","account_thumbprint":"abc"}"#,
            "account_thumbprint",
        ),
        (
            r#"{"agent_cluster":"a","agent_token":"a\nb"}"#,
            "agent_token",
        ),
    ];
    for (config, field) in cases {
        let (ok, logs) = configure(config);
        assert!(!ok, "{config:?} was accepted");
        assert_eq!(
            logs.len(),
            1,
            "{config:?}: expected one log line, got {logs:?}"
        );
        assert!(
            logs[0].contains(field),
            "{config:?}: log line {:?} does not name {field}",
            logs[0]
        );
    }
}

#[test]
fn good_configuration_starts_syncing_at_once_with_a_tick() {
    let process = Process::new(START_MS, &[CLUSTER]);
    let (engine, module) = filter_module().unwrap();
    let mut vm = Vm::load(&engine, &module, Arc::clone(&process)).unwrap();
    let (root, ok) = vm
        .start_root(format!(r#"{{"agent_cluster":"{CLUSTER}","agent_token":"t0k"}}"#).as_bytes())
        .unwrap();
    assert!(ok);
    assert_eq!(vm.tick_period_ms(root), Some(100));
    // The first poll goes out on the first tick.
    assert!(vm.take_http_calls().is_empty());
    process.advance_ms(100);
    vm.tick(root).unwrap();
    let calls = vm.take_http_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].header(":path"),
        Some("/v1/challenges?version=0&wait=30")
    );
    // The token is proven, never sent.
    let proof = calls[0].header("authorization").unwrap();
    let presented = acme_agent::api::auth::parse(proof).unwrap();
    assert!(acme_agent::api::auth::verify_request(
        "t0k",
        &presented,
        "GET",
        "/v1/challenges?version=0&wait=30"
    ));
    assert!(!proof.contains("t0k"));
    // Every documented metric exists from the start, at zero.
    for name in [
        "challenges_served",
        "challenges_not_found",
        "challenges_rejected",
        "sync_success",
        "sync_failure",
        "tokens_known",
    ] {
        assert_eq!(
            process.metric(&format!("acme_filter.{name}")),
            Some(0),
            "{name}"
        );
    }
}

#[test]
fn stateless_only_configuration_sets_no_timer_and_calls_nobody() {
    let (engine, module) = filter_module().unwrap();
    let mut vm = Vm::load(&engine, &module, Process::new(START_MS, &[])).unwrap();
    let (root, ok) = vm
        .start_root(format!(r#"{{"account_thumbprint":"{}"}}"#, acme_tests::THUMBPRINT).as_bytes())
        .unwrap();
    assert!(ok);
    assert_eq!(vm.tick_period_ms(root), None);
    assert!(vm.take_http_calls().is_empty());
}

/// A root context whose configuration was refused never serves, and a
/// request reaching it anyway passes untouched instead of killing the VM (the
/// SDK panics when no HTTP context is created).
#[test]
fn request_under_an_unconfigured_root_passes_without_a_trap() {
    let (engine, module) = filter_module().unwrap();
    let mut vm = Vm::load(&engine, &module, Process::new(START_MS, &[CLUSTER])).unwrap();
    let (root, ok) = vm.start_root(b"{}").unwrap();
    assert!(!ok);
    let outcome = vm
        .request(
            root,
            &[
                (":method", "GET"),
                (":path", "/.well-known/acme-challenge/tok"),
                (":authority", "www.example.com"),
            ],
        )
        .expect("the request must not trap");
    assert_eq!(
        outcome,
        acme_tests::proxy_wasm_host::RequestOutcome::Continue
    );
}
