//! Injection, table-driven: which pods are skipped, which are refused (and with what message),
//! and what a patched pod looks like once the patch is applied.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use servicekeel_webhook::config::Config;
use servicekeel_webhook::inject::{Injection, SkipReason, Target, inject};
use servicekeel_webhook::pod::PodFacts;

const NAMESPACE: &str = "web";

fn config() -> Config {
    Config::from_yaml("clusterName: cluster-a").expect("config")
}

fn pod_value(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).expect("test pod is YAML")
}

fn run(yaml: &str, config: &Config) -> Result<Injection, String> {
    let pod: PodFacts = serde_json::from_value(pod_value(yaml)).expect("test pod is a Pod");
    inject(&pod, &Target::new(NAMESPACE), config).map_err(|e| e.to_string())
}

/// The pod after its patch is applied, and the warnings.
fn injected(yaml: &str, config: &Config) -> (Value, Vec<String>) {
    match run(yaml, config) {
        Ok(Injection::Patch { patch, warnings }) => {
            let mut pod = pod_value(yaml);
            json_patch::patch(&mut pod, &patch.to_patch()).expect("patch applies");
            (pod, warnings)
        }
        other => panic!("expected a patch, got {other:?}"),
    }
}

fn sidecar_env(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_string)
}

const APP: &str = "spec: {containers: [{name: app, image: app:1}]}";

fn with_metadata(metadata: &str, spec: &str) -> String {
    format!("metadata: {metadata}\nspec: {spec}")
}

