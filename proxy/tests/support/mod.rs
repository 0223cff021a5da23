//! Helpers shared by the proxy's integration tests: a DNS answer reader, a stand-in for the
//! router's side of the tunnel, echo servers and a sidecar started on test addresses.

// Each test binary uses a part of these.
#![allow(dead_code)]

pub mod netns;
pub mod pki;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use hickory_proto::rr::rdata::A;
use http::StatusCode;
use servicekeel_api::Protocol;
use servicekeel_api::podinfo::format_annotations;
use servicekeel_api::tunnel::registration::Registration;
use servicekeel_proxy::config::SidecarConfig;
use servicekeel_proxy::sidecar::Sidecar;
use servicekeel_proxy::tunnel::server::{
    FlowRequest, Handler, Link, LinkId, Refusal, Upstream, dial, serve_connection,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The addresses of the A records in an answer.
pub fn a_records(message: &Message) -> Vec<Ipv4Addr> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
        .collect()
}

/// Asks the DNS server at `dns` for the A records of `name`, over UDP.
pub async fn resolve(dns: SocketAddr, name: &str) -> Vec<Ipv4Addr> {
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut message = Message::new(42, MessageType::Query, OpCode::Query);
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&message.to_vec().unwrap(), dns)
        .await
        .unwrap();
    let mut buffer = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(20), socket.recv_from(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    a_records(&Message::from_vec(&buffer[..n]).unwrap())
}

/// What the stand-in router knows and saw.
#[derive(Debug, Default)]
pub struct RouterState {
    /// `name.namespace.cluster:port` and protocol → the endpoint to dial.
    pub endpoints: Mutex<HashMap<(String, Protocol), SocketAddr>>,
    /// Registrations by connection.
    pub registrations: watch::Sender<BTreeMap<LinkId, Registration>>,
    pub flows_opened: AtomicUsize,
    /// Sources of the flows opened, as sent.
    pub sources: Mutex<Vec<String>>,
}

impl Handler for RouterState {
    async fn open(&self, request: &FlowRequest) -> Result<Upstream, Refusal> {
        let key = (request.target.authority(), request.target.protocol);
        let endpoint = self.endpoints.lock().unwrap().get(&key).copied();
        let Some(endpoint) = endpoint else {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no endpoint for {}", request.target),
            ));
        };
        let upstream = dial(request.target.protocol, endpoint, None)
            .await
            .map_err(|e| Refusal::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
        self.flows_opened.fetch_add(1, Ordering::SeqCst);
        self.sources.lock().unwrap().push(
            request
                .source
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        Ok(upstream)
    }

    fn register(&self, link: LinkId, registration: Registration) -> Result<(), String> {
        self.registrations.send_modify(|all| {
            all.insert(link, registration);
        });
        Ok(())
    }

    fn unlink(&self, link: LinkId) {
        self.registrations.send_modify(|all| {
            all.remove(&link);
        });
    }
}

/// The router's side of the tunnel on a Unix socket, with every connection in one set so
/// [`TestRouter::crash`] can end them all at once, as a killed process would. It speaks the
/// tunnel only, as a router that does not take handoffs: sidecars carry their TCP connections
/// to it in flows.
#[derive(Debug)]
pub struct TestRouter {
    pub state: Arc<RouterState>,
    pub path: PathBuf,
    tasks: JoinSet<()>,
    _stop: watch::Sender<bool>,
}

impl TestRouter {
    pub async fn start(path: &Path, state: Arc<RouterState>) -> TestRouter {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let handler = state.clone();
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let held = connections.clone();
        tasks.spawn(async move {
            let _held = held;
            loop {
                let Ok((io, _)) = listener.accept().await else {
                    return;
                };
                connections.lock().unwrap().spawn(serve_connection(
                    io,
                    handler.clone(),
                    Link::sidecar(),
                    stopped.clone(),
                ));
            }
        });
        TestRouter {
            state,
            path: path.to_owned(),
            tasks,
            _stop: stop,
        }
    }

    /// Ends the listener and every connection at once and removes the socket.
    pub async fn crash(mut self) {
        self.tasks.shutdown().await;
        let _ = std::fs::remove_file(&self.path);
    }

    pub fn route(&self, authority: &str, protocol: Protocol, endpoint: SocketAddr) {
        self.state
            .endpoints
            .lock()
            .unwrap()
            .insert((authority.to_string(), protocol), endpoint);
    }
}

/// A TCP server that sends back everything it reads and closes its side after the client's
/// FIN, so half-close is needed for a client to get all of its bytes back.
pub async fn tcp_echo() -> SocketAddr {
    tcp_echo_on(Ipv4Addr::LOCALHOST).await
}

