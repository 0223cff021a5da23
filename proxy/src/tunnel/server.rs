//! The router's end of the tunnel: accepts connections, reads each `CONNECT` as a flow request
//! and each `PUT` of the registration path as a registration, and leaves the decisions to a
//! [`Handler`]: where a flow goes, what a registration means, what to forget when a connection
//! ends. The handler returns the far end of a flow already connected; this module answers the
//! request and pipes the bytes.
//!
//! Bad requests (unknown version, malformed target or source, oversized registration, other
//! methods) get a 4xx answer naming the problem; a malformed connection is dropped by HTTP/2.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use servicekeel_api::Protocol;
use servicekeel_api::tunnel::registration::{MAX_REGISTRATION_BYTES, Registration};
use servicekeel_api::tunnel::{
    FlowTarget, MAX_HEADER_BYTES, PROTOCOL_HEADER, REGISTRATION_PATH, SOURCE_HEADER, Source,
    VERSION_HEADER, check_version,
};
use tokio::net::{TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::sync::watch;

use super::busy_poll::Polling;
use super::datagrams::{self, Connected};
use super::{FlowStream, Io, settings};

/// How long dialing an endpoint may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// Identifies one tunnel connection, so registrations can be dropped with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

impl LinkId {
    /// A process-wide unique id.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        LinkId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Who is at the other end of a tunnel connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A sidecar on this node: on the Unix socket (`from` none), or over TCP from the pod
    /// address `from`, which is then the only pod address it may register.
    Sidecar { from: Option<IpAddr> },
    /// Another router, authenticated as one of `cluster`.
    Router { cluster: String },
}

/// One tunnel connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub id: LinkId,
    pub peer: Peer,
}

impl Link {
    /// A new link to a sidecar on the Unix socket.
    pub fn sidecar() -> Self {
        Link {
            id: LinkId::next(),
            peer: Peer::Sidecar { from: None },
        }
    }

    /// A new link to a sidecar connected over TCP from `from`.
    pub fn sidecar_from(from: IpAddr) -> Self {
        Link {
            id: LinkId::next(),
            peer: Peer::Sidecar { from: Some(from) },
        }
    }
}

/// A flow someone asked for.
#[derive(Debug, Clone)]
pub struct FlowRequest {
    pub target: FlowTarget,
    pub source: Option<Source>,
    pub link: Link,
}

/// The far end of a flow, connected.
#[derive(Debug)]
pub enum Upstream {
    Tcp(TcpStream),
    /// A socket connected to the endpoint.
    Udp(UdpSocket),
    /// Another tunnel's flow (a peer router).
    Flow(FlowStream),
}

/// Why a flow was not opened; sent back as the answer's status and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

/// What the router (or a test standing in for it) decides.
pub trait Handler: Send + Sync + 'static {
    /// Connects the far end of a flow.
    fn open(&self, request: &FlowRequest)
    -> impl Future<Output = Result<Upstream, Refusal>> + Send;
    /// Takes a connection's registration, replacing its previous one.
    fn register(&self, link: LinkId, registration: Registration) -> Result<(), String>;
    /// The connection ended: forget its registration.
    fn unlink(&self, link: LinkId);
    /// A flow [`Handler::open`] connected has ended, with the bytes carried each way and how
    /// it ended; called once for every successful `open`.
    fn finished(&self, _request: &FlowRequest, _outcome: &Finished) {}
}

/// How a piped flow ended.
#[derive(Debug)]
pub struct Finished {
    /// Bytes from the client towards the endpoint.
    pub sent: u64,
    /// Bytes from the endpoint towards the client.
    pub received: u64,
    pub result: io::Result<()>,
}

impl Finished {
    /// A flow that ended before carrying anything.
    pub(crate) fn failed(error: io::Error) -> Finished {
        Finished {
            sent: 0,
            received: 0,
            result: Err(error),
        }
    }
}

/// Runs `relay` on `home`, the runtime of the link carrying its flow, when there is one (so
/// the flow's bytes are copied on the thread that frames and seals them), or here.
pub(crate) async fn at_home(
    home: Option<Handle>,
    relay: impl Future<Output = Finished> + Send + 'static,
) -> Finished {
    match home {
        None => relay.await,
        Some(home) => spawned_on(&home, "the link's thread", relay)
            .await
            .unwrap_or_else(Finished::failed),
    }
}

