//! UDP: one flow per client address. With a router that takes UDP handoffs, each new client gets
//! a socket of its own, bound to the listener's address and connected to the client (the kernel
//! delivers the client's datagrams to it from then on), which is handed to the router with what
//! the client sent before it existed: the router relays the client alone. Otherwise, or when the
//! router does not take it, the listener reads every datagram and hands it to its client's flow
//! through a bounded queue (or the client's own socket carries it) and the flow goes through the
//! tunnel. A flow ends when it has been idle for the configured time, and then the client's next
//! datagram opens a new one. A full queue or a listener at its client limit
//! (`SIDECAR_UDP_MAX_CLIENTS`) drops datagrams (UDP may) and counts them. A closed listener keeps
//! serving the flows it has until they end.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use bytes::Bytes;
use servicekeel_api::Protocol;
use servicekeel_api::tunnel::{FlowTarget, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::{Context, UDP_QUEUE};
use crate::metrics::{DropReason, FlowOutcome};
use crate::shutdown::stopped;
use crate::tunnel::datagrams::{self, Connected, Datagrams, UntilDrained, Way};
use crate::tunnel::handoff::Giver;

pub(super) async fn serve(
    socket: UdpSocket,
    target: FlowTarget,
    context: Context,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(SocketAddr::V4(local)) = socket.local_addr() else {
        return;
    };
    let (ended, mut ended_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut listener = Listener {
        socket: Arc::new(socket),
        local,
        target,
        context,
        clients: HashMap::new(),
        ended,
        accepting: true,
        buffer: vec![0u8; MAX_DATAGRAM],
    };
    loop {
        tokio::select! {
            received = listener.socket.recv_from(&mut listener.buffer) => {
                match received {
                    Ok((n, peer)) => {
                        let datagram = Bytes::copy_from_slice(&listener.buffer[..n]);
                        listener.dispatch(peer, datagram);
                    }
                    Err(error) => {
                        // ICMP errors from earlier replies surface here; the socket is fine.
                        tracing::debug!(%error, target = %listener.target, "receive failed");
                    }
                }
            }
            Some(peer) = ended_rx.recv() => {
                if listener.clients.get(&peer).is_some_and(|q| q.is_closed()) {
                    listener.clients.remove(&peer);
                }
            }
            _ = stopped(&mut stop), if listener.accepting => listener.accepting = false,
        }
        if !listener.accepting && listener.clients.values().all(|q| q.is_closed()) {
            return;
        }
    }
}

struct Listener {
    socket: Arc<UdpSocket>,
    local: SocketAddrV4,
    target: FlowTarget,
    context: Context,
    /// Each client's queue; a client with a socket of its own has one too, never written, which
    /// its flow holds open while it lasts (for the client limit).
    clients: HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    ended: mpsc::UnboundedSender<SocketAddr>,
    accepting: bool,
    buffer: Vec<u8>,
}

impl Listener {
    /// Delivers a datagram from `peer` to its client's flow, starting one for a new client.
    fn dispatch(&mut self, peer: SocketAddr, datagram: Bytes) {
        let mut pending = VecDeque::from([(peer, datagram)]);
        while let Some((peer, datagram)) = pending.pop_front() {
            if let Some(queue) = self.clients.get(&peer).filter(|q| !q.is_closed()) {
                if queue.try_send(datagram).is_err() {
                    self.context.metrics.datagram_dropped(DropReason::QueueFull);
                }
                continue;
            }
            if !self.accepting {
                continue;
            }
            self.clients.retain(|_, queue| !queue.is_closed());
            if self.clients.len() >= self.context.udp_max_clients {
                self.context.metrics.datagram_dropped(DropReason::FlowLimit);
                continue;
            }
            let (queue, incoming) = mpsc::channel(UDP_QUEUE);
            self.clients.insert(peer, queue.clone());
            let local = match self.own_socket(peer) {
                Some((socket, strays, giver)) => {
                    let early = self.early(peer, datagram, strays, &mut pending);
                    Local::Own {
                        socket,
                        early,
                        giver,
                        _held: incoming,
                    }
                }
                None => {
                    let _ = queue.try_send(datagram);
                    Local::Queued(datagrams::Client {
                        incoming,
                        socket: self.socket.clone(),
                        peer,
                    })
                }
            };
            tokio::spawn(flow(
                local,
                peer,
                self.target.clone(),
                self.context.clone(),
                *self.local.ip(),
                self.ended.clone(),
            ));
        }
    }

    /// A socket of the client's own, the datagrams it received before it was connected, and
    /// who hands it to the router, when the router may take it; `None` to use the queue.
    fn own_socket(&mut self, peer: SocketAddr) -> Option<(UdpSocket, Strays, Arc<Giver>)> {
        let giver = self.context.udp_handoff.clone()?;
        match connected_to(self.local, peer, &mut self.buffer) {
            Ok((socket, strays)) => Some((socket, strays, giver)),
            Err(error) => {
                tracing::debug!(%error, %peer, "no socket of its own; the client is queued");
                None
            }
        }
    }

    /// The datagrams `peer` sent before its own socket was connected, in the order sent:
    /// `first`, every one still waiting on the listener, then those its own socket received
    /// before it was connected (`strays`; from then on the kernel delivers its datagrams to its
    /// own socket). Other clients' datagrams found on the way go to `others`, in order.
    fn early(
        &mut self,
        peer: SocketAddr,
        first: Bytes,
        strays: Strays,
        others: &mut VecDeque<(SocketAddr, Bytes)>,
    ) -> Vec<Bytes> {
        let mut early = vec![first];
        let mut sort = |from: SocketAddr, datagram: Bytes| {
            if from != peer {
                others.push_back((from, datagram));
            } else if early.len() < UDP_QUEUE {
                early.push(datagram);
            } else {
                self.context.metrics.datagram_dropped(DropReason::QueueFull);
            }
        };
        loop {
            match self.socket.try_recv_from(&mut self.buffer) {
                Ok((n, from)) => sort(from, Bytes::copy_from_slice(&self.buffer[..n])),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    tracing::debug!(%error, target = %self.target, "receive failed");
                }
            }
        }
        // Those came later: the listener stopped receiving when the client's socket was bound.
        for (from, datagram) in strays {
            sort(from, datagram);
        }
        early
    }
}

/// A non-blocking UDP socket bound to `local` with address reuse, which lets each client's own
/// socket bind beside the listener.
pub(super) fn bound_to(local: SocketAddrV4) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::V4(local).into())?;
    Ok(socket)
}

