//! TCP connections handed from the sidecar to the router over its Unix socket (`SCM_RIGHTS`):
//! relayed by the router alone, byte-exact with half-close; refused ones and ones the router
//! drops mid-relay reset; a sidecar told not to hand over carries connections in tunnel flows
//! (and so does one whose router does not take handoffs: `flows.rs`); garbage on a handoff
//! connection is refused and the router serves on. UDP clients handed over the same way, as
//! sockets connected to them: datagram boundaries kept, a burst from a new client delivered
//! whole and in order, a flow ended by its idle time started again by the next datagram, a
//! client whose router died carried again when it asks again.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{ErrorKind, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use servicekeel_api::Protocol;
use servicekeel_api::tunnel::encode_datagram;
use servicekeel_api::tunnel::handoff::{ACCEPTED, MAX_LINE, PREFACE, UDP_PREFACE};
use servicekeel_proxy::router::Router;
use servicekeel_proxy::sidecar::Sidecar;
use support::{
    Pod, RouterState, datagrams_of_every_size, echo_through, http_get, metrics_eventually, pattern,
    pod_behind, router_config, tcp_echo, udp_echo, udp_round_trip,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket, UnixStream};

const PATIENCE: Duration = Duration::from_secs(20);

const IMPORTS: &str = "services: [{name: web, ports: [{port: 80}]}]";

fn exports(tcp: SocketAddr) -> String {
    format!(
        "services: [{{name: web, ports: [{{port: 80, targetPort: {}}}]}}]",
        tcp.port()
    )
}

/// A router with a pod exporting `web` (a TCP echo) registered.
async fn router_with_web(dir: &Path, range: &str) -> (Router, Sidecar) {
    router_with(dir, range, &exports(tcp_echo().await)).await
}

