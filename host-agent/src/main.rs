//! `acme-agent`: the binary's edge. Parses the command line, loads the config
//! (exit 64 on a bad one), runs the agent's tasks until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use acme_agent::api::{self, ApiState};
use acme_agent::challenges::ChallengeSet;
use acme_agent::config::Config;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::{error, info};

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
    /// Run the agent: challenge API, orders, renewals, SDS output.
    Run,
    /// Check the configuration file and exit (0 when valid, 64 when not).
    CheckConfig,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
            ExitCode::SUCCESS
        }
        Command::Run => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

#[tokio::main]
async fn run(config: Config) -> anyhow::Result<()> {
    let challenges = Arc::new(ChallengeSet::new());
    let state = ApiState::new(Arc::clone(&challenges), config.challenge_api.token.clone());
    let listener = tokio::net::TcpListener::bind(config.challenge_api.listen)
        .await
        .with_context(|| {
            format!(
                "binding the challenge API to {}",
                config.challenge_api.listen
            )
        })?;
    info!(address = %listener.local_addr()?, "challenge API listening");
    state.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    api::serve(listener, state, shutdown_signal()).await?;
    info!("stopped");
    Ok(())
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
