//! A real node on this machine: containerd, runc and the CNI plugins from Debian's packages
//! (`e2e/node/install.sh`), the kubelet built from the Kubernetes Go modules, a bridge network
//! for pods, and a cluster DNS for the names ServiceKeel does not carry.
//!
//! What a node needs from the host is host-wide (one bridge, one cgroup root, the `kubernetes`
//! Service address, the router's host paths), so one node runs at a time; [`Host`] claims the
//! machine for it and [`sweep`] gives everything back, also after a run that was killed.
//!
//! No kube-proxy runs: ServiceKeel carries service traffic. The two Service addresses pods
//! need without it are local addresses of the host: the apiserver listens on the `kubernetes`
//! Service address ([`API_ADDRESS`], port 443) and the cluster DNS on [`DNS_ADDRESS`].

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kube::Api;
use serde::{Deserialize, Serialize};

use crate::images;
use crate::kubernetes::{KUBELET, KubeBinaries};
use crate::paths;
use crate::pki::Pki;
use crate::process::{Lifetime, Process, args, free_port, stop_pid, wait_ready};

/// The node's name, in its certificate (`system:node:<name>`) and in the API.
pub const NODE_NAME: &str = "servicekeel-node";
/// The node's address: the pod bridge's own address, where kubelet serves and probes come from.
pub const NODE_ADDRESS: &str = "10.244.0.1";
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The pod bridge's hardware address (locally administered), set so it never changes.
const BRIDGE_MAC: &str = "02:53:4b:00:00:01";
pub const BRIDGE: &str = "servicekeel0";
/// The `kubernetes` Service address (first of the Service range), local to the host.
pub const API_ADDRESS: &str = "10.96.0.1";
/// The cluster DNS Service address (the webhook's default `upstreamDns`), local to the host.
pub const DNS_ADDRESS: &str = "10.96.0.10";
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The cgroup (in every v1 hierarchy) that holds every pod of the node.
const CGROUP_ROOT: &str = "servicekeel-e2e";
/// Where the router's DaemonSet keeps its socket and snapshot on the node (`manifests/`).
const ROUTER_HOST_PATHS: [&str; 2] = ["/var/run/servicekeel", "/var/lib/servicekeel"];
/// Who holds the host: the cluster directory and the process that owns it (0: detached).
const CLAIM: &str = "/run/servicekeel-e2e-node.json";

const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The programs the node runs, from Debian's packages.
const PACKAGED: [(&str, &str); 5] = [
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/sbin/dnsmasq", "dnsmasq-base"),
];

#[derive(Debug, Serialize, Deserialize)]
struct Claim {
    dir: PathBuf,
    pid: u32,
}

/// The host, claimed for one node and prepared for it.
#[derive(Debug)]
pub struct Host {
    dir: PathBuf,
}

impl Host {
    /// Installs what is missing (`e2e/node/install.sh`), claims the host for the cluster in
    /// `dir` (giving back what an earlier, dead cluster left), and sets up the cgroup root, the
    /// pod bridge and the Service addresses.
    pub fn claim(dir: &Path, lifetime: Lifetime) -> anyhow::Result<Host> {
        if !rustix::process::geteuid().is_root() {
            bail!("a node needs root (cgroups, network interfaces, mounts)");
        }
        install_packages()?;
        if let Some(claim) = read_claim() {
            if claim_is_live(&claim) {
                bail!(
                    "another cluster with a node runs on this machine (state in {}); stop it \
                     first with `servicekeel-e2e down`",
                    claim.dir.display()
                );
            }
            tracing::info!(dir = %claim.dir.display(), "cleaning up after an earlier node");
            sweep(&claim.dir);
        }
        std::fs::create_dir_all(dir)?;
        // Whatever a run that never wrote its claim left behind.
        sweep(dir);
        let pid = match lifetime {
            Lifetime::TiedToThisProcess => std::process::id(),
            Lifetime::Detached => 0,
        };
        let claim = Claim {
            dir: dir.canonicalize()?,
            pid,
        };
        std::fs::write(CLAIM, serde_json::to_vec(&claim)?)
            .with_context(|| format!("cannot write {CLAIM}"))?;
        let host = Host {
            dir: claim.dir.clone(),
        };
        host.prepare()?;
        Ok(host)
    }

