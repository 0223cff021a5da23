//! What a router keeps for each link to a peer router.
//!
//! Every router dials the router of every other node and is dialled by each of them, so in a
//! cluster of `n` nodes each router holds `2 (n - 1)` links, each a TLS session and an HTTP/2
//! connection pinged every second. Measured between two routers on loopback: one dials the
//! other as many times as the peers file names nodes (all at the other's address), the other
//! takes every link. The pair is started twice, with one link and with one more than the count
//! asked, so what every router has whatever its links (its runtime, its TLS configuration, the
//! first link's share) stays out of the difference.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::{RouterTls, cpu_of, peers_file, rss_of, start_router};
use crate::{process, webhook};

/// How long the links are left, once all are up, before the routers' idle CPU is read; their
/// memory is read at the end of that read, [`IDLE`] later.
const SETTLE: Duration = Duration::from_secs(10);
/// How long the routers' CPU is read while their links stand idle.
const IDLE: Duration = Duration::from_secs(20);
/// How long the dialling router may take to have every link up.
const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// The dialling router's gauge of its links that are up.
const PEERS_UP: &str = "servicekeel_router_peers_up";

/// The two routers' memory and idle CPU with one link and with `1 + links`.
#[derive(Debug, Clone)]
pub struct LinkCost {
    /// The links added to the first.
    pub links: usize,
    /// With one link, then with `1 + links`.
    pub dialling: [Reading; 2],
    pub accepting: [Reading; 2],
}

/// One router's resident memory once its links settled, and its CPU while they stood idle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub rss: u64,
    pub idle_cpu: Duration,
}

impl Reading {
    /// What each of `links` links added from `one` to `many`: bytes, and the share of a core
    /// spent while idle.
    fn per_link(one: Reading, many: Reading, links: usize) -> (f64, f64) {
        let links = links.max(1) as f64;
        let bytes = many.rss as f64 - one.rss as f64;
        let cpu = many.idle_cpu.as_secs_f64() - one.idle_cpu.as_secs_f64();
        (bytes / links, cpu / IDLE.as_secs_f64() / links)
    }
}

impl LinkCost {
    /// Measures the routers of `binary` with one link, then with `1 + links`.
    pub async fn measure(binary: &Path, links: usize) -> anyhow::Result<LinkCost> {
        let one = pair(binary, 1).await.context("with one link")?;
        let many = pair(binary, 1 + links)
            .await
            .with_context(|| format!("with {} links", 1 + links))?;
        Ok(LinkCost {
            links,
            dialling: [one.0, many.0],
            accepting: [one.1, many.1],
        })
    }

    /// Each router by its role, with its two readings.
    pub fn routers(&self) -> [(&'static str, [Reading; 2]); 2] {
        [("dialling", self.dialling), ("accepting", self.accepting)]
    }

    /// The bytes each added link kept on each router, by its role.
    pub fn bytes_per_link(&self) -> [(&'static str, f64); 2] {
        self.routers()
            .map(|(role, [one, many])| (role, Reading::per_link(one, many, self.links).0))
    }

    /// The report's table, with a sentence on how it was measured.
    pub fn render(&self) -> String {
        let mb = |bytes: u64| bytes as f64 / 1e6;
        let total = 1 + self.links;
        let mut out = format!(
            "\nWhat a router keeps for each link to a peer router: in a cluster of n nodes each \
             router dials n − 1 links and takes n − 1. Two routers on loopback, one dialling the \
             other once per node its peers file names (all at the other's address), were started \
             with 1 link and again with {total}; CPU read over {idle} s from {settle} s after every \
             link was up, while the links stood idle but for their pings (the dialling router's, \
             one a second on each link, each answered), and resident memory (VmRSS) at the end \
             of it.\n\n\
             | router | 1 link | {total} links | per link | idle CPU per 100 links |\n\
             |---|---|---|---|---|\n",
            settle = SETTLE.as_secs(),
            idle = IDLE.as_secs(),
        );
        for (role, [one, many]) in self.routers() {
            let (bytes, cpu) = Reading::per_link(one, many, self.links);
            out.push_str(&format!(
                "| {role} | {:.1} MB | {:.1} MB | {:.1} kB | {:.2} % of a core |\n",
                mb(one.rss),
                mb(many.rss),
                bytes / 1e3,
                cpu * 100.0 * 100.0,
            ));
        }
        out
    }
}

/// Starts two routers of `binary`, the first dialling the second `links` times; returns the
/// dialling one's reading, then the accepting one's.
async fn pair(binary: &Path, links: usize) -> anyhow::Result<(Reading, Reading)> {
    let dir = tempfile::tempdir()?;
    let tls = RouterTls::create(&dir.path().join("tls"))?;
    let far_peer = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
    let (accepting, _, _) =
        start_router(binary, dir.path(), "far", &tls.args(far_peer, None), &[])?;
    let peers = peers_file(
        dir.path(),
        (0..links).map(|index| (format!("peer-{index}"), far_peer)),
    )?;
    let near_peer = SocketAddr::from((Ipv4Addr::LOCALHOST, process::free_port()?));
    let (dialling, _, admin) = start_router(
        binary,
        dir.path(),
        "near",
        &tls.args(near_peer, Some(&peers)),
        &[],
    )?;
    process::poll_until(&format!("{links} links up"), UP_TIMEOUT, || async move {
        // Until its admin server listens, the router answers nothing.
        let up = process::http_get(admin, "/metrics")
            .await
            .ok()
            .and_then(|metrics| webhook::counter(&metrics, PEERS_UP));
        Ok((up == Some(links as u64)).then_some(()))
    })
    .await?;
    tokio::time::sleep(SETTLE).await;
    let pids = [dialling.0.id(), accepting.0.id()];
    let before = [cpu_of(pids[0])?, cpu_of(pids[1])?];
    tokio::time::sleep(IDLE).await;
    let reading = |side: usize| -> anyhow::Result<Reading> {
        Ok(Reading {
            rss: rss_of(pids[side])?,
            idle_cpu: cpu_of(pids[side])?.saturating_sub(before[side]),
        })
    };
    Ok((reading(0)?, reading(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_link_is_given_its_share_of_what_was_added() {
        let one = Reading {
            rss: 10_000_000,
            idle_cpu: Duration::from_millis(10),
        };
        let many = Reading {
            rss: 15_000_000,
            idle_cpu: Duration::from_millis(60),
        };
        let (bytes, cpu) = Reading::per_link(one, many, 100);
        assert_eq!(bytes, 50_000.0);
        // 50 ms over the 20 s idle, shared by 100 links.
        assert!((cpu - 0.000025).abs() < 1e-12, "{cpu}");
        let shrunk = Reading::per_link(many, one, 100);
        assert_eq!(shrunk.0, -50_000.0, "memory given back reads as less");
    }

    #[test]
    fn the_table_has_both_routers_and_the_counts_measured() {
        let reading = |mb: u64, ms: u64| Reading {
            rss: mb * 1_000_000,
            idle_cpu: Duration::from_millis(ms),
        };
        let cost = LinkCost {
            links: 100,
            dialling: [reading(10, 0), reading(15, 50)],
            accepting: [reading(10, 0), reading(13, 40)],
        };
        let table = cost.render();
        assert!(table.contains("| router | 1 link | 101 links |"), "{table}");
        assert!(
            table.contains("| dialling | 10.0 MB | 15.0 MB | 50.0 kB | 0.25 % of a core |"),
            "{table}"
        );
        assert!(
            table.contains("| accepting | 10.0 MB | 13.0 MB | 30.0 kB | 0.20 % of a core |"),
            "{table}"
        );
    }
}
