//! Injection as one pure function over values: `inject(&PodFacts, &Target, &Config)` decides
//! whether a pod is skipped, refused or patched, and builds the JSON Patch. The HTTPS server and
//! the offline `inject` command both call it, so what the cluster stores and what the command
//! prints are the same.

mod dns;
mod patch;
mod sidecar;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Sysctl;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use servicekeel_api::keys::{self, Direction};
use servicekeel_api::{FieldError, ParseError, ServiceList, defaults};

use crate::config::Config;
use crate::pod::{ContainerFacts, PodFacts, Spec};
use crate::recent::Recent;
pub use patch::JsonPatch;
use patch::{PatchBuilder, to_json};
pub use sidecar::SidecarMode;

/// What the pod belongs to, as the admission request (not the pod) says: at admission a pod
/// often has no namespace of its own yet.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: &'a str,
    /// The namespace's `servicekeel.io/default-imported-services`, when valid.
    pub namespace_defaults: Option<&'a ServiceList>,
    /// Exports computed from the Services selecting the pod, when known.
    pub exports: Option<&'a ServiceList>,
    /// The namespace forbids `hostPath` volumes: the sidecar reaches the router over TCP on the
    /// node's address (when the config has a port for it) instead of mounting its socket.
    pub router_over_tcp: bool,
}

impl<'a> Target<'a> {
    /// A pod of `namespace`, with nothing known about its cluster.
    pub fn new(namespace: &'a str) -> Self {
        Target {
            namespace,
            namespace_defaults: None,
            exports: None,
            router_over_tcp: false,
        }
    }
}

/// The value of [`keys::STATUS`]: what was injected, and which `exported-services` entries the
/// pod's author wrote (those are kept when the computed exports change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub sidecar_mode: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_exported: Vec<String>,
}

/// What injection decided, with the patch as `P`: a [`JsonPatch`] as made, or as the answer
/// carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Injection<P = JsonPatch> {
    /// Allowed unchanged.
    Skip(SkipReason),
    /// Allowed with this patch; the warnings go back to the client.
    Patch { patch: P, warnings: Vec<String> },
}

impl<P> Injection<P> {
    /// The same decision with the patch turned into `f`'s.
    pub fn map_patch<Q>(self, f: impl FnOnce(P) -> Q) -> Injection<Q> {
        match self {
            Injection::Skip(reason) => Injection::Skip(reason),
            Injection::Patch { patch, warnings } => Injection::Patch {
                patch: f(patch),
                warnings,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    OptedOut,
    AlreadyInjected,
    HostNetwork,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::OptedOut => "opted-out",
            SkipReason::AlreadyInjected => "already-injected",
            SkipReason::HostNetwork => "host-network",
        }
    }
}

/// Why a pod is refused. Each message names the field to fix.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{key}: {cause}")]
    Annotation {
        key: &'static str,
        cause: ParseError,
    },
    #[error("{key}: {error}")]
    Services {
        key: &'static str,
        error: FieldError,
    },
    #[error(
        "{key}: {total} services with {defaults} from the namespace and cluster defaults; at most \
         {max} can be imported (one local IP each)",
        key = keys::IMPORTED_SERVICES,
        max = defaults::MAX_IMPORTED_SERVICES
    )]
    TooManyWithDefaults { total: usize, defaults: usize },
    #[error("metadata.{place}[{key}]: {value:?} must be \"true\" or \"false\"", key = keys::INJECT)]
    InjectValue { place: &'static str, value: String },
    #[error("metadata.annotations[{key}]: {0:?} must be \"native\" or \"classic\"", key = keys::SIDECAR_MODE)]
    SidecarMode(String),
    #[error(
        "{field}[{index}].ports: container {container:?} declares port {port}, which the \
         ServiceKeel sidecar needs for its {purpose}; free the port or opt the pod out with \
         {key}: \"false\"",
        key = keys::INJECT
    )]
    PortConflict {
        field: &'static str,
        index: usize,
        container: String,
        port: i32,
        purpose: &'static str,
    },
    #[error(
        "spec.volumes[{index}].name: {name:?} is reserved for the ServiceKeel sidecar; rename the \
         volume or opt the pod out with {key}: \"false\"",
        key = keys::INJECT
    )]
    ReservedVolume { index: usize, name: String },
    #[error("spec: a pod must have a spec")]
    NoSpec,
}

