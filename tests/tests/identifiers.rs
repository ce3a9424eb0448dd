//! Identifiers beyond DNS names, against Debian's Pebble: a certificate for
//! an IP address (RFC 8738), validated by HTTP-01 through the filter (its
//! host check compares the request's host with the address) and served by
//! Envoy; a certificate profile the CA does not offer, refused before any
//! order with the CA's offer named.

use std::time::Duration;

use acme_tests::pebble;
use acme_tests::world::World;

#[test]
fn a_certificate_for_an_ip_address_is_validated_through_the_filter_and_served() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[("loopback", &["127.0.0.1", "ip.example.com"])]);
    world.write_config();
    world.start_agent();
    world.add_envoy(&["loopback"], 2);
    world.wait_issued("loopback", 1.0);
    world.assert_valid("loopback", &["127.0.0.1", "ip.example.com"]);
    // What a client connecting by address sees (no SNI: an address is never
    // sent as SNI), checked against the IP SAN.
    world.wait_served(0, "127.0.0.1");
    let status = world.status_line("loopback");
    assert!(status.contains("127.0.0.1"), "{status}");
}

#[test]
fn a_profile_the_ca_does_not_offer_is_refused_before_any_order() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[("short", &["short.example.com"])]);
    world
        .certificate_extra
        .insert("short".into(), "profile = \"shortlived\"".into());
    world.write_config();
    world.start_agent();
    world.add_envoy(&["short"], 1);
    world.wait_metric(
        "acme_agent_certificate_failures",
        &["certificate=\"short\""],
        2.0,
        Duration::from_secs(30),
    );
    // The record is written just after the metrics move.
    let record = acme_tests::agent::wait_for(
        Duration::from_secs(30),
        "short's status record with its error",
        || {
            let record = world.status_record("short");
            record["last_error_kind"].is_string().then_some(record)
        },
        || world.context(),
    )
    .unwrap();
    assert_eq!(record["last_error_kind"], "profile", "{record}");
    let error = record["last_error"].as_str().unwrap_or_default();
    // Debian's Pebble 2.4 lists no profiles in its directory.
    assert!(
        error.contains("\"shortlived\"") && error.contains("lists no profiles"),
        "{error}"
    );
    assert_eq!(world.pebble.orders_created(), 0, "{}", world.context());
    assert!(!world.pebble.log().contains("POST /order-plz"));

    // Without the profile, the CA's default: issued.
    world.certificate_extra.clear();
    world.write_config();
    world.wait_issued("short", 1.0);
}
