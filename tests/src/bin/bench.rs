//! Side-by-side benchmarks (`scripts/bench.sh`): every compared variant runs in
//! the same process, interleaved round by round so machine drift hits all of
//! them alike; each cell is the median of the rounds with the spread
//! (min-max). Prints a markdown table. Loopback only. Not a test: nothing here
//! asserts a timing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_agent::api::{self, ApiState};
use acme_agent::challenges::{Challenge, ChallengeSet};
use acme_agent::disk::sink::FileSink;
use acme_agent::ports::sink::{CertificateSink, IssuedCertificate};
use acme_tests::agent::{Agent, Cert, Settings, wait_for, write_idle_config};
use acme_tests::envoy::{
    Envoy, bootstrap, bootstrap_filter_on_challenge_route, bootstrap_with_listeners, envoy_binary,
    free_addr, https_listener, matched_wasm_filter_yaml, served_chain, wasm_filter_yaml,
};
use acme_tests::http::{Connection, free_port};
use acme_tests::pebble::{self, Pebble};
use acme_tests::probe;
use acme_tests::sync_server::SyncServer;
use acme_tests::{filter_wasm, key_authorization, workspace_root};
use anyhow::{Context as _, Result, bail};

#[path = "bench/dns.rs"]
mod dns;
#[path = "bench/envoy_memory.rs"]
mod envoy_memory;
#[path = "bench/hundred.rs"]
mod hundred;
#[path = "bench/scale.rs"]
mod scale;
#[path = "bench/sds.rs"]
mod sds;
#[path = "bench/throughput.rs"]
mod throughput;

const TOKEN: &str = "bench-token_0123456789abcdefghijklmnopq";
const HOST: &str = "www.example.com";

struct Row {
    what: String,
    result: String,
    note: String,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// One wrk run against one Envoy.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    p99_ms: f64,
    /// CPU time (user + system) the Envoy under test spent per request: what
    /// a variant costs, without the noise of wrk and the upstream competing
    /// with it for the same cores.
    cpu_us: f64,
}

/// wrk for `seconds` at `addr` + `path`; `pids` are the processes that serve
/// the requests (their CPU time is summed).
fn wrk(addr: SocketAddr, path: &str, host: &str, seconds: u32, pids: &[u32]) -> Result<Load> {
    let cpu_ticks_all = || -> Result<u64> { pids.iter().map(|p| cpu_ticks(*p)).sum() };
    let cpu_before = cpu_ticks_all()?;
    let out = Command::new("wrk")
        .args(["-t1", "-c16", &format!("-d{seconds}s"), "--latency"])
        .args(["-H", &format!("Host: {host}")])
        .arg(format!("http://{addr}{path}"))
        .output()
        .context("running wrk (scripts/setup.sh installs it)")?;
    let cpu = cpu_ticks_all()? - cpu_before;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw non-2xx answers at {path}:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in:\n{text}"))?;
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in:\n{text}"))?;
    let p99_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| duration_ms(v.trim()))
        .with_context(|| format!("no 99% line in:\n{text}"))?;
    Ok(Load {
        rps,
        p99_ms,
        cpu_us: cpu as f64 * 1e6 / CLOCK_TICKS_PER_S / requests,
    })
}

/// /proc's unit for CPU times (USER_HZ, 100 on every Linux ABI).
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// User + system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces;
    // utime and stime are fields 14 and 15 of the whole line.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no CPU times in /proc/{pid}/stat: {stat}"))
    };
    Ok(field(11)? + field(12)?)
}

fn duration_ms(text: &str) -> f64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let n: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// An Envoy answering every request itself (`direct_response`): the fast
/// upstream, and the fast "solver" server.
fn direct_envoy(body: &str) -> Result<(Envoy, SocketAddr)> {
    let (listen, admin) = (free_addr()?, free_addr()?);
    let config = format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: direct
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: direct
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "{body}" }} }}
                # The same headers as the filter's answer.
                response_headers_to_add: [{{ header: {{ key: cache-control, value: no-store }} }}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        admin_port = admin.port(),
        port = listen.port(),
    );
    Ok((Envoy::start(&config, admin, 1)?, listen))
}

/// The filter's configuration in every Envoy here.
const FILTER_CONFIG: &str = r#"{"agent_cluster":"acme_agent"}"#;

