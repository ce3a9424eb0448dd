//! Running the real `acme-agent` binary: built once per test process with
//! `scripts/build-agent.sh`, started with a generated config, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::http;
use crate::workspace_root;

/// The agent binary, built (or found up to date) the first time it is asked for.
pub fn agent_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let output = Command::new(workspace_root().join("scripts/build-agent.sh"))
                .stderr(Stdio::inherit())
                .output()
                .map_err(|e| format!("running scripts/build-agent.sh: {e}"))?;
            if !output.status.success() {
                return Err(format!("building the agent failed ({})", output.status));
            }
            let path = workspace_root().join(String::from_utf8_lossy(&output.stdout).trim());
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!("{} was not produced", path.display()))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// One `[[certificate]]` of a generated config.
pub struct Cert<'a> {
    pub name: &'a str,
    pub domains: &'a [&'a str],
    /// More keys of its table (`dns = "main"`), TOML lines.
    pub extra: &'a str,
}

/// The pieces of an agent config the tests vary.
#[derive(Clone, Copy)]
pub struct Settings<'a> {
    pub directory_url: &'a str,
    pub ca_root: &'a Path,
    pub state_dir: &'a Path,
    pub sds_dir: &'a Path,
    /// Kubernetes mode in this namespace (state_dir and sds_dir not written).
    pub kubernetes: Option<&'a str>,
    pub api: SocketAddr,
    /// The probes and metrics listener (`[health] listen`).
    pub health: SocketAddr,
    /// `challenge_api.token_file`: the filters and `renew` prove its token.
    pub token_file: Option<&'a Path>,
    pub self_check: Option<SocketAddr>,
    /// (initial, max) seconds between failed attempts.
    pub retry: (u64, u64),
    pub certificates: &'a [Cert<'a>],
}

impl Settings<'_> {
    pub fn toml(&self) -> String {
        let storage = match self.kubernetes {
            Some(ns) => format!("[kubernetes]\nnamespace = {ns:?}\n\n"),
            None => format!(
                "state_dir = {:?}\nsds_dir = {:?}\n\n",
                self.state_dir.display().to_string(),
                self.sds_dir.display().to_string()
            ),
        };
        let token = self
            .token_file
            .map(|f| format!("token_file = {:?}\n", f.display().to_string()))
            .unwrap_or_default();
        let mut out = format!(
            "[acme]\ndirectory = {dir:?}\nemail = \"ops@example.com\"\nca_root = {root:?}\n\n[challenge_api]\nlisten = \"{api}\"\n{token}\n[health]\nlisten = \"{health}\"\n\n[retry]\ninitial_seconds = {ri}\nmax_seconds = {rm}\n",
            dir = self.directory_url,
            root = self.ca_root.display().to_string(),
            api = self.api,
            health = self.health,
            ri = self.retry.0,
            rm = self.retry.1,
        );
        // Top-level keys first: TOML puts everything after a [table] into it.
        out = format!("{storage}{out}");
        if let Some(target) = self.self_check {
            out.push_str(&format!("\n[self_check]\ntarget = \"{target}\"\n"));
        }
        for cert in self.certificates {
            out.push_str(&format!(
                "\n[[certificate]]\nname = {:?}\ndomains = {:?}\n{}\n",
                cert.name, cert.domains, cert.extra
            ));
        }
        out
    }
}

/// Writes `<dir>/agent.toml` for an agent with no certificate (it serves its
/// API and orders nothing; the CA address is never contacted) and returns its
/// path.
pub fn write_idle_config(dir: &Path, api: SocketAddr) -> Result<PathBuf> {
    let settings = Settings {
        directory_url: "https://127.0.0.1:9/dir",
        ca_root: Path::new("/dev/null"),
        state_dir: &dir.join("state"),
        sds_dir: &dir.join("sds"),
        kubernetes: None,
        api,
        health: crate::envoy::free_addr()?,
        token_file: None,
        self_check: None,
        retry: (3600, 3600),
        certificates: &[],
    };
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        settings.toml().replace("ca_root = \"/dev/null\"\n", ""),
    )?;
    Ok(path)
}

/// The token the tests' agents and filters share (`token_file`).
pub const TEST_TOKEN: &str = "acme-test-token-0123456789abcdef";

/// Writes [`TEST_TOKEN`] to `<dir>/api.token`, mode 0600 (the agent refuses
/// a token file others can read), and returns its path.
pub fn write_token_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("api.token");
    std::fs::write(&path, format!("{TEST_TOKEN}\n"))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(path)
}

