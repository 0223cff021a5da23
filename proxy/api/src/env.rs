//! Names of the sidecar's environment variables: the webhook writes them, the sidecar reads them.

/// Local IPs for imported services (CIDR).
pub const SIDECAR_IP_RANGE: &str = "SIDECAR_IP_RANGE";
/// Where the sidecar's DNS server listens (`ip:port`).
pub const SIDECAR_DNS_ADDR: &str = "SIDECAR_DNS_ADDR";
/// The node router: `unix://PATH` or `tcp://HOST:PORT`.
pub const SIDECAR_SERVER_LISTEN: &str = "SIDECAR_SERVER_LISTEN";
/// Resolver for names that are not imported (`ip:port`).
pub const SIDECAR_UPSTREAM_DNS: &str = "SIDECAR_UPSTREAM_DNS";
/// The downward-API file holding the pod's annotations.
pub const SIDECAR_ANNOTATIONS_FILE: &str = "SIDECAR_ANNOTATIONS_FILE";
/// `/healthz`, `/readyz`, `/metrics` of the sidecar (`ip:port`).
pub const SIDECAR_ADMIN_ADDR: &str = "SIDECAR_ADMIN_ADDR";
/// How long a terminating sidecar lets open flows finish (`20s`, `500ms`, `1m`).
pub const SIDECAR_DRAIN_TIMEOUT: &str = "SIDECAR_DRAIN_TIMEOUT";
/// How long a UDP flow lives without a datagram either way (`60s`).
pub const SIDECAR_UDP_IDLE_TIMEOUT: &str = "SIDECAR_UDP_IDLE_TIMEOUT";
/// Most flows the sidecar carries at once (`4096`).
pub const SIDECAR_MAX_FLOWS: &str = "SIDECAR_MAX_FLOWS";
/// Most UDP clients (source addresses) one UDP listener carries at once (`1024`).
pub const SIDECAR_UDP_MAX_CLIENTS: &str = "SIDECAR_UDP_MAX_CLIENTS";
/// Whether TCP connections are handed to the router on its Unix socket (`true`) rather than
/// carried in tunnel flows (`false`); only with a `unix://` router address.
pub const SIDECAR_TCP_HANDOFF: &str = "SIDECAR_TCP_HANDOFF";
/// Whether UDP clients are handed to the router on its Unix socket (`true`) rather than carried
/// in tunnel flows (`false`); only with a `unix://` router address.
pub const SIDECAR_UDP_HANDOFF: &str = "SIDECAR_UDP_HANDOFF";
/// This cluster's name.
pub const SERVICEKEEL_CLUSTER: &str = "SERVICEKEEL_CLUSTER";
/// This cluster's DNS domain.
pub const SERVICEKEEL_CLUSTER_DOMAIN: &str = "SERVICEKEEL_CLUSTER_DOMAIN";
/// The pod's name (downward API).
pub const POD_NAME: &str = "POD_NAME";
/// The pod's namespace (downward API).
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
/// The pod's IP (downward API).
pub const POD_IP: &str = "POD_IP";
/// The node's name (downward API).
pub const NODE_NAME: &str = "NODE_NAME";
/// The node's address (downward API), where a sidecar that may not mount the router's socket
/// reaches the router over TCP.
pub const HOST_IP: &str = "HOST_IP";
