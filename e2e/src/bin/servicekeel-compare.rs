//! `servicekeel-compare`: two builds, or two settings, of the proxies on one load of the
//! data-path benchmark. Each pair of runs starts side A's proxies, measures the load against its
//! reference (the direct path, or `dnsmasq` for DNS) and through them, stops them, then does the
//! same for side B; the side that goes first alternates from pair to pair. Every proxy starts
//! fresh for its run, so neither side inherits the other's state; with `--keep-proxies` each
//! side's proxies start once and carry all of that side's runs, as a table's rows share theirs,
//! the other side's staying up, idle, meanwhile.
//!
//! `cargo run --release -p servicekeel-e2e --bin servicekeel-compare -- --load bulk --across \
//!   --b-router-env TOKIO_WORKER_THREADS=1`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use servicekeel_e2e::bench::baselines::{self, Dnsmasq, dnsperf, measured};
use servicekeel_e2e::bench::{self, Layout, Polls, Proxies, ProxySettings, Sample, sample};

#[derive(Debug, Parser)]
#[command(
    name = "servicekeel-compare",
    about = "Two builds or settings of the proxies, pair by pair, on one benchmark load"
)]
struct Cli {
    /// The load both sides carry.
    #[arg(long, value_enum)]
    load: LoadKind,
    /// Carry a data-path load to a server on another node: the client's sidecar, its node's
    /// router, the mutual-TLS link, the server node's router (not for `dns`).
    #[arg(long)]
    across: bool,
    /// Pairs of runs (the medians are reported).
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Start each side's proxies once and run all of that side's runs through them (by default
    /// every run starts its side's proxies anew).
    #[arg(long)]
    keep_proxies: bool,
    /// With `--load udp`: this many flows echo at once, from sockets of their own, each its share
    /// of the 5,000 datagrams in turn (so the router relays as many flows at once).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    flows: u16,
    /// With `--load udp`: this many flows more, each echoing a datagram every `1 /
    /// --paced-rate` s beside the others, from before they start until they are done; their
    /// latencies are reported apart.
    #[arg(long, default_value_t = 0)]
    paced_flows: u16,
    /// Datagrams a second each of `--paced-flows` sends.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    paced_rate: u32,
    /// This many TCP connections held open through the proxies during each run, its direct
    /// part too, each having carried one 64-byte request and its answer (not for `dns`).
    #[arg(long, default_value_t = 0)]
    held: usize,
    /// Side A's proxy binary (default: the proxy image's static release build of this checkout).
    #[arg(long)]
    a_binary: Option<PathBuf>,
    /// Side B's proxy binary (default: the same as A's default).
    #[arg(long)]
    b_binary: Option<PathBuf>,
    /// KEY=VALUE added to side A's routers' environment; repeatable.
    #[arg(long, value_parser = parse_env)]
    a_router_env: Vec<(String, String)>,
    /// KEY=VALUE added to side A's sidecars' environment; repeatable.
    #[arg(long, value_parser = parse_env)]
    a_sidecar_env: Vec<(String, String)>,
    /// KEY=VALUE added to side B's routers' environment; repeatable.
    #[arg(long, value_parser = parse_env)]
    b_router_env: Vec<(String, String)>,
    /// KEY=VALUE added to side B's sidecars' environment; repeatable.
    #[arg(long, value_parser = parse_env)]
    b_sidecar_env: Vec<(String, String)>,
}

/// The loads, as `servicekeel-bench` runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LoadKind {
    /// TCP bulk, 256 MiB per run.
    Bulk,
    /// 2,000 new TCP connections, one 1-byte request each, 16 at a time.
    Connections,
    /// 1,000 64-byte requests at 1k req/s on one connection.
    Paced,
    /// 5,000 512-byte datagrams echoed one at a time (by each of `--flows` at once).
    Udp,
    /// `dnsperf` flat out for 3 s on an imported name, against `dnsmasq` answering it.
    Dns,
}

