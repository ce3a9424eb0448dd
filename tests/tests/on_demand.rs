//! On-demand TLS with the agent binary, the real Pebble, the filter on a
//! plain-HTTP Envoy answering the validations, and an on-demand Envoy fed by
//! the agent's SDS server: the first handshake for an allowed name is held
//! while the agent orders its certificate, then completes with it; a name
//! the policy does not allow fails at once and orders nothing; the hourly cap
//! holds; after a restart the on-demand certificates are served again
//! without a new order.

use std::time::{Duration, Instant};

use acme_tests::envoy::{Envoy, free_addr, on_demand_bootstrap, served_chain};
use acme_tests::pebble;
use acme_tests::tls_probe::handshake;
use acme_tests::world::World;

fn verified(https: std::net::SocketAddr, sni: &str, root: &str) -> bool {
    served_chain(https, sni).is_ok_and(|c| pebble::verify_chain(&c, root, sni).is_ok())
}

#[test]
fn allowed_names_get_a_certificate_at_their_first_handshake_and_others_nothing() {
    let mut world = World::new(pebble::Options::default());
    let sds = world.work.path().join("run/sds.sock");
    world.extra_config = format!(
        "[sds]\nlisten = \"unix:{}\"\n\n[on_demand]\nallow = [\"*.shop.example.com\"]\nmax_wait_seconds = 20\nmax_per_hour = 3\n",
        sds.display()
    );
    world
        .certificates(&[("www", &["www.example.com"])])
        .write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &sds), admin, 2).unwrap();
    world.wait_issued("www", 1.0);

    // One handshake for a new allowed name: held, then completed with the
    // certificate issued meanwhile.
    let asked = Instant::now();
    let leaf = handshake(https, "a.shop.example.com", Duration::from_secs(25)).unwrap();
    let took = asked.elapsed();
    assert!(
        leaf.is_some(),
        "the first handshake got no certificate\n{}\n{}",
        world.context(),
        envoy.log()
    );
    println!("first handshake for a new on-demand name: {took:?} (ordered and issued meanwhile)");
    let root = world.pebble.issuing_root().unwrap();
    assert!(verified(https, "a.shop.example.com", &root));
    assert_eq!(
        world.metric(
            "acme_agent_orders_total",
            &[
                "certificate=\"od-a_shop_example_com\"",
                "result=\"success\""
            ]
        ),
        1.0
    );

    // Not allowed: refused at once, nothing ordered or stored.
    let asked = Instant::now();
    assert_eq!(
        handshake(https, "evil.example.org", Duration::from_secs(5)).unwrap(),
        None
    );
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert_eq!(
        handshake(https, "a.b.shop.example.com", Duration::from_secs(5)).unwrap(),
        None
    );
    let stored: Vec<String> = std::fs::read_dir(world.state_dir().join("certificates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        stored
            .iter()
            .all(|n| n.starts_with("www") || n.starts_with("od-a_shop")),
        "{stored:?}"
    );

    // The hourly cap: two more allowed names, then a refusal.
    for name in ["b.shop.example.com", "c.shop.example.com"] {
        assert!(
            handshake(https, name, Duration::from_secs(25))
                .unwrap()
                .is_some(),
            "{name}"
        );
    }
    assert_eq!(
        handshake(https, "d.shop.example.com", Duration::from_secs(5)).unwrap(),
        None
    );
    assert_eq!(
        world.metric("acme_agent_orders_total", &["result=\"success\""]),
        4.0
    );

    // A restart serves the on-demand certificates again, ordering nothing.
    world.agent.as_mut().unwrap().kill();
    world.start_agent();
    acme_tests::agent::wait_for(
        Duration::from_secs(20),
        "on-demand certificates served after the restart",
        || {
            [
                "a.shop.example.com",
                "b.shop.example.com",
                "c.shop.example.com",
            ]
            .iter()
            .all(|n| verified(https, n, &root))
            .then_some(())
        },
        || world.context(),
    )
    .unwrap();
    world.assert_nothing_registered_or_ordered();
    assert!(
        world
            .status_line("od-a_shop_example_com")
            .contains("a.shop.example.com")
    );
}

/// The `ask` URL decides alone when no `allow` list is set: a 200 allows,
/// anything else refuses at once, and a refused name is not asked again.
#[test]
fn the_ask_url_decides_and_refusals_are_not_asked_twice() {
    use std::sync::{Arc, Mutex};

    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&asked);
    let ask = acme_tests::http::Server::start(move |request| {
        let domain = request.query("domain").unwrap_or_default().to_owned();
        seen.lock().unwrap().push(domain.clone());
        if domain == "ok.example.net" {
            acme_tests::http::Reply::new(200, "yes")
        } else {
            acme_tests::http::Reply::new(403, "no")
        }
    })
    .unwrap();
    let mut world = World::new(pebble::Options::default());
    let sds = world.work.path().join("run/sds.sock");
    world.extra_config = format!(
        "[sds]\nlisten = \"unix:{}\"\n\n[on_demand]\nask = \"http://{}/allowed\"\nmax_wait_seconds = 20\n",
        sds.display(),
        ask.addr()
    );
    world.certificates(&[]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let _envoy = Envoy::start(&on_demand_bootstrap(https, admin, &sds), admin, 1).unwrap();

    assert!(
        handshake(https, "ok.example.net", Duration::from_secs(25))
            .unwrap()
            .is_some()
    );
    for _ in 0..3 {
        let asked_at = Instant::now();
        assert_eq!(
            handshake(https, "no.example.net", Duration::from_secs(5)).unwrap(),
            None
        );
        assert!(asked_at.elapsed() < Duration::from_secs(3));
    }
    let asked = asked.lock().unwrap().clone();
    assert_eq!(
        asked.iter().filter(|d| *d == "no.example.net").count(),
        1,
        "{asked:?}"
    );
    assert_eq!(world.metric("acme_agent_orders_total", &[]), 1.0);
}
