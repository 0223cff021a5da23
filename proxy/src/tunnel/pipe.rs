//! Piping a flow to a socket, or to another flow, both ways, as chunks of [`Bytes`] handed
//! from one side to the other rather than copied through fixed buffers.
//!
//! - A flow's data arrives as HTTP/2 frames already held in `Bytes`; they go to the other side
//!   as they are, and their flow-control credit goes back only once the other side took them.
//! - A socket is read into a buffer allocated when it is readable and handed over whole
//!   (frozen, not copied); its size grows while reads fill it and shrinks while they do not. A
//!   quiet flow holds no buffer at all, so a thousand idle connections cost little.
//! - An end of stream on one side is carried over as a half-close of the other
//!   (`shutdown`); the pipe returns once both ways ended, or at the first error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::FlowStream;

/// Smallest and largest socket read. Small reads keep request/response flows cheap; large ones
/// move a bulk transfer in few syscalls and few HTTP/2 frames. The largest is one frame
/// (`settings::MAX_FRAME`): a bulk transfer across two routers went from 761–836 to 863–920
/// MB/s against 64 KiB, the proxies' CPU from 1758–1836 to 1523–1641 µs per MiB (six pairs).
/// 64 KiB had measured better before the proxies ran on mimalloc, when each large buffer was
/// fresh pages the kernel faulted in.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = super::settings::MAX_FRAME as usize;

/// One side of a pipe, as the source of the chunks it produces.
pub(crate) trait Source {
    /// The next chunk; `None` at the end of the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;
    /// `n` bytes of what this side produced were taken by the other side.
    fn consumed(&mut self, _n: usize) {}
}

/// One side of a pipe, as the sink of the other side's chunks.
pub(crate) trait Sink {
    /// Takes a prefix of `chunk` (removing it from `chunk`) and returns its length, never 0.
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>>;
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ends this way of the stream (a half-close).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Pipes `flow` and `socket` both ways until both directions end; returns the bytes moved from
/// `flow` to `socket` and from `socket` to `flow`.
pub async fn pipe<S>(flow: &mut FlowStream, socket: &mut S) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    both_ways(flow, &mut Socket::new(socket)).await
}

/// Pipes two flows both ways (a flow relayed to a peer router); returns the bytes moved from
/// `a` to `b` and from `b` to `a`.
pub async fn pipe_flows(a: &mut FlowStream, b: &mut FlowStream) -> io::Result<(u64, u64)> {
    both_ways(a, b).await
}

