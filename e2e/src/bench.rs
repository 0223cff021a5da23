//! The data-path benchmarks: the same load through ServiceKeel (client sidecar → router over
//! its Unix socket → server) and straight to the server, interleaved (baseline, candidate,
//! baseline, …) so both see the same machine, with wall time and the CPU time every process
//! involved spent, read from `/proc`. `servicekeel-bench` runs them and writes `BENCHMARKS.md`.
//!
//! The sidecars and the router are the release binaries, run as processes; the load
//! generator and the servers run in this process on loopback, the servers on a thread of their own.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use servicekeel_api::defaults::{ROUTER_UID, SIDECAR_UID};
use servicekeel_proxy::dirs::{self, Owner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::{images, paths, process};

pub mod baselines;
pub mod caches;
pub mod links;
pub mod pods;
pub mod webhook;

/// One measurement of one side.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub wall: Duration,
    /// CPU time of this process and the proxies together.
    pub cpu: Duration,
    /// Units of work done (bytes, connections, requests).
    pub units: u64,
    /// Latencies' 50th, 99th and 99.9th percentiles, when the load measures them.
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub p999: Option<Duration>,
}

impl Sample {
    pub fn rate(&self) -> f64 {
        self.units as f64 / self.wall.as_secs_f64()
    }

    /// CPU time per unit, in microseconds.
    pub fn cpu_per_unit_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.units as f64
    }

    /// A sample of one unit per latency, over `wall`, with no CPU measured.
    pub fn of_latencies(mut latencies: Vec<Duration>, wall: Duration) -> Sample {
        latencies.sort();
        let has = !latencies.is_empty();
        Sample {
            wall,
            cpu: Duration::ZERO,
            units: latencies.len() as u64,
            p50: has.then(|| percentile(&latencies, 0.50)),
            p99: has.then(|| percentile(&latencies, 0.99)),
            p999: has.then(|| percentile(&latencies, 0.999)),
        }
    }
}

/// Every thread of the processes `pids` allowed on the CPUs of `cpus` only; threads they start
/// afterwards inherit it from the thread that starts them. A thread that ends meanwhile is
/// skipped.
pub fn pin_threads(pids: &[u32], cpus: &rustix::thread::CpuSet) -> anyhow::Result<()> {
    for &pid in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("the threads of process {pid}"))?;
        for task in tasks {
            let name = task?.file_name();
            let tid = name.to_string_lossy().parse::<i32>()?;
            match rustix::thread::sched_setaffinity(rustix::process::Pid::from_raw(tid), cpus) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(error) => bail!("cannot pin thread {tid} of process {pid}: {error}"),
            }
        }
    }
    Ok(())
}

/// CPU time (user + system) of process `pid`.
pub fn cpu_of(pid: u32) -> anyhow::Result<Duration> {
    cpu_ticks(pid, 2)
}

/// The same, with that of its children it has reaped.
pub fn cpu_with_children_of(pid: u32) -> anyhow::Result<Duration> {
    cpu_ticks(pid, 4)
}

/// The first `fields` of utime, stime, cutime, cstime of process `pid`, summed.
fn cpu_ticks(pid: u32, fields: usize) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; fields count from after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .context("unexpected /proc/PID/stat")?
        .1;
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(fields)
        .map(|field| field.parse::<u64>())
        .sum::<Result<_, _>>()?;
    let per_second = rustix::param::clock_ticks_per_second();
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// A child process killed when dropped.
#[derive(Debug)]
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a benchmark program's `main` on the calling thread, with a runtime of its own that
/// drives its sockets there too, and every task it spawns (a load of several flows at a time):
/// the load generator is one thread, as a client process would be, beside the servers' thread
/// ([`servers`]) and the proxies' processes. (Its sockets driven from a worker thread instead,
/// every round trip would cost it one wakeup more, the direct path and the proxied alike.) An
/// error is printed after the program's `name` and fails the process.
pub fn run_main(
    name: &str,
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let done = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(main));
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// CPU time spent so far by every process a measurement counts.
pub type Cpu<'a> = &'a dyn Fn() -> anyhow::Result<Duration>;

/// One run of `load`, which returns its units of work and any latencies it measured, timed on
/// the wall clock and by `cpu`.
pub async fn sample<F, Fut>(cpu: Cpu<'_>, load: F) -> anyhow::Result<Sample>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(u64, Vec<Duration>)>>,
{
    let cpu_before = cpu()?;
    let started = Instant::now();
    let (units, latencies) = load().await?;
    let wall = started.elapsed();
    let mut sample = Sample::of_latencies(latencies, wall);
    sample.units = units;
    sample.cpu = cpu()?.saturating_sub(cpu_before);
    Ok(sample)
}

/// The address the client's sidecar gives the imported service with [`Layout::OneNode`] (the
/// first of its range), unless other such proxies run already.
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 79, 1);

/// Where the server pod runs: beside the client pod, or on another node, reached through the
/// client node's router, a mutual-TLS link and the server node's router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    OneNode,
    TwoNodes,
}

