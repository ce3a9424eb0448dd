//! The agent as Envoy's SDS server, side by side with the file shape:
//! many certificates through one on-demand listener, handshake latency for
//! a cached and a first-seen name, and on-demand TLS from the first
//! handshake to a verified answer.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use acme_agent::disk::sink::FileSink;
use acme_agent::ports::sink::{CertificateSink, IssuedCertificate};
use acme_tests::agent::{Agent, wait_for};
use acme_tests::envoy::{
    Envoy, bootstrap_with_listeners, free_addr, https_listener, on_demand_bootstrap, served_chain,
};
use acme_tests::pebble::{self, Pebble};
use acme_tests::tls_probe::handshake;
use anyhow::{Result, bail};

use super::{Row, filter_yaml, median, ours, percentile, release_agent, rss_kb, spread};

const PROBE: Duration = Duration::from_secs(30);

/// The agent's config for these runs, by hand: `[sds]` and no `sds_dir`
/// (nothing written for Envoy), the filter's API, limits raised for a CA
/// that has none (Pebble: every name here is under example.com, 50 a week
/// by Let's Encrypt's default).
fn agent_config(
    work: &Path,
    pebble: &Pebble,
    api: SocketAddr,
    health: SocketAddr,
    extra: &str,
    certificates: &[String],
) -> String {
    let mut text = format!(
        "state_dir = {state:?}\norder_concurrency = 64\n\n[acme]\ndirectory = {dir:?}\nca_root = {root:?}\n\n[acme.limits]\norders_per_3_hours = 100000\ncertificates_per_registered_domain_per_week = 100000\n\n[challenge_api]\nlisten = \"{api}\"\n\n[health]\nlisten = \"{health}\"\n\n[sds]\nlisten = \"unix:{sds}\"\n\n[self_check]\ntarget = \"127.0.0.1:{http}\"\n\n[retry]\ninitial_seconds = 1\nmax_seconds = 4\n{extra}",
        state = work.join("state").display().to_string(),
        sds = sds_socket(work).display(),
        dir = pebble.directory_url,
        root = pebble.tls_root.display().to_string(),
        http = pebble.http_port,
    );
    for domain in certificates {
        text.push_str(&format!(
            "\n[[certificate]]\nname = {:?}\ndomains = [{domain:?}]\n",
            domain.replace('.', "-")
        ));
    }
    text
}

/// Where the agent of a run in `work` serves SDS.
fn sds_socket(work: &Path) -> std::path::PathBuf {
    work.join("run/sds.sock")
}

/// The agent (release), a plain-HTTP Envoy with the filter where Pebble
/// validates, and an on-demand Envoy on the agent's SDS.
struct OnDemandSetup {
    work: tempfile::TempDir,
    agent: Agent,
    _http: Envoy,
    https_envoy: Envoy,
    https: SocketAddr,
    api: SocketAddr,
    health: SocketAddr,
}

fn on_demand_setup(pebble: &Pebble, agent_bin: &Path, extra: &str) -> Result<OnDemandSetup> {
    let work = tempfile::tempdir()?;
    let (api, health) = (free_addr()?, free_addr()?);
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(work.path(), pebble, api, health, extra, &[]),
    )?;
    let agent = Agent::start_with_binary(agent_bin, &config, api, &work.path().join("agent.log"))?;
    let http: SocketAddr = format!("127.0.0.1:{}", pebble.http_port).parse()?;
    let (admin1, admin2, https) = (free_addr()?, free_addr()?, free_addr()?);
    let (_app, app) = super::direct_envoy("app")?;
    let plain = Envoy::start(
        &bootstrap_with_listeners(http, admin1, &filter_yaml()?, app, api, ""),
        admin1,
        1,
    )?;
    plain.wait_stat_at_least(
        "wasmcustom.acme_filter.sync_success",
        1,
        Duration::from_secs(10),
    )?;
    let https_envoy = Envoy::start(
        &on_demand_bootstrap(https, admin2, &sds_socket(work.path())),
        admin2,
        2,
    )?;
    Ok(OnDemandSetup {
        work,
        agent,
        _http: plain,
        https_envoy,
        https,
        api,
        health,
    })
}

