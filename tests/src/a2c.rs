//! A second, independent ACME server for tests: acme2certifier from PyPI
//! (installed into `.venv` by `scripts/setup.sh`), with its bundled OpenSSL CA
//! handler and its sqlite database, served over TLS by `tests/a2c/launch.py`.
//! It offers ARI (`renewalInfo`) and, unlike what RFC 9773 asks, does not
//! reflect `replaces` in the orders it returns.
//!
//! It validates HTTP-01 on port 80 only and resolves names through port 53
//! only, so a test using it owns 127.0.0.1:80 (for Envoy) and runs
//! `pebble-challtestsrv` as its DNS on [`DNS_ADDR`]: no other test may use
//! those, which is why only one test binary starts it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::http::free_port;
use crate::workspace_root;

/// Where acme2certifier sends its DNS queries (port 53 is all it can ask).
pub const DNS_ADDR: &str = "127.1.2.53:53";

pub struct A2c {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>/directory`
    pub directory_url: String,
    /// The CA that signs both its TLS certificate and what it issues.
    pub ca: PathBuf,
    listen: SocketAddr,
    server: Option<Child>,
    dns: Child,
    /// `[Order] profiles` (JSON: name -> description), listed in the directory.
    profiles: Option<String>,
}

impl A2c {
    /// Starts its DNS and the server; `renewal_force` makes its renewal info
    /// say "renew now" for every certificate.
    pub fn start(renewal_force: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // One CA signs its TLS certificate and what it issues.
        let tls = crate::tls::localhost(dir.path(), "acme2certifier test CA")?;
        std::fs::create_dir(dir.path().join("certs"))?;
        let mut dns = Command::new("pebble-challtestsrv");
        dns.args(["-defaultIPv6", "", "-defaultIPv4", "127.0.0.1"])
            .args(["-dns01", DNS_ADDR])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port()?)])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("dns.log"))?)
            .stderr(Stdio::null());
        let dns = dns.spawn().context("starting pebble-challtestsrv")?;
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut a2c = Self {
            directory_url: format!("https://{listen}/directory"),
            ca: tls.ca,
            listen,
            server: None,
            dns,
            profiles: None,
            dir,
        };
        a2c.start_server(renewal_force)?;
        Ok(a2c)
    }

    fn write_config(&self, renewal_force: bool) -> Result<PathBuf> {
        let p = |name: &str| self.dir.path().join(name).display().to_string();
        let dns_ip = DNS_ADDR.split(':').next().unwrap_or_default();
        let config = format!(
            "[DEFAULT]\ndebug: False\ndns_server_list: [\"{dns_ip}\"]\n\n\
             [Nonce]\nnonce_check_disable: False\n\n\
             [CAhandler]\nhandler_module: acme2certifier.cahandlers.openssl_ca_handler\n\
             issuing_ca_key: {key}\nissuing_ca_cert: {cert}\nca_cert_chain_list: [\"{cert}\"]\n\
             issuing_ca_crl: {crl}\ncert_save_path: {certs}\ncert_validity_days: 30\n\n\
             [DBhandler]\nhandler_module: acme2certifier.dbhandlers.wsgi_handler\ndbfile: {db}\n\n\
             [Renewalinfo]\nrenewal_force: {renewal_force}\nretry_after_timeout: 60\n{order}",
            key = p("ca.key"),
            cert = p("ca.crt"),
            certs = p("certs"),
            crl = p("ca.crl"),
            db = p("acme_srv.db"),
            renewal_force = if renewal_force { "True" } else { "False" },
            order = self
                .profiles
                .as_ref()
                .map(|json| format!("\n[Order]\nprofiles: {json}\n"))
                .unwrap_or_default(),
        );
        let path = self.dir.path().join("acme_srv.cfg");
        std::fs::write(&path, config)?;
        Ok(path)
    }

    fn start_server(&mut self, renewal_force: bool) -> Result<()> {
        let config = self.write_config(renewal_force)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("a2c.log"))?;
        let child = Command::new(workspace_root().join(".venv/bin/python"))
            .arg(workspace_root().join("tests/a2c/launch.py"))
            .args([
                "127.0.0.1",
                &self.listen.port().to_string(),
                &self.dir.path().join("server.crt").display().to_string(),
                &self.dir.path().join("server.key").display().to_string(),
            ])
            .env("ACME_SRV_CONFIGFILE", config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting acme2certifier (scripts/setup.sh installs it into .venv)")?;
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.server.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("acme2certifier exited ({status}):\n{}", self.log());
            }
            if self.directory().is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("acme2certifier not ready in 30 s:\n{}", self.log())
    }

    /// Its directory document.
    pub fn directory(&self) -> Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
            .arg(&self.ca)
            .arg(&self.directory_url)
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Restarts the server (its database stays) with another renewal-info mode.
    pub fn restart(&mut self, renewal_force: bool) -> Result<()> {
        self.stop();
        self.start_server(renewal_force)
    }

    /// Restarts the server listing `profiles` (JSON: name -> description)
    /// in its directory's `meta.profiles`.
    pub fn restart_with_profiles(&mut self, renewal_force: bool, profiles: &str) -> Result<()> {
        self.profiles = Some(profiles.to_owned());
        self.restart(renewal_force)
    }

    /// The profile of every order it received, oldest first (from its
    /// sqlite database).
    pub fn order_profiles(&self) -> Result<Vec<String>> {
        let out = Command::new(workspace_root().join(".venv/bin/python"))
            .args([
                "-c",
                "import sqlite3, sys; print('\\n'.join(r[0] or '' for r in sqlite3.connect(sys.argv[1]).execute('select profile from orders order by id')))",
            ])
            .arg(self.dir.path().join("acme_srv.db"))
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("a2c.log")).unwrap_or_default()
    }
}

impl Drop for A2c {
    fn drop(&mut self) {
        self.stop();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}
