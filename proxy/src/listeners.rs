//! The sidecar's listeners on the local addresses of imported services, one per imported port
//! and protocol. Each TCP connection and each UDP client (by source address) becomes one flow:
//! handed to the router on its Unix socket when it takes it, carried in the tunnel otherwise.
//!
//! [`Listeners::apply`] makes the running set match the imports: new ports are bound, removed
//! ones stop accepting while their open flows carry on, ports that failed to bind are retried.
//! [`Flows`] counts open flows per local address, which tells the allocator whether a removed
//! service's address is still in use, and lets shutdown wait for them to end.

mod tcp;
mod udp;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use servicekeel_api::Protocol;
use servicekeel_api::tunnel::FlowTarget;
use tokio::sync::watch;

use crate::metrics::{FlowOutcome, Metrics};
use crate::tunnel::client::{Client, OpenError};
use crate::tunnel::handoff::Giver;

/// Connections the kernel queues before the sidecar accepts them: applications opening many
/// connections at once should not wait out SYN retries.
const TCP_BACKLOG: u32 = 4096;
/// Datagrams queued per UDP flow while the tunnel catches up.
const UDP_QUEUE: usize = 256;

/// One listener the imports ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub addr: SocketAddrV4,
    pub target: FlowTarget,
}

/// What the listeners share.
#[derive(Debug, Clone)]
pub struct Context {
    pub client: Client,
    /// Hands TCP connections to the router instead of carrying them, when it takes them.
    pub tcp_handoff: Option<Arc<Giver>>,
    /// Hands UDP clients to the router instead of carrying their datagrams, when it takes them.
    pub udp_handoff: Option<Arc<Giver>>,
    pub flows: Arc<Flows>,
    pub metrics: Arc<Metrics>,
    pub udp_idle: Duration,
    /// Most UDP clients one UDP listener carries at once.
    pub udp_max_clients: usize,
    /// Turns true when the sidecar shuts down.
    pub draining: watch::Receiver<bool>,
}

#[derive(Debug)]
struct Running {
    target: FlowTarget,
    stop: watch::Sender<bool>,
}

#[derive(Debug)]
pub struct Listeners {
    context: Context,
    running: HashMap<(SocketAddrV4, Protocol), Running>,
    /// Bind failures of wanted listeners, retried on every apply.
    failed: BTreeMap<(SocketAddrV4, Protocol), String>,
    wanted: Vec<Wanted>,
}

impl Listeners {
    pub fn new(context: Context) -> Self {
        Listeners {
            context,
            running: HashMap::new(),
            failed: BTreeMap::new(),
            wanted: Vec::new(),
        }
    }

    /// Makes the running listeners those of `wanted`.
    pub fn apply(&mut self, wanted: Vec<Wanted>) {
        let keys: HashMap<(SocketAddrV4, Protocol), &Wanted> = wanted
            .iter()
            .map(|w| ((w.addr, w.target.protocol), w))
            .collect();
        self.running.retain(|key, running| {
            let keep = keys.get(key).is_some_and(|w| w.target == running.target);
            if !keep {
                // Stops accepting; flows already open carry on.
                let _ = running.stop.send(true);
                tracing::info!(addr = %key.0, protocol = %key.1, "listener closed");
            }
            keep
        });
        self.failed.clear();
        for want in &wanted {
            let key = (want.addr, want.target.protocol);
            if self.running.contains_key(&key) {
                continue;
            }
            match self.start(want) {
                Ok(running) => {
                    tracing::info!(addr = %want.addr, target = %want.target, "listening");
                    self.running.insert(key, running);
                }
                Err(error) => {
                    let error = format!("{} {}: {error}", want.target.protocol, want.addr);
                    tracing::warn!(%error, "cannot listen; retrying");
                    self.failed.insert(key, error);
                }
            }
        }
        self.wanted = wanted;
    }

    /// Binds listeners that failed before.
    pub fn retry(&mut self) {
        if !self.failed.is_empty() {
            self.apply(self.wanted.clone());
        }
    }

    /// Listeners the imports ask for that are not bound, with why.
    pub fn problems(&self) -> Vec<String> {
        self.failed.values().cloned().collect()
    }

    /// Stops accepting everywhere; open flows carry on.
    pub fn close_all(&mut self) {
        for (_, running) in self.running.drain() {
            let _ = running.stop.send(true);
        }
        self.failed.clear();
        self.wanted.clear();
    }

    fn start(&self, want: &Wanted) -> std::io::Result<Running> {
        let (stop, stopped) = watch::channel(false);
        let context = self.context.clone();
        match want.target.protocol {
            Protocol::Tcp => {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                socket.bind(want.addr.into())?;
                let listener = socket.listen(TCP_BACKLOG)?;
                tokio::spawn(tcp::accept(listener, want.target.clone(), context, stopped));
            }
            Protocol::Udp => {
                let socket = tokio::net::UdpSocket::from_std(udp::bound_to(want.addr)?.into())?;
                tokio::spawn(udp::serve(socket, want.target.clone(), context, stopped));
            }
        }
        Ok(Running {
            target: want.target.clone(),
            stop,
        })
    }
}

/// What a flow that could not be opened counts as.
fn outcome_of(error: &OpenError) -> FlowOutcome {
    match error {
        OpenError::Unavailable { .. } => FlowOutcome::Unavailable,
        OpenError::Refused { .. } => FlowOutcome::Refused,
        OpenError::Broken { .. } => FlowOutcome::Failed,
    }
}

/// Open flows, per local address, up to a limit for all of them.
#[derive(Debug)]
pub struct Flows {
    per_address: Mutex<HashMap<Ipv4Addr, usize>>,
    total: watch::Sender<usize>,
    limit: usize,
}

/// A flow refused because `limit` flows are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtLimit {
    pub limit: usize,
}

/// One open flow; dropping it ends the count.
#[derive(Debug)]
pub struct FlowGuard {
    flows: Arc<Flows>,
    ip: Ipv4Addr,
    active: prometheus_client::metrics::gauge::Gauge,
}

impl Flows {
    pub fn with_limit(limit: usize) -> Self {
        Flows {
            per_address: Mutex::default(),
            total: watch::Sender::new(0),
            limit,
        }
    }

    /// Counts a new flow to `ip`, unless `limit` flows are open already.
    pub fn begin(
        self: &Arc<Self>,
        ip: Ipv4Addr,
        metrics: &Metrics,
        protocol: Protocol,
    ) -> Result<FlowGuard, AtLimit> {
        let mut per_address = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if *self.total.borrow() >= self.limit {
            return Err(AtLimit { limit: self.limit });
        }
        *per_address.entry(ip).or_default() += 1;
        self.total.send_modify(|n| *n += 1);
        drop(per_address);
        let active = metrics.active(protocol);
        active.inc();
        Ok(FlowGuard {
            flows: self.clone(),
            ip,
            active,
        })
    }

    /// Whether flows to `ip` are open.
    pub fn in_use(&self, ip: Ipv4Addr) -> bool {
        self.per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&ip)
    }

    pub fn open(&self) -> usize {
        *self.total.borrow()
    }

    /// Waits until no flow is open or `timeout` passes; returns how many are still open.
    pub async fn drained(&self, timeout: Duration) -> usize {
        let mut total = self.total.subscribe();
        let _ = tokio::time::timeout(timeout, total.wait_for(|n| *n == 0)).await;
        self.open()
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        let mut per_address = self
            .flows
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_address.remove(&self.ip);
            }
        }
        drop(per_address);
        self.flows.total.send_modify(|n| *n = n.saturating_sub(1));
        self.active.dec();
    }
}
