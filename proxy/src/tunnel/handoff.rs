//! Handing accepted TCP connections and UDP clients to the router over its Unix socket
//! (`SCM_RIGHTS`), so that a flow has one relay (the router) instead of two; the contract is
//! `servicekeel_api::tunnel::handoff`.
//!
//! - [`Giver`]: the sidecar's side, one per kind. It keeps one handoff connection to the router;
//!   what it cannot hand over (no router, a router that does not take handoffs of its kind) is
//!   left with the caller, who carries it in a tunnel flow instead.
//! - [`serve`]: the router's side, for a connection whose first byte is a handoff preface.
//!
//! Nothing is lost in between: the sidecar sets a TCP connection to close with a reset before
//! handing it over, and the router clears that only once it has relayed the connection to its
//! end. A connection that is dropped anywhere on the way (a handoff connection that breaks with
//! descriptors unread, a router that dies mid-relay) is reset towards the application, which
//! sees the failure instead of a clean end. A UDP client goes over as a socket connected to it,
//! with the datagrams it sent before that socket existed; once the router drops the socket (the
//! flow went idle, or the router ended), the client's next datagram reaches the sidecar's
//! listener again and starts a new flow.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use servicekeel_api::tunnel::handoff::{ACCEPTED, Handoff, Kind, Lines, MAX_PREFACE};
use servicekeel_api::tunnel::{DatagramDecoder, FlowTarget, Source, encode_datagram};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UdpSocket, UnixStream};
use tokio::sync::{Mutex, watch};

use super::FlowStream;
use super::busy_poll::Polling;
use super::datagrams::{self, Connected};
use super::server::{
    Carried, Finished, FlowRequest, Handler, Link, Upstream, abort, moved_home, tcp_moved_to,
};

/// How long connecting and the router's answer to the preface may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After the router could not be reached, handoffs are not tried again for this long (the
/// tunnel, with its own retries, carries connections meanwhile).
const RETRY_UNREACHABLE: Duration = Duration::from_secs(1);
/// After a router that does not take handoffs, they are not tried again for this long.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// Descriptors room is made for in one read; the sender attaches one or two per line.
const MAX_FDS_PER_READ: usize = 32;

/// Most bytes of datagrams a UDP client's early-datagram pipe is given room for.
const MAX_EARLY_BYTES: usize = 1 << 20;

/// The sidecar's side: hands connections (or UDP clients) to the router at `path`.
#[derive(Debug)]
pub struct Giver {
    path: PathBuf,
    source: Source,
    kind: Kind,
    state: Mutex<GiverState>,
}

#[derive(Debug, Default)]
struct GiverState {
    connection: Option<UnixStream>,
    /// No new connection is tried before this.
    not_before: Option<Instant>,
}

/// Why a connection was not handed over; the caller still holds it.
#[derive(Debug, thiserror::Error)]
pub enum NotHanded {
    #[error("router {path} not reachable for handoffs: {reason}")]
    Unreachable { path: String, reason: String },
    #[error("router {path} does not take handoffs: {reason}")]
    Refused { path: String, reason: String },
    #[error("handoffs paused after a failure")]
    Paused,
    #[error("handoff failed before anything was sent: {0}")]
    Send(io::Error),
    #[error("{0}")]
    Line(String),
}

impl Giver {
    /// Hands over what `kind` says (`kind` must match the targets given to it).
    pub fn new(path: PathBuf, source: Source, kind: Kind) -> Self {
        Giver {
            path,
            source,
            kind,
            state: Mutex::new(GiverState::default()),
        }
    }

