//! ServiceKeel on a real node, installed from `manifests/` the way users install it: the
//! kubelet runs the webhook, the router and the pods the webhook injected, with containerd.
//! One cluster serves every test, in order (the last one stops the API server); the demo
//! workload of `manifests/examples/` is their subject, and checks run inside its client pod
//! (`kubectl exec`, or the pod's namespaces directly while the API server is down).

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use libtest_mimic::Arguments;
use serde_json::{Value, json};
use servicekeel_api::{defaults, http, keys};
use servicekeel_e2e::bench::caches::{self, CacheMemory, Role};
use servicekeel_e2e::cluster::{NodeCluster, pods_report};
use servicekeel_e2e::demo::{self, CLIENT, NAMESPACE};
use servicekeel_e2e::harness::{self, Test};
use servicekeel_e2e::node::{self, NODE_NAME};
use servicekeel_e2e::process::{self, Lifetime, http_get};
use servicekeel_e2e::{paths, webhook};
use servicekeel_webhook::shape;
use tokio::sync::Mutex;

struct Shared {
    cluster: Mutex<NodeCluster>,
    client: kube::Client,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One node, one demo workload, tests that scale it and stop the API server: in order.
    args.test_threads = Some(1);
    harness::init_logging();
    let tests: Vec<Test<Shared>> = vec![
        (
            "a_deployments_pods_run_the_native_sidecar_and_export_their_service",
            |s| Box::pin(native_sidecar_and_exports(s)),
        ),
        (
            "the_router_runs_as_its_own_user_without_capabilities_in_directories_handed_to_it",
            |s| Box::pin(router_unprivileged(s)),
        ),
        (
            "the_client_resolves_its_imports_and_other_names_and_round_trips_byte_exact",
            |s| Box::pin(client_round_trips(s)),
        ),
        (
            "an_added_import_takes_effect_live_without_breaking_a_connection",
            |s| Box::pin(import_added_live(s)),
        ),
        ("a_job_completes_while_its_native_sidecar_runs", |s| {
            Box::pin(job_completes(s))
        }),
        (
            "a_namespace_enforcing_pod_security_restricted_accepts_injected_pods_that_reach_services",
            |s| Box::pin(pod_security_restricted(s)),
        ),
        (
            "connections_spread_over_replicas_and_a_deleted_one_costs_at_most_a_retry",
            |s| Box::pin(replicas_spread_and_deletion(s)),
        ),
        (
            "a_deployments_replicas_are_answered_from_a_remembered_review_injected_alike",
            |s| Box::pin(replicas_remembered(s)),
        ),
        (
            "pod_creations_succeed_when_retried_with_backoff_while_a_webhook_replica_is_killed",
            |s| Box::pin(webhook_replica_killed(s)),
        ),
        (
            "the_webhook_and_the_router_keep_a_few_kilobytes_of_each_pod_they_do_not_serve",
            |s| Box::pin(caches_stay_small(s)),
        ),
        (
            "traffic_flows_with_the_api_server_down_and_a_router_restarted_from_its_snapshot",
            |s| Box::pin(edge_autonomy(s)),
        ),
    ];
    if let Some(listed) = harness::list_only(&args, &tests) {
        return listed.exit_code();
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = paths::run_dir("servicekeel-e2e-node");
    let started = runtime.block_on(async {
        let cluster = NodeCluster::start(&dir, Lifetime::TiedToThisProcess).await?;
        demo::install(cluster.kubeconfig())?;
        let client = cluster.client().await?;
        Ok::<_, anyhow::Error>((cluster, client))
    });
    let (cluster, client) = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("cannot start the cluster with a node: {error:#}");
            // Whatever started is stopped, and the host given back, as the cluster drops.
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared {
        kubeconfig: cluster.kubeconfig().to_owned(),
        dir: cluster.dir().to_owned(),
        cluster: Mutex::new(cluster),
        client,
    });
    let conclusion = harness::run(&args, tests, &shared, runtime.handle(), |shared| {
        pods_report(&shared.kubeconfig)
    });
    // Stop everything (and give the host back) before the runtime goes, then remove the files.
    let node_dir = shared.dir.clone();
    drop(shared);
    drop(runtime);
    let left = node::leftovers(&node_dir);
    let _ = std::fs::remove_dir_all(&dir);
    if !left.is_empty() {
        eprintln!(
            "the node was not given back after the tests; still there:\n  {}",
            left.join("\n  ")
        );
        return ExitCode::FAILURE;
    }
    conclusion.exit_code()
}

impl Shared {
    fn kubectl(&self, arguments: &[&str]) -> anyhow::Result<String> {
        webhook::kubectl(&self.kubeconfig, arguments, None)
    }

    fn apply(&self, manifest: &Value) -> anyhow::Result<()> {
        webhook::kubectl(
            &self.kubeconfig,
            &["apply", "-f", "-"],
            Some(&serde_json::to_string(manifest)?),
        )
        .map(drop)
    }

