//! The standalone configurations a user copies: `envoy-config/standalone/`
//! (Envoy 1.37+, every certificate from the agent's SDS server on one
//! listener) and `envoy-config/standalone/files/` (older Envoys, one SDS file
//! per certificate). For each: Envoy accepts the bootstrap (`envoy --mode
//! validate`), the agent accepts its config, and the two agree.

use std::path::Path;
use std::process::Command;

use acme_agent::config::Config;
use acme_agent::disk::sink::FileSink;
use acme_agent::ports::sink::{CertificateSink, IssuedCertificate};
use acme_tests::envoy::envoy_binary;
use acme_tests::{filter_wasm, workspace_root};

const ON_DEMAND: &str = "envoy-config/standalone";
const FILES: &str = "envoy-config/standalone/files";

fn read(relative: &str) -> String {
    std::fs::read_to_string(workspace_root().join(relative)).unwrap()
}

fn shape(dir: &str) -> (String, Config) {
    let yaml = read(&format!("{dir}/envoy.yaml"));
    let config =
        Config::parse(&read(&format!("{dir}/agent.toml")), Path::new("agent.toml")).unwrap();
    (yaml, config)
}

/// The SDS secret names listed in a file-shape bootstrap.
fn sds_names(envoy_yaml: &str) -> Vec<String> {
    envoy_yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path: /etc/envoy/sds/"))
        .filter_map(|f| f.strip_suffix(".json"))
        .map(str::to_owned)
        .collect()
}

fn validate(yaml: &str, work: &Path) {
    let wasm = filter_wasm().unwrap();
    let adapted = yaml
        .replace("/etc/envoy/sds", &work.join("sds").display().to_string())
        .replace("/etc/envoy/acme_filter.wasm", &wasm.display().to_string());
    let path = work.join("envoy.yaml");
    std::fs::write(&path, adapted).unwrap();
    let out = Command::new(envoy_binary().unwrap())
        .args(["--mode", "validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn envoy_validates_both_standalone_bootstraps() {
    let (yaml, _) = shape(ON_DEMAND);
    let work = tempfile::tempdir().unwrap();
    validate(&yaml, work.path());

    // The file shape: Envoy checks that watched SDS files exist, and the
    // agent's placeholders are what exists before the first certificate.
    let (yaml, config) = shape(FILES);
    let work = tempfile::tempdir().unwrap();
    let sink = FileSink::new(work.path().join("sds")).unwrap();
    for cert in &config.certificates {
        let (chain_pem, key_pem) =
            acme_agent::certificate::placeholder(&cert.domains, cert.key_type).unwrap();
        acme_tests::block_on(sink.install(&IssuedCertificate {
            name: cert.name.clone(),
            chain_pem,
            key_pem: key_pem.into(),
        }))
        .unwrap();
    }
    validate(&yaml, work.path());
}

/// The Unix socket `listen` names (the shipped shapes use no TCP).
fn socket_of(listen: &acme_agent::config::Listen) -> String {
    match listen {
        acme_agent::config::Listen::Unix(path) => path.display().to_string(),
        other => panic!("the example listens on a Unix socket, not {other}"),
    }
}

/// What both shapes share: the agent's API socket and self-check target are
/// the bootstrap's, and the filter is first in the plain-HTTP chain, enabled
/// on the challenge route only.
fn assert_plain_http_agrees(yaml: &str, config: &Config) {
    let socket = socket_of(&config.challenge_api.listen);
    let cluster = yaml.find("- name: acme_agent").unwrap();
    assert!(
        yaml[cluster..].contains(&format!("pipe: {{ path: {socket} }}")),
        "the acme_agent cluster points at the agent's socket {socket}"
    );
    assert_eq!(config.challenge_api.token, None, "a socket needs no token");
    let self_check = config.self_check.clone().expect("self_check is set").target;
    let (_, port) = self_check.rsplit_once(':').unwrap();
    assert!(yaml.contains(&format!("port_value: {port} }}")));
    let http_filters = yaml.find("http_filters:").unwrap();
    let wasm = yaml[http_filters..]
        .find("extensions.filters.http.wasm.v3.Wasm")
        .unwrap();
    let router = yaml[http_filters..]
        .find("envoy.filters.http.router")
        .unwrap();
    assert!(wasm < router);
    let challenge_route = yaml
        .find(r#"prefix: "/.well-known/acme-challenge/""#)
        .unwrap();
    let catch_all = yaml.find(r#"prefix: "/" }"#).unwrap();
    assert!(challenge_route < catch_all);
    assert!(yaml[challenge_route..catch_all].contains("envoy.config.route.v3.FilterConfig"));
}

#[test]
fn the_on_demand_agent_config_matches_its_bootstrap() {
    let (yaml, config) = shape(ON_DEMAND);
    assert_plain_http_agrees(&yaml, &config);
    // No file and no entry per certificate: the agent's SDS, by SNI, delta.
    assert_eq!(config.sds_dir, None);
    assert!(sds_names(&yaml).is_empty());
    let sds = config.sds.expect("[sds] is set");
    let socket = socket_of(&sds.listen);
    let cluster = yaml.find("- name: acme_sds").unwrap();
    let next = yaml[cluster..].find("- name: acme_agent").unwrap();
    assert!(
        yaml[cluster..cluster + next].contains(&format!("pipe: {{ path: {socket} }}")),
        "the acme_sds cluster points at the agent's sds.listen"
    );
    assert!(yaml.contains("api_type: DELTA_GRPC"));
    // tls-alpn-01: an acme-tls/1 chain first, asking for the challenge
    // secrets, and the self-check aimed at the HTTPS port.
    let alpn = yaml
        .find(r#"application_protocols: ["acme-tls/1"]"#)
        .unwrap();
    let ordinary = yaml.find("# Everything else: the certificate").unwrap();
    assert!(alpn < ordinary);
    assert!(yaml[alpn..ordinary].contains(&format!(
        "{{ key: {}, value: {} }}",
        acme_agent::sds::SECRETS_HEADER,
        acme_agent::sds::ALPN_SECRETS
    )));
    assert!(yaml.contains("envoy.filters.listener.tls_inspector"));
    let tls_target = config
        .self_check
        .as_ref()
        .and_then(|c| c.tls_target.clone())
        .unwrap();
    assert!(yaml.contains(&format!(
        "port_value: {} }}",
        tls_target.rsplit_once(':').unwrap().1
    )));
    assert!(yaml.contains("envoy.tls.certificate_selectors.on_demand_secret"));
    assert!(yaml.contains("envoy.tls.certificate_mappers.sni"));
}

#[test]
fn the_file_agent_config_matches_its_bootstrap() {
    let (yaml, config) = shape(FILES);
    assert_plain_http_agrees(&yaml, &config);
    let names: Vec<String> = config.certificates.iter().map(|c| c.name.clone()).collect();
    assert_eq!(sds_names(&yaml), names, "one SDS entry per certificate");
    assert_eq!(config.sds_dir.as_deref(), Some(Path::new("/etc/envoy/sds")));
    assert_eq!(config.sds, None);
}
