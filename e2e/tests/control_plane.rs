//! The webhook through a real kube-apiserver. One local control plane (etcd, kube-apiserver,
//! the real webhook binary registered from `manifests/`) serves every test; each test works in
//! its own namespace. The apiserver decides what an AdmissionReview looks like, applies the
//! patch and validates the resulting pod, so what is checked here is what a cluster stores.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ObjectMeta, PostParams};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};
use servicekeel_e2e::cluster::LocalCluster;
use servicekeel_e2e::paths;
use servicekeel_e2e::process::Lifetime;
use servicekeel_e2e::webhook::is_injected;
use servicekeel_webhook::config::Config;
use servicekeel_webhook::offline::inject_documents;
use tokio::sync::RwLock;

struct Shared {
    cluster: RwLock<LocalCluster>,
    client: kube::Client,
    kubeconfig: PathBuf,
    runtime: tokio::runtime::Handle,
}

type TestFn = fn(Arc<Shared>) -> futures_lite::BoxedFuture;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,servicekeel_e2e=info,kube_client=off",
        ))
        .with_test_writer()
        .init();
    let tests: Vec<(&str, TestFn)> = vec![
        (
            "injected_pods_are_stored_as_offline_injection_predicts",
            |s| Box::pin(golden_pods_are_stored_as_predicted(s)),
        ),
        (
            "injected_workload_templates_pass_apiserver_validation",
            |s| Box::pin(golden_workloads_validate(s)),
        ),
        ("pods_outside_scope_are_stored_untouched", |s| {
            Box::pin(pods_outside_scope_are_untouched(s))
        }),
        ("invalid_annotation_is_refused_naming_the_field", |s| {
            Box::pin(invalid_annotation_is_refused(s))
        }),
        ("kubectl_apply_stores_the_injected_pod", |s| {
            Box::pin(kubectl_apply_injects(s))
        }),
        ("server_side_dry_run_injects_without_storing", |s| {
            Box::pin(server_side_dry_run(s))
        }),
        (
            "webhook_outage_fails_closed_only_where_injection_is_on",
            |s| Box::pin(webhook_outage(s)),
        ),
        ("exports_are_computed_at_admission", |s| {
            Box::pin(exports_at_admission(s))
        }),
        ("exports_follow_services_and_labels_after_admission", |s| {
            Box::pin(exports_follow_changes(s))
        }),
        ("namespace_defaults_merge_between_pod_and_cluster", |s| {
            Box::pin(namespace_defaults(s))
        }),
        ("webhook_permissions_are_no_broader_than_needed", |s| {
            Box::pin(permissions(s))
        }),
        (
            "managed_certificate_rotates_under_load_and_ca_bundle_heals",
            |s| Box::pin(certificate_rotation(s)),
        ),
        ("one_replica_leads_and_hands_over_on_shutdown", |s| {
            Box::pin(leader_election(s))
        }),
        ("replicas_racing_for_the_certificate_agree_on_one", |s| {
            Box::pin(certificate_race(s))
        }),
    ];
    if args.list {
        let trials = tests
            .into_iter()
            .map(|(name, _)| Trial::test(name, || Ok(())))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = paths::run_dir("servicekeel-e2e");
    let started = runtime.block_on(async {
        let cluster = LocalCluster::start(&dir, Lifetime::TiedToThisProcess).await?;
        let client = cluster.client().await?;
        Ok::<_, anyhow::Error>((cluster, client))
    });
    let (cluster, client) = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("cannot start the local control plane: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared {
        kubeconfig: cluster.kubeconfig().to_owned(),
        cluster: RwLock::new(cluster),
        client,
        runtime: runtime.handle().clone(),
    });
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let shared = shared.clone();
            Trial::test(name, move || {
                let handle = shared.runtime.clone();
                handle
                    .block_on(test(shared.clone()))
                    .map_err(|error| Failed::from(format!("{error:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Stop the control plane before the runtime goes, then remove its files.
    drop(shared);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    conclusion.exit_code()
}

/// Boxed futures without pulling in a futures crate.
mod futures_lite {
    pub type BoxedFuture =
        std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;
}

// ---- helpers ----

static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// A fresh namespace, labelled for injection or not.
async fn namespace(client: &kube::Client, prefix: &str, inject: bool) -> anyhow::Result<String> {
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NAMESPACES.fetch_add(1, Ordering::SeqCst)
    );
    let labels: BTreeMap<String, String> = if inject {
        [("servicekeel.io/inject".to_string(), "enabled".to_string())].into()
    } else {
        BTreeMap::new()
    };
    create_namespace(client, &name, labels).await?;
    Ok(name)
}

async fn create_namespace(
    client: &kube::Client,
    name: &str,
    labels: BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The config the cluster's webhook runs with.
fn shipped_config() -> Config {
    Config::load(&servicekeel_e2e::webhook::config_file()).unwrap()
}

fn golden_inputs() -> Vec<PathBuf> {
    let dir = paths::repo().join("webhook/tests/golden/input");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    inputs
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Every field of `expected` is in `actual` with the same value (arrays element by element);
/// what the apiserver adds by defaulting is ignored.
fn differences(expected: &Value, actual: &Value, path: &str, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (key, value) in e {
                match a.get(key) {
                    Some(stored) => differences(value, stored, &format!("{path}/{key}"), out),
                    None if value.is_null() => {}
                    None => out.push(format!("{path}/{key}: missing from the stored object")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            for (index, (value, stored)) in e.iter().zip(a).enumerate() {
                differences(value, stored, &format!("{path}/{index}"), out);
            }
        }
        _ if expected == actual => {}
        _ => out.push(format!("{path}: expected {expected}, stored {actual}")),
    }
}

/// kubectl's success, standard output and standard error.
fn kubectl(
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<(bool, String, String)> {
    let output = servicekeel_e2e::webhook::run_kubectl(kubeconfig, args, stdin)?;
    Ok((output.success, output.stdout, output.stderr))
}

fn pod_value(pod: &Pod) -> Value {
    serde_json::to_value(pod).unwrap()
}

// ---- tests ----

/// Every pod of the golden spread, created in a labelled namespace, is stored exactly as the
/// offline injection (the same pure function) predicts, or refused as it predicts.
async fn golden_pods_are_stored_as_predicted(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let client = &shared.client;
    let ns = namespace(client, "golden", true).await?;
    let config = shipped_config();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut checked = 0;
    for input in golden_inputs() {
        let text = std::fs::read_to_string(&input)?;
        for mut document in documents(&text) {
            if document["kind"] != "Pod" {
                continue;
            }
            document["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("namespace");
            let single = serde_yaml::to_string(&document)?;
            let predicted = inject_documents(&single, &ns, &config);
            let pod: Pod = serde_json::from_value(document.clone())?;
            let created = pods.create(&PostParams::default(), &pod).await;
            let what = format!("{} ({})", input.display(), document["metadata"]["name"]);
            match (predicted, created) {
                (Ok(predicted), Ok(stored)) => {
                    let expected = documents(&predicted.yaml).remove(0);
                    let mut diffs = Vec::new();
                    differences(
                        &expected["metadata"]["annotations"],
                        &pod_value(&stored)["metadata"]["annotations"],
                        "/metadata/annotations",
                        &mut diffs,
                    );
                    differences(
                        &expected["spec"],
                        &pod_value(&stored)["spec"],
                        "/spec",
                        &mut diffs,
                    );
                    ensure!(
                        diffs.is_empty(),
                        "{what}: stored pod differs from the prediction:\n{}",
                        diffs.join("\n")
                    );
                }
                (Err(refusal), Err(kube::Error::Api(status))) => {
                    let reason = refusal.to_string();
                    let field = reason.split(": ").skip(1).collect::<Vec<_>>().join(": ");
                    ensure!(
                        status.message.contains(&field),
                        "{what}: refused with {:?}, expected {field:?}",
                        status.message
                    );
                }
                (predicted, created) => bail!(
                    "{what}: prediction {:?} but the apiserver answered {:?}",
                    predicted.map(|_| "injected"),
                    created.map(|_| "stored")
                ),
            }
            checked += 1;
        }
    }
    ensure!(checked >= 10, "only {checked} pods checked");
    Ok(())
}

/// Workloads injected offline (Deployments, CronJobs, StatefulSets, ...) pass the apiserver's
/// own validation: no invalid field, no duplicate volume or env name.
async fn golden_workloads_validate(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "workloads", false).await?;
    let config = shipped_config();
    for input in golden_inputs() {
        let text = std::fs::read_to_string(&input)?;
        let Ok(output) = inject_documents(&text, &ns, &config) else {
            continue;
        };
        let mut injected = Vec::new();
        for mut document in documents(&output.yaml) {
            let items = if document["kind"] == "List" {
                document["items"].as_array().cloned().unwrap_or_default()
            } else {
                vec![document.take()]
            };
            for mut item in items {
                if let Some(meta) = item["metadata"].as_object_mut() {
                    meta.remove("namespace");
                }
                injected.push(serde_yaml::to_string(&item)?);
            }
        }
        let yaml = injected.join("---\n");
        let (ok, _, stderr) = kubectl(
            &shared.kubeconfig,
            &["create", "--dry-run=server", "-n", &ns, "-f", "-"],
            Some(&yaml),
        )?;
        ensure!(
            ok,
            "{}: the apiserver refused the injected objects:\n{stderr}",
            input.display()
        );
    }
    Ok(())
}

/// Pods of an unlabelled namespace, opted-out pods and pods of servicekeel-system are stored
/// exactly as sent.
async fn pods_outside_scope_are_untouched(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let client = &shared.client;
    let plain = namespace(client, "plain", false).await?;
    let labelled = namespace(client, "labelled", true).await?;
    create_namespace(
        client,
        "servicekeel-system",
        [("servicekeel.io/inject".to_string(), "enabled".to_string())].into(),
    )
    .await?;
    let pod = |name: &str, annotations: Value, labels: Value| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations, "labels": labels},
            // Pod Security "restricted", which the webhook's own namespace enforces.
            "spec": {
                "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "app", "image": "app:1", "securityContext": {
                    "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]
            }
        }))
        .unwrap()
    };
    let cases = [
        (
            plain.as_str(),
            pod("in-plain-namespace", json!({}), json!({})),
        ),
        (
            labelled.as_str(),
            pod(
                "opted-out-annotation",
                json!({"servicekeel.io/inject": "false"}),
                json!({}),
            ),
        ),
        (
            labelled.as_str(),
            pod(
                "opted-out-label",
                json!({}),
                json!({"servicekeel.io/inject": "false"}),
            ),
        ),
        (
            "servicekeel-system",
            pod(
                &format!("system-{}", std::process::id()),
                json!({}),
                json!({}),
            ),
        ),
    ];
    for (ns, pod) in cases {
        let name = pod.metadata.name.clone().unwrap();
        let stored = Api::<Pod>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &pod)
            .await?;
        ensure!(!is_injected(&stored), "{ns}/{name} was injected");
        let annotations = stored.metadata.annotations.unwrap_or_default();
        ensure!(
            !annotations.contains_key("servicekeel.io/status"),
            "{ns}/{name} has a status annotation"
        );
        let spec = stored.spec.unwrap();
        ensure!(
            spec.dns_policy.as_deref() == Some("ClusterFirst"),
            "{ns}/{name}: DNS policy changed"
        );
        ensure!(
            spec.volumes.unwrap_or_default().is_empty(),
            "{ns}/{name}: volumes added"
        );
    }
    // And the same pod in the labelled namespace is injected.
    let stored = Api::<Pod>::namespaced(client.clone(), &labelled)
        .create(
            &PostParams::default(),
            &pod("injected", json!({}), json!({})),
        )
        .await?;
    ensure!(
        is_injected(&stored),
        "control case: a plain pod of a labelled namespace is injected"
    );
    Ok(())
}

const INVALID: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: invalid-imports
  annotations:
    servicekeel.io/imported-services: |
      services:
        - name: ok
          ports: [{port: 80}]
        - name: bad
          ports: [{port: 9, protocol: SCTP}]
spec:
  containers:
    - name: app
      image: app:1
"#;

/// Through the API and through `kubectl apply`, an invalid annotation is refused with the
/// message naming the field.
async fn invalid_annotation_is_refused(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "invalid", true).await?;
    let expected = r#"servicekeel.io/imported-services: services[1].ports[0].protocol: "SCTP" is not supported (TCP or UDP)"#;
    let pod: Pod = serde_yaml::from_str(INVALID)?;
    match Api::<Pod>::namespaced(shared.client.clone(), &ns)
        .create(&PostParams::default(), &pod)
        .await
    {
        Err(kube::Error::Api(status)) => {
            ensure!(
                status.message.contains(expected),
                "API refusal: {:?}",
                status.message
            );
            ensure!(status.code == 422, "API refusal code {}", status.code);
        }
        other => bail!("the invalid pod was not refused: {other:?}"),
    }
    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &["apply", "-n", &ns, "-f", "-"],
        Some(INVALID),
    )?;
    ensure!(!ok, "kubectl apply succeeded");
    ensure!(
        stderr.contains("denied the request") && stderr.contains(expected),
        "kubectl said: {stderr}"
    );
    Ok(())
}

