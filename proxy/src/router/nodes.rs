//! Where the other routers of this cluster are, from the API server's Nodes: every node but
//! this one, at its InternalIP (else its ExternalIP) and the peer port all routers listen on.
//! Entries of the peers file win over what the API says for the same node.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch as signal;

use super::follow::{follow, identity};

/// Node name → router addresses, for every node but `own`.
pub fn peer_addresses(nodes: &[Arc<Node>], own: &str, port: u16) -> BTreeMap<String, Vec<String>> {
    let mut peers = BTreeMap::new();
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if name == own {
            continue;
        }
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let pick = |kind: &str| addresses.iter().find(|a| a.type_ == kind);
        let Some(address) = pick("InternalIP").or_else(|| pick("ExternalIP")) else {
            continue;
        };
        let host = if address.address.contains(':') {
            format!("[{}]", address.address)
        } else {
            address.address.clone()
        };
        peers.insert(name.to_string(), vec![format!("{host}:{port}")]);
    }
    peers
}

/// Cuts `node` down, in place, to what [`peer_addresses`] reads, its name and addresses, beside
/// what says which object and version it is: a Node's status lists every image on it besides.
pub fn keep_addresses(node: &mut Node) {
    let addresses = node.status.take().and_then(|status| status.addresses);
    *node = Node {
        metadata: identity(std::mem::take(&mut node.metadata)),
        status: Some(NodeStatus {
            addresses,
            ..NodeStatus::default()
        }),
        ..Node::default()
    };
}

/// Watches Nodes and hands the peers to `apply` after the first full list and every change.
pub async fn run(
    client: Client,
    own: String,
    port: u16,
    apply: Arc<dyn Fn(BTreeMap<String, Vec<String>>) + Send + Sync>,
    stop: signal::Receiver<bool>,
) {
    follow(
        Api::<Node>::all(client),
        watcher::Config::default(),
        "nodes",
        keep_addresses,
        |store| apply(peer_addresses(&store.state(), &own, port)),
        stop,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, addresses: &[(&str, &str)]) -> Arc<Node> {
        let addresses: Vec<serde_json::Value> = addresses
            .iter()
            .map(|(kind, address)| serde_json::json!({"type": kind, "address": address}))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"addresses": addresses},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_kept_node_gives_the_same_peer_and_holds_no_images() {
        let whole: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "edge-2", "uid": "u-2", "resourceVersion": "9",
                "labels": {"kubernetes.io/hostname": "edge-2"}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"podCIDR": "10.244.2.0/24"},
            "status": {
                "addresses": [{"type": "Hostname", "address": "edge-2"}, {"type": "InternalIP", "address": "10.0.0.2"}],
                "images": [{"names": ["web:1"], "sizeBytes": 1}],
                "nodeInfo": {"architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "c",
                    "kernelVersion": "k", "kubeProxyVersion": "", "kubeletVersion": "v", "machineID": "m",
                    "operatingSystem": "linux", "osImage": "o", "systemUUID": "s"}
            }
        }))
        .unwrap();
        let mut kept = whole.clone();
        keep_addresses(&mut kept);
        let peers = |node: &Node| peer_addresses(&[Arc::new(node.clone())], "edge-1", 15008);
        assert_eq!(
            peers(&whole),
            BTreeMap::from([("edge-2".to_string(), vec!["10.0.0.2:15008".to_string()])])
        );
        assert_eq!(peers(&kept), peers(&whole));
        assert_eq!(kept.metadata.uid.as_deref(), Some("u-2"));
        assert_eq!(kept.metadata.resource_version.as_deref(), Some("9"));
        assert_eq!(kept.metadata.managed_fields, None);
        assert_eq!(kept.spec, None);
        let status = kept.status.as_ref().unwrap();
        assert_eq!(status.images, None);
        assert_eq!(status.node_info, None);
    }

    #[test]
    fn every_other_node_at_its_internal_address() {
        let nodes = [
            node("edge-1", &[("InternalIP", "10.0.0.1")]),
            node(
                "edge-2",
                &[
                    ("Hostname", "edge-2"),
                    ("ExternalIP", "192.0.2.2"),
                    ("InternalIP", "10.0.0.2"),
                ],
            ),
            node("edge-3", &[("ExternalIP", "192.0.2.3")]),
            node("edge-4", &[("InternalIP", "fd00::4")]),
            node("edge-5", &[("Hostname", "edge-5")]),
        ];
        let peers = peer_addresses(&nodes, "edge-1", 15008);
        assert_eq!(
            peers,
            BTreeMap::from([
                ("edge-2".to_string(), vec!["10.0.0.2:15008".to_string()]),
                ("edge-3".to_string(), vec!["192.0.2.3:15008".to_string()]),
                ("edge-4".to_string(), vec!["[fd00::4]:15008".to_string()]),
            ])
        );
    }
}
