//! A real authoritative DNS server for dns-01 tests: Debian's BIND 9 (`named
//! -g`, a child process) on port 53 of its own loopback address (added to
//! `lo`: BIND listens only on interface addresses), with zones
//! that take TSIG-signed updates of TXT records, a local root zone so that
//! nothing it resolves leaves 127.0.0.0/8, and recursion for loopback clients
//! (Pebble follows `_acme-challenge` CNAMEs through it). Killed on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// One zone named serves: its apex and extra records (zone-file lines,
/// relative to the apex).
pub struct Zone<'a> {
    pub apex: &'a str,
    pub records: &'a [&'a str],
}

pub struct Named {
    pub dir: tempfile::TempDir,
    /// Where named listens: `<ip>:53`.
    pub addr: SocketAddr,
    /// The TSIG key updates are signed with: name, base64 secret, and a
    /// `tsig-keygen` key file holding it.
    pub key_name: String,
    pub key_secret: String,
    pub key_file: PathBuf,
    zones: Vec<String>,
    child: Option<Child>,
}

/// A base64 secret for a throwaway key (tsig-keygen's output, parsed).
fn keygen(name: &str) -> Result<String> {
    let out = Command::new("tsig-keygen")
        .args(["-a", "hmac-sha256", name])
        .output()
        .context("running tsig-keygen (scripts/setup.sh installs Debian's bind9)")?;
    if !out.status.success() {
        bail!("tsig-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Adds `ip` to the loopback interface unless it is there (BIND listens only
/// on interface addresses; 127.0.0.0/8 is routed to `lo` anyway).
fn on_loopback(ip: Ipv4Addr) -> Result<()> {
    let shown = Command::new("ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .output()
        .context("running ip (iproute2)")?;
    if String::from_utf8_lossy(&shown.stdout).contains(&format!("inet {ip}/")) {
        return Ok(());
    }
    let out = Command::new("ip")
        .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .output()?;
    // Another test process may have added it meanwhile.
    if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("exists") {
        bail!(
            "ip addr add {ip}/32 dev lo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Named {
    /// Starts named on `<ip>:53` (an address of 127.0.0.0/8 no other test
    /// uses) serving `zones`; each zone's `ns1.<first zone>` points at `ip`.
    pub fn start(ip: Ipv4Addr, zones: &[Zone<'_>]) -> Result<Self> {
        on_loopback(ip)?;
        let dir = tempfile::tempdir()?;
        let key_name = "acme-agent-test".to_owned();
        let key_clause = keygen(&key_name)?;
        let key_secret = key_clause
            .split('"')
            .nth(3)
            .context("no secret in tsig-keygen's output")?
            .to_owned();
        let key_file = dir.path().join("tsig.key");
        std::fs::write(&key_file, &key_clause)?;
        // The agent refuses a secret file others can read.
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let first = zones.first().context("no zone")?.apex;
        let mut conf = format!(
            r#"options {{
  directory "{dir}";
  pid-file "{dir}/named.pid";
  listen-on port 53 {{ {ip}; }};
  listen-on-v6 {{ none; }};
  recursion yes;
  allow-recursion {{ 127.0.0.0/8; }};
  allow-query {{ 127.0.0.0/8; }};
  allow-transfer {{ 127.0.0.0/8; }};
  dnssec-validation no;
  notify no;
}};
controls {{ }};
{key_clause}
zone "." {{ type primary; file "root.db"; }};
"#,
            dir = dir.path().display()
        );
        std::fs::write(
            dir.path().join("root.db"),
            format!(
                "$TTL 60\n@ IN SOA ns1.{first}. hostmaster.{first}. 1 60 60 600 60\n@ IN NS ns1.{first}.\nns1.{first}. IN A {ip}\n"
            ),
        )?;
        for zone in zones {
            let apex = zone.apex;
            let mut text = format!(
                "$TTL 60\n$ORIGIN {apex}.\n@ IN SOA ns1.{first}. hostmaster.{first}. 1 60 60 600 60\n@ IN NS ns1.{first}.\n"
            );
            if apex == first {
                text.push_str(&format!("ns1 IN A {ip}\n"));
            }
            for record in zone.records {
                text.push_str(record);
                text.push('\n');
            }
            std::fs::write(dir.path().join(format!("{apex}.db")), text)?;
            conf.push_str(&format!(
                "zone \"{apex}\" {{ type primary; file \"{apex}.db\"; update-policy {{ grant {key_name} zonesub TXT; }}; }};\n"
            ));
        }
        std::fs::write(dir.path().join("named.conf"), conf)?;
        let mut named = Self {
            addr: SocketAddr::new(ip.into(), 53),
            key_name,
            key_secret,
            key_file,
            zones: zones.iter().map(|z| z.apex.to_owned()).collect(),
            child: None,
            dir,
        };
        named.start_process()?;
        Ok(named)
    }

    fn start_process(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("named.log"))?;
        let child = Command::new("named")
            .args(["-g", "-u", "root", "-c"])
            .arg(self.dir.path().join("named.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting named (scripts/setup.sh installs Debian's bind9)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        let first = self.zones[0].clone();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("named exited ({status}):\n{}", self.log());
            }
            if self
                .dig(&[&first, "SOA", "+short"])
                .is_ok_and(|o| !o.is_empty())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("named did not answer within 15 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills named (the zones' journals stay: a restart keeps updates).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_process()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
    }

    /// `dig @named -p 53 <args>`'s output.
    pub fn dig(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("dig")
            .arg(format!("@{}", self.addr.ip()))
            .args(["-p", "53", "+time=2", "+tries=1"])
            .args(args)
            .output()
            .context("running dig (scripts/setup.sh installs bind9-dnsutils)")?;
        if !out.status.success() {
            bail!("dig {args:?}: {}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Every TXT record of every zone, by zone transfer: `(owner, value)`.
    pub fn txt_records(&self) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        for zone in &self.zones {
            let axfr = self.dig(&[zone, "AXFR", "+nocmd", "+nostats", "+nocomments"])?;
            if axfr.contains("Transfer failed") {
                bail!("AXFR of {zone} failed: {axfr}");
            }
            for line in axfr.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() >= 5 && fields[3] == "TXT" {
                    found.push((fields[0].to_owned(), fields[4..].join(" ")));
                }
            }
        }
        Ok(found)
    }

    /// The `_acme-challenge` TXT records left in the zones.
    pub fn challenge_records(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .txt_records()?
            .into_iter()
            .filter(|(owner, _)| owner.starts_with("_acme-challenge") || owner.contains("acme"))
            .collect())
    }

    /// A `[dns.<name>]` section for the agent: this server, `zone`, the key.
    pub fn solver_toml(&self, name: &str, zone: &str) -> String {
        format!(
            "\n[dns.{name}]\nserver = \"{addr}\"\nzone = \"{zone}\"\ntsig_key = \"{key}\"\ntsig_secret_file = {file:?}\nresolver = \"{addr}\"\npropagation_timeout_seconds = 10\n",
            addr = self.addr,
            key = self.key_name,
            file = self.key_file.display().to_string(),
        )
    }

    /// A `[dns.<name>]` section whose `[exec]` commands are a shell script
    /// running Debian's `nsupdate` with this server's key (a provider the
    /// agent knows nothing of); every call is logged to `exec.log` here.
    /// No `server`: the zone's nameservers come from the resolver.
    pub fn exec_solver_toml(&self, name: &str, zone: &str) -> Result<String> {
        use std::os::unix::fs::PermissionsExt;
        let hook = self.dir.path().join("dns-hook.sh");
        let script = format!(
            "#!/bin/sh\nset -e\necho \"$1 $ACME_DNS_NAME $ACME_DNS_VALUE\" >> {log}\ncase \"$1\" in present) op=add;; clean-up) op=delete;; *) exit 2;; esac\nprintf 'server {ip} {port}\\nzone %s\\nupdate %s %s %s TXT \"%s\"\\nsend\\n' \"$ACME_DNS_ZONE\" \"$op\" \"$ACME_DNS_NAME\" \"$ACME_DNS_TTL\" \"$ACME_DNS_VALUE\" | nsupdate -k {key}\n",
            log = self.dir.path().join("exec.log").display(),
            ip = self.addr.ip(),
            port = self.addr.port(),
            key = self.key_file.display(),
        );
        std::fs::write(&hook, script)?;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;
        Ok(format!(
            "\n[dns.{name}]\nzone = \"{zone}\"\nresolver = \"{addr}\"\npropagation_timeout_seconds = 10\n[dns.{name}.exec]\npresent = [{hook:?}, \"present\"]\nclean_up = [{hook:?}, \"clean-up\"]\ntimeout_seconds = 10\n",
            addr = self.addr,
            hook = hook.display().to_string(),
        ))
    }

    /// What the exec hook was called with, one line per call.
    pub fn exec_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("exec.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        self.stop();
    }
}
