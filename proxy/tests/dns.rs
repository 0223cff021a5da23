//! The sidecar's DNS server in process, spoken to with real DNS messages over UDP and TCP:
//! every name form of an import, other record types, forwarding to a test upstream, an
//! unreachable upstream, and garbage on the wire.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

mod support;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use servicekeel_api::ServiceKey;
use servicekeel_proxy::dns::server::{DnsServer, Handler, LOCAL_TTL};
use servicekeel_proxy::dns::upstream::Upstream;
use servicekeel_proxy::dns::{Home, Names};
use servicekeel_proxy::metrics::Metrics;
use support::a_records;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const PATIENCE: Duration = Duration::from_secs(10);

const HOME: Home<'static> = Home {
    namespace: "default",
    cluster: "cluster-a",
    cluster_domain: "cluster.local",
};

fn query(id: u16, name: &str, kind: RecordType) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    message.to_vec().unwrap()
}

async fn over_udp(server: SocketAddr, packet: &[u8]) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buffer = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buffer))
        .await
        .expect("an answer")
        .unwrap();
    Message::from_vec(&buffer[..n]).unwrap()
}

async fn over_tcp(server: SocketAddr, packet: &[u8]) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    stream
        .write_all(&(packet.len() as u16).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(packet).await.unwrap();
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).await.unwrap();
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut answer).await.unwrap();
    Message::from_vec(&answer).unwrap()
}

/// A test upstream answering every A query with 127.9.9.9 (and nothing else).
async fn fake_upstream() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buffer).await else {
                return;
            };
            let request = Message::from_vec(&buffer[..n]).unwrap();
            let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
            reply.metadata.recursion_available = true;
            let question = request.queries[0].clone();
            let name = question.name().clone();
            reply.add_query(question);
            reply.add_answer(Record::from_rdata(
                name,
                300,
                RData::A(A(Ipv4Addr::new(127, 9, 9, 9))),
            ));
            socket
                .send_to(&reply.to_vec().unwrap(), from)
                .await
                .unwrap();
        }
    });
    addr
}

async fn start(upstream: SocketAddr) -> DnsServer {
    let server_key = ServiceKey {
        name: "simple-server".into(),
        namespace: "default".into(),
        cluster: "cluster-a.local".into(),
    };
    let names = Names::new([(&server_key, Ipv4Addr::new(127, 0, 66, 1))], HOME);
    let handler = Handler::new(
        Arc::new(RwLock::new(Arc::new(names))),
        Upstream::new(upstream, Duration::from_secs(2)),
        Arc::new(Metrics::default()),
    );
    DnsServer::bind("127.0.0.1:0".parse().unwrap(), handler)
        .await
        .unwrap()
}

#[tokio::test]
async fn imported_names_are_answered_locally_over_udp_and_tcp() {
    let server = start(fake_upstream().await).await;
    let addr = server.local_addr();
    for (id, name) in [
        "simple-server.",
        "simple-server.default.",
        "simple-server.default.svc.",
        "simple-server.default.svc.cluster.local.",
        "simple-server.default.cluster-a.local.",
        "simple-server.default.svc.clusterset.local.",
    ]
    .into_iter()
    .enumerate()
    {
        for answer in [
            over_udp(addr, &query(id as u16, name, RecordType::A)).await,
            over_tcp(addr, &query(id as u16, name, RecordType::A)).await,
        ] {
            assert_eq!(answer.metadata.id, id as u16);
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::NoError,
                "{name}"
            );
            assert!(answer.metadata.authoritative, "{name}");
            assert_eq!(a_records(&answer), [Ipv4Addr::new(127, 0, 66, 1)], "{name}");
            assert_eq!(answer.answers[0].ttl, LOCAL_TTL);
        }
    }
    // Other types for an imported name: an empty, authoritative NOERROR.
    let aaaa = over_udp(addr, &query(99, "simple-server.default.", RecordType::AAAA)).await;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.metadata.authoritative);
    assert!(aaaa.answers.is_empty());
    server.shutdown().await;
}

