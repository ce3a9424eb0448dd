//! A hundred Envoys on one real agent (issue 21): 100 Envoy processes (2
//! workers each, the filter loaded with the agent's token) long-poll the
//! release agent's challenge API; the agent publishes HTTP-01 tokens through
//! its real path, an order on Pebble. Measured: the time from a publish until
//! each Envoy's filter answers the token on its HTTP listener, whether every
//! probe connection was answered, how many connections each process holds to
//! the agent, and each Envoy's RSS and PSS.
//!
//! The token stays published long enough to measure because the agent's
//! `[self_check] target` is a closed port: the agent publishes, self-checks
//! for its 10 s deadline, fails the order without telling the CA and
//! withdraws the token. Pebble never validates, so nothing here depends on
//! Pebble's lock bug or its validation timing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use acme_tests::agent::{Agent, Cert, Settings, TEST_TOKEN, write_token_file};
use acme_tests::envoy::{Envoy, free_addr};
use acme_tests::http::Connection;
use acme_tests::pebble::Pebble;
use acme_tests::world::signed_get;
use anyhow::{Context as _, Result, bail};

use super::{Row, direct_envoy, percentile, proxy_envoy, spread};

/// Every Envoy's filter: the agent's cluster and the token it proves.
fn filter_yaml() -> Result<String> {
    Ok(acme_tests::envoy::wasm_filter_yaml(
        &acme_tests::filter_wasm()?,
        &format!(r#"{{"agent_cluster":"acme_agent","agent_token":"{TEST_TOKEN}"}}"#),
    ))
}

/// The agent's config: the token, order_concurrency 1 (one publish at a
/// time), the self-check at a closed port, no retry within the run.
/// `listeners` are the API, the health listener and the closed port the
/// self-check is pointed at.
fn agent_config(
    pebble: &Pebble,
    work: &Path,
    listeners: [SocketAddr; 3],
    certificates: &[Cert<'_>],
) -> Result<String> {
    let [api, health, closed] = listeners;
    let token_file = write_token_file(work)?;
    let settings = Settings {
        directory_url: &pebble.directory_url,
        ca_root: &pebble.tls_root,
        state_dir: &work.join("state"),
        sds_dir: &work.join("sds"),
        kubernetes: None,
        api,
        health,
        token_file: Some(&token_file),
        self_check: Some(closed),
        retry: (3600, 3600),
        certificates,
    };
    Ok(format!("order_concurrency = 1\n{}", settings.toml()))
}

/// The agent's snapshot: its version and tokens (with their identifiers).
fn snapshot(api: SocketAddr, version: u64) -> Result<(u64, HashMap<String, String>)> {
    let answer = signed_get(
        api,
        &format!("/v1/challenges?version={version}&wait=25"),
        TEST_TOKEN,
    )?;
    if answer.status == 304 {
        return Ok((version, HashMap::new()));
    }
    let body: serde_json::Value = serde_json::from_slice(&answer.body)?;
    let tokens = body["challenges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c["token"].as_str()?.to_owned(),
                c["identifier"].as_str()?.to_owned(),
            ))
        })
        .collect();
    Ok((body["version"].as_u64().context("no version")?, tokens))
}

/// What one publish measured: ms until each Envoy answered, how many
/// answered their first probe, and connections that failed.
struct Round {
    answered_ms: Vec<f64>,
    first_try: usize,
    failed: usize,
}

/// Sweeps `connections` with GETs for `token` (Host `identifier`) until each
/// has answered 200, at most 10 s after `since`.
fn probe(
    connections: &mut [Connection],
    listens: &[SocketAddr],
    token: &str,
    identifier: &str,
    since: Instant,
) -> Result<Round> {
    let path = format!("/.well-known/acme-challenge/{token}");
    let mut answered = vec![None; connections.len()];
    let (mut first_try, mut failed, mut sweep) = (0, 0, 0);
    while answered.iter().any(Option::is_none) {
        if since.elapsed() > Duration::from_secs(10) {
            bail!("not every Envoy answered {token} within 10 s");
        }
        for (i, connection) in connections.iter_mut().enumerate() {
            if answered[i].is_some() {
                continue;
            }
            match connection.send("GET", &path, identifier, false) {
                Ok(r) if r.status == 200 => {
                    answered[i] = Some(since.elapsed().as_secs_f64() * 1000.0);
                    first_try += usize::from(sweep == 0);
                }
                Ok(_) => {}
                Err(_) => {
                    failed += 1;
                    *connection = Connection::open(listens[i])?;
                }
            }
        }
        sweep += 1;
    }
    Ok(Round {
        answered_ms: answered.into_iter().flatten().collect(),
        first_try,
        failed,
    })
}

