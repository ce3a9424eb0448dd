//! A real ACME CA for tests: Debian's `pebble`, with `pebble-challtestsrv` as
//! its DNS server (every name resolves to 127.0.0.1), so Pebble validates
//! HTTP-01 challenges against whatever listens on loopback at `http_port`
//! (the tests put Envoy with the filter there). Both processes are killed on
//! drop. Pebble's own TLS certificate is generated per instance.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::http::free_port;

/// Knobs of Pebble's environment that tests turn.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `PEBBLE_WFE_NONCEREJECT`: percentage of valid nonces rejected as bad
    /// (Pebble's default is 5).
    pub nonce_reject: Option<u8>,
    /// `PEBBLE_AUTHZREUSE`: percentage of valid authorizations reused for a
    /// new order of the same account (Pebble's default is 50).
    pub authz_reuse: Option<u8>,
    /// The DNS server Pebble resolves and validates dns-01 with, instead of
    /// `pebble-challtestsrv` (a real `named`, say).
    pub dns_server: Option<SocketAddr>,
}

pub struct Pebble {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>/dir`
    pub directory_url: String,
    /// Pebble's TLS certificate: the `acme.ca_root` an agent must trust.
    pub tls_root: PathBuf,
    pub listen: SocketAddr,
    pub management: SocketAddr,
    pub http_port: u16,
    /// Where Pebble validates tls-alpn-01 (on 127.0.0.1).
    pub tls_port: u16,
    /// `pebble-challtestsrv`'s management API (plain HTTP).
    pub dns_management: SocketAddr,
    options: Options,
    dns: Child,
    dns_addr: SocketAddr,
    pebble: Option<Child>,
}

fn spawn_logged(mut cmd: Command, log: PathBuf) -> Result<Child> {
    let file = std::fs::File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {cmd:?} (scripts/setup.sh installs Debian's pebble)"))
}

impl Pebble {
    /// Starts the DNS server and Pebble; Pebble validates HTTP-01 on
    /// 127.0.0.1:`http_port`.
    pub fn start(http_port: u16, options: Options) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let tls = crate::tls::localhost(dir.path(), "test CA for Pebble")?;
        let (ca, cert, key) = (tls.ca, tls.cert, tls.key);
        let dns_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let dns_management: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut dns_cmd = Command::new("pebble-challtestsrv");
        dns_cmd
            .args(["-defaultIPv6", "", "-defaultIPv4", "127.0.0.1"])
            .args(["-dns01", &dns_addr.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &dns_management.to_string()]);
        let dns = spawn_logged(dns_cmd, dir.path().join("challtestsrv.log"))?;
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let management: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let tls_port = free_port()?;
        let config = pebble_config_json(listen, management, &cert, &key, http_port, tls_port);
        std::fs::write(dir.path().join("pebble.json"), config)?;
        let mut pebble = Self {
            directory_url: format!("https://{listen}/dir"),
            tls_root: ca,
            listen,
            management,
            http_port,
            tls_port,
            dns_management,
            options,
            dns,
            dns_addr,
            pebble: None,
            dir,
        };
        pebble.start_ca()?;
        Ok(pebble)
    }

    fn start_ca(&mut self) -> Result<()> {
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(self.dir.path().join("pebble.json"))
            .args([
                "-dnsserver",
                &self.options.dns_server.unwrap_or(self.dns_addr).to_string(),
            ])
            .env("PEBBLE_VA_NOSLEEP", "1");
        if let Some(percent) = self.options.authz_reuse {
            cmd.env("PEBBLE_AUTHZREUSE", percent.to_string());
        }
        if let Some(percent) = self.options.nonce_reject {
            cmd.env("PEBBLE_WFE_NONCEREJECT", percent.to_string());
        }
        let log = self.dir.path().join("pebble.log");
        // Append across restarts so a failure shows the whole story.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting pebble (scripts/setup.sh installs Debian's pebble)")?;
        self.pebble = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.pebble.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("pebble exited ({status}):\n{}", self.log());
            }
            if self.curl(&self.directory_url).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("pebble not ready within {timeout:?}:\n{}", self.log())
    }

    /// GETs `url` trusting Pebble's TLS certificate.
    fn curl(&self, url: &str) -> Result<String> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "--cacert"])
            .arg(&self.tls_root)
            .arg(url)
            .output()
            .context("running curl")?;
        if !out.status.success() {
            bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Makes the CA's DNS answer `host` with `address` only (where nothing
    /// listens, validation of `host` fails while everything else works).
    pub fn point_at(&self, host: &str, address: &str) -> Result<()> {
        self.dns_management_post(
            "/add-a",
            &format!(r#"{{"host":"{host}.","addresses":["{address}"]}}"#),
        )
    }

    /// Undoes [`Pebble::point_at`]: `host` resolves to 127.0.0.1 again.
    pub fn clear_pointer(&self, host: &str) -> Result<()> {
        self.dns_management_post("/clear-a", &format!(r#"{{"host":"{host}."}}"#))
    }

    fn dns_management_post(&self, path: &str, body: &str) -> Result<()> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "-X", "POST", "-d", body])
            .arg(format!("http://{}{path}", self.dns_management))
            .output()
            .context("running curl")?;
        if !out.status.success() {
            bail!(
                "challtestsrv {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The root that signs this Pebble's certificates (a new one every start).
    pub fn issuing_root(&self) -> Result<String> {
        self.curl(&format!("https://{}/roots/0", self.management))
    }

    /// The intermediates, for chain checks that need them apart.
    pub fn intermediate(&self) -> Result<String> {
        self.curl(&format!("https://{}/intermediates/0", self.management))
    }

    /// Stops the CA (the DNS server stays): the CA is down.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Makes the CA validate HTTP-01 on `port` from its next (re)start.
    pub fn set_http_port(&mut self, port: u16) -> Result<()> {
        let path = self.dir.path().join("pebble.json");
        let config = std::fs::read_to_string(&path)?;
        let updated = config.replace(
            &format!("\"httpPort\": {}", self.http_port),
            &format!("\"httpPort\": {port}"),
        );
        if updated == config {
            bail!("httpPort not found in {}", path.display());
        }
        std::fs::write(&path, updated)?;
        self.http_port = port;
        Ok(())
    }

    /// Starts the CA again on the same ports. Pebble keeps nothing across
    /// restarts: accounts and roots are new.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_ca()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// What the CA itself counted since the test started it (its log is
    /// kept across restarts): the ground truth of "no order was placed",
    /// whatever the agent's own counters say (they move only when an order
    /// ends). Compare two readings to count what happened between them.
    pub fn counts(&self) -> CaCounts {
        let log = self.log();
        let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
        CaCounts {
            orders: lines("Added order"),
            accounts: lines("accounts in memory"),
        }
    }

    /// Orders the CA created (each logged once, `Added order`; its `POST
    /// /order-plz` lines include requests it rejected for a bad nonce).
    pub fn orders_created(&self) -> usize {
        self.counts().orders
    }

