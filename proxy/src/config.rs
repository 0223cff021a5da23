//! The sidecar's configuration, from the environment the webhook writes. Variables are read
//! through [`Source`], so tests pass a map instead of touching the process environment; every
//! error names the variable and what it should hold.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use servicekeel_api::addresses::{LocalRange, RouterAddr};
use servicekeel_api::duration::parse_duration;
use servicekeel_api::{defaults, env, names};

/// Where variables come from.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not set; {expected}")]
    Missing {
        name: &'static str,
        expected: &'static str,
    },
    #[error("{name}={value:?}: {message}")]
    Invalid {
        name: &'static str,
        value: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    pub ip_range: LocalRange,
    pub dns_addr: SocketAddr,
    pub router: RouterAddr,
    pub upstream_dns: SocketAddr,
    pub annotations_file: PathBuf,
    pub admin_addr: SocketAddr,
    pub cluster: String,
    pub cluster_domain: String,
    pub pod_name: Option<String>,
    pub pod_namespace: String,
    pub pod_ip: Option<IpAddr>,
    pub drain_timeout: Duration,
    pub udp_idle_timeout: Duration,
    /// Most flows carried at once.
    pub max_flows: usize,
    /// Most UDP clients one UDP listener carries at once.
    pub udp_max_clients: usize,
    /// Hand TCP connections to the router (when it is on a Unix socket).
    pub tcp_handoff: bool,
    /// Hand UDP clients to the router (when it is on a Unix socket).
    pub udp_handoff: bool,
}

impl SidecarConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(source: &impl Source) -> Result<Self, ConfigError> {
        let read = Reader(source);
        let pod_namespace =
            read.required(env::POD_NAMESPACE, "the pod's namespace (downward API)")?;
        names::check_dns1123_label(&pod_namespace)
            .map_err(|m| read.invalid(env::POD_NAMESPACE, &pod_namespace, m))?;
        let cluster = read.required(env::SERVICEKEEL_CLUSTER, "this cluster's name")?;
        names::check_dns1123_subdomain(&cluster)
            .map_err(|m| read.invalid(env::SERVICEKEEL_CLUSTER, &cluster, m))?;
        let cluster_domain = read
            .get(env::SERVICEKEEL_CLUSTER_DOMAIN)
            .unwrap_or_else(|| defaults::CLUSTER_DOMAIN.into());
        names::check_dns1123_subdomain(&cluster_domain)
            .map_err(|m| read.invalid(env::SERVICEKEEL_CLUSTER_DOMAIN, &cluster_domain, m))?;
        Ok(SidecarConfig {
            ip_range: read.parsed(env::SIDECAR_IP_RANGE, defaults::IP_RANGE)?,
            dns_addr: read.parsed(env::SIDECAR_DNS_ADDR, defaults::DNS_ADDR)?,
            router: read.parsed(env::SIDECAR_SERVER_LISTEN, defaults::ROUTER_LISTEN)?,
            upstream_dns: read
                .required(
                    env::SIDECAR_UPSTREAM_DNS,
                    "the resolver for names that are not imported, as IP:PORT",
                )
                .and_then(|v| read.parse(env::SIDECAR_UPSTREAM_DNS, &v))?,
            annotations_file: read
                .get(env::SIDECAR_ANNOTATIONS_FILE)
                .unwrap_or_else(|| defaults::ANNOTATIONS_FILE.into())
                .into(),
            admin_addr: read.parsed(env::SIDECAR_ADMIN_ADDR, defaults::ADMIN_ADDR)?,
            cluster,
            cluster_domain,
            pod_name: read.get(env::POD_NAME),
            pod_namespace,
            pod_ip: read
                .get(env::POD_IP)
                .map(|v| read.parse(env::POD_IP, &v))
                .transpose()?,
            drain_timeout: read.duration(env::SIDECAR_DRAIN_TIMEOUT, defaults::DRAIN_TIMEOUT)?,
            udp_idle_timeout: read
                .duration(env::SIDECAR_UDP_IDLE_TIMEOUT, defaults::UDP_IDLE_TIMEOUT)?,
            max_flows: read.limit(env::SIDECAR_MAX_FLOWS, defaults::SIDECAR_MAX_FLOWS)?,
            udp_max_clients: read.limit(
                env::SIDECAR_UDP_MAX_CLIENTS,
                defaults::SIDECAR_UDP_MAX_CLIENTS,
            )?,
            tcp_handoff: read.parsed(
                env::SIDECAR_TCP_HANDOFF,
                &defaults::SIDECAR_TCP_HANDOFF.to_string(),
            )?,
            udp_handoff: read.parsed(
                env::SIDECAR_UDP_HANDOFF,
                &defaults::SIDECAR_UDP_HANDOFF.to_string(),
            )?,
        })
    }
}

