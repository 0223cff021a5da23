//! Well-known names and default values shared by the webhook, the sidecar and the router.

/// Local IPs handed to imported services.
pub const IP_RANGE: &str = "127.0.66.0/24";
/// The sidecar's DNS server.
pub const DNS_ADDR: &str = "127.0.0.2:53";
/// Directory, on the node and in the pod, holding the router's Unix socket.
pub const ROUTER_SOCKET_DIR: &str = "/var/run/servicekeel";
/// The router's Unix socket, as the sidecar reaches it.
pub const ROUTER_LISTEN: &str = "unix:///var/run/servicekeel/router.sock";
/// The port on the node's address where the router takes sidecars over TCP, for pods that
/// may not mount the socket (`--sidecar-listen`).
pub const ROUTER_SIDECAR_PORT: u16 = 15006;
/// The router's Unix socket on the node (the path in [`ROUTER_LISTEN`]).
pub const ROUTER_SOCKET: &str = "/var/run/servicekeel/router.sock";
/// Where the router keeps its registry snapshot.
pub const ROUTER_STATE_DIR: &str = "/var/lib/servicekeel";
/// The snapshot's file name in that directory.
pub const ROUTER_SNAPSHOT_FILE: &str = "registry.json";
/// The router's certificate for links to other routers.
pub const ROUTER_TLS_CERT: &str = "/etc/servicekeel/router-tls/tls.crt";
/// Its private key.
pub const ROUTER_TLS_KEY: &str = "/etc/servicekeel/router-tls/tls.key";
/// The CA bundle of this cluster's routers.
pub const ROUTER_TLS_CA: &str = "/etc/servicekeel/router-tls/ca.crt";
/// The router's admin address (`/healthz`, `/readyz`, `/metrics`), on the node's network.
pub const ROUTER_ADMIN_ADDR: &str = "0.0.0.0:15022";
/// Directory of the downward-API volume in the sidecar.
pub const PODINFO_DIR: &str = "/etc/servicekeel/podinfo";
/// File name of the annotations inside [`PODINFO_DIR`].
pub const PODINFO_ANNOTATIONS: &str = "annotations";
/// The downward-API annotations file.
pub const ANNOTATIONS_FILE: &str = "/etc/servicekeel/podinfo/annotations";
/// Port of the sidecar's admin server (`/healthz`, `/readyz`, `/metrics`).
pub const ADMIN_PORT: u16 = 15021;
/// The sidecar's admin address when its environment does not say otherwise.
pub const ADMIN_ADDR: &str = "127.0.0.1:15021";
/// Readiness path of the sidecar's admin server.
pub const READY_PATH: &str = "/readyz";
/// The proxy binary in the sidecar's image, which the sidecar's postStart hook runs.
pub const SIDECAR_BINARY: &str = "/servicekeel-proxy";
/// How long the sidecar's postStart hook (`servicekeel-proxy wait`) waits for it to be ready
/// before failing, which has the kubelet kill the sidecar container (and start it again as its
/// restart policy says).
pub const SIDECAR_READY_TIMEOUT: &str = "120s";
/// Liveness path of the sidecar's admin server.
pub const HEALTH_PATH: &str = "/healthz";
/// How long a terminating sidecar lets open flows finish.
pub const DRAIN_TIMEOUT: &str = "20s";
/// How long a UDP flow lives without a datagram either way.
pub const UDP_IDLE_TIMEOUT: &str = "60s";
/// Most flows (TCP connections and UDP clients) one sidecar carries at once; past it, new
/// connections are reset and new UDP clients' datagrams dropped.
pub const SIDECAR_MAX_FLOWS: usize = 4096;
/// Most UDP clients (source addresses) one UDP listener of a sidecar carries at once; past it,
/// new clients' datagrams are dropped.
pub const SIDECAR_UDP_MAX_CLIENTS: usize = 1024;
/// Whether a sidecar on the router's Unix socket hands TCP connections to it.
pub const SIDECAR_TCP_HANDOFF: bool = true;
/// Whether a sidecar on the router's Unix socket hands UDP clients to it.
pub const SIDECAR_UDP_HANDOFF: bool = true;
/// How long a router busy polls a UDP flow to an endpoint on its node after each datagram it
/// forwards, before it sleeps: long enough for a local service's answer to be taken without a
/// wakeup, which on a virtual machine costs about 20 µs of CPU and latency; spent only on flows
/// whose answers lately came within it, one flow at a time. Linux's documentation gives the same
/// value for its own busy polling of a few sockets (`net.core.busy_poll`).
pub const ROUTER_BUSY_POLL: &str = "50us";
/// The TCP congestion control a router gives its connections to endpoints on its node. There the
/// path is the node's own memory; what slows a bulk transfer on it is the segments a sender moved
/// between CPUs leaves out of order, and `reno` (which Linux lets any user set unless the node's
/// `net.ipv4.tcp_allowed_congestion_control` leaves it out) carried more of them at the relay's
/// best pace than `bbr`, the default of the machine measured (`BENCHMARKS.md`, TCP bulk on one
/// node; against `cubic`, Linux's own default, not measured). Endpoints on other nodes keep the
/// node's own choice.
pub const ROUTER_LOCAL_CONGESTION: &str = "reno";
/// Most flows one router carries at once; past it, new flows are refused (503).
pub const ROUTER_MAX_FLOWS: usize = 65536;
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// At most this many imported services per pod: one local IP each in a /24.
pub const MAX_IMPORTED_SERVICES: usize = 253;
/// Largest annotation value parsed; Kubernetes caps all of an object's annotations at 256 KiB.
pub const MAX_ANNOTATION_BYTES: usize = 256 * 1024;

/// Name of the injected sidecar container.
pub const SIDECAR_CONTAINER: &str = "servicekeel-proxy";
/// Name of the downward-API volume holding the pod's annotations.
pub const PODINFO_VOLUME: &str = "servicekeel-podinfo";
/// Name of the hostPath volume holding the router's socket directory.
pub const ROUTER_SOCKET_VOLUME: &str = "servicekeel-router";
/// Name of the sidecar's admin container port.
pub const ADMIN_PORT_NAME: &str = "sk-admin";
/// Sysctl that lets a non-root sidecar bind the DNS port.
pub const UNPRIVILEGED_PORT_SYSCTL: &str = "net.ipv4.ip_unprivileged_port_start";
/// User and group the sidecar runs as.
pub const SIDECAR_UID: i64 = 65532;
/// User the router runs as (in the sidecars' group): one of its own, so that the kernel's
/// per-user budgets, its pipes above all, are shared neither with the node's root processes nor
/// with the sidecars.
pub const ROUTER_UID: i64 = 65533;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_socket_is_one_path() {
        assert_eq!(ROUTER_LISTEN, format!("unix://{ROUTER_SOCKET}"));
        assert!(ROUTER_SOCKET.starts_with(ROUTER_SOCKET_DIR));
    }
}