/// Bursts from several clients at once, imported and forwarded names mixed: every query is
/// answered exactly once, to the client that asked, with its own id and the right address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_from_many_clients_are_each_answered_to_their_asker() {
    let server = start(fake_upstream().await).await;
    let addr = server.local_addr();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Room for a whole burst of answers while the client is still sending.
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        clients.push(socket);
    }
    const BURST: u16 = 100;
    for id in 0..BURST {
        for (client, socket) in clients.iter().enumerate() {
            let (name, kind) = match (id + client as u16) % 5 {
                0 => ("example.com.", RecordType::A),
                1 => ("simple-server.default.", RecordType::AAAA),
                _ => ("simple-server.", RecordType::A),
            };
            let id = id + 1000 * client as u16;
            socket.send_to(&query(id, name, kind), addr).await.unwrap();
        }
    }
    for (client, socket) in clients.iter().enumerate() {
        let mut seen = vec![false; usize::from(BURST)];
        let mut buffer = vec![0u8; 4096];
        for _ in 0..BURST {
            let (n, from) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buffer))
                .await
                .expect("every query answered")
                .unwrap();
            assert_eq!(from, addr);
            let answer = Message::from_vec(&buffer[..n]).unwrap();
            let id = answer.metadata.id - 1000 * client as u16;
            assert!(
                id < BURST,
                "an answer to another client: {}",
                answer.metadata.id
            );
            assert!(!seen[usize::from(id)], "query {id} answered twice");
            seen[usize::from(id)] = true;
            let expected: &[Ipv4Addr] = match (id + client as u16) % 5 {
                0 => &[Ipv4Addr::new(127, 9, 9, 9)],
                1 => &[],
                _ => &[Ipv4Addr::new(127, 0, 66, 1)],
            };
            assert_eq!(a_records(&answer), expected, "query {id}");
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn other_names_are_forwarded() {
    let server = start(fake_upstream().await).await;
    for answer in [
        over_udp(
            server.local_addr(),
            &query(7, "example.com.", RecordType::A),
        )
        .await,
        over_tcp(
            server.local_addr(),
            &query(7, "example.com.", RecordType::A),
        )
        .await,
    ] {
        assert_eq!(answer.metadata.id, 7);
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(!answer.metadata.authoritative);
        assert!(
            answer.metadata.recursion_available,
            "the upstream's header is passed back"
        );
        assert_eq!(a_records(&answer), [Ipv4Addr::new(127, 9, 9, 9)]);
        assert_eq!(answer.answers[0].ttl, 300);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_upstream_gets_servfail_while_imports_still_answer() {
    let gone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = gone.local_addr().unwrap();
    drop(gone);
    let server = start(upstream).await;
    let forwarded = over_udp(
        server.local_addr(),
        &query(1, "example.com.", RecordType::A),
    )
    .await;
    assert_eq!(forwarded.metadata.response_code, ResponseCode::ServFail);
    let local = over_udp(
        server.local_addr(),
        &query(2, "simple-server.", RecordType::A),
    )
    .await;
    assert_eq!(a_records(&local), [Ipv4Addr::new(127, 0, 66, 1)]);
    server.shutdown().await;
}

#[tokio::test]
async fn garbage_does_not_stop_the_server() {
    let server = start(fake_upstream().await).await;
    let addr = server.local_addr();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for garbage in [
        &b""[..],
        b"\x00",
        &[0xff; 11],
        &[0xff; 600],
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c",
    ] {
        socket.send_to(garbage, addr).await.unwrap();
    }
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[0x00, 0x05, 1, 2, 3]).await.unwrap();
    drop(stream);
    let answer = over_udp(addr, &query(3, "simple-server.", RecordType::A)).await;
    assert_eq!(a_records(&answer), [Ipv4Addr::new(127, 0, 66, 1)]);
    server.shutdown().await;
}

/// A 12-byte header: id 0x5151, RD set, the given opcode and counts.
fn header(opcode: u8, qd: u16, an: u16, ns: u16, ar: u16) -> Vec<u8> {
    let mut bytes = vec![0x51, 0x51, 0x01 | (opcode << 3), 0x00];
    for count in [qd, an, ns, ar] {
        bytes.extend_from_slice(&count.to_be_bytes());
    }
    bytes
}

/// Malformed requests of the kinds resolvers meet in the wild, each with what it is.
fn malformed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let question_tail = [0x00, 0x01, 0x00, 0x01];
    let with = |head: Vec<u8>, body: &[u8]| [head, body.to_vec()].concat();
    let long_label: Vec<u8> = [&[64u8][..], &[b'a'; 64], &[0], &question_tail].concat();
    let mut long_name = Vec::new();
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'b'; 63]);
    }
    long_name.push(0);
    long_name.extend_from_slice(&question_tail);
    vec![
        ("empty", Vec::new()),
        ("truncated header", vec![0x51, 0x51, 0x01, 0x00, 0x00]),
        (
            "compression pointer to itself",
            with(header(0, 1, 0, 0, 0), &[0xc0, 0x0c, 0, 1, 0, 1]),
        ),
        (
            "two compression pointers in a loop",
            with(header(0, 1, 0, 0, 0), &[0xc0, 0x0e, 0xc0, 0x0c, 0, 1, 0, 1]),
        ),
        (
            "compression pointer past the end",
            with(header(0, 1, 0, 0, 0), &[0xc3, 0xff, 0, 1, 0, 1]),
        ),
        (
            "label of 64 bytes",
            with(header(0, 1, 0, 0, 0), &long_label),
        ),
        ("name of 320 bytes", with(header(0, 1, 0, 0, 0), &long_name)),
        (
            "reserved label type",
            with(header(0, 1, 0, 0, 0), &[0x41, b'x', 0, 0, 1, 0, 1]),
        ),
        (
            "question cut in the name",
            with(header(0, 1, 0, 0, 0), &[7, b'e', b'x', b'a']),
        ),
        (
            "question without type and class",
            with(header(0, 1, 0, 0, 0), &[4, b'e', b'c', b'h', b'o', 0]),
        ),
        (
            "huge counts, no records",
            header(0, 0xffff, 0xffff, 0xffff, 0xffff),
        ),
        (
            "one question, then claims of 65535 answers",
            with(
                header(0, 1, 0xffff, 0, 0),
                &[4, b'e', b'c', b'h', b'o', 0, 0, 1, 0, 1],
            ),
        ),
        (
            "two questions",
            with(
                header(0, 2, 0, 0, 0),
                &[
                    4, b'e', b'c', b'h', b'o', 0, 0, 1, 0, 1, 4, b'e', b'c', b'h', b'o', 0, 0, 1,
                    0, 1,
                ],
            ),
        ),
        (
            "an UPDATE",
            with(
                header(5, 1, 0, 0, 0),
                &[4, b'e', b'c', b'h', b'o', 0, 0, 6, 0, 1],
            ),
        ),
        (
            "OPT record cut short",
            with(
                header(0, 1, 0, 0, 1),
                &[4, b'e', b'c', b'h', b'o', 0, 0, 1, 0, 1, 0, 0, 41, 0xff],
            ),
        ),
        ("64 KiB of 0xff", vec![0xff; 65_000]),
        (
            "question name pointing into the header",
            with(header(0, 1, 0, 0, 0), &[0xc0, 0x00, 0, 1, 0, 1]),
        ),
        (
            "a NOTIFY whose questions point into the header",
            with(
                header(4, 2, 0, 0, 0),
                &[0xc0, 0x00, 0, 1, 0, 1, 0xc0, 0x02, 0, 1, 0, 1],
            ),
        ),
        (
            "question name pointing forward",
            with(header(0, 1, 0, 0, 0), &[1, b'a', 0xc0, 0x20, 0, 1, 0, 1]),
        ),
    ]
}

