//! Handing accepted TCP connections to the router over its Unix socket (`SCM_RIGHTS`), so that
//! a connection has one relay (the router) instead of two; the contract is
//! `servicekeel_api::tunnel::handoff`.
//!
//! - [`Giver`]: the sidecar's side. It keeps one handoff connection to the router; a connection
//!   it cannot hand over (no router, a router that does not take handoffs) is given back to the
//!   caller, who carries it in a tunnel flow instead.
//! - [`serve`]: the router's side, for a connection whose first byte is the handoff preface.
//!
//! Nothing is lost in between: the sidecar sets the connection to close with a reset before
//! handing it over, and the router clears that only once it has relayed the connection to its
//! end. A connection that is dropped anywhere on the way (a handoff connection that breaks with
//! descriptors unread, a router that dies mid-relay) is reset towards the application, which
//! sees the failure instead of a clean end.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use servicekeel_api::tunnel::handoff::{ACCEPTED, Handoff, Lines, PREFACE};
use servicekeel_api::tunnel::{FlowTarget, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Mutex, watch};

use super::server::{FlowRequest, Handler, Link, abort};

/// How long connecting and the router's answer to the preface may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After the router could not be reached, handoffs are not tried again for this long (the
/// tunnel, with its own retries, carries connections meanwhile).
const RETRY_UNREACHABLE: Duration = Duration::from_secs(1);
/// After a router that does not take handoffs, they are not tried again for this long.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// Descriptors room is made for in one read; the sender attaches one per line.
const MAX_FDS_PER_READ: usize = 32;

/// The sidecar's side: hands connections to the router at `path`.
#[derive(Debug)]
pub struct Giver {
    path: PathBuf,
    source: Source,
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
    pub fn new(path: PathBuf, source: Source) -> Self {
        Giver {
            path,
            source,
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
        let line = match (Handoff {
            target: target.clone(),
            source: self.source.clone(),
        })
        .encode()
        {
            Ok(line) => line,
            Err(error) => return Err((stream, NotHanded::Line(error.to_string()))),
        };
        let mut state = self.state.lock().await;
        let connection = match state.connection.take() {
            Some(connection) => connection,
            None => match self.connect(&mut state).await {
                Ok(connection) => connection,
                Err(error) => return Err((stream, error)),
            },
        };
        // A reset, not a FIN, if the connection is dropped before the router has relayed it.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        match send_with_fd(&connection, &line, stream.as_fd()).await {
            Ok(()) => {
                state.connection = Some(connection);
                Ok(())
            }
            Err(Sent::Nothing(error)) => {
                // The router went away since the last handoff: nothing of this one reached it.
                let _ = socket2::SockRef::from(&stream).set_linger(None);
                Err((stream, NotHanded::Send(error)))
            }
            Err(Sent::Part(error)) => {
                // The descriptor went with the first bytes; the router drops the broken line and
                // with it the connection, which resets.
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
                .write_all(PREFACE)
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

/// Sends `line` with `fd` attached to its first byte, all of it.
async fn send_with_fd(socket: &UnixStream, line: &[u8], fd: BorrowedFd<'_>) -> Result<(), Sent> {
    let first = socket
        .async_io(Interest::WRITABLE, || {
            let fds = [fd];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(io::Error::other("no room for the descriptor"));
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

/// Whether a connection starting with `byte` is a handoff connection.
pub fn is_handoff(byte: u8) -> bool {
    byte == PREFACE[0]
}

/// Serves one handoff connection on the router until the sidecar closes it or `shutdown`
/// turns true: checks the preface, answers it, then relays every connection handed over
/// through `handler`, as a flow of `link`.
pub async fn serve<H: Handler>(
    mut socket: UnixStream,
    handler: Arc<H>,
    link: Link,
    preface_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut preface = [0u8; PREFACE.len()];
    match tokio::time::timeout(preface_timeout, socket.read_exact(&mut preface)).await {
        Ok(Ok(_)) if preface == PREFACE => {}
        Ok(Ok(_)) => {
            tracing::debug!(preface = %String::from_utf8_lossy(&preface), "not a handoff preface");
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
    }
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
            let Some(fd) = fds.pop_front() else {
                tracing::warn!("handoff line without a connection; handoff connection dropped");
                return;
            };
            let handoff = match Handoff::parse(&line) {
                Ok(handoff) => handoff,
                Err(error) => {
                    // The connection it came with is dropped, and resets.
                    tracing::warn!(%error, "handoff connection dropped");
                    return;
                }
            };
            let stream = match connected_tcp(fd) {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, target = %handoff.target, "handed-over descriptor refused");
                    continue;
                }
            };
            let request = FlowRequest {
                target: handoff.target,
                source: Some(handoff.source),
                link: link.clone(),
            };
            tokio::spawn(relay(request, stream, handler.clone()));
        }
    }
}

/// The descriptor as a connected TCP stream, or why it is not one.
fn connected_tcp(fd: OwnedFd) -> io::Result<TcpStream> {
    let socket = socket2::Socket::from(fd);
    let refuse = |what: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            what.to_string(),
        ))
    };
    if socket.r#type()? != socket2::Type::STREAM
        || !matches!(
            socket.domain()?,
            socket2::Domain::IPV4 | socket2::Domain::IPV6
        )
        || socket.protocol()? != Some(socket2::Protocol::TCP)
    {
        return refuse("not a TCP socket");
    }
    if socket.peer_addr().is_err() {
        return refuse("not a connected socket");
    }
    socket.set_nonblocking(true)?;
    TcpStream::from_std(std::net::TcpStream::from(socket))
}

/// Relays one handed-over connection to the far end `handler` opens for it.
async fn relay<H: Handler>(request: FlowRequest, mut app: TcpStream, handler: Arc<H>) {
    let upstream = match handler.open(&request).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            tracing::debug!(target = %request.target, status = %refusal.status, message = %refusal.message, "handed-over connection refused");
            // Still set to reset on close.
            return abort(&app);
        }
    };
    let finished = super::server::carry(upstream, &mut app).await;
    if finished.result.is_ok() {
        // Relayed to its end: close it as any connection closes.
        let _ = socket2::SockRef::from(&app).set_linger(None);
    } else {
        abort(&app);
    }
    handler.finished(&request, &finished);
}
