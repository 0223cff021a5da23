//! What travels in the tunnel, whatever carries it: the target a flow names, who opens it, UDP
//! datagrams framed inside a flow, and the registration of a pod's exports ([`registration`]).
//!
//! The transport is HTTP/2: a flow is a `CONNECT` stream whose `:authority` is
//! `name.namespace.cluster:port` (the first label is the service, the second its namespace, the
//! rest its cluster, which may hold dots), with the protocol, the contract's version and the
//! source pod in the headers named here. Inside a UDP flow each datagram is a 2-byte big-endian
//! length and the payload; the decoder checks the length before buffering anything for it and
//! takes input in pieces of any size.

pub mod handoff;
pub mod registration;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::names::{check_dns1123_label, check_dns1123_subdomain};
use crate::{Protocol, ServiceKey};

/// Version of the tunnel contract; a peer speaking another is refused.
pub const VERSION: u8 = 1;

/// The largest UDP payload carried (IPv4's limit).
pub const MAX_DATAGRAM: usize = 65_507;

/// Header carrying [`VERSION`] on every request.
pub const VERSION_HEADER: &str = "servicekeel-version";
/// Header carrying a flow's protocol, `TCP` or `UDP`.
pub const PROTOCOL_HEADER: &str = "servicekeel-protocol";
/// Header carrying the source pod, as [`Source`] writes it.
pub const SOURCE_HEADER: &str = "servicekeel-source";
/// Path of the registration request (`PUT`, body a [`registration::Registration`]).
pub const REGISTRATION_PATH: &str = "/servicekeel/v1/registration";
/// Largest header block a peer may send.
pub const MAX_HEADER_BYTES: u32 = 16 * 1024;

/// The name every router of `cluster` carries in its certificate (a DNS subject alternative
/// name), and that routers of other clusters expect of it.
pub fn router_identity(cluster: &str) -> String {
    format!("servicekeel-router.{cluster}")
}

/// Whether a peer's version header is one this build speaks.
pub fn check_version(header: Option<&str>) -> Result<(), String> {
    match header {
        Some(value) if value.trim() == VERSION.to_string() => Ok(()),
        Some(value) => Err(format!(
            "tunnel version {value:?} is not supported (this side speaks {VERSION})"
        )),
        None => Err(format!("{VERSION_HEADER} header missing")),
    }
}

/// The pod a flow or a registration comes from: `namespace/name` and, when known, `@ip`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub namespace: String,
    pub name: String,
    pub ip: Option<IpAddr>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if let Some(ip) = self.ip {
            write!(f, "@{ip}")?;
        }
        Ok(())
    }
}

impl FromStr for Source {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (pod, ip) = match text.split_once('@') {
            Some((pod, ip)) => (
                pod,
                Some(
                    ip.parse()
                        .map_err(|_| format!("source {text:?}: {ip:?} is not an IP address"))?,
                ),
            ),
            None => (text, None),
        };
        let (namespace, name) = pod
            .split_once('/')
            .ok_or_else(|| format!("source {text:?} is not namespace/name[@ip]"))?;
        check_dns1123_label(namespace)
            .map_err(|m| format!("source namespace {namespace:?} {m}"))?;
        check_dns1123_subdomain(name).map_err(|m| format!("source name {name:?} {m}"))?;
        Ok(Source {
            namespace: namespace.into(),
            name: name.into(),
            ip,
        })
    }
}

/// The service, port and protocol a flow is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowTarget {
    pub service: ServiceKey,
    pub port: u16,
    pub protocol: Protocol,
}

