//! Handing an application's TCP connection to the router, on the node's Unix socket.
//!
//! A sidecar on the router's Unix socket may give it each accepted connection instead of
//! carrying the connection's bytes in a tunnel flow: the router then relays between the
//! application's socket and the endpoint itself, and the sidecar is out of the data path.
//!
//! The connection used for this starts with [`PREFACE`] (its first byte tells it from an HTTP/2
//! tunnel connection on the same socket); the router answers [`ACCEPTED`] before anything is
//! handed over, so a router that does not speak this is found before a connection could be
//! lost to it. Then each handoff is one line, `name.namespace.cluster:port source\n` (the
//! target's authority as in a `CONNECT`, the source as [`Source`] writes it), sent with the
//! connection's descriptor attached (`SCM_RIGHTS`) to the line's first byte. Lines are at most
//! [`MAX_LINE`] bytes; a line without a descriptor, or a malformed one, ends the connection.

use super::{FlowTarget, Source, TargetError};
use crate::Protocol;

/// What a handoff connection starts with.
pub const PREFACE: &[u8] = b"servicekeel-handoff/1\n";
/// The router's answer to [`PREFACE`].
pub const ACCEPTED: &[u8] = b"ok\n";
/// Longest handoff line, newline included.
pub const MAX_LINE: usize = 1024;

/// One connection handed over: where it goes and who opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub target: FlowTarget,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff line is not `authority source`: {0:?}")]
    Shape(String),
    #[error("handoff line is not UTF-8")]
    Encoding,
    #[error("handoff of a {0} flow: only TCP connections are handed over")]
    Protocol(Protocol),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("handoff source: {0}")]
    Source(String),
    #[error("handoff line over {MAX_LINE} bytes")]
    TooLong,
}

impl Handoff {
    /// The line for this handoff, newline included.
    pub fn encode(&self) -> Result<Vec<u8>, HandoffError> {
        if self.target.protocol != Protocol::Tcp {
            return Err(HandoffError::Protocol(self.target.protocol));
        }
        let line = format!("{} {}\n", self.target.authority(), self.source).into_bytes();
        if line.len() > MAX_LINE {
            return Err(HandoffError::TooLong);
        }
        Ok(line)
    }

    /// Reads one line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, HandoffError> {
        let line = std::str::from_utf8(line).map_err(|_| HandoffError::Encoding)?;
        let (authority, source) = line
            .split_once(' ')
            .filter(|(a, s)| !a.is_empty() && !s.is_empty() && !s.contains(' '))
            .ok_or_else(|| HandoffError::Shape(line.chars().take(80).collect()))?;
        Ok(Handoff {
            target: FlowTarget::parse(authority, Protocol::Tcp.as_str())?,
            source: source.parse().map_err(HandoffError::Source)?,
        })
    }
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
            Handoff::parse(&line[..line.len() - 1]).expect("parse"),
            handoff()
        );
    }

    #[test]
    fn the_preface_cannot_be_taken_for_http2() {
        assert_ne!(PREFACE[0], b"PRI * HTTP/2.0"[0]);
    }

    #[test]
    fn udp_is_not_handed_over() {
        let mut udp = handoff();
        udp.target.protocol = Protocol::Udp;
        assert_eq!(udp.encode(), Err(HandoffError::Protocol(Protocol::Udp)));
    }

    #[test]
    fn malformed_lines_are_refused_with_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (b"", "not `authority source`"),
            (b"echo.demo.c:80", "not `authority source`"),
            (b"echo.demo.c:80 a/b extra", "not `authority source`"),
            (b"echo.demo:80 a/b", "needs name.namespace.cluster"),
            (b"echo.demo.c:0 a/b", "port"),
            (b"echo.demo.c:80 nobody", "namespace/name"),
        ];
        for (line, expected) in cases {
            let error = Handoff::parse(line).expect_err("refused").to_string();
            assert!(error.contains(expected), "{line:?}: {error}");
        }
        assert_eq!(Handoff::parse(b"\xff x"), Err(HandoffError::Encoding));
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