/// `kubectl apply` of the example client pod stores it with the sidecar, as `kubectl get` shows.
async fn kubectl_apply_injects(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "kubectl", true).await?;
    let example =
        std::fs::read_to_string(paths::repo().join("manifests/examples/client-pod.yaml"))?;
    let mut pod: Value = serde_yaml::from_str(&example)?;
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &["apply", "-n", &ns, "-f", "-"],
        Some(&serde_yaml::to_string(&pod)?),
    )?;
    ensure!(ok, "kubectl apply failed: {stderr}");
    let (ok, stdout, stderr) = kubectl(
        &shared.kubeconfig,
        &["get", "pod", "client", "-n", &ns, "-o", "json"],
        None,
    )?;
    ensure!(ok, "kubectl get failed: {stderr}");
    let stored: Value = serde_json::from_str(&stdout)?;
    ensure!(
        stored["spec"]["initContainers"][0]["name"] == "servicekeel-proxy",
        "no sidecar: {stored}"
    );
    ensure!(
        stored["spec"]["dnsConfig"]["nameservers"] == json!(["127.0.0.2"]),
        "DNS not hijacked"
    );
    let imported: Value = serde_json::from_str(
        stored["metadata"]["annotations"]["servicekeel.io/imported-services"]
            .as_str()
            .unwrap(),
    )?;
    ensure!(
        imported["services"][0]["name"] == "simple-server",
        "imports: {imported}"
    );
    Ok(())
}

