//! Handing an application's connection to the router, on the node's Unix socket.
//!
//! A sidecar on the router's Unix socket may give it each accepted TCP connection, and each UDP
//! client, instead of carrying their bytes in tunnel flows: the router then relays between the
//! application's socket and the endpoint itself, and the sidecar is out of the data path.
//!
//! A connection used for this starts with its kind's preface ([`Kind::preface`]; its first byte
//! tells it from an HTTP/2 tunnel connection on the same socket); the router answers
//! [`ACCEPTED`] before anything is handed over, so a router that does not take a kind is found
//! before anything could be lost to it. Then each handoff is one line with descriptors attached
//! (`SCM_RIGHTS`) to the line's first byte:
//!
//! - TCP, preface `servicekeel-handoff/1`: `name.namespace.cluster:port source\n` (the
//!   target's authority as in a `CONNECT`, the source as [`Source`] writes it) with the
//!   accepted connection.
//! - UDP, preface `servicekeel-handoff-udp/1`: `name.namespace.cluster:port source idle-ms=N\n`
//!   with two descriptors: a UDP socket bound to the service's local address and connected to
//!   the client, and the read end of a pipe holding the datagrams the client sent before that
//!   socket was connected, framed as in a UDP flow, its write end closed. The flow ends after N
//!   milliseconds without a datagram either way.
//!
//! Lines are at most [`MAX_LINE`] bytes; a line without its descriptors, or a malformed one,
//! ends the connection.

use std::time::Duration;

use super::{FlowTarget, Source, TargetError};
use crate::Protocol;

/// What a TCP handoff connection starts with.
pub const PREFACE: &[u8] = b"servicekeel-handoff/1\n";
/// What a UDP handoff connection starts with.
pub const UDP_PREFACE: &[u8] = b"servicekeel-handoff-udp/1\n";
/// The router's answer to a preface it takes.
pub const ACCEPTED: &[u8] = b"ok\n";
/// Longest handoff line, newline included.
pub const MAX_LINE: usize = 1024;
/// Longest preface, newline included.
pub const MAX_PREFACE: usize = 32;
/// Longest idle time a UDP handoff may ask for: a day.
pub const MAX_UDP_IDLE: Duration = Duration::from_secs(24 * 3600);

/// What one handoff connection hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Accepted TCP connections.
    Tcp,
    /// UDP clients, each as a connected socket.
    Udp,
}

impl Kind {
    pub fn preface(self) -> &'static [u8] {
        match self {
            Kind::Tcp => PREFACE,
            Kind::Udp => UDP_PREFACE,
        }
    }

    /// The kind whose preface is `preface` (newline included).
    pub fn of_preface(preface: &[u8]) -> Option<Kind> {
        [Kind::Tcp, Kind::Udp]
            .into_iter()
            .find(|kind| kind.preface() == preface)
    }

    /// Descriptors attached to each line.
    pub fn descriptors(self) -> usize {
        match self {
            Kind::Tcp => 1,
            Kind::Udp => 2,
        }
    }

    pub fn protocol(self) -> Protocol {
        match self {
            Kind::Tcp => Protocol::Tcp,
            Kind::Udp => Protocol::Udp,
        }
    }
}

/// One connection or UDP client handed over: where it goes and who opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub target: FlowTarget,
    pub source: Source,
    /// UDP: how long the flow lives without a datagram either way; `None` for TCP.
    pub idle: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff line is not `{0}`: {1:?}")]
    Shape(&'static str, String),
    #[error("handoff line is not UTF-8")]
    Encoding,
    #[error("a UDP handoff needs its idle time, between 1 ms and {} s", MAX_UDP_IDLE.as_secs())]
    Idle,
    #[error("a TCP handoff has no idle time")]
    IdleForTcp,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("handoff source: {0}")]
    Source(String),
    #[error("handoff line over {MAX_LINE} bytes")]
    TooLong,
}

impl Handoff {
    pub fn kind(&self) -> Kind {
        match self.target.protocol {
            Protocol::Tcp => Kind::Tcp,
            Protocol::Udp => Kind::Udp,
        }
    }

