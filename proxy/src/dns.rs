//! What the sidecar's DNS answers: the names under which each imported service is known, mapped
//! to its local address. Everything else is forwarded upstream. Lookup is one hash probe per
//! query; the table is rebuilt when the imports change.
//!
//! For an import `{name, namespace, cluster}` the names are `name.namespace`,
//! `name.namespace.svc`, `name.namespace.svc.<cluster domain>`, `name.namespace.<cluster>`,
//! `name.namespace.svc.clusterset.local`, and plain `name` when the namespace is the pod's. When
//! imports from several clusters share a name form, the local cluster's wins, then the first
//! imported.

pub mod inline;
pub mod server;
pub mod udp;
pub mod upstream;

use std::collections::HashMap;
use std::net::Ipv4Addr;

use servicekeel_api::ServiceKey;

/// The multi-cluster service domain (KEP-1645), answered for every import.
pub const CLUSTERSET_DOMAIN: &str = "clusterset.local";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An imported service: answer with this address.
    Local(Ipv4Addr),
    /// Not imported: ask the upstream resolver.
    Forward,
}

#[derive(Debug, Clone, Default)]
pub struct Names {
    table: HashMap<String, Ipv4Addr>,
}

/// Where the pod is, for the relative name forms.
#[derive(Debug, Clone, Copy)]
pub struct Home<'a> {
    pub namespace: &'a str,
    pub cluster: &'a str,
    pub cluster_domain: &'a str,
}

impl Names {
    /// The table for `imports` (keys with namespace and cluster filled in) and their addresses.
    pub fn new<'k>(
        imports: impl IntoIterator<Item = (&'k ServiceKey, Ipv4Addr)>,
        home: Home<'_>,
    ) -> Self {
        let mut imports: Vec<(&ServiceKey, Ipv4Addr)> = imports.into_iter().collect();
        // Local-cluster imports claim shared forms first; the sort is stable otherwise.
        imports.sort_by_key(|(key, _)| key.cluster != home.cluster);
        let mut table = HashMap::new();
        for (key, ip) in imports {
            let (name, ns) = (
                key.name.to_ascii_lowercase(),
                key.namespace.to_ascii_lowercase(),
            );
            let mut forms = vec![
                format!("{name}.{ns}"),
                format!("{name}.{ns}.svc"),
                format!(
                    "{name}.{ns}.svc.{}",
                    home.cluster_domain.to_ascii_lowercase()
                ),
                format!("{name}.{ns}.{}", key.cluster.to_ascii_lowercase()),
                format!("{name}.{ns}.svc.{CLUSTERSET_DOMAIN}"),
            ];
            if key.namespace == home.namespace {
                forms.push(name);
            }
            for form in forms {
                table.entry(form).or_insert(ip);
            }
        }
        Names { table }
    }

    /// The answer for a query name (any case, with or without the trailing dot).
    pub fn lookup(&self, query: &str) -> Answer {
        let name = query.strip_suffix('.').unwrap_or(query);
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.table.get(&name.to_ascii_lowercase())
        } else {
            self.table.get(name)
        };
        found.map_or(Answer::Forward, |ip| Answer::Local(*ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, namespace: &str, cluster: &str) -> ServiceKey {
        ServiceKey {
            name: name.into(),
            namespace: namespace.into(),
            cluster: cluster.into(),
        }
    }

    const HOME: Home<'static> = Home {
        namespace: "default",
        cluster: "cluster-a",
        cluster_domain: "cluster.local",
    };

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 66, last)
    }

    #[test]
    fn every_name_form_of_an_import() {
        let server = key("simple-server", "default", "cluster-a.local");
        let names = Names::new([(&server, ip(1))], HOME);
        for query in [
            "simple-server",
            "simple-server.default",
            "simple-server.default.svc",
            "simple-server.default.svc.cluster.local",
            "simple-server.default.cluster-a.local",
            "simple-server.default.svc.clusterset.local",
            "Simple-Server.Default.SVC.cluster.local.",
        ] {
            assert_eq!(names.lookup(query), Answer::Local(ip(1)), "{query}");
        }
        for query in [
            "simple-server.other",
            "simple-server.default.default.svc.cluster.local",
            "simple-server.default.cluster-b",
            "simple-server.default.svc.cluster.local.example.com",
            "example.com",
            "",
            ".",
        ] {
            assert_eq!(names.lookup(query), Answer::Forward, "{query:?}");
        }
    }

    #[test]
    fn bare_names_only_for_the_pods_namespace() {
        let db = key("db", "shop", "cluster-a");
        let names = Names::new([(&db, ip(2))], HOME);
        assert_eq!(names.lookup("db"), Answer::Forward);
        assert_eq!(names.lookup("db.shop"), Answer::Local(ip(2)));
    }

    #[test]
    fn the_local_cluster_wins_shared_forms() {
        let remote = key("cache", "default", "cluster-b");
        let local = key("cache", "default", "cluster-a");
        let names = Names::new([(&remote, ip(1)), (&local, ip(2))], HOME);
        assert_eq!(names.lookup("cache"), Answer::Local(ip(2)));
        assert_eq!(
            names.lookup("cache.default.svc.cluster.local"),
            Answer::Local(ip(2))
        );
        assert_eq!(
            names.lookup("cache.default.cluster-b"),
            Answer::Local(ip(1))
        );
        assert_eq!(
            names.lookup("cache.default.cluster-a"),
            Answer::Local(ip(2))
        );
    }
}