/// A server-side dry run shows the injected pod and stores nothing (the webhook declares
/// `sideEffects: None`).
async fn server_side_dry_run(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "dryrun", true).await?;
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: dry}\nspec: {containers: [{name: app, image: app:1}]}\n";
    let (ok, stdout, stderr) = kubectl(
        &shared.kubeconfig,
        &[
            "apply",
            "--dry-run=server",
            "-n",
            &ns,
            "-o",
            "json",
            "-f",
            "-",
        ],
        Some(pod),
    )?;
    ensure!(ok, "dry run failed: {stderr}");
    let shown: Value = serde_json::from_str(&stdout)?;
    ensure!(
        shown["spec"]["initContainers"][0]["name"] == "servicekeel-proxy",
        "dry run shows no sidecar"
    );
    let stored = Api::<Pod>::namespaced(shared.client.clone(), &ns)
        .get_opt("dry")
        .await?;
    ensure!(stored.is_none(), "a dry run stored the pod");
    Ok(())
}

/// With the webhook down, pods of labelled namespaces are refused with a clear error and others
/// are created; once it is back, injection works again.
async fn webhook_outage(shared: Arc<Shared>) -> anyhow::Result<()> {
    let mut cluster = shared.cluster.write().await;
    let client = &shared.client;
    let labelled = namespace(client, "outage", true).await?;
    let plain = namespace(client, "outage-plain", false).await?;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "outage-"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))?;
    cluster.stop_webhook();
    let refused = Api::<Pod>::namespaced(client.clone(), &labelled)
        .create(&PostParams::default(), &pod)
        .await;
    let plain_created = Api::<Pod>::namespaced(client.clone(), &plain)
        .create(&PostParams::default(), &pod)
        .await;
    cluster.start_webhook().await?;
    match refused {
        Err(kube::Error::Api(status)) => ensure!(
            status.message.contains("failed calling webhook")
                && status.message.contains("sidecar-injector.servicekeel.io"),
            "unclear refusal: {:?}",
            status.message
        ),
        other => bail!("a labelled namespace admitted a pod without the webhook: {other:?}"),
    }
    ensure!(
        plain_created.is_ok(),
        "an unlabelled namespace was blocked: {plain_created:?}"
    );
    let stored = Api::<Pod>::namespaced(client.clone(), &labelled)
        .create(&PostParams::default(), &pod)
        .await?;
    ensure!(
        is_injected(&stored),
        "after the restart the pod was not injected"
    );
    Ok(())
}

