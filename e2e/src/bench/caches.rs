//! What the webhook and the router keep of the cluster: their resident memory as pods neither
//! of them serves are added to the cluster. Each webhook replica's reconciler and each node's
//! router watch every pod, whatever its namespace and node, so what they keep of a pod they do
//! not act on is paid for every pod of the cluster.
//!
//! The pods go to a namespace of their own, not labelled for injection, bound to a Node of the
//! benchmark's own that no kubelet runs: the benchmark keeps its status Ready, and gives it no
//! address a router would dial. Their status is set Running and Ready, as a kubelet would, so
//! that the router takes those exporting a service as endpoints. Their addresses are from
//! 198.18.0.0/15, the range set aside for benchmarks; nothing is sent to them. The router's
//! DaemonSet places a pod on that Node too, as on every node; it stays Pending, and goes with
//! the Node.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use servicekeel_api::defaults::{ROUTER_SNAPSHOT_FILE, ROUTER_STATE_DIR};
use servicekeel_api::{Protocol, Service, ServiceList, ServicePort, TargetPort, keys};

use crate::bench::pods::{Workload, running_pods};
use crate::cluster::{ROUTER_DAEMON_SET, WEBHOOK_DEPLOYMENT};
use crate::process::poll_until;

/// The namespace of the pods added.
const NAMESPACE: &str = "bench-cached";
/// The Node they are bound to.
pub const NODE: &str = "bench-elsewhere";
/// The exporting pods export one of this many services each, in turn.
const SERVICES: usize = 50;
/// Creates in flight at once.
const WORKERS: usize = 8;
/// How long the processes are given after a batch before they are read: each batch is
/// followed by this many seconds of nothing else, as the hand measurements that sized it gave
/// the processes 10 to 25 s.
const SETTLE: Duration = Duration::from_secs(10);
/// How often the benchmark renews its Node's Ready condition (the node controller takes a
/// Node whose status is not renewed within its grace period, 50 s by default since Kubernetes
/// 1.32 and 40 s before, for unreachable).
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long the namespace may take to go once deleted.
const GONE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the router may take to serve a batch's endpoints.
const ENTRIES_TIMEOUT: Duration = Duration::from_secs(120);

/// Resident memory of the webhook's replicas and the node's router before and after each
/// batch of pods.
#[derive(Debug)]
pub struct CacheMemory {
    /// Pods per batch: first that many exporting a service, then as many plain.
    pub batch: usize,
    pub processes: Vec<Watched>,
    /// The router's endpoints on [`NODE`] before the pods and after each batch.
    pub entries: [u64; 3],
}

/// Which of ServiceKeel's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    WebhookReplica,
    Router,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::WebhookReplica => "webhook replica",
            Role::Router => "router",
        })
    }
}

/// One process read.
#[derive(Debug)]
pub struct Watched {
    pub role: Role,
    /// Its pod's name.
    pub pod: String,
    pub pid: u32,
    /// Its container's memory limit, as the manifest gives it.
    pub limit: Option<String>,
    /// VmRSS in bytes: before the pods, after the exporting ones, after the plain ones.
    pub rss: [u64; 3],
}

impl Watched {
    /// Bytes of resident memory it gained per pod added, over the `batch` of each kind.
    pub fn per_pod_added(&self, batch: usize) -> f64 {
        let [before, _, plain] = self.rss;
        (plain as f64 - before as f64) / (2 * batch).max(1) as f64
    }
}

impl CacheMemory {
    /// Adds `batch` running pods exporting a service, then `batch` running plain ones, to the
    /// cluster of `client`, whose node is this host, reading the webhook replicas and the
    /// router before and after each batch; takes them away again.
    pub async fn measure(client: &kube::Client, batch: usize) -> anyhow::Result<CacheMemory> {
        // Ready since now, as its kubelet would report it.
        let since = Timestamp::now();
        let heartbeat = tokio::spawn(heartbeat(client.clone(), since));
        let measured = async {
            add_node(client, since).await?;
            Self::measure_with_node(client, batch).await
        }
        .await;
        heartbeat.abort();
        let removed = remove(client).await;
        let measured = measured?;
        removed?;
        Ok(measured)
    }

