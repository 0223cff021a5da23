//! The router in-process with real sidecars: one pod exports a service by registering it, another
//! imports it and reaches it through the router; a dead endpoint is ejected without the client
//! noticing; a restarted router routes from its snapshot; the socket is made as configured.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use servicekeel_proxy::router::{Router, RouterConfig};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use support::{
    connects_as, cut_at_once, echo_through, echoes_again, http_get, metrics_eventually, pattern,
    pod_behind, pod_over_tcp, router_config, tcp_echo, tcp_echo_server, udp_echo,
};
use tokio::net::UdpSocket;

const PATIENCE: Duration = Duration::from_secs(20);

/// Waits until the router knows `n` (target, endpoint) pairs.
async fn registry_has(router: &Router, n: usize) -> bool {
    for _ in 0..(PATIENCE.as_millis() / 10) {
        if router.registry_len() == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn exports(tcp: SocketAddr, udp: SocketAddr) -> String {
    format!(
        "services: [{{name: web, ports: [{{port: 80, targetPort: {}}}, {{port: 53, targetPort: {}, protocol: UDP}}]}}]",
        tcp.port(),
        udp.port()
    )
}

const IMPORTS: &str = "services: [{name: web, ports: [{port: 80}, {port: 53, protocol: UDP}]}]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_export_is_reached_through_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(router_config(dir.path())).await.unwrap();
    let mode = std::fs::metadata(router.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);

    let (tcp, udp) = (tcp_echo().await, udp_echo().await);
    let server = pod_behind(
        &router,
        "127.0.80.0/24",
        "services: []",
        Some(&exports(tcp, udp)),
    );
    let server = server.start().await;
    assert!(registry_has(&router, 2).await, "the server pod registered");

    let client = pod_behind(&router, "127.0.81.0/24", IMPORTS, None);
    let client = client.start().await;
    let data = pattern(3, 8 << 20);
    let back = echo_through("127.0.81.1:80".parse().unwrap(), &data)
        .await
        .unwrap();
    assert!(back == data, "bytes differ");
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(b"query", "127.0.81.1:53").await.unwrap();
    let mut buffer = [0u8; 64];
    let (n, _) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buffer[..n], b"query");

    metrics_eventually(
        router.admin_addr(),
        &[
            // Both pods registered, the client with no exports.
            "servicekeel_router_registered_sidecars 2",
            "servicekeel_router_registry_entries 2",
            r#"servicekeel_router_flows_total{protocol="TCP",outcome="completed"} 1"#,
        ],
    )
    .await;
    // The server pod goes away: its registration goes with its connection.
    server.shutdown().await;
    assert!(registry_has(&router, 0).await, "registration dropped");
    assert!(
        echo_through("127.0.81.1:80".parse().unwrap(), b"x")
            .await
            .is_err()
    );
    client.shutdown().await;
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_ejected_and_flows_go_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(router_config(dir.path())).await.unwrap();
    let doomed = tcp_echo_server(Ipv4Addr::LOCALHOST).await;
    let survivor = tcp_echo_server(Ipv4Addr::LOCALHOST).await;
    let udp = udp_echo().await;
    let first = pod_behind(
        &router,
        "127.0.82.0/24",
        "services: []",
        Some(&exports(doomed.addr, udp)),
    );
    let second = pod_behind(
        &router,
        "127.0.83.0/24",
        "services: []",
        Some(&exports(survivor.addr, udp)),
    );
    let (first, second) = (first.start().await, second.start().await);
    assert!(registry_has(&router, 3).await, "two TCP endpoints, one UDP");

    let client = pod_behind(&router, "127.0.84.0/24", IMPORTS, None)
        .start()
        .await;
    let flows = |from: u64| async move {
        for i in from..from + 10 {
            let data = pattern(i, 1000);
            let back = echo_through("127.0.84.1:80".parse().unwrap(), &data)
                .await
                .unwrap_or_else(|e| panic!("flow {i}: {e}"));
            assert_eq!(back, data);
        }
    };
    flows(0).await;
    let survived_before = survivor.accepted.load(Ordering::SeqCst);
    assert!(
        doomed.accepted.load(Ordering::SeqCst) > 0 && survived_before > 0,
        "round-robin uses both endpoints"
    );

    // One endpoint dies (its pod's registration stays: the sidecar does not know). New flows
    // all succeed: the failed dial ejects it and the flow is retried on the other.
    doomed.kill().await;
    flows(10).await;
    assert_eq!(
        survivor.accepted.load(Ordering::SeqCst),
        survived_before + 10,
        "every new flow went to the survivor"
    );
    for sidecar in [first, second, client] {
        sidecar.shutdown().await;
    }
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_router_routes_from_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(router_config(dir.path())).await.unwrap();
    let (tcp, udp) = (tcp_echo().await, udp_echo().await);
    let server = pod_behind(
        &router,
        "127.0.85.0/24",
        "services: []",
        Some(&exports(tcp, udp)),
    )
    .start()
    .await;
    assert!(registry_has(&router, 2).await);
    // The snapshot is written shortly after the change.
    let snapshot = dir.path().join("state/registry.json");
    let mut written = false;
    for _ in 0..(PATIENCE.as_millis() / 20) {
        if std::fs::read_to_string(&snapshot)
            .is_ok_and(|t| t.contains("web.default.cluster-a:80/TCP"))
        {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(written, "snapshot written");
    // The router dies with the server pod's registration in its snapshot; the pod's sidecar is
    // gone too, so only the snapshot knows the endpoint.
    server.shutdown().await;
    router.shutdown().await;

    let router = Router::start(router_config(dir.path())).await.unwrap();
    assert_eq!(router.registry_len(), 2, "loaded from the snapshot");
    let client = pod_behind(&router, "127.0.86.0/24", IMPORTS, None)
        .start()
        .await;
    assert_eq!(
        echo_through("127.0.86.1:80".parse().unwrap(), b"from the snapshot")
            .await
            .unwrap(),
        b"from the snapshot"
    );
    let metrics = http_get(router.admin_addr(), "/metrics").await;
    assert!(
        !metrics.contains("servicekeel_router_snapshot_age_seconds -1"),
        "{metrics}"
    );
    client.shutdown().await;
    router.shutdown().await;
}

#[tokio::test]
async fn the_socket_replaces_a_stale_one_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let first = Router::start(router_config(dir.path())).await.unwrap();
    // Left behind by a router that did not shut down cleanly.
    std::mem::forget(first);
    let second = Router::start(router_config(dir.path())).await.unwrap();
    second.shutdown().await;

    let mut config = router_config(dir.path());
    config.socket = dir.path().join("a-file");
    std::fs::write(&config.socket, "not a socket").unwrap();
    let error = Router::start(config).await.unwrap_err().to_string();
    assert!(error.contains("is not a socket"), "{error}");
}

#[tokio::test]
async fn only_the_sidecars_group_may_use_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    // Anyone may look up the path; the socket's own mode decides.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = router_config(dir.path());
    config.socket = dir.path().join("router.sock");
    config.socket_owner = Some((None, Some(65532)));
    let router = Router::start(config).await.unwrap();
    let socket = router.socket().to_owned();
    assert!(
        connects_as(65532, 65532, &socket),
        "the sidecars' group gets in"
    );
    assert!(
        !connects_as(4242, 4242, &socket),
        "another group is refused"
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_flows_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(router_config(dir.path())).await.unwrap();
    let (tcp, udp) = (tcp_echo().await, udp_echo().await);
    let server = pod_behind(
        &router,
        "127.0.87.0/24",
        "services: []",
        Some(&exports(tcp, udp)),
    )
    .start()
    .await;
    assert!(registry_has(&router, 2).await);
    let client = pod_behind(&router, "127.0.88.0/24", IMPORTS, None)
        .start()
        .await;
    let mut live = tokio::net::TcpStream::connect("127.0.88.1:80")
        .await
        .unwrap();
    live.write_all(b"one").await.unwrap();
    let mut three = [0u8; 3];
    live.read_exact(&mut three).await.unwrap();
    assert_eq!(router.open_flows(), 1);

    let socket = router.socket().to_owned();
    let draining = tokio::spawn(router.shutdown());
    for _ in 0..500 {
        if !socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!socket.exists(), "no new sidecar connections once draining");
    assert!(!draining.is_finished(), "waits for the open flow");
    live.write_all(b"two").await.unwrap();
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"two", "the open flow carried on to its end");
    assert_eq!(
        tokio::time::timeout(PATIENCE, draining)
            .await
            .unwrap()
            .unwrap(),
        0
    );
    for sidecar in [client, server] {
        sidecar.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_flow_limit_the_router_refuses_new_flows_and_counts_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(RouterConfig {
        max_flows: 1,
        ..router_config(dir.path())
    })
    .await
    .unwrap();
    let (tcp, udp) = (tcp_echo().await, udp_echo().await);
    let server = pod_behind(
        &router,
        "127.0.88.0/24",
        "services: []",
        Some(&exports(tcp, udp)),
    )
    .start()
    .await;
    assert!(registry_has(&router, 2).await, "the server pod registered");
    let client = pod_behind(&router, "127.0.89.0/24", IMPORTS, None)
        .start()
        .await;
    let local: SocketAddr = "127.0.89.1:80".parse().unwrap();

    let mut held = tokio::net::TcpStream::connect(local).await.unwrap();
    held.write_all(b"one").await.unwrap();
    let mut back = [0u8; 3];
    tokio::time::timeout(PATIENCE, held.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"one");
    assert!(cut_at_once(local).await, "a second flow was carried");
    let metrics = http_get(router.admin_addr(), "/metrics").await;
    let line = r#"servicekeel_router_flows_total{protocol="TCP",outcome="limit"} 1"#;
    assert!(metrics.contains(line), "{line} missing from\n{metrics}");

    drop(held);
    assert!(
        echoes_again(local).await,
        "no flow carried after the first closed"
    );
    // The router sees the last flow end a moment after its client has the echo.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while router.open_flows() != 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(router.open_flows(), 0);
    client.shutdown().await;
    server.shutdown().await;
    router.shutdown().await;
}

/// A router taking sidecars over TCP from `allowed` as well as on its socket.
async fn router_with_tcp(dir: &Path, allowed: &str) -> Router {
    Router::start(RouterConfig {
        sidecar_tcp: Some(servicekeel_proxy::router::SidecarTcp {
            listen: "127.0.0.1:0".parse().unwrap(),
            allowed: vec![allowed.parse().unwrap()],
        }),
        ..router_config(dir)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_over_tcp_register_and_carry_flows_like_those_on_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let router = router_with_tcp(dir.path(), "127.0.0.0/8").await;
    let (tcp, udp) = (tcp_echo().await, udp_echo().await);
    let server = pod_over_tcp(
        &router,
        "127.0.94.0/24",
        "services: []",
        Some(&exports(tcp, udp)),
    )
    .start()
    .await;
    assert!(registry_has(&router, 2).await, "the server pod registered");
    let client = pod_over_tcp(&router, "127.0.95.0/24", IMPORTS, None)
        .start()
        .await;
    let data = pattern(5, 1 << 20);
    assert_eq!(
        echo_through("127.0.95.1:80".parse().unwrap(), &data)
            .await
            .unwrap(),
        data
    );
    for sidecar in [client, server] {
        sidecar.shutdown().await;
    }
    assert!(
        registry_has(&router, 0).await,
        "gone with the server's connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_a_sidecar_registers_only_its_own_address() {
    use bytes::Bytes;
    use servicekeel_api::ServiceList;
    use servicekeel_api::tunnel::registration::Registration;
    use servicekeel_api::tunnel::{REGISTRATION_PATH, Source, VERSION, VERSION_HEADER};
    let dir = tempfile::tempdir().unwrap();
    let router = router_with_tcp(dir.path(), "127.0.0.0/8").await;
    let io = tokio::net::TcpStream::connect(router.sidecar_addr().unwrap())
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    // This connection comes from 127.0.0.1; the registration claims another pod's address.
    let impostor = Source {
        namespace: "default".into(),
        name: "impostor".into(),
        ip: Some("127.0.0.9".parse().unwrap()),
    };
    let exported = ServiceList::parse("services: [{name: web, ports: [{port: 80}]}]").unwrap();
    let registration = Registration::new(impostor, &exported, "cluster-a");
    let mut sender = sender.ready().await.unwrap();
    let request = http::Request::builder()
        .method(http::Method::PUT)
        .uri(format!("http://router{REGISTRATION_PATH}"))
        .header(VERSION_HEADER, VERSION.to_string())
        .body(())
        .unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    body.send_data(Bytes::from(registration.to_json()), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), http::StatusCode::FORBIDDEN);
    let mut answer = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = answer.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("connected from 127.0.0.1 registers only 127.0.0.1, not 127.0.0.9"),
        "{text}"
    );
    assert_eq!(router.registry_len(), 0, "nothing registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_connections_from_outside_the_allowed_addresses_are_cut_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let router = router_with_tcp(dir.path(), "10.244.1.0/24").await;
    let addr = router.sidecar_addr().unwrap();
    for _ in 0..3 {
        assert!(
            cut_at_once(addr).await,
            "a connection from 127.0.0.1 was kept"
        );
    }
    let metrics = http_get(router.admin_addr(), "/metrics").await;
    let line = "servicekeel_router_sidecar_refusals_total 3";
    assert!(metrics.contains(line), "{line} missing from\n{metrics}");
}
