//! Command line: `serve` runs the HTTPS webhook, `inject` is the offline injector. Every `serve`
//! flag can also be set through the environment variable named in its help.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use servicekeel_api::duration::parse_duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::caches::Caches;
use crate::certificates::{Manager, Settings};
use crate::config::Config;
use crate::leader::{self, Leadership};
use crate::metrics::Metrics;
use crate::offline::inject_documents;
use crate::reconcile;
use crate::server::{self, AppState};
use crate::tls::CertReloader;
use crate::view::{ClusterView, NoCluster};

#[derive(Debug, Parser)]
#[command(
    name = "servicekeel-webhook",
    version,
    about = "ServiceKeel's sidecar injection webhook"
)]
pub struct Cli {
    /// Log output: human-readable text or one JSON object per line. Levels come from RUST_LOG.
    #[arg(long, env = "SERVICEKEEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CertificateMode {
    Managed,
    Files,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the admission webhook over HTTPS.
    Serve(Box<ServeArgs>),
    /// Inject the sidecar into Pods and workload templates in YAML, offline.
    Inject(InjectArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SERVICEKEEL_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// `managed`: the webhook keeps its own CA and serving certificate in a Secret, writes the
    /// pair to the two files below and fills `caBundle`. `files`: the two files are provided
    /// (by cert-manager, certs/generate.sh, ...).
    #[arg(long, env = "SERVICEKEEL_CERTIFICATE_MODE", value_enum, default_value_t = CertificateMode::Managed)]
    pub certificate_mode: CertificateMode,
    /// PEM certificate chain served; reloaded when the file changes.
    #[arg(
        long,
        env = "SERVICEKEEL_TLS_CERT_FILE",
        default_value = "/etc/servicekeel/tls/tls.crt"
    )]
    pub tls_cert_file: PathBuf,
    /// PEM private key of the certificate; reloaded when the file changes.
    #[arg(
        long,
        env = "SERVICEKEEL_TLS_KEY_FILE",
        default_value = "/etc/servicekeel/tls/tls.key"
    )]
    pub tls_key_file: PathBuf,
    /// The webhook's Service, whose DNS names the managed certificate carries.
    #[arg(
        long,
        env = "SERVICEKEEL_SERVICE_NAME",
        default_value = "servicekeel-webhook"
    )]
    pub service_name: String,
    /// Secret holding the managed CA and certificate, in --namespace.
    #[arg(
        long,
        env = "SERVICEKEEL_CERTIFICATE_SECRET",
        default_value = "servicekeel-webhook-tls"
    )]
    pub certificate_secret: String,
    /// MutatingWebhookConfiguration whose caBundle the managed CA goes into.
    #[arg(
        long,
        env = "SERVICEKEEL_WEBHOOK_CONFIGURATION",
        default_value = "servicekeel-sidecar-injector"
    )]
    pub webhook_configuration: String,
    /// Lifetime of a managed serving certificate; it is renewed after two thirds of it.
    #[arg(long, env = "SERVICEKEEL_CERTIFICATE_LIFETIME", default_value = "8760h", value_parser = parse_duration)]
    pub certificate_lifetime: Duration,
    /// More names (DNS names or IP addresses) for the managed certificate, comma-separated.
    #[arg(
        long,
        env = "SERVICEKEEL_CERTIFICATE_EXTRA_NAMES",
        value_delimiter = ','
    )]
    pub certificate_extra_names: Vec<String>,
    /// Config file (YAML); without it every field has its default.
    #[arg(long, env = "SERVICEKEEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "SERVICEKEEL_TLS_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// Kubeconfig for the API server; without it the in-cluster config (or the usual
    /// kubeconfig lookup) is used. With no API server at all, exports and namespace defaults
    /// are not computed.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The webhook's own namespace: its leader Lease and certificate Secret live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "servicekeel-system")]
    pub namespace: String,
    /// This replica's name in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "SERVICEKEEL_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// YAML to read (multi-document), or `-` for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: String,
    /// Config file (YAML); without it every field has its default.
    #[arg(long, env = "SERVICEKEEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Namespace for objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Where to write the injected YAML; standard output by default.
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(serve(*args)),
        Command::Inject(args) => inject(args),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Arc::new(load_config(args.config.as_ref())?);
    tracing::info!(
        config = %serde_json::to_string(&*config).unwrap_or_default(),
        listen = %args.listen,
        "effective config"
    );
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    let client = api_client(args.kubeconfig.as_deref()).await;
    let manager = match (args.certificate_mode, &client) {
        (CertificateMode::Files, _) => None,
        (CertificateMode::Managed, Ok(client)) => {
            let manager = Manager::new(client.clone(), certificate_settings(&args));
            tracing::info!(secret = %args.certificate_secret, "ensuring the serving certificate");
            manager.ensure_until_ready().await;
            Some(manager)
        }
        (CertificateMode::Managed, Err(error)) => anyhow::bail!(
            "--certificate-mode=managed needs the Kubernetes API ({error:#}); give --kubeconfig, \
             or serve your own certificate with --certificate-mode=files"
        ),
    };
    let reloader = CertReloader::load(&args.tls_cert_file, &args.tls_key_file)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    if let Some(manager) = manager {
        tokio::spawn(manager.run(reloader.clone(), metrics.clone(), stopped.clone()));
    }
    let mut leader_task = None;
    let view: Arc<dyn ClusterView> = match client {
        Ok(client) => {
            let (caches, service_events) = Caches::start(&client);
            let leadership = Leadership::default();
            let identity = args
                .identity
                .clone()
                .unwrap_or_else(|| format!("servicekeel-webhook-{}", std::process::id()));
            leader_task = Some(tokio::spawn(leader::run(
                client.clone(),
                args.namespace.clone(),
                leader::LEASE_NAME.into(),
                identity,
                leadership.clone(),
                stopped.clone(),
            )));
            tokio::spawn(reconcile::run(
                client,
                caches.clone(),
                service_events,
                config.clone(),
                leadership,
                stopped.clone(),
            ));
            Arc::new(caches)
        }
        Err(error) => {
            tracing::warn!(
                %error,
                "no Kubernetes API: exports and namespace defaults are not computed"
            );
            Arc::new(NoCluster)
        }
    };
    let state = AppState::new(config, metrics.clone(), view);

    tokio::spawn(server::reload_certificates(
        reloader.clone(),
        args.tls_reload_interval,
        metrics,
        stopped.clone(),
    ));
    let signal_state = state.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        signal_state.set_ready(false);
        let _ = stop.send(true);
    });
    tracing::info!(addr = %args.listen, "serving");
    server::serve(
        listener,
        reloader.server_config(),
        server::app(state),
        stopped,
        args.drain_timeout,
    )
    .await;
    // Hand the lease over before exiting, so another replica writes without waiting it out.
    if let Some(task) = leader_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}

fn certificate_settings(args: &ServeArgs) -> Settings {
    Settings {
        namespace: args.namespace.clone(),
        secret: args.certificate_secret.clone(),
        service: args.service_name.clone(),
        webhook_configuration: args.webhook_configuration.clone(),
        lifetime: args.certificate_lifetime,
        extra_names: args.certificate_extra_names.clone(),
        cert_file: args.tls_cert_file.clone(),
        key_file: args.tls_key_file.clone(),
    }
}

async fn api_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail in a running runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_ref())?;
    let mut input = String::new();
    if args.file == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("cannot read standard input")?;
    } else {
        input = std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file))?;
    }
    let output = inject_documents(&input, &args.namespace, &config)?;
    for note in &output.notes {
        tracing::info!(document = note.document, object = %note.object, "{}", note.outcome);
    }
    match &args.output {
        Some(path) => std::fs::write(path, &output.yaml)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout()
            .write_all(output.yaml.as_bytes())
            .context("cannot write standard output")?,
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
}
