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

/// Two pollers overlap when the first goes quiet long enough to lose the lease
/// with its long-poll still out: the second takes over and syncs a newer set,
/// then the first one's late answer (an older snapshot) arrives. Only the lease
/// holder applies data or polls, checked when the answer arrives, and a token
/// of the newer set is never removed by the older answer.
#[test]
fn a_late_answer_to_a_former_poller_is_dropped_and_it_does_not_poll_again() {
    let envoy = Envoy::new();
    let mut vms: Vec<(Vm, u32)> = (0..2).map(|_| envoy.worker(&config(""))).collect();
    // Whoever polled first holds the lease; its long-poll stays out.
    let mut first_call = None;
    for _ in 0..5 {
        envoy.process.advance_ms(100);
        for (i, (vm, root)) in vms.iter_mut().enumerate() {
            vm.tick(*root).unwrap();
            for call in vm.take_http_calls() {
                first_call.get_or_insert((i, call));
            }
        }
    }
    let (old, old_call) = first_call.expect("a poller");
    let new = 1 - old;

    // The old poller's worker stalls past the lease TTL; the other takes over
    // and syncs version 20: tokens a and b.
    let mut taken_over = None;
    for _ in 0..30 {
        envoy.process.advance_ms(100);
        let (vm, root) = &mut vms[new];
        vm.tick(*root).unwrap();
        if let Some(call) = vm.take_http_calls().into_iter().next() {
            taken_over = Some(call);
            break;
        }
    }
    let new_call = taken_over.expect("the other context takes over");
    {
        let (vm, _) = &mut vms[new];
        vm.respond(
            &new_call,
            Some((
                200,
                snapshot_json(20, &[("a", "h.test"), ("b", "h.test")]).as_bytes(),
            )),
        )
        .unwrap();
        let _ = vm.take_http_calls();
    }

    // The stalled worker's long-poll answers late, with an older set (only a).
    {
        let (vm, _) = &mut vms[old];
        vm.respond(
            &old_call,
            Some((200, snapshot_json(15, &[("a", "h.test")]).as_bytes())),
        )
        .unwrap();
        assert!(
            vm.take_http_calls().is_empty(),
            "the former poller polled again on a leader flag from its last tick"
        );
    }
    for (vm, root) in vms.iter_mut() {
        let r = answered(get(vm, *root, "/.well-known/acme-challenge/b", "h.test"));
        assert_eq!(
            r.status, 200,
            "token b of the newer set was removed by the late answer"
        );
    }
    assert_eq!(
        envoy.process.shared_data("acme/v1/version").as_deref(),
        Some(b"20".as_slice())
    );

    // And the former poller stays quiet on its next ticks: one poller.
    let (vm, root) = &mut vms[old];
    envoy.process.advance_ms(100);
    vm.tick(*root).unwrap();
    assert!(vm.take_http_calls().is_empty());
}

/// Even the lease holder never stores an answer older than what it holds
/// from the same agent instance (a late answer), and asks again only after
/// its backoff.
#[test]
fn the_poller_keeps_a_newer_stored_set_over_an_older_answer() {
    let envoy = Envoy::new();
    let (mut vm, root, call) = synced_worker_with_call(&envoy, &config(""), &[("a", "h.test")]);
    let stored = envoy.process.shared_data("acme/v1/version").unwrap();
    let stored: u64 = String::from_utf8(stored).unwrap().parse().unwrap();
    vm.respond(
        &call,
        Some((200, snapshot_json(stored - 1, &[]).as_bytes())),
    )
    .unwrap();
    let r = answered(get(
        &mut vm,
        root,
        "/.well-known/acme-challenge/a",
        "h.test",
    ));
    assert_eq!(r.status, 200);
    // A stale answer is not asked again at once (an agent that keeps
    // answering old data would have the filter spin), but after the backoff.
    assert!(vm.take_http_calls().is_empty(), "asked again at once");
    envoy.process.advance_ms(100);
    vm.tick(root).unwrap();
    let next = vm.take_http_calls();
    assert_eq!(next.len(), 1, "the poller goes on");
    assert_eq!(
        next[0].header(":path"),
        Some(format!("/v1/challenges?version={stored}&wait=30").as_str())
    );
}