impl FlowTarget {
    /// `name.namespace.cluster:port`, the form a flow names its target in.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.service, self.port)
    }

    /// Reads an authority and a protocol name (`TCP`/`UDP`, any case).
    pub fn parse(authority: &str, protocol: &str) -> Result<Self, TargetError> {
        let bad = |message: String| TargetError {
            authority: authority.to_string(),
            message,
        };
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("needs :port".into()))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("port {port:?} is not 1-65535")))?;
        let mut labels = host.splitn(3, '.');
        let (Some(name), Some(namespace), Some(cluster)) =
            (labels.next(), labels.next(), labels.next())
        else {
            return Err(bad("needs name.namespace.cluster".into()));
        };
        check_dns1123_label(name).map_err(|m| bad(format!("service {name:?} {m}")))?;
        check_dns1123_label(namespace).map_err(|m| bad(format!("namespace {namespace:?} {m}")))?;
        check_dns1123_subdomain(cluster).map_err(|m| bad(format!("cluster {cluster:?} {m}")))?;
        let protocol = Protocol::parse(protocol)
            .ok_or_else(|| bad(format!("protocol {protocol:?} is not TCP or UDP")))?;
        Ok(FlowTarget::new(name, namespace, cluster, port, protocol))
    }

    /// A target from its parts, as they are (no checks).
    pub fn new(name: &str, namespace: &str, cluster: &str, port: u16, protocol: Protocol) -> Self {
        FlowTarget {
            service: ServiceKey {
                name: name.into(),
                namespace: namespace.into(),
                cluster: cluster.into(),
            },
            port,
            protocol,
        }
    }
}

impl fmt::Display for FlowTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.authority(), self.protocol)
    }
}

impl FromStr for FlowTarget {
    type Err = TargetError;