/// The proxies of the benchmark: a router (two with [`Layout::TwoNodes`]), a server pod's
/// sidecar registering the servers, a client pod's sidecar importing them.
#[derive(Debug)]
pub struct Proxies {
    /// By role, with each one's admin server, the client pod's sidecar last.
    processes: Vec<(&'static str, Running, SocketAddr)>,
    /// Where the client reaches the TCP server through its sidecar.
    pub tcp: SocketAddr,
    /// Where the client reaches the UDP server through its sidecar.
    pub udp: SocketAddr,
    /// The client sidecar's DNS server.
    pub dns: SocketAddr,
    /// The proxy binary they run.
    binary: PathBuf,
    /// The Unix socket of the client's router.
    client_socket: PathBuf,
    /// What the sidecars' environment adds to the pod's.
    sidecar_env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    /// Last, so that it is given back once the processes have stopped.
    _range: ClientRange,
}

/// The third octets of the client sidecars' ranges (`127.0.N.0/24`) that running proxies hold,
/// so that proxies started beside others get addresses of their own: two client sidecars on one
/// address would leave every connection to the one that bound it first.
static CLIENT_RANGES: std::sync::Mutex<std::collections::BTreeSet<u8>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A client sidecar's range, held until dropped.
#[derive(Debug)]
struct ClientRange(u8);

impl ClientRange {
    /// The first range not held of the ten from `127.0.first.0/24` on.
    fn take(first: u8) -> anyhow::Result<ClientRange> {
        let mut held = CLIENT_RANGES.lock().expect("not poisoned");
        let octet = (first..first + 10)
            .find(|octet| !held.contains(octet))
            .with_context(|| format!("the ten client ranges from 127.0.{first}.0/24 are in use"))?;
        held.insert(octet);
        Ok(ClientRange(octet))
    }

    fn cidr(&self) -> String {
        format!("127.0.{}.0/24", self.0)
    }

    /// The address the sidecar gives its first imported service.
    fn first(&self) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, self.0, 1)
    }
}

impl Drop for ClientRange {
    fn drop(&mut self) {
        if let Ok(mut held) = CLIENT_RANGES.lock() {
            held.remove(&self.0);
        }
    }
}

/// How the benchmark runs its proxies: by default the proxy image's static release binary, with
/// the environment a pod or node gives it; a comparison of two builds or two settings names
/// another binary, or environment added for the routers and for the sidecars (a variable set
/// here wins over the benchmark's own).
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    pub binary: Option<PathBuf>,
    pub router_env: Vec<(String, String)>,
    pub sidecar_env: Vec<(String, String)>,
}

/// The cluster of the benchmark's routers and pods.
const CLUSTER: &str = "bench";

/// What the client pod imports: the servers, as the server pod exports them.
const IMPORTED: &str =
    "services: [{name: sink, ports: [{port: 9000}, {port: 9001, protocol: UDP}]}]";

/// One sidecar of the benchmark, as the proxy image runs it in a pod: configured by its
/// environment and its annotations file.
struct SidecarLaunch<'a> {
    name: &'a str,
    /// Its local addresses for imports.
    range: &'a str,
    dns: SocketAddr,
    admin: SocketAddr,
    /// Its node router's socket.
    socket: &'a Path,
    /// The annotations file's content.
    annotations: String,
    /// Added to its environment last.
    env: &'a [(String, String)],
}

/// A new file `name` in `dir` for a proxy's output.
fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(std::fs::File::create(dir.join(name))?.into())
}

/// The last lines each proxy wrote to its error output in `dir`, for an error that would
/// otherwise point at files removed with the directory.
fn errors_logged(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "err"))
        .collect();
    files.sort();
    let mut out = String::new();
    for file in files {
        let tail = process::log_tail(&file, 5);
        if tail.is_empty() {
            continue;
        }
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        out.push_str(&format!("\n{name}:"));
        for line in tail.lines() {
            out.push_str(&format!("\n  {line}"));
        }
    }
    out
}

impl SidecarLaunch<'_> {
    /// Starts `binary` as this sidecar; its annotations file and logs go in `dir`.
    fn start(&self, binary: &Path, dir: &Path) -> anyhow::Result<Running> {
        let name = self.name;
        let file = dir.join(format!("{name}.annotations"));
        std::fs::write(&file, &self.annotations)?;
        let child = Command::new(binary)
            .uid(SIDECAR_UID as u32)
            .gid(SIDECAR_UID as u32)
            .arg("sidecar")
            .env("RUST_LOG", "warn")
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", "default")
            .env("POD_IP", "127.0.0.1")
            .env("SERVICEKEEL_CLUSTER", CLUSTER)
            .env("SIDECAR_UPSTREAM_DNS", "127.0.0.1:9")
            .env("SIDECAR_DNS_ADDR", self.dns.to_string())
            .env("SIDECAR_ADMIN_ADDR", self.admin.to_string())
            .env("SIDECAR_IP_RANGE", self.range)
            .env(
                "SIDECAR_SERVER_LISTEN",
                format!("unix://{}", self.socket.display()),
            )
            .env("SIDECAR_ANNOTATIONS_FILE", &file)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdout(log_file(dir, &format!("{name}.log"))?)
            .stderr(log_file(dir, &format!("{name}.err"))?)
            .spawn()
            .with_context(|| format!("cannot start the {name} sidecar"))?;
        Ok(Running(child))
    }
}

/// Starts `binary` as the router of node `node` without an API server, its socket, state and
/// logs in `dir`, with `links` (the flags that turn its links on, see [`RouterTls::args`]) and
/// `env` added to its environment; returns it with its socket and its admin server's address.
///
/// It runs as the DaemonSet runs it: its own user in the sidecars' group, without capabilities,
/// in directories handed to it as its init container hands them (`prepare-dirs`). So the kernel
/// holds its pipes to that user's budget, as on a node.
fn start_router(
    binary: &Path,
    dir: &Path,
    node: &str,
    links: &[String],
    env: &[(String, String)],
) -> anyhow::Result<(Running, PathBuf, SocketAddr)> {
    let socket = dir.join(format!("{node}.sock"));
    let state = router_state(dir, node);
    let owner = Owner {
        uid: ROUTER_UID as u32,
        gid: SIDECAR_UID as u32,
    };
    for handed in [dir, &state] {
        dirs::prepare(handed, owner)?;
    }
    // The sidecars, in the same group, reach the socket and read their annotations files.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
    let child = Command::new(binary)
        .uid(owner.uid)
        .gid(owner.gid)
        .args(["router", "--no-api", &format!("--cluster={CLUSTER}")])
        .arg(format!("--node={node}"))
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--state-dir={}", state.display()))
        .arg(format!("--admin-addr={admin}"))
        .args(links)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(key, value)| (key, value)))
        .stdout(log_file(dir, &format!("router-{node}.log"))?)
        .stderr(log_file(dir, &format!("router-{node}.err"))?)
        .spawn()
        .context("cannot start the router")?;
    Ok((Running(child), socket, admin))
}

