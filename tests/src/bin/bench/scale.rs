//! The agent at scale (issue 21): N certificates from a local CA (rcgen; no
//! ACME CA is involved, so Pebble's lock bug past ~8,500 certificates does not
//! apply) written to a state directory, then the release agent started over
//! it. Measured: the time from the agent's start to every certificate
//! received by one delta SDS stream that asked for all of them, the agent's
//! memory once they are, what that is per certificate beyond the PEM itself,
//! and the `status` command at that size.

use std::collections::HashSet;
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

/// Writes `count` certificates into `state` and returns the config's
/// `[[certificate]]` entries and the mean PEM bytes (chain and key) each.
async fn generate(state: &Path, count: usize) -> Result<(String, usize)> {
    let ca = LocalCa::new()?;
    let store = FileStore::open(state)?;
    let mut entries = String::with_capacity(count * 64);
    let mut pem_bytes = 0;
    for i in 0..count {
        let (name, domain) = name_of(i);
        let (chain_pem, key_pem) = ca.leaf(&domain)?;
        pem_bytes += chain_pem.len() + key_pem.len();
        store
            .save_certificate(
                &name,
                &StoredCertificate {
                    domains: vec![domain.clone()],
                    key_type: KeyType::EcdsaP256,
                    chain_pem,
                    key_pem: key_pem.into(),
                },
            )
            .await?;
        entries.push_str(&format!(
            "\n[[certificate]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\n"
        ));
    }
    Ok((entries, pem_bytes / count.max(1)))
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
    served: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    pem_bytes: usize,
    status: Duration,
    status_bytes: usize,
}

fn config(work: &Path, entries: &str) -> Result<(PathBuf, std::net::SocketAddr)> {
    let (api, health) = (free_addr()?, free_addr()?);
    let text = format!(
        "state_dir = {:?}\n\n[acme]\ndirectory = \"https://127.0.0.1:9/dir\"\n\n[sds]\nlisten = \"unix:{}\"\n\n[challenge_api]\nlisten = \"{api}\"\n\n[health]\nlisten = \"{health}\"\n{entries}",
        work.join("state").display().to_string(),
        work.join("run/sds.sock").display(),
    );
    let path = work.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok((path, api))
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (entries, pem_bytes) = runtime.block_on(generate(&work.join("state"), count))?;
    let (config_path, api) = config(work, &entries)?;
    let names: Vec<String> = (0..count).map(|i| name_of(i).1).collect();
    let socket = work.join("run/sds.sock");
    let started = Instant::now();
    let agent = Agent::start_with_binary(agent_bin, &config_path, api, &work.join("agent.log"))?;
    let served = runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(600),
                receive_all(&socket, names, started),
            )
            .await
        })
        .context("every certificate over SDS within 600 s")??;
    let pid = agent.pid().context("the agent's pid")?;
    let rss_kb = rss_kb(pid, "VmRSS:").unwrap_or(0);
    let hwm_kb = rss_kb_or(pid, "VmHWM:");
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
        served,
        rss_kb,
        hwm_kb,
        pem_bytes,
        status,
        status_bytes: out.stdout.len(),
    })
}

fn rss_kb_or(pid: u32, field: &str) -> u64 {
    rss_kb(pid, field).unwrap_or(0)
}

/// The rows for each count in `counts` (ascending); the per-certificate
/// figure is the growth over the smallest run, so the process's fixed cost
/// is left out.
pub fn run(rows: &mut Vec<Row>, agent_bin: &Path, counts: &[usize]) -> Result<()> {
    let mut starts = Vec::new();
    for &count in counts {
        eprintln!("[bench] scale: {count} certificates");
        starts.push(start(agent_bin, count)?);
    }
    let base = &starts[0];
    for s in &starts {
        let per_cert = if s.count > base.count {
            (s.rss_kb.saturating_sub(base.rss_kb)) as f64 * 1024.0 / (s.count - base.count) as f64
        } else {
            f64::NAN
        };
        rows.push(Row {
            what: format!("Scale: {} stored certificates, start to all served over SDS", s.count),
            result: format!(
                "{:.2} s; agent RSS {:.0} MB (peak {:.0} MB), {:.1} KB per certificate beyond the first run's",
                s.served.as_secs_f64(),
                s.rss_kb as f64 / 1024.0,
                s.hwm_kb as f64 / 1024.0,
                per_cert / 1024.0
            ),
            note: format!(
                "local CA (rcgen), P-256, one name each, {} B of PEM per certificate; one delta SDS stream asks for all; `status` {:.2} s, {} KB of output",
                s.pem_bytes,
                s.status.as_secs_f64(),
                s.status_bytes / 1024
            ),
        });
    }
    Ok(())
}
