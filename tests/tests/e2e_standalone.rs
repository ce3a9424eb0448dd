//! End to end, as a standalone user lives it: Pebble as the CA, the agent
//! binary, the filter in real Envoys (`--concurrency 2`), certificates served
//! by SNI from the agent's SDS files. Every process is real; ports are free
//! ones, so these tests run in parallel.

use std::net::SocketAddr;
use std::time::Duration;

use acme_tests::agent::wait_for;
use acme_tests::envoy::{TlsSession, free_addr};
use acme_tests::http::{self, Connection};
use acme_tests::pebble;
use acme_tests::world::{World, public_key_of};

const WWW: (&str, &[&str]) = ("www", &["www.example.com", "example.com"]);
const API: (&str, &[&str]) = ("api", &["api.example.com"]);
const SHOP: (&str, &[&str]) = ("shop", &["shop.example.com"]);

fn filter_stat(world: &World, node: usize, name: &str) -> i64 {
    world
        .envoy(node)
        .stat(&format!("wasmcustom.acme_filter.{name}"))
        .unwrap()
        .unwrap_or(0)
}

/// A challenge the agent currently publishes: (token, identifier, key
/// authorization), read from its sync API the way a filter reads it.
fn published_challenge(world: &World, identifier_suffix: &str) -> (String, String, String) {
    wait_for(
        Duration::from_secs(20),
        "a published challenge",
        || {
            let body = world
                .api_get("/v1/challenges?version=0&wait=0")
                .ok()?
                .text();
            let value: serde_json::Value = serde_json::from_str(&body).ok()?;
            value["challenges"].as_array()?.iter().find_map(|c| {
                let identifier = c["identifier"].as_str()?;
                identifier.ends_with(identifier_suffix).then(|| {
                    (
                        c["token"].as_str().unwrap_or_default().to_owned(),
                        identifier.to_owned(),
                        c["key_authorization"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    )
                })
            })
        },
        || world.context(),
    )
    .unwrap()
}

/// An address nothing listens on: a self-check against it fails for its whole
/// 10 s deadline, which keeps an order's challenges published that long.
fn dead_addr() -> SocketAddr {
    free_addr().unwrap()
}

#[test]
fn fresh_start_serves_three_certificates_by_sni_and_a_new_domain_without_restarts() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[WWW, API, SHOP]).write_config();
    world.start_agent();
    world.add_envoy(&["www", "api", "shop"], 2);
    for (name, domains) in [WWW, API, SHOP] {
        world.wait_issued(name, 1.0);
        for domain in domains {
            let served = world.wait_served(0, domain);
            assert_eq!(
                public_key_of(&served, "x509"),
                public_key_of(&world.issued_pem(name).0, "x509"),
                "{domain} is served {name}'s certificate"
            );
        }
    }
    // Pebble validated 4 names through Envoy's port; only the filter answered.
    let served = filter_stat(&world, 0, "challenges_served");
    assert!(served >= 4, "filter answered {served} validations");
    assert_eq!(
        world
            .upstream_challenges
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a challenge reached the upstream"
    );

    // Add a domain to a certificate by editing the agent's config: ordered,
    // written, and served by the same Envoy and the same agent.
    let agent_pid = world.agent().pid();
    let reloads = world
        .envoy(0)
        .stat("sds.www.update_success")
        .unwrap()
        .unwrap_or(0);
    world
        .certificates(&[
            (
                "www",
                &["www.example.com", "example.com", "new.example.com"],
            ),
            API,
            SHOP,
        ])
        .write_config();
    world.wait_issued("www", 2.0);
    world.wait_served(0, "new.example.com");
    world.wait_served(0, "example.com");
    assert_eq!(world.agent().pid(), agent_pid);
    assert!(
        world
            .envoy(0)
            .stat("sds.www.update_success")
            .unwrap()
            .unwrap_or(0)
            > reloads
    );
}

