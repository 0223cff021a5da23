//! The webhook over real HTTPS, in process: AdmissionReview JSON as the kube-apiserver sends it,
//! the returned JSON Patch applied to the pod, denials, malformed and oversized bodies, and a
//! certificate rotated while requests are in flight.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use servicekeel_webhook::config::Config;
use servicekeel_webhook::fixtures::replica;
use support::{TestCa, TestServer, write_pair};

fn review_fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/review-create-pod.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

struct Started {
    server: TestServer,
    ca: TestCa,
    dir: tempfile::TempDir,
}

async fn start() -> Started {
    let ca = TestCa::new("servicekeel test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_pair(dir.path(), &ca.issue("webhook-1"));
    let config = Config::from_yaml("clusterName: cluster-a").unwrap();
    let server = TestServer::start(&cert, &key, config).await;
    Started { server, ca, dir }
}

async fn post(client: &reqwest::Client, server: &TestServer, body: Vec<u8>) -> (u16, String) {
    let response = client
        .post(server.url("/mutate"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Applies the answer's patch to the request's pod.
fn patched_pod(review: &Value, answer: &Value) -> Value {
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let patch = BASE64
        .decode(
            answer["response"]["patch"]
                .as_str()
                .expect("patch is base64"),
        )
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod it was made for");
    pod
}

#[tokio::test]
async fn a_pod_review_is_answered_with_a_patch_that_injects_the_sidecar() {
    let Started { server, ca, .. } = start().await;
    let review = review_fixture();
    let (status, body) = post(
        &ca.http_client(true),
        &server,
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true);

    let pod = patched_pod(&review, &answer);
    let init = &pod["spec"]["initContainers"];
    assert_eq!(init[0]["name"], "servicekeel-proxy");
    assert_eq!(init[0]["restartPolicy"], "Always");
    assert_eq!(pod["spec"]["containers"][0]["name"], "checkout");
    assert_eq!(pod["spec"]["dnsPolicy"], "None");
    assert_eq!(
        pod["spec"]["dnsConfig"]["searches"][0],
        "shop.svc.cluster.local"
    );
    let volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        volumes,
        [
            "kube-api-access-x7k2p",
            "servicekeel-podinfo",
            "servicekeel-router"
        ]
    );
    assert_eq!(
        pod["spec"]["securityContext"]["sysctls"],
        json!([{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}])
    );
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["servicekeel.io/imported-services"],
        r#"{"services":[{"name":"payments","ports":[{"name":"grpc","port":9000,"targetPort":9000,"protocol":"TCP"}]},{"name":"stats","cluster":"cluster-b.local","ports":[{"port":8125,"protocol":"UDP"}]}]}"#
    );
    assert!(
        annotations["servicekeel.io/status"]
            .as_str()
            .unwrap()
            .contains("native")
    );

    // The injected pod, reviewed again (as another webhook's reinvocation could), gets no patch.
    let mut again = review.clone();
    again["request"]["object"] = pod;
    let (status, body) = post(
        &ca.http_client(true),
        &server,
        serde_json::to_vec(&again).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
}

/// The server's `/metrics` text.
async fn metrics(client: &reqwest::Client, server: &TestServer) -> String {
    let response = client.get(server.url("/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

/// The value of the counter `name` in the server's `/metrics`.
async fn counter(client: &reqwest::Client, server: &TestServer, name: &str) -> u64 {
    let text = metrics(client, server).await;
    let line = text
        .lines()
        .find(|line| line.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A replica's review (another's text with its own uid and token volume's name) is answered
/// with its own uid and the same patch, and counted in
/// `servicekeel_webhook_remembered_reviews_total`; the first review of a pod, the first with
/// another token volume's name (decoded once to check it), and one that differs elsewhere, are
/// not.
#[tokio::test]
async fn a_replicas_review_is_answered_as_remembered_and_counted() {
    let Started { server, ca, .. } = start().await;
    let client = ca.http_client(true);
    let name = "servicekeel_webhook_remembered_reviews_total";
    // A namespace of this test's own: other tests in this process review the fixture too.
    let mut review = review_fixture();
    review["request"]["namespace"] = json!("remembered-here");
    review["request"]["object"]["metadata"]["namespace"] = json!("remembered-here");
    let first = serde_json::to_vec(&review).unwrap();
    let mut answers = Vec::new();
    // The second is decoded: it shows that another token volume's name leaves the pod alike.
    for (n, remembered) in [(None, 0), (Some(1), 0), (Some(2), 1), (Some(3), 2)] {
        // Replicas as the apiserver sends them: their own uid and token volume's name.
        let body = n.map_or(first.clone(), |n| replica(&first, n).unwrap());
        let uid = serde_json::from_slice::<Value>(&body).unwrap()["request"]["uid"].clone();
        let (status, body) = post(&client, &server, body).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["response"]["uid"], uid);
        assert_eq!(counter(&client, &server, name).await, remembered, "{uid}");
        answers.push(answer);
    }
    assert_eq!(
        answers[0]["response"]["patch"],
        answers[2]["response"]["patch"]
    );
    assert!(answers[0]["response"]["patch"].is_string());

    review["request"]["uid"] = json!("elsewhere");
    review["request"]["object"]["metadata"]["labels"]["app"] = json!("other");
    let (status, body) = post(&client, &server, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        counter(&client, &server, name).await,
        2,
        "a changed pod is read"
    );
}

#[tokio::test]
async fn an_invalid_annotation_is_denied_with_the_field_named() {
    let Started { server, ca, .. } = start().await;
    let mut review = review_fixture();
    review["request"]["object"]["metadata"]["annotations"]["servicekeel.io/imported-services"] = json!(
        "services:\n  - name: payments\n    ports:\n      - port: 9000\n        protocol: SCTP\n"
    );
    let (status, body) = post(
        &ca.http_client(true),
        &server,
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "a denial is a successful review");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 422);
    assert_eq!(
        answer["response"]["status"]["message"],
        r#"servicekeel.io/imported-services: services[0].ports[0].protocol: "SCTP" is not supported (TCP or UDP)"#
    );
    assert!(answer["response"].get("patch").is_none());
}

#[tokio::test]
async fn requests_that_are_not_pod_creations_are_allowed_unchanged() {
    let Started { server, ca, .. } = start().await;
    let client = ca.http_client(true);
    let mut update = review_fixture();
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = update["request"]["object"].clone();
    let mut deployment = review_fixture();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["object"] = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"selector": {}, "template": {}}});
    for review in [update, deployment] {
        let (status, body) = post(&client, &server, serde_json::to_vec(&review).unwrap()).await;
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
    }
}

#[tokio::test]
async fn malformed_reviews_get_400_and_oversized_bodies_413() {
    let Started { server, ca, .. } = start().await;
    let client = ca.http_client(true);
    let mut no_request = review_fixture();
    no_request.as_object_mut().unwrap().remove("request");
    let mut old_version = review_fixture();
    old_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut not_a_pod = review_fixture();
    not_a_pod["request"]["object"]["spec"]["containers"] = json!("many");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not JSON",
            b"hello".to_vec(),
            "body is not a JSON AdmissionReview",
        ),
        (
            "truncated",
            serde_json::to_vec(&review_fixture()).unwrap()[..200].to_vec(),
            "body is not a JSON AdmissionReview",
        ),
        (
            "no request",
            serde_json::to_vec(&no_request).unwrap(),
            "AdmissionReview has no request",
        ),
        (
            "v1beta1",
            serde_json::to_vec(&old_version).unwrap(),
            "expected admission.k8s.io/v1 AdmissionReview",
        ),
        (
            "pod of the wrong shape",
            serde_json::to_vec(&not_a_pod).unwrap(),
            "request.object is not a valid Pod",
        ),
        (
            "binary garbage",
            vec![0xff, 0x00, 0x9c, 0x7b],
            "body is not a JSON AdmissionReview",
        ),
    ];
    for (what, body, expected) in cases {
        let (status, text) = post(&client, &server, body).await;
        assert_eq!(status, 400, "{what}: {text}");
        assert!(
            text.contains(expected),
            "{what}: {text:?} lacks {expected:?}"
        );
    }

    let oversized = vec![b' '; 1024 * 1024 + 1];
    let (status, _) = post(&client, &server, oversized).await;
    assert_eq!(status, 413);
    // Exactly at the limit is read (and, being blank, is malformed).
    let (status, _) = post(&client, &server, vec![b' '; 1024 * 1024]).await;
    assert_eq!(status, 400);

    let metrics = metrics(&client, &server).await;
    assert!(
        metrics.contains(r#"servicekeel_webhook_admission_requests_total{outcome="invalid"} 8"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("servicekeel_webhook_admission_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let Started { server, ca, .. } = start().await;
    let client = ca.http_client(true);
    for path in ["/healthz", "/readyz"] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let response = client.get(server.url("/mutate")).send().await.unwrap();
    assert_eq!(response.status(), 405);
}

#[tokio::test]
async fn plain_http_and_untrusted_clients_are_refused() {
    let Started { server, .. } = start().await;
    // Plain HTTP on the TLS port: never an HTTP answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut reply)).await;
    assert!(
        !reply.starts_with(b"HTTP/"),
        "plain HTTP was answered: {reply:?}"
    );
    let stranger = TestCa::new("another CA");
    let result = stranger
        .http_client(true)
        .get(server.url("/healthz"))
        .send()
        .await;
    assert!(
        result.is_err(),
        "a client not trusting our CA must fail the handshake"
    );
}

#[tokio::test]
async fn certificate_rotation_under_load_loses_no_request() {
    let Started { server, ca, dir } = start().await;
    let server = Arc::new(server);
    let body = serde_json::to_vec(&review_fixture()).unwrap();
    let first = server.served_certificate(&ca).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    // Keep-alive clients hold connections across the rotation; the others handshake every time.
    for pooled in [true, true, false, false] {
        let (client, server, body) = (ca.http_client(pooled), server.clone(), body.clone());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match client
                    .post(server.url("/mutate"))
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        let answer: Value = r.json().await.unwrap();
                        assert_eq!(answer["response"]["allowed"], true);
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }

    let mut served = vec![first];
    for round in 2..=4 {
        // Let some requests through on the current certificate before replacing it.
        let before = ok.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::SeqCst) < before + 20 && Instant::now() < deadline {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let pair = ca.issue(&format!("webhook-{round}"));
        write_pair(dir.path(), &pair);
        assert!(
            server.reloader.reload_if_changed().unwrap(),
            "round {round}: new pair taken"
        );
        let now = server.served_certificate(&ca).await;
        assert_eq!(
            now, pair.der,
            "round {round}: new connections get the new certificate"
        );
        served.push(now);
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "requests lost during rotation: {failed:?}"
    );
    assert!(
        ok.load(Ordering::SeqCst) >= 60,
        "load was applied throughout"
    );
    served.dedup();
    assert_eq!(served.len(), 4, "four distinct certificates were served");
}

#[tokio::test]
async fn a_bad_new_pair_keeps_the_current_certificate() {
    let Started { server, ca, dir } = start().await;
    let current = server.served_certificate(&ca).await;
    // A key that does not belong to the certificate, as when only one file was replaced.
    let other = ca.issue("other");
    std::fs::write(dir.path().join("tls.key"), &other.key_pem).unwrap();
    let error = server
        .reloader
        .reload_if_changed()
        .expect_err("mismatch refused");
    assert!(
        error
            .to_string()
            .contains("does not belong to the certificate"),
        "{error}"
    );
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    assert!(server.reloader.reload_if_changed().is_err());
    assert_eq!(server.served_certificate(&ca).await, current);
    let (status, _) = post(
        &ca.http_client(false),
        &server,
        serde_json::to_vec(&review_fixture()).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    // Completing the pair is picked up.
    write_pair(dir.path(), &other);
    assert!(server.reloader.reload_if_changed().unwrap());
    assert_eq!(server.served_certificate(&ca).await, other.der);
}

#[tokio::test]
async fn shutdown_lets_an_open_connection_finish_its_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Started { server, ca, .. } = start().await;
    let body = serde_json::to_vec(&review_fixture()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config()));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    // Headers and half the body are sent when the shutdown begins.
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    tls.write_all(first).await.unwrap();
    tls.flush().await.unwrap();
    // Give the server the moment it needs to start reading this request: a connection that has
    // not begun a request is idle, and idle connections are closed at shutdown.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.begin_shutdown();
    let addr = server.addr;
    // No new connections once shutdown has begun (the listener is closed).
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "new connections were still accepted after shutdown began"
    );
    // The open request completes and is answered.
    tls.write_all(rest).await.unwrap();
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains(r#""allowed":true"#), "{reply}");
    server.shutdown().await;
}

/// Whether the server closes `stream` within `limit` (reads end or fail).
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 256];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.is_ok()
}