    fn prepare(&self) -> anyhow::Result<()> {
        for hierarchy in cgroup_hierarchies()? {
            let root = hierarchy.join(CGROUP_ROOT);
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create {}", root.display()))?;
            // A new cpuset cgroup starts with no CPUs and no memory nodes.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let parent = hierarchy.join(file);
                if parent.exists() {
                    std::fs::write(root.join(file), std::fs::read(&parent)?)
                        .with_context(|| format!("cannot set {file} of {}", root.display()))?;
                }
            }
        }
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        // A bridge whose address was never set takes the lowest of its ports' and changes it as
        // pods' veths come and go; the pods' ARP entries for the gateway then point at an
        // address that is gone, and what they send to the node (probe answers, the webhook's
        // answers to the apiserver) is dropped for seconds. An address set once stays.
        ip(&["link", "set", BRIDGE, "address", BRIDGE_MAC])?;
        ip(&["addr", "add", &format!("{NODE_ADDRESS}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        for address in [API_ADDRESS, DNS_ADDRESS] {
            ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"])?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps the host as it is (a detached cluster goes on running); returns the directory.
    pub fn keep(self) -> PathBuf {
        let dir = self.dir.clone();
        std::mem::forget(self);
        dir
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        sweep(&self.dir);
    }
}

fn read_claim() -> Option<Claim> {
    let bytes = std::fs::read(CLAIM).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether the cluster holding the host still runs: its owning process lives, or (detached) its
/// kubelet does.
fn claim_is_live(claim: &Claim) -> bool {
    if claim.pid != 0 {
        return Path::new(&format!("/proc/{}", claim.pid)).exists()
            && claim.pid != std::process::id();
    }
    crate::cluster::State::load(&claim.dir)
        .ok()
        .flatten()
        .is_some_and(|state| state.processes.iter().any(|c| c.is_running()))
}

fn install_packages() -> anyhow::Result<()> {
    let missing = PACKAGED
        .iter()
        .any(|(path, _)| !crate::kubernetes::is_executable(Path::new(path)))
        || !musl_target_installed();
    if !missing {
        return Ok(());
    }
    let script = paths::repo().join("e2e/node/install.sh");
    tracing::info!(script = %script.display(), "installing the node's packages");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    for (path, package) in PACKAGED {
        if !crate::kubernetes::is_executable(Path::new(path)) {
            bail!("{path} is still missing after installing the Debian package {package}");
        }
    }
    Ok(())
}

fn musl_target_installed() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(images::TARGET))
        // Without rustup, the build says what is missing.
        .unwrap_or(true)
}

/// The node's processes: the cluster DNS, containerd and the kubelet.
#[derive(Debug)]
pub struct Node {
    pub dns: Process,
    pub containerd: Process,
    pub kubelet: Process,
    pub containerd_socket: PathBuf,
}

impl Node {
    /// Starts the node and waits until it is Ready in the API; the images are imported into
    /// containerd before the kubelet starts.
    pub async fn start(
        host: &Host,
        binaries: &KubeBinaries,
        pki: &Pki,
        server: &str,
        client: &kube::Client,
        lifetime: Lifetime,
        profile: images::Profile,
    ) -> anyhow::Result<Node> {
        let dir = host.dir().join("node");
        std::fs::create_dir_all(&dir)?;
        let tarballs = images::build(&images::ALL, &dir.join("images"), profile)?;
        let dns = start_dns(&dir, lifetime)?;
        let (containerd, containerd_socket) = start_containerd(&dir, lifetime).await?;
        for tarball in &tarballs {
            import_image(&containerd_socket, tarball)?;
        }
        let kubelet = start_kubelet(&dir, binaries, pki, server, &containerd_socket, lifetime)?;
        let mut node = Node {
            dns,
            containerd,
            kubelet,
            containerd_socket,
        };
        node.wait_ready(client).await?;
        Ok(node)
    }

    async fn wait_ready(&mut self, client: &kube::Client) -> anyhow::Result<()> {
        let nodes: Api<NodeObject> = Api::all(client.clone());
        let Node {
            dns,
            containerd,
            kubelet,
            ..
        } = self;
        wait_ready(
            "the node",
            &mut [kubelet, containerd, dns],
            NODE_READY_TIMEOUT,
            || async {
                let node = nodes.get_opt(NODE_NAME).await.map_err(|e| e.to_string())?;
                node_ready(&node.ok_or("not registered yet")?)
            },
        )
        .await
    }

    /// Every process of the node, for `servicekeel-e2e up` to leave running.
    pub fn into_processes(self) -> Vec<Process> {
        vec![self.dns, self.containerd, self.kubelet]
    }
}

/// Whether the node says it is Ready; if not, what its Ready condition says.
pub fn node_ready(node: &NodeObject) -> Result<(), String> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err(format!(
            "Ready={}: {}",
            c.status,
            c.message.clone().unwrap_or_default()
        )),
        None => Err("no Ready condition yet".into()),
    }
}