fn filter_yaml() -> Result<String> {
    Ok(wasm_filter_yaml(&filter_wasm()?, FILTER_CONFIG))
}

/// An Envoy at `concurrency` with [`bootstrap`]'s listener and `filters`, in
/// front of `upstream`, its agent cluster at `agent`; and that listener.
fn proxy_envoy(
    filters: &str,
    upstream: SocketAddr,
    agent: SocketAddr,
    concurrency: u32,
) -> Result<(Envoy, SocketAddr)> {
    let (listen, admin) = (free_addr()?, free_addr()?);
    let config = bootstrap(listen, admin, filters, upstream, agent);
    Ok((Envoy::start(&config, admin, concurrency)?, listen))
}

/// Pass-through: the same Envoy build and config, with and without the filter,
/// in front of a direct-response upstream.
fn pass_through(rows: &mut Vec<Row>, rounds: usize) -> Result<()> {
    let (_upstream, upstream) = direct_envoy("ok")?;
    let sync = SyncServer::start(None)?;
    let on_route = {
        let (listen, admin) = (free_addr()?, free_addr()?);
        let config = bootstrap_filter_on_challenge_route(
            listen,
            admin,
            &filter_wasm()?,
            FILTER_CONFIG,
            upstream,
            sync.addr(),
        );
        (Envoy::start(&config, admin, 1)?, listen)
    };
    let envoys = [
        proxy_envoy(&filter_yaml()?, upstream, sync.addr(), 1)?,
        proxy_envoy("", upstream, sync.addr(), 1)?,
        proxy_envoy(
            &matched_wasm_filter_yaml(&filter_wasm()?, FILTER_CONFIG),
            upstream,
            sync.addr(),
            1,
        )?,
        on_route,
    ];
    let loads = interleaved(rounds, &envoys, |(envoy, listen)| {
        wrk(*listen, "/app/page", HOST, 3, &[pid(envoy)?])
    })?;
    // Each variant against the one without the filter, round by round.
    for (variant, what, note) in [
        (
            2,
            "filter created by a composite action on the challenge prefix",
            "a composite action creates the filter for /.well-known/acme-challenge/ only (the Istio EnvoyFilter)",
        ),
        (
            3,
            "filter enabled only on the challenge route",
            "`disabled: true` in the chain, enabled by the route's typed_per_filter_config (the standalone config)",
        ),
        (0, "filter on every request", "target >= 0.98"),
    ] {
        rows.push(ratio_row(
            &format!("Pass-through req/s, {what} / without"),
            &loads[variant],
            &loads[1],
            note,
        ));
    }
    rows.push(Row {
        what: "Pass-through p99 latency, filter on every request / without".into(),
        result: format!(
            "{:.2} ms / {:.2} ms",
            median(&mut loads[0].iter().map(|l| l.p99_ms).collect::<Vec<_>>()),
            median(&mut loads[1].iter().map(|l| l.p99_ms).collect::<Vec<_>>())
        ),
        note: format!("wrk -t1 -c16, 3 s per run, {rounds} rounds, Envoy --concurrency 1"),
    });
    Ok(())
}

fn pid(envoy: &Envoy) -> Result<u32> {
    envoy.pid().context("Envoy has exited")
}

/// Runs `measure` on every variant `rounds` times, rotating which goes first
/// each round so that no variant always runs first; one series per variant.
fn interleaved<T>(
    rounds: usize,
    variants: &[T],
    mut measure: impl FnMut(&T) -> Result<Load>,
) -> Result<Vec<Vec<Load>>> {
    let mut series = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            series[i].push(measure(&variants[i])?);
        }
    }
    Ok(series)
}

/// A row comparing two series measured in the same rounds: their req/s
/// medians and the median of the per-round ratios with their spread, and the
/// same for CPU per request (`b / a`, so that above 1 means `a` is cheaper).
fn ratio_row(what: &str, a: &[Load], b: &[Load], note: &str) -> Row {
    let (rps, rps_lo, rps_hi) = ratio(a, b, |l| l.rps);
    let (cpu, cpu_lo, cpu_hi) = ratio(b, a, |l| l.cpu_us);
    let med = |s: &[Load], f: fn(&Load) -> f64| median(&mut s.iter().map(f).collect::<Vec<_>>());
    Row {
        what: what.to_owned(),
        result: format!(
            "{:.0} / {:.0} = **{rps:.3}**",
            med(a, |l| l.rps),
            med(b, |l| l.rps)
        ),
        note: format!(
            "spread {rps_lo:.3}-{rps_hi:.3}; Envoy CPU per request {:.2} / {:.2} µs = {cpu:.3} \
             (spread {cpu_lo:.3}-{cpu_hi:.3}); {note}",
            med(a, |l| l.cpu_us),
            med(b, |l| l.cpu_us),
        ),
    }
}

