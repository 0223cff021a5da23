//! The webhook row: keep-alive HTTPS reviews of a typical pod to the real `/mutate`, against a
//! do-nothing axum handler served by the same TLS and HTTP stack on the same payloads: the
//! reviews of a ReplicaSet's replicas as the apiserver sends them, each with its own uid and
//! its own token volume's name; and, apart, the first pods of workloads each unlike any other,
//! which the webhook reads and injects in full. Latencies
//! are taken server-side, around each server's whole router (body read, handler, response built),
//! so they leave out the client's share and its queueing on the shared cores. The servers run on
//! a runtime of their own (a worker per CPU, the webhook's default), apart from the client's
//! thread, as the webhook runs apart from the apiserver.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::routing::post;
use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use servicekeel_webhook::config::Config;
use servicekeel_webhook::fixtures::{first_pod, replica};
use servicekeel_webhook::metrics::Metrics;
use servicekeel_webhook::server::{AppState, app, serve};
use servicekeel_webhook::view::NoCluster;
use tokio::sync::watch;

use crate::paths;
use crate::webhook::{REMEMBERED_REVIEWS, counter};

/// The two servers and a client trusting them.
#[derive(Debug)]
pub struct Webhooks {
    pub real: SocketAddr,
    pub baseline: SocketAddr,
    pub client: reqwest::Client,
    /// Distinct replicas' reviews, sent in turn.
    replicas: Arc<[Bytes]>,
    /// Reviews of distinct workloads' first pods, each importing a service of its own.
    first_pods: Arc<[Bytes]>,
    /// The real server's metrics, which show how each review was answered.
    metrics: Arc<Metrics>,
    /// Server-side latencies of the requests served since the last run.
    served: Arc<Mutex<Vec<Duration>>>,
    _stop: watch::Sender<bool>,
}

/// How many distinct reviews of each kind are sent in turn: far more than the webhook
/// remembers.
const DISTINCT: u64 = 1024;
// Each of the 8 connections sends the reviews of its own residue (`Webhooks::reviews`).
const _: () = assert!(DISTINCT.is_multiple_of(8));

/// Which reviews a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reviews {
    /// A ReplicaSet's replicas', each with its own uid and token volume: the real server answers
    /// most from a remembered review.
    Replicas,
    /// Workloads' first pods, each importing a service never seen before: the real server reads
    /// and injects every one in full.
    FirstPods,
}

/// A client of HTTPS over HTTP/1.1 only, as the apiserver calls webhooks, trusting `roots`,
/// with what `more` adds to its settings.
pub(crate) fn http1_client(
    roots: rustls::RootCertStore,
    more: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> anyhow::Result<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10));
    Ok(more(builder).build()?)
}

/// The review of a pod being created that the webhook's tests use, as the apiserver sends it.
pub(crate) fn review_fixture() -> anyhow::Result<Vec<u8>> {
    std::fs::read(paths::repo().join("webhook/tests/fixtures/review-create-pod.json"))
        .context("the review fixture")
}

/// A review the do-nothing handler answers, whatever it is sent.
const ALLOWED: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"0","allowed":true}}"#;

impl Webhooks {
    pub async fn start() -> anyhow::Result<Webhooks> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?
            .signed_by(&key, &issuer)?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = Arc::new(server);

