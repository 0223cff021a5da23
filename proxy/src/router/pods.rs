//! The router's view of the cluster from the API server: every running pod that carries
//! `exported-services`, with its IP, node and Ready condition, turned into registry entries.
//!
//! The view handed to the registry is recomputed after each change ([`super::follow`]). Until
//! the first list has come back the router keeps what its snapshot said; while the API server
//! is unreachable the last view stays in force.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodSpec, PodStatus};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use servicekeel_api::keys::Direction;
use servicekeel_api::tunnel::FlowTarget;
use servicekeel_api::{Protocol, ServiceList, TargetPort};
use tokio::sync::watch as signal;

use super::follow::{follow, identity};
use crate::registry::{Endpoint, Entry};

/// The entries one pod contributes; none when it has no IP or node yet, or its exports do not
/// parse. A named target port is looked up among the pod's container ports.
pub fn entries_from_pod(pod: &Pod, cluster: &str) -> Vec<Entry> {
    let Some(namespace) = pod.metadata.namespace.as_deref() else {
        return Vec::new();
    };
    let Some(annotations) = pod.metadata.annotations.as_ref() else {
        return Vec::new();
    };
    let Some((_, value)) = Direction::Exported.find(annotations) else {
        return Vec::new();
    };
    let status = pod.status.as_ref();
    let ip: Option<IpAddr> = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let (Some(ip), Some(node)) = (ip, node) else {
        return Vec::new();
    };
    let Ok(list) = ServiceList::parse(value) else {
        tracing::debug!(pod = ?pod.metadata.name, "exported-services does not parse; skipped");
        return Vec::new();
    };
    let ready = pod.metadata.deletion_timestamp.is_none()
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
    let mut entries = Vec::new();
    for service in &list.services {
        let key = service.key(namespace, cluster);
        for port in &service.ports {
            let target_port = match &port.target_port {
                None => Some(port.port),
                Some(TargetPort::Number(n)) => Some(*n),
                Some(TargetPort::Name(name)) => container_port(pod, name, port.protocol),
            };
            let Some(target_port) = target_port else {
                continue;
            };
            entries.push((
                FlowTarget {
                    service: key.clone(),
                    port: port.port,
                    protocol: port.protocol,
                },
                Endpoint {
                    addr: SocketAddr::new(ip, target_port),
                    node: node.clone(),
                    ready,
                },
            ));
        }
    }
    entries
}

/// Cuts `pod` down, in place, to what [`entries_from_pod`] reads: its `exported-services`
/// annotation, node, container ports, IP, Ready condition and deletion, beside its name and what
/// says which object and version it is. Of a pod that exports nothing only the latter is kept.
pub fn keep_entry_fields(pod: &mut Pod) {
    let mut meta = std::mem::take(&mut pod.metadata);
    let exported = meta
        .annotations
        .as_ref()
        .and_then(|annotations| Direction::Exported.find(annotations))
        .map(|(key, value)| (key.to_string(), value.to_string()));
    let deletion = meta.deletion_timestamp.take();
    let (spec, status) = (pod.spec.take(), pod.status.take());
    *pod = Pod {
        metadata: identity(meta),
        ..Pod::default()
    };
    let Some(exported) = exported else {
        return;
    };
    pod.metadata.annotations = Some(BTreeMap::from([exported]));
    pod.metadata.deletion_timestamp = deletion;
    pod.spec = spec.map(|spec| PodSpec {
        node_name: spec.node_name,
        containers: spec
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    pod.status = status.map(|status| PodStatus {
        pod_ip: status.pod_ip,
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..PodCondition::default()
                })
                .collect()
        }),
        ..PodStatus::default()
    });
}

fn container_port(pod: &Pod, name: &str, protocol: Protocol) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name)
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.as_str()
        })
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Every entry of the pods in `store`, sorted.
pub fn entries(store: &Store<Pod>, cluster: &str) -> Vec<Entry> {
    let mut all: Vec<Entry> = store
        .state()
        .iter()
        .flat_map(|pod| entries_from_pod(pod, cluster))
        .collect();
    all.sort();
    all
}

