//! Test support: a throwaway PKI (rcgen) and the webhook server started in-process on
//! 127.0.0.1:0, stopped when dropped.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::CertificateDer;
use servicekeel_webhook::config::Config;
use servicekeel_webhook::metrics::Metrics;
use servicekeel_webhook::server::{self, AppState};
use servicekeel_webhook::tls::{CertReloader, provider};
use servicekeel_webhook::view::NoCluster;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A CA that issues serving certificates for 127.0.0.1.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert: CertificateDer<'static>,
}

/// A serving certificate and key, in PEM.
pub struct ServingPair {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
        }
    }

    pub fn issue(&self, common_name: &str) -> ServingPair {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ServingPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A TLS client config trusting only this CA.
    pub fn client_config(&self) -> rustls::ClientConfig {
        client_trusting(self.cert.clone())
    }

    /// An HTTPS client trusting only this CA; `pooled: false` opens a connection per request.
    pub fn http_client(&self, pooled: bool) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(self.client_config())
            .timeout(Duration::from_secs(10));
        if !pooled {
            builder = builder.pool_max_idle_per_host(0);
        }
        builder.build().unwrap()
    }
}

/// A TLS client config trusting only `ca`.
pub fn client_trusting(ca: CertificateDer<'static>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

pub fn write_pair(dir: &Path, pair: &ServingPair) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    // Written beside and renamed, as a careful operator (or the kubelet) replaces files.
    std::fs::write(dir.join("tls.crt.new"), &pair.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key.new"), &pair.key_pem).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), &cert).unwrap();
    std::fs::rename(dir.join("tls.key.new"), &key).unwrap();
    (cert, key)
}

/// The webhook serving HTTPS in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub reloader: Arc<CertReloader>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(cert: &Path, key: &Path, config: Config) -> TestServer {
        let reloader = CertReloader::load(cert, key).expect("serving pair loads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let state = AppState::new(Arc::new(config), metrics.clone(), Arc::new(NoCluster));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server::serve(
            listener,
            reloader.server_config(),
            server::app(state),
            stopped,
            Duration::from_secs(5),
        ));
        TestServer {
            addr,
            reloader,
            metrics,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Starts the shutdown: no new connections; open ones may finish.
    pub fn begin_shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops accepting, drains, and waits for the server to finish.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// The certificate a fresh TLS connection is served.
    pub async fn served_certificate(&self, ca: &TestCa) -> CertificateDer<'static> {
        self.handshake(ca.client_config(), "localhost")
            .await
            .expect("handshake")
    }

    /// A TLS handshake as `client` would make it to `server_name`; the served certificate.
    pub async fn handshake(
        &self,
        client: rustls::ClientConfig,
        server_name: &str,
    ) -> std::io::Result<CertificateDer<'static>> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
        let tls = connector.connect(name, tcp).await?;
        let (_, session) = tls.get_ref();
        Ok(session.peer_certificates().unwrap()[0].clone())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