// ---- exports, namespace defaults, permissions ----

const POLL: std::time::Duration = std::time::Duration::from_millis(200);
const WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

/// Polls `check` until it returns `Some`, failing with `what` after `WITHIN`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if std::time::Instant::now() > deadline {
            bail!("{what} did not happen within {WITHIN:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn exported(pod: &Pod) -> Option<Value> {
    let text = pod
        .metadata
        .annotations
        .as_ref()?
        .get("servicekeel.io/exported-services")?;
    serde_json::from_str(text).ok()
}

async fn apply(shared: &Shared, ns: &str, yaml: &str) -> anyhow::Result<()> {
    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &["apply", "-n", ns, "-f", "-"],
        Some(yaml),
    )?;
    ensure!(ok, "kubectl apply failed: {stderr}");
    Ok(())
}

const WEB_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web, tier: front}
spec:
  containers:
    - name: web
      image: web:1
      ports:
        - {name: http, containerPort: 8080}
        - {name: dns, containerPort: 5353, protocol: UDP}
"#;

/// Several Services select one pod: numeric and named targetPorts, TCP and UDP, all exported at
/// admission; an unresolvable named port is left out.
async fn exports_at_admission(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "exports", true).await?;
    apply(
        &shared,
        &ns,
        r#"apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: admin, port: 9000, targetPort: 9001}
    - {name: missing, port: 7000, targetPort: nonexistent}
---
apiVersion: v1
kind: Service
metadata: {name: front-dns}
spec:
  selector: {tier: front}
  ports:
    - {name: dns, port: 53, protocol: UDP, targetPort: dns}
---
apiVersion: v1
kind: Service
metadata: {name: unrelated}
spec:
  selector: {app: other}
  ports: [{port: 1}]
"#,
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let pod: Pod = serde_yaml::from_str(WEB_POD)?;
    // The webhook's Services cache learns of the new Services asynchronously.
    eventually("both Services in a dry-run admission", || async {
        let dry = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &pod,
            )
            .await?;
        Ok(exported(&dry).filter(|e| e["services"].as_array().is_some_and(|s| s.len() == 2)))
    })
    .await?;
    let stored = pods.create(&PostParams::default(), &pod).await?;
    let expected = json!({"services": [
        {"name": "front-dns", "namespace": ns, "cluster": "e2e", "ports": [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]},
        {"name": "web", "namespace": ns, "cluster": "e2e", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "admin", "port": 9000, "targetPort": 9001, "protocol": "TCP"}
        ]}
    ]});
    ensure!(
        exported(&stored) == Some(expected.clone()),
        "stored exports: {:?}, expected {expected}",
        exported(&stored)
    );
    Ok(())
}

