//! The node router: accepts sidecars' tunnel connections on a Unix socket, keeps the registry
//! (their registrations, plus the cluster view loaded from the snapshot), and delivers each
//! flow to an endpoint: this node's first, round-robin among equals, a failed dial ejecting the
//! endpoint for a while and the flow retried on the next before the client sees an error.
//!
//! With links configured it also accepts peer routers over mutual TLS ([`crate::links`]) and
//! reaches through them: an endpoint on another node goes through that node's router when
//! the peers file names it (otherwise it is dialled directly), a service of another cluster
//! through that cluster's gateway. A flow from a router of this cluster is delivered on this
//! node only; one from another cluster anywhere in this cluster, never onwards to a third.
//!
//! A value with its bound addresses, like the sidecar, so tests start one on temporary
//! sockets.

pub mod follow;
pub mod metrics;
pub mod nodes;
pub mod peers;
pub mod pods;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use http::StatusCode;
use servicekeel_api::tunnel::Source;
use servicekeel_api::tunnel::registration::Registration;
use tokio::sync::{Notify, watch};

use crate::admin;
use crate::links::{LinkThreads, PeerConnector, Refused, TlsError, Trust};
use crate::registry::{Ejections, Endpoint, Here, Registry};
use crate::snapshot;
use crate::tunnel::busy_poll::Polling;
use crate::tunnel::client::{Client, OpenError};
use crate::tunnel::server::{
    self, Finished, FlowRequest, Handler, LinkId, Peer, Refusal, Upstream, dial,
};
use metrics::Metrics;
use peers::Peers;

/// Most endpoints tried for one flow before it is refused.
pub const MAX_DIAL_ATTEMPTS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// The Unix socket sidecars connect to.
    pub socket: PathBuf,
    /// Permission bits of the socket.
    pub socket_mode: u32,
    /// Owner and group given to the socket, when set.
    pub socket_owner: Option<(Option<u32>, Option<u32>)>,
    /// Where the registry snapshot lives.
    pub state_dir: PathBuf,
    pub admin_addr: SocketAddr,
    pub node: String,
    pub cluster: String,
    /// Links to other routers; none when `None`.
    pub links: Option<LinksConfig>,
    /// Where the cluster view comes from.
    pub api: Api,
    /// How long a terminating router lets open flows finish.
    pub drain_timeout: std::time::Duration,
    /// How long a UDP flow to an endpoint on this node is busy polled after each datagram.
    pub busy_poll: std::time::Duration,
    /// TCP congestion control of the connections to endpoints on this node; the node's default
    /// when `None`.
    pub local_congestion: Option<String>,
    /// The CPUs the router may use (its affinity and CPU quota): as many UDP relay threads, one
    /// per busy flow; with one, every busy UDP flow shares the one.
    pub cpus: usize,
    /// Most flows carried at once; past it new flows are refused (503).
    pub max_flows: usize,
    /// Sidecars over TCP as well as on the socket; none when `None`.
    pub sidecar_tcp: Option<SidecarTcp>,
}

/// Where sidecars that cannot mount the socket (pods under Pod Security "restricted") reach
/// the router: a TCP address, taking connections only from `allowed` source addresses; each
/// such sidecar registers its own source address and no other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarTcp {
    pub listen: SocketAddr,
    pub allowed: Vec<ipnet::IpNet>,
}

/// The API server the router watches for its cluster view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    /// None: the cluster view is the snapshot's (and sidecars' registrations).
    Off,
    /// In-cluster config, or `$KUBECONFIG` / `~/.kube/config`.
    Infer,
    /// This kubeconfig file.
    Kubeconfig(PathBuf),
}