    /// `servicekeel-demo ARGS` in the client pod, through `kubectl exec`.
    fn in_client(&self, arguments: &[&str]) -> anyhow::Result<String> {
        demo::exec(&self.kubeconfig, NAMESPACE, CLIENT, CLIENT, arguments)
    }

    /// The same, left running in the background.
    fn in_client_background(&self, arguments: &[&str]) -> anyhow::Result<Child> {
        let mut command = std::process::Command::new(paths::kubectl());
        command
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args([
                "exec",
                "-n",
                NAMESPACE,
                CLIENT,
                "-c",
                CLIENT,
                "--",
                "servicekeel-demo",
            ])
            .args(arguments)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(command.spawn()?)
    }

    fn pods(&self) -> Api<Pod> {
        self.pods_in(NAMESPACE)
    }

    fn pods_in(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The webhook's pods, as the manifests run them.
    async fn webhook_pods(&self) -> anyhow::Result<Vec<Pod>> {
        Ok(self
            .pods_in(webhook::SYSTEM_NAMESPACE)
            .list(&ListParams::default().labels("app.kubernetes.io/name=servicekeel-webhook"))
            .await?
            .items)
    }

    async fn echo_pods(&self) -> anyhow::Result<Vec<Pod>> {
        Ok(self
            .pods()
            .list(&ListParams::default().labels("app=echo"))
            .await?
            .items)
    }
}

/// What a background command printed, once it has ended; an error if it failed.
fn finished(child: Child, what: &str) -> anyhow::Result<String> {
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    ensure!(
        output.status.success(),
        "{what} failed ({}): {stderr} {stdout}",
        output.status
    );
    Ok(stdout)
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() > deadline => {
                return Err(error.context(format!("{what}: not within {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn annotation(pod: &Pod, key: &str) -> Option<Value> {
    let text = pod.metadata.annotations.as_ref()?.get(key)?;
    serde_json::from_str(text).ok()
}

/// Restart counts of every container of the pod, sidecar included.
fn restarts(pod: &Pod) -> Vec<(String, i32)> {
    let status = pod.status.clone().unwrap_or_default();
    status
        .init_container_statuses
        .unwrap_or_default()
        .into_iter()
        .chain(status.container_statuses.unwrap_or_default())
        .map(|c| (c.name, c.restart_count))
        .collect()
}

async fn native_sidecar_and_exports(shared: Arc<Shared>) -> anyhow::Result<()> {
    let pods = shared.echo_pods().await?;
    ensure!(!pods.is_empty(), "the echo Deployment has no pods");
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().context("no spec")?;
        let sidecar = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == defaults::SIDECAR_CONTAINER)
            .with_context(|| format!("{name} has no sidecar among its init containers"))?;
        ensure!(
            sidecar.restart_policy.as_deref() == Some("Always"),
            "{name}: the sidecar is not a native sidecar (restartPolicy {:?})",
            sidecar.restart_policy
        );
        ensure!(node::pod_ready(pod), "{name} is not Ready");
        let sidecar_status = pod
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .and_then(|s| s.iter().find(|c| c.name == defaults::SIDECAR_CONTAINER))
            .with_context(|| format!("{name} has no status for its sidecar"))?;
        ensure!(
            sidecar_status.ready && sidecar_status.started == Some(true),
            "{name}: the sidecar is not started and ready"
        );
        // Its postStart hook (`servicekeel-proxy wait`) returned the first time: a hook that
        // fails has the kubelet kill the container and start it again.
        ensure!(
            sidecar
                .lifecycle
                .as_ref()
                .and_then(|l| l.post_start.as_ref())
                .is_some(),
            "{name}: the sidecar has no postStart hook"
        );
        ensure!(
            sidecar_status.restart_count == 0,
            "{name}: the sidecar restarted {} times",
            sidecar_status.restart_count
        );
        let exported = annotation(pod, keys::EXPORTED_SERVICES)
            .with_context(|| format!("{name} has no {}", keys::EXPORTED_SERVICES))?;
        let service = &exported["services"][0];
        ensure!(
            service["name"] == "echo" && service["namespace"] == NAMESPACE,
            "{name} exports {exported}"
        );
        let ports: BTreeSet<(u64, String)> = service["ports"]
            .as_array()
            .context("no ports")?
            .iter()
            .map(|p| {
                (
                    p["port"].as_u64().unwrap_or_default(),
                    p["protocol"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let expected: BTreeSet<(u64, String)> = [(7000, "TCP"), (7001, "UDP"), (7002, "TCP")]
            .into_iter()
            .map(|(p, proto)| (p, proto.to_string()))
            .collect();
        ensure!(ports == expected, "{name} exports ports {ports:?}");
    }
    Ok(())
}

async fn client_round_trips(shared: Arc<Shared>) -> anyhow::Result<()> {
    let resolved = shared.in_client(&["resolve", "echo"])?;
    let addresses: Vec<&str> = resolved
        .split_once(" resolves to ")
        .map(|(_, list)| list.split(' ').collect())
        .unwrap_or_default();
    ensure!(
        !addresses.is_empty() && addresses.iter().all(|a| a.starts_with("127.0.66.")),
        "echo should resolve to the sidecar's 127.0.66.x: {resolved}"
    );
    let upstream = shared.in_client(&["resolve", "kubernetes.default.svc.cluster.local"])?;
    ensure!(
        upstream.ends_with(&format!(" {}", node::API_ADDRESS)),
        "a name that is not imported should come from the cluster DNS: {upstream}"
    );
    let unknown = shared.in_client(&["resolve", "nothing-here.demo.svc.cluster.local"]);
    ensure!(
        unknown.is_err(),
        "a name neither imported nor known upstream resolved: {unknown:?}"
    );
    let tcp = shared.in_client(&["tcp", "echo:7000", "--bytes", "1048576"])?;
    ensure!(tcp.contains("1048576 bytes echoed byte-exact"), "{tcp}");
    let udp = shared.in_client(&["udp", "echo:7001", "--bytes", "1200"])?;
    ensure!(udp.contains("1200 bytes echoed byte-exact"), "{udp}");
    Ok(())
}

async fn import_added_live(shared: Arc<Shared>) -> anyhow::Result<()> {
    // A second Service over the echo pods, not imported by the client yet.
    shared.apply(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "greeter", "namespace": NAMESPACE},
        "spec": {
            "selector": {"app": "echo"},
            "ports": [{"name": "greet", "port": 7100, "targetPort": "tcp-echo"}],
        },
    }))?;
    ensure!(
        shared.in_client(&["resolve", "greeter"]).is_err(),
        "greeter resolves before it is imported"
    );
    let before = shared.pods().get(CLIENT).await?;
    let uid = before.metadata.uid.clone();
    let live = shared.in_client_background(&["hold", "echo:7000", "--seconds", "20"])?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut imports = annotation(&before, keys::IMPORTED_SERVICES).context("no imports")?;
    imports["services"]
        .as_array_mut()
        .context("services is not a list")?
        .push(json!({"name": "greeter", "ports": [{"port": 7100}]}));
    shared.kubectl(&[
        "annotate",
        "--overwrite",
        "-n",
        NAMESPACE,
        &format!("pod/{CLIENT}"),
        &format!("{}={imports}", keys::IMPORTED_SERVICES),
    ])?;
    let started = Instant::now();
    let reached = eventually(
        "the added import carries traffic",
        Duration::from_secs(90),
        || async { shared.in_client(&["tcp", "greeter:7100", "--bytes", "10000"]) },
    )
    .await?;
    let took = started.elapsed();
    ensure!(reached.contains("byte-exact"), "{reached}");

    let held = finished(live, "the live connection")?;
    ensure!(held.contains("none failed"), "{held}");
    let after = shared.pods().get(CLIENT).await?;
    ensure!(after.metadata.uid == uid, "the client pod was replaced");
    ensure!(
        restarts(&after) == restarts(&before),
        "containers restarted: {:?} -> {:?}",
        restarts(&before),
        restarts(&after)
    );
    eprintln!("import added: traffic after {took:?}; live connection: {held}");
    Ok(())
}

/// Runs the demo as a Job `name` in `namespace` that imports `imported` and round-trips through
/// `target` (as the pods of a restricted namespace must be, when `restricted`), waits for it to
/// complete, and returns its pod, checked injected and byte-exact by its own word.
async fn demo_job(
    shared: &Shared,
    namespace: &str,
    name: &str,
    imported: &str,
    target: &str,
    restricted: bool,
) -> anyhow::Result<Pod> {
    let mut pod_security = json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532});
    let mut container_security = json!({});
    if restricted {
        pod_security["seccompProfile"] = json!({"type": "RuntimeDefault"});
        container_security =
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    }
    shared.apply(&json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {keys::IMPORTED_SERVICES: imported}},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": pod_security,
                    "containers": [{
                        "name": "once",
                        "image": "servicekeel/demo:0.1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["tcp", target, "--retries", "3"],
                        "securityContext": container_security,
                    }],
                },
            },
        },
    }))?;
    let jobs: Api<Job> = Api::namespaced(shared.client.clone(), namespace);
    let outcome = eventually(
        &format!("the job {namespace}/{name} completes"),
        Duration::from_secs(120),
        || async {
            let job = jobs.get(name).await?;
            let status = job.status.clone().unwrap_or_default();
            if status.failed.unwrap_or(0) > 0 {
                bail!("the job failed: {status:?}");
            }
            ensure!(status.succeeded == Some(1), "not complete yet: {status:?}");
            Ok(job)
        },
    )
    .await;
    let job = match outcome {
        Ok(job) => job,
        Err(error) => {
            // Admission's refusals (Pod Security among them) are events of the Job.
            let events = shared
                .kubectl(&["get", "events", "-n", namespace])
                .unwrap_or_default();
            bail!("{error:#}\nevents in {namespace}:\n{events}");
        }
    };
    let complete = job
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Complete" && c.status == "True");
    ensure!(complete, "no Complete condition");
    let pods = shared
        .pods_in(namespace)
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await?;
    let pod = pods.items.first().context("the job's pod is gone")?.clone();
    ensure!(webhook::is_injected(&pod), "the job's pod has no sidecar");
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    ensure!(phase.as_deref() == Some("Succeeded"), "pod phase {phase:?}");
    let logs = shared.kubectl(&[
        "logs",
        "-n",
        namespace,
        &format!("job/{name}"),
        "-c",
        "once",
    ])?;
    ensure!(logs.contains("byte-exact"), "the job said: {logs}");
    Ok(pod)
}