/// Services created, edited and deleted after the pod, and the pod's labels changing, are
/// reflected on the existing pod within seconds.
async fn exports_follow_changes(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "follow", true).await?;
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    pods.create(&PostParams::default(), &serde_yaml::from_str(WEB_POD)?)
        .await?;
    let ports_of = |pod: &Pod, service: &str| -> Option<Value> {
        exported(pod)?["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)
            .map(|s| s["ports"].clone())
    };

    apply(&shared, &ns, "apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n").await?;
    eventually("a new Service exported", || async {
        let pod = pods.get("web").await?;
        Ok((ports_of(&pod, "late")
            == Some(json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}])))
        .then_some(()))
    })
    .await?;

    apply(&shared, &ns, "apiVersion: v1\nkind: Service\nmetadata: {name: late}\nspec: {selector: {app: web}, ports: [{name: http, port: 8088, targetPort: 8080}, {name: dns, port: 53, protocol: UDP, targetPort: dns}]}\n").await?;
    eventually("an edited Service re-exported", || async {
        let pod = pods.get("web").await?;
        Ok(ports_of(&pod, "late")
            .filter(|p| p.as_array().is_some_and(|a| a.len() == 2) && p[0]["port"] == 8088)
            .map(|_| ()))
    })
    .await?;

    apply(&shared, &ns, "apiVersion: v1\nkind: Service\nmetadata: {name: by-tier}\nspec: {selector: {tier: front}, ports: [{port: 443, targetPort: 8443}]}\n").await?;
    eventually("a second Service exported", || async {
        Ok(ports_of(&pods.get("web").await?, "by-tier").map(|_| ()))
    })
    .await?;

    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &["delete", "service", "late", "-n", &ns],
        None,
    )?;
    ensure!(ok, "{stderr}");
    eventually("a deleted Service no longer exported", || async {
        let pod = pods.get("web").await?;
        Ok((ports_of(&pod, "late").is_none() && ports_of(&pod, "by-tier").is_some()).then_some(()))
    })
    .await?;

    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &["label", "--overwrite", "pod", "web", "-n", &ns, "tier=back"],
        None,
    )?;
    ensure!(ok, "{stderr}");
    eventually("exports emptied when the labels stop matching", || async {
        Ok(exported(&pods.get("web").await?).is_none().then_some(()))
    })
    .await
}