    /// Hands `stream` to the router as a connection to `target`. On `Err` the stream comes back
    /// untouched; on `Ok` it is the router's (a send that broke half-way ends it with a reset,
    /// which the application sees).
    pub async fn give(
        &self,
        stream: TcpStream,
        target: &FlowTarget,
    ) -> Result<(), (TcpStream, NotHanded)> {
        let line = match self.line(target, None) {
            Ok(line) => line,
            Err(error) => return Err((stream, error)),
        };
        // A reset, not a FIN, if the connection is dropped before the router has relayed it.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        match self.hand(&line, &[stream.as_fd()], target).await {
            Ok(()) => Ok(()),
            Err(error) => {
                let _ = socket2::SockRef::from(&stream).set_linger(None);
                Err((stream, error))
            }
        }
    }

    /// Hands a UDP client to the router as a flow to `target` ending after `idle` without a
    /// datagram: `client` is a socket connected to it, `early` what it sent before that socket
    /// was connected. On `Ok` the router holds its own copy of the socket and has the early
    /// datagrams (the caller closes its copy); on `Err` nothing reached the router.
    pub async fn give_udp(
        &self,
        client: &UdpSocket,
        early: &[Bytes],
        target: &FlowTarget,
        idle: Duration,
    ) -> Result<(), NotHanded> {
        let line = self.line(target, Some(idle))?;
        let pipe = early_pipe(early).map_err(NotHanded::Send)?;
        self.hand(&line, &[client.as_fd(), pipe.as_fd()], target)
            .await
    }

    fn line(&self, target: &FlowTarget, idle: Option<Duration>) -> Result<Vec<u8>, NotHanded> {
        let handoff = Handoff {
            target: target.clone(),
            source: self.source.clone(),
            idle,
        };
        if handoff.kind() != self.kind {
            return Err(NotHanded::Line(format!(
                "a {} flow on a {:?} handoff connection",
                target.protocol, self.kind
            )));
        }
        handoff
            .encode()
            .map_err(|error| NotHanded::Line(error.to_string()))
    }

    /// Sends `line` with `fds`; `Ok` once the descriptors went with the line's first bytes.
    async fn hand(
        &self,
        line: &[u8],
        fds: &[BorrowedFd<'_>],
        target: &FlowTarget,
    ) -> Result<(), NotHanded> {
        let mut state = self.state.lock().await;
        let connection = match state.connection.take() {
            Some(connection) => connection,
            None => self.connect(&mut state).await?,
        };
        match send_with_fds(&connection, line, fds).await {
            Ok(()) => {
                state.connection = Some(connection);
                Ok(())
            }
            // The router went away since the last handoff: nothing of this one reached it.
            Err(Sent::Nothing(error)) => Err(NotHanded::Send(error)),
            Err(Sent::Part(error)) => {
                // The descriptors went with the first bytes; the router drops the broken line
                // and with it what came with it (a TCP connection resets).
                tracing::debug!(%error, %target, "handoff broke half-way");
                Ok(())
            }
        }
    }

    async fn connect(&self, state: &mut GiverState) -> Result<UnixStream, NotHanded> {
        if state.not_before.is_some_and(|t| Instant::now() < t) {
            return Err(NotHanded::Paused);
        }
        let path = self.path.display().to_string();
        let attempt = async {
            let mut connection =
                UnixStream::connect(&self.path)
                    .await
                    .map_err(|e| NotHanded::Unreachable {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
            let refused = |reason: String| NotHanded::Refused {
                path: path.clone(),
                reason,
            };
            connection
                .write_all(self.kind.preface())
                .await
                .map_err(|e| refused(e.to_string()))?;
            let mut answer = [0u8; ACCEPTED.len()];
            connection
                .read_exact(&mut answer)
                .await
                .map_err(|e| refused(e.to_string()))?;
            if answer != ACCEPTED {
                return Err(refused(format!(
                    "answered {:?}",
                    String::from_utf8_lossy(&answer)
                )));
            }
            Ok(connection)
        };
        let result = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(NotHanded::Refused {
                    path: path.clone(),
                    reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
                })
            });
        match &result {
            Ok(_) => state.not_before = None,
            Err(error) => {
                let pause = match error {
                    NotHanded::Refused { .. } => RETRY_REFUSED,
                    _ => RETRY_UNREACHABLE,
                };
                tracing::info!(%error, ?pause, "connections go through the tunnel meanwhile");
                state.not_before = Some(Instant::now() + pause);
            }
        }
        result
    }
}

/// How far a send got before it failed.
enum Sent {
    Nothing(io::Error),
    Part(io::Error),
}