/// Whether the pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn start_dns(dir: &Path, lifetime: Lifetime) -> anyhow::Result<Process> {
    // Answers the cluster's own names it knows and nothing else: it never forwards to the
    // host's resolvers.
    Process::spawn(
        "dnsmasq",
        Path::new("/usr/sbin/dnsmasq"),
        &args([
            "--keep-in-foreground".to_string(),
            "--no-daemon".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={DNS_ADDRESS}"),
            "--port=53".into(),
            "--user=root".into(),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            format!("--host-record=kubernetes.default.svc.{CLUSTER_DOMAIN},{API_ADDRESS}"),
            format!("--local=/{CLUSTER_DOMAIN}/"),
            "--log-queries".into(),
        ]),
        &dir.join("dnsmasq.log"),
        lifetime,
    )
}

async fn start_containerd(dir: &Path, lifetime: Lifetime) -> anyhow::Result<(Process, PathBuf)> {
    let root = dir.join("containerd");
    let socket = root.join("containerd.sock");
    let cni = dir.join("cni");
    std::fs::create_dir_all(&cni)?;
    std::fs::write(
        cni.join("10-servicekeel-e2e.conflist"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "servicekeel-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "isDefaultGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": dir.join("ipam"),
                        "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_ADDRESS}]],
                    },
                },
                {"type": "loopback"},
            ],
        }))?,
    )?;
    let config = root.join("config.toml");
    std::fs::create_dir_all(&root)?;
    std::fs::write(
        &config,
        format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp",
]
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Pods get no OOM score below containerd's own: root here may lack CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            root = root.display(),
            socket = socket.display(),
            pause = images::PAUSE.reference,
            cni = cni.display(),
        ),
    )?;
    let mut containerd = Process::spawn(
        "containerd",
        Path::new("/usr/bin/containerd"),
        &args([format!("--config={}", config.display())]),
        &dir.join("containerd.log"),
        lifetime,
    )?;
    let probe = socket.clone();
    wait_ready(
        "containerd",
        &mut [&mut containerd],
        CONTAINERD_READY_TIMEOUT,
        || {
            let probe = probe.clone();
            async move {
                let out = ctr(&probe, &["version"]).map_err(|e| e.to_string())?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            }
        },
    )
    .await?;
    Ok((containerd, socket))
}

fn ctr(socket: &Path, arguments: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new("/usr/bin/ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io"])
        .args(arguments)
        .output()
        .context("cannot run ctr")
}