    /// The line for this handoff, newline included; it goes on a connection of [`Self::kind`].
    pub fn encode(&self) -> Result<Vec<u8>, HandoffError> {
        let authority = self.target.authority();
        let line = match (self.kind(), self.idle) {
            (Kind::Tcp, None) => format!("{authority} {}\n", self.source),
            (Kind::Tcp, Some(_)) => return Err(HandoffError::IdleForTcp),
            (Kind::Udp, Some(idle)) if valid_idle(idle) => {
                format!("{authority} {} idle-ms={}\n", self.source, idle.as_millis())
            }
            (Kind::Udp, _) => return Err(HandoffError::Idle),
        }
        .into_bytes();
        if line.len() > MAX_LINE {
            return Err(HandoffError::TooLong);
        }
        Ok(line)
    }

    /// Reads one line (without its newline) of a connection of `kind`.
    pub fn parse(kind: Kind, line: &[u8]) -> Result<Self, HandoffError> {
        let line = std::str::from_utf8(line).map_err(|_| HandoffError::Encoding)?;
        let shape = match kind {
            Kind::Tcp => "authority source",
            Kind::Udp => "authority source idle-ms=N",
        };
        let fields: Vec<&str> = line.split(' ').collect();
        let (authority, source, idle) = match (kind, fields.as_slice()) {
            (Kind::Tcp, [authority, source]) => (*authority, *source, None),
            (Kind::Udp, [authority, source, idle]) => (*authority, *source, Some(*idle)),
            _ => return Err(HandoffError::Shape(shape, line.chars().take(80).collect())),
        };
        if authority.is_empty() || source.is_empty() {
            return Err(HandoffError::Shape(shape, line.chars().take(80).collect()));
        }
        let idle = match idle {
            None => None,
            Some(field) => Some(
                field
                    .strip_prefix("idle-ms=")
                    .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|n| n.parse::<u64>().ok())
                    .map(Duration::from_millis)
                    .filter(|idle| valid_idle(*idle))
                    .ok_or(HandoffError::Idle)?,
            ),
        };
        Ok(Handoff {
            target: FlowTarget::parse(authority, kind.protocol().as_str())?,
            source: source.parse().map_err(HandoffError::Source)?,
            idle,
        })
    }
}

fn valid_idle(idle: Duration) -> bool {
    idle >= Duration::from_millis(1) && idle <= MAX_UDP_IDLE
}