/// A pipe holding `early` framed as in a UDP flow, its write end closed: as many of them as fit
/// in [`MAX_EARLY_BYTES`], the rest dropped (UDP may).
fn early_pipe(early: &[Bytes]) -> io::Result<OwnedFd> {
    let mut frames = Vec::new();
    for (sent, datagram) in early.iter().enumerate() {
        let before = frames.len();
        encode_datagram(datagram, &mut frames)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if frames.len() > MAX_EARLY_BYTES {
            frames.truncate(before);
            let dropped = early.len() - sent;
            tracing::debug!(dropped, "early datagrams over the handoff's room dropped");
            break;
        }
    }
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    if frames.len() > rustix::pipe::fcntl_getpipe_size(&write)? {
        rustix::pipe::fcntl_setpipe_size(&write, frames.len())?;
    }
    // The pipe has room for all of it: this write does not block.
    let mut written = 0;
    while written < frames.len() {
        written += rustix::io::write(&write, &frames[written..])?;
    }
    Ok(read)
}

/// Reads the early datagrams of a UDP handoff from its pipe, to the pipe's end.
fn read_early(pipe: OwnedFd) -> io::Result<Vec<Bytes>> {
    // Only a pipe has a pipe size.
    if rustix::pipe::fcntl_getpipe_size(&pipe).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "early datagrams: not a pipe",
        ));
    }
    // The sender closed its end before handing this over: everything is there, and a read
    // that would wait means someone kept the end open, which ends the reading.
    rustix::io::ioctl_fionbio(&pipe, true)?;
    // A buffer of what the pipe holds (whole, as its writer is gone), read at once.
    let waiting = rustix::io::ioctl_fionread(&pipe)? as usize;
    if waiting > MAX_EARLY_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("early datagrams over {MAX_EARLY_BYTES} bytes"),
        ));
    }
    let mut buffer = vec![0u8; waiting];
    let mut filled = 0;
    while filled < waiting {
        match rustix::io::read(&pipe, &mut buffer[filled..]) {
            Ok(0) | Err(rustix::io::Errno::AGAIN) => break,
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    let mut decoder = DatagramDecoder::default();
    let datagrams = decoder
        .push(&buffer[..filled])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if decoder.pending() > 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "early datagrams end inside a datagram",
        ));
    }
    Ok(datagrams.into_iter().map(Bytes::from).collect())
}

/// Sends `line` with `fds` attached to its first byte, all of it.
async fn send_with_fds(
    socket: &UnixStream,
    line: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), Sent> {
    let first = socket
        .async_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(io::Error::other("no room for the descriptors"));
            }
            rustix::net::sendmsg(
                socket,
                &[IoSlice::new(line)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        })
        .await
        .map_err(Sent::Nothing)?;
    let mut sent = first;
    while sent < line.len() {
        let rest = &line[sent..];
        sent += socket
            .async_io(Interest::WRITABLE, || {
                rustix::net::send(socket, rest, SendFlags::NOSIGNAL).map_err(io::Error::from)
            })
            .await
            .map_err(Sent::Part)?;
    }
    Ok(())
}

/// Reads what is there, keeping the descriptors that came with it; 0 at the end.
async fn recv_with_fds(
    socket: &UnixStream,
    buffer: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
) -> io::Result<usize> {
    socket
        .async_io(Interest::READABLE, || {
            let mut space =
                [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_READ))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let received = rustix::net::recvmsg(
                socket,
                &mut [IoSliceMut::new(buffer)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    for fd in received {
                        // Whatever becomes of it here, a connection this side drops resets.
                        let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
                        fds.push_back(fd);
                    }
                }
            }
            if received.flags.contains(ReturnFlags::CTRUNC) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more descriptors than one read takes",
                ));
            }
            Ok(received.bytes)
        })
        .await
}

/// The first byte waiting on a new connection on the router's socket, not taken from it; `None`
/// if the peer closed without sending anything.
pub async fn peek_first(socket: &UnixStream) -> io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    let n = socket
        .async_io(Interest::READABLE, || {
            rustix::net::recv(socket, &mut byte[..], RecvFlags::PEEK)
                .map(|(read, _)| read)
                .map_err(io::Error::from)
        })
        .await?;
    Ok((n == 1).then_some(byte[0]))
}

/// Whether a connection starting with `byte` is a handoff connection (of any kind).
pub fn is_handoff(byte: u8) -> bool {
    byte == Kind::Tcp.preface()[0]
}