    /// Validations the CA started for `identifier` (`Pulled a task`, logged
    /// once a challenge is POSTed to it, for the identifier's exact value):
    /// 0 means the CA was never told to check it.
    pub fn validations_of(&self, identifier: &str) -> usize {
        let quoted = format!("{identifier:?}");
        self.log()
            .lines()
            .filter(|l| l.contains("Pulled a task") && l.contains(&quoted))
            .count()
    }
}

/// Orders and accounts the CA created (its log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaCounts {
    pub orders: usize,
    pub accounts: usize,
}

/// Runs `openssl <sub> <key opts> <args> <path opts>`, failing on a non-zero exit.
fn pebble_config_json(
    listen: SocketAddr,
    management: SocketAddr,
    cert: &std::path::Path,
    key: &std::path::Path,
    http_port: u16,
    tls_port: u16,
) -> String {
    format!(
        r#"{{"pebble": {{
  "listenAddress": "{listen}",
  "managementListenAddress": "{management}",
  "certificate": "{cert}",
  "privateKey": "{key}",
  "httpPort": {http_port},
  "tlsPort": {tls_port},
  "ocspResponderURL": "",
  "externalAccountBindingRequired": false
}}}}"#,
        cert = cert.display(),
        key = key.display(),
    )
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = self.dns.kill();
        let _ = self.dns.wait();
    }
}

/// Verifies `chain_pem` (leaf first) against `root_pem` with `openssl verify`,
/// for `domain`. Returns openssl's complaint when it fails.
pub fn verify_chain(chain_pem: &str, root_pem: &str, domain: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs: Vec<&str> = chain_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|c| c.starts_with("-----BEGIN CERTIFICATE-----"))
        .collect();
    if certs.is_empty() {
        bail!("no certificate in the chain");
    }
    std::fs::write(dir.path().join("leaf.pem"), format!("{}\n", certs[0]))?;
    std::fs::write(
        dir.path().join("rest.pem"),
        format!("{}\n", certs[1..].join("\n")),
    )?;
    std::fs::write(dir.path().join("root.pem"), root_pem)?;
    let mut cmd = Command::new("openssl");
    // An address is checked against the IP SANs, a name against the DNS ones.
    let check = if domain.parse::<std::net::IpAddr>().is_ok() {
        "-verify_ip"
    } else {
        "-verify_hostname"
    };
    cmd.current_dir(dir.path())
        .args(["verify", "-CAfile", "root.pem", check, domain]);
    if certs.len() > 1 {
        cmd.args(["-untrusted", "rest.pem"]);
    }
    let out = cmd.arg("leaf.pem").output()?;
    if !out.status.success() {
        bail!(
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
