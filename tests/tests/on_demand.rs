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
use acme_tests::tls_probe::{Outcome, handshake, outcome};
use acme_tests::world::World;

fn verified(https: std::net::SocketAddr, sni: &str, root: &str) -> bool {
    served_chain(https, sni).is_ok_and(|c| pebble::verify_chain(&c, root, sni).is_ok())
}

/// The handshake for `sni` is refused while a hold would still be holding
/// it: the tests' `max_wait_seconds` is 20, the handshake waits 10.
fn assert_refused_at_once(world: &World, https: std::net::SocketAddr, sni: &str) {
    let asked = Instant::now();
    let got = outcome(https, sni, Duration::from_secs(10)).unwrap();
    assert_eq!(got, Outcome::Refused, "{sni}\n{}", world.context());
    println!("{sni}: refused after {:?}", asked.elapsed());
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
    let orders = world.pebble.orders_created();
    assert_refused_at_once(&world, https, "evil.example.org");
    assert_refused_at_once(&world, https, "a.b.shop.example.com");
    assert_eq!(world.pebble.orders_created(), orders, "the CA saw an order");
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
            "{name}\n{}",
            world.context()
        );
    }
    assert_refused_at_once(&world, https, "d.shop.example.com");
    assert_eq!(
        world.metric("acme_agent_orders_total", &["result=\"success\""]),
        4.0
    );
    assert_eq!(world.pebble.orders_created(), 4, "d.shop was ordered");

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
        assert_refused_at_once(&world, https, "no.example.net");
    }
    let asked = asked.lock().unwrap().clone();
    assert_eq!(
        asked.iter().filter(|d| *d == "no.example.net").count(),
        1,
        "{asked:?}"
    );
    assert_eq!(world.pebble.orders_created(), 1, "the CA saw another order");
}

/// Waits until `what` holds (polled every 100 ms), else fails with the
/// world's context.
fn wait_until(world: &World, timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    acme_tests::agent::wait_for(timeout, what, || done().then_some(()), || world.context())
        .unwrap();
}

fn stored(world: &World, name: &str) -> bool {
    let dir = world.state_dir().join("certificates");
    dir.join(format!("{name}.json")).exists() || dir.join(format!("{name}.status.json")).exists()
}

fn agent_log(world: &World) -> String {
    std::fs::read_to_string(world.work.path().join("agent.log")).unwrap_or_default()
}

/// The idle rule with Envoy: a name in use is withdrawn from SDS halfway
/// through `idle_seconds` and handed back at once by the next handshake (no
/// new order); a name no handshake asks for is removed from storage and SDS
/// (never renewed), and a later handshake for it is a new name.
#[test]
fn names_in_use_are_kept_and_names_nobody_asks_for_are_removed() {
    let mut world = World::new(pebble::Options::default());
    let sds = world.work.path().join("run/sds.sock");
    world.extra_config = format!(
        "[sds]\nlisten = \"unix:{}\"\n\n[on_demand]\nallow = [\"*.shop.example.com\"]\nmax_wait_seconds = 20\nidle_seconds = 6\n",
        sds.display(),
    );
    world.certificates(&[]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &sds), admin, 1).unwrap();
    let root = world.pebble.issuing_root().unwrap();

    let used = handshake(https, "used.shop.example.com", Duration::from_secs(25))
        .unwrap()
        .expect("first handshake for used.shop");
    assert!(
        handshake(https, "once.shop.example.com", Duration::from_secs(25))
            .unwrap()
            .is_some()
    );
    // Past the withdrawal (3 s) and the removal (6 s) of the unused name, the
    // used one is asked for twice a second: every handshake gets the same
    // certificate, withdrawn and handed back meanwhile.
    let until = Instant::now() + Duration::from_secs(9);
    let mut handshakes = 0;
    while Instant::now() < until {
        let leaf = handshake(https, "used.shop.example.com", Duration::from_secs(10)).unwrap();
        assert_eq!(
            leaf.as_ref(),
            Some(&used),
            "handshake {handshakes}\n{}\n{}",
            world.context(),
            envoy.log()
        );
        handshakes += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(verified(https, "used.shop.example.com", &root));
    assert!(
        agent_log(&world).contains("withdrawn until a handshake asks for it"),
        "{}",
        world.context()
    );
    wait_until(
        &world,
        Duration::from_secs(5),
        "the unused name removed",
        || !stored(&world, "od-once_shop_example_com"),
    );
    assert!(stored(&world, "od-used_shop_example_com"));
    assert_eq!(
        world.pebble.orders_created(),
        2,
        "kept without a new order\n{}",
        world.context()
    );

    // Removed means gone from SDS too: the next handshake is a new name.
    assert!(
        handshake(https, "once.shop.example.com", Duration::from_secs(25))
            .unwrap()
            .is_some()
    );
    assert_eq!(world.pebble.orders_created(), 3);
}