/// Median of the per-round ratios `f(a) / f(b)`, with their min and max.
fn ratio(a: &[Load], b: &[Load], f: impl Fn(&Load) -> f64) -> (f64, f64, f64) {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
    let (lo, hi) = spread(&ratios);
    (median(&mut ratios), lo, hi)
}

/// Challenge answers: the filter inline vs the least any proxy-wasm filter
/// can do vs Envoy's direct_response with the same answer vs Envoy routing to
/// a solver server (cert-manager's shape).
fn challenge_answers(rows: &mut Vec<Row>, rounds: usize) -> Result<()> {
    let body = key_authorization(TOKEN);
    let path = format!("/.well-known/acme-challenge/{TOKEN}");
    let (_app, app) = direct_envoy("app")?;
    let sync = SyncServer::start(None)?;
    sync.publish(&[(TOKEN, HOST)]);

    let (inline, inline_listen) = proxy_envoy(&filter_yaml()?, app, sync.addr(), 1)?;
    wait_for(
        Duration::from_secs(10),
        "token synced",
        || {
            acme_tests::http::get(inline_listen, &path, HOST)
                .ok()
                .filter(|r| r.status == 200)
        },
        || inline.log(),
    )?;
    let dir = tempfile::tempdir()?;
    let floor_wasm = probe::answer_floor(
        dir.path(),
        &body,
        &[
            ("content-type", "text/plain"),
            ("cache-control", "no-store"),
        ],
    )?;
    let (floor, floor_listen) =
        proxy_envoy(&wasm_filter_yaml(&floor_wasm, ""), app, sync.addr(), 1)?;
    let (direct, direct_listen) = direct_envoy(&body)?;
    let (solver, solver_listen) = direct_envoy(&body)?;
    let (routed, routed_listen) = proxy_envoy("", solver_listen, sync.addr(), 1)?;
    for listen in [inline_listen, floor_listen, direct_listen, routed_listen] {
        let answer = acme_tests::http::get(listen, &path, HOST)?;
        if answer.status != 200 || answer.body != body.as_bytes() {
            bail!(
                "{listen} answers {} {:?}, not the key authorization",
                answer.status,
                answer.body
            );
        }
    }

    let variants = [
        (inline_listen, vec![pid(&inline)?]),
        (floor_listen, vec![pid(&floor)?]),
        (direct_listen, vec![pid(&direct)?]),
        (routed_listen, vec![pid(&routed)?, pid(&solver)?]),
    ];
    let loads = interleaved(rounds, &variants, |(listen, pids)| {
        wrk(*listen, &path, HOST, 3, pids)
    })?;
    let med =
        |i: usize, f: fn(&Load) -> f64| median(&mut loads[i].iter().map(f).collect::<Vec<_>>());
    rows.push(Row {
        what: "Challenge answers req/s: inline / Wasm floor / direct_response / routed to a solver"
            .into(),
        result: format!(
            "{:.0} / {:.0} / {:.0} / {:.0}",
            med(0, |l| l.rps),
            med(1, |l| l.rps),
            med(2, |l| l.rps),
            med(3, |l| l.rps)
        ),
        note: format!(
            "p99 {:.2} / {:.2} / {:.2} / {:.2} ms; CPU per answer {:.2} / {:.2} / {:.2} / {:.2} µs \
             (routed: front Envoy + solver)",
            med(0, |l| l.p99_ms),
            med(1, |l| l.p99_ms),
            med(2, |l| l.p99_ms),
            med(3, |l| l.p99_ms),
            med(0, |l| l.cpu_us),
            med(1, |l| l.cpu_us),
            med(2, |l| l.cpu_us),
            med(3, |l| l.cpu_us),
        ),
    });
    rows.push(ratio_row(
        "Inline / direct_response",
        &loads[0],
        &loads[2],
        "target >= 0.95",
    ));
    rows.push(ratio_row(
        "Wasm floor / direct_response",
        &loads[1],
        &loads[2],
        "a module doing nothing but send the same answer (no SDK, one host call; tests/src/probe.rs): the ceiling for any inline answer",
    ));
    rows.push(ratio_row(
        "Inline / Wasm floor",
        &loads[0],
        &loads[1],
        "what the filter's own work costs: reading the headers, the token lookup, the counter",
    ));
    rows.push(ratio_row(
        "Inline / routed to a solver server",
        &loads[0],
        &loads[3],
        "",
    ));
    Ok(())
}

