//! Parsing and validation of the service list, table-driven, plus the original design examples.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use servicekeel_api::keys::Direction;
use servicekeel_api::{Protocol, Service, ServiceList, ServicePort, TargetPort};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pod_annotations(name: &str) -> BTreeMap<String, String> {
    let pod: serde_yaml::Value = serde_yaml::from_str(&fixture(name)).expect("fixture is YAML");
    serde_yaml::from_value(pod["metadata"]["annotations"].clone()).expect("annotations map")
}

fn port(name: &str, port: u16, target: u16, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(TargetPort::Number(target)),
        protocol,
    }
}

fn service(name: &str, cluster: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        name: name.into(),
        namespace: Some("default".into()),
        cluster: Some(cluster.into()),
        ports,
    }
}

#[test]
fn edge_io_json_pod_example() {
    let annotations = pod_annotations("annotations-json-pod.yaml");

    let (key, text) = Direction::Imported
        .find(&annotations)
        .expect("imported alias found");
    assert_eq!(key, "edge.io/imported-services");
    let imported = ServiceList::parse(text).expect("imported parses");
    assert_eq!(
        imported.services,
        vec![
            service(
                "db-service",
                "cluster-b",
                vec![port("http", 80, 8080, Protocol::Tcp)]
            ),
            service(
                "cache",
                "cluster-b",
                vec![port("metrics", 9090, 9090, Protocol::Udp)]
            ),
        ]
    );

    let (key, text) = Direction::Exported
        .find(&annotations)
        .expect("exported alias found");
    assert_eq!(key, "edge.io/exported-services");
    let exported = ServiceList::parse(text).expect("exported parses");
    assert_eq!(
        exported.services,
        vec![
            service(
                "my-service",
                "cluster-a",
                vec![port("http", 80, 8080, Protocol::Tcp)]
            ),
            service(
                "metrics",
                "cluster-a",
                vec![port("metrics", 9090, 9090, Protocol::Udp)]
            ),
        ]
    );
}

#[test]
fn servicekeel_yaml_pod_example_with_lowercase_targetport_and_dotted_cluster() {
    let annotations = pod_annotations("annotations-yaml-pod.yaml");
    let (key, text) = Direction::Imported
        .find(&annotations)
        .expect("imported found");
    assert_eq!(key, "servicekeel.io/imported-services");
    let imported = ServiceList::parse(text).expect("imported parses");
    assert_eq!(
        imported.services,
        vec![service(
            "simple-server",
            "cluster-a.local",
            vec![port("tcp", 8080, 8080, Protocol::Tcp)]
        )]
    );
    assert_eq!(Direction::Exported.find(&annotations), None);
}

#[test]
fn exported_yaml_example() {
    let exported = ServiceList::parse(&fixture("exported-yaml.yaml")).expect("parses");
    assert_eq!(
        exported.services,
        vec![service(
            "my-service",
            "cluster-a.local",
            vec![port("http", 80, 8080, Protocol::Tcp)]
        )]
    );
}

#[test]
fn canonical_json_round_trips_and_is_stable() {
    let list = ServiceList::parse(&fixture("exported-yaml.yaml")).expect("parses");
    let canonical = list.to_canonical_json();
    assert_eq!(
        canonical,
        r#"{"services":[{"name":"my-service","namespace":"default","cluster":"cluster-a.local","ports":[{"name":"http","port":80,"targetPort":8080,"protocol":"TCP"}]}]}"#
    );
    let again = ServiceList::parse(&canonical).expect("canonical parses");
    assert_eq!(again, list);
    assert_eq!(again.to_canonical_json(), canonical);
}

