//! Behaviour 4 (one poller per process) on the built `.wasm`: Envoy gives each
//! worker its own VM and root context, plus one on the main thread; shared data
//! is process-wide. Exactly one of them polls; another takes over when it stops.

mod support;

use acme_tests::proxy_wasm_host::Vm;
use acme_tests::snapshot_json;
use support::*;

/// Ticks every VM every 100 ms for `ms`; returns how many sync calls each made.
fn run(envoy: &Envoy, vms: &mut [(Vm, u32)], ms: u64) -> Vec<usize> {
    let mut calls = vec![0; vms.len()];
    for _ in 0..ms / 100 {
        envoy.process.advance_ms(100);
        for (i, (vm, root)) in vms.iter_mut().enumerate() {
            vm.tick(*root).unwrap();
            for call in vm.take_http_calls() {
                calls[i] += 1;
                // The agent has nothing new: 304 after the hold.
                vm.respond(&call, Some((304, b""))).unwrap();
            }
        }
    }
    calls
}

fn pollers(calls: &[usize]) -> Vec<usize> {
    calls
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn three_root_contexts_in_three_vms_elect_exactly_one_poller() {
    let envoy = Envoy::new();
    let mut vms: Vec<(Vm, u32)> = (0..3).map(|_| envoy.worker(&config(""))).collect();
    let calls = run(&envoy, &mut vms, 10_000);
    assert_eq!(
        pollers(&calls).len(),
        1,
        "calls per root context: {calls:?}"
    );
}

#[test]
fn three_root_contexts_in_one_vm_elect_exactly_one_poller() {
    let envoy = Envoy::new();
    let (mut vm, first) = envoy.worker(&config(""));
    let (second, ok2) = vm.start_root(config("").as_bytes()).unwrap();
    let (third, ok3) = vm.start_root(config("").as_bytes()).unwrap();
    assert!(ok2 && ok3);
    let mut calls = std::collections::BTreeMap::new();
    for _ in 0..100 {
        envoy.process.advance_ms(100);
        for root in [first, second, third] {
            vm.tick(root).unwrap();
        }
        for call in vm.take_http_calls() {
            *calls.entry(call.root_context).or_insert(0) += 1;
            vm.respond(&call, Some((304, b""))).unwrap();
        }
    }
    assert_eq!(calls.len(), 1, "calls per root context: {calls:?}");
}

#[test]
fn another_takes_over_at_once_when_the_poller_stops() {
    let envoy = Envoy::new();
    let mut vms: Vec<(Vm, u32)> = (0..3).map(|_| envoy.worker(&config(""))).collect();
    let calls = run(&envoy, &mut vms, 1_000);
    let leader = pollers(&calls)[0];
    // The agent published something that the leader stored.
    let (vm, root) = &mut vms[leader];
    envoy.process.advance_ms(100);
    vm.tick(*root).unwrap();
    let _ = vm.take_http_calls();
    vm.stop_root(*root).unwrap();
    let (mut stopped_vm, _) = vms.remove(leader);
    let _ = stopped_vm.take_http_calls();

    envoy.process.set_shared_data("acme/v1/version", b"41");
    envoy.process.advance_ms(100);
    let mut new_calls = Vec::new();
    for (vm, root) in vms.iter_mut() {
        vm.tick(*root).unwrap();
        new_calls.extend(vm.take_http_calls());
    }
    assert_eq!(
        new_calls.len(),
        1,
        "exactly one takes over within a tick of on_done"
    );
    assert_eq!(
        new_calls[0].header(":path"),
        Some("/v1/challenges?version=41&wait=30"),
        "the new poller resumes from the stored version"
    );
}

#[test]
fn a_silent_poller_is_replaced_after_the_lease_goes_stale_and_steps_down_on_return() {
    let envoy = Envoy::new();
    let mut vms: Vec<(Vm, u32)> = (0..3).map(|_| envoy.worker(&config(""))).collect();
    let calls = run(&envoy, &mut vms, 1_000);
    let leader = pollers(&calls)[0];
    let (mut silent, silent_root) = vms.remove(leader);

    // The leader stops ticking without on_done (a stuck worker): nobody takes over
    // before the lease's 2 s TTL, somebody does soon after.
    let calls = run(&envoy, &mut vms, 1_900);
    assert_eq!(calls, [0, 0], "takeover before the lease went stale");
    let calls = run(&envoy, &mut vms, 500);
    assert_eq!(
        pollers(&calls).len(),
        1,
        "exactly one takes over: {calls:?}"
    );

    // The old leader comes back: it finds a live lease that is not its own.
    let _ = silent.take_http_calls();
    envoy.process.advance_ms(100);
    silent.tick(silent_root).unwrap();
    assert!(
        silent.take_http_calls().is_empty(),
        "the old leader must not poll again"
    );
    let mut all = vms;
    all.push((silent, silent_root));
    let calls = run(&envoy, &mut all, 3_000);
    assert_eq!(pollers(&calls).len(), 1, "{calls:?}");
}

#[test]
fn new_tokens_reach_every_worker_after_one_sync() {
    let envoy = Envoy::new();
    let mut vms: Vec<(Vm, u32)> = (0..3).map(|_| envoy.worker(&config(""))).collect();
    let mut synced = false;
    for (vm, _) in vms.iter_mut() {
        for call in vm.take_http_calls() {
            vm.respond(
                &call,
                Some((200, snapshot_json(3, &[("tok", "h.test")]).as_bytes())),
            )
            .unwrap();
            synced = true;
        }
    }
    assert!(synced);
    for (vm, root) in vms.iter_mut() {
        let r = answered(get(vm, *root, "/.well-known/acme-challenge/tok", "h.test"));
        assert_eq!(r.status, 200);
    }
}