/// Propagation: the agent's real API (in-process) publishing a token, until
/// every worker of two Envoys (--concurrency 2) answers it.
fn propagation(rows: &mut Vec<Row>, tokens: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let set = Arc::new(ChallengeSet::new());
    let state = ApiState::new(Arc::clone(&set), None);
    state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let agent = listener.local_addr()?;
    runtime.spawn(api::serve(listener, state, std::future::pending()));

    let (_app, app) = direct_envoy("app")?;
    let envoys = [
        proxy_envoy(&filter_yaml()?, app, agent, 2)?,
        proxy_envoy(&filter_yaml()?, app, agent, 2)?,
    ];
    // Four keep-alive connections per Envoy: the exact balance gives each worker two.
    let mut connections: Vec<Connection> = Vec::new();
    for (_, listen) in &envoys {
        for _ in 0..4 {
            connections.push(Connection::open(*listen)?);
        }
    }
    let challenge = |i: usize| Challenge {
        token: format!("{TOKEN}-{i}"),
        key_authorization: key_authorization(&format!("{TOKEN}-{i}")),
        identifier: HOST.into(),
    };
    let mut samples = Vec::new();
    for i in 0..=tokens {
        let c = challenge(i);
        let path = format!("/.well-known/acme-challenge/{}", c.token);
        let started = Instant::now();
        set.publish([c]);
        for connection in &mut connections {
            loop {
                let r = connection.send("GET", &path, HOST, false)?;

                if r.status == 200 {
                    break;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    bail!("token {i} not answered within 10 s");
                }
            }
        }
        let took = started.elapsed().as_secs_f64() * 1000.0;

        if i > 0 {
            // The first one includes the filters' first sync after start.
            samples.push(took);
        }
        set.remove([format!("{TOKEN}-{i}").as_str()]);
        std::thread::sleep(Duration::from_millis(5));
    }
    let (lo, hi) = spread(&samples);
    rows.push(Row {
        what: format!("Propagation, publish -> all 4 workers of 2 Envoys answer ({tokens} tokens)"),
        result: format!(
            "p50 **{:.2} ms**, p99 **{:.2} ms**",
            percentile(&mut samples.clone(), 0.5),
            percentile(&mut samples, 0.99)
        ),
        note: format!("min {lo:.2}, max {hi:.2} ms; target p99 <= 50 ms"),
    });
    drop(runtime);
    Ok(())
}

/// Hot reload: a renewed certificate written by the agent's file sink, until
/// Envoy presents it on a new handshake.
fn hot_reload(rows: &mut Vec<Row>, rounds: usize) -> Result<()> {
    let work = tempfile::tempdir()?;
    let sds = work.path().join("sds");
    let sink = FileSink::new(&sds)?;
    let domains = vec![HOST.to_owned()];
    let install = |sink: &FileSink| -> Result<String> {
        let (chain_pem, key_pem) =
            acme_agent::certificate::placeholder(&domains, Default::default())?;
        acme_tests::block_on(sink.install(&IssuedCertificate {
            name: "www".into(),
            chain_pem: chain_pem.clone(),
            key_pem: key_pem.into(),
        }))?;
        Ok(chain_pem)
    };
    install(&sink)?;
    let (http, admin, https) = (free_addr()?, free_addr()?, free_addr()?);
    let sync = SyncServer::start(None)?;
    let (_app, app) = direct_envoy("app")?;
    let config = bootstrap_with_listeners(
        http,
        admin,
        "",
        app,
        sync.addr(),
        &https_listener(https, &sds, &["www"]),
    );
    let envoy = Envoy::start(&config, admin, 2)?;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let chain = install(&sink)?;
        let started = Instant::now();
        let leaf = chain
            .split("-----END CERTIFICATE-----")
            .next()
            .unwrap_or_default()
            .to_owned();
        wait_for(
            Duration::from_secs(10),
            "new certificate served",
            || {
                served_chain(https, HOST)
                    .ok()
                    .filter(|c| c.starts_with(leaf.trim_start()))
            },
            || envoy.log(),
        )?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (lo, hi) = spread(&samples);
    rows.push(Row {
        what: format!(
            "Hot reload, SDS file renamed in -> served on a new handshake ({rounds} swaps)"
        ),
        result: format!("median **{:.1} ms**", median(&mut samples)),
        note: format!("{lo:.1}-{hi:.1} ms; includes ~5 ms per `openssl s_client` poll"),
    });
    Ok(())
}

