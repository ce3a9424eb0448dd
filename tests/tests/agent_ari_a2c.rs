//! ARI against a second, independent ACME implementation: acme2certifier
//! (`acme_tests::a2c`), which offers `renewalInfo` but returns orders without
//! the `replaces` they were placed with. The real agent binary and the real
//! filter in a real Envoy on 127.0.0.1:80 (where acme2certifier validates).
//! An ARI-due renewal and a forced renewal both end with a new certificate
//! served; the CA's deviation is counted once under its own error kind and
//! remembered, so no later order trips on it. Then certificate profiles,
//! which acme2certifier lists when configured: a listed profile is sent with
//! the order (its database records it), another is refused before any order.
//!
//! The only test that binds ports 80 and 53 (see `acme_tests::a2c`).

use std::time::Duration;

use acme_tests::a2c::A2c;
use acme_tests::agent::{Agent, Cert, Settings, declares, sum_samples, wait_for};
use acme_tests::envoy::{
    Envoy, bootstrap_with_listeners, free_addr, https_listener, served_chain, wasm_filter_yaml,
};
use acme_tests::filter_wasm;
use acme_tests::http::{Reply, Server};

const DOMAINS: &[&str] = &["www.example.com", "example.com"];

fn wait_metric(
    agent: &Agent,
    name: &str,
    labels: &[&str],
    at_least: f64,
    log: &dyn Fn() -> String,
) {
    wait_for(
        Duration::from_secs(60),
        &format!("{name}{labels:?} >= {at_least}"),
        || {
            let m = agent.metrics().ok()?;
            (sum_samples(&m, name, labels)? >= at_least).then_some(())
        },
        log,
    )
    .unwrap();
}

