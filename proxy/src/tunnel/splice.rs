//! Relaying two TCP sockets with `splice(2)` through a pipe per direction: bytes go from one
//! socket's receive queue to the other's send queue as page references and never through this
//! process's memory, which is what makes a connection handed over by a sidecar cost about as
//! much as the direct path.
//!
//! A direction reads only into an empty pipe and empties the pipe into the other socket before
//! reading again: a reader that stops stops the relay reading, with at most a pipe's worth held.
//! It holds a pipe only while it has bytes to move: once its socket has nothing more to read, the
//! emptied pipe goes back to the few kept idle for the next direction that has (`IDLE_KEPT`).
//! The kernel counts pipe capacity per user, for every process of that user on the node
//! (`fs.pipe-user-pages-soft`, 64 MiB by default), and a process without `CAP_SYS_RESOURCE`, as
//! the router runs, cannot grow a pipe past that budget and gets pipes of two pages once it is
//! spent. A pipe kept for each open connection spent it at a few dozen connections and slowed
//! every later flow; held only while bytes are in it, it lasts for that many flows moving bytes
//! at once, and a pipe made small past it is closed once emptied rather than kept.
//!
//! A direction whose other side stops taking bytes holds the ones it read until that side takes
//! them, and the capacity of the pipe they are in counts against the budget all that time: a
//! direction reads a little at first and doubles what it reads while the other side takes all of
//! it, halving it when it does not (down to 64 KiB, `FIRST_TAKE`), and a pipe left waiting for room
//! longer than `STALLED` is cut down to the bytes it holds. An end of stream is carried over as
//! a half-close of the other socket.
//!
//! A direction that has moved a stream's worth of bytes since it last woke (`STREAM`) and finds
//! its socket empty polls it for the router's busy-polling budget before it sleeps, with the
//! polling turn ([`Polling::stream_window`]): the sender's next bytes, where they come within
//! it, are taken without the relay's thread sleeping and being woken, and without its CPU
//! going idle, where the kernel would move the threads of the transfer between CPUs
//! (`BENCHMARKS.md`, TCP bulk on one node). Requests and answers smaller than a stream's worth
//! never make a direction poll; a larger answer may make it poll after it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::busy_poll::Polling;

/// Capacity asked of each pipe, and most bytes one splice moves; a pipe keeps the default
/// (64 KiB) where the system allows no more. Against 256 KiB and 64 KiB pipes a bulk transfer
/// through the router carried more with 1 MiB (30 pairs of runs each, `BENCHMARKS.md`).
const CHUNK: usize = 1024 * 1024;

/// What a direction reads at first, and the least it reads: a few of its reads taken whole by
/// the other side bring it to [`CHUNK`].
const FIRST_TAKE: usize = 64 * 1024;

/// How long bytes in a pipe may wait for room in the other socket before the pipe is cut down to
/// them; a relay between two sockets on one node otherwise waits microseconds.
const STALLED: Duration = Duration::from_millis(20);

/// Bytes a direction must have moved since it last woke before it polls its emptied socket.
const STREAM: u64 = 64 * 1024;

/// Empty pipes kept for reuse, so that a flow's next burst does not make a pipe anew; each
/// counts against the user's pipe budget as a pipe in use does.
const IDLE_KEPT: usize = 8;

/// The capacity a new pipe has where the budget allows it, the kernel's default.
const DEFAULT_CAPACITY: usize = 64 * 1024;

/// The empty pipes kept, shared by every relay of the process, as the budget they count
/// against is.
static IDLE: IdlePipes = IdlePipes::new();

/// Whether a pipe smaller than asked was told of.
static TOLD_SHORT: AtomicBool = AtomicBool::new(false);

/// A pipe's two ends.
#[derive(Debug)]
struct Pipe {
    out: OwnedFd,
    into: OwnedFd,
    /// Worth keeping once emptied: not made while the user's pipe budget was spent (smaller
    /// than the kernel's default), nor cut down to what it held.
    keep: bool,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (out, into) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = rustix::pipe::fcntl_setpipe_size(&into, CHUNK)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&into))
            .ok();
        if capacity.is_none_or(|capacity| capacity < CHUNK) && !TOLD_SHORT.swap(true, Relaxed) {
            tracing::warn!(
                asked = CHUNK,
                got = ?capacity,
                "a relay pipe is smaller than asked, so TCP relays move less per call: the \
                 user's pipe budget (fs.pipe-user-pages-soft, counted over all of the user's \
                 processes on the node) is spent, or fs.pipe-max-size is lower; \
                 CAP_SYS_RESOURCE lifts both (told once)"
            );
        }
        Ok(Pipe {
            out,
            into,
            keep: capacity.is_some_and(|capacity| capacity >= DEFAULT_CAPACITY),
        })
    }

    /// Cuts the pipe's capacity down to the least that holds the `held` bytes in it, giving the
    /// rest back to the user's budget; the pipe is then not kept. The kernel refuses a capacity
    /// with fewer slots than the pipe's bytes take up, so a larger one is tried next.
    fn fit(&mut self, held: usize) {
        let mut capacity = held.next_power_of_two().max(DEFAULT_CAPACITY);
        while capacity < CHUNK {
            if rustix::pipe::fcntl_setpipe_size(&self.into, capacity).is_ok() {
                self.keep = false;
                return;
            }
            capacity *= 2;
        }
    }
}