fn rss_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Footprint: the .wasm, Envoy with and without the filter.
fn footprint(rows: &mut Vec<Row>) -> Result<()> {
    let wasm = filter_wasm()?;
    rows.push(Row {
        what: "Filter .wasm size".into(),
        result: format!("**{} bytes**", std::fs::metadata(&wasm)?.len()),
        note: "release, opt-level z, LTO, unused SDK exports removed, wasm-opt -Oz".into(),
    });
    let (_app, app) = direct_envoy("app")?;
    let sync = SyncServer::start(None)?;
    let mut rss = Vec::new();
    for with_filter in [true, false] {
        let filters = if with_filter {
            filter_yaml()?
        } else {
            String::new()
        };
        let (envoy, listen) = proxy_envoy(&filters, app, sync.addr(), 2)?;
        for _ in 0..50 {
            let _ = acme_tests::http::get(listen, "/", HOST);
        }
        std::thread::sleep(Duration::from_millis(500));
        rss.push(envoy.pid().and_then(|p| rss_kb(p, "VmRSS:")).unwrap_or(0));
    }
    rows.push(Row {
        what: "Envoy RSS --concurrency 2, with filter / without".into(),
        result: format!(
            "{:.1} MB / {:.1} MB",
            rss[0] as f64 / 1024.0,
            rss[1] as f64 / 1024.0
        ),
        note: "after 50 requests".into(),
    });
    Ok(())
}

/// The agent binary (release build) for time-to-certificate and its RSS.
fn release_agent() -> Result<PathBuf> {
    let out = Command::new(workspace_root().join("scripts/build-agent.sh"))
        .env("PROFILE", "release")
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the release agent failed");
    }
    Ok(workspace_root().join(String::from_utf8_lossy(&out.stdout).trim()))
}

