//! Local addresses for imported services, from `SIDECAR_IP_RANGE`.
//!
//! - Deterministic: a given set, placed into an empty allocator, always gets the same
//!   addresses (sorted by service, lowest address first).
//! - Stable: a service keeps its address for as long as the process lives and imports it.
//! - Safe to reuse: the address of a removed service is not handed to another service while
//!   connections to it are still open; if the service comes back meanwhile, it gets it back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use servicekeel_api::ServiceKey;
use servicekeel_api::addresses::LocalRange;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{wanted} imported services need addresses but {range} has {capacity}, {held} of them still \
     held by removed services with open connections"
)]
pub struct Exhausted {
    pub wanted: usize,
    pub range: LocalRange,
    pub capacity: usize,
    pub held: usize,
}

/// What an update changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<(ServiceKey, Ipv4Addr)>,
    pub removed: Vec<(ServiceKey, Ipv4Addr)>,
}

#[derive(Debug, Clone)]
pub struct Allocator {
    range: LocalRange,
    current: BTreeMap<ServiceKey, Ipv4Addr>,
    /// Addresses of removed services that may still have open connections.
    retired: BTreeMap<Ipv4Addr, ServiceKey>,
}

impl Allocator {
    pub fn new(range: LocalRange) -> Self {
        Allocator {
            range,
            current: BTreeMap::new(),
            retired: BTreeMap::new(),
        }
    }

