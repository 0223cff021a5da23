//! The webhook's Prometheus metrics: admission requests by outcome, their latency, those
//! answered from a remembered review, and certificate reloads. Label values come from fixed
//! sets, so cardinality stays bounded.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// What became of an admission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Allowed with the sidecar injected.
    Patched,
    /// Allowed unchanged: opted out, already injected, host network.
    Skipped,
    /// Allowed unchanged: not a pod creation.
    Ignored,
    /// Refused with a message.
    Denied,
    /// Not a valid AdmissionReview (HTTP 400 or 413).
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Skipped => "skipped",
            Outcome::Ignored => "ignored",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Latency buckets in seconds: the webhook's own work is tens of microseconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1,
];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    latency: Histogram,
    remembered: Counter,
    reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("servicekeel_webhook");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission requests by outcome",
            requests.clone(),
        );
        let latency = Histogram::new(LATENCY_BUCKETS.iter().copied());
        registry.register(
            "admission_duration_seconds",
            "Time spent handling an admission request, from body received to response built",
            latency.clone(),
        );
        let remembered = Counter::default();
        registry.register(
            "remembered_reviews",
            "Pod creations answered from a remembered review, as a replica's of it: nothing \
             decoded",
            remembered.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Serving certificate reloads by result",
            reloads.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            remembered,
            reloads,
        }
    }
}

impl Metrics {
    pub fn observe(&self, outcome: Outcome, elapsed: Duration) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// A review answered from a remembered one; counted besides [`Metrics::observe`].
    pub fn remembered_review(&self) {
        self.remembered.inc();
    }

    pub fn certificate_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
