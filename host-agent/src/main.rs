//! `acme-agent`: the binary's edge. Parses the command line, loads the config
//! (exit 64 on a bad one), runs the agent's tasks until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use acme_agent::acme::issuer::AcmeIssuer;
use acme_agent::api::{self, ApiState};
use acme_agent::challenges::ChallengeSet;
use acme_agent::config::Config;
use acme_agent::control;
use acme_agent::disk::sink::FileSink;
use acme_agent::disk::store::FileStore;
use acme_agent::kubernetes::KubeStore;
use acme_agent::kubernetes::events::KubeEvents;
use acme_agent::manager::Manager;
use acme_agent::metrics::Metrics;
use acme_agent::ports::events::{Events, NoEvents};
use acme_agent::ports::requests::Request;
use acme_agent::ports::secrets::SecretSet;
use acme_agent::ports::sink::{CertificateSink, Sinks};
use acme_agent::ports::solver::{Solver, Solvers};
use acme_agent::ports::store::StateStore;
use acme_agent::sds::SdsSink;
use acme_agent::solvers::dns::{Dns, Dns01};
use acme_agent::solvers::http01::Http01;
use acme_agent::solvers::tls_alpn01::TlsAlpn01;
use acme_agent::status;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// EX_USAGE: the configuration is wrong, retrying will not help.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "ACME agent for Envoy: orders certificates, feeds the challenge filter, writes SDS secrets"
)]
struct Cli {
    /// Path of the agent's TOML configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/acme-agent/agent.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: challenge API, orders, renewals, SDS output. Reloads the
    /// config file when it changes and on SIGHUP; stops on SIGTERM or SIGINT.
    Run,
    /// Check the configuration file and exit (0 when valid, 64 when not).
    CheckConfig,
    /// Print every certificate's state, domains, expiry, next renewal and last
    /// error, read from the stored state, and a summary line counting each state.
    Status {
        /// Only certificates in this state (repeatable): expired, waiting,
        /// failing, not-issued, due, valid.
        #[arg(long)]
        state: Vec<status::State>,
        /// Only certificates whose name matches this pattern (`*`, `?`, `[...]`).
        #[arg(long, value_parser = status::Query::name_pattern)]
        name: Option<glob::Pattern>,
        /// One JSON document: the summary and the certificates shown.
        #[arg(long)]
        json: bool,
        /// Only the summary line.
        #[arg(long, conflicts_with = "json")]
        summary: bool,
    },
    /// Ask the running agent to order a new certificate for NAME now, whatever
    /// its schedule (through the challenge API, with its token).
    Renew {
        /// The certificate's `name` in the config.
        name: String,
    },
}

