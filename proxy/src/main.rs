//! `servicekeel-proxy`: the injected sidecar (`sidecar`, configured by its environment) and the
//! per-node router (`router`, configured by flags or their environment variables).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use servicekeel_api::defaults;
use servicekeel_proxy::config::SidecarConfig;
use servicekeel_proxy::router::peers::Peers;
use servicekeel_proxy::router::{Api, LinksConfig, Router, RouterConfig};
use servicekeel_proxy::sidecar::Sidecar;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "servicekeel-proxy",
    version,
    about = "ServiceKeel's sidecar and node router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar, configured by the SIDECAR_* / SERVICEKEEL_* / POD_* environment.
    Sidecar,
    /// Run the node router.
    Router(Box<RouterArgs>),
}

#[derive(Debug, Args)]
struct RouterArgs {
    /// The Unix socket sidecars connect to.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET", default_value = defaults::ROUTER_SOCKET)]
    socket: PathBuf,
    /// Permission bits of the socket, in octal.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    socket_mode: u32,
    /// Numeric user to own the socket.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET_UID")]
    socket_uid: Option<u32>,
    /// Numeric group to own the socket (the sidecars' group, so mode 660 lets them in).
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET_GID")]
    socket_gid: Option<u32>,
    /// Directory of the registry snapshot.
    #[arg(long, env = "SERVICEKEEL_ROUTER_STATE_DIR", default_value = defaults::ROUTER_STATE_DIR)]
    state_dir: PathBuf,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SERVICEKEEL_ROUTER_ADMIN_ADDR", default_value = defaults::ROUTER_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// This cluster's name.
    #[arg(long, env = "SERVICEKEEL_CLUSTER")]
    cluster: String,
    /// Where peer routers connect (mutual TLS); no links to other routers when unset.
    #[arg(long, env = "SERVICEKEEL_ROUTER_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// This router's certificate chain (PEM), for the identity servicekeel-router.<cluster>.
    #[arg(long, env = "SERVICEKEEL_ROUTER_TLS_CERT", default_value = defaults::ROUTER_TLS_CERT)]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "SERVICEKEEL_ROUTER_TLS_KEY", default_value = defaults::ROUTER_TLS_KEY)]
    tls_key: PathBuf,
    /// The CA bundle of this cluster's routers (PEM).
    #[arg(long, env = "SERVICEKEEL_ROUTER_TLS_CA", default_value = defaults::ROUTER_TLS_CA)]
    tls_ca: PathBuf,
    /// The peers file: other nodes' routers and other clusters' gateways.
    #[arg(long, env = "SERVICEKEEL_ROUTER_PEERS")]
    peers: Option<PathBuf>,
    /// Kubeconfig of the API server to watch; in-cluster config (or $KUBECONFIG) when unset.
    #[arg(long, env = "SERVICEKEEL_ROUTER_KUBECONFIG", conflicts_with = "no_api")]
    kubeconfig: Option<PathBuf>,
    /// Do not watch an API server: route from registrations and the snapshot only.
    #[arg(long, env = "SERVICEKEEL_ROUTER_NO_API")]
    no_api: bool,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not permission bits in octal, like 660"))
}

impl RouterArgs {
    fn into_config(self) -> Result<RouterConfig, String> {
        servicekeel_api::names::check_dns1123_subdomain(&self.cluster)
            .map_err(|m| format!("--cluster {:?}: {m}", self.cluster))?;
        if self.node.is_empty() {
            return Err("--node (NODE_NAME) must not be empty".into());
        }
        let links = match self.peer_listen {
            None => None,
            Some(listen) => Some(LinksConfig {
                listen,
                peers: match &self.peers {
                    Some(path) => Peers::load(path, &self.cluster).map_err(|e| e.to_string())?,
                    None => Peers::default(),
                },
                certificate: self.tls_cert,
                key: self.tls_key,
                ca: self.tls_ca,
            }),
        };
        if links.is_none() && self.peers.is_some() {
            return Err("--peers needs --peer-listen: links are off without it".into());
        }
        let api = match (self.no_api, self.kubeconfig) {
            (true, _) => Api::Off,
            (false, Some(path)) => Api::Kubeconfig(path),
            (false, None) => Api::Infer,
        };
        Ok(RouterConfig {
            api,
            links,
            socket: self.socket,
            socket_mode: self.socket_mode,
            socket_owner: (self.socket_uid.is_some() || self.socket_gid.is_some())
                .then_some((self.socket_uid, self.socket_gid)),
            state_dir: self.state_dir,
            admin_addr: self.admin_addr,
            node: self.node,
            cluster: self.cluster,
        })
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
        Command::Router(args) => launch((*args).into_config(), |config| async move {
            let router = Router::start(config).await.map_err(|e| e.to_string())?;
            terminated().await?;
            tracing::info!("shutting down");
            router.shutdown().await;
            Ok(())
        }),
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

/// Runs `main` on a multi-threaded runtime; an error is logged and fails the process.
fn run(main: impl Future<Output = Result<(), String>>) -> ExitCode {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("1777").is_err());
    }
}
