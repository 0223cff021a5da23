//! The webhook's own serving certificate, managed through the API server.
//!
//! One Secret holds a CA and a serving certificate for the webhook's Service names, with the
//! serving certificate's validity recorded in annotations. Every replica runs the same loop:
//! create the Secret when it is missing, renew the serving certificate (same CA) once two thirds
//! of its lifetime have passed, write the pair to the files the server serves from, and keep
//! `caBundle` of the MutatingWebhookConfiguration equal to the CA. Creations and renewals are
//! compare-and-swap writes (a create, or a replace carrying the resourceVersion read), so when
//! replicas race one wins and the others adopt its Secret on their next read.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::json;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tls::CertReloader;

const ISSUED_AT: &str = "servicekeel.io/issued-at";
const NOT_AFTER: &str = "servicekeel.io/not-after";
const NAMES: &str = "servicekeel.io/names";
const CA_NAME: &str = "servicekeel-webhook-ca";
/// The CA outlives many serving certificates, so renewals never change `caBundle`.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past, for clocks that run behind.
const BACKDATE: Duration = Duration::from_secs(60);

/// What the manager manages, and where the served pair goes.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub secret: String,
    pub service: String,
    pub webhook_configuration: String,
    pub lifetime: Duration,
    /// Names beyond the Service's: DNS names or IP addresses.
    pub extra_names: Vec<String>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Settings {
    /// The names the serving certificate carries.
    pub fn names(&self) -> Vec<String> {
        let (service, ns) = (&self.service, &self.namespace);
        let mut names = vec![
            service.clone(),
            format!("{service}.{ns}"),
            format!("{service}.{ns}.svc"),
            format!("{service}.{ns}.svc.cluster.local"),
        ];
        names.extend(self.extra_names.iter().cloned());
        names
    }

    /// How often the Secret and `caBundle` are checked: often enough to renew in time and to
    /// heal a reset `caBundle` within seconds.
    fn check_interval(&self) -> Duration {
        (self.lifetime / 6).clamp(Duration::from_millis(200), Duration::from_secs(3))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read or write Secret {namespace}/{name}: {cause}")]
    Secret {
        namespace: String,
        name: String,
        cause: kube::Error,
    },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The CA and serving pair as kept in the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Material {
    ca_cert: String,
    ca_key: String,
    cert: String,
    key: String,
    issued_at: Timestamp,
    not_after: Timestamp,
    names: Vec<String>,
}

impl Material {
    /// A new CA and a serving certificate signed by it.
    fn new(names: &[String], lifetime: Duration, now: Timestamp) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut params = ca_params();
        params.not_before = at(now, -secs(BACKDATE));
        params.not_after = at(now, secs(CA_LIFETIME));
        let ca_cert = params.self_signed(&ca_key)?.pem();
        Self::serving(ca_cert, ca_key.serialize_pem(), names, lifetime, now)
    }

    /// A new serving certificate from this material's CA.
    fn renewed(
        &self,
        names: &[String],
        lifetime: Duration,
        now: Timestamp,
    ) -> Result<Self, rcgen::Error> {
        Self::serving(
            self.ca_cert.clone(),
            self.ca_key.clone(),
            names,
            lifetime,
            now,
        )
    }

    fn serving(
        ca_cert: String,
        ca_key: String,
        names: &[String],
        lifetime: Duration,
        now: Timestamp,
    ) -> Result<Self, rcgen::Error> {
        // The issuer is rebuilt from the CA's fixed parameters and its key: the subject and key
        // identifier it puts in certificates are the ones the CA certificate carries.
        let issuer = Issuer::new(ca_params(), KeyPair::from_pem(&ca_key)?);
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.get(2).cloned().unwrap_or_default(),
        );
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued_at = now;
        let not_after = now + SignedDuration::from_secs(secs(lifetime));
        params.not_before = at(now, -secs(BACKDATE));
        params.not_after = at(now, secs(lifetime));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?.pem();
        Ok(Material {
            ca_cert,
            ca_key,
            cert,
            key: key.serialize_pem(),
            issued_at,
            not_after,
            names: names.to_vec(),
        })
    }

    /// Due for renewal: two thirds of its lifetime gone, made for other names, or valid for
    /// longer than the configured `lifetime` (a shortened lifetime applies at once).
    fn needs_renewal(&self, names: &[String], lifetime: Duration, now: Timestamp) -> bool {
        let own_lifetime = self.not_after.duration_since(self.issued_at);
        let renew_at = self.issued_at + own_lifetime * 2 / 3;
        let longest = now + SignedDuration::from_secs(secs(lifetime) + 1);
        now >= renew_at || self.names != names || self.not_after > longest
    }

    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| {
            data.get(key)
                .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
        };
        let annotations = secret.metadata.annotations.as_ref()?;
        Some(Material {
            ca_cert: text("ca.crt")?,
            ca_key: text("ca.key")?,
            cert: text("tls.crt")?,
            key: text("tls.key")?,
            issued_at: annotations.get(ISSUED_AT)?.parse().ok()?,
            not_after: annotations.get(NOT_AFTER)?.parse().ok()?,
            names: annotations
                .get(NAMES)?
                .split(',')
                .map(str::to_string)
                .collect(),
        })
    }

    /// The Secret holding this material; `resource_version` makes a replace compare-and-swap.
    fn to_secret(&self, settings: &Settings, resource_version: Option<String>) -> Secret {
        let bytes = |text: &str| ByteString(text.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(settings.secret.clone()),
                namespace: Some(settings.namespace.clone()),
                resource_version,
                annotations: Some(
                    [
                        (ISSUED_AT.to_string(), self.issued_at.to_string()),
                        (NOT_AFTER.to_string(), self.not_after.to_string()),
                        (NAMES.to_string(), self.names.join(",")),
                    ]
                    .into(),
                ),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "servicekeel-webhook".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    ("ca.crt".to_string(), bytes(&self.ca_cert)),
                    ("ca.key".to_string(), bytes(&self.ca_key)),
                    ("tls.crt".to_string(), bytes(&self.cert)),
                    ("tls.key".to_string(), bytes(&self.key)),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// `now` moved by `seconds` (negative to go back), as the time type rcgen takes.
fn at(now: Timestamp, seconds: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(now.as_second() + seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX / 2)
}

/// What one pass over the Secret came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// The files hold the Secret's current pair (`files_changed` if this pass wrote them), whose
    /// CA `caBundle` must carry.
    Serving { files_changed: bool, ca: String },
    /// Another replica wrote the Secret first; nothing was served from this pass.
    LostRace,
}

/// Manages the Secret, the served files and `caBundle`.
#[derive(Clone)]
pub struct Manager {
    client: Client,
    settings: Arc<Settings>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Manager {
    pub fn new(client: Client, settings: Settings) -> Self {
        Manager {
            client,
            settings: Arc::new(settings),
        }
    }

    /// Makes sure the Secret holds a current pair and the files hold the Secret's pair;
    /// retries (logging why) until it does. Used at start, before anything is served.
    pub async fn ensure_until_ready(&self) {
        loop {
            match self.ensure().await {
                Ok(Pass::Serving { .. }) => return,
                // The winner's Secret is there now: read it again at once.
                Ok(Pass::LostRace) => {}
                Err(error) => {
                    tracing::warn!(%error, "serving certificate not ready yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Keeps the certificate current and `caBundle` right until `shutdown`.
    pub async fn run(
        self,
        reloader: Arc<CertReloader>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let interval = self.settings.check_interval();
        loop {
            match self.ensure().await {
                Ok(Pass::Serving { files_changed, ca }) => {
                    if files_changed {
                        // The file-polling reload may have taken it already; count it once.
                        match reloader.reload_if_changed() {
                            Ok(true) => {
                                metrics.certificate_reload(true);
                                tracing::info!("serving certificate renewed");
                            }
                            Ok(false) => {}
                            Err(error) => {
                                metrics.certificate_reload(false);
                                tracing::warn!(%error, "renewed certificate not loaded");
                            }
                        }
                    }
                    if let Err(error) = self.ensure_ca_bundle(&ca).await {
                        tracing::warn!(%error, "cannot check caBundle");
                    }
                }
                Ok(Pass::LostRace) => {}
                Err(error) => tracing::warn!(%error, "cannot manage the serving certificate"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One pass over the Secret and the files.
    pub async fn ensure(&self) -> Result<Pass, CertificateError> {
        let settings = &self.settings;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &settings.namespace);
        let secret_error = |cause| CertificateError::Secret {
            namespace: settings.namespace.clone(),
            name: settings.secret.clone(),
            cause,
        };
        let names = settings.names();
        let now = Timestamp::now();
        let existing = api.get_opt(&settings.secret).await.map_err(secret_error)?;
        let current = existing.as_ref().and_then(Material::from_secret);
        let material = match (&existing, current) {
            (_, Some(current)) if !current.needs_renewal(&names, settings.lifetime, now) => current,
            (existing, current) => {
                let next = match &current {
                    Some(current) => current.renewed(&names, settings.lifetime, now)?,
                    None => Material::new(&names, settings.lifetime, now)?,
                };
                let written = match existing {
                    None => {
                        api.create(&PostParams::default(), &next.to_secret(settings, None))
                            .await
                    }
                    Some(secret) => {
                        let version = secret.metadata.resource_version.clone();
                        api.replace(
                            &settings.secret,
                            &PostParams::default(),
                            &next.to_secret(settings, version),
                        )
                        .await
                    }
                };
                match written {
                    Ok(_) => {
                        tracing::info!(
                            secret = %settings.secret,
                            not_after = %next.not_after,
                            "serving certificate issued"
                        );
                        next
                    }
                    // Another replica wrote first: adopt its Secret on the next pass.
                    Err(kube::Error::Api(e)) if e.code == 409 => return Ok(Pass::LostRace),
                    Err(e) => return Err(secret_error(e)),
                }
            }
        };
        let changed_cert = write_if_changed(&settings.cert_file, &material.cert)?;
        let changed_key = write_if_changed(&settings.key_file, &material.key)?;
        Ok(Pass::Serving {
            files_changed: changed_cert || changed_key,
            ca: material.ca_cert,
        })
    }

    /// Sets `caBundle` of every webhook in the configuration to `ca`, when it differs.
    async fn ensure_ca_bundle(&self, ca: &str) -> Result<(), CertificateError> {
        let settings = &self.settings;
        let secret_error = |cause| CertificateError::Secret {
            namespace: settings.namespace.clone(),
            name: settings.secret.clone(),
            cause,
        };
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let Some(configuration) = api
            .get_opt(&settings.webhook_configuration)
            .await
            .map_err(secret_error)?
        else {
            tracing::debug!(name = %settings.webhook_configuration, "no MutatingWebhookConfiguration yet");
            return Ok(());
        };
        let ca = ca.as_bytes();
        let operations: Vec<_> = configuration
            .webhooks
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, webhook)| webhook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca))
            .map(|(index, _)| {
                json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": BASE64.encode(ca)})
            })
            .collect();
        if operations.is_empty() {
            return Ok(());
        }
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(operations)).expect("valid JSON Patch");
        api.patch(
            &settings.webhook_configuration,
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
        .map_err(secret_error)?;
        tracing::info!(name = %settings.webhook_configuration, "caBundle set");
        Ok(())
    }
}

/// Replaces `path` with `contents` (write beside, then rename) unless it already holds them.
fn write_if_changed(path: &Path, contents: &str) -> Result<bool, CertificateError> {
    if std::fs::read(path).is_ok_and(|current| current == contents.as_bytes()) {
        return Ok(false);
    }
    let write_error = |cause| CertificateError::Write {
        path: path.to_owned(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_error)?;
    }
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents).map_err(write_error)?;
    std::fs::rename(&partial, path).map_err(write_error)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec![
            "svc".into(),
            "svc.ns".into(),
            "svc.ns.svc".into(),
            "127.0.0.1".into(),
        ]
    }

    #[test]
    fn renewal_at_two_thirds_for_new_names_or_a_shorter_lifetime() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let lifetime = Duration::from_secs(3000);
        let material = Material::new(&names(), lifetime, now).unwrap();
        let at = |seconds: i64| now + SignedDuration::from_secs(seconds);
        assert!(!material.needs_renewal(&names(), lifetime, at(0)));
        assert!(!material.needs_renewal(&names(), lifetime, at(1900)));
        assert!(material.needs_renewal(&names(), lifetime, at(2000)));
        assert!(material.needs_renewal(&["other".to_string()], lifetime, at(0)));
        assert!(material.needs_renewal(&names(), Duration::from_secs(60), at(0)));
    }

    #[test]
    fn renewed_pairs_keep_the_ca_and_are_served_as_a_valid_pair() {
        let now = Timestamp::now();
        let first = Material::new(&names(), Duration::from_secs(60), now).unwrap();
        let second = first
            .renewed(&names(), Duration::from_secs(60), now)
            .unwrap();
        assert_eq!(first.ca_cert, second.ca_cert);
        assert_ne!(first.cert, second.cert);
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        for material in [&first, &second] {
            write_if_changed(&cert, &material.cert).unwrap();
            write_if_changed(&key, &material.key).unwrap();
            CertReloader::load(&cert, &key).expect("a matching pair");
        }
    }

    #[test]
    fn the_secret_round_trips() {
        let material = Material::new(&names(), Duration::from_secs(60), Timestamp::now()).unwrap();
        let settings = Settings {
            namespace: "ns".into(),
            secret: "s".into(),
            service: "svc".into(),
            webhook_configuration: "w".into(),
            lifetime: Duration::from_secs(60),
            extra_names: vec![],
            cert_file: "c".into(),
            key_file: "k".into(),
        };
        let secret = material.to_secret(&settings, None);
        assert_eq!(Material::from_secret(&secret), Some(material));
    }
}
