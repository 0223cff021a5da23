//! `servicekeel-bench`: the data path through ServiceKeel next to the direct path, interleaved
//! on the same machine in the same run; prints the table and writes `BENCHMARKS.md`.
//!
//! Run it with the release build: `cargo run --release -p servicekeel-e2e --bin servicekeel-bench`.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use servicekeel_e2e::bench::baselines::SocatHops;
use servicekeel_e2e::bench::links::LinkCost;
use servicekeel_e2e::bench::pods::{ApiserverTimes, Kind, PodBench, Totals};
use servicekeel_e2e::bench::webhook::Reviews;
use servicekeel_e2e::bench::{self, Cpu, Layout, Polls, Proxies, ProxySettings, Sample, sample};

#[derive(Debug, Parser)]
#[command(
    name = "servicekeel-bench",
    about = "ServiceKeel's data path against the direct path"
)]
struct Cli {
    /// Baseline/candidate pairs per row (the median is reported).
    #[arg(long, default_value_t = 5)]
    pairs: usize,
    /// Where to write the report (default: BENCHMARKS.md at the top of the repository).
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    /// Also the pod rows, on the local cluster with a real node (root; builds Kubernetes the
    /// first time).
    #[arg(long)]
    node: bool,
}

/// Reviews per run of the webhook row.
const REVIEWS: u64 = 20_000;

