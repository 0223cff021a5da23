//! The pod's DNS after injection: the sidecar is its only nameserver, with the cluster's usual
//! search list, and the resolver the pod would have used becomes the sidecar's upstream.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{PodDNSConfig, PodDNSConfigOption};

use crate::config::Config;
use crate::pod::Spec;

/// Resolv.conf's default number of dots before a name is tried as absolute first; Kubernetes
/// uses 5 so that `name.namespace.svc` goes through the search list.
const NDOTS: &str = "5";

#[derive(Debug, Clone, PartialEq)]
pub(super) struct DnsPlan {
    pub config: PodDNSConfig,
    /// Where the sidecar forwards names that are not imported.
    pub upstream: SocketAddr,
}

pub(super) fn plan(
    spec: &Spec,
    namespace: &str,
    config: &Config,
    warnings: &mut Vec<String>,
) -> DnsPlan {
    let own = spec.dns_config.clone().unwrap_or_default();
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");

    // A pod that chose its own nameservers keeps them, behind the sidecar.
    let own_nameserver = (policy == "None")
        .then(|| {
            own.nameservers
                .iter()
                .flatten()
                .find_map(|ns| ns.parse::<IpAddr>().ok())
        })
        .flatten();
    let upstream = match own_nameserver {
        Some(ip) => SocketAddr::new(ip, 53),
        None => config.upstream_dns,
    };
    if policy == "Default" {
        warnings.push(format!(
            "dnsPolicy Default: names that are not imported are forwarded to {upstream}, \
             not to the node's resolver"
        ));
    }

    let domain = &config.cluster_domain;
    let mut searches = vec![
        format!("{namespace}.svc.{domain}"),
        format!("svc.{domain}"),
        domain.clone(),
    ];
    for search in own.searches.iter().flatten() {
        if !searches.contains(search) {
            searches.push(search.clone());
        }
    }

    let mut options = own.options.unwrap_or_default();
    if !options
        .iter()
        .any(|option| option.name.as_deref() == Some("ndots"))
    {
        options.insert(
            0,
            PodDNSConfigOption {
                name: Some("ndots".into()),
                value: Some(NDOTS.into()),
            },
        );
    }

    DnsPlan {
        config: PodDNSConfig {
            nameservers: Some(vec![config.dns_addr.ip().to_string()]),
            searches: Some(searches),
            options: Some(options),
        },
        upstream,
    }
}