/// Splits a byte stream into handoff lines, taking input in pieces of any size.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// Adds `input` and returns the lines it completed (newlines removed); a line growing past
    /// [`MAX_LINE`] is an error, and the stream is not worth reading further.
    pub fn push(&mut self, mut input: &[u8]) -> Result<Vec<Vec<u8>>, HandoffError> {
        let mut lines = Vec::new();
        while let Some(end) = input.iter().position(|b| *b == b'\n') {
            if self.partial.len() + end + 1 > MAX_LINE {
                return Err(HandoffError::TooLong);
            }
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&input[..end]);
            lines.push(line);
            input = &input[end + 1..];
        }
        if self.partial.len() + input.len() >= MAX_LINE {
            return Err(HandoffError::TooLong);
        }
        self.partial.extend_from_slice(input);
        Ok(lines)
    }

    /// Bytes of a line begun and not yet ended.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff() -> Handoff {
        Handoff {
            target: FlowTarget::new("echo", "demo", "cluster-a.local", 8080, Protocol::Tcp),
            source: "shop/web-0@10.244.0.7".parse().expect("source"),
            idle: None,
        }
    }

    fn udp_handoff() -> Handoff {
        Handoff {
            target: FlowTarget::new("dns", "demo", "cluster-a.local", 53, Protocol::Udp),
            source: "shop/web-0@10.244.0.7".parse().expect("source"),
            idle: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn a_line_reads_back_as_written() {
        let line = handoff().encode().expect("encode");
        assert_eq!(
            line,
            b"echo.demo.cluster-a.local:8080 shop/web-0@10.244.0.7\n".to_vec()
        );
        assert_eq!(
            Handoff::parse(Kind::Tcp, &line[..line.len() - 1]).expect("parse"),
            handoff()
        );
    }

    #[test]
    fn a_udp_line_carries_the_idle_time() {
        let line = udp_handoff().encode().expect("encode");
        assert_eq!(
            line,
            b"dns.demo.cluster-a.local:53 shop/web-0@10.244.0.7 idle-ms=60000\n".to_vec()
        );
        assert_eq!(udp_handoff().kind(), Kind::Udp);
        assert_eq!(
            Handoff::parse(Kind::Udp, &line[..line.len() - 1]).expect("parse"),
            udp_handoff()
        );
        // A line read on a connection of the other kind is refused.
        assert!(Handoff::parse(Kind::Tcp, &line[..line.len() - 1]).is_err());
    }

    #[test]
    fn the_prefaces_cannot_be_taken_for_http2_or_for_each_other() {
        for kind in [Kind::Tcp, Kind::Udp] {
            assert_ne!(kind.preface()[0], b"PRI * HTTP/2.0"[0]);
            assert_eq!(
                kind.preface()[0],
                PREFACE[0],
                "one first byte for the router to tell"
            );
            assert!(kind.preface().len() <= MAX_PREFACE);
            assert_eq!(Kind::of_preface(kind.preface()), Some(kind));
        }
        assert_ne!(PREFACE, UDP_PREFACE);
        assert_eq!(Kind::of_preface(b"servicekeel-handoff/2\n"), None);
    }

    #[test]
    fn an_idle_time_only_where_it_belongs() {
        let mut tcp = handoff();
        tcp.idle = Some(Duration::from_secs(1));
        assert_eq!(tcp.encode(), Err(HandoffError::IdleForTcp));
        let mut udp = udp_handoff();
        for idle in [None, Some(Duration::ZERO), Some(MAX_UDP_IDLE * 2)] {
            udp.idle = idle;
            assert_eq!(udp.encode(), Err(HandoffError::Idle), "{idle:?}");
        }
    }

    #[test]
    fn malformed_lines_are_refused_with_what_is_wrong() {
        let cases: [(Kind, &[u8], &str); 13] = [
            (Kind::Tcp, b"", "not `authority source`"),
            (Kind::Tcp, b"echo.demo.c:80", "not `authority source`"),
            (
                Kind::Tcp,
                b"echo.demo.c:80 a/b extra",
                "not `authority source`",
            ),
            (Kind::Tcp, b"echo.demo.c:80  a/b", "not `authority source`"),
            (
                Kind::Tcp,
                b"echo.demo:80 a/b",
                "needs name.namespace.cluster",
            ),
            (Kind::Tcp, b"echo.demo.c:0 a/b", "port"),
            (Kind::Tcp, b"echo.demo.c:80 nobody", "namespace/name"),
            (
                Kind::Udp,
                b"echo.demo.c:80 a/b",
                "not `authority source idle-ms=N`",
            ),
            (Kind::Udp, b"echo.demo.c:80 a/b idle=5", "idle time"),
            (Kind::Udp, b"echo.demo.c:80 a/b idle-ms=", "idle time"),
            (Kind::Udp, b"echo.demo.c:80 a/b idle-ms=+5", "idle time"),
            (Kind::Udp, b"echo.demo.c:80 a/b idle-ms=0", "idle time"),
            (
                Kind::Udp,
                b"echo.demo.c:80 a/b idle-ms=99999999999999999999",
                "idle time",
            ),
        ];
        for (kind, line, expected) in cases {
            let error = Handoff::parse(kind, line).expect_err("refused").to_string();
            assert!(error.contains(expected), "{line:?}: {error}");
        }
        assert_eq!(
            Handoff::parse(Kind::Tcp, b"\xff x"),
            Err(HandoffError::Encoding)
        );
    }

    #[test]
    fn lines_are_found_across_pieces_of_any_size() {
        let stream = b"a b\nc d\ne f\n";
        for size in 1..stream.len() {
            let mut lines = Lines::default();
            let mut found = Vec::new();
            for piece in stream.chunks(size) {
                found.extend(lines.push(piece).expect("lines"));
            }
            assert_eq!(
                found,
                vec![b"a b".to_vec(), b"c d".to_vec(), b"e f".to_vec()]
            );
            assert_eq!(lines.pending(), 0);
        }
    }

    #[test]
    fn a_line_without_end_is_refused_at_the_limit() {
        let mut lines = Lines::default();
        assert!(lines.push(&[b'a'; MAX_LINE - 1]).is_ok());
        assert_eq!(lines.push(b"a"), Err(HandoffError::TooLong));
        let mut lines = Lines::default();
        let mut long = vec![b'a'; MAX_LINE];
        long.push(b'\n');
        assert_eq!(lines.push(&long), Err(HandoffError::TooLong));
        let mut fits = vec![b'a'; MAX_LINE - 1];
        fits.push(b'\n');
        assert_eq!(Lines::default().push(&fits).expect("fits").len(), 1);
    }
}
