//! The router as `manifests/` deploys it: the DaemonSet's arguments parse with this binary's
//! command line, its socket and state directories are host directories mounted where the
//! arguments point, the socket is handed to the sidecars' group, it runs as its own user
//! without capabilities after an init container handed it both directories, the cluster name is
//! the webhook's, the probes hit the admin port, and its RBAC only reads pods and nodes.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use clap::Parser;
use serde_json::Value;
use servicekeel_api::defaults;
use servicekeel_proxy::cli::{Cli, Command as ProxyCommand, RouterArgs};
use servicekeel_proxy::dirs::Owner;
use servicekeel_proxy::router::peers::Peers;

fn rendered(dir: &str) -> Vec<Value> {
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let output = Command::new(kubectl)
        .arg("kustomize")
        .arg(&manifests)
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render manifests/ (set KUBECTL): {e}"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_yaml::Deserializer::from_str(&String::from_utf8(output.stdout).unwrap())
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect()
}

/// A container's arguments with `extra` after them, parsed by the real command line.
fn command_of(container: &Value, extra: &[&str]) -> ProxyCommand {
    let mut argv = vec!["servicekeel-proxy".to_string()];
    argv.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    argv.extend(extra.iter().map(|a| a.to_string()));
    Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{} args do not parse: {e}", container["name"]))
        .command
}

/// The router container's arguments, parsed by the real command line.
fn router_args(container: &Value) -> RouterArgs {
    // NODE_NAME comes from the downward API; give the parser a value for it.
    let ProxyCommand::Router(args) = command_of(container, &["--node=edge-1"]) else {
        panic!("the DaemonSet must run `router`")
    };
    *args
}

/// The volume `container` mounts at the directory holding `file`.
fn volume_of<'a>(pod: &'a Value, container: &Value, file: &Path) -> &'a Value {
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not mounted", file.display()));
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap()
}

/// The host path of that volume.
fn host_dir_of(pod: &Value, container: &Value, file: &Path) -> String {
    volume_of(pod, container, file)["hostPath"]["path"]
        .as_str()
        .unwrap()
        .to_string()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in manifests/"))
}

#[test]
fn the_router_daemonset_matches_the_binary() {
    let objects = rendered("manifests");
    let daemonset = named(&objects, "DaemonSet", "servicekeel-router");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "servicekeel-router");
    let container = &pod["containers"][0];
    let args = router_args(container);
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(env.contains(&"NODE_NAME"), "{env:?}");
    let config = args.into_config().unwrap();

    // The socket where sidecars look for it, on a host directory they share.
    assert_eq!(config.socket, Path::new(defaults::ROUTER_SOCKET));
    assert_eq!(
        config.socket_owner,
        Some((None, Some(defaults::SIDECAR_UID as u32)))
    );
    assert_eq!(config.socket_mode, 0o660);
    assert_eq!(config.links, None, "links are off in the base");
    let socket_dir = config.socket.parent().unwrap();
    assert_eq!(
        host_dir_of(pod, container, socket_dir),
        defaults::ROUTER_SOCKET_DIR
    );
    assert_eq!(
        host_dir_of(pod, container, &config.state_dir),
        defaults::ROUTER_STATE_DIR
    );

    // The router runs as its own user in the sidecars' group, without root or capabilities;
    // first an init container allowed to change owners hands both host directories to it.
    let security = &container["securityContext"];
    assert_eq!(security["runAsUser"], defaults::ROUTER_UID);
    assert_eq!(security["runAsGroup"], defaults::SIDECAR_UID);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(
        security["capabilities"],
        serde_json::json!({"drop": ["ALL"]})
    );
    let init = &pod["initContainers"][0];
    assert_eq!(init["image"], container["image"]);
    let ProxyCommand::PrepareDirs(prepare) = command_of(init, &[]) else {
        panic!("the init container must run `prepare-dirs`")
    };
    assert_eq!(
        prepare.owner,
        Owner {
            uid: defaults::ROUTER_UID as u32,
            gid: defaults::SIDECAR_UID as u32
        }
    );
    let handed: Vec<String> = prepare
        .dirs
        .iter()
        .map(|dir| host_dir_of(pod, init, dir))
        .collect();
    assert_eq!(
        handed,
        [defaults::ROUTER_SOCKET_DIR, defaults::ROUTER_STATE_DIR]
    );
    assert_eq!(prepare.dirs[0], socket_dir);
    assert_eq!(prepare.dirs[1], config.state_dir);
    assert_eq!(
        init["securityContext"]["capabilities"],
        serde_json::json!({"drop": ["ALL"], "add": ["CHOWN"]})
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);

    // The cluster name is the one the webhook writes into sidecars.
    let webhook_config = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["config.yaml"].is_string())
        .unwrap();
    let webhook: serde_yaml::Value =
        serde_yaml::from_str(webhook_config["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        webhook["clusterName"].as_str(),
        Some(config.cluster.as_str())
    );
    // Sidecars of namespaces that forbid hostPath find it on the port the webhook gives them.
    let tcp = config
        .sidecar_tcp
        .as_ref()
        .expect("the router takes sidecars over TCP");
    assert_eq!(
        webhook["routerTcpPort"].as_u64(),
        Some(u64::from(tcp.listen.port()))
    );
    assert!(!tcp.allowed.is_empty());

    // Probes on the admin port the router serves.
    assert_eq!(
        container["ports"][0]["containerPort"],
        config.admin_addr.port()
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["port"],
            container["ports"][0]["name"]
        );
    }
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"],
        defaults::READY_PATH
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"],
        defaults::HEALTH_PATH
    );

    // Only reads pods and nodes.
    let role = named(&objects, "ClusterRole", "servicekeel-router");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["list", "watch"]}])
    );
    let binding = named(&objects, "ClusterRoleBinding", "servicekeel-router");
    assert_eq!(binding["subjects"][0]["name"], "servicekeel-router");
    assert_eq!(binding["subjects"][0]["namespace"], "servicekeel-system");
}

#[test]
fn the_links_overlay_turns_links_on_with_its_secret_and_peers() {
    let objects = rendered("manifests/router-links");
    let daemonset = named(&objects, "DaemonSet", "servicekeel-router");
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args = router_args(container);
    let listen = args.peer_listen.expect("--peer-listen is set");
    let peers_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "peers")
        .unwrap();
    assert_eq!(peers_port["containerPort"], listen.port());
    for file in [&args.tls_cert, &args.tls_key, &args.tls_ca] {
        assert_eq!(
            volume_of(pod, &pod["containers"][0], file)["secret"]["secretName"],
            "servicekeel-router-tls",
            "{}",
            file.display()
        );
    }
    let peers_file = args.peers.expect("--peers is set");
    let config_map_name =
        volume_of(pod, &pod["containers"][0], &peers_file)["configMap"]["name"].clone();
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == config_map_name)
        .unwrap();
    let file_name = peers_file.file_name().unwrap().to_str().unwrap();
    let text = config_map["data"][file_name].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file_name), text).unwrap();
    let peers = Peers::load(&dir.path().join(file_name), &args.cluster).unwrap();
    assert_eq!(
        peers,
        Peers::default(),
        "the shipped peers file is the empty example"
    );
}