/// The state directory [`start_router`] gives the router of node `node` in `dir`, where it
/// keeps its snapshot.
fn router_state(dir: &Path, node: &str) -> PathBuf {
    dir.join(node).join("state")
}

/// Writes a peers file in `dir` naming each of `nodes`, a router at one address each, and
/// returns its path.
fn peers_file(
    dir: &Path,
    nodes: impl IntoIterator<Item = (String, SocketAddr)>,
) -> anyhow::Result<PathBuf> {
    let path = dir.join("peers.yaml");
    let mut text = String::from("nodes:\n");
    for (name, addr) in nodes {
        text.push_str(&format!("  {name}: [\"{addr}\"]\n"));
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

impl Proxies {
    /// Starts them for a TCP server at `tcp` and a UDP server at `udp` (both on loopback). The
    /// proxies are the static release binary the proxy image holds, as pods run it.
    pub async fn start(
        tcp: SocketAddr,
        udp: SocketAddr,
        layout: Layout,
    ) -> anyhow::Result<Proxies> {
        Proxies::start_with(tcp, udp, layout, &ProxySettings::default()).await
    }

    /// The same, run as `settings` say.
    pub async fn start_with(
        tcp: SocketAddr,
        udp: SocketAddr,
        layout: Layout,
        settings: &ProxySettings,
    ) -> anyhow::Result<Proxies> {
        let binary = match &settings.binary {
            Some(binary) => binary.clone(),
            None => proxy_binary()?,
        };
        let dir = tempfile::tempdir()?;
        let router = |node: &str, links: &[String]| {
            start_router(&binary, dir.path(), node, links, &settings.router_env)
        };
        let exported = format!(
            "services: [{{name: sink, ports: [{{port: 9000, targetPort: {}}}, {{port: 9001, targetPort: {}, protocol: UDP}}]}}]",
            tcp.port(),
            udp.port()
        );
        let mut processes = Vec::new();
        let (server_socket, client_socket) = match layout {
            Layout::OneNode => {
                let (running, socket, admin) = router("bench", &[])?;
                processes.push(("router", running, admin));
                (socket.clone(), socket)
            }
            Layout::TwoNodes => {
                let tls = RouterTls::create(&dir.path().join("tls"))?;
                let far_peer = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
                let (running, far_socket, admin) = router("far", &tls.args(far_peer, None))?;
                processes.push(("server node's router", running, admin));
                // The near router knows of the endpoints on the far node from its snapshot (as
                // the API server would tell it) and of the far router from its peers file.
                let peers = peers_file(dir.path(), [("far".to_string(), far_peer)])?;
                let state = router_state(dir.path(), "near");
                std::fs::create_dir_all(&state)?;
                let entry = |port: u16, protocol: &str, addr: SocketAddr| {
                    format!(
                        r#"{{"target":"sink.default.{CLUSTER}:{port}/{protocol}","addr":"{addr}","node":"far","ready":true}}"#
                    )
                };
                std::fs::write(
                    state.join(servicekeel_api::defaults::ROUTER_SNAPSHOT_FILE),
                    format!(
                        r#"{{"format":1,"saved":0,"entries":[{},{}]}}"#,
                        entry(9000, "TCP", tcp),
                        entry(9001, "UDP", udp)
                    ),
                )?;
                let near_peer = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
                let (running, near_socket, admin) =
                    router("near", &tls.args(near_peer, Some(&peers)))?;
                processes.push(("client node's router", running, admin));
                (far_socket, near_socket)
            }
        };
        for socket in [&server_socket, &client_socket] {
            wait_for(|| socket.exists(), "the router's socket").await?;
        }
        let client_dns = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
        let sidecar = |name: &str,
                       range: &str,
                       dns: SocketAddr,
                       socket: &PathBuf,
                       annotations: String|
         -> anyhow::Result<(Running, SocketAddr)> {
            let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
            let launch = SidecarLaunch {
                name,
                range,
                dns,
                admin,
                socket,
                annotations,
                env: &settings.sidecar_env,
            };
            Ok((launch.start(&binary, dir.path())?, admin))
        };
        let server_dns = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
        let (server, server_admin) = sidecar(
            "server",
            "127.0.78.0/24",
            server_dns,
            &server_socket,
            format!("servicekeel.io/exported-services={exported:?}\n"),
        )?;
        processes.push(("server sidecar", server, server_admin));
        // Each client has addresses of its own, so that proxies can run beside others: the
        // first with one node from 127.0.79.0/24, with two from 127.0.89.0/24.
        let range = ClientRange::take(match layout {
            Layout::OneNode => SERVICE_IP.octets()[2],
            Layout::TwoNodes => 89,
        })?;
        let service_ip = range.first();
        let (client, client_admin) = sidecar(
            "client",
            &range.cidr(),
            client_dns,
            &client_socket,
            format!("servicekeel.io/imported-services={IMPORTED:?}\n"),
        )?;
        processes.push(("client sidecar", client, client_admin));
        let mut proxies = Proxies {
            processes,
            binary,
            client_socket,
            sidecar_env: settings.sidecar_env.clone(),
            tcp: (service_ip, 9000).into(),
            udp: (service_ip, 9001).into(),
            dns: client_dns,
            dir,
            _range: range,
        };
        // Ready when the client sidecar says so (it is not while it cannot listen on an
        // imported service's address) and a request goes through.
        let started = Instant::now();
        loop {
            for (role, running, _) in &mut proxies.processes {
                if let Some(status) = running.0.try_wait()? {
                    bail!(
                        "the {role} exited ({status}){}",
                        errors_logged(proxies.dir.path())
                    );
                }
            }
            let reply = process::http_get(client_admin, "/readyz").await;
            if says_ready(&reply) && tcp_requests(proxies.tcp, 1).await.is_ok() {
                return Ok(proxies);
            }
            if started.elapsed() > Duration::from_secs(20) {
                let said = match &reply {
                    Ok(text) => format!(
                        " (its /readyz: {})",
                        text.lines().last().unwrap_or("").trim()
                    ),
                    Err(error) => format!(" (its admin server: {error})"),
                };
                bail!(
                    "the client sidecar was not ready or no flow went through the proxies after \
                     20 s{said}{}",
                    errors_logged(proxies.dir.path())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The proxies' processes by role: the router or routers, the server pod's and the client
    /// pod's sidecars.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.processes
            .iter()
            .map(|(role, running, _)| (*role, running.0.id()))
            .collect()
    }

    /// What each proxy counted of its flows and dropped datagrams (the non-zero samples of its
    /// `/metrics` whose names hold `flows` or `dropped`), and the last lines each wrote to its
    /// error output: for an error in a load through them.
    pub async fn flows_told(&self) -> String {
        let mut out = String::new();
        for (role, _, admin) in &self.processes {
            out.push_str(&format!("\n{role}:"));
            match process::http_get(*admin, "/metrics").await {
                Ok(reply) => out.push_str(&counted_flows(&reply)),
                Err(error) => out.push_str(&format!(" (its admin server: {error})")),
            }
        }
        out + &errors_logged(self.dir.path())
    }

    /// The busy-polling windows the routers counted so far (`busy_polls_total`), summed over
    /// them; `None` where no router counts them (a build from before the count).
    pub async fn busy_polls(&self) -> anyhow::Result<Option<Polls>> {
        let mut sum: Option<Polls> = None;
        for (role, _, admin) in &self.processes {
            if role.contains("router") {
                let reply = process::http_get(*admin, "/metrics")
                    .await
                    .with_context(|| format!("the {role}'s metrics"))?;
                if let Some(polls) = Polls::of_metrics(&reply) {
                    sum = Some(sum.unwrap_or_default() + polls);
                }
            }
        }
        Ok(sum)
    }

    /// The client pod's sidecar, the one the loads go through.
    pub fn client_sidecar(&self) -> u32 {
        self.processes.last().expect("the client sidecar").1.0.id()
    }

    /// Starts `count` more client sidecars (the same imports, the same router), one at a time,
    /// each timed from the moment its program runs to its `/readyz`'s first 200, then stopped.
    pub async fn sidecar_starts(&self, count: usize) -> anyhow::Result<Vec<Duration>> {
        let mut took = Vec::with_capacity(count);
        for run in 0..count {
            let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
            let launch = SidecarLaunch {
                name: &format!("starting-{run}"),
                range: "127.0.99.0/24",
                dns: SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?)),
                admin,
                socket: &self.client_socket,
                annotations: format!("servicekeel.io/imported-services={IMPORTED:?}\n"),
                env: &self.sidecar_env,
            };
            let mut sidecar = launch.start(&self.binary, self.dir.path())?;
            // From the moment it runs: the spawn returns once the program is exec'd. Started as
            // another user it is forked from this process, whose size that costs: once this
            // process had held the memory row's connections, the spawn took 1.4-1.6 ms at the
            // median, against 0.15-0.22 ms by `posix_spawn` as root. That time is the benchmark's.
            let started = Instant::now();
            loop {
                if says_ready(&process::http_get(admin, "/readyz").await) {
                    took.push(started.elapsed());
                    break;
                }
                if let Some(status) = sidecar.0.try_wait()? {
                    bail!(
                        "a starting sidecar exited ({status}){}",
                        errors_logged(self.dir.path())
                    );
                }
                ensure!(
                    started.elapsed() < Duration::from_secs(10),
                    "a starting sidecar was not ready after 10 s"
                );
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            drop(sidecar);
        }
        Ok(took)
    }

    /// CPU time of the proxies so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        self.processes
            .iter()
            .map(|(_, p, _)| cpu_of(p.0.id()))
            .sum()
    }
}

/// Busy-polling windows counted by a router (`busy_polls_total`): those that caught something
/// and those that closed with nothing, for TCP streams and for UDP flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Polls {
    /// TCP streams' windows: (caught, missed).
    pub tcp: (u64, u64),
    /// UDP flows' windows: (caught, missed).
    pub udp: (u64, u64),
}

impl Polls {
    /// Read from a router's `/metrics` answer; `None` if it has no such series.
    fn of_metrics(reply: &str) -> Option<Polls> {
        let count = |relay: &str, outcome: &str| {
            let series = format!(
                r#"servicekeel_router_busy_polls_total{{relay="{relay}",outcome="{outcome}"}} "#
            );
            reply
                .lines()
                .find_map(|line| line.strip_prefix(&series))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        Some(Polls {
            tcp: (count("tcp", "caught")?, count("tcp", "missed")?),
            udp: (count("udp", "caught")?, count("udp", "missed")?),
        })
    }

    /// What was counted between `before` and this.
    pub fn since(self, before: Polls) -> Polls {
        let less =
            |(a, b): (u64, u64), (c, d): (u64, u64)| (a.saturating_sub(c), b.saturating_sub(d));
        Polls {
            tcp: less(self.tcp, before.tcp),
            udp: less(self.udp, before.udp),
        }
    }
}

impl std::ops::Add for Polls {
    type Output = Polls;

    fn add(self, other: Polls) -> Polls {
        let plus = |(a, b): (u64, u64), (c, d): (u64, u64)| (a + c, b + d);
        Polls {
            tcp: plus(self.tcp, other.tcp),
            udp: plus(self.udp, other.udp),
        }
    }
}

/// The non-zero samples of a `/metrics` reply whose names hold `flows` or `dropped`, a line
/// each, indented.
fn counted_flows(reply: &str) -> String {
    reply
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            name.contains("flows") || name.contains("dropped")
        })
        .filter(|line| {
            line.rsplit(' ')
                .next()
                .and_then(|value| value.parse::<f64>().ok())
                .is_some_and(|value| value != 0.0)
        })
        .map(|line| format!("\n  {line}"))
        .collect()
}

/// Whether `reply`, an admin server's answer to `/readyz`, says ready (200).
fn says_ready(reply: &std::io::Result<String>) -> bool {
    reply
        .as_deref()
        .is_ok_and(|text| servicekeel_api::http::status(text) == Some(200))
}

/// The proxy image's static release binary, built first if it is not up to date; built once per
/// process, as every start of the proxies asks for it.
pub fn proxy_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(binary) = BUILT.get() {
        return Ok(binary.clone());
    }
    let binary = images::static_binaries(&[images::PROXY], images::Profile::Release)?
        .pop()
        .context("no proxy binary built")?;
    Ok(BUILT.get_or_init(|| binary).clone())
}