struct Reader<'a, S>(&'a S);

impl<S: Source> Reader<'_, S> {
    /// The value, with empty meaning unset (as the downward API leaves a field not yet known).
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|v| !v.trim().is_empty())
    }

    fn required(&self, name: &'static str, expected: &'static str) -> Result<String, ConfigError> {
        self.get(name)
            .ok_or(ConfigError::Missing { name, expected })
    }

    fn parsed<T>(&self, name: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        let value = self.get(name).unwrap_or_else(|| default.to_string());
        self.parse(name, &value)
    }

    /// A count of at least 1.
    fn limit(&self, name: &'static str, default: usize) -> Result<usize, ConfigError> {
        let value = self.get(name).unwrap_or_else(|| default.to_string());
        match self.parse::<usize>(name, &value)? {
            0 => Err(self.invalid(name, &value, "must be at least 1")),
            limit => Ok(limit),
        }
    }

    fn duration(&self, name: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let value = self.get(name).unwrap_or_else(|| default.to_string());
        parse_duration(&value).map_err(|m| self.invalid(name, &value, m))
    }

    fn parse<T>(&self, name: &'static str, value: &str) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        value
            .trim()
            .parse()
            .map_err(|e: T::Err| self.invalid(name, value, e.to_string()))
    }

    fn invalid(&self, name: &'static str, value: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            name,
            value: value.to_string(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("POD_NAMESPACE", "default"),
        ("SERVICEKEEL_CLUSTER", "cluster-a.local"),
        ("SIDECAR_UPSTREAM_DNS", "10.96.0.10:53"),
    ];

    #[test]
    fn defaults_fill_what_is_not_set() {
        let config = SidecarConfig::from_source(&source(MINIMAL)).unwrap();
        assert_eq!(config.ip_range.to_string(), "127.0.66.0/24");
        assert_eq!(config.dns_addr.to_string(), "127.0.0.2:53");
        assert_eq!(
            config.router,
            RouterAddr::Unix("/var/run/servicekeel/router.sock".into())
        );
        assert_eq!(config.admin_addr.to_string(), "127.0.0.1:15021");
        assert_eq!(config.max_flows, 4096);
        assert_eq!(
            config.annotations_file,
            PathBuf::from("/etc/servicekeel/podinfo/annotations")
        );
        assert_eq!(config.cluster_domain, "cluster.local");
        assert_eq!(config.pod_ip, None);
        assert_eq!(config.drain_timeout, Duration::from_secs(20));
        assert_eq!(config.udp_idle_timeout, Duration::from_secs(60));
        assert_eq!(config.udp_max_clients, 1024);
        assert!(config.tcp_handoff);
        assert!(config.udp_handoff);
    }

    #[test]
    fn the_design_examples_environment() {
        // The sidecar env of ../shared/examples/annotations-yaml-pod.yaml, plus what the webhook adds.
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("SIDECAR_IP_RANGE", "127.0.66.0/24"),
            ("SIDECAR_DNS_ADDR", "127.0.0.2:53"),
            ("SIDECAR_SERVER_LISTEN", "unix:///tmp/router.sock"),
            ("POD_IP", "10.244.1.7"),
            ("SIDECAR_ADMIN_ADDR", "0.0.0.0:15021"),
        ]);
        let config = SidecarConfig::from_source(&source(&pairs)).unwrap();
        assert_eq!(config.router, RouterAddr::Unix("/tmp/router.sock".into()));
        assert_eq!(config.pod_ip, Some("10.244.1.7".parse().unwrap()));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "SIDECAR_IP_RANGE",
                "10.0.0.0/24",
                "SIDECAR_IP_RANGE=\"10.0.0.0/24\": \"10.0.0.0/24\" must be a loopback range",
            ),
            (
                "SIDECAR_DNS_ADDR",
                "127.0.0.2",
                "SIDECAR_DNS_ADDR=\"127.0.0.2\": invalid socket address",
            ),
            (
                "SIDECAR_SERVER_LISTEN",
                "router.sock",
                "SIDECAR_SERVER_LISTEN=\"router.sock\": \"router.sock\" is not unix:///PATH or tcp://HOST:PORT",
            ),
            (
                "SIDECAR_UPSTREAM_DNS",
                "dns.local",
                "SIDECAR_UPSTREAM_DNS=\"dns.local\": invalid socket address",
            ),
            (
                "SIDECAR_ADMIN_ADDR",
                "15021",
                "SIDECAR_ADMIN_ADDR=\"15021\"",
            ),
            ("POD_IP", "not-an-ip", "POD_IP=\"not-an-ip\""),
            (
                "SIDECAR_DRAIN_TIMEOUT",
                "soon",
                "SIDECAR_DRAIN_TIMEOUT=\"soon\": \"soon\" is not a duration",
            ),
            (
                "SIDECAR_UDP_IDLE_TIMEOUT",
                "1d",
                "SIDECAR_UDP_IDLE_TIMEOUT=\"1d\"",
            ),
            ("SIDECAR_MAX_FLOWS", "lots", "SIDECAR_MAX_FLOWS=\"lots\""),
            (
                "SIDECAR_MAX_FLOWS",
                "0",
                "SIDECAR_MAX_FLOWS=\"0\": must be at least 1",
            ),
            (
                "SIDECAR_UDP_MAX_CLIENTS",
                "-1",
                "SIDECAR_UDP_MAX_CLIENTS=\"-1\"",
            ),
            ("SIDECAR_TCP_HANDOFF", "yes", "SIDECAR_TCP_HANDOFF=\"yes\""),
            ("SIDECAR_UDP_HANDOFF", "1", "SIDECAR_UDP_HANDOFF=\"1\""),
            (
                "SERVICEKEEL_CLUSTER",
                "Cluster_A",
                "SERVICEKEEL_CLUSTER=\"Cluster_A\": must be a DNS-1123 subdomain",
            ),
            (
                "POD_NAMESPACE",
                "a.b",
                "POD_NAMESPACE=\"a.b\": must be a DNS-1123 label",
            ),
        ];
        for (name, value, expected) in cases {
            let mut pairs = source(MINIMAL);
            pairs.insert(name.to_string(), value.to_string());
            let error = SidecarConfig::from_source(&pairs)
                .expect_err(name)
                .to_string();
            assert!(
                error.starts_with(expected),
                "{name}: {error:?} does not start with {expected:?}"
            );
        }
        for missing in [
            "POD_NAMESPACE",
            "SERVICEKEEL_CLUSTER",
            "SIDECAR_UPSTREAM_DNS",
        ] {
            let mut pairs = source(MINIMAL);
            pairs.remove(missing);
            let error = SidecarConfig::from_source(&pairs)
                .expect_err(missing)
                .to_string();
            assert!(
                error.starts_with(&format!("{missing} is not set")),
                "{error}"
            );
        }
    }
}