/// Datagrams read from a socket other than the listener, with their senders.
type Strays = Vec<(SocketAddr, Bytes)>;

/// A UDP socket bound to `local`, beside the listener, and connected to `peer`, with the
/// datagrams it received before it was connected and their senders. Between its bind and its
/// connect it is one more socket on the listener's address, the newest, which the kernel gives
/// any client's datagram; connecting does not take those out of its queue, and read from a
/// connected socket they would pass for `peer`'s. `buffer` holds the largest datagram.
///
/// A datagram the kernel gave the socket just before the connect can still be queued just after
/// it (it was bound for this socket, and is on its way in): read out with the others, it would
/// come too late, and pass for `peer`'s to whoever reads the socket from then on (the router,
/// which would carry another client's datagram, and its answer, in `peer`'s flow). So before the
/// socket is read out, it takes a filter that lets only `peer`'s datagrams in ([`only_from`]):
/// such a late one is dropped by the kernel, and its sender's next datagram reaches the listener.
fn connected_to(
    local: SocketAddrV4,
    peer: SocketAddr,
    buffer: &mut [u8],
) -> io::Result<(UdpSocket, Strays)> {
    let (socket, strays) = connect_collecting(bound_to(local)?.into(), peer, buffer)?;
    Ok((UdpSocket::from_std(socket)?, strays))
}

