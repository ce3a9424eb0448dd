//! Two agent replicas against one fake Kubernetes API server
//! (`acme_tests::fake_kube`, a fake because no API server can run here; its
//! Leases have the optimistic concurrency leader election relies on), with
//! the real Pebble and a real Envoy whose `acme_agent` cluster health-checks
//! both replicas' `/readyz`, as a Service routes only to ready pods. The
//! Lease holder orders; the other orders nothing and is not ready. SIGKILL
//! the holder: the other takes over within the Lease's duration and the
//! filter, now syncing from it, answers its challenges. SIGSTOP the holder
//! past its Lease: the other takes over, and the paused one places no order
//! after it wakes, and stops. The holder's Lease writes failing (the API
//! server unavailable past the Lease's duration, or a conflicting writer)
//! make it step down. Orders are counted at the CA; times are printed, not
//! asserted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use acme_tests::agent::{Agent, wait_for};
use acme_tests::envoy::{Envoy, bootstrap_with_agents, free_addr, wasm_filter_yaml};
use acme_tests::fake_kube::{FakeKube, decoded};
use acme_tests::world::World;
use acme_tests::{filter_wasm, http, pebble};

const NS: &str = "istio-system";
const WWW: (&str, &[&str]) = ("www-example-com", &["www.example.com"]);
/// The Lease's duration in these tests.
const LEASE: Duration = Duration::from_secs(3);

/// A replica's API and probes addresses.
type Addrs = (SocketAddr, SocketAddr);

fn ready((_, health): Addrs) -> bool {
    http::get(health, "/readyz", "agent").is_ok_and(|r| r.status == 200)
}

/// The world's config with the API and probes at `addrs`.
fn config_at(world: &World, (api, health): Addrs) -> String {
    std::fs::read_to_string(world.config_path())
        .unwrap()
        .replace(&world.api.to_string(), &api.to_string())
        .replace(&world.health.to_string(), &health.to_string())
}

/// Starts another replica: the world's config with its API and probes at `addrs`.
fn replica(world: &World, name: &str, addrs: Addrs) -> (Agent, Addrs) {
    let api = addrs.0;
    let config = world.work.path().join(format!("{name}.toml"));
    std::fs::write(&config, config_at(world, addrs)).unwrap();
    let kubeconfig = world.work.path().join("kubeconfig");
    let agent = Agent::start_with_env(
        &config,
        api,
        &world.work.path().join(format!("{name}.log")),
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("POD_NAME", std::ffi::OsStr::new(name)),
        ],
    )
    .unwrap();
    (agent, addrs)
}

fn chain(kube: &FakeKube) -> String {
    kube.secret(WWW.0)
        .and_then(|s| decoded(&s, "tls.crt"))
        .unwrap_or_default()
}

/// How long a replica may take to notice and take over: generous (the
/// measured time is printed; the Lease is 3 s).
const TAKEOVER: Duration = Duration::from_secs(60);

/// A world in Kubernetes mode with a short Lease; replica a (the world's
/// agent) started and holding it.
fn world_with_a_holder(certificates: &[(&str, &[&str])]) -> World {
    let mut world = World::new(pebble::Options::default());
    world.kube = Some(FakeKube::start(NS).unwrap());
    world.extra_config = format!(
        "[kubernetes.leader_election]\nduration_seconds = {}\n",
        LEASE.as_secs()
    );
    world.certificates(certificates).write_config();
    world.start_agent();
    let a_api = (world.api, world.health);
    wait_for(
        TAKEOVER,
        "replica a holds the Lease",
        || ready(a_api).then_some(()),
        || world.context(),
    )
    .unwrap();
    world
}

