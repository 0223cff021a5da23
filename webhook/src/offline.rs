//! The offline form of injection (like `istioctl kube-inject`): multi-document YAML in, injected
//! YAML out. Pods and the pod templates of workloads go through the same injection as the
//! webhook's; anything else passes through unchanged. Services and Namespaces in the input
//! stand in for the webhook's caches: they give the pods' exports and namespace defaults.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Config;
use crate::inject::{InjectError, Injection};
use crate::pod::PodFacts;
use crate::view::{ClusterView, inject_in_view, labels_forbid_host_path, parse_namespace_defaults};
use servicekeel_api::{ServiceList, keys};

/// Where the pod template sits in each workload kind.
const TEMPLATE_PATHS: &[(&str, &str)] = &[
    ("Deployment", "/spec/template"),
    ("StatefulSet", "/spec/template"),
    ("DaemonSet", "/spec/template"),
    ("ReplicaSet", "/spec/template"),
    ("ReplicationController", "/spec/template"),
    ("Job", "/spec/template"),
    ("CronJob", "/spec/jobTemplate/spec/template"),
];

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("invalid YAML in document {document}: {cause}")]
    Yaml {
        document: usize,
        cause: serde_yaml::Error,
    },
    #[error("document {document} ({object}): not a valid pod: {message}")]
    NotAPod {
        document: usize,
        object: String,
        message: String,
    },
    #[error("document {document} ({object}): {cause}")]
    Refused {
        document: usize,
        object: String,
        cause: InjectError,
    },
}

/// What happened to one pod or template, for the command to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub document: usize,
    pub object: String,
    pub outcome: String,
}

#[derive(Debug, Default)]
pub struct Output {
    pub yaml: String,
    pub notes: Vec<Note>,
}

/// Injects every pod and pod template in `input`; `namespace` stands in for objects without one.
pub fn inject_documents(
    input: &str,
    namespace: &str,
    config: &Config,
) -> Result<Output, OfflineError> {
    let mut output = Output::default();
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let number = index + 1;
        let value = Value::deserialize(document).map_err(|cause| OfflineError::Yaml {
            document: number,
            cause,
        })?;
        if !value.is_null() {
            documents.push((number, value));
        }
    }
    let view = InputView::new(documents.iter().map(|(_, value)| value), namespace);
    for (number, value) in &mut documents {
        inject_object(value, *number, namespace, config, &view, &mut output.notes)?;
    }
    let documents: Vec<Value> = documents.into_iter().map(|(_, value)| value).collect();
    output.yaml = documents
        .iter()
        .map(|document| serde_yaml::to_string(document).expect("JSON values serialize to YAML"))
        .collect::<Vec<_>>()
        .join("---\n");
    Ok(output)
}

fn inject_object(
    object: &mut Value,
    document: usize,
    default_namespace: &str,
    config: &Config,
    view: &InputView,
    notes: &mut Vec<Note>,
) -> Result<(), OfflineError> {
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    if kind == "List" {
        for item in object["items"].as_array_mut().into_iter().flatten() {
            inject_object(item, document, default_namespace, config, view, notes)?;
        }
        return Ok(());
    }
    let name = object["metadata"]["name"]
        .as_str()
        .or_else(|| object["metadata"]["generateName"].as_str())
        .unwrap_or("unnamed");
    let description = format!("{kind} {name}");
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or(default_namespace)
        .to_string();

    let at = PodAt {
        document,
        object: &description,
        namespace: &namespace,
        config,
        view,
    };
    if kind == "Pod" {
        return inject_pod(object, &at, notes);
    }
    let Some((_, path)) = TEMPLATE_PATHS.iter().find(|(k, _)| *k == kind) else {
        return Ok(());
    };
    let Some(template) = object.pointer_mut(path) else {
        return Ok(());
    };
    // A template is a pod's metadata and spec: inject it as the pod it will become.
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    });
    inject_pod(&mut pod, &at, notes)?;
    template["metadata"] = pod["metadata"].take();
    template["spec"] = pod["spec"].take();
    Ok(())
}

