//! The serving certificate, reloaded when its files change.
//!
//! Kubernetes updates a mounted Secret by swapping a symlinked directory, and tools that write
//! the two files one after the other leave a moment where they do not match. So the files are
//! re-read on an interval and compared by content, and a new pair replaces the served one only
//! when it parses and its key matches its certificate; otherwise the last good pair stays in
//! force. Each TLS handshake asks [`CertReloader`] for the current pair, so connections already
//! open carry on undisturbed and new ones get the new certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: invalid PEM certificate: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("{path}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {message}")]
    Key { path: PathBuf, message: String },
    #[error("{key} does not belong to the certificate in {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

/// The crypto provider every TLS endpoint of the webhook uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves the current certificate pair and swaps in new ones from disk.
#[derive(Debug)]
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents behind `current`, to tell whether anything changed.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl CertReloader {
    /// Loads the pair; fails when it cannot be served.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = provider();
        let (cert_pem, key_pem) = read_pair(cert_path, key_path)?;
        let key = certified_key(cert_path, key_path, &cert_pem, &key_pem, &provider)?;
        Ok(Arc::new(CertReloader {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: RwLock::new(Arc::new(key)),
            loaded: Mutex::new((cert_pem, key_pem)),
        }))
    }

    /// Re-reads the files; swaps in the new pair when it differs and is valid. Returns whether
    /// the served certificate changed.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (cert_pem, key_pem) = read_pair(&self.cert_path, &self.key_path)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let key = certified_key(
            &self.cert_path,
            &self.key_path,
            &cert_pem,
            &key_pem,
            &self.provider,
        )?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// A server config (TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1) that serves the current pair.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|cause| TlsError::Read {
            path: path.to_owned(),
            cause,
        })
    };
    Ok((read(cert_path)?, read(key_path)?))
}

fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        message: e.to_string(),
    })?;
    let certified =
        CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            message: e.to_string(),
        })?;
    // `from_der` lets an unknown consistency pass; the webhook wants to know.
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(certified)
}