/// Empty pipes, at most [`IDLE_KEPT`].
#[derive(Debug)]
struct IdlePipes(Mutex<Vec<Pipe>>);

impl IdlePipes {
    const fn new() -> IdlePipes {
        IdlePipes(Mutex::new(Vec::new()))
    }

    fn pipes(&self) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept pipe, or a new one.
    fn take(&self) -> io::Result<Pipe> {
        // Popped apart, so that a new pipe is not made under the lock.
        let kept = self.pipes().pop();
        match kept {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Keeps `pipe`, which must be empty, for the next direction that has bytes to move; closes
    /// it when enough are kept, or when it is not worth keeping, so that a later direction makes
    /// a pipe of its own once the budget allows.
    fn give_back(&self, pipe: Pipe) {
        if !pipe.keep {
            return;
        }
        let mut pipes = self.pipes();
        if pipes.len() < IDLE_KEPT {
            pipes.push(pipe);
        }
    }
}

/// Relays `a` and `b` both ways until both directions ended, a stream's emptied socket polled
/// as `polling` allows; returns the bytes moved from `a` to `b` and from `b` to `a`. At the
/// first error it stops and returns it.
pub async fn relay(a: &TcpStream, b: &TcpStream, polling: &Polling) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, polling), one_way(b, a, polling))
}

async fn one_way(from: &TcpStream, to: &TcpStream, polling: &Polling) -> io::Result<u64> {
    let mut moved = 0u64;
    let mut take = FIRST_TAKE;
    loop {
        from.readable().await?;
        let mut pipe = IDLE.take()?;
        let woke_at = moved;
        // The pipe is empty at each read. On an error it is dropped, not kept.
        loop {
            let read = match from.try_io(Interest::READABLE, || splice(from, &pipe.into, take)) {
                Err(error)
                    if error.kind() == io::ErrorKind::WouldBlock && moved - woke_at >= STREAM =>
                {
                    polling
                        .stream_window()
                        .map_or(Ok(None), |window| {
                            window.poll(|| caught(splice(from, &pipe.into, take)))
                        })
                        .and_then(|read| read.ok_or(error))
                }
                read => read,
            };
            let mut pending = match read {
                Ok(0) => {
                    IDLE.give_back(pipe);
                    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                    return Ok(moved);
                }
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    IDLE.give_back(pipe);
                    break;
                }
                Err(error) => return Err(error),
            };
            let mut waited = false;
            while pending > 0 {
                match to.try_io(Interest::WRITABLE, || splice(&pipe.out, to, pending)) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(written) => {
                        pending -= written;
                        moved += written as u64;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        waited = true;
                        // A pipe not kept has nothing to cut: it was cut already, or made
                        // small past the budget. Any other is timed at each wait, not only the
                        // first: the other side may have taken part of bytes too many to cut
                        // before it stopped.
                        if !pipe.keep {
                            to.writable().await?;
                        } else if let Ok(ready) = tokio::time::timeout(STALLED, to.writable()).await
                        {
                            ready?;
                        } else {
                            pipe.fit(pending);
                            to.writable().await?;
                        }
                    }
                    Err(error) => return Err(error),
                }
            }
            take = if waited {
                (take / 2).max(FIRST_TAKE)
            } else {
                (take * 2).min(CHUNK)
            };
        }
    }
}

/// A non-blocking call's outcome as a poll's: `None` where it would block.
fn caught(result: io::Result<usize>) -> io::Result<Option<usize>> {
    match result {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
        done => done.map(Some),
    }
}

