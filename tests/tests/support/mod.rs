//! Shared fixture of the filter behaviour tests: one Envoy process (shared data,
//! metrics, clock) with VMs running the built filter.
#![allow(dead_code)]

use std::sync::Arc;

use acme_tests::proxy_wasm_host::{HttpCall, LocalResponse, Process, RequestOutcome, Vm};
use acme_tests::{filter_module, snapshot_json};

pub const CLUSTER: &str = "acme_agent";
pub const START_MS: u64 = 1_700_000_000_000;

pub fn config(extra: &str) -> String {
    format!(r#"{{"agent_cluster":"{CLUSTER}"{extra}}}"#)
}

pub struct Envoy {
    pub process: Arc<Process>,
}

impl Envoy {
    pub fn new() -> Self {
        Self {
            process: Process::new(START_MS, &[CLUSTER]),
        }
    }

    /// A new worker VM with one root context configured with `config`.
    pub fn worker(&self, config: &str) -> (Vm, u32) {
        let (engine, module) = filter_module().expect("filter builds and compiles");
        let mut vm = Vm::load(&engine, &module, Arc::clone(&self.process)).expect("filter loads");
        let (root, ok) = vm
            .start_root(config.as_bytes())
            .expect("root context starts");
        assert!(ok, "on_configure refused {config}: {:?}", vm.logs());
        vm.tick(root).expect("first tick");
        (vm, root)
    }

    pub fn metric(&self, name: &str) -> i64 {
        self.process
            .metric(&format!("acme_filter.{name}"))
            .unwrap_or_else(|| panic!("metric acme_filter.{name} is not defined"))
    }
}

/// A worker that has synced `challenges` (token, identifier) from the agent; the
/// long-poll it then sent is left pending.
pub fn synced_worker(envoy: &Envoy, config: &str, challenges: &[(&str, &str)]) -> (Vm, u32) {
    let (vm, root, _pending) = synced_worker_with_call(envoy, config, challenges);
    (vm, root)
}

/// [`synced_worker`], also returning the pending long-poll.
pub fn synced_worker_with_call(
    envoy: &Envoy,
    config: &str,
    challenges: &[(&str, &str)],
) -> (Vm, u32, HttpCall) {
    let (mut vm, root) = envoy.worker(config);
    let call = only_call(&mut vm);
    vm.respond(&call, Some((200, snapshot_json(1, challenges).as_bytes())))
        .expect("sync response handled");
    // It polls again at once.
    let pending = only_call(&mut vm);
    (vm, root, pending)
}

/// The one HTTP call dispatched since last asked.
pub fn only_call(vm: &mut Vm) -> HttpCall {
    let mut calls = vm.take_http_calls();
    assert_eq!(
        calls.len(),
        1,
        "expected exactly one sync call, got {calls:?}"
    );
    calls.remove(0)
}

pub fn get(vm: &mut Vm, root: u32, path: &str, authority: &str) -> RequestOutcome {
    request(vm, root, "GET", path, authority)
}

pub fn request(
    vm: &mut Vm,
    root: u32,
    method: &str,
    path: &str,
    authority: &str,
) -> RequestOutcome {
    vm.request(
        root,
        &[
            (":method", method),
            (":path", path),
            (":authority", authority),
            (":scheme", "http"),
        ],
    )
    .expect("request handled without a trap")
}

/// Ticks every 100 ms until a poll goes out and returns that call.
pub fn next_poll(envoy: &Envoy, vm: &mut Vm, root: u32) -> HttpCall {
    for _ in 0..1000 {
        envoy.process.advance_ms(100);
        vm.tick(root).expect("tick");
        if let Some(call) = vm.take_http_calls().pop() {
            return call;
        }
    }
    panic!("no poll within 100 s of ticks");
}

pub fn answered(outcome: RequestOutcome) -> LocalResponse {
    match outcome {
        RequestOutcome::Answered(r) => r,
        RequestOutcome::Continue => panic!("expected a local answer, the request was forwarded"),
    }
}
