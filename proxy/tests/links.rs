//! Routers linked by mutual TLS, in-process on loopback: an endpoint on another node is reached
//! through that node's router; a client of cluster-b reaches a service of cluster-a through the
//! gateways; and would-be peers that are plaintext, from an unknown CA, expired, or carry the
//! wrong identity are refused, counted, and get nothing delivered.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use servicekeel_api::tunnel::router_identity;
use servicekeel_proxy::links::Trust;
use servicekeel_proxy::router::peers::{Cluster, Peers};
use servicekeel_proxy::router::{Api, LinksConfig, Router, RouterConfig};
use support::pki::{Ca, Validity, assert_metrics_reach, matrix_refusals};
use support::{closed_within, echo_through, http_get, metrics_eventually, pod_behind, tcp_echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATIENCE: Duration = Duration::from_secs(20);

/// Writes a router's TLS files for `identity` issued by `ca` and returns the links config.
fn links(dir: &Path, ca: &Ca, identity: &str, peers: Peers) -> LinksConfig {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = ca.issue(identity, Validity::Current);
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    std::fs::write(dir.join("ca.crt"), &ca.pem).unwrap();
    LinksConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        certificate: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: dir.join("ca.crt"),
        peers,
        threads: 2,
    }
}

fn router_config(dir: &Path, node: &str, cluster: &str, links: LinksConfig) -> RouterConfig {
    RouterConfig {
        socket: dir.join("router.sock"),
        socket_mode: 0o660,
        socket_owner: None,
        state_dir: dir.join("state"),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        node: node.into(),
        cluster: cluster.into(),
        links: Some(links),
        api: Api::Off,
        drain_timeout: std::time::Duration::from_secs(20),
        busy_poll: std::time::Duration::from_micros(50),
        local_congestion: None,
        cpus: 2,
        max_flows: servicekeel_api::defaults::ROUTER_MAX_FLOWS,
        sidecar_tcp: None,
    }
}

fn write_pem(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_owned()
}

#[test]
fn every_link_to_a_cluster_shares_one_client_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (home, away) = (Ca::new("home"), Ca::new("away"));
    let config = links(
        dir.path(),
        &home,
        &router_identity("home"),
        Peers::default(),
    );
    let away_bundle = write_pem(&dir.path().join("away.crt"), &away.pem);
    let trust = Trust::load(
        "home",
        &config.certificate,
        &config.key,
        &config.ca,
        &BTreeMap::from([("away".to_string(), away_bundle)]),
    )
    .unwrap();
    let dialling = |cluster: &str| trust.client_config(cluster).unwrap();
    assert!(
        Arc::ptr_eq(&dialling("home"), &dialling("home")),
        "two nodes of one cluster"
    );
    assert!(
        !Arc::ptr_eq(&dialling("home"), &dialling("away")),
        "another cluster trusts its own bundle"
    );
    assert!(Arc::ptr_eq(&dialling("away"), &dialling("away")));
    let unknown = trust.client_config("elsewhere").unwrap_err();
    assert!(
        unknown
            .to_string()
            .contains("no trust bundle for cluster \"elsewhere\""),
        "{unknown}"
    );
}