/// Connections each of `pids` holds to the agent's `api` port (`ss -tnp`).
fn connections_to(api: SocketAddr, pids: &[u32]) -> Result<Vec<usize>> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .arg(format!("( dport = :{} )", api.port()))
        .output()
        .context("running ss")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(pids
        .iter()
        .map(|pid| {
            text.lines()
                .filter(|l| l.contains(&format!("pid={pid},")))
                .count()
        })
        .collect())
}

/// `Rss` and `Pss` of `pid` in kB (`/proc/<pid>/smaps_rollup`).
fn rss_pss_kb(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in smaps_rollup of {pid}"))
    };
    Ok((field("Rss:")?, field("Pss:")?))
}

/// The 100 Envoys (each `--concurrency 2`) in front of `app`, their agent at
/// `api`, every one synced once.
fn envoys(count: usize, app: SocketAddr, api: SocketAddr) -> Result<Vec<(Envoy, SocketAddr)>> {
    let filter = filter_yaml()?;
    let mut envoys = Vec::with_capacity(count);
    for i in 0..count {
        if i % 10 == 0 {
            eprintln!("[bench] hundred-envoys: starting Envoy {i}");
        }
        envoys.push(proxy_envoy(&filter, app, api, 2)?);
    }
    for (envoy, _) in &envoys {
        envoy.wait_stat_at_least(
            "wasmcustom.acme_filter.sync_success",
            1,
            Duration::from_secs(30),
        )?;
    }
    Ok(envoys)
}

/// Every token published after `version`, measured across all Envoys, for
/// `rounds` publishes.
fn measure(
    api: SocketAddr,
    mut version: u64,
    envoys: &[(Envoy, SocketAddr)],
    rounds: usize,
) -> Result<Vec<Round>> {
    let listens: Vec<SocketAddr> = envoys.iter().map(|(_, l)| *l).collect();
    let mut connections = listens
        .iter()
        .map(|l| Connection::open(*l))
        .collect::<Result<Vec<_>>>()?;
    let mut seen = HashSet::new();
    let mut measured = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60 + 15 * rounds as u64);
    while measured.len() < rounds {
        if Instant::now() > deadline {
            bail!("{} of {rounds} publishes seen", measured.len());
        }
        let (now, tokens) = snapshot(api, version)?;
        let since = Instant::now();
        version = now;
        let new: Vec<(String, String)> = tokens
            .into_iter()
            .filter(|(t, _)| !seen.contains(t))
            .collect();
        for (token, identifier) in new {
            seen.insert(token.clone());
            measured.push(probe(
                &mut connections,
                &listens,
                &token,
                &identifier,
                since,
            )?);
        }
    }
    Ok(measured)
}

pub fn run(rows: &mut Vec<Row>, agent_bin: &Path, count: usize, rounds: usize) -> Result<()> {
    let pebble = super::fresh_pebble()?;
    let work = tempfile::tempdir()?;
    let listeners = [free_addr()?, free_addr()?, free_addr()?];
    let api = listeners[0];
    let config_path = work.path().join("agent.toml");
    std::fs::write(
        &config_path,
        agent_config(&pebble, work.path(), listeners, &[])?,
    )?;
    let agent =
        Agent::start_with_binary(agent_bin, &config_path, api, &work.path().join("agent.log"))?;
    let (_app, app) = direct_envoy("app")?;
    let envoys = envoys(count, app, api)?;
    let pids: Vec<u32> = envoys
        .iter()
        .map(|(e, _)| super::pid(e))
        .collect::<Result<_>>()?;
    // Settled: every filter holds its long-poll.
    std::thread::sleep(Duration::from_secs(2));
    let held = connections_to(api, &pids)?;
    let polls = polls_held(&agent)?;
    let (version, _) = snapshot(api, 0)?;

    let names: Vec<(String, String)> = (0..rounds)
        .map(|i| (format!("h{i}"), format!("h{i}.hundred.example")))
        .collect();
    let domains: Vec<[&str; 1]> = names.iter().map(|(_, d)| [d.as_str()]).collect();
    let certs: Vec<Cert<'_>> = names
        .iter()
        .zip(&domains)
        .map(|((n, _), d)| Cert {
            name: n,
            domains: d,
            extra: "",
        })
        .collect();
    std::fs::write(
        &config_path,
        agent_config(&pebble, work.path(), listeners, &certs)?,
    )?;
    agent.signal("HUP")?;
    let measured = measure(api, version, &envoys, rounds)
        .with_context(|| format!("agent log:\n{}", agent.log()))?;
    let held_after = connections_to(api, &pids)?;
    let polls_after = polls_held(&agent)?;
    let memory = pids
        .iter()
        .map(|p| rss_pss_kb(*p))
        .collect::<Result<Vec<_>>>()?;
    let polls = [polls, polls_after];
    rows.extend(report(
        count,
        &measured,
        &polls,
        [&held, &held_after],
        &memory,
    ));
    Ok(())
}

