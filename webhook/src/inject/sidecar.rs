//! The injected sidecar: its container (env, probes, postStart hook, mounts, security context)
//! and its volumes.
//! Everything here follows from the config; nothing depends on the pod except the upstream DNS
//! its own settings imply.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, DownwardAPIVolumeFile, DownwardAPIVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, HostPathVolumeSource, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, Probe, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use servicekeel_api::{defaults, env};

use super::patch::PatchValue;
use crate::config::Config;
use crate::recent::Recent;

/// How the sidecar is placed in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    /// First init container with `restartPolicy: Always` (Kubernetes 1.29+): running and ready
    /// before the pod's other init containers and app containers start; ignored when a Job's
    /// containers finish.
    Native,
    /// First app container, for clusters without native sidecars: the kubelet starts the app
    /// containers after it, once its postStart hook has returned.
    Classic,
}

impl SidecarMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Classic => "classic",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "native" => Some(SidecarMode::Native),
            "classic" => Some(SidecarMode::Classic),
            _ => None,
        }
    }
}

/// How the sidecar reaches its node's router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterWay {
    /// Through the router's Unix socket, mounted from the node (`hostPath`).
    Socket,
    /// Over TCP to this port on the node's address (`status.hostIP`), for pods that may not
    /// mount `hostPath` volumes.
    NodeTcp(u16),
}

/// The container and the volumes, encoded.
#[derive(Debug, Clone)]
pub(super) struct Rendered {
    pub container: PatchValue,
    pub volumes: Vec<PatchValue>,
}

/// [`container`] and [`volumes`] rendered to JSON, remembered for the last configurations
/// seen: building and serialising them was most of an injection's cost, and they change only
/// with the config, the mode and the upstream. A webhook has one config and a mode or two, and
/// pods with their own nameserver bring a few upstreams.
pub(super) fn rendered(
    config: &Config,
    mode: SidecarMode,
    upstream: SocketAddr,
    router: RouterWay,
) -> Rendered {
    type Key = (Config, SidecarMode, SocketAddr, RouterWay);
    static RECENT: Recent<Key, Rendered> = Recent::new(8);
    RECENT.get_or(
        |(c, m, u, r)| *m == mode && *u == upstream && *r == router && c == config,
        || (config.clone(), mode, upstream, router),
        || Rendered {
            container: PatchValue::encoded(&container(config, mode, upstream, router)),
            volumes: volumes(config, router)
                .iter()
                .map(PatchValue::encoded)
                .collect(),
        },
    )
}

/// The sidecar's container: placed as `mode` says, forwarding the names it does not serve to
/// `upstream`, and reaching its node's router the `router` way.
pub(super) fn container(
    config: &Config,
    mode: SidecarMode,
    upstream: SocketAddr,
    router: RouterWay,
) -> Container {
    let admin_port = config.sidecar.admin_port;
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(admin_port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    };
    Container {
        name: defaults::SIDECAR_CONTAINER.into(),
        image: Some(config.sidecar.image.clone()),
        image_pull_policy: Some(config.sidecar.image_pull_policy.as_str().into()),
        args: Some(vec!["sidecar".into()]),
        env: Some(environment(config, upstream, router)),
        ports: Some(vec![ContainerPort {
            name: Some(defaults::ADMIN_PORT_NAME.into()),
            container_port: admin_port.into(),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(config.sidecar.resources.clone()),
        restart_policy: (mode == SidecarMode::Native).then(|| "Always".into()),
        // The kubelet starts the pod's next container only once this hook has returned, that is
        // once the sidecar is ready. A startup probe would order them too, but it is run on its
        // period's ticks only and held each pod's start by up to a second more.
        lifecycle: Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![defaults::SIDECAR_BINARY.into(), "wait".into()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        readiness_probe: Some(probe(defaults::READY_PATH, 5, 3)),
        liveness_probe: Some(probe(defaults::HEALTH_PATH, 10, 3)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(defaults::SIDECAR_UID),
            run_as_group: Some(defaults::SIDECAR_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(
            [
                Some(VolumeMount {
                    name: defaults::PODINFO_VOLUME.into(),
                    mount_path: defaults::PODINFO_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                }),
                (router == RouterWay::Socket).then(|| VolumeMount {
                    name: defaults::ROUTER_SOCKET_VOLUME.into(),
                    mount_path: defaults::ROUTER_SOCKET_DIR.into(),
                    ..Default::default()
                }),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn environment(config: &Config, upstream: SocketAddr, router: RouterWay) -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let router = match router {
        RouterWay::Socket => vec![value(
            env::SIDECAR_SERVER_LISTEN,
            defaults::ROUTER_LISTEN.into(),
        )],
        // The kubelet expands `$(HOST_IP)` from the variable defined just before.
        RouterWay::NodeTcp(port) => vec![
            field(env::HOST_IP, "status.hostIP"),
            value(
                env::SIDECAR_SERVER_LISTEN,
                format!("tcp://$({}):{port}", env::HOST_IP),
            ),
        ],
    };
    let mut all = vec![
        field(env::POD_NAME, "metadata.name"),
        field(env::POD_NAMESPACE, "metadata.namespace"),
        field(env::POD_IP, "status.podIP"),
        field(env::NODE_NAME, "spec.nodeName"),
        value(env::SERVICEKEEL_CLUSTER, config.cluster_name.clone()),
        value(
            env::SERVICEKEEL_CLUSTER_DOMAIN,
            config.cluster_domain.clone(),
        ),
        value(env::SIDECAR_IP_RANGE, config.ip_range.clone()),
        value(env::SIDECAR_DNS_ADDR, config.dns_addr.to_string()),
        value(env::SIDECAR_UPSTREAM_DNS, upstream.to_string()),
    ];
    all.extend(router);
    all.extend([
        value(
            env::SIDECAR_ANNOTATIONS_FILE,
            defaults::ANNOTATIONS_FILE.into(),
        ),
        // All addresses, so the kubelet's probes reach it on the pod IP.
        value(
            env::SIDECAR_ADMIN_ADDR,
            format!("0.0.0.0:{}", config.sidecar.admin_port),
        ),
    ]);
    all
}

pub(super) fn volumes(config: &Config, router: RouterWay) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: defaults::PODINFO_VOLUME.into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: defaults::PODINFO_ANNOTATIONS.into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.annotations".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if router == RouterWay::Socket {
        volumes.push(Volume {
            name: defaults::ROUTER_SOCKET_VOLUME.into(),
            host_path: Some(HostPathVolumeSource {
                path: config.router_socket_host_path.clone(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        });
    }
    volumes
}