/// A name whose validation keeps failing is dropped after `max_failures`
/// orders and refused (also after a restart, without an order); the total
/// cap and the hourly cap hold, the hourly one across a restart; and a
/// restart removes what the policy no longer allows.
#[test]
fn failing_names_are_refused_the_caps_hold_and_restarts_recheck_the_policy() {
    let mut world = World::new(pebble::Options::default());
    world.retry = (1, 1);
    let sds = world.work.path().join("run/sds.sock");
    let on_demand = |allow: &str, max_certificates: u32| {
        format!(
            "[sds]\nlisten = \"unix:{}\"\n\n[on_demand]\nallow = [{allow}]\nmax_wait_seconds = 20\nmax_failures = 2\nmax_certificates = {max_certificates}\nmax_per_hour = 4\n",
            sds.display(),
        )
    };
    world.extra_config = on_demand("\"*.shop.example.com\"", 3);
    world
        .pebble
        .point_at("bad.shop.example.com", "127.0.0.2")
        .unwrap();
    world.certificates(&[]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let _envoy = Envoy::start(&on_demand_bootstrap(https, admin, &sds), admin, 1).unwrap();

    // Fails at the CA twice (retry 1 s), then is dropped and refused.
    assert_eq!(
        handshake(https, "bad.shop.example.com", Duration::from_secs(30)).unwrap(),
        None
    );
    wait_until(&world, Duration::from_secs(30), "bad.shop dropped", || {
        agent_log(&world).contains("failed on_demand.max_failures orders in a row")
    });
    assert!(!stored(&world, "od-bad_shop_example_com"));
    let validations = |world: &World| {
        world
            .pebble
            .log()
            .lines()
            .filter(|l| l.contains("Pulled a task") && l.contains("\"bad.shop.example.com\""))
            .count()
    };
    assert_eq!(validations(&world), 2, "{}", world.context());
    assert_refused_at_once(&world, https, "bad.shop.example.com");

    // The total cap (3): two names fit, the third is refused at once.
    for name in ["a.shop.example.com", "b.shop.example.com"] {
        assert!(
            handshake(https, name, Duration::from_secs(25))
                .unwrap()
                .is_some(),
            "{name}\n{}",
            world.context()
        );
    }
    // bad.shop counts no more: c fits (3 of 3), d does not.
    assert!(
        handshake(https, "c.shop.example.com", Duration::from_secs(25))
            .unwrap()
            .is_some()
    );
    assert_refused_at_once(&world, https, "d.shop.example.com");
    assert!(agent_log(&world).contains("on_demand.max_certificates reached"));

    // Restarted with room for more, a policy without b.shop: b.shop is
    // removed, the rest served without an order; bad.shop still refused;
    // the hourly cap (4: bad, a, b, c) still spent.
    world.agent.as_mut().unwrap().kill();
    let before = agent_log(&world).len();
    world.extra_config = on_demand(
        "\"a.shop.example.com\", \"c.shop.example.com\", \"bad.shop.example.com\", \"e.shop.example.com\"",
        10,
    );
    world.write_config();
    world.start_agent();
    wait_until(&world, Duration::from_secs(30), "b.shop removed", || {
        !stored(&world, "od-b_shop_example_com")
    });
    for name in ["a.shop.example.com", "c.shop.example.com"] {
        assert!(
            handshake(https, name, Duration::from_secs(25))
                .unwrap()
                .is_some(),
            "{name}"
        );
    }
    assert_refused_at_once(&world, https, "bad.shop.example.com");
    assert_refused_at_once(&world, https, "e.shop.example.com");
    let log = agent_log(&world)[before..].to_owned();
    assert!(log.contains("on_demand.max_per_hour reached"), "{log}");
    assert!(log.contains("on_demand.max_failures"), "{log}");
    assert_eq!(validations(&world), 2, "no more validations of bad.shop");
    world.assert_nothing_registered_or_ordered();
}

/// On-demand certificates never spend the last of the orders budget: with
/// 5 orders and a 40 % reserve, on-demand names get 3, the next waits for
/// the budget, and a configured certificate added then is still issued.
#[test]
fn on_demand_leaves_configured_certificates_their_share_of_the_orders() {
    let mut world = World::new(pebble::Options::default());
    let sds = world.work.path().join("run/sds.sock");
    world.extra_config = format!(
        "[sds]\nlisten = \"unix:{}\"\n\n[on_demand]\nallow = [\"*.shop.example.com\"]\nmax_wait_seconds = 3\n\n[acme.limits]\norders_per_3_hours = 5\nconfigured_reserve_percent = 40\n",
        sds.display(),
    );
    world.certificates(&[]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let _envoy = Envoy::start(&on_demand_bootstrap(https, admin, &sds), admin, 1).unwrap();
    for name in ["a", "b", "c"] {
        let sni = format!("{name}.shop.example.com");
        assert!(
            handshake(https, &sni, Duration::from_secs(10))
                .unwrap()
                .is_some(),
            "{sni}\n{}",
            world.context()
        );
    }
    assert_eq!(
        handshake(https, "d.shop.example.com", Duration::from_secs(10)).unwrap(),
        None
    );
    wait_until(
        &world,
        Duration::from_secs(10),
        "d.shop waits for the budget",
        || world.status_record("od-d_shop_example_com")["waiting_for"] == "orders_per_account",
    );
    // A configured certificate still gets one of the reserved orders.
    world
        .certificates(&[("www", &["www.example.com"])])
        .write_config();
    world.wait_issued("www", 1.0);
    assert_eq!(world.pebble.orders_created(), 4, "d.shop was ordered");
}

/// The policy is asked again before a renewal: the `ask` URL says no now,
/// so a forced renewal orders nothing and the certificate is removed.
#[test]
fn a_renewal_asks_the_policy_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let allowed = Arc::new(AtomicBool::new(true));
    let answer = Arc::clone(&allowed);
    let ask = acme_tests::http::Server::start(move |_| {
        if answer.load(Ordering::SeqCst) {
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
    allowed.store(false, Ordering::SeqCst);
    world.renew("od-ok_example_net");
    wait_until(&world, Duration::from_secs(30), "od-ok removed", || {
        !stored(&world, "od-ok_example_net")
    });
    assert!(agent_log(&world).contains("the policy no longer allows it"));
    assert_eq!(world.pebble.orders_created(), 1, "the renewal was ordered");
}

/// On-demand names Envoy holds now: its on-demand selector's
/// `cert_active` stat (summed over every stat prefix it is kept under).
fn held_by_envoy(envoy: &Envoy) -> i64 {
    let stats = envoy.admin_text("/stats?filter=on_demand_secret").unwrap();
    stats
        .lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| name.ends_with("on_demand_secret.cert_active"))
        .map(|(_, value)| value.trim().parse::<i64>().unwrap())
        .sum()
}

fn on_demand_world(keys: &str) -> (World, Envoy, std::net::SocketAddr) {
    let mut world = World::new(pebble::Options::default());
    let sds = world.work.path().join("run/sds.sock");
    world.extra_config = format!(
        "[sds]\nlisten = \"unix:{}\"\n\n[on_demand]\nallow = [\"*.shop.example.com\"]\nmax_wait_seconds = 20\n{keys}\n",
        sds.display(),
    );
    world.certificates(&[]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let (https, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &sds), admin, 1).unwrap();
    (world, envoy, https)
}

fn first_leaf(world: &World, https: std::net::SocketAddr, sni: &str) -> Vec<u8> {
    handshake(https, sni, Duration::from_secs(25))
        .unwrap()
        .unwrap_or_else(|| panic!("no certificate for {sni}\n{}", world.context()))
}

/// The count rule with Envoy: with `max_served = 2`, Envoy holds at most two
/// on-demand names; the least recently asked for is withdrawn (Envoy drops
/// it, it stays stored), and its next handshake gets the same certificate
/// from the agent without an order, withdrawing the next least recent.
#[test]
fn envoy_holds_at_most_max_served_names_and_a_withdrawn_one_comes_back_unordered() {
    let (world, envoy, https) = on_demand_world("max_served = 2");
    let names = ["a", "b", "c", "d"].map(|n| format!("{n}.shop.example.com"));
    let mut leaves = Vec::new();
    // A new name is served before the agent withdraws another: Envoy may
    // hold one more for a moment, then the agent brings it back to 2.
    for (i, name) in names.iter().enumerate() {
        leaves.push(first_leaf(&world, https, name));
        wait_until(
            &world,
            Duration::from_secs(10),
            "back to max_served",
            || held_by_envoy(&envoy) == (i as i64 + 1).min(2),
        );
    }
    assert_eq!(world.pebble.orders_created(), 4);
    let log = agent_log(&world);
    for withdrawn in ["od-a_shop_example_com", "od-b_shop_example_com"] {
        assert!(
            log.lines().any(|l| l.contains(withdrawn)
                && l.contains("withdrawn until a handshake asks for it")
                && l.contains("on_demand.max_served")),
            "{withdrawn}\n{log}"
        );
        assert!(stored(&world, withdrawn), "{withdrawn} kept in storage");
    }
    // The withdrawn names again, least recent first: each is fetched again
    // (the same certificate) and withdraws the least recent of the others.
    for (name, leaf) in names.iter().zip(&leaves).take(2) {
        let again = handshake(https, name, Duration::from_secs(10)).unwrap();
        assert_eq!(again.as_ref(), Some(leaf), "{name}\n{}", world.context());
    }
    wait_until(&world, Duration::from_secs(10), "c and d withdrawn", || {
        held_by_envoy(&envoy) == 2
            && agent_log(&world)
                .lines()
                .any(|l| l.contains("od-d_shop_example_com") && l.contains("on_demand.max_served"))
    });
    for (name, leaf) in names.iter().zip(&leaves) {
        let again = handshake(https, name, Duration::from_secs(10)).unwrap();
        assert_eq!(again.as_ref(), Some(leaf), "{name}\n{}", world.context());
        wait_until(
            &world,
            Duration::from_secs(10),
            "back to max_served",
            || held_by_envoy(&envoy) == 2,
        );
    }
    assert_eq!(
        world.pebble.orders_created(),
        4,
        "a withdrawn name was ordered again\n{}",
        world.context()
    );
}

/// The time rule with Envoy: `withdraw_seconds` (2) well before
/// `idle_seconds` (an hour): a name no handshake asked for since is withdrawn,
/// Envoy drops it, it stays stored, and the next handshake gets the same
/// certificate back without an order.
#[test]
fn a_name_not_asked_for_within_withdraw_seconds_leaves_envoy_and_comes_back_unordered() {
    let (world, envoy, https) = on_demand_world("idle_seconds = 3600\nwithdraw_seconds = 2");
    let leaf = first_leaf(&world, https, "a.shop.example.com");
    assert_eq!(held_by_envoy(&envoy), 1);
    wait_until(
        &world,
        Duration::from_secs(15),
        "Envoy dropped a.shop",
        || held_by_envoy(&envoy) == 0,
    );
    assert!(
        agent_log(&world).contains("on_demand.withdraw_seconds"),
        "{}",
        world.context()
    );
    assert!(stored(&world, "od-a_shop_example_com"));
    let again = handshake(https, "a.shop.example.com", Duration::from_secs(10)).unwrap();
    assert_eq!(again, Some(leaf), "{}", world.context());
    assert_eq!(held_by_envoy(&envoy), 1);
    assert_eq!(world.pebble.orders_created(), 1, "{}", world.context());
}