async fn job_completes(shared: Arc<Shared>) -> anyhow::Result<()> {
    let imported = r#"{"services":[{"name":"echo","ports":[{"port":7000}]}]}"#;
    demo_job(&shared, NAMESPACE, "once", imported, "echo:7000", false).await?;
    Ok(())
}

/// A namespace enforcing Pod Security "restricted": an injected Job's pod is admitted (its
/// sidecar reaches the router over TCP on the node's address, with no `hostPath` volume) and
/// reaches the demo's echo service in another namespace.
async fn pod_security_restricted(shared: Arc<Shared>) -> anyhow::Result<()> {
    const STRICT: &str = "strict";
    shared.apply(&json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": STRICT, "labels": {
            keys::INJECT: "enabled",
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }},
    }))?;
    // The namespace does enforce it: a pod of its own with a hostPath volume is refused.
    let own_host_path = webhook::kubectl(
        &shared.kubeconfig,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&serde_json::to_string(&json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "host-path", "namespace": STRICT,
                         "annotations": {keys::INJECT: "false"}},
            "spec": {
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "a", "image": "servicekeel/demo:0.1.0",
                                "securityContext": {"allowPrivilegeEscalation": false,
                                                    "capabilities": {"drop": ["ALL"]}}}],
                "volumes": [{"name": "h", "hostPath": {"path": "/tmp"}}],
            },
        }))?),
    );
    ensure!(
        own_host_path
            .as_ref()
            .is_err_and(|e| e.to_string().contains("hostPath")),
        "Pod Security should refuse a hostPath volume in {STRICT}: {own_host_path:?}"
    );
    let imported = format!(
        r#"{{"services":[{{"name":"echo","namespace":"{NAMESPACE}","ports":[{{"port":7000}}]}}]}}"#
    );
    let target = format!("echo.{NAMESPACE}:7000");
    let pod = demo_job(&shared, STRICT, "strict-once", &imported, &target, true).await?;
    let spec = pod.spec.as_ref().context("no spec")?;
    ensure!(
        spec.volumes.iter().flatten().all(|v| v.host_path.is_none()),
        "a hostPath volume in a restricted namespace: {:?}",
        spec.volumes
    );
    shared.kubectl(&["delete", "namespace", STRICT, "--wait=false"])?;
    Ok(())
}

