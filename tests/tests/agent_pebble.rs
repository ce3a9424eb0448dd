//! The agent against a real ACME CA (Debian's Pebble, HTTP-01 validated on
//! loopback through `pebble-challtestsrv`'s DNS), with the real filter in a
//! real Envoy answering the challenges, and Envoy loading the SDS files the
//! agent writes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acme_tests::agent::wait_for;
use acme_tests::pebble;
use acme_tests::world::{World, public_key_of};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

fn account_file(state: &Path) -> PathBuf {
    std::fs::read_dir(state)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("account-") && n.ends_with(".json"))
        })
        .expect("an account file in the state directory")
}

const WWW: (&str, &[&str]) = ("www", &["www.example.com", "example.com"]);
const API: (&str, &[&str]) = ("api", &["api.example.com"]);

#[test]
fn issues_two_certificates_envoy_serves_them_and_a_restart_reorders_nothing() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[WWW, API]);
    world.write_config();
    let started = Instant::now();
    world.start_agent();
    world.add_envoy(&["www", "api"], 1);
    world.wait_issued("www", 1.0);
    let www_done = started.elapsed();
    world.wait_issued("api", 1.0);
    println!(
        "agent start to SDS files: www (2 domains) {www_done:?}, both certificates {:?}",
        started.elapsed()
    );

    world.assert_valid("www", WWW.1);
    world.assert_valid("api", API.1);

    // Envoy loaded placeholder then certificate, and serves the CA's chain by SNI.
    let envoy = world.envoy(0);
    for name in ["www", "api"] {
        envoy
            .wait_stat_at_least(
                &format!("sds.{name}.update_success"),
                2,
                Duration::from_secs(10),
            )
            .unwrap();
    }
    for (sni, name) in [
        ("example.com", "www"),
        ("www.example.com", "www"),
        ("api.example.com", "api"),
    ] {
        let served = world.wait_served(0, sni);
        assert_eq!(
            public_key_of(&served, "x509"),
            public_key_of(&world.issued_pem(name).0, "x509")
        );
    }
    // Every validation went through the filter: one answer per Pebble GET.
    let served = envoy
        .stat("wasmcustom.acme_filter.challenges_served")
        .unwrap()
        .unwrap_or(0);
    assert!(served >= 3, "filter answered {served} challenges");
    assert_eq!(world.metric("acme_agent_challenges_pending", &[]), 0.0);
    assert_eq!(
        world.metric("acme_agent_account_registrations_total", &[]),
        1.0
    );
    assert_eq!(world.pebble.counts().accounts, 1, "accounts at the CA");
    assert_eq!(world.pebble.orders_created(), 2, "orders at the CA");
    assert!(
        world.metric(
            "acme_agent_certificate_expiry_timestamp_seconds",
            &["certificate=\"www\""]
        ) > 0.0
    );

    // Keys and state are private.
    assert_eq!(mode(&world.state_dir()), 0o700);
    assert_eq!(mode(&account_file(&world.state_dir())), 0o600);
    assert_eq!(mode(&world.sds_dir().join("www/tls.key")), 0o600);
    assert_eq!(mode(&world.sds_dir().join("www.json")), 0o600);
    let account_before = std::fs::read(account_file(&world.state_dir())).unwrap();

    // A graceful stop, then a restart: same account, no order, certificates
    // installed from the state directory.
    let agent = world.agent.as_mut().unwrap();
    agent.signal("TERM").unwrap();
    let status = agent.wait(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");
    let cert_before = world.issued_pem("www").0;
    world.start_agent();
    world.wait_scheduled();
    world.assert_nothing_registered_or_ordered();
    if let Some(pid) = world.agent().pid() {
        std::thread::sleep(Duration::from_millis(500));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap_or("VmRSS: ?");
        println!("idle agent (2 certificates) {rss}");
    }
    assert_eq!(
        std::fs::read(account_file(&world.state_dir())).unwrap(),
        account_before
    );
    assert_eq!(world.issued_pem("www").0, cert_before);

    // `status` reads the state directory.
    let out = world.cli(&["status"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    let www_row = table
        .lines()
        .find(|l| l.starts_with("www "))
        .expect("www row");
    assert!(www_row.contains("www.example.com,example.com"), "{table}");
    assert!(!www_row.ends_with(" -") || www_row.contains('T'), "{table}");
    status_counts_filters_and_speaks_json(&world, &table);
}

/// `status` at scale: a state per row, a summary line, filters by state and
/// name, the JSON form, and an unknown state refused with the choices named.
fn status_counts_filters_and_speaks_json(world: &World, table: &str) {
    let www_row = table.lines().find(|l| l.starts_with("www ")).unwrap();
    assert!(www_row.contains(" valid "), "{table}");
    assert!(
        table.trim_end().ends_with("2 certificates: 2 valid"),
        "{table}"
    );
    // Filters and the JSON form: nothing failing, and `www` by its name.
    let failing = world.cli(&["status", "--state", "failing", "--json"]);
    assert!(failing.status.success());
    let report: serde_json::Value = serde_json::from_slice(&failing.stdout).unwrap();
    assert_eq!(report["summary"]["total"], 2, "{report}");
    assert_eq!(report["summary"]["states"]["valid"], 2, "{report}");
    assert_eq!(report["certificates"], serde_json::json!([]), "{report}");
    let named = world.cli(&["status", "--name", "w*", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&named.stdout).unwrap();
    assert_eq!(report["certificates"][0]["name"], "www", "{report}");
    let refused = world.cli(&["status", "--state", "broken"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not-issued"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn every_order_succeeds_when_pebble_rejects_half_the_nonces() {
    let mut world = World::new(pebble::Options {
        nonce_reject: Some(50),
        ..pebble::Options::default()
    });
    world.certificates(&[WWW, API]);
    world.write_config();
    world.start_agent();
    world.add_envoy(&["www", "api"], 1);
    world.wait_issued("www", 1.0);
    world.wait_issued("api", 1.0);
    assert_eq!(
        world.metric_or_zero("acme_agent_orders_total", &["result=\"failure\""]),
        0.0,
        "{}",
        world.context()
    );
    // No order was placed twice: one per certificate at the CA.
    assert_eq!(world.pebble.orders_created(), 2, "{}", world.context());
    world.assert_valid("www", WWW.1);
    world.assert_valid("api", API.1);
    let retried = world.agent().log().matches("badNonce, retrying").count();
    println!("badNonce retries beyond instant-acme's own: {retried}");
}

#[test]
fn backs_off_while_the_ca_is_down_then_succeeds_when_it_returns() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[API]);
    world.retry = (1, 2);
    world.write_config();
    world.start_agent();
    world.add_envoy(&["api"], 1);
    world.wait_issued("api", 1.0);

    world.pebble.stop();
    world.certificates(&[API, WWW]);
    world.retry = (1, 2);
    world.write_config();
    world.agent().signal("HUP").unwrap();
    let down = Instant::now();
    // The failure series appears with the first failure.
    let failures = || {
        world.metric_or_zero(
            "acme_agent_orders_total",
            &["certificate=\"www\"", "result=\"failure\""],
        )
    };
    wait_for(
        Duration::from_secs(60),
        "a first failed attempt",
        || (failures() >= 1.0).then_some(()),
        || world.context(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let attempts = failures();
    let elapsed = down.elapsed().as_secs_f64();
    println!("CA down {elapsed:.1} s: {attempts} attempts (retry 1 s doubling to 2 s)");
    // 1 s then 2 s apart: about elapsed/2 + 1, never a hot loop (a slow
    // machine makes fewer attempts, never more).
    assert!(attempts >= 2.0, "no retry: {attempts}\n{}", world.context());
    assert!(
        attempts <= elapsed / 2.0 + 2.0,
        "hot loop: {attempts} in {elapsed:.1} s"
    );

    // Pebble comes back with no memory of the account: the agent registers
    // anew and orders.
    world.pebble.restart().unwrap();
    world.wait_issued("www", 1.0);
    world.assert_valid("www", WWW.1);
    assert!(
        world.agent().log().contains("registering a new one"),
        "{}",
        world.context()
    );
}

#[test]
fn a_config_edit_adds_and_removes_certificates_without_restart() {
    let mut world = World::new(pebble::Options::default());
    world.certificates(&[API]);
    world.write_config();
    world.start_agent();
    world.add_envoy(&["api"], 1);
    world.wait_issued("api", 1.0);
    let pid = world.agent().pid();

    // Picked up by the file watch alone (no signal).
    world.certificates(&[API, WWW]);
    world.write_config();
    world.wait_issued("www", 1.0);
    world.assert_valid("www", WWW.1);

    // Removing a certificate stops its renewal: its gauges go away.
    world.certificates(&[WWW]);
    world.write_config();
    wait_for(
        Duration::from_secs(30),
        "api no longer managed",
        || {
            world
                .agent()
                .series_absent(
                    "acme_agent_certificate_next_renewal_timestamp_seconds",
                    &["certificate=\"api\""],
                )
                .unwrap()
                .then_some(())
        },
        || world.context(),
    )
    .unwrap();
    assert_eq!(world.agent().pid(), pid, "same process throughout");
    assert!(world.agent().log().contains("configuration reloaded"));
}
