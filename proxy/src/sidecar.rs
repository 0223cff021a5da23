//! The sidecar process: follows the pod's imports in the annotations file, gives each a local
//! address, serves DNS for them, and reports health and metrics. A value with its bound
//! addresses, so tests can start one on free ports and drive its reloads.
//!
//! Not here yet: the listeners on the local addresses, the tunnel to the router and the
//! registration of exports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

use crate::alloc::Allocator;
use crate::config::SidecarConfig;
use crate::dns::server::{BindError, DnsServer, Handler, SharedNames};
use crate::dns::upstream::Upstream;
use crate::dns::{self, Names};
use crate::metrics::Metrics;
use crate::podinfo::{Home, PodServices, Watcher};
use servicekeel_api::defaults;

/// How long the upstream resolver gets before a forwarded query is answered SERVFAIL.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the annotations file is checked (the kubelet rewrites it on its own schedule).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Dns(#[from] BindError),
    #[error("cannot bind the admin server to {addr}: {cause}")]
    Admin {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    state: Arc<State>,
    dns: DnsServer,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
}

#[derive(Debug)]
struct State {
    config: SidecarConfig,
    home: Home,
    watcher: Mutex<Watcher>,
    allocator: Mutex<Allocator>,
    names: SharedNames,
    ready: AtomicBool,
    metrics: Arc<Metrics>,
    /// The last problem logged, so one that persists is logged once.
    last_error: Mutex<Option<String>>,
}

impl State {
    /// Applies the file's current content, if it changed. An invalid new value is logged and
    /// the last good set stays in force.
    fn reload(&self) {
        let polled = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poll();
        let mut last_error = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        match polled {
            Ok(Some(services)) => {
                *last_error = None;
                self.apply(&services);
            }
            Ok(None) => {}
            Err(error) => {
                let error = error.to_string();
                if last_error.as_deref() != Some(error.as_str()) {
                    tracing::warn!(%error, "annotations not applied; keeping the last good set");
                    *last_error = Some(error);
                }
            }
        }
    }

    fn apply(&self, services: &PodServices) {
        let mut allocator = self.allocator.lock().unwrap_or_else(|p| p.into_inner());
        // No listener holds connections yet, so a removed address is free at once.
        match allocator.update(services.imported_keys(&self.home), |_| false) {
            Ok(changes) => {
                for (key, ip) in &changes.added {
                    tracing::info!(service = %key, %ip, "imported");
                }
                for (key, ip) in &changes.removed {
                    tracing::info!(service = %key, %ip, "no longer imported");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "imports not applied; keeping the last good set");
                return;
            }
        }
        let home = dns::Home {
            namespace: &self.config.pod_namespace,
            cluster: &self.config.cluster,
            cluster_domain: &self.config.cluster_domain,
        };
        let names = Arc::new(Names::new(allocator.assignments(), home));
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = names;
    }
}

impl Sidecar {
    /// Reads the annotations, binds DNS and the admin server, and starts following the file.
    pub async fn start(config: SidecarConfig) -> Result<Sidecar, SidecarError> {
        let home = Home {
            namespace: config.pod_namespace.clone(),
            cluster: config.cluster.clone(),
        };
        let state = Arc::new(State {
            watcher: Mutex::new(Watcher::new(&config.annotations_file, home.clone())),
            allocator: Mutex::new(Allocator::new(config.ip_range)),
            names: Arc::new(RwLock::new(Arc::new(Names::default()))),
            ready: AtomicBool::new(false),
            metrics: Arc::new(Metrics::default()),
            last_error: Mutex::new(None),
            home,
            config,
        });
        state.reload();
        let handler = Handler::new(
            state.names.clone(),
            Upstream::new(state.config.upstream_dns, UPSTREAM_TIMEOUT),
            state.metrics.clone(),
        );
        let dns = DnsServer::bind(state.config.dns_addr, handler).await?;
        let admin_listener = tokio::net::TcpListener::bind(state.config.admin_addr)
            .await
            .map_err(|cause| SidecarError::Admin {
                addr: state.config.admin_addr,
                cause,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|cause| SidecarError::Admin {
                addr: state.config.admin_addr,
                cause,
            })?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve_admin(admin_listener, state.clone(), stopped.clone()));
        tokio::spawn(follow(state.clone(), stopped));
        state.ready.store(true, Ordering::SeqCst);
        tracing::info!(dns = %dns.local_addr(), admin = %admin_addr, "sidecar ready");
        Ok(Sidecar {
            state,
            dns,
            admin_addr,
            stop,
        })
    }

    pub fn dns_addr(&self) -> SocketAddr {
        self.dns.local_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Applies the annotations file now rather than at the next interval.
    pub fn reload_now(&self) {
        self.state.reload();
    }

    /// Stops everything, letting in-flight DNS queries finish.
    pub async fn shutdown(self) {
        self.state.ready.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        self.dns.shutdown().await;
    }
}

async fn follow(state: Arc<State>, mut stopped: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(RELOAD_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => state.reload(),
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
) {
    let metrics = state.metrics.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move { text }
            }),
        )
        .route(defaults::HEALTH_PATH, get(|| async { "ok" }))
        .route(
            defaults::READY_PATH,
            get(move || {
                let ready = state.ready.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        );
    let shutdown = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%error, "admin server stopped");
    }
}
