//! The agent at scale (issue 21): N certificates from a local CA (rcgen; no
//! ACME CA is involved, so Pebble's lock bug past ~8,500 certificates does not
//! apply) written to a state directory, then the release agent started over
//! it. Measured: the time from the agent's start to every certificate
//! received by one delta SDS stream that asked for all of them, the agent's
//! memory once they are, what that is per certificate beyond the PEM itself,
//! and the `status` command at that size.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use acme_agent::disk::store::FileStore;
use acme_agent::domain::spec::KeyType;
use acme_agent::ports::store::{StateStore, StoredCertificate};
use acme_tests::agent::Agent;
use acme_tests::envoy::free_addr;
use anyhow::{Context as _, Result, bail};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

use super::{Row, rss_kb};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The name of certificate `i` and its one DNS name.
fn name_of(i: usize) -> (String, String) {
    (format!("c{i}"), format!("c{i}.scale.example"))
}

/// A local CA that signs 90-day P-256 leaves, like an ACME CA would.
struct LocalCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl LocalCa {
    fn new() -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "scale benchmark CA");
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        })
    }

    /// (chain PEM, key PEM) for `domain`, issued a day ago for 90 days.
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

/// The config's `[[certificate]]` entries for certificates `0..count`.
fn entries(count: usize) -> String {
    let mut entries = String::with_capacity(count * 64);
    for i in 0..count {
        let (name, domain) = name_of(i);
        entries.push_str(&format!(
            "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\n"
        ));
    }
    entries
}

/// Certificates written at once while generating: each save is two fsyncs
/// (the file and its directory), which one at a time made 100,000 take
/// minutes.
const WRITERS: usize = 32;

/// Writes `count` certificates into `state` through the agent's own
/// `FileStore` (so the layout is the agent's); returns the mean PEM bytes
/// (chain and key) each.
async fn generate(state: &Path, count: usize) -> Result<usize> {
    let ca = std::sync::Arc::new(LocalCa::new()?);
    let store = FileStore::open(state)?;
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (ca, store) = (std::sync::Arc::clone(&ca), store.clone());
        writers.spawn(async move {
            let mut pem_bytes = 0;
            for i in (w..count).step_by(WRITERS) {
                let (name, domain) = name_of(i);
                let (chain_pem, key_pem) = ca.leaf(&domain)?;
                pem_bytes += chain_pem.len() + key_pem.len();
                let cert = StoredCertificate {
                    domains: vec![domain],
                    key_type: KeyType::EcdsaP256,
                    chain_pem,
                    key_pem: key_pem.into(),
                };
                store.save_certificate(&name, &cert).await?;
            }
            anyhow::Ok(pem_bytes)
        });
    }
    let mut pem_bytes = 0;
    while let Some(done) = writers.join_next().await {
        pem_bytes += done??;
    }
    Ok(pem_bytes / count.max(1))
}

/// The store of `count` certificates in `state`: made by [`generate`], or,
/// with `SCALE_CACHE=<dir>`, made once into `<dir>/<count>` and hard-linked
/// from there on later runs (the agent replaces files by rename, so it never
/// writes through a link into the cache). Returns the mean PEM bytes and the
/// seconds generating took (0 when cached).
fn store(runtime: &tokio::runtime::Runtime, state: &Path, count: usize) -> Result<(usize, f64)> {
    let Some(cache) = std::env::var_os("SCALE_CACHE") else {
        let t = Instant::now();
        return Ok((
            runtime.block_on(generate(state, count))?,
            t.elapsed().as_secs_f64(),
        ));
    };
    let cached = PathBuf::from(cache).join(count.to_string());
    let marker = cached.join("pem_bytes");
    let mut took = 0.0;
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&cached);
        let t = Instant::now();
        let pem_bytes = runtime.block_on(generate(&cached.join("state"), count))?;
        took = t.elapsed().as_secs_f64();
        std::fs::write(&marker, pem_bytes.to_string())?;
    }
    let _ = std::fs::remove_dir_all(state);
    let linked = Command::new("cp")
        .arg("-al")
        .arg(cached.join("state"))
        .arg(state)
        .status()?;
    if !linked.success() {
        bail!("cp -al {} {} failed", cached.display(), state.display());
    }
    Ok((std::fs::read_to_string(&marker)?.trim().parse()?, took))
}

