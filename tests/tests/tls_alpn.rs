//! tls-alpn-01 (RFC 8737) answered by Envoy: the real Pebble validates on
//! Envoy's TLS port with ALPN `acme-tls/1`; Envoy's `acme-tls/1` filter chain
//! presents the agent's challenge certificate from its SDS server. No
//! plain-HTTP listener exists at all (port 80 may stay closed), and the
//! issued certificate is then served by the same listener's other chain.

use std::time::Duration;

use acme_tests::envoy::{Envoy, free_addr, on_demand_bootstrap_with_alpn, wait_served_by_ca};
use acme_tests::pebble;
use acme_tests::world::World;

#[test]
fn a_certificate_validated_by_tls_alpn_01_through_envoy_with_no_http_listener() {
    tls_alpn_01(&["www.example.com", "example.com"]);
}

/// RFC 8738 section 6: for an address the CA's SNI is its reverse-DNS name,
/// under which the agent serves the challenge certificate.
#[test]
fn an_ip_address_is_validated_by_tls_alpn_01_under_its_reverse_name() {
    tls_alpn_01(&["127.0.0.1", "www.example.com"]);
}

fn tls_alpn_01(domains: &[&str]) {
    let mut world = World::new(pebble::Options::default());
    let sds = world.work.path().join("run/sds.sock");
    let tls: std::net::SocketAddr = format!("127.0.0.1:{}", world.pebble.tls_port)
        .parse()
        .unwrap();
    world.self_check = None;
    world.extra_config = format!(
        "[sds]\nlisten = \"unix:{}\"\n\n[self_check]\ntarget = \"127.0.0.1:9\"\ntls_target = \"{tls}\"\n",
        sds.display()
    );
    world.certificates(&[("www", domains)]);
    world
        .certificate_extra
        .insert("www".into(), "challenge = \"tls-alpn-01\"".into());
    world.write_config();
    world.start_agent();
    let admin = free_addr().unwrap();
    let envoy = Envoy::start(&on_demand_bootstrap_with_alpn(tls, admin, &sds), admin, 2).unwrap();
    world.wait_issued("www", 1.0);
    let root = world.pebble.issuing_root().unwrap();
    for &sni in domains {
        wait_served_by_ca(tls, sni, &root, Duration::from_secs(10), || {
            format!("{}\n{}", world.context(), envoy.log())
        });
    }
    // No HTTP-01 was attempted (there is no plain-HTTP listener to answer it).
    let log = world.pebble.log();
    assert!(log.contains("set VALID by completed challenge"), "{log}");
    assert!(!log.contains("validate w/ HTTP"), "{log}");
    // The challenge certificates are withdrawn once the order is done.
    assert_eq!(world.metric("acme_agent_challenges_pending", &[]), 0.0);
}
