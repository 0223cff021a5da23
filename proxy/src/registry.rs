//! The router's registry: for every flow target (service, port, protocol), the endpoints that
//! serve it and where they are. Plain values and functions; the router fills it from its
//! sources and asks it where a flow should go.
//!
//! Sources, merged on lookup:
//! - **local**: registrations of sidecars connected to this router, one set per connection,
//!   gone with it — always current, also while the API server is unreachable;
//! - **cluster**: what the router last learned about the cluster (from the API server, or from
//!   its snapshot until the API server answers).
//!
//! [`Registry::routes`] orders the endpoints: this node first, then other nodes of this
//! cluster, then other clusters; round-robin among equals, ejected endpoints last.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use servicekeel_api::TargetPort;
use servicekeel_api::tunnel::FlowTarget;
use servicekeel_api::tunnel::registration::Registration;

use crate::tunnel::server::LinkId;

/// One way in to a service: the endpoint's address and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// The node it runs on; empty when not known.
    pub node: String,
    /// Ready as far as the source knows.
    pub ready: bool,
}

/// Where this router is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Here {
    pub node: String,
    pub cluster: String,
}

/// A target and an endpoint for it, as sources report them.
pub type Entry = (FlowTarget, Endpoint);

#[derive(Debug, Default, Clone)]
pub struct Registry {
    local: BTreeMap<LinkId, Vec<Entry>>,
    cluster: HashMap<FlowTarget, BTreeSet<Endpoint>>,
    /// Both sources merged per target (local first, each address once): rebuilt when a
    /// source changes, which is rare, so that a flow's lookup is one hash probe.
    merged: HashMap<FlowTarget, Vec<Endpoint>>,
}

/// Why a registration entry was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub target: FlowTarget,
    pub reason: String,
}

impl Registry {
    /// Replaces what connection `link` registered. Entries that cannot be routed (a named
    /// target port, which only the pod spec could resolve) are left out and returned.
    pub fn register(
        &mut self,
        link: LinkId,
        registration: &Registration,
        here: &Here,
    ) -> Vec<Skipped> {
        let mut skipped = Vec::new();
        let Some(ip) = registration.pod.ip else {
            self.unlink(link);
            return skipped;
        };
        let mut entries = Vec::new();
        for endpoint in registration.endpoints() {
            match endpoint.target_port {
                TargetPort::Number(port) => entries.push((
                    endpoint.target,
                    Endpoint {
                        addr: SocketAddr::new(ip, port),
                        node: here.node.clone(),
                        ready: true,
                    },
                )),
                TargetPort::Name(name) => skipped.push(Skipped {
                    target: endpoint.target,
                    reason: format!("target port {name:?} is a name; register a number"),
                }),
            }
        }
        self.local.insert(link, entries);
        self.merge();
        skipped
    }

    /// Forgets what connection `link` registered.
    pub fn unlink(&mut self, link: LinkId) {
        if self.local.remove(&link).is_some() {
            self.merge();
        }
    }

    /// Replaces everything known about the cluster.
    pub fn set_cluster(&mut self, entries: impl IntoIterator<Item = Entry>) {
        let mut cluster: HashMap<FlowTarget, BTreeSet<Endpoint>> = HashMap::new();
        for (target, endpoint) in entries {
            cluster.entry(target).or_default().insert(endpoint);
        }
        self.cluster = cluster;
        self.merge();
    }

    fn merge(&mut self) {
        let mut merged: HashMap<FlowTarget, Vec<Endpoint>> = HashMap::new();
        let local = self.local.values().flatten().map(|(t, e)| (t, e));
        let cluster = self
            .cluster
            .iter()
            .flat_map(|(t, endpoints)| endpoints.iter().map(move |e| (t, e)));
        for (target, endpoint) in local.chain(cluster) {
            let known = merged.entry(target.clone()).or_default();
            if !known.iter().any(|e| e.addr == endpoint.addr) {
                known.push(endpoint.clone());
            }
        }
        self.merged = merged;
    }

    /// Every endpoint of `target`, local registrations first, without repeats.
    pub fn endpoints(&self, target: &FlowTarget) -> &[Endpoint] {
        self.merged.get(target).map_or(&[], Vec::as_slice)
    }

