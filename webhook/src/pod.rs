//! What ServiceKeel reads of a pod, and nothing more: decoding a whole `Pod` (managed fields,
//! tolerations, volume sources, every container field) was a large part of a review, for fields
//! injection never looks at. Everything else in the object is skipped while decoding; the
//! apiserver has already validated it, and the patch only adds to it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodDNSConfig, PodSecurityContext, PodSpec, Sysctl, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Deserialize;

use crate::caches::identity;

/// A pod as injection and exports see it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PodFacts {
    /// `None` when the object has no `metadata` at all (then the patch writes it whole).
    pub metadata: Option<Metadata>,
    pub spec: Option<Spec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: Option<String>,
    pub generate_name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub owner_references: Option<Vec<Owner>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Owner {
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<ContainerFacts>,
    pub init_containers: Option<Vec<ContainerFacts>>,
    pub volumes: Option<Vec<Named>>,
    pub security_context: Option<SecurityContext>,
    pub dns_policy: Option<String>,
    pub dns_config: Option<PodDNSConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ContainerFacts {
    #[serde(default)]
    pub name: String,
    pub ports: Option<Vec<ContainerPort>>,
}

/// A volume, by name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Named {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SecurityContext {
    pub sysctls: Option<Vec<Sysctl>>,
}

impl PodFacts {
    pub fn annotations(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()?.annotations.as_ref()
    }

    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()?.labels.as_ref()
    }
}

/// The facts of a decoded `Pod` (the reconciler's cache and the offline command hold whole
/// pods). A `Pod` cannot tell an empty `metadata` from a missing one; both become `None`, so a
/// patch writes `metadata` whole, which is right for either.
impl From<&Pod> for PodFacts {
    fn from(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let containers = |list: &[k8s_openapi::api::core::v1::Container]| {
            list.iter()
                .map(|c| ContainerFacts {
                    name: c.name.clone(),
                    ports: c.ports.clone(),
                })
                .collect::<Vec<_>>()
        };
        let has_metadata = *meta != ObjectMeta::default();
        PodFacts {
            metadata: has_metadata.then(|| Metadata {
                name: meta.name.clone(),
                generate_name: meta.generate_name.clone(),
                namespace: meta.namespace.clone(),
                labels: meta.labels.clone(),
                annotations: meta.annotations.clone(),
                owner_references: meta.owner_references.as_ref().map(|owners| {
                    owners
                        .iter()
                        .map(|o| Owner {
                            kind: o.kind.clone(),
                        })
                        .collect()
                }),
            }),
            spec: pod.spec.as_ref().map(|spec| Spec {
                host_network: spec.host_network,
                containers: containers(&spec.containers),
                init_containers: spec.init_containers.as_deref().map(containers),
                volumes: spec.volumes.as_ref().map(|volumes| {
                    volumes
                        .iter()
                        .map(|v| Named {
                            name: v.name.clone(),
                        })
                        .collect()
                }),
                security_context: spec.security_context.as_ref().map(|s| SecurityContext {
                    sysctls: s.sysctls.clone(),
                }),
                dns_policy: spec.dns_policy.clone(),
                dns_config: spec.dns_config.clone(),
            }),
        }
    }
}