/// `count` certificates added to a running agent's config until the one
/// on-demand listener serves each. Returns (seconds, agent peak RSS kB,
/// Envoy RSS kB).
fn many_on_demand(pebble: &Pebble, agent_bin: &Path, count: usize) -> Result<(f64, u64, u64)> {
    many_on_demand_at(pebble, agent_bin, count, 64)
}

/// [`many_on_demand`] with `concurrency` orders at once.
pub(super) fn many_on_demand_at(
    pebble: &Pebble,
    agent_bin: &Path,
    count: usize,
    concurrency: usize,
) -> Result<(f64, u64, u64)> {
    let setup = on_demand_setup(pebble, agent_bin, "")?;
    let domains: Vec<String> = (0..count)
        .map(|i| format!("c{i}.bulk.example.com"))
        .collect();
    let config = setup.work.path().join("agent.toml");
    let started = Instant::now();
    std::fs::write(
        &config,
        agent_config(
            setup.work.path(),
            pebble,
            setup.api,
            setup.health,
            "",
            &domains,
        )
        .replace(
            "order_concurrency = 64\n",
            &format!("order_concurrency = {concurrency}\n"),
        ),
    )?;
    setup.agent.signal("HUP")?;
    let mut waiting: Vec<&String> = domains.iter().collect();
    while !waiting.is_empty() {
        if started.elapsed() > Duration::from_secs(900) {
            bail!("{} of {count} not served after 900 s", waiting.len());
        }
        waiting.retain(|d| !matches!(handshake(setup.https, d, PROBE), Ok(Some(_))));
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let took = started.elapsed().as_secs_f64();
    let agent_peak = setup
        .agent
        .pid()
        .and_then(|p| rss_kb(p, "VmHWM:"))
        .unwrap_or(0);
    let envoy_rss = setup
        .https_envoy
        .pid()
        .and_then(|p| rss_kb(p, "VmRSS:"))
        .unwrap_or(0);
    Ok((took, agent_peak, envoy_rss))
}

/// Handshake latencies (ms) at `https` for `names`, one handshake each.
fn latencies(https: SocketAddr, names: &[String]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let started = Instant::now();
        if handshake(https, name, PROBE)?.is_none() {
            bail!("{name}: no certificate");
        }
        out.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Cached-name handshakes on the on-demand listener (fed by the release
/// agent's SDS server) vs the file shape (same certificate), interleaved;
/// then first handshakes for names Envoy has not fetched yet. The agent
/// starts over a state directory that already holds the certificates, so
/// nothing is ordered.
fn handshake_latency(
    rows: &mut Vec<Row>,
    agent_bin: &Path,
    rounds: usize,
    per_round: usize,
) -> Result<()> {
    use acme_agent::disk::store::FileStore;
    use acme_agent::ports::store::{StateStore, StoredCertificate};

    let work = tempfile::tempdir()?;
    let store = FileStore::open(work.path().join("state"))?;
    let sink = FileSink::new(work.path().join("sds"))?;
    let firsts: Vec<String> = (0..rounds * per_round)
        .map(|i| format!("f{i}.lat.example.com"))
        .collect();
    let mut config = format!(
        "state_dir = {:?}\n\n[acme]\ndirectory = \"https://127.0.0.1:9/dir\"\n\n[sds]\nlisten = \"unix:{{sds}}\"\n\n[challenge_api]\nlisten = \"{{api}}\"\n\n[health]\nlisten = \"{{health}}\"\n",
        work.path().join("state").display().to_string()
    );
    for domain in std::iter::once("lat.example.com".to_owned()).chain(firsts.iter().cloned()) {
        let names = vec![domain.clone()];
        let (chain_pem, key_pem) =
            acme_agent::certificate::placeholder(&names, Default::default())?;
        let name = domain.replace('.', "-");
        if domain == "lat.example.com" {
            acme_tests::block_on(sink.install(&IssuedCertificate {
                name: "lat".into(),
                chain_pem: chain_pem.clone(),
                key_pem: key_pem.clone().into(),
            }))?;
        }
        acme_tests::block_on(store.save_certificate(
            &name,
            &StoredCertificate {
                domains: names,
                key_type: Default::default(),
                chain_pem,
                key_pem: key_pem.into(),
            },
        ))?;
        config.push_str(&format!(
            "\n[[certificate]]\nname = {name:?}\ndomains = [{domain:?}]\n"
        ));
    }
    let (api, health) = (free_addr()?, free_addr()?);
    let sds_path = sds_socket(work.path());
    let config = config
        .replace("{sds}", &sds_path.display().to_string())
        .replace("{api}", &api.to_string())
        .replace("{health}", &health.to_string());
    let config_path = work.path().join("agent.toml");
    std::fs::write(&config_path, config)?;
    let _agent =
        Agent::start_with_binary(agent_bin, &config_path, api, &work.path().join("agent.log"))?;
    let (od_https, od_admin) = (free_addr()?, free_addr()?);
    let od = Envoy::start(
        &on_demand_bootstrap(od_https, od_admin, &sds_path),
        od_admin,
        1,
    )?;
    let (f_https, f_admin) = (free_addr()?, free_addr()?);
    let unused = free_addr()?;
    let files = Envoy::start(
        &bootstrap_with_listeners(
            unused,
            f_admin,
            "",
            unused,
            unused,
            &https_listener(f_https, &work.path().join("sds"), &["lat"]),
        ),
        f_admin,
        1,
    )?;
    let cached = vec!["lat.example.com".to_owned(); per_round];
    // Until the agent has restored its store, names are answered "removed".
    wait_for(
        Duration::from_secs(30),
        "the agent serving its stored certificates",
        || matches!(handshake(od_https, "lat.example.com", PROBE), Ok(Some(_))).then_some(()),
        String::new,
    )?;
    latencies(f_https, &cached[..1])?;
    let (mut on_demand, mut file_shape, mut first) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            on_demand.extend(latencies(od_https, &cached)?);
            file_shape.extend(latencies(f_https, &cached)?);
        } else {
            file_shape.extend(latencies(f_https, &cached)?);
            on_demand.extend(latencies(od_https, &cached)?);
        }
        first.extend(latencies(
            od_https,
            &firsts[round * per_round..(round + 1) * per_round],
        )?);
    }
    report_latencies(rows, &on_demand, &file_shape, &first, rounds);
    drop((od, files));
    Ok(())
}

/// The two latency rows: cached names on each listener, and first handshakes.
fn report_latencies(
    rows: &mut Vec<Row>,
    on_demand: &[f64],
    file_shape: &[f64],
    first: &[f64],
    rounds: usize,
) {
    let p = |v: &[f64], q: f64| percentile(&mut v.to_vec(), q);
    rows.push(Row {
        what: "Handshake latency, cached name: on-demand listener (agent's SDS) / file shape".into(),
        result: format!(
            "p50 {:.2} / {:.2} ms = **{:.3}**, p99 {:.2} / {:.2} ms",
            p(on_demand, 0.5),
            p(file_shape, 0.5),
            p(on_demand, 0.5) / p(file_shape, 0.5),
            p(on_demand, 0.99),
            p(file_shape, 0.99)
        ),
        note: format!(
            "{} handshakes each, interleaved in {rounds} rounds, TLS 1.3, P-256, rustls client, Envoy --concurrency 1; target within 5 %",
            on_demand.len()
        ),
    });
    rows.push(Row {
        what: "Handshake latency, first handshake for a name Envoy has not fetched (on-demand) vs cached".into(),
        result: format!(
            "p50 {:.2} ms (+{:.2}), p99 {:.2} ms (+{:.2})",
            p(first, 0.5),
            p(first, 0.5) - p(on_demand, 0.5),
            p(first, 0.99),
            p(first, 0.99) - p(on_demand, 0.99)
        ),
        note: format!(
            "{} distinct names; the extra is Envoy's delta SDS round trip to the agent (release build); target <= 5 ms more",
            first.len()
        ),
    });
}

/// On-demand TLS: from the first handshake for a new allowed name to a
/// verified TLS answer, on Pebble.
fn on_demand_first(pebble: &Pebble, agent_bin: &Path, rounds: usize) -> Result<Vec<f64>> {
    let setup = on_demand_setup(
        pebble,
        agent_bin,
        "\n[on_demand]\nallow = [\"*.od.example.com\"]\nmax_wait_seconds = 30\nmax_per_hour = 1000\n",
    )?;
    let root = pebble.issuing_root()?;
    let mut times = Vec::new();
    for i in 0..rounds {
        let name = format!("r{i}x{}.od.example.com", std::process::id());
        let started = Instant::now();
        if handshake(setup.https, &name, PROBE)?.is_none() {
            bail!(
                "{name}: the first handshake got no certificate\n{}",
                setup.agent.log()
            );
        }
        wait_for(
            Duration::from_secs(30),
            "verified",
            || {
                served_chain(setup.https, &name)
                    .ok()
                    .filter(|c| pebble::verify_chain(c, &root, &name).is_ok())
            },
            || setup.agent.log(),
        )?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(times)
}

pub fn run(rows: &mut Vec<Row>, rounds: usize, count: usize, files: usize) -> Result<()> {
    let agent_bin = release_agent()?;
    // A fresh CA for each part: one part's load never slows the next.
    let fresh_pebble = super::fresh_pebble;
    eprintln!("[bench] sds: the file shape at {files} certificates");
    let certs: Vec<(String, Vec<String>)> = (0..files)
        .map(|i| (format!("f{i}"), vec![format!("f{i}.files.example.com")]))
        .collect();
    let (t_files, files_peak) = ours(&fresh_pebble()?, &agent_bin, &certs, None)?;
    eprintln!("[bench] sds: {count} certificates through one on-demand listener");
    let (t_many, agent_peak, envoy_rss) = many_on_demand(&fresh_pebble()?, &agent_bin, count)?;
    let pebble = fresh_pebble()?;
    rows.push(Row {
        what: format!(
            "{count} certificates through one on-demand listener: config -> all served / the file shape at {files}"
        ),
        result: format!("{t_many:.1} s / {t_files:.1} s"),
        note: format!(
            "Pebble, 1 name each, order_concurrency 64; all {count} served; agent peak RSS {:.1} MB (file shape at {files}: {:.1} MB); on-demand Envoy RSS at {count}: {:.1} MB; the file shape stops at fs.inotify.max_user_instances (128 here)",
            agent_peak as f64 / 1024.0,
            files_peak as f64 / 1024.0,
            envoy_rss as f64 / 1024.0
        ),
    });
    eprintln!("[bench] sds: handshake latency");
    handshake_latency(rows, &agent_bin, rounds, 200)?;
    eprintln!("[bench] sds: on-demand first handshake");
    let mut times = on_demand_first(&pebble, &agent_bin, rounds)?;
    let (lo, hi) = spread(&times);
    rows.push(Row {
        what: "On-demand TLS: first handshake for a new allowed name -> verified TLS answer (Pebble)".into(),
        result: format!("median **{:.2} s** ({lo:.2}-{hi:.2})", median(&mut times)),
        note: format!(
            "{rounds} names; the handshake is held while the agent orders (HTTP-01 through the filter), then completes"
        ),
    });
    Ok(())
}
