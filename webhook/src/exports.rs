//! `exported-services` computed from the Services that select a pod: a pure function over the
//! pod and the Services of its namespace, shared by admission and the reconciler.

use std::collections::BTreeMap;

use crate::caches::identity;
use crate::pod::PodFacts;
use k8s_openapi::api::core::v1::{Service, ServicePort as Port, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use servicekeel_api::{Protocol, Service as Entry, ServiceList, ServicePort, TargetPort};

/// The exports of `pod` (in `namespace`) from `services`, sorted by name, with a warning for
/// each port that could not be resolved (left out, never a reason to refuse the pod).
pub fn exports_for<'a>(
    pod: &PodFacts,
    namespace: &str,
    services: impl IntoIterator<Item = &'a Service>,
    cluster: &str,
) -> (ServiceList, Vec<String>) {
    let no_labels = BTreeMap::new();
    let labels = pod.labels().unwrap_or(&no_labels);
    let mut warnings = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(name) = service.metadata.name.as_deref() else {
            continue;
        };
        if service
            .metadata
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != namespace)
        {
            continue;
        }
        // No selector (or an empty one) selects nothing: endpoints are managed elsewhere.
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let mut ports = Vec::new();
        for port in spec.ports.iter().flatten() {
            let label = port.name.clone().unwrap_or_else(|| port.port.to_string());
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    warnings.push(format!(
                        "exported-services: Service {name} port {label}: {other} is not carried; left out"
                    ));
                    continue;
                }
            };
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let target = match &port.target_port {
                None => Some(number),
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(port_name)) => named_port(pod, port_name, protocol),
            };
            let Some(target) = target else {
                warnings.push(format!(
                    "exported-services: Service {name} port {label}: target port {:?} is not a \
                     port of this pod; left out",
                    port.target_port
                ));
                continue;
            };
            ports.push(ServicePort {
                name: port.name.clone(),
                port: number,
                target_port: Some(TargetPort::Number(target)),
                protocol,
            });
        }
        if !ports.is_empty() {
            entries.push(Entry {
                name: name.to_string(),
                namespace: Some(namespace.to_string()),
                cluster: Some(cluster.to_string()),
                ports,
            });
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    (ServiceList { services: entries }, warnings)
}

/// The number of the container port called `name` with `protocol`.
pub fn named_port(pod: &PodFacts, name: &str, protocol: Protocol) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name)
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.as_str()
        })
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Cuts `service` down, in place, to what [`exports_for`] reads (name, namespace, selector, and
/// each port's name, number, protocol and target), beside what says which object and version it
/// is: what the webhook's cache of every Service in the cluster keeps.
pub fn keep_selection(service: &mut Service) {
    let meta = std::mem::take(&mut service.metadata);
    let spec = service.spec.take();
    *service = Service {
        metadata: identity(meta),
        spec: spec.map(|spec| ServiceSpec {
            selector: spec.selector,
            ports: spec.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|p| Port {
                        name: p.name,
                        port: p.port,
                        protocol: p.protocol,
                        target_port: p.target_port,
                        ..Port::default()
                    })
                    .collect()
            }),
            ..ServiceSpec::default()
        }),
        status: None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).unwrap()
    }

    fn front_pod() -> PodFacts {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web", "tier": "front"}},
            "spec": {"containers": [{"name": "a", "image": "i", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "stats", "containerPort": 9125, "protocol": "UDP"}
            ]}]}
        }))
        .unwrap()
    }

    fn shop_services() -> [Service; 5] {
        [
            service(
                json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"selector": {"app": "web"}, "ports": [
                    {"name": "http", "port": 80, "targetPort": "http"},
                    {"name": "stats", "port": 9125, "protocol": "UDP", "targetPort": "stats"},
                    {"name": "grpc", "port": 9000, "targetPort": "grpc"},
                    {"name": "sctp", "port": 7, "protocol": "SCTP"}
                ]}}),
            ),
            service(
                json!({"metadata": {"name": "all-front", "namespace": "shop"}, "spec": {"selector": {"tier": "front"}, "ports": [{"port": 443, "targetPort": 8443}]}}),
            ),
            service(
                json!({"metadata": {"name": "other", "namespace": "shop"}, "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432}]}}),
            ),
            service(
                json!({"metadata": {"name": "manual", "namespace": "shop"}, "spec": {"ports": [{"port": 1}]}}),
            ),
            service(
                json!({"metadata": {"name": "elsewhere", "namespace": "other"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 1}]}}),
            ),
        ]
    }

    #[test]
    fn several_services_numeric_and_named_ports_tcp_and_udp() {
        let (pod, services) = (front_pod(), shop_services());
        let (list, warnings) = exports_for(&pod, "shop", &services, "cluster-a");
        assert_eq!(
            list.to_canonical_json(),
            r#"{"services":[{"name":"all-front","namespace":"shop","cluster":"cluster-a","ports":[{"port":443,"targetPort":8443,"protocol":"TCP"}]},{"name":"web","namespace":"shop","cluster":"cluster-a","ports":[{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"},{"name":"stats","port":9125,"targetPort":9125,"protocol":"UDP"}]}]}"#
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("Service web port grpc: target port"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("SCTP is not carried"), "{warnings:?}");
    }

    #[test]
    fn kept_services_give_the_same_exports_and_hold_little_else() {
        let pod = front_pod();
        let whole = shop_services().map(|mut service| {
            service.metadata.uid = Some("u".into());
            service.metadata.resource_version = Some("3".into());
            service.metadata.managed_fields = Some(vec![Default::default()]);
            service.metadata.annotations = Some(BTreeMap::from([(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "x".repeat(2048),
            )]));
            let spec = service.spec.get_or_insert_default();
            spec.cluster_ip = Some("10.96.0.10".into());
            spec.type_ = Some("ClusterIP".into());
            for port in spec.ports.iter_mut().flatten() {
                port.app_protocol = Some("http".into());
            }
            service.status = Some(Default::default());
            service
        });
        let kept = whole.clone().map(|mut service| {
            keep_selection(&mut service);
            service
        });
        let exports = |services: &[Service]| exports_for(&pod, "shop", services, "cluster-a");
        assert!(!exports(&whole).0.is_empty());
        assert_eq!(exports(&kept), exports(&whole));
        for service in &kept {
            assert_eq!(service.metadata.uid.as_deref(), Some("u"));
            assert_eq!(service.metadata.resource_version.as_deref(), Some("3"));
            assert_eq!(service.metadata.annotations, None);
            assert_eq!(service.metadata.managed_fields, None);
            assert_eq!(service.status, None);
            let spec = service.spec.as_ref().unwrap();
            assert_eq!(spec.cluster_ip, None);
            assert!(
                spec.ports
                    .iter()
                    .flatten()
                    .all(|p| p.app_protocol.is_none())
            );
        }
    }
}
