//! `servicekeel-proxy`: the injected sidecar (`sidecar`, configured by its environment) and the
//! per-node router (`router`, configured by flags or their environment variables), with the
//! sidecar's `postStart` hook (`wait`) and the router's init container (`prepare-dirs`).

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;
use servicekeel_proxy::cli::{Cli, Command};
use servicekeel_proxy::config::SidecarConfig;
use servicekeel_proxy::router::Router;
use servicekeel_proxy::scheduling;
use servicekeel_proxy::sidecar::Sidecar;
use tracing_subscriber::EnvFilter;

/// The static builds the images ship link musl, whose allocator gives every large buffer its
/// own mapping and unmaps it when freed: a router relaying between nodes made an `mmap` and a
/// `munmap` per socket read. mimalloc keeps freed memory for reuse; built without transparent
/// huge pages (the workspace's `no_thp`), as with them an idle sidecar held 17 MB instead of 7.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(servicekeel_api::logs::colour(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Sidecar => launch(
            SidecarConfig::from_env().map_err(|e| e.to_string()),
            |config| async move {
                let sidecar = Sidecar::start(config).await.map_err(|e| e.to_string())?;
                terminated().await?;
                tracing::info!("shutting down");
                sidecar.shutdown().await;
                Ok(())
            },
        ),
        Command::Router(args) => {
            let scheduling = args.scheduling;
            launch((*args).into_config(), |config| {
                // Before the runtime and the links start their threads, which inherit it. The
                // router works either way, so a refusal is a warning.
                match scheduling::apply(scheduling) {
                    Ok(()) => tracing::info!(%scheduling, "threads scheduled"),
                    Err(error) => tracing::warn!("{error}; the threads stay as they were"),
                }
                async move {
                    let router = Router::start(config).await.map_err(|e| e.to_string())?;
                    terminated().await?;
                    tracing::info!("shutting down");
                    router.shutdown().await;
                    Ok(())
                }
            })
        }
        Command::Wait(args) => {
            match servicekeel_proxy::wait::until_ready(args.admin_addr, args.timeout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::PrepareDirs(args) => {
            for dir in &args.dirs {
                match servicekeel_proxy::dirs::prepare(dir, args.owner) {
                    Ok(prepared) => tracing::info!(
                        dir = %dir.display(),
                        owner = %args.owner,
                        created = prepared.created,
                        entries = prepared.entries,
                        changed = prepared.changed,
                        "handed over"
                    ),
                    Err(error) => {
                        tracing::error!("{error}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Logs the effective config and runs `main` with it; a bad config fails the process.
fn launch<C: std::fmt::Debug, F: Future<Output = Result<(), String>>>(
    config: Result<C, String>,
    main: impl FnOnce(C) -> F,
) -> ExitCode {
    match config {
        Ok(config) => {
            tracing::info!(?config, "effective config");
            run(main(config))
        }
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `main` on a multi-threaded runtime, whose threads follow `--scheduling auto` where the
/// router runs with it; an error is logged and fails the process.
fn run(main: impl Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_unpark(scheduling::follow)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() -> Result<(), String> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
