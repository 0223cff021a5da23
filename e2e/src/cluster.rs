//! The local cluster as a whole: control plane plus the webhook, started together, and the
//! state file through which `servicekeel-e2e up`, `status` and `down` find a running cluster.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::control_plane::ControlPlane;
use crate::kubernetes::{APISERVER, KubeBinaries};
use crate::process::{Lifetime, Process, free_port, is_running, stop_pid};
use crate::webhook;

#[derive(Debug)]
pub struct LocalCluster {
    pub control_plane: ControlPlane,
    webhook: Option<Process>,
    webhook_port: u16,
    webhook_kubeconfig: PathBuf,
    webhook_flags: Vec<String>,
    lifetime: Lifetime,
}

impl LocalCluster {
    /// Builds what is missing, starts etcd, the apiserver and the webhook, and registers the
    /// webhook; returns once pods are being injected.
    pub async fn start(dir: &Path, lifetime: Lifetime) -> anyhow::Result<LocalCluster> {
        let binaries = KubeBinaries::ensure(&[APISERVER])?;
        let control_plane = ControlPlane::start(dir, &binaries, lifetime).await?;
        let webhook_port = free_port()?;
        let server = format!("https://127.0.0.1:{}", control_plane.api_port);
        let webhook_kubeconfig =
            webhook::install_access(&control_plane.kubeconfig, &control_plane.pki, &server, dir)?;
        let mut cluster = LocalCluster {
            control_plane,
            webhook: None,
            webhook_port,
            webhook_kubeconfig,
            webhook_flags: Vec::new(),
            lifetime,
        };
        cluster.start_webhook().await?;
        let client = cluster.control_plane.client().await?;
        webhook::register(&client, &cluster.webhook_url()).await?;
        Ok(cluster)
    }

    pub fn webhook_url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.webhook_port)
    }

    /// The webhook's log file.
    pub fn webhook_log(&self) -> PathBuf {
        self.control_plane.dir.join("servicekeel-webhook.log")
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.control_plane.kubeconfig
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.control_plane.client().await
    }

    /// Stops the webhook (SIGTERM, drained); the registration stays, as in a webhook outage.
    pub fn stop_webhook(&mut self) {
        if let Some(mut process) = self.webhook.take() {
            process.stop();
        }
    }

    /// Restarts the webhook with `flags` added to its command line (none: as at start).
    pub async fn restart_webhook(&mut self, flags: &[&str]) -> anyhow::Result<()> {
        self.stop_webhook();
        self.webhook_flags = flags.iter().map(|f| f.to_string()).collect();
        self.start_webhook().await
    }

    /// Starts the webhook again on the same address.
    pub async fn start_webhook(&mut self) -> anyhow::Result<()> {
        let process = webhook::start(
            &self.control_plane.dir,
            self.webhook_port,
            &self.webhook_kubeconfig,
            &self.webhook_flags,
            self.lifetime,
        )
        .await?;
        self.webhook = Some(process);
        Ok(())
    }

    /// Leaves every process running and records them in `state.json` beside the kubeconfig.
    pub fn detach(self) -> anyhow::Result<State> {
        let LocalCluster {
            control_plane,
            webhook,
            ..
        } = self;
        let kubeconfig = control_plane.kubeconfig.clone();
        let dir = control_plane.dir.clone();
        let api_port = control_plane.api_port;
        let mut processes = Vec::new();
        for process in [
            Some(control_plane.etcd),
            Some(control_plane.apiserver),
            webhook,
        ]
        .into_iter()
        .flatten()
        {
            let name = process.name().to_string();
            let log = process.log().to_owned();
            if let Some(pid) = process.detach() {
                processes.push(Component { name, pid, log });
            }
        }
        let state = State {
            kubeconfig,
            api_port,
            processes,
        };
        std::fs::write(dir.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)?;
        Ok(state)
    }
}

const STATE_FILE: &str = "state.json";

/// What `up` left running.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub kubeconfig: PathBuf,
    pub api_port: u16,
    pub processes: Vec<Component>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
}

impl Component {
    /// Whether the process still runs (its name is in its command line).
    pub fn is_running(&self) -> bool {
        is_running(self.pid, &self.name)
    }
}

impl State {
    pub fn load(dir: &Path) -> anyhow::Result<Option<State>> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is corrupt", path.display())
                })?))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn all_running(&self) -> bool {
        self.processes.iter().all(Component::is_running)
    }

    /// Stops every recorded process (the webhook first, etcd last).
    pub fn stop_all(&self) -> Vec<(String, bool)> {
        self.processes
            .iter()
            .rev()
            .map(|c| (c.name.clone(), stop_pid(c.pid, &c.name)))
            .collect()
    }
}