/// Pod entries win over the namespace's defaults, which win over the cluster-wide ones; an
/// invalid namespace default is logged with the namespace and field and blocks nothing.
async fn namespace_defaults(shared: Arc<Shared>) -> anyhow::Result<()> {
    let cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "defaults", true).await?;
    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &[
            "annotate",
            "namespace",
            &ns,
            r#"servicekeel.io/default-imported-services={"services":[{"name":"db","ports":[{"port":2}]},{"name":"registry","namespace":"infra","ports":[{"port":2}]},{"name":"cache","ports":[{"port":2}]}]}"#,
        ],
        None,
    )?;
    ensure!(ok, "{stderr}");
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let pod: Pod = serde_yaml::from_str(
        r#"apiVersion: v1
kind: Pod
metadata:
  generateName: defaults-
  annotations:
    servicekeel.io/imported-services: '{"services":[{"name":"db","ports":[{"port":1}]}]}'
spec:
  containers: [{name: app, image: app:1}]
"#,
    )?;
    let summary = |pod: &Pod| -> Vec<(String, u64)> {
        let text = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("servicekeel.io/imported-services"))
            .cloned()
            .unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or_default();
        value["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or_default().to_string(),
                    s["ports"][0]["port"].as_u64().unwrap_or_default(),
                )
            })
            .collect()
    };
    let expected = vec![
        ("db".to_string(), 1),
        ("registry".to_string(), 2),
        ("cache".to_string(), 2),
    ];
    eventually("namespace defaults applied", || async {
        let dry = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &pod,
            )
            .await?;
        Ok((summary(&dry) == expected).then_some(()))
    })
    .await?;
    // The cluster-wide default (registry in infra, port 5000) lost to the namespace's.
    let stored = pods.create(&PostParams::default(), &pod).await?;
    ensure!(
        summary(&stored) == expected,
        "stored imports {:?}",
        summary(&stored)
    );

    let bad = namespace(&shared.client, "bad-defaults", true).await?;
    let (ok, _, stderr) = kubectl(
        &shared.kubeconfig,
        &[
            "annotate",
            "namespace",
            &bad,
            r#"servicekeel.io/default-imported-services=services: [{name: x, ports: [{port: 0}]}]"#,
        ],
        None,
    )?;
    ensure!(ok, "{stderr}");
    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &bad);
    let expected_log = format!(
        "namespace {bad}: servicekeel.io/default-imported-services: services[0].ports[0].port"
    );
    eventually("the invalid namespace default reported", || async {
        let created = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &pod,
            )
            .await?;
        ensure!(
            is_injected(&created),
            "a pod was blocked by an invalid namespace default"
        );
        let log = std::fs::read_to_string(cluster.webhook_log()).unwrap_or_default();
        Ok(log.contains(&expected_log).then_some(()))
    })
    .await?;
    // The pod's own and the cluster-wide entries still apply.
    let stored = pods.create(&PostParams::default(), &pod).await?;
    ensure!(
        summary(&stored) == vec![("db".to_string(), 1), ("registry".to_string(), 5000)],
        "{:?}",
        summary(&stored)
    );
    Ok(())
}

