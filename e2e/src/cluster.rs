//! The local cluster as a whole: control plane plus the webhook as a process beside it
//! ([`LocalCluster`]), or control plane, a real node and ServiceKeel installed from `manifests/`
//! ([`NodeCluster`]); and the state file through which `servicekeel-e2e up`, `status` and `down` find a running cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::Api;
use serde::{Deserialize, Serialize};

use crate::control_plane::{ControlPlane, Setup};
use crate::kubernetes::{APISERVER, CONTROLLER_MANAGER, KUBELET, KubeBinaries, SCHEDULER};
use crate::node::{self, Host, Node};
use crate::process::{Lifetime, Process, free_port, is_running, stop_pid, wait_ready};
use crate::{images, paths, webhook};

#[derive(Debug)]
pub struct LocalCluster {
    pub control_plane: ControlPlane,
    webhook: Option<Process>,
    webhook_port: u16,
    webhook_kubeconfig: PathBuf,
    webhook_flags: Vec<String>,
    lifetime: Lifetime,
}

impl LocalCluster {
    /// Builds what is missing, starts etcd, the apiserver and the webhook, and registers the
    /// webhook; returns once pods are being injected.
    pub async fn start(dir: &Path, lifetime: Lifetime) -> anyhow::Result<LocalCluster> {
        let binaries = KubeBinaries::ensure(&[APISERVER])?;
        let control_plane = ControlPlane::start(dir, &binaries, lifetime, Setup::Loopback).await?;
        let webhook_port = free_port()?;
        let server = control_plane.server.clone();
        let webhook_kubeconfig =
            webhook::install_access(&control_plane.kubeconfig, &control_plane.pki, &server, dir)?;
        let mut cluster = LocalCluster {
            control_plane,
            webhook: None,
            webhook_port,
            webhook_kubeconfig,
            webhook_flags: Vec::new(),
            lifetime,
        };
        cluster.start_webhook().await?;
        let client = cluster.control_plane.client().await?;
        webhook::register(&client, &cluster.webhook_url()).await?;
        Ok(cluster)
    }

    pub fn webhook_url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.webhook_port)
    }

    /// The webhook's log file.
    pub fn webhook_log(&self) -> PathBuf {
        self.control_plane.dir.join("servicekeel-webhook.log")
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.control_plane.kubeconfig
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.control_plane.client().await
    }

    /// Stops the webhook (SIGTERM, drained); the registration stays, as in a webhook outage.
    pub fn stop_webhook(&mut self) {
        if let Some(mut process) = self.webhook.take() {
            process.stop();
        }
    }

    /// Restarts the webhook with `flags` added to its command line (none: as at start).
    pub async fn restart_webhook(&mut self, flags: &[&str]) -> anyhow::Result<()> {
        self.stop_webhook();
        self.webhook_flags = flags.iter().map(|f| f.to_string()).collect();
        self.start_webhook().await
    }

    /// Starts the webhook again on the same address.
    pub async fn start_webhook(&mut self) -> anyhow::Result<()> {
        let process = webhook::start(
            &self.control_plane.dir,
            self.webhook_port,
            &self.webhook_kubeconfig,
            &self.webhook_flags,
            self.lifetime,
        )
        .await?;
        self.webhook = Some(process);
        Ok(())
    }

    /// Leaves every process running and records them in `state.json` beside the kubeconfig.
    pub fn detach(self) -> anyhow::Result<State> {
        let LocalCluster {
            control_plane,
            webhook,
            ..
        } = self;
        let kubeconfig = control_plane.kubeconfig.clone();
        let dir = control_plane.dir.clone();
        let server = control_plane.server.clone();
        let processes = [
            Some(control_plane.etcd),
            Some(control_plane.apiserver),
            webhook,
        ]
        .into_iter()
        .flatten();
        State::record(&dir, kubeconfig, server, processes, false, false)
    }
}

/// How long ServiceKeel's own workloads get to become ready after `kubectl apply -k`.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The local cluster with a real node: control plane, controller-manager, scheduler, and a
/// kubelet with containerd; ServiceKeel installed with `kubectl apply -k manifests/`, its
/// webhook and router running as the pods the manifests describe.
#[derive(Debug)]
pub struct NodeCluster {
    // Dropped in this order: the node, the controllers, the control plane, then the host is
    // swept (containers, mounts, network, cgroups).
    pub node: Node,
    pub controllers: Vec<Process>,
    pub control_plane: ControlPlane,
    host: Host,
    /// How the node's images were built.
    profile: images::Profile,
}

