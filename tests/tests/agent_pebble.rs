//! The agent against a real ACME CA (Debian's Pebble, HTTP-01 validated on
//! loopback through `pebble-challtestsrv`'s DNS), with the real filter in a
//! real Envoy answering the challenges, and Envoy loading the SDS files the
//! agent writes.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acme_tests::agent::{Agent, Cert, Settings, wait_for};
use acme_tests::envoy::{
    Envoy, bootstrap_with_listeners, free_addr, https_listener, served_chain, wasm_filter_yaml,
};
use acme_tests::filter_wasm;
use acme_tests::http::{Reply, Server, free_port};
use acme_tests::pebble::{self, Pebble};

const ISSUE_TIMEOUT: Duration = Duration::from_secs(90);

/// Pebble, Envoy (filter on the plain listener Pebble validates against, an
/// HTTPS listener on the SDS files) and the agent, all on loopback.
struct World {
    pebble: Pebble,
    work: tempfile::TempDir,
    agent: Option<Agent>,
    envoy: Option<Envoy>,
    api: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
    _upstream: Server,
}

impl World {
    fn new(options: pebble::Options) -> Self {
        let http_port = free_port().unwrap();
        let pebble = Pebble::start(http_port, options).unwrap();
        let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
        Self {
            pebble,
            work: tempfile::tempdir().unwrap(),
            agent: None,
            envoy: None,
            api: free_addr().unwrap(),
            http: format!("127.0.0.1:{http_port}").parse().unwrap(),
            https: free_addr().unwrap(),
            _upstream: upstream,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.work.path().join("state")
    }

    fn sds_dir(&self) -> PathBuf {
        self.work.path().join("sds")
    }

    fn config_path(&self) -> PathBuf {
        self.work.path().join("agent.toml")
    }

    fn write_config(&self, certificates: &[Cert<'_>], retry: (u64, u64)) {
        let settings = Settings {
            directory_url: &self.pebble.directory_url,
            ca_root: &self.pebble.tls_root,
            state_dir: &self.state_dir(),
            sds_dir: &self.sds_dir(),
            api: self.api,
            self_check: Some(self.http),
            retry,
            certificates,
        };
        std::fs::write(self.config_path(), settings.toml()).unwrap();
    }

    fn start_agent(&mut self) {
        let agent = Agent::start(
            &self.config_path(),
            self.api,
            &self.work.path().join("agent.log"),
        )
        .unwrap();
        self.agent = Some(agent);
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    /// Starts Envoy once the agent has written a file for each of `names`
    /// (placeholders at first): Envoy refuses to start on a missing SDS file.
    fn start_envoy(&mut self, names: &[&str]) {
        for name in names {
            let path = self.sds_dir().join(format!("{name}.json"));
            wait_for(
                Duration::from_secs(10),
                &format!("{} written", path.display()),
                || path.is_file().then_some(()),
                || self.agent().log(),
            )
            .unwrap();
        }
        let filter = wasm_filter_yaml(&filter_wasm().unwrap(), r#"{"agent_cluster":"acme_agent"}"#);
        let admin = free_addr().unwrap();
        let config = bootstrap_with_listeners(
            self.http,
            admin,
            &filter,
            self._upstream.addr(),
            self.api,
            &https_listener(self.https, &self.sds_dir(), names),
        );
        self.envoy = Some(Envoy::start(&config, admin, 1).unwrap());
    }

    fn envoy(&self) -> &Envoy {
        self.envoy.as_ref().expect("envoy started")
    }

    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.agent().metric(name, labels).unwrap()
    }

    fn context(&self) -> String {
        format!(
            "--- agent log ---\n{}\n--- pebble log (tail) ---\n{}",
            self.agent.as_ref().map(Agent::log).unwrap_or_default(),
            tail(&self.pebble.log(), 40)
        )
    }

    /// Waits until `n` orders of `certificate` succeeded.
    fn wait_issued(&self, certificate: &str, n: f64) {
        let label = format!("certificate=\"{certificate}\"");
        wait_for(
            ISSUE_TIMEOUT,
            &format!("{certificate} issued"),
            || {
                (self.metric("acme_agent_orders_total", &[&label, "result=\"success\""]) >= n)
                    .then_some(())
            },
            || self.context(),
        )
        .unwrap();
    }

    fn issued_pem(&self, name: &str) -> (String, String) {
        let dir = self.sds_dir().join(name);
        (
            std::fs::read_to_string(dir.join("tls.crt")).unwrap(),
            std::fs::read_to_string(dir.join("tls.key")).unwrap(),
        )
    }

    /// The chain in `<sds>/<name>/tls.crt` verifies against Pebble's root for
    /// each domain, and its key is the one beside it.
    fn assert_valid(&self, name: &str, domains: &[&str]) {
        let (chain, key) = self.issued_pem(name);
        let root = self.pebble.issuing_root().unwrap();
        for domain in domains {
            pebble::verify_chain(&chain, &root, domain)
                .unwrap_or_else(|e| panic!("{name} for {domain}: {e}"));
        }
        assert_eq!(
            public_key_of(&chain, "x509"),
            public_key_of(&key, "pkey"),
            "{name}: key does not match the leaf"
        );
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The public key of a PEM certificate (`x509`) or private key (`pkey`), by openssl.
fn public_key_of(pem: &str, kind: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(if kind == "x509" {
            vec!["x509", "-noout", "-pubkey"]
        } else {
            vec!["pkey", "-pubout"]
        })
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {kind} failed");
    String::from_utf8(out.stdout).unwrap()
}

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

const WWW: Cert<'static> = Cert {
    name: "www",
    domains: &["www.example.com", "example.com"],
};
const API: Cert<'static> = Cert {
    name: "api",
    domains: &["api.example.com"],
};

#[test]
fn issues_two_certificates_envoy_serves_them_and_a_restart_reorders_nothing() {
    let mut world = World::new(pebble::Options::default());
    world.write_config(&[WWW, API], (1, 4));
    let started = Instant::now();
    world.start_agent();
    world.start_envoy(&["www", "api"]);
    world.wait_issued("www", 1.0);
    let www_done = started.elapsed();
    world.wait_issued("api", 1.0);
    println!(
        "agent start to SDS files: www (2 domains) {www_done:?}, both certificates {:?}",
        started.elapsed()
    );

    world.assert_valid("www", WWW.domains);
    world.assert_valid("api", API.domains);

    // Envoy loaded placeholder then certificate, and serves the CA's chain by SNI.
    let envoy = world.envoy();
    for name in ["www", "api"] {
        envoy
            .wait_stat_at_least(
                &format!("sds.{name}.update_success"),
                2,
                Duration::from_secs(10),
            )
            .unwrap();
    }
    let root = world.pebble.issuing_root().unwrap();
    for (sni, name) in [
        ("example.com", "www"),
        ("www.example.com", "www"),
        ("api.example.com", "api"),
    ] {
        let served = wait_for(
            Duration::from_secs(5),
            &format!("{sni} served by the CA's certificate"),
            || {
                served_chain(world.https, sni)
                    .ok()
                    .filter(|c| pebble::verify_chain(c, &root, sni).is_ok())
            },
            || world.envoy().log(),
        )
        .unwrap();
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
    wait_for(
        Duration::from_secs(20),
        "both certificates scheduled after restart",
        || {
            let m = world.agent().metrics().ok()?;
            let scheduled = ["www", "api"].iter().all(|n| {
                acme_tests::agent::sum_samples(
                    &m,
                    "acme_agent_certificate_next_renewal_timestamp_seconds",
                    &[&format!("certificate=\"{n}\"")],
                ) > 0.0
            });
            scheduled.then_some(())
        },
        || world.context(),
    )
    .unwrap();
    assert_eq!(
        world.metric("acme_agent_orders_total", &[]),
        0.0,
        "{}",
        world.context()
    );
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
        world.metric("acme_agent_account_registrations_total", &[]),
        0.0
    );
    assert_eq!(
        std::fs::read(account_file(&world.state_dir())).unwrap(),
        account_before
    );
    assert_eq!(world.issued_pem("www").0, cert_before);

    // `status` reads the state directory.
    let out = std::process::Command::new(acme_tests::agent::agent_binary().unwrap())
        .arg("--config")
        .arg(world.config_path())
        .arg("status")
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    let www_row = table
        .lines()
        .find(|l| l.starts_with("www "))
        .expect("www row");
    assert!(www_row.contains("www.example.com,example.com"), "{table}");
    assert!(!www_row.ends_with(" -") || www_row.contains('T'), "{table}");
}

#[test]
fn every_order_succeeds_when_pebble_rejects_half_the_nonces() {
    let mut world = World::new(pebble::Options {
        nonce_reject: Some(50),
    });
    world.write_config(&[WWW, API], (1, 4));
    world.start_agent();
    world.start_envoy(&["www", "api"]);
    world.wait_issued("www", 1.0);
    world.wait_issued("api", 1.0);
    assert_eq!(
        world.metric("acme_agent_orders_total", &["result=\"failure\""]),
        0.0,
        "{}",
        world.context()
    );
    world.assert_valid("www", WWW.domains);
    world.assert_valid("api", API.domains);
    let retried = world.agent().log().matches("badNonce, retrying").count();
    println!("badNonce retries beyond instant-acme's own: {retried}");
}

#[test]
fn backs_off_while_the_ca_is_down_then_succeeds_when_it_returns() {
    let mut world = World::new(pebble::Options::default());
    world.write_config(&[API], (1, 2));
    world.start_agent();
    world.start_envoy(&["api"]);
    world.wait_issued("api", 1.0);

    world.pebble.stop();
    world.write_config(&[API, WWW], (1, 2));
    world.agent().signal("HUP").unwrap();
    let down = Instant::now();
    let failures = || {
        world.metric(
            "acme_agent_orders_total",
            &["certificate=\"www\"", "result=\"failure\""],
        )
    };
    wait_for(
        Duration::from_secs(10),
        "a first failed attempt",
        || (failures() >= 1.0).then_some(()),
        || world.context(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let attempts = failures();
    let elapsed = down.elapsed().as_secs_f64();
    println!("CA down {elapsed:.1} s: {attempts} attempts (retry 1 s doubling to 2 s)");
    // 1 s then 2 s apart: about elapsed/2 + 1, never a hot loop.
    assert!(attempts >= 2.0, "no retry: {attempts}\n{}", world.context());
    assert!(
        attempts <= elapsed / 2.0 + 2.0,
        "hot loop: {attempts} in {elapsed:.1} s"
    );

    // Pebble comes back with no memory of the account: the agent registers
    // anew and orders.
    world.pebble.restart().unwrap();
    world.wait_issued("www", 1.0);
    world.assert_valid("www", WWW.domains);
    assert!(
        world.agent().log().contains("registering a new one"),
        "{}",
        world.context()
    );
}

#[test]
fn a_config_edit_adds_and_removes_certificates_without_restart() {
    let mut world = World::new(pebble::Options::default());
    world.write_config(&[API], (1, 4));
    world.start_agent();
    world.start_envoy(&["api"]);
    world.wait_issued("api", 1.0);
    let pid = world.agent().pid();

    // Picked up by the file watch alone (no signal).
    world.write_config(&[API, WWW], (1, 4));
    world.wait_issued("www", 1.0);
    world.assert_valid("www", WWW.domains);

    // Removing a certificate stops its renewal: its gauges go away.
    world.write_config(&[WWW], (1, 4));
    wait_for(
        Duration::from_secs(10),
        "api no longer managed",
        || {
            (world.metric(
                "acme_agent_certificate_next_renewal_timestamp_seconds",
                &["certificate=\"api\""],
            ) == 0.0)
                .then_some(())
        },
        || world.context(),
    )
    .unwrap();
    assert_eq!(world.agent().pid(), pid, "same process throughout");
    assert!(world.agent().log().contains("configuration reloaded"));
}
