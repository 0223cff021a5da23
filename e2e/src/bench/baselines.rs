//! The baselines users would pick instead of ServiceKeel, run on the same machine in the same
//! run: `socat` doing the sidecar's and the router's two hops (TCP → Unix socket → TCP), and
//! `dnsmasq` answering the names the sidecar answers, both loaded by the same clients; `dnsperf`
//! loads both DNS servers. All come from Debian's packages (`e2e/bench/install.sh`).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::{RouterTls, Running, Sample, cpu_of, wait_for};
use crate::{paths, process};

/// Installs what is missing (`e2e/bench/install.sh`; root, Debian's packages).
pub fn install() -> anyhow::Result<()> {
    let script = paths::repo().join("e2e/bench/install.sh");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    ensure!(status.success(), "{} failed ({status})", script.display());
    Ok(())
}

/// Two `socat`s in a row, the way the sidecar and the router carry a flow: one takes TCP
/// connections and carries each over a Unix socket, the other takes those and connects to the
/// server over TCP. Each forks a process per connection, as socat does. With a TLS hop, a third
/// stands for the other node's router: the second carries the flow to it over mutual TLS
/// (OpenSSL, the routers' certificates), and it connects to the server.
#[derive(Debug)]
pub struct SocatHops {
    processes: Vec<Running>,
    /// Where clients connect.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl SocatHops {
    pub async fn start(server: SocketAddr) -> anyhow::Result<SocatHops> {
        Self::start_with(server, false).await
    }

    /// Three hops, the last two over mutual TLS with certificates like the routers'.
    pub async fn with_tls_hop(server: SocketAddr) -> anyhow::Result<SocatHops> {
        Self::start_with(server, true).await
    }

    async fn start_with(server: SocketAddr, with_tls: bool) -> anyhow::Result<SocatHops> {
        let dir = tempfile::tempdir()?;
        let tls = match with_tls {
            true => Some(RouterTls::create(&dir.path().join("tls"))?),
            false => None,
        };
        let socket = dir.path().join("hop.sock");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
        let mut processes = Vec::new();
        let towards_server = match &tls {
            None => format!("TCP:{server},nodelay"),
            Some(tls) => {
                let port = process::free_port()?;
                let certs = format!(
                    "cert={},key={},cafile={},verify=1",
                    tls.cert.display(),
                    tls.key.display(),
                    tls.ca.display()
                );
                processes.push(socat(&[
                    &format!("OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay,{certs}"),
                    &format!("TCP:{server},nodelay"),
                ])?);
                wait_for(
                    || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                    "socat's TLS port",
                )
                .await?;
                format!(
                    "OPENSSL:127.0.0.1:{port},nodelay,{certs},commonname={}",
                    servicekeel_api::tunnel::router_identity(super::CLUSTER)
                )
            }
        };
        // 64 KiB copy buffers, as the sidecar's and router's largest reads.
        processes.push(socat(&[
            &format!("UNIX-LISTEN:{},fork", socket.display()),
            &towards_server,
        ])?);
        wait_for(|| socket.exists(), "socat's Unix socket").await?;
        let near = socat(&[
            &format!(
                "TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,nodelay",
                addr.port()
            ),
            &format!("UNIX-CONNECT:{}", socket.display()),
        ])?;
        processes.push(near);
        let hops = SocatHops {
            processes,
            addr,
            _dir: dir,
        };
        wait_for(
            || std::net::TcpStream::connect(addr).is_ok(),
            "socat's TCP port",
        )
        .await?;
        Ok(hops)
    }