/// Drops from `pod` all that [`PodFacts`] does not read, keeping besides only what says which
/// object and which version of it this is (uid, resourceVersion, deletionTimestamp): what the
/// reconciler's cache holds of an injected pod. The facts of what is left are the facts of the
/// whole pod; managed fields, status, images, probes and the rest are gone.
pub fn keep_facts(pod: &mut Pod) {
    let mut meta = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        generate_name: meta.generate_name.take(),
        labels: meta.labels.take(),
        annotations: meta.annotations.take(),
        owner_references: meta.owner_references.take().map(|owners| {
            owners
                .into_iter()
                .map(|o| OwnerReference {
                    kind: o.kind,
                    ..OwnerReference::default()
                })
                .collect()
        }),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..identity(meta)
    };
    pod.status = None;
    let containers = |list: Vec<Container>| {
        list.into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                ..Container::default()
            })
            .collect::<Vec<_>>()
    };
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        host_network: spec.host_network,
        containers: containers(spec.containers),
        init_containers: spec.init_containers.map(containers),
        volumes: spec.volumes.map(|volumes| {
            volumes
                .into_iter()
                .map(|v| Volume {
                    name: v.name,
                    ..Volume::default()
                })
                .collect()
        }),
        security_context: spec.security_context.map(|s| PodSecurityContext {
            sysctls: s.sysctls,
            ..PodSecurityContext::default()
        }),
        dns_policy: spec.dns_policy,
        dns_config: spec.dns_config,
        ..PodSpec::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A pod with a value in every field the facts read, and in fields they do not.
    fn full_pod() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "shop",
                "labels": {"app": "web"}, "annotations": {"a": "b"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "u"}],
                "managedFields": [{"manager": "m", "fieldsV1": {"f:metadata": {}}}]
            },
            "spec": {
                "hostNetwork": false,
                "containers": [{"name": "app", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}],
                "initContainers": [{"name": "init", "image": "i"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "securityContext": {"runAsUser": 1000, "sysctls": [{"name": "net.x", "value": "1"}]},
                "dnsPolicy": "None",
                "dnsConfig": {"nameservers": ["10.0.0.10"]},
                "tolerations": [{"key": "k", "operator": "Exists"}]
            }
        })
    }

    /// Decoding the JSON and converting the decoded `Pod` give the same facts, so admission
    /// (which decodes) and the reconciler (which converts) see a pod alike.
    #[test]
    fn decoded_and_converted_facts_agree() {
        let value = full_pod();
        let decoded: PodFacts = serde_json::from_value(value.clone()).unwrap();
        let pod: Pod = serde_json::from_value(value).unwrap();
        assert_eq!(decoded, PodFacts::from(&pod));
        let spec = decoded.spec.as_ref().unwrap();
        assert_eq!(spec.containers[0].name, "app");
        assert_eq!(spec.volumes.as_ref().unwrap()[0].name, "data");
        assert_eq!(
            decoded.metadata.unwrap().owner_references.unwrap()[0].kind,
            "Job"
        );
    }

    #[test]
    fn keeping_the_facts_keeps_what_they_read_and_the_identity_only() {
        let mut value = full_pod();
        value["metadata"]["uid"] = json!("u-1");
        value["metadata"]["resourceVersion"] = json!("42");
        value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        value["spec"]["containers"][0]["livenessProbe"] = json!({"exec": {"command": ["true"]}});
        value["status"] = json!({"phase": "Running", "podIP": "10.0.0.5"});
        let whole: Pod = serde_json::from_value(value).unwrap();
        let mut kept = whole.clone();
        keep_facts(&mut kept);
        assert_eq!(PodFacts::from(&kept), PodFacts::from(&whole));
        assert_eq!(kept.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(kept.metadata.resource_version.as_deref(), Some("42"));
        assert!(kept.metadata.deletion_timestamp.is_some());
        assert_eq!(kept.metadata.managed_fields, None);
        assert_eq!(kept.status, None);
        let spec = kept.spec.as_ref().unwrap();
        assert_eq!(spec.tolerations, None);
        assert_eq!(spec.containers[0].image, None);
        assert_eq!(spec.containers[0].liveness_probe, None);
        assert_eq!(spec.volumes.as_ref().unwrap()[0].empty_dir, None);
        assert_eq!(spec.security_context.as_ref().unwrap().run_as_user, None);
        let size = |pod: &Pod| serde_json::to_vec(pod).unwrap().len();
        assert!(size(&kept) < size(&whole));
    }

    #[test]
    fn a_missing_metadata_is_told_from_an_empty_one() {
        let missing: PodFacts = serde_json::from_value(json!({"spec": {}})).unwrap();
        let empty: PodFacts = serde_json::from_value(json!({"metadata": {}})).unwrap();
        assert_eq!(missing.metadata, None);
        assert_eq!(empty.metadata, Some(Metadata::default()));
    }

    #[test]
    fn fields_of_the_wrong_type_are_refused() {
        for bad in [
            json!({"spec": {"containers": "app"}}),
            json!({"metadata": {"annotations": ["a"]}}),
            json!({"spec": {"hostNetwork": "yes"}}),
        ] {
            assert!(
                serde_json::from_value::<PodFacts>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