#[test]
fn a_forced_renewal_is_served_and_an_open_connection_survives_the_swap() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[WWW]).write_config();
    world.start_agent();
    world.add_envoy(&["www"], 2);
    world.wait_issued("www", 1.0);
    let before = public_key_of(&world.wait_served(0, "www.example.com"), "x509");

    let https = world.nodes[0].https;
    let mut session = TlsSession::open(https, "www.example.com").unwrap();
    let first = session.get("/", "www.example.com").unwrap();
    assert_eq!((first.status, first.text().as_str()), (200, "tls ok"));

    let out = world.cli(&["renew", "www"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("renewing www"));
    world.wait_issued("www", 2.0);
    let renewed = wait_for(
        Duration::from_secs(30),
        "the renewed certificate on a new handshake",
        || {
            let key = public_key_of(&world.wait_served(0, "www.example.com"), "x509");
            (key != before).then_some(key)
        },
        || world.context(),
    )
    .unwrap();
    assert_eq!(renewed, public_key_of(&world.issued_pem("www").0, "x509"));

    // The connection opened before the swap still answers.
    let second = session.get("/", "www.example.com").unwrap();
    assert_eq!((second.status, second.text().as_str()), (200, "tls ok"));

    // Unknown names are refused with a clear message.
    let out = world.cli(&["renew", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

#[test]
fn two_envoys_answer_every_token_on_every_worker_and_pebble_validates_through_either() {
    let mut world = World::new(pebble::Options::default());
    // Hold the first order at its self-check so its token stays published.
    world.self_check = Some(dead_addr());
    world.certificates(&[API]).write_config();
    world.start_agent();
    world.add_envoy(&["api"], 2);
    world.add_envoy(&["api"], 2);

    let (token, identifier, key_authorization) = published_challenge(&world, "example.com");
    let path = format!("/.well-known/acme-challenge/{token}");
    for node in 0..2 {
        let listen = world.nodes[node].http;
        wait_for(
            Duration::from_secs(30),
            "the token synced",
            || {
                http::get(listen, &path, &identifier)
                    .ok()
                    .filter(|r| r.status == 200)
            },
            || world.envoy(node).log(),
        )
        .unwrap();
        // Eight connections open at once: the exact balance gives each worker four.
        let mut connections: Vec<Connection> =
            (0..8).map(|_| Connection::open(listen).unwrap()).collect();
        for connection in &mut connections {
            let r = connection.send("GET", &path, &identifier, false).unwrap();
            assert_eq!(r.status, 200, "node {node}");
            assert_eq!(r.text(), key_authorization);
        }
        drop(connections);
        let prefix = format!("listener.{listen}.worker_").replace(':', "_");
        for worker in 0..2 {
            let cx = world
                .envoy(node)
                .stat(&format!("{prefix}{worker}.downstream_cx_total"))
                .unwrap()
                .unwrap_or(0);
            assert!(cx >= 2, "node {node} worker {worker}: {cx} connections");
        }
    }

    // Self-check through the second Envoy while Pebble validates through the first.
    world.self_check = Some(world.nodes[1].http);
    world.write_config();
    world.wait_issued("api", 1.0);
    world.wait_served(0, "api.example.com");
    world.wait_served(1, "api.example.com");

    // Pebble now validates through the second Envoy.
    let second = world.nodes[1].http.port();
    world.pebble.set_http_port(second).unwrap();
    world.pebble.restart().unwrap();
    let served_before = filter_stat(&world, 1, "challenges_served");
    world.certificates(&[API, WWW]).write_config();
    world.wait_issued("www", 1.0);
    world.assert_valid("www", WWW.1);
    assert!(filter_stat(&world, 1, "challenges_served") > served_before);
}

#[test]
fn agent_killed_and_restarted_reuses_everything_while_envoy_keeps_serving() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[WWW, API]).write_config();
    world.start_agent();
    world.add_envoy(&["www", "api"], 2);
    world.wait_issued("www", 1.0);
    world.wait_issued("api", 1.0);
    world.wait_served(0, "api.example.com");
    let root = world.pebble.issuing_root().unwrap();
    let https = world.nodes[0].https;

    world.agent.as_mut().unwrap().kill();
    // Envoy serves while the agent is gone ...
    for sni in ["www.example.com", "api.example.com"] {
        let chain = acme_tests::envoy::served_chain(https, sni).unwrap();
        pebble::verify_chain(&chain, &root, sni).unwrap();
    }
    world.start_agent();
    world.wait_scheduled();
    // ... and the new agent process neither registers nor orders.
    world.assert_nothing_registered_or_ordered();
    for sni in ["www.example.com", "example.com", "api.example.com"] {
        let chain = acme_tests::envoy::served_chain(https, sni).unwrap();
        pebble::verify_chain(&chain, &root, sni).unwrap();
    }
}

#[test]
fn restarted_envoy_serves_the_existing_certificates_at_once() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[WWW, API]).write_config();
    world.start_agent();
    world.add_envoy(&["www", "api"], 2);
    world.wait_issued("www", 1.0);
    world.wait_issued("api", 1.0);
    let root = world.pebble.issuing_root().unwrap();

    world.stop_envoy(0);
    world.start_envoy(0);
    // The first handshake after ready already has the CA's certificate.
    let https = world.nodes[0].https;
    for sni in ["www.example.com", "api.example.com"] {
        let chain = acme_tests::envoy::served_chain(https, sni).unwrap();
        pebble::verify_chain(&chain, &root, sni).unwrap();
    }
    assert_eq!(
        world.metric("acme_agent_orders_total", &["result=\"success\""]),
        2.0
    );
}

#[test]
fn with_the_agent_down_envoy_keeps_serving_and_the_filter_resyncs_by_itself() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[API]).write_config();
    world.start_agent();
    world.add_envoy(&["api"], 2);
    world.wait_issued("api", 1.0);

    // A held order (dead self-check target) gives the filter a known token.
    world.self_check = Some(dead_addr());
    world.certificates(&[API, WWW]).write_config();
    let (token, identifier, key_authorization) = published_challenge(&world, "example.com");
    let listen = world.nodes[0].http;
    let path = format!("/.well-known/acme-challenge/{token}");
    let answer = || http::get(listen, &path, &identifier).unwrap();
    wait_for(
        Duration::from_secs(30),
        "token synced",
        || (answer().status == 200).then_some(()),
        || world.context(),
    )
    .unwrap();

    let failures = filter_stat(&world, 0, "sync_failure");
    world.agent.as_mut().unwrap().kill();
    world
        .envoy(0)
        .wait_stat_at_least(
            "wasmcustom.acme_filter.sync_failure",
            failures + 1,
            Duration::from_secs(10),
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let r = answer();
    assert_eq!((r.status, r.text()), (200, key_authorization.clone()));
    world.wait_served(0, "api.example.com");

    // The agent comes back (self-check fixed): the filter resyncs on its own,
    // dropping the old token, and the new order goes through.
    world.self_check = Some(listen);
    world.write_config();
    let successes = filter_stat(&world, 0, "sync_success");
    world.start_agent();
    wait_for(
        Duration::from_secs(30),
        "the filter resynced from the new agent",
        || {
            (filter_stat(&world, 0, "sync_success") > successes && answer().status == 404)
                .then_some(())
        },
        || world.context(),
    )
    .unwrap();
    world.wait_issued("www", 1.0);
    world.wait_served(0, "api.example.com");
}
