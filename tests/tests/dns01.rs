//! dns-01 through RFC 2136 against a real authoritative server: Debian's BIND
//! 9 holds the zones the agent updates (TSIG-signed) and is the DNS server
//! Pebble resolves and validates with. Wildcards issued and served by Envoy,
//! a CNAME-delegated name, a wrong key, a nameserver that lags, named going
//! down; after each, no challenge record is left in the zones and the
//! operator's own record is untouched.

use std::net::Ipv4Addr;
use std::time::Duration;

use acme_tests::agent::wait_for;
use acme_tests::envoy::wait_served_by_ca;
use acme_tests::named::{Named, Zone};
use acme_tests::pebble;
use acme_tests::world::{ISSUE_TIMEOUT, World};

/// A TXT record the operator put there: the agent must never touch it.
const OPERATOR_TXT: &str = "_acme-challenge.keep IN TXT \"operator-owned\"";

fn operator_record() -> (String, String) {
    (
        "_acme-challenge.keep.example.com.".to_owned(),
        "\"operator-owned\"".to_owned(),
    )
}

/// named on its own loopback address (one per test: they run in parallel).
fn named(last_octet: u8, example_records: &[&str], extra: &[Zone<'_>]) -> Named {
    let mut records = vec!["@ IN A 127.0.0.1", "* IN A 127.0.0.1", OPERATOR_TXT];
    records.extend_from_slice(example_records);
    let mut zones = vec![Zone {
        apex: "example.com",
        records: &records,
    }];
    zones.extend(extra.iter().map(|z| Zone {
        apex: z.apex,
        records: z.records,
    }));
    Named::start(Ipv4Addr::new(127, 53, last_octet, 1), &zones).unwrap()
}

fn world_on(named: &Named) -> World {
    World::new(pebble::Options {
        dns_server: Some(named.addr),
        ..pebble::Options::default()
    })
}

/// Waits until the zones hold no challenge record but the operator's.
fn assert_zone_clean(named: &Named, world: &World) {
    wait_for(
        Duration::from_secs(40),
        "no challenge record left in the zones",
        || {
            let left = named.challenge_records().ok()?;
            (left == vec![operator_record()]).then_some(())
        },
        || format!("left: {:?}\n{}", named.challenge_records(), world.context()),
    )
    .unwrap();
}

fn served(world: &World, sni: &str) -> String {
    let root = world.pebble.issuing_root().unwrap();
    wait_served_by_ca(world.nodes[0].https, sni, &root, ISSUE_TIMEOUT, || {
        world.context()
    })
}

#[test]
fn a_wildcard_and_its_apex_are_issued_through_bind_and_served_for_any_subdomain() {
    let named = named(1, &[], &[]);
    let mut world = world_on(&named);
    world.certificates(&[("wild", &["*.example.com", "example.com"])]);
    world
        .certificate_extra
        .insert("wild".into(), "dns = \"main\"".into());
    world.extra_config = named.solver_toml("main", "example.com");
    world.write_config();
    world.start_agent();
    world.add_envoy(&["wild"], 1);

    // Any subdomain, and the apex (validated by HTTP-01 through the filter:
    // the certificate mixes both challenges).
    served(&world, "shop.example.com");
    served(&world, "x7f3.example.com");
    served(&world, "example.com");
    assert_zone_clean(&named, &world);
    // The CA was told to validate both authorizations (the wildcard's and
    // the apex's are both "example.com"): what `assert_ca_not_told` counts
    // is there when it happens.
    assert!(
        world.pebble.validations_of("example.com") >= 2,
        "{}",
        world.pebble.log()
    );
}

/// Any provider, scripted: the same wildcard through `[dns.<name>.exec]`
/// commands (a script running `nsupdate`), no server or key in the agent's
/// config; the zone's nameservers found through the resolver and checked
/// before the CA is told, the records removed by the clean-up command.
#[test]
fn a_wildcard_is_issued_through_exec_commands_the_agent_knows_nothing_of() {
    let named = named(5, &[], &[]);
    let mut world = world_on(&named);
    world.certificates(&[("wild", &["*.example.com"])]);
    world
        .certificate_extra
        .insert("wild".into(), "dns = \"hook\"".into());
    world.extra_config = named.exec_solver_toml("hook", "example.com").unwrap();
    world.write_config();
    world.start_agent();
    world.add_envoy(&["wild"], 1);
    served(&world, "shop.example.com");
    assert_zone_clean(&named, &world);
    let calls = named.exec_log();
    let present: Vec<&str> = calls
        .lines()
        .filter(|l| l.starts_with("present "))
        .collect();
    let cleaned: Vec<&str> = calls
        .lines()
        .filter(|l| l.starts_with("clean-up "))
        .collect();
    assert_eq!(present.len(), 1, "{calls}");
    assert!(
        present[0].starts_with("present _acme-challenge.example.com. "),
        "{calls}"
    );
    assert_eq!(
        present[0].replacen("present", "clean-up", 1),
        cleaned.first().copied().unwrap_or_default(),
        "the same record removed: {calls}"
    );
}

#[test]
fn a_name_delegated_by_cname_is_validated_in_the_zone_it_points_into() {
    let named = named(
        2,
        &["_acme-challenge.delegated IN CNAME delegated.acme-zone.net."],
        &[Zone {
            apex: "acme-zone.net",
            records: &[],
        }],
    );
    let mut world = world_on(&named);
    world.certificates(&[("delegated", &["delegated.example.com"])]);
    // The solver may only write into acme-zone.net: the certificate can be
    // issued only by following the CNAME.
    world.certificate_extra.insert(
        "delegated".into(),
        "challenge = \"dns-01\"\ndns = \"delegated\"".into(),
    );
    world.extra_config = named.solver_toml("delegated", "acme-zone.net");
    world.write_config();
    world.start_agent();
    world.add_envoy(&["delegated"], 1);
    served(&world, "delegated.example.com");
    assert_zone_clean(&named, &world);
}

/// The status record's `last_error` of `name`, once there is one (the
/// record is written just after the metrics move).
fn last_error(world: &World, name: &str) -> String {
    wait_for(
        Duration::from_secs(30),
        &format!("a last_error in {name}'s status"),
        || {
            world.status_record(name)["last_error"]
                .as_str()
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
        },
        || world.context(),
    )
    .unwrap()
}

#[test]
fn a_wrong_tsig_key_fails_clearly_with_backoff_and_places_no_order() {
    let named = named(3, &[], &[]);
    let mut world = world_on(&named);
    // The key's name is right, its secret is another key's.
    let wrong = world.work.path().join("wrong.key");
    let other = std::process::Command::new("tsig-keygen")
        .args(["-a", "hmac-sha256", &named.key_name])
        .output()
        .unwrap();
    std::fs::write(&wrong, &other.stdout).unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    world.certificates(&[("wild", &["*.example.com"])]);
    world
        .certificate_extra
        .insert("wild".into(), "dns = \"main\"".into());
    let solver = named.solver_toml("main", "example.com");
    world.extra_config = solver.replace(
        &format!("{:?}", named.key_file.display().to_string()),
        &format!("{:?}", wrong.display().to_string()),
    );
    world.write_config();
    world.start_agent();

    // Retried with backoff (1 s doubling to 4 s), failing before any order.
    world.wait_metric(
        "acme_agent_certificate_failures",
        &["certificate=\"wild\""],
        3.0,
        Duration::from_secs(30),
    );
    let error = last_error(&world, "wild");
    assert_eq!(world.status_record("wild")["last_error_kind"], "dns_solver");
    assert!(
        error.contains("BADSIG") || error.contains("BADKEY"),
        "{error}"
    );
    assert!(error.contains("dns.main.tsig_key"), "{error}");
    // Checked before ordering: not one order reached the CA.
    assert_eq!(world.pebble.orders_created(), 0, "{}", world.context());
    assert!(
        !world.pebble.log().contains("POST /order-plz"),
        "{}",
        world.pebble.log()
    );
    assert_zone_clean(&named, &world);

    // The right key, picked up on reload: issued.
    world.extra_config = solver;
    world.write_config();
    world.wait_issued("wild", 1.0);
    world.assert_valid("wild", &["any.example.com"]);
    assert_zone_clean(&named, &world);
}

#[test]
fn a_lagging_nameserver_is_named_and_records_outlive_neither_named_down_nor_a_crash() {
    // ns2 is listed for the zone but never answers: the propagation check
    // must name it, and tell the CA nothing.
    let named = named(4, &["@ IN NS ns2.example.com.", "ns2 IN A 127.53.4.2"], &[]);
    let mut world = world_on(&named);
    world.retry = (3, 3);
    world.certificates(&[("wild", &["*.example.com"])]);
    world
        .certificate_extra
        .insert("wild".into(), "dns = \"main\"".into());
    world.extra_config = named.solver_toml("main", "example.com").replace(
        "propagation_timeout_seconds = 10",
        "propagation_timeout_seconds = 3",
    );
    world.write_config();
    world.start_agent();
    world.wait_metric(
        "acme_agent_orders_total",
        &["certificate=\"wild\"", "error=\"dns_solver\""],
        1.0,
        Duration::from_secs(30),
    );
    let error = last_error(&world, "wild");
    assert!(
        error.contains("ns2.example.com. (127.53.4.2:53)"),
        "{error}"
    );
    // The order was placed, but its challenge never handed to the CA: the
    // CA validated nothing.
    assert!(world.pebble.orders_created() >= 1);
    assert_ca_not_told(&world);
    // Removed after the failure (between two attempts the zone is clean).
    assert_zone_clean(&named, &world);

    // named goes down while an attempt's record is in the zone: the delete
    // fails, the record stays journaled; the agent is then killed.
    wait_for(
        Duration::from_secs(30),
        "an attempt's record in the zone",
        || {
            let records = named.challenge_records().ok()?;
            (records.len() > 1).then_some(())
        },
        || world.context(),
    )
    .unwrap();
    let mut named = named;
    named.stop();
    let journal = world.state_dir().join("dns-records.json");
    wait_for(
        Duration::from_secs(30),
        "the record journaled as not deleted",
        || {
            std::thread::sleep(Duration::from_millis(200));
            let text = std::fs::read_to_string(&journal).ok()?;
            text.contains("_acme-challenge.example.com").then_some(())
        },
        || world.context(),
    )
    .unwrap();
    // Let the attempt fail and its delete fail with named down.
    std::thread::sleep(Duration::from_secs(4));
    world.agent.as_mut().unwrap().kill();
    world.certificates(&[]);
    world.write_config();

    // named back, the agent restarted (ordering nothing): the leftover is
    // deleted at start; the operator's record is untouched.
    named.restart().unwrap();
    assert!(
        named.challenge_records().unwrap().len() > 1,
        "the leftover survived named's restart (its journal)"
    );
    world.start_agent();
    assert_zone_clean(&named, &world);
    wait_for(
        Duration::from_secs(30),
        "the journal emptied",
        || {
            let text = std::fs::read_to_string(&journal).ok()?;
            (text.trim() == "[]").then_some(())
        },
        || world.context(),
    )
    .unwrap();
    assert_ca_not_told(&world);
}

/// The CA was never asked to validate the wildcard's name (Pebble starts a
/// validation only when a challenge is POSTed to it).
fn assert_ca_not_told(world: &World) {
    assert_eq!(
        world.pebble.validations_of("example.com"),
        0,
        "the CA was told to validate\n{}",
        world.context()
    );
}
