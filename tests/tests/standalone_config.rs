//! The standalone configuration a user copies (`envoy-config/standalone/`):
//! Envoy accepts the bootstrap (`envoy --mode validate`), the agent accepts
//! its config, and the two agree with each other.

use std::path::Path;
use std::process::Command;

use acme_agent::config::Config;
use acme_agent::sink::{CertificateSink, FileSink, IssuedCertificate};
use acme_tests::envoy::envoy_binary;
use acme_tests::{filter_wasm, workspace_root};

fn read(relative: &str) -> String {
    std::fs::read_to_string(workspace_root().join(relative)).unwrap()
}

/// The SDS secret names listed in the bootstrap.
fn sds_names(envoy_yaml: &str) -> Vec<String> {
    envoy_yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path: /etc/envoy/sds/"))
        .filter_map(|f| f.strip_suffix(".json"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn envoy_validates_the_standalone_bootstrap() {
    let yaml = read("envoy-config/standalone/envoy.yaml");
    let work = tempfile::tempdir().unwrap();
    let sds = work.path().join("sds");
    // The paths a user would change, pointed at real files: Envoy checks that
    // watched SDS files exist, and the agent's placeholders are what exists
    // before the first certificate.
    let sink = FileSink::new(&sds).unwrap();
    let config = Config::parse(
        &read("envoy-config/standalone/agent.toml"),
        Path::new("agent.toml"),
    )
    .unwrap();
    for cert in &config.certificates {
        let (chain_pem, key_pem) =
            acme_agent::certificate::placeholder(&cert.domains, cert.key_type).unwrap();
        sink.install(&IssuedCertificate {
            name: cert.name.clone(),
            chain_pem,
            key_pem,
        })
        .unwrap();
    }
    let wasm = filter_wasm().unwrap();
    let adapted = yaml
        .replace("/etc/envoy/sds", &sds.display().to_string())
        .replace("/etc/envoy/acme_filter.wasm", &wasm.display().to_string());
    let path = work.path().join("envoy.yaml");
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
fn agent_config_matches_the_bootstrap() {
    let yaml = read("envoy-config/standalone/envoy.yaml");
    let config = Config::parse(
        &read("envoy-config/standalone/agent.toml"),
        Path::new("agent.toml"),
    )
    .unwrap();
    let names: Vec<String> = config.certificates.iter().map(|c| c.name.clone()).collect();
    assert_eq!(sds_names(&yaml), names, "one SDS entry per certificate");
    assert_eq!(config.sds_dir.as_deref(), Some(Path::new("/etc/envoy/sds")));
    let agent_port = config.challenge_api.listen.port();
    assert!(
        yaml.contains(&format!("port_value: {agent_port} }}")),
        "the acme_agent cluster points at the agent's port {agent_port}"
    );
    let self_check = config.self_check.expect("self_check is set").target;
    let (_, port) = self_check.rsplit_once(':').unwrap();
    assert!(yaml.contains(&format!("port_value: {port} }}")));
    // The filter is first in the plain-HTTP chain, before the router.
    let http_filters = yaml.find("http_filters:").unwrap();
    let wasm = yaml[http_filters..]
        .find("extensions.filters.http.wasm.v3.Wasm")
        .unwrap();
    let router = yaml[http_filters..]
        .find("envoy.filters.http.router")
        .unwrap();
    assert!(wasm < router);
    // Enabled on the challenge route, which comes before the catch-all.
    let challenge_route = yaml
        .find(r#"prefix: "/.well-known/acme-challenge/""#)
        .unwrap();
    let catch_all = yaml.find(r#"prefix: "/" }"#).unwrap();
    assert!(challenge_route < catch_all);
    assert!(yaml[challenge_route..catch_all].contains("envoy.config.route.v3.FilterConfig"));
}