fn main() -> ExitCode {
    // The process holds private keys: no core dump, and no other process of
    // the same user may ptrace it or read its memory through /proc.
    let undumpable =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour for a person at a terminal, none in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = undumpable {
        warn!("could not make the process non-dumpable: {e}");
    }
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            error!("{e}");
            eprintln!("acme-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::CheckConfig => {
            println!(
                "{}: ok ({} certificates)",
                cli.config.display(),
                config.certificates.len()
            );
            if config.kubernetes.is_some() {
                println!(
                    "Secrets the agent reads and writes (a Role's resourceNames): {}",
                    acme_agent::kubernetes::secret_names(&config).join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Command::Status {
            state,
            name,
            json,
            summary,
        } => match status_report(
            &config,
            &status::Query {
                states: state,
                name,
            },
        ) {
            Ok(report) => {
                if json {
                    println!("{}", report.json());
                } else if summary {
                    println!("{}", report.summary());
                } else {
                    print!("{}", report.table());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("acme-agent: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Renew { name } => match renew(&config, &name) {
            Ok(message) => {
                print!("{message}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("acme-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run => match run(cli.config, config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A runtime for a subcommand that makes a few calls and exits.
fn one_shot_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Asks the running agent to renew `name` (the `renew` subcommand).
fn renew(config: &Config, name: &str) -> anyhow::Result<String> {
    let runtime = one_shot_runtime()?;
    Ok(runtime.block_on(control::renew(&config.challenge_api, name))?)
}

/// The `status` report, from the state directory or (Kubernetes mode) the
/// agent's Secrets.
fn status_report(config: &Config, query: &status::Query) -> anyhow::Result<status::Report> {
    let runtime = one_shot_runtime()?;
    if let Some(k8s) = &config.kubernetes {
        let client = runtime
            .block_on(kube::Client::try_default())
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let store = KubeStore::new(client, &k8s.namespace);
        return Ok(runtime.block_on(status::report(config, &store, query))?);
    }
    let state_dir = config.state_dir.as_ref().context("state_dir is not set")?;
    let store = FileStore::existing(state_dir);
    Ok(runtime.block_on(status::report(config, &store, query))?)
}

/// Where state and certificates go: files, or Secrets in Kubernetes mode;
/// and where Events go (Kubernetes mode only).
struct Backends {
    store: Arc<dyn StateStore>,
    sink: Arc<dyn CertificateSink>,
    events: Arc<dyn Events>,
    client: Option<kube::Client>,
}

async fn backends(config: &Config, secrets: Option<Arc<SecretSet>>) -> anyhow::Result<Backends> {
    let (store, sink, events, client) = storage(config).await?;
    let Some(secrets) = secrets else {
        // Config validation requires sds_dir (or [kubernetes]) without [sds].
        let sink = sink.context("sds_dir is required without [sds]")?;
        return Ok(Backends {
            store,
            sink,
            events,
            client,
        });
    };
    let sds: Arc<dyn CertificateSink> = Arc::new(SdsSink::new(secrets));
    let sinks: Vec<Arc<dyn CertificateSink>> = match sink {
        Some(sink) => vec![sink, sds],
        None => vec![sds],
    };
    Ok(Backends {
        store,
        sink: Arc::new(Sinks(sinks)),
        events,
        client,
    })
}

/// The state store, the sink that goes with it (none when files are not
/// wanted: `[sds]` without `sds_dir`), the Events, and the Kubernetes client.
async fn storage(
    config: &Config,
) -> anyhow::Result<(
    Arc<dyn StateStore>,
    Option<Arc<dyn CertificateSink>>,
    Arc<dyn Events>,
    Option<kube::Client>,
)> {
    if let Some(k8s) = &config.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let events = Arc::new(KubeEvents::start(client.clone(), &k8s.namespace));
        let store = Arc::new(KubeStore::new(client.clone(), &k8s.namespace));
        info!(
            namespace = k8s.namespace,
            "Kubernetes mode: certificates and state in Secrets, Events on them"
        );
        return Ok((
            Arc::clone(&store) as Arc<dyn StateStore>,
            Some(store),
            events,
            Some(client),
        ));
    }
    let Some(state_dir) = &config.state_dir else {
        anyhow::bail!("state_dir is required without [kubernetes]");
    };
    let sink = match &config.sds_dir {
        Some(dir) => Some(Arc::new(FileSink::new(dir)?) as Arc<dyn CertificateSink>),
        None => None,
    };
    Ok((
        Arc::new(FileStore::open(state_dir)?),
        sink,
        Arc::new(NoEvents),
        None,
    ))
}

/// Runs the agent until SIGTERM or SIGINT (or, with leader election, the
/// loss of the Lease): binds the front doors, starts the SDS server, Gateway
/// discovery and the manager, then stops them all in turn.
#[tokio::main]
async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let secrets = config.sds.as_ref().map(|_| Arc::new(SecretSet::new()));
    let alpn = config.sds.as_ref().map(|_| Arc::new(SecretSet::new()));
    let Backends {
        store,
        sink,
        events,
        client,
    } = backends(&config, secrets.clone()).await?;
    let metrics = Arc::new(Metrics::new());
    let challenges = Arc::new(ChallengeSet::new());
    let (requests_tx, requests_rx) = mpsc::channel(16);
    let doors = bind_front_doors(&config, &challenges, &metrics, &requests_tx)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let sds = spawn_sds(
        &config,
        secrets,
        alpn.clone(),
        &metrics,
        &requests_tx,
        &stop_rx,
    )?;
    let elector = elector(&config, client.as_ref());
    let issuer = Arc::new(AcmeIssuer::new(
        &config.acme,
        Arc::clone(&store),
        Arc::clone(&metrics),
    )?);
    let (config_rx, file_tx) = spawn_discovery(config, client, &events, &stop_rx);
    let (solvers, dns) = solvers(&store, challenges, alpn);
    let mut manager = Manager::new(
        config_rx,
        store,
        sink,
        metrics,
        requests_rx,
        solvers,
        issuer,
    )
    .with_events(events);
    let (lost_tx, lost_rx) = watch::channel(false);
    let lost = lost_tx.subscribe();
    let (state, api) = serve_front_doors(doors, lost_rx, stop_tx.clone());
    if let Some(elector) = elector {
        if !lead(&elector, lost_tx, &stop_rx).await {
            let _ = stop_tx.send(true);
            api.await??;
            return Ok(());
        }
        manager = manager.with_leader(elector);
    }
    // Only the replica that orders sweeps leftover dns-01 records: another
    // would delete the records of the holder's order in flight.
    tokio::spawn(dns.sweep_until(stop_rx.clone()));
    let manager = tokio::spawn(manager.run(stop_rx.clone()));
    let reloader = tokio::spawn(watch_config(path, file_tx, stop_rx.clone()));
    state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    api.await??;
    stop_the_rest(manager, reloader, sds).await;
    if *lost.borrow() {
        anyhow::bail!("lost the Lease");
    }
    info!("stopped");
    Ok(())
}

/// The challenge API, with its state, and the probes' listener: bound, not
/// yet served.
struct FrontDoors {
    state: Arc<ApiState>,
    listener: api::Listener,
    health: tokio::net::TcpListener,
}

/// Binds the challenge API and the probes' port before anything starts, so
/// a port already taken fails the start.
fn bind_front_doors(
    config: &Config,
    challenges: &Arc<ChallengeSet>,
    metrics: &Arc<Metrics>,
    requests: &mpsc::Sender<Request>,
) -> anyhow::Result<FrontDoors> {
    let state = ApiState::with_parts(
        Arc::clone(challenges),
        config.challenge_api.token.clone(),
        Arc::clone(metrics),
        Some(requests.clone()),
        &config.challenge_api,
    );
    let listener = api::bind(&config.challenge_api)?;
    info!(listen = %config.challenge_api.listen, "challenge API listening");
    if matches!(
        config.challenge_api.listen,
        acme_agent::config::Listen::Tcp(_)
    ) && config.challenge_api.token.is_none()
    {
        warn!(
            "the challenge API listens on TCP without a token: any local process can read the pending challenges, and one that takes the port while the agent is down can answer the filters; set challenge_api.token_file or listen on unix:/path"
        );
    }
    let health = acme_agent::net::bind_tcp(config.health.listen)
        .with_context(|| format!("binding health.listen {}", config.health.listen))?;
    info!(address = %config.health.listen, "probes and metrics listening");
    Ok(FrontDoors {
        state,
        listener,
        health,
    })
}

/// Serves the probes and metrics from the start, and the challenge API
/// until SIGTERM or SIGINT or the loss of the Lease (`lost`), then tells
/// every task to stop. A replica that must hold the Lease stays not-ready
/// (so the gateways' long-polls go to the holder) until it does.
fn serve_front_doors(
    doors: FrontDoors,
    mut lost: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
) -> (Arc<ApiState>, JoinHandle<std::io::Result<()>>) {
    let FrontDoors {
        state,
        listener,
        health,
    } = doors;
    tokio::spawn(api::serve_health(health, Arc::clone(&state)));
    let api = tokio::spawn(api::serve(listener, Arc::clone(&state), async move {
        tokio::select! {
            () = shutdown_signal() => {}
            _ = lost.wait_for(|lost| *lost) => error!("lost the Lease: stopping (the pod restarts as a follower)"),
        }
        stop.send_replace(true);
    }));
    (state, api)
}

/// The SDS server, when `[sds]` is set: it serves the issued certificates
/// (`secrets`) and the tls-alpn-01 ones (`alpn`), and with on-demand TLS its
/// gate asks the manager for a certificate a handshake names.
fn spawn_sds(
    config: &Config,
    secrets: Option<Arc<SecretSet>>,
    alpn: Option<Arc<SecretSet>>,
    metrics: &Arc<Metrics>,
    requests: &mpsc::Sender<Request>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Option<JoinHandle<Result<(), acme_agent::Error>>>> {
    let (Some(sds), Some(secrets)) = (&config.sds, secrets) else {
        return Ok(None);
    };
    let listener = acme_agent::sds::Listener::bind(sds)?;
    let refused_metrics = Arc::clone(metrics);
    let refused: Arc<dyn Fn() + Send + Sync> =
        Arc::new(move || refused_metrics.refused("sds", "peer"));
    let mut stop = stop.clone();
    let gate = config.on_demand.as_ref().map(|od| {
        Arc::new(acme_agent::on_demand::Handle(
            acme_agent::on_demand::OnDemandGate::new(
                od.clone(),
                requests.clone(),
                Arc::clone(&secrets),
            ),
        )) as Arc<dyn acme_agent::ports::secrets::Gate>
    });
    Ok(Some(tokio::spawn(acme_agent::sds::serve(
        listener,
        secrets,
        alpn.unwrap_or_default(),
        gate,
        refused,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ))))
}

/// This replica's Lease, when leader election is configured (Kubernetes
/// mode only).
fn elector(
    config: &Config,
    client: Option<&kube::Client>,
) -> Option<Arc<acme_agent::kubernetes::lease::Elector>> {
    let k8s = config.kubernetes.as_ref()?;
    let election = k8s.leader_election.as_ref()?;
    Some(Arc::new(acme_agent::kubernetes::lease::Elector::new(
        client?.clone(),
        &k8s.namespace,
        &election.lease,
        &identity(),
        Duration::from_secs(election.duration_seconds),
    )))
}

/// Waits until this replica holds the Lease, then keeps it in the
/// background, flagging `lost` when it goes; false when the agent stops
/// first.
async fn lead(
    elector: &Arc<acme_agent::kubernetes::lease::Elector>,
    lost: watch::Sender<bool>,
    stop: &watch::Receiver<bool>,
) -> bool {
    let mut waiting = stop.clone();
    if !hold_lease(elector, &mut waiting).await {
        return false;
    }
    tokio::spawn(keep_lease(Arc::clone(elector), lost, stop.clone()));
    true
}

/// The config the manager follows, and where the reloaded file goes. With
/// Gateway discovery the file's config goes through it and comes out with
/// the derived certificates added; without, it goes straight to the manager.
fn spawn_discovery(
    config: Config,
    client: Option<kube::Client>,
    events: &Arc<dyn Events>,
    stop: &watch::Receiver<bool>,
) -> (watch::Receiver<Arc<Config>>, watch::Sender<Arc<Config>>) {
    let discovery = config
        .kubernetes
        .as_ref()
        .and_then(|k| k.gateways.as_ref())
        .map(|g| g.namespaces.clone())
        .zip(client);
    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    let Some((namespaces, client)) = discovery else {
        return (config_rx, config_tx);
    };
    let (file_tx, file_rx) = watch::channel(Arc::new(config));
    tokio::spawn(acme_agent::kubernetes::discovery::run(
        client,
        namespaces,
        file_rx,
        config_tx,
        Arc::clone(events),
        stop.clone(),
    ));
    (config_rx, file_tx)
}

/// Once the API has stopped: the manager (bounded: it only aborts its jobs
/// and waits for them to unwind), the config reloader, the SDS server.
async fn stop_the_rest(
    manager: JoinHandle<()>,
    reloader: JoinHandle<()>,
    sds: Option<JoinHandle<Result<(), acme_agent::Error>>>,
) {
    if tokio::time::timeout(Duration::from_secs(10), manager)
        .await
        .is_err()
    {
        error!("certificate manager did not stop within 10 s");
    }
    reloader.abort();
    if let Some(sds) = sds
        && let Ok(Err(e)) = sds.await
    {
        error!("{e}");
    }
}

/// The solver of each kind of challenge: HTTP-01 through the filters'
/// challenge set, tls-alpn-01 through the SDS server (with `[sds]`), dns-01
/// through RFC 2136; and the dns-01 records' journal, to sweep.
fn solvers(
    store: &Arc<dyn StateStore>,
    challenges: Arc<ChallengeSet>,
    alpn: Option<Arc<SecretSet>>,
) -> (Solvers, Arc<Dns>) {
    let dns = Arc::new(Dns::new(Arc::clone(store)));
    let solvers = Solvers {
        http01: Some(Arc::new(Http01::new(challenges))),
        tls_alpn01: alpn.map(|set| Arc::new(TlsAlpn01::new(set)) as Arc<dyn Solver>),
        dns01: Some(Arc::new(Dns01(Arc::clone(&dns)))),
    };
    (solvers, dns)
}

/// This replica's name in the Lease: the pod's name (POD_NAME, from the
/// downward API), else the host's, with the process id.
fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "acme-agent".into());
    format!("{host}-{}", std::process::id())
}

/// Waits (not ready) until this replica holds the Lease; false on shutdown.
async fn hold_lease(
    elector: &acme_agent::kubernetes::lease::Elector,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let retry = elector.duration() / 5;
    info!(
        identity = elector.identity(),
        "waiting for the Lease (this replica orders only while it holds it)"
    );
    loop {
        match elector.acquire_or_renew().await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => warn!("{e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// Renews the Lease a few times per duration; flags `lost` once it is not
/// ours any more (another replica took it, or no renewal succeeded within
/// the duration).
async fn keep_lease(
    elector: Arc<acme_agent::kubernetes::lease::Elector>,
    lost: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let every = elector.duration() / 3;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let holds = match elector.acquire_or_renew().await {
            Ok(holds) => holds,
            Err(e) => {
                warn!("renewing the Lease: {e}");
                elector.holds_locally()
            }
        };
        if !holds || !elector.holds_locally() {
            lost.send_replace(true);
            return;
        }
    }
}

/// How often the config file is compared with the running config. Polling,
/// not inotify: a Kubernetes ConfigMap volume swaps a symlink, which a watch
/// on the file itself never sees.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// Reloads the config when the file's content changes or on SIGHUP. A file
/// that does not parse is reported and the running config kept.
async fn watch_config(
    path: PathBuf,
    config: watch::Sender<Arc<Config>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    if hup.is_none() {
        warn!("cannot watch SIGHUP; config changes are still picked up every {CONFIG_POLL:?}");
    }
    let mut last = std::fs::read(&path).ok();
    loop {
        let forced = tokio::select! {
            () = tokio::time::sleep(CONFIG_POLL) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stop.wait_for(|s| *s) => return,
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                if forced {
                    error!(
                        "SIGHUP: reading {}: {e}; keeping the running config",
                        path.display()
                    );
                }
                continue;
            }
        };
        if !forced && last.as_ref() == Some(&bytes) {
            continue;
        }
        last = Some(bytes.clone());
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|_| format!("{}: not UTF-8", path.display()))
            .and_then(|text| Config::parse(text, &path).map_err(|e| e.to_string()));
        match parsed {
            Ok(new) => {
                let old = Arc::clone(&config.borrow());
                if *old == new {
                    continue;
                }
                if old.state_dir != new.state_dir
                    || old.sds_dir != new.sds_dir
                    || old.kubernetes != new.kubernetes
                    || old.challenge_api != new.challenge_api
                    || old.sds != new.sds
                {
                    warn!(
                        "changes to state_dir, sds_dir, [kubernetes], [challenge_api] and [sds] take effect after a restart"
                    );
                }
                info!(
                    certificates = new.certificates.len(),
                    "configuration reloaded"
                );
                config.send_replace(Arc::new(new));
            }
            Err(e) => error!("{e}; keeping the running config"),
        }
    }
}
/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}
