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
use super::busy_poll::{BusyPoll, Polling};
use super::pipe::Source;

/// The local end of a UDP flow.
pub trait Datagrams: Send {
    /// The next datagram to carry; `None` when the local side is done.
    fn recv(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// Delivers a datagram that came through the flow.
    fn send(&mut self, datagram: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// A datagram already there, taken without waiting (for busy polling); `None` when there
    /// is none, or when this side cannot tell without waiting.
    fn take_waiting(&mut self) -> io::Result<Option<Bytes>> {
        Ok(None)
    }
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
/// side fails. After each datagram it busy polls both sides as `polling` allows before it
/// sleeps, yielding the CPU between polls. `meter` sees `a`'s datagrams as [`Way::Out`] and
/// `b`'s as [`Way::In`].
pub async fn bridge(
    mut a: impl Datagrams,
    mut b: impl Datagrams,
    idle: Duration,
    polling: Polling,
    meter: impl Fn(Way, usize) + Send,
) -> io::Result<()> {
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    let mut poll = BusyPoll::new(polling);
    loop {
        let caught = match poll.window() {
            Some(window) => loop {
                if let Some(datagram) = a.take_waiting()? {
                    break Some((Way::Out, datagram));
                }
                if let Some(datagram) = b.take_waiting()? {
                    break Some((Way::In, datagram));
                }
                if !window.open() {
                    break None;
                }
                window.pause();
            },
            None => None,
        };
        let (way, datagram) = match caught {
            Some(caught) => caught,
            None => tokio::select! {
                next = a.recv() => match next? {
                    Some(datagram) => (Way::Out, datagram),
                    None => break,
                },
                next = b.recv() => match next? {
                    Some(datagram) => (Way::In, datagram),
                    None => break,
                },
                _ = &mut deadline => break,
            },
        };
        poll.arrived();
        match way {
            Way::Out => b.send(&datagram).await?,
            Way::In => a.send(&datagram).await?,
        }
        meter(way, datagram.len());
        poll.forwarded(way);
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

    /// The same socket and datagrams, the socket served by the runtime `home` from now on (the
    /// thread of the link carrying its flow).
    pub fn moved_to(self, home: &tokio::runtime::Handle) -> io::Result<Connected> {
        let socket = self.socket.into_std()?;
        let _entered = home.enter();
        Ok(Connected {
            socket: UdpSocket::from_std(socket)?,
            early: self.early,
        })
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
            match received(|buffer| self.socket.try_recv(buffer)) {
                Ok(datagram) => return Ok(Some(datagram)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }

    async fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        self.socket.send(datagram).await.map(|_| ())
    }

    fn take_waiting(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(datagram) = self.early.pop_front() {
            return Ok(Some(datagram));
        }
        // Asked of the socket itself: the runtime learns of readiness only when it polls.
        let asked = received(|buffer| {
            rustix::net::recv(&self.socket, buffer, rustix::net::RecvFlags::DONTWAIT)
                .map(|(n, _)| n)
                .map_err(io::Error::from)
        });
        match asked {
            Ok(datagram) => Ok(Some(datagram)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// A datagram `receive` puts in this thread's buffer, copied out at its size. No await while
/// the buffer is borrowed: receiving and copying out is one step.
fn received(receive: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<Bytes> {
    RECEIVED.with_borrow_mut(|buffer| {
        let n = receive(buffer)?;
        Ok(Bytes::copy_from_slice(&buffer[..n]))
    })
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Two UDP sockets on loopback connected to each other.
    async fn connected_pair() -> (UdpSocket, UdpSocket) {
        let one = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let two = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        one.connect(two.local_addr().expect("addr"))
            .await
            .expect("connect");
        two.connect(one.local_addr().expect("addr"))
            .await
            .expect("connect");
        (one, two)
    }

    #[test]
    fn a_client_moved_to_a_link_thread_is_served_there_with_its_early_datagrams() {
        // Made on a runtime that is not driven afterwards: a socket left registered with it
        // would never be woken on the link thread.
        let made = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let threads = crate::links::LinkThreads::start(1).expect("threads");
        let home = threads.next();
        let (app, mut moved) = made.block_on(async {
            let (app, near) = connected_pair().await;
            let client = Connected::with_early(near, vec![Bytes::from_static(b"early")]);
            (app, client.moved_to(&home).expect("moved"))
        });
        let app = app.into_std().expect("std");
        app.set_nonblocking(false).expect("blocking");
        app.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (done, received) = std::sync::mpsc::channel();
        home.spawn(async move {
            let first = moved.recv().await.expect("recv").expect("a datagram");
            let second = moved.recv().await.expect("recv").expect("a datagram");
            moved.send(b"answer").await.expect("send");
            let thread = std::thread::current().name().map(str::to_string);
            let _ = done.send(((first, second), thread));
        });
        app.send(b"later").expect("send");
        let (datagrams, thread) = received
            .recv_timeout(Duration::from_secs(5))
            .expect("the moved socket was served on the link thread");
        assert_eq!(
            datagrams,
            (Bytes::from_static(b"early"), Bytes::from_static(b"later"))
        );
        assert_eq!(thread.as_deref(), Some("link-0"));
        let mut answer = [0u8; 16];
        let n = app.recv(&mut answer).expect("answer");
        assert_eq!(&answer[..n], b"answer");
        drop(made);
    }

    /// An app and a server bridged as the router bridges them, busy polling for `budget`;
    /// returns the app's socket, the server's, the bridge, and what its meter counted each way.
    async fn bridged(
        budget: Duration,
        idle: Duration,
    ) -> (
        UdpSocket,
        UdpSocket,
        tokio::task::JoinHandle<io::Result<()>>,
        Arc<[AtomicUsize; 2]>,
    ) {
        let (app, near) = connected_pair().await;
        let (far, server) = connected_pair().await;
        let counted: Arc<[AtomicUsize; 2]> = Arc::default();
        let meter = {
            let counted = counted.clone();
            move |way, n| {
                counted[usize::from(way == Way::In)].fetch_add(n, Ordering::Relaxed);
            }
        };
        let bridge = tokio::spawn(bridge(
            Connected::new(near),
            Connected::new(far),
            idle,
            Polling::new(budget),
            meter,
        ));
        (app, server, bridge, counted)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn datagrams_keep_their_boundaries_and_order_both_ways_polled_or_not() {
        for budget in [Duration::ZERO, Duration::from_millis(1)] {
            let (app, server, _bridge, counted) = bridged(budget, Duration::from_secs(60)).await;
            let mut sent = 0;
            let mut buffer = vec![0u8; MAX_DATAGRAM];
            for i in 0..300usize {
                let datagram: Vec<u8> = (0..(i * 37) % 1500).map(|b| (b + i) as u8).collect();
                app.send(&datagram).await.expect("send");
                let n = server.recv(&mut buffer).await.expect("server recv");
                assert_eq!(&buffer[..n], &datagram[..], "datagram {i} out ({budget:?})");
                let answer: Vec<u8> = datagram.iter().rev().copied().collect();
                server.send(&answer).await.expect("answer");
                let n = app.recv(&mut buffer).await.expect("app recv");
                assert_eq!(&buffer[..n], &answer[..], "datagram {i} in ({budget:?})");
                sent += datagram.len();
            }
            let out = counted[0].load(Ordering::Relaxed);
            let back = counted[1].load(Ordering::Relaxed);
            assert_eq!((out, back), (sent, sent), "metered ({budget:?})");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_polled_bridge_that_goes_quiet_ends_after_its_idle_time() {
        let idle = Duration::from_millis(200);
        let (app, server, bridge, _) = bridged(Duration::from_millis(1), idle).await;
        let mut buffer = [0u8; 16];
        app.send(b"ping").await.expect("send");
        let n = server.recv(&mut buffer).await.expect("recv");
        server.send(&buffer[..n]).await.expect("answer");
        app.recv(&mut buffer).await.expect("answer back");
        let ended = tokio::time::timeout(Duration::from_secs(20), bridge)
            .await
            .expect("the bridge ended when idle")
            .expect("join");
        assert!(ended.is_ok(), "{ended:?}");
    }
}