/// One run of ours, as a running system gets a new certificate: Envoy and the
/// agent up and synced (placeholder SDS files so Envoy can start), then the
/// certificates added to the agent's config (SIGHUP) until Envoy serves each
/// with a chain from Pebble. The account is registered within the timed part,
/// as the peers do. With `dns` (a `[dns.main]` section), every name is
/// validated by dns-01 through it. Returns (seconds, agent peak RSS kB).
fn ours(
    pebble: &Pebble,
    agent_bin: &Path,
    certs: &[(String, Vec<String>)],
    dns: Option<&str>,
) -> Result<(f64, u64)> {
    let work = tempfile::tempdir()?;
    let sds = work.path().join("sds");
    let sink = FileSink::new(&sds)?;
    for (name, domains) in certs {
        let (chain_pem, key_pem) =
            acme_agent::certificate::placeholder(domains, Default::default())?;
        acme_tests::block_on(sink.install(&IssuedCertificate {
            name: name.clone(),
            chain_pem,
            key_pem: key_pem.into(),
        }))?;
    }
    let http: SocketAddr = format!("127.0.0.1:{}", pebble.http_port).parse()?;
    let (admin, https, api) = (free_addr()?, free_addr()?, free_addr()?);
    let names: Vec<&str> = certs.iter().map(|(n, _)| n.as_str()).collect();
    let (_app, app) = direct_envoy("app")?;
    let domain_refs: Vec<Vec<&str>> = certs
        .iter()
        .map(|(_, d)| d.iter().map(String::as_str).collect())
        .collect();
    let cert_refs: Vec<Cert<'_>> = certs
        .iter()
        .zip(&domain_refs)
        .map(|((n, _), d)| Cert {
            name: n,
            domains: d,
            extra: if dns.is_some() {
                "challenge = \"dns-01\"\ndns = \"main\""
            } else {
                ""
            },
        })
        .collect();
    let health = free_addr()?;
    let config_text = |certificates: &[Cert<'_>]| {
        let settings = Settings {
            directory_url: &pebble.directory_url,
            ca_root: &pebble.tls_root,
            state_dir: &work.path().join("state"),
            sds_dir: &sds,
            kubernetes: None,
            api,
            health,
            token_file: None,
            self_check: Some(http),
            retry: (1, 4),
            certificates,
        };
        format!(
            "order_concurrency = {}\n{}{}",
            certs.len().min(64),
            settings.toml(),
            dns.unwrap_or_default()
        )
    };
    let config_path = work.path().join("agent.toml");
    std::fs::write(&config_path, config_text(&[]))?;
    let agent =
        Agent::start_with_binary(agent_bin, &config_path, api, &work.path().join("agent.log"))?;
    let config = bootstrap_with_listeners(
        http,
        admin,
        &filter_yaml()?,
        app,
        api,
        &https_listener(https, &sds, &names),
    );
    let envoy = Envoy::start(&config, admin, 2)?;
    envoy.wait_stat_at_least(
        "wasmcustom.acme_filter.sync_success",
        1,
        Duration::from_secs(10),
    )?;
    let root = pebble.issuing_root()?;

    let started = Instant::now();
    std::fs::write(&config_path, config_text(&cert_refs))?;
    agent.signal("HUP")?;
    for (_, domains) in certs {
        let sni = &domains[0].replace("*.", "wild.");
        wait_for(
            Duration::from_secs(120),
            "certificate served",
            || {
                served_chain(https, sni)
                    .ok()
                    .filter(|c| pebble::verify_chain(c, &root, sni).is_ok())
            },
            || agent.log(),
        )?;
    }
    let took = started.elapsed().as_secs_f64();
    let peak = agent.pid().and_then(|p| rss_kb(p, "VmHWM:")).unwrap_or(0);
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("ours: {took:.3} s\n{}", agent.log());
    }
    drop(envoy);
    Ok((took, peak))
}

/// lego against `pebble`, its state in `work`: the arguments every run shares.
fn lego_command(pebble: &Pebble, work: &Path) -> Command {
    let mut cmd = Command::new("lego");
    cmd.env("LEGO_CA_CERTIFICATES", &pebble.tls_root)
        .args([
            "--server",
            &pebble.directory_url,
            "--email",
            "ops@example.com",
            "--accept-tos",
        ])
        .arg("--path")
        .arg(work);
    cmd
}

/// Runs a peer's command to completion; its wall time in seconds.
fn timed(mut cmd: Command, started: Instant, what: &str) -> Result<f64> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

fn lego(pebble: &Pebble, domains: &[String]) -> Result<f64> {
    let work = tempfile::tempdir()?;
    let started = Instant::now();
    let mut cmd = lego_command(pebble, work.path());
    cmd.args([
        "--http",
        "--http.port",
        &format!("127.0.0.1:{}", pebble.http_port),
    ]);
    for d in domains {
        cmd.args(["--domains", d]);
    }
    cmd.arg("run");
    timed(cmd, started, "lego")
}

/// certbot against `pebble`, its state in `work`: the arguments every run
/// shares (no prompt, the account's email).
fn certbot_command(pebble: &Pebble, work: &Path) -> Command {
    let mut cmd = Command::new("certbot");
    cmd.env("REQUESTS_CA_BUNDLE", &pebble.tls_root)
        .args([
            "certonly",
            "--non-interactive",
            "--agree-tos",
            "-m",
            "ops@example.com",
        ])
        .args(["--server", &pebble.directory_url])
        .arg("--config-dir")
        .arg(work.join("config"))
        .arg("--work-dir")
        .arg(work.join("work"))
        .arg("--logs-dir")
        .arg(work.join("logs"));
    cmd
}

fn certbot(pebble: &Pebble, domains: &[String]) -> Result<f64> {
    let work = tempfile::tempdir()?;
    let started = Instant::now();
    let mut cmd = certbot_command(pebble, work.path());
    cmd.arg("--standalone").args([
        "--http-01-port",
        &pebble.http_port.to_string(),
        "--http-01-address",
        "127.0.0.1",
    ]);
    for d in domains {
        cmd.args(["-d", d]);
    }
    timed(cmd, started, "certbot")
}

