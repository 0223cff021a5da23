//! The sidecar's DNS server: binding and serving (hickory-server, UDP and TCP on one address),
//! and writing the wire response for what [`Names`] decides. Imported names are answered
//! authoritatively with their local address (A) or an empty NOERROR (other types); every other
//! name goes to the upstream and its answer is passed back; an unreachable upstream gets
//! SERVFAIL. Only loopback clients are served.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo, Server};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use tokio::net::{TcpListener, UdpSocket};

use super::upstream::Upstream;
use super::{Answer, Names};
use crate::metrics::{DnsOutcome, Metrics};

/// TTL of local answers: short, so a changed import is picked up quickly.
pub const LOCAL_TTL: u32 = 5;
/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// The current name table, replaced as a whole when the imports change.
pub type SharedNames = Arc<RwLock<Arc<Names>>>;

#[derive(Debug, thiserror::Error)]
#[error("cannot bind the DNS server to {addr}: {cause}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub cause: std::io::Error,
}

/// Answers queries: local names from the table, the rest through the upstream.
#[derive(Debug, Clone)]
pub struct Handler {
    names: SharedNames,
    upstream: Upstream,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(names: SharedNames, upstream: Upstream, metrics: Arc<Metrics>) -> Self {
        Handler {
            names,
            upstream,
            metrics,
        }
    }
}

/// What to report when a response could not be sent.
fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// Answers with `code` and no records. The question is repeated (as resolvers expect) only when
/// it is one question whose name stays within itself: the question goes back as it came, and
/// pointers out of it would point at other bytes in the answer and make it unreadable.
async fn error<R: ResponseHandler>(
    request: &Request,
    mut response: R,
    code: ResponseCode,
) -> ResponseInfo {
    let echo =
        request.request_info().is_ok() && !question_points_outside_itself(request.as_slice());
    let no_question = Queries::read(&mut BinDecoder::new(&[]), 0);
    let builder = match &no_question {
        Ok(empty) if !echo => MessageResponseBuilder::new(empty, None),
        _ => MessageResponseBuilder::from_message_request(request),
    };
    let message = builder.error_msg(&request.metadata, code);
    response
        .send_response(message)
        .await
        .unwrap_or_else(|_| failed(request))
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let rejected = if !request.src().ip().is_loopback() {
            Some(ResponseCode::Refused)
        } else if request.metadata.op_code != OpCode::Query {
            Some(ResponseCode::NotImp)
        } else if question_points_outside_itself(request.as_slice()) {
            // The question is echoed in the answer as it came; a pointer out of the question
            // section would point at different bytes there and make the answer unreadable.
            Some(ResponseCode::FormErr)
        } else {
            None
        };
        let info = match (rejected, request.request_info()) {
            (None, Ok(info)) => info,
            (code, _) => {
                self.metrics.dns_query(DnsOutcome::Rejected);
                return error(request, response, code.unwrap_or(ResponseCode::FormErr)).await;
            }
        };
        let builder = MessageResponseBuilder::from_message_request(request);
        let name = info.query.name().to_string();
        let answer = self
            .names
            .read()
            .map(|names| names.lookup(&name))
            .unwrap_or(Answer::Forward);
        match answer {
            Answer::Local(ip) => {
                self.metrics.dns_query(DnsOutcome::Local);
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                let record = (info.query.query_type() == RecordType::A
                    && info.query.query_class() == DNSClass::IN)
                    .then(|| {
                        Record::from_rdata(
                            Name::from(info.query.name().clone()),
                            LOCAL_TTL,
                            RData::A(A(ip)),
                        )
                    });
                let message = builder.build(metadata, record.iter(), [], [], []);
                response
                    .send_response(message)
                    .await
                    .unwrap_or_else(|_| failed(request))
            }
            Answer::Forward => {
                let forwarded = self
                    .upstream
                    .forward(request.as_slice())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| Message::from_vec(&bytes).map_err(|e| e.to_string()));
                match forwarded {
                    Ok(upstream) => {
                        self.metrics.dns_query(DnsOutcome::Forwarded);
                        let mut builder = builder;
                        if let Some(edns) = upstream.edns.as_ref() {
                            builder.edns(edns);
                        }
                        let message = builder.build(
                            upstream.metadata,
                            upstream.answers.iter(),
                            upstream.authorities.iter(),
                            [],
                            upstream.additionals.iter(),
                        );
                        response
                            .send_response(message)
                            .await
                            .unwrap_or_else(|_| failed(request))
                    }
                    Err(cause) => {
                        self.metrics.dns_query(DnsOutcome::UpstreamFailed);
                        tracing::debug!(%cause, name, "upstream failed; SERVFAIL");
                        error(request, response, ResponseCode::ServFail).await
                    }
                }
            }
        }
    }
}

