//! The tunnel transport: many flows over one connection, as HTTP/2 `CONNECT` streams. What a
//! flow names and how datagrams are framed is the contract in `servicekeel_api::tunnel`; this
//! module carries it.
//!
//! - [`client`]: the sidecar's side, one connection to the router, reconnected with backoff,
//!   carrying the pod's registration.
//! - [`server`]: the router's side, serving flows and registrations for a [`server::Handler`]
//!   that decides where each flow goes.
//! - [`stream`]: a flow as `AsyncRead + AsyncWrite`.
//! - [`pipe`](mod@pipe): a flow piped to a socket or another flow, both ways.
//! - [`splice`]: two sockets relayed without copies through this process.
//! - [`datagrams`]: a UDP flow pumped between its framed stream and a socket.
//! - [`busy_poll`]: relays polling their sockets a while before sleeping.
//! - [`handoff`]: TCP connections handed to the router on its Unix socket instead of carried
//!   in flows.

pub mod busy_poll;
pub mod client;
pub mod datagrams;
pub mod handoff;
pub mod pipe;
pub mod server;
pub mod splice;
pub mod stream;

use std::time::Duration;

pub use pipe::{pipe, pipe_flows};
pub use stream::FlowStream;
use tokio::io::{AsyncRead, AsyncWrite};

/// Anything a tunnel connection runs over: a Unix or TCP socket, later a TLS session.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// HTTP/2 settings both sides use.
///
/// A flow's window is what its sender may have in flight before the receiver reads it, and the
/// most the receiver holds in memory for a flow whose reader stopped. With 1 MiB instead of 4, a
/// bulk transfer across two routers ran 10–12 % slower (pairs of runs, `BENCHMARKS.md`); 4 MiB
/// is still less than one TCP socket's receive buffer may grow to there (`net.ipv4.tcp_rmem`'s
/// maximum, 32 MiB on that machine). The connection's window, shared by all its flows, bounds
/// what they hold together.
pub(crate) mod settings {
    /// Per-flow receive window.
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    /// Per-connection receive window, shared by all flows.
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    /// Largest frame accepted, and the largest socket read a flow sends as one frame. Across
    /// two routers 1 MiB and 128 KiB each carried less than 256 KiB (30 pairs of runs each,
    /// `BENCHMARKS.md`).
    pub const MAX_FRAME: u32 = 256 * 1024;
    /// Flows at once on one connection.
    pub const MAX_STREAMS: u32 = 16 * 1024;
}

/// How long a UDP flow lives without a datagram either way.
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