/// Where peer routers are accepted, the certificate this router shows them, and who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinksConfig {
    pub listen: SocketAddr,
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// This cluster's CA bundle.
    pub ca: PathBuf,
    pub peers: Peers,
    /// Threads the links run on ([`LinkThreads`]).
    pub threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot listen on {path}: {cause}")]
    Listen {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot prepare the state directory {path}: {cause}")]
    StateDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] admin::BindError),
    #[error("router links: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen for peer routers on {addr}: {cause}")]
    PeerListen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot start the link threads: {0}")]
    LinkThreads(std::io::Error),
    #[error("cannot start the UDP relay threads: {0}")]
    UdpThreads(std::io::Error),
    #[error("cannot listen for sidecars on {addr}: {cause}")]
    SidecarListen {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// Tunnels to other routers.
#[derive(Debug, Default)]
struct Links {
    /// This cluster's other routers, by node, with the addresses they were dialled at.
    nodes: RwLock<BTreeMap<String, (Vec<String>, Client)>>,
    /// Other clusters' gateways, by cluster.
    clusters: BTreeMap<String, Client>,
    /// What new node links are made with; `None` when links are off.
    factory: Option<LinkFactory>,
    /// Nodes of the peers file; they win over the API server's word.
    file_nodes: BTreeMap<String, Vec<String>>,
}

#[derive(Debug)]
struct LinkFactory {
    threads: LinkThreads,
    trust: Trust,
    cluster: String,
    me: Source,
    stopped: watch::Receiver<bool>,
}

impl Links {
    fn node(&self, name: &str) -> Option<Client> {
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        nodes.get(name).map(|(_, client)| client.clone())
    }

    fn clients(&self) -> Vec<Client> {
        let nodes = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        nodes
            .values()
            .map(|(_, c)| c.clone())
            .chain(self.clusters.values().cloned())
            .collect()
    }

    fn up(&self) -> usize {
        self.clients().iter().filter(|c| c.is_up()).count()
    }

    /// Makes the node links those of `from_api` plus the peers file: links to nodes that are
    /// gone or moved are closed, new ones dialled.
    fn set_nodes(&self, from_api: BTreeMap<String, Vec<String>>) {
        let Some(factory) = &self.factory else {
            return;
        };
        let mut wanted = from_api;
        wanted.extend(self.file_nodes.clone());
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        nodes.retain(|name, (addrs, client)| {
            let keep = wanted.get(name) == Some(addrs);
            if !keep {
                tracing::info!(node = %name, "link closed");
                client.close();
            }
            keep
        });
        for (name, addrs) in wanted {
            if nodes.contains_key(&name) {
                continue;
            }
            match PeerConnector::new(&factory.trust, &factory.cluster, addrs.clone()) {
                Ok(connector) => {
                    tracing::info!(node = %name, addrs = ?addrs, "linking");
                    let client = Client::start_link(
                        connector,
                        &factory.me,
                        factory.stopped.clone(),
                        factory.threads.next(),
                    );
                    nodes.insert(name, (addrs, client));
                }
                Err(error) => tracing::warn!(node = %name, %error, "cannot link"),
            }
        }
    }
}

fn refusal(error: OpenError) -> Refusal {
    match error {
        OpenError::Refused {
            status, message, ..
        } => Refusal::new(status, message),
        OpenError::Unavailable { .. } => {
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
        OpenError::Broken { .. } => Refusal::new(StatusCode::BAD_GATEWAY, error.to_string()),
    }
}

#[derive(Debug)]
struct Shared {
    here: Here,
    registry: RwLock<Registry>,
    ejections: Mutex<Ejections>,
    turn: AtomicUsize,
    metrics: Metrics,
    /// The registry changed: the snapshot should be written.
    changed: Arc<Notify>,
    snapshot_saved: watch::Sender<Option<SystemTime>>,
    listening: AtomicBool,
    links: Links,
    /// Flows open or being opened: held against `max_flows`, waited for when draining.
    open_flows: watch::Sender<usize>,
    max_flows: usize,
    /// See [`RouterConfig::local_congestion`].
    local_congestion: Option<String>,
}

impl Shared {
    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }

    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|p| p.into_inner())
    }

    fn ejections(&self) -> std::sync::MutexGuard<'_, Ejections> {
        self.ejections.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registry_changed(&self) {
        self.metrics.registry_entries(self.registry().len());
        self.changed.notify_one();
    }
}

impl Handler for Shared {
    async fn open(&self, request: &FlowRequest) -> Result<Upstream, Refusal> {
        let slot = self.reserve(request.target.protocol)?;
        let opened = self.open_reserved(request).await;
        if opened.is_ok() {
            // Given back when the flow finishes.
            slot.keep();
        }
        opened
    }

