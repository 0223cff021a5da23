//! The `servicekeel-proxy` command line: `sidecar` (configured by its environment) and `router`
//! (flags, each also read from an environment variable). In the library so the manifests can
//! be checked against it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use servicekeel_api::defaults;

use crate::router::peers::Peers;
use crate::router::{Api, LinksConfig, RouterConfig, SidecarTcp};
use crate::scheduling::Scheduling;

#[derive(Debug, Parser)]
#[command(
    name = "servicekeel-proxy",
    version,
    about = "ServiceKeel's sidecar and node router"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar, configured by the SIDECAR_* / SERVICEKEEL_* / POD_* environment.
    Sidecar,
    /// Run the node router.
    Router(Box<RouterArgs>),
    /// Return once the sidecar beside this process is ready (its `/readyz` answers 200): the
    /// sidecar container's postStart hook, so that the pod's other containers start after it.
    Wait(WaitArgs),
    /// Make the router's host directories when missing and hand each, with the entries in it,
    /// to the router's user and group: the router DaemonSet's init container, which may change
    /// owners so that the router itself runs without root.
    PrepareDirs(PrepareDirsArgs),
}

#[derive(Debug, Args)]
pub struct PrepareDirsArgs {
    /// The owner to give them, numeric: UID:GID.
    #[arg(long)]
    pub owner: crate::dirs::Owner,
    /// The directories.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The sidecar's admin address; a wildcard address is reached on loopback.
    #[arg(long, env = "SIDECAR_ADMIN_ADDR", default_value = defaults::ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// How long to wait before failing (500ms, 20s, 2m).
    #[arg(long, default_value = defaults::SIDECAR_READY_TIMEOUT, value_parser = servicekeel_api::duration::parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct RouterArgs {
    /// The Unix socket sidecars connect to.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET", default_value = defaults::ROUTER_SOCKET)]
    pub socket: PathBuf,
    /// Permission bits of the socket, in octal.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Numeric user to own the socket.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET_UID")]
    pub socket_uid: Option<u32>,
    /// Numeric group to own the socket (the sidecars' group, so mode 660 lets them in).
    #[arg(long, env = "SERVICEKEEL_ROUTER_SOCKET_GID")]
    pub socket_gid: Option<u32>,
    /// Directory of the registry snapshot.
    #[arg(long, env = "SERVICEKEEL_ROUTER_STATE_DIR", default_value = defaults::ROUTER_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SERVICEKEEL_ROUTER_ADMIN_ADDR", default_value = defaults::ROUTER_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// This cluster's name.
    #[arg(long, env = "SERVICEKEEL_CLUSTER")]
    pub cluster: String,
    /// Where peer routers connect (mutual TLS); no links to other routers when unset.
    #[arg(long, env = "SERVICEKEEL_ROUTER_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// This router's certificate chain (PEM), for the identity `servicekeel-router.<cluster>`.
    #[arg(long, env = "SERVICEKEEL_ROUTER_TLS_CERT", default_value = defaults::ROUTER_TLS_CERT)]
    pub tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "SERVICEKEEL_ROUTER_TLS_KEY", default_value = defaults::ROUTER_TLS_KEY)]
    pub tls_key: PathBuf,
    /// The CA bundle of this cluster's routers (PEM).
    #[arg(long, env = "SERVICEKEEL_ROUTER_TLS_CA", default_value = defaults::ROUTER_TLS_CA)]
    pub tls_ca: PathBuf,
    /// The peers file: other nodes' routers and other clusters' gateways.
    #[arg(long, env = "SERVICEKEEL_ROUTER_PEERS")]
    pub peers: Option<PathBuf>,
    /// Also take sidecars over TCP at this address (for pods that cannot mount the socket, as
    /// under Pod Security "restricted"); needs --sidecar-allow.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SIDECAR_LISTEN")]
    pub sidecar_listen: Option<SocketAddr>,
    /// Source addresses (CIDRs, comma-separated or repeated) whose TCP sidecar connections are
    /// taken: this node's pod network.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SIDECAR_ALLOW", value_delimiter = ',')]
    pub sidecar_allow: Vec<ipnet::IpNet>,
    /// Kubeconfig of the API server to watch; in-cluster config (or $KUBECONFIG) when unset.
    #[arg(long, env = "SERVICEKEEL_ROUTER_KUBECONFIG", conflicts_with = "no_api")]
    pub kubeconfig: Option<PathBuf>,
    /// How long a terminating router lets open flows finish (500ms, 20s, 1m).
    #[arg(long, env = "SERVICEKEEL_ROUTER_DRAIN_TIMEOUT", default_value = defaults::DRAIN_TIMEOUT, value_parser = servicekeel_api::duration::parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// How long to busy poll a UDP flow to an endpoint on this node after each datagram, and a
    /// TCP stream to one whose socket a read emptied, before sleeping (0 never; at most 1ms),
    /// giving the CPU to any thread waiting for it between polls; one flow at a time, only UDP
    /// flows answered within it, none while more UDP flows are busy than can poll.
    #[arg(long, env = "SERVICEKEEL_ROUTER_BUSY_POLL", default_value = defaults::ROUTER_BUSY_POLL, value_parser = parse_busy_poll)]
    pub busy_poll: std::time::Duration,
    /// TCP congestion control of the connections to endpoints on this node (`reno`, `bbr`, …;
    /// empty: the node's default); endpoints on other nodes always keep the node's default.
    #[arg(long, env = "SERVICEKEEL_ROUTER_LOCAL_CONGESTION", default_value = defaults::ROUTER_LOCAL_CONGESTION, value_parser = parse_congestion)]
    pub local_congestion: String,
    /// Most flows carried at once; past it, new flows are refused (503).
    #[arg(long, env = "SERVICEKEEL_ROUTER_MAX_FLOWS", default_value_t = defaults::ROUTER_MAX_FLOWS, value_parser = parse_limit)]
    pub max_flows: usize,
    /// Threads the links to other routers run on, each link whole on one of them (default: one
    /// per CPU the router may use).
    #[arg(long, env = "SERVICEKEEL_ROUTER_LINK_THREADS", value_parser = parse_limit)]
    pub link_threads: Option<usize>,
    /// Do not watch an API server: route from registrations and the snapshot only.
    #[arg(long, env = "SERVICEKEEL_ROUTER_NO_API")]
    pub no_api: bool,
    /// How the kernel schedules the router's threads: `auto` (`batch` while at least one of the
    /// node's CPUs is idle, `normal` while none is, decided every second from `/proc/stat`),
    /// `batch` (`SCHED_BATCH`: a woken relay does not preempt the application that woke it;
    /// faster on nodes with idle CPUs, slower where every CPU is busy), or `normal`.
    #[arg(long, env = "SERVICEKEEL_ROUTER_SCHEDULING", value_enum, default_value_t = Scheduling::Auto)]
    pub scheduling: Scheduling,
}

