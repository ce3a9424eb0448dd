//! Two agent replicas against one fake Kubernetes API server
//! (`acme_tests::fake_kube`, a fake because no API server can run here; its
//! Leases have the optimistic concurrency leader election relies on), with
//! the real Pebble and a real Envoy whose `acme_agent` cluster health-checks
//! both replicas' `/readyz`, as a Service routes only to ready pods. The
//! Lease holder orders; the other orders nothing and is not ready. SIGKILL
//! the holder: the other takes over within the Lease's duration and the
//! filter, now syncing from it, answers its challenges. SIGSTOP the holder
//! past its Lease: the other takes over, and the paused one places no order
//! after it wakes, and stops.

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

fn orders_placed(log: &str) -> usize {
    log.matches("order placed").count()
}

fn chain(kube: &FakeKube) -> String {
    kube.secret(WWW.0)
        .and_then(|s| decoded(&s, "tls.crt"))
        .unwrap_or_default()
}

#[test]
fn the_lease_holder_orders_and_another_replica_takes_over() {
    let mut world = World::new(pebble::Options::default());
    world.kube = Some(FakeKube::start(NS).unwrap());
    world.extra_config = format!(
        "[kubernetes.leader_election]\nduration_seconds = {}\n",
        LEASE.as_secs()
    );
    world.certificates(&[WWW]).write_config();
    world.start_agent();
    let a_api = (world.api, world.health);
    wait_for(
        Duration::from_secs(10),
        "replica a holds the Lease",
        || ready(a_api).then_some(()),
        || world.context(),
    )
    .unwrap();
    let (mut b, b_api) = replica(&world, "b", (free_addr().unwrap(), free_addr().unwrap()));

    // Envoy with the filter, its agent cluster over both replicas.
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
    let envoy = Envoy::start(
        &bootstrap_with_agents(
            http,
            admin,
            &filter,
            world.upstream.addr(),
            &[a_api, b_api],
            "",
        ),
        admin,
        2,
    )
    .unwrap();
    world.wait_issued(WWW.0, 1.0);
    let kube = world.kube.as_ref().unwrap();
    let first = chain(kube);
    assert!(!first.is_empty());
    // The other replica: not ready, and it ordered nothing.
    for _ in 0..10 {
        assert!(!ready(b_api), "two replicas ready at once");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(orders_placed(&b.log()), 0, "{}", b.log());
    // A filter that reaches it anyway gets no (empty) set to replace the
    // holder's with.
    let poll = acme_tests::world::signed_get(
        b_api.0,
        "/v1/challenges?version=0&wait=1",
        acme_tests::agent::TEST_TOKEN,
    )
    .unwrap();
    assert_eq!(poll.status, 503);

    // SIGKILL the holder right after a forced renewal is accepted.
    world.renew(WWW.0);
    let killed = Instant::now();
    world.agent.as_mut().unwrap().kill();
    wait_for(
        LEASE + Duration::from_secs(5),
        "replica b takes over",
        || ready(b_api).then_some(()),
        || b.log(),
    )
    .unwrap();
    let failover = killed.elapsed();
    println!("failover after SIGKILL: {failover:?} (Lease {LEASE:?})");
    assert!(failover <= LEASE + Duration::from_secs(3), "{failover:?}");
    // The renewal ends issued and served from the Secret, whichever replica
    // finished it; the filter answers the new holder's challenges meanwhile.
    wait_for(
        Duration::from_secs(30),
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

    // A new replica where a was (a rescheduled pod behind the same
    // Service), a follower; then b paused past its Lease.
    let (mut a, a_api) = replica(&world, "a2", a_api);
    std::thread::sleep(Duration::from_secs(1));
    assert!(!ready(a_api));
    b.signal("STOP").unwrap();
    let paused = Instant::now();
    wait_for(
        LEASE + Duration::from_secs(5),
        "replica a2 takes over from the paused b",
        || ready(a_api).then_some(()),
        || a.log(),
    )
    .unwrap();
    println!("takeover from a paused holder: {:?}", paused.elapsed());
    // While b sleeps, a new certificate is configured: due for both.
    let placed_by_b = orders_placed(&b.log());
    for (path, addrs) in [
        (world.work.path().join("b.toml"), b_api),
        (world.work.path().join("a2.toml"), a_api),
    ] {
        let text = config_at(&world, addrs);
        let text = format!(
            "{text}\n[[certificate]]\nname = \"new-example-com\"\ndomains = [\"new.example.com\"]\n"
        );
        std::fs::write(path, text).unwrap();
    }
    wait_for(
        Duration::from_secs(30),
        "the new certificate issued by a2",
        || {
            kube.secret("new-example-com")
                .and_then(|s| decoded(&s, "tls.crt"))
                .filter(|c| c.contains("BEGIN"))
        },
        || {
            format!(
                "{}\n--- envoy clusters ---\n{}\n--- envoy filter stats ---\n{}\n--- envoy log ---\n{}",
                a.log(),
                envoy.admin_text("/clusters").unwrap_or_default().lines().filter(|l| l.starts_with("acme_agent")).collect::<Vec<_>>().join("\n"),
                envoy.admin_text("/stats?filter=acme_filter").unwrap_or_default(),
                acme_tests::world::tail(&envoy.log(), 40)
            )
        },
    )
    .unwrap();
    // b wakes: it places no order and stops, having lost the Lease.
    b.signal("CONT").unwrap();
    let status = b.wait(Duration::from_secs(15)).unwrap();
    assert!(!status.success(), "{}", b.log());
    let log = b.log();
    assert!(log.contains("lost the Lease"), "{log}");
    assert_eq!(orders_placed(&log), placed_by_b, "{log}");
    assert!(ready(a_api));
    a.kill();
    drop(envoy);
}