/// Slow-loris: 100 connections that never start the TLS handshake and 20 that finish it but
/// dribble their request line a byte every half second hold nothing for good: the handshake
/// and header timeouts close them all, and an honest client is answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_by_timeouts_while_others_are_served() {
    use servicekeel_webhook::server::{HANDSHAKE_TIMEOUT, HEADER_READ_TIMEOUT};
    use tokio::io::AsyncWriteExt;
    let Started { server, ca, .. } = start().await;
    let addr = server.addr;
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..100 {
        stalled.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config()));
    let mut dribblers = Vec::new();
    for _ in 0..20 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        dribblers.push(tokio::spawn(async move {
            for byte in b"POST /mutate HTTP/1.1\r\nHost: webhook\r\n".iter().cycle() {
                if tls.write_all(&[*byte]).await.is_err() || tls.flush().await.is_err() {
                    // Cut by the server.
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            unreachable!("the cycle never ends")
        }));
    }
    // An honest client is served while all of them hang on.
    let client = ca.http_client(false);
    for _ in 0..5 {
        let (status, body) = post(
            &client,
            &server,
            serde_json::to_vec(&review_fixture()).unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let limit = HANDSHAKE_TIMEOUT.max(HEADER_READ_TIMEOUT) + Duration::from_secs(10);
    for (index, stream) in stalled.iter_mut().enumerate() {
        assert!(
            closed_within(stream, limit).await,
            "stalled handshake {index} still open after {:?}",
            started.elapsed()
        );
    }
    for dribbler in dribblers {
        let cut_after = tokio::time::timeout(limit, dribbler)
            .await
            .expect("a dribbling client was never cut")
            .unwrap();
        assert!(
            cut_after >= HEADER_READ_TIMEOUT / 2,
            "cut after {cut_after:?}, before any timeout could have fired"
        );
    }
    eprintln!(
        "100 stalled handshakes and 20 dribbling clients cut within {:?}",
        started.elapsed()
    );
}
