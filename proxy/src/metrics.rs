//! The sidecar's Prometheus metrics. Each part registers its own; label values come from fixed
//! sets so cardinality stays bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    dns_queries: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("servicekeel_sidecar");
        let dns_queries = Family::<OutcomeLabels, Counter>::default();
        registry.register("dns_queries", "DNS queries by outcome", dns_queries.clone());
        Metrics {
            registry,
            dns_queries,
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

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
