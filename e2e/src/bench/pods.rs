//! The pod rows: pods created through the real apiserver on the cluster with a real node, in a
//! namespace labelled for injection (the webhook is called) and in one that is not (baseline),
//! the same pod spec in both, one pod at a time; and, to tell the webhook's call from the cost of
//! the larger pod it leaves, that pod as the webhook left it, created where no webhook is called
//! and where the webhook is called and leaves it unchanged.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use servicekeel_api::keys;
use servicekeel_webhook::shape::is_token_volume;

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
    /// The pod of [`Kind::Prefilled`], its name, namespace and node selector set per create.
    prefilled: Pod,
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
    /// Not labelled, and the pod sent is the one the webhook returned for [`Kind::Injected`]
    /// (sidecar, volumes, DNS settings, annotations): the larger pod without the call.
    Prefilled,
    /// The pod of [`Kind::Prefilled`] sent to the labelled namespace: the apiserver calls the
    /// webhook, which finds the pod injected already and allows it unchanged, with no patch.
    PrefilledCalled,
}

impl Kind {
    fn namespace(self) -> &'static str {
        match self {
            Kind::Plain => "bench-plain",
            Kind::Injected | Kind::PrefilledCalled => "bench-injected",
            Kind::Prefilled => "bench-prefilled",
        }
    }

    /// Whether the pod stored has the sidecar.
    fn has_sidecar(self) -> bool {
        self != Kind::Plain
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
        for kind in [Kind::Plain, Kind::Injected, Kind::Prefilled] {
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
        let prefilled = as_injected(&client).await?;
        Ok(PodBench {
            client,
            cluster,
            dir,
            prefilled,
        })
    }

    /// The apiserver's own count and total time (seconds) of its calls to the webhook so far
    /// (`apiserver_admission_webhook_admission_duration_seconds`): the whole call as the
    /// apiserver makes it, encoding the review, the HTTPS exchange, applying the patch and
    /// decoding the patched pod.
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
    fn pod(&self, kind: Kind, name: &str, runs: bool) -> anyhow::Result<Pod> {
        let mut pod = match kind {
            Kind::Prefilled | Kind::PrefilledCalled => self.prefilled.clone(),
            Kind::Plain | Kind::Injected => Self::sent()?,
        };
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some(kind.namespace().into());
        let spec = pod.spec.as_mut().context("a pod without a spec")?;
        spec.node_selector = (!runs).then(|| {
            [(
                "servicekeel.io/bench".to_string(),
                "no-such-node".to_string(),
            )]
            .into()
        });
        Ok(pod)
    }

    /// The pod as sent, before admission, without a name or namespace.
    fn sent() -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(json!({
            "metadata": {
                "annotations": {
                    keys::IMPORTED_SERVICES: r#"{"services":[{"name":"echo","ports":[{"port":7000}]}]}"#,
                },
            },
            "spec": {
                "terminationGracePeriodSeconds": 0,
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
            let pod = self.pod(kind, &name, false)?;
            let started = Instant::now();
            let created = pods.create(&PostParams::default(), &pod).await?;
            latencies.push(started.elapsed());
            if is_injected(&created) != kind.has_sidecar() {
                bail!(
                    "{name} in {}: has the sidecar is {}",
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
            let pod = self.pod(kind, &name, true)?;
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

/// The pod of [`Kind::Injected`] as the webhook leaves it, for [`Kind::Prefilled`]: created with
/// a dry run in the labelled namespace (the webhook declares no side effects), and what the
/// webhook changed taken from it into the pod as sent: the annotations, the containers it added,
/// the volumes, the DNS settings and the pod's security context. Fields the apiserver fills in
/// (defaults, the service account's token volume and its mounts, tolerations) are left for it
/// to fill in again, as it does for the others; those of the added containers stay.
async fn as_injected(client: &kube::Client) -> anyhow::Result<Pod> {
    let injected: Api<Pod> = Api::namespaced(client.clone(), Kind::Injected.namespace());
    let mut sent = PodBench::sent()?;
    sent.metadata.name = Some("dry-run".into());
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let stored = injected
        .create(&dry_run, &sent)
        .await
        .context("cannot dry-run a pod in the labelled namespace")?;
    if !is_injected(&stored) {
        bail!(
            "the dry run in {} was not injected",
            Kind::Injected.namespace()
        );
    }
    let stored_spec = stored.spec.context("the dry run returned no spec")?;
    let mut pod = PodBench::sent()?;
    pod.metadata.annotations = stored.metadata.annotations;
    let spec = pod.spec.as_mut().context("a pod without a spec")?;
    let without_token = |mut container: Container| {
        if let Some(mounts) = container.volume_mounts.as_mut() {
            mounts.retain(|mount| !is_token_volume(&mount.name));
        }
        container
    };
    let sent_names: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
    spec.containers.extend(
        stored_spec
            .containers
            .into_iter()
            .filter(|c| !sent_names.contains(&c.name))
            .map(without_token),
    );
    spec.init_containers = stored_spec
        .init_containers
        .map(|added| added.into_iter().map(without_token).collect());
    spec.volumes = stored_spec.volumes.map(|volumes| {
        volumes
            .into_iter()
            .filter(|volume| !is_token_volume(&volume.name))
            .collect()
    });
    spec.dns_config = stored_spec.dns_config;
    spec.dns_policy = stored_spec.dns_policy;
    spec.security_context = stored_spec.security_context;
    Ok(pod)
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