/// The version recorded in [`keys::STATUS`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn inject(
    pod: &PodFacts,
    target: &Target<'_>,
    config: &Config,
) -> Result<Injection, InjectError> {
    let no_entries = BTreeMap::new();
    let annotations = pod.annotations().unwrap_or(&no_entries);
    let labels = pod.labels().unwrap_or(&no_entries);

    if opted_out(annotations, labels)? {
        return Ok(Injection::Skip(SkipReason::OptedOut));
    }
    let spec = pod.spec.as_ref().ok_or(InjectError::NoSpec)?;
    if spec.host_network == Some(true) {
        return Ok(Injection::Skip(SkipReason::HostNetwork));
    }
    if annotations.contains_key(keys::STATUS) || sidecar_mode(spec).is_some() {
        return Ok(Injection::Skip(SkipReason::AlreadyInjected));
    }

    let mode = match annotations.get(keys::SIDECAR_MODE) {
        Some(text) => {
            SidecarMode::parse(text).ok_or_else(|| InjectError::SidecarMode(text.clone()))?
        }
        None if config.native_sidecar => SidecarMode::Native,
        None => SidecarMode::Classic,
    };
    let mut warnings = Vec::new();
    let imported = read_services(
        Direction::Imported,
        annotations,
        target,
        config,
        &mut warnings,
    )?;
    let exported = read_services(
        Direction::Exported,
        annotations,
        target,
        config,
        &mut warnings,
    )?;
    let imported = with_default_imports(imported, target, config)?;
    let user_exported: Vec<String> = exported
        .iter()
        .flat_map(|list| &list.services)
        .map(|service| {
            service
                .key(target.namespace, &config.cluster_name)
                .to_string()
        })
        .collect();
    let exported = match (exported, target.exports) {
        (own, Some(computed)) if !computed.is_empty() => Some(
            own.unwrap_or_default()
                .with_defaults(computed, target.namespace, &config.cluster_name),
        ),
        (own, _) => own,
    };
    check_reserved(spec, config)?;
    if mode == SidecarMode::Classic {
        classic_mode_warnings(pod, spec, &mut warnings);
    }

    let dns = dns::plan(spec, target.namespace, config, &mut warnings);
    let mut patch = PatchBuilder::default();

    let status = Status {
        sidecar_mode: mode.as_str().into(),
        version: VERSION.into(),
        user_exported,
    };
    let status = serde_json::to_string(&status).expect("a status always serializes");
    let mut new_annotations = vec![(keys::STATUS, json!(status))];
    for (direction, list) in [
        (Direction::Imported, &imported),
        (Direction::Exported, &exported),
    ] {
        if let Some(list) = list {
            let canonical = list.to_canonical_json();
            if annotations.get(direction.key()) != Some(&canonical) {
                new_annotations.push((direction.key(), Value::String(canonical)));
            }
        }
    }
    if mode == SidecarMode::Classic
        && !annotations.contains_key(keys::KUBECTL_DEFAULT_CONTAINER)
        && let Some(first) = spec.containers.first()
    {
        new_annotations.push((keys::KUBECTL_DEFAULT_CONTAINER, json!(first.name)));
    }
    match &pod.metadata {
        Some(metadata) => patch.set_members(
            &["metadata", "annotations"],
            metadata.annotations.is_some(),
            new_annotations,
        ),
        None => {
            let annotations: serde_json::Map<String, Value> = new_annotations
                .into_iter()
                .map(|(key, value)| (key.to_string(), value))
                .collect();
            patch.set(&["metadata"], json!({ "annotations": annotations }));
        }
    }

    let router = match (target.router_over_tcp, config.router_tcp_port) {
        (true, Some(port)) => sidecar::RouterWay::NodeTcp(port),
        _ => sidecar::RouterWay::Socket,
    };
    let sidecar::Rendered { container, volumes } =
        sidecar::rendered(config, mode, dns.upstream, router);
    match mode {
        SidecarMode::Native => patch.prepend(
            &["spec", "initContainers"],
            spec.init_containers.is_some(),
            container,
        ),
        SidecarMode::Classic => patch.prepend(&["spec", "containers"], true, container),
    }
    patch.append(&["spec", "volumes"], spec.volumes.is_some(), volumes);
    patch.set(&["spec", "dnsPolicy"], json!("None"));
    patch.set(&["spec", "dnsConfig"], to_json(&dns.config));
    unprivileged_port_sysctl(spec, config, &mut patch);

    Ok(Injection::Patch {
        patch: patch.build(),
        warnings,
    })
}