/// `[health] listen` of the config at `path` (the agent's default when unset).
pub fn health_of(path: &Path) -> Result<SocketAddr> {
    let text = std::fs::read_to_string(path)?;
    let table: toml::Table = text.parse().context("parsing the agent config")?;
    let listen = table
        .get("health")
        .and_then(|h| h.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or("127.0.0.1:9182");
    listen.parse().context("health.listen")
}

/// A running agent; SIGKILLed when dropped.
pub struct Agent {
    child: Option<Child>,
    pub api: SocketAddr,
    /// Its probes and metrics listener.
    pub health: SocketAddr,
    pub config: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts `acme-agent run` with the config at `config`, appending its log
    /// to `log`, and waits for `/healthz` at `api`.
    pub fn start(config: &Path, api: SocketAddr, log: &Path) -> Result<Self> {
        Self::start_with_env(config, api, log, &[])
    }

    /// [`Agent::start`] with extra environment variables (e.g. KUBECONFIG).
    pub fn start_with_env(
        config: &Path,
        api: SocketAddr,
        log: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        Self::spawn(&agent_binary()?, config, api, log, env)
    }

    /// Starts another build of the agent (the benchmarks run the release one).
    pub fn start_with_binary(
        binary: &Path,
        config: &Path,
        api: SocketAddr,
        log: &Path,
    ) -> Result<Self> {
        Self::spawn(binary, config, api, log, &[])
    }

    fn spawn(
        binary: &Path,
        config: &Path,
        api: SocketAddr,
        log: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        let health = health_of(config)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info,acme_agent=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting acme-agent")?;
        let mut agent = Self {
            child: Some(child),
            api,
            health,
            config: config.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = agent.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("acme-agent exited ({status}):\n{}", agent.log());
            }
            if http::get(health, "/healthz", "agent").is_ok_and(|r| r.status == 200) {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("acme-agent not healthy in 20 s:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The Prometheus exposition from `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        let r = http::get(self.health, "/metrics", "agent")?;
        if r.status != 200 {
            bail!("/metrics answered {}", r.status);
        }
        Ok(r.text())
    }

    /// Sum of every sample of `name` whose labels contain all of `labels`
    /// (`key="value"` strings). A series that is missing is an error, never
    /// a 0: a renamed metric or label fails the test that reads it.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let exposition = self.metrics()?;
        sum_samples(&exposition, name, labels).with_context(|| {
            format!(
                "no series {name}{labels:?} in /metrics:\n{}",
                family_lines(&exposition, name)
            )
        })
    }

    /// [`Agent::metric`] for a series that legitimately does not exist yet
    /// (a counter of an outcome that never happened): 0 then, but only when
    /// the agent declares the metric (`# TYPE`), so a renamed one still fails.
    pub fn metric_or_zero(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let exposition = self.metrics()?;
        if !declares(&exposition, name) {
            bail!("the agent declares no metric {name}");
        }
        Ok(sum_samples(&exposition, name, labels).unwrap_or(0.0))
    }

    /// Whether the agent declares the metric `name` but has no series of it
    /// with `labels` (a gauge removed with its certificate).
    pub fn series_absent(&self, name: &str, labels: &[&str]) -> Result<bool> {
        let exposition = self.metrics()?;
        if !declares(&exposition, name) {
            bail!("the agent declares no metric {name}");
        }
        Ok(sum_samples(&exposition, name, labels).is_none())
    }

    /// Sends `signal` (e.g. "TERM", "HUP", "KILL") to the agent.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("agent not running")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("agent not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("acme-agent still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sum of the samples of `name` in a Prometheus text exposition whose label
/// set contains every one of `labels`; `None` when there is no such sample
/// (a missing series is not a 0).
pub fn sum_samples(exposition: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name && labels.iter().all(|want| label_text.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The family a sample name belongs to: `x_total` of counter `x`, the
/// `_bucket`, `_sum` and `_count` of histogram `x`.
fn family(name: &str) -> &str {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// Whether the exposition declares the metric of `name` (`# TYPE`).
pub fn declares(exposition: &str, name: &str) -> bool {
    exposition.lines().any(|l| {
        l.strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|declared| declared == name || declared == family(name))
    })
}

/// The exposition's lines of the family of `name`, to show what is there.
fn family_lines(exposition: &str, name: &str) -> String {
    let family = family(name);
    let lines: Vec<&str> = exposition
        .lines()
        .filter(|l| l.contains(family))
        .take(40)
        .collect();
    if lines.is_empty() {
        format!("(nothing named like {family})")
    } else {
        lines.join("\n")
    }
}

/// Polls `check` every 50 ms until it returns `Some`, failing with `what` and
/// `context()` after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