        let metrics = Arc::new(Metrics::default());
        let state = AppState::new(
            Arc::new(Config::default()),
            metrics.clone(),
            Arc::new(NoCluster),
        );
        state.set_ready(true);
        let baseline_app = Router::new().route("/mutate", post(|_body: Bytes| async { ALLOWED }));
        let (stop, stopped) = watch::channel(false);
        // The servers run on a runtime of their own, on threads of their own, as the webhook
        // runs apart from the apiserver that calls it: its own default, a worker per CPU.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the webhook servers' runtime")?;
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut addrs = Vec::new();
        for router in [app(state), baseline_app] {
            let timings = served.clone();
            let router = router.layer(middleware::from_fn(move |request: Request, next: Next| {
                let timings = timings.clone();
                async move {
                    let started = Instant::now();
                    let response = next.run(request).await;
                    let took = started.elapsed();
                    timings.lock().expect("not poisoned").push(took);
                    response
                }
            }));
            let listener = super::loopback_listener(&runtime)?;
            addrs.push(listener.local_addr()?);
            runtime.spawn(serve(
                listener,
                tls.clone(),
                router,
                stopped.clone(),
                Duration::from_secs(1),
            ));
        }
        // The runtime lives on a thread of its own until the stop is sent or dropped.
        let mut until = stopped.clone();
        super::on_a_thread_of_its_own("webhooks", runtime, async move {
            let _ = until.changed().await;
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der().to_vec()))?;
        let client = http1_client(roots, |builder| builder)?;
        let review = review_fixture()?;
        let made = |make: fn(&[u8], u64) -> Option<Vec<u8>>| {
            (0..DISTINCT)
                .map(|n| make(&review, n).map(Bytes::from))
                .collect::<Option<Arc<[Bytes]>>>()
                .context(
                    "the review fixture is not of a pod with a token volume importing services",
                )
        };
        Ok(Webhooks {
            real: addrs[0],
            baseline: addrs[1],
            client,
            replicas: made(replica)?,
            first_pods: made(first_pod)?,
            metrics,
            served,
            _stop: stop,
        })
    }

    /// `count` of the `kind` of reviews in turn to the server at `addr`, 8 connections at a
    /// time; the server-side latencies. Sent to the real server, every review must come back
    /// patched, and answered from a remembered review as `kind` says.
    pub async fn reviews(
        &self,
        addr: SocketAddr,
        kind: Reviews,
        count: u64,
    ) -> anyhow::Result<Vec<Duration>> {
        let bodies = match kind {
            Reviews::Replicas => &self.replicas,
            Reviews::FirstPods => &self.first_pods,
        };
        // The real server's counts before the requests; the baseline keeps none.
        let before = (addr == self.real).then(|| self.answered()).transpose()?;
        self.served.lock().expect("not poisoned").clear();
        let url = format!("https://{addr}/mutate");
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..8u64 {
            let share = count / 8 + u64::from(worker < count % 8);
            let (client, url, reviews) = (self.client.clone(), url.clone(), bodies.clone());
            tasks.spawn(async move {
                // Each connection sends every eighth review, its own: no two send the same one,
                // however far ahead of the others one gets, and a connection sends one again
                // only after a hundred and more others, long forgotten by the webhook.
                for sent in 0..share {
                    let review = &reviews[((sent * 8 + worker) as usize) % reviews.len()];
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(review.clone())
                        .send()
                        .await?;
                    ensure!(response.status().is_success(), "{}", response.status());
                    let _ = response.bytes().await?;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let served = std::mem::take(&mut *self.served.lock().expect("not poisoned"));
        ensure!(
            served.len() as u64 == count,
            "{} requests served for {count} reviews sent",
            served.len()
        );
        if let Some(before) = before {
            let (patched, remembered) = self.answered()?;
            let (patched, remembered) = (
                patched.saturating_sub(before.0),
                remembered.saturating_sub(before.1),
            );
            ensure!(patched == count, "{patched} of {count} reviews patched");
            match kind {
                Reviews::Replicas => ensure!(
                    remembered > count / 2,
                    "{remembered} of {count} replicas' reviews answered from a remembered one"
                ),
                Reviews::FirstPods => ensure!(
                    remembered == 0,
                    "{remembered} of {count} first pods' reviews answered from a remembered one"
                ),
            }
        }
        Ok(served)
    }

    /// The real server's count of reviews patched (no line before the first), and of those
    /// answered from a remembered review, as its `/metrics` shows them.
    fn answered(&self) -> anyhow::Result<(u64, u64)> {
        let text = self.metrics.encode();
        let patched = r#"servicekeel_webhook_admission_requests_total{outcome="patched"}"#;
        Ok((
            counter(&text, patched).unwrap_or(0),
            counter(&text, REMEMBERED_REVIEWS).context("no remembered reviews counter")?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row's reviews are answered as its title says: the real server patches every one,
    /// most replicas' from a remembered review and no first pod's (checked by `reviews`); the
    /// do-nothing handler serves them all too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_rows_reviews_are_answered_as_the_row_says() {
        let webhooks = Webhooks::start().await.expect("the servers start");
        for kind in [Reviews::Replicas, Reviews::FirstPods] {
            for addr in [webhooks.baseline, webhooks.real] {
                let served = webhooks.reviews(addr, kind, 64).await.expect("reviews");
                assert_eq!(served.len(), 64, "{kind:?} to {addr}");
            }
        }
    }
}
