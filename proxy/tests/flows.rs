//! Flows through a sidecar in-process: applications connect to the local addresses of their
//! imports, the sidecar carries each TCP connection and UDP client through the tunnel to a
//! stand-in for the router's side of the protocol, which dials echo servers. Each test has its
//! own loopback range, annotations file and router socket.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use servicekeel_api::Protocol;
use servicekeel_proxy::sidecar::Sidecar;
use support::{
    Pod, RouterState, TestRouter, cut_at_once, datagrams_of_every_size, echo_through, echoes_again,
    http_get, metrics_eventually, pattern, tcp_echo, udp_echo, udp_round_trip,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const IMPORTED: &str = "servicekeel.io/imported-services";

/// Longest any single step may take before the test calls it hung.
const PATIENCE: Duration = Duration::from_secs(20);

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
}

/// A sidecar in its own range `127.0.<octet>.0/24` importing `echo` on port 7000 with
/// `protocol`, `env` added to its environment, and a router that sends `echo` to an echo server
/// of that protocol. Returns the router, the sidecar and the local address of `echo`.
async fn echo_pod(
    octet: u8,
    protocol: Protocol,
    env: &[(&str, &str)],
) -> (Pod, TestRouter, Sidecar, SocketAddr) {
    let mut pod = Pod::new(
        &format!("127.0.{octet}.0/24"),
        &format!("services: [{{name: echo, ports: [{{port: 7000, protocol: {protocol}}}]}}]"),
        None,
    );
    for (key, value) in env {
        pod.set(key, value);
    }
    let router = TestRouter::start(&pod.socket(), Arc::new(RouterState::default())).await;
    let echo = match protocol {
        Protocol::Tcp => tcp_echo().await,
        Protocol::Udp => udp_echo().await,
    };
    router.route("echo.default.cluster-a:7000", protocol, echo);
    let sidecar = pod.start().await;
    (pod, router, sidecar, addr(&format!("127.0.{octet}.1:7000")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_flows_are_byte_exact_with_half_close_and_large_transfers() {
    let (_pod, router, sidecar, local) = echo_pod(70, Protocol::Tcp, &[]).await;

    // 32 MiB one way while the echo streams it back: both directions at once, then the
    // client's FIN reaches the server through the tunnel and the server's FIN comes back.
    let data = pattern(1, 32 << 20);
    let back = within("large transfer", echo_through(local, &data))
        .await
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes differ");

    // Half-close proper: the client stops sending, then still receives.
    let mut stream = TcpStream::connect(local).await.unwrap();
    stream.write_all(b"first half").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    within("half-closed read", stream.read_to_end(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, b"first half");

    // An empty connection is a flow too.
    assert_eq!(echo_through(local, b"").await.unwrap(), b"");

    // Counted once the sidecar has seen both ends close, which may be just after the client
    // read its echo.
    let sent = format!(
        r#"servicekeel_sidecar_flow_bytes_total{{protocol="TCP",direction="sent"}} {}"#,
        data.len() + 10
    );
    let received = format!(
        r#"servicekeel_sidecar_flow_bytes_total{{protocol="TCP",direction="received"}} {}"#,
        data.len() + 10
    );
    metrics_eventually(
        sidecar.admin_addr(),
        &[
            r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="completed"} 3"#,
            r#"servicekeel_sidecar_active_flows{protocol="TCP"} 0"#,
            &sent,
            &received,
        ],
    )
    .await;
    let sources = router.state.sources.lock().unwrap().clone();
    assert_eq!(sources[0], "default/client-0@10.244.1.7");
    sidecar.shutdown().await;
}

// The router here does not take handoffs: each client gets a socket of its own, carried in the
// tunnel (below, with handoffs off, the listener's queue carries it instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_keep_datagram_boundaries_per_client() {
    udp_boundaries_per_client(71, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_through_the_listeners_queue_keep_datagram_boundaries_per_client() {
    udp_boundaries_per_client(109, &[("SIDECAR_UDP_HANDOFF", "false")]).await;
}

async fn udp_boundaries_per_client(octet: u8, env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("SIDECAR_UDP_IDLE_TIMEOUT", "300ms"));
    let (_pod, router, sidecar, local) = echo_pod(octet, Protocol::Udp, &env).await;

    let datagrams = datagrams_of_every_size();
    let sizes: Vec<usize> = datagrams.iter().map(Vec::len).collect();
    let first = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let second = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&first, local, &datagrams).await;
    udp_round_trip(&second, local, &datagrams[..3]).await;
    assert_eq!(
        router.state.flows_opened.load(Ordering::SeqCst),
        2,
        "one flow per client address"
    );

    // After the idle timeout the flows end; the next datagram opens a new one.
    assert!(no_flows_open(&sidecar).await, "idle UDP flows end");
    udp_round_trip(&first, local, &datagrams[1..2]).await;
    assert_eq!(router.state.flows_opened.load(Ordering::SeqCst), 3);

    let metrics = http_get(sidecar.admin_addr(), "/metrics").await;
    assert!(
        metrics
            .contains(r#"servicekeel_sidecar_flows_total{protocol="UDP",outcome="completed"} 2"#),
        "{metrics}"
    );
    let sent: usize = sizes.iter().sum::<usize>() + 1 + 512 + 1;
    assert!(
        metrics.contains(&format!(
            r#"servicekeel_sidecar_flow_bytes_total{{protocol="UDP",direction="received"}} {sent}"#
        )),
        "{metrics}"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_flows() {
    let pod = Pod::new(
        "127.0.72.0/24",
        "services: [{name: echo, ports: [{port: 7000}, {port: 7001, protocol: UDP}]}]",
        None,
    );
    let router = TestRouter::start(&pod.socket(), Arc::new(RouterState::default())).await;
    router.route(
        "echo.default.cluster-a:7000",
        Protocol::Tcp,
        tcp_echo().await,
    );
    router.route(
        "echo.default.cluster-a:7001",
        Protocol::Udp,
        udp_echo().await,
    );
    let sidecar = pod.start().await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        tasks.spawn(async move {
            let data = pattern(i, 64 * 1024 + i as usize);
            let back = echo_through(addr("127.0.72.1:7000"), &data).await.unwrap();
            assert!(back == data, "flow {i} differs");
        });
    }
    for i in 0..50u64 {
        tasks.spawn(async move {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let datagrams: Vec<Vec<u8>> = (0..5).map(|j| pattern(i * 10 + j, 700)).collect();
            udp_round_trip(&socket, addr("127.0.72.1:7001"), &datagrams).await;
        });
    }
    within("all flows", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert_eq!(router.state.flows_opened.load(Ordering::SeqCst), 250);
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_a_missing_router_reset_the_application_at_once() {
    let pod = Pod::new(
        "127.0.73.0/24",
        "services: [{name: nobody, ports: [{port: 7000}]}]",
        None,
    );
    let sidecar = pod.start().await;
    let local = addr("127.0.73.1:7000");

    // No router: the connection is accepted, then reset; nothing hangs.
    let error = within("no router", echo_through(local, b"hello")).await;
    assert!(error.is_err(), "{error:?}");

    // A router with no endpoint for it refuses; the application sees a reset.
    let router = TestRouter::start(&pod.socket(), Arc::new(RouterState::default())).await;
    assert!(sidecar.wait_router(PATIENCE).await);
    let error = within("refused", echo_through(local, b"hello")).await;
    assert_eq!(
        error.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );

    // An endpoint that is not listening: the router's dial fails, same for the application.
    let closed = TcpStream::connect(tcp_echo().await)
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    router.route("nobody.default.cluster-a:7000", Protocol::Tcp, closed);
    assert!(
        within("dial failed", echo_through(local, b"hello"))
            .await
            .is_err()
    );

    let metrics = http_get(sidecar.admin_addr(), "/metrics").await;
    for line in [
        r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="unavailable"} 1"#,
        r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="refused"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_restarting_mid_run_breaks_only_the_flows_it_carried() {
    let pod = Pod::new(
        "127.0.74.0/24",
        "services: [{name: echo, ports: [{port: 7000}]}]",
        Some("services: [{name: web, ports: [{port: 80, targetPort: 8080}]}]"),
    );
    let state = Arc::new(RouterState::default());
    let echo = tcp_echo().await;
    let router = TestRouter::start(&pod.socket(), state.clone()).await;
    router.route("echo.default.cluster-a:7000", Protocol::Tcp, echo);
    let sidecar = pod.start().await;
    let local = addr("127.0.74.1:7000");
    assert_eq!(echo_through(local, b"before").await.unwrap(), b"before");

    // A flow is open when the router dies: the application sees its connection broken.
    let mut live = TcpStream::connect(local).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    live.read_exact(&mut four).await.unwrap();
    router.crash().await;
    let mut rest = Vec::new();
    let ended = within("broken flow", live.read_to_end(&mut rest)).await;
    assert!(ended.is_err() || rest.is_empty(), "the live flow ends");
    assert!(echo_through(local, b"while down").await.is_err());

    // Back on the same socket, knowing nothing: the sidecar reconnects by itself and
    // registers again.
    let state = Arc::new(RouterState::default());
    let router = TestRouter::start(&pod.socket(), state.clone()).await;
    router.route("echo.default.cluster-a:7000", Protocol::Tcp, echo);
    assert!(sidecar.wait_router(PATIENCE).await, "reconnected");
    assert_eq!(echo_through(local, b"after").await.unwrap(), b"after");
    let mut registrations = state.registrations.subscribe();
    let registered = within(
        "registration after restart",
        registrations.wait_for(|all| all.len() == 1),
    )
    .await
    .unwrap()
    .values()
    .next()
    .cloned()
    .unwrap();
    assert_eq!(registered.endpoints().len(), 1);
    drop(router);
    sidecar.shutdown().await;
}

/// Waits until the sidecar has no open flow.
async fn no_flows_open(sidecar: &Sidecar) -> bool {
    for _ in 0..500 {
        if sidecar.open_flows() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Waits until a connection to `addr` is refused: the listener there has closed.
async fn refused(addr: SocketAddr) -> bool {
    for _ in 0..500 {
        match TcpStream::connect(addr).await {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotations_change_keeps_live_flows_and_their_address() {
    let mut pod = Pod::new(
        "127.0.75.0/24",
        "services: [{name: a, ports: [{port: 7000}]}]",
        Some("services: [{name: web, ports: [{port: 80}]}]"),
    );
    let state = Arc::new(RouterState::default());
    let router = TestRouter::start(&pod.socket(), state.clone()).await;
    let echo = tcp_echo().await;
    for name in ["a", "b", "c"] {
        router.route(
            &format!("{name}.default.cluster-a:7000"),
            Protocol::Tcp,
            echo,
        );
    }
    let sidecar = pod.start().await;
    let mut registrations = state.registrations.subscribe();
    let first = within(
        "first registration",
        registrations.wait_for(|r| !r.is_empty()),
    )
    .await
    .unwrap()
    .values()
    .next()
    .cloned()
    .unwrap();
    assert_eq!(
        first.endpoints()[0].target.to_string(),
        "web.default.cluster-a:80/TCP"
    );

    // A flow to `a` is live...
    let mut live = TcpStream::connect("127.0.75.1:7000").await.unwrap();
    let data = pattern(7, 1 << 20);
    live.write_all(&data[..1000]).await.unwrap();
    let mut echoed = vec![0u8; 1000];
    live.read_exact(&mut echoed).await.unwrap();

    // ...when the pod stops importing `a`, imports `b` and exports something else.
    pod.annotate(IMPORTED, "services: [{name: b, ports: [{port: 7000}]}]");
    pod.annotate(
        "servicekeel.io/exported-services",
        "services: [{name: api, ports: [{port: 8443, targetPort: 443}]}]",
    );
    sidecar.reload_now();

    // `b` does not get `a`'s address while the flow to it is open.
    assert_eq!(
        echo_through(addr("127.0.75.2:7000"), b"to b")
            .await
            .unwrap(),
        b"to b"
    );
    assert!(
        refused(addr("127.0.75.1:7000")).await,
        "a's listener closed"
    );
    let updated = within(
        "updated registration",
        registrations.wait_for(|r| {
            r.values()
                .any(|reg| reg.endpoints().iter().any(|e| e.target.port == 8443))
        }),
    )
    .await
    .unwrap()
    .clone();
    assert_eq!(
        updated.len(),
        1,
        "one registration per connection, replaced"
    );

    // The live flow carries on to the end, byte for byte.
    live.write_all(&data[1000..]).await.unwrap();
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("live flow", live.read_to_end(&mut rest))
        .await
        .unwrap();
    echoed.extend(rest);
    assert!(echoed == data, "the live flow's bytes differ");

    // With it closed, the address is free for the next new import.
    assert!(no_flows_open(&sidecar).await);
    pod.annotate(
        IMPORTED,
        "services: [{name: b, ports: [{port: 7000}]}, {name: c, ports: [{port: 7000}]}]",
    );
    sidecar.reload_now();
    assert_eq!(
        echo_through(addr("127.0.75.1:7000"), b"to c")
            .await
            .unwrap(),
        b"to c"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_lets_open_flows_finish() {
    let (_pod, _router, sidecar, local) =
        echo_pod(76, Protocol::Tcp, &[("SIDECAR_DRAIN_TIMEOUT", "20s")]).await;
    let admin = sidecar.admin_addr();

    let mut live = TcpStream::connect(local).await.unwrap();
    live.write_all(b"one").await.unwrap();
    let mut three = [0u8; 3];
    live.read_exact(&mut three).await.unwrap();

    let shutdown = tokio::spawn(sidecar.shutdown());
    assert!(refused(local).await, "no new connections once draining");
    let ready = http_get(admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(!shutdown.is_finished(), "waits for the open flow");

    live.write_all(b"two").await.unwrap();
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"two");
    assert_eq!(within("drain", shutdown).await.unwrap(), 0, "nothing cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_flows_still_open_at_the_deadline() {
    let (_pod, _router, sidecar, local) =
        echo_pod(77, Protocol::Tcp, &[("SIDECAR_DRAIN_TIMEOUT", "200ms")]).await;
    let mut live = TcpStream::connect(local).await.unwrap();
    live.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    live.read_exact(&mut one).await.unwrap();
    assert_eq!(within("drain", sidecar.shutdown()).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_flow_limit_the_sidecar_resets_new_connections_and_counts_them() {
    let (_pod, _router, sidecar, local) =
        echo_pod(78, Protocol::Tcp, &[("SIDECAR_MAX_FLOWS", "2")]).await;
    // Two connections held open, each proven live by a round trip.
    let mut held = Vec::new();
    for n in 0..2u8 {
        let mut stream = TcpStream::connect(local).await.unwrap();
        stream.write_all(&[n; 3]).await.unwrap();
        let mut back = [0u8; 3];
        within("a held connection", stream.read_exact(&mut back))
            .await
            .unwrap();
        assert_eq!(back, [n; 3]);
        held.push(stream);
    }
    // The third is cut at once, and counted as refused for the limit.
    assert!(cut_at_once(local).await, "a third flow was carried");
    let metrics = http_get(sidecar.admin_addr(), "/metrics").await;
    let line = r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="limit"} 1"#;
    assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    // The held ones still work; once one closes, a new connection is carried again.
    held[0].write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    held[0].read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still");
    drop(held.pop());
    assert!(
        echoes_again(local).await,
        "no flow carried after one closed"
    );
    drop(held);
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_client_limit_a_udp_listener_drops_new_clients_datagrams_and_counts_them() {
    let (_pod, _router, sidecar, local) =
        echo_pod(79, Protocol::Udp, &[("SIDECAR_UDP_MAX_CLIENTS", "2")]).await;
    // Two clients, each a flow of its own, proven by a round trip.
    let mut clients = Vec::new();
    for n in 0..2u8 {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp_round_trip(&socket, local, &[vec![n; 16]]).await;
        clients.push(socket);
    }
    // A third client's datagrams are dropped, not carried, and counted.
    let third = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buffer = [0u8; 64];
    for _ in 0..3 {
        third.send_to(b"third", local).await.unwrap();
    }
    let answered = tokio::time::timeout(Duration::from_millis(500), third.recv_from(&mut buffer));
    assert!(answered.await.is_err(), "a third client was carried");
    let metrics = http_get(sidecar.admin_addr(), "/metrics").await;
    let line = r#"servicekeel_sidecar_udp_datagrams_dropped_total{reason="flow_limit"} 3"#;
    assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    // The two carry on.
    for (n, socket) in clients.iter().enumerate() {
        udp_round_trip(socket, local, &[vec![n as u8 + 10; 32]]).await;
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_handoffs_gets_the_connections_in_tunnel_flows() {
    // TestRouter speaks the tunnel only: the sidecar's handoff preface finds no answer.
    let (_pod, _router, sidecar, local) = echo_pod(79, Protocol::Tcp, &[]).await;
    for _ in 0..3 {
        assert_eq!(echo_through(local, b"hello").await.unwrap(), b"hello");
    }
    // The sidecar counts a flow once it has seen both ends close, which may be just after the
    // client read its echo.
    let line = r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="completed"} 3"#;
    metrics_eventually(sidecar.admin_addr(), &[line]).await;
}