/// A router with a pod exporting `exported` registered.
async fn router_with(dir: &Path, range: &str, exported: &str) -> (Router, Sidecar) {
    let router = Router::start(router_config(dir)).await.unwrap();
    let server = pod_behind(&router, range, "services: []", Some(exported))
        .start()
        .await;
    for _ in 0..(PATIENCE.as_millis() / 10) {
        if router.registry_len() == 1 {
            return (router, server);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server pod did not register");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_handed_to_the_router_and_relayed_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_web(dir.path(), "127.0.90.0/24").await;
    let client = pod_behind(&router, "127.0.91.0/24", IMPORTS, None)
        .start()
        .await;
    let local: SocketAddr = "127.0.91.1:80".parse().unwrap();

    // Both ways at once, then the client's FIN reaches the server and the server's comes back.
    let data = pattern(9, 32 << 20);
    let back = tokio::time::timeout(PATIENCE, echo_through(local, &data))
        .await
        .unwrap()
        .unwrap();
    assert!(back == data, "bytes differ");
    // Half-close: the client stops sending and still receives.
    let mut stream = TcpStream::connect(local).await.unwrap();
    stream.write_all(b"first half").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"first half");
    assert_eq!(echo_through(local, b"").await.unwrap(), b"");

    // The sidecar handed all three over and carried no byte itself; the router relayed them.
    let total = (data.len() + 10).to_string();
    metrics_eventually(
        client.admin_addr(),
        &[r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="handed_off"} 3"#],
    )
    .await;
    let metrics = http_get(client.admin_addr(), "/metrics").await;
    assert!(
        !metrics.contains(r#"outcome="completed""#),
        "the sidecar carried a flow itself:\n{metrics}"
    );
    metrics_eventually(
        router.admin_addr(),
        &[
            r#"servicekeel_router_flows_total{protocol="TCP",outcome="completed"} 3"#,
            r#"servicekeel_router_active_flows{protocol="TCP"} 0"#,
            &format!(
                r#"servicekeel_router_flow_bytes_total{{protocol="TCP",direction="sent"}} {total}"#
            ),
            &format!(
                r#"servicekeel_router_flow_bytes_total{{protocol="TCP",direction="received"}} {total}"#
            ),
        ],
    )
    .await;
    // The relays' busy-polling windows are counted, by kind and outcome.
    let metrics = http_get(router.admin_addr(), "/metrics").await;
    for relay in ["tcp", "udp"] {
        for outcome in ["caught", "missed"] {
            let series = format!(
                r#"servicekeel_router_busy_polls_total{{relay="{relay}",outcome="{outcome}"}} "#
            );
            let counted = metrics
                .lines()
                .find_map(|line| line.strip_prefix(&series))
                .and_then(|n| n.parse::<u64>().ok());
            assert!(counted.is_some(), "no {series}in:\n{metrics}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_over_outlives_the_sidecar_that_accepted_it() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_web(dir.path(), "127.0.92.0/24").await;
    let client = pod_behind(&router, "127.0.93.0/24", IMPORTS, None)
        .start()
        .await;
    let mut stream = TcpStream::connect("127.0.93.1:80").await.unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut reply = [0u8; 6];
    stream.read_exact(&mut reply).await.unwrap();
    client.shutdown().await;
    // The sidecar is gone; the router holds the connection and goes on relaying it.
    stream.write_all(b"after").await.unwrap();
    let mut reply = [0u8; 5];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply, b"after");
}

/// Reads from `stream` until it ends; the error kind if it ended with one.
async fn how_it_ends(mut stream: TcpStream) -> Option<ErrorKind> {
    let mut sink = Vec::new();
    match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut sink))
        .await
        .expect("the connection ended")
    {
        Ok(_) => None,
        Err(error) => Some(error.kind()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_router_cannot_place_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::start(router_config(dir.path())).await.unwrap();
    let client = pod_behind(&router, "127.0.94.0/24", IMPORTS, None)
        .start()
        .await;
    // The reset may come before the connect returns.
    let ending = match TcpStream::connect("127.0.94.1:80").await {
        Ok(stream) => how_it_ends(stream).await,
        Err(error) => Some(error.kind()),
    };
    assert_eq!(
        ending,
        Some(ErrorKind::ConnectionReset),
        "no endpoint: the application sees a reset, not a clean end"
    );
    metrics_eventually(
        client.admin_addr(),
        &[r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="handed_off"} 1"#],
    )
    .await;
}

/// A router serving handoffs on its own runtime, so that dropping the runtime drops every
/// connection it holds at once, as a killed router process does.
struct DoomedRouter {
    runtime: tokio::runtime::Runtime,
    state: Arc<RouterState>,
}

impl DoomedRouter {
    fn start(socket: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(RouterState::default());
        let listener = {
            let _entered = runtime.enter();
            tokio::net::UnixListener::bind(socket).unwrap()
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let handler = state.clone();
        runtime.spawn(async move {
            let _stop = stop;
            let polling = servicekeel_proxy::tunnel::busy_poll::Polling::default();
            servicekeel_proxy::tunnel::server::serve(listener, handler, polling, stopped).await;
        });
        DoomedRouter { runtime, state }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_router_drops_mid_relay_are_reset() {
    let mut pod = Pod::new(
        "127.0.95.0/24",
        "services: [{name: echo, ports: [{port: 7000}]}]",
        None,
    );
    pod.set("POD_IP", "127.0.0.1");
    let router = DoomedRouter::start(&pod.socket());
    let echo = tcp_echo().await;
    router
        .state
        .endpoints
        .lock()
        .unwrap()
        .insert(("echo.default.cluster-a:7000".into(), Protocol::Tcp), echo);
    let _client = pod.start().await;
    let mut stream = TcpStream::connect("127.0.95.1:7000").await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut reply = [0u8; 4];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(router.state.sources.lock().unwrap().len(), 1);
    router.runtime.shutdown_background();
    assert_eq!(
        how_it_ends(stream).await,
        Some(ErrorKind::ConnectionReset),
        "the router died mid-relay: the application sees a reset, not a clean end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_told_not_to_hand_over_carries_connections_in_flows() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_web(dir.path(), "127.0.97.0/24").await;
    let mut pod = pod_behind(&router, "127.0.98.0/24", IMPORTS, None);
    pod.set("SIDECAR_TCP_HANDOFF", "false");
    let client = pod.start().await;
    let data = pattern(4, 1 << 20);
    let back = echo_through("127.0.98.1:80".parse().unwrap(), &data)
        .await
        .unwrap();
    assert!(back == data, "bytes differ");
    metrics_eventually(
        client.admin_addr(),
        &[
            r#"servicekeel_sidecar_flows_total{protocol="TCP",outcome="completed"} 1"#,
            &format!(
                r#"servicekeel_sidecar_flow_bytes_total{{protocol="TCP",direction="sent"}} {}"#,
                data.len()
            ),
        ],
    )
    .await;
}

/// Sends `bytes` on `socket` with `fd` attached.
fn send_with(socket: &UnixStream, bytes: &[u8], fd: impl AsFd) {
    send_with_all(socket, bytes, &[fd.as_fd()]);
}

/// Sends `bytes` on `socket` with `fds` attached.
fn send_with_all(socket: &UnixStream, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(sent, bytes.len());
}

/// A handoff connection to the router at `socket`, past its preface.
async fn handoff_connection(socket: &Path) -> UnixStream {
    handoff_connection_with(socket, PREFACE).await
}

/// A handoff connection to the router at `socket`, past `preface`.
async fn handoff_connection_with(socket: &Path, preface: &[u8]) -> UnixStream {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    stream.write_all(preface).await.unwrap();
    let mut answer = [0u8; ACCEPTED.len()];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, ACCEPTED);
    stream
}

/// Whether the router closes `stream` within the patience.
async fn closed_by_router(stream: &mut UnixStream) -> bool {
    let mut buffer = [0u8; 16];
    match tokio::time::timeout(PATIENCE, stream.read(&mut buffer)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// A connected TCP socket whose far end is a listener of this test; the accepted side too.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let near = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (far, _) = listener.accept().await.unwrap();
    (near, far)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_handoff_connection_is_refused_and_the_router_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_web(dir.path(), "127.0.99.0/24").await;
    let socket = router.socket().to_owned();
    let line = b"web.default.cluster-a:80 default/client-0@127.0.0.1\n";

    // A preface of another version: closed unanswered.
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    stream.write_all(b"servicekeel-handoff/9\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.is_empty(), "answered {answer:?}");

    // A line with no connection attached: the handoff connection is closed.
    let mut stream = handoff_connection(&socket).await;
    stream.write_all(line).await.unwrap();
    assert!(closed_by_router(&mut stream).await);

    // A line longer than the limit: closed.
    let mut stream = handoff_connection(&socket).await;
    let (app, _far) = tcp_pair().await;
    let long = vec![b'a'; MAX_LINE + 1];
    send_with(&stream, &long, &app);
    assert!(closed_by_router(&mut stream).await);

    // A malformed line with a connection: closed, and the connection it carried is dropped.
    let mut stream = handoff_connection(&socket).await;
    let (app, mut far) = tcp_pair().await;
    send_with(&stream, b"web:80 nobody\n", app.into_std().unwrap());
    assert!(closed_by_router(&mut stream).await);
    let mut sink = Vec::new();
    assert!(
        tokio::time::timeout(PATIENCE, far.read_to_end(&mut sink))
            .await
            .unwrap()
            .is_err(),
        "the dropped connection resets"
    );

    // Something that is not a TCP connection is refused alone: the next handoff on the same
    // connection is relayed.
    let stream = handoff_connection(&socket).await;
    let (not_tcp, _other) = std::os::unix::net::UnixStream::pair().unwrap();
    send_with(&stream, line, &not_tcp);
    let (app, mut far) = tcp_pair().await;
    send_with(&stream, line, app.into_std().unwrap());
    far.write_all(b"relayed").await.unwrap();
    let mut reply = [0u8; 7];
    tokio::time::timeout(PATIENCE, far.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply, b"relayed");

    // And sidecars are served as before.
    let client = pod_behind(&router, "127.0.100.0/24", IMPORTS, None)
        .start()
        .await;
    assert_eq!(
        echo_through("127.0.100.1:80".parse().unwrap(), b"still")
            .await
            .unwrap(),
        b"still"
    );
    drop(client);
}

const UDP_IMPORTS: &str = "services: [{name: dns, ports: [{port: 53, protocol: UDP}]}]";

/// A router with a pod exporting `dns` (a UDP echo) registered.
async fn router_with_udp_echo(dir: &Path, range: &str) -> (Router, Sidecar) {
    let exported = format!(
        "services: [{{name: dns, ports: [{{port: 53, protocol: UDP, targetPort: {}}}]}}]",
        udp_echo().await.port()
    );
    router_with(dir, range, &exported).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_clients_are_handed_to_the_router_with_boundaries_kept_until_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_udp_echo(dir.path(), "127.0.101.0/24").await;
    let mut pod = pod_behind(&router, "127.0.102.0/24", UDP_IMPORTS, None);
    pod.set("SIDECAR_UDP_IDLE_TIMEOUT", "300ms");
    let client = pod.start().await;
    let local: SocketAddr = "127.0.102.1:53".parse().unwrap();

    let datagrams = datagrams_of_every_size();
    let first = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let second = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&first, local, &datagrams).await;
    udp_round_trip(&second, local, &datagrams[..3]).await;

    // Both clients were handed over; the sidecar carried no datagram itself.
    metrics_eventually(
        client.admin_addr(),
        &[r#"servicekeel_sidecar_flows_total{protocol="UDP",outcome="handed_off"} 2"#],
    )
    .await;
    let metrics = http_get(client.admin_addr(), "/metrics").await;
    assert!(
        !metrics.contains(r#"outcome="completed""#),
        "the sidecar carried a flow itself:\n{metrics}"
    );
    // The router relayed them, and ended both flows once they were idle for the sidecar's
    // idle time, with every byte counted.
    let bytes = (datagrams.iter().map(Vec::len).sum::<usize>() + 1 + 512).to_string();
    metrics_eventually(
        router.admin_addr(),
        &[
            r#"servicekeel_router_flows_total{protocol="UDP",outcome="completed"} 2"#,
            r#"servicekeel_router_active_flows{protocol="UDP"} 0"#,
            &format!(
                r#"servicekeel_router_flow_bytes_total{{protocol="UDP",direction="sent"}} {bytes}"#
            ),
            &format!(
                r#"servicekeel_router_flow_bytes_total{{protocol="UDP",direction="received"}} {bytes}"#
            ),
        ],
    )
    .await;
    // The first client's next datagram reaches the sidecar again and is handed over anew.
    udp_round_trip(&first, local, &datagrams[2..3]).await;
    metrics_eventually(
        client.admin_addr(),
        &[r#"servicekeel_sidecar_flows_total{protocol="UDP",outcome="handed_off"} 3"#],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_a_new_udp_client_arrives_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_udp_echo(dir.path(), "127.0.103.0/24").await;
    let client = pod_behind(&router, "127.0.104.0/24", UDP_IMPORTS, None)
        .start()
        .await;
    let local: SocketAddr = "127.0.104.1:53".parse().unwrap();
    for round in 0..3u32 {
        // Sent without waiting: most arrive before the client's own socket exists, and go to
        // the router with the handoff.
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let count = 200u32;
        for n in 0..count {
            let mut datagram = n.to_be_bytes().to_vec();
            datagram.extend(pattern(u64::from(n + round * 1000), 96));
            socket.send_to(&datagram, local).await.unwrap();
        }
        let mut buffer = [0u8; 256];
        for n in 0..count {
            let (len, from) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buffer))
                .await
                .unwrap_or_else(|_| panic!("round {round}: echo {n} of {count} never came"))
                .unwrap();
            assert_eq!(from, local);
            assert_eq!(len, 100);
            assert_eq!(
                u32::from_be_bytes(buffer[..4].try_into().unwrap()),
                n,
                "round {round}: echoes in the order sent"
            );
            assert_eq!(
                &buffer[4..len],
                &pattern(u64::from(n + round * 1000), 96)[..]
            );
        }
    }
    metrics_eventually(
        client.admin_addr(),
        &[r#"servicekeel_sidecar_flows_total{protocol="UDP",outcome="handed_off"} 3"#],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_told_not_to_hand_over_udp_carries_clients_in_flows() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_udp_echo(dir.path(), "127.0.105.0/24").await;
    let mut pod = pod_behind(&router, "127.0.106.0/24", UDP_IMPORTS, None);
    pod.set("SIDECAR_UDP_HANDOFF", "false");
    let client = pod.start().await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(
        &socket,
        "127.0.106.1:53".parse().unwrap(),
        &[pattern(5, 700)],
    )
    .await;
    metrics_eventually(
        client.admin_addr(),
        &[
            r#"servicekeel_sidecar_active_flows{protocol="UDP"} 1"#,
            r#"servicekeel_sidecar_flow_bytes_total{protocol="UDP",direction="sent"} 700"#,
        ],
    )
    .await;
    let metrics = http_get(client.admin_addr(), "/metrics").await;
    assert!(!metrics.contains(r#"outcome="handed_off""#), "{metrics}");
}

/// A UDP socket connected to a new client socket of this test, and that client.
async fn udp_pair() -> (UdpSocket, UdpSocket) {
    let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    app.connect(client.local_addr().unwrap()).await.unwrap();
    client.connect(app.local_addr().unwrap()).await.unwrap();
    (app, client)
}

/// The read end of a pipe holding `bytes`, its write end closed.
fn pipe_holding(bytes: &[u8]) -> std::os::fd::OwnedFd {
    let (read, write) = rustix::pipe::pipe().unwrap();
    assert_eq!(rustix::io::write(&write, bytes).unwrap(), bytes.len());
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_udp_handoff_connection_is_refused_and_the_router_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (router, _server) = router_with_udp_echo(dir.path(), "127.0.107.0/24").await;
    let socket = router.socket().to_owned();
    let line = b"dns.default.cluster-a:53 default/client-0@127.0.0.1 idle-ms=5000\n";
    let mut early = Vec::new();
    encode_datagram(b"early", &mut early).unwrap();

    // A line with one descriptor where two belong: the handoff connection is closed.
    let mut stream = handoff_connection_with(&socket, UDP_PREFACE).await;
    let (app, _client) = udp_pair().await;
    send_with(&stream, line, &app);
    assert!(closed_by_router(&mut stream).await);

    // A TCP line on a UDP handoff connection: closed.
    let mut stream = handoff_connection_with(&socket, UDP_PREFACE).await;
    let (app, _client) = udp_pair().await;
    let pipe = pipe_holding(&early);
    send_with_all(
        &stream,
        b"dns.default.cluster-a:53 default/client-0@127.0.0.1\n",
        &[app.as_fd(), pipe.as_fd()],
    );
    assert!(closed_by_router(&mut stream).await);

    // Each refused alone, the connection serving on: a socket that is not UDP, a UDP socket
    // not connected, early datagrams not in a pipe, early datagrams cut inside a frame.
    let stream = handoff_connection_with(&socket, UDP_PREFACE).await;
    let (not_udp, _other) = std::os::unix::net::UnixStream::pair().unwrap();
    let pipe = pipe_holding(&early);
    send_with_all(&stream, line, &[not_udp.as_fd(), pipe.as_fd()]);
    let unconnected = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let pipe = pipe_holding(&early);
    send_with_all(&stream, line, &[unconnected.as_fd(), pipe.as_fd()]);
    let (app, cut_client) = udp_pair().await;
    send_with_all(&stream, line, &[app.as_fd(), not_udp.as_fd()]);
    drop(app);
    let (app, cut_client_2) = udp_pair().await;
    let pipe = pipe_holding(&early[..early.len() - 1]);
    send_with_all(&stream, line, &[app.as_fd(), pipe.as_fd()]);
    drop(app);

    // Then a well-formed one: its early datagram is echoed first, then what the client sends.
    let (app, client) = udp_pair().await;
    let pipe = pipe_holding(&early);
    send_with_all(&stream, line, &[app.as_fd(), pipe.as_fd()]);
    drop((app, pipe));
    let mut buffer = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, client.recv(&mut buffer))
        .await
        .expect("the early datagram's echo")
        .unwrap();
    assert_eq!(&buffer[..n], b"early");
    client.send(b"later").await.unwrap();
    let n = tokio::time::timeout(PATIENCE, client.recv(&mut buffer))
        .await
        .expect("an echo")
        .unwrap();
    assert_eq!(&buffer[..n], b"later");

    // The refused ones were dropped, not relayed: no socket is there to take their datagrams.
    for refused in [&cut_client, &cut_client_2] {
        refused.send(b"nobody").await.unwrap();
        let answered = tokio::time::timeout(PATIENCE, refused.recv(&mut buffer))
            .await
            .expect("an answer");
        assert_eq!(
            answered.map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionRefused),
            "a refused handoff was relayed"
        );
    }
    // And sidecars are served as before.
    let client = pod_behind(&router, "127.0.108.0/24", UDP_IMPORTS, None)
        .start()
        .await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(
        &socket,
        "127.0.108.1:53".parse().unwrap(),
        &[b"still".to_vec()],
    )
    .await;
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_client_whose_router_died_is_carried_again_when_it_asks_again() {
    let mut pod = Pod::new(
        "127.0.110.0/24",
        "services: [{name: dns, ports: [{port: 53, protocol: UDP}]}]",
        None,
    );
    pod.set("POD_IP", "127.0.0.1");
    let echo = udp_echo().await;
    let route = |router: &DoomedRouter| {
        router
            .state
            .endpoints
            .lock()
            .unwrap()
            .insert(("dns.default.cluster-a:53".into(), Protocol::Udp), echo);
    };
    let router = DoomedRouter::start(&pod.socket());
    route(&router);
    let client = pod.start().await;
    let local: SocketAddr = "127.0.110.1:53".parse().unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_round_trip(&socket, local, &[b"before".to_vec()]).await;
    metrics_eventually(
        client.admin_addr(),
        &[r#"servicekeel_sidecar_flows_total{protocol="UDP",outcome="handed_off"} 1"#],
    )
    .await;

    // The router dies with the client's socket; a new one takes its place.
    router.runtime.shutdown_background();
    std::fs::remove_file(pod.socket()).unwrap();
    let router = DoomedRouter::start(&pod.socket());
    route(&router);
    // Datagrams sent while the router dies are lost with it, as UDP allows; the client asks
    // again, as UDP clients do, and once the dead router's copy of its socket is closed its
    // datagrams reach the sidecar's listener again and are carried (handed to the new router,
    // or through the tunnel while the sidecar finds it), answered from the address it used.
    let mut buffer = [0u8; 64];
    let mut answered = false;
    for _ in 0..10 {
        socket.send_to(b"after", local).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buffer));
        if let Ok(reply) = reply.await {
            let (n, from) = reply.unwrap();
            assert_eq!((&buffer[..n], from), (&b"after"[..], local));
            answered = true;
            break;
        }
    }
    assert!(answered, "no answer after the router came back");
    drop(client);
    router.runtime.shutdown_background();
}