#[test]
fn skipped_pods() {
    let cases = [
        ("annotation opt-out", with_metadata(r#"{annotations: {servicekeel.io/inject: "false"}}"#, "{containers: [{name: a, image: b}]}"), SkipReason::OptedOut),
        ("label opt-out", with_metadata(r#"{labels: {servicekeel.io/inject: "false"}}"#, "{containers: [{name: a, image: b}]}"), SkipReason::OptedOut),
        ("host network", "spec: {hostNetwork: true, containers: [{name: a, image: b}]}".into(), SkipReason::HostNetwork),
        ("status present", with_metadata(r#"{annotations: {servicekeel.io/status: "{}"}}"#, "{containers: [{name: a, image: b}]}"), SkipReason::AlreadyInjected),
        ("sidecar present", "spec: {initContainers: [{name: servicekeel-proxy, image: p}], containers: [{name: a, image: b}]}".into(), SkipReason::AlreadyInjected),
        ("opt-out wins over bad imports", with_metadata(r#"{annotations: {servicekeel.io/inject: "false", servicekeel.io/imported-services: "nonsense: ["}}"#, "{containers: [{name: a, image: b}]}"), SkipReason::OptedOut),
    ];
    for (what, yaml, reason) in cases {
        assert_eq!(run(&yaml, &config()), Ok(Injection::Skip(reason)), "{what}");
    }
}

#[test]
fn refused_pods_name_the_field() {
    let many: Vec<String> = (0..254)
        .map(|i| format!(r#"{{"name":"s{i}","ports":[{{"port":80}}]}}"#))
        .collect();
    let too_many = format!(r#"{{"services":[{}]}}"#, many.join(","));
    let annotated = |key: &str, value: &str| {
        with_metadata(
            &format!(
                "{{annotations: {{{key}: {}}}}}",
                serde_json::to_string(value).unwrap()
            ),
            "{containers: [{name: app, image: b}]}",
        )
    };
    let cases = [
        (
            "bad inject value",
            annotated("servicekeel.io/inject", "maybe"),
            r#"metadata.annotations[servicekeel.io/inject]: "maybe" must be "true" or "false""#,
        ),
        (
            "bad sidecar mode",
            annotated("servicekeel.io/sidecar-mode", "sidecar"),
            r#"metadata.annotations[servicekeel.io/sidecar-mode]: "sidecar" must be "native" or "classic""#,
        ),
        (
            "unsupported protocol",
            annotated(
                "servicekeel.io/imported-services",
                "services: [{name: a, ports: [{port: 1}]}, {name: b, ports: [{port: 2, protocol: SCTP}]}]",
            ),
            r#"servicekeel.io/imported-services: services[1].ports[0].protocol: "SCTP" is not supported (TCP or UDP)"#,
        ),
        (
            "invalid alias",
            annotated("edge.io/exported-services", r#"{"services": [{"name": "x", "ports": [{"port": 70000}]}]}"#),
            "edge.io/exported-services: services[0].ports[0].port: must be an integer from 1 to 65535, got 70000",
        ),
        (
            "bad JSON",
            annotated("servicekeel.io/imported-services", r#"{"services": [}"#),
            "servicekeel.io/imported-services: invalid JSON: ",
        ),
        (
            "same service twice once defaults are filled in",
            annotated(
                "servicekeel.io/imported-services",
                "services: [{name: db, ports: [{port: 1}]}, {name: db, namespace: web, cluster: cluster-a, ports: [{port: 2}]}]",
            ),
            "servicekeel.io/imported-services: services[1]: duplicate of services[0] (db.web.cluster-a)",
        ),
        (
            "too many imports",
            annotated("servicekeel.io/imported-services", &too_many),
            "servicekeel.io/imported-services: services: 254 services listed; at most 253 can be imported",
        ),
        (
            "admin port taken",
            "spec: {containers: [{name: app, image: b, ports: [{containerPort: 15021}]}]}".into(),
            r#"spec.containers[0].ports: container "app" declares port 15021, which the ServiceKeel sidecar needs for its admin server"#,
        ),
        (
            "DNS port taken",
            "spec: {initContainers: [{name: dns, image: b, ports: [{containerPort: 53, protocol: UDP}]}], containers: [{name: a, image: b}]}".into(),
            r#"spec.initContainers[0].ports: container "dns" declares port 53, which the ServiceKeel sidecar needs for its DNS server"#,
        ),
        (
            "reserved volume",
            "spec: {containers: [{name: a, image: b}], volumes: [{name: x, emptyDir: {}}, {name: servicekeel-podinfo, emptyDir: {}}]}".into(),
            r#"spec.volumes[1].name: "servicekeel-podinfo" is reserved for the ServiceKeel sidecar"#,
        ),
    ];
    for (what, yaml, expected) in cases {
        let error = run(&yaml, &config()).expect_err(what);
        assert!(
            error.contains(expected),
            "{what}: {error:?} lacks {expected:?}"
        );
    }
}

#[test]
fn defaults_count_toward_the_import_limit() {
    let own: Vec<String> = (0..253)
        .map(|i| format!(r#"{{"name":"s{i}","ports":[{{"port":80}}]}}"#))
        .collect();
    let yaml = with_metadata(
        &format!(
            "{{annotations: {{servicekeel.io/imported-services: {}}}}}",
            serde_json::to_string(&format!(r#"{{"services":[{}]}}"#, own.join(","))).unwrap()
        ),
        "{containers: [{name: a, image: b}]}",
    );
    assert!(run(&yaml, &config()).is_ok());
    let config = Config::from_yaml(
        "clusterName: cluster-a\ndefaultImportedServices: {services: [{name: extra, ports: [{port: 1}]}]}",
    )
    .unwrap();
    assert_eq!(
        run(&yaml, &config).expect_err("over the limit"),
        "servicekeel.io/imported-services: 254 services with 1 from the namespace and cluster defaults; at most 253 can be imported (one local IP each)"
    );
}

#[test]
fn native_sidecar_comes_first_with_its_environment() {
    let yaml =
        "spec: {initContainers: [{name: setup, image: s}], containers: [{name: app, image: a}]}";
    let (pod, warnings) = injected(yaml, &config());
    assert!(warnings.is_empty(), "{warnings:?}");
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "servicekeel-proxy");
    assert_eq!(init[0]["restartPolicy"], "Always");
    // Ready before the next container starts: the kubelet waits for its postStart hook, and no
    // startup probe holds the start to a probe period.
    assert_eq!(
        init[0]["lifecycle"]["postStart"]["exec"]["command"],
        json!(["/servicekeel-proxy", "wait"])
    );
    assert!(init[0].get("startupProbe").is_none(), "{}", init[0]);
    assert_eq!(init[1]["name"], "setup");
    assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);
    for (name, value) in [
        ("SERVICEKEEL_CLUSTER", "cluster-a"),
        ("SIDECAR_IP_RANGE", "127.0.66.0/24"),
        ("SIDECAR_DNS_ADDR", "127.0.0.2:53"),
        (
            "SIDECAR_SERVER_LISTEN",
            "unix:///var/run/servicekeel/router.sock",
        ),
        ("SIDECAR_UPSTREAM_DNS", "10.96.0.10:53"),
        (
            "SIDECAR_ANNOTATIONS_FILE",
            "/etc/servicekeel/podinfo/annotations",
        ),
        ("SIDECAR_ADMIN_ADDR", "0.0.0.0:15021"),
    ] {
        assert_eq!(
            sidecar_env(&init[0], name).as_deref(),
            Some(value),
            "{name}"
        );
    }
    let security = &init[0]["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["spec"]["dnsPolicy"], "None");
    assert_eq!(pod["spec"]["dnsConfig"]["nameservers"][0], "127.0.0.2");
    assert_eq!(
        pod["spec"]["dnsConfig"]["searches"][0],
        "web.svc.cluster.local"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["servicekeel.io/status"],
        r#"{"sidecarMode":"native","version":"0.1.0"}"#
    );
}

#[test]
fn classic_mode_from_config_or_annotation() {
    let classic = Config::from_yaml("nativeSidecar: false").unwrap();
    let job_pod = "metadata: {ownerReferences: [{apiVersion: batch/v1, kind: Job, name: j, uid: u}]}\nspec: {containers: [{name: app, image: a}]}";
    let (pod, warnings) = injected(job_pod, &classic);
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers[0]["name"], "servicekeel-proxy");
    assert!(containers[0].get("restartPolicy").is_none());
    assert_eq!(containers[1]["name"], "app");
    assert!(pod["spec"].get("initContainers").is_none());
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "app"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Job's pod does not complete")),
        "{warnings:?}"
    );

    // The annotation picks the mode per pod, and an existing default container is kept.
    let yaml = with_metadata(
        "{annotations: {servicekeel.io/sidecar-mode: classic, kubectl.kubernetes.io/default-container: side}}",
        "{containers: [{name: side, image: a}, {name: main, image: b}]}",
    );
    let (pod, _) = injected(&yaml, &config());
    assert_eq!(pod["spec"]["containers"][0]["name"], "servicekeel-proxy");
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "side"
    );
    let yaml = with_metadata(
        "{annotations: {servicekeel.io/sidecar-mode: native}}",
        "{containers: [{name: a, image: b}]}",
    );
    let (pod, _) = injected(&yaml, &classic);
    assert_eq!(
        pod["spec"]["initContainers"][0]["name"],
        "servicekeel-proxy"
    );
}

#[test]
fn unprivileged_port_sysctl() {
    let sysctl = |pod: &Value| {
        pod["spec"]["securityContext"]["sysctls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "net.ipv4.ip_unprivileged_port_start")
            .map(|s| s["value"].as_str().unwrap().to_string())
    };
    let cases = [
        ("no security context", APP.to_string(), Some("53")),
        ("security context without sysctls", "spec: {securityContext: {runAsUser: 1}, containers: [{name: a, image: b}]}".into(), Some("53")),
        ("higher value lowered", "spec: {securityContext: {sysctls: [{name: net.ipv4.ip_unprivileged_port_start, value: '1024'}]}, containers: [{name: a, image: b}]}".into(), Some("53")),
        ("lower value kept", "spec: {securityContext: {sysctls: [{name: net.ipv4.ip_unprivileged_port_start, value: '0'}]}, containers: [{name: a, image: b}]}".into(), Some("0")),
    ];
    for (what, yaml, expected) in cases {
        let (pod, _) = injected(&yaml, &config());
        assert_eq!(sysctl(&pod).as_deref(), expected, "{what}");
    }
    let (pod, _) = injected(
        "spec: {securityContext: {runAsUser: 1}, containers: [{name: a, image: b}]}",
        &config(),
    );
    assert_eq!(
        pod["spec"]["securityContext"]["runAsUser"], 1,
        "the pod's own settings stay"
    );
}

#[test]
fn service_annotations_are_written_canonically_and_only_when_they_change() {
    let canonical = r#"{"services":[{"name":"db","ports":[{"port":5432,"protocol":"TCP"}]}]}"#;
    let yaml = with_metadata(
        &format!(
            "{{annotations: {{servicekeel.io/imported-services: {}}}}}",
            serde_json::to_string(canonical).unwrap()
        ),
        "{containers: [{name: a, image: b}]}",
    );
    let Ok(Injection::Patch { patch, .. }) = run(&yaml, &config()) else {
        panic!("patch expected")
    };
    let paths: Vec<String> = serde_json::to_value(&patch)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["path"].as_str().unwrap().to_string())
        .collect();
    assert!(
        paths.contains(&"/metadata/annotations/servicekeel.io~1status".to_string()),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.contains("imported-services")),
        "unchanged value rewritten: {paths:?}"
    );

    // Both the key and its alias: the key wins, with a warning; YAML becomes canonical JSON.
    let yaml = with_metadata(
        r#"{annotations: {servicekeel.io/imported-services: "services: [{name: db, ports: [{port: 5432}]}]", edge.io/imported-services: "services: [{name: other, ports: [{port: 1}]}]"}}"#,
        "{containers: [{name: a, image: b}]}",
    );
    let (pod, warnings) = injected(&yaml, &config());
    assert_eq!(
        pod["metadata"]["annotations"]["servicekeel.io/imported-services"],
        canonical
    );
    assert_eq!(
        warnings,
        vec![
            "edge.io/imported-services is ignored because servicekeel.io/imported-services is set"
        ]
    );
}

#[test]
fn dns_policy_default_is_warned_about() {
    let (_, warnings) = injected(
        "spec: {dnsPolicy: Default, containers: [{name: a, image: b}]}",
        &config(),
    );
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].starts_with("dnsPolicy Default"), "{warnings:?}");
}

#[test]
fn a_pod_without_spec_is_refused() {
    assert_eq!(
        run("metadata: {name: x}", &config()),
        Err("spec: a pod must have a spec".into())
    );
}

#[test]
fn defaults_merge_pod_first_then_namespace_then_cluster() {
    use servicekeel_api::ServiceList;
    let config = Config::from_yaml(
        "clusterName: cluster-a\ndefaultImportedServices: {services: [{name: cache, ports: [{port: 3}]}, {name: dns, ports: [{port: 3}]}]}",
    )
    .unwrap();
    let namespace_defaults = ServiceList::parse(
        "services: [{name: db, ports: [{port: 2}]}, {name: cache, ports: [{port: 2}]}]",
    )
    .unwrap();
    let yaml = with_metadata(
        r#"{annotations: {servicekeel.io/imported-services: "services: [{name: db, ports: [{port: 1}]}]"}}"#,
        "{containers: [{name: a, image: b}]}",
    );
    let pod: PodFacts = serde_json::from_value(pod_value(&yaml)).unwrap();
    let target = Target {
        namespace: NAMESPACE,
        namespace_defaults: Some(&namespace_defaults),
        exports: None,
        router_over_tcp: false,
    };
    let Ok(Injection::Patch { patch, .. }) = inject(&pod, &target, &config) else {
        panic!("patch expected")
    };
    let mut value = pod_value(&yaml);
    json_patch::patch(&mut value, &patch.to_patch()).unwrap();
    let imported = ServiceList::parse(
        value["metadata"]["annotations"]["servicekeel.io/imported-services"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let summary: Vec<(String, u16)> = imported
        .services
        .iter()
        .map(|s| (s.name.clone(), s.ports[0].port))
        .collect();
    assert_eq!(
        summary,
        [("db".into(), 1), ("cache".into(), 2), ("dns".into(), 3)]
    );
}

#[test]
fn computed_exports_merge_under_the_authors_entries() {
    use servicekeel_api::ServiceList;
    let computed = ServiceList::parse(
        "services: [{name: web, namespace: web, cluster: cluster-a, ports: [{port: 80, targetPort: 8080}]}, {name: api, namespace: web, cluster: cluster-a, ports: [{port: 9000}]}]",
    )
    .unwrap();
    let yaml = with_metadata(
        r#"{annotations: {servicekeel.io/exported-services: "services: [{name: web, ports: [{port: 8000}]}]"}}"#,
        "{containers: [{name: a, image: b}]}",
    );
    let pod: PodFacts = serde_json::from_value(pod_value(&yaml)).unwrap();
    let target = Target {
        namespace: NAMESPACE,
        namespace_defaults: None,
        exports: Some(&computed),
        router_over_tcp: false,
    };
    let Ok(Injection::Patch { patch, .. }) = inject(&pod, &target, &config()) else {
        panic!("patch expected")
    };
    let mut value = pod_value(&yaml);
    json_patch::patch(&mut value, &patch.to_patch()).unwrap();
    let annotations = &value["metadata"]["annotations"];
    assert_eq!(
        annotations["servicekeel.io/exported-services"],
        r#"{"services":[{"name":"web","ports":[{"port":8000,"protocol":"TCP"}]},{"name":"api","namespace":"web","cluster":"cluster-a","ports":[{"port":9000,"protocol":"TCP"}]}]}"#
    );
    let status: serde_json::Value =
        serde_json::from_str(annotations["servicekeel.io/status"].as_str().unwrap()).unwrap();
    assert_eq!(status["userExported"], json!(["web.web.cluster-a"]));
}

/// In a namespace that forbids `hostPath` the sidecar reaches the router over TCP on the node's
/// address, and the pod gets no `hostPath` volume; without a port in the config it still mounts
/// the socket (and Pod Security refuses the pod, as it says).
#[test]
fn where_host_path_is_forbidden_the_sidecar_reaches_the_router_over_tcp() {
    let pod: PodFacts = serde_json::from_value(pod_value(APP)).unwrap();
    let target = Target {
        router_over_tcp: true,
        ..Target::new(NAMESPACE)
    };
    let patched = |config: &Config| {
        let Ok(Injection::Patch { patch, .. }) = inject(&pod, &target, config) else {
            panic!("patch expected")
        };
        let mut value = pod_value(APP);
        json_patch::patch(&mut value, &patch.to_patch()).unwrap();
        value
    };
    let value = patched(&config());
    let sidecar = &value["spec"]["initContainers"][0];
    assert_eq!(
        sidecar_env(sidecar, "SIDECAR_SERVER_LISTEN").as_deref(),
        Some("tcp://$(HOST_IP):15006")
    );
    let env = sidecar["env"].as_array().unwrap();
    let position = |name: &str| env.iter().position(|e| e["name"] == name).unwrap();
    assert_eq!(
        env[position("HOST_IP")]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    assert!(
        position("HOST_IP") < position("SIDECAR_SERVER_LISTEN"),
        "defined before it is expanded"
    );
    let volumes = value["spec"]["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().all(|v| v.get("hostPath").is_none()),
        "{volumes:?}"
    );
    let mounts = sidecar["volumeMounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "only the annotations file: {mounts:?}");

    let mut no_port = config();
    no_port.router_tcp_port = None;
    let value = patched(&no_port);
    assert_eq!(
        sidecar_env(&value["spec"]["initContainers"][0], "SIDECAR_SERVER_LISTEN").as_deref(),
        Some("unix:///var/run/servicekeel/router.sock")
    );
    assert!(
        value["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.get("hostPath").is_some())
    );
}