/// [`tcp_echo`] on `ip`.
pub async fn tcp_echo_on(ip: Ipv4Addr) -> SocketAddr {
    tcp_echo_server(ip).await.addr
}

/// A [`tcp_echo`] that counts the connections it accepted and can be killed.
#[derive(Debug)]
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    /// Stops accepting and closes the listening socket: new connections are refused.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

pub async fn tcp_echo_server(ip: Ipv4Addr) -> EchoServer {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                    let _ = writer.shutdown().await;
                }
            });
        }
    });
    EchoServer {
        addr,
        accepted,
        task,
    }
}

/// A UDP server that sends every datagram back to its sender.
pub async fn udp_echo() -> SocketAddr {
    udp_echo_on(Ipv4Addr::LOCALHOST).await
}

/// [`udp_echo`] on `ip`.
pub async fn udp_echo_on(ip: Ipv4Addr) -> SocketAddr {
    let socket = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_536];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buffer).await else {
                return;
            };
            let _ = socket.send_to(&buffer[..n], peer).await;
        }
    });
    addr
}

/// Datagrams from empty to the largest UDP takes, each a different [`pattern`].
pub fn datagrams_of_every_size() -> Vec<Vec<u8>> {
    [0usize, 1, 512, 1400, 9000, 65_507]
        .iter()
        .enumerate()
        .map(|(i, n)| pattern(i as u64, *n))
        .collect()
}

/// Sends each datagram from `socket` to `to` and waits for its echo, which must come from `to`
/// (the address the client used) with the same bytes.
pub async fn udp_round_trip(socket: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    let mut buffer = vec![0u8; 65_536];
    for datagram in datagrams {
        socket.send_to(datagram, to).await.unwrap();
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(20), socket.recv_from(&mut buffer))
                .await
                .unwrap_or_else(|_| panic!("no echo of a {}-byte datagram", datagram.len()))
                .unwrap();
        assert_eq!(from, to, "replies come from the address the client used");
        assert!(
            buffer[..n] == datagram[..],
            "datagram of {} bytes",
            datagram.len()
        );
    }
}

/// `len` bytes that differ with `seed` (xorshift), for checking transfers byte for byte.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sends `data` over a new connection to `addr`, half-closes, and returns what came back.
pub async fn echo_through(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let data = data.to_vec();
    let sending = tokio::spawn(async move {
        writer.write_all(&data).await?;
        writer.shutdown().await
    });
    let mut back = Vec::new();
    let read = reader.read_to_end(&mut back).await;
    sending.await.unwrap()?;
    read?;
    Ok(back)
}

