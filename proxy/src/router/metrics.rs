//! The router's Prometheus metrics, prefix `servicekeel_router_`.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use servicekeel_api::Protocol;

use crate::metrics::FlowMetrics;
use crate::tunnel::busy_poll::{Outcomes, PollCounts};
use crate::tunnel::server::{Finished, LinkId};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Outcomes: `completed`, `failed`, `no_endpoint`, `unreachable`.
    flows: FlowMetrics,
    registry_entries: Gauge,
    sidecars: Gauge,
    registered: Mutex<BTreeSet<LinkId>>,
    ejections: Counter,
    ejected: Gauge,
    snapshot_age: Gauge,
    peers: Gauge,
    peers_up: Gauge,
    peer_refusals: Family<ReasonLabels, Counter>,
    sidecar_refusals: Counter,
    busy_polls: Family<PollLabels, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PollLabels {
    /// `tcp` or `udp`.
    relay: &'static str,
    /// `caught` or `missed`.
    outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("servicekeel_router");
        let metrics = Metrics {
            registry: Registry::default(),
            flows: FlowMetrics::default(),
            registry_entries: Gauge::default(),
            sidecars: Gauge::default(),
            registered: Mutex::new(BTreeSet::new()),
            ejections: Counter::default(),
            ejected: Gauge::default(),
            snapshot_age: Gauge::default(),
            peers: Gauge::default(),
            peers_up: Gauge::default(),
            peer_refusals: Family::default(),
            sidecar_refusals: Counter::default(),
            busy_polls: Family::default(),
        };
        registry.register(
            "peers",
            "Links to peer routers and gateways this router keeps",
            metrics.peers.clone(),
        );
        registry.register(
            "peers_up",
            "Links to peer routers and gateways that are up",
            metrics.peers_up.clone(),
        );
        registry.register(
            "peer_refusals",
            "Connections of would-be peer routers refused, by reason",
            metrics.peer_refusals.clone(),
        );
        registry.register(
            "sidecar_refusals",
            "TCP connections to the sidecar port from outside the allowed addresses, refused",
            metrics.sidecar_refusals.clone(),
        );
        registry.register(
            "busy_polls",
            "Busy-polling windows relays opened, by relay (tcp, udp) and outcome (caught: the next \
             bytes or datagram came within the window; missed: it closed with nothing)",
            metrics.busy_polls.clone(),
        );
        metrics.flows.register(&mut registry);
        registry.register(
            "registry_entries",
            "(service port, endpoint) pairs known",
            metrics.registry_entries.clone(),
        );
        registry.register(
            "registered_sidecars",
            "Sidecars with a registration on a live connection",
            metrics.sidecars.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Endpoints taken out of rotation after a failed dial",
            metrics.ejections.clone(),
        );
        registry.register(
            "ejected_endpoints",
            "Endpoints out of rotation now",
            metrics.ejected.clone(),
        );
        registry.register(
            "snapshot_age_seconds",
            "Age of the registry snapshot on disk; -1 when there is none",
            metrics.snapshot_age.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    pub fn flow_opened(&self, protocol: Protocol) {
        self.flows.active(protocol).inc();
    }

    pub fn flow_refused(&self, protocol: Protocol, outcome: &'static str) {
        self.flows.ended(protocol, outcome);
    }

    pub fn flow_finished(&self, protocol: Protocol, finished: &Finished) {
        self.flows.active(protocol).dec();
        let outcome = if finished.result.is_ok() {
            "completed"
        } else {
            "failed"
        };
        self.flows.ended(protocol, outcome);
        let (sent, received) = self.flows.bytes(protocol);
        sent.inc_by(finished.sent);
        received.inc_by(finished.received);
    }

    pub fn registry_entries(&self, n: usize) {
        self.registry_entries.set(n as i64);
    }

    pub fn sidecar_registered(&self, link: LinkId, registered: bool) {
        let mut all = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        if registered {
            all.insert(link);
        } else {
            all.remove(&link);
        }
        self.sidecars.set(all.len() as i64);
    }

    pub fn endpoint_ejected(&self) {
        self.ejections.inc();
    }

    pub fn ejected_now(&self, n: usize) {
        self.ejected.set(n as i64);
    }

    pub fn snapshot_age(&self, age: Option<Duration>) {
        self.snapshot_age
            .set(age.map_or(-1, |a| a.as_secs() as i64));
    }

    pub fn peers(&self, configured: usize, up: usize) {
        self.peers.set(configured as i64);
        self.peers_up.set(up as i64);
    }

    /// `reason`: `plaintext`, `unknown_ca`, `expired`, `no_certificate`, `wrong_identity`,
    /// `other`.
    pub fn peer_refused(&self, reason: &'static str) {
        self.peer_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn sidecar_refused(&self) {
        self.sidecar_refusals.inc();
    }

    /// The counters the relays' busy polling counts its windows in.
    pub fn poll_counts(&self) -> PollCounts {
        let outcomes = |relay| Outcomes {
            caught: self.poll_counter(relay, "caught"),
            missed: self.poll_counter(relay, "missed"),
        };
        PollCounts {
            udp: outcomes("udp"),
            stream: outcomes("tcp"),
        }
    }

    fn poll_counter(&self, relay: &'static str, outcome: &'static str) -> Counter {
        self.busy_polls
            .get_or_create(&PollLabels { relay, outcome })
            .clone()
    }

    pub fn encode(&self) -> String {
        crate::metrics::encode(&self.registry)
    }
}