/// Imports an OCI image tarball into the CRI's namespace of containerd.
pub fn import_image(socket: &Path, tarball: &Path) -> anyhow::Result<()> {
    let path = tarball.to_string_lossy();
    let out = ctr(socket, &["images", "import", &path])?;
    if !out.status.success() {
        bail!(
            "ctr could not import {}: {}",
            tarball.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn start_kubelet(
    dir: &Path,
    binaries: &KubeBinaries,
    pki: &Pki,
    server: &str,
    containerd_socket: &Path,
    lifetime: Lifetime,
) -> anyhow::Result<Process> {
    let root = dir.join("kubelet");
    std::fs::create_dir_all(&root)?;
    let kubeconfig = dir.join("kubelet.kubeconfig");
    std::fs::write(&kubeconfig, pki.client_kubeconfig("node", server)?)?;
    // The resolver configuration pods with `dnsPolicy: Default` get: the cluster DNS, never the
    // host's own resolvers.
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {DNS_ADDRESS}\n"))?;
    let config = dir.join("kubelet.yaml");
    std::fs::write(
        &config,
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_ADDRESS}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: "unix://{socket}"
# This host runs cgroup v1 without systemd.
cgroupDriver: cgroupfs
cgroupRoot: /{CGROUP_ROOT}
enforceNodeAllocatable: []
failSwapOn: false
clusterDomain: {CLUSTER_DOMAIN}
clusterDNS: [{DNS_ADDRESS}]
resolvConf: "{resolv}"
podLogsDir: "{logs}"
# Pod updates (an annotation read through the downward API) reach the pod within seconds.
syncFrequency: 10s
# A test machine's disk is nobody's to evict pods for.
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
shutdownGracePeriod: 0s
"#,
            port = free_port()?,
            healthz = free_port()?,
            ca = pki.ca().display(),
            socket = containerd_socket.display(),
            resolv = resolv.display(),
            logs = dir.join("pod-logs").display(),
        ),
    )?;
    Process::spawn(
        KUBELET,
        &binaries.path(KUBELET),
        &args([
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--root-dir={}", root.display()),
            format!("--cert-dir={}", root.join("pki").display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_ADDRESS}"),
            "--v=1".into(),
        ]),
        &dir.join("kubelet.log"),
        lifetime,
    )
}

/// Gives the host back: stops the node's processes and every container (also those a killed
/// run left), unmounts what they mounted under `dir`, removes their network namespaces, the
/// bridge, the Service addresses, the cgroups and the router's host paths; the host-wide parts
/// only when no other running cluster holds the host. Best effort: each step goes on when
/// another fails, and says what it could not do.
pub fn sweep(dir: &Path) {
    let node_dir = dir.join("node");
    // The host-wide parts belong to another cluster while that one runs.
    let host_is_ours = !read_claim().is_some_and(|claim| claim.dir != dir && claim_is_live(&claim));
    // The kubelet first, so that it restarts nothing; then every container; then containerd.
    stop_matching(&|cmdline| {
        cmdline.contains(KUBELET) && cmdline.contains(&node_dir.to_string_lossy().into_owned())
    });
    if host_is_ours {
        kill_cgroup_processes();
    }
    let socket = node_dir.join("containerd/containerd.sock");
    let socket = socket.to_string_lossy().into_owned();
    stop_matching(&|cmdline| cmdline.contains("containerd-shim") && cmdline.contains(&socket));
    let dir_text = node_dir.to_string_lossy().into_owned();
    stop_matching(&|cmdline| {
        (cmdline.starts_with("/usr/bin/containerd") || cmdline.starts_with("/usr/sbin/dnsmasq"))
            && cmdline.contains(&dir_text)
    });
    unmount_under(&node_dir);
    remove_links_into("/var/log/containers", &node_dir);
    if !host_is_ours {
        return;
    }
    remove_pod_network_namespaces();
    let _ = ip(&["link", "del", BRIDGE]);
    for address in [API_ADDRESS, DNS_ADDRESS] {
        let _ = ip(&["addr", "del", &format!("{address}/32"), "dev", "lo"]);
    }
    remove_cgroups();
    for path in ROUTER_HOST_PATHS {
        let _ = std::fs::remove_dir_all(path);
    }
    if read_claim().is_some_and(|claim| claim.dir == dir) {
        let _ = std::fs::remove_file(CLAIM);
    }
}

/// Gives the host back from the node with state in `dir`, and from a node that claimed it
/// and is gone (a killed run), but never from one that still runs. Returns what is left.
pub fn release(dir: &Path) -> Vec<String> {
    if let Some(claim) = read_claim()
        && claim.dir != dir
        && !claim_is_live(&claim)
    {
        sweep(&claim.dir);
        if claim.pid != 0 {
            // A killed test run's own directory: nobody else will remove it.
            let _ = std::fs::remove_dir_all(&claim.dir);
        }
    }
    sweep(dir);
    leftovers(dir)
}

/// What of a node with state in `dir` is still on the host (empty once [`sweep`] has run):
/// processes, cgroups, mounts, network interfaces, addresses, the claim.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let node_dir = dir.join("node");
    let mut node_dirs = vec![node_dir.to_string_lossy().into_owned()];
    if let Some(claim) = read_claim() {
        node_dirs.push(claim.dir.join("node").to_string_lossy().into_owned());
    }
    let mut found: Vec<String> = processes()
        .into_iter()
        .filter(|(_, cmdline)| node_dirs.iter().any(|d| cmdline.contains(d.as_str())))
        .map(|(pid, cmdline)| format!("process {pid}: {cmdline}"))
        .collect();
    for cgroup in node_cgroups() {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        found.push(format!(
            "cgroup {} ({} processes)",
            cgroup.display(),
            procs.lines().count()
        ));
    }
    if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
        found.extend(
            mountinfo
                .lines()
                .filter_map(|line| line.split(' ').nth(4))
                .filter(|point| Path::new(point).starts_with(&node_dir))
                .map(|point| format!("mount {point}")),
        );
    }
    if ip(&["link", "show", BRIDGE]).is_ok() {
        found.push(format!("bridge {BRIDGE}"));
    }
    let lo = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", "lo"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    for address in [API_ADDRESS, DNS_ADDRESS] {
        if lo.contains(&format!("inet {address}/")) {
            found.push(format!("address {address} on lo"));
        }
    }
    if let Some(claim) = read_claim() {
        let live = if claim_is_live(&claim) {
            "running"
        } else {
            "gone"
        };
        found.push(format!(
            "{CLAIM}: the host is claimed by the cluster in {} ({live})",
            claim.dir.display()
        ));
    }
    found
}