/// Watches running pods and hands the cluster view to `apply` after the first complete list
/// and after every change, until `stop`.
pub async fn run(
    client: Client,
    cluster: String,
    apply: Arc<dyn Fn(Vec<Entry>) + Send + Sync>,
    stop: signal::Receiver<bool>,
) {
    follow(
        Api::<Pod>::all(client),
        watcher::Config::default().fields("status.phase=Running"),
        "pods",
        keep_entry_fields,
        |store| apply(entries(store, &cluster)),
        stop,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotation: &str, ready: &str, ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-0",
                "namespace": "shop",
                "annotations": {"servicekeel.io/exported-services": annotation},
            },
            "spec": {
                "nodeName": "edge-2",
                "containers": [{"name": "web", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
                ]}],
            },
            "status": {
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": ready}],
            },
        }))
        .unwrap()
    }

    fn shown(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|(t, e)| format!("{t} {} {} {}", e.addr, e.node, e.ready))
            .collect()
    }

    #[test]
    fn exports_become_endpoints_with_named_ports_resolved() {
        let exported = "services: [{name: web, ports: [{port: 80, targetPort: http}, {port: 53, targetPort: dns, protocol: UDP}, {port: 9, targetPort: nope}, {port: 443}]}]";
        assert_eq!(
            shown(&entries_from_pod(
                &pod(exported, "True", Some("10.244.2.9")),
                "edge"
            )),
            [
                "web.shop.edge:80/TCP 10.244.2.9:8080 edge-2 true",
                "web.shop.edge:53/UDP 10.244.2.9:5353 edge-2 true",
                "web.shop.edge:443/TCP 10.244.2.9:443 edge-2 true",
            ]
        );
        assert_eq!(
            shown(&entries_from_pod(
                &pod(
                    "services: [{name: web, ports: [{port: 80}]}]",
                    "False",
                    Some("10.244.2.9")
                ),
                "edge"
            )),
            ["web.shop.edge:80/TCP 10.244.2.9:80 edge-2 false"]
        );
    }

    #[test]
    fn a_kept_pod_gives_the_entries_of_the_whole_one_and_holds_little_else() {
        let exported = "services: [{name: web, ports: [{port: 80, targetPort: http}, {port: 53, targetPort: dns, protocol: UDP}]}]";
        for (ready, deleted) in [("True", false), ("False", false), ("True", true)] {
            let mut whole = pod(exported, ready, Some("10.244.2.9"));
            let value = serde_json::json!({
                "metadata": {
                    "uid": "u-1", "resourceVersion": "42",
                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096)},
                    "managedFields": [{"manager": "kubelet"}]
                },
                "spec": {"containers": [{"name": "web", "image": "web:1", "env": [{"name": "A", "value": "1"}]}]},
                "status": {
                    "phase": "Running",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                    "containerStatuses": [{"name": "web", "image": "web:1", "imageID": "sha256:1", "ready": true, "restartCount": 0}]
                }
            });
            let extra: Pod = serde_json::from_value(value).unwrap();
            whole.metadata.uid = extra.metadata.uid;
            whole.metadata.resource_version = extra.metadata.resource_version;
            whole.metadata.managed_fields = extra.metadata.managed_fields;
            whole
                .metadata
                .annotations
                .as_mut()
                .unwrap()
                .extend(extra.metadata.annotations.unwrap());
            whole.spec.as_mut().unwrap().containers[0].image = Some("web:1".into());
            let status = whole.status.as_mut().unwrap();
            status.container_statuses = extra.status.as_ref().unwrap().container_statuses.clone();
            status
                .conditions
                .as_mut()
                .unwrap()
                .extend(extra.status.unwrap().conditions.unwrap());
            if deleted {
                whole.metadata.deletion_timestamp =
                    serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).unwrap();
            }
            let mut kept = whole.clone();
            keep_entry_fields(&mut kept);
            let entries = shown(&entries_from_pod(&whole, "edge"));
            assert_eq!(entries.len(), 2);
            assert_eq!(shown(&entries_from_pod(&kept, "edge")), entries);
            assert_eq!(kept.metadata.annotations.as_ref().unwrap().len(), 1);
            assert_eq!(kept.metadata.uid.as_deref(), Some("u-1"));
            assert_eq!(kept.metadata.resource_version.as_deref(), Some("42"));
            assert_eq!(kept.metadata.managed_fields, None);
            assert_eq!(kept.spec.as_ref().unwrap().containers[0].image, None);
            let status = kept.status.as_ref().unwrap();
            assert_eq!(status.container_statuses, None);
            assert_eq!(status.conditions.as_ref().unwrap().len(), 1);
        }

        let mut plain = pod(exported, "True", Some("10.244.2.9"));
        plain.metadata.annotations = Some(BTreeMap::from([("a".to_string(), "b".to_string())]));
        keep_entry_fields(&mut plain);
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-0", "namespace": "shop"}})
        );
    }

    #[test]
    fn pods_without_an_ip_or_with_bad_exports_give_nothing() {
        assert!(
            entries_from_pod(
                &pod("services: [{name: web, ports: [{port: 80}]}]", "True", None),
                "edge"
            )
            .is_empty()
        );
        assert!(
            entries_from_pod(
                &pod("services: [{name: Web}]", "True", Some("10.0.0.1")),
                "edge"
            )
            .is_empty()
        );
        assert!(entries_from_pod(&Pod::default(), "edge").is_empty());
    }
}