/// Reads a handoff connection's preface, up to its newline, and the kind it names.
async fn read_preface(socket: &mut UnixStream) -> io::Result<Result<Kind, String>> {
    // A byte at a time: nothing may be read past the newline, where descriptors begin.
    let mut preface = Vec::with_capacity(MAX_PREFACE);
    while preface.len() < MAX_PREFACE && preface.last() != Some(&b'\n') {
        preface.push(socket.read_u8().await?);
    }
    Ok(Kind::of_preface(&preface).ok_or_else(|| String::from_utf8_lossy(&preface).into_owned()))
}

/// Serves one handoff connection on the router until the sidecar closes it or `shutdown`
/// turns true: reads the preface, answers it, then relays everything handed over through
/// `handler`, as flows of `link`, UDP clients busy polled as `polling` allows.
pub async fn serve<H: Handler>(
    mut socket: UnixStream,
    handler: Arc<H>,
    link: Link,
    preface_timeout: Duration,
    polling: Polling,
    mut shutdown: watch::Receiver<bool>,
) {
    let kind = match tokio::time::timeout(preface_timeout, read_preface(&mut socket)).await {
        Ok(Ok(Ok(kind))) => kind,
        Ok(Ok(Err(preface))) => {
            tracing::debug!(%preface, "not a handoff preface");
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "handoff connection ended before its preface");
            return;
        }
        Err(_) => {
            tracing::debug!("handoff preface timed out");
            return;
        }
    };
    if let Err(error) = socket.write_all(ACCEPTED).await {
        tracing::debug!(%error, "handoff connection ended before it was answered");
        return;
    }
    let mut lines = Lines::default();
    let mut fds = VecDeque::new();
    let mut buffer = vec![0u8; 4096];
    loop {
        let read = tokio::select! {
            read = recv_with_fds(&socket, &mut buffer, &mut fds) => read,
            _ = crate::shutdown::stopped(&mut shutdown) => return,
        };
        let n = match read {
            Ok(0) => return,
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, "handoff connection dropped");
                return;
            }
        };
        let complete = match lines.push(&buffer[..n]) {
            Ok(complete) => complete,
            Err(error) => {
                tracing::warn!(%error, "handoff connection dropped");
                return;
            }
        };
        for line in complete {
            if fds.len() < kind.descriptors() {
                tracing::warn!("handoff line without its descriptors; handoff connection dropped");
                return;
            }
            let handoff = match Handoff::parse(kind, &line) {
                Ok(handoff) => handoff,
                Err(error) => {
                    // What came with it is dropped with the rest (a connection resets).
                    tracing::warn!(%error, "handoff connection dropped");
                    return;
                }
            };
            // As many descriptors are waiting as the kind attaches (checked above).
            let mut attached = fds.drain(..kind.descriptors());
            let handed = match (kind, attached.next(), attached.next(), handoff.idle) {
                (Kind::Tcp, Some(connection), None, None) => {
                    connected_tcp(connection).map(Handed::Tcp)
                }
                (Kind::Udp, Some(socket), Some(pipe), Some(idle)) => {
                    handed_udp(socket, pipe).map(|client| Handed::Udp(client, idle))
                }
                _ => return,
            };
            drop(attached);
            let handed = match handed {
                Ok(handed) => handed,
                Err(error) => {
                    tracing::warn!(%error, target = %handoff.target, "handed-over descriptors refused");
                    continue;
                }
            };
            let request = FlowRequest {
                target: handoff.target,
                source: Some(handoff.source),
                link: link.clone(),
            };
            match handed {
                Handed::Tcp(stream) => {
                    let polling = polling.clone();
                    tokio::spawn(relay(request, stream, polling, handler.clone()))
                }
                Handed::Udp(client, idle) => {
                    let polling = polling.clone();
                    tokio::spawn(relay_udp(request, client, idle, polling, handler.clone()))
                }
            };
        }
    }
}

/// What one handoff line brought, checked.
enum Handed {
    Tcp(TcpStream),
    /// The client's side of the flow and its idle time.
    Udp(Connected, Duration),
}

/// The descriptors of a UDP handoff as the client's side of a flow: the socket connected to
/// the client, with the datagrams read from the pipe to deliver first.
fn handed_udp(socket: OwnedFd, pipe: OwnedFd) -> io::Result<Connected> {
    let socket = connected_socket(socket, socket2::Type::DGRAM, socket2::Protocol::UDP, "UDP")?;
    let early = read_early(pipe)?;
    let socket = UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
    Ok(Connected::with_early(socket, early))
}

