//! Two nodes, each its own network namespace with its own address, joined by a bridge; on
//! each a real router process, linked by mutual TLS, and real sidecar processes. An
//! application on node A reaches, by DNS name, a service whose endpoint is on node A and one
//! whose endpoint is on node B, over TCP and UDP; the router on A is killed with SIGKILL
//! under load and comes back from its snapshot (there is no API server), and the sidecars
//! reconnect by themselves. With a third node, a node's link is cut and restored under load.
//!
//! Needs root (network namespaces) and iproute2, as the CI machine has.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use servicekeel_api::podinfo::format_annotations;
use support::netns::{Net, Node, NodeRuntime, Process};
use support::pki::{Ca, Validity, assert_metrics_reach, matrix_refusals, try_as_peer};
use support::{echo_through, pattern, resolve, tcp_echo_on, tcp_echo_server, udp_echo_on};
use tokio::net::UdpSocket;

const PROXY: &str = env!("CARGO_BIN_EXE_servicekeel-proxy");
const PATIENCE: Duration = Duration::from_secs(20);
const PEER_PORT: u16 = 15008;
const ADMIN_PORT: u16 = 15022;

struct Place {
    node: Node,
    runtime: NodeRuntime,
    dir: PathBuf,
}

/// The router of `place`, node `name` of `cluster`, with the peers file `peers`.
fn start_router(place: &Place, name: &str, cluster: &str, peers: &str) -> Process {
    let dir = &place.dir;
    std::fs::write(dir.join("peers.yaml"), peers).unwrap();
    let args = [
        "router".to_string(),
        format!("--socket={}", dir.join("router.sock").display()),
        format!("--state-dir={}", dir.join("state").display()),
        format!("--admin-addr={}:{ADMIN_PORT}", place.node.addr),
        format!("--node={name}"),
        format!("--cluster={cluster}"),
        format!("--peer-listen={}:{PEER_PORT}", place.node.addr),
        format!("--tls-cert={}", dir.join("tls.crt").display()),
        format!("--tls-key={}", dir.join("tls.key").display()),
        format!("--tls-ca={}", dir.join("ca.crt").display()),
        format!("--peers={}", dir.join("peers.yaml").display()),
        // No API server in this test: the routers know what registrations and snapshots say.
        "--no-api".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    place
        .node
        .spawn(PROXY, &args, &[], dir.join(format!("router-{}.log", now())))
}

fn now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The client pod's sidecar on `place`: DNS on 127.0.0.2:53, local addresses in 127.0.66.0/24.
fn start_client(place: &Place, cluster: &str, imported: &str) -> Process {
    let imports = [("servicekeel.io/imported-services", imported.to_string())];
    start_sidecar(
        place,
        cluster,
        "client",
        "127.0.0.2:53",
        "127.0.66.0/24",
        15021,
        &imports,
    )
}

/// A server pod's sidecar on `place`, beside the client's: its own DNS and admin ports.
fn start_server(place: &Place, cluster: &str, pod: &str, exported: String) -> Process {
    let exports = [("servicekeel.io/exported-services", exported)];
    start_sidecar(
        place,
        cluster,
        pod,
        "127.0.0.3:53",
        "127.0.67.0/24",
        15031,
        &exports,
    )
}

/// A sidecar process on `place` for a pod of `cluster` with these annotations, its DNS on
/// `dns` and its local addresses in `range`.
fn start_sidecar(
    place: &Place,
    cluster: &str,
    pod: &str,
    dns: &str,
    range: &str,
    admin: u16,
    annotations: &[(&str, String)],
) -> Process {
    let file = place.dir.join(format!("{pod}.annotations"));
    let map = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    std::fs::write(&file, format_annotations(&map)).unwrap();
    let env = [
        ("POD_NAME", pod.to_string()),
        ("POD_NAMESPACE", "default".into()),
        ("POD_IP", place.node.addr.to_string()),
        ("SERVICEKEEL_CLUSTER", cluster.into()),
        ("SIDECAR_UPSTREAM_DNS", "127.0.0.1:9".into()),
        ("SIDECAR_DNS_ADDR", dns.into()),
        ("SIDECAR_IP_RANGE", range.into()),
        ("SIDECAR_ADMIN_ADDR", format!("127.0.0.1:{admin}")),
        (
            "SIDECAR_SERVER_LISTEN",
            format!("unix://{}", place.dir.join("router.sock").display()),
        ),
        ("SIDECAR_ANNOTATIONS_FILE", file.display().to_string()),
    ];
    place.node.spawn(
        PROXY,
        &["sidecar"],
        &env,
        place.dir.join(format!("{pod}.log")),
    )
}

/// Retries a TCP round trip through `addr` until it succeeds or `limit` passes; returns how
/// long it took.
async fn until_through(addr: SocketAddr, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if echo_through(addr, b"ping")
            .await
            .is_ok_and(|b| b == b"ping")
        {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn get(place: &Place, addr: SocketAddr, path: &'static str) -> String {
    place.runtime.run(support::http_get(addr, path)).await
}

/// A node with its own directory and a router certificate of `cluster` issued by `ca`.
fn place(temp: &Path, node: Node, name: &str, ca: &Ca, cluster: &str) -> Place {
    let dir = temp.join(name);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    write_tls(&dir, ca, cluster);
    Place {
        runtime: node.runtime(),
        node,
        dir,
    }
}

fn write_tls(dir: &Path, ca: &Ca, cluster: &str) {
    let (cert, key) = ca.issue(&format!("servicekeel-router.{cluster}"), Validity::Current);
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    std::fs::write(dir.join("ca.crt"), &ca.pem).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_by_name_over_tcp_and_udp_and_a_router_killed_under_load() {
    let temp = tempfile::tempdir().unwrap();
    let mut net = Net::new();
    let ca = Ca::new("cluster-a routers");
    let a = place(temp.path(), net.node("a"), "node-a", &ca, "cluster-a");
    let b = place(temp.path(), net.node("b"), "node-b", &ca, "cluster-a");

    // Servers: on A a TCP echo; on B a TCP and a UDP echo.
    let echo_a = a.runtime.run(tcp_echo_on(a.node.addr)).await;
    let b_addr = b.node.addr;
    let (echo_b, udp_b) = b
        .runtime
        .run(async move { (tcp_echo_on(b_addr).await, udp_echo_on(b_addr).await) })
        .await;

    // A's snapshot holds B's endpoints, as the API server would have told it before it went
    // away; B learns its own from the server pod's registration.
    std::fs::write(
        a.dir.join("state/registry.json"),
        format!(
            r#"{{"format":1,"saved":0,"entries":[
                {{"target":"web.default.cluster-a:80/TCP","addr":"{b_addr}:{}","node":"node-b","ready":true}},
                {{"target":"web.default.cluster-a:53/UDP","addr":"{b_addr}:{}","node":"node-b","ready":true}}]}}"#,
            echo_b.port(),
            udp_b.port()
        ),
    )
    .unwrap();
    let peers = |other: &Place, name: &str| {
        format!("nodes:\n  {name}: [\"{}:{PEER_PORT}\"]\n", other.node.addr)
    };
    let peers_of_a = peers(&b, "node-b");
    let mut router_a = start_router(&a, "node-a", "cluster-a", &peers_of_a);
    let _router_b = start_router(&b, "node-b", "cluster-a", &peers(&a, "node-a"));

    let exported = |port: u16, udp: Option<u16>, name: &str| {
        let mut ports = format!("{{port: 80, targetPort: {port}}}");
        if let Some(udp) = udp {
            ports.push_str(&format!(", {{port: 53, targetPort: {udp}, protocol: UDP}}"));
        }
        format!("services: [{{name: {name}, ports: [{ports}]}}]")
    };
    let _server_b = start_server(
        &b,
        "cluster-a",
        "server-b",
        exported(echo_b.port(), Some(udp_b.port()), "web"),
    );
    let _server_a = start_server(
        &a,
        "cluster-a",
        "server-a",
        exported(echo_a.port(), None, "local-web"),
    );
    let client = start_client(
        &a,
        "cluster-a",
        "services: [{name: web, ports: [{port: 80}, {port: 53, protocol: UDP}]}, {name: local-web, ports: [{port: 80}]}]",
    );

    // By name, through the client's DNS, over TCP to both nodes and UDP to B.
    let dns: SocketAddr = "127.0.0.2:53".parse().unwrap();
    let outcome = a
        .runtime
        .run(async move {
            let ready = until_ready(dns).await;
            let web =
                SocketAddr::from((resolve(dns, "web.default.svc.cluster.local.").await[0], 80));
            let local = SocketAddr::from((resolve(dns, "local-web.").await[0], 80));
            let to_b = until_through(web, PATIENCE).await;
            let to_a = until_through(local, PATIENCE).await;
            let data = pattern(11, 16 << 20);
            let big = echo_through(web, &data).await.map(|b| b == data);
            let mut many = tokio::task::JoinSet::new();
            for i in 0..64u64 {
                many.spawn(async move {
                    let data = pattern(i, 100_000);
                    echo_through(SocketAddr::from((web.ip(), 80)), &data)
                        .await
                        .is_ok_and(|b| b == data)
                });
            }
            let mut all_many = true;
            while let Some(done) = many.join_next().await {
                all_many &= done.unwrap();
            }
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut udp_ok = true;
            let mut buffer = vec![0u8; 65_536];
            for size in [1usize, 1200, 60_000] {
                let datagram = pattern(size as u64, size);
                socket.send_to(&datagram, (web.ip(), 53)).await.unwrap();
                let got = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buffer)).await;
                udp_ok &= matches!(got, Ok(Ok((n, _))) if buffer[..n] == datagram[..]);
            }
            (ready, to_b, to_a, big, all_many, udp_ok)
        })
        .await;
    let (ready, to_b, to_a, big, all_many, udp_ok) = outcome;
    let logs = |client: &Process, router: &Process| {
        format!(
            "client:\n{}\nrouter a:\n{}",
            client.output(),
            router.output()
        )
    };
    assert!(
        ready,
        "client DNS never answered\n{}",
        logs(&client, &router_a)
    );
    assert!(
        to_b.is_some(),
        "node B's endpoint not reached\n{}",
        logs(&client, &router_a)
    );
    assert!(
        to_a.is_some(),
        "node A's endpoint not reached\n{}",
        logs(&client, &router_a)
    );
    assert!(big.unwrap(), "16 MiB to node B differ");
    assert!(all_many, "a concurrent flow failed");
    assert!(udp_ok, "UDP to node B failed");
    let metrics_b = get(&a, (b_addr, ADMIN_PORT).into(), "/metrics").await;
    assert!(
        metrics_b.contains(r#"servicekeel_router_active_flows{protocol="UDP"} 1"#),
        "node B's router carries the UDP flow\n{metrics_b}"
    );

    // SIGKILL the router on A while flows keep coming, then start it again: there is no API
    // server; it routes from its snapshot, and the sidecars reconnect by themselves.
    let web: SocketAddr = a
        .runtime
        .run(async move { SocketAddr::from((resolve(dns, "web.").await[0], 80)) })
        .await;
    let load = a.runtime.handle.spawn(async move {
        let mut ok = 0u32;
        let mut failed = 0u32;
        let stop = Instant::now() + Duration::from_secs(3);
        while Instant::now() < stop {
            match echo_through(web, b"load").await {
                Ok(b) if b == b"load" => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    router_a.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    router_a = start_router(&a, "node-a", "cluster-a", &peers_of_a);
    let admin_a = SocketAddr::from((a.node.addr, ADMIN_PORT));
    let router_ready = a.runtime.run(until_http_ok(admin_a)).await;
    assert!(
        router_ready,
        "the router did not come back\n{}",
        logs(&client, &router_a)
    );
    let back = a.runtime.run(until_through(web, PATIENCE)).await;
    let (ok, failed) = load.await.unwrap();
    let back =
        back.unwrap_or_else(|| panic!("no flow after the restart\n{}", logs(&client, &router_a)));
    println!(
        "router killed and restarted: first new flow through {back:?} after it was ready \
         ({ok} flows ok, {failed} refused while it was down)"
    );
    assert!(ok > 0, "flows went through before the kill");
    let local = a
        .runtime
        .run(async move {
            until_through(
                SocketAddr::from((resolve(dns, "local-web.").await[0], 80)),
                PATIENCE,
            )
            .await
        })
        .await;
    assert!(
        local.is_some(),
        "the server on A registered again\n{}",
        logs(&client, &router_a)
    );
    drop(router_a);
}

/// Waits until `/readyz` at `addr` answers 200.
async fn until_http_ok(addr: SocketAddr) -> bool {
    for _ in 0..(PATIENCE.as_millis() / 20) {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            drop(stream);
            if support::http_get(addr, "/readyz")
                .await
                .starts_with("HTTP/1.1 200")
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits until the DNS server at `dns` answers.
async fn until_ready(dns: SocketAddr) -> bool {
    for _ in 0..(PATIENCE.as_millis() / 50) {
        let message = {
            let mut m = Message::new(1, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(
                Name::from_ascii("web.").unwrap(),
                RecordType::A,
            ));
            m.to_vec().unwrap()
        };
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let _ = socket.send_to(&message, dns).await;
        let mut buffer = [0u8; 512];
        if tokio::time::timeout(Duration::from_millis(50), socket.recv_from(&mut buffer))
            .await
            .is_ok()
        {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_in_cluster_b_reaches_cluster_a_only_through_the_gateways() {
    let temp = tempfile::tempdir().unwrap();
    let mut net = Net::new();
    let (ca_a, ca_b) = (Ca::new("cluster-a routers"), Ca::new("cluster-b routers"));
    let a = place(
        temp.path(),
        net.node("a"),
        "gateway-a",
        &ca_a,
        "cluster-a.local",
    );
    let b = place(temp.path(), net.node("b"), "gateway-b", &ca_b, "cluster-b");
    std::fs::write(a.dir.join("cluster-b.crt"), &ca_b.pem).unwrap();
    std::fs::write(b.dir.join("cluster-a.crt"), &ca_a.pem).unwrap();
    // Each gateway trusts the other cluster's CA bundle only for that cluster.
    let peers_of_a = format!(
        "clusters:\n  cluster-b:\n    gateways: [\"{}:{PEER_PORT}\"]\n    trustBundle: {}\n",
        b.node.addr,
        a.dir.join("cluster-b.crt").display()
    );
    let peers_of_b = format!(
        "clusters:\n  cluster-a.local:\n    gateways: [\"{}:{PEER_PORT}\"]\n    trustBundle: {}\n",
        a.node.addr,
        b.dir.join("cluster-a.crt").display()
    );
    let _router_a = start_router(&a, "gateway-a", "cluster-a.local", &peers_of_a);
    let router_b = start_router(&b, "gateway-b", "cluster-b", &peers_of_b);

    // The design example: simple-server in cluster-a.local, a client in cluster-b importing it.
    let a_addr = a.node.addr;
    let echo = a.runtime.run(tcp_echo_on(a_addr)).await;
    let _server = start_server(
        &a,
        "cluster-a.local",
        "simple-server-0",
        format!(
            "services: [{{name: simple-server, ports: [{{name: tcp, port: 8080, targetport: {}}}]}}]",
            echo.port()
        ),
    );
    let client = start_client(
        &b,
        "cluster-b",
        "services:\n  - cluster: cluster-a.local\n    name: simple-server\n    namespace: default\n    ports:\n      - {name: tcp, port: 8080, protocol: TCP, targetport: 8080}\n",
    );
    let dns: SocketAddr = "127.0.0.2:53".parse().unwrap();
    let (ready, through) = b
        .runtime
        .run(async move {
            let ready = until_ready(dns).await;
            let ip = resolve(dns, "simple-server.default.cluster-a.local.").await;
            let through = match ip.first() {
                Some(ip) => until_through(SocketAddr::from((*ip, 8080)), PATIENCE).await,
                None => None,
            };
            (ready, through)
        })
        .await;
    assert!(ready, "client DNS never answered\n{}", client.output());
    assert!(
        through.is_some(),
        "cluster-a's simple-server not reached from cluster-b\nclient:\n{}\nrouter b:\n{}",
        client.output(),
        router_b.output()
    );
    let metrics_a = get(&b, (a_addr, ADMIN_PORT).into(), "/metrics").await;
    assert!(
        metrics_a.contains(r#"servicekeel_router_flows_total{protocol="TCP",outcome="completed"}"#),
        "cluster-a's gateway delivered it\n{metrics_a}"
    );

    // From cluster-b's node, would-be peers of cluster-a's gateway without the right
    // certificate get nothing; the genuine cluster-b identity does.
    let rogue = Ca::new("nobody we know");
    let attempts = [
        (
            "cluster-b's own identity",
            Some(ca_b.issue("servicekeel-router.cluster-b", Validity::Current)),
            true,
        ),
        (
            "unknown CA",
            Some(rogue.issue("servicekeel-router.cluster-b", Validity::Current)),
            false,
        ),
        (
            "expired",
            Some(ca_b.issue("servicekeel-router.cluster-b", Validity::Expired)),
            false,
        ),
        (
            "not yet valid",
            Some(ca_b.issue("servicekeel-router.cluster-b", Validity::NotYetValid)),
            false,
        ),
        (
            "wrong identity",
            Some(ca_b.issue("simple-server.default.svc", Validity::Current)),
            false,
        ),
        (
            "cluster-b's CA claiming cluster-a",
            Some(ca_b.issue("servicekeel-router.cluster-a.local", Validity::Current)),
            false,
        ),
        ("no certificate", None, false),
    ];
    let gateway_a = SocketAddr::from((a_addr, PEER_PORT));
    for (what, identity, expected) in attempts {
        let ca_pem = ca_a.pem.clone();
        let got = b
            .runtime
            .run(async move {
                try_as_peer(
                    gateway_a,
                    "cluster-a.local",
                    "simple-server.default.cluster-a.local:8080",
                    &ca_pem,
                    identity,
                )
                .await
            })
            .await;
        assert_eq!(got, expected, "{what}");
    }
    let plain = b
        .runtime
        .run(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(gateway_a).await.unwrap();
            stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
            rest
        })
        .await;
    assert!(
        !plain.starts_with(b"\x00\x00"),
        "no HTTP/2 frames for plaintext"
    );
    assert_metrics_reach(
        || get(&b, (a_addr, ADMIN_PORT).into(), "/metrics"),
        &matrix_refusals(1),
    )
    .await;
}

/// Router A's count of linked peers, from its metrics.
async fn peers_up(place: &Place) -> Option<u32> {
    let metrics = get(place, (place.node.addr, ADMIN_PORT).into(), "/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("servicekeel_router_peers_up "))
        .and_then(|n| n.trim().parse().ok())
}

/// Polls `place`'s router until it counts `wanted` linked peers or `limit` passes; how long.
async fn until_peers_up(place: &Place, wanted: u32, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if peers_up(place).await == Some(wanted) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One flow of the load: when it began, how long it took, whether its bytes came back.
struct Flow {
    began: Instant,
    took: Duration,
    ok: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_noticed_flows_go_to_the_other_node_and_it_comes_back() {
    let temp = tempfile::tempdir().unwrap();
    let mut net = Net::new();
    let ca = Ca::new("cluster-a routers");
    let a = place(temp.path(), net.node("a"), "node-a", &ca, "cluster-a");
    let b = place(temp.path(), net.node("b"), "node-b", &ca, "cluster-a");
    let c = place(temp.path(), net.node("c"), "node-c", &ca, "cluster-a");
    let (b_addr, c_addr) = (b.node.addr, c.node.addr);
    let echo_b = b.runtime.run(tcp_echo_server(b_addr)).await;
    let echo_c = c.runtime.run(tcp_echo_server(c_addr)).await;

    // `web` has an endpoint on B and one on C; A knows both from its snapshot.
    let entry = |addr: SocketAddr, node: &str| {
        format!(
            r#"{{"target":"web.default.cluster-a:80/TCP","addr":"{addr}","node":"{node}","ready":true}}"#
        )
    };
    std::fs::write(
        a.dir.join("state/registry.json"),
        format!(
            r#"{{"format":1,"saved":0,"entries":[{},{}]}}"#,
            entry(echo_b.addr, "node-b"),
            entry(echo_c.addr, "node-c")
        ),
    )
    .unwrap();
    let peer =
        |other: &Place, name: &str| format!("  {name}: [\"{}:{PEER_PORT}\"]\n", other.node.addr);
    let router_a = start_router(
        &a,
        "node-a",
        "cluster-a",
        &format!("nodes:\n{}{}", peer(&b, "node-b"), peer(&c, "node-c")),
    );
    let to_a = format!("nodes:\n{}", peer(&a, "node-a"));
    let _router_b = start_router(&b, "node-b", "cluster-a", &to_a);
    let _router_c = start_router(&c, "node-c", "cluster-a", &to_a);
    let exported =
        |port: u16| format!("services: [{{name: web, ports: [{{port: 80, targetPort: {port}}}]}}]");
    let _server_b = start_server(&b, "cluster-a", "server-b", exported(echo_b.addr.port()));
    let _server_c = start_server(&c, "cluster-a", "server-c", exported(echo_c.addr.port()));
    let client = start_client(
        &a,
        "cluster-a",
        "services: [{name: web, ports: [{port: 80}]}]",
    );
    let dns: SocketAddr = "127.0.0.2:53".parse().unwrap();
    let web = a
        .runtime
        .run(async move {
            assert!(until_ready(dns).await, "client DNS never answered");
            let web = SocketAddr::from((resolve(dns, "web.").await[0], 80));
            (until_through(web, PATIENCE).await.is_some()).then_some(web)
        })
        .await
        .unwrap_or_else(|| panic!("web not reached\n{}", router_a.output()));
    assert!(
        until_peers_up(&a, 2, PATIENCE).await.is_some(),
        "A links to B and C\n{}",
        router_a.output()
    );

    // Flows one after another, each given 20 s, until told to stop.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let load = a.runtime.handle.spawn(async move {
        let mut flows = Vec::new();
        while !*stopped.borrow_and_update() {
            let began = Instant::now();
            let data = pattern(flows.len() as u64, 1000);
            let ok = tokio::time::timeout(PATIENCE, echo_through(web, &data))
                .await
                .is_ok_and(|r| r.is_ok_and(|b| b == data));
            flows.push(Flow {
                began,
                took: began.elapsed(),
                ok,
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flows
    });
    let accepted =
        |echo: &support::EchoServer| echo.accepted.load(std::sync::atomic::Ordering::SeqCst);
    // Both nodes serve while linked (B once its server pod has registered with B's router).
    let both = Instant::now();
    while accepted(&echo_b) == 0 || accepted(&echo_c) == 0 {
        assert!(
            both.elapsed() < PATIENCE,
            "B and C did not both serve while linked\n{}",
            router_a.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Cut B off. A's router must notice, and flows go to C.
    net.set_link(&b.node, false);
    let cut = Instant::now();
    let noticed = until_peers_up(&a, 1, PATIENCE).await;
    let noticed =
        noticed.unwrap_or_else(|| panic!("the cut went unnoticed\n{}", router_a.output()));
    let during = accepted(&echo_c);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let served_by_c = accepted(&echo_c) - during;

    // Give B its link back: A links to it again, and B serves again.
    let b_before = accepted(&echo_b);
    net.set_link(&b.node, true);
    let restored = Instant::now();
    let relinked = until_peers_up(&a, 2, PATIENCE).await;
    let mut back = None;
    while restored.elapsed() < PATIENCE {
        if accepted(&echo_b) > b_before {
            back = Some(restored.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.send(true).unwrap();
    let flows = load.await.unwrap();

    let after_cut: Vec<&Flow> = flows.iter().filter(|f| f.began >= cut).collect();
    let failed_after_cut = after_cut.iter().filter(|f| !f.ok).count();
    let slowest = after_cut.iter().map(|f| f.took).max().unwrap_or_default();
    let in_flight_at_cut = flows.iter().filter(|f| f.began < cut && !f.ok).count();
    println!(
        "link cut: noticed after {noticed:?}; {} flows after the cut, {failed_after_cut} failed, \
         slowest {slowest:?} ({served_by_c} served by C in the 3 s after it was noticed); link \
         back after {relinked:?}, B serving again after {back:?}; {in_flight_at_cut} flow in \
         flight at the cut failed",
        after_cut.len()
    );
    assert!(
        noticed <= Duration::from_secs(5),
        "noticed within 5 s: {noticed:?}"
    );
    assert_eq!(
        failed_after_cut,
        0,
        "no flow begun after the cut is lost\n{}",
        router_a.output()
    );
    assert!(served_by_c > 0, "C carries the flows meanwhile");
    assert!(in_flight_at_cut <= 1, "flows are one at a time");
    let back = back.unwrap_or_else(|| panic!("B never served again\n{}", router_a.output()));
    assert!(
        back <= Duration::from_secs(10),
        "B serves again within 10 s of its link's return: {back:?}"
    );
    drop(client);
}