/// The webhook runs with the manifests' ServiceAccount: it can do what it needs and no more.
async fn permissions(shared: Arc<Shared>) -> anyhow::Result<()> {
    let _cluster = shared.cluster.read().await;
    let who = "--as=system:serviceaccount:servicekeel-system:servicekeel-webhook";
    let allowed = [
        vec!["watch", "services", "-A"],
        vec!["watch", "namespaces"],
        vec!["patch", "pods", "-n", "default"],
        vec![
            "update",
            "leases/servicekeel-webhook",
            "-n",
            "servicekeel-system",
        ],
    ];
    let denied = [
        vec!["create", "pods", "-n", "default"],
        vec!["delete", "pods", "-n", "default"],
        vec!["get", "secrets/someone-else", "-n", "servicekeel-system"],
        vec!["list", "secrets", "-n", "servicekeel-system"],
        vec!["get", "secrets/servicekeel-webhook-tls", "-n", "default"],
        vec!["patch", "services", "-n", "default"],
        vec!["update", "leases/someone-else", "-n", "servicekeel-system"],
        vec!["create", "leases", "-n", "default"],
        vec!["patch", "mutatingwebhookconfigurations/someone-else"],
        vec![
            "patch",
            "validatingwebhookconfigurations/servicekeel-sidecar-injector",
        ],
    ];
    for (expected, cases) in [(true, &allowed[..]), (false, &denied[..])] {
        for case in cases {
            let mut args = vec!["auth", "can-i", who];
            args.extend(case.iter().copied());
            let (ok, stdout, _) = kubectl(&shared.kubeconfig, &args, None)?;
            ensure!(
                ok == expected && stdout.trim() == if expected { "yes" } else { "no" },
                "can-i {}: {}",
                case.join(" "),
                stdout.trim()
            );
        }
    }
    Ok(())
}

/// The webhook started with no certificate made its own (Secret, caBundle). With a lifetime of
/// seconds it renews at least three times while pods are created one after another, every
/// creation succeeding; a caBundle reset (as a manifest re-apply does) heals within seconds.
async fn certificate_rotation(shared: Arc<Shared>) -> anyhow::Result<()> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::Secret;
    let mut cluster = shared.cluster.write().await;
    let client = &shared.client;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "servicekeel-system");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let ca_of = |secret: &Secret| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|b| b.0.clone())
    };
    let bundle = |c: &MutatingWebhookConfiguration| {
        c.webhooks
            .as_ref()
            .and_then(|w| w[0].client_config.ca_bundle.as_ref())
            .map(|b| b.0.clone())
    };
    let secret = secrets
        .get("servicekeel-webhook-tls")
        .await
        .context("the webhook made no Secret")?;
    ensure!(
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/managed-by"))
            .map(String::as_str)
            == Some("servicekeel-webhook"),
        "the Secret was not made by the webhook"
    );
    let configuration = configurations.get("servicekeel-sidecar-injector").await?;
    ensure!(
        bundle(&configuration).is_some() && bundle(&configuration) == ca_of(&secret),
        "caBundle is not the Secret's CA"
    );

    cluster
        .restart_webhook(&["--certificate-lifetime=6s"])
        .await?;
    let ns = namespace(client, "rotation", true).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "rotation-"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    }))?;
    let issued = |secret: &Secret| {
        secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("servicekeel.io/issued-at"))
            .cloned()
    };
    let mut seen = std::collections::BTreeSet::new();
    let (mut created, mut failures) = (0, Vec::new());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while seen.len() < 4 && std::time::Instant::now() < deadline {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(stored) if is_injected(&stored) => created += 1,
            Ok(_) => failures.push("a pod was stored without the sidecar".to_string()),
            Err(error) => failures.push(error.to_string()),
        }
        if let Some(at) = issued(&secrets.get("servicekeel-webhook-tls").await?) {
            seen.insert(at);
        }
    }
    let rotation = (|| {
        ensure!(
            failures.is_empty(),
            "{} of {} creations failed during rotation: {:?}",
            failures.len(),
            created + failures.len(),
            &failures[..failures.len().min(3)]
        );
        ensure!(
            seen.len() >= 4,
            "only {} certificates seen in 60s",
            seen.len()
        );
        Ok(())
    })();

    // A re-apply of the manifests' configuration drops caBundle; the webhook puts it back.
    let reset = kubectl(
        &shared.kubeconfig,
        &[
            "patch",
            "mutatingwebhookconfiguration",
            "servicekeel-sidecar-injector",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/webhooks/0/clientConfig/caBundle"}]"#,
        ],
        None,
    )?;
    let healed = eventually("caBundle restored and pods injected again", || async {
        let secret = secrets.get("servicekeel-webhook-tls").await?;
        let configuration = configurations.get("servicekeel-sidecar-injector").await?;
        if bundle(&configuration) != ca_of(&secret) {
            return Ok(None);
        }
        Ok(pods
            .create(&PostParams::default(), &pod)
            .await
            .ok()
            .filter(is_injected)
            .map(|_| ()))
    })
    .await;
    cluster.restart_webhook(&[]).await?;
    ensure!(reset.0, "cannot reset caBundle: {}", reset.2);
    rotation?;
    healed
}

