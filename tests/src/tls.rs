//! TLS material for the test CAs' own servers (Pebble, acme2certifier): a CA
//! and a `localhost`/127.0.0.1 leaf signed by it, from the openssl CLI. A
//! leaf, not the CA itself: rustls (like any WebPKI verifier) refuses a
//! self-signed CA certificate presented as the server's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

pub struct LocalTls {
    /// The CA: what a client trusts (`acme.ca_root`), and its key.
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// The server's certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(sub: &[&str], key: &[&str], args: &[&str], paths: &[(&str, &PathBuf)]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(sub).args(key).args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    let out = cmd.output().context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {sub:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Writes the CA (named `ca_name`) and the `localhost` leaf into `dir`.
pub fn localhost(dir: &Path, ca_name: &str) -> Result<LocalTls> {
    let tls = LocalTls {
        ca: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    let csr = dir.join("server.csr");
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &["req", "-x509"],
        &ec,
        &[
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca_name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        &[("-keyout", &tls.ca_key), ("-out", &tls.ca)],
    )?;
    openssl(
        &["req"],
        &ec,
        &["-subj", "/CN=localhost"],
        &[("-keyout", &tls.key), ("-out", &csr)],
    )?;
    openssl(
        &["x509", "-req", "-days", "2", "-CAcreateserial"],
        &[],
        &[],
        &[
            ("-in", &csr),
            ("-CA", &tls.ca),
            ("-CAkey", &tls.ca_key),
            ("-extfile", &ext),
            ("-out", &tls.cert),
        ],
    )?;
    Ok(tls)
}
