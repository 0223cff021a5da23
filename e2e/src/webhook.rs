//! The real `servicekeel-webhook` binary serving the local cluster, registered with the
//! MutatingWebhookConfiguration from `manifests/` (clientConfig switched to the loopback URL,
//! caBundle filled in), so the tests exercise the configuration users apply.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use servicekeel_api::keys;
use servicekeel_webhook::inject::{self, SidecarMode};
use servicekeel_webhook::pod::PodFacts;

use crate::paths;
use crate::pki::Pki;
use crate::process::{Lifetime, Process, args, wait_ready};

pub const WEBHOOK_BINARY: &str = "servicekeel-webhook";
/// Namespace used to check that the apiserver calls the webhook.
const PROBE_NAMESPACE: &str = "servicekeel-e2e-probe";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The webhook's config in the local cluster: `manifests/base/config.yaml` with the cluster's name
/// and cluster-wide default imports set (`e2e/webhook-config.yaml`).
pub fn config_file() -> PathBuf {
    paths::repo().join("e2e/webhook-config.yaml")
}

/// Namespace, ServiceAccount, RBAC and Lease namespace of the webhook, as in `manifests/`.
pub const SYSTEM_NAMESPACE: &str = "servicekeel-system";
pub const SERVICE_ACCOUNT: &str = "servicekeel-webhook";

/// Applies the access objects of `manifests/` (namespace, ServiceAccount, RBAC) and returns a
/// kubeconfig holding a token of that ServiceAccount: the webhook then runs with exactly the
/// permissions the manifests grant.
pub fn install_access(
    admin_kubeconfig: &Path,
    pki: &Pki,
    server: &str,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    const ACCESS: &[&str] = &[
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let objects: Vec<String> = render_manifests()?
        .into_iter()
        .filter(|o| {
            o["kind"]
                .as_str()
                .is_some_and(|kind| ACCESS.contains(&kind))
        })
        .map(|o| serde_yaml::to_string(&o))
        .collect::<Result<_, _>>()?;
    kubectl(
        admin_kubeconfig,
        &["apply", "-f", "-"],
        Some(&objects.join("---\n")),
    )?;
    let token = kubectl(
        admin_kubeconfig,
        &[
            "create",
            "token",
            SERVICE_ACCOUNT,
            "-n",
            SYSTEM_NAMESPACE,
            "--duration=48h",
        ],
        None,
    )?;
    let path = dir.join("webhook.kubeconfig");
    std::fs::write(&path, pki.token_kubeconfig(server, token.trim()))?;
    Ok(path)
}

/// What a kubectl run said.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs kubectl with `kubeconfig`, feeding it `stdin`.
pub fn run_kubectl(
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<KubectlOutput> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(paths::kubectl())
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} (set KUBECTL)", paths::kubectl().display()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    Ok(KubectlOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs kubectl; its standard output, or an error with its stderr.
pub fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let output = run_kubectl(kubeconfig, args, stdin)?;
    if !output.success {
        bail!("kubectl {} failed: {}", args.join(" "), output.stderr);
    }
    Ok(output.stdout)
}

