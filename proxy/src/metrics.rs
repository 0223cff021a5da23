//! The sidecar's Prometheus metrics. Each part registers its own; label values come from fixed
//! sets so cardinality stays bounded.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use servicekeel_api::Protocol;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What became of a DNS query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DnsOutcome {
    /// An imported name, answered locally.
    Local,
    /// Forwarded, and the upstream's answer passed back.
    Forwarded,
    /// Forwarded, but the upstream failed: SERVFAIL.
    UpstreamFailed,
    /// Refused or malformed: REFUSED, FORMERR, NOTIMP.
    Rejected,
}

impl DnsOutcome {
    fn as_str(self) -> &'static str {
        match self {
            DnsOutcome::Local => "local",
            DnsOutcome::Forwarded => "forwarded",
            DnsOutcome::UpstreamFailed => "upstream_failed",
            DnsOutcome::Rejected => "rejected",
        }
    }
}

/// What became of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowOutcome {
    /// Carried and ended cleanly (for UDP: went idle or was ended).
    Completed,
    /// Opened, then broken by an error on either side.
    Failed,
    /// The router answered with a refusal (no endpoint, endpoint unreachable).
    Refused,
    /// No connection to the router.
    Unavailable,
    /// Not carried: the sidecar's flow limit was reached.
    Limited,
    /// Handed to the router, which carries it from there (TCP on the router's Unix socket).
    HandedOff,
}

impl FlowOutcome {
    fn as_str(self) -> &'static str {
        match self {
            FlowOutcome::Completed => "completed",
            FlowOutcome::Failed => "failed",
            FlowOutcome::Refused => "refused",
            FlowOutcome::Unavailable => "unavailable",
            FlowOutcome::Limited => "limit",
            FlowOutcome::HandedOff => "handed_off",
        }
    }
}

/// Why a UDP datagram from an application was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The listener already has its maximum of flows.
    FlowLimit,
    /// The flow's queue is full (the tunnel is slower than the application).
    QueueFull,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlowLabels {
    protocol: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ByteLabels {
    protocol: &'static str,
    /// `sent` (client to service) or `received`.
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

/// The flow metrics the sidecar and the router both keep: `flows_total{protocol,outcome}`,
/// `flow_bytes_total{protocol,direction}` and `active_flows{protocol}`.
#[derive(Debug, Default, Clone)]
pub struct FlowMetrics {
    flows: Family<FlowLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    active: Family<ProtocolLabels, Gauge>,
}

impl FlowMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flows",
            "Flows ended or refused, by protocol and outcome",
            self.flows.clone(),
        );
        registry.register(
            "flow_bytes",
            "Payload bytes carried, by protocol and direction",
            self.bytes.clone(),
        );
        registry.register(
            "active_flows",
            "Flows open now, by protocol",
            self.active.clone(),
        );
    }

    pub fn ended(&self, protocol: Protocol, outcome: &'static str) {
        self.flows
            .get_or_create(&FlowLabels {
                protocol: protocol.as_str(),
                outcome,
            })
            .inc();
    }

    /// The active-flows gauge of `protocol`.
    pub fn active(&self, protocol: Protocol) -> Gauge {
        self.active
            .get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            })
            .clone()
    }

    /// The byte counters of `protocol`: (sent, received).
    pub fn bytes(&self, protocol: Protocol) -> (Counter, Counter) {
        let counter = |direction| {
            self.bytes
                .get_or_create(&ByteLabels {
                    protocol: protocol.as_str(),
                    direction,
                })
                .clone()
        };
        (counter("sent"), counter("received"))
    }
}

/// The Prometheus text exposition of `registry`.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    dns_queries: Family<OutcomeLabels, Counter>,
    flows: FlowMetrics,
    dropped: Family<ReasonLabels, Counter>,
    router_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("servicekeel_sidecar");
        let metrics = Metrics {
            dns_queries: Family::default(),
            flows: FlowMetrics::default(),
            dropped: Family::default(),
            router_connected: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "dns_queries",
            "DNS queries by outcome",
            metrics.dns_queries.clone(),
        );
        metrics.flows.register(&mut registry);
        registry.register(
            "udp_datagrams_dropped",
            "Datagrams from applications dropped, by reason",
            metrics.dropped.clone(),
        );
        registry.register(
            "router_connected",
            "1 while the tunnel to the node router is up",
            metrics.router_connected.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    pub fn dns_query(&self, outcome: DnsOutcome) {
        self.dns_queries
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn flow_ended(&self, protocol: Protocol, outcome: FlowOutcome) {
        self.flows.ended(protocol, outcome.as_str());
    }

    /// The active-flows gauge of `protocol`.
    pub fn active(&self, protocol: Protocol) -> Gauge {
        self.flows.active(protocol)
    }

    /// The byte counters of `protocol`: (sent, received).
    pub fn bytes(&self, protocol: Protocol) -> (Counter, Counter) {
        self.flows.bytes(protocol)
    }

    pub fn datagram_dropped(&self, reason: DropReason) {
        let reason = match reason {
            DropReason::FlowLimit => "flow_limit",
            DropReason::QueueFull => "queue_full",
        };
        self.dropped.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn router_connected(&self, up: bool) {
        self.router_connected.set(i64::from(up));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// A stream whose reads count as sent and whose writes count as received, as they happen, so
/// a long connection shows its traffic before it ends.
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    sent: Counter,
    received: Counter,
}

impl<S> Metered<S> {
    pub fn new(inner: S, (sent, received): (Counter, Counter)) -> Self {
        Metered {
            inner,
            sent,
            received,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        self.sent.inc_by((buf.filled().len() - before) as u64);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.received.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