/// Whether the first question's name, as sent, uses a compression pointer to anywhere but an
/// earlier byte of that same name's question section (only the header precedes it). Malformed
/// names are left to the decoder.
fn question_points_outside_itself(message: &[u8]) -> bool {
    const HEADER: usize = 12;
    let mut at = HEADER;
    // Each step moves forward; a name is at most 255 bytes.
    for _ in 0..256 {
        let Some(&length) = message.get(at) else {
            return false;
        };
        match length {
            0 => return false,
            1..=63 => at += 1 + usize::from(length),
            0xc0..=0xff => {
                let Some(&low) = message.get(at + 1) else {
                    return false;
                };
                let target = usize::from(u16::from_be_bytes([length & 0x3f, low]));
                return target < HEADER || target >= at;
            }
            _ => return false,
        }
    }
    false
}

/// The DNS server, bound: UDP and TCP on one address.
pub struct DnsServer {
    addr: SocketAddr,
    server: Server<Handler>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (port 0: the same free port for both) and starts serving.
    pub async fn bind(addr: SocketAddr, handler: Handler) -> Result<DnsServer, BindError> {
        let bind_error = |addr, cause| BindError { addr, cause };
        // With port 0 the UDP port is picked first and TCP takes the same; retry if it is taken.
        let mut attempts = if addr.port() == 0 { 10 } else { 1 };
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(addr)
                .await
                .map_err(|e| bind_error(addr, e))?;
            let bound = udp.local_addr().map_err(|e| bind_error(addr, e))?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => break (udp, tcp),
                Err(cause) if attempts > 1 => {
                    attempts -= 1;
                    tracing::debug!(%cause, %bound, "TCP port taken; picking another");
                }
                Err(cause) => return Err(bind_error(bound, cause)),
            }
        };
        let addr = udp.local_addr().map_err(|e| bind_error(addr, e))?;
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_TIMEOUT, 65_535);
        Ok(DnsServer { addr, server })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for in-flight queries.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Mutex;

    use hickory_proto::op::{MessageType, Query};
    use hickory_server::net::NetError;
    use hickory_server::net::runtime::TokioTime;
    use hickory_server::net::xfer::Protocol;
    use hickory_server::zone_handler::MessageResponse;
    use servicekeel_api::ServiceKey;

    use super::*;
    use crate::dns::Home;

    /// Keeps the response code of what the handler sends.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Option<ResponseCode>>>);

    #[async_trait::async_trait]
    impl ResponseHandler for Capture {
        async fn send_response<'a>(
            &mut self,
            response: MessageResponse<
                '_,
                'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
            >,
        ) -> Result<ResponseInfo, NetError> {
            let metadata = *response.metadata();
            *self.0.lock().unwrap() = Some(metadata.response_code);
            Ok(ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            }))
        }
    }

    async fn answer_code(src: &str) -> ResponseCode {
        let key = ServiceKey {
            name: "db".into(),
            namespace: "default".into(),
            cluster: "c".into(),
        };
        let home = Home {
            namespace: "default",
            cluster: "c",
            cluster_domain: "cluster.local",
        };
        let names = Names::new([(&key, Ipv4Addr::new(127, 0, 66, 1))], home);
        let handler = Handler::new(
            Arc::new(RwLock::new(Arc::new(names))),
            Upstream::new("127.0.0.1:9".parse().unwrap(), Duration::from_secs(1)),
            Arc::new(Metrics::default()),
        );
        let mut message = Message::new(1, MessageType::Query, OpCode::Query);
        message.add_query(Query::query(
            Name::from_ascii("db.").unwrap(),
            RecordType::A,
        ));
        let request = Request::from_bytes(
            message.to_vec().unwrap(),
            src.parse().unwrap(),
            Protocol::Udp,
        )
        .unwrap();
        let capture = Capture::default();
        handler
            .handle_request::<_, TokioTime>(&request, capture.clone())
            .await;
        capture.0.lock().unwrap().expect("a response was sent")
    }

    #[tokio::test]
    async fn only_loopback_clients_are_served() {
        assert_eq!(answer_code("127.0.0.1:5353").await, ResponseCode::NoError);
        assert_eq!(answer_code("[::1]:5353").await, ResponseCode::NoError);
        assert_eq!(answer_code("10.1.2.3:5353").await, ResponseCode::Refused);
        assert_eq!(answer_code("[fd00::1]:5353").await, ResponseCode::Refused);
    }
}

#[cfg(test)]
mod question_pointer_tests {
    use super::question_points_outside_itself;

    fn message(question: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0x51, 0x51, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(question);
        bytes
    }

    #[test]
    fn pointers_out_of_the_question_are_found() {
        // Plain names, and names cut short, are not this check's business.
        assert!(!question_points_outside_itself(&message(
            b"\x04echo\x00\x00\x01\x00\x01"
        )));
        assert!(!question_points_outside_itself(&message(b"\x04ech")));
        assert!(!question_points_outside_itself(&message(b"")));
        // Into the header, at itself, forward.
        assert!(question_points_outside_itself(&message(
            b"\xc0\x00\x00\x01\x00\x01"
        )));
        assert!(question_points_outside_itself(&message(
            b"\xc0\x0c\x00\x01\x00\x01"
        )));
        assert!(question_points_outside_itself(&message(b"\x01a\xc0\x20")));
        // Back to an earlier label of the same name.
        assert!(!question_points_outside_itself(&message(b"\x01a\xc0\x0c")));
    }
}
