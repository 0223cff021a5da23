//! The sidecar's DNS request path: bytes decoded as the server decodes them, answered by the
//! sidecar's own handler (imported names locally, other names forwarded to an upstream that
//! answers nothing within 1 ms), the answer encoded, then decoded again: it must parse and
//! carry the request's id. Where the inline path answers the same bytes, its answer must be the
//! handler's, byte for byte.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use hickory_proto::op::Message;
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::NetError;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use libfuzzer_sys::fuzz_target;
use servicekeel_api::ServiceKey;
use servicekeel_proxy::dns::server::Handler;
use servicekeel_proxy::dns::upstream::Upstream;
use servicekeel_proxy::dns::{Home, Names};
use servicekeel_proxy::metrics::Metrics;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);

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
        // As the server encodes a response over TCP (no 512-byte limit to fall back from).
        let mut bytes = Vec::new();
        let mut encoder = BinEncoder::new(&mut bytes);
        let info = response.destructive_emit(&mut encoder)?;
        self.0.lock().expect("capture").push(bytes);
        Ok(info)
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    handler: Handler,
    names: Arc<Names>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // An upstream that never answers: a bound socket nobody reads.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let upstream_addr = silent.local_addr().expect("addr");
        std::mem::forget(silent);
        let echo = ServiceKey {
            name: "echo".into(),
            namespace: "default".into(),
            cluster: "default".into(),
        };
        let home = Home {
            namespace: "default",
            cluster: "default",
            cluster_domain: "cluster.local",
        };
        let names = Arc::new(Names::new([(&echo, Ipv4Addr::new(127, 0, 66, 1))], home));
        let handler = Handler::new(
            Arc::new(RwLock::new(names.clone())),
            Upstream::new(upstream_addr, Duration::from_millis(1)),
            Arc::new(Metrics::default()),
        );
        Fixture {
            runtime,
            handler,
            names,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let client: SocketAddr = "127.0.0.1:40000".parse().expect("address");
    let mut inline = Vec::new();
    let answered_inline = servicekeel_proxy::dns::inline::answer(
        data,
        client,
        &fixture.names,
        &mut String::new(),
        &mut inline,
    );
    let Ok(request) = Request::from_bytes(data.to_vec(), client, Protocol::Udp) else {
        assert!(!answered_inline, "answered inline what does not decode");
        return;
    };
    let capture = Capture::default();
    fixture.runtime.block_on(
        fixture
            .handler
            .handle_request::<_, hickory_server::net::runtime::TokioTime>(
                &request,
                capture.clone(),
            ),
    );
    let sent = capture.0.lock().expect("capture");
    if answered_inline {
        assert_eq!(sent.as_slice(), [inline], "the inline answer differs");
    }
    for bytes in sent.iter() {
        let answer = Message::from_vec(bytes).expect("the sidecar's answer parses");
        assert_eq!(
            answer.metadata.id, request.metadata.id,
            "answer for another id"
        );
    }
});