/// A sidecar's test environment: its own loopback range, annotations file and router socket.
#[derive(Debug)]
pub struct Pod {
    pub dir: tempfile::TempDir,
    pub env: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Pod {
    /// A pod in `default` of `cluster-a`, its imports and exports given as annotation values,
    /// its local addresses in `range`.
    pub fn new(range: &str, imported: &str, exported: Option<&str>) -> Pod {
        let dir = tempfile::tempdir().unwrap();
        let mut annotations = BTreeMap::new();
        annotations.insert("servicekeel.io/imported-services".into(), imported.into());
        if let Some(exported) = exported {
            annotations.insert("servicekeel.io/exported-services".into(), exported.into());
        }
        let file = dir.path().join("annotations");
        let socket = dir.path().join("router.sock");
        let env = [
            ("POD_NAMESPACE", "default".to_string()),
            ("POD_NAME", "client-0".into()),
            ("POD_IP", "10.244.1.7".into()),
            ("SERVICEKEEL_CLUSTER", "cluster-a".into()),
            ("SIDECAR_UPSTREAM_DNS", "127.0.0.1:9".into()),
            ("SIDECAR_IP_RANGE", range.into()),
            ("SIDECAR_DNS_ADDR", "127.0.0.1:0".into()),
            ("SIDECAR_ADMIN_ADDR", "127.0.0.1:0".into()),
            (
                "SIDECAR_SERVER_LISTEN",
                format!("unix://{}", socket.display()),
            ),
            ("SIDECAR_ANNOTATIONS_FILE", file.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let pod = Pod {
            dir,
            env,
            annotations,
        };
        pod.write_annotations();
        pod
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("router.sock")
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.env.insert(key.into(), value.into());
    }

    /// Sets an annotation and rewrites the file.
    pub fn annotate(&mut self, key: &str, value: &str) {
        self.annotations.insert(key.into(), value.into());
        self.write_annotations();
    }

    pub fn write_annotations(&self) {
        std::fs::write(
            self.dir.path().join("annotations"),
            format_annotations(&self.annotations),
        )
        .unwrap();
    }

    pub async fn start(&self) -> Sidecar {
        Sidecar::start(SidecarConfig::from_source(&self.env).unwrap())
            .await
            .unwrap()
    }
}

/// A router's configuration for a test in `dir`: node `edge-1` of `cluster-a`, no API server,
/// no links, the socket at `dir/run/router.sock`.
pub fn router_config(dir: &Path) -> servicekeel_proxy::router::RouterConfig {
    servicekeel_proxy::router::RouterConfig {
        socket: dir.join("run/router.sock"),
        socket_mode: 0o660,
        socket_owner: None,
        state_dir: dir.join("state"),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        node: "edge-1".into(),
        cluster: "cluster-a".into(),
        links: None,
        api: servicekeel_proxy::router::Api::Off,
        drain_timeout: Duration::from_secs(20),
        busy_poll: Duration::from_micros(50),
        local_congestion: Some(servicekeel_api::defaults::ROUTER_LOCAL_CONGESTION.into()),
        cpus: 2,
        max_flows: servicekeel_api::defaults::ROUTER_MAX_FLOWS,
        sidecar_tcp: None,
    }
}

/// A pod whose sidecar talks to `router` on its socket and registers as `127.0.0.1`.
pub fn pod_behind(
    router: &servicekeel_proxy::router::Router,
    range: &str,
    imported: &str,
    exported: Option<&str>,
) -> Pod {
    let socket = format!("unix://{}", router.socket().display());
    pod_reaching(&socket, range, imported, exported)
}

/// Like [`pod_behind`], the sidecar reaching `router` over TCP, as pods that cannot mount the
/// socket do.
pub fn pod_over_tcp(
    router: &servicekeel_proxy::router::Router,
    range: &str,
    imported: &str,
    exported: Option<&str>,
) -> Pod {
    let addr = router
        .sidecar_addr()
        .expect("the router takes sidecars over TCP");
    pod_reaching(&format!("tcp://{addr}"), range, imported, exported)
}

fn pod_reaching(router: &str, range: &str, imported: &str, exported: Option<&str>) -> Pod {
    let mut pod = Pod::new(range, imported, exported);
    pod.set("SIDECAR_SERVER_LISTEN", router);
    pod.set("POD_IP", "127.0.0.1");
    pod
}

/// Waits (up to 20 s) until the metrics at `addr` have every one of `lines`, and fails naming
/// the first missing one otherwise: a flow is counted once its relay returned, which may be
/// just after the client saw it end.
pub async fn metrics_eventually(addr: SocketAddr, lines: &[&str]) {
    let mut metrics = String::new();
    for _ in 0..1000 {
        metrics = http_get(addr, "/metrics").await;
        if lines.iter().all(|line| metrics.contains(line)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for line in lines {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

/// The whole HTTP/1.1 reply to a GET.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    reply
}

/// Whether a connection to `addr` is reset or closed before any byte comes back.
pub async fn cut_at_once(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let _ = stream.write_all(b"anyone?").await;
    let mut buffer = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Whether a round trip through `addr` succeeds within two seconds of trying.
pub async fn echoes_again(addr: SocketAddr) -> bool {
    for _ in 0..100 {
        if echo_through(addr, b"again").await.ok().as_deref() == Some(&b"again"[..]) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Whether `stream` is closed by the other side within `limit` (what it sends is read and
/// dropped meanwhile).
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> bool {
    let mut buffer = [0u8; 256];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.is_ok()
}

/// Whether a process running as `uid`/`gid` (no other groups) can connect to `socket`.
pub fn connects_as(uid: u32, gid: u32, socket: &Path) -> bool {
    let status = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
            // The system interpreter: one under /root would be out of reach of these users.
            "/usr/bin/python3",
            "-c",
            "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
        ])
        .arg(socket)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("setpriv and /usr/bin/python3 are needed");
    status.success()
}

/// `command` (the proxy, or a program that runs it) given the arguments of a router of node `n`
/// in cluster `c` without an API server or links, its socket and state directory where given,
/// its admin server on a port of loopback's choosing.
pub fn router_args(
    mut command: std::process::Command,
    socket: &Path,
    state: &Path,
) -> std::process::Command {
    command
        .args(["router", "--node=n", "--cluster=c", "--no-api"])
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--state-dir={}", state.display()))
        .arg("--admin-addr=127.0.0.1:0");
    command
}
