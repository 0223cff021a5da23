//! A UDP socket registered with the runtime for reading only. Every datagram a socket sends
//! frees send-buffer space when the kernel is done with it, and a socket registered for writing
//! too gets a readiness event (and a parked worker a wakeup) for each; a server that answers
//! each query with one send has no use for them. When the send buffer is full (never towards
//! loopback, where a datagram leaves the buffer as it is sent), a send waits on a duplicate of
//! the socket registered for writing only while it waits.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Whether sends may be segmented; cleared when the kernel refuses it.
    segmenting: AtomicBool,
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
            segmenting: AtomicBool::new(true),
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

    /// Sends every datagram to its destination, in order, as many per system call as the kernel
    /// takes. Consecutive datagrams to one destination that the kernel can cut from one buffer
    /// (`run_length`) go as one segmented send (`UDP_SEGMENT`): they cross the sending half of the
    /// stack once and reach the receiver as the same separate datagrams. Where the kernel does not
    /// segment, the socket sends each datagram on its own from then on. A datagram the kernel
    /// refuses (`EHOSTUNREACH` and the like) is skipped and the rest still sent; the first such
    /// error is returned at the end.
    pub async fn send_all(&self, datagrams: &[(SocketAddr, &[u8])]) -> io::Result<()> {
        let mut refused = None;
        // Datagrams not yet sent that go one by one.
        let mut single = 0;
        let mut start = 0;
        while start < datagrams.len() {
            let run = start..start + run_length(&datagrams[start..]);
            start = run.end;
            if run.len() < 2 || !self.segmenting.load(Ordering::Relaxed) {
                continue;
            }
            self.send_each(&datagrams[single..run.start], &mut refused)
                .await?;
            single = run.end;
            match self.send_segmented(&datagrams[run.clone()]).await {
                Ok(()) => {}
                Err(error) if cannot_segment(&error) => {
                    tracing::debug!(%error, "sending answers one by one from now on");
                    self.segmenting.store(false, Ordering::Relaxed);
                    self.send_each(&datagrams[run], &mut refused).await?;
                }
                Err(error) => {
                    refused.get_or_insert(error);
                }
            }
        }
        self.send_each(&datagrams[single..], &mut refused).await?;
        refused.map_or(Ok(()), Err)
    }

    /// Sends each datagram on its own, with `sendmmsg`; the first datagram the kernel refuses
    /// goes into `refused`, and only waiting for room fails the whole.
    async fn send_each(
        &self,
        datagrams: &[(SocketAddr, &[u8])],
        refused: &mut Option<io::Error>,
    ) -> io::Result<()> {
        let addrs: Vec<SocketAddrAny> = datagrams.iter().map(|(dst, _)| dst.as_any()).collect();
        let slices: Vec<[IoSlice<'_>; 1]> = datagrams
            .iter()
            .map(|(_, bytes)| [IoSlice::new(bytes)])
            .collect();
        let mut sent = 0;
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
                Err(rustix::io::Errno::AGAIN) => self.room().await?,
                Err(error) => {
                    refused.get_or_insert(error.into());
                    sent += 1;
                }
            }
        }
        Ok(())
    }

    /// Sends a run (see [`run_length`]) as one datagram the kernel cuts at the first one's length.
    async fn send_segmented(&self, run: &[(SocketAddr, &[u8])]) -> io::Result<()> {
        let dst = socket2::SockAddr::from(run[0].0);
        let slices: Vec<IoSlice<'_>> = run.iter().map(|(_, bytes)| IoSlice::new(bytes)).collect();
        let control = segment_control(run[0].1.len());
        let message = socket2::MsgHdr::new()
            .with_addr(&dst)
            .with_buffers(&slices)
            .with_control(&control);
        loop {
            match socket2::SockRef::from(self.fd.get_ref()).sendmsg(&message, 0) {
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.room().await?,
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits until the send buffer has room, on a duplicate of the socket registered for
    /// writing only while it waits.
    async fn room(&self) -> io::Result<()> {
        let duplicate = self.fd.get_ref().try_clone()?;
        let room = register(duplicate, Interest::WRITABLE)?;
        room.writable().await?.clear_ready();
        Ok(())
    }
}

/// Most datagrams in one segmented send: the kernel's `UDP_MAX_SEGMENTS` as Linux first set it.
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one segmented send: what one UDP datagram over IPv4 can carry.
const MAX_SEGMENTED_BYTES: usize = 65_507;
/// `SOL_UDP` and `UDP_SEGMENT` of Linux's user-space API.
const SOL_UDP: i32 = 17;
const UDP_SEGMENT: i32 = 103;

/// How many datagrams from the start of `datagrams` one segmented send can carry: those to the
/// first one's destination, each as long as the first but the last, which may be shorter, within
/// [`MAX_SEGMENTS`] and [`MAX_SEGMENTED_BYTES`]. At least one while any is left.
fn run_length(datagrams: &[(SocketAddr, &[u8])]) -> usize {
    let Some(&(dst, first)) = datagrams.first() else {
        return 0;
    };
    let size = first.len();
    // A segment length of 0 sends no segments.
    if size == 0 {
        return 1;
    }
    let mut total = size;
    let mut count = 1;
    for &(to, bytes) in &datagrams[1..] {
        if to != dst
            || bytes.len() > size
            || count == MAX_SEGMENTS
            || total + bytes.len() > MAX_SEGMENTED_BYTES
        {
            break;
        }
        count += 1;
        total += bytes.len();
        if bytes.len() < size {
            break;
        }
    }
    count
}

/// The ancillary data of a segmented send: one `cmsghdr` (level `SOL_UDP`, type `UDP_SEGMENT`)
/// carrying the segment length as a `u16`, padded to the header's alignment. The kernel copies
/// the buffer before it reads it, so its own alignment does not matter.
fn segment_control(segment: usize) -> Vec<u8> {
    let word = std::mem::size_of::<usize>();
    let header = word + 2 * std::mem::size_of::<i32>();
    let length = header + std::mem::size_of::<u16>();
    let mut control = Vec::with_capacity(length.next_multiple_of(word));
    control.extend_from_slice(&length.to_ne_bytes());
    control.extend_from_slice(&SOL_UDP.to_ne_bytes());
    control.extend_from_slice(&UDP_SEGMENT.to_ne_bytes());
    control.extend_from_slice(&(segment as u16).to_ne_bytes());
    control.resize(length.next_multiple_of(word), 0);
    control
}

/// Whether a segmented send failed because the kernel cannot send that run segmented (an old
/// kernel, a socket or route without segmentation, a segment longer than the route's MTU), so
/// that sending its datagrams one by one may still succeed.
fn cannot_segment(error: &io::Error) -> bool {
    use rustix::io::Errno;
    [
        Errno::IO,
        Errno::INVAL,
        Errno::NOPROTOOPT,
        Errno::OPNOTSUPP,
        Errno::MSGSIZE,
    ]
    .iter()
    .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn to(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    #[test]
    fn a_run_is_one_destination_one_length_and_a_shorter_last() {
        let (long, short) = ([1u8; 40].as_slice(), [2u8; 30].as_slice());
        let run = run_length;
        assert_eq!(run(&[]), 0);
        assert_eq!(run(&[(to(1), long)]), 1);
        assert_eq!(run(&[(to(1), long), (to(1), long), (to(2), long)]), 2);
        assert_eq!(run(&[(to(1), long), (to(1), short), (to(1), short)]), 2);
        assert_eq!(run(&[(to(1), short), (to(1), long)]), 1);
        assert_eq!(run(&[(to(1), &[]), (to(1), &[])]), 1);
        assert_eq!(run(&vec![(to(1), long); 100]), MAX_SEGMENTS);
        let big = [0u8; 20_000];
        assert_eq!(run(&[(to(1), big.as_slice()); 4]), 3);
    }

    #[test]
    fn the_segment_control_is_one_cmsghdr_with_the_length() {
        let control = segment_control(512);
        let word = std::mem::size_of::<usize>();
        assert_eq!(control.len(), (word + 10).next_multiple_of(word));
        assert_eq!(control[..word], (word + 10).to_ne_bytes());
        assert_eq!(control[word..word + 4], 17i32.to_ne_bytes());
        assert_eq!(control[word + 4..word + 8], 103i32.to_ne_bytes());
        assert_eq!(control[word + 8..word + 10], 512u16.to_ne_bytes());
    }

    /// Every datagram, whole, in the order sent, to each of two receivers, whether the socket
    /// segments or sends each on its own.
    #[tokio::test]
    async fn every_datagram_arrives_whole_and_in_order() {
        for segmenting in [true, false] {
            let sender = ReadOnlyUdp::new(
                tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .expect("bind"),
            )
            .expect("socket");
            sender.segmenting.store(segmenting, Ordering::Relaxed);
            let receivers: Vec<std::net::UdpSocket> = (0..2)
                .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
                .collect();
            for receiver in &receivers {
                receiver
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
            }
            let (first, second) = (
                receivers[0].local_addr().expect("addr"),
                receivers[1].local_addr().expect("addr"),
            );
            let mut owned: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
            let mut add = |dst, count: usize, length: usize| {
                for _ in 0..count {
                    let n = owned.len() as u8;
                    owned.push((dst, vec![n; length]));
                }
            };
            add(first, 5, 40);
            add(first, 1, 30);
            add(second, 3, 50);
            add(first, 1, 60);
            add(second, 70, 10);
            add(first, 2, 1);
            let datagrams: Vec<(SocketAddr, &[u8])> = owned
                .iter()
                .map(|(dst, bytes)| (*dst, &bytes[..]))
                .collect();
            sender.send_all(&datagrams).await.expect("sent");
            assert_eq!(
                sender.segmenting.load(Ordering::Relaxed),
                segmenting,
                "the kernel refused a segmented send"
            );
            for (receiver, addr) in receivers.iter().zip([first, second]) {
                for (_, expected) in owned.iter().filter(|(dst, _)| *dst == addr) {
                    let mut buffer = [0u8; 256];
                    let (length, _) = receiver.recv_from(&mut buffer).expect("a datagram");
                    assert_eq!(&buffer[..length], &expected[..], "segmenting: {segmenting}");
                }
                receiver.set_nonblocking(true).expect("nonblocking");
                let mut buffer = [0u8; 256];
                assert!(receiver.recv_from(&mut buffer).is_err(), "nothing more");
            }
        }
    }
}
