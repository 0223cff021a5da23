//! A TCP relay whose reader stops: the bytes it read wait in a pipe cut down to them, so that
//! stopped readers do not spend the user's pipe budget, and none of them is lost. A test binary
//! of its own, so that the process's pipes are this relay's alone.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use servicekeel_proxy::tunnel::busy_poll::Polling;
use servicekeel_proxy::tunnel::splice::relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// What the relay asks of a pipe.
const FULL_PIPE: usize = 1024 * 1024;

/// The process's pipes that hold bytes, each once: (bytes held, capacity).
fn pipes_holding_bytes() -> Vec<(u64, usize)> {
    let mut seen = HashSet::new();
    let mut holding = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let path = entry.unwrap().path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("pipe:") || !seen.insert(target) {
            continue;
        }
        // Another reader of the same pipe, which reads nothing.
        let Ok(pipe) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&path)
        else {
            continue;
        };
        let held = rustix::io::ioctl_fionread(&pipe).unwrap();
        if held > 0 {
            holding.push((held, rustix::pipe::fcntl_getpipe_size(&pipe).unwrap()));
        }
    }
    holding
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_reader_holds_what_was_read_in_a_pipe_cut_down_to_it() {
    // The app's connection, whose far end the relay reads: a large receive buffer, so that
    // much is there to read at once.
    let app_side = TcpSocket::new_v4().unwrap();
    app_side.set_recv_buffer_size(1 << 20).unwrap();
    app_side.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = app_side.listen(1).unwrap();
    let mut app = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (near, _) = listener.accept().await.unwrap();
    // The server's, which it writes: small buffers on both ends, so that it fills after a few
    // KiB once the server stops reading.
    let server_side = TcpSocket::new_v4().unwrap();
    server_side.set_recv_buffer_size(4096).unwrap();
    server_side.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server_listener = server_side.listen(1).unwrap();
    let far_side = TcpSocket::new_v4().unwrap();
    far_side.set_send_buffer_size(4096).unwrap();
    let far = far_side
        .connect(server_listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut server, _) = server_listener.accept().await.unwrap();

    let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let writing = {
        let sent = sent.clone();
        tokio::spawn(async move { app.write_all(&sent).await.map(|()| app) })
    };
    // The relay starts with the app's bytes waiting, as many as the socket takes.
    let filling = Instant::now();
    let mut waiting = 0;
    while waiting < 128 * 1024 {
        assert!(
            filling.elapsed() < Duration::from_secs(10),
            "only {waiting} bytes waiting to be read"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waiting = rustix::io::ioctl_fionread(&near).unwrap();
    }
    // Polling as the router's default does: a stream's emptied socket is polled a while.
    let budget =
        servicekeel_api::duration::parse_duration(servicekeel_api::defaults::ROUTER_BUSY_POLL)
            .unwrap();
    let polling = Polling::new(budget);
    tokio::spawn(async move { relay(&near, &far, &polling).await });
    // The server reads nothing; the relay fills the server's socket and waits with the rest.
    let started = Instant::now();
    let holding = loop {
        let holding = pipes_holding_bytes();
        if holding.iter().all(|&(_, capacity)| capacity < FULL_PIPE) && !holding.is_empty() {
            break holding;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "pipes holding bytes (bytes, capacity): {holding:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(holding.len(), 1, "one direction waits: {holding:?}");
    let (held, capacity) = holding[0];
    assert!(
        capacity <= 128 * 1024,
        "{held} bytes wait in a pipe of {capacity}"
    );

    // The server reads again: every byte arrives, in order.
    let mut received = vec![0u8; sent.len()];
    server.read_exact(&mut received).await.unwrap();
    assert!(received == sent, "the bytes arrived changed");
    drop(writing.await.unwrap().unwrap());
}