/// A delta SDS stream over `socket` asking for `names`; returns when every
/// one of them has been received, with the time it took from `since`.
async fn receive_all(socket: &Path, names: Vec<String>, since: Instant) -> Result<Duration> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://sds.invalid")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    let wanted = names.len();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DeltaDiscoveryRequest {
        type_url: SECRET_TYPE.into(),
        resource_names_subscribe: names,
        ..DeltaDiscoveryRequest::default()
    })
    .await?;
    let mut stream = SecretDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut got = HashSet::with_capacity(wanted);
    while got.len() < wanted {
        let Some(response) = stream.message().await? else {
            bail!("the SDS stream ended at {} of {wanted}", got.len());
        };
        got.extend(response.resources.into_iter().map(|r| r.name));
        // Acknowledge, as Envoy does, so the server keeps sending.
        let ack = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            response_nonce: response.nonce,
            ..DeltaDiscoveryRequest::default()
        };
        if tx.send(ack).await.is_err() {
            bail!("the SDS stream closed");
        }
    }
    Ok(since.elapsed())
}

/// One measured start of the agent over `count` stored certificates.
struct Start {
    count: usize,
    generated_s: f64,
    served: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    pem_bytes: usize,
    status: Duration,
    status_bytes: usize,
    metrics: Series,
}

/// The agent's `/metrics` once every certificate is served: its series
/// (sample lines), those with a `certificate` label, and the bytes of one
/// scrape.
#[derive(Default)]
struct Series {
    total: usize,
    per_certificate: usize,
    bytes: usize,
}

impl Series {
    fn of(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let (mut total, mut per_certificate) = (0, 0);
        for line in samples {
            total += 1;
            per_certificate += usize::from(line.contains("certificate=\""));
        }
        Self {
            total,
            per_certificate,
            bytes: text.len(),
        }
    }
}

/// `/metrics` at `health`, scraped until its series stop growing (the
/// gauges of certificates still being scheduled come in after they are
/// served), at most 20 s.
fn scrape(health: SocketAddr) -> Result<Series> {
    let mut last = Series::default();
    for _ in 0..20 {
        let answer = acme_tests::http::get(health, "/metrics", "localhost")?;
        let now = Series::of(&String::from_utf8_lossy(&answer.body));
        if now.total > 0 && now.total == last.total {
            return Ok(now);
        }
        last = now;
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(last)
}

/// The agent's config over `work`; its path and the API and health addresses.
fn config(work: &Path, entries: &str) -> Result<(PathBuf, SocketAddr, SocketAddr)> {
    let (api, health) = (free_addr()?, free_addr()?);
    let text = format!(
        "state_dir = {:?}\n\n[acme]\ndirectory = \"https://127.0.0.1:9/dir\"\n\n[sds]\nlisten = \"unix:{}\"\n\n[challenge_api]\nlisten = \"{api}\"\n\n[health]\nlisten = \"{health}\"\n{entries}",
        work.join("state").display().to_string(),
        work.join("run/sds.sock").display(),
    );
    let path = work.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok((path, api, health))
}

fn start(agent_bin: &Path, count: usize) -> Result<Start> {
    let temp = tempfile::tempdir()?;
    // SCALE_KEEP=<dir> keeps each run's state and config (`<dir>/<count>`) to
    // look at the agent again, e.g. under a heap profiler.
    let work = std::env::var_os("SCALE_KEEP").map_or_else(
        || temp.path().to_owned(),
        |d| PathBuf::from(d).join(count.to_string()),
    );
    std::fs::create_dir_all(&work)?;
    let work = work.as_path();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (pem_bytes, generated_s) = store(&runtime, &work.join("state"), count)?;
    let (config_path, api, health) = config(work, &entries(count))?;
    let names: Vec<String> = (0..count).map(|i| name_of(i).1).collect();
    let socket = work.join("run/sds.sock");
    let started = Instant::now();
    let agent = Agent::start_with_binary(agent_bin, &config_path, api, &work.join("agent.log"))?;
    let served = runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(900),
                receive_all(&socket, names, started),
            )
            .await
        })
        .context("every certificate over SDS within 900 s")??;
    let pid = agent.pid().context("the agent's pid")?;
    let rss_kb = rss_kb(pid, "VmRSS:").unwrap_or(0);
    let hwm_kb = rss_kb_or(pid, "VmHWM:");
    let metrics = scrape(health)?;
    let t = Instant::now();
    let out = Command::new(agent_bin)
        .arg("--config")
        .arg(&config_path)
        .arg("status")
        .output()?;
    let status = t.elapsed();
    drop(agent);
    Ok(Start {
        count,
        generated_s,
        served,
        rss_kb,
        hwm_kb,
        pem_bytes,
        status,
        status_bytes: out.stdout.len(),
        metrics,
    })
}

fn rss_kb_or(pid: u32, field: &str) -> u64 {
    rss_kb(pid, field).unwrap_or(0)
}

