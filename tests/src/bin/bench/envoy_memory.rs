//! Envoy's memory with on-demand TLS (issue 21): `count` on-demand
//! certificates from a local CA (rcgen; no ACME CA involved) written to a
//! state directory as earlier runs would have left them, the release agent
//! over it and an on-demand Envoy fed by its SDS server. Measured: Envoy's
//! RSS (and what its allocator says is in use) at start, after one handshake
//! for each name, and after `on_demand.max_served` is lowered to `keep` and
//! the agent withdrew the rest; then the handshake time of a name Envoy
//! still holds against one it fetches again from the agent (withdrawn).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use acme_agent::disk::store::FileStore;
use acme_agent::domain::names::name_for;
use acme_agent::domain::spec::KeyType;
use acme_agent::ports::store::{StateStore, Status, StoredCertificate};
use acme_tests::agent::Agent;
use acme_tests::envoy::{Envoy, free_addr, on_demand_bootstrap};
use acme_tests::tls_probe::handshake;
use anyhow::{Context as _, Result, bail};

use super::{Row, percentile, rss_kb};

fn domain_of(i: usize) -> String {
    format!("n{i}.od.example")
}

/// (chain PEM, key PEM) makers for 90-day P-256 leaves, like an ACME CA's.
struct LocalCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl LocalCa {
    fn new() -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        })
    }

    fn leaf(&self, domain: &str) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()])?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(89);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((format!("{}{}", cert.pem(), self.pem), key.serialize_pem()))
    }
}

/// `count` on-demand certificates and their status records (asked for
/// just now), as the agent restores them at start.
async fn generate(state: &Path, count: usize) -> Result<()> {
    let ca = LocalCa::new()?;
    let store = FileStore::open(state)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    for i in 0..count {
        let domain = domain_of(i);
        let name = name_for(&domain);
        let (chain_pem, key_pem) = ca.leaf(&domain)?;
        let certificate = StoredCertificate {
            domains: vec![domain.clone()],
            key_type: KeyType::EcdsaP256,
            chain_pem,
            key_pem: key_pem.into(),
        };
        store.save_certificate(&name, &certificate).await?;
        let status = Status {
            name: name.clone(),
            domains: vec![domain],
            last_requested: Some(now),
            updated: now,
            ..Status::default()
        };
        store.save_status(&status).await?;
    }
    Ok(())
}

fn write_config(work: &Path, api: std::net::SocketAddr, max_served: usize) -> Result<()> {
    let text = format!(
        "state_dir = {:?}\n\n[acme]\ndirectory = \"https://127.0.0.1:9/dir\"\n\n[sds]\nlisten = \"unix:{}\"\n\n[challenge_api]\nlisten = \"{api}\"\n\n[health]\nlisten = \"{}\"\n\n[on_demand]\nallow = [\"*.od.example\"]\nmax_certificates = 10000\nmax_served = {max_served}\n",
        work.join("state").display().to_string(),
        work.join("run/sds.sock").display(),
        free_addr()?,
    );
    // Written whole then renamed: the agent's watcher never reads half a file.
    let temp = work.join("agent.toml.new");
    std::fs::write(&temp, text)?;
    std::fs::rename(temp, work.join("agent.toml"))?;
    Ok(())
}

/// What Envoy holds and what that costs it.
struct Memory {
    rss_kb: u64,
    allocated_mb: f64,
    held: i64,
}

fn memory(envoy: &Envoy) -> Result<Memory> {
    let pid = envoy.pid().context("Envoy's pid")?;
    let json: serde_json::Value = serde_json::from_str(&envoy.admin_text("/memory")?)?;
    let allocated = json["allocated"]
        .as_str()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    Ok(Memory {
        rss_kb: rss_kb(pid, "VmRSS:").unwrap_or(0),
        allocated_mb: allocated / 1e6,
        held: held(envoy)?,
    })
}

/// The on-demand selector's `cert_active` stat: names Envoy holds.
fn held(envoy: &Envoy) -> Result<i64> {
    Ok(envoy
        .admin_text("/stats?filter=on_demand_secret")?
        .lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| name.ends_with("on_demand_secret.cert_active"))
        .filter_map(|(_, value)| value.trim().parse::<i64>().ok())
        .sum())
}

/// Polls `done` every 100 ms until it holds; the time it took.
fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let started = Instant::now();
    while !done()? {
        if started.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(started.elapsed())
}

