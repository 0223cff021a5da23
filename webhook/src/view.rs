//! What the webhook knows of the cluster beyond the review itself: namespace defaults and the
//! Services that select a pod. A trait, because this is the seam the offline command and the
//! tests swap; the server's implementation is the watch-backed [`crate::caches::Caches`].

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use servicekeel_api::ServiceList;

use crate::config::Config;
use crate::exports::exports_for;
use crate::inject::{InjectError, Injection, Target, inject};
use crate::pod::PodFacts;

pub trait ClusterView: Send + Sync + std::fmt::Debug {
    /// The namespace's `servicekeel.io/default-imported-services`: `Ok(None)` when it has none
    /// (or is not known), `Err` with a message naming the namespace and field when invalid.
    fn namespace_defaults(&self, namespace: &str) -> Result<Option<ServiceList>, String>;

    /// The Services of `namespace`, or `None` while they are not known yet.
    fn services(&self, namespace: &str) -> Option<Vec<Arc<Service>>>;

    /// Whether `namespace` enforces a Pod Security level that forbids `hostPath` volumes
    /// (`baseline` or `restricted`); false when not known.
    fn forbids_host_path(&self, namespace: &str) -> bool;
}

/// The namespace label holding the Pod Security level enforced there.
pub const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";

/// Whether a namespace with these labels forbids `hostPath` volumes.
pub fn labels_forbid_host_path(
    labels: Option<&std::collections::BTreeMap<String, String>>,
) -> bool {
    matches!(
        labels
            .and_then(|l| l.get(POD_SECURITY_ENFORCE))
            .map(String::as_str),
        Some("baseline" | "restricted")
    )
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

    fn forbids_host_path(&self, _namespace: &str) -> bool {
        false
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

/// What injection reads of the view for one pod: the namespace's default imports, the exports
/// computed from the Services selecting the pod, and how its sidecar reaches the router. With
/// the pod, its namespace and the config, this is everything [`inject`] depends on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    pub namespace_defaults: Option<ServiceList>,
    /// `None` while the namespace's Services are not known (a cache not synced yet): no
    /// exports; the reconciler adds them later.
    pub exports: Option<ServiceList>,
    pub router_over_tcp: bool,
}

impl Found {
    /// What `view` knows for `pod` of `namespace`, and the problems met on the way (an invalid
    /// namespace default, a Service port that cannot be resolved), which are warnings, never a
    /// refusal.
    pub fn look(
        pod: &PodFacts,
        namespace: &str,
        config: &Config,
        view: &dyn ClusterView,
    ) -> (Found, Vec<String>) {
        let mut warnings = Vec::new();
        let namespace_defaults = view
            .namespace_defaults(namespace)
            .unwrap_or_else(|message| {
                tracing::warn!(ns = namespace, "{message}");
                warnings.push(message);
                None
            });
        let exports = view.services(namespace).map(|services| {
            let (list, export_warnings) = exports_for(
                pod,
                namespace,
                services.iter().map(|s| s.as_ref()),
                &config.cluster_name,
            );
            warnings.extend(export_warnings);
            list
        });
        let found = Found {
            namespace_defaults,
            exports,
            router_over_tcp: view.forbids_host_path(namespace),
        };
        (found, warnings)
    }

    /// The target of injecting a pod of `namespace` with what was found.
    pub fn target<'a>(&'a self, namespace: &'a str) -> Target<'a> {
        Target {
            namespace,
            namespace_defaults: self.namespace_defaults.as_ref(),
            exports: self.exports.as_ref(),
            router_over_tcp: self.router_over_tcp,
        }
    }
}

/// Injects `pod` of `namespace` with what `view` knows ([`Found::look`]); the view's warnings
/// come first among the patch's.
pub fn inject_in_view(
    pod: &PodFacts,
    namespace: &str,
    config: &Config,
    view: &dyn ClusterView,
) -> Result<Injection, InjectError> {
    let (found, mut warnings) = Found::look(pod, namespace, config, view);
    Ok(match inject(pod, &found.target(namespace), config)? {
        Injection::Patch {
            patch,
            warnings: inject_warnings,
        } => {
            warnings.extend(inject_warnings);
            Injection::Patch { patch, warnings }
        }
        skip => skip,
    })
}