/// The descriptor as a connected TCP stream, or why it is not one.
fn connected_tcp(fd: OwnedFd) -> io::Result<TcpStream> {
    let socket = connected_socket(fd, socket2::Type::STREAM, socket2::Protocol::TCP, "TCP")?;
    TcpStream::from_std(std::net::TcpStream::from(socket))
}

/// The descriptor as a connected, non-blocking IP socket of `kind` and `protocol` (named
/// `name` in the error), or why it is not one.
fn connected_socket(
    fd: OwnedFd,
    kind: socket2::Type,
    protocol: socket2::Protocol,
    name: &str,
) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::from(fd);
    let refuse = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
    if socket.r#type()? != kind
        || !matches!(
            socket.domain()?,
            socket2::Domain::IPV4 | socket2::Domain::IPV6
        )
        || socket.protocol()? != Some(protocol)
    {
        return refuse(format!("not a {name} socket"));
    }
    if socket.peer_addr().is_err() {
        return refuse("not a connected socket".into());
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Relays one handed-over connection to the far end `handler` opens for it; one to an endpoint
/// on this node polls a stream's emptied socket as `polling` allows.
async fn relay<H: Handler>(
    request: FlowRequest,
    app: TcpStream,
    polling: Polling,
    handler: Arc<H>,
) {
    let upstream = match handler.open(&request).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            tracing::debug!(target = %request.target, status = %refusal.status, message = %refusal.message, "handed-over connection refused");
            // Still set to reset on close.
            return abort(&app);
        }
    };
    let home = match &upstream {
        Upstream::Flow(flow) => flow.home().cloned(),
        _ => None,
    };
    // The connection moves to the link's thread with its flow.
    let finished = moved_home(home, app, tcp_moved_to, |app| {
        relay_to_end(upstream, app, polling)
    })
    .await;
    handler.finished(&request, &finished);
}

/// Relays a handed-over connection to `upstream` until both ways ended, then closes it: as any
/// connection closes when the relay ran to its end, with a reset when it broke.
async fn relay_to_end(upstream: Upstream, mut app: TcpStream, polling: Polling) -> Finished {
    let finished = super::server::carry(upstream, &mut app, &polling).await;
    if finished.result.is_ok() {
        let _ = socket2::SockRef::from(&app).set_linger(None);
    } else {
        abort(&app);
    }
    finished
}

/// Relays one handed-over UDP client to the far end `handler` opens for it, until the flow has
/// been idle for `idle`; the client's socket is closed then, so its next datagram reaches the
/// sidecar again. A bridge to an endpoint on this node busy polls as `polling` allows, on a
/// thread `polling` has for busy flows while its flow is busy and one is free.
async fn relay_udp<H: Handler>(
    request: FlowRequest,
    client: Connected,
    idle: Duration,
    polling: Polling,
    handler: Arc<H>,
) {
    let upstream = match handler.open(&request).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            // Its datagrams are dropped, as UDP allows; the next one starts over.
            tracing::debug!(target = %request.target, status = %refusal.status, message = %refusal.message, "handed-over UDP client refused");
            return;
        }
    };
    // The client is the local side here: what it sends goes towards the endpoint.
    let finished = match upstream {
        // The bridge moves itself to a thread for busy flows, and back.
        Upstream::Udp(endpoint) => {
            let carried = Carried::default();
            let meter = carried.meter(datagrams::Way::Out);
            let endpoint = Connected::new(endpoint);
            let result = datagrams::bridge(client, endpoint, idle, polling, meter).await;
            carried.finished(result)
        }
        // The client's socket moves to the link's thread with its flow, as a TCP connection does.
        Upstream::Flow(far) => {
            let home = far.home().cloned();
            moved_home(home, client, Connected::moved_to, |client| {
                udp_to_flow(far, client, idle)
            })
            .await
        }
        Upstream::Tcp(_) => Finished::failed(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a UDP client cannot be relayed to a TCP endpoint",
        )),
    };
    handler.finished(&request, &finished);
}

/// Relays a handed-over UDP client to the flow `far` until it has been idle for `idle`.
async fn udp_to_flow(far: FlowStream, client: Connected, idle: Duration) -> Finished {
    let carried = Carried::default();
    let result = datagrams::relay(far, client, idle, carried.meter(datagrams::Way::Out)).await;
    carried.finished(result)
}