    fn register(&self, link: LinkId, registration: Registration) -> Result<(), String> {
        self.register_pod(link, registration)
    }

    fn unlink(&self, link: LinkId) {
        self.unlink_pod(link)
    }

    fn finished(&self, request: &FlowRequest, finished: &Finished) {
        self.metrics
            .flow_finished(request.target.protocol, finished);
        self.open_flows.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A place among the router's `max_flows`, given back when dropped unless kept.
struct Slot<'a> {
    open_flows: &'a watch::Sender<usize>,
    kept: bool,
}

impl Slot<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.open_flows.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

impl Shared {
    fn reserve(&self, protocol: servicekeel_api::Protocol) -> Result<Slot<'_>, Refusal> {
        let taken = self.open_flows.send_if_modified(|n| {
            let room = *n < self.max_flows;
            if room {
                *n += 1;
            }
            room
        });
        if !taken {
            self.metrics.flow_refused(protocol, "limit");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("flow limit reached: {} flows open", self.max_flows),
            ));
        }
        Ok(Slot {
            open_flows: &self.open_flows,
            kept: false,
        })
    }

    async fn open_reserved(&self, request: &FlowRequest) -> Result<Upstream, Refusal> {
        let target = &request.target;
        let source = request.source.as_ref();
        if target.service.cluster != self.here.cluster {
            return self.open_remote_cluster(request).await;
        }
        // A router of this cluster chose this node: deliver here or not at all.
        let this_node_only = matches!(
            &request.link.peer,
            Peer::Router { cluster } if *cluster == self.here.cluster
        );
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let link_up = |node: &str| self.links.node(node).is_none_or(|peer| peer.is_up());
        let routes: Vec<Endpoint> = {
            let ejections = self.ejections();
            self.registry()
                .routes(
                    target,
                    &self.here,
                    turn,
                    &ejections,
                    &link_up,
                    Instant::now(),
                )
                .into_iter()
                .filter(|e| !this_node_only || e.node.is_empty() || e.node == self.here.node)
                .collect()
        };
        if routes.is_empty() {
            self.metrics.flow_refused(target.protocol, "no_endpoint");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no endpoint for {target}"),
            ));
        }
        let mut failures = Vec::new();
        for endpoint in routes.iter().take(MAX_DIAL_ATTEMPTS) {
            let through = (!endpoint.node.is_empty() && endpoint.node != self.here.node)
                .then(|| self.links.node(&endpoint.node))
                .flatten();
            let opened = match &through {
                Some(peer) => peer
                    .open_as(target, source)
                    .await
                    .map(Upstream::Flow)
                    .map_err(|e| e.to_string()),
                None => {
                    let here = endpoint.node == self.here.node;
                    let congestion = self.local_congestion.as_deref().filter(|_| here);
                    dial(target.protocol, endpoint.addr, congestion)
                        .await
                        .map_err(|e| e.to_string())
                }
            };
            match opened {
                Ok(upstream) => {
                    self.ejections().succeeded(endpoint.addr);
                    self.flow_began(target.protocol);
                    return Ok(upstream);
                }
                Err(error) if through.as_ref().is_some_and(|peer| !peer.is_up()) => {
                    // The link to its node is down: the link's own redialling decides when the
                    // node's endpoints come back, so none is ejected for longer meanwhile.
                    tracing::warn!(%target, endpoint = %endpoint.addr, node = %endpoint.node, %error, "link to the endpoint's node is down");
                    failures.push(format!("{}: {error}", endpoint.addr));
                }
                Err(error) => {
                    let period = self.ejections().failed(endpoint.addr, Instant::now());
                    self.metrics.endpoint_ejected();
                    tracing::warn!(%target, endpoint = %endpoint.addr, node = %endpoint.node, %error, ?period, "endpoint ejected");
                    failures.push(format!("{}: {error}", endpoint.addr));
                }
            }
        }
        self.metrics.flow_refused(target.protocol, "unreachable");
        Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach {target}: {}", failures.join("; ")),
        ))
    }

    fn register_pod(&self, link: LinkId, registration: Registration) -> Result<(), String> {
        let skipped = self
            .registry_mut()
            .register(link, &registration, &self.here);
        for skip in &skipped {
            tracing::warn!(pod = %registration.pod, target = %skip.target, reason = %skip.reason, "export not registered");
        }
        tracing::info!(pod = %registration.pod, endpoints = registration.endpoints().len() - skipped.len(), "registered");
        self.metrics.sidecar_registered(link, true);
        self.registry_changed();
        Ok(())
    }

    fn unlink_pod(&self, link: LinkId) {
        self.registry_mut().unlink(link);
        self.metrics.sidecar_registered(link, false);
        self.registry_changed();
    }

    fn flow_began(&self, protocol: servicekeel_api::Protocol) {
        self.metrics.flow_opened(protocol);
    }

    /// A flow for another cluster goes through that cluster's gateway.
    async fn open_remote_cluster(&self, request: &FlowRequest) -> Result<Upstream, Refusal> {
        let target = &request.target;
        let cluster = &target.service.cluster;
        if let Peer::Router { cluster: from } = &request.link.peer {
            self.metrics.flow_refused(target.protocol, "no_route");
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "a router of {from} asked this cluster ({}) for {target}: flows are not passed on between clusters",
                    self.here.cluster
                ),
            ));
        }
        let Some(gateway) = self.links.clusters.get(cluster) else {
            self.metrics.flow_refused(target.protocol, "no_route");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no gateway for cluster {cluster:?} (peers file)"),
            ));
        };
        match gateway.open_as(target, request.source.as_ref()).await {
            Ok(flow) => {
                self.flow_began(target.protocol);
                Ok(Upstream::Flow(flow))
            }
            Err(error) => {
                self.metrics.flow_refused(target.protocol, "unreachable");
                Err(refusal(error))
            }
        }
    }
}