/// Runs `relay` on the runtime `home` (of the thread named by `thread`) and waits for it; a
/// runtime that ended first, its thread stopped, fails it with an error saying so.
pub(crate) async fn spawned_on<T: Send + 'static>(
    home: &Handle,
    thread: &str,
    relay: impl Future<Output = T> + Send + 'static,
) -> io::Result<T> {
    home.spawn(relay)
        .await
        .map_err(|error| io::Error::other(format!("{thread} ended the relay: {error}")))
}

/// Runs `relay` with `sockets` on `home` as [`at_home`] does, the sockets moved there first by
/// `move_to` (a socket is served by the runtime it is registered with); a failed move fails the
/// relay.
pub(crate) async fn moved_home<S, Fut>(
    home: Option<Handle>,
    sockets: S,
    move_to: impl FnOnce(S, &Handle) -> io::Result<S>,
    relay: impl FnOnce(S) -> Fut,
) -> Finished
where
    Fut: Future<Output = Finished> + Send + 'static,
{
    let sockets = match &home {
        Some(home) => move_to(sockets, home),
        None => Ok(sockets),
    };
    match sockets {
        Ok(sockets) => at_home(home, relay(sockets)).await,
        Err(error) => Finished::failed(error),
    }
}

/// The same connection, served by the runtime `home` from now on (a link's thread).
pub(crate) fn tcp_moved_to(stream: TcpStream, home: &Handle) -> io::Result<TcpStream> {
    let stream = stream.into_std()?;
    let _entered = home.enter();
    TcpStream::from_std(stream)
}

/// Bytes a UDP relay carried each way, as they go, for its [`Finished`]; its meters may go with
/// the relay to another thread.
#[derive(Debug, Default)]
pub(crate) struct Carried {
    /// Sent towards the endpoint, received from it.
    counts: Arc<[AtomicU64; 2]>,
}

impl Carried {
    /// The meter for a datagram relay whose datagrams going `towards_endpoint` are the ones
    /// sent to the endpoint, the others received from it.
    pub(crate) fn meter(
        &self,
        towards_endpoint: datagrams::Way,
    ) -> impl Fn(datagrams::Way, usize) + Send + 'static {
        let counts = self.counts.clone();
        move |way, n| {
            let counter = &counts[usize::from(way != towards_endpoint)];
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn finished(self, result: io::Result<()>) -> Finished {
        let [sent, received] = &*self.counts;
        Finished {
            sent: sent.load(Ordering::Relaxed),
            received: received.load(Ordering::Relaxed),
            result,
        }
    }
}

/// Opens a socket to an endpoint for a flow of `protocol`; a TCP one under the `congestion`
/// control named, if any (where the kernel refuses it, the node's default, said at debug level:
/// the flow goes on).
pub async fn dial(
    protocol: Protocol,
    addr: SocketAddr,
    congestion: Option<&str>,
) -> io::Result<Upstream> {
    let attempt = async {
        match protocol {
            Protocol::Tcp => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                if let Some(name) = congestion
                    && let Err(error) = rustix::net::sockopt::set_tcp_congestion(&stream, name)
                {
                    tracing::debug!(%addr, congestion = name, %error, "congestion control refused");
                }
                Ok(Upstream::Tcp(stream))
            }
            Protocol::Udp => {
                let local: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                }
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let socket = UdpSocket::bind(local).await?;
                socket.connect(addr).await?;
                Ok(Upstream::Udp(socket))
            }
        }
    };
    tokio::time::timeout(DIAL_TIMEOUT, attempt)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("dial {addr} timed out")))?
}