/// The long-polls the agent holds (its `challenge_polls_held` gauge), the
/// least and the most of 20 looks over 2 s: a poller between two polls is
/// missing for a moment.
fn polls_held(agent: &Agent) -> Result<(u64, u64)> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(agent.metric("acme_agent_challenge_polls_held", &[])? as u64);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((
        seen.iter().copied().min().unwrap_or(0),
        seen.iter().copied().max().unwrap_or(0),
    ))
}

fn report(
    count: usize,
    measured: &[Round],
    polls: &[(u64, u64); 2],
    [held, held_after]: [&[usize]; 2],
    memory: &[(u64, u64)],
) -> Vec<Row> {
    let mut all: Vec<f64> = measured
        .iter()
        .flat_map(|r| r.answered_ms.clone())
        .collect();
    let (lo, hi) = spread(&all);
    let first_try: usize = measured.iter().map(|r| r.first_try).sum();
    let failed: usize = measured.iter().map(|r| r.failed).sum();
    let exactly_one = |h: &[usize]| h.iter().filter(|&&n| n == 1).count();
    let mb = |kb: u64| kb as f64 / 1024.0;
    let mut rss: Vec<f64> = memory.iter().map(|m| mb(m.0)).collect();
    let mut pss: Vec<f64> = memory.iter().map(|m| mb(m.1)).collect();
    let (rss_lo, rss_hi) = spread(&rss);
    let (pss_lo, pss_hi) = spread(&pss);
    vec![
        Row {
            what: format!(
                "{count} Envoys (2 workers each) on the real agent: publish -> each Envoy's filter answers ({} publishes)",
                measured.len()
            ),
            result: format!(
                "p50 **{:.1} ms**, p99 **{:.1} ms**",
                percentile(&mut all, 0.5),
                percentile(&mut all, 0.99)
            ),
            note: format!(
                "min {lo:.1}, max {hi:.1} ms over {} answers; from our own long-poll's answer (one more held poll) to the first 200 on a keep-alive probe connection per Envoy, swept in turn (so an upper bound); {first_try} of {} answered their first probe; {failed} probe connections failed; tokens from HTTP-01 orders on Pebble, held by a self-check at a closed port",
                all.len(),
                all.len()
            ),
        },
        Row {
            what: format!("{count} Envoys: long-polls the agent holds"),
            result: format!(
                "**{}-{}** before the publishes, {}-{} after",
                polls[0].0, polls[0].1, polls[1].0, polls[1].1
            ),
            note: format!(
                "the agent's `acme_agent_challenge_polls_held`, least-most of 20 looks over 2 s (a poller between two polls is missing for a moment); TCP connections per process (`ss -tnp` by pid): {} of {count} hold exactly one before, {} after (max {} / {}, total {} / {}): Envoy keeps a connection pool per worker thread, and one a poll has finished with stays open in its pool",
                exactly_one(held),
                exactly_one(held_after),
                held.iter().max().unwrap_or(&0),
                held_after.iter().max().unwrap_or(&0),
                held.iter().sum::<usize>(),
                held_after.iter().sum::<usize>()
            ),
        },
        Row {
            what: format!("{count} Envoys: memory per Envoy (RSS / PSS)"),
            result: format!(
                "{:.1} MB / **{:.1} MB**",
                super::median(&mut rss),
                super::median(&mut pss)
            ),
            note: format!(
                "medians; RSS {rss_lo:.1}-{rss_hi:.1}, PSS {pss_lo:.1}-{pss_hi:.1} MB (`/proc/<pid>/smaps_rollup`; PSS shares the binary's pages among the {count}); sum of PSS {:.0} MB",
                pss.iter().sum::<f64>()
            ),
        },
    ]
}