#[test]
fn accepted_forms() {
    let cases: &[(&str, &str, ServiceList)] = &[
        ("blank is empty", "  \n", ServiceList::default()),
        (
            "null services is empty",
            "services:",
            ServiceList::default(),
        ),
        (
            "protocol defaults to TCP, optionals absent",
            "services: [{name: a, ports: [{port: 80}]}]",
            ServiceList {
                services: vec![Service {
                    name: "a".into(),
                    namespace: None,
                    cluster: None,
                    ports: vec![ServicePort {
                        name: None,
                        port: 80,
                        target_port: None,
                        protocol: Protocol::Tcp,
                    }],
                }],
            },
        ),
        (
            "protocol is case-insensitive; named targetPort; YAML flow mapping",
            "{services: [{name: a, ports: [{port: 53, protocol: udp, targetPort: dns}]}]}",
            ServiceList {
                services: vec![Service {
                    name: "a".into(),
                    namespace: None,
                    cluster: None,
                    ports: vec![ServicePort {
                        name: None,
                        port: 53,
                        target_port: Some(TargetPort::Name("dns".into())),
                        protocol: Protocol::Udp,
                    }],
                }],
            },
        ),
        (
            "same port number on TCP and UDP",
            r#"{"services":[{"name":"a","ports":[{"port":53},{"port":53,"protocol":"UDP"}]}]}"#,
            ServiceList {
                services: vec![Service {
                    name: "a".into(),
                    namespace: None,
                    cluster: None,
                    ports: vec![
                        ServicePort {
                            name: None,
                            port: 53,
                            target_port: None,
                            protocol: Protocol::Tcp,
                        },
                        ServicePort {
                            name: None,
                            port: 53,
                            target_port: None,
                            protocol: Protocol::Udp,
                        },
                    ],
                }],
            },
        ),
    ];
    for (what, text, expected) in cases {
        let parsed = ServiceList::parse(text).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(&parsed, expected, "{what}");
    }
}

#[test]
fn refused_forms_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "unsupported protocol",
            "services: [{name: a, ports: [{port: 1}]}, {name: b, ports: [{port: 2, protocol: SCTP}]}]",
            r#"services[1].ports[0].protocol: "SCTP" is not supported (TCP or UDP)"#,
        ),
        (
            "port zero",
            "services: [{name: a, ports: [{port: 0}]}]",
            "services[0].ports[0].port: must be an integer from 1 to 65535, got 0",
        ),
        (
            "port too large",
            r#"{"services":[{"name":"a","ports":[{"port":65536}]}]}"#,
            "services[0].ports[0].port: must be an integer from 1 to 65535, got 65536",
        ),
        (
            "port as a string",
            r#"{"services":[{"name":"a","ports":[{"port":"80"}]}]}"#,
            r#"services[0].ports[0].port: must be an integer from 1 to 65535, got "80""#,
        ),
        (
            "negative targetport",
            "services: [{name: a, ports: [{port: 1, targetport: -4}]}]",
            "services[0].ports[0].targetport: must be an integer from 1 to 65535, got -4",
        ),
        (
            "bad named targetPort",
            "services: [{name: a, ports: [{port: 1, targetPort: Not_A_Name}]}]",
            r#"services[0].ports[0].targetPort: "Not_A_Name" must be a port name"#,
        ),
        (
            "both spellings of targetPort",
            "services: [{name: a, ports: [{port: 1, targetPort: 2, targetport: 2}]}]",
            "services[0].ports[0].targetport: targetPort is also set",
        ),
        (
            "duplicate port and protocol",
            "services: [{name: a, ports: [{port: 80}, {port: 81}, {port: 80, protocol: tcp}]}]",
            "services[0].ports[2]: duplicate of ports[0] (80/TCP)",
        ),
        (
            "duplicate port name",
            "services: [{name: a, ports: [{name: web, port: 80}, {name: web, port: 81}]}]",
            r#"services[0].ports[1].name: "web" is already used by ports[0]"#,
        ),
        (
            "uppercase service name",
            "services: [{name: Web, ports: [{port: 80}]}]",
            r#"services[0].name: "Web" must be a DNS-1123 label"#,
        ),
        (
            "missing name",
            "services: [{ports: [{port: 80}]}]",
            "services[0].name: is required",
        ),
        (
            "namespace with a dot",
            "services: [{name: a, namespace: a.b, ports: [{port: 80}]}]",
            r#"services[0].namespace: "a.b" must be a DNS-1123 label"#,
        ),
        (
            "cluster with underscore",
            "services: [{name: a, cluster: my_cluster, ports: [{port: 80}]}]",
            r#"services[0].cluster: "my_cluster" must be a DNS-1123 subdomain"#,
        ),
        (
            "no ports",
            "services: [{name: a, ports: []}]",
            "services[0].ports: must list at least one port",
        ),
        (
            "typo in a field name",
            "services: [{name: a, ports: [{port: 80, protcol: UDP}]}]",
            "services[0].ports[0].protcol: unknown field; expected one of name, port, targetPort, targetport, protocol",
        ),
        (
            "a bare list",
            "- name: a",
            "must be a mapping with a `services` list, got a list",
        ),
        (
            "services not a list",
            "services: a",
            r#"services: must be a list, got "a""#,
        ),
        (
            "name of the wrong type",
            "services: [{name: 7, ports: [{port: 80}]}]",
            "services[0].name: must be a string, got 7",
        ),
        ("broken JSON", r#"{"services": [}"#, "invalid JSON: "),
        ("broken YAML", "services: [a", "invalid YAML: "),
    ];
    for (what, text, expected) in cases {
        let error = ServiceList::parse(text).expect_err(what).to_string();
        assert!(
            error.contains(expected),
            "{what}: error {error:?} does not contain {expected:?}"
        );
    }
}

