//! The peers file: routers of this cluster's other nodes and the gateways of other clusters.
//!
//! ```yaml
//! nodes:                       # this cluster's other routers, by node name
//!   edge-2: ["10.0.0.2:15008"]
//! clusters:                    # other clusters, reached through their gateways
//!   cluster-a:
//!     gateways: ["192.168.1.10:15008"]
//!     trustBundle: /etc/servicekeel/peers/cluster-a.crt
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use servicekeel_api::names;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peers {
    #[serde(default)]
    pub nodes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub clusters: BTreeMap<String, Cluster>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cluster {
    pub gateways: Vec<String>,
    /// PEM bundle of the CAs that issue that cluster's router certificates.
    pub trust_bundle: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("peers file {path}: {message}")]
pub struct PeersError {
    pub path: PathBuf,
    pub message: String,
}

impl Peers {
    /// Reads and checks the file; `own` is this router's cluster, which is not a peer cluster.
    pub fn load(path: &Path, own: &str) -> Result<Peers, PeersError> {
        let error = |message: String| PeersError {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let peers: Peers = serde_yaml::from_str(&text).map_err(|e| error(e.to_string()))?;
        peers.check(own).map_err(error)?;
        Ok(peers)
    }

    fn check(&self, own: &str) -> Result<(), String> {
        let address = |context: &str, addr: &str| -> Result<(), String> {
            let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if valid {
                Ok(())
            } else {
                Err(format!("{context}: {addr:?} is not HOST:PORT"))
            }
        };
        for (node, addrs) in &self.nodes {
            names::check_dns1123_subdomain(node).map_err(|m| format!("nodes.{node}: {m}"))?;
            if addrs.is_empty() {
                return Err(format!("nodes.{node}: needs at least one address"));
            }
            for addr in addrs {
                address(&format!("nodes.{node}"), addr)?;
            }
        }
        for (cluster, peer) in &self.clusters {
            names::check_dns1123_subdomain(cluster)
                .map_err(|m| format!("clusters.{cluster}: {m}"))?;
            if cluster == own {
                return Err(format!(
                    "clusters.{cluster}: is this router's own cluster; list its routers under nodes"
                ));
            }
            if peer.gateways.is_empty() {
                return Err(format!(
                    "clusters.{cluster}.gateways: needs at least one address"
                ));
            }
            for addr in &peer.gateways {
                address(&format!("clusters.{cluster}.gateways"), addr)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Peers, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.yaml");
        std::fs::write(&path, text).unwrap();
        Peers::load(&path, "cluster-b").map_err(|e| e.message)
    }

    #[test]
    fn the_documented_shape() {
        let peers = load(
            "nodes:\n  edge-2: [\"10.0.0.2:15008\"]\nclusters:\n  cluster-a:\n    gateways: [\"gw.example:15008\"]\n    trustBundle: /etc/a.crt\n",
        )
        .unwrap();
        assert_eq!(peers.nodes["edge-2"], ["10.0.0.2:15008"]);
        assert_eq!(
            peers.clusters["cluster-a"].trust_bundle,
            PathBuf::from("/etc/a.crt")
        );
        assert_eq!(load("{}").unwrap(), Peers::default());
    }

    #[test]
    fn mistakes_are_named() {
        for (text, expected) in [
            (
                "nodes: {edge-2: []}",
                "nodes.edge-2: needs at least one address",
            ),
            ("nodes: {edge-2: [\"10.0.0.2\"]}", "is not HOST:PORT"),
            (
                "nodes: {Edge_2: [\"a:1\"]}",
                "nodes.Edge_2: must be a DNS-1123 subdomain",
            ),
            (
                "clusters: {cluster-b: {gateways: [\"a:1\"], trustBundle: /x}}",
                "own cluster",
            ),
            (
                "clusters: {cluster-a: {gateways: [], trustBundle: /x}}",
                "needs at least one address",
            ),
            (
                "clusters: {cluster-a: {gateways: [\"a:1\"]}}",
                "missing field `trustBundle`",
            ),
            ("routers: {}", "unknown field `routers`"),
        ] {
            let error = load(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
