//! What a router keeps for each link to a peer router: two routers of the proxy image's binary
//! (the debug build the tests use) on loopback, one dialling the other 1 and then 101 times, as
//! `servicekeel-bench` measures the release build.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use servicekeel_e2e::bench::links::LinkCost;
use servicekeel_e2e::images;

/// Links added to the first.
const LINKS: usize = 100;

/// The most a link may keep on either router. Measured: about 36 kB on the dialling router and
/// 31 kB on the accepting one with the release build, 35–39 and 31–32 kB with the debug build.
const MOST_PER_LINK: f64 = 100e3;

/// The least: a TLS session and an HTTP/2 connection take more than this, so less says the
/// links were not measured.
const LEAST_PER_LINK: f64 = 5e3;

#[tokio::test]
async fn a_router_keeps_some_tens_of_kilobytes_for_each_peer_link() {
    let binary = images::static_binaries(&[images::PROXY], images::Profile::Debug)
        .unwrap()
        .pop()
        .unwrap();
    let cost = LinkCost::measure(&binary, LINKS).await.unwrap();
    let table = cost.render();
    eprintln!("{table}");
    for (role, bytes) in cost.bytes_per_link() {
        assert!(
            (LEAST_PER_LINK..=MOST_PER_LINK).contains(&bytes),
            "the {role} router kept {:.1} kB per link, not between {:.0} and {:.0} kB:\n{table}",
            bytes / 1e3,
            LEAST_PER_LINK / 1e3,
            MOST_PER_LINK / 1e3,
        );
    }
}