/// `servicekeel.io/inject: "false"` as an annotation or a label.
fn opted_out(
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, InjectError> {
    let mut opted_out = false;
    for (place, map) in [("annotations", annotations), ("labels", labels)] {
        match map.get(keys::INJECT).map(String::as_str) {
            None | Some("true") => {}
            Some(keys::INJECT_DISABLED) => opted_out = true,
            Some(other) => {
                return Err(InjectError::InjectValue {
                    place,
                    value: other.to_string(),
                });
            }
        }
    }
    Ok(opted_out)
}

/// Where `spec` carries the sidecar, if it does: as an init container, the native sidecar; as an
/// app container, the classic one.
pub fn sidecar_mode(spec: &Spec) -> Option<SidecarMode> {
    let named = |containers: &[ContainerFacts]| {
        containers
            .iter()
            .any(|c| c.name == defaults::SIDECAR_CONTAINER)
    };
    if spec.init_containers.as_deref().is_some_and(named) {
        Some(SidecarMode::Native)
    } else if named(&spec.containers) {
        Some(SidecarMode::Classic)
    } else {
        None
    }
}

/// The pod's own list for `direction` (canonical key first, then the alias), validated.
fn read_services(
    direction: Direction,
    annotations: &BTreeMap<String, String>,
    target: &Target<'_>,
    config: &Config,
    warnings: &mut Vec<String>,
) -> Result<Option<ServiceList>, InjectError> {
    let Some((key, text)) = direction.find(annotations) else {
        return Ok(None);
    };
    if key == direction.key() && annotations.contains_key(direction.alias()) {
        warnings.push(format!(
            "{} is ignored because {} is set",
            direction.alias(),
            direction.key()
        ));
    }
    let list = parsed(text).map_err(|cause| InjectError::Annotation { key, cause })?;
    list.check_unique(target.namespace, &config.cluster_name)
        .map_err(|error| InjectError::Services { key, error })?;
    if direction == Direction::Imported {
        list.check_import_limit()
            .map_err(|error| InjectError::Services { key, error })?;
    }
    Ok(Some(list))
}

/// [`ServiceList::parse`], remembered for the last texts seen: the replicas of a workload carry
/// the same annotations, and parsing YAML was the largest part of a review.
fn parsed(text: &str) -> Result<ServiceList, ParseError> {
    static RECENT: Recent<String, ServiceList> = Recent::new(32);
    RECENT.get_or_try(
        |seen| seen == text,
        || text.to_string(),
        || ServiceList::parse(text),
    )
}

/// The pod's imports with the defaults merged in: the pod's own entries win, then the
/// namespace's defaults, then the cluster-wide ones.
fn with_default_imports(
    own: Option<ServiceList>,
    target: &Target<'_>,
    config: &Config,
) -> Result<Option<ServiceList>, InjectError> {
    let layers: Vec<&ServiceList> = target
        .namespace_defaults
        .into_iter()
        .chain([&config.default_imported_services])
        .filter(|defaults| !defaults.is_empty())
        .collect();
    if layers.is_empty() {
        return Ok(own);
    }
    let own_count = own.as_ref().map_or(0, |list| list.services.len());
    let merged = layers
        .iter()
        .fold(own.unwrap_or_default(), |merged, defaults| {
            merged.with_defaults(defaults, target.namespace, &config.cluster_name)
        });
    if merged.check_import_limit().is_err() {
        return Err(InjectError::TooManyWithDefaults {
            total: merged.services.len(),
            defaults: merged.services.len() - own_count,
        });
    }
    Ok(Some(merged))
}

/// Refuses pods that already use a port or volume name the sidecar needs, rather than letting
/// the sidecar crash-loop.
fn check_reserved(spec: &Spec, config: &Config) -> Result<(), InjectError> {
    let dns_port = i32::from(config.dns_addr.port());
    let admin_port = i32::from(config.sidecar.admin_port);
    let groups = [
        (
            "spec.initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("spec.containers", spec.containers.as_slice()),
    ];
    for (field, containers) in groups {
        for (index, container) in containers.iter().enumerate() {
            for port in container.ports.iter().flatten() {
                let purpose = if port.container_port == dns_port {
                    "DNS server"
                } else if port.container_port == admin_port {
                    "admin server"
                } else {
                    continue;
                };
                return Err(InjectError::PortConflict {
                    field,
                    index,
                    container: container.name.clone(),
                    port: port.container_port,
                    purpose,
                });
            }
        }
    }
    let reserved = [defaults::PODINFO_VOLUME, defaults::ROUTER_SOCKET_VOLUME];
    if let Some((index, volume)) = spec
        .volumes
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, volume)| reserved.contains(&volume.name.as_str()))
    {
        return Err(InjectError::ReservedVolume {
            index,
            name: volume.name.clone(),
        });
    }
    Ok(())
}