impl LoadKind {
    /// The unit of its rate and what the rate is divided by to show it; the unit CPU time is
    /// given per, and how many units of work that is.
    fn units(self) -> (&'static str, f64, &'static str, f64) {
        match self {
            LoadKind::Bulk => ("MB/s", 1e6, "MiB", 1048576.0),
            LoadKind::Connections => ("conn/s", 1.0, "conn", 1.0),
            LoadKind::Paced => ("req/s", 1.0, "req", 1.0),
            LoadKind::Udp => ("dgram/s", 1.0, "dgram", 1.0),
            LoadKind::Dns => ("q/s", 1.0, "query", 1.0),
        }
    }

    /// Whether a side is judged by its p50 against the reference (a fixed rate) rather than by
    /// its rate.
    fn judged_by_latency(self) -> bool {
        self == LoadKind::Paced
    }
}

/// `KEY=VALUE`, for an environment variable.
fn parse_env(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(format!("{key:?} is not an environment variable's name"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// What every run of a comparison carries, as its report names it.
#[derive(Debug, Clone, Copy)]
struct Plan {
    load: LoadKind,
    across: bool,
    /// Each side's proxies started once for all of its runs.
    kept: bool,
    /// UDP flows echoing at once.
    flows: usize,
    /// UDP flows echoing at a fixed rate beside them, and that rate per flow.
    paced: Option<(usize, u32)>,
    /// TCP connections held open through the proxies during each run.
    held: usize,
}

/// One side's run of a pair: its reference and itself, measured back to back.
#[derive(Debug, Clone, Copy)]
struct Run {
    reference: Sample,
    side: Sample,
    /// The paced flows' latencies beside the reference's load and beside the side's.
    paced: Option<(Sample, Sample)>,
    /// The busy-polling windows the side's routers counted during its load; `None` where
    /// they count none.
    polls: Option<Polls>,
}

impl Run {
    fn ratio(&self) -> f64 {
        self.side.rate() / self.reference.rate()
    }

    /// Microseconds the side adds to the reference's p50, p99 and p99.9.
    fn added(&self) -> (f64, f64, f64) {
        added(&self.reference, &self.side)
    }

    /// The same for the paced flows, when there are.
    fn paced_added(&self) -> Option<(f64, f64, f64)> {
        self.paced
            .as_ref()
            .map(|(reference, side)| added(reference, side))
    }
}

/// Microseconds `side`'s p50, p99 and p99.9 add to `reference`'s.
fn added(reference: &Sample, side: &Sample) -> (f64, f64, f64) {
    let us = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6);
    let added = |of: fn(&Sample) -> Option<Duration>| us(of(side)) - us(of(reference));
    (added(|s| s.p50), added(|s| s.p99), added(|s| s.p999))
}

/// The pairs' medians, and in how many pairs B did better than A.
#[derive(Debug, PartialEq)]
struct Summary {
    ratio: (f64, f64),
    /// Each side's own rate, and its CPU per unit of work in µs.
    rate: (f64, f64),
    cpu: (f64, f64),
    added_p50: (f64, f64),
    added_p99: (f64, f64),
    added_p999: (f64, f64),
    /// The paced flows' p50, p99 and p99.9 added, each side's.
    paced_added: Option<[(f64, f64); 3]>,
    b_ahead: usize,
}

fn summarize(pairs: &[(Run, Run)], by_latency: bool) -> Summary {
    let median = |f: &dyn Fn(&(Run, Run)) -> f64| {
        let mut values: Vec<f64> = pairs.iter().map(f).collect();
        bench::median(&mut values)
    };
    let b_ahead = pairs
        .iter()
        .filter(|(a, b)| match by_latency {
            true => b.added().0 < a.added().0,
            false => b.ratio() > a.ratio(),
        })
        .count();
    Summary {
        ratio: (median(&|(a, _)| a.ratio()), median(&|(_, b)| b.ratio())),
        rate: (
            median(&|(a, _)| a.side.rate()),
            median(&|(_, b)| b.side.rate()),
        ),
        cpu: (
            median(&|(a, _)| a.side.cpu_per_unit_us()),
            median(&|(_, b)| b.side.cpu_per_unit_us()),
        ),
        added_p50: (median(&|(a, _)| a.added().0), median(&|(_, b)| b.added().0)),
        added_p99: (median(&|(a, _)| a.added().1), median(&|(_, b)| b.added().1)),
        added_p999: (median(&|(a, _)| a.added().2), median(&|(_, b)| b.added().2)),
        paced_added: pairs
            .iter()
            .all(|(a, b)| a.paced.is_some() && b.paced.is_some())
            .then(|| {
                let paced = |run: &Run| run.paced_added().expect("every run has paced flows");
                [
                    (median(&|(a, _)| paced(a).0), median(&|(_, b)| paced(b).0)),
                    (median(&|(a, _)| paced(a).1), median(&|(_, b)| paced(b).1)),
                    (median(&|(a, _)| paced(a).2), median(&|(_, b)| paced(b).2)),
                ]
            }),
        b_ahead,
    }
}

fn main() -> ExitCode {
    bench::run_main("servicekeel-compare", run(Cli::parse()))
}

/// The name the client sidecar imports, as its pod's resolver asks for it.
const IMPORTED_NAME: &str = "sink.default.svc.cluster.local";

async fn run(cli: Cli) -> anyhow::Result<()> {
    let load = cli.load;
    anyhow::ensure!(
        !(cli.across && load == LoadKind::Dns),
        "--across is for the data-path loads: DNS is answered by the client's sidecar alone"
    );
    anyhow::ensure!(
        cli.flows == 1 || load == LoadKind::Udp,
        "--flows is for --load udp: the other loads carry their own number of flows"
    );
    anyhow::ensure!(
        cli.paced_flows == 0 || load == LoadKind::Udp,
        "--paced-flows is for --load udp"
    );
    anyhow::ensure!(
        cli.held == 0 || load != LoadKind::Dns,
        "--held is for the data-path loads: DNS is answered by the client's sidecar alone"
    );
    let plan = Plan {
        load,
        across: cli.across,
        kept: cli.keep_proxies,
        flows: usize::from(cli.flows),
        paced: (cli.paced_flows > 0).then_some((usize::from(cli.paced_flows), cli.paced_rate)),
        held: cli.held,
    };
    let layout = match cli.across {
        true => Layout::TwoNodes,
        false => Layout::OneNode,
    };
    let sides = [
        (
            "A",
            ProxySettings {
                binary: cli.a_binary,
                router_env: cli.a_router_env,
                sidecar_env: cli.a_sidecar_env,
            },
        ),
        (
            "B",
            ProxySettings {
                binary: cli.b_binary,
                router_env: cli.b_router_env,
                sidecar_env: cli.b_sidecar_env,
            },
        ),
    ];
    for (name, settings) in &sides {
        if let Some(binary) = &settings.binary {
            anyhow::ensure!(
                binary.is_file(),
                "side {name}'s binary {} does not exist",
                binary.display()
            );
        }
    }
    let (tcp, udp) = bench::servers()?;
    let dnsmasq = match load {
        LoadKind::Dns => {
            baselines::install()?;
            Some(Dnsmasq::start(IMPORTED_NAME, bench::SERVICE_IP).await?)
        }
        _ => None,
    };
    let start = |index: usize| {
        let (name, settings) = &sides[index];
        async move {
            Proxies::start_with(tcp, udp, layout, settings)
                .await
                .with_context(|| format!("starting side {name}'s proxies"))
        }
    };
    let mut kept = [None, None];
    if cli.keep_proxies {
        for index in [0, 1] {
            kept[index] = Some(start(index).await?);
        }
    }
    let mut pairs = Vec::new();
    for pair in 0..cli.pairs.max(1) {
        let mut runs = [None, None];
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for index in order {
            let fresh;
            let proxies = match &kept[index] {
                Some(kept) => kept,
                None => {
                    fresh = start(index).await?;
                    &fresh
                }
            };
            runs[index] = Some(match &dnsmasq {
                Some(dnsmasq) => dns_run(dnsmasq, proxies).await?,
                None => data_run(plan, tcp, udp, proxies).await?,
            });
        }
        let [Some(a), Some(b)] = runs else {
            unreachable!("both sides ran")
        };
        eprintln!(
            "pair {}: A {:.3}×, B {:.3}×",
            pair + 1,
            a.ratio(),
            b.ratio()
        );
        pairs.push((a, b));
    }
    print!("{}", render(plan, &sides, &pairs));
    Ok(())
}

/// The data-path load against the direct path, then through `proxies`.
async fn data_run(
    plan: Plan,
    tcp: SocketAddr,
    udp: SocketAddr,
    proxies: &Proxies,
) -> anyhow::Result<Run> {
    let cpu =
        &|| -> anyhow::Result<Duration> { Ok(bench::cpu_of(std::process::id())? + proxies.cpu()?) };
    // The paced flows' latencies of the last run.
    let paced = &std::cell::RefCell::new(Vec::new());
    let once = |tcp: SocketAddr, udp: SocketAddr| async move {
        match plan.load {
            LoadKind::Bulk => Ok((bench::tcp_bulk(tcp, 256 << 20).await?, Vec::new())),
            LoadKind::Connections => Ok((bench::tcp_connections(tcp, 2000).await?, Vec::new())),
            LoadKind::Paced => {
                let latencies = bench::tcp_paced(tcp, 1000, 1000).await?;
                Ok((latencies.len() as u64, latencies))
            }
            LoadKind::Udp => {
                let (latencies, beside) = match plan.paced {
                    None => (
                        bench::udp_echo_flows(udp, plan.flows, 5000).await?,
                        Vec::new(),
                    ),
                    Some((flows, rate)) => {
                        bench::udp_echo_flows_beside_paced(udp, plan.flows, 5000, flows, rate)
                            .await?
                    }
                };
                *paced.borrow_mut() = beside;
                Ok((latencies.len() as u64, latencies))
            }
            LoadKind::Dns => unreachable!("DNS is measured by dns_run"),
        }
    };
    let held = bench::open_connections(proxies.tcp, plan.held)
        .await
        .context("opening the connections held")?;
    let reference = sample(cpu, || once(tcp, udp))
        .await
        .context("the direct path")?;
    let paced_reference = paced.take();
    let polls_before = proxies.busy_polls().await?;
    let side = match sample(cpu, || once(proxies.tcp, proxies.udp)).await {
        Ok(side) => side,
        Err(error) => {
            let told = proxies.flows_told().await;
            return Err(error.context(format!("through the proxies, which told:{told}")));
        }
    };
    let polls = proxies
        .busy_polls()
        .await?
        .zip(polls_before)
        .map(|(after, before)| after.since(before));
    drop(held);
    let paced = plan.paced.map(|_| {
        (
            Sample::of_latencies(paced_reference, reference.wall),
            Sample::of_latencies(paced.take(), side.wall),
        )
    });
    Ok(Run {
        reference,
        side,
        paced,
        polls,
    })
}

/// `dnsperf` against `dnsmasq`, then against the client sidecar; CPU of the server alone.
async fn dns_run(dnsmasq: &Dnsmasq, proxies: &Proxies) -> anyhow::Result<Run> {
    let names = [IMPORTED_NAME];
    let load = baselines::Load::Flat(Duration::from_secs(3));
    let reference = measured(dnsmasq.pid(), || dnsperf(dnsmasq.addr, &names, load)).await?;
    let side = measured(proxies.client_sidecar(), || {
        dnsperf(proxies.dns, &names, load)
    })
    .await?;
    Ok(Run {
        reference,
        side,
        paced: None,
        polls: None,
    })
}

fn describe(settings: &ProxySettings) -> String {
    let binary = settings.binary.as_ref().map_or_else(
        || "the proxy image's release build of this checkout".to_string(),
        |binary| format!("`{}`", binary.display()),
    );
    let env = |env: &[(String, String)]| {
        if env.is_empty() {
            "nothing".to_string()
        } else {
            env.iter()
                .map(|(key, value)| format!("`{key}={value}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    format!(
        "{binary}; routers' environment adds {}, sidecars' adds {}",
        env(&settings.router_env),
        env(&settings.sidecar_env)
    )
}

fn render(plan: Plan, sides: &[(&str, ProxySettings); 2], pairs: &[(Run, Run)]) -> String {
    use std::fmt::Write as _;
    let load = plan.load;
    let (unit, scale, per, per_unit) = load.units();
    let reference = match load {
        LoadKind::Dns => "dnsmasq",
        _ => "direct",
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {load:?}{}{}{}{}: A against B, {} pairs, on {}\n",
        match plan.flows {
            1 => String::new(),
            flows => format!(", {flows} flows at once"),
        },
        match plan.held {
            0 => String::new(),
            held => format!(", beside {held} TCP connections held open through the proxies"),
        },
        match plan.paced {
            None => String::new(),
            Some((flows, rate)) => format!(", beside {flows} paced at {rate} dgram/s each"),
        },
        if plan.across { " across nodes" } else { "" },
        pairs.len(),
        bench::machine()
    );
    for (name, settings) in sides {
        let _ = writeln!(out, "- {name}: {}", describe(settings));
    }
    let _ = writeln!(
        out,
        "- {}",
        if plan.kept {
            "each side's proxies started once and carried all of its runs"
        } else {
            "each run started its side's proxies anew"
        }
    );
    let _ = writeln!(
        out,
        "\n| pair | {reference} | A | A/{reference} | A adds p50, p99, p99.9 µs | CPU A µs/{per} | {reference} | B | B/{reference} | B adds p50, p99, p99.9 µs | CPU B µs/{per} |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (index, (a, b)) in pairs.iter().enumerate() {
        let _ = write!(out, "| {} ", index + 1);
        for run in [a, b] {
            let added = match run.side.p50 {
                Some(_) => {
                    let (p50, p99, p999) = run.added();
                    format!("{p50:+.0}, {p99:+.0}, {p999:+.0}")
                }
                None => "—".into(),
            };
            let _ = write!(
                out,
                "| {:.0} {unit} | {:.0} {unit} | {:.3}× | {added} | {:.1} ",
                run.reference.rate() / scale,
                run.side.rate() / scale,
                run.ratio(),
                run.side.cpu_per_unit_us() * per_unit,
            );
        }
        let _ = writeln!(out, "|");
    }
    if plan.paced.is_some() {
        let _ = writeln!(
            out,
            "\n| pair | A's paced flows add p50, p99, p99.9 µs | B's paced flows add p50, p99, p99.9 µs |\n|---|---|---|"
        );
        let added = |run: &Run| {
            run.paced_added().map_or("—".into(), |(p50, p99, p999)| {
                format!("{p50:+.0}, {p99:+.0}, {p999:+.0}")
            })
        };
        for (index, (a, b)) in pairs.iter().enumerate() {
            let _ = writeln!(out, "| {} | {} | {} |", index + 1, added(a), added(b));
        }
    }
    let summary = summarize(pairs, load.judged_by_latency());
    let latencies = match pairs.first().and_then(|(a, _)| a.side.p50) {
        Some(_) => format!(
            "; p50 added A {:+.0} µs, B {:+.0} µs; p99 added A {:+.0} µs, B {:+.0} µs; p99.9 added A {:+.0} µs, B {:+.0} µs",
            summary.added_p50.0,
            summary.added_p50.1,
            summary.added_p99.0,
            summary.added_p99.1,
            summary.added_p999.0,
            summary.added_p999.1,
        ),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "\nMedians: A {:.3}× {reference}, B {:.3}×; A {:.0} {unit}, B {:.0} {unit}; CPU A {:.1}, B {:.1} µs/{per}{latencies}. B ahead (by {}) in {} of {} pairs.",
        summary.ratio.0,
        summary.ratio.1,
        summary.rate.0 / scale,
        summary.rate.1 / scale,
        summary.cpu.0 * per_unit,
        summary.cpu.1 * per_unit,
        if load.judged_by_latency() {
            "p50 added"
        } else {
            "ratio"
        },
        summary.b_ahead,
        pairs.len()
    );
    if let Some(polls) = polls_told(pairs) {
        let _ = writeln!(out, "{polls}");
    }
    if let Some([p50, p99, p999]) = summary.paced_added {
        let _ = writeln!(
            out,
            "Paced flows' medians: p50 added A {:+.0} µs, B {:+.0} µs; p99 added A {:+.0} µs, B {:+.0} µs; p99.9 added A {:+.0} µs, B {:+.0} µs.",
            p50.0, p50.1, p99.0, p99.1, p999.0, p999.1
        );
    }
    out
}

/// What each side's busy-polling windows caught over all its runs through the proxies, where
/// both sides' routers count them.
fn polls_told(pairs: &[(Run, Run)]) -> Option<String> {
    let total = |side: fn(&(Run, Run)) -> &Run| {
        pairs
            .iter()
            .try_fold(Polls::default(), |sum, pair| Some(sum + side(pair).polls?))
    };
    let (a, b) = (total(|(a, _)| a)?, total(|(_, b)| b)?);
    let caught = |(caught, missed): (u64, u64)| {
        let windows = caught + missed;
        match windows {
            0 => "none of 0".to_string(),
            _ => format!(
                "{caught} of {windows} ({:.0} %)",
                caught as f64 * 100.0 / windows as f64
            ),
        }
    };
    Some(format!(
        "Busy-polling windows caught something in the runs through the proxies (the routers' \
         `busy_polls_total`, all runs): A TCP {}, UDP {}; B TCP {}, UDP {}.",
        caught(a.tcp),
        caught(a.udp),
        caught(b.tcp),
        caught(b.udp)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_settings_are_key_equals_value() {
        assert_eq!(
            parse_env("TOKIO_WORKER_THREADS=1"),
            Ok(("TOKIO_WORKER_THREADS".into(), "1".into()))
        );
        assert_eq!(parse_env("RUST_LOG="), Ok(("RUST_LOG".into(), "".into())));
        assert_eq!(
            parse_env("A=b=c"),
            Ok(("A".into(), "b=c".into())),
            "the value may hold '='"
        );
        assert!(parse_env("TOKIO_WORKER_THREADS").is_err());
        assert!(parse_env("=1").is_err());
        assert!(parse_env("A B=1").is_err());
    }

    /// A run whose reference does `reference` units and the side `side` units in one second,
    /// with p50s of `p50s` µs.
    fn run(reference: u64, side: u64, p50s: (u64, u64)) -> Run {
        // CPU per unit is the p50 in µs, to tell the sides apart.
        let sample = |units, p50: u64| Sample {
            wall: Duration::from_secs(1),
            cpu: Duration::from_micros(units * p50),
            units,
            p50: Some(Duration::from_micros(p50)),
            p99: Some(Duration::from_micros(p50 * 2)),
            p999: Some(Duration::from_micros(p50 * 3)),
        };
        Run {
            reference: sample(reference, p50s.0),
            side: sample(side, p50s.1),
            paced: None,
            polls: None,
        }
    }

    #[test]
    fn the_summary_gives_medians_and_counts_the_pairs_b_won() {
        let pairs = [
            (run(100, 30, (10, 20)), run(100, 40, (10, 30))),
            (run(100, 35, (10, 25)), run(200, 60, (10, 15))),
            (run(100, 32, (10, 40)), run(100, 31, (10, 20))),
        ];
        let by_rate = summarize(&pairs, false);
        assert_eq!(by_rate.ratio, (0.32, 0.31));
        assert_eq!(by_rate.rate, (32.0, 40.0), "the sides' own rates");
        assert_eq!(by_rate.cpu, (25.0, 20.0), "the sides' own CPU per unit");
        assert_eq!(by_rate.b_ahead, 1, "only the first pair's B beat its A");
        assert_eq!(by_rate.added_p50, (15.0, 10.0));
        assert_eq!(by_rate.added_p99, (30.0, 20.0));
        assert_eq!(by_rate.added_p999, (45.0, 30.0));
        assert_eq!(by_rate.paced_added, None, "no paced flows");
        let by_latency = summarize(&pairs, true);
        assert_eq!(by_latency.b_ahead, 2, "B added less to p50 in two pairs");
    }

    /// `run` with paced flows whose p50s were `p50s` µs beside the reference and the side.
    fn with_paced(mut run: Run, p50s: (u64, u64)) -> Run {
        let paced = |p50: u64| Sample {
            p50: Some(Duration::from_micros(p50)),
            p99: Some(Duration::from_micros(p50 * 2)),
            p999: Some(Duration::from_micros(p50 * 3)),
            ..run.reference
        };
        run.paced = Some((paced(p50s.0), paced(p50s.1)));
        run
    }

    #[test]
    fn the_paced_flows_latencies_are_summed_up_apart() {
        let pairs = [
            (
                with_paced(run(100, 30, (10, 20)), (10, 110)),
                with_paced(run(100, 40, (10, 30)), (10, 20)),
            ),
            (
                with_paced(run(100, 35, (10, 25)), (20, 40)),
                with_paced(run(100, 60, (10, 15)), (20, 30)),
            ),
            (
                with_paced(run(100, 32, (10, 40)), (10, 50)),
                with_paced(run(100, 31, (10, 20)), (10, 60)),
            ),
        ];
        let summary = summarize(&pairs, false);
        assert_eq!(
            summary.added_p50,
            (15.0, 10.0),
            "the busy flows' own, as without paced flows"
        );
        assert_eq!(
            summary.paced_added,
            Some([(40.0, 10.0), (80.0, 20.0), (120.0, 30.0)]),
            "each side's medians of what its paced flows added"
        );
        let plan = Plan {
            paced: Some((2, 1000)),
            ..udp(true, 2)
        };
        let sides = [
            ("A", ProxySettings::default()),
            ("B", ProxySettings::default()),
        ];
        let report = render(plan, &sides, &pairs);
        assert!(
            report.starts_with(
                "# Udp, 2 flows at once, beside 2 paced at 1000 dgram/s each: A against B"
            ),
            "{report}"
        );
        assert!(
            report.contains("\n| 1 | +100, +200, +300 | +10, +20, +30 |\n"),
            "{report}"
        );
        assert!(
            report.contains(
                "Paced flows' medians: p50 added A +40 µs, B +10 µs; p99 added A +80 µs, B +20 µs; p99.9 added A +120 µs, B +30 µs."
            ),
            "{report}"
        );
        let without = report_of(udp(true, 2));
        assert!(!without.contains("paced"), "{without}");
    }

    /// The report of one pair of default sides, for `plan`.
    fn report_of(plan: Plan) -> String {
        let sides = [
            ("A", ProxySettings::default()),
            ("B", ProxySettings::default()),
        ];
        let pairs = [(run(100, 50, (10, 20)), run(100, 60, (10, 20)))];
        render(plan, &sides, &pairs)
    }

    fn udp(kept: bool, flows: usize) -> Plan {
        Plan {
            load: LoadKind::Udp,
            across: false,
            kept,
            flows,
            paced: None,
            held: 0,
        }
    }

    #[test]
    fn the_report_says_whether_each_run_started_its_proxies_anew() {
        let kept = report_of(udp(true, 1));
        assert!(kept.contains("- each side's proxies started once and carried all of its runs\n"));
        assert!(!kept.contains("anew"));
        let fresh = report_of(udp(false, 1));
        assert!(fresh.contains("- each run started its side's proxies anew\n"));
        assert!(!fresh.contains("started once"));
    }

    #[test]
    fn the_report_names_the_flows_echoing_at_once_when_more_than_one() {
        let three = report_of(udp(false, 3));
        assert!(three.starts_with("# Udp, 3 flows at once: A against B, 1 pairs, on "));
        let across = report_of(Plan {
            across: true,
            ..udp(false, 2)
        });
        assert!(across.starts_with("# Udp, 2 flows at once across nodes: A against B"));
        let one = report_of(udp(false, 1));
        assert!(one.starts_with("# Udp: A against B, 1 pairs, on "));
        assert!(!one.contains("flows"));
    }

    #[test]
    fn the_report_names_the_connections_held_open() {
        let bulk = |held| Plan {
            load: LoadKind::Bulk,
            held,
            ..udp(false, 1)
        };
        let held = report_of(bulk(1000));
        assert!(
            held.starts_with(
                "# Bulk, beside 1000 TCP connections held open through the proxies: A against B"
            ),
            "{held}"
        );
        assert!(!report_of(bulk(0)).contains("held"));
    }

    #[test]
    fn the_report_sums_each_sides_polling_windows_where_both_count_them() {
        let polled = |tcp, udp| Run {
            polls: Some(Polls { tcp, udp }),
            ..run(100, 30, (10, 20))
        };
        let pairs = [
            (polled((3, 1), (0, 0)), polled((0, 2), (5, 5))),
            (polled((4, 2), (0, 0)), polled((1, 0), (5, 0))),
        ];
        let told = polls_told(&pairs).expect("both sides count");
        assert!(
            told.ends_with(
                "A TCP 7 of 10 (70 %), UDP none of 0; B TCP 1 of 3 (33 %), UDP 10 of 15 (67 %)."
            ),
            "{told}"
        );
        let older = [(polled((3, 1), (0, 0)), run(100, 30, (10, 20)))];
        assert_eq!(polls_told(&older), None, "one side's routers count none");
    }
}