async fn replicas_spread_and_deletion(shared: Arc<Shared>) -> anyhow::Result<()> {
    shared.kubectl(&["scale", "-n", NAMESPACE, "deployment/echo", "--replicas=3"])?;
    shared.kubectl(&[
        "rollout",
        "status",
        "-n",
        NAMESPACE,
        "deployment/echo",
        "--timeout=120s",
    ])?;
    let names: BTreeSet<String> = shared
        .echo_pods()
        .await?
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    ensure!(names.len() == 3, "echo pods: {names:?}");
    let seen = eventually(
        "new connections reach every replica",
        Duration::from_secs(60),
        || async {
            let answered = shared.in_client(&["name", "echo:7002", "--count", "30"])?;
            let seen: BTreeSet<String> = answered.lines().map(str::to_string).collect();
            ensure!(
                seen == names,
                "30 connections reached {seen:?} of {names:?}"
            );
            Ok(seen)
        },
    )
    .await?;
    eprintln!("30 new connections reached {} replicas", seen.len());

    let started = Instant::now();
    let load = shared.in_client_background(&[
        "tcp",
        "echo:7000",
        "--count",
        "3000",
        "--bytes",
        "1024",
        "--retries",
        "1",
    ])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = names.iter().next().unwrap().clone();
    shared.kubectl(&["delete", "pod", "-n", NAMESPACE, &victim, "--wait=false"])?;
    let deleted_after = started.elapsed();
    let result = finished(load, "connections while a replica was deleted")?;
    ensure!(result.contains(", 0 failed"), "{result}");
    let ran_for = result
        .split_once(" in ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|seconds| seconds.parse::<f64>().ok())
        .context("no duration in the report")?;
    ensure!(
        Duration::from_secs_f64(ran_for) > deleted_after,
        "the connections ended ({ran_for} s) before the replica was deleted ({deleted_after:?})"
    );
    eprintln!("while {victim} was deleted: {result}");
    shared.kubectl(&[
        "rollout",
        "status",
        "-n",
        NAMESPACE,
        "deployment/echo",
        "--timeout=120s",
    ])?;
    Ok(())
}

/// Replicas of the Deployment in `replicas_remembered`: its ReplicaSet creates them in batches
/// of 1, 2, 4, 8 and 1 (its slow start), each batch at once and after the one before. A webhook
/// pod decodes the first review of a shape and, in the next batch, checks the token volume's
/// name; a later batch is answered from memory. Reviews carry the second they were made in, so
/// a new second starts a new shape: with five batches, wherever a second ends, one side of it
/// holds three batches or more.
const REMEMBERED_REPLICAS: usize = 16;

/// The webhook replicas' `servicekeel_webhook_remembered_reviews_total`, summed, read through the
/// API server's proxy to each pod.
async fn remembered_reviews(shared: &Shared) -> anyhow::Result<u64> {
    let mut sum = 0;
    for pod in shared.webhook_pods().await? {
        let name = pod.metadata.name.unwrap_or_default();
        let path = format!(
            "/api/v1/namespaces/{}/pods/https:{name}:8443/proxy/metrics",
            webhook::SYSTEM_NAMESPACE
        );
        let text = shared
            .client
            .request_text(::http::Request::get(path).body(Vec::new())?)
            .await
            .with_context(|| format!("the metrics of {name}"))?;
        sum += webhook::counter(&text, webhook::REMEMBERED_REVIEWS)
            .with_context(|| format!("{name} has no remembered reviews counter:\n{text}"))?;
    }
    Ok(sum)
}

/// The API server's reviews of a ReplicaSet's replicas created together are the same text but
/// for their uid and the random end of their token volume's name (the pods have no name of
/// their own at admission, and their managed fields carry the same second), so a webhook pod
/// answers a replica from the review it remembered, decoding nothing, once it has decoded the
/// first review of that shape and checked the first with another token volume. Shown on the
/// real API server and controller-manager: some of the replicas are counted as answered so,
/// never all, and every replica is stored with the same sidecar. The pods name a node that
/// does not exist and stay Pending.
async fn replicas_remembered(shared: Arc<Shared>) -> anyhow::Result<()> {
    let name = "remembered";
    let before = remembered_reviews(&shared).await?;
    shared.apply(&json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": REMEMBERED_REPLICAS,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"servicekeel.io/e2e": "no-such-node"},
                    "containers": [{
                        "name": "app",
                        "image": "servicekeel/demo:0.1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["sleep"],
                    }],
                },
            },
        },
    }))?;
    let selector = ListParams::default().labels(&format!("app={name}"));
    let pods = eventually(
        &format!("the ReplicaSet creates {REMEMBERED_REPLICAS} pods"),
        Duration::from_secs(60),
        || async {
            let pods = shared.pods().list(&selector).await?.items;
            ensure!(
                pods.len() == REMEMBERED_REPLICAS,
                "{} pods so far",
                pods.len()
            );
            Ok(pods)
        },
    )
    .await;
    let after = remembered_reviews(&shared).await;
    shared.kubectl(&["delete", "deployment", name, "-n", NAMESPACE, "--wait=true"])?;
    let (pods, after) = (pods?, after?);
    let sidecars: BTreeSet<String> = pods
        .iter()
        .map(|pod| {
            let spec = pod.spec.clone().unwrap_or_default();
            let mut sidecar = spec
                .init_containers
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.name == defaults::SIDECAR_CONTAINER);
            // The apiserver mounts each pod's own token volume into every container.
            if let Some(mounts) = sidecar.as_mut().and_then(|c| c.volume_mounts.as_mut()) {
                mounts.retain(|m| !shape::is_token_volume(&m.name));
            }
            serde_json::to_string(&sidecar).unwrap_or_default()
        })
        .collect();
    ensure!(
        pods.iter().all(webhook::is_injected),
        "not every replica has the sidecar"
    );
    ensure!(
        sidecars.len() == 1,
        "the replicas' sidecars differ: {sidecars:#?}"
    );
    let remembered = after.saturating_sub(before);
    eprintln!("{remembered} of {REMEMBERED_REPLICAS} replicas answered from a remembered review");
    ensure!(
        remembered >= 1,
        "no replica was answered from a remembered review ({before} -> {after})"
    );
    ensure!(
        remembered < REMEMBERED_REPLICAS as u64,
        "{remembered} remembered: the first replica's review cannot have been"
    );
    Ok(())
}

