//! The sidecar process in-process, as the design example's client pod runs it: its annotations
//! file imports `simple-server`; the sidecar answers `simple-server.default` with a local
//! address, listens there on 8080 and carries a connection through the tunnel to the server,
//! reports ready, and follows a change of the annotations while running.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

mod support;

use servicekeel_api::Protocol;
use servicekeel_api::podinfo::format_annotations;
use servicekeel_proxy::config::SidecarConfig;
use servicekeel_proxy::sidecar::Sidecar;
use support::{RouterState, TestRouter, echo_through, http_get, resolve, tcp_echo};

/// The client pod of ../shared/examples/annotations-yaml-pod.yaml.
fn design_example_annotations() -> BTreeMap<String, String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/api/tests/fixtures/annotations-yaml-pod.yaml"
    );
    let pod: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_yaml::from_value(pod["metadata"]["annotations"].clone()).unwrap()
}

async fn http_status(addr: SocketAddr, path: &str) -> String {
    let reply = http_get(addr, path).await;
    reply.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_design_examples_client_resolves_its_import_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("annotations");
    let socket = dir.path().join("router.sock");
    let router = TestRouter::start(&socket, Arc::new(RouterState::default())).await;
    router.route(
        "simple-server.default.cluster-a.local:8080",
        Protocol::Tcp,
        tcp_echo().await,
    );
    let mut annotations = design_example_annotations();
    std::fs::write(&file, format_annotations(&annotations)).unwrap();
    let env: BTreeMap<String, String> = [
        ("POD_NAMESPACE", "default"),
        ("SERVICEKEEL_CLUSTER", "cluster-a"),
        ("SIDECAR_UPSTREAM_DNS", "127.0.0.1:9"),
        ("SIDECAR_IP_RANGE", "127.0.66.0/24"),
        ("SIDECAR_DNS_ADDR", "127.0.0.1:0"),
        ("SIDECAR_ADMIN_ADDR", "127.0.0.1:0"),
        (
            "SIDECAR_SERVER_LISTEN",
            &format!("unix://{}", socket.display()),
        ),
        ("SIDECAR_ANNOTATIONS_FILE", file.to_str().unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let sidecar = Sidecar::start(SidecarConfig::from_source(&env).unwrap())
        .await
        .unwrap();
    let dns = sidecar.dns_addr();
    assert_eq!(
        http_status(sidecar.admin_addr(), "/readyz").await,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        http_status(sidecar.admin_addr(), "/healthz").await,
        "HTTP/1.1 200 OK"
    );

    let local = Ipv4Addr::new(127, 0, 66, 1);
    assert_eq!(resolve(dns, "simple-server.default.").await, [local]);
    assert_eq!(
        resolve(dns, "simple-server.default.cluster-a.local.").await,
        [local]
    );
    assert_eq!(resolve(dns, "db.default.").await, Vec::<Ipv4Addr>::new());

    // The application connects where DNS sent it and reaches the server.
    let resolved = resolve(dns, "simple-server.default.").await[0];
    let through = echo_through(
        SocketAddr::from((resolved, 8080)),
        b"GET / HTTP/1.0\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(through, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(router.state.flows_opened.load(Ordering::SeqCst), 1);

    // A second import appears; the first keeps its address.
    annotations.insert(
        "servicekeel.io/imported-services".into(),
        "services:\n  - {name: simple-server, cluster: cluster-a.local, ports: [{port: 8080}]}\n  - {name: db, ports: [{port: 5432}]}\n".into(),
    );
    std::fs::write(&file, format_annotations(&annotations)).unwrap();
    sidecar.reload_now();
    assert_eq!(
        resolve(dns, "db.default.").await,
        [Ipv4Addr::new(127, 0, 66, 2)]
    );
    assert_eq!(resolve(dns, "simple-server.default.").await, [local]);

    // An invalid value keeps the last good set.
    annotations.insert(
        "servicekeel.io/imported-services".into(),
        "services: [{name: db, ports: [{port: 0}]}]".into(),
    );
    std::fs::write(&file, format_annotations(&annotations)).unwrap();
    sidecar.reload_now();
    assert_eq!(resolve(dns, "simple-server.default.").await, [local]);
    assert_eq!(
        resolve(dns, "db.default.").await,
        [Ipv4Addr::new(127, 0, 66, 2)]
    );

    // Seven local answers so far; `db.default` before it was imported and `example.com` were
    // forwarded and found no upstream.
    assert_eq!(resolve(dns, "example.com.").await, Vec::<Ipv4Addr>::new());
    let metrics = http_get(sidecar.admin_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"servicekeel_sidecar_dns_queries_total{outcome="local"} 7"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"servicekeel_sidecar_dns_queries_total{outcome="upstream_failed"} 2"#),
        "{metrics}"
    );

    sidecar.shutdown().await;
}

#[test]
fn a_bad_environment_names_the_variable() {
    let env: BTreeMap<String, String> =
        [("POD_NAMESPACE", "default"), ("SERVICEKEEL_CLUSTER", "c")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let error = SidecarConfig::from_source(&env).unwrap_err().to_string();
    assert!(
        error.starts_with("SIDECAR_UPSTREAM_DNS is not set"),
        "{error}"
    );
}