/// Starts the webhook on 127.0.0.1:`port`, talking to the API server with `kubeconfig`. It
/// manages its own serving certificate (for its Service names and 127.0.0.1) and fills
/// `caBundle`, as installed from `manifests/`; `extra` flags come last.
pub async fn start(
    dir: &Path,
    port: u16,
    kubeconfig: &Path,
    extra: &[String],
    lifetime: Lifetime,
) -> anyhow::Result<Process> {
    let binary = paths::workspace_binary(WEBHOOK_BINARY)?;
    let tls = dir.join("webhook-tls");
    let mut process = Process::spawn(
        WEBHOOK_BINARY,
        &binary,
        &args(
            [
                "serve".to_string(),
                format!("--listen=127.0.0.1:{port}"),
                "--certificate-mode=managed".into(),
                "--certificate-extra-names=127.0.0.1".into(),
                format!("--tls-cert-file={}", tls.join("tls.crt").display()),
                format!("--tls-key-file={}", tls.join("tls.key").display()),
                format!("--config={}", config_file().display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--namespace={SYSTEM_NAMESPACE}"),
                "--identity=servicekeel-webhook-e2e".into(),
                "--drain-timeout=5s".into(),
            ]
            .into_iter()
            .chain(extra.iter().cloned()),
        ),
        &dir.join("servicekeel-webhook.log"),
        lifetime,
    )?;
    wait_ready(
        WEBHOOK_BINARY,
        &mut [&mut process],
        READY_TIMEOUT,
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .await?;
    Ok(process)
}

/// The objects of `manifests/`, as `kubectl kustomize` renders them.
pub fn render_manifests() -> anyhow::Result<Vec<Value>> {
    let kubectl = paths::kubectl();
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(paths::repo().join("manifests"))
        .output()
        .with_context(|| format!("cannot run {} (set KUBECTL)", kubectl.display()))?;
    if !output.status.success() {
        bail!(
            "kubectl kustomize manifests/ failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8(output.stdout)?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Ok(serde::Deserialize::deserialize(document)?))
        .collect()
}

/// The MutatingWebhookConfiguration of `manifests/`.
pub fn manifest_configuration() -> anyhow::Result<Value> {
    render_manifests()?
        .into_iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .context("manifests/ has no MutatingWebhookConfiguration")
}

/// Registers the manifests' configuration pointed at `url`, with no `caBundle`: the webhook
/// fills it in. Then waits until the apiserver actually sends pods to the webhook.
pub async fn register(client: &kube::Client, url: &str) -> anyhow::Result<()> {
    let mut configuration = manifest_configuration()?;
    for webhook in configuration["webhooks"]
        .as_array_mut()
        .context("webhooks must be a list")?
    {
        webhook["clientConfig"] = json!({ "url": url });
    }
    let name = configuration["metadata"]["name"]
        .as_str()
        .context("the configuration has no name")?
        .to_string();
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply("servicekeel-e2e").force(),
        &Patch::Apply(&configuration),
    )
    .await
    .with_context(|| format!("cannot register MutatingWebhookConfiguration {name}"))?;
    wait_until_called(client).await
}

/// Dry-run pod creations in a labelled namespace until one comes back injected: the apiserver
/// picks up a new webhook configuration asynchronously.
pub async fn wait_until_called(client: &kube::Client) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(PROBE_NAMESPACE.into()),
            labels: Some(
                [(
                    keys::NAMESPACE_INJECT_LABEL.to_string(),
                    keys::NAMESPACE_INJECT_ENABLED.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .patch(
            PROBE_NAMESPACE,
            &PatchParams::apply("servicekeel-e2e").force(),
            &Patch::Apply(&namespace),
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), PROBE_NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "probe-"},
        "spec": {"containers": [{"name": "probe", "image": "probe"}]}
    }))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last;
    loop {
        match pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &pod,
            )
            .await
        {
            Ok(created) if is_injected(&created) => return Ok(()),
            Ok(_) => last = "pod admitted without the sidecar".into(),
            Err(error) => last = error.to_string(),
        }
        if Instant::now() > deadline {
            bail!("the apiserver did not call the webhook within {READY_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the pod carries the sidecar.
pub fn is_injected(pod: &Pod) -> bool {
    sidecar_mode(pod).is_some()
}

/// How the pod carries the sidecar: native, as an init container, or classic, as an app
/// container; `None` without it.
pub fn sidecar_mode(pod: &Pod) -> Option<SidecarMode> {
    PodFacts::from(pod)
        .spec
        .as_ref()
        .and_then(inject::sidecar_mode)
}

/// The value of `series` (its name with any labels, as written) in a `/metrics` text, the
/// webhook's or a router's; `None` when the text has no such line.
pub fn counter(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The webhook's count of reviews answered from a remembered review.
pub const REMEMBERED_REVIEWS: &str = "servicekeel_webhook_remembered_reviews_total";
