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
use super::busy_poll::{BusyPoll, Home, Polling, QUIET};
use super::pipe::Source;
use super::server::spawned_on;

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
/// sleeps, yielding the CPU between polls; while its flow is busy it runs on a thread `polling`
/// has for busy flows, when one is free (see [`super::busy_poll`]), and where it was spawned
/// otherwise. `meter` sees `a`'s datagrams as [`Way::Out`] and `b`'s as [`Way::In`].
pub async fn bridge(
    a: Connected,
    b: Connected,
    idle: Duration,
    polling: Polling,
    meter: impl Fn(Way, usize) + Send + 'static,
) -> io::Result<()> {
    let here = tokio::runtime::Handle::current();
    let mut bridge = Bridge {
        a,
        b,
        idle,
        deadline: Instant::now() + idle,
        poll: BusyPoll::new(polling),
        meter,
    };
    // Held while the bridge runs on a thread for busy flows.
    let mut home: Option<Home> = None;
    loop {
        let leg = match &home {
            None => bridge.run(false).await?,
            Some(home) => {
                let on_thread = async move {
                    let leg = bridge.run(true).await;
                    (bridge, leg)
                };
                let (back, leg) =
                    spawned_on(home.runtime(), "the UDP relay thread", on_thread).await?;
                bridge = back;
                leg?
            }
        };
        match leg {
            Leg::Ended => return Ok(()),
            Leg::Move(thread) => {
                bridge = bridge.moved_to(thread.runtime())?;
                home = Some(thread);
            }
            Leg::Back => {
                bridge = bridge.moved_to(&here)?;
                // Given back once the sockets are off the thread.
                home = None;
            }
        }
    }
}

/// A bridge's sockets and state, which move with it between runtimes.
struct Bridge<M> {
    a: Connected,
    b: Connected,
    idle: Duration,
    /// When the flow will have been idle for `idle`.
    deadline: Instant,
    poll: BusyPoll,
    meter: M,
}

/// How a stretch of a bridge on one runtime ended.
enum Leg {
    /// The flow ended: a side was done, or it was idle for its idle time.
    Ended,
    /// The bridge took a thread for busy flows, and moves there.
    Move(Home),
    /// The bridge on that thread gives it back, and moves back where it was spawned.
    Back,
}

impl<M: Fn(Way, usize) + Send> Bridge<M> {
    /// Pumps until the flow ends or the bridge moves: off a thread (`on_thread` false) once it
    /// takes one, on it once more flows are busy than there are threads or, holding the
    /// thread, it waited [`QUIET`] for a datagram.
    async fn run(&mut self, on_thread: bool) -> io::Result<Leg> {
        let deadline = tokio::time::sleep_until(self.deadline);
        tokio::pin!(deadline);
        loop {
            let caught = match self.poll.window(on_thread) {
                Some(window) => window.poll(|| {
                    if let Some(datagram) = self.a.take_waiting()? {
                        return Ok(Some((Way::Out, datagram)));
                    }
                    Ok(self.b.take_waiting()?.map(|datagram| (Way::In, datagram)))
                })?,
                None => None,
            };
            let leaves_when_quiet = self.poll.holds_thread(on_thread);
            let quiet = async move {
                if leaves_when_quiet {
                    tokio::time::sleep(QUIET).await
                } else {
                    std::future::pending().await
                }
            };
            let (way, datagram) = match caught {
                Some(caught) => caught,
                None => tokio::select! {
                    next = self.a.recv() => match next? {
                        Some(datagram) => (Way::Out, datagram),
                        None => return Ok(Leg::Ended),
                    },
                    next = self.b.recv() => match next? {
                        Some(datagram) => (Way::In, datagram),
                        None => return Ok(Leg::Ended),
                    },
                    _ = &mut deadline => return Ok(Leg::Ended),
                    _ = quiet => return Ok(Leg::Back),
                },
            };
            self.poll.arrived();
            match way {
                Way::Out => self.b.send(&datagram).await?,
                Way::In => self.a.send(&datagram).await?,
            }
            (self.meter)(way, datagram.len());
            self.poll.forwarded(way);
            self.deadline = Instant::now() + self.idle;
            deadline.as_mut().reset(self.deadline);
            if on_thread {
                if self.poll.crowded() {
                    return Ok(Leg::Back);
                }
            } else if let Some(home) = self.poll.take_thread() {
                return Ok(Leg::Move(home));
            }
        }
    }

