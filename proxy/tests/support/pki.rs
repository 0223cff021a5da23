//! A test PKI: CAs that issue router certificates, valid or expired, and a would-be peer
//! router presenting one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, date_time_ymd};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A CA and what it issues, as PEM.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Issues a certificate for `name`, valid now or outside its validity.
    pub fn issue(&self, name: &str, validity: Validity) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        match validity {
            Validity::Current => {}
            Validity::Expired => {
                params.not_before = date_time_ymd(2000, 1, 1);
                params.not_after = date_time_ymd(2001, 1, 1);
            }
            Validity::NotYetValid => {
                params.not_before = date_time_ymd(2090, 1, 1);
                params.not_after = date_time_ymd(2091, 1, 1);
            }
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap().pem();
        (cert, key.serialize_pem())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Current,
    /// Its validity ended long ago.
    Expired,
    /// Its validity begins decades from now.
    NotYetValid,
}

/// Connects to the peer port at `addr`, expecting a router of `cluster` trusted through
/// `server_ca`, presenting `identity` (certificate and key PEM, or none), and tries to open a
/// flow to `target`; returns whether an answer came back.
pub async fn try_as_peer(
    addr: SocketAddr,
    cluster: &str,
    target: &str,
    server_ca: &str,
    identity: Option<(String, String)>,
) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let name = ServerName::try_from(format!("servicekeel-router.{cluster}")).unwrap();
    let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    else {
        return false;
    };
    let Ok((sender, connection)) = h2::client::handshake(tls).await else {
        return false;
    };
    tokio::spawn(connection);
    let Ok(mut sender) = sender.ready().await else {
        return false;
    };
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target)
        .header("servicekeel-version", "1")
        .header("servicekeel-protocol", "TCP")
        .body(())
        .unwrap();
    let Ok((response, _send)) = sender.send_request(request, false) else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(20), response).await,
        Ok(Ok(_))
    )
}

/// The refusals the matrix of would-be peers leaves on the router's metrics: one each for
/// plaintext, an unknown CA, an expired certificate and none at all, two wrong identities.
/// The refusal counters after the rejection matrix ran `attempts` times over (plaintext once):
/// two of its cases are wrong identities.
pub fn matrix_refusals(attempts: usize) -> Vec<String> {
    [
        ("plaintext", 1),
        ("unknown_ca", attempts),
        ("expired", attempts),
        ("not_yet_valid", attempts),
        ("wrong_identity", 2 * attempts),
        ("no_certificate", attempts),
    ]
    .iter()
    .map(|(reason, n)| {
        format!(r#"servicekeel_router_peer_refusals_total{{reason="{reason}"}} {n}"#)
    })
    .collect()
}

/// Fetches metrics until they hold every line of `expected` (a router counts a refusal once
/// its side of the handshake has failed, which may be just after the peer gave up), then
/// asserts they do.
pub async fn assert_metrics_reach<F, Fut>(mut fetch: F, expected: &[String])
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut metrics = String::new();
    for _ in 0..400 {
        metrics = fetch().await;
        if expected.iter().all(|line| metrics.contains(line)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for line in expected {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}
