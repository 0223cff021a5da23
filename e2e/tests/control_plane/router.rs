//! The router's cluster view from the real API server: a pod that exports a service, bound to
//! a node and given an IP and a Ready condition through the status subresource, shows up in
//! the router's registry (read from its snapshot file), follows the Ready condition, and goes
//! when the pod goes. The router runs with a token of its ServiceAccount from `manifests/`, so
//! the RBAC shipped there is what it gets.

use super::*;

use kube::api::{DeleteParams, Patch, PatchParams};
use servicekeel_e2e::process::Process;

/// The snapshot's entries as `target addr node ready` lines.
fn snapshot_lines(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(value) = serde_json::from_str::<Value>(&text) else {
        return Vec::new();
    };
    value["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{} {} {} {}",
                e["target"].as_str().unwrap_or_default(),
                e["addr"].as_str().unwrap_or_default(),
                e["node"].as_str().unwrap_or_default(),
                e["ready"]
            )
        })
        .collect()
}

/// A kubeconfig like the admin's, authenticating as the router's ServiceAccount.
fn router_kubeconfig(shared: &Shared, dir: &Path) -> anyhow::Result<PathBuf> {
    let (ok, token, stderr) = kubectl(
        &shared.kubeconfig,
        &[
            "create",
            "token",
            "servicekeel-router",
            "-n",
            "servicekeel-system",
        ],
        None,
    )?;
    ensure!(ok, "kubectl create token: {stderr}");
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&shared.kubeconfig)?)?;
    let users = config["users"]
        .as_sequence_mut()
        .context("kubeconfig without users")?;
    for user in users {
        user["user"] = serde_yaml::to_value(BTreeMap::from([("token", token.trim())]))?;
    }
    let path = dir.join("router.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

pub(crate) async fn router_follows_exporting_pods(shared: Arc<Shared>) -> anyhow::Result<()> {
    let ns = namespace(&shared.client, "router-view", false).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = router_kubeconfig(&shared, dir.path())?;
    let binary = paths::workspace_binary("servicekeel-proxy")?;
    let args = servicekeel_e2e::process::args([
        "router".to_string(),
        format!("--socket={}", dir.path().join("router.sock").display()),
        format!("--state-dir={}", dir.path().join("state").display()),
        "--admin-addr=127.0.0.1:0".into(),
        "--node=edge-1".into(),
        "--cluster=e2e".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
    ]);
    let mut router = Process::spawn(
        "router",
        &binary,
        &args,
        &dir.path().join("router.log"),
        Lifetime::TiedToThisProcess,
    )?;
    let snapshot = dir.path().join("state/registry.json");

    let pods: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "web-0",
            "annotations": {
                "servicekeel.io/exported-services":
                    "services: [{name: web, ports: [{port: 80, targetPort: http}, {port: 53, protocol: UDP}]}]",
            },
        },
        "spec": {
            "nodeName": "edge-2",
            "containers": [{
                "name": "web",
                "image": "registry.invalid/web:1",
                "ports": [{"name": "http", "containerPort": 8080}],
            }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let status = |ready: &str| {
        json!({"status": {
            "phase": "Running",
            "podIP": "10.244.9.7",
            "podIPs": [{"ip": "10.244.9.7"}],
            "conditions": [{"type": "Ready", "status": ready}],
        }})
    };
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(status("True")),
    )
    .await?;
    let expected = vec![
        format!("web.{ns}.e2e:53/UDP 10.244.9.7:53 edge-2 true"),
        format!("web.{ns}.e2e:80/TCP 10.244.9.7:8080 edge-2 true"),
    ];
    let check = |expected: Vec<String>| {
        let snapshot = snapshot.clone();
        let ns = ns.clone();
        async move {
            let mine: Vec<String> = snapshot_lines(&snapshot)
                .into_iter()
                .filter(|l| l.contains(&format!(".{ns}.")))
                .collect();
            Ok((mine == expected).then_some(()))
        }
    };
    let seen = eventually("the exporting pod in the router's registry", || {
        check(expected.clone())
    })
    .await;
    if let Err(error) = seen {
        router.check_running()?;
        bail!(
            "{error}; snapshot: {:?}\n{}",
            snapshot_lines(&snapshot),
            servicekeel_e2e::process::log_tail(router.log(), 30)
        );
    }

    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(status("False")),
    )
    .await?;
    let not_ready: Vec<String> = expected
        .iter()
        .map(|l| l.replace(" true", " false"))
        .collect();
    eventually("the Ready condition followed", || check(not_ready.clone())).await?;

    pods.delete("web-0", &DeleteParams::default().grace_period(0))
        .await?;
    eventually("the deleted pod gone from the registry", || {
        check(Vec::new())
    })
    .await?;
    router.check_running()?;
    router.stop();
    Ok(())
}
