//! The sidecar process: follows the pod's imports and exports in the annotations file, gives
//! each import a local address, serves DNS for them, listens on their ports and carries each
//! flow through the tunnel to the router, registers the exports with the router, and reports
//! health and metrics. A value with its bound addresses, so tests can start one on free ports
//! and drive its reloads.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use servicekeel_api::addresses::RouterAddr;
use servicekeel_api::tunnel::handoff::Kind;
use servicekeel_api::tunnel::registration::Registration;
use servicekeel_api::tunnel::{FlowTarget, Source};

use crate::admin::{self, Status as _};
use crate::alloc::Allocator;
use crate::config::SidecarConfig;
use crate::dns::server::{BindError, DnsServer, Handler, SharedNames};
use crate::dns::upstream::Upstream;
use crate::dns::{self, Names};
use crate::listeners::{self, Flows, Listeners, Wanted};
use crate::metrics::Metrics;
use crate::podinfo::{Home, PodServices, Watcher};
use crate::tunnel::client::Client;
use crate::tunnel::handoff::Giver;

/// How long the upstream resolver gets before a forwarded query is answered SERVFAIL.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the annotations file is checked (the kubelet rewrites it on its own schedule).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Dns(#[from] BindError),
    #[error(transparent)]
    Admin(#[from] admin::BindError),
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    state: Arc<State>,
    dns: DnsServer,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    draining: watch::Sender<bool>,
}

#[derive(Debug)]
struct State {
    config: SidecarConfig,
    home: Home,
    watcher: Mutex<Watcher>,
    allocator: Mutex<Allocator>,
    names: SharedNames,
    listeners: Mutex<Listeners>,
    flows: Arc<Flows>,
    client: Client,
    dns_ready: AtomicBool,
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
        match allocator.update(services.imported_keys(&self.home), |ip| {
            self.flows.in_use(ip)
        }) {
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
        let wanted = self.wanted_listeners(services, &allocator);
        drop(allocator);
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply(wanted);
        self.client.set_registration(self.registration(services));
    }

    fn wanted_listeners(&self, services: &PodServices, allocator: &Allocator) -> Vec<Wanted> {
        let mut wanted = Vec::new();
        for service in &services.imported.services {
            let key = service.key(&self.home.namespace, &self.home.cluster);
            let Some(ip) = allocator.address(&key) else {
                continue;
            };
            for port in &service.ports {
                wanted.push(Wanted {
                    addr: SocketAddrV4::new(ip, port.port),
                    target: FlowTarget {
                        service: key.clone(),
                        port: port.port,
                        protocol: port.protocol,
                    },
                });
            }
        }
        wanted
    }

    fn registration(&self, services: &PodServices) -> Option<Registration> {
        let Some(ip) = self.config.pod_ip else {
            if !services.exported.is_empty() {
                tracing::warn!("POD_IP is not set: exports are not registered with the router");
            }
            return None;
        };
        Some(Registration::new(
            source(&self.config, Some(ip)),
            &services.exported,
            &self.config.cluster,
        ))
    }
}

impl admin::Status for State {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    /// Why the sidecar is not ready, if it is not.
    fn not_ready(&self) -> Option<String> {
        if !self.dns_ready.load(Ordering::SeqCst) {
            return Some("DNS is not serving".into());
        }
        let problems = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .problems();
        (!problems.is_empty()).then(|| format!("not listening: {}", problems.join("; ")))
    }
}

/// This pod, as flows and registrations name it.
fn source(config: &SidecarConfig, ip: Option<std::net::IpAddr>) -> Source {
    Source {
        namespace: config.pod_namespace.clone(),
        name: config.pod_name.clone().unwrap_or_else(|| "unknown".into()),
        ip,
    }
}

impl Sidecar {
    /// Reads the annotations, binds DNS and the admin server, and starts following the file.
    pub async fn start(config: SidecarConfig) -> Result<Sidecar, SidecarError> {
        let home = Home {
            namespace: config.pod_namespace.clone(),
            cluster: config.cluster.clone(),
        };
        let (stop, stopped) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let flows = Arc::new(Flows::with_limit(config.max_flows));
        let client = Client::start(
            config.router.clone(),
            &source(&config, config.pod_ip),
            stopped.clone(),
        );
        let (draining, draining_rx) = watch::channel(false);
        let giver = |wanted: bool, kind: Kind| match &config.router {
            RouterAddr::Unix(path) if wanted => Some(Arc::new(Giver::new(
                path.clone(),
                source(&config, config.pod_ip),
                kind,
            ))),
            _ => None,
        };
        let listeners = Listeners::new(listeners::Context {
            client: client.clone(),
            tcp_handoff: giver(config.tcp_handoff, Kind::Tcp),
            udp_handoff: giver(config.udp_handoff, Kind::Udp),
            flows: flows.clone(),
            metrics: metrics.clone(),
            udp_idle: config.udp_idle_timeout,
            udp_max_clients: config.udp_max_clients,
            draining: draining_rx,
        });
        let state = Arc::new(State {
            watcher: Mutex::new(Watcher::new(&config.annotations_file, home.clone())),
            allocator: Mutex::new(Allocator::new(config.ip_range)),
            names: Arc::new(RwLock::new(Arc::new(Names::default()))),
            listeners: Mutex::new(listeners),
            flows,
            client,
            dns_ready: AtomicBool::new(false),
            metrics,
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
        let (admin_listener, admin_addr) = admin::bind(state.config.admin_addr).await?;
        tokio::spawn(admin::serve(admin_listener, state.clone(), stopped.clone()));
        tokio::spawn(follow(state.clone(), stopped));
        state.dns_ready.store(true, Ordering::SeqCst);
        match state.not_ready() {
            None => tracing::info!(dns = %dns.local_addr(), admin = %admin_addr, "sidecar ready"),
            Some(reason) => tracing::warn!(%reason, "sidecar started, not ready"),
        }
        Ok(Sidecar {
            state,
            dns,
            admin_addr,
            stop,
            draining,
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

    /// Whether the tunnel to the router is up.
    pub fn router_connected(&self) -> bool {
        self.state.client.is_up()
    }

    /// Waits up to `timeout` for the tunnel to the router; true if it is up.
    pub async fn wait_router(&self, timeout: Duration) -> bool {
        self.state.client.wait_up(timeout).await
    }

    /// Flows open now.
    pub fn open_flows(&self) -> usize {
        self.state.flows.open()
    }

    /// Drains and stops: readiness turns off, listeners stop accepting, open flows get up to
    /// the drain timeout to finish, then the tunnel, DNS and admin server stop. Returns how many
    /// flows were still open at the deadline.
    pub async fn shutdown(self) -> usize {
        self.state.dns_ready.store(false, Ordering::SeqCst);
        let _ = self.draining.send(true);
        self.state
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close_all();
        let open = self.state.flows.open();
        if open > 0 {
            tracing::info!(open, timeout = ?self.state.config.drain_timeout, "draining flows");
        }
        let left = self
            .state
            .flows
            .drained(self.state.config.drain_timeout)
            .await;
        if left > 0 {
            tracing::warn!(left, "drain deadline passed; cutting open flows");
        }
        let _ = self.stop.send(true);
        self.dns.shutdown().await;
        left
    }
}

async fn follow(state: Arc<State>, mut stopped: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(RELOAD_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                state.reload();
                state.listeners.lock().unwrap_or_else(|p| p.into_inner()).retry();
                state.metrics.router_connected(state.client.is_up());
            }
            _ = crate::shutdown::stopped(&mut stopped) => return,
        }
    }
}
