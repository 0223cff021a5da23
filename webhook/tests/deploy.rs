//! What users apply matches the code: `manifests/` renders with `kubectl kustomize`, the webhook
//! Deployment's arguments parse with the real CLI, the shipped config file is exactly the
//! documented defaults, the MutatingWebhookConfiguration carries the settings the webhook relies
//! on, and `certs/generate.sh` makes a pair the server loads and a client verifies for the
//! Service's DNS name.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use servicekeel_api::keys;
use servicekeel_webhook::cli::{CertificateMode, Cli, Command as CliCommand, ServeArgs};
use servicekeel_webhook::config::Config;
use support::{TestServer, client_trusting};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// `manifests/` or one of its overlays, rendered, one JSON value per object.
fn rendered(dir: &str) -> Vec<Value> {
    let output = Command::new(kubectl())
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render manifests/ (set KUBECTL): {e}"));
    assert!(
        output.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in manifests/"))
}

/// The Deployment's container arguments, parsed by the real CLI.
fn serve_args(deployment: &Value) -> ServeArgs {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut argv = vec!["servicekeel-webhook".to_string()];
    argv.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    let cli =
        Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("Deployment args do not parse: {e}"));
    let CliCommand::Serve(serve) = cli.command else {
        panic!("the Deployment must run `serve`")
    };
    *serve
}

#[test]
fn manifests_render_and_match_the_code() {
    let objects = rendered("manifests");
    for o in &objects {
        let cluster_scoped = [
            "Namespace",
            "MutatingWebhookConfiguration",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        if !cluster_scoped.contains(&o["kind"].as_str().unwrap()) {
            assert_eq!(
                o["metadata"]["namespace"], "servicekeel-system",
                "{}",
                o["kind"]
            );
        }
    }

    // The Deployment runs the CLI as it exists, with the config from the ConfigMap.
    let deployment = object(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let serve = serve_args(deployment);
    // By default the webhook makes its own certificate, into a writable in-memory volume.
    assert_eq!(serve.certificate_mode, CertificateMode::Managed);
    let tls_volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tls")
        .unwrap();
    assert!(tls_volume.get("emptyDir").is_some(), "{tls_volume}");
    assert_eq!(container["ports"][0]["containerPort"], serve.listen.port());
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mounted = |file: &Path| {
        mounts
            .iter()
            .any(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
    };
    assert!(
        mounted(&serve.tls_cert_file)
            && mounted(&serve.tls_key_file)
            && mounted(serve.config.as_ref().unwrap())
    );
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );

    // The shipped config file documents the defaults: it must be exactly them.
    let config_map = object(&objects, "ConfigMap");
    let text = config_map["data"]["config.yaml"].as_str().unwrap();
    assert_eq!(Config::from_yaml(text).unwrap(), Config::default());
    let config_volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(
        config_volume["configMap"]["name"],
        config_map["metadata"]["name"]
    );

    let service = object(&objects, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        container["ports"][0]["name"]
    );
    assert_eq!(
        object(&objects, "PodDisruptionBudget")["spec"]["minAvailable"],
        1
    );

    let webhook = &object(&objects, "MutatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(webhook["clientConfig"]["service"]["path"], "/mutate");
    assert_eq!(
        webhook["clientConfig"]["service"]["name"],
        service["metadata"]["name"]
    );
    assert_eq!(webhook["clientConfig"]["service"]["port"], 443);
    assert_eq!(webhook["failurePolicy"], "Fail");
    assert_eq!(webhook["sideEffects"], "None");
    // A second call would find the pod injected and change nothing.
    assert_eq!(webhook["reinvocationPolicy"], "Never");
    assert!(webhook["timeoutSeconds"].as_i64().unwrap() <= 5);
    assert_eq!(
        webhook["admissionReviewVersions"],
        serde_json::json!(["v1"])
    );
    assert_eq!(
        webhook["rules"][0]["operations"],
        serde_json::json!(["CREATE"])
    );
    assert_eq!(
        webhook["rules"][0]["resources"],
        serde_json::json!(["pods"])
    );
    assert_eq!(
        webhook["namespaceSelector"]["matchLabels"][keys::NAMESPACE_INJECT_LABEL],
        keys::NAMESPACE_INJECT_ENABLED
    );
    let excluded = &webhook["namespaceSelector"]["matchExpressions"][0];
    assert!(
        excluded["values"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "servicekeel-system")
    );
    let object_selector = &webhook["objectSelector"]["matchExpressions"][0];
    assert_eq!(object_selector["key"], keys::INJECT);
    assert_eq!(object_selector["values"][0], keys::INJECT_DISABLED);
    let conditions = webhook["matchConditions"].to_string();
    assert!(conditions.contains(keys::INJECT), "{conditions}");
}

/// The overlays that provide the certificate: files mode, served from the Secret; with
/// cert-manager, a Certificate for the Service and the CA injected into caBundle.
#[test]
fn certificate_overlays_serve_the_secret() {
    for dir in ["manifests/manual-certs", "manifests/cert-manager"] {
        let objects = rendered(dir);
        let deployment = object(&objects, "Deployment");
        let serve = serve_args(deployment);
        assert_eq!(serve.certificate_mode, CertificateMode::Files, "{dir}");
        let volume = &deployment["spec"]["template"]["spec"]["volumes"][0];
        assert_eq!(volume["name"], "tls", "{dir}");
        assert_eq!(
            volume["secret"]["secretName"], serve.certificate_secret,
            "{dir}"
        );
    }
    let objects = rendered("manifests/cert-manager");
    let certificate = object(&objects, "Certificate");
    assert_eq!(certificate["spec"]["secretName"], "servicekeel-webhook-tls");
    assert_eq!(
        object(&objects, "MutatingWebhookConfiguration")["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "servicekeel-system/servicekeel-webhook"
    );
}

#[test]
fn examples_are_injectable() {
    let dir = repo().join("manifests/examples");
    let mut injected = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let output =
            servicekeel_webhook::offline::inject_documents(&text, "demo", &Config::default())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        injected += output
            .notes
            .iter()
            .filter(|n| n.outcome == "injected")
            .count();
    }
    assert!(injected >= 3, "the examples show injected workloads");
}

#[tokio::test]
async fn generated_certificates_serve_the_service_name() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(repo().join("certs/generate.sh"))
        .args(["--out", dir.path().to_str().unwrap(), "--days", "30"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let server = TestServer::start(
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
        Config::default(),
    )
    .await;
    let ca = CertificateDer::from_pem_file(dir.path().join("ca.crt")).unwrap();
    for name in [
        "servicekeel-webhook.servicekeel-system.svc",
        "servicekeel-webhook.servicekeel-system.svc.cluster.local",
    ] {
        server
            .handshake(client_trusting(ca.clone()), name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let wrong = server
        .handshake(client_trusting(ca.clone()), "example.com")
        .await;
    assert!(
        wrong.is_err(),
        "a name the certificate does not carry must fail"
    );

    // A rerun keeps the CA and issues a new serving certificate the CA still vouches for.
    let ca_before = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let cert_before = std::fs::read(dir.path().join("tls.crt")).unwrap();
    let status = Command::new("bash")
        .arg(repo().join("certs/generate.sh"))
        .args(["--out", dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca_before);
    assert_ne!(
        std::fs::read(dir.path().join("tls.crt")).unwrap(),
        cert_before
    );
    assert!(server.reloader.reload_if_changed().unwrap());
    server
        .handshake(
            client_trusting(ca),
            "servicekeel-webhook.servicekeel-system.svc",
        )
        .await
        .unwrap();
}
