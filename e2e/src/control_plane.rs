//! etcd and kube-apiserver on loopback, from a cold start: free ports, certificates, a
//! kubeconfig, and readiness checks that report the component's own log when it fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::kubernetes::{APISERVER, KubeBinaries};
use crate::pki::Pki;
use crate::process::{Lifetime, Process, args, free_port, wait_ready};

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The Service network; the apiserver's own Service gets its first address.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

#[derive(Debug)]
pub struct ControlPlane {
    pub dir: PathBuf,
    pub pki: Pki,
    pub etcd: Process,
    pub apiserver: Process,
    pub api_port: u16,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts etcd and the apiserver with their state in `dir`, and waits until both are ready.
    pub async fn start(
        dir: &Path,
        binaries: &KubeBinaries,
        lifetime: Lifetime,
    ) -> anyhow::Result<ControlPlane> {
        std::fs::create_dir_all(dir)?;
        let pki = Pki::create(&dir.join("pki"))?;
        let etcd = start_etcd(dir, lifetime).await?;
        let etcd_url = etcd.1;
        let mut etcd = etcd.0;

        let api_port = free_port()?;
        let apiserver_pair = pki.pair("apiserver");
        let mut apiserver = Process::spawn(
            APISERVER,
            &binaries.path(APISERVER),
            &args([
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", apiserver_pair.cert.display()),
                format!("--tls-private-key-file={}", apiserver_pair.key.display()),
                format!("--client-ca-file={}", pki.ca().display()),
                "--authorization-mode=RBAC".into(),
                // No controller-manager issues tokens yet, so pods cannot wait for them.
                "--disable-admission-plugins=ServiceAccount".into(),
                "--endpoint-reconciler-type=none".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!(
                    "--service-account-key-file={}",
                    pki.dir.join("sa.pub").display()
                ),
                format!(
                    "--service-account-signing-key-file={}",
                    pki.dir.join("sa.key").display()
                ),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ]),
            &dir.join("kube-apiserver.log"),
            lifetime,
        )?;

        let kubeconfig = dir.join("kubeconfig");
        let server = format!("https://127.0.0.1:{api_port}");
        std::fs::write(&kubeconfig, pki.kubeconfig(&server)?)?;
        wait_for_apiserver(&kubeconfig, &mut apiserver, &mut etcd).await?;
        Ok(ControlPlane {
            dir: dir.to_owned(),
            pki,
            etcd,
            apiserver,
            api_port,
            kubeconfig,
        })
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client(&self.kubeconfig).await
    }
}

/// A client for the kubeconfig at `path`.
pub async fn client(path: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

async fn start_etcd(dir: &Path, lifetime: Lifetime) -> anyhow::Result<(Process, String)> {
    let etcd_bin = etcd_bin_vendored::etcd_bin_path()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("no vendored etcd for this platform")?;
    let client_port = free_port()?;
    let peer_port = free_port()?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut etcd = Process::spawn(
        "etcd",
        etcd_bin,
        &args([
            "--name=servicekeel-e2e".to_string(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=servicekeel-e2e={peer_url}"),
            // A throwaway store: durability is not worth the fsyncs.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ]),
        &dir.join("etcd.log"),
        lifetime,
    )?;
    wait_ready("etcd", &mut [&mut etcd], ETCD_READY_TIMEOUT, || async {
        if etcd_healthy(client_port).await {
            Ok(())
        } else {
            Err("not healthy".to_string())
        }
    })
    .await?;
    Ok((etcd, client_url))
}

async fn etcd_healthy(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        Ok::<_, std::io::Error>(reply.contains(r#""health":"true""#))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

async fn wait_for_apiserver(
    kubeconfig: &Path,
    apiserver: &mut Process,
    etcd: &mut Process,
) -> anyhow::Result<()> {
    let client = client(kubeconfig).await?;
    wait_ready(
        APISERVER,
        &mut [apiserver, etcd],
        APISERVER_READY_TIMEOUT,
        || async {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| e.to_string())?;
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => Ok(()),
                Ok(body) => Err(body),
                Err(error) => Err(error.to_string()),
            }
        },
    )
    .await
}