    async fn measure_with_node(client: &kube::Client, batch: usize) -> anyhow::Result<CacheMemory> {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?,
            )
            .await
            .with_context(|| format!("cannot create namespace {NAMESPACE}"))?;
        let mut processes = watched(client).await?;
        let router = Router::of(&processes)?;
        let read = |processes: &mut Vec<Watched>, step: usize| -> anyhow::Result<()> {
            for process in processes {
                process.rss[step] = crate::bench::rss_of(process.pid)
                    .with_context(|| format!("{} {} is gone", process.role, process.pod))?;
            }
            Ok(())
        };
        tokio::time::sleep(SETTLE).await;
        read(&mut processes, 0)?;
        let before = router.entries()?;
        add_pods(client, 0..batch, true).await?;
        let exporting = router.wait_for(before + batch as u64).await?;
        tokio::time::sleep(SETTLE).await;
        read(&mut processes, 1)?;
        add_pods(client, batch..2 * batch, false).await?;
        tokio::time::sleep(SETTLE).await;
        read(&mut processes, 2)?;
        let after = router.entries()?;
        if after != exporting {
            bail!(
                "the router serves {after} endpoints on node {NODE} after the plain pods, not \
                 {exporting}"
            );
        }
        Ok(CacheMemory {
            batch,
            processes,
            entries: [before, exporting, after],
        })
    }

    /// The report's section: a sentence and a table.
    pub fn render(&self) -> String {
        let mb = |bytes: u64| bytes as f64 / 1e6;
        let batch = self.batch;
        let mut out = format!(
            "\nWhat the webhook and the router keep of the cluster's pods: resident memory \
             (VmRSS) of each webhook replica and of the node's router, in the cluster of the \
             pod rows, as pods neither of them serves were added: {batch} pods exporting a \
             service (`{exported}`, one of {SERVICES} services each), then {batch} plain pods, \
             in a namespace not labelled for injection, bound to a Node no kubelet runs (the \
             benchmark keeps it Ready; it has no address a router dials), their status set \
             Running and Ready; each read {settle} s after its batch was created (the exporting \
             pods' once the router served them all). Each pod has \
             one container with eight variables, a port, probes and resources. The router's \
             registry snapshot listed {} endpoints on that Node before the pods, {} after the \
             exporting ones and {} after the plain ones.\n\n\
             | process | before | + {batch} pods exporting a service | + {batch} plain pods | \
             per pod added | memory limit |\n|---|---|---|---|---|---|\n",
            self.entries[0],
            self.entries[1],
            self.entries[2],
            exported = keys::EXPORTED_SERVICES,
            settle = SETTLE.as_secs(),
        );
        for process in &self.processes {
            let [before, exporting, plain] = process.rss;
            out.push_str(&format!(
                "| {} `{}` | {:.1} MB | {:.1} MB | {:.1} MB | {:.1} kB | {} |\n",
                process.role,
                process.pod,
                mb(before),
                mb(exporting),
                mb(plain),
                process.per_pod_added(batch) / 1e3,
                process.limit.as_deref().unwrap_or("none"),
            ));
        }
        out
    }
}

/// The webhook's running replicas and the router's pods, each with its process on this host.
async fn watched(client: &kube::Client) -> anyhow::Result<Vec<Watched>> {
    let mut watched = Vec::new();
    for (role, workload) in [
        (
            Role::WebhookReplica,
            Workload::Deployment(WEBHOOK_DEPLOYMENT),
        ),
        (Role::Router, Workload::DaemonSet(ROUTER_DAEMON_SET)),
    ] {
        for pod in running_pods(client, workload).await? {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().context("a pod without a uid")?;
            let container = pod
                .spec
                .as_ref()
                .and_then(|spec| spec.containers.first())
                .context("a pod without containers")?;
            let limit = container
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|limits| limits.get("memory"))
                .map(|quantity| quantity.0.clone());
            watched.push(Watched {
                role,
                pid: crate::node::pod_process(&uid, "servicekeel-")
                    .with_context(|| format!("no process of {role} {name} on this host"))?,
                pod: name,
                limit,
                rss: [0; 3],
            });
        }
    }
    Ok(watched)
}

/// The node's router, read through its registry snapshot: the endpoints it serves, written
/// half a second after they change, each with the node it is on.
struct Router {
    snapshot: PathBuf,
}

impl Router {
    /// The router among `processes`, its state directory seen through its process's root.
    fn of(processes: &[Watched]) -> anyhow::Result<Router> {
        let routers: Vec<&Watched> = processes
            .iter()
            .filter(|process| process.role == Role::Router)
            .collect();
        let [router] = routers.as_slice() else {
            bail!("{} router pods run, not one", routers.len());
        };
        Ok(Router {
            snapshot: PathBuf::from(format!(
                "/proc/{}/root{ROUTER_STATE_DIR}/{ROUTER_SNAPSHOT_FILE}",
                router.pid
            )),
        })
    }