/// Two contenders for one Lease: exactly one leads at a time, and when it stops the other takes
/// over at once (the lease is released, not left to expire).
async fn leader_election(shared: Arc<Shared>) -> anyhow::Result<()> {
    use servicekeel_webhook::leader::{self, Leadership};
    let _cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "election", false).await?;
    let mut contenders = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let leadership = Leadership::default();
        let task = tokio::spawn(leader::run(
            shared.client.clone(),
            ns.clone(),
            "election".into(),
            identity.into(),
            leadership.clone(),
            stopped,
        ));
        contenders.push((stop, leadership, task));
    }
    let leaders = |c: &[(
        tokio::sync::watch::Sender<bool>,
        Leadership,
        tokio::task::JoinHandle<()>,
    )]| { c.iter().filter(|(_, l, _)| l.is_leader()).count() };
    eventually("a leader elected", || async {
        Ok((leaders(&contenders) == 1).then_some(()))
    })
    .await?;
    // Over several renewals, never two leaders and never none.
    for _ in 0..15 {
        tokio::time::sleep(POLL).await;
        ensure!(
            leaders(&contenders) == 1,
            "{} leaders",
            leaders(&contenders)
        );
    }
    let index = contenders
        .iter()
        .position(|(_, l, _)| l.is_leader())
        .unwrap();
    let stopped_identity = ["replica-a", "replica-b"][index];
    let (stop, _, task) = contenders.remove(index);
    stop.send(true)?;
    task.await?;
    // Released, not left to expire: the Lease no longer names the stopped replica.
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(shared.client.clone(), &ns)
            .get("election")
            .await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    ensure!(
        holder.as_deref() != Some(stopped_identity),
        "the stopped replica still holds the lease"
    );
    eventually("the other replica taking over", || async {
        Ok(contenders[0].1.is_leader().then_some(()))
    })
    .await?;
    let (stop, _, task) = contenders.remove(0);
    stop.send(true)?;
    task.await?;
    Ok(())
}

/// Two replicas creating (and then renewing) the certificate Secret at the same moment end up
/// serving the same pair from one Secret.
async fn certificate_race(shared: Arc<Shared>) -> anyhow::Result<()> {
    use servicekeel_webhook::certificates::{Manager, Settings};
    let cluster = shared.cluster.read().await;
    let ns = namespace(&shared.client, "cert-race", false).await?;
    // Inside the run's directory, which goes with the cluster.
    let dir = cluster.control_plane.dir.join(&ns);
    let manager = |replica: &str, lifetime: u64| {
        Manager::new(
            shared.client.clone(),
            Settings {
                namespace: ns.clone(),
                secret: "race-tls".into(),
                service: "servicekeel-webhook".into(),
                webhook_configuration: "none".into(),
                lifetime: std::time::Duration::from_secs(lifetime),
                extra_names: vec![],
                cert_file: dir.join(replica).join("tls.crt"),
                key_file: dir.join(replica).join("tls.key"),
            },
        )
    };
    let read = |replica: &str| -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        Ok((
            std::fs::read(dir.join(replica).join("tls.crt"))?,
            std::fs::read(dir.join(replica).join("tls.key"))?,
        ))
    };
    // First the race to create, then (with a lifetime that forces it) the race to renew.
    for lifetime in [3600, 30] {
        let (a, b) = (manager("a", lifetime), manager("b", lifetime));
        let _ = tokio::join!(a.ensure(), b.ensure());
        // The loser of a race adopts the winner's Secret on its next pass.
        eventually("both replicas serving one pair", || async {
            let _ = tokio::join!(a.ensure(), b.ensure());
            Ok((read("a").ok().is_some() && read("a").ok() == read("b").ok()).then_some(()))
        })
        .await?;
        let secret =
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(shared.client.clone(), &ns)
                .get("race-tls")
                .await?;
        let stored = secret
            .data
            .unwrap_or_default()
            .get("tls.crt")
            .map(|b| b.0.clone());
        ensure!(
            stored == Some(read("a")?.0),
            "the served pair is not the Secret's"
        );
    }
    Ok(())
}
