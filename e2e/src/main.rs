//! `servicekeel-e2e`: a local real cluster with ServiceKeel. `up` starts it (and builds the
//! Kubernetes binaries on first use), `status` says what runs, `down` stops it and cleans up.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use servicekeel_e2e::cluster::{LocalCluster, State};
use servicekeel_e2e::paths;
use servicekeel_e2e::process::Lifetime;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "servicekeel-e2e",
    version,
    about = "A local Kubernetes control plane with ServiceKeel"
)]
struct Cli {
    /// Where the cluster keeps its state (default: <cache>/cluster).
    #[arg(long, env = "SERVICEKEEL_E2E_DIR", global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start etcd, kube-apiserver and the webhook; print the KUBECONFIG to use.
    Up,
    /// Say which components run.
    Status,
    /// Stop everything and remove the cluster's state.
    Down,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = match cli.dir {
        Some(dir) => dir,
        None => paths::cache_dir()?.join("cluster"),
    };
    match cli.command {
        Command::Up => up(&dir).await,
        Command::Status => status(&dir),
        Command::Down => down(&dir),
    }
}

async fn up(dir: &std::path::Path) -> anyhow::Result<()> {
    if let Some(state) = State::load(dir)? {
        if state.all_running() {
            tracing::info!("already up");
            print_export(&state);
            return Ok(());
        }
        tracing::info!("a previous cluster is partly running; stopping it first");
        state.stop_all();
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clean {}", dir.display()))?;
    }
    // Ctrl-C while starting stops what was started: the processes are dropped with the future.
    let cluster = tokio::select! {
        cluster = LocalCluster::start(dir, Lifetime::Detached) => cluster?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; everything started was stopped"),
    };
    let state = cluster.detach()?;
    tracing::info!(dir = %dir.display(), "up: etcd, kube-apiserver and servicekeel-webhook are running");
    print_export(&state);
    Ok(())
}

fn print_export(state: &State) {
    // The one line a shell evaluates: `eval "$(servicekeel-e2e up)"`.
    let line = format!("export KUBECONFIG={}\n", state.kubeconfig.display());
    let _ = std::io::Write::write_all(&mut std::io::stdout(), line.as_bytes());
}

fn status(dir: &std::path::Path) -> anyhow::Result<()> {
    let Some(state) = State::load(dir)? else {
        tracing::info!(dir = %dir.display(), "down: no cluster");
        return Ok(());
    };
    let mut report = String::new();
    for component in &state.processes {
        let running = if component.is_running() {
            "running"
        } else {
            "not running"
        };
        report.push_str(&format!(
            "{:<22} pid {:<8} {running:<12} log {}\n",
            component.name,
            component.pid,
            component.log.display()
        ));
    }
    report.push_str(&format!(
        "apiserver https://127.0.0.1:{}\nexport KUBECONFIG={}\n",
        state.api_port,
        state.kubeconfig.display()
    ));
    std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes())?;
    Ok(())
}

fn down(dir: &std::path::Path) -> anyhow::Result<()> {
    if let Some(state) = State::load(dir)? {
        for (name, was_running) in state.stop_all() {
            tracing::info!(component = %name, stopped = was_running, "down");
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    tracing::info!(dir = %dir.display(), "down: nothing runs, state removed");
    Ok(())
}
