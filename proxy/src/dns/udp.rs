//! A UDP socket registered with the runtime for reading only. Every datagram a socket sends
//! frees send-buffer space when the kernel is done with it, and a socket registered for writing
//! too gets a readiness event (and a parked worker a wakeup) for each; a server that answers
//! each query with one send has no use for them. When the send buffer is full (never towards
//! loopback, where a datagram leaves the buffer as it is sent), a send waits on a duplicate of
//! the socket registered for writing only while it waits.

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use rustix::net::addr::SocketAddrArg;
use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Receive buffer asked for: room for bursts of queries from every process in the pod (about a
/// thousand small datagrams) while the server is busy.
pub const RECEIVE_BUFFER: usize = 1 << 20;

#[derive(Debug)]
pub struct ReadOnlyUdp {
    fd: AsyncFd<std::net::UdpSocket>,
}

impl ReadOnlyUdp {
    /// Takes over `socket`, asking for a receive buffer of [`RECEIVE_BUFFER`] (the kernel may
    /// grant less: `net.core.rmem_max`).
    pub fn new(socket: tokio::net::UdpSocket) -> io::Result<Self> {
        let socket = socket.into_std()?;
        if let Err(cause) = socket2::SockRef::from(&socket).set_recv_buffer_size(RECEIVE_BUFFER) {
            tracing::debug!(%cause, "receive buffer left as it was");
        }
        socket.set_nonblocking(true)?;
        Ok(ReadOnlyUdp {
            fd: register(socket, Interest::READABLE)?,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.fd.get_ref().local_addr()
    }

    pub async fn recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let mut ready = self.fd.readable().await?;
            if let Ok(received) = ready.try_io(|fd| fd.get_ref().recv_from(buffer)) {
                return received;
            }
        }
    }

    /// The next datagram if one is waiting; `WouldBlock` if none is.
    pub fn try_recv_from(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.fd
            .try_io(Interest::READABLE, |fd| fd.recv_from(buffer))
    }

    pub async fn send_to(&self, datagram: &[u8], dst: SocketAddr) -> io::Result<()> {
        self.send_all(&[(dst, datagram)]).await
    }

    /// Sends every datagram to its destination, as many per system call as the kernel takes.
    /// A datagram the kernel refuses (`EHOSTUNREACH` and the like) is skipped and the rest still
    /// sent; the first such error is returned at the end.
    pub async fn send_all(&self, datagrams: &[(SocketAddr, &[u8])]) -> io::Result<()> {
        let addrs: Vec<SocketAddrAny> = datagrams.iter().map(|(dst, _)| dst.as_any()).collect();
        let slices: Vec<[IoSlice<'_>; 1]> = datagrams
            .iter()
            .map(|(_, bytes)| [IoSlice::new(bytes)])
            .collect();
        let (mut sent, mut refused) = (0, None);
        while sent < datagrams.len() {
            // The headers point into `addrs` and `slices` and are not kept across the wait.
            let result = {
                let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = (sent..datagrams.len())
                    .map(|_| Default::default())
                    .collect();
                let mut messages: Vec<MMsgHdr<'_>> = addrs[sent..]
                    .iter()
                    .zip(&slices[sent..])
                    .zip(&mut controls)
                    .map(|((addr, slice), control)| MMsgHdr::new_with_addr(addr, slice, control))
                    .collect();
                rustix::net::sendmmsg(self.fd.get_ref(), &mut messages, SendFlags::DONTWAIT)
            };
            match result {
                Ok(count) => sent += count,
                Err(rustix::io::Errno::AGAIN) => {
                    let duplicate = self.fd.get_ref().try_clone()?;
                    let room = register(duplicate, Interest::WRITABLE)?;
                    room.writable().await?.clear_ready();
                }
                Err(error) => {
                    refused.get_or_insert(error);
                    sent += 1;
                }
            }
        }
        refused.map_or(Ok(()), |error| Err(error.into()))
    }
}

/// Registers `socket` with the runtime for `interest` alone. The safe constructor is deprecated
/// for types whose descriptor may change or close under it; a `std::net::UdpSocket` owns its
/// descriptor for its whole life, which is the condition the unsafe replacement asks for.
#[expect(
    deprecated,
    reason = "the replacement is unsafe; the socket owns its descriptor"
)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}