async fn both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: Source + Sink + ?Sized,
    B: Source + Sink + ?Sized,
{
    let (mut forth, mut back) = (Half::default(), Half::default());
    std::future::poll_fn(|cx| {
        let there = forth.poll(cx, a, b)?;
        let here = back.poll(cx, b, a)?;
        match (there, here) {
            (Poll::Ready(there), Poll::Ready(here)) => Poll::Ready(Ok((there, here))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One way of a pipe.
#[derive(Debug, Default)]
struct Half {
    /// Taken from the source, not yet by the sink.
    chunk: Bytes,
    /// The source ended.
    ended: bool,
    /// The sink was shut down: this way is done.
    done: bool,
    unflushed: bool,
    moved: u64,
}

impl Half {
    fn poll<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut S,
        to: &mut D,
    ) -> Poll<io::Result<u64>>
    where
        S: Source + ?Sized,
        D: Sink + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.moved));
        }
        loop {
            while !self.chunk.is_empty() {
                let n = ready!(to.poll_send(cx, &mut self.chunk))?;
                from.consumed(n);
                self.moved += n as u64;
                self.unflushed = true;
            }
            // An emptied chunk still holds its allocation (a socket read's buffer, or the
            // HTTP/2 connection's read buffer the frame came from): let it go.
            self.chunk = Bytes::new();
            if self.ended {
                if self.unflushed {
                    ready!(to.poll_flush(cx))?;
                    self.unflushed = false;
                }
                ready!(to.poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
            match from.poll_chunk(cx)? {
                Poll::Ready(Some(chunk)) => self.chunk = chunk,
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => {
                    if self.unflushed {
                        ready!(to.poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A socket (or anything read and written as bytes) as a side of a pipe.
struct Socket<'a, S: ?Sized> {
    io: &'a mut S,
    /// Size of the next read's buffer.
    read_size: usize,
}

impl<'a, S: ?Sized> Socket<'a, S> {
    fn new(io: &'a mut S) -> Self {
        Socket {
            io,
            read_size: MIN_READ,
        }
    }
}

impl<S: AsyncRead + Unpin + ?Sized> Source for Socket<'_, S> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        // Allocated per read and dropped if nothing is there: a quiet socket holds no buffer.
        let mut buffer = BytesMut::with_capacity(self.read_size);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *self.io),
            cx,
            &mut buffer
        ))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        self.read_size = next_read_size(self.read_size, n);
        Poll::Ready(Ok(Some(buffer.freeze())))
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> Sink for Socket<'_, S> {
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut *self.io).poll_write(cx, chunk))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// Doubles while reads fill the buffer, halves while they use under a quarter of it.
fn next_read_size(size: usize, read: usize) -> usize {
    if read >= size {
        (size * 2).min(MAX_READ)
    } else if read < size / 4 {
        (size / 2).max(MIN_READ)
    } else {
        size
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, duplex};

    use super::*;

    /// Sends `len` patterned bytes from `app`, half-closes, checks that `server` reads exactly
    /// them, answers `counted` and closes, and checks that `app` reads the answer after its own
    /// half-close. Both ends are the outer sockets of the relay under test.
    pub(crate) async fn half_closed_exchange<A, S>(mut app: A, mut server: S, len: u32)
    where
        A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let writing = {
            let sent = sent.clone();
            tokio::spawn(async move {
                app.write_all(&sent).await?;
                // Half-closed: the answer still comes back after it.
                app.shutdown().await?;
                let mut answer = Vec::new();
                app.read_to_end(&mut answer).await?;
                Ok::<_, io::Error>(answer)
            })
        };
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.expect("read");
        assert!(received == sent, "the bytes arrived changed");
        server.write_all(b"counted").await.expect("write");
        server.shutdown().await.expect("shutdown");
        assert_eq!(writing.await.expect("join").expect("app"), b"counted");
    }

    #[tokio::test]
    async fn both_ways_byte_exact_with_half_close() {
        let (app, mut near) = duplex(1024);
        let (mut far, server) = duplex(1024);
        let piping = tokio::spawn(async move {
            both_ways(&mut Socket::new(&mut near), &mut Socket::new(&mut far)).await
        });
        half_closed_exchange(app, server, 1 << 20).await;
        assert_eq!(piping.await.unwrap().unwrap(), (1 << 20, 7));
    }

    #[tokio::test]
    async fn a_reader_that_stops_stops_the_pipe_reading() {
        let (mut app, mut near) = duplex(4096);
        let (mut far, _server) = duplex(4096);
        let _piping = tokio::spawn(async move {
            both_ways(&mut Socket::new(&mut near), &mut Socket::new(&mut far)).await
        });
        // The server never reads: writes go through until the pipe holds a chunk it cannot
        // hand over, and then block.
        let mut written = 0usize;
        let block = [7u8; 1024];
        while written < 16 << 20 {
            match tokio::time::timeout(Duration::from_millis(200), app.write_all(&block)).await {
                Ok(result) => {
                    result.unwrap();
                    written += block.len();
                }
                Err(_) => break,
            }
        }
        let most = 4096 + MAX_READ + 4096 + block.len();
        assert!(
            written <= most,
            "{written} bytes went in with nobody reading (at most {most} may be held)"
        );
    }

    #[test]
    fn read_size_follows_what_reads_fill() {
        assert_eq!(next_read_size(MIN_READ, MIN_READ), 2 * MIN_READ);
        assert_eq!(next_read_size(MAX_READ, MAX_READ), MAX_READ);
        assert_eq!(next_read_size(64 * 1024, 1000), 32 * 1024);
        assert_eq!(next_read_size(MIN_READ, 10), MIN_READ);
        assert_eq!(next_read_size(64 * 1024, 20 * 1024), 64 * 1024);
    }
}
