//! Relaying two TCP sockets with `splice(2)` through a pipe per direction: bytes go from one
//! socket's receive queue to the other's send queue as page references and never through this
//! process's memory, which is what makes a connection handed over by a sidecar cost about as
//! much as the direct path.
//!
//! A direction makes its pipe when its socket first has something to read, so a quiet connection
//! holds no pipe. It reads only into an empty pipe and empties the pipe into the other socket
//! before reading again: a reader that stops stops the relay reading, with at most a pipe's worth
//! held. An end of stream is carried over as a half-close of the other socket.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Capacity asked of each pipe, and most bytes one splice moves; a pipe keeps the default
/// (64 KiB) where the system allows no more.
const CHUNK: usize = 1024 * 1024;

/// Relays `a` and `b` both ways until both directions ended; returns the bytes moved from `a`
/// to `b` and from `b` to `a`. At the first error it stops and returns it.
pub async fn relay(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b), one_way(b, a))
}

async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let mut moved = 0u64;
    loop {
        from.readable().await?;
        let (out, into) = match &pipe {
            Some(pipe) => pipe,
            None => pipe.insert(new_pipe()?),
        };
        let read = from.try_io(Interest::READABLE, || splice(from, into, CHUNK));
        let mut pending = match read {
            Ok(0) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(moved);
            }
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        while pending > 0 {
            let written = to
                .async_io(Interest::WRITABLE, || splice(out, to, pending))
                .await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            pending -= written;
            moved += written as u64;
        }
    }
}

/// One non-blocking splice of at most `len` bytes; one of the two ends must be a pipe.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    Ok(rustix::pipe::splice(from, None, to, None, len, flags)?)
}

fn new_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (out, into) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    let _ = rustix::pipe::fcntl_setpipe_size(&into, CHUNK);
    Ok((out, into))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Two connected sockets: (the one dialled, the one accepted).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dialled = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (dialled, accepted)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_ways_byte_exact_with_half_close() {
        let (app, near) = pair().await;
        let (far, server) = pair().await;
        let relaying = tokio::spawn(async move { relay(&near, &far).await });
        crate::tunnel::pipe::tests::half_closed_exchange(app, server, 8 << 20).await;
        assert_eq!(relaying.await.expect("join").expect("relay"), (8 << 20, 7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_stops_stops_the_relay_reading() {
        let (mut app, near) = pair().await;
        let (far, _server) = pair().await;
        let _relaying = tokio::spawn(async move { relay(&near, &far).await });
        let block = [7u8; 64 * 1024];
        let mut written = 0usize;
        while written < 256 << 20 {
            match tokio::time::timeout(std::time::Duration::from_millis(300), app.write_all(&block))
                .await
            {
                Ok(result) => {
                    result.expect("write");
                    written += block.len();
                }
                Err(_) => break,
            }
        }
        // Socket buffers on loopback autotune to a few MiB each; the relay holds one pipe.
        assert!(
            written < 64 << 20,
            "{written} bytes went in with nobody reading"
        );
    }

    #[tokio::test]
    async fn a_reset_on_one_side_ends_the_relay_with_an_error() {
        let (app, near) = pair().await;
        let (far, _server) = pair().await;
        let relaying = tokio::spawn(async move { relay(&near, &far).await });
        socket2::SockRef::from(&app)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(app);
        let result = tokio::time::timeout(std::time::Duration::from_secs(20), relaying)
            .await
            .expect("the relay ended")
            .expect("join");
        assert!(result.is_err(), "a reset is not a clean end: {result:?}");
    }
}
