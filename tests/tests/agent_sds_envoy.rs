//! The agent's file sink feeding a real Envoy: the SDS file it writes loads,
//! a replaced certificate is served on the next handshake without a restart,
//! and a broken one is rejected while the old one stays.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use acme_agent::disk::sink::FileSink;
use acme_agent::ports::sink::{CertificateSink, IssuedCertificate};
use acme_tests::envoy::{
    Envoy, bootstrap_with_listeners, free_addr, https_listener, served_subject,
};

/// A self-signed P-256 certificate for `cn` from the openssl CLI (scripts/setup.sh
/// installs it): (chain PEM, PKCS#8 key PEM).
fn self_signed(dir: &Path, cn: &str) -> (String, String) {
    let key = dir.join(format!("{cn}.key"));
    let crt = dir.join(format!("{cn}.crt"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", &format!("/CN={cn}"), "-addext"])
        .arg(format!("subjectAltName=DNS:{cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success());
    (
        std::fs::read_to_string(crt).unwrap(),
        std::fs::read_to_string(key).unwrap(),
    )
}

/// Envoy with the shared HTTPS listener on the sink's SDS file for `www`
/// (the plain-HTTP listener and clusters of the shared bootstrap are unused).
fn bootstrap(listen: SocketAddr, admin: SocketAddr, sink: &FileSink, dir: &Path) -> String {
    // https_listener names the file as the sink writes it.
    assert_eq!(sink.sds_path("www"), dir.join("www.json"));
    let unused = || free_addr().unwrap();
    bootstrap_with_listeners(
        unused(),
        admin,
        "",
        unused(),
        unused(),
        &https_listener(listen, dir, &["www"]),
    )
}

#[test]
fn sds_file_loads_hot_swaps_and_rejects_a_broken_update() {
    let work = tempfile::tempdir().unwrap();
    let sink = FileSink::new(work.path().join("sds")).unwrap();
    let (chain, key) = self_signed(work.path(), "first.example.com");
    acme_tests::block_on(sink.install(&IssuedCertificate {
        name: "www".into(),
        chain_pem: chain,
        key_pem: key.into(),
    }))
    .unwrap();

    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let config = bootstrap(listen, admin, &sink, &work.path().join("sds"));
    let envoy = Envoy::start(&config, admin, 1).unwrap();
    assert!(
        served_subject(listen, "first.example.com")
            .unwrap()
            .contains("first.example.com")
    );
    let loaded = envoy.stat("sds.www.update_success").unwrap().unwrap_or(0);
    assert!(loaded >= 1, "{}", envoy.log());

    // A renewed certificate: served on the next handshake, no restart.
    let (chain, key) = self_signed(work.path(), "second.example.com");
    let written = Instant::now();
    acme_tests::block_on(sink.install(&IssuedCertificate {
        name: "www".into(),
        chain_pem: chain,
        key_pem: key.into(),
    }))
    .unwrap();
    acme_tests::agent::wait_for(
        Duration::from_secs(60),
        "the renewed certificate served (hot reload)",
        || {
            served_subject(listen, "first.example.com")
                .unwrap()
                .contains("second.example.com")
                .then_some(())
        },
        || envoy.log(),
    )
    .unwrap();
    eprintln!(
        "hot reload: new certificate served {:?} after the write",
        written.elapsed()
    );
    assert!(envoy.stat("sds.www.update_success").unwrap().unwrap_or(0) > loaded);

    // A key that does not match the chain is rejected; the served one stays.
    let (chain, _) = self_signed(work.path(), "third.example.com");
    let (_, other_key) = self_signed(work.path(), "fourth.example.com");
    acme_tests::block_on(sink.install(&IssuedCertificate {
        name: "www".into(),
        chain_pem: chain,
        key_pem: other_key.into(),
    }))
    .unwrap();
    envoy
        .wait_stat_at_least("sds.www.update_rejected", 1, Duration::from_secs(30))
        .unwrap();
    assert!(
        served_subject(listen, "first.example.com")
            .unwrap()
            .contains("second.example.com")
    );
}