/// The rows for each count in `counts` (ascending); the per-certificate
/// figure is the growth over the smallest run, so the process's fixed cost
/// is left out. With three counts or more, the growth curve is written to
/// `docs/scale-growth.svg`.
pub fn run(rows: &mut Vec<Row>, agent_bin: &Path, counts: &[usize]) -> Result<()> {
    let mut starts = Vec::new();
    for &count in counts {
        eprintln!("[bench] scale: {count} certificates");
        let s = start(agent_bin, count)?;
        eprintln!(
            "[bench] scale: {count}: served in {:.2} s, RSS {} kB",
            s.served.as_secs_f64(),
            s.rss_kb
        );
        starts.push(s);
    }
    for s in &starts {
        rows.push(row(s, &starts[0]));
    }
    if starts.len() >= 3 {
        let path = acme_tests::workspace_root().join("docs/scale-growth.svg");
        std::fs::write(&path, plot(&starts))?;
        eprintln!("[bench] scale: wrote {}", path.display());
    }
    Ok(())
}

fn row(s: &Start, base: &Start) -> Row {
    let per_cert = if s.count > base.count {
        let kb = s.rss_kb.saturating_sub(base.rss_kb) as f64 / (s.count - base.count) as f64;
        format!("{kb:.1} KB per certificate beyond the first run's")
    } else {
        "the base of the per-certificate figures".to_owned()
    };
    Row {
        what: format!(
            "Scale: {} stored certificates, start to all served over SDS",
            s.count
        ),
        result: format!(
            "{:.2} s; agent RSS {:.0} MB (peak {:.0} MB), {per_cert}",
            s.served.as_secs_f64(),
            s.rss_kb as f64 / 1024.0,
            s.hwm_kb as f64 / 1024.0,
        ),
        note: format!(
            "local CA (rcgen), P-256, one name each, {} B of PEM per certificate (store generated in {:.0} s; 0: cached); one delta SDS stream asks for all; `status` {:.2} s, {} KB of output; /metrics {} series ({} with a certificate label), {} KB",
            s.pem_bytes,
            s.generated_s,
            s.status.as_secs_f64(),
            s.status_bytes / 1024,
            s.metrics.total,
            s.metrics.per_certificate,
            s.metrics.bytes / 1024
        ),
    }
}

/// The growth curve as SVG: start -> all served (s) and agent RSS (MB)
/// against the certificate count, both axes logarithmic, one panel each.
fn plot(starts: &[Start]) -> String {
    let served: Vec<(f64, f64)> = starts
        .iter()
        .map(|s| (s.count as f64, s.served.as_secs_f64()))
        .collect();
    let rss: Vec<(f64, f64)> = starts
        .iter()
        .map(|s| (s.count as f64, s.rss_kb as f64 / 1024.0))
        .collect();
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"320\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"760\" height=\"320\" fill=\"white\"/>\n{}{}</svg>\n",
        panel(
            20.0,
            "agent start -> all served over SDS (s)",
            &served,
            "#1f77b4"
        ),
        panel(400.0, "agent RSS with all served (MB)", &rss, "#d62728"),
    )
}

/// One log-log panel at x offset `left`: decade grid lines, the points
/// joined, each labelled with its value.
fn panel(left: f64, title: &str, points: &[(f64, f64)], colour: &str) -> String {
    let (w, h, top) = (320.0, 220.0, 40.0);
    let decades = |lo: f64, hi: f64| {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    };
    let (x0, x1) = decades(
        points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min),
        points.iter().map(|p| p.0).fold(0.0, f64::max),
    );
    let (y0, y1) = decades(
        points
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
            .max(1e-3),
        points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3),
    );
    let px = |x: f64| left + 40.0 + (x.log10() - x0) / (x1 - x0) * w;
    let py = |y: f64| top + h - (y.max(1e-3).log10() - y0) / (y1 - y0) * h;
    let mut out = format!(
        "<text x=\"{}\" y=\"20\" font-size=\"13\">{title}</text>\n",
        left + 40.0
    );
    for d in (x0 as i32)..=(x1 as i32) {
        let x = px(10f64.powi(d));
        out.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            top + h,
            top + h + 15.0,
            thousands(10f64.powi(d))
        ));
    }
    for d in (y0 as i32)..=(y1 as i32) {
        let y = py(10f64.powi(d));
        out.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left + 40.0,
            left + 40.0 + w,
            left + 36.0,
            y + 4.0,
            10f64.powi(d)
        ));
    }
    let line: Vec<String> = points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    out.push_str(&format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>\n",
        line.join(" ")
    ));
    for &(x, y) in points {
        out.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            px(x),
            py(y),
            px(x) + 6.0,
            py(y) - 6.0,
            if y < 10.0 {
                format!("{y:.2}")
            } else {
                format!("{y:.0}")
            }
        ));
    }
    out.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">certificates (log scale)</text>\n",
        left + 40.0 + w / 2.0,
        top + h + 32.0
    ));
    out
}

/// 1000 -> "1,000".
fn thousands(n: f64) -> String {
    let digits = format!("{n:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
