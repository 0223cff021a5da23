//! The pod rows: pods created through the real apiserver on the cluster with a real node, in a
//! namespace labelled for injection (the webhook is called) and in one that is not (baseline),
//! the same pod spec in both, one pod at a time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use servicekeel_api::keys;

use crate::cluster::NodeCluster;
use crate::images::Profile;
use crate::process::Lifetime;
use crate::webhook::is_injected;
use crate::{node, paths};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The webhook's name in the MutatingWebhookConfiguration of `manifests/`.
const WEBHOOK_NAME: &str = "sidecar-injector.servicekeel.io";

/// The cluster with a node, and a namespace of each kind.
pub struct PodBench {
    client: kube::Client,
    cluster: NodeCluster,
    dir: PathBuf,
}

impl std::fmt::Debug for PodBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodBench")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Which namespace a pod goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not labelled: the apiserver does not call the webhook.
    Plain,
    /// Labelled `servicekeel.io/inject=enabled`: the pod gets the sidecar.
    Injected,
}

impl Kind {
    fn namespace(self) -> &'static str {
        match self {
            Kind::Plain => "bench-plain",
            Kind::Injected => "bench-injected",
        }
    }
}

impl PodBench {
    /// Starts the cluster with a node (root, a few minutes the first time) and the namespaces;
    /// its images are release builds, as users run them.
    pub async fn start() -> anyhow::Result<PodBench> {
        let dir = paths::run_dir("servicekeel-bench-node");
        let cluster =
            NodeCluster::start_with(&dir, Lifetime::TiedToThisProcess, Profile::Release).await?;
        let client = cluster.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for kind in [Kind::Plain, Kind::Injected] {
            let mut labels = serde_json::Map::new();
            if kind == Kind::Injected {
                labels.insert(
                    keys::NAMESPACE_INJECT_LABEL.into(),
                    keys::NAMESPACE_INJECT_ENABLED.into(),
                );
            }
            let namespace: Namespace = serde_json::from_value(json!({
                "metadata": {"name": kind.namespace(), "labels": labels},
            }))?;
            namespaces
                .create(&PostParams::default(), &namespace)
                .await
                .with_context(|| format!("cannot create namespace {}", kind.namespace()))?;
        }
        Ok(PodBench {
            client,
            cluster,
            dir,
        })
    }

    /// The apiserver's own count and total time (seconds) of its calls to the webhook so far
    /// (`apiserver_admission_webhook_admission_duration_seconds`): the call as the apiserver
    /// sees it, network and TLS included, its own handling of the answer not.
    pub async fn webhook_calls(&self) -> anyhow::Result<(u64, f64)> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = self.client.request_text(request).await?;
        let metric = "apiserver_admission_webhook_admission_duration_seconds";
        let ours = format!("name=\"{}\"", WEBHOOK_NAME);
        let (mut count, mut sum) = (0u64, 0f64);
        for line in text.lines().filter(|l| l.contains(&ours)) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if series.starts_with(&format!("{metric}_count{{")) {
                count += value.parse::<f64>().unwrap_or(0.0) as u64;
            } else if series.starts_with(&format!("{metric}_sum{{")) {
                sum += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        Ok((count, sum))
    }

    /// Stops the cluster, gives the host back and removes its files.
    pub fn finish(self) {
        let PodBench { cluster, dir, .. } = self;
        drop(cluster);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The pod measured; `runs: false` gives it a node selector no node has, so that it stays
    /// Pending: create calls are measured without a node starting pods underneath (on a small
    /// node a burst of starting pods starves the webhook's own pods past its 5 s timeout).
    fn pod(kind: Kind, name: &str, runs: bool) -> anyhow::Result<Pod> {
        let node_selector = if runs {
            json!({})
        } else {
            json!({"servicekeel.io/bench": "no-such-node"})
        };
        Ok(serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": kind.namespace(),
                "annotations": {
                    keys::IMPORTED_SERVICES: r#"{"services":[{"name":"echo","ports":[{"port":7000}]}]}"#,
                },
            },
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "nodeSelector": node_selector,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532},
                "containers": [{
                    "name": "app",
                    "image": "servicekeel/demo:0.1.0",
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["sleep"],
                }],
            },
        }))?)
    }

    /// CPU time (user and system) the apiserver has spent so far.
    pub fn apiserver_cpu(&self) -> anyhow::Result<Duration> {
        let apiserver = &self.cluster.control_plane.apiserver;
        let pid = apiserver.pid().context("the apiserver is not running")?;
        crate::bench::cpu_of(pid)
    }

    /// Creates `count` pods one at a time and returns how long each create call took
    /// (admission, the webhook where labelled, and storage), and the apiserver's CPU time over
    /// those calls; the pods stay Pending, and are deleted afterwards.
    pub async fn creates(
        &self,
        kind: Kind,
        count: usize,
    ) -> anyhow::Result<(Vec<Duration>, Duration)> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), kind.namespace());
        let mut latencies = Vec::with_capacity(count);
        let mut names = Vec::with_capacity(count);
        let cpu_before = self.apiserver_cpu()?;
        for index in 0..count {
            let name = format!("create-{}-{index}", unique());
            let pod = Self::pod(kind, &name, false)?;
            let started = Instant::now();
            let created = pods.create(&PostParams::default(), &pod).await?;
            latencies.push(started.elapsed());
            if is_injected(&created) != (kind == Kind::Injected) {
                bail!(
                    "{name} in {}: injected is {}",
                    kind.namespace(),
                    is_injected(&created)
                );
            }
            names.push(name);
        }
        let cpu = self.apiserver_cpu()?.saturating_sub(cpu_before);
        for name in names {
            let _ = pods
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
        }
        Ok((latencies, cpu))
    }

    /// Creates `count` pods one at a time and returns how long each took from the create call
    /// until the pod was Ready on the node; deletes each.
    pub async fn to_ready(&self, kind: Kind, count: usize) -> anyhow::Result<Vec<Duration>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), kind.namespace());
        let mut latencies = Vec::with_capacity(count);
        for index in 0..count {
            let name = format!("ready-{}-{index}", unique());
            let pod = Self::pod(kind, &name, true)?;
            let started = Instant::now();
            pods.create(&PostParams::default(), &pod).await?;
            loop {
                if node::pod_ready(&pods.get(&name).await?) {
                    break;
                }
                if started.elapsed() > READY_TIMEOUT {
                    bail!("{name} was not Ready within {READY_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies.push(started.elapsed());
            let _ = pods
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
        }
        Ok(latencies)
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