#[test]
fn ari_due_and_forced_renewals_succeed_against_a_ca_that_does_not_reflect_replaces() {
    let mut a2c = A2c::start(false).unwrap();
    assert!(
        a2c.directory().unwrap()["renewalInfo"].is_string(),
        "acme2certifier offers ARI"
    );
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let sds = work.path().join("sds");
    let api = free_addr().unwrap();
    let http = "127.0.0.1:80".parse().unwrap();
    // Owned copies: the server is restarted while the settings are in use.
    let (directory_url, ca) = (a2c.directory_url.clone(), a2c.ca.clone());
    // `renew` over TCP proves the token.
    let token_file = acme_tests::agent::write_token_file(work.path()).unwrap();
    let settings = Settings {
        directory_url: &directory_url,
        ca_root: &ca,
        state_dir: &state,
        sds_dir: &sds,
        kubernetes: None,
        api,
        health: free_addr().unwrap(),
        token_file: Some(&token_file),
        self_check: Some(http),
        retry: (1, 4),
        certificates: &[Cert {
            name: "www",
            domains: DOMAINS,
            extra: "",
        }],
    };
    let config = work.path().join("agent.toml");
    std::fs::write(&config, settings.toml()).unwrap();
    let log = work.path().join("agent.log");
    let a2c_log = a2c.dir.path().join("a2c.log");
    let context = || {
        format!(
            "--- agent ---\n{}\n--- acme2certifier ---\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            acme_tests::world::tail(&std::fs::read_to_string(&a2c_log).unwrap_or_default(), 40)
        )
    };
    // `acme-agent renew www`, which must be accepted (also while a job for
    // www runs, such as the renewal-info check a fresh agent starts with).
    let renew = || {
        let out = std::process::Command::new(acme_tests::agent::agent_binary().unwrap())
            .args(["--config", &config.display().to_string(), "renew", "www"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut agent = Agent::start(&config, api, &log).unwrap();

    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let https = free_addr().unwrap();
    let admin = free_addr().unwrap();
    wait_for(
        Duration::from_secs(10),
        "placeholder written",
        || sds.join("www.json").is_file().then_some(()),
        context,
    )
    .unwrap();
    let filter = wasm_filter_yaml(
        &filter_wasm().unwrap(),
        &format!(
            r#"{{"agent_cluster":"acme_agent","agent_token":"{}"}}"#,
            acme_tests::agent::TEST_TOKEN
        ),
    );
    let envoy = Envoy::start(
        &bootstrap_with_listeners(
            http,
            admin,
            &filter,
            upstream.addr(),
            api,
            &https_listener(https, &sds, &["www"]),
        ),
        admin,
        1,
    )
    .unwrap();
    let served = |pem: &str| {
        wait_for(
            Duration::from_secs(10),
            "Envoy serves the new certificate",
            || {
                served_chain(https, "www.example.com")
                    .ok()
                    .filter(|c| c.contains(pem.lines().nth(1).unwrap_or("-")))
            },
            context,
        )
        .unwrap();
    };
    let issued = || std::fs::read_to_string(sds.join("www/tls.crt")).unwrap_or_default();

    // First certificate: a plain order.
    wait_metric(
        &agent,
        "acme_agent_orders_total",
        &["result=\"success\""],
        1.0,
        &context,
    );
    let first = issued();
    served(&first);

    // The CA now says every certificate is due. A restarted agent looks at
    // the renewal info at once and renews, telling the CA what it replaces;
    // the CA does not reflect it; the agent orders again without it.
    a2c.restart(true).unwrap();
    agent.kill();
    let mut agent = Agent::start(&config, api, &log).unwrap();
    wait_metric(
        &agent,
        "acme_agent_orders_total",
        &["result=\"success\""],
        1.0,
        &context,
    );
    let ari_renewed = issued();
    assert_ne!(ari_renewed, first, "{}", context());
    served(&ari_renewed);
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        sum_samples(
            &metrics,
            "acme_agent_orders_total",
            &["error=\"replaces_not_reflected\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    // No order failed on the transport: the counter is declared, and has
    // no such series.
    assert!(declares(&metrics, "acme_agent_orders_total"), "{metrics}");
    assert_eq!(
        sum_samples(
            &metrics,
            "acme_agent_orders_total",
            &["error=\"transport\""]
        ),
        None,
        "{metrics}"
    );

    // A forced renewal: the agent remembers the CA's deviation and orders
    // without `replaces` at once.
    renew();
    wait_metric(
        &agent,
        "acme_agent_orders_total",
        &["result=\"success\""],
        2.0,
        &context,
    );
    let forced = issued();
    assert_ne!(forced, ari_renewed);
    served(&forced);
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        sum_samples(&metrics, "acme_agent_orders_total", &["result=\"failure\""]),
        Some(1.0),
        "only the one order the CA did not reflect failed: {metrics}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("orders go without `replaces` from now on")
            .count()
            == 1,
        "logged once"
    );

    // Profiles: acme2certifier lists those its config names. A listed one
    // is sent with the order; another is refused before any order, naming
    // the CA's offer.
    a2c.restart_with_profiles(
        false,
        r#"{"classic": "the default", "shortlived": "6 days"}"#,
    )
    .unwrap();
    assert!(
        a2c.directory().unwrap()["meta"]["profiles"]["shortlived"].is_string(),
        "{}",
        a2c.directory().unwrap()
    );
    let with_profile = |profile: &str| {
        let extra = format!("profile = \"{profile}\"");
        let settings = Settings {
            certificates: &[Cert {
                name: "www",
                domains: DOMAINS,
                extra: &extra,
            }],
            ..settings
        };
        std::fs::write(&config, settings.toml()).unwrap();
    };
    with_profile("shortlived");
    agent.kill();
    let mut agent = Agent::start(&config, api, &log).unwrap();
    let orders_before = a2c.order_profiles().unwrap().len();
    renew();
    wait_metric(
        &agent,
        "acme_agent_orders_total",
        &["result=\"success\""],
        1.0,
        &context,
    );
    let profiles = a2c.order_profiles().unwrap();
    assert_eq!(
        profiles.last().map(String::as_str),
        Some("shortlived"),
        "{profiles:?}"
    );
    served(&issued());

    with_profile("tlsserver");
    agent.kill();
    let agent = Agent::start(&config, api, &log).unwrap();
    let orders_before_refusal = a2c.order_profiles().unwrap().len();
    assert!(orders_before_refusal > orders_before);
    renew();
    wait_metric(
        &agent,
        "acme_agent_certificate_failures",
        &["certificate=\"www\""],
        1.0,
        &context,
    );
    let status = std::fs::read_to_string(state.join("certificates/www.status.json")).unwrap();
    assert!(
        status.contains("\\\"tlsserver\\\"") && status.contains("classic, shortlived"),
        "{status}"
    );
    assert_eq!(a2c.order_profiles().unwrap().len(), orders_before_refusal);
    drop(envoy);
}
