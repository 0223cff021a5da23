//! `servicekeel-proxy`: the injected sidecar (`sidecar`), configured by its environment.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use servicekeel_proxy::config::SidecarConfig;
use servicekeel_proxy::sidecar::Sidecar;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "servicekeel-proxy", version, about = "ServiceKeel's sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar, configured by the SIDECAR_* / SERVICEKEEL_* / POD_* environment.
    Sidecar,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cli {
        command: Command::Sidecar,
    } = Cli::parse();
    let config = match SidecarConfig::from_env() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(?config, "effective config");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let sidecar = match Sidecar::start(config).await {
            Ok(sidecar) => sidecar,
            Err(error) => {
                tracing::error!("{error}");
                return ExitCode::FAILURE;
            }
        };
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
        sidecar.shutdown().await;
        ExitCode::SUCCESS
    })
}
