//! Exports computed at admission and kept up to date, namespace defaults, and the webhook's
//! permissions.

use super::*;
pub(crate) const WEB_POD: &str = r#"apiVersion: v1
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
pub(crate) async fn exports_at_admission(shared: Arc<Shared>) -> anyhow::Result<()> {
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
        let dry = pods.create(&dry_run(), &pod).await?;
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
pub(crate) async fn exports_follow_changes(shared: Arc<Shared>) -> anyhow::Result<()> {
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
pub(crate) async fn namespace_defaults(shared: Arc<Shared>) -> anyhow::Result<()> {
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
        let dry = pods.create(&dry_run(), &pod).await?;
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
        let created = pods.create(&dry_run(), &pod).await?;
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
pub(crate) async fn permissions(shared: Arc<Shared>) -> anyhow::Result<()> {
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