/// Connects the non-blocking `socket` to `peer` and reads out what it received before.
fn connect_collecting(
    socket: std::net::UdpSocket,
    peer: SocketAddr,
    buffer: &mut [u8],
) -> io::Result<(std::net::UdpSocket, Strays)> {
    socket.connect(peer)?;
    only_from(&socket, peer)?;
    let mut strays = Vec::new();
    loop {
        match socket.recv_from(buffer) {
            Ok((n, from)) => strays.push((from, Bytes::copy_from_slice(&buffer[..n]))),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            // An error is reported once, then the queue can be read on.
            Err(error) => tracing::debug!(%error, %peer, "receive failed"),
        }
    }
    Ok((socket, strays))
}

/// Lets only datagrams from `peer` into `socket` (an IPv4 UDP socket): a classic BPF socket
/// filter, which the kernel runs on each datagram it queues for the socket, before anyone reads
/// it, and which stays with the socket when it is handed to another process. The program sees a
/// datagram from its UDP header on; the sender's address is read from the IP header before it.
fn only_from(socket: &std::net::UdpSocket, peer: SocketAddr) -> io::Result<()> {
    let SocketAddr::V4(peer) = peer else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{peer} is not an IPv4 client"),
        ));
    };
    socket2::SockRef::from(socket).attach_filter(&only_from_program(peer))
}

/// The program of [`only_from`]: accept a datagram whole when its source port and address are
/// `peer`'s, drop it otherwise.
fn only_from_program(peer: SocketAddrV4) -> [socket2::SockFilter; 6] {
    use socket2::SockFilter;
    // Classic BPF instructions (linux/filter.h), each load in network byte order.
    const LOAD_HALF: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
    const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    // Offsets from the network header (SKF_NET_OFF, -0x100000): the IPv4 source address.
    const IPV4_SOURCE: u32 = 0xfff0_0000 + 12;
    [
        // The UDP source port, then: equal, go on; else, drop (3 ahead).
        SockFilter::new(LOAD_HALF, 0, 0, 0),
        SockFilter::new(JUMP_IF_EQUAL, 0, 3, u32::from(peer.port())),
        SockFilter::new(LOAD_WORD, 0, 0, IPV4_SOURCE),
        SockFilter::new(JUMP_IF_EQUAL, 0, 1, u32::from(*peer.ip())),
        SockFilter::new(RETURN, 0, 0, u32::MAX),
        SockFilter::new(RETURN, 0, 0, 0),
    ]
}

/// A client's side of its flow.
enum Local {
    /// Its datagrams come through the listener's queue.
    Queued(datagrams::Client),
    /// It has a socket of its own, which `giver` tries to hand to the router.
    Own {
        socket: UdpSocket,
        early: Vec<Bytes>,
        giver: Arc<Giver>,
        /// Keeps the client's queue open while the flow lasts.
        _held: mpsc::Receiver<Bytes>,
    },
}

async fn flow(
    local: Local,
    peer: SocketAddr,
    target: FlowTarget,
    context: Context,
    ip: std::net::Ipv4Addr,
    ended: mpsc::UnboundedSender<SocketAddr>,
) {
    let guard = match context.flows.begin(ip, &context.metrics, Protocol::Udp) {
        Ok(guard) => guard,
        Err(at_limit) => {
            // Its datagrams are dropped, as UDP allows; a later one tries again.
            tracing::debug!(%target, limit = at_limit.limit, "flow limit reached; datagrams dropped");
            drop(local);
            context
                .metrics
                .flow_ended(Protocol::Udp, FlowOutcome::Limited);
            let _ = ended.send(peer);
            return;
        }
    };
    let outcome = match local {
        Local::Queued(client) => carry(client, &target, &context).await,
        Local::Own {
            socket,
            early,
            giver,
            _held,
        } => {
            let handed = giver
                .give_udp(&socket, &early, &target, context.udp_idle)
                .await
                .inspect_err(|reason| tracing::debug!(%reason, %target, "carried in the tunnel"));
            if handed.is_ok() {
                FlowOutcome::HandedOff
            } else {
                carry(Connected::with_early(socket, early), &target, &context).await
            }
        }
    };
    drop(guard);
    context.metrics.flow_ended(Protocol::Udp, outcome);
    let _ = ended.send(peer);
}

