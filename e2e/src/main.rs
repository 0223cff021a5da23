//! `servicekeel-e2e`: a local real cluster with ServiceKeel. `up` starts it (and builds the
//! Kubernetes binaries on first use), `demo` adds the demo workload and shows it working,
//! `status` says what runs, `down` stops it and cleans up.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use servicekeel_e2e::cluster::{LocalCluster, NodeCluster, State};
use servicekeel_e2e::images::Profile;
use servicekeel_e2e::process::Lifetime;
use servicekeel_e2e::{demo, paths};
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
    /// Start the control plane and a real node (kubelet, containerd) with ServiceKeel installed
    /// from manifests/; print the KUBECONFIG to use.
    Up {
        /// Only etcd, kube-apiserver and the webhook as a process beside them (no root needed,
        /// pods are stored but never run).
        #[arg(long)]
        control_plane_only: bool,
        /// Build the node's images optimised, as the benchmarks do (slower to build; without
        /// it they are debug builds).
        #[arg(long, conflicts_with = "control_plane_only")]
        release: bool,
    },
    /// Bring the cluster up if needed, install the demo workload of manifests/examples/, and
    /// show a client pod reaching the echo service through ServiceKeel.
    Demo {
        /// Build the node's images optimised, as `up --release` does.
        #[arg(long)]
        release: bool,
    },
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
        .with_ansi(servicekeel_api::logs::colour(&std::io::stderr()))
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
        Command::Up {
            control_plane_only,
            release,
        } => {
            let state = up(&dir, !control_plane_only, release).await?;
            print_export(&state);
            Ok(())
        }
        Command::Demo { release } => demo(&dir, release).await,
        Command::Status => status(&dir),
        Command::Down => down(&dir),
    }
}

/// Starts the cluster, with a node and its images built for release if asked, unless one of that
/// kind runs already ([`State::is_kind`]).
async fn up(dir: &std::path::Path, with_node: bool, release: bool) -> anyhow::Result<State> {
    if let Some(state) = State::load(dir)? {
        if state.all_running() && state.is_kind(with_node, release) {
            tracing::info!("already up");
            return Ok(state);
        }
        tracing::info!(
            "a previous cluster is partly running or of another kind; stopping it first"
        );
        state.stop_all(dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clean {}", dir.display()))?;
    }
    // Ctrl-C while starting stops what was started: the processes are dropped with the future.
    let profile = if release {
        Profile::Release
    } else {
        Profile::Debug
    };
    let state = if with_node {
        let cluster = tokio::select! {
            cluster = NodeCluster::start_with(dir, Lifetime::Detached, profile) => cluster?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; everything started was stopped"),
        };
        cluster.detach()?
    } else {
        let cluster = tokio::select! {
            cluster = LocalCluster::start(dir, Lifetime::Detached) => cluster?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; everything started was stopped"),
        };
        cluster.detach()?
    };
    let running: Vec<&str> = state.processes.iter().map(|c| c.name.as_str()).collect();
    tracing::info!(dir = %dir.display(), "up: {} running", running.join(", "));
    Ok(state)
}

async fn demo(dir: &std::path::Path, release: bool) -> anyhow::Result<()> {
    let state = up(dir, true, release).await?;
    tracing::info!("installing the demo workload of manifests/examples/");
    demo::install(&state.kubeconfig)?;
    let client = servicekeel_e2e::control_plane::client(&state.kubeconfig).await?;
    let report = demo::show(&state.kubeconfig, &client).await?;
    let words = format!("\n{report}\n\n{}\n", demo::closing_words(&state.kubeconfig));
    std::io::Write::write_all(&mut std::io::stdout(), words.as_bytes())?;
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
        let left = servicekeel_e2e::node::leftovers(dir);
        if !left.is_empty() {
            tracing::warn!(
                "left on this host by a node that was not stopped (`down` removes it):\n  {}",
                left.join("\n  ")
            );
        }
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
    if state.node {
        let build = if state.release { "release" } else { "debug" };
        report.push_str(&format!("images {build} builds\n"));
    }
    report.push_str(&format!(
        "apiserver {}\nexport KUBECONFIG={}\n",
        state.server,
        state.kubeconfig.display()
    ));
    std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes())?;
    Ok(())
}

fn down(dir: &std::path::Path) -> anyhow::Result<()> {
    if let Some(state) = State::load(dir)? {
        for (name, was_running) in state.stop_all(dir) {
            tracing::info!(component = %name, stopped = was_running, "down");
        }
    }
    let left = servicekeel_e2e::node::release(dir);
    if !left.is_empty() {
        anyhow::bail!(
            "down: could not remove everything of the node:\n  {}",
            left.join("\n  ")
        );
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    tracing::info!(dir = %dir.display(), "down: nothing runs, state removed");
    Ok(())
}
