//! Keeps `exported-services` right after admission: a Service created, edited or deleted, or a
//! pod's labels changed, re-computes the exports of the injected pods it concerns. Only injected
//! pods are touched, only when the value differs, and only by the replica holding the lease.
//! Entries the pod's author wrote (listed in the status annotation) are kept as written.
//!
//! The controller watches every pod in the cluster, and its cache keeps each one for as long as
//! it lives; so the cache keeps only what reconciling reads (`cached`): of an injected pod its
//! facts, of any other its name.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use servicekeel_api::ServiceList;
use servicekeel_api::keys::{self, Direction};
use tokio::sync::watch;

use crate::caches::{Caches, ServiceEvents, identity};
use crate::config::Config;
use crate::exports::exports_for;
use crate::inject::Status;
use crate::leader::Leadership;
use crate::pod::{PodFacts, keep_facts};
use crate::view::ClusterView;

/// How soon a replica that is not the leader, or whose caches are not ready, looks again.
const RETRY: Duration = Duration::from_secs(2);

struct Context {
    client: Client,
    caches: Caches,
    config: Arc<Config>,
    leadership: Leadership,
}

#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error("cannot patch pod {namespace}/{name}: {cause}")]
    Patch {
        namespace: String,
        name: String,
        cause: kube::Error,
    },
}

/// Runs the reconciler until `shutdown`.
pub async fn run(
    client: Client,
    caches: Caches,
    service_events: ServiceEvents,
    config: Arc<Config>,
    leadership: Leadership,
    mut shutdown: watch::Receiver<bool>,
) {
    let (pods, writer) = reflector::store();
    let watched =
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).modify(cached);
    let controller =
        Controller::for_stream(reflector(writer, watched).applied_objects(), pods.clone());
    let context = Arc::new(Context {
        client: client.clone(),
        caches,
        config,
        leadership,
    });
    controller
        .watches_stream(service_events, move |service: Service| {
            let namespace = service.metadata.namespace.clone();
            pods.state()
                .into_iter()
                .filter(|pod| pod.metadata.namespace == namespace && is_injected(pod))
                .map(|pod| ObjectRef::from_obj(&*pod))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "reconciler event");
            }
            futures::future::ready(())
        })
        .await;
}

fn is_injected(pod: &Pod) -> bool {
    pod.annotations().contains_key(keys::STATUS)
}

/// What the cache keeps of a watched pod: of an injected one, what its exports are computed
/// from ([`keep_facts`]); of any other, which pod it is and nothing else, since reconciling it
/// ends at [`is_injected`]. A pod is looked at anew on every change, so one that comes to be
/// injected is kept as one from then on.
fn cached(pod: &mut Pod) {
    if is_injected(pod) {
        keep_facts(pod);
    } else {
        let meta = std::mem::take(&mut pod.metadata);
        *pod = Pod {
            metadata: identity(meta),
            ..Pod::default()
        };
    }
}

async fn reconcile(pod: Arc<Pod>, context: Arc<Context>) -> Result<Action, ReconcileError> {
    if !is_injected(&pod) || pod.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if !context.leadership.is_leader() {
        return Ok(Action::requeue(RETRY));
    }
    let namespace = pod.namespace().unwrap_or_default();
    let Some(services) = context.caches.services(&namespace) else {
        return Ok(Action::requeue(RETRY));
    };
    let desired = desired_exports(
        &pod,
        &namespace,
        services.iter().map(|s| s.as_ref()),
        &context.config.cluster_name,
    );
    let current = pod.annotations().get(keys::EXPORTED_SERVICES);
    if desired.as_ref() == current {
        return Ok(Action::await_change());
    }
    let name = pod.name_any();
    let patch = json!({ "metadata": { "annotations": { keys::EXPORTED_SERVICES: desired } } });
    Api::<Pod>::namespaced(context.client.clone(), &namespace)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|cause| ReconcileError::Patch {
            namespace: namespace.clone(),
            name: name.clone(),
            cause,
        })?;
    tracing::info!(ns = %namespace, %name, "exported-services updated");
    Ok(Action::await_change())
}

fn error_policy(_pod: Arc<Pod>, error: &ReconcileError, _context: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(RETRY)
}