/// A CA of the benchmark's cluster and one router certificate it issued, shared by both routers
/// (the identity is the cluster's), as PEM files.
#[derive(Debug)]
struct RouterTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl RouterTls {
    fn create(dir: &std::path::Path) -> anyhow::Result<RouterTls> {
        std::fs::create_dir_all(dir)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bench routers");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate()?;
        let ca_pem = ca_params.self_signed(&ca_key)?.pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut params =
            rcgen::CertificateParams::new(vec![servicekeel_api::tunnel::router_identity(CLUSTER)])?;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert_pem = params.signed_by(&key, &issuer)?.pem();
        let tls = RouterTls {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        };
        std::fs::write(&tls.cert, cert_pem)?;
        std::fs::write(&tls.key, key.serialize_pem())?;
        std::fs::write(&tls.ca, ca_pem)?;
        Ok(tls)
    }

    /// The router flags that turn its links on at `listen`, with `peers` when given.
    fn args(&self, listen: SocketAddr, peers: Option<&std::path::Path>) -> Vec<String> {
        let mut args = vec![
            format!("--peer-listen={listen}"),
            format!("--tls-cert={}", self.cert.display()),
            format!("--tls-key={}", self.key.display()),
            format!("--tls-ca={}", self.ca.display()),
        ];
        if let Some(peers) = peers {
            args.push(format!("--peers={}", peers.display()));
        }
        args
    }
}

