//! `servicekeel-soak`: the data path under moderate, steady load for a long time, the way a
//! node carries it for days; reports failures and how the resident memory of the router and of
//! both sidecars grows (bytes per second, least squares after a warm-up).
//!
//! `cargo run --release -p servicekeel-e2e --bin servicekeel-soak -- --minutes 30`

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use servicekeel_e2e::bench::{self, Layout, Proxies};

#[derive(Debug, Parser)]
#[command(
    name = "servicekeel-soak",
    about = "ServiceKeel's data path under steady load, for long"
)]
struct Cli {
    /// How long the load runs.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// New TCP connections per second (each one 64-byte request and its answer).
    #[arg(long, default_value_t = 50)]
    connections: u64,
    /// Requests per second on one long-lived connection.
    #[arg(long, default_value_t = 200)]
    requests: u64,
    /// UDP datagrams echoed per second.
    #[arg(long, default_value_t = 50)]
    datagrams: u64,
    /// How often memory is sampled.
    #[arg(long, default_value_t = 10)]
    sample_seconds: u64,
    /// Samples before this many minutes are warm-up, left out of the growth figure.
    #[arg(long, default_value_t = 2)]
    warmup_minutes: u64,
}

#[derive(Debug, Default)]
struct Counts {
    done: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn count(&self, result: anyhow::Result<()>, what: &str) {
        match result {
            Ok(()) => self.done.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                eprintln!("{what} failed: {error:#}");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what}: {} done, {} failed",
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("servicekeel-soak: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(clean) if clean => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("servicekeel-soak: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `each` `per_second` times a second until `deadline`.
async fn paced<F, Fut>(
    per_second: u64,
    deadline: Instant,
    counts: Arc<Counts>,
    what: &'static str,
    each: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    if per_second == 0 {
        return;
    }
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / per_second as u32);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < deadline {
        ticks.tick().await;
        counts.count(each().await, what);
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let (tcp, udp) = bench::servers()?;
    let proxies = Proxies::start(tcp, udp, Layout::OneNode).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(cli.minutes * 60);
    let (connections, requests, datagrams) = (
        Arc::new(Counts::default()),
        Arc::new(Counts::default()),
        Arc::new(Counts::default()),
    );
    let mut load = tokio::task::JoinSet::new();
    let addr = proxies.tcp;
    load.spawn(paced(
        cli.connections,
        deadline,
        connections.clone(),
        "connection",
        move || async move { bench::tcp_requests(addr, 1).await.map(drop) },
    ));
    // One long-lived connection, re-opened (and counted as a failure) if it breaks.
    let (requests_per_second, counts) = (cli.requests, requests.clone());
    load.spawn(async move {
        while Instant::now() < deadline && requests_per_second > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let count = (left.as_secs_f64() * requests_per_second as f64).max(1.0) as u64;
            match bench::tcp_paced(addr, count, requests_per_second).await {
                Ok(latencies) => {
                    counts
                        .done
                        .fetch_add(latencies.len() as u64, Ordering::Relaxed);
                }
                Err(error) => counts.count(Err(error), "long-lived connection"),
            }
        }
    });
    // One UDP client (one flow) for the whole run, a datagram echoed at a time.
    let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    socket.connect(proxies.udp).await?;
    load.spawn(paced(
        cli.datagrams,
        deadline,
        datagrams.clone(),
        "datagram",
        move || {
            let socket = socket.clone();
            async move { echo_once(&socket).await }
        },
    ));

    let pids = proxies.pids();
    let mut samples: Vec<(f64, Vec<u64>)> = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_secs(cli.sample_seconds));
    while Instant::now() < deadline {
        ticks.tick().await;
        let rss = pids
            .iter()
            .map(|(_, pid)| bench::rss_of(*pid))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let t = started.elapsed().as_secs_f64();
        eprintln!(
            "{:>6.0} s  rss {}  |  {}  |  {}  |  {}",
            t,
            pids.iter()
                .zip(&rss)
                .map(|((name, _), bytes)| format!("{name} {:.1} MiB", *bytes as f64 / 1048576.0))
                .collect::<Vec<_>>()
                .join(", "),
            connections.line("connections"),
            requests.line("requests"),
            datagrams.line("datagrams"),
        );
        samples.push((t, rss));
    }
    while load.join_next().await.is_some() {}

    let warm: Vec<&(f64, Vec<u64>)> = samples
        .iter()
        .filter(|(t, _)| *t >= (cli.warmup_minutes * 60) as f64)
        .collect();
    let mut report = format!(
        "soak: {} min at {} new connections/s, {} requests/s on one connection, {} datagrams/s\n",
        cli.minutes, cli.connections, cli.requests, cli.datagrams
    );
    for (index, (name, _)) in pids.iter().enumerate() {
        let points: Vec<(f64, f64)> = warm
            .iter()
            .map(|(t, rss)| (*t, rss[index] as f64))
            .collect();
        let first = samples.first().map_or(0, |(_, rss)| rss[index]);
        let last = samples.last().map_or(0, |(_, rss)| rss[index]);
        report.push_str(&format!(
            "  {name}: RSS {:.1} MiB at start, {:.1} MiB at the end, growth after warm-up {} B/s\n",
            first as f64 / 1048576.0,
            last as f64 / 1048576.0,
            slope(&points).map_or("n/a (too few samples)".into(), |b| format!("{b:.1}")),
        ));
    }
    let failed = [&connections, &requests, &datagrams]
        .iter()
        .map(|c| c.failed.load(Ordering::Relaxed))
        .sum::<u64>();
    for (what, counts) in [
        ("connections", &connections),
        ("requests", &requests),
        ("datagrams", &datagrams),
    ] {
        report.push_str(&format!("  {}\n", counts.line(what)));
    }
    print!("{report}");
    Ok(failed == 0)
}

/// One 512-byte datagram and its echo within 2 s (a late echo of an earlier one is skipped).
async fn echo_once(socket: &tokio::net::UdpSocket) -> anyhow::Result<()> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let mut datagram = [7u8; 512];
    datagram[..8].copy_from_slice(&SEQUENCE.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    socket.send(&datagram).await?;
    let mut buffer = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buffer))
            .await
            .map_err(|_| anyhow::anyhow!("no echo within 2 s"))??;
        if buffer[..n] == datagram[..] {
            return Ok(());
        }
    }
}

/// The least-squares slope of `points` (y per unit of x), with at least three points.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let variance: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    (variance > 0.0).then(|| covariance / variance)
}