fn classic_mode_warnings(pod: &PodFacts, spec: &Spec, warnings: &mut Vec<String>) {
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        warnings.push(
            "classic sidecar mode: init containers run before the sidecar and cannot resolve \
             names"
                .into(),
        );
    }
    let owned_by_job = pod
        .metadata
        .iter()
        .flat_map(|metadata| metadata.owner_references.iter().flatten())
        .any(|owner| owner.kind == "Job");
    if owned_by_job {
        warnings.push(
            "classic sidecar mode: a Job's pod does not complete while the sidecar runs; \
             use the native mode"
                .into(),
        );
    }
}

/// Lets the non-root sidecar bind its DNS port, lowering the pod's unprivileged port start
/// (a namespaced, "safe" sysctl) only when it is set higher.
fn unprivileged_port_sysctl(spec: &Spec, config: &Config, patch: &mut PatchBuilder) {
    const PRIVILEGED_BELOW: u16 = 1024;
    let needed = config.dns_addr.port().min(config.sidecar.admin_port);
    if needed >= PRIVILEGED_BELOW {
        return;
    }
    let sysctl = Sysctl {
        name: defaults::UNPRIVILEGED_PORT_SYSCTL.into(),
        value: needed.to_string(),
    };
    let Some(security_context) = &spec.security_context else {
        patch.set(
            &["spec", "securityContext"],
            json!({ "sysctls": [to_json(&sysctl)] }),
        );
        return;
    };
    let existing = security_context.sysctls.as_deref().unwrap_or_default();
    match existing.iter().position(|s| s.name == sysctl.name) {
        Some(index) => {
            let current = existing[index].value.trim().parse::<u16>();
            if !matches!(current, Ok(value) if value <= needed) {
                let index = index.to_string();
                patch.set(
                    &["spec", "securityContext", "sysctls", &index, "value"],
                    json!(sysctl.value),
                );
            }
        }
        None => patch.append(
            &["spec", "securityContext", "sysctls"],
            security_context.sysctls.is_some(),
            vec![to_json(&sysctl).into()],
        ),
    }
}
