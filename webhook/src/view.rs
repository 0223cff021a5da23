//! What the webhook knows of the cluster beyond the review itself: namespace defaults and the
//! Services that select a pod. A trait, because this is the seam the offline command and the
//! tests swap; the server's implementation is the watch-backed [`crate::caches::Caches`].

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use servicekeel_api::ServiceList;

pub trait ClusterView: Send + Sync + std::fmt::Debug {
    /// The namespace's `servicekeel.io/default-imported-services`: `Ok(None)` when it has none
    /// (or is not known), `Err` with a message naming the namespace and field when invalid.
    fn namespace_defaults(&self, namespace: &str) -> Result<Option<ServiceList>, String>;

    /// The Services of `namespace`, or `None` while they are not known yet.
    fn services(&self, namespace: &str) -> Option<Vec<Arc<Service>>>;
}

/// No cluster: no namespace defaults, exports unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCluster;

impl ClusterView for NoCluster {
    fn namespace_defaults(&self, _namespace: &str) -> Result<Option<ServiceList>, String> {
        Ok(None)
    }

    fn services(&self, _namespace: &str) -> Option<Vec<Arc<Service>>> {
        None
    }
}

/// Parses a namespace's default imports, with a message naming the namespace and field.
pub fn parse_namespace_defaults(namespace: &str, value: &str) -> Result<ServiceList, String> {
    ServiceList::parse(value).map_err(|error| {
        format!(
            "namespace {namespace}: {}: {error}; its defaults are ignored",
            servicekeel_api::keys::DEFAULT_IMPORTED_SERVICES
        )
    })
}
