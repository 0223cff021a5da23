//! Admission through the real apiserver: what is stored, what is refused, what is untouched,
//! dry runs, and a webhook outage.

use super::*;

/// Every pod of the golden spread, created in a labelled namespace, is stored exactly as the
/// offline injection (the same pure function) predicts, or refused as it predicts.
pub(crate) async fn golden_pods_are_stored_as_predicted(shared: Arc<Shared>) -> anyhow::Result<()> {
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
pub(crate) async fn golden_workloads_validate(shared: Arc<Shared>) -> anyhow::Result<()> {
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
pub(crate) async fn pods_outside_scope_are_untouched(shared: Arc<Shared>) -> anyhow::Result<()> {
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

pub(crate) const INVALID: &str = r#"apiVersion: v1
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
pub(crate) async fn invalid_annotation_is_refused(shared: Arc<Shared>) -> anyhow::Result<()> {
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
pub(crate) async fn kubectl_apply_injects(shared: Arc<Shared>) -> anyhow::Result<()> {
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
        imported["services"][0]["name"] == "echo",
        "imports: {imported}"
    );
    Ok(())
}

/// A server-side dry run shows the injected pod and stores nothing (the webhook declares
/// `sideEffects: None`).
pub(crate) async fn server_side_dry_run(shared: Arc<Shared>) -> anyhow::Result<()> {
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
pub(crate) async fn webhook_outage(shared: Arc<Shared>) -> anyhow::Result<()> {
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