/// One non-blocking splice of at most `len` bytes; one of the two ends must be a pipe.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    Ok(rustix::pipe::splice(from, None, to, None, len, flags)?)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::tunnel::busy_poll::{Outcomes, PollCounts};

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
    async fn both_ways_byte_exact_with_half_close_polling_or_not() {
        for budget in [Duration::ZERO, Duration::from_micros(50)] {
            let (app, near) = pair().await;
            let (far, server) = pair().await;
            let polling = Polling::new(budget);
            let relaying = tokio::spawn(async move { relay(&near, &far, &polling).await });
            crate::tunnel::pipe::tests::half_closed_exchange(app, server, 8 << 20).await;
            assert_eq!(relaying.await.expect("join").expect("relay"), (8 << 20, 7));
        }
    }

    /// Waits until `counter` reaches `at_least`, for at most `within`.
    async fn counted(counter: &Counter, at_least: u64, within: Duration) -> u64 {
        let give_up = tokio::time::Instant::now() + within;
        while counter.get() < at_least && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        counter.get()
    }

    /// A stream's first bytes, more than [`STREAM`], all in the relay's socket before it first
    /// reads, so that it moves them all in one wake and its window opens once they are gone;
    /// then one more byte, written once the first ones came out (while a window of `budget`
    /// is open) or once the window closed. Returns the windows' outcomes.
    async fn a_pause_in_a_stream(budget: Duration, more_after_the_window: bool) -> Outcomes {
        use tokio::io::AsyncReadExt;
        const FIRST: usize = 96 * 1024;

        let listener = tokio::net::TcpSocket::new_v4().expect("socket");
        listener.set_recv_buffer_size(1 << 20).expect("room");
        listener.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let listener = listener.listen(1).expect("listen");
        let mut app = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (near, _) = listener.accept().await.expect("accept");
        let (far, mut server) = pair().await;
        let sent: Vec<u8> = (0..FIRST).map(|i| (i % 251) as u8).collect();
        app.write_all(&sent).await.expect("first bytes");
        let mut held = vec![0u8; 2 * FIRST];
        while near.peek(&mut held).await.expect("peek") < FIRST {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        let counts = PollCounts::default();
        let polling = Polling::new(budget).counted(counts.clone());
        let relaying = tokio::spawn(async move { relay(&near, &far, &polling).await });
        let mut received = vec![0u8; FIRST];
        server.read_exact(&mut received).await.expect("first bytes");
        assert!(received == sent, "the first bytes changed");
        if more_after_the_window {
            let missed = counted(&counts.stream.missed, 1, Duration::from_secs(10)).await;
            assert_eq!(missed, 1, "the window closed with nothing caught");
        }
        app.write_all(&[9]).await.expect("one more byte");
        let mut last = [0u8];
        server.read_exact(&mut last).await.expect("one more byte");
        assert_eq!(last, [9]);
        drop(app);
        server.shutdown().await.expect("the server's end");
        let moved = relaying.await.expect("join").expect("relay");
        assert_eq!(moved, (FIRST as u64 + 1, 0));
        counts.stream
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_emptied_stream_catches_what_comes_within_the_budget_and_counts_each_window() {
        // A budget far longer than the test: the byte, then the end, each caught by a window.
        let within = a_pause_in_a_stream(Duration::from_secs(60), false).await;
        assert!(within.caught.get() >= 1, "nothing caught");
        assert_eq!(within.missed.get(), 0, "a window closed before its bytes");
        // The byte comes after the window closed: the relay slept, and its wake for one byte
        // is no stream's.
        let after = a_pause_in_a_stream(Duration::from_millis(1), true).await;
        assert_eq!((after.caught.get(), after.missed.get()), (0, 1));
        // Polling off opens no window.
        let off = a_pause_in_a_stream(Duration::ZERO, false).await;
        assert_eq!((off.caught.get(), off.missed.get()), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_stops_stops_the_relay_reading() {
        let (mut app, near) = pair().await;
        let (far, _server) = pair().await;
        let _relaying = tokio::spawn(async move { relay(&near, &far, &Polling::default()).await });
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

    /// Held by a test while it holds pipes of its own outside the relays (up to
    /// `IDLE_KEPT + 2`), and by a test that counts the process's pipes, so that the count does
    /// not take in those.
    static OWN_PIPES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Pipes this process holds open, counted by their descriptors.
    fn pipes_open() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("pipe:"))
            .count()
            / 2
    }

    /// Each of many connections moves bytes both ways and goes quiet: none of them keeps a
    /// pipe, only the few kept idle remain, where a pipe per direction made 2 × 64 here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quiet_connections_hold_no_pipe() {
        use tokio::io::AsyncReadExt;

        const CONNECTIONS: usize = 64;
        let mut open = Vec::new();
        for _ in 0..CONNECTIONS {
            let (mut app, near) = pair().await;
            let (far, mut server) = pair().await;
            tokio::spawn(async move { relay(&near, &far, &Polling::default()).await });
            app.write_all(&[1u8; 64]).await.expect("request");
            let mut request = [0u8; 64];
            server
                .read_exact(&mut request)
                .await
                .expect("request relayed");
            server.write_all(&[2u8; 64]).await.expect("answer");
            let mut answer = [0u8; 64];
            app.read_exact(&mut answer).await.expect("answer relayed");
            assert_eq!(answer, [2u8; 64]);
            open.push((app, server));
        }
        // Other tests' relays may hold a pipe or two each while they run.
        let pipes = {
            let _alone = OWN_PIPES.lock().unwrap_or_else(|e| e.into_inner());
            pipes_open()
        };
        assert!(
            pipes <= IDLE_KEPT + 8,
            "{pipes} pipes open with {CONNECTIONS} quiet connections relayed"
        );
    }

    /// Kept: full-sized pipes, up to the bound. Closed: a pipe made small past the budget, and
    /// any past the bound.
    #[test]
    fn idle_pipes_keep_a_few_full_sized_ones() {
        let _counted_apart = OWN_PIPES.lock().unwrap_or_else(|e| e.into_inner());
        let idle = IdlePipes::new();
        let pipe = |keep| {
            let (out, into) = rustix::pipe::pipe().expect("pipe");
            Pipe { out, into, keep }
        };
        idle.give_back(pipe(false));
        assert_eq!(idle.pipes().len(), 0, "a starved or cut pipe is not kept");
        for _ in 0..IDLE_KEPT + 3 {
            idle.give_back(pipe(true));
        }
        assert_eq!(idle.pipes().len(), IDLE_KEPT);
        let taken = idle.take().expect("take");
        assert!(taken.keep);
        assert_eq!(idle.pipes().len(), IDLE_KEPT - 1, "taken from those kept");
        assert!(
            Pipe::new().expect("new pipe").keep,
            "a new pipe here gets at least the default capacity"
        );
    }

    /// Cut down to the least capacity that holds its bytes, which stay as they were, and then
    /// not kept; a pipe holding more than half of a full one is left whole and kept, and is cut
    /// once part of its bytes went out.
    #[test]
    fn a_pipe_is_cut_down_to_the_bytes_it_holds() {
        let _counted_apart = OWN_PIPES.lock().unwrap_or_else(|e| e.into_inner());
        let held: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut pipe = Pipe::new().expect("new pipe");
        assert_eq!(
            rustix::io::write(&pipe.into, &held).expect("write"),
            held.len()
        );
        pipe.fit(held.len());
        assert_eq!(
            rustix::pipe::fcntl_getpipe_size(&pipe.into).expect("size"),
            128 * 1024
        );
        assert!(!pipe.keep, "a cut pipe is not kept");
        let mut read = vec![0u8; 200_000];
        let n = rustix::io::read(&pipe.out, &mut read).expect("read");
        assert!(read[..n] == held[..], "the bytes held changed");

        let mut full = Pipe::new().expect("new pipe");
        let size = |pipe: &Pipe| rustix::pipe::fcntl_getpipe_size(&pipe.into).expect("size");
        assert_eq!(
            size(&full),
            CHUNK,
            "a pipe made here grows to the size asked"
        );
        let more = vec![7u8; 600_000];
        assert_eq!(
            rustix::io::write(&full.into, &more).expect("write"),
            more.len()
        );
        full.fit(more.len());
        assert_eq!(size(&full), CHUNK);
        assert!(
            full.keep,
            "left whole, so the next wait for room tries again"
        );

        // The other side took part of it: the next try cuts it.
        let mut taken = vec![0u8; 200_000];
        assert_eq!(
            rustix::io::read(&full.out, &mut taken).expect("read"),
            taken.len()
        );
        let left = more.len() - taken.len();
        full.fit(left);
        assert_eq!(size(&full), 512 * 1024);
        assert!(!full.keep, "a cut pipe is not kept");
        let mut rest = vec![0u8; CHUNK];
        let n = rustix::io::read(&full.out, &mut rest).expect("read");
        assert_eq!(n, left, "every byte left is still there");
        assert!(rest[..n].iter().all(|&b| b == 7), "the bytes left changed");
    }

    #[tokio::test]
    async fn a_reset_on_one_side_ends_the_relay_with_an_error() {
        let (app, near) = pair().await;
        let (far, _server) = pair().await;
        let relaying = tokio::spawn(async move { relay(&near, &far, &Polling::default()).await });
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