async fn wait_for(ready: impl Fn() -> bool, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while !ready() {
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "{what} did not appear"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The servers: a TCP sink that answers the byte count after the client's FIN (or echoes one
/// byte per byte when asked for requests), and a UDP echo.
///
/// They run on a thread of their own, as a server runs in a process of its own: a load's tasks
/// never share a thread with the server they load, so every round trip, direct or through the
/// proxies, ends with a wakeup on the other side, as between two processes. (Sharing the load's
/// thread, a direct UDP round trip needs no wakeup at all: 84–88k a second here, against
/// 39–42k from another thread.)
pub fn servers() -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the servers' runtime")?;
    let listener = loopback_listener(&runtime)?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.set_nonblocking(true)?;
    let socket = {
        let _on_it = runtime.enter();
        UdpSocket::from_std(socket)?
    };
    let addrs = (listener.local_addr()?, socket.local_addr()?);
    on_a_thread_of_its_own("servers", runtime, async move {
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_tcp(stream));
            }
        });
        let mut buffer = vec![0u8; 65_536];
        while let Ok((n, peer)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..n], peer).await;
        }
    })?;
    Ok(addrs)
}

/// A TCP listener on a free loopback port, its socket served by `runtime`.
pub(crate) fn loopback_listener(runtime: &tokio::runtime::Runtime) -> anyhow::Result<TcpListener> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let _on_it = runtime.enter();
    Ok(TcpListener::from_std(listener)?)
}

/// Runs `main` on `runtime`, on a thread named `name` of its own, until `main` ends: a server
/// apart from the load that reaches it, as in a process of its own.
pub(crate) fn on_a_thread_of_its_own(
    name: &str,
    runtime: tokio::runtime::Runtime,
    main: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || runtime.block_on(main))
        .with_context(|| format!("cannot start the {name} thread"))?;
    Ok(())
}

/// First byte `b'S'`: a sink (read to EOF, answer the count). Otherwise: echo, for requests.
async fn serve_tcp(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buffer = vec![0u8; 256 * 1024];
    let Ok(n) = stream.read(&mut buffer).await else {
        return;
    };
    if n == 0 {
        return;
    }
    if buffer[0] == b'S' {
        let mut total = n as u64;
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let _ = stream.write_all(&total.to_be_bytes()).await;
        return;
    }
    let mut pending = &buffer[..n];
    loop {
        if stream.write_all(pending).await.is_err() {
            return;
        }
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending = &buffer[..n],
        }
    }
}

/// Sends `bytes` through `addr` to the sink and waits for its count.
pub async fn tcp_bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<u64> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut chunk = vec![0x5au8; 256 * 1024];
    chunk[0] = b'S';
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        stream.write_all(&chunk[..n]).await?;
        chunk[0] = 0x5a;
        sent += n as u64;
    }
    stream.shutdown().await?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await?;
    let counted = u64::from_be_bytes(count);
    ensure!(
        counted == bytes,
        "the sink counted {counted} of {bytes} bytes"
    );
    Ok(bytes)
}