    /// The same bridge, its sockets served by the runtime `home` from now on.
    fn moved_to(self, home: &tokio::runtime::Handle) -> io::Result<Self> {
        Ok(Bridge {
            a: self.a.moved_to(home)?,
            b: self.b.moved_to(home)?,
            ..self
        })
    }
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
        let counted: Arc<[AtomicUsize; 2]> = Arc::default();
        let meter = {
            let counted = counted.clone();
            move |way, n| {
                counted[usize::from(way == Way::In)].fetch_add(n, Ordering::Relaxed);
            }
        };
        let (app, server, bridge) = bridged_with(Polling::new(budget), idle, meter).await;
        (app, server, bridge, counted)
    }

    async fn bridged_with(
        polling: Polling,
        idle: Duration,
        meter: impl Fn(Way, usize) + Send + 'static,
    ) -> (
        UdpSocket,
        UdpSocket,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let (app, near) = connected_pair().await;
        let (far, server) = connected_pair().await;
        let bridge = tokio::spawn(bridge(
            Connected::new(near),
            Connected::new(far),
            idle,
            polling,
            meter,
        ));
        (app, server, bridge)
    }

    /// A blocking socket for an app or a server of its own thread, as the router's peers are
    /// processes of their own (a peer woken through the bridge's own runtime would wait for
    /// the CPU the bridge polls on).
    fn blocking(socket: UdpSocket) -> std::net::UdpSocket {
        let socket = socket.into_std().expect("std");
        socket.set_nonblocking(false).expect("blocking");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket
    }

    /// A server echoing each datagram on a thread of its own, until its socket times out.
    fn echo_server(server: UdpSocket) {
        let server = blocking(server);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 64];
            while let Ok(n) = server.recv(&mut buffer) {
                if server.send(&buffer[..n]).is_err() {
                    break;
                }
            }
        });
    }

    /// One datagram from the app echoed back by the server, through the bridge.
    fn echoed(app: &std::net::UdpSocket, datagram: &[u8]) {
        let mut buffer = [0u8; 64];
        app.send(datagram).expect("send");
        let n = app.recv(&mut buffer).expect("echo");
        assert_eq!(&buffer[..n], datagram);
    }

    /// Echoes until `until` holds for the threads the bridge forwarded on, calling `between`
    /// after each round trip; whether it came to hold within 30 s (a loaded machine may
    /// take many round trips to give a flow eight datagrams in a row within a millisecond).
    fn echoed_until(
        app: &std::net::UdpSocket,
        forwarded_on: &std::sync::Mutex<Vec<Option<String>>>,
        mut between: impl FnMut(),
        until: impl Fn(&[Option<String>]) -> bool,
    ) -> bool {
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        for i in 0u32.. {
            if std::time::Instant::now() > give_up {
                break;
            }
            echoed(app, &i.to_be_bytes());
            between();
            if until(&forwarded_on.lock().expect("names")) {
                return true;
            }
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_flow_moves_to_a_thread_and_back_when_crowded_or_quiet() {
        let thread = crate::links::LinkThreads::start_named(1, "bridge-test").expect("thread");
        let polling = Polling::new(Duration::from_millis(1)).on_threads(thread);
        let forwarded_on: Arc<std::sync::Mutex<Vec<Option<String>>>> = Arc::default();
        let meter = {
            let forwarded_on = forwarded_on.clone();
            move |_, _| {
                let name = std::thread::current().name().map(String::from);
                forwarded_on.lock().expect("names").push(name);
            }
        };
        let (app, server, _bridge) =
            bridged_with(polling.clone(), Duration::from_secs(60), meter).await;
        echo_server(server);
        let app = blocking(app);
        let on_thread = |name: &Option<String>| name.as_deref() == Some("bridge-test-0");
        let last_on_thread = |names: &[Option<String>]| names.last().is_some_and(on_thread);
        let last_off_thread = |names: &[Option<String>]| !last_on_thread(names);
        assert!(
            echoed_until(&app, &forwarded_on, || {}, last_on_thread),
            "a busy flow moved to the free thread"
        );
        assert!(
            !on_thread(&forwarded_on.lock().expect("names")[0]),
            "its first datagram was forwarded where the bridge was spawned"
        );

        // Two more busy flows: one polls on the runtime with the turn, and the other, active,
        // finds the thread held and the turn taken after each of its datagrams.
        let mut polling_there = BusyPoll::new(polling.clone());
        let mut other = BusyPoll::new(polling);
        let more_busy_flows = || {
            for poll in [&mut polling_there, &mut other] {
                for way in [Way::Out, Way::In].into_iter().cycle().take(9) {
                    poll.arrived();
                    poll.forwarded(way);
                }
            }
            let turn = polling_there.window(false);
            drop(other.window(false));
            drop(turn);
        };
        assert!(
            echoed_until(&app, &forwarded_on, more_busy_flows, last_off_thread),
            "crowded, the bridge gave the thread back"
        );
        forwarded_on.lock().expect("names").clear();
        assert!(
            echoed_until(&app, &forwarded_on, || {}, last_on_thread),
            "alone again after the hold-off, it moved back to the thread"
        );

        // Quiet for longer than QUIET: the next datagrams are forwarded off the thread.
        std::thread::sleep(QUIET * 3);
        forwarded_on.lock().expect("names").clear();
        echoed(&app, b"after a while");
        // The meter counts a datagram once it is sent.
        let metered = || forwarded_on.lock().expect("names").clone();
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        while metered().len() < 2 && std::time::Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(1));
        }
        let names = metered();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            !names.iter().any(on_thread),
            "quiet, the bridge gave the thread back: {names:?}"
        );
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
            // The meter counts a datagram once it is sent, so the app may see the last echo
            // before the meter does.
            let metered = || {
                (
                    counted[0].load(Ordering::Relaxed),
                    counted[1].load(Ordering::Relaxed),
                )
            };
            let give_up = std::time::Instant::now() + Duration::from_secs(5);
            while metered() != (sent, sent) && std::time::Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(metered(), (sent, sent), "metered ({budget:?})");
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