    /// Everything known, merged, for the snapshot: sorted, each (target, address) once.
    pub fn entries(&self) -> Vec<Entry> {
        let mut entries: Vec<Entry> = self
            .merged
            .iter()
            .flat_map(|(t, endpoints)| endpoints.iter().map(move |e| (t.clone(), e.clone())))
            .collect();
        entries.sort();
        entries
    }

    /// How many (target, endpoint) pairs are known.
    pub fn len(&self) -> usize {
        self.merged.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.merged.is_empty()
    }

    /// The endpoints to try for `target`, best first: ready before not ready, this node before
    /// others, then those on nodes whose link is down (`link_up` says which are up), each tier
    /// rotated by `turn` for round-robin, ejected ones after all others.
    pub fn routes(
        &self,
        target: &FlowTarget,
        here: &Here,
        turn: usize,
        ejected: &Ejections,
        link_up: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<Endpoint> {
        let endpoints = self.endpoints(target).iter().cloned();
        let tier = |e: &Endpoint| -> u8 {
            let ejected = ejected.is_ejected(e.addr, now);
            let here = e.node == here.node;
            let reachable = here || e.node.is_empty() || link_up(&e.node);
            match (ejected, reachable, e.ready, here) {
                (false, true, true, true) => 0,
                (false, true, true, false) => 1,
                (false, true, false, _) => 2,
                (false, false, _, _) => 3,
                (true, _, _, _) => 4,
            }
        };
        let mut tiers: BTreeMap<u8, Vec<Endpoint>> = BTreeMap::new();
        for endpoint in endpoints {
            tiers.entry(tier(&endpoint)).or_default().push(endpoint);
        }
        tiers
            .into_values()
            .flat_map(|mut same| {
                let len = same.len();
                same.rotate_left(turn % len);
                same
            })
            .collect()
    }
}

/// Endpoints that failed a dial recently, kept out of rotation for a while that doubles with
/// each further failure.
#[derive(Debug, Default, Clone)]
pub struct Ejections {
    by_addr: HashMap<SocketAddr, (Instant, u32)>,
}

/// First ejection period.
pub const EJECTION_BASE: Duration = Duration::from_secs(1);
/// Longest ejection period.
pub const EJECTION_MAX: Duration = Duration::from_secs(30);

impl Ejections {
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        self.by_addr
            .get(&addr)
            .is_some_and(|(until, _)| *until > now)
    }

    /// Records a failed dial; returns how long the endpoint is out.
    pub fn failed(&mut self, addr: SocketAddr, now: Instant) -> Duration {
        let failures = self.by_addr.get(&addr).map_or(0, |(_, n)| *n) + 1;
        let period = EJECTION_BASE
            .saturating_mul(1 << (failures - 1).min(5))
            .min(EJECTION_MAX);
        self.by_addr.insert(addr, (now + period, failures));
        period
    }

    /// Records a successful dial: the endpoint is back in full.
    pub fn succeeded(&mut self, addr: SocketAddr) {
        self.by_addr.remove(&addr);
    }

    /// Endpoints out of rotation now.
    pub fn count(&self, now: Instant) -> usize {
        self.by_addr
            .values()
            .filter(|(until, _)| *until > now)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use servicekeel_api::{Protocol, ServiceList};

    use super::*;

    fn here() -> Here {
        Here {
            node: "edge-1".into(),
            cluster: "cluster-a".into(),
        }
    }

    fn web() -> FlowTarget {
        FlowTarget::new("web", "default", "cluster-a", 80, Protocol::Tcp)
    }

    fn endpoint(addr: &str, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            node: node.into(),
            ready,
        }
    }

    fn registration(pod: &str, exported: &str) -> Registration {
        Registration::new(
            pod.parse().unwrap(),
            &ServiceList::parse(exported).unwrap(),
            "cluster-a",
        )
    }