/// Envoy with the filter, its agent cluster over both replicas (a Service
/// routing to ready pods).
fn envoy_over(world: &World, replicas: &[Addrs]) -> Envoy {
    let http: SocketAddr = format!("127.0.0.1:{}", world.http_port).parse().unwrap();
    let admin = free_addr().unwrap();
    // A poll held by a holder that stalls ends at poll_wait_seconds + 5:
    // 7 s here (30 s + 5 by default).
    let filter = wasm_filter_yaml(
        &filter_wasm().unwrap(),
        &world
            .filter_config()
            .replace('}', r#","poll_wait_seconds":2}"#),
    );
    Envoy::start(
        &bootstrap_with_agents(http, admin, &filter, world.upstream.addr(), replicas, ""),
        admin,
        2,
    )
    .unwrap()
}

/// The follower is not ready, and the CA saw only the holder's one order
/// (a second would be the follower's); a filter that reaches it anyway gets
/// no (empty) set to replace the holder's with.
fn the_follower_orders_nothing_and_serves_no_set(world: &World, b_api: Addrs) {
    for _ in 0..10 {
        assert!(!ready(b_api), "two replicas ready at once");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(world.pebble.orders_created(), 1, "{}", world.context());
    let poll = acme_tests::world::signed_get(
        b_api.0,
        "/v1/challenges?version=0&wait=1",
        acme_tests::agent::TEST_TOKEN,
    )
    .unwrap();
    assert_eq!(poll.status, 503);
}

/// SIGKILL the holder right after a forced renewal is accepted: the
/// follower takes over; the renewal ends issued and served from the
/// Secret, whichever replica finished it, the filter answering the new
/// holder's challenges meanwhile.
fn a_killed_holder_is_taken_over(world: &mut World, b: &Agent, b_api: Addrs, envoy: &Envoy) {
    let kube = world.kube.as_ref().unwrap();
    let first = chain(kube);
    assert!(!first.is_empty());
    world.renew(WWW.0);
    let killed = Instant::now();
    world.agent.as_mut().unwrap().kill();
    wait_for(
        TAKEOVER,
        "replica b takes over",
        || ready(b_api).then_some(()),
        || b.log(),
    )
    .unwrap();
    println!(
        "failover after SIGKILL: {:?} (Lease {LEASE:?})",
        killed.elapsed()
    );
    let kube = world.kube.as_ref().unwrap();
    wait_for(
        Duration::from_secs(60),
        "the forced renewal issued",
        || (chain(kube) != first).then_some(()),
        || format!("{}\n{}", b.log(), envoy.log()),
    )
    .unwrap();
    let lease = kube.lease("acme-agent").unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap()
            .split('-')
            .next(),
        Some("b")
    );
}

/// What the new holder shows when the new certificate is slow to come.
fn a2_context(a: &Agent, envoy: &Envoy) -> String {
    format!(
        "{}\n--- envoy clusters ---\n{}\n--- envoy filter stats ---\n{}\n--- envoy log ---\n{}",
        a.log(),
        envoy
            .admin_text("/clusters")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("acme_agent"))
            .collect::<Vec<_>>()
            .join("\n"),
        envoy
            .admin_text("/stats?filter=acme_filter")
            .unwrap_or_default(),
        acme_tests::world::tail(&envoy.log(), 40)
    )
}

/// A new replica where a was (a rescheduled pod behind the same Service),
/// a follower; then b paused past its Lease: a2 takes over and issues a
/// certificate configured meanwhile; b wakes, places no order at the CA,
/// and stops, having lost the Lease.
fn a_paused_holder_wakes_to_nothing(world: &World, mut b: Agent, b_api: Addrs, envoy: &Envoy) {
    let kube = world.kube.as_ref().unwrap();
    let (mut a, a_api) = replica(world, "a2", (world.api, world.health));
    std::thread::sleep(Duration::from_secs(1));
    assert!(!ready(a_api));
    b.signal("STOP").unwrap();
    let paused = Instant::now();
    wait_for(
        TAKEOVER,
        "replica a2 takes over from the paused b",
        || ready(a_api).then_some(()),
        || a.log(),
    )
    .unwrap();
    println!("takeover from a paused holder: {:?}", paused.elapsed());
    // While b sleeps, a new certificate is configured: due for both. Its
    // Secret goes into the Role, as an operator adds it.
    kube.grant_secrets(&["new-example-com"]);
    for (path, addrs) in [
        (world.work.path().join("b.toml"), b_api),
        (world.work.path().join("a2.toml"), a_api),
    ] {
        let text = config_at(world, addrs);
        let text = format!(
            "{text}\n[[certificate]]\nname = \"new-example-com\"\ndomains = [\"new.example.com\"]\n"
        );
        std::fs::write(path, text).unwrap();
    }
    wait_for(
        Duration::from_secs(60),
        "the new certificate issued by a2",
        || {
            kube.secret("new-example-com")
                .and_then(|s| decoded(&s, "tls.crt"))
                .filter(|c| c.contains("BEGIN"))
        },
        || a2_context(&a, envoy),
    )
    .unwrap();
    // Nothing is due any more: an order now could only be b's.
    let orders = world.pebble.orders_created();
    b.signal("CONT").unwrap();
    let status = b.wait(Duration::from_secs(60)).unwrap();
    assert!(!status.success(), "{}", b.log());
    let log = b.log();
    assert!(log.contains("lost the Lease"), "{log}");
    assert_eq!(
        world.pebble.orders_created(),
        orders,
        "b ordered after it woke:\n{log}"
    );
    assert!(ready(a_api));
    a.kill();
}