/// One handshake per name in `names`, each timed (ms); fails on a handshake
/// without a certificate.
fn handshakes(
    https: std::net::SocketAddr,
    names: impl Iterator<Item = String>,
) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    for name in names {
        let t = Instant::now();
        if handshake(https, &name, Duration::from_secs(20))?.is_none() {
            bail!("no certificate for {name}");
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn p50_p99(times: &mut [f64]) -> String {
    format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        percentile(times, 0.5),
        percentile(times, 0.99)
    )
}

/// Runs only on request: `--only envoy-memory [COUNT,KEEP]` (default
/// 10000,1000), with the release agent `agent` builds.
pub fn if_asked(
    rows: &mut Vec<Row>,
    only: Option<&str>,
    args: &[String],
    agent: impl FnOnce() -> Result<std::path::PathBuf>,
) -> Result<()> {
    if only != Some("envoy-memory") {
        return Ok(());
    }
    let (count, keep) = args
        .iter()
        .position(|a| a == "envoy-memory")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.split_once(','))
        .map_or(Ok((10_000, 1_000)), |(c, k)| {
            Ok::<_, std::num::ParseIntError>((c.parse()?, k.parse()?))
        })?;
    if keep == 0 || keep >= count {
        bail!("envoy-memory COUNT,KEEP: KEEP must be between 1 and COUNT - 1");
    }
    run(rows, &agent()?, count, keep)
}

/// The rows for `count` names asked once, then `max_served` lowered to `keep`.
fn run(rows: &mut Vec<Row>, agent_bin: &Path, count: usize, keep: usize) -> Result<()> {
    let temp = tempfile::tempdir()?;
    let work = temp.path();
    eprintln!("[bench] envoy-memory: generating {count} on-demand certificates");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(generate(&work.join("state"), count))?;
    let api = free_addr()?;
    write_config(work, api, count)?;
    let log = work.join("agent.log");
    let agent = Agent::start_with_binary(agent_bin, &work.join("agent.toml"), api, &log)?;
    let restored = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.matches("serving the stored certificate").count() >= count)
    };
    wait(
        "every certificate restored",
        Duration::from_secs(300),
        restored,
    )?;
    let (https, admin) = (free_addr()?, free_addr()?);
    let sds = work.join("run/sds.sock");
    let envoy = Envoy::start(&on_demand_bootstrap(https, admin, &sds), admin, 2)?;
    let at_start = memory(&envoy)?;
    eprintln!("[bench] envoy-memory: one handshake for each of {count} names");
    let mut first = handshakes(https, (0..count).map(domain_of))?;
    let all = memory(&envoy)?;
    write_config(work, api, keep)?;
    let pid = agent.pid().context("the agent's pid")?;
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    let withdrawn_in = wait(
        "withdrawn down to max_served",
        Duration::from_secs(300),
        || Ok(held(&envoy)? <= keep as i64),
    )?;
    // Let Envoy's allocator settle what it frees, and look again later:
    // the main thread frees what the workers released only as they get to it.
    std::thread::sleep(Duration::from_secs(2));
    let after = memory(&envoy)?;
    std::thread::sleep(Duration::from_secs(28));
    let later = memory(&envoy)?;
    let samples = keep.min(1000);
    // The most recently asked for are the ones kept.
    let mut cached = handshakes(https, (count - samples..count).map(domain_of))?;
    let mut refetched = handshakes(https, (0..samples).map(domain_of))?;
    let held_at_end = held(&envoy)?;
    let per_name = (all.rss_kb.saturating_sub(at_start.rss_kb)) as f64 / count as f64;
    let line = |m: &Memory| {
        format!(
            "{:.0} MB RSS ({:.0} MB allocated), {} names held",
            mb(m.rss_kb),
            m.allocated_mb,
            m.held
        )
    };
    rows.push(Row {
        what: format!("Envoy memory, on-demand: at start / {count} names asked once / after withdrawal to max_served = {keep}"),
        result: format!(
            "{} / {} / {}",
            line(&at_start),
            line(&all),
            line(&after)
        ),
        note: format!(
            "{per_name:.1} KB of RSS per name held; withdrawn (delta SDS removals) in {:.1} s after the reload, measured 2 s after that (30 s after: {}); RSS is what the allocator keeps from the OS, allocated what Envoy uses (`/memory`); local CA (rcgen), P-256, Envoy 2 workers",
            withdrawn_in.as_secs_f64(),
            line(&later)
        ),
    });
    rows.push(Row {
        what: "On-demand handshake: first fetch / held by Envoy / fetched again after a withdrawal".into(),
        result: format!(
            "{} / {} / {}",
            p50_p99(&mut first),
            p50_p99(&mut cached),
            p50_p99(&mut refetched)
        ),
        note: format!(
            "new TCP connection + TLS 1.3 each, sequential; first fetch: {count} names served from the agent's memory; again after a withdrawal: {samples} names, each read from the store again (no order), each withdrawing the least recent; Envoy held {held_at_end} names at the end"
        ),
    });
    drop(envoy);
    drop(agent);
    Ok(())
}