/// Removes the symbolic links in `dir` that point under `target` (the kubelet links every
/// container's log from a fixed directory).
fn remove_links_into(dir: &str, target: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|to| to.starts_with(target)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The log of a container of the node's pods (`<namespace>_<pod>_<uid>/<container>/<n>.log`).
pub fn container_logs(dir: &Path, namespace: &str, pod: &str, container: &str) -> Vec<PathBuf> {
    let prefix = format!("{namespace}_{pod}_");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir.join("node/pod-logs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .flat_map(|e| {
            std::fs::read_dir(e.path().join(container))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .collect();
    logs.sort();
    logs
}

/// SIGTERM (SIGKILL after the grace period) to every process whose command line matches.
fn stop_matching(matches: &dyn Fn(&str) -> bool) {
    for (pid, cmdline) in processes() {
        if matches(&cmdline) {
            let program = cmdline.split(' ').next().unwrap_or_default().to_string();
            stop_pid(pid, &program);
        }
    }
}

/// Every process with its command line (arguments joined by spaces).
pub fn processes() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            (pid != std::process::id() && !text.is_empty()).then_some((pid, text))
        })
        .collect()
}

fn cgroup_hierarchies() -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir("/sys/fs/cgroup").context("no /sys/fs/cgroup")?;
    let hierarchies: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() || p.join("tasks").exists())
        .collect();
    if hierarchies.is_empty() || Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        bail!(
            "the node is set up for cgroup v1 hierarchies under /sys/fs/cgroup, and this host has \
             none"
        );
    }
    Ok(hierarchies)
}

/// The cgroup directories under the node's root in every hierarchy, deepest first.
fn node_cgroups() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for hierarchy in cgroup_hierarchies().unwrap_or_default() {
        let mut stack = vec![hierarchy.join(CGROUP_ROOT)];
        while let Some(dir) = stack.pop() {
            if !dir.is_dir() {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            found.push(dir);
        }
    }
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn kill_cgroup_processes() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = Vec::new();
        for cgroup in node_cgroups() {
            if let Ok(text) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!(?pids, "pod processes still running after SIGKILL");
            return;
        }
        for pid in pids {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_cgroups() {
    for cgroup in node_cgroups() {
        if let Err(error) = std::fs::remove_dir(&cgroup) {
            tracing::warn!(cgroup = %cgroup.display(), %error, "cannot remove a cgroup");
        }
    }
}

/// Lazily unmounts every mount point at or under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        if let Err(error) = rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH) {
            tracing::warn!(mount = %point.display(), %error, "cannot unmount");
        }
    }
}

/// The network namespaces containerd made for the node's pods (`/run/netns/cni-*` holding an
/// address of the pod network); the pods' veth pairs go with them.
fn remove_pod_network_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let pod_network: Ipv4Addr = NODE_ADDRESS.parse().expect("valid address");
    let prefix = format!(
        "{}.{}.{}.",
        pod_network.octets()[0],
        pod_network.octets()[1],
        pod_network.octets()[2]
    );
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("cni-") {
            continue;
        }
        let holds_pod_address = Command::new("ip")
            .args(["-n", &name, "-4", "-o", "addr", "show"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).contains(&format!("inet {prefix}")))
            .unwrap_or(false);
        if holds_pod_address {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn ip(arguments: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(arguments)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            arguments.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The pid of a process of the pod with `pod_uid` whose command line contains `program`.
pub fn pod_process(pod_uid: &str, program: &str) -> Option<u32> {
    let cgroup = format!("pod{pod_uid}");
    processes().into_iter().find_map(|(pid, cmdline)| {
        let in_pod = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|text| text.contains(&cgroup));
        (in_pod && cmdline.contains(program)).then_some(pid)
    })
}

/// A command running `arguments` inside the namespaces of process `pid` (mount, network, UTS,
/// IPC, PID): what runs there sees the container's files, resolver and network, and needs no
/// API server (unlike `kubectl exec`).
pub fn in_container(pid: u32, arguments: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--target={pid}"))
        .args(["--mount", "--net", "--uts", "--ipc", "--pid", "--"])
        .args(arguments);
    command
}
