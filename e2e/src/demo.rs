//! `servicekeel-e2e demo`: the demo workload of `manifests/examples/` on the cluster with a
//! node, and what it shows, in plain words: the client pod resolving the service name through
//! its sidecar, and round trips over TCP and UDP through sidecar, router and server.

use std::path::Path;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use crate::cluster::pods_report;
use crate::webhook::{self, run_kubectl};
use crate::{node, paths};

pub const NAMESPACE: &str = "demo";
pub const CLIENT: &str = "client";
pub const SERVER: &str = "echo";
const READY_TIMEOUT: &str = "120s";

/// Applies `manifests/examples/` and waits until the server and the client are ready.
pub fn install(kubeconfig: &Path) -> anyhow::Result<()> {
    let examples = paths::repo().join("manifests/examples");
    webhook::kubectl(
        kubeconfig,
        &["apply", "-k", &examples.to_string_lossy()],
        None,
    )?;
    let waits: [&[&str]; 2] = [
        &["rollout", "status", "deployment/echo", "-n", NAMESPACE],
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "-n",
            NAMESPACE,
        ],
    ];
    for wait in waits {
        let mut arguments = wait.to_vec();
        let timeout = format!("--timeout={READY_TIMEOUT}");
        arguments.push(&timeout);
        webhook::kubectl(kubeconfig, &arguments, None)
            .map_err(|error| error.context(pods_report(kubeconfig)))?;
    }
    Ok(())
}

/// Runs `servicekeel-demo ARGS` in `container` of `pod`; its one line of output, or an error
/// with what it said.
pub fn exec(
    kubeconfig: &Path,
    namespace: &str,
    pod: &str,
    container: &str,
    arguments: &[&str],
) -> anyhow::Result<String> {
    let mut command = vec![
        "exec",
        "-n",
        namespace,
        pod,
        "-c",
        container,
        "--",
        "servicekeel-demo",
    ];
    command.extend_from_slice(arguments);
    let output = run_kubectl(kubeconfig, &command, None)?;
    if !output.success {
        bail!(
            "`servicekeel-demo {}` in {namespace}/{pod} failed: {}",
            arguments.join(" "),
            output.stderr.trim()
        );
    }
    Ok(output.stdout.trim().to_string())
}

/// Runs the demo's checks from inside the client pod and says what each showed.
pub async fn show(kubeconfig: &Path, client: &kube::Client) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let client_pod = pods.get(CLIENT).await.context("no client pod")?;
    let sidecar = client_pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.name == servicekeel_api::defaults::SIDECAR_CONTAINER)
        })
        .context("the client pod has no ServiceKeel sidecar")?;
    let imported = annotation(&client_pod, servicekeel_api::keys::IMPORTED_SERVICES);
    let server_pods = pods
        .list(&kube::api::ListParams::default().labels("app=echo"))
        .await?;
    let exported: Vec<String> = server_pods
        .items
        .iter()
        .map(|p| {
            format!(
                "{}: {}",
                p.metadata.name.clone().unwrap_or_default(),
                annotation(p, servicekeel_api::keys::EXPORTED_SERVICES)
            )
        })
        .collect();

    let run = |arguments: &[&str]| exec(kubeconfig, NAMESPACE, CLIENT, CLIENT, arguments);
    let mut report = vec![
        format!(
            "The client pod {NAMESPACE}/{CLIENT} runs with the sidecar `{}` ({}) injected as a \
             native sidecar; it imports: {imported}",
            sidecar.name,
            sidecar.image.clone().unwrap_or_default()
        ),
        format!("The echo server's pods export: {}", exported.join("; ")),
    ];
    let steps: [(&str, &[&str]); 5] = [
        (
            "Its sidecar answers the imported name with a local address",
            &["resolve", SERVER],
        ),
        (
            "Other names go to the cluster DNS upstream",
            &["resolve", "kubernetes.default.svc.cluster.local"],
        ),
        (
            "TCP through sidecar -> router -> server",
            &["tcp", "echo:7000", "--bytes", "65536"],
        ),
        (
            "UDP through sidecar -> router -> server",
            &["udp", "echo:7001", "--bytes", "512"],
        ),
        ("The replica that answered", &["name", "echo:7002"]),
    ];
    for (what, arguments) in steps {
        let line = run(arguments)?;
        report.push(format!(
            "{what}:\n    $ servicekeel-demo {}\n    {line}",
            arguments.join(" ")
        ));
    }
    Ok(report.join("\n\n"))
}

fn annotation(pod: &Pod, key: &str) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "(none)".into())
}

/// The line that says where the demo's cluster is.
pub fn closing_words(kubeconfig: &Path) -> String {
    format!(
        "The cluster stays up (node {}, API at https://{}:443):\n    export KUBECONFIG={}\n    \
         kubectl get pods -A -o wide\n    kubectl exec -n {NAMESPACE} {CLIENT} -c {CLIENT} -- \
         servicekeel-demo tcp echo:7000\nStop it and give the machine back with \
         `servicekeel-e2e down`.",
        node::NODE_NAME,
        node::API_ADDRESS,
        kubeconfig.display()
    )
}