impl admin::Status for Shared {
    fn not_ready(&self) -> Option<String> {
        (!self.listening.load(Ordering::SeqCst)).then(|| "not listening for sidecars".into())
    }

    fn metrics(&self) -> String {
        let age = self
            .snapshot_saved
            .borrow()
            .and_then(|saved| SystemTime::now().duration_since(saved).ok());
        self.metrics.snapshot_age(age);
        self.metrics
            .ejected_now(self.ejections().count(Instant::now()));
        self.metrics
            .peers(self.links.clients().len(), self.links.up());
        self.metrics.encode()
    }
}

/// A running router.
#[derive(Debug)]
pub struct Router {
    shared: Arc<Shared>,
    socket: PathBuf,
    admin_addr: SocketAddr,
    peer_addr: Option<SocketAddr>,
    sidecar_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    drain_timeout: std::time::Duration,
}

impl Router {
    /// Loads the snapshot, binds the socket and the admin server, and starts serving.
    pub async fn start(config: RouterConfig) -> Result<Router, RouterError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|cause| RouterError::StateDir {
            path: config.state_dir.clone(),
            cause,
        })?;
        let snapshot_path = config.state_dir.join(snapshot::FILE_NAME);
        let mut registry = Registry::default();
        let mut saved = None;
        match snapshot::load(&snapshot_path) {
            Ok((entries, when)) => {
                let age = SystemTime::now().duration_since(when).unwrap_or_default();
                tracing::info!(entries = entries.len(), ?age, "routing from the snapshot");
                registry.set_cluster(entries);
                saved = Some(when);
            }
            Err(snapshot::SnapshotError::Read { cause, .. })
                if cause.kind() == std::io::ErrorKind::NotFound =>
            {
                tracing::info!("no snapshot yet; starting empty");
            }
            Err(error) => tracing::warn!(%error, "snapshot not used; starting empty"),
        }
        let (stop, stopped) = watch::channel(false);
        let (links, accepting) = match &config.links {
            Some(links) => {
                let (made, trust, threads) = connect_links(&config, links, &stopped)?;
                (made, Some((trust, threads)))
            }
            None => (Links::default(), None),
        };
        let shared = Arc::new(Shared {
            here: Here {
                node: config.node.clone(),
                cluster: config.cluster.clone(),
            },
            registry: RwLock::new(registry),
            ejections: Mutex::new(Ejections::default()),
            turn: AtomicUsize::new(0),
            metrics: Metrics::default(),
            changed: Arc::new(Notify::new()),
            snapshot_saved: watch::Sender::new(saved),
            listening: AtomicBool::new(false),
            links,
            open_flows: watch::Sender::new(0),
            max_flows: config.max_flows,
            local_congestion: config.local_congestion.clone(),
        });
        shared.metrics.registry_entries(shared.registry().len());
        let listener = bind_socket(&config).map_err(|cause| RouterError::Listen {
            path: config.socket.clone(),
            cause,
        })?;
        let (admin_listener, admin_addr) = admin::bind(config.admin_addr).await?;
        tokio::spawn(admin::serve(
            admin_listener,
            shared.clone(),
            stopped.clone(),
        ));
        let for_snapshot = shared.clone();
        tokio::spawn(snapshot::keep(
            snapshot_path,
            shared.changed.clone(),
            move || for_snapshot.registry().entries(),
            shared.snapshot_saved.clone(),
            stopped.clone(),
        ));
        let mut peer_addr = None;
        if let (Some(links), Some((trust, threads))) = (&config.links, accepting) {
            let listener = tokio::net::TcpListener::bind(links.listen)
                .await
                .map_err(|cause| RouterError::PeerListen {
                    addr: links.listen,
                    cause,
                })?;
            peer_addr = listener.local_addr().ok();
            let metrics = shared.clone();
            let refused = Arc::new(move |reason: Refused| {
                metrics.metrics.peer_refused(reason.as_str());
            });
            let accepting = crate::links::accept(
                listener,
                threads,
                Arc::new(trust),
                shared.clone(),
                refused,
                stopped.clone(),
            );
            tokio::spawn(async move {
                if let Err(error) = accepting.await {
                    tracing::error!(%error, "not accepting peer routers");
                }
            });
        }
        let mut sidecar_addr = None;
        if let Some(tcp) = &config.sidecar_tcp {
            let listener = tokio::net::TcpListener::bind(tcp.listen)
                .await
                .map_err(|cause| RouterError::SidecarListen {
                    addr: tcp.listen,
                    cause,
                })?;
            sidecar_addr = listener.local_addr().ok();
            let metrics = shared.clone();
            let refused = Arc::new(move |from: SocketAddr| {
                tracing::debug!(%from, "sidecar connection from outside the allowed addresses");
                metrics.metrics.sidecar_refused();
            });
            tokio::spawn(server::serve_tcp(
                listener,
                tcp.allowed.clone().into(),
                shared.clone(),
                refused,
                stopped.clone(),
            ));
        }
        watch_api(&config, &shared, &stopped).await;
        let mut polling = Polling::new(config.busy_poll).counted(shared.metrics.poll_counts());
        if !config.busy_poll.is_zero() {
            // One per CPU for busy flows, or the one every busy flow shares.
            let threads =
                LinkThreads::start_named(config.cpus, "udp").map_err(RouterError::UdpThreads)?;
            polling = if config.cpus > 1 {
                polling.on_threads(threads)
            } else {
                polling.on_shared_thread(threads)
            };
        }
        tokio::spawn(server::serve(listener, shared.clone(), polling, stopped));
        shared.listening.store(true, Ordering::SeqCst);
        tracing::info!(socket = %config.socket.display(), admin = %admin_addr, node = %config.node, "router ready");
        Ok(Router {
            shared,
            socket: config.socket,
            admin_addr,
            peer_addr,
            sidecar_addr,
            stop,
            drain_timeout: config.drain_timeout,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where peer routers are accepted, when links are configured.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// Where sidecars are accepted over TCP, when configured.
    pub fn sidecar_addr(&self) -> Option<SocketAddr> {
        self.sidecar_addr
    }

    /// Whether the links to every configured peer are up.
    pub fn peers_up(&self) -> bool {
        let links = &self.shared.links;
        links.up() == links.clients().len()
    }

    /// (target, endpoint) pairs known now.
    pub fn registry_len(&self) -> usize {
        self.shared.registry().len()
    }

    /// Flows open now (and those being opened).
    pub fn open_flows(&self) -> usize {
        *self.shared.open_flows.borrow()
    }

    /// Drains and stops: no new connections (the socket goes), HTTP/2 GOAWAY on the open ones,
    /// and open flows get up to the drain timeout to finish. Returns how many were still open
    /// at the deadline.
    pub async fn shutdown(self) -> usize {
        self.shared.listening.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.socket);
        let mut open = self.shared.open_flows.subscribe();
        let _ = tokio::time::timeout(self.drain_timeout, open.wait_for(|n| *n == 0)).await;
        let left = *open.borrow();
        if left > 0 {
            tracing::warn!(left, "drain deadline passed; cutting open flows");
        }
        left
    }
}

