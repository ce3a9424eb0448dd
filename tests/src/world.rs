//! The whole system on loopback for end-to-end tests: Debian's Pebble as the
//! CA, the real agent binary, one or more real Envoys with the real filter on
//! a plain-HTTP listener and an HTTPS listener fed by the agent's SDS files,
//! and an upstream that counts what reaches it. Ports are picked free, so
//! tests run in parallel; every process is killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::agent::{Agent, Cert, Settings, sum_samples, wait_for};
use crate::envoy::{
    Envoy, bootstrap_with_listeners, free_addr, https_listener, wait_served_by_ca, wasm_filter_yaml,
};
use crate::filter_wasm;
use crate::http::{Reply, Server, free_port};
use crate::pebble::{self, Pebble};

/// How long one issuance may take before a test gives up.
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(90);

/// One Envoy: a plain-HTTP listener with the filter, an HTTPS listener on the
/// SDS files of `names`.
pub struct Node {
    pub envoy: Option<Envoy>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub names: Vec<String>,
    pub concurrency: u32,
}

pub struct World {
    pub pebble: Pebble,
    pub work: tempfile::TempDir,
    pub agent: Option<Agent>,
    pub nodes: Vec<Node>,
    /// The challenge API: loopback TCP with the token scheme
    /// ([`crate::agent::TEST_TOKEN`]), the shape Istio uses.
    pub api: SocketAddr,
    /// The probes and metrics listener.
    pub health: SocketAddr,
    pub upstream: Server,
    /// Requests under `/.well-known/acme-challenge/` that reached the upstream.
    pub upstream_challenges: Arc<AtomicUsize>,
    pub certificates: Vec<(String, Vec<String>)>,
    pub self_check: Option<SocketAddr>,
    pub retry: (u64, u64),
    /// The first node's plain-HTTP port: where Pebble validates.
    pub http_port: u16,
    /// Kubernetes mode against this fake API server.
    pub kube: Option<crate::fake_kube::FakeKube>,
    /// Kubernetes mode against a real API server (`kube_apiserver`): the
    /// namespace and a kubeconfig (the agent's ServiceAccount). Its Role is
    /// the test's to grant ([`World::checked_secrets`]).
    pub real_kube: Option<(String, PathBuf)>,
    /// Appended to the generated config (tables such as `[acme.limits]`).
    pub extra_config: String,
    /// More keys of a certificate's table, by certificate name.
    pub certificate_extra: std::collections::BTreeMap<String, String>,
    /// What the CA had counted when the agent last started.
    pub ca_at_start: pebble::CaCounts,
    /// Secrets `check-config` names that the test keeps out of the agent's
    /// Role (Kubernetes mode): an operator who forgot one.
    pub withheld_secrets: Vec<String>,
}