/// Accepts sidecars' connections until `shutdown` turns true; each is served by
/// [`serve_connection`], or as a handoff connection whose UDP clients busy poll as `polling`
/// allows.
pub async fn serve<H: Handler>(
    listener: tokio::net::UnixListener,
    handler: Arc<H>,
    polling: Polling,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        let io = tokio::select! {
            accepted = listener.accept() => accepted.map(|(io, _)| io),
            _ = crate::shutdown::stopped(&mut stop) => return,
        };
        match io {
            Ok(io) => {
                tokio::spawn(serve_unix(
                    io,
                    handler.clone(),
                    polling.clone(),
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                // Out of descriptors and the like: say so and keep accepting.
                tracing::warn!(%error, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection on the Unix socket: a tunnel, or a sidecar handing connections over
/// ([`super::handoff`]), told apart by its first byte.
async fn serve_unix<H: Handler>(
    io: tokio::net::UnixStream,
    handler: Arc<H>,
    polling: Polling,
    shutdown: watch::Receiver<bool>,
) {
    let first = match tokio::time::timeout(DIAL_TIMEOUT, super::handoff::peek_first(&io)).await {
        Ok(Ok(Some(first))) => first,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::debug!(%error, "tunnel connection failed before its first byte");
            return;
        }
        Err(_) => {
            tracing::debug!("tunnel connection sent nothing in time");
            return;
        }
    };
    if super::handoff::is_handoff(first) {
        let link = Link::sidecar();
        super::handoff::serve(io, handler, link, DIAL_TIMEOUT, polling, shutdown).await;
    } else {
        serve_connection(io, handler, Link::sidecar(), shutdown).await;
    }
}

/// Accepts sidecars' TCP connections until `shutdown` turns true, from addresses in `allowed`
/// only: others are closed at once and passed to `refused`. Each is served by
/// [`serve_connection`] as a link to the pod at its source address.
pub async fn serve_tcp<H: Handler>(
    listener: tokio::net::TcpListener,
    allowed: Arc<[ipnet::IpNet]>,
    handler: Arc<H>,
    refused: Arc<dyn Fn(SocketAddr) + Send + Sync>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = crate::shutdown::stopped(&mut stop) => return,
        };
        match accepted {
            Ok((io, peer)) => {
                let from = peer.ip().to_canonical();
                if !allowed.iter().any(|net| net.contains(&from)) {
                    refused(peer);
                    continue;
                }
                let _ = io.set_nodelay(true);
                tokio::spawn(serve_connection(
                    io,
                    handler.clone(),
                    Link::sidecar_from(from),
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one tunnel connection until the peer closes it; on `shutdown` it stops taking new
/// flows (HTTP/2 GOAWAY) and ends once the open ones have.
pub async fn serve_connection<H: Handler>(
    io: impl Io,
    handler: Arc<H>,
    link: Link,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshake = h2::server::Builder::new()
        .initial_window_size(settings::STREAM_WINDOW)
        .initial_connection_window_size(settings::CONNECTION_WINDOW)
        .max_frame_size(settings::MAX_FRAME)
        .max_concurrent_streams(settings::MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES)
        .handshake::<_, Bytes>(io);
    let mut connection = match tokio::time::timeout(DIAL_TIMEOUT, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%error, "tunnel handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("tunnel handshake timed out");
            return;
        }
    };
    let mut draining = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            _ = crate::shutdown::stopped(&mut shutdown), if !draining => {
                draining = true;
                connection.graceful_shutdown();
                continue;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                tokio::spawn(serve_request(
                    request,
                    respond,
                    handler.clone(),
                    link.clone(),
                ));
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "tunnel connection failed");
                break;
            }
            None => break,
        }
    }
    handler.unlink(link.id);
}

type Respond = h2::server::SendResponse<Bytes>;

fn answer(mut respond: Respond, status: StatusCode, text: &str) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    if let Ok(mut body) = respond.send_response(response, text.is_empty())
        && !text.is_empty()
    {
        let _ = body.send_data(Bytes::copy_from_slice(text.as_bytes()), true);
    }
}

async fn serve_request<H: Handler>(
    request: Request<h2::RecvStream>,
    respond: Respond,
    handler: Arc<H>,
    link: Link,
) {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Err(message) = check_version(header(VERSION_HEADER).as_deref()) {
        return answer(respond, StatusCode::BAD_REQUEST, &message);
    }
    let source = match header(SOURCE_HEADER)
        .map(|s| s.parse::<Source>())
        .transpose()
    {
        Ok(source) => source,
        Err(message) => return answer(respond, StatusCode::BAD_REQUEST, &message),
    };
    if request.method() == Method::CONNECT {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let protocol = header(PROTOCOL_HEADER).unwrap_or_default();
        let target = match FlowTarget::parse(&authority, &protocol) {
            Ok(target) => target,
            Err(error) => return answer(respond, StatusCode::BAD_REQUEST, &error.to_string()),
        };
        let flow = FlowRequest {
            target,
            source,
            link,
        };
        return open_flow(flow, request.into_body(), respond, handler).await;
    }
    if request.method() == Method::PUT && request.uri().path() == REGISTRATION_PATH {
        let Peer::Sidecar { from } = link.peer else {
            return answer(
                respond,
                StatusCode::FORBIDDEN,
                "only sidecars register, on the node's socket",
            );
        };
        let body = match read_limited(request.into_body(), MAX_REGISTRATION_BYTES).await {
            Ok(body) => body,
            Err(Oversized { message, rest }) => {
                answer(respond, StatusCode::PAYLOAD_TOO_LARGE, &message);
                return discard(rest).await;
            }
        };
        let registration = match Registration::parse(&body) {
            Ok(registration) => registration,
            Err(error) => return answer(respond, StatusCode::BAD_REQUEST, &error.to_string()),
        };
        if let Some(from) = from
            && registration.pod.ip != Some(from)
        {
            let claimed = registration
                .pod
                .ip
                .map_or_else(|| "no address".to_string(), |ip| ip.to_string());
            return answer(
                respond,
                StatusCode::FORBIDDEN,
                &format!("a sidecar connected from {from} registers only {from}, not {claimed}"),
            );
        }
        return match handler.register(link.id, registration) {
            Ok(()) => answer(respond, StatusCode::OK, ""),
            Err(message) => answer(respond, StatusCode::BAD_REQUEST, &message),
        };
    }
    answer(
        respond,
        StatusCode::NOT_FOUND,
        &format!(
            "{} {} is not a tunnel request (CONNECT, or PUT {REGISTRATION_PATH})",
            request.method(),
            request.uri()
        ),
    );
}

/// A body over its limit: why, and the rest of the stream.
struct Oversized {
    message: String,
    rest: Option<h2::RecvStream>,
}

async fn read_limited(mut body: h2::RecvStream, limit: usize) -> Result<Bytes, Oversized> {
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| Oversized {
            message: e.to_string(),
            rest: None,
        })?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if bytes.len() + chunk.len() > limit {
            return Err(Oversized {
                message: format!("body over the {limit}-byte limit"),
                rest: Some(body),
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.freeze())
}

/// Reads and drops what remains of a refused upload, for a while, so the peer finishes sending
/// and reads the answer instead of having its stream reset under it.
async fn discard(rest: Option<h2::RecvStream>) {
    const PATIENCE: Duration = Duration::from_secs(5);
    let Some(mut body) = rest else { return };
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
    })
    .await;
}

async fn open_flow<H: Handler>(
    request: FlowRequest,
    body: h2::RecvStream,
    mut respond: Respond,
    handler: Arc<H>,
) {
    let upstream = match handler.open(&request).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            tracing::debug!(target = %request.target, status = %refusal.status, message = %refusal.message, "flow refused");
            return answer(respond, refusal.status, &refusal.message);
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(error) => {
            tracing::debug!(%error, "client went away before the flow opened");
            let finished =
                Finished::failed(io::Error::new(io::ErrorKind::ConnectionAborted, error));
            return handler.finished(&request, &finished);
        }
    };
    let mut flow = FlowStream::new(send, body);
    let finished = match upstream {
        Upstream::Tcp(mut stream) => {
            let result = super::pipe(&mut flow, &mut stream).await;
            if result.is_err() {
                abort(&stream);
            }
            finished_copy(result)
        }
        Upstream::Flow(mut far) => {
            let home = far.home().cloned();
            at_home(home, async move {
                finished_copy(super::pipe_flows(&mut flow, &mut far).await)
            })
            .await
        }
        Upstream::Udp(socket) => {
            // The endpoint is the local side here: what comes in from the flow is sent to it.
            let carried = Carried::default();
            let result = datagrams::relay(
                flow,
                Connected::new(socket),
                super::UDP_IDLE_TIMEOUT,
                carried.meter(datagrams::Way::In),
            )
            .await;
            carried.finished(result)
        }
    };
    handler.finished(&request, &finished);
}

/// Relays a connection handed over by a sidecar to its far end, both ways, until both ways
/// ended; the far end is aborted if the relay broke (the caller decides for `app`). A relay to
/// an endpoint on this node polls a stream's emptied socket as `polling` allows.
pub(crate) async fn carry(upstream: Upstream, app: &mut TcpStream, polling: &Polling) -> Finished {
    // An endpoint socket is relayed with splice: no copy through this process.
    match upstream {
        Upstream::Tcp(stream) => {
            let result = super::splice::relay(app, &stream, polling).await;
            if result.is_err() {
                abort(&stream);
            }
            finished_copy(result)
        }
        Upstream::Flow(mut far) => finished_copy(
            super::pipe(&mut far, app)
                .await
                .map(|(back, forth)| (forth, back)),
        ),
        Upstream::Udp(_) => Finished::failed(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a TCP connection cannot be relayed to a UDP endpoint",
        )),
    }
}

fn finished_copy(result: io::Result<(u64, u64)>) -> Finished {
    match result {
        Ok((sent, received)) => Finished {
            sent,
            received,
            result: Ok(()),
        },
        Err(error) => Finished {
            sent: 0,
            received: 0,
            result: Err(error),
        },
    }
}

/// Ends a TCP connection with a reset rather than a FIN, so the peer sees the failure.
pub fn abort(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::links::LinkThreads;

    /// A relay that finishes naming the thread it ran on in its error.
    async fn naming_its_thread() -> Finished {
        let name = std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string();
        Finished::failed(io::Error::other(name))
    }

    fn error_of(finished: Finished) -> String {
        finished.result.expect_err("an error").to_string()
    }

    #[tokio::test]
    async fn a_relay_runs_on_its_links_thread_or_here() {
        let threads = LinkThreads::start(1).expect("threads");
        let on_link = at_home(Some(threads.next()), naming_its_thread()).await;
        assert_eq!(error_of(on_link), "link-0");
        let here = std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string();
        assert_eq!(error_of(at_home(None, naming_its_thread()).await), here);
    }

    #[tokio::test]
    async fn a_relay_for_a_link_whose_threads_ended_fails_cleanly() {
        let threads = LinkThreads::start(1).expect("threads");
        let home = threads.next();
        drop(threads);
        // The thread ends soon after; until then the relay may still run there.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let error = error_of(at_home(Some(home.clone()), naming_its_thread()).await);
            if error != "link-0" {
                assert!(
                    error.contains("the link's thread ended the relay"),
                    "{error}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the link thread outlived its last clone"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_endpoint_is_dialled_under_the_congestion_control_asked_or_the_nodes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let read = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).expect("the kernel's")
        };
        let node_default = read("tcp_congestion_control").trim().to_string();
        // Another than the default, so that the test tells asking from not asking.
        let available = read("tcp_available_congestion_control");
        let other = available
            .split_whitespace()
            .find(|name| *name != node_default)
            .expect("a second congestion control in the kernel");
        let control = |upstream: Upstream| match upstream {
            Upstream::Tcp(stream) => {
                rustix::net::sockopt::tcp_congestion(&stream).expect("its congestion control")
            }
            _ => panic!("not a TCP upstream"),
        };
        let asked = dial(Protocol::Tcp, addr, Some(other)).await.expect("dial");
        assert_eq!(control(asked), other);
        let kept = dial(Protocol::Tcp, addr, None).await.expect("dial");
        assert_eq!(control(kept), node_default);
        // One the kernel does not know: the flow goes on under the node's default.
        let unknown = dial(Protocol::Tcp, addr, Some("no_such_control")).await;
        assert_eq!(
            control(unknown.expect("dialled all the same")),
            node_default
        );
    }
}