    /// How many endpoints on [`NODE`] the router serves; none before it wrote a snapshot.
    fn entries(&self) -> anyhow::Result<u64> {
        let text = match std::fs::read(&self.snapshot) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot read {}", self.snapshot.display()));
            }
        };
        let snapshot: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not JSON", self.snapshot.display()))?;
        on_node(&snapshot).with_context(|| format!("in {}", self.snapshot.display()))
    }

    /// Waits until the router serves `wanted` endpoints on [`NODE`]; how many it serves then.
    async fn wait_for(&self, wanted: u64) -> anyhow::Result<u64> {
        let what = format!(
            "the router's snapshot {} listing {wanted} endpoints on node {NODE}",
            self.snapshot.display()
        );
        poll_until(&what, ENTRIES_TIMEOUT, || async {
            Ok((self.entries()? == wanted).then_some(wanted))
        })
        .await
    }
}

/// The entries on [`NODE`] in a registry snapshot: `{"entries": [{"node": …, …}, …], …}`.
fn on_node(snapshot: &serde_json::Value) -> anyhow::Result<u64> {
    let entries = snapshot["entries"]
        .as_array()
        .context("the snapshot has no list of entries")?;
    Ok(entries.iter().filter(|entry| entry["node"] == NODE).count() as u64)
}

/// Creates the Node the pods are bound to; [`remove`] deletes it.
async fn add_node(client: &kube::Client, since: Timestamp) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        // Nothing else is scheduled to it.
        "spec": {"unschedulable": true},
    }))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("cannot create node {NODE}"))?;
    renew(&nodes, since).await
}

/// Keeps the Node Ready until aborted.
async fn heartbeat(client: kube::Client, since: Timestamp) {
    let nodes: Api<Node> = Api::all(client);
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if let Err(error) = renew(&nodes, since).await {
            tracing::warn!(%error, "cannot renew the status of node {NODE}");
        }
    }
}

/// The Node's status as a kubelet reports it: Ready since `since`, seen now, its one address
/// its name.
async fn renew(nodes: &Api<Node>, since: Timestamp) -> anyhow::Result<()> {
    let now = serde_json::to_value(Time(Timestamp::now()))?;
    let since = serde_json::to_value(Time(since))?;
    let status = json!({"status": {
        "addresses": [{"type": "Hostname", "address": NODE}],
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": now, "lastTransitionTime": since,
        }],
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
    }});
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("cannot set the status of node {NODE}"))?;
    Ok(())
}