/// A congestion control's name as the kernel takes it (at most 15 letters, digits or `_`), or
/// empty for the node's default.
fn parse_congestion(text: &str) -> Result<String, String> {
    let name = text.trim();
    if name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{text:?} is not a congestion control's name (at most 15 lowercase letters, digits \
             or '_'; empty for the node's default)"
        ))
    }
}

fn parse_limit(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a positive number"))
}

/// Longest busy poll taken: past it a wakeup costs less than the polling.
const MAX_BUSY_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// The CPUs this process may use (its affinity and CPU quota).
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_busy_poll(text: &str) -> Result<std::time::Duration, String> {
    let poll = servicekeel_api::duration::parse_duration(text)?;
    if poll > MAX_BUSY_POLL {
        return Err(format!(
            "{text:?} is longer than the most busy polling taken, 1ms"
        ));
    }
    Ok(poll)
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not permission bits in octal, like 660"))
}

impl RouterArgs {
    pub fn into_config(self) -> Result<RouterConfig, String> {
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
                threads: self.link_threads.unwrap_or_else(cpus),
            }),
        };
        if links.is_none() && self.peers.is_some() {
            return Err("--peers needs --peer-listen: links are off without it".into());
        }
        if links.is_none() && self.link_threads.is_some() {
            return Err("--link-threads needs --peer-listen: links are off without it".into());
        }
        let sidecar_tcp = match (self.sidecar_listen, self.sidecar_allow.is_empty()) {
            (None, true) => None,
            (Some(listen), false) => Some(SidecarTcp {
                listen,
                allowed: self.sidecar_allow,
            }),
            (Some(_), true) => {
                return Err(
                    "--sidecar-listen needs --sidecar-allow: the pod addresses (CIDRs) whose \
                     sidecars may connect"
                        .into(),
                );
            }
            (None, false) => {
                return Err("--sidecar-allow needs --sidecar-listen".into());
            }
        };
        let api = match (self.no_api, self.kubeconfig) {
            (true, _) => Api::Off,
            (false, Some(path)) => Api::Kubeconfig(path),
            (false, None) => Api::Infer,
        };
        Ok(RouterConfig {
            sidecar_tcp,
            drain_timeout: self.drain_timeout,
            busy_poll: self.busy_poll,
            local_congestion: (!self.local_congestion.is_empty()).then_some(self.local_congestion),
            cpus: cpus(),
            max_flows: self.max_flows,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// The router's config from `args` after the required ones.
    fn router_config(args: &[&str]) -> Result<RouterConfig, String> {
        let line = [
            "servicekeel-proxy",
            "router",
            "--node=edge-1",
            "--cluster=cluster-a",
        ];
        let cli = Cli::try_parse_from(line.iter().chain(args)).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Router(args) => args.into_config(),
            other => panic!("not the router: {other:?}"),
        }
    }

    #[test]
    fn link_threads_default_to_one_per_cpu_and_need_links() {
        let threads = |args: &[&str]| router_config(args).map(|c| c.links.map(|l| l.threads));
        assert_eq!(threads(&["--peer-listen=127.0.0.1:0"]), Ok(Some(cpus())));
        assert_eq!(
            threads(&["--peer-listen=127.0.0.1:0", "--link-threads=3"]),
            Ok(Some(3))
        );
        let error = threads(&["--link-threads=3"]).expect_err("no links");
        assert!(
            error.contains("--link-threads needs --peer-listen"),
            "{error}"
        );
        let error =
            threads(&["--peer-listen=127.0.0.1:0", "--link-threads=0"]).expect_err("no thread");
        assert!(error.contains("not a positive number"), "{error}");
    }

    #[test]
    fn scheduling_is_auto_unless_another_is_asked_for() {
        let scheduling = |args: &[&str]| {
            let line = ["servicekeel-proxy", "router", "--node=n", "--cluster=c"];
            match Cli::try_parse_from(line.iter().chain(args)).map(|cli| cli.command) {
                Ok(Command::Router(args)) => Ok(args.scheduling),
                Ok(other) => panic!("not the router: {other:?}"),
                Err(error) => Err(error.to_string()),
            }
        };
        assert_eq!(scheduling(&[]), Ok(Scheduling::Auto));
        assert_eq!(scheduling(&["--scheduling=batch"]), Ok(Scheduling::Batch));
        assert_eq!(scheduling(&["--scheduling=normal"]), Ok(Scheduling::Normal));
        assert_eq!(scheduling(&["--scheduling=auto"]), Ok(Scheduling::Auto));
        let error = scheduling(&["--scheduling=fifo"]).expect_err("not a choice");
        assert!(
            ["normal", "batch", "auto"]
                .iter()
                .all(|c| error.contains(c)),
            "{error}"
        );
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("1777").is_err());
    }

    #[test]
    fn busy_polling_is_a_duration_of_at_most_a_millisecond() {
        use std::time::Duration;
        assert_eq!(parse_busy_poll("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_busy_poll("0"), Ok(Duration::ZERO));
        assert_eq!(parse_busy_poll("1ms"), Ok(Duration::from_millis(1)));
        let long = parse_busy_poll("2ms").expect_err("2ms is refused");
        assert!(long.contains("1ms"), "{long}");
        assert!(parse_busy_poll("fast").is_err());
        assert_eq!(
            parse_busy_poll(servicekeel_api::defaults::ROUTER_BUSY_POLL),
            Ok(Duration::from_micros(50))
        );
    }

    #[test]
    fn endpoints_on_this_node_get_reno_unless_told_otherwise() {
        let local = |args: &[&str]| router_config(args).map(|c| c.local_congestion);
        assert_eq!(local(&[]), Ok(Some("reno".into())));
        assert_eq!(local(&["--local-congestion=bbr"]), Ok(Some("bbr".into())));
        assert_eq!(
            local(&["--local-congestion="]),
            Ok(None),
            "the node's default"
        );
        let refused = local(&["--local-congestion=BBR;x"]).expect_err("not a name");
        assert!(
            refused.contains("not a congestion control's name"),
            "{refused}"
        );
        assert!(local(&["--local-congestion=a_name_far_too_long"]).is_err());
    }

    #[test]
    fn busy_polling_is_50us_by_default_even_with_one_cpu() {
        use std::time::Duration;
        let poll = |args: &[&str]| router_config(args).map(|c| c.busy_poll);
        assert_eq!(poll(&[]), Ok(Duration::from_micros(50)));
        let on_one_cpu = std::thread::spawn(move || {
            let allowed = rustix::thread::sched_getaffinity(None).expect("affinity");
            let first = (0..rustix::thread::CpuSet::MAX_CPU)
                .find(|cpu| allowed.is_set(*cpu))
                .expect("a CPU allowed");
            let mut one = rustix::thread::CpuSet::new();
            one.set(first);
            rustix::thread::sched_setaffinity(None, &one).expect("affinity");
            assert_eq!(cpus(), 1, "this thread may use one CPU");
            poll(&[])
        });
        assert_eq!(
            on_one_cpu.join().expect("join"),
            Ok(Duration::from_micros(50))
        );
        assert_eq!(poll(&["--busy-poll=20us"]), Ok(Duration::from_micros(20)));
        assert_eq!(poll(&["--busy-poll=0"]), Ok(Duration::ZERO));
    }
}