fn time_to_certificate(rows: &mut Vec<Row>, rounds: usize, many: usize) -> Result<()> {
    let agent_bin = release_agent()?;
    let pebble = fresh_pebble()?;
    let mut serial = 0;
    let mut fresh = |n: usize| -> Vec<(String, Vec<String>)> {
        (0..n)
            .map(|_| {
                serial += 1;
                (
                    format!("c{serial}"),
                    vec![
                        format!("www.t{serial}.example.com"),
                        format!("t{serial}.example.com"),
                    ],
                )
            })
            .collect()
    };
    let (mut t_ours, mut t_lego, mut t_certbot) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        t_ours.push(ours(&pebble, &agent_bin, &fresh(1), None)?.0);
        t_lego.push(lego(&pebble, &fresh(1)[0].1)?);
        t_certbot.push(certbot(&pebble, &fresh(1)[0].1)?);
    }
    let best_peer = median(&mut t_lego.clone()).min(median(&mut t_certbot.clone()));
    let fmt = |v: &[f64]| {
        let (lo, hi) = spread(v);
        format!("{:.2} s ({lo:.2}-{hi:.2})", median(&mut v.to_vec()))
    };
    rows.push(Row {
        what: "Time to certificate, 1 certificate with 2 domains: ours (config edit -> Envoy serves it) / lego / certbot (command -> files)".into(),
        result: format!("{} / {} / {}", fmt(&t_ours), fmt(&t_lego), fmt(&t_certbot)),
        note: format!(
            "ours / best peer = **{:.2}**; target <= 0.2",
            median(&mut t_ours.clone()) / best_peer
        ),
    });

    let (ours_many, peak) = ours(&pebble, &agent_bin, &fresh(many), None)?;
    let mut lego_many = 0.0;
    for (_, domains) in fresh(many) {
        lego_many += lego(&pebble, &domains)?;
    }
    let mut certbot_many = 0.0;
    for (_, domains) in fresh(many) {
        certbot_many += certbot(&pebble, &domains)?;
    }
    rows.push(Row {
        what: format!("Time to certificate, {many} certificates (2 domains each): ours / lego / certbot"),
        result: format!("{ours_many:.2} s / {lego_many:.1} s / {certbot_many:.1} s"),
        note: format!(
            "one run each; peers one after the other; ours order_concurrency = {many}; ours / best peer = **{:.3}**",
            ours_many / lego_many.min(certbot_many)
        ),
    });
    rows.push(Row {
        what: format!("Agent peak RSS while ordering {many} certificates (release)"),
        result: format!("{:.1} MB", peak as f64 / 1024.0),
        note: "VmHWM".into(),
    });
    Ok(())
}