impl NodeCluster {
    /// Builds what is missing, starts everything, installs ServiceKeel, and returns once the
    /// webhook injects pods and the router serves the node. The images are debug builds.
    pub async fn start(dir: &Path, lifetime: Lifetime) -> anyhow::Result<NodeCluster> {
        Self::start_with(dir, lifetime, images::Profile::Debug).await
    }

    /// [`NodeCluster::start`] with the images built with `profile`.
    pub async fn start_with(
        dir: &Path,
        lifetime: Lifetime,
        profile: images::Profile,
    ) -> anyhow::Result<NodeCluster> {
        let host = Host::claim(dir, lifetime)?;
        let binaries = KubeBinaries::ensure(&[APISERVER, CONTROLLER_MANAGER, SCHEDULER, KUBELET])?;
        let control_plane =
            ControlPlane::start(host.dir(), &binaries, lifetime, Setup::WithNode).await?;
        let controllers = control_plane.start_controllers(&binaries, lifetime)?;
        let client = control_plane.client().await?;
        let node = Node::start(
            &host,
            &binaries,
            &control_plane.pki,
            &control_plane.server,
            &client,
            lifetime,
            profile,
        )
        .await?;
        let mut cluster = NodeCluster {
            node,
            controllers,
            control_plane,
            host,
            profile,
        };
        cluster.install_servicekeel().await?;
        Ok(cluster)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.control_plane.kubeconfig
    }

    /// Where the cluster keeps its state and logs.
    pub fn dir(&self) -> &Path {
        self.host.dir()
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.control_plane.client().await
    }

    /// `kubectl apply -k manifests/`, as a user installs ServiceKeel, then waits for the
    /// webhook Deployment, the router DaemonSet and the webhook's first injection.
    async fn install_servicekeel(&mut self) -> anyhow::Result<()> {
        let manifests = paths::repo().join("manifests");
        webhook::kubectl(
            self.kubeconfig(),
            &["apply", "-k", &manifests.to_string_lossy()],
            None,
        )?;
        let client = self.client().await?;
        self.wait_for_workloads(&client, INSTALL_TIMEOUT).await?;
        webhook::wait_until_called(&client).await
    }

    /// Waits until the webhook Deployment is available and the router DaemonSet ready.
    pub async fn wait_for_workloads(
        &mut self,
        client: &kube::Client,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deployments: Api<Deployment> =
            Api::namespaced(client.clone(), webhook::SYSTEM_NAMESPACE);
        let daemon_sets: Api<DaemonSet> =
            Api::namespaced(client.clone(), webhook::SYSTEM_NAMESPACE);
        let kubeconfig = self.kubeconfig().to_owned();
        let Node {
            kubelet,
            containerd,
            ..
        } = &mut self.node;
        let result = wait_ready(
            "ServiceKeel's webhook and router",
            &mut [kubelet, containerd],
            timeout,
            || async {
                let webhook = deployments
                    .get(WEBHOOK_DEPLOYMENT)
                    .await
                    .map_err(|e| e.to_string())?;
                let wanted = webhook.spec.and_then(|s| s.replicas).unwrap_or(1);
                let available = webhook
                    .status
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                let router = daemon_sets
                    .get(ROUTER_DAEMON_SET)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = router.status.unwrap_or_default();
                if available >= wanted
                    && status.desired_number_scheduled > 0
                    && status.number_ready == status.desired_number_scheduled
                {
                    Ok(())
                } else {
                    Err(format!(
                        "webhook {available}/{wanted} available, router {}/{} ready",
                        status.number_ready, status.desired_number_scheduled
                    ))
                }
            },
        )
        .await;
        result.map_err(|error| error.context(pods_report(&kubeconfig)))
    }

    /// Leaves everything running for `servicekeel-e2e down` to stop; records it in the state
    /// file.
    pub fn detach(self) -> anyhow::Result<State> {
        let NodeCluster {
            node,
            controllers,
            control_plane,
            host,
            profile,
        } = self;
        let dir = host.keep();
        let kubeconfig = control_plane.kubeconfig.clone();
        let server = control_plane.server.clone();
        let processes = [control_plane.etcd, control_plane.apiserver]
            .into_iter()
            .chain(controllers)
            .chain(node.into_processes());
        let release = profile == images::Profile::Release;
        State::record(&dir, kubeconfig, server, processes, true, release)
    }
}