    /// Makes `services` the imported set. `in_use` tells whether connections to an address are
    /// still open. On error nothing changes: the last good set stays in force.
    pub fn update(
        &mut self,
        services: impl IntoIterator<Item = ServiceKey>,
        in_use: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Changes, Exhausted> {
        let wanted: BTreeSet<ServiceKey> = services.into_iter().collect();
        let mut changes = Changes::default();
        let mut next: BTreeMap<ServiceKey, Ipv4Addr> = BTreeMap::new();
        let mut retired = self.retired.clone();
        for (key, ip) in &self.current {
            if wanted.contains(key) {
                next.insert(key.clone(), *ip);
            } else {
                changes.removed.push((key.clone(), *ip));
                retired.insert(*ip, key.clone());
            }
        }
        retired.retain(|ip, key| in_use(*ip) || wanted.contains(key));

        let missing: Vec<ServiceKey> = wanted
            .iter()
            .filter(|key| !next.contains_key(*key))
            .cloned()
            .collect();
        // A service that comes back before its old address was freed gets it back.
        let mut unplaced = Vec::new();
        for key in missing {
            match retired
                .iter()
                .find(|(_, old)| **old == key)
                .map(|(ip, _)| *ip)
            {
                Some(ip) => {
                    retired.remove(&ip);
                    next.insert(key.clone(), ip);
                    changes.added.push((key, ip));
                }
                None => unplaced.push(key),
            }
        }
        let taken: BTreeSet<Ipv4Addr> = next.values().copied().collect();
        let mut free = self
            .range
            .hosts()
            .filter(|ip| !taken.contains(ip) && !retired.contains_key(ip));
        for key in unplaced {
            let Some(ip) = free.next() else {
                return Err(Exhausted {
                    wanted: wanted.len(),
                    range: self.range,
                    capacity: self.range.capacity(),
                    held: retired.len(),
                });
            };
            next.insert(key.clone(), ip);
            changes.added.push((key, ip));
        }
        changes.added.sort();
        self.current = next;
        self.retired = retired;
        Ok(changes)
    }

    pub fn address(&self, key: &ServiceKey) -> Option<Ipv4Addr> {
        self.current.get(key).copied()
    }

    pub fn service(&self, ip: Ipv4Addr) -> Option<&ServiceKey> {
        self.current
            .iter()
            .find(|(_, assigned)| **assigned == ip)
            .map(|(key, _)| key)
    }

    pub fn assignments(&self) -> impl Iterator<Item = (&ServiceKey, Ipv4Addr)> {
        self.current.iter().map(|(key, ip)| (key, *ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ServiceKey {
        ServiceKey {
            name: name.into(),
            namespace: "default".into(),
            cluster: "cluster-a".into(),
        }
    }

    fn keys(names: &[&str]) -> Vec<ServiceKey> {
        names.iter().map(|n| key(n)).collect()
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 66, last)
    }

    fn allocator() -> Allocator {
        Allocator::new("127.0.66.0/24".parse().unwrap())
    }

    #[test]
    fn a_set_always_gets_the_same_addresses() {
        let mut a = allocator();
        let mut b = allocator();
        a.update(keys(&["web", "db", "cache"]), |_| false).unwrap();
        b.update(keys(&["cache", "web", "db", "db"]), |_| false)
            .unwrap();
        let placed: Vec<_> = a.assignments().map(|(k, ip)| (k.clone(), ip)).collect();
        assert_eq!(
            placed,
            b.assignments()
                .map(|(k, ip)| (k.clone(), ip))
                .collect::<Vec<_>>()
        );
        assert_eq!(a.address(&key("cache")), Some(ip(1)));
        assert_eq!(a.address(&key("db")), Some(ip(2)));
        assert_eq!(a.address(&key("web")), Some(ip(3)));
        assert_eq!(a.service(ip(2)), Some(&key("db")));
    }

    #[test]
    fn services_keep_their_address_across_updates() {
        let mut a = allocator();
        a.update(keys(&["b", "d"]), |_| false).unwrap();
        let changes = a.update(keys(&["a", "b", "c", "d"]), |_| false).unwrap();
        assert_eq!(a.address(&key("b")), Some(ip(1)));
        assert_eq!(a.address(&key("d")), Some(ip(2)));
        assert_eq!(changes.added, vec![(key("a"), ip(3)), (key("c"), ip(4))]);
        assert!(changes.removed.is_empty());
    }

    #[test]
    fn a_removed_address_is_not_reused_while_in_use() {
        let mut a = allocator();
        a.update(keys(&["old"]), |_| false).unwrap();
        let changes = a.update(keys(&["new"]), |addr| addr == ip(1)).unwrap();
        assert_eq!(changes.removed, vec![(key("old"), ip(1))]);
        assert_eq!(a.address(&key("new")), Some(ip(2)), "1 is still in use");
        assert_eq!(
            a.service(ip(1)),
            None,
            "a removed service is not answered any more"
        );
        // Once its connections are gone, the address is free again.
        a.update(keys(&["new", "newer"]), |_| false).unwrap();
        assert_eq!(a.address(&key("newer")), Some(ip(1)));
    }

    #[test]
    fn a_service_back_before_its_address_is_freed_gets_it_back() {
        let mut a = allocator();
        a.update(keys(&["a", "b"]), |_| false).unwrap();
        a.update(keys(&["b"]), |_| true).unwrap();
        a.update(keys(&["c", "b"]), |_| true).unwrap();
        assert_eq!(a.address(&key("c")), Some(ip(3)));
        a.update(keys(&["a", "b", "c"]), |_| true).unwrap();
        assert_eq!(a.address(&key("a")), Some(ip(1)));
    }

    #[test]
    fn exhaustion_is_an_error_and_changes_nothing() {
        let mut a = Allocator::new("127.0.66.0/30".parse().unwrap());
        a.update(keys(&["a", "b"]), |_| false).unwrap();
        let error = a.update(keys(&["c", "d"]), |_| true).unwrap_err();
        assert_eq!(error.held, 2);
        assert_eq!(
            error.to_string(),
            "2 imported services need addresses but 127.0.66.0/30 has 2, 2 of them still held by removed services with open connections"
        );
        assert_eq!(a.address(&key("a")), Some(ip(1)), "the last good set stays");
        // The design limit of 253 imports fits a /24.
        let mut full = allocator();
        let many: Vec<ServiceKey> = (0..253).map(|i| key(&format!("s{i}"))).collect();
        assert_eq!(full.update(many, |_| false).unwrap().added.len(), 253);
    }
}
