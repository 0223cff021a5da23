//! The router's side of the tunnel protocol against a raw HTTP/2 client: requests it must
//! refuse get an answer naming the problem, and garbage on a connection costs only that
//! connection.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use servicekeel_api::Protocol;
use servicekeel_api::tunnel::registration::MAX_REGISTRATION_BYTES;
use support::{RouterState, TestRouter, tcp_echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn connect(router: &TestRouter) -> h2::client::SendRequest<Bytes> {
    let io = UnixStream::connect(&router.path).await.unwrap();
    let (sender, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends a request with `headers` and optional body; returns the status and the answer's text.
async fn ask(
    sender: &h2::client::SendRequest<Bytes>,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut sender = sender.clone().ready().await.unwrap();
    let (response, mut send) = sender
        .send_request(request.body(()).unwrap(), body.is_none())
        .unwrap();
    if let Some(body) = body {
        // Large bodies need the peer's window; send in pieces as it grants it, and stop if
        // the peer answers early and resets the upload.
        let mut body = Bytes::from(body);
        if body.is_empty() {
            send.send_data(Bytes::new(), true).unwrap();
        }
        while !body.is_empty() {
            send.reserve_capacity(body.len());
            let granted = std::future::poll_fn(|cx| {
                if let std::task::Poll::Ready(reset) = send.poll_reset(cx) {
                    return std::task::Poll::Ready(Err(reset));
                }
                send.poll_capacity(cx).map(|c| Ok(c.and_then(Result::ok)))
            })
            .await;
            let Ok(Some(granted)) = granted else { break };
            let piece = body.split_to(granted.min(body.len()));
            if send.send_data(piece, body.is_empty()).is_err() {
                break;
            }
        }
    }
    let response = response.await.unwrap();
    let status = response.status();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

/// Method, URI, headers, body, expected status, text the answer must hold.
type Case<'a> = (
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    Option<Vec<u8>>,
    StatusCode,
    &'a str,
);

#[tokio::test]
async fn bad_requests_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let router =
        TestRouter::start(&dir.path().join("r.sock"), Arc::new(RouterState::default())).await;
    router.route("echo.default.c:7", Protocol::Tcp, tcp_echo().await);
    let sender = connect(&router).await;
    let v1 = ("servicekeel-version", "1");
    let tcp = ("servicekeel-protocol", "TCP");
    let cases: Vec<Case> = vec![
        (
            Method::CONNECT,
            "echo.default.c:7",
            vec![tcp],
            None,
            StatusCode::BAD_REQUEST,
            "servicekeel-version header missing",
        ),
        (
            Method::CONNECT,
            "echo.default.c:7",
            vec![("servicekeel-version", "2"), tcp],
            None,
            StatusCode::BAD_REQUEST,
            "tunnel version \"2\" is not supported",
        ),
        (
            Method::CONNECT,
            "echo.default:7",
            vec![v1, tcp],
            None,
            StatusCode::BAD_REQUEST,
            "needs name.namespace.cluster",
        ),
        (
            Method::CONNECT,
            "echo.default.c:7",
            vec![v1, ("servicekeel-protocol", "SCTP")],
            None,
            StatusCode::BAD_REQUEST,
            "protocol \"SCTP\" is not TCP or UDP",
        ),
        (
            Method::CONNECT,
            "echo.default.c:7",
            vec![v1, tcp, ("servicekeel-source", "nobody")],
            None,
            StatusCode::BAD_REQUEST,
            "is not namespace/name[@ip]",
        ),
        (
            Method::CONNECT,
            "other.default.c:7",
            vec![v1, tcp],
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "no endpoint for other.default.c:7/TCP",
        ),
        (
            Method::GET,
            "http://router/",
            vec![v1],
            None,
            StatusCode::NOT_FOUND,
            "is not a tunnel request",
        ),
        (
            Method::PUT,
            "http://router/servicekeel/v1/registration",
            vec![v1],
            Some(b"{}".to_vec()),
            StatusCode::BAD_REQUEST,
            "registration: version None is not supported",
        ),
        (
            Method::PUT,
            "http://router/servicekeel/v1/registration",
            vec![v1],
            Some(vec![b' '; MAX_REGISTRATION_BYTES + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "over the",
        ),
    ];
    for (method, uri, headers, body, status, text) in cases {
        let (got, answer) = ask(&sender, method.clone(), uri, &headers, body).await;
        assert_eq!(got, status, "{method} {uri}: {answer}");
        assert!(
            answer.contains(text),
            "{method} {uri}: {answer:?} lacks {text:?}"
        );
    }
    // The connection survived all of that and still carries a flow (here one that ends its
    // send side at once, so the echo server ends too).
    let (status, _) = ask(
        &sender,
        Method::CONNECT,
        "echo.default.c:7",
        &[v1, tcp],
        Some(Vec::new()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn garbage_costs_only_its_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let router =
        TestRouter::start(&dir.path().join("r.sock"), Arc::new(RouterState::default())).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        &[0u8; 64][..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x04\x00\x00\x00\x00\x00"[..],
    ] {
        let mut stream = UnixStream::connect(&router.path).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let mut rest = Vec::new();
        // The router hangs up (possibly after a GOAWAY); it does not wait for more.
        let _ = stream.read_to_end(&mut rest).await;
    }
    let sender = connect(&router).await;
    let (status, _) = ask(
        &sender,
        Method::GET,
        "http://router/",
        &[("servicekeel-version", "1")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "still serving");
}

/// Sends `GET /` with one extra header of `size` bytes; the status, or the error that ended it.
async fn ask_with_header_of(
    sender: &h2::client::SendRequest<Bytes>,
    size: usize,
) -> Result<StatusCode, h2::Error> {
    let request = Request::builder()
        .method(Method::GET)
        .uri("http://router/")
        .header("servicekeel-version", "1")
        .header("x-padding", "a".repeat(size))
        .body(())
        .unwrap();
    let mut sender = sender.clone().ready().await?;
    let (response, _) = sender.send_request(request, true)?;
    Ok(response.await?.status())
}

#[tokio::test]
async fn request_headers_over_the_limit_are_refused_and_cost_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let router =
        TestRouter::start(&dir.path().join("r.sock"), Arc::new(RouterState::default())).await;
    let limit = servicekeel_api::tunnel::MAX_HEADER_BYTES as usize;
    let sender = connect(&router).await;
    assert_eq!(
        ask_with_header_of(&sender, limit / 2).await.unwrap(),
        StatusCode::NOT_FOUND,
        "under the limit: an ordinary answer"
    );

    // Over the limit: that request alone is refused (431, or reset before an answer), unread.
    match ask_with_header_of(&sender, limit + 1024).await {
        Ok(status) => assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(error) => assert_eq!(
            error.reason(),
            Some(h2::Reason::REFUSED_STREAM),
            "refused, not failed: {error}"
        ),
    }
    assert_eq!(
        ask_with_header_of(&sender, 16).await.unwrap(),
        StatusCode::NOT_FOUND,
        "the same connection still serves"
    );

    // Far over it (16 times): the router stops reading the block and drops the connection,
    // holding no more of it than the limit allows.
    let abusive = connect(&router).await;
    let refused = ask_with_header_of(&abusive, 16 * limit).await;
    assert!(
        refused.is_err(),
        "a 256 KiB header list is not served: {refused:?}"
    );
    let (status, _) = ask(
        &connect(&router).await,
        Method::GET,
        "http://router/",
        &[("servicekeel-version", "1")],
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "other connections still served"
    );
}