impl World {
    pub fn new(options: pebble::Options) -> Self {
        let http_port = free_port().unwrap();
        let pebble = Pebble::start(http_port, options).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        let upstream = Server::start(move |request| {
            if request.path.starts_with("/.well-known/acme-challenge/") {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            Reply::new(200, "upstream")
        })
        .unwrap();
        let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
        Self {
            pebble,
            work: tempfile::tempdir().unwrap(),
            agent: None,
            nodes: Vec::new(),
            api: free_addr().unwrap(),
            health: free_addr().unwrap(),
            upstream,
            upstream_challenges: hits,
            certificates: Vec::new(),
            self_check: Some(http),
            retry: (1, 4),
            http_port,
            kube: None,
            real_kube: None,
            extra_config: String::new(),
            certificate_extra: Default::default(),
            ca_at_start: pebble::CaCounts::default(),
            withheld_secrets: Vec::new(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.work.path().join("state")
    }

    pub fn sds_dir(&self) -> PathBuf {
        self.work.path().join("sds")
    }

    pub fn config_path(&self) -> PathBuf {
        self.work.path().join("agent.toml")
    }

    /// `GET <path>` on the agent's challenge API, proving the token as a
    /// filter does; the answer only when the agent signed it.
    pub fn api_get(&self, path: &str) -> anyhow::Result<crate::http::Response> {
        signed_get(self.api, path, crate::agent::TEST_TOKEN)
    }

    /// The filter's configuration for this world's agent (with the token).
    pub fn filter_config(&self) -> String {
        format!(
            r#"{{"agent_cluster":"acme_agent","agent_token":"{}"}}"#,
            crate::agent::TEST_TOKEN
        )
    }

    /// Replaces the configured certificates (not written until `write_config`).
    pub fn certificates(&mut self, certs: &[(&str, &[&str])]) -> &mut Self {
        self.certificates = certs
            .iter()
            .map(|(name, domains)| {
                (
                    name.to_string(),
                    domains.iter().map(|d| d.to_string()).collect(),
                )
            })
            .collect();
        self
    }

    pub fn write_config(&self) {
        let domains: Vec<Vec<&str>> = self
            .certificates
            .iter()
            .map(|(_, d)| d.iter().map(String::as_str).collect())
            .collect();
        let certs: Vec<Cert<'_>> = self
            .certificates
            .iter()
            .zip(&domains)
            .map(|((name, _), domains)| Cert {
                name,
                domains,
                extra: self.certificate_extra.get(name).map_or("", String::as_str),
            })
            .collect();
        let token_file = crate::agent::write_token_file(self.work.path()).unwrap();
        let settings = Settings {
            directory_url: &self.pebble.directory_url,
            ca_root: &self.pebble.tls_root,
            state_dir: &self.state_dir(),
            sds_dir: &self.sds_dir(),
            kubernetes: self
                .kube
                .as_ref()
                .map(|k| k.namespace.as_str())
                .or(self.real_kube.as_ref().map(|(ns, _)| ns.as_str())),
            api: self.api,
            health: self.health,
            token_file: Some(&token_file),
            self_check: self.self_check,
            retry: self.retry,
            certificates: &certs,
        };
        std::fs::write(
            self.config_path(),
            format!("{}\n{}", settings.toml(), self.extra_config),
        )
        .unwrap();
        self.grant_checked_secrets();
    }

    /// In Kubernetes mode, lets the agent's Role name the Secrets
    /// `acme-agent check-config` prints for this config, as the shipped
    /// Role's comment tells an operator to.
    fn grant_checked_secrets(&self) {
        let Some(kube) = &self.kube else {
            return;
        };
        let names = self.checked_secrets();
        if names.is_empty() {
            // A config the agent refuses (a test of that): nothing to grant.
            return;
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        kube.grant_secrets(&names);
    }

    /// The Secrets `acme-agent check-config` says this config needs in the
    /// agent's Role, less `withheld_secrets`; none for a refused config.
    pub fn checked_secrets(&self) -> Vec<String> {
        let out = self.cli(&["check-config"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Vec::new();
        }
        let names: Vec<String> = text
            .lines()
            .find_map(|l| l.split_once("(a Role's resourceNames): "))
            .map(|(_, names)| names.split(", ").map(str::to_owned).collect())
            .unwrap_or_default();
        assert!(
            !names.is_empty(),
            "check-config printed no Secret names: {text}"
        );
        names
            .into_iter()
            .filter(|n| !self.withheld_secrets.contains(n))
            .collect()
    }

    /// In Kubernetes mode, the kubeconfig pointing at the fake API server
    /// (written on first use), as the `KUBECONFIG` environment.
    fn kube_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        if let Some((_, kubeconfig)) = &self.real_kube {
            return vec![("KUBECONFIG", kubeconfig.clone().into_os_string())];
        }
        let Some(kube) = &self.kube else {
            return Vec::new();
        };
        let path = self.work.path().join("kubeconfig");
        kube.write_kubeconfig(&path).unwrap();
        vec![("KUBECONFIG", path.into_os_string())]
    }

    /// Runs `acme-agent --config <this world's config> <args>` to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::agent::agent_binary().unwrap())
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .envs(self.kube_env())
            .output()
            .unwrap()
    }

    /// `acme-agent renew <name>`, which must be accepted.
    pub fn renew(&self, name: &str) {
        let out = self.cli(&["renew", name]);
        assert!(
            out.status.success(),
            "renew {name}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.context()
        );
    }

    pub fn start_agent(&mut self) {
        // Before the process exists: nothing it does is counted as before.
        self.ca_at_start = self.pebble.counts();
        let kube_env = self.kube_env();
        let env: Vec<(&str, &std::ffi::OsStr)> =
            kube_env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        let agent = Agent::start_with_env(
            &self.config_path(),
            self.api,
            &self.work.path().join("agent.log"),
            &env,
        )
        .unwrap();
        self.agent = Some(agent);
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    /// Adds an Envoy serving `names` over TLS, at `--concurrency`; the first
    /// one listens where Pebble validates. Returns its index.
    pub fn add_envoy(&mut self, names: &[&str], concurrency: u32) -> usize {
        let http = if self.nodes.is_empty() {
            format!("127.0.0.1:{}", self.http_port).parse().unwrap()
        } else {
            free_addr().unwrap()
        };
        self.nodes.push(Node {
            envoy: None,
            http,
            https: free_addr().unwrap(),
            admin: free_addr().unwrap(),
            names: names.iter().map(|n| n.to_string()).collect(),
            concurrency,
        });
        let index = self.nodes.len() - 1;
        self.start_envoy(index);
        index
    }

    /// (Re)starts node `index`'s Envoy once the agent has written a file for
    /// each of its names: Envoy refuses to start on a missing SDS file.
    pub fn start_envoy(&mut self, index: usize) {
        for name in &self.nodes[index].names {
            let path = self.sds_dir().join(format!("{name}.json"));
            wait_for(
                Duration::from_secs(30),
                &format!("{} written", path.display()),
                || path.is_file().then_some(()),
                || self.context(),
            )
            .unwrap();
        }
        let node = &self.nodes[index];
        let names: Vec<&str> = node.names.iter().map(String::as_str).collect();
        let filter = wasm_filter_yaml(&filter_wasm().unwrap(), &self.filter_config());
        let config = bootstrap_with_listeners(
            node.http,
            node.admin,
            &filter,
            self.upstream.addr(),
            self.api,
            &if names.is_empty() {
                String::new()
            } else {
                https_listener(node.https, &self.sds_dir(), &names)
            },
        );
        let envoy = Envoy::start(&config, node.admin, node.concurrency).unwrap();
        self.nodes[index].envoy = Some(envoy);
    }

    pub fn stop_envoy(&mut self, index: usize) {
        self.nodes[index].envoy = None;
    }

    pub fn envoy(&self, index: usize) -> &Envoy {
        self.nodes[index].envoy.as_ref().expect("envoy running")
    }

    /// The agent's metric; a missing series fails ([`Agent::metric`]).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.agent()
            .metric(name, labels)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.context()))
    }

    /// The agent's metric, 0 for a series not there yet (the metric must
    /// exist: [`Agent::metric_or_zero`]).
    pub fn metric_or_zero(&self, name: &str, labels: &[&str]) -> f64 {
        self.agent()
            .metric_or_zero(name, labels)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.context()))
    }

    /// Orders the CA created since the agent last started.
    pub fn orders_since_start(&self) -> usize {
        self.pebble.orders_created() - self.ca_at_start.orders
    }

    /// For an agent process started over existing state, once it has
    /// scheduled everything: the CA saw no account registered and no order
    /// placed since it started.
    pub fn assert_nothing_registered_or_ordered(&self) {
        let now = self.pebble.counts();
        assert_eq!(
            now,
            self.ca_at_start,
            "the CA saw a registration or an order since the agent started\n{}",
            self.context()
        );
    }

    pub fn context(&self) -> String {
        let agent_log =
            std::fs::read_to_string(self.work.path().join("agent.log")).unwrap_or_default();
        format!(
            "--- agent log ---\n{}\n--- pebble log (tail) ---\n{}",
            tail(&agent_log, 80),
            tail(&self.pebble.log(), 30)
        )
    }

    /// Waits until the agent's metric `name` (with `labels`) reaches `at_least`.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[&str],
        at_least: f64,
        timeout: Duration,
    ) -> f64 {
        wait_for(
            timeout,
            &format!("{name}{labels:?} >= {at_least}"),
            || {
                let m = self.agent().metrics().ok()?;
                let value = sum_samples(&m, name, labels)?;
                (value >= at_least).then_some(value)
            },
            || self.context(),
        )
        .unwrap()
    }

    /// The `acme-agent status` line of certificate `name`.
    pub fn status_line(&self, name: &str) -> String {
        let out = self.cli(&["status"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_default()
            .to_owned()
    }

    /// The agent's stored status record of `name` (file mode).
    pub fn status_record(&self, name: &str) -> serde_json::Value {
        let path = self
            .state_dir()
            .join("certificates")
            .join(format!("{name}.status.json"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits until at least `n` orders of `certificate` succeeded.
    pub fn wait_issued(&self, certificate: &str, n: f64) {
        let label = format!("certificate=\"{certificate}\"");
        wait_for(
            ISSUE_TIMEOUT,
            &format!("{certificate} issued {n} times"),
            || {
                let m = self.agent().metrics().ok()?;
                (sum_samples(
                    &m,
                    "acme_agent_orders_total",
                    &[&label, "result=\"success\""],
                )? >= n)
                    .then_some(())
            },
            || self.context(),
        )
        .unwrap();
    }

    /// Waits until the agent has every configured certificate on its schedule
    /// (its next-renewal gauge is set): issued or found valid.
    pub fn wait_scheduled(&self) {
        wait_for(
            Duration::from_secs(30),
            "every certificate scheduled",
            || {
                let m = self.agent().metrics().ok()?;
                self.certificates
                    .iter()
                    .all(|(name, _)| {
                        sum_samples(
                            &m,
                            "acme_agent_certificate_next_renewal_timestamp_seconds",
                            &[&format!("certificate=\"{name}\"")],
                        )
                        .is_some_and(|at| at > 0.0)
                    })
                    .then_some(())
            },
            || self.context(),
        )
        .unwrap();
    }

    /// `<sds>/<name>/tls.crt` and `tls.key`.
    pub fn issued_pem(&self, name: &str) -> (String, String) {
        let dir = self.sds_dir().join(name);
        (
            std::fs::read_to_string(dir.join("tls.crt")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("tls.key")).unwrap_or_default(),
        )
    }

    /// The issued chain verifies against Pebble's root for each domain, and
    /// its key is the one beside it.
    pub fn assert_valid(&self, name: &str, domains: &[&str]) {
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

    /// Waits until node `index` serves `sni` a chain that verifies against
    /// Pebble's current root; returns it.
    pub fn wait_served(&self, index: usize, sni: &str) -> String {
        let root = self.pebble.issuing_root().unwrap();
        wait_served_by_ca(
            self.nodes[index].https,
            sni,
            &root,
            Duration::from_secs(10),
            || self.context(),
        )
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The public key of a PEM certificate (`x509`) or private key (`pkey`), by openssl.
pub fn public_key_of(pem: &str, kind: &str) -> String {
    use std::io::Write;
    let args: &[&str] = if kind == "x509" {
        &["x509", "-noout", "-pubkey"]
    } else {
        &["pkey", "-pubout"]
    };
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(pem.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET <path>` at `api` proving `token` (the filter's way); the answer
/// only when it is signed with the token for this request.
pub fn signed_get(
    api: SocketAddr,
    path: &str,
    token: &str,
) -> anyhow::Result<crate::http::Response> {
    use acme_agent::api::auth;
    use std::io::Write as _;
    let nonce = auth::nonce();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let proof = auth::authorization(token, &nonce, now, "GET", path);
    let mut stream = std::net::TcpStream::connect(api)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: acme-agent\r\nauthorization: {proof}\r\nconnection: close\r\n\r\n"
    )?;
    let r = crate::http::read_response(&mut std::io::BufReader::new(stream), false)?;
    let signature = r.header(auth::SIGNATURE_HEADER).unwrap_or_default();
    anyhow::ensure!(
        auth::verify_response(token, &nonce, r.status, &r.body, signature),
        "the answer ({}) is not signed with the token",
        r.status
    );
    Ok(r)
}
