//! Router links: the tunnel between routers, over TCP with mutual TLS 1.3.
//!
//! - Every router of cluster `c` holds a certificate for the DNS name
//!   [`router_identity`]`(c)`, issued by a CA of that cluster.
//! - Dialing a peer, a router expects that peer's identity and trusts only the CA bundle of the
//!   peer's cluster; accepting, it asks for a client certificate, finds which allowed cluster's
//!   identity the certificate carries, and checks it chains to *that* cluster's bundle — so
//!   one cluster's CA cannot speak for another.
//! - Plaintext, an unknown CA, an expired or not yet valid certificate, no certificate or a wrong identity end
//!   the connection before any request is read, and are counted by [`Refused`].
//! - Links carry HTTP/2 pings; a peer that stops answering is dropped and redialled.
//! - Each link runs whole on one of the router's [`LinkThreads`].

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use servicekeel_api::tunnel::router_identity;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::shutdown::stopped;
use crate::tunnel::BoxIo;
use crate::tunnel::client::Connector;
use crate::tunnel::server::{Handler, Link, LinkId, Peer, serve_connection, tcp_moved_to};

/// The threads links run on, each with a single-threaded runtime of its own. A link runs whole
/// on one of them, given in turn: its TLS session, its HTTP/2 connection, and the relays of the
/// flows it carries (a TCP connection or UDP client handed over by a sidecar moves there with its
/// flow), so a flow's bytes are read, framed and sealed on one thread instead of passing between
/// the threads of the router's main runtime. Links to different peers spread over the threads;
/// one link uses at most one core. The threads end once every clone of this is dropped.
#[derive(Debug, Clone)]
pub struct LinkThreads {
    inner: Arc<Threads>,
}

#[derive(Debug)]
struct Threads {
    runtimes: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
    /// Dropped with the last clone, which ends every thread.
    _end: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl LinkThreads {
    /// Starts `count` threads (at least one). They are made by the calling thread, and so are in
    /// its network namespace.
    pub fn start(count: usize) -> io::Result<LinkThreads> {
        LinkThreads::start_named(count, "link")
    }

    /// The same, the threads named `name-0`, `name-1`, … (busy UDP flows' relays, best kept on
    /// one thread each, use such threads too: see
    /// [`Polling::on_threads`](crate::tunnel::busy_poll::Polling::on_threads)).
    pub fn start_named(count: usize, name: &str) -> io::Result<LinkThreads> {
        let mut runtimes = Vec::new();
        let mut ends = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_unpark(crate::scheduling::follow)
                .build()?;
            runtimes.push(runtime.handle().clone());
            let (end, ended) = tokio::sync::oneshot::channel::<()>();
            ends.push(end);
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = ended.await;
                    })
                })?;
        }
        Ok(LinkThreads {
            inner: Arc::new(Threads {
                runtimes,
                next: std::sync::atomic::AtomicUsize::new(0),
                _end: ends,
            }),
        })
    }

    /// How many threads there are.
    pub fn count(&self) -> usize {
        self.inner.runtimes.len()
    }

    /// The runtime of thread `index` (`name-index`), counted modulo [`LinkThreads::count`].
    pub fn at(&self, index: usize) -> tokio::runtime::Handle {
        self.inner.runtimes[index % self.inner.runtimes.len()].clone()
    }

    /// The runtime of the thread for the next link.
    pub fn next(&self) -> tokio::runtime::Handle {
        let turn = self
            .inner
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.at(turn)
    }
}

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// Not TLS at all.
    Plaintext,
    /// A certificate from a CA this router does not trust.
    UnknownCa,
    Expired,
    /// A certificate whose validity has not begun.
    NotYetValid,
    NoCertificate,
    /// A trusted certificate, but not for an identity this router accepts (or not from that
    /// identity's own cluster CA).
    WrongIdentity,
    /// Anything else: timeouts, resets, other TLS failures.
    Other,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Plaintext => "plaintext",
            Refused::UnknownCa => "unknown_ca",
            Refused::Expired => "expired",
            Refused::NotYetValid => "not_yet_valid",
            Refused::NoCertificate => "no_certificate",
            Refused::WrongIdentity => "wrong_identity",
            Refused::Other => "other",
        }
    }

    /// Classifies a failed handshake.
    pub fn of(error: &io::Error) -> Refused {
        use rustls::{CertificateError, Error};
        let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
            return Refused::Other;
        };
        match tls {
            Error::InvalidMessage(_) | Error::InappropriateHandshakeMessage { .. } => {
                Refused::Plaintext
            }
            Error::InappropriateMessage { .. } => Refused::Plaintext,
            Error::NoCertificatesPresented => Refused::NoCertificate,
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
            | Error::InvalidCertificate(CertificateError::BadSignature) => Refused::UnknownCa,
            Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => Refused::Expired,
            Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => Refused::NotYetValid,
            Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => Refused::WrongIdentity,
            _ => Refused::Other,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read {
        path: path.to_owned(),
        cause,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            message: "no PEM certificate in it".into(),
        });
    }
    Ok(certificates)
}