/// Creates the pods numbered `numbers`, Running and Ready on [`NODE`], `WORKERS` at a time;
/// `exporting` ones carry an exported service.
async fn add_pods(
    client: &kube::Client,
    numbers: std::ops::Range<usize>,
    exporting: bool,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let pods = pods.clone();
        let numbers = numbers.clone();
        workers.spawn(async move {
            for number in numbers.skip(worker).step_by(WORKERS) {
                let (pod, status) = added_pod(number, exporting)?;
                let name = pod.metadata.name.clone().unwrap_or_default();
                pods.create(&PostParams::default(), &pod)
                    .await
                    .with_context(|| format!("cannot create pod {name}"))?;
                pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .with_context(|| format!("cannot set the status of pod {name}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(())
}

/// Pod `number` and the status patch that makes it Running and Ready.
fn added_pod(number: usize, exporting: bool) -> anyhow::Result<(Pod, serde_json::Value)> {
    let app = format!("app-{}", number % SERVICES);
    let mut annotations = serde_json::Map::new();
    annotations.insert("prometheus.io/scrape".into(), "true".into());
    if exporting {
        let exported = ServiceList {
            services: vec![Service {
                name: app.clone(),
                namespace: Some(NAMESPACE.into()),
                cluster: None,
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(TargetPort::Name("http".into())),
                    protocol: Protocol::Tcp,
                }],
            }],
        };
        annotations.insert(
            keys::EXPORTED_SERVICES.into(),
            exported.to_canonical_json().into(),
        );
    }
    let env: Vec<_> = (0..8)
        .map(|k| json!({"name": format!("SETTING_{k}"), "value": format!("value-{k}").repeat(4)}))
        .collect();
    let pod = serde_json::from_value(json!({
        "metadata": {
            "name": format!("{}-{number}", if exporting { "exporting" } else { "plain" }),
            "labels": {"app": app, "pod-template-hash": "5d8f7c9b6"},
            "annotations": annotations,
        },
        "spec": {
            "nodeName": NODE,
            "containers": [{
                "name": "app",
                "image": "registry.invalid/app:1.2.3",
                "ports": [{"name": "http", "containerPort": 8080}],
                "env": env,
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            }],
        },
    }))?;
    let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + number as u32);
    let now = serde_json::to_value(Time(Timestamp::now()))?;
    let conditions: Vec<_> = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
        .into_iter()
        .map(|kind| json!({"type": kind, "status": "True", "lastTransitionTime": now}))
        .collect();
    let status = json!({"status": {
        "phase": "Running",
        "podIP": address.to_string(),
        "podIPs": [{"ip": address.to_string()}],
        "conditions": conditions,
        "containerStatuses": [{
            "name": "app", "image": "registry.invalid/app:1.2.3", "imageID": "",
            "ready": true, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": now}},
        }],
    }});
    Ok((pod, status))
}

/// Deletes the pods at once (no kubelet would confirm them gone), their namespace, the Node and
/// what daemon sets placed on it, and waits for the namespace to go.
async fn remove(client: &kube::Client) -> anyhow::Result<()> {
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pods_gone = pods.delete_collection(&now, &ListParams::default()).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace_gone = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let node_gone = nodes.delete(NODE, &DeleteParams::default()).await;
    // After the Node, so that no daemon set places them again.
    let placed_gone = remove_placed(client, &now).await;
    pods_gone.context("cannot delete the pods added")?;
    namespace_gone.with_context(|| format!("cannot delete namespace {NAMESPACE}"))?;
    node_gone.with_context(|| format!("cannot delete node {NODE}"))?;
    placed_gone?;
    // The cluster left as it was found: the namespace gone, not terminating.
    let what = format!("the deletion of namespace {NAMESPACE}");
    poll_until(&what, GONE_TIMEOUT, || async {
        Ok(namespaces.get_opt(NAMESPACE).await?.is_none().then_some(()))
    })
    .await
}

/// Deletes, `now`, the pods daemon sets placed on the Node (the router's DaemonSet places one
/// on every node, whatever its taints; there it stays Pending).
async fn remove_placed(client: &kube::Client, now: &DeleteParams) -> anyhow::Result<()> {
    let all: Api<Pod> = Api::all(client.clone());
    let on_node = ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    for pod in all.list(&on_node).await?.items {
        let (Some(name), Some(namespace)) = (pod.metadata.name, pod.metadata.namespace) else {
            continue;
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        match pods.delete(&name, now).await {
            // Gone already, as the added pods are.
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                return Err(error).with_context(|| format!("cannot delete pod {namespace}/{name}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pods added are what the router and the webhook read them as: an exporting pod's
    /// annotation parses to one service, and its status puts it Running and Ready at an
    /// address of the benchmarks' range, each pod at another.
    #[test]
    fn pods_added_export_and_run_as_asked() {
        let (pod, status) = added_pod(7, true).unwrap();
        let annotation = &pod.metadata.annotations.as_ref().unwrap()[keys::EXPORTED_SERVICES];
        let exported = ServiceList::parse(annotation).unwrap();
        assert_eq!(exported.services.len(), 1);
        assert_eq!(exported.services[0].name, "app-7");
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE));
        assert_eq!(status["status"]["phase"], "Running");
        assert_eq!(status["status"]["podIP"], "198.18.0.8");
        let (plain, status) = added_pod(300, false).unwrap();
        assert!(
            !plain
                .metadata
                .annotations
                .unwrap()
                .contains_key(keys::EXPORTED_SERVICES)
        );
        assert_eq!(status["status"]["podIP"], "198.18.1.45");
    }

    /// Of a registry snapshot, only the endpoints on the benchmark's Node are counted; a file
    /// without a list of entries is an error, not none.
    #[test]
    fn endpoints_on_the_node_are_counted_from_the_snapshot() {
        let snapshot = json!({"format": 1, "saved": 1, "entries": [
            {"target": "app-1.bench-cached.default:80/TCP", "addr": "198.18.0.2:8080", "node": NODE, "ready": true},
            {"target": "echo.demo.default:80/TCP", "addr": "10.244.0.9:8080", "node": "servicekeel-node", "ready": true},
            {"target": "app-2.bench-cached.default:80/TCP", "addr": "198.18.0.3:8080", "node": NODE, "ready": false},
        ]});
        assert_eq!(on_node(&snapshot).unwrap(), 2);
        assert_eq!(on_node(&json!({"format": 1, "entries": []})).unwrap(), 0);
        assert!(on_node(&json!({"format": 1})).is_err());
    }

    /// What a process gained is spread over both batches, and a process that gave memory back
    /// gained less than nothing.
    #[test]
    fn memory_per_pod_is_over_both_batches() {
        let process = |rss| Watched {
            role: Role::Router,
            pod: "r".into(),
            pid: 1,
            limit: None,
            rss,
        };
        let grew = process([10_000_000, 15_000_000, 17_000_000]);
        assert_eq!(grew.per_pod_added(1000), 3500.0);
        let shrank = process([10_000_000, 9_000_000, 9_000_000]);
        assert_eq!(shrank.per_pod_added(500), -1000.0);
    }
}