/// `count` new connections, each one 1-byte request and its answer, 16 at a time.
pub async fn tcp_connections(addr: SocketAddr, count: u64) -> anyhow::Result<u64> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let share = count / 16 + u64::from(worker < count % 16);
        tasks.spawn(async move {
            for _ in 0..share {
                tcp_requests(addr, 1).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(count)
}

/// One connection, `count` 64-byte requests answered in turn; returns the latencies.
pub async fn tcp_requests(addr: SocketAddr, count: u64) -> anyhow::Result<Vec<Duration>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = [b'R'; 64];
    let mut answer = [0u8; 64];
    let mut latencies = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let started = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut answer).await?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

/// Requests at a fixed `rate` per second for `count` requests on one connection.
pub async fn tcp_paced(addr: SocketAddr, count: u64, rate: u64) -> anyhow::Result<Vec<Duration>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = [b'R'; 64];
    let mut answer = [0u8; 64];
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate as u32);
    let mut latencies = Vec::with_capacity(count as usize);
    for _ in 0..count {
        ticks.tick().await;
        let started = Instant::now();
        stream.write_all(&request).await?;
        stream.read_exact(&mut answer).await?;
        latencies.push(started.elapsed());
    }
    Ok(latencies)
}

/// A UDP socket of the echo loads, with its port as each of its datagrams starts with it (read
/// once, not a `getsockname` per round trip).
struct EchoSocket {
    socket: UdpSocket,
    port: [u8; 2],
}

impl EchoSocket {
    /// A socket on a port of its own on 127.0.0.1.
    async fn bind() -> anyhow::Result<EchoSocket> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let port = socket.local_addr()?.port().to_be_bytes();
        Ok(EchoSocket { socket, port })
    }

    /// One 512-byte datagram sent to `addr` and its echo awaited; returns the round trip. A
    /// datagram not echoed within 2 s is taken as lost. Each datagram starts with this socket's
    /// port, and the echo must too: an echo of another socket's datagram (a flow carried in
    /// another's) fails the load.
    async fn round_trip(&self, addr: SocketAddr) -> anyhow::Result<Duration> {
        let mut datagram = [7u8; 512];
        datagram[..2].copy_from_slice(&self.port);
        let mut buffer = [0u8; 2048];
        let started = Instant::now();
        self.socket.send_to(&datagram, addr).await?;
        let (n, _) =
            tokio::time::timeout(Duration::from_secs(2), self.socket.recv_from(&mut buffer))
                .await
                .context("a datagram was lost")??;
        ensure!(n == datagram.len(), "short echo");
        ensure!(
            buffer[..2] == self.port,
            "the socket of port {} was sent the echo of port {}'s datagram",
            u16::from_be_bytes(self.port),
            u16::from_be_bytes([buffer[0], buffer[1]])
        );
        Ok(started.elapsed())
    }
}

/// `count` 512-byte datagrams echoed in turn from one socket; returns the latencies.
pub async fn udp_echo(addr: SocketAddr, count: u64) -> anyhow::Result<Vec<Duration>> {
    let socket = EchoSocket::bind().await?;
    let mut latencies = Vec::with_capacity(count as usize);
    for _ in 0..count {
        latencies.push(socket.round_trip(addr).await?);
    }
    Ok(latencies)
}

/// 512-byte datagrams echoed from one socket, one every `1 / rate` s, until `stop`'s sender is
/// dropped (or sends); returns the latencies. The first is echoed before `stop` is looked at,
/// and then `started` is told.
pub async fn udp_echo_paced(
    addr: SocketAddr,
    rate: u32,
    mut stop: tokio::sync::watch::Receiver<()>,
    started: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Vec<Duration>> {
    ensure!(
        rate > 0,
        "a paced flow sends at least one datagram a second"
    );
    let socket = EchoSocket::bind().await?;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    ticks.tick().await;
    let mut latencies = vec![socket.round_trip(addr).await?];
    // The other side may have given up waiting.
    let _ = started.send(()).await;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(latencies),
            _ = ticks.tick() => latencies.push(socket.round_trip(addr).await?),
        }
    }
}

/// `count` 512-byte datagrams echoed by `flows` sockets at once, each its share of them in turn
/// (so every proxy on the way holds `flows` flows, each busy); returns all of their latencies.
pub async fn udp_echo_flows(
    addr: SocketAddr,
    flows: usize,
    count: u64,
) -> anyhow::Result<Vec<Duration>> {
    ensure!(flows > 0, "at least one flow echoes");
    let share = count / flows as u64;
    let extra = count % flows as u64;
    let mut echoes = tokio::task::JoinSet::new();
    for flow in 0..flows as u64 {
        echoes.spawn(udp_echo(addr, share + u64::from(flow < extra)));
    }
    let mut latencies = Vec::with_capacity(count as usize);
    while let Some(echoed) = echoes.join_next().await {
        latencies.extend(echoed.context("a flow's echo task failed")??);
    }
    Ok(latencies)
}

/// [`udp_echo_flows`] beside `paced` flows of [`udp_echo_paced`] at `rate` each, which start
/// first (the others once each has had its first echo) and stop once the others are done;
/// returns the latencies of the first, then of the paced flows.
pub async fn udp_echo_flows_beside_paced(
    addr: SocketAddr,
    flows: usize,
    count: u64,
    paced: usize,
    rate: u32,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (stop, stopped) = tokio::sync::watch::channel(());
    let (started, mut first_echoes) = tokio::sync::mpsc::channel(paced.max(1));
    let mut beside = tokio::task::JoinSet::new();
    for _ in 0..paced {
        beside.spawn(udp_echo_paced(addr, rate, stopped.clone(), started.clone()));
    }
    drop(started);
    // One a flow; fewer where one failed first (its error comes out below).
    for _ in 0..paced {
        if first_echoes.recv().await.is_none() {
            break;
        }
    }
    let echoed = udp_echo_flows(addr, flows, count).await;
    drop(stop);
    let mut paced_latencies = Vec::new();
    while let Some(done) = beside.join_next().await {
        paced_latencies.extend(
            done.context("a paced flow's task failed")?
                .context("a paced flow")?,
        );
    }
    Ok((echoed?, paced_latencies))
}