/// Tries a pod creation gets in `webhook_replica_killed`: 100 ms before the second, doubling,
/// 3.2 s before the sixth (6.2 s in all).
const CREATE_TRIES: u32 = 6;

/// Pods created (server-side dry run: admitted, injected, not stored) without pause by two
/// clients while one of the two webhook replicas is killed with SIGKILL: every creation must
/// succeed, injected, when refused ones are tried again with backoff (as the controllers that
/// create pods do). Refusals are counted and reported: the API server calls a webhook once, so a
/// request on its kept-alive connection to the killed replica fails ("broken pipe"), and so does
/// a dial to the killed replica's address while the endpoints still list it ("connection
/// refused").
async fn webhook_replica_killed(shared: Arc<Shared>) -> anyhow::Result<()> {
    let webhooks = shared.webhook_pods().await?;
    ensure!(
        webhooks.len() >= 2,
        "the manifests run {} webhook replicas; this test needs 2",
        webhooks.len()
    );
    let victim = &webhooks[0];
    let victim_name = victim.metadata.name.clone().unwrap_or_default();
    let uid = victim.metadata.uid.clone().context("no uid")?;
    let pid = node::pod_process(&uid, "servicekeel-webhook").context("no webhook process")?;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut creators = Vec::new();
    for creator in 0..2 {
        let pods = shared.pods();
        let stop = stop.clone();
        creators.push(tokio::spawn(async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"generateName": format!("created-{creator}-")},
                "spec": {"containers": [{"name": "app", "image": "servicekeel/demo:0.1.0"}]},
            }))
            .unwrap();
            let params = kube::api::PostParams {
                dry_run: true,
                ..Default::default()
            };
            let (mut created, mut retried, mut failures) = (0u32, Vec::new(), Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // The API server calls a webhook once and does not retry a lost connection or a
                // refused dial (its endpoint list still names the killed replica for a moment);
                // the client retries, backing off as client-go's controllers do.
                let mut outcome = pods.create(&params, &pod).await;
                let mut tries = 1;
                let mut delay = Duration::from_millis(100);
                while let Err(error) = &outcome {
                    if tries == CREATE_TRIES {
                        break;
                    }
                    retried.push((tries, error.to_string()));
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    tries += 1;
                    outcome = pods.create(&params, &pod).await;
                }
                match outcome {
                    Ok(stored) if webhook::is_injected(&stored) => created += 1,
                    Ok(_) => failures.push("admitted without the sidecar".to_string()),
                    Err(error) => failures.push(error.to_string()),
                }
            }
            (created, retried, failures)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).context("bad pid")?,
        rustix::process::Signal::KILL,
    )?;
    let killed_at = Instant::now();
    // Until the killed replica runs again (the kubelet restarts it), and a few seconds more.
    eventually(
        "the kubelet restarts the killed webhook",
        Duration::from_secs(60),
        || async {
            let pod = shared
                .pods_in(webhook::SYSTEM_NAMESPACE)
                .get(&victim_name)
                .await?;
            ensure!(
                restarts(&pod).iter().any(|(_, n)| *n > 0),
                "not restarted yet"
            );
            ensure!(node::pod_ready(&pod), "restarted, not ready yet");
            Ok(())
        },
    )
    .await?;
    let back_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut created, mut retried, mut failures) = (0, Vec::new(), Vec::new());
    for creator in creators {
        let (n, refused, failed) = creator.await?;
        created += n;
        retried.extend(refused);
        failures.extend(failed);
    }
    let first_tries = retried.iter().filter(|(tries, _)| *tries == 1).count();
    let most = retried
        .iter()
        .map(|(tries, _)| tries + 1)
        .max()
        .unwrap_or(1);
    eprintln!(
        "{created} pods created injected, {} failed after {CREATE_TRIES} tries; {first_tries} \
         first tries refused, {} refusals in all, the most tries one creation took: {most}{}; \
         the killed replica was back after {back_after:?}",
        failures.len(),
        retried.len(),
        retried
            .first()
            .map_or(String::new(), |(_, first)| format!(" (first: {first})")),
    );
    ensure!(
        failures.is_empty(),
        "{} of {} creations failed in all {CREATE_TRIES} tries, first: {}",
        failures.len(),
        created as usize + failures.len(),
        failures[0]
    );
    ensure!(created > 0, "no pod was created");
    Ok(())
}

