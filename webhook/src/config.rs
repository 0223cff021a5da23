//! The webhook's config file: what to inject and how. Every field has a documented default, so an
//! empty file (or none) is a working config; anything set wrongly stops the webhook at start
//! with a message naming the field.

use std::net::SocketAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};
use servicekeel_api::addresses::LocalRange;
use servicekeel_api::{ServiceList, defaults, names};

/// Cluster DNS used as the sidecar's upstream when the config does not name one: the Service IP
/// kubeadm gives kube-dns. Set `upstreamDns` to your cluster's.
pub const DEFAULT_UPSTREAM_DNS: &str = "10.96.0.10:53";
pub const DEFAULT_SIDECAR_IMAGE: &str = "servicekeel/proxy:0.1.0";
pub const DEFAULT_CLUSTER_NAME: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("config file {path}: {cause}")]
    Parse {
        path: String,
        cause: serde_yaml::Error,
    },
    #[error("config: {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// This cluster's name (a DNS-1123 subdomain): the sidecar's `SERVICEKEEL_CLUSTER`.
    pub cluster_name: String,
    /// This cluster's DNS domain.
    pub cluster_domain: String,
    /// Inject the sidecar as a native sidecar (init container with `restartPolicy: Always`,
    /// Kubernetes 1.29+); `false` injects a classic container. A pod overrides this with the
    /// `servicekeel.io/sidecar-mode` annotation.
    pub native_sidecar: bool,
    pub sidecar: SidecarConfig,
    /// Directory on the node holding the router's Unix socket (hostPath).
    pub router_socket_host_path: String,
    /// The port on the node's address where the router takes sidecars over TCP: pods of
    /// namespaces whose Pod Security level forbids `hostPath` (`baseline`, `restricted`) reach
    /// the router there instead of through the socket. `null`: never (such pods are refused by
    /// Pod Security).
    pub router_tcp_port: Option<u16>,
    /// Local IPs for imported services.
    pub ip_range: String,
    /// Where the sidecar's DNS server listens; the pod's only nameserver.
    pub dns_addr: SocketAddr,
    /// Resolver for names that are not imported.
    pub upstream_dns: SocketAddr,
    /// Imported services added to every injected pod; a pod's own entry for the same service wins.
    pub default_imported_services: ServiceList,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SidecarConfig {
    pub image: String,
    pub image_pull_policy: PullPolicy,
    pub resources: ResourceRequirements,
    /// Port of the sidecar's `/healthz`, `/readyz`, `/metrics`, on all the pod's addresses so the
    /// kubelet's probes reach it.
    pub admin_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_name: DEFAULT_CLUSTER_NAME.into(),
            cluster_domain: defaults::CLUSTER_DOMAIN.into(),
            native_sidecar: true,
            sidecar: SidecarConfig::default(),
            router_socket_host_path: defaults::ROUTER_SOCKET_DIR.into(),
            router_tcp_port: Some(defaults::ROUTER_SIDECAR_PORT),
            ip_range: defaults::IP_RANGE.into(),
            dns_addr: defaults::DNS_ADDR
                .parse()
                .expect("default DNS address parses"),
            upstream_dns: DEFAULT_UPSTREAM_DNS
                .parse()
                .expect("default upstream parses"),
            default_imported_services: ServiceList::default(),
        }
    }
}

impl Default for SidecarConfig {
    fn default() -> Self {
        let quantities = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect(),
            )
        };
        SidecarConfig {
            image: DEFAULT_SIDECAR_IMAGE.into(),
            image_pull_policy: PullPolicy::IfNotPresent,
            resources: ResourceRequirements {
                requests: quantities(&[("cpu", "10m"), ("memory", "16Mi")]),
                limits: quantities(&[("memory", "64Mi")]),
                ..Default::default()
            },
            admin_port: defaults::ADMIN_PORT,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: display.clone(),
            cause,
        })?;
        Config::from_yaml(&text).map_err(|error| match error {
            ConfigError::Parse { cause, .. } => ConfigError::Parse {
                path: display,
                cause,
            },
            other => other,
        })
    }

    /// Parses and validates config text; blank text is the default config.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|cause| ConfigError::Parse {
                path: "(inline)".into(),
                cause,
            })?
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        names::check_dns1123_subdomain(&self.cluster_name)
            .map_err(|m| invalid("clusterName", format!("{:?} {m}", self.cluster_name)))?;
        names::check_dns1123_subdomain(&self.cluster_domain)
            .map_err(|m| invalid("clusterDomain", format!("{:?} {m}", self.cluster_domain)))?;
        self.ip_range
            .parse::<LocalRange>()
            .map_err(|m| invalid("ipRange", m))?;
        if self.dns_addr.port() != 53 || !self.dns_addr.ip().is_loopback() {
            return Err(invalid(
                "dnsAddr",
                format!(
                    "{} must be a loopback address on port 53: resolv.conf names a nameserver \
                     by IP only",
                    self.dns_addr
                ),
            ));
        }
        if self.sidecar.admin_port == 0 || self.sidecar.admin_port == self.dns_addr.port() {
            return Err(invalid(
                "sidecar.adminPort",
                "must be from 1 to 65535 and differ from the DNS port",
            ));
        }
        if self.sidecar.image.trim().is_empty() {
            return Err(invalid("sidecar.image", "must not be empty"));
        }
        if !self.router_socket_host_path.starts_with('/') {
            return Err(invalid(
                "routerSocketHostPath",
                format!(
                    "{:?} must be an absolute path",
                    self.router_socket_host_path
                ),
            ));
        }
        let resources = &self.sidecar.resources;
        for (kind, map) in [
            ("requests", &resources.requests),
            ("limits", &resources.limits),
        ] {
            for (name, quantity) in map.iter().flatten() {
                if !is_quantity(&quantity.0) {
                    return Err(invalid(
                        "sidecar.resources",
                        format!(
                            "{kind}.{name}: {:?} is not a Kubernetes quantity",
                            quantity.0
                        ),
                    ));
                }
            }
        }
        let defaults = &self.default_imported_services;
        // Entries without a namespace mean "the pod's namespace": only identical keys clash here.
        defaults
            .check_unique("", &self.cluster_name)
            .and_then(|()| defaults.check_import_limit())
            .map_err(|e| invalid("defaultImportedServices", e.to_string()))?;
        Ok(())
    }
}