/// The `exported-services` value an injected pod should carry: the entries its author wrote,
/// then the exports computed from `services`. `None` when there is nothing to export.
pub fn desired_exports<'a>(
    pod: &Pod,
    namespace: &str,
    services: impl IntoIterator<Item = &'a Service>,
    cluster: &str,
) -> Option<String> {
    let annotations = pod.annotations();
    let user_keys: HashSet<String> = annotations
        .get(keys::STATUS)
        .and_then(|status| serde_json::from_str::<Status>(status).ok())
        .map(|status| status.user_exported.into_iter().collect())
        .unwrap_or_default();
    let current = Direction::Exported
        .find(annotations)
        .and_then(|(_, text)| ServiceList::parse(text).ok())
        .unwrap_or_default();
    let user = ServiceList {
        services: current
            .services
            .into_iter()
            .filter(|s| user_keys.contains(&s.key(namespace, cluster).to_string()))
            .collect(),
    };
    let (computed, _) = exports_for(&PodFacts::from(pod), namespace, services, cluster);
    let desired = user.with_defaults(&computed, namespace, cluster);
    (!desired.is_empty()).then(|| desired.to_canonical_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "labels": {"app": "web"}, "annotations": annotations},
            "spec": {"containers": [{"name": "a", "image": "i"}]}
        }))
        .unwrap()
    }

    fn web_service(port: i32) -> Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": port}]}}))
        .unwrap()
    }

    #[test]
    fn computed_exports_follow_the_services() {
        let injected =
            pod(json!({"servicekeel.io/status": r#"{"sidecarMode":"native","version":"0.1.0"}"#}));
        assert_eq!(
            desired_exports(&injected, "shop", &[web_service(80)], "c").as_deref(),
            Some(
                r#"{"services":[{"name":"web","namespace":"shop","cluster":"c","ports":[{"port":80,"targetPort":80,"protocol":"TCP"}]}]}"#
            )
        );
        assert_eq!(desired_exports(&injected, "shop", &[], "c"), None);
    }

    #[test]
    fn the_cache_keeps_an_injected_pods_exports_and_only_the_name_of_others() {
        let mut injected =
            pod(json!({"servicekeel.io/status": r#"{"sidecarMode":"native","version":"0.1.0"}"#}));
        injected.metadata.namespace = Some("shop".into());
        injected.metadata.managed_fields = Some(vec![Default::default()]);
        injected.spec.as_mut().unwrap().containers[0].ports = Some(vec![
            serde_json::from_value(json!({"name": "http", "containerPort": 8080})).unwrap(),
        ]);
        let named_port = serde_json::from_value::<Service>(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}
        }))
        .unwrap();
        let mut kept = injected.clone();
        cached(&mut kept);
        let exports = |pod: &Pod| desired_exports(pod, "shop", [&named_port], "c");
        assert!(exports(&injected).is_some_and(|e| e.contains("8080")));
        assert_eq!(exports(&kept), exports(&injected));
        assert!(is_injected(&kept));
        assert_eq!(kept.metadata.managed_fields, None);
        assert_eq!(kept.spec.as_ref().unwrap().containers[0].image, None);

        let mut other = pod(json!({"note": "x".repeat(4096)}));
        other.metadata.namespace = Some("shop".into());
        other.metadata.uid = Some("u-2".into());
        other.metadata.resource_version = Some("7".into());
        cached(&mut other);
        assert_eq!(
            serde_json::to_value(&other).unwrap(),
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "shop", "uid": "u-2", "resourceVersion": "7"}})
        );
        assert!(!is_injected(&other));
    }

    #[test]
    fn entries_the_author_wrote_are_kept_and_win() {
        let own = r#"{"services":[{"name":"web","ports":[{"port":8000}]},{"name":"extra","ports":[{"port":1}]}]}"#;
        let injected = pod(json!({
            "servicekeel.io/status": r#"{"sidecarMode":"native","version":"0.1.0","userExported":["web.shop.c"]}"#,
            "servicekeel.io/exported-services": own,
        }));
        // `extra` was computed from a Service that is gone; `web` is the author's.
        assert_eq!(
            desired_exports(&injected, "shop", &[web_service(80)], "c").as_deref(),
            Some(r#"{"services":[{"name":"web","ports":[{"port":8000,"protocol":"TCP"}]}]}"#)
        );
    }
}