/// Carries a client's datagrams in a tunnel flow until it ends.
async fn carry(local: impl Datagrams, target: &FlowTarget, context: &Context) -> FlowOutcome {
    let tunnel = match context.client.open(target).await {
        Ok(tunnel) => tunnel,
        Err(error) => {
            // Its datagrams are lost, as UDP allows; the next one tries again.
            tracing::debug!(%error, "flow not opened");
            return super::outcome_of(&error);
        }
    };
    let (sent, received) = context.metrics.bytes(Protocol::Udp);
    let meter = |way, n: usize| match way {
        Way::Out => {
            sent.inc_by(n as u64);
        }
        Way::In => {
            received.inc_by(n as u64);
        }
    };
    let local = UntilDrained {
        local,
        draining: context.draining.clone(),
    };
    match datagrams::relay(tunnel, local, context.udp_idle, meter).await {
        Ok(()) => FlowOutcome::Completed,
        Err(error) => {
            tracing::debug!(%error, %target, "flow broken");
            FlowOutcome::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram from another client that reached a client's socket before it was connected
    /// comes out with its sender, and the connected socket holds nothing that would pass for
    /// its client's: every datagram sent is found once, with who sent it.
    #[test]
    fn datagrams_a_new_socket_took_before_connecting_keep_their_sender() {
        let listener: std::net::UdpSocket = bound_to(SocketAddrV4::new([127, 0, 0, 1].into(), 0))
            .unwrap()
            .into();
        let Ok(SocketAddr::V4(local)) = listener.local_addr() else {
            panic!("an IPv4 address")
        };
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The client's own socket, bound beside the listener and not yet connected.
        let own: std::net::UdpSocket = bound_to(local).unwrap().into();
        other.send_to(b"from the other client", local).unwrap();
        client.send_to(b"from the client", local).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));

        let mut buffer = vec![0u8; MAX_DATAGRAM];
        let (own, strays) =
            connect_collecting(own, client.local_addr().unwrap(), &mut buffer).unwrap();
        let mut found: Strays = strays;
        listener.set_nonblocking(true).unwrap();
        while let Ok((n, from)) = listener.recv_from(&mut buffer) {
            found.push((from, Bytes::copy_from_slice(&buffer[..n])));
        }
        found.sort();
        let mut sent = vec![
            (
                other.local_addr().unwrap(),
                Bytes::from_static(b"from the other client"),
            ),
            (
                client.local_addr().unwrap(),
                Bytes::from_static(b"from the client"),
            ),
        ];
        sent.sort();
        assert_eq!(found, sent);
        let left = own.recv(&mut buffer);
        assert!(
            left.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock),
            "the connected socket still held {left:?}"
        );
    }

    /// The filter a client's own socket takes once connected: of datagrams the kernel has
    /// bound for the socket, only the client's get in. Shown on a socket that is not
    /// connected, which the kernel gives every sender's datagram: only the client's arrive,
    /// every one of them, and the others' are dropped (not queued, not read as the client's).
    #[test]
    fn a_clients_own_socket_lets_in_its_clients_datagrams_only() {
        let own = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = own.local_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Another client on the same address, and one on the same port of another address.
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = client.local_addr().unwrap().port();
        let same_port = std::net::UdpSocket::bind(("127.0.0.2", port)).unwrap();
        only_from(&own, client.local_addr().unwrap()).unwrap();
        for round in 0..3u8 {
            other.send_to(&[b'o', round], local).unwrap();
            client.send_to(&[b'c', round], local).unwrap();
            same_port.send_to(&[b's', round], local).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        own.set_nonblocking(true).unwrap();
        let mut buffer = [0u8; 16];
        let mut arrived = Vec::new();
        while let Ok((n, from)) = own.recv_from(&mut buffer) {
            arrived.push((from, buffer[..n].to_vec()));
        }
        let client = client.local_addr().unwrap();
        let expected: Vec<_> = (0..3u8).map(|round| (client, vec![b'c', round])).collect();
        assert_eq!(arrived, expected);

        let v6 = "[::1]:5353".parse().unwrap();
        let refused = only_from(&own, v6).expect_err("an IPv6 client");
        assert!(
            refused.to_string().contains("not an IPv4 client"),
            "{refused}"
        );
    }
}
