//! The local cluster's certificates, made with rcgen: a CA, the apiserver's serving
//! certificate, client certificates (admin in `system:masters`, the node, the controller-manager,
//! the scheduler, the apiserver's kubelet client) and the service-account signing keys. (The
//! webhook makes its own serving certificate, as it does when installed.) Files are written under
//! the cluster's directory, private keys readable by the owner only.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::node::NODE_NAME;
use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
}

/// Paths of a certificate and its key.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// Creates the CA and every certificate the control plane needs in `dir`.
    pub fn create(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "servicekeel-e2e-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write(&dir.join("ca.crt"), &cert.pem(), false)?;
        write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
        let issuer = Issuer::new(params, key);

        let mut apiserver_names: Vec<SanType> = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .into_iter()
        .map(|n| SanType::DnsName(n.try_into().expect("valid DNS name")))
        .collect();
        apiserver_names.push(ip("127.0.0.1"));
        apiserver_names.push(ip("10.96.0.1"));
        issue(
            dir,
            "apiserver",
            &issuer,
            "kube-apiserver",
            None,
            apiserver_names,
            true,
        )?;
        issue(
            dir,
            "admin",
            &issuer,
            "servicekeel-admin",
            Some("system:masters"),
            vec![],
            false,
        )?;

        // The clients of a cluster with a node: the apiserver calling kubelets, the kubelet
        // (its node identity, for the Node authorizer), the controller-manager, the scheduler.
        for (name, common_name, organization) in [
            (
                "apiserver-kubelet-client",
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
            ),
            (
                "node",
                &*format!("system:node:{NODE_NAME}"),
                Some("system:nodes"),
            ),
            ("controller-manager", "system:kube-controller-manager", None),
            ("scheduler", "system:kube-scheduler", None),
        ] {
            issue(dir, name, &issuer, common_name, organization, vec![], false)?;
        }

        let service_accounts = KeyPair::generate()?;
        write(&dir.join("sa.key"), &service_accounts.serialize_pem(), true)?;
        write(
            &dir.join("sa.pub"),
            &service_accounts.public_key_pem(),
            false,
        )?;

        Ok(Pki {
            dir: dir.to_owned(),
            ca_pem: cert.pem(),
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        }
    }

    /// A kubeconfig that authenticates with a bearer `token` against `server`.
    pub fn token_kubeconfig(&self, server: &str, token: &str) -> String {
        self.kubeconfig_with(server, &format!("token: {token}"))
    }

    /// A kubeconfig for the admin user (client certificate) against `server`.
    pub fn kubeconfig(&self, server: &str) -> anyhow::Result<String> {
        self.client_kubeconfig("admin", server)
    }

    /// A kubeconfig authenticating with the client certificate `pair` (see [`Pki::create`]).
    pub fn client_kubeconfig(&self, pair: &str, server: &str) -> anyhow::Result<String> {
        let admin = self.pair(pair);
        let read = |path: &Path| -> anyhow::Result<String> {
            Ok(BASE64.encode(std::fs::read(path).with_context(|| path.display().to_string())?))
        };
        let user = format!(
            "client-certificate-data: {}\n      client-key-data: {}",
            read(&admin.cert)?,
            read(&admin.key)?
        );
        Ok(self.kubeconfig_with(server, &user))
    }

    fn kubeconfig_with(&self, server: &str, user: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: servicekeel-e2e
    cluster:
      server: {server}
      certificate-authority-data: {ca}
users:
  - name: user
    user:
      {user}
contexts:
  - name: servicekeel-e2e
    context:
      cluster: servicekeel-e2e
      user: user
current-context: servicekeel-e2e
",
            ca = BASE64.encode(&self.ca_pem),
        )
    }
}

fn ip(text: &str) -> SanType {
    SanType::IpAddress(text.parse::<IpAddr>().expect("valid IP"))
}

fn issue(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    organization: Option<&str>,
    names: Vec<SanType>,
    server: bool,
) -> anyhow::Result<()> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(organization) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, organization);
    }
    params.subject_alt_names = names;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write(&dir.join(format!("{name}.crt")), &cert.pem(), false)?;
    write(&dir.join(format!("{name}.key")), &key.serialize_pem(), true)?;
    Ok(())
}

fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    if private {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