/// Every malformed request is answered with an error or dropped, never answered as if it were a
/// question, and the server answers a real query right after each one, over UDP and TCP.
#[tokio::test]
async fn malformed_requests_are_refused_or_dropped_and_the_server_keeps_answering() {
    let server = start(fake_upstream().await).await;
    let addr = server.local_addr();
    for (what, packet) in malformed_corpus() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let started = std::time::Instant::now();
        if packet.len() <= 65_507 {
            socket.send_to(&packet, addr).await.unwrap();
        }
        let mut buffer = vec![0u8; 65_535];
        let reply =
            tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await;
        match reply {
            Ok(Ok((n, _))) => {
                // A reply must be a well-formed error, never local addresses for garbage.
                let message = Message::from_vec(&buffer[..n])
                    .unwrap_or_else(|e| panic!("{what}: the reply does not parse: {e}"));
                assert_ne!(
                    message.metadata.response_code,
                    ResponseCode::NoError,
                    "{what}: answered as a good question: {message:?}"
                );
                eprintln!(
                    "{what}: {:?} in {:?}",
                    message.metadata.response_code,
                    started.elapsed()
                );
            }
            Ok(Err(error)) => panic!("{what}: {error}"),
            Err(_) => eprintln!("{what}: dropped"),
        }
        let answer = over_udp(addr, &query(9, "simple-server.", RecordType::A)).await;
        assert_eq!(
            a_records(&answer),
            [Ipv4Addr::new(127, 0, 66, 1)],
            "after {what}"
        );

        // The same bytes over TCP (length-prefixed): a reply or a closed connection.
        if packet.len() <= usize::from(u16::MAX) {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&packet);
            stream.write_all(&framed).await.unwrap();
            let mut prefix = [0u8; 2];
            let read =
                tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut prefix)).await;
            if let Ok(Ok(_)) = read {
                let mut body = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
                stream.read_exact(&mut body).await.unwrap();
                let message = Message::from_vec(&body)
                    .unwrap_or_else(|e| panic!("{what} over TCP: the reply does not parse: {e}"));
                assert_ne!(
                    message.metadata.response_code,
                    ResponseCode::NoError,
                    "{what} over TCP: answered as a good question"
                );
            }
        }
        let answer = over_tcp(addr, &query(10, "simple-server.", RecordType::A)).await;
        assert_eq!(
            a_records(&answer),
            [Ipv4Addr::new(127, 0, 66, 1)],
            "after {what} over TCP"
        );
    }
    server.shutdown().await;
}