    /// `name.namespace.cluster:port/PROTOCOL`, as [`fmt::Display`] writes it.
    fn from_str(text: &str) -> Result<Self, TargetError> {
        let (authority, protocol) = text.rsplit_once('/').ok_or_else(|| TargetError {
            authority: text.to_string(),
            message: "needs /TCP or /UDP".into(),
        })?;
        FlowTarget::parse(authority, protocol)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flow target {authority:?}: {message}")]
pub struct TargetError {
    pub authority: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("datagram of {0} bytes is over the {MAX_DATAGRAM}-byte limit")]
    TooLarge(usize),
}

/// Appends one framed datagram to `out`.
pub fn encode_datagram(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.len() > MAX_DATAGRAM {
        return Err(FrameError::TooLarge(payload.len()));
    }
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Splits a byte stream back into datagrams.
#[derive(Debug, Default)]
pub struct DatagramDecoder {
    buffer: Vec<u8>,
}

impl DatagramDecoder {
    /// Takes the next piece of the stream; returns the datagrams it completes. After an error
    /// the stream is unusable (the peer broke the framing) and the flow should be reset.
    pub fn push(&mut self, mut input: &[u8]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut datagrams = Vec::new();
        loop {
            // Complete the length prefix first; refuse an oversized length before buffering.
            while self.buffer.len() < 2 && !input.is_empty() {
                self.buffer.push(input[0]);
                input = &input[1..];
            }
            if self.buffer.len() < 2 {
                return Ok(datagrams);
            }
            let length = usize::from(u16::from_be_bytes([self.buffer[0], self.buffer[1]]));
            if length > MAX_DATAGRAM {
                return Err(FrameError::TooLarge(length));
            }
            let wanted = 2 + length - self.buffer.len();
            let take = wanted.min(input.len());
            self.buffer.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.buffer.len() < 2 + length {
                return Ok(datagrams);
            }
            datagrams.push(self.buffer[2..].to_vec());
            self.buffer.clear();
        }
    }

    /// Bytes of an unfinished datagram (a stream that ends here was cut short).
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip_with_dotted_clusters() {
        let target: FlowTarget = "simple-server.default.cluster-a.local:8080/tcp"
            .parse()
            .unwrap();
        assert_eq!(target.service.name, "simple-server");
        assert_eq!(target.service.namespace, "default");
        assert_eq!(target.service.cluster, "cluster-a.local");
        assert_eq!(target.port, 8080);
        assert_eq!(target.protocol, Protocol::Tcp);
        assert_eq!(
            target.to_string(),
            "simple-server.default.cluster-a.local:8080/TCP"
        );
        assert_eq!(target.to_string().parse::<FlowTarget>().unwrap(), target);
        assert_eq!(
            FlowTarget::parse("dns.kube-system.edge:53", "UDP")
                .unwrap()
                .protocol,
            Protocol::Udp
        );
    }

    #[test]
    fn bad_targets_say_why() {
        let cases = [
            ("a.b.c", "TCP", "needs :port"),
            ("a.b.c:0", "TCP", "port \"0\" is not 1-65535"),
            ("a.b.c:99999", "TCP", "is not 1-65535"),
            ("a.b:80", "TCP", "needs name.namespace.cluster"),
            ("A.b.c:80", "TCP", "service \"A\""),
            ("a.b_c.d:80", "TCP", "namespace \"b_c\""),
            ("a.b.-c:80", "TCP", "cluster \"-c\""),
            ("a.b.c:80", "SCTP", "protocol \"SCTP\" is not TCP or UDP"),
        ];
        for (authority, protocol, expected) in cases {
            let error = FlowTarget::parse(authority, protocol)
                .expect_err(authority)
                .to_string();
            assert!(error.contains(expected), "{authority}: {error}");
        }
        assert!("a.b.c:80".parse::<FlowTarget>().is_err());
    }

    #[test]
    fn sources_round_trip_and_bad_ones_say_why() {
        for text in ["default/client-0", "edge/web-1@10.244.1.7", "a/b@fd00::1"] {
            assert_eq!(text.parse::<Source>().unwrap().to_string(), text);
        }
        for (bad, expected) in [
            ("client", "is not namespace/name[@ip]"),
            ("Default/x", "source namespace \"Default\""),
            ("a/b@10.0.0", "\"10.0.0\" is not an IP address"),
            ("a/", "source name \"\""),
        ] {
            let error = bad.parse::<Source>().unwrap_err();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn versions_are_checked() {
        assert_eq!(check_version(Some("1")), Ok(()));
        assert!(
            check_version(Some("2"))
                .unwrap_err()
                .contains("\"2\" is not supported")
        );
        assert!(check_version(None).unwrap_err().contains("missing"));
    }

    #[test]
    fn datagrams_survive_any_split_including_byte_by_byte() {
        let payloads: Vec<Vec<u8>> = vec![
            vec![],
            b"hello".to_vec(),
            vec![7; 300],
            vec![0xff; MAX_DATAGRAM],
        ];
        let mut stream = Vec::new();
        for payload in &payloads {
            encode_datagram(payload, &mut stream).unwrap();
        }
        for chunk in [1, 2, 3, 7, 1000, stream.len()] {
            let mut decoder = DatagramDecoder::default();
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                out.extend(decoder.push(piece).unwrap());
            }
            assert_eq!(out, payloads, "chunks of {chunk}");
            assert_eq!(decoder.pending(), 0);
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_buffering() {
        assert_eq!(
            encode_datagram(&vec![0; MAX_DATAGRAM + 1], &mut Vec::new()),
            Err(FrameError::TooLarge(MAX_DATAGRAM + 1))
        );
        let mut decoder = DatagramDecoder::default();
        assert_eq!(decoder.push(&[0xff]), Ok(vec![]));
        assert_eq!(
            decoder.push(&[0xff, 1, 2, 3]),
            Err(FrameError::TooLarge(65_535))
        );
        assert_eq!(decoder.pending(), 2, "only the prefix was buffered");
    }

    #[test]
    fn a_truncated_stream_is_visible() {
        let mut stream = Vec::new();
        encode_datagram(b"abcdef", &mut stream).unwrap();
        let mut decoder = DatagramDecoder::default();
        assert_eq!(decoder.push(&stream[..5]), Ok(vec![]));
        assert_eq!(decoder.pending(), 5);
    }
}