    /// CPU time of the socats and the per-connection processes they forked and reaped. First
    /// waits (a second at most) for those of the last run to exit and be reaped: a process's
    /// time joins its parent's only then, and would otherwise count in whatever run comes next.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.forked_alive()? && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.processes
            .iter()
            .map(|p| super::cpu_with_children_of(p.0.id()))
            .sum()
    }

    /// Whether a per-connection process is running or waits to be reaped.
    fn forked_alive(&self) -> anyhow::Result<bool> {
        for process in &self.processes {
            let pid = process.0.id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .with_context(|| format!("cannot read the children of socat {pid}"))?;
            if !children.trim().is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn socat(addresses: &[&str]) -> anyhow::Result<Running> {
    let child = Command::new("socat")
        .args(["-b", "65536"])
        .args(addresses)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start socat (e2e/bench/install.sh installs it)")?;
    Ok(Running(child))
}

/// `dnsmasq` answering `name` with `ip`, nothing else, on a loopback port.
#[derive(Debug)]
pub struct Dnsmasq {
    process: Running,
    pub addr: SocketAddr,
}

impl Dnsmasq {
    pub async fn start(name: &str, ip: Ipv4Addr) -> anyhow::Result<Dnsmasq> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file=",
                "--user=root",
            ])
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--host-record={name},{ip}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dnsmasq (e2e/bench/install.sh installs it)")?;
        let dnsmasq = Dnsmasq {
            process: Running(child),
            addr,
        };
        // Ready when it answers.
        let mut last = None;
        for _ in 0..100 {
            match dnsperf(dnsmasq.addr, &[name], Load::Count(1)).await {
                Ok(run) if run.completed == 1 => return Ok(dnsmasq),
                Ok(run) => last = Some(format!("{run:?}")),
                Err(error) => last = Some(format!("{error:#}")),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("dnsmasq did not answer: {}", last.unwrap_or_default())
    }

    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

/// How `dnsperf` loads a server.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// As fast as it can for this long.
    Flat(Duration),
    /// At this many queries per second for this long, each query's latency reported.
    Paced(u64, Duration),
    /// This many queries, one at a time.
    Count(u64),
}

/// What a `dnsperf` run counted.
#[derive(Debug, Default)]
pub struct DnsperfRun {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub wall: Duration,
    /// One per answered query, for [`Load::Paced`].
    pub latencies: Vec<Duration>,
}

impl DnsperfRun {
    /// As a sample: queries completed, their latencies, and `cpu` spent serving them.
    pub fn sample(self, cpu: Duration) -> Sample {
        Sample {
            cpu,
            units: self.completed,
            ..Sample::of_latencies(self.latencies, self.wall)
        }
    }
}

/// Runs `dnsperf` against `server`, querying the A records of `names` in turn.
pub async fn dnsperf(server: SocketAddr, names: &[&str], load: Load) -> anyhow::Result<DnsperfRun> {
    let dir = tempfile::tempdir()?;
    let queries = dir.path().join("queries");
    let lines: String = names.iter().map(|name| format!("{name} A\n")).collect();
    std::fs::write(&queries, lines)?;
    let mut command = Command::new("dnsperf");
    command
        .args([
            "-s",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
        ])
        .arg("-d")
        .arg(&queries)
        .args(["-t", "2"]);
    match load {
        Load::Flat(time) => command.args(["-l", &time.as_secs().to_string()]),
        Load::Paced(rate, time) => {
            command
                .args(["-l", &time.as_secs().to_string()])
                .args(["-Q", &rate.to_string(), "-v"])
        }
        Load::Count(count) => command.args(["-q", "1", "-n", &count.to_string()]),
    };
    let output = tokio::task::spawn_blocking(move || command.output())
        .await?
        .context("cannot run dnsperf (e2e/bench/install.sh installs it)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "dnsperf failed ({}): {}{}",
        output.status,
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    parse(&text)
}

/// Reads `dnsperf`'s statistics and, with `-v`, each query's latency (`> NOERROR name A 0.000123`).
fn parse(text: &str) -> anyhow::Result<DnsperfRun> {
    let mut run = DnsperfRun::default();
    let first_number = |rest: &str| -> anyhow::Result<f64> {
        let word = rest.split_whitespace().next().context("no figure")?;
        Ok(word.parse()?)
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Queries sent:") {
            run.sent = first_number(rest)? as u64;
        } else if let Some(rest) = line.strip_prefix("Queries completed:") {
            run.completed = first_number(rest)? as u64;
        } else if let Some(rest) = line.strip_prefix("Queries lost:") {
            run.lost = first_number(rest)? as u64;
        } else if let Some(rest) = line.strip_prefix("Run time (s):") {
            run.wall = Duration::from_secs_f64(first_number(rest)?);
        } else if let Some(rest) = line.strip_prefix("> ") {
            let seconds: f64 = rest
                .rsplit(' ')
                .next()
                .context("a query line without its latency")?
                .parse()
                .with_context(|| format!("unexpected query line {line:?}"))?;
            run.latencies.push(Duration::from_secs_f64(seconds));
        }
    }
    ensure!(run.sent > 0, "dnsperf sent nothing:\n{text}");
    Ok(run)
}

/// The CPU a DNS server spends while `run` loads it.
pub async fn measured<F, Fut>(pid: u32, run: F) -> anyhow::Result<Sample>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<DnsperfRun>>,
{
    let before = cpu_of(pid)?;
    let done = run().await?;
    let cpu = cpu_of(pid)?.saturating_sub(before);
    ensure!(
        done.lost == 0,
        "{} of {} queries lost",
        done.lost,
        done.sent
    );
    Ok(done.sample(cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsperf_statistics_and_query_lines_are_read() {
        let text = "\
> NOERROR sink.default.svc.cluster.local A 0.000182
> NOERROR sink.default.svc.cluster.local A 0.000076

Statistics:

  Queries sent:         2
  Queries completed:    2 (100.00%)
  Queries lost:         0 (0.00%)

  Run time (s):         1.000176
  Queries per second:   1.999648
";
        let run = parse(text).unwrap();
        assert_eq!((run.sent, run.completed, run.lost), (2, 2, 0));
        assert_eq!(run.wall, Duration::from_secs_f64(1.000176));
        assert_eq!(
            run.latencies,
            [Duration::from_micros(182), Duration::from_micros(76)]
        );
        assert!(parse("Statistics:\n").is_err());
    }
}