pub const WEBHOOK_DEPLOYMENT: &str = "servicekeel-webhook";
pub const ROUTER_DAEMON_SET: &str = "servicekeel-router";

/// What runs where, for an error message: `kubectl get pods -A -o wide` and recent events.
pub fn pods_report(kubeconfig: &Path) -> String {
    let pods = webhook::kubectl(kubeconfig, &["get", "pods", "-A", "-o", "wide"], None)
        .unwrap_or_else(|e| e.to_string());
    let events = webhook::kubectl(
        kubeconfig,
        &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        None,
    )
    .unwrap_or_else(|e| e.to_string());
    let events: Vec<&str> = events.lines().collect();
    format!(
        "pods:\n{pods}\nlatest events:\n{}",
        events[events.len().saturating_sub(25)..].join("\n")
    )
}

const STATE_FILE: &str = "state.json";

/// What `up` left running.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub kubeconfig: PathBuf,
    /// The apiserver, `https://<address>:<port>` (empty in a state file of an older `up`).
    #[serde(default)]
    pub server: String,
    pub processes: Vec<Component>,
    /// Whether a node runs: `down` then also gives the host back ([`node::sweep`]).
    #[serde(default)]
    pub node: bool,
    /// Whether the node's images are release builds (`up --release`).
    #[serde(default)]
    pub release: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
}

impl Component {
    /// Whether the process still runs (its name is in its command line).
    pub fn is_running(&self) -> bool {
        is_running(self.pid, &self.name)
    }
}

impl State {
    pub fn load(dir: &Path) -> anyhow::Result<Option<State>> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is corrupt", path.display())
                })?))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Leaves `processes` running, forgetting them here, and records them in `dir`.
    fn record(
        dir: &Path,
        kubeconfig: PathBuf,
        server: String,
        processes: impl IntoIterator<Item = Process>,
        node: bool,
        release: bool,
    ) -> anyhow::Result<State> {
        let processes = processes
            .into_iter()
            .filter_map(|process| {
                let name = process.name().to_string();
                let log = process.log().to_owned();
                process.detach().map(|pid| Component { name, pid, log })
            })
            .collect();
        let state = State {
            kubeconfig,
            server,
            processes,
            node,
            release,
        };
        std::fs::write(dir.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)?;
        Ok(state)
    }

    pub fn all_running(&self) -> bool {
        self.processes.iter().all(Component::is_running)
    }

    /// Whether this cluster is of the kind asked for: a node or not as asked, and release
    /// images where they are asked for (release images also serve where they are not).
    pub fn is_kind(&self, with_node: bool, release: bool) -> bool {
        self.node == with_node && (self.release || !release)
    }

    /// Stops every recorded process, in the reverse order of their start (etcd last); with
    /// a node, then gives the host back.
    pub fn stop_all(&self, dir: &Path) -> Vec<(String, bool)> {
        let stopped = self
            .processes
            .iter()
            .rev()
            .map(|c| (c.name.clone(), stop_pid(c.pid, &c.name)))
            .collect();
        if self.node {
            node::sweep(dir);
        }
        stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(node: bool, release: bool) -> State {
        State {
            kubeconfig: PathBuf::from("kubeconfig"),
            server: String::new(),
            processes: Vec::new(),
            node,
            release,
        }
    }

    #[test]
    fn release_images_serve_either_ask_and_debug_ones_only_the_default() {
        assert!(state(true, true).is_kind(true, true));
        assert!(state(true, true).is_kind(true, false));
        assert!(state(true, false).is_kind(true, false));
        assert!(!state(true, false).is_kind(true, true));
    }

    #[test]
    fn a_node_must_be_there_exactly_when_asked_for() {
        assert!(!state(false, false).is_kind(true, false));
        assert!(!state(true, false).is_kind(false, false));
        assert!(state(false, false).is_kind(false, false));
    }

    #[test]
    fn a_state_file_of_an_older_up_reads_as_debug_images() {
        let old = r#"{"kubeconfig": "k", "server": "", "processes": [], "node": true}"#;
        let state: State = serde_json::from_str(old).expect("an older state file");
        assert!(state.node);
        assert!(!state.release);
    }
}