#[test]
fn every_error_is_reported_up_to_a_cap() {
    let services: Vec<String> = (0..30)
        .map(|i| format!(r#"{{"name":"S{i}","ports":[{{"port":1}}]}}"#))
        .collect();
    let text = format!(r#"{{"services":[{}]}}"#, services.join(","));
    let error = ServiceList::parse(&text).expect_err("invalid");
    let fields = error.field_errors();
    assert_eq!(fields.len(), 11);
    assert_eq!(fields[0].path, "services[0].name");
    assert_eq!(fields[9].path, "services[9].name");
    assert_eq!(fields[10].message, "and 20 more errors");
}

#[test]
fn oversized_and_deeply_nested_values_are_refused_cleanly() {
    let huge = format!("services: []\n#{}", "x".repeat(300 * 1024));
    assert!(matches!(
        ServiceList::parse(&huge),
        Err(servicekeel_api::ParseError::TooLarge(_))
    ));
    let deep_json = format!(
        "{{\"services\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(ServiceList::parse(&deep_json).is_err());
    let deep_yaml = format!("services: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(ServiceList::parse(&deep_yaml).is_err());
}

#[test]
fn uniqueness_is_judged_on_resolved_keys() {
    let list = ServiceList::parse(
        "services: [{name: a, ports: [{port: 1}]}, {name: a, namespace: shop, cluster: east, ports: [{port: 2}]}]",
    )
    .expect("parses");
    assert!(list.check_unique("web", "west").is_ok());
    let error = list
        .check_unique("shop", "east")
        .expect_err("same service twice");
    assert_eq!(
        error.to_string(),
        "services[1]: duplicate of services[0] (a.shop.east)"
    );
}

#[test]
fn import_limit() {
    let entries: Vec<String> = (0..254)
        .map(|i| format!(r#"{{"name":"s{i}","ports":[{{"port":80}}]}}"#))
        .collect();
    let at_limit =
        ServiceList::parse(&format!(r#"{{"services":[{}]}}"#, entries[..253].join(","))).unwrap();
    assert!(at_limit.check_import_limit().is_ok());
    let over = ServiceList::parse(&format!(r#"{{"services":[{}]}}"#, entries.join(","))).unwrap();
    assert_eq!(
        over.check_import_limit().unwrap_err().to_string(),
        "services: 254 services listed; at most 253 can be imported (one local IP each)"
    );
}

#[test]
fn own_entries_win_over_defaults() {
    let own = ServiceList::parse("services: [{name: db, ports: [{port: 5432}]}]").unwrap();
    let defaults = ServiceList::parse(
        "services: [{name: db, namespace: web, ports: [{port: 1}]}, {name: dns, namespace: infra, ports: [{port: 53, protocol: UDP}]}]",
    )
    .unwrap();
    let merged = own.clone().with_defaults(&defaults, "web", "local");
    assert_eq!(merged.services.len(), 2);
    assert_eq!(merged.services[0], own.services[0]);
    assert_eq!(merged.services[1].name, "dns");
    // In another namespace the default `db` is a different service and is kept.
    let merged = own.with_defaults(&defaults, "other", "local");
    assert_eq!(merged.services.len(), 3);
}

#[test]
fn config_files_get_the_same_validation() {
    let error = serde_yaml::from_str::<ServiceList>("services: [{name: a, ports: [{port: 0}]}]")
        .expect_err("invalid");
    assert!(
        error
            .to_string()
            .contains("services[0].ports[0].port: must be an integer from 1 to 65535"),
        "{error}"
    );
}
