//! The router's cluster view from the real API server: a pod that exports a service, bound to
//! a node and given an IP and a Ready condition through the status subresource, shows up in
//! the router's registry (read from its snapshot file), follows the Ready condition, and goes
//! when the pod goes. With links on, every other Node becomes a peer and a deleted Node stops
//! being one. The router runs with a token of its ServiceAccount from `manifests/`, so the RBAC
//! shipped there is what it gets.

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
    write_router_tls(dir.path())?;
    let admin = format!("127.0.0.1:{}", servicekeel_e2e::process::free_port()?);
    let peer_port = servicekeel_e2e::process::free_port()?;
    let binary = paths::workspace_binary("servicekeel-proxy")?;
    let args = servicekeel_e2e::process::args([
        "router".to_string(),
        format!("--socket={}", dir.path().join("router.sock").display()),
        format!("--state-dir={}", dir.path().join("state").display()),
        format!("--admin-addr={admin}"),
        "--node=edge-1".into(),
        "--cluster=e2e".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--peer-listen=127.0.0.1:{peer_port}"),
        format!("--tls-cert={}", dir.path().join("tls.crt").display()),
        format!("--tls-key={}", dir.path().join("tls.key").display()),
        format!("--tls-ca={}", dir.path().join("ca.crt").display()),
    ]);
    let mut router = Process::spawn(
        "router",
        &binary,
        &args,
        &dir.path().join("router.log"),
        Lifetime::TiedToThisProcess,
    )?;
    let snapshot = dir
        .path()
        .join("state")
        .join(servicekeel_api::defaults::ROUTER_SNAPSHOT_FILE);

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

    // Nodes: every other node becomes a peer to link to; a deleted one stops being one.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(shared.client.clone());
    let node_name = format!("router-peer-{}", std::process::id());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": node_name}}))?,
        )
        .await?;
    nodes
        .patch_status(
            &node_name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}}),
            ),
        )
        .await?;
    let peers = |n: usize| {
        let admin = admin.clone();
        async move {
            let metrics = metrics_text(&admin).await.unwrap_or_default();
            Ok(metrics
                .contains(&format!("servicekeel_router_peers {n}\n"))
                .then_some(()))
        }
    };
    eventually("the new node taken as a peer", || peers(1)).await?;
    nodes.delete(&node_name, &DeleteParams::default()).await?;
    eventually("the deleted node dropped as a peer", || peers(0)).await?;

    router.check_running()?;
    router.stop();
    Ok(())
}

/// This router's TLS files: a CA and a certificate for `servicekeel-router.e2e`.
fn write_router_tls(dir: &Path) -> anyhow::Result<()> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_pem = ca_params.self_signed(&ca_key)?.pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["servicekeel-router.e2e".to_string()])?
        .signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.crt"), ca_pem)?;
    std::fs::write(dir.join("tls.crt"), cert.pem())?;
    std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
    Ok(())
}

/// `GET /metrics` over plain HTTP/1.1.
async fn metrics_text(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n")
        .await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    Ok(reply)
}