/// `count` connections held open, each having carried one 64-byte request and its answer (so
/// every proxy on the way holds the flow).
pub async fn open_connections(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut answer = [0u8; 64];
        stream.write_all(&[b'R'; 64]).await?;
        stream.read_exact(&mut answer).await?;
        open.push(stream);
    }
    Ok(open)
}

/// Resident memory of a process, in bytes (`VmRSS`).
pub fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let rss = process::status_field(pid, "VmRSS")?;
    let kib: u64 = rss
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("VmRSS of process {pid}: {rss}"))?;
    Ok(kib * 1024)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The machine, for the report: CPU model and count, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// Where the report goes: `BENCHMARKS.md` at the top of the repository.
pub fn report_path() -> PathBuf {
    paths::repo().join("BENCHMARKS.md")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routers_polling_windows_are_read_from_its_metrics() {
        let reply = "HTTP/1.1 200 OK\r\n\r\n\
            # TYPE servicekeel_router_busy_polls counter\n\
            servicekeel_router_busy_polls_total{relay=\"udp\",outcome=\"caught\"} 5\n\
            servicekeel_router_busy_polls_total{relay=\"udp\",outcome=\"missed\"} 6\n\
            servicekeel_router_busy_polls_total{relay=\"tcp\",outcome=\"caught\"} 12\n\
            servicekeel_router_busy_polls_total{relay=\"tcp\",outcome=\"missed\"} 3\n";
        let polls = Polls::of_metrics(reply).expect("all four");
        assert_eq!(
            polls,
            Polls {
                tcp: (12, 3),
                udp: (5, 6)
            }
        );
        let earlier = Polls {
            tcp: (10, 3),
            udp: (1, 1),
        };
        assert_eq!(
            polls.since(earlier) + earlier,
            polls,
            "what was counted since, and back"
        );
        assert_eq!(
            Polls::of_metrics("servicekeel_router_peers 0\n"),
            None,
            "a build that counts none"
        );
    }

    /// The servers answer from a thread of their own: a caller that blocks its own thread on
    /// plain sockets, with no runtime of its own at all, is echoed and counted.
    #[test]
    fn the_servers_answer_from_a_thread_of_their_own() {
        use std::io::{Read, Write};
        let (tcp, udp) = servers().expect("the servers start");

        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket.send_to(b"ping", udp).expect("send");
        let mut echo = [0u8; 16];
        let (n, from) = socket.recv_from(&mut echo).expect("the echo");
        assert_eq!((&echo[..n], from), (&b"ping"[..], udp));

        let mut stream = std::net::TcpStream::connect(tcp).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(b"Sink me").expect("write");
        stream.shutdown(std::net::Shutdown::Write).expect("FIN");
        let mut count = [0u8; 8];
        stream.read_exact(&mut count).expect("the count");
        assert_eq!(u64::from_be_bytes(count), 7);
    }

    /// Proxies running at once get client ranges of their own, and a range given back is taken
    /// again. From 200, a block no proxies of the benchmark use.
    #[test]
    fn client_ranges_are_held_apart_until_given_back() {
        let first = ClientRange::take(200).expect("free");
        let second = ClientRange::take(200).expect("free");
        assert_eq!(
            (first.cidr(), second.cidr()),
            ("127.0.200.0/24".to_string(), "127.0.201.0/24".to_string())
        );
        assert_eq!(second.first(), Ipv4Addr::new(127, 0, 201, 1));
        drop(first);
        let again = ClientRange::take(200).expect("given back");
        assert_eq!(again.0, 200);
        let all: Vec<_> = (0..8)
            .map(|_| ClientRange::take(200).expect("free"))
            .collect();
        assert_eq!(all.len(), 8);
        let error = ClientRange::take(200).expect_err("ten held");
        assert!(error.to_string().contains("127.0.200.0/24"), "{error}");
    }

    #[test]
    fn the_flows_told_are_the_non_zero_samples_of_flows_and_drops() {
        let reply = "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n\
            # HELP servicekeel_flows Flows, by outcome.\n\
            # TYPE servicekeel_flows counter\n\
            servicekeel_flows_total{protocol=\"udp\",outcome=\"completed\"} 12\n\
            servicekeel_flows_total{protocol=\"udp\",outcome=\"failed\"} 0\n\
            servicekeel_udp_datagrams_dropped_total{reason=\"queue_full\"} 3\n\
            servicekeel_active_flows 2\n\
            servicekeel_dns_queries_total{outcome=\"local\"} 40\n\
            # EOF\n";
        assert_eq!(
            counted_flows(reply),
            "\n  servicekeel_flows_total{protocol=\"udp\",outcome=\"completed\"} 12\
             \n  servicekeel_udp_datagrams_dropped_total{reason=\"queue_full\"} 3\
             \n  servicekeel_active_flows 2"
        );
    }

    #[test]
    fn errors_logged_gives_the_last_lines_of_each_nonempty_error_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lines: String = (1..=7).map(|i| format!("line {i}\n")).collect();
        std::fs::write(dir.path().join("router-near.err"), lines).expect("write");
        std::fs::write(dir.path().join("client.err"), "").expect("write");
        std::fs::write(dir.path().join("client.log"), "not an error").expect("write");
        let told = errors_logged(dir.path());
        assert_eq!(
            told,
            "\nrouter-near.err:\n  line 3\n  line 4\n  line 5\n  line 6\n  line 7"
        );
    }

    #[tokio::test]
    async fn an_echo_of_another_sockets_datagram_fails_the_round_trip() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let echo = tokio::spawn(async move {
            let mut buffer = [0u8; 2048];
            // The first echoed as it came, the second as if another socket had sent it.
            for swap in [false, true] {
                let (n, peer) = server.recv_from(&mut buffer).await.expect("recv");
                if swap {
                    buffer[0] ^= 0xff;
                }
                server.send_to(&buffer[..n], peer).await.expect("send");
            }
        });
        let socket = EchoSocket::bind().await.expect("bind");
        socket.round_trip(addr).await.expect("its own echo");
        let other = socket.round_trip(addr).await.expect_err("another's echo");
        assert!(
            other.to_string().contains("was sent the echo of port"),
            "{other}"
        );
        echo.await.expect("echo");
    }

    #[tokio::test]
    async fn udp_flows_share_the_datagrams_each_from_a_socket_of_its_own() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let echo = tokio::spawn(async move {
            let mut from = std::collections::BTreeMap::<SocketAddr, u32>::new();
            let mut buffer = [0u8; 2048];
            for _ in 0..10 {
                let (n, peer) = server.recv_from(&mut buffer).await.expect("recv");
                *from.entry(peer).or_default() += 1;
                server.send_to(&buffer[..n], peer).await.expect("send");
            }
            from.into_values().collect::<Vec<_>>()
        });
        let latencies = udp_echo_flows(addr, 3, 10).await.expect("echoed");
        assert_eq!(latencies.len(), 10, "every datagram's round trip");
        let mut per_flow = echo.await.expect("echo");
        per_flow.sort();
        assert_eq!(
            per_flow,
            [3, 3, 4],
            "three sockets, one of them carrying the remainder"
        );
        let none = udp_echo_flows(addr, 0, 10).await.expect_err("no flow");
        assert!(none.to_string().contains("at least one flow"), "{none}");
    }

    /// A UDP echo server until `stop` fires; returns how many datagrams each sender sent, and
    /// the senders in the order their first datagram came.
    async fn counting_echo(
        server: UdpSocket,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) -> (std::collections::BTreeMap<SocketAddr, u32>, Vec<SocketAddr>) {
        let mut from = std::collections::BTreeMap::<SocketAddr, u32>::new();
        let mut first_seen = Vec::new();
        let mut buffer = [0u8; 2048];
        loop {
            tokio::select! {
                _ = &mut stop => return (from, first_seen),
                received = server.recv_from(&mut buffer) => {
                    let (n, peer) = received.expect("recv");
                    let count = from.entry(peer).or_default();
                    if *count == 0 {
                        first_seen.push(peer);
                    }
                    *count += 1;
                    server.send_to(&buffer[..n], peer).await.expect("send");
                }
            }
        }
    }

    #[tokio::test]
    async fn paced_flows_echo_beside_the_others_at_their_rate_until_those_are_done() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let echo = tokio::spawn(counting_echo(server, stopped));
        // One flow echoing 20 datagrams 10 ms apart, and beside it two paced flows at 1,000 a
        // second.
        let slow = async {
            let socket = EchoSocket::bind().await.expect("bind");
            for _ in 0..20 {
                socket.round_trip(addr).await.expect("echoed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let (stop_paced, stopped_paced) = tokio::sync::watch::channel(());
        let (told, _first_echoes) = tokio::sync::mpsc::channel(2);
        let paced = tokio::spawn(async move {
            let (first, second) = tokio::join!(
                udp_echo_paced(addr, 1000, stopped_paced.clone(), told.clone()),
                udp_echo_paced(addr, 1000, stopped_paced, told),
            );
            (first.expect("paced"), second.expect("paced"))
        });
        let started = Instant::now();
        slow.await;
        let elapsed = started.elapsed();
        drop(stop_paced);
        let (first, second) = paced.await.expect("paced task");
        stop.send(()).expect("echo running");
        let (per_sender, _) = echo.await.expect("echo");
        assert_eq!(per_sender.len(), 3, "three sockets: {per_sender:?}");
        let most = elapsed.as_millis() as usize + 2;
        for flow in [&first, &second] {
            assert!(
                (5..=most).contains(&flow.len()),
                "a paced flow echoed {} in {elapsed:?}: at most one per millisecond, and it went on \
                 while the other flow echoed",
                flow.len()
            );
        }
        let mut counts: Vec<usize> = per_sender.values().map(|&n| n as usize).collect();
        let mut expected = vec![20, first.len(), second.len()];
        counts.sort();
        expected.sort();
        assert_eq!(
            counts, expected,
            "each paced flow's latencies are those it echoed"
        );

        // The same through the function the benchmark calls: the paced flows' latencies apart.
        // The paced flow sends one datagram a second, so within the test it sends one or two,
        // where each of the two others sends five: the sender heard first tells which began
        // first.
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let echo = tokio::spawn(counting_echo(server, stopped));
        let (flows, paced) = udp_echo_flows_beside_paced(addr, 2, 10, 1, 1)
            .await
            .expect("echoed");
        stop.send(()).expect("echo running");
        let (per_sender, first_seen) = echo.await.expect("echo");
        assert_eq!(flows.len(), 10, "the flows' datagrams, and theirs only");
        assert!(paced.len() < 5, "one a second: {}", paced.len());
        assert_eq!(
            per_sender[&first_seen[0]] as usize,
            paced.len(),
            "the paced flow's first datagram came before the others began: {per_sender:?}, \
             first {}",
            first_seen[0]
        );
        assert_eq!(per_sender.len(), 3, "two flows and a paced one");
        assert_eq!(
            per_sender.values().sum::<u32>() as usize,
            flows.len() + paced.len(),
            "the paced flow's latencies are those it echoed"
        );
        let zero = udp_echo_paced(
            addr,
            0,
            tokio::sync::watch::channel(()).1,
            tokio::sync::mpsc::channel(1).0,
        )
        .await
        .expect_err("no rate");
        assert!(zero.to_string().contains("at least one datagram"), "{zero}");
    }
}