/// Kubernetes' quantity syntax: a signed decimal number with an optional exponent or suffix.
fn is_quantity(text: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = SUFFIXES.contains(&suffix)
        || suffix
            .strip_prefix(['e', 'E'])
            .map(|exp| exp.strip_prefix(['+', '-']).unwrap_or(exp))
            .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_config() {
        assert_eq!(Config::from_yaml("").unwrap(), Config::default());
        assert_eq!(Config::from_yaml("{}\n").unwrap(), Config::default());
    }

    #[test]
    fn fields_override_defaults() {
        let config = Config::from_yaml(
            "clusterName: edge-1.example\nnativeSidecar: false\nsidecar:\n  image: reg/proxy:1\n  imagePullPolicy: Always\nupstreamDns: 10.0.0.10:53\ndefaultImportedServices:\n  services: [{name: dns, namespace: infra, ports: [{port: 53, protocol: udp}]}]\n",
        )
        .unwrap();
        assert_eq!(config.cluster_name, "edge-1.example");
        assert!(!config.native_sidecar);
        assert_eq!(config.sidecar.image, "reg/proxy:1");
        assert_eq!(config.sidecar.image_pull_policy, PullPolicy::Always);
        assert_eq!(config.sidecar.admin_port, defaults::ADMIN_PORT);
        assert_eq!(config.upstream_dns.to_string(), "10.0.0.10:53");
        assert_eq!(config.default_imported_services.services[0].name, "dns");
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (
                "clusterName: Edge_1",
                "config: clusterName: \"Edge_1\" must be a DNS-1123 subdomain",
            ),
            (
                "ipRange: 10.0.0.0/24",
                "config: ipRange: \"10.0.0.0/24\" must be a loopback range",
            ),
            (
                "ipRange: nonsense",
                "config: ipRange: \"nonsense\" is not an IPv4 CIDR",
            ),
            ("dnsAddr: 127.0.0.2", "dnsAddr: invalid socket address"),
            (
                "dnsAddr: 127.0.0.2:5353",
                "config: dnsAddr: 127.0.0.2:5353 must be a loopback address on port 53",
            ),
            (
                "dnsAddr: 10.1.1.1:53",
                "must be a loopback address on port 53",
            ),
            (
                "sidecar: {adminPort: 53}",
                "config: sidecar.adminPort: must be from 1 to 65535 and differ from the DNS port",
            ),
            ("upstreamDns: [1]", "upstreamDns: invalid type"),
            ("clusterNmae: x", "unknown field `clusterNmae`"),
            (
                "sidecar: {imagePullPolicy: Sometimes}",
                "unknown variant `Sometimes`",
            ),
            (
                "sidecar: {resources: {limits: {memory: lots}}}",
                "config: sidecar.resources: limits.memory: \"lots\" is not a Kubernetes quantity",
            ),
            (
                "routerSocketHostPath: run/sk",
                "config: routerSocketHostPath: \"run/sk\" must be an absolute path",
            ),
            (
                "defaultImportedServices: {services: [{name: a, ports: [{port: 99999}]}]}",
                "services[0].ports[0].port: must be an integer from 1 to 65535",
            ),
            (
                "defaultImportedServices: {services: [{name: a, ports: [{port: 1}]}, {name: a, ports: [{port: 2}]}]}",
                "config: defaultImportedServices: services[1]: duplicate of services[0]",
            ),
        ];
        for (text, expected) in cases {
            let error = Config::from_yaml(text).expect_err(text).to_string();
            assert!(
                error.contains(expected),
                "{text}: {error:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn quantities() {
        for ok in ["1", "10m", "64Mi", "0.5", "1e3", "1E-2", "+1Gi", ".5"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "lots", "1.2.3", "Mi", "1mi", "1e", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
