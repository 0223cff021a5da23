//! The webhook row: keep-alive HTTPS reviews of a typical pod to the real `/mutate`, against a
//! do-nothing axum handler served by the same TLS and HTTP stack on the same payload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use servicekeel_webhook::config::Config;
use servicekeel_webhook::metrics::Metrics;
use servicekeel_webhook::server::{AppState, app, serve};
use servicekeel_webhook::view::NoCluster;
use tokio::sync::watch;

use crate::paths;

/// The two servers and a client trusting them.
#[derive(Debug)]
pub struct Webhooks {
    pub real: SocketAddr,
    pub baseline: SocketAddr,
    pub client: reqwest::Client,
    pub review: Bytes,
    _stop: watch::Sender<bool>,
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

        let state = AppState::new(
            Arc::new(Config::default()),
            Arc::new(Metrics::default()),
            Arc::new(NoCluster),
        );
        state.set_ready(true);
        let baseline_app = Router::new().route("/mutate", post(|_body: Bytes| async { ALLOWED }));
        let (stop, stopped) = watch::channel(false);
        let mut addrs = Vec::new();
        for router in [app(state), baseline_app] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?);
            tokio::spawn(serve(
                listener,
                tls.clone(),
                router,
                stopped.clone(),
                Duration::from_secs(1),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der().to_vec()))?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(client)
            .timeout(Duration::from_secs(10))
            .build()?;
        let review =
            std::fs::read(paths::repo().join("webhook/tests/fixtures/review-create-pod.json"))
                .context("the review fixture")?;
        Ok(Webhooks {
            real: addrs[0],
            baseline: addrs[1],
            client,
            review: Bytes::from(review),
            _stop: stop,
        })
    }

    /// `count` reviews to the server at `addr`, 8 connections at a time; the latencies.
    pub async fn reviews(&self, addr: SocketAddr, count: u64) -> anyhow::Result<Vec<Duration>> {
        let url = format!("https://{addr}/mutate");
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..8u64 {
            let share = count / 8 + u64::from(worker < count % 8);
            let (client, url, review) = (self.client.clone(), url.clone(), self.review.clone());
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity(share as usize);
                for _ in 0..share {
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(review.clone())
                        .send()
                        .await?;
                    ensure!(response.status().is_success(), "{}", response.status());
                    let _ = response.bytes().await?;
                    latencies.push(started.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            });
        }
        let mut all = Vec::with_capacity(count as usize);
        while let Some(done) = tasks.join_next().await {
            all.extend(done??);
        }
        Ok(all)
    }
}