/// A cluster's trust bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    anchors: Vec<TrustAnchor<'static>>,
    roots: Arc<RootCertStore>,
}

impl Bundle {
    pub fn load(path: &Path) -> Result<Bundle, TlsError> {
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for certificate in certificates(path)? {
            let anchor = webpki::anchor_from_trusted_cert(&certificate)
                .map_err(|e| TlsError::Invalid {
                    path: path.to_owned(),
                    message: format!("not a CA certificate: {e}"),
                })?
                .to_owned();
            anchors.push(anchor.clone());
            roots.roots.push(anchor);
        }
        Ok(Bundle {
            anchors,
            roots: Arc::new(roots),
        })
    }
}

/// This router's certificate and the bundles it trusts, by cluster.
#[derive(Debug, Clone)]
pub struct Trust {
    pub cluster: String,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// This cluster's bundle and those of the peer clusters.
    bundles: BTreeMap<String, Bundle>,
    /// What dialling a peer of each of those clusters uses, made once: every link to a cluster's
    /// routers shares it (each copy would hold a session cache of its own, about 14 kB).
    clients: BTreeMap<String, Arc<ClientConfig>>,
}

impl Trust {
    /// Loads this router's certificate chain and key, this cluster's bundle (`ca`) and the
    /// bundles of peer clusters.
    pub fn load(
        cluster: &str,
        certificate: &Path,
        key: &Path,
        ca: &Path,
        peer_bundles: &BTreeMap<String, PathBuf>,
    ) -> Result<Trust, TlsError> {
        let chain = certificates(certificate)?;
        let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| TlsError::Invalid {
            path: key.to_owned(),
            message: e.to_string(),
        })?;
        let mut bundles = BTreeMap::new();
        bundles.insert(cluster.to_string(), Bundle::load(ca)?);
        for (peer, path) in peer_bundles {
            bundles.insert(peer.clone(), Bundle::load(path)?);
        }
        let key = Arc::new(key);
        let clients = bundles
            .iter()
            .map(|(cluster, bundle)| {
                let config = Trust::dialling(bundle, &chain, &key)?;
                Ok((cluster.clone(), config))
            })
            .collect::<Result<_, TlsError>>()?;
        Ok(Trust {
            cluster: cluster.into(),
            chain,
            key,
            bundles,
            clients,
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// What the accepting side uses: a client certificate from any trusted bundle is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut all = RootCertStore::empty();
        for bundle in self.bundles.values() {
            all.roots.extend(bundle.anchors.iter().cloned());
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(all), Self::provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// What the dialing side uses for a peer of `cluster`: only that cluster's bundle.
    pub fn client_config(&self, cluster: &str) -> Result<Arc<ClientConfig>, TlsError> {
        let config = self.clients.get(cluster).ok_or_else(|| {
            rustls::Error::General(format!("no trust bundle for cluster {cluster:?}"))
        })?;
        Ok(config.clone())
    }

    /// A client configuration trusting `bundle` alone, presenting `chain` and `key`.
    fn dialling(
        bundle: &Bundle,
        chain: &[CertificateDer<'static>],
        key: &PrivateKeyDer<'static>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(bundle.roots.clone())
            .with_client_auth_cert(chain.to_vec(), key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The cluster whose router presented `chain`: the one whose identity the certificate
    /// names and whose own bundle it chains to.
    pub fn peer_cluster(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        let (leaf, intermediates) = chain.split_first()?;
        let leaf = webpki::EndEntityCert::try_from(leaf).ok()?;
        let now = UnixTime::now();
        self.bundles.iter().find_map(|(cluster, bundle)| {
            let name = ServerName::try_from(router_identity(cluster)).ok()?;
            leaf.verify_is_valid_for_subject_name(&name).ok()?;
            leaf.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &bundle.anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .ok()?;
            Some(cluster.clone())
        })
    }
}

/// Dials a peer router: the first of `addrs` that answers, verified as a router of `cluster`.
#[derive(Debug, Clone)]
pub struct PeerConnector {
    pub addrs: Vec<String>,
    pub cluster: String,
    config: Arc<ClientConfig>,
}

impl PeerConnector {
    pub fn new(trust: &Trust, cluster: &str, addrs: Vec<String>) -> Result<Self, TlsError> {
        Ok(PeerConnector {
            addrs,
            cluster: cluster.into(),
            config: trust.client_config(cluster)?,
        })
    }
}

#[async_trait::async_trait]
impl Connector for PeerConnector {
    async fn connect(&self) -> io::Result<BoxIo> {
        let name = ServerName::try_from(router_identity(&self.cluster))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to dial");
        for addr in &self.addrs {
            let attempt = async {
                let tcp = TcpStream::connect(addr.as_str()).await?;
                tune(&tcp);
                TlsConnector::from(self.config.clone())
                    .connect(name.clone(), tcp)
                    .await
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
                Ok(Ok(tls)) => return Ok(Box::new(tls)),
                Ok(Err(error)) => last = error,
                Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
            }
        }
        Err(last)
    }

    fn describe(&self) -> String {
        format!(
            "{} ({})",
            router_identity(&self.cluster),
            self.addrs.join(", ")
        )
    }
}

/// No Nagle delay, and TCP keepalive so a vanished peer is noticed even on a quiet link.
fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

/// Accepts links from peer routers until `shutdown`, each run on the next of `threads`;
/// refused peers are reported to `refused`.
pub async fn accept<H: Handler>(
    listener: TcpListener,
    threads: LinkThreads,
    trust: Arc<Trust>,
    handler: Arc<H>,
    refused: Arc<dyn Fn(Refused) + Send + Sync>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), TlsError> {
    let acceptor = TlsAcceptor::from(trust.server_config()?);
    let mut stop = shutdown.clone();
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return Ok(()),
        };
        tune(&tcp);
        // The connection moves to its link's thread.
        let home = threads.next();
        let tcp = match tcp_moved_to(tcp, &home) {
            Ok(tcp) => tcp,
            Err(error) => {
                tracing::warn!(%addr, %error, "peer connection dropped");
                continue;
            }
        };
        let (acceptor, trust, handler, refused, shutdown) = (
            acceptor.clone(),
            trust.clone(),
            handler.clone(),
            refused.clone(),
            shutdown.clone(),
        );
        home.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    let reason = Refused::of(&error);
                    tracing::warn!(%addr, %error, reason = reason.as_str(), "peer refused");
                    return refused(reason);
                }
                Err(_) => return refused(Refused::Other),
            };
            let cluster = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| trust.peer_cluster(chain));
            let Some(cluster) = cluster else {
                tracing::warn!(%addr, "peer refused: its certificate is not a router identity of a trusted cluster");
                return refused(Refused::WrongIdentity);
            };
            tracing::info!(%addr, %cluster, "peer router linked");
            let link = Link {
                id: LinkId::next(),
                peer: Peer::Router { cluster },
            };
            serve_connection(tls, handler, link, shutdown).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name of the thread a task spawned on `runtime` runs on.
    async fn thread_of(runtime: &tokio::runtime::Handle) -> String {
        runtime
            .spawn(async { std::thread::current().name().map(str::to_string) })
            .await
            .expect("the task ran")
            .expect("a named thread")
    }

    #[tokio::test]
    async fn links_are_given_the_threads_in_turn() {
        let threads = LinkThreads::start(2).expect("threads");
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(thread_of(&threads.next()).await);
        }
        assert_eq!(names, ["link-0", "link-1", "link-0"]);
        let one = LinkThreads::start(0).expect("threads");
        assert_eq!(
            thread_of(&one.next()).await,
            "link-0",
            "at least one thread"
        );
    }

    #[tokio::test]
    async fn the_threads_end_with_the_last_clone_and_drop_their_tasks() {
        let threads = LinkThreads::start(1).expect("threads");
        let runtime = threads.next();
        // A task that never finishes holds `held`: its receiver learns when the task is gone.
        let (held, gone) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        let clone = threads.clone();
        drop(threads);
        assert_eq!(thread_of(&runtime).await, "link-0", "a clone keeps them");
        drop(clone);
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("the thread's tasks were dropped")
            .expect_err("the task never finished, it was dropped");
    }
}
