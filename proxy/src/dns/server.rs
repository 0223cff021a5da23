//! The sidecar's DNS server: binding and serving (UDP and TCP on one address), and writing the
//! wire response for what [`Names`] decides. Over UDP the common question for an imported name
//! is answered inline as it is read ([`super::inline`]); every other request, and every TCP
//! request, goes through hickory-server's request handling to [`Handler`]. Imported names are answered
//! authoritatively with their local address (A) or an empty NOERROR (other types); every other
//! name goes to the upstream and its answer is passed back; an unreachable upstream gets
//! SERVFAIL. Only loopback clients are served.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use hickory_proto::op::MessageType;
use hickory_proto::op::{Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinDecodable;
use hickory_proto::serialize::binary::BinDecoder;
use hickory_server::net::BufDnsStreamHandle;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{
    Request, RequestHandler, ResponseHandle, ResponseHandler, ResponseInfo, Server,
};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::udp::ReadOnlyUdp;
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

/// The empty question section of an answer that repeats no question.
fn no_questions() -> Result<Queries, hickory_proto::serialize::binary::DecodeError> {
    Queries::read(&mut BinDecoder::new(&[]), 0)
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
    let none = no_questions();
    let builder = match &none {
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

/// Largest UDP request read whole; longer datagrams are cut to it and refused as malformed.
const MAX_UDP_REQUEST: usize = 65_536;
/// Answers waiting to be sent by the full path before it waits for room.
const UDP_SEND_QUEUE: usize = 1024;
/// Most requests read before the inline answers to them are sent, in one system call.
const UDP_BATCH: usize = 32;

/// Serves `socket` until `stop`: reads what is waiting (up to [`UDP_BATCH`] datagrams), answers
/// what [`super::inline::answer`] can and sends those answers together, and hands the rest to a
/// task each through the handler. Waits for those tasks before it returns.
async fn serve_udp(socket: Arc<ReadOnlyUdp>, handler: Handler, stop: CancellationToken) {
    let placeholder = socket.local_addr().unwrap_or(([127, 0, 0, 1], 0).into());
    let (responses, outgoing) = BufDnsStreamHandle::with_buffer_size(placeholder, UDP_SEND_QUEUE);
    let sender = tokio::spawn(send_responses(socket.clone(), outgoing));
    let mut full = JoinSet::new();
    let mut buffer = vec![0u8; MAX_UDP_REQUEST];
    let (mut name, mut answer) = (String::new(), Vec::with_capacity(512));
    // The batch's answers end to end, and where each goes and ends.
    let (mut answers, mut ends) = (Vec::new(), Vec::with_capacity(UDP_BATCH));
    loop {
        let mut received = tokio::select! {
            received = socket.recv_from(&mut buffer) => received,
            () = stop.cancelled() => break,
        };
        for taken in 1..=UDP_BATCH {
            match received {
                // Nothing can be answered to port 0.
                Ok((_, src)) if src.port() == 0 => {}
                Ok((length, src)) => {
                    let request = &buffer[..length];
                    let answered = handler.names.read().is_ok_and(|names| {
                        super::inline::answer(request, src, &names, &mut name, &mut answer)
                    });
                    if answered {
                        handler.metrics.dns_query(DnsOutcome::Local);
                        answers.extend_from_slice(&answer);
                        ends.push((src, answers.len()));
                    } else {
                        let (handler, responses) =
                            (handler.clone(), responses.with_remote_addr(src));
                        let request = request.to_vec();
                        full.spawn(async move {
                            answer_in_full(&handler, request, src, responses).await
                        });
                    }
                }
                Err(cause) if cause.kind() == std::io::ErrorKind::WouldBlock => break,
                // Errors on an unconnected UDP socket come from earlier sends (ICMP).
                Err(cause) => tracing::debug!(%cause, "DNS receive failed"),
            }
            if taken == UDP_BATCH {
                break;
            }
            received = socket.try_recv_from(&mut buffer);
        }
        let mut start = 0;
        let batch: Vec<(SocketAddr, &[u8])> = ends
            .iter()
            .map(|&(dst, end)| (dst, &answers[std::mem::replace(&mut start, end)..end]))
            .collect();
        if let Err(cause) = socket.send_all(&batch).await {
            tracing::debug!(%cause, "DNS answer not sent");
        }
        answers.clear();
        ends.clear();
        while full.try_join_next().is_some() {}
    }
    while full.join_next().await.is_some() {}
    drop(responses);
    let _ = sender.await;
}

/// Sends what the full path answers, until every handle to `outgoing` is gone.
async fn send_responses(
    socket: Arc<ReadOnlyUdp>,
    mut outgoing: hickory_server::net::xfer::StreamReceiver,
) {
    while let Some(message) = outgoing.next().await {
        if let Err(cause) = socket.send_to(message.bytes(), message.addr()).await {
            tracing::debug!(%cause, dst = %message.addr(), "DNS answer not sent");
        }
    }
}

/// One UDP request through hickory's decoding and the handler, as hickory's own server does it:
/// shorter than a header, dropped; a response, dropped; undecodable, FORMERR.
async fn answer_in_full(
    handler: &Handler,
    request: Vec<u8>,
    src: SocketAddr,
    responses: BufDnsStreamHandle,
) {
    let Ok(header) = Header::read(&mut BinDecoder::new(&request)) else {
        return;
    };
    let response = ResponseHandle::new(src, responses, Protocol::Udp);
    match Request::from_bytes(request, src, Protocol::Udp) {
        Ok(request) if request.metadata.message_type == MessageType::Response => {}
        Ok(request) => {
            handler
                .handle_request::<_, TokioTime>(&request, response)
                .await;
        }
        Err(cause) => {
            tracing::debug!(%cause, %src, "undecodable DNS request; FORMERR");
            handler.metrics.dns_query(DnsOutcome::Rejected);
            let Ok(none) = no_questions() else {
                return;
            };
            let message = MessageResponseBuilder::new(&none, None)
                .error_msg(&header.metadata, ResponseCode::FormErr);
            let mut response = response;
            if let Err(cause) = response.send_response(message).await {
                tracing::debug!(%cause, %src, "FORMERR not sent");
            }
        }
    }
}

/// The DNS server, bound: UDP and TCP on one address.
pub struct DnsServer {
    addr: SocketAddr,
    server: Server<Handler>,
    udp: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
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
        let stop = CancellationToken::new();
        let udp = ReadOnlyUdp::new(udp).map_err(|e| bind_error(addr, e))?;
        let udp = tokio::spawn(serve_udp(Arc::new(udp), handler.clone(), stop.clone()));
        let mut server = Server::new(handler);
        server.register_listener(tcp, TCP_TIMEOUT, 65_535);
        Ok(DnsServer {
            addr,
            server,
            udp,
            stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for in-flight queries.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let _ = self.udp.await;
        let _ = self.server.shutdown_gracefully().await;
    }
}

#[cfg(test)]
pub(super) mod tests {
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

    /// A handler importing `db` (and `_grpc-db`) in `default`, with an upstream that answers
    /// nothing.
    pub(super) fn handler() -> Handler {
        let home = Home {
            namespace: "default",
            cluster: "c",
            cluster_domain: "cluster.local",
        };
        let keys = ["db", "_grpc-db"].map(|name| ServiceKey {
            name: name.into(),
            namespace: "default".into(),
            cluster: "c".into(),
        });
        let names = Names::new(
            keys.iter()
                .zip([1, 2])
                .map(|(key, last)| (key, Ipv4Addr::new(127, 0, 66, last))),
            home,
        );
        Handler::new(
            Arc::new(RwLock::new(Arc::new(names))),
            Upstream::new("127.0.0.1:9".parse().unwrap(), Duration::from_secs(1)),
            Arc::new(Metrics::default()),
        )
    }

    async fn answer_code(src: &str) -> ResponseCode {
        let handler = handler();
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
mod inline_tests {
    use futures::StreamExt;

    use super::tests::handler;
    use super::*;
    use crate::dns::inline;

    const CLIENT: &str = "127.0.0.1:5353";

    /// A query: id 0xbeef, the given flag bytes, one question for `name` (plain labels).
    fn query(flags: [u8; 2], name: &str, qtype: u16, qclass: u16) -> Vec<u8> {
        let mut bytes = vec![0xbe, 0xef, flags[0], flags[1], 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|label| !label.is_empty()) {
            bytes.push(label.len() as u8);
            bytes.extend_from_slice(label.as_bytes());
        }
        bytes.push(0);
        bytes.extend_from_slice(&qtype.to_be_bytes());
        bytes.extend_from_slice(&qclass.to_be_bytes());
        bytes
    }

    /// What the full path sends for `request` from `src`, if anything.
    async fn in_full(request: &[u8], src: &str) -> Option<Vec<u8>> {
        let src: SocketAddr = src.parse().unwrap();
        let (responses, mut outgoing) = BufDnsStreamHandle::new(src);
        answer_in_full(&handler(), request.to_vec(), src, responses).await;
        let sent = tokio::time::timeout(Duration::from_secs(3), outgoing.next()).await;
        sent.ok().flatten().map(|message| message.bytes().to_vec())
    }

    fn inline(request: &[u8], src: &str) -> Option<Vec<u8>> {
        let names = handler().names.read().unwrap().clone();
        let mut answer = Vec::new();
        inline::answer(
            request,
            src.parse().unwrap(),
            &names,
            &mut String::new(),
            &mut answer,
        )
        .then_some(answer)
    }

    #[tokio::test]
    async fn inline_answers_are_the_full_paths_byte_for_byte() {
        let cases = [
            query([0x01, 0x00], "db.", 1, 1),
            query([0x00, 0x00], "db.default.svc.cluster.local", 1, 1),
            query([0x01, 0x00], "DB.Default.SVC.Cluster.Local.", 1, 1),
            query([0x01, 0x00], "db.default.svc.clusterset.local.", 28, 1),
            query([0x01, 0x00], "db.default.c.", 16, 1),
            query([0x01, 0x00], "db.", 1, 3),
            query([0x01, 0x00], "_grpc-db.default.", 1, 1),
            // AA set in the query; RA, Z, AD and CD set; a response code in a query.
            query([0x05, 0xf0], "db.", 1, 1),
            query([0x01, 0x2f], "db.", 1, 1),
        ];
        for request in cases {
            let full = in_full(&request, CLIENT)
                .await
                .expect("the full path answers");
            let quick = inline(&request, CLIENT)
                .unwrap_or_else(|| panic!("not answered inline: {request:x?}"));
            assert_eq!(quick, full, "for {request:x?}");
            let message = Message::from_vec(&quick).unwrap();
            assert_eq!(message.metadata.response_code, ResponseCode::NoError);
        }
    }

    #[test]
    fn everything_but_the_common_question_goes_the_full_path() {
        let plain = query([0x01, 0x00], "db.", 1, 1);
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut request = plain.clone();
            edit(&mut request);
            request
        };
        assert!(inline(&plain, CLIENT).is_some());
        let cases = [
            ("not imported", query([0x01, 0x00], "example.com.", 1, 1)),
            ("another namespace", query([0x01, 0x00], "db.other.", 1, 1)),
            ("the root", query([0x01, 0x00], ".", 1, 1)),
            ("a response", with(&|r| r[2] |= 0x80)),
            ("NOTIFY", with(&|r| r[2] |= 4 << 3)),
            ("truncated", with(&|r| r[2] |= 0x02)),
            ("two questions", with(&|r| r[5] = 2)),
            ("an answer count", with(&|r| r[7] = 1)),
            ("an authority count", with(&|r| r[9] = 1)),
            ("EDNS", {
                let mut request = with(&|r| r[11] = 1);
                request.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
                request
            }),
            ("a byte after the question", with(&|r| r.push(0))),
            ("the class cut", with(&|r| r.truncate(r.len() - 1))),
            ("a compressed name", {
                let mut request = plain[..12].to_vec();
                request.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                request
            }),
            ("a dot inside a label", with(&|r| r[13] = b'.')),
            (
                "a label byte outside letters and digits",
                with(&|r| r[13] = b'*'),
            ),
            ("a header only", plain[..12].to_vec()),
            ("nothing", Vec::new()),
        ];
        for (what, request) in cases {
            assert_eq!(inline(&request, CLIENT), None, "{what}");
        }
        assert_eq!(
            inline(&plain, "10.1.2.3:5353"),
            None,
            "a client off loopback"
        );
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
