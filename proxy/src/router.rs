//! The node router: accepts sidecars' tunnel connections on a Unix socket, keeps the registry
//! (their registrations, plus the cluster view loaded from the snapshot), and delivers each
//! flow to an endpoint: this node's first, round-robin among equals, a failed dial ejecting the
//! endpoint for a while and the flow retried on the next before the client sees an error.
//! A value with its bound addresses, like the sidecar, so tests start one on a temporary
//! socket.

pub mod metrics;

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use http::StatusCode;
use servicekeel_api::tunnel::registration::Registration;
use tokio::sync::{Notify, watch};

use crate::admin;
use crate::registry::{Ejections, Here, Registry};
use crate::snapshot;
use crate::tunnel::server::{
    self, Finished, FlowRequest, Handler, LinkId, Listener, Refusal, Upstream, dial,
};
use metrics::Metrics;

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
        let target = &request.target;
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let routes = {
            let ejections = self.ejections();
            self.registry()
                .routes(target, &self.here, turn, &ejections, Instant::now())
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
            match dial(target.protocol, endpoint.addr).await {
                Ok(upstream) => {
                    self.ejections().succeeded(endpoint.addr);
                    self.metrics.flow_opened(target.protocol);
                    return Ok(upstream);
                }
                Err(error) => {
                    let period = self.ejections().failed(endpoint.addr, Instant::now());
                    self.metrics.endpoint_ejected();
                    tracing::warn!(%target, endpoint = %endpoint.addr, %error, ?period, "endpoint ejected");
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

    fn register(&self, link: LinkId, registration: Registration) -> Result<(), String> {
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

    fn unlink(&self, link: LinkId) {
        self.registry_mut().unlink(link);
        self.metrics.sidecar_registered(link, false);
        self.registry_changed();
    }

    fn finished(&self, request: &FlowRequest, finished: &Finished) {
        self.metrics
            .flow_finished(request.target.protocol, finished);
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
        self.metrics.encode()
    }
}

/// A running router.
#[derive(Debug)]
pub struct Router {
    shared: Arc<Shared>,
    socket: PathBuf,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
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
        tokio::spawn(server::serve(
            Listener::Unix(listener),
            shared.clone(),
            stopped,
        ));
        shared.listening.store(true, Ordering::SeqCst);
        tracing::info!(socket = %config.socket.display(), admin = %admin_addr, node = %config.node, "router ready");
        Ok(Router {
            shared,
            socket: config.socket,
            admin_addr,
            stop,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// (target, endpoint) pairs known now.
    pub fn registry_len(&self) -> usize {
        self.shared.registry().len()
    }

    /// Stops accepting, asks connections to finish (HTTP/2 GOAWAY) and removes the socket.
    pub async fn shutdown(self) {
        self.shared.listening.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.socket);
    }
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
