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

use std::net::SocketAddr;
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

/// The agent's files and addresses, and the Envoy that serves what it
/// issues (the filter answering acme2certifier's HTTP-01 on port 80).
struct Rig {
    work: tempfile::TempDir,
    directory_url: String,
    ca: std::path::PathBuf,
    api: SocketAddr,
    health: SocketAddr,
    https: SocketAddr,
    a2c_log: std::path::PathBuf,
    envoy: Option<Envoy>,
    _upstream: Server,
}

/// acme2certifier validates HTTP-01 on port 80.
const HTTP: &str = "127.0.0.1:80";

impl Rig {
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.work.path().join(name)
    }

    fn config(&self) -> std::path::PathBuf {
        self.path("agent.toml")
    }

    fn log(&self) -> std::path::PathBuf {
        self.path("agent.log")
    }

    /// Writes the agent's config: certificate www, with `extra` keys.
    fn write_config(&self, extra: &str) {
        let (state, sds) = (self.path("state"), self.path("sds"));
        // `renew` over TCP proves the token.
        let token_file = acme_tests::agent::write_token_file(self.work.path()).unwrap();
        let settings = Settings {
            directory_url: &self.directory_url,
            ca_root: &self.ca,
            state_dir: &state,
            sds_dir: &sds,
            kubernetes: None,
            api: self.api,
            health: self.health,
            token_file: Some(&token_file),
            self_check: Some(HTTP.parse().unwrap()),
            retry: (1, 4),
            certificates: &[Cert {
                name: "www",
                domains: DOMAINS,
                extra,
            }],
        };
        std::fs::write(self.config(), settings.toml()).unwrap();
    }

    fn start_agent(&self) -> Agent {
        Agent::start(&self.config(), self.api, &self.log()).unwrap()
    }

    fn context(&self) -> String {
        format!(
            "--- agent ---\n{}\n--- acme2certifier ---\n{}",
            std::fs::read_to_string(self.log()).unwrap_or_default(),
            acme_tests::world::tail(
                &std::fs::read_to_string(&self.a2c_log).unwrap_or_default(),
                40
            )
        )
    }

    /// `acme-agent renew www`, which must be accepted (also while a job for
    /// www runs, such as the renewal-info check a fresh agent starts with).
    fn renew(&self) {
        let out = std::process::Command::new(acme_tests::agent::agent_binary().unwrap())
            .args([
                "--config",
                &self.config().display().to_string(),
                "renew",
                "www",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The certificate the agent last wrote.
    fn issued(&self) -> String {
        std::fs::read_to_string(self.path("sds/www/tls.crt")).unwrap_or_default()
    }

    /// Waits until Envoy serves `pem`.
    fn served(&self, pem: &str) {
        wait_for(
            Duration::from_secs(60),
            "Envoy serves the new certificate",
            || {
                served_chain(self.https, "www.example.com")
                    .ok()
                    .filter(|c| c.contains(pem.lines().nth(1).unwrap_or("-")))
            },
            || self.context(),
        )
        .unwrap();
    }

    fn wait_issued(&self, agent: &Agent, n: f64) {
        wait_metric(
            agent,
            "acme_agent_orders_total",
            &["result=\"success\""],
            n,
            &|| self.context(),
        );
    }
}

/// The agent started against `a2c` with certificate www, and Envoy with the
/// filter on port 80 and the agent's certificates on an HTTPS listener.
fn rig(a2c: &A2c) -> (Rig, Agent) {
    let work = tempfile::tempdir().unwrap();
    let mut rig = Rig {
        // Owned copies: the server is restarted while the settings are in use.
        directory_url: a2c.directory_url.clone(),
        ca: a2c.ca.clone(),
        api: free_addr().unwrap(),
        health: free_addr().unwrap(),
        https: free_addr().unwrap(),
        a2c_log: a2c.dir.path().join("a2c.log"),
        envoy: None,
        _upstream: Server::start(|_| Reply::new(200, "upstream")).unwrap(),
        work,
    };
    rig.write_config("");
    let agent = rig.start_agent();
    let sds = rig.path("sds");
    wait_for(
        Duration::from_secs(60),
        "placeholder written",
        || sds.join("www.json").is_file().then_some(()),
        || rig.context(),
    )
    .unwrap();
    let filter = wasm_filter_yaml(
        &filter_wasm().unwrap(),
        &format!(
            r#"{{"agent_cluster":"acme_agent","agent_token":"{}"}}"#,
            acme_tests::agent::TEST_TOKEN
        ),
    );
    let admin = free_addr().unwrap();
    rig.envoy = Some(
        Envoy::start(
            &bootstrap_with_listeners(
                HTTP.parse().unwrap(),
                admin,
                &filter,
                rig._upstream.addr(),
                rig.api,
                &https_listener(rig.https, &sds, &["www"]),
            ),
            admin,
            1,
        )
        .unwrap(),
    );
    (rig, agent)
}

/// The CA now says every certificate is due. A restarted agent looks at the
/// renewal info at once and renews, telling the CA what it replaces; the CA
/// does not reflect it; the agent orders again without it. The deviation is
/// counted under its own error kind, and no order failed otherwise.
fn an_ari_due_renewal_survives_replaces_not_reflected(
    a2c: &mut A2c,
    rig: &Rig,
    mut agent: Agent,
    first: &str,
) -> Agent {
    a2c.restart(true).unwrap();
    agent.kill();
    let agent = rig.start_agent();
    rig.wait_issued(&agent, 1.0);
    let ari_renewed = rig.issued();
    assert_ne!(ari_renewed, first, "{}", rig.context());
    rig.served(&ari_renewed);
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
    agent
}

/// A forced renewal: the agent remembers the CA's deviation and orders
/// without `replaces` at once.
fn a_forced_renewal_orders_without_replaces(rig: &Rig, agent: &Agent) {
    let before = rig.issued();
    rig.renew();
    rig.wait_issued(agent, 2.0);
    let forced = rig.issued();
    assert_ne!(forced, before);
    rig.served(&forced);
    let metrics = agent.metrics().unwrap();
    assert_eq!(
        sum_samples(&metrics, "acme_agent_orders_total", &["result=\"failure\""]),
        Some(1.0),
        "only the one order the CA did not reflect failed: {metrics}"
    );
    assert!(
        std::fs::read_to_string(rig.log())
            .unwrap_or_default()
            .matches("orders go without `replaces` from now on")
            .count()
            == 1,
        "logged once"
    );
}

/// Profiles: acme2certifier lists those its config names. A listed one is
/// sent with the order; another is refused before any order, naming the
/// CA's offer.
fn a_listed_profile_is_ordered_and_another_refused(a2c: &mut A2c, rig: &Rig, mut agent: Agent) {
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
    rig.write_config("profile = \"shortlived\"");
    agent.kill();
    let mut agent = rig.start_agent();
    let orders_before = a2c.order_profiles().unwrap().len();
    rig.renew();
    rig.wait_issued(&agent, 1.0);
    let profiles = a2c.order_profiles().unwrap();
    assert_eq!(
        profiles.last().map(String::as_str),
        Some("shortlived"),
        "{profiles:?}"
    );
    rig.served(&rig.issued());

    rig.write_config("profile = \"tlsserver\"");
    agent.kill();
    let agent = rig.start_agent();
    let orders_before_refusal = a2c.order_profiles().unwrap().len();
    assert!(orders_before_refusal > orders_before);
    rig.renew();
    wait_metric(
        &agent,
        "acme_agent_certificate_failures",
        &["certificate=\"www\""],
        1.0,
        &|| rig.context(),
    );
    // The failures gauge is set just before the status record is written.
    let path = rig.path("state/certificates/www.status.json");
    wait_for(
        Duration::from_secs(10),
        "the refusal in the status record",
        || {
            let status = std::fs::read_to_string(&path).ok()?;
            (status.contains("\\\"tlsserver\\\"") && status.contains("classic, shortlived"))
                .then_some(())
        },
        || std::fs::read_to_string(&path).unwrap_or_default(),
    )
    .unwrap();
    assert_eq!(a2c.order_profiles().unwrap().len(), orders_before_refusal);
}

#[test]
fn ari_due_and_forced_renewals_succeed_against_a_ca_that_does_not_reflect_replaces() {
    let mut a2c = A2c::start(false).unwrap();
    assert!(
        a2c.directory().unwrap()["renewalInfo"].is_string(),
        "acme2certifier offers ARI"
    );
    let (rig, agent) = rig(&a2c);
    // First certificate: a plain order.
    rig.wait_issued(&agent, 1.0);
    let first = rig.issued();
    rig.served(&first);
    let agent = an_ari_due_renewal_survives_replaces_not_reflected(&mut a2c, &rig, agent, &first);
    a_forced_renewal_orders_without_replaces(&rig, &agent);
    a_listed_profile_is_ordered_and_another_refused(&mut a2c, &rig, agent);
}