/// The agent idle, release build, two valid certificates.
fn agent_idle(rows: &mut Vec<Row>) -> Result<()> {
    let agent_bin = release_agent()?;
    let work = tempfile::tempdir()?;
    let api = free_addr()?;
    let config = write_idle_config(work.path(), api)?;
    let agent = Agent::start_with_binary(&agent_bin, &config, api, &work.path().join("agent.log"))?;
    std::thread::sleep(Duration::from_secs(1));
    let rss = agent.pid().and_then(|p| rss_kb(p, "VmRSS:")).unwrap_or(0);
    rows.push(Row {
        what: "Agent RSS idle (release)".into(),
        result: format!("{:.1} MB", rss as f64 / 1024.0),
        note: "challenge API up, no order running".into(),
    });
    Ok(())
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("?")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

/// The comma-separated numbers after `part` on the command line, if any.
fn list_after(args: &[String], part: &str) -> Result<Option<Vec<usize>>> {
    let Some(list) = args
        .iter()
        .position(|a| a == part)
        .and_then(|i| args.get(i + 1))
    else {
        return Ok(None);
    };
    let numbers = list
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((!numbers.is_empty()).then_some(numbers))
}

/// A Pebble of the benchmark's own, answering every nonce and reusing no
/// authorization (every order does its whole exchange).
fn fresh_pebble() -> Result<Pebble> {
    Pebble::start(
        free_port()?,
        pebble::Options {
            nonce_reject: Some(0),
            authz_reuse: Some(0),
            ..pebble::Options::default()
        },
    )
}

/// The parts that run only when named with `--only`.
fn on_request(only: Option<&str>, args: &[String], quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    // Ours alone, three times, with the agent's log (BENCH_DEBUG=1): only on request.
    if only == Some("ours") {
        let pebble = fresh_pebble()?;
        let agent_bin = release_agent()?;
        for i in 0..3 {
            let certs = vec![(
                format!("o{i}"),
                vec![format!("www.o{i}.example.com"), format!("o{i}.example.com")],
            )];
            let (took, _) = ours(&pebble, &agent_bin, &certs, None)?;
            eprintln!("[bench] ours {took:.3} s");
        }
    }
    // Thousands of stored certificates (a local CA, no ACME): only on request,
    // `--only scale [N,N,...]` (default 1000,10000).
    if only == Some("scale") {
        let counts = list_after(args, "scale")?.unwrap_or(vec![1000, 10_000]);
        scale::run(rows, &release_agent()?, &counts)?;
    }
    // Issuance throughput on Pebble: only on request, `--only throughput
    // [OURS,PEERS]` (certificates for the agent and for each peer; default
    // 1000,1000).
    if only == Some("throughput") {
        let (ours, peers) = list_after(args, "throughput")?
            .map_or((1000, 1000), |n| (n[0], *n.get(1).unwrap_or(&n[0])));
        throughput::run(rows, &release_agent()?, ours, peers)?;
    }
    // 100 Envoys on the real agent: only on request, `--only hundred-envoys`.
    if only == Some("hundred-envoys") {
        eprintln!("[bench] a hundred Envoys on the real agent");
        hundred::run(rows, &release_agent()?, 100, if quick { 2 } else { 5 })?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only <part>` runs one part: pass-through, challenge, propagation,
    // reload, footprint, sds, dns, certificate.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let (rounds, tokens, many) = if quick { (2, 100, 5) } else { (5, 200, 20) };
    let started = Instant::now();
    let mut rows = Vec::new();
    if run("pass-through") {
        eprintln!("[bench] pass-through");
        // Twice the rounds: its differences are the smallest measured here.
        pass_through(&mut rows, rounds * 2)?;
    }
    if run("challenge") {
        eprintln!("[bench] challenge answers");
        challenge_answers(&mut rows, rounds)?;
    }
    if run("propagation") {
        eprintln!("[bench] propagation");
        propagation(&mut rows, tokens)?;
    }
    if run("reload") {
        eprintln!("[bench] hot reload");
        hot_reload(&mut rows, 20)?;
    }
    if run("footprint") {
        eprintln!("[bench] footprint");
        footprint(&mut rows)?;
        agent_idle(&mut rows)?;
    }
    if run("sds") {
        eprintln!("[bench] the agent as SDS server");
        let count = if quick { 100 } else { 1000 };
        sds::run(&mut rows, rounds, count, 100)?;
    }
    on_request(only.as_deref(), &args, quick, &mut rows)?;
    // `--only envoy-memory [COUNT,KEEP]` (bench/envoy_memory.rs).
    envoy_memory::if_asked(&mut rows, only.as_deref(), &args, release_agent)?;
    if run("dns") {
        eprintln!("[bench] wildcard by dns-01 (RFC 2136 on BIND)");
        dns::run(&mut rows, if quick { 3 } else { 7 })?;
    }
    if run("certificate") {
        eprintln!("[bench] time to certificate (lego takes a while)");
        time_to_certificate(&mut rows, rounds.min(3), many)?;
    }

    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "Measured {} on {cores} cores ({} rounds interleaved, medians with min-max), {:.0} s in all.\n",
        version("date", &["-u", "+%Y-%m-%d"]),
        rounds,
        started.elapsed().as_secs_f64()
    );
    println!("| measurement | result | notes |\n| --- | --- | --- |");
    for row in rows {
        println!("| {} | {} | {} |", row.what, row.result, row.note);
    }
    println!(
        "\nVersions: {}; pebble {}; {}; {}; {}.",
        version(&envoy_binary()?.display().to_string(), &["--version"])
            .replace("envoy  version: ", "Envoy "),
        version("dpkg-query", &["-W", "-f=${Version}", "pebble"]),
        version("lego", &["--version"]),
        version("certbot", &["--version"]),
        version("wrk", &["-v"]),
    );
    Ok(())
}