/// Starts the pod watch when an API server is configured. One that cannot be reached now is
/// retried by the watch itself; only a config that cannot be read at all leaves the router on
/// its snapshot, with a warning.
async fn watch_api(config: &RouterConfig, shared: &Arc<Shared>, stopped: &watch::Receiver<bool>) {
    let client_config = match &config.api {
        Api::Off => return,
        Api::Infer => kube::Config::infer().await.map_err(|e| e.to_string()),
        Api::Kubeconfig(path) => match kube::config::Kubeconfig::read_from(path) {
            Ok(kubeconfig) => kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        },
    };
    let client = client_config.and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string()));
    let client = match client {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%error, "no API server config; routing from the snapshot and registrations");
            return;
        }
    };
    let for_view = shared.clone();
    let apply = Arc::new(move |entries: Vec<crate::registry::Entry>| {
        tracing::info!(entries = entries.len(), "cluster view from the API server");
        for_view.registry_mut().set_cluster(entries);
        for_view.registry_changed();
    });
    if let Some(links) = &config.links {
        let for_links = shared.clone();
        let apply = Arc::new(move |peers| for_links.links.set_nodes(peers));
        tokio::spawn(nodes::run(
            client.clone(),
            config.node.clone(),
            links.listen.port(),
            apply,
            stopped.clone(),
        ));
    }
    tokio::spawn(pods::run(
        client,
        config.cluster.clone(),
        apply,
        stopped.clone(),
    ));
}