/// Pods of each kind the cache test adds: running pods exporting a service, then plain ones.
const CACHED_PODS: usize = 500;

/// Bytes of resident memory a process may gain per pod added to the cluster that it does not
/// serve. Keeping only what they read, the webhook's replicas gained 3.4-4.0 kB a pod and the
/// router 6.2-7.2 kB in the benchmark's runs (`BENCHMARKS.md`); keeping whole pods, measured the same way
/// by hand, a replica gained about 40 kB a pod and a router about 45 kB.
const WEBHOOK_BYTES_PER_POD: f64 = 15e3;
const ROUTER_BYTES_PER_POD: f64 = 20e3;

/// The webhook's replicas and the node's router watch every pod of the cluster; what they
/// keep of pods they do not serve (running pods in a namespace not labelled for injection,
/// on another node, half of them exporting a service) stays a few kilobytes a pod.
async fn caches_stay_small(shared: Arc<Shared>) -> anyhow::Result<()> {
    let measured = CacheMemory::measure(&shared.client, CACHED_PODS).await?;
    eprintln!("{}", measured.render());
    // The cluster left as found: no Node of the test's, no pod placed on it.
    let nodes: Api<Node> = Api::all(shared.client.clone());
    ensure!(
        nodes.get_opt(caches::NODE).await?.is_none(),
        "node {} is still there",
        caches::NODE
    );
    let on_node = ListParams::default().fields(&format!("spec.nodeName={}", caches::NODE));
    let left = Api::<Pod>::all(shared.client.clone())
        .list(&on_node)
        .await?;
    ensure!(
        left.items.is_empty(),
        "pods are still bound to node {}: {:?}",
        caches::NODE,
        left.items
            .iter()
            .map(|p| p.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    // Every process was read: the measure fails where the webhook or the router runs no pod.
    for process in &measured.processes {
        let bound = match process.role {
            Role::WebhookReplica => WEBHOOK_BYTES_PER_POD,
            Role::Router => ROUTER_BYTES_PER_POD,
        };
        let per_pod = process.per_pod_added(CACHED_PODS);
        ensure!(
            per_pod <= bound,
            "{} {} gained {:.1} kB a pod added, more than {:.1} kB",
            process.role,
            process.pod,
            per_pod / 1e3,
            bound / 1e3
        );
    }
    Ok(())
}

/// Runs `servicekeel-demo ARGS` inside the client container's namespaces: no API server needed.
fn in_client_namespaces(pid: u32, arguments: &[&str]) -> anyhow::Result<String> {
    let what = format!(
        "`servicekeel-demo {}` in the client pod",
        arguments.join(" ")
    );
    finished(spawn_in_client_namespaces(pid, arguments)?, &what)
}

/// The same, left running in the background.
fn spawn_in_client_namespaces(pid: u32, arguments: &[&str]) -> std::io::Result<Child> {
    let mut all = vec!["/servicekeel-demo"];
    all.extend_from_slice(arguments);
    node::in_container(pid, &all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// The router's process runs as `manifests/` says: its own user, the sidecars' group, no
/// capabilities; its init container handed it the host directories, where its socket (the
/// sidecars' group's) and its snapshot are its own.
async fn router_unprivileged(shared: Arc<Shared>) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let router = router_pod(&shared).await?;
    let init = router
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|s| s.first())
        .context("no init container status")?;
    let exit = init
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code);
    ensure!(init.name == "prepare-dirs" && exit == Some(0), "{init:?}");
    let pid = router_pid(router.metadata.uid.as_deref().context("no uid")?)
        .context("no router process")?;
    // Real, effective, saved and file system IDs; the capability sets.
    for (field, value) in [
        ("Uid", format!("{0}\t{0}\t{0}\t{0}", defaults::ROUTER_UID)),
        ("Gid", format!("{0}\t{0}\t{0}\t{0}", defaults::SIDECAR_UID)),
        ("CapEff", "0000000000000000".to_string()),
        ("CapPrm", "0000000000000000".to_string()),
    ] {
        let found = process::status_field(pid, field)?;
        ensure!(
            found == value,
            "the router's {field} is {found:?}, not {value:?}"
        );
    }
    let owner = (defaults::ROUTER_UID as u32, defaults::SIDECAR_UID as u32);
    let snapshot = PathBuf::from(defaults::ROUTER_STATE_DIR).join(defaults::ROUTER_SNAPSHOT_FILE);
    // The snapshot follows the demo's registrations within a second of them.
    eventually("the router's snapshot", Duration::from_secs(30), || async {
        Ok(std::fs::metadata(&snapshot)?)
    })
    .await?;
    for path in [
        defaults::ROUTER_SOCKET_DIR,
        defaults::ROUTER_SOCKET,
        defaults::ROUTER_STATE_DIR,
        &snapshot.to_string_lossy(),
    ] {
        let meta = std::fs::symlink_metadata(path)?;
        ensure!(
            (meta.uid(), meta.gid()) == owner,
            "{path} is {}:{}",
            meta.uid(),
            meta.gid()
        );
    }
    Ok(())
}

/// The node's router pod.
async fn router_pod(shared: &Shared) -> anyhow::Result<Pod> {
    let routers = Api::<Pod>::namespaced(shared.client.clone(), webhook::SYSTEM_NAMESPACE)
        .list(&ListParams::default().labels("app.kubernetes.io/name=servicekeel-router"))
        .await?;
    routers.items.into_iter().next().context("no router pod")
}

/// The router process of the node's router pod (not any router on this machine).
fn router_pid(pod_uid: &str) -> Option<u32> {
    node::pod_process(pod_uid, "servicekeel-proxy router")
}

async fn router_ready() -> anyhow::Result<()> {
    let reply = http_get(([127, 0, 0, 1], 15022).into(), "/readyz").await?;
    ensure!(http::status(&reply) == Some(200), "{reply}");
    Ok(())
}

async fn edge_autonomy(shared: Arc<Shared>) -> anyhow::Result<()> {
    let client_pod = shared.pods().get(CLIENT).await?;
    let uid = client_pod.metadata.uid.clone().context("no uid")?;
    let pid = node::pod_process(&uid, "servicekeel-demo sleep")
        .context("no client process on the node")?;
    // How long the API server stays down under traffic (`SERVICEKEEL_OUTAGE_SECONDS`, 20 by
    // default; RELIABILITY.md gives a run of 600).
    let outage: u64 = std::env::var("SERVICEKEEL_OUTAGE_SECONDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let spawn = |arguments: &[&str]| spawn_in_client_namespaces(pid, arguments);
    // One connection held across the outage, and new connections one after another through it,
    // none retried.
    let live = spawn(&["hold", "echo:7000", "--seconds", &(outage + 2).to_string()])?;
    let traffic = spawn(&[
        "tcp",
        "echo:7000",
        "--for",
        &(outage + 1).to_string(),
        "--bytes",
        "1024",
    ])?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let router = router_pod(&shared).await?;
    let router_name = router.metadata.name.clone().context("no name")?;
    let router_uid = router.metadata.uid.clone().context("no uid")?;

    let mut cluster = shared.cluster.lock().await;
    let down_at = Instant::now();
    cluster.control_plane.stop();
    let nodes: Api<Node> = Api::all(shared.client.clone());
    ensure!(
        nodes.get(NODE_NAME).await.is_err(),
        "the API server still answers"
    );
    // New lookups and flows of both protocols, with no API server.
    for arguments in [
        &["resolve", "echo"][..],
        &["tcp", "echo:7000", "--bytes", "100000"],
        &["udp", "echo:7001"],
    ] {
        let said = in_client_namespaces(pid, arguments)?;
        eprintln!("API server down: {said}");
    }
    let carried = finished(traffic, "new connections during the outage")?;
    ensure!(carried.contains(", 0 failed"), "{carried}");
    let held = finished(live, "a connection open since before the outage")?;
    ensure!(held.contains("none failed"), "{held}");
    eprintln!(
        "API server stopped and down for {:?}: {carried}; {held}",
        down_at.elapsed()
    );

    // The router's process dies; the kubelet starts it again, and it routes from its snapshot.
    let old = router_pid(&router_uid).context("no router process")?;
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(old as i32).context("bad pid")?,
        rustix::process::Signal::KILL,
    );
    eventually(
        "the kubelet restarts the router",
        Duration::from_secs(60),
        || async {
            let new = router_pid(&router_uid).context("no router process yet")?;
            ensure!(new != old, "still the old router");
            router_ready().await
        },
    )
    .await?;
    let logs = node::container_logs(
        &shared.dir,
        webhook::SYSTEM_NAMESPACE,
        &router_name,
        "router",
    );
    let restarted = logs.last().context("no router log")?;
    let text = std::fs::read_to_string(restarted)?;
    ensure!(
        text.contains("routing from the snapshot"),
        "the restarted router did not load its snapshot ({}):\n{text}",
        restarted.display()
    );
    let said = eventually(
        "new connections through the restarted router",
        Duration::from_secs(30),
        || async { in_client_namespaces(pid, &["tcp", "echo:7000", "--bytes", "100000"]) },
    )
    .await?;
    eprintln!("router restarted with the API server down: {said}");
    in_client_namespaces(pid, &["udp", "echo:7001"])?;

    // The API server comes back and everything converges.
    cluster.control_plane.restart().await?;
    let client = shared.client.clone();
    eventually(
        "the node is Ready again",
        Duration::from_secs(90),
        || async {
            let node = nodes.get(NODE_NAME).await?;
            node::node_ready(&node).map_err(anyhow::Error::msg)
        },
    )
    .await?;
    cluster
        .wait_for_workloads(&client, Duration::from_secs(120))
        .await?;
    drop(cluster);
    webhook::wait_until_called(&client).await?;
    let said = eventually(
        "traffic through kubectl exec",
        Duration::from_secs(30),
        || async { shared.in_client(&["tcp", "echo:7000"]) },
    )
    .await?;
    eprintln!("API server back: {said}");
    Ok(())
}