/// The webhook's allocator, since its review path runs in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One row: what was measured, how the figures are shown, and the goal.
struct Row {
    what: &'static str,
    unit: &'static str,
    /// Rate per second is shown divided by this (e.g. 1e6 for MB/s).
    scale: f64,
    /// CPU is shown per this many units, named so (e.g. 1 MiB of bytes); none where the work
    /// is done by processes the benchmark does not measure (the kubelet, containerd).
    cpu_per: Option<(f64, &'static str)>,
    goal: &'static str,
    /// Whether the goal is met, from (baseline, candidate) medians of rate, p50, p99; none
    /// where no goal is set.
    met: Option<fn(&Medians) -> bool>,
    base: Vec<Sample>,
    cand: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Medians {
    rate: (f64, f64),
    p50: (f64, f64),
    p99: (f64, f64),
    cpu: (f64, f64),
}

impl Row {
    fn medians(&self) -> Medians {
        let pick = |samples: &[Sample], f: &dyn Fn(&Sample) -> f64| {
            let mut values: Vec<f64> = samples.iter().map(f).collect();
            bench::median(&mut values)
        };
        let both = |f: &dyn Fn(&Sample) -> f64| (pick(&self.base, f), pick(&self.cand, f));
        Medians {
            rate: both(&|s| s.rate()),
            p50: both(&|s| s.p50.map_or(0.0, |d| d.as_secs_f64() * 1e6)),
            p99: both(&|s| s.p99.map_or(0.0, |d| d.as_secs_f64() * 1e6)),
            cpu: both(&|s| s.cpu_per_unit_us()),
        }
    }
}

/// Baseline and candidate `pairs` times, alternating.
async fn pairs<F, Fut>(
    cpu: Cpu<'_>,
    pairs: usize,
    direct: SocketAddr,
    through: SocketAddr,
    load: F,
) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = anyhow::Result<(u64, Vec<Duration>)>>,
{
    let (mut base, mut cand) = (Vec::new(), Vec::new());
    for _ in 0..pairs {
        base.push(sample(cpu, || load(direct)).await?);
        cand.push(sample(cpu, || load(through)).await?);
    }
    Ok((base, cand))
}

/// A rate with the digits that matter: whole units from 10 up, two decimals below (a pod
/// becoming Ready every 3 s is 0.33 pods/s, not 0).
fn figure(value: f64) -> String {
    if value.abs() >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn main() -> ExitCode {
    bench::run_main("servicekeel-bench", run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (tcp, udp) = bench::servers()?;
    let proxies = Proxies::start(tcp, udp, Layout::OneNode).await?;
    let n = cli.pairs.max(1);
    const BULK: u64 = 256 << 20;
    bench::baselines::install()?;
    let socat = SocatHops::start(tcp).await?;
    let cpu = &|| -> anyhow::Result<Duration> {
        Ok(bench::cpu_of(std::process::id())? + proxies.cpu()? + socat.cpu()?)
    };
    // Memory first, while the proxies are fresh.
    let memory = memory(&proxies, OPEN_CONNECTIONS).await?;
    let starts = proxies.sidecar_starts(SIDECAR_STARTS).await?;
    let links = LinkCost::measure(&bench::proxy_binary()?, PEER_LINKS).await?;
    let mut rows = Vec::new();
    let mut polled = PollLog::start(&proxies).await?;

    let bulk = |addr| async move { Ok((bench::tcp_bulk(addr, BULK).await?, Vec::new())) };
    let paced = |addr| async move {
        let latencies = bench::tcp_paced(addr, 1000, 1000).await?;
        Ok((latencies.len() as u64, latencies))
    };
    let (base, cand) = pairs(cpu, n, tcp, proxies.tcp, bulk).await?;
    rows.push(Row {
        what: "TCP bulk throughput (256 MiB per run)",
        unit: "MB/s",
        scale: 1e6,
        cpu_per: Some((1048576.0, "MiB")),
        goal: "≥ 0.6× direct",
        met: Some(|m| m.rate.1 >= 0.6 * m.rate.0),
        base,
        cand,
    });
    polled.row("TCP bulk").await?;
    let open = bench::open_connections(proxies.tcp, OPEN_CONNECTIONS).await?;
    let (base, cand) = pairs(cpu, n, tcp, proxies.tcp, bulk).await?;
    drop(open);
    rows.push(Row {
        what: "TCP bulk throughput (256 MiB per run), beside 1000 connections held open through the proxies, each having carried one 64-byte request (without `CAP_SYS_RESOURCE` the router's pipes count against the kernel's per-user budget)",
        unit: "MB/s",
        scale: 1e6,
        cpu_per: Some((1048576.0, "MiB")),
        goal: "no goal set (what many open connections change)",
        met: None,
        base,
        cand,
    });
    polled
        .row("TCP bulk beside 1000 connections held open")
        .await?;

    let (base, cand) = pairs(cpu, n, socat.addr, proxies.tcp, bulk).await?;
    rows.push(Row {
        what: "TCP bulk throughput (256 MiB per run), baseline: `socat` doing the same two hops (TCP → Unix socket → TCP, 64 KiB buffers)",
        unit: "MB/s",
        scale: 1e6,
        cpu_per: Some((1048576.0, "MiB")),
        goal: "≥ 1.2× socat",
        met: Some(|m| m.rate.1 >= 1.2 * m.rate.0),
        base,
        cand,
    });
    polled.row("TCP bulk, the `socat` row").await?;

    let (base, cand) = pairs(cpu, n, tcp, proxies.tcp, |addr| async move {
        Ok((bench::tcp_connections(addr, 2000).await?, Vec::new()))
    })
    .await?;
    rows.push(Row {
        what: "new TCP connections (1-byte request each, 16 at a time)",
        unit: "conn/s",
        scale: 1.0,
        cpu_per: Some((1.0, "conn")),
        goal: "≥ 0.3× direct",
        met: Some(|m| m.rate.1 >= 0.3 * m.rate.0),
        base,
        cand,
    });
    polled.row("new TCP connections").await?;

    let (base, cand) = pairs(cpu, n, tcp, proxies.tcp, paced).await?;
    rows.push(Row {
        what: "64-byte requests at 1k req/s on one connection",
        unit: "req/s",
        scale: 1.0,
        cpu_per: Some((1.0, "req")),
        goal: "≤ +60 µs p50, ≤ +200 µs p99",
        met: Some(|m| m.p50.1 - m.p50.0 <= 60.0 && m.p99.1 - m.p99.0 <= 200.0),
        base,
        cand,
    });
    polled.row("64-byte requests at 1k req/s").await?;

    // The same with every thread on one CPU, where no wakeup crosses CPUs: what the relay
    // itself adds, beside what waking a thread on the other CPU costs on this machine.
    let everyone: Vec<u32> = std::iter::once(std::process::id())
        .chain(proxies.pids().into_iter().map(|(_, pid)| pid))
        .collect();
    let all = rustix::thread::sched_getaffinity(None)?;
    let mut first = rustix::thread::CpuSet::new();
    first.set(
        (0..rustix::thread::CpuSet::MAX_CPU)
            .find(|&cpu| all.is_set(cpu))
            .unwrap_or(0),
    );
    bench::pin_threads(&everyone, &first)?;
    let pinned = pairs(cpu, n, tcp, proxies.tcp, paced).await;
    bench::pin_threads(&everyone, &all)?;
    let (base, cand) = pinned?;
    rows.push(Row {
        what: "64-byte requests at 1k req/s on one connection, every thread on one CPU (the load, the servers and the proxies pinned to it)",
        unit: "req/s",
        scale: 1.0,
        cpu_per: Some((1.0, "req")),
        goal: "no goal set (what the relay adds where no wakeup crosses CPUs)",
        met: None,
        base,
        cand,
    });
    polled.row("the same, every thread on one CPU").await?;

    // The same through proxies of their own whose router runs with `--scheduling normal`: what
    // the default (`auto`, batch while a CPU idles, as here) changes.
    let normal = Proxies::start_with(
        tcp,
        udp,
        Layout::OneNode,
        &ProxySettings {
            router_env: vec![("SERVICEKEEL_ROUTER_SCHEDULING".into(), "normal".into())],
            ..ProxySettings::default()
        },
    )
    .await?;
    let normal_cpu =
        &|| -> anyhow::Result<Duration> { Ok(bench::cpu_of(std::process::id())? + normal.cpu()?) };
    let (base, cand) = pairs(normal_cpu, n, tcp, normal.tcp, paced).await?;
    drop(normal);
    rows.push(Row {
        what: "64-byte requests at 1k req/s on one connection, the router run with `--scheduling normal` (the first of these rows runs the default, `auto`)",
        unit: "req/s",
        scale: 1.0,
        cpu_per: Some((1.0, "req")),
        goal: "no goal set (what `auto` changes)",
        met: None,
        base,
        cand,
    });

    let (base, cand) = pairs(cpu, n, socat.addr, proxies.tcp, paced).await?;
    rows.push(Row {
        what: "64-byte requests at 1k req/s on one connection, baseline: `socat` doing the same two hops",
        unit: "req/s",
        scale: 1.0,
        cpu_per: Some((1.0, "req")),
        goal: "no goal set (what two plain relay hops cost)",
        met: None,
        base,
        cand,
    });
    polled.row("the same, the `socat` row").await?;

    let (base, cand) = pairs(cpu, n, udp, proxies.udp, |addr| async move {
        let latencies = bench::udp_echo(addr, 5000).await?;
        Ok((latencies.len() as u64, latencies))
    })
    .await?;
    rows.push(Row {
        what: "UDP echo, 512-byte datagrams one at a time",
        unit: "dgram/s",
        scale: 1.0,
        cpu_per: Some((1.0, "dgram")),
        goal: "≥ 0.5× direct",
        met: Some(|m| m.rate.1 >= 0.5 * m.rate.0),
        base,
        cand,
    });
    polled.row("UDP echo").await?;

    dns_rows(&mut rows, &proxies, n).await?;
    across_nodes_rows(&mut rows, n, tcp, udp, bulk).await?;

    let webhooks = bench::webhook::Webhooks::start().await?;
    let webhooks = &webhooks;
    for (kind, what, goal, met) in [
        (
            Reviews::Replicas,
            "webhook: typical pod review (a ReplicaSet's pod) over keep-alive HTTPS, 8 at a time, 20,000 per run (baseline: do-nothing axum handler, same TLS/HTTP stack; latencies server-side)",
            "≥ 0.8× baseline; p99 ≤ 1 ms",
            Some(typical_review_met as fn(&Medians) -> bool),
        ),
        (
            Reviews::FirstPods,
            "webhook: the first pod of a workload, each review another (one more imported service, never seen before: decoded and injected in full), otherwise as above",
            "no goal set (what a pod unlike any recent one costs)",
            None,
        ),
    ] {
        let (base, cand) = pairs(
            cpu,
            n,
            webhooks.baseline,
            webhooks.real,
            |addr| async move {
                // A run of about half a second: the CPU time read from `/proc` counts in 10 ms
                // ticks.
                let latencies = webhooks.reviews(addr, kind, REVIEWS).await?;
                Ok((latencies.len() as u64, latencies))
            },
        )
        .await?;
        rows.push(Row {
            what,
            unit: "reviews/s",
            scale: 1.0,
            cpu_per: Some((1.0, "review")),
            goal,
            met,
            base,
            cand,
        });
    }

    let pod_note = match cli.node {
        true => Some(pod_rows(&mut rows, n).await?),
        false => None,
    };
    let report = render(
        &rows,
        &polled.rows,
        &memory,
        &starts,
        &links,
        n,
        pod_note.as_deref(),
    );
    print!("{report}");
    let path = cli.output.unwrap_or_else(bench::report_path);
    std::fs::write(&path, report)?;
    eprintln!("written to {}", path.display());
    Ok(())
}

/// The goal of the typical review's row: 0.8× the do-nothing handler's rate, p99 ≤ 1 ms.
fn typical_review_met(m: &Medians) -> bool {
    m.rate.1 >= 0.8 * m.rate.0 && m.p99.1 <= 1000.0
}

/// Why the misses miss, from profiles, and what was changed because of them: written by hand,
/// appended to every report.
const ANALYSIS: &str = include_str!("../bench/analysis.md");

/// Connections held open for the memory figures.
const OPEN_CONNECTIONS: usize = 1000;

/// Sidecars started for the start-to-ready figures.
const SIDECAR_STARTS: usize = 20;

/// Peer links added to the first for the per-link figures.
const PEER_LINKS: usize = 100;

/// Resident memory of each proxy (bytes): idle, with `count` connections open through them, and
/// once those closed.
struct Memory {
    count: usize,
    rows: Vec<(&'static str, u64, u64, u64)>,
}

async fn memory(proxies: &Proxies, count: usize) -> anyhow::Result<Memory> {
    let rss = || -> anyhow::Result<Vec<(&'static str, u64)>> {
        proxies
            .pids()
            .into_iter()
            .map(|(role, pid)| Ok((role, bench::rss_of(pid)?)))
            .collect()
    };
    let idle = rss()?;
    let open = bench::open_connections(proxies.tcp, count).await?;
    let loaded = rss()?;
    drop(open);
    // The proxies see the closes and end the flows.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss()?;
    let rows = idle
        .iter()
        .zip(&loaded)
        .zip(&after)
        .map(|((&(role, idle), &(_, loaded)), &(_, after))| (role, idle, loaded, after))
        .collect();
    Ok(Memory { count, rows })
}

/// Bulk TCP to a server on another node: the client's sidecar, its node's router, the mutual-TLS
/// link, the server node's router; against direct, and against socat with OpenSSL on that hop.
async fn across_nodes_rows<F, Fut>(
    rows: &mut Vec<Row>,
    pairs_of: usize,
    tcp: SocketAddr,
    udp: SocketAddr,
    bulk: F,
) -> anyhow::Result<()>
where
    F: Fn(SocketAddr) -> Fut + Copy,
    Fut: Future<Output = anyhow::Result<(u64, Vec<Duration>)>>,
{
    let proxies = Proxies::start(tcp, udp, Layout::TwoNodes).await?;
    let socat = SocatHops::with_tls_hop(tcp).await?;
    let cpu = &|| -> anyhow::Result<Duration> {
        Ok(bench::cpu_of(std::process::id())? + proxies.cpu()? + socat.cpu()?)
    };
    let (base, cand) = pairs(cpu, pairs_of, tcp, proxies.tcp, bulk).await?;
    rows.push(Row {
        what: "TCP bulk throughput across nodes (256 MiB per run): client sidecar → its node's router → mutual TLS → the server node's router → server",
        unit: "MB/s",
        scale: 1e6,
        cpu_per: Some((1048576.0, "MiB")),
        goal: "≥ 0.35× direct",
        met: Some(|m| m.rate.1 >= 0.35 * m.rate.0),
        base,
        cand,
    });
    let (base, cand) = pairs(cpu, pairs_of, socat.addr, proxies.tcp, bulk).await?;
    rows.push(Row {
        what: "TCP bulk throughput across nodes (256 MiB per run), baseline: `socat` doing the same three hops, OpenSSL mutual TLS on the last (TCP → Unix socket → TLS → TCP, 64 KiB buffers)",
        unit: "MB/s",
        scale: 1e6,
        cpu_per: Some((1048576.0, "MiB")),
        goal: "≥ 1.5× socat+TLS",
        met: Some(|m| m.rate.1 >= 1.5 * m.rate.0),
        base,
        cand,
    });
    Ok(())
}

/// The name the client sidecar imports, as its pod's resolver asks for it.
const IMPORTED_NAME: &str = "sink.default.svc.cluster.local";

/// The sidecar's DNS against dnsmasq answering the same name, loaded by dnsperf.
async fn dns_rows(rows: &mut Vec<Row>, proxies: &Proxies, pairs: usize) -> anyhow::Result<()> {
    use bench::baselines::{Dnsmasq, Load, dnsperf, measured};
    let dnsmasq = Dnsmasq::start(IMPORTED_NAME, bench::SERVICE_IP).await?;
    let sidecar = proxies.client_sidecar();
    let names = [IMPORTED_NAME];
    for (load, what, goal, met) in [
        (
            Load::Flat(Duration::from_secs(3)),
            "DNS queries/s for an imported name, `dnsperf` flat out for 3 s (baseline: `dnsmasq` answering the same name); CPU of the DNS server",
            "≥ 1.5× dnsmasq qps, 0 lost",
            (|m: &Medians| m.rate.1 >= 1.5 * m.rate.0) as fn(&Medians) -> bool,
        ),
        (
            Load::Paced(10_000, Duration::from_secs(3)),
            "DNS latency for an imported name at 10k queries/s for 3 s (`dnsperf`; baseline: `dnsmasq`); CPU of the DNS server",
            "p99 ≤ 1 ms at 10k qps, 0 lost",
            |m: &Medians| m.p99.1 <= 1000.0,
        ),
    ] {
        let (mut base, mut cand) = (Vec::new(), Vec::new());
        for _ in 0..pairs {
            // A lost query fails the run: "0 lost" is part of every goal here.
            base.push(measured(dnsmasq.pid(), || dnsperf(dnsmasq.addr, &names, load)).await?);
            cand.push(measured(sidecar, || dnsperf(proxies.dns, &names, load)).await?);
        }
        rows.push(Row {
            what,
            unit: "q/s",
            scale: 1.0,
            cpu_per: Some((1.0, "query")),
            goal,
            met: Some(met),
            base,
            cand,
        });
    }
    Ok(())
}

/// Pods through the real apiserver: labelled namespace (candidate) against an unlabelled one,
/// and the pod the webhook returns sent ready-made to the unlabelled one, which splits the
/// difference into the larger pod's own cost and the call's, and to the labelled one, where the
/// webhook is called and leaves it unchanged, which splits the call into a call without a patch
/// and what the patch adds. Returns the report's note on them: the apiserver's own measures of
/// each kind's create calls, and the same exchange with the webhook made by the benchmark.
async fn pod_rows(rows: &mut Vec<Row>, pairs: usize) -> anyhow::Result<String> {
    let pods = PodBench::start().await?;
    let timed = |latencies: Vec<Duration>| {
        let wall = latencies.iter().sum();
        (latencies, wall)
    };
    // The kinds take turns, so each pair of rows below compares runs made side by side.
    let kinds = [
        Kind::Plain,
        Kind::Prefilled,
        Kind::PrefilledCalled,
        Kind::Injected,
    ];
    let mut samples: [Vec<Sample>; 4] = Default::default();
    // The apiserver's own measures of each kind's creates, read around each batch.
    let mut times = [ApiserverTimes::default(); 4];
    // The same exchanges made by this process, and the webhook's handling of them.
    let (mut direct, mut direct_handling) = (Vec::new(), Totals::default());
    for round in 0..pairs {
        for (index, kind) in kinds.into_iter().enumerate() {
            let before = pods.apiserver_times().await?;
            let (latencies, apiserver_cpu) = pods.creates(kind, POD_BATCH).await?;
            times[index] += pods.apiserver_times().await? - before;
            let (latencies, wall) = timed(latencies);
            let mut sample = Sample::of_latencies(latencies, wall);
            sample.cpu = apiserver_cpu;
            samples[index].push(sample);
        }
        let before = pods.webhook_handling().await?;
        direct.extend(pods.direct_exchanges(round, POD_BATCH).await?);
        direct_handling += pods.webhook_handling().await? - before;
    }
    let mut call_note = apiserver_note(&kinds, &samples, &times);
    direct.sort();
    let count = direct.len().max(1);
    let _ = write!(
        call_note,
        "\nThe same exchange made by the benchmark itself, {} reviews of pods not seen before \
         sent one at a time to a webhook replica at its address on the pod network, over one \
         kept-alive HTTP/1.1 connection with TLS, from the request sent to the whole answer \
         read: {:.2} ms at the median, {:.2} ms on average, of which the webhook's own handling \
         {:.3} ms on average (over {} reviews, each round's first, not timed, among them).\n",
        direct.len(),
        bench::percentile(&direct, 0.5).as_secs_f64() * 1e3,
        direct.iter().sum::<Duration>().as_secs_f64() * 1e3 / count as f64,
        direct_handling.ms_per(direct_handling.count),
        direct_handling.count,
    );
    let [plain, prefilled, called, injected] = samples;
    // Create calls, rated in pods/s, with the apiserver's CPU per pod.
    let creates = |what, goal, met, base, cand| Row {
        what,
        unit: "pods/s",
        scale: 1.0,
        cpu_per: Some((1.0, "pod")),
        goal,
        met,
        base,
        cand,
    };
    rows.push(creates(
        "pod creation through the real apiserver, one create call at a time, 20 per run, pods left Pending (baseline: unlabelled namespace, same pod); CPU of the apiserver",
        "p50 ≤ 1.2× baseline",
        Some(|m| m.p50.1 <= 1.2 * m.p50.0),
        plain.clone(),
        injected.clone(),
    ));
    rows.push(creates(
        "pod creation of the pod as the webhook leaves it (sidecar, volumes, DNS settings and annotations already in the pod sent), in an unlabelled namespace: no webhook is called (baseline: the plain pod, as above); CPU of the apiserver",
        "no goal set (what storing the larger pod costs without any call)",
        None,
        plain,
        prefilled.clone(),
    ));
    rows.push(creates(
        "pod creation with the webhook (baseline: the same injected pod sent ready-made, no call, as above); CPU of the apiserver",
        "no goal set (what the webhook's call adds)",
        None,
        prefilled.clone(),
        injected.clone(),
    ));
    rows.push(creates(
        "pod creation of the pod as the webhook leaves it, sent to the labelled namespace: the webhook is called and allows it unchanged, with no patch (baseline: the same pod, no call, as above); CPU of the apiserver",
        "no goal set (what a call without a patch adds)",
        None,
        prefilled,
        called.clone(),
    ));
    rows.push(creates(
        "pod creation with the webhook (baseline: the pod as the webhook leaves it, called and left unchanged, as above); CPU of the apiserver",
        "no goal set (what the patch and the injection add to a call)",
        None,
        called,
        injected,
    ));
    let (mut base, mut native, mut classic) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..pairs {
        for (kind, samples) in [
            (Kind::Plain, &mut base),
            (Kind::Injected, &mut native),
            (Kind::InjectedClassic, &mut classic),
        ] {
            let (latencies, wall) = timed(pods.to_ready(kind, 4).await?);
            samples.push(Sample::of_latencies(latencies, wall));
        }
    }
    for (what, cand) in [
        (
            "pod create → Ready on the real node, one at a time, 4 per run (baseline: unlabelled namespace; with the webhook the pod also starts the native sidecar, whose postStart hook returns once it is ready)",
            native,
        ),
        (
            "pod create → Ready as above, the pod asking for the classic sidecar (`servicekeel.io/sidecar-mode: classic`: the sidecar is the first app container, its postStart hook holding the next one back until it is ready; baseline: the unlabelled runs of the row above)",
            classic,
        ),
    ] {
        rows.push(Row {
            what,
            unit: "pods/s",
            scale: 1.0,
            cpu_per: None,
            goal: "no goal set",
            met: None,
            base: base.clone(),
            cand,
        });
    }
    // Last, and not worth the rows above if it fails: the report says so instead.
    match pods.cache_memory(CACHED_PODS).await {
        Ok(measured) => call_note.push_str(&measured.render()),
        Err(error) => {
            eprintln!("what the webhook and the router keep was not measured: {error:#}");
            let _ = write!(
                call_note,
                "\nWhat the webhook and the router keep of the cluster's pods was not measured \
                 in this run: {error:#}.\n"
            );
        }
    }
    pods.finish();
    Ok(call_note)
}

/// Pods of each kind added to the cluster for what the webhook and the router keep of it.
const CACHED_PODS: usize = 2000;

/// Creates per batch of the pod creation rows.
const POD_BATCH: usize = 20;

/// The apiserver's own measures of the pod creation rows' create calls, kind by kind, in ms per
/// pod on average, beside the mean the client saw: a sentence and a table.
fn apiserver_note(
    kinds: &[Kind; 4],
    samples: &[Vec<Sample>; 4],
    times: &[ApiserverTimes; 4],
) -> String {
    let mut out = String::from(
        "During the pod creation rows the apiserver measured each kind's create calls \
         (its own metrics, read around each batch; ms per pod on average, beside the mean the \
         client saw): the whole call (`apiserver_request_duration_seconds`, POST to pods), its \
         mutating admission (`apiserver_admission_step_admission_duration_seconds`, of every \
         create call during the batch, of any resource), the mutating webhook plugin in it \
         (`apiserver_admission_controller_admission_duration_seconds`: matching the webhooks' \
         rules and conditions, converting the pod, the calls), its calls to our webhook \
         (`apiserver_admission_webhook_admission_duration_seconds`: encoding the review, the \
         exchange, applying the patch, if any, and decoding the patched pod), the HTTPS \
         exchanges alone (the whole call less `apiserver_request_sli_duration_seconds`, which \
         leaves them out), and, of those, the webhook's own handling of the reviews, from the \
         body received to the answer built (`servicekeel_webhook_admission_duration_seconds`, \
         read from each replica).\n\n\
         | pod | client's mean | whole call | mutating admission | webhook plugin | calls to \
         the webhook | HTTPS exchanges | the webhook's handling | calls per pod |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for ((kind, samples), times) in kinds.iter().zip(samples).zip(times) {
        let pods: u64 = samples.iter().map(|s| s.units).sum();
        let wall: Duration = samples.iter().map(|s| s.wall).sum();
        let ms = |totals: Totals| totals.ms_per(pods);
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} |",
            kind.label(),
            wall.as_secs_f64() * 1e3 / pods.max(1) as f64,
            ms(times.creates),
            ms(times.mutating),
            ms(times.webhook_plugin),
            ms(times.calls),
            ms(times.exchanges()),
            ms(times.handling),
            times.calls.count as f64 / pods.max(1) as f64,
        );
    }
    out
}

/// `pod_note` is what the pod rows add (none when they were not run, without `--node`).
fn render(
    rows: &[Row],
    polled: &[(&str, Polls)],
    memory: &Memory,
    starts: &[Duration],
    links: &LinkCost,
    pairs: usize,
    pod_note: Option<&str>,
) -> String {
    let node = pod_note.is_some();
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Measured by `cargo run --release -p servicekeel-e2e --bin servicekeel-bench{}` on {}. \
         The baseline (direct, or the row's named alternative) and ServiceKeel (client sidecar → \
         router over its Unix socket → server, unless the row says otherwise; the proxies are the \
         static release binary the proxy image holds, the routers run as the DaemonSet runs them, \
         their own user without capabilities, and the sidecars as pods run them, user 65532 \
         without capabilities) alternate, {pairs} pairs per row; medians \
         shown. The load generator and the servers share the machine \
         with the proxies; CPU is the time spent per unit of work by this process (load and \
         servers), the proxies and the row's baseline processes, or by the one process the row \
         names (the DNS server, the apiserver).\n",
        if node { " -- --node" } else { "" },
        bench::machine()
    );
    let _ = writeln!(
        out,
        "| what | direct | through ServiceKeel | ratio | p50 direct → through | p99 direct → through | CPU per unit direct → through | goal | met |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let m = row.medians();
        let latency = |(a, b): (f64, f64)| {
            if a == 0.0 && b == 0.0 {
                "—".to_string()
            } else {
                format!("{a:.0} → {b:.0} µs ({:+.0})", b - a)
            }
        };
        let cpu = match row.cpu_per {
            Some((per, name)) => format!("{:.1} → {:.1} µs/{name}", m.cpu.0 * per, m.cpu.1 * per),
            None => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} {unit} | {} {unit} | {:.2}× | {} | {} | {} | {} | {} |",
            row.what,
            figure(m.rate.0 / row.scale),
            figure(m.rate.1 / row.scale),
            m.rate.1 / m.rate.0,
            latency(m.p50),
            latency(m.p99),
            cpu,
            row.goal,
            match row.met {
                Some(met) if met(&m) => "yes",
                Some(_) => "**no**",
                None => "—",
            },
            unit = row.unit,
        );
    }
    render_polls(&mut out, polled);
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let _ = writeln!(
        out,
        "\nResident memory (VmRSS) of each proxy, measured first, while fresh: idle, with {} \
         TCP connections open through them (each carried one 64-byte request), and 2 s after \
         they closed.\n",
        memory.count
    );
    let _ = writeln!(
        out,
        "| process | idle | {} open connections | per connection | after they closed | goal | met |",
        memory.count
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for &(role, idle, loaded, after) in &memory.rows {
        // Only the client's sidecar, the one the connections' pod runs, has a goal.
        let (goal, met) = if role == "client sidecar" {
            let met = mb(idle) <= 10.0 && mb(loaded) <= 20.0;
            (
                "≤ 10 MB idle, ≤ 20 MB at 1k",
                if met { "yes" } else { "**no**" },
            )
        } else {
            ("—", "—")
        };
        let _ = writeln!(
            out,
            "| {role} | {:.1} MB | {:.1} MB | {:.1} kB | {:.1} MB | {goal} | {met} |",
            mb(idle),
            mb(loaded),
            loaded.saturating_sub(idle) as f64 / 1e3 / memory.count as f64,
            mb(after),
        );
    }
    render_starts(&mut out, starts);
    out.push_str(&links.render());
    let _ = writeln!(
        out,
        "\nData-path latencies are observed by the client (an upper bound on the proxies' share); \
         the webhook's are taken in the server, around its whole router. {}\n",
        pod_note.unwrap_or(
            "Pod creation through the apiserver is measured with `--node` (not in this run)."
        )
    );
    out.push_str(ANALYSIS);
    out
}

/// The busy-polling windows the one-node router opened during each row through it, read from
/// its `busy_polls_total` before and after the row.
struct PollLog<'a> {
    proxies: &'a Proxies,
    /// The counts at the end of the last row; `None` where the router counts none.
    last: Option<Polls>,
    rows: Vec<(&'static str, Polls)>,
}

impl<'a> PollLog<'a> {
    async fn start(proxies: &'a Proxies) -> anyhow::Result<PollLog<'a>> {
        Ok(PollLog {
            proxies,
            last: proxies.busy_polls().await?,
            rows: Vec::new(),
        })
    }

    /// The row `what` ended: the windows opened since the last one.
    async fn row(&mut self, what: &'static str) -> anyhow::Result<()> {
        let now = self.proxies.busy_polls().await?;
        if let (Some(now), Some(last)) = (now, self.last) {
            self.rows.push((what, now.since(last)));
        }
        self.last = now;
        Ok(())
    }
}

/// The busy-polling windows of each row through the one-node router: how many it opened for
/// TCP streams and for UDP flows, and how many of them caught something.
fn render_polls(out: &mut String, polled: &[(&str, Polls)]) {
    if polled.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nBusy polling in the rows through the router on one node: the windows it opened \
         (`busy_polls_total`, read before and after each row's runs; a TCP stream's after a read \
         emptied its socket in the midst of a stream, a UDP flow's after a datagram forwarded) \
         and those that caught the next bytes or datagram before they closed.\n"
    );
    let _ = writeln!(
        out,
        "| row | TCP windows | caught | UDP windows | caught |\n|---|---|---|---|---|"
    );
    let part = |(caught, missed): (u64, u64)| match caught + missed {
        0 => "—".to_string(),
        opened => format!("{caught} ({:.1} %)", caught as f64 * 100.0 / opened as f64),
    };
    for (what, polls) in polled {
        let _ = writeln!(
            out,
            "| {what} | {} | {} | {} | {} |",
            polls.tcp.0 + polls.tcp.1,
            part(polls.tcp),
            polls.udp.0 + polls.udp.1,
            part(polls.udp),
        );
    }
}

/// The start-to-ready table: median, 90th percentile and slowest of the starts, in ms.
fn render_starts(out: &mut String, starts: &[Duration]) {
    let mut sorted = starts.to_vec();
    sorted.sort();
    let ms = |p: f64| bench::percentile(&sorted, p).as_secs_f64() * 1e3;
    let median = ms(0.5);
    // No start measured is no evidence that the goal is met.
    let met = !sorted.is_empty() && median <= 50.0;
    let _ = writeln!(
        out,
        "\nSidecar start to ready: {} more client sidecars started one at a time beside the \
         proxies above (the same binary, imports and router), each timed from the moment its \
         program runs (the spawn returns once it is exec'd) to the first 200 from its `/readyz` \
         (polled every 0.5 ms), then stopped.\n",
        sorted.len()
    );
    let _ = writeln!(out, "| starts | median | p90 | slowest | goal | met |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| {} | {:.1} ms | {:.1} ms | {:.1} ms | ≤ 50 ms median | {} |",
        sorted.len(),
        median,
        ms(0.9),
        ms(1.0),
        if met { "yes" } else { "**no**" },
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Polls, figure, render_polls, render_starts};

    #[test]
    fn each_rows_polling_windows_are_told_with_the_share_caught() {
        let mut out = String::new();
        render_polls(&mut out, &[]);
        assert_eq!(out, "", "nothing told where the router counts none");
        let polls = |tcp, udp| Polls { tcp, udp };
        render_polls(
            &mut out,
            &[
                ("TCP bulk", polls((1996, 4), (0, 0))),
                ("UDP echo", polls((0, 0), (3, 1))),
            ],
        );
        assert!(
            out.contains("| TCP bulk | 2000 | 1996 (99.8 %) | 0 | — |\n"),
            "{out}"
        );
        assert!(
            out.contains("| UDP echo | 0 | — | 4 | 3 (75.0 %) |\n"),
            "{out}"
        );
    }

    #[test]
    fn start_to_ready_is_judged_by_its_median() {
        let ms = |list: &[u64]| {
            list.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let mut out = String::new();
        render_starts(&mut out, &ms(&[5, 3, 90, 4, 4]));
        assert!(
            out.contains("| 5 | 4.0 ms | 90.0 ms | 90.0 ms | ≤ 50 ms median | yes |"),
            "{out}"
        );
        let mut out = String::new();
        render_starts(&mut out, &ms(&[60, 51, 3]));
        assert!(out.contains("| 3 | 51.0 ms |"), "{out}");
        assert!(out.ends_with("| **no** |\n"), "{out}");
        let mut out = String::new();
        render_starts(&mut out, &[]);
        assert!(
            out.ends_with("| **no** |\n"),
            "no start is not a met goal: {out}"
        );
    }

    #[test]
    fn rates_keep_their_digits_below_ten() {
        assert_eq!(figure(36446.4), "36446");
        assert_eq!(figure(10.0), "10");
        assert_eq!(figure(1.0 / 3.0), "0.33");
        assert_eq!(figure(0.998), "1.00");
    }
}