/// Loads the TLS material, starts the link threads and a link client for every peer in the
/// peers file.
fn connect_links(
    config: &RouterConfig,
    links: &LinksConfig,
    stopped: &watch::Receiver<bool>,
) -> Result<(Links, Trust, LinkThreads), RouterError> {
    let bundles: BTreeMap<String, PathBuf> = links
        .peers
        .clusters
        .iter()
        .map(|(cluster, peer)| (cluster.clone(), peer.trust_bundle.clone()))
        .collect();
    let trust = Trust::load(
        &config.cluster,
        &links.certificate,
        &links.key,
        &links.ca,
        &bundles,
    )?;
    // Flows passed on carry their own source; this one names the router itself.
    let me = Source {
        namespace: "servicekeel-system".into(),
        name: config.node.clone(),
        ip: None,
    };
    let threads = LinkThreads::start(links.threads).map_err(RouterError::LinkThreads)?;
    let mut made = Links {
        file_nodes: links.peers.nodes.clone(),
        ..Links::default()
    };
    for (cluster, peer) in &links.peers.clusters {
        let connector = PeerConnector::new(&trust, cluster, peer.gateways.clone())?;
        made.clusters.insert(
            cluster.clone(),
            Client::start_link(connector, &me, stopped.clone(), threads.next()),
        );
    }
    made.factory = Some(LinkFactory {
        threads: threads.clone(),
        trust: trust.clone(),
        cluster: config.cluster.clone(),
        me,
        stopped: stopped.clone(),
    });
    made.set_nodes(BTreeMap::new());
    Ok((made, trust, threads))
}

/// Binds the sidecars' socket: a stale socket file from an earlier run is replaced (anything
/// else at that path is left alone and reported), then mode and owner are set.
fn bind_socket(config: &RouterConfig) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(&config.socket) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(&config.socket)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(&config.socket)?;
    std::fs::set_permissions(
        &config.socket,
        std::fs::Permissions::from_mode(config.socket_mode),
    )?;
    if let Some((uid, gid)) = config.socket_owner {
        std::os::unix::fs::chown(&config.socket, uid, gid)?;
    }
    Ok(listener)
}
