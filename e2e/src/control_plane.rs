//! etcd and kube-apiserver on loopback, from a cold start: free ports, certificates, a
//! kubeconfig, and readiness checks that report the component's own log when it fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::kubernetes::{APISERVER, CONTROLLER_MANAGER, KubeBinaries, SCHEDULER};
use crate::node;
use crate::pki::Pki;
use crate::process::{Lifetime, Process, args, free_port, http_get, wait_ready};

const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The Service network; the apiserver's own Service gets its first address.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Where the apiserver listens and what it expects around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// On a free loopback port, alone: no controllers, no kubelets, no ServiceAccount tokens.
    Loopback,
    /// On the `kubernetes` Service address (port 443) that the node's pods reach, with the
    /// ServiceAccount admission plugin, the Node authorizer and a client certificate for
    /// kubelets; webhooks are called at their endpoints (no kube-proxy runs).
    WithNode,
}

#[derive(Debug)]
pub struct ControlPlane {
    pub dir: PathBuf,
    pub pki: Pki,
    pub etcd: Process,
    pub apiserver: Process,
    pub api_port: u16,
    /// `https://<address>:<port>`.
    pub server: String,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts etcd and the apiserver with their state in `dir`, and waits until both are ready.
    pub async fn start(
        dir: &Path,
        binaries: &KubeBinaries,
        lifetime: Lifetime,
        setup: Setup,
    ) -> anyhow::Result<ControlPlane> {
        std::fs::create_dir_all(dir)?;
        let pki = Pki::create(&dir.join("pki"))?;
        let etcd = start_etcd(dir, lifetime).await?;
        let etcd_url = etcd.1;
        let mut etcd = etcd.0;

        let (address, api_port) = match setup {
            Setup::Loopback => ("127.0.0.1", free_port()?),
            Setup::WithNode => (node::API_ADDRESS, 443),
        };
        let apiserver_pair = pki.pair("apiserver");
        let mut flags = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", apiserver_pair.cert.display()),
            format!("--tls-private-key-file={}", apiserver_pair.key.display()),
            format!("--client-ca-file={}", pki.ca().display()),
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
        ];
        match setup {
            Setup::Loopback => flags.extend([
                "--authorization-mode=RBAC".to_string(),
                // No controller-manager issues tokens, so pods cannot wait for them.
                "--disable-admission-plugins=ServiceAccount".into(),
                "--endpoint-reconciler-type=none".into(),
            ]),
            Setup::WithNode => {
                let kubelet_client = pki.pair("apiserver-kubelet-client");
                flags.extend([
                    "--authorization-mode=Node,RBAC".to_string(),
                    "--enable-admission-plugins=NodeRestriction".into(),
                    // Webhooks are called at their pods' addresses: no kube-proxy on the node.
                    "--enable-aggregator-routing=true".into(),
                    format!(
                        "--kubelet-client-certificate={}",
                        kubelet_client.cert.display()
                    ),
                    format!("--kubelet-client-key={}", kubelet_client.key.display()),
                    "--kubelet-preferred-address-types=InternalIP".into(),
                ]);
            }
        }
        let mut apiserver = Process::spawn(
            APISERVER,
            &binaries.path(APISERVER),
            &args(flags),
            &dir.join("kube-apiserver.log"),
            lifetime,
        )?;

        let kubeconfig = dir.join("kubeconfig");
        let server = format!("https://{address}:{api_port}");
        std::fs::write(&kubeconfig, pki.kubeconfig(&server)?)?;
        wait_for_apiserver(&kubeconfig, &mut apiserver, &mut etcd).await?;
        Ok(ControlPlane {
            dir: dir.to_owned(),
            pki,
            etcd,
            apiserver,
            api_port,
            server,
            kubeconfig,
        })
    }

    /// Stops the apiserver and etcd, as in a control-plane outage; state stays on disk.
    pub fn stop(&mut self) {
        self.apiserver.stop();
        self.etcd.stop();
    }

    /// Starts etcd and the apiserver again, as they were, and waits until they serve.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.etcd.start_again()?;
        self.apiserver.start_again()?;
        wait_for_apiserver(&self.kubeconfig, &mut self.apiserver, &mut self.etcd).await
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client(&self.kubeconfig).await
    }

    /// The controller-manager (which also issues ServiceAccount tokens) and the scheduler, each
    /// with its own client certificate; for a cluster with a node.
    pub fn start_controllers(
        &self,
        binaries: &KubeBinaries,
        lifetime: Lifetime,
    ) -> anyhow::Result<Vec<Process>> {
        let kubeconfig = |name: &str| -> anyhow::Result<PathBuf> {
            let path = self.dir.join(format!("{name}.kubeconfig"));
            std::fs::write(&path, self.pki.client_kubeconfig(name, &self.server)?)?;
            Ok(path)
        };
        let controller_manager = kubeconfig("controller-manager")?;
        let scheduler = kubeconfig("scheduler")?;
        let controller_manager = Process::spawn(
            CONTROLLER_MANAGER,
            &binaries.path(CONTROLLER_MANAGER),
            &args([
                format!("--kubeconfig={}", controller_manager.display()),
                format!(
                    "--authentication-kubeconfig={}",
                    controller_manager.display()
                ),
                format!(
                    "--authorization-kubeconfig={}",
                    controller_manager.display()
                ),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!(
                    "--service-account-private-key-file={}",
                    self.pki.dir.join("sa.key").display()
                ),
                format!("--root-ca-file={}", self.pki.ca().display()),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--v=1".into(),
            ]),
            &self.dir.join("kube-controller-manager.log"),
            lifetime,
        )?;
        let scheduler = Process::spawn(
            SCHEDULER,
            &binaries.path(SCHEDULER),
            &args([
                format!("--kubeconfig={}", scheduler.display()),
                format!("--authentication-kubeconfig={}", scheduler.display()),
                format!("--authorization-kubeconfig={}", scheduler.display()),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
                "--leader-elect=false".into(),
                "--v=1".into(),
            ]),
            &self.dir.join("kube-scheduler.log"),
            lifetime,
        )?;
        Ok(vec![controller_manager, scheduler])
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
    http_get(([127, 0, 0, 1], port).into(), "/health")
        .await
        .is_ok_and(|reply| reply.contains(r#""health":"true""#))
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