    #[test]
    fn registrations_last_as_long_as_their_connection() {
        let mut registry = Registry::default();
        let skipped = registry.register(
            LinkId(1),
            &registration(
                "default/web-0@10.244.1.7",
                "services: [{name: web, ports: [{port: 80, targetPort: 8080}, {port: 443, targetPort: https}]}]",
            ),
            &here(),
        );
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.contains("\"https\" is a name"));
        assert_eq!(
            registry.endpoints(&web()),
            [endpoint("10.244.1.7:8080", "edge-1", true)]
        );
        // A new registration on the same connection replaces the old one.
        registry.register(
            LinkId(1),
            &registration(
                "default/web-0@10.244.1.7",
                "services: [{name: api, ports: [{port: 9}]}]",
            ),
            &here(),
        );
        assert!(registry.endpoints(&web()).is_empty());
        assert_eq!(registry.len(), 1);
        registry.unlink(LinkId(1));
        assert!(registry.is_empty());
    }

    #[test]
    fn sources_merge_without_repeats() {
        let mut registry = Registry::default();
        registry.register(
            LinkId(1),
            &registration(
                "default/web-0@10.244.1.7",
                "services: [{name: web, ports: [{port: 80, targetPort: 8080}]}]",
            ),
            &here(),
        );
        registry.set_cluster([
            (web(), endpoint("10.244.1.7:8080", "edge-1", false)),
            (web(), endpoint("10.244.2.9:8080", "edge-2", true)),
        ]);
        assert_eq!(
            registry.endpoints(&web()),
            [
                endpoint("10.244.1.7:8080", "edge-1", true),
                endpoint("10.244.2.9:8080", "edge-2", true)
            ],
            "the sidecar's own word wins for its address"
        );
        assert_eq!(registry.entries().len(), 2);
    }

    #[test]
    fn routes_prefer_this_node_then_ready_then_linked_then_not_ejected_and_rotate() {
        let mut registry = Registry::default();
        registry.set_cluster([
            (web(), endpoint("10.0.0.1:80", "edge-2", true)),
            (web(), endpoint("10.0.0.2:80", "edge-1", true)),
            (web(), endpoint("10.0.0.3:80", "edge-1", true)),
            (web(), endpoint("10.0.0.4:80", "edge-3", false)),
            (web(), endpoint("10.0.0.5:80", "edge-3", true)),
        ]);
        let now = Instant::now();
        let none = Ejections::default();
        let all_up = |_: &str| true;
        let order_with = |turn, ejections: &Ejections, link_up: &dyn Fn(&str) -> bool| {
            registry
                .routes(&web(), &here(), turn, ejections, link_up, now)
                .iter()
                .map(|e| e.addr.ip().to_string())
                .collect::<Vec<String>>()
        };
        let order = |turn, ejections: &Ejections| order_with(turn, ejections, &all_up);
        assert_eq!(
            order(0, &none),
            ["10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.5", "10.0.0.4"]
        );
        assert_eq!(
            order(1, &none),
            ["10.0.0.3", "10.0.0.2", "10.0.0.5", "10.0.0.1", "10.0.0.4"]
        );
        let mut ejections = Ejections::default();
        assert_eq!(
            ejections.failed("10.0.0.2:80".parse().unwrap(), now),
            EJECTION_BASE
        );
        assert_eq!(
            order(0, &ejections),
            ["10.0.0.3", "10.0.0.1", "10.0.0.5", "10.0.0.4", "10.0.0.2"]
        );
        // edge-2's link is down: its endpoint goes after those of nodes that are linked, even
        // those not ready, but before the ejected; this node needs no link.
        let edge_2_down = |node: &str| node != "edge-2";
        assert_eq!(
            order_with(0, &none, &edge_2_down),
            ["10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.4", "10.0.0.1"]
        );
        assert_eq!(
            order_with(0, &ejections, &|node: &str| node == "edge-1"),
            ["10.0.0.3", "10.0.0.1", "10.0.0.4", "10.0.0.5", "10.0.0.2"],
            "ready or not, all unlinked ones alike, and the ejected after them"
        );
        assert_eq!(ejections.count(now), 1);
        assert_eq!(
            ejections.count(now + EJECTION_BASE),
            0,
            "back after the period"
        );
    }

    #[test]
    fn ejection_periods_double_up_to_a_limit_and_reset_on_success() {
        let mut ejections = Ejections::default();
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let now = Instant::now();
        let periods: Vec<u64> = (0..8)
            .map(|_| ejections.failed(addr, now).as_secs())
            .collect();
        assert_eq!(periods, [1, 2, 4, 8, 16, 30, 30, 30]);
        ejections.succeeded(addr);
        assert!(!ejections.is_ejected(addr, now));
        assert_eq!(ejections.failed(addr, now), EJECTION_BASE);
    }
}