/// Which pod is being injected, and with what.
struct PodAt<'a> {
    document: usize,
    object: &'a str,
    namespace: &'a str,
    config: &'a Config,
    view: &'a InputView,
}

fn inject_pod(
    value: &mut Value,
    at: &PodAt<'_>,
    notes: &mut Vec<Note>,
) -> Result<(), OfflineError> {
    let &PodAt {
        document,
        object,
        namespace,
        config,
        view,
    } = at;
    // Decoded whole, not only the facts injection reads: a manifest of the wrong shape is named
    // here, before it reaches an apiserver.
    let pod = Pod::deserialize(&*value).map_err(|error| OfflineError::NotAPod {
        document,
        object: object.to_string(),
        message: error.to_string(),
    })?;
    let injection =
        inject_in_view(&PodFacts::from(&pod), namespace, config, view).map_err(|cause| {
            OfflineError::Refused {
                document,
                object: object.to_string(),
                cause,
            }
        })?;
    let note = |outcome: String| Note {
        document,
        object: object.to_string(),
        outcome,
    };
    match injection {
        Injection::Skip(reason) => notes.push(note(format!("skipped ({})", reason.as_str()))),
        Injection::Patch { patch, warnings } => {
            json_patch::patch(value, &patch.to_patch()).map_err(|error| OfflineError::NotAPod {
                document,
                object: object.to_string(),
                message: format!("the injection patch does not apply: {error}"),
            })?;
            notes.push(note("injected".into()));
            notes.extend(warnings.into_iter().map(|w| note(format!("warning: {w}"))));
        }
    }
    Ok(())
}

/// What the input says about the cluster: its Services (for exports) and Namespaces (for
/// default imports and their Pod Security level), as the webhook learns them from its caches.
#[derive(Debug, Default)]
struct InputView {
    services: Vec<Arc<Service>>,
    /// By name: the default imports annotation, and whether `hostPath` is forbidden there.
    namespaces: BTreeMap<String, (Option<String>, bool)>,
}

impl InputView {
    fn new<'v>(documents: impl Iterator<Item = &'v Value>, default_namespace: &str) -> Self {
        let mut view = InputView::default();
        let mut objects: Vec<&Value> = documents.collect();
        while let Some(object) = objects.pop() {
            match object["kind"].as_str() {
                Some("List") => objects.extend(object["items"].as_array().into_iter().flatten()),
                Some("Service") => {
                    if let Ok(mut service) = Service::deserialize(object) {
                        service
                            .metadata
                            .namespace
                            .get_or_insert_with(|| default_namespace.to_string());
                        view.services.push(Arc::new(service));
                    }
                }
                Some("Namespace") => {
                    if let Some(name) = object["metadata"]["name"].as_str() {
                        let defaults = object["metadata"]["annotations"]
                            [keys::DEFAULT_IMPORTED_SERVICES]
                            .as_str()
                            .map(str::to_string);
                        let labels: Option<BTreeMap<String, String>> =
                            serde_json::from_value(object["metadata"]["labels"].clone()).ok();
                        let forbids = labels_forbid_host_path(labels.as_ref());
                        view.namespaces
                            .insert(name.to_string(), (defaults, forbids));
                    }
                }
                _ => {}
            }
        }
        view
    }
}

impl ClusterView for InputView {
    fn namespace_defaults(&self, namespace: &str) -> Result<Option<ServiceList>, String> {
        match self.namespaces.get(namespace) {
            Some((Some(value), _)) => parse_namespace_defaults(namespace, value).map(Some),
            _ => Ok(None),
        }
    }

    fn forbids_host_path(&self, namespace: &str) -> bool {
        self.namespaces
            .get(namespace)
            .is_some_and(|(_, forbids)| *forbids)
    }

    fn services(&self, namespace: &str) -> Option<Vec<Arc<Service>>> {
        Some(
            self.services
                .iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
                .cloned()
                .collect(),
        )
    }
}
