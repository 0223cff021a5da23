//! A UDP flow: datagrams from a local socket are framed into the flow's stream, frames from the
//! stream are sent back as datagrams, until either side goes quiet for the idle timeout or ends
//! the flow. The same pump runs in the sidecar (local side: one client of a listening socket) and
//! in the router (local side: a socket connected to the endpoint).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use servicekeel_api::tunnel::{DatagramDecoder, MAX_DATAGRAM, encode_datagram};
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::FlowStream;
use super::pipe::Source;

/// The local end of a UDP flow.
pub trait Datagrams: Send {
    /// The next datagram to carry; `None` when the local side is done.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// Delivers a datagram that came through the flow.
    fn send(&mut self, datagram: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
}

/// Which way bytes went, for metering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the local side into the flow.
    Out,
    /// From the flow to the local side.
    In,
}

/// Pumps until the flow ends cleanly (either side), the idle timeout passes, or an error.
/// `meter` sees the payload bytes of every datagram carried.
pub async fn relay(
    mut flow: FlowStream,
    mut local: impl Datagrams,
    idle: Duration,
    meter: impl Fn(Way, usize) + Send,
) -> io::Result<()> {
    let mut decoder = DatagramDecoder::default();
    // Grows to the largest datagram carried, not to the largest possible one.
    let mut frame = Vec::new();
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            chunk = std::future::poll_fn(|cx| flow.poll_chunk(cx)) => {
                let Some(chunk) = chunk? else {
                    if decoder.pending() > 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "flow ended inside a datagram",
                        ));
                    }
                    break;
                };
                let datagrams = decoder
                    .push(&chunk)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                for datagram in datagrams {
                    local.send(&datagram).await?;
                    meter(Way::In, datagram.len());
                }
                // Credit goes back once the datagrams are delivered.
                flow.consumed(chunk.len());
                deadline.as_mut().reset(Instant::now() + idle);
            }
            next = local.recv() => {
                let Some(datagram) = next? else { break };
                frame.clear();
                encode_datagram(&datagram, &mut frame)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                flow.write_all(&frame).await?;
                meter(Way::Out, datagram.len());
                deadline.as_mut().reset(Instant::now() + idle);
            }
            _ = &mut deadline => break,
        }
    }
    flow.shutdown().await
}

/// Pumps datagrams between two local sockets (the router's side of a UDP client handed over:
/// the client's socket `a`, the endpoint's `b`) until the flow has been idle for `idle` or a
/// side fails. `meter` sees `a`'s datagrams as [`Way::Out`] and `b`'s as [`Way::In`].
pub async fn bridge(
    mut a: impl Datagrams,
    mut b: impl Datagrams,
    idle: Duration,
    meter: impl Fn(Way, usize) + Send,
) -> io::Result<()> {
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = a.recv() => {
                let Some(datagram) = next? else { break };
                b.send(&datagram).await?;
                meter(Way::Out, datagram.len());
            }
            next = b.recv() => {
                let Some(datagram) = next? else { break };
                a.send(&datagram).await?;
                meter(Way::In, datagram.len());
            }
            _ = &mut deadline => break,
        }
        deadline.as_mut().reset(Instant::now() + idle);
    }
    Ok(())
}

/// A socket connected to one peer: the endpoint (the router's side of a flow), or a client
/// handed over by its sidecar, whose datagrams sent before the socket existed come first.
#[derive(Debug)]
pub struct Connected {
    socket: UdpSocket,
    early: std::collections::VecDeque<Bytes>,
}

impl Connected {
    pub fn new(socket: UdpSocket) -> Self {
        Connected::with_early(socket, Vec::new())
    }

    /// `early` is received before anything the socket holds.
    pub fn with_early(socket: UdpSocket, early: Vec<Bytes>) -> Self {
        Connected {
            socket,
            early: early.into(),
        }
    }
}

thread_local! {
    /// Where datagrams are received before being copied out at their size: one buffer of the
    /// largest datagram per thread, not one per flow.
    static RECEIVED: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

impl Datagrams for Connected {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(datagram) = self.early.pop_front() {
            return Ok(Some(datagram));
        }
        loop {
            self.socket.readable().await?;
            // No await while the buffer is borrowed: receiving and copying out is one step.
            let received = RECEIVED.with_borrow_mut(|buffer| {
                self.socket
                    .try_recv(buffer)
                    .map(|n| Bytes::copy_from_slice(&buffer[..n]))
            });
            match received {
                Ok(datagram) => return Ok(Some(datagram)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }

    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send(datagram).await.map(|_| ())
    }
}

/// How long a UDP flow may stay quiet once its side is shutting down before it ends.
pub const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// One client of a shared listening socket (the sidecar's side): datagrams from that client
/// arrive through a channel, replies go to its address.
#[derive(Debug)]
pub struct Client {
    pub incoming: mpsc::Receiver<Bytes>,
    pub socket: Arc<UdpSocket>,
    pub peer: std::net::SocketAddr,
}

impl Datagrams for Client {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.incoming.recv().await)
    }

    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send_to(datagram, self.peer).await.map(|_| ())
    }
}

/// A local side that, once `draining` turns true, is done after [`DRAIN_QUIET`] without a
/// datagram from it, rather than when the idle timeout passes: UDP has no end of its own to
/// wait for when the sidecar shuts down.
#[derive(Debug)]
pub struct UntilDrained<L> {
    pub local: L,
    pub draining: watch::Receiver<bool>,
}

impl<L: Datagrams> Datagrams for UntilDrained<L> {
    async fn recv(&mut self) -> io::Result<Option<Bytes>> {
        if !*self.draining.borrow() {
            tokio::select! {
                next = self.local.recv() => return next,
                _ = self.draining.wait_for(|d| *d) => {}
            }
        }
        match tokio::time::timeout(DRAIN_QUIET, self.local.recv()).await {
            Ok(next) => next,
            Err(_) => Ok(None),
        }
    }

    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.local.send(datagram).await
    }
}