#[test]
fn the_lease_holder_orders_and_another_replica_takes_over() {
    let mut world = world_with_a_holder(&[WWW]);
    let a_api = (world.api, world.health);
    let (b, b_api) = replica(&world, "b", (free_addr().unwrap(), free_addr().unwrap()));
    let envoy = envoy_over(&world, &[a_api, b_api]);
    world.wait_issued(WWW.0, 1.0);
    the_follower_orders_nothing_and_serves_no_set(&world, b_api);
    a_killed_holder_is_taken_over(&mut world, &b, b_api, &envoy);
    a_paused_holder_wakes_to_nothing(&world, b, b_api, &envoy);
    drop(envoy);
}

/// The holder's Lease writes fail (the API server unavailable): one failed
/// renewal is no reason to stop, but once no renewal succeeded for the
/// Lease's duration it steps down (stops, to restart as a follower), and a
/// follower takes over once writes work again.
#[test]
fn a_holder_whose_lease_writes_fail_steps_down() {
    let mut world = world_with_a_holder(&[]);
    let a_api = (world.api, world.health);
    let (b, b_api) = replica(&world, "b", (free_addr().unwrap(), free_addr().unwrap()));
    let kube = world.kube.as_ref().unwrap();
    let writes = kube.lease_writes();
    kube.fail_leases("PUT", 500);
    let puts = || kube.seen().iter().filter(|s| s.method == "PUT").count();
    let before = puts();
    wait_for(
        TAKEOVER,
        "a failed renewal",
        || (puts() > before).then_some(()),
        || world.context(),
    )
    .unwrap();
    assert!(ready(a_api), "stepped down at the first failed write");
    let status = world
        .agent
        .as_mut()
        .unwrap()
        .wait(TAKEOVER)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", world.context()));
    assert!(!status.success(), "{}", world.context());
    assert!(
        world.agent().log().contains("lost the Lease"),
        "{}",
        world.context()
    );
    let kube = world.kube.as_ref().unwrap();
    assert_eq!(kube.lease_writes(), writes, "a write got through");
    assert!(!ready(b_api), "b took a Lease nobody can write");
    kube.heal();
    wait_for(
        TAKEOVER,
        "replica b takes over once writes work",
        || ready(b_api).then_some(()),
        || b.log(),
    )
    .unwrap();
}

/// Another writer changes the Lease under the holder (its next write is
/// refused as stale, 409): the holder steps down at once.
#[test]
fn a_holder_whose_lease_write_conflicts_steps_down_at_once() {
    let mut world = world_with_a_holder(&[]);
    let kube = world.kube.as_ref().unwrap();
    let puts = || kube.seen().iter().filter(|s| s.method == "PUT").count();
    let before = puts();
    kube.fail_leases("PUT", 409);
    let status = world
        .agent
        .as_mut()
        .unwrap()
        .wait(TAKEOVER)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", world.context()));
    assert!(!status.success(), "{}", world.context());
    assert!(
        world.agent().log().contains("lost the Lease"),
        "{}",
        world.context()
    );
    // At once: the first refused write was its last (a failure it took for
    // a passing one would be retried until the Lease's duration ran out).
    let kube = world.kube.as_ref().unwrap();
    assert_eq!(
        kube.seen().iter().filter(|s| s.method == "PUT").count() - before,
        1,
        "{}",
        world.context()
    );
}