async fn wait_peers(router: &Router) {
    for _ in 0..(PATIENCE.as_millis() / 20) {
        if router.peers_up() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("links did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_cluster_b_reaches_a_service_of_cluster_a_through_the_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (Ca::new("cluster-a routers"), Ca::new("cluster-b routers"));
    let bundle_a = write_pem(&dir.path().join("a.pem"), &ca_a.pem);
    let bundle_b = write_pem(&dir.path().join("b.pem"), &ca_b.pem);

    // cluster-a's gateway knows cluster-b only to let its routers in; it has no gateway to
    // dial there, so its peer list names an address nobody listens on.
    let peers_of_a = Peers {
        nodes: BTreeMap::new(),
        clusters: BTreeMap::from([(
            "cluster-b".to_string(),
            Cluster {
                gateways: vec!["127.0.0.1:9".into()],
                trust_bundle: bundle_b,
            },
        )]),
    };
    let a_dir = dir.path().join("a");
    let a = Router::start(router_config(
        &a_dir,
        "a-1",
        "cluster-a.local",
        links(
            &a_dir.join("tls"),
            &ca_a,
            "servicekeel-router.cluster-a.local",
            peers_of_a,
        ),
    ))
    .await
    .unwrap();
    let echo = tcp_echo().await;
    let mut server = pod_behind(
        &a,
        "127.0.90.0/24",
        "services: []",
        Some(&format!(
            "services: [{{name: simple-server, ports: [{{port: 8080, targetPort: {}}}]}}]",
            echo.port()
        )),
    );
    server.set("SERVICEKEEL_CLUSTER", "cluster-a.local");
    let server = server.start().await;

    let peers_of_b = Peers {
        nodes: BTreeMap::new(),
        clusters: BTreeMap::from([(
            "cluster-a.local".to_string(),
            Cluster {
                gateways: vec![a.peer_addr().unwrap().to_string()],
                trust_bundle: bundle_a,
            },
        )]),
    };
    let b_dir = dir.path().join("b");
    let b = Router::start(router_config(
        &b_dir,
        "b-1",
        "cluster-b",
        links(
            &b_dir.join("tls"),
            &ca_b,
            "servicekeel-router.cluster-b",
            peers_of_b,
        ),
    ))
    .await
    .unwrap();
    wait_peers(&b).await;

    // The design example's client, in cluster-b.
    let mut client = pod_behind(
        &b,
        "127.0.91.0/24",
        "services: [{name: simple-server, namespace: default, cluster: cluster-a.local, ports: [{port: 8080}]}]",
        None,
    );
    client.set("SERVICEKEEL_CLUSTER", "cluster-b");
    let client = client.start().await;
    let back = echo_through("127.0.91.1:8080".parse().unwrap(), b"across clusters")
        .await
        .unwrap();
    assert_eq!(back, b"across clusters");

    let metrics_b = http_get(b.admin_addr(), "/metrics").await;
    assert!(
        metrics_b.contains("servicekeel_router_peers_up 1"),
        "{metrics_b}"
    );
    // Cluster-a's gateway delivered it: counted once both ends closed, which may be just
    // after the client read its echo.
    metrics_eventually(
        a.admin_addr(),
        &[r#"servicekeel_router_flows_total{protocol="TCP",outcome="completed"} 1"#],
    )
    .await;
    for sidecar in [client, server] {
        sidecar.shutdown().await;
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_on_another_node_is_reached_through_its_router() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster-a routers");
    let identity = "servicekeel-router.cluster-a";
    let two_dir = dir.path().join("two");
    let two = Router::start(router_config(
        &two_dir,
        "edge-2",
        "cluster-a",
        links(&two_dir.join("tls"), &ca, identity, Peers::default()),
    ))
    .await
    .unwrap();
    let echo = tcp_echo().await;
    let server = pod_behind(
        &two,
        "127.0.92.0/24",
        "services: []",
        Some(&format!(
            "services: [{{name: web, ports: [{{port: 80, targetPort: {}}}]}}]",
            echo.port()
        )),
    )
    .start()
    .await;

    // edge-1 knows of the endpoint on edge-2 from its snapshot (as the API server would tell
    // it) and of edge-2's router from its peers file.
    let one_dir = dir.path().join("one");
    std::fs::create_dir_all(one_dir.join("state")).unwrap();
    std::fs::write(
        one_dir.join("state/registry.json"),
        format!(
            r#"{{"format":1,"saved":0,"entries":[{{"target":"web.default.cluster-a:80/TCP","addr":"127.0.0.1:{}","node":"edge-2","ready":true}}]}}"#,
            echo.port()
        ),
    )
    .unwrap();
    let peers = Peers {
        nodes: BTreeMap::from([(
            "edge-2".to_string(),
            vec![two.peer_addr().unwrap().to_string()],
        )]),
        clusters: BTreeMap::new(),
    };
    let one = Router::start(router_config(
        &one_dir,
        "edge-1",
        "cluster-a",
        links(&one_dir.join("tls"), &ca, identity, peers),
    ))
    .await
    .unwrap();
    wait_peers(&one).await;
    let client = pod_behind(
        &one,
        "127.0.93.0/24",
        "services: [{name: web, ports: [{port: 80}]}]",
        None,
    )
    .start()
    .await;
    assert_eq!(
        echo_through("127.0.93.1:80".parse().unwrap(), b"via edge-2")
            .await
            .unwrap(),
        b"via edge-2"
    );
    // Edge-2's router delivered it: counted once both ends closed.
    metrics_eventually(
        two.admin_addr(),
        &[r#"servicekeel_router_flows_total{protocol="TCP",outcome="completed"} 1"#],
    )
    .await;
    for sidecar in [client, server] {
        sidecar.shutdown().await;
    }
    one.shutdown().await;
    two.shutdown().await;
}

/// [`support::pki::try_as_peer`] against `router`, as a router of cluster-a would.
async fn try_as_peer(router: &Router, server_ca: &str, identity: Option<(String, String)>) -> bool {
    support::pki::try_as_peer(
        router.peer_addr().unwrap(),
        "cluster-a",
        "web.default.cluster-a:80",
        server_ca,
        identity,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn would_be_peers_without_the_right_certificate_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster-a routers");
    let other_cluster_ca = Ca::new("cluster-b routers");
    let rogue = Ca::new("nobody we know");
    let peers = Peers {
        nodes: BTreeMap::new(),
        clusters: BTreeMap::from([(
            "cluster-b".to_string(),
            Cluster {
                gateways: vec!["127.0.0.1:9".into()],
                trust_bundle: write_pem(&dir.path().join("b.pem"), &other_cluster_ca.pem),
            },
        )]),
    };
    // The router's snapshot knows an endpoint, so a flow let through would be delivered.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let echo = tcp_echo().await;
    std::fs::write(
        state.join("registry.json"),
        format!(
            r#"{{"format":1,"saved":0,"entries":[{{"target":"web.default.cluster-a:80/TCP","addr":"{echo}","node":"edge-1","ready":true}}]}}"#
        ),
    )
    .unwrap();
    let router = Router::start(router_config(
        dir.path(),
        "edge-1",
        "cluster-a",
        links(
            &dir.path().join("tls"),
            &ca,
            "servicekeel-router.cluster-a",
            peers,
        ),
    ))
    .await
    .unwrap();

    // A genuine peer gets through: the check below is not vacuous.
    assert!(
        try_as_peer(
            &router,
            &ca.pem,
            Some(ca.issue("servicekeel-router.cluster-a", Validity::Current))
        )
        .await
    );

    // Plaintext: HTTP/2 straight onto the TLS port.
    let mut plain = tokio::net::TcpStream::connect(router.peer_addr().unwrap())
        .await
        .unwrap();
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest).await;
    assert!(!rest.starts_with(b"\x00\x00"), "no HTTP/2 frames came back");

    let refused = [
        (
            "unknown CA",
            Some(rogue.issue("servicekeel-router.cluster-a", Validity::Current)),
        ),
        (
            "expired",
            Some(ca.issue("servicekeel-router.cluster-a", Validity::Expired)),
        ),
        (
            "not yet valid",
            Some(ca.issue("servicekeel-router.cluster-a", Validity::NotYetValid)),
        ),
        (
            "wrong identity",
            Some(ca.issue("web.default.svc", Validity::Current)),
        ),
        (
            "another cluster's CA speaking for this one",
            Some(other_cluster_ca.issue("servicekeel-router.cluster-a", Validity::Current)),
        ),
        ("no certificate", None),
    ];
    // Each case many times over (`SERVICEKEEL_REFUSAL_ATTEMPTS`, 20 by default; RELIABILITY.md
    // gives a run of 1000), eight handshakes at a time: not one may get through.
    let attempts: usize = std::env::var("SERVICEKEEL_REFUSAL_ATTEMPTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    for (what, identity) in refused {
        let mut accepted = 0;
        let mut left = attempts;
        while left > 0 {
            let batch = left.min(8);
            left -= batch;
            let tries = (0..batch).map(|_| try_as_peer(&router, &ca.pem, identity.clone()));
            accepted += futures::future::join_all(tries)
                .await
                .into_iter()
                .filter(|got_through| *got_through)
                .count();
        }
        assert_eq!(accepted, 0, "{what}: {accepted} of {attempts} got through");
    }
    eprintln!("rejection matrix: {attempts} attempts per case, 0 accepted");

    let admin = router.admin_addr();
    assert_metrics_reach(|| http_get(admin, "/metrics"), &matrix_refusals(attempts)).await;
    let metrics = http_get(admin, "/metrics").await;
    // Only the genuine peer's flow reached the endpoint (and ended when that peer left).
    let flows: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("servicekeel_router_flows_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(flows, 1, "{metrics}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_made_by_certs_router_sh_link_routers() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs/router.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .args(["--cluster", "cluster-a", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let secret = String::from_utf8(output.stdout).unwrap();
    assert!(secret.contains("name: servicekeel-router-tls"), "{secret}");
    let links = LinksConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        certificate: certs.join("tls.crt"),
        key: certs.join("tls.key"),
        ca: certs.join("ca.crt"),
        peers: Peers::default(),
        threads: 1,
    };
    let router = Router::start(router_config(dir.path(), "edge-1", "cluster-a", links))
        .await
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(certs.join(name)).unwrap();
    // Another router of the cluster, holding the same certificate, gets in.
    assert!(
        try_as_peer(
            &router,
            &read("ca.crt"),
            Some((read("tls.crt"), read("tls.key")))
        )
        .await
    );
    // A wrong --cluster is refused by the script.
    let bad = std::process::Command::new("bash")
        .arg(&script)
        .args(["--cluster", "Cluster_A"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    router.shutdown().await;
}

/// Writes `bytes` one at a time, half a second apart, over and over, until the other side cuts
/// the connection; how long after `started` that was.
async fn dribble<S: tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &'static [u8],
    started: std::time::Instant,
) -> Duration {
    for byte in bytes.iter().cycle() {
        if stream.write_all(&[*byte]).await.is_err() || stream.flush().await.is_err() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    unreachable!("the cycle never ends")
}

/// Slow-loris on both of a router's doors. On the sidecars' Unix socket and on the peer port,
/// 100 connections each that never begin their handshake and 10 each that dribble it a byte
/// every half second hold nothing for good: the HTTP/2 handshake on the socket and the TLS
/// handshake on the peer port are timed, and a new sidecar and a new peer router are served
/// while all of them hang on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_on_the_socket_and_the_peer_port_are_cut_by_timeouts_while_others_are_served()
{
    use servicekeel_proxy::links::HANDSHAKE_TIMEOUT;
    use servicekeel_proxy::tunnel::server::DIAL_TIMEOUT;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster-a routers");
    let identity = "servicekeel-router.cluster-a";
    let two_dir = dir.path().join("two");
    let two = Router::start(router_config(
        &two_dir,
        "edge-2",
        "cluster-a",
        links(&two_dir.join("tls"), &ca, identity, Peers::default()),
    ))
    .await
    .unwrap();
    let echo = tcp_echo().await;
    let exported = format!(
        "services: [{{name: web, ports: [{{port: 80, targetPort: {}}}]}}]",
        echo.port()
    );
    let server = pod_behind(&two, "127.0.92.0/24", "services: []", Some(&exported))
        .start()
        .await;
    let peer_port = two.peer_addr().unwrap();

    let started = std::time::Instant::now();
    let mut stalled_socket = Vec::new();
    let mut stalled_port = Vec::new();
    for _ in 0..100 {
        stalled_socket.push(tokio::net::UnixStream::connect(two.socket()).await.unwrap());
        stalled_port.push(tokio::net::TcpStream::connect(peer_port).await.unwrap());
    }
    let mut dribblers = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let socket = tokio::net::UnixStream::connect(two.socket()).await.unwrap();
        dribblers.spawn(dribble(
            socket,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            started,
        ));
        let port = tokio::net::TcpStream::connect(peer_port).await.unwrap();
        // The first bytes of a TLS handshake record, as a ClientHello would begin.
        dribblers.spawn(dribble(
            port,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            started,
        ));
    }

    // While they hang on: a new sidecar registers and is served, and a new peer links.
    let client = pod_behind(
        &two,
        "127.0.93.0/24",
        "services: [{name: web, ports: [{port: 80}]}]",
        None,
    )
    .start()
    .await;
    assert_eq!(
        echo_through("127.0.93.1:80".parse().unwrap(), b"served")
            .await
            .unwrap(),
        b"served"
    );
    let one_dir = dir.path().join("one");
    let peers = Peers {
        nodes: BTreeMap::from([("edge-2".to_string(), vec![peer_port.to_string()])]),
        clusters: BTreeMap::new(),
    };
    let one = Router::start(router_config(
        &one_dir,
        "edge-1",
        "cluster-a",
        links(&one_dir.join("tls"), &ca, identity, peers),
    ))
    .await
    .unwrap();
    wait_peers(&one).await;
    let served_after = started.elapsed();
    assert!(
        served_after < DIAL_TIMEOUT.min(HANDSHAKE_TIMEOUT),
        "served while the slow clients were all still connected ({served_after:?})"
    );

    let limit = DIAL_TIMEOUT.max(HANDSHAKE_TIMEOUT) + Duration::from_secs(10);
    for (index, stream) in stalled_socket.iter_mut().enumerate() {
        assert!(
            closed_within(stream, limit).await,
            "stalled socket connection {index} still open after {:?}",
            started.elapsed()
        );
    }
    for (index, stream) in stalled_port.iter_mut().enumerate() {
        assert!(
            closed_within(stream, limit).await,
            "stalled peer connection {index} still open after {:?}",
            started.elapsed()
        );
    }
    while let Some(cut_after) = tokio::time::timeout(limit, dribblers.join_next())
        .await
        .expect("a dribbling client was never cut")
    {
        let cut_after = cut_after.unwrap();
        assert!(
            cut_after >= DIAL_TIMEOUT.min(HANDSHAKE_TIMEOUT) / 2,
            "cut after {cut_after:?}, before any timeout could have fired"
        );
    }
    println!(
        "200 stalled handshakes and 20 dribbling ones cut within {:?}; a new sidecar and a new \
         peer served after {served_after:?}",
        started.elapsed()
    );
    for sidecar in [client, server] {
        sidecar.shutdown().await;
    }
    one.shutdown().await;
    two.shutdown().await;
}

/// The thread a task spawned on `runtime` runs on.
async fn thread_of(runtime: &tokio::runtime::Handle) -> String {
    runtime
        .spawn(async {
            std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_clients_flows_name_its_thread_and_carry_bytes_exactly() {
    use servicekeel_api::Protocol;
    use servicekeel_api::addresses::RouterAddr;
    use servicekeel_api::tunnel::{FlowTarget, Source};
    use servicekeel_proxy::links::LinkThreads;
    use servicekeel_proxy::tunnel::client::Client;
    use support::{RouterState, TestRouter};

    let dir = tempfile::tempdir().unwrap();
    let peer = TestRouter::start(
        &dir.path().join("peer.sock"),
        std::sync::Arc::new(RouterState::default()),
    )
    .await;
    peer.route(
        "echo.default.cluster-a:7000",
        Protocol::Tcp,
        tcp_echo().await,
    );
    let target = FlowTarget::parse("echo.default.cluster-a:7000", "TCP").unwrap();
    let me: Source = "servicekeel-system/edge-1".parse().unwrap();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let connector = || RouterAddr::Unix(peer.path.clone());

    let threads = LinkThreads::start(2).unwrap();
    let _first = Client::start_link(connector(), &me, stopped.clone(), threads.next());
    let link = Client::start_link(connector(), &me, stopped.clone(), threads.next());
    let mut flow = tokio::time::timeout(PATIENCE, link.open(&target))
        .await
        .unwrap()
        .unwrap();
    let home = flow.home().expect("a link's flow names its thread").clone();
    assert_eq!(
        thread_of(&home).await,
        "link-1",
        "the second link, the second thread"
    );

    // What goes in comes back whole, the send side half-closed first.
    let data = support::pattern(7, 4 << 20);
    let (mut reading, mut writing) = tokio::io::split(&mut flow);
    let ((), back) = tokio::join!(
        async {
            writing.write_all(&data).await.unwrap();
            writing.shutdown().await.unwrap();
        },
        async {
            let mut back = Vec::new();
            reading.read_to_end(&mut back).await.unwrap();
            back
        }
    );
    assert!(back == data, "the echo differs from what was sent");

    let plain = Client::start(connector(), &me, stopped);
    let flow = tokio::time::timeout(PATIENCE, plain.open(&target))
        .await
        .unwrap()
        .unwrap();
    assert!(flow.home().is_none(), "a sidecar's flows run where it does");
}
