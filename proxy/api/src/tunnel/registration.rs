//! A pod's registration with its node router: which services it serves, at which address.
//!
//! The sidecar sends one whenever its exports change, on the tunnel connection; the router keeps
//! it for as long as that connection lives. The body is JSON:
//! `{"version": 1, "pod": "namespace/name@ip", "exported": {"services": [...]}}`, the exported
//! list in the annotation's shape with namespaces and clusters filled in.

use serde_json::{Value, json};

use super::{FlowTarget, Source, VERSION};
use crate::{ServiceList, TargetPort};

/// Largest registration body accepted: twice the annotation limit leaves room for the defaults
/// filled in.
pub const MAX_REGISTRATION_BYTES: usize = 2 * crate::defaults::MAX_ANNOTATION_BYTES;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The pod; its IP is where the exported services are reached.
    pub pod: Source,
    pub exported: ServiceList,
}

/// One way in to a registered pod: the flow target it serves and the port on the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub target: FlowTarget,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registration: {0}")]
pub struct RegistrationError(pub String);

impl Registration {
    /// `exported` with relative entries resolved against the pod's namespace and `cluster`.
    pub fn new(pod: Source, exported: &ServiceList, cluster: &str) -> Self {
        let exported = ServiceList {
            services: exported
                .services
                .iter()
                .map(|service| {
                    let key = service.key(&pod.namespace, cluster);
                    let mut service = service.clone();
                    service.namespace = Some(key.namespace);
                    service.cluster = Some(key.cluster);
                    service
                })
                .collect(),
        };
        Registration { pod, exported }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let exported: Value = serde_json::from_str(&self.exported.to_canonical_json())
            .unwrap_or_else(|_| json!({"services": []}));
        json!({"version": VERSION, "pod": self.pod.to_string(), "exported": exported})
            .to_string()
            .into_bytes()
    }

    pub fn parse(body: &[u8]) -> Result<Self, RegistrationError> {
        let bad = |m: String| RegistrationError(m);
        if body.len() > MAX_REGISTRATION_BYTES {
            return Err(bad(format!(
                "{} bytes is over the {MAX_REGISTRATION_BYTES}-byte limit",
                body.len()
            )));
        }
        let value: Value =
            serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
        match value.get("version").and_then(Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => {}
            other => {
                return Err(bad(format!(
                    "version {other:?} is not supported (this side speaks {VERSION})"
                )));
            }
        }
        let pod: Source = value
            .get("pod")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("pod: expected \"namespace/name@ip\"".into()))?
            .parse()
            .map_err(|m| bad(format!("pod: {m}")))?;
        if pod.ip.is_none() {
            return Err(bad(format!("pod {pod}: needs @ip to be reachable")));
        }
        let exported = ServiceList::from_value(value.get("exported").unwrap_or(&Value::Null))
            .map_err(|e| bad(format!("exported: {e}")))?;
        for (index, service) in exported.services.iter().enumerate() {
            if service.namespace.is_none() || service.cluster.is_none() {
                return Err(bad(format!(
                    "exported: services[{index}]: namespace and cluster must be filled in"
                )));
            }
        }
        Ok(Registration { pod, exported })
    }

    /// Every (service, port, protocol) the pod serves, and the port on the pod for it.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut endpoints = Vec::new();
        for service in &self.exported.services {
            let key = service.key(&self.pod.namespace, "");
            for port in &service.ports {
                endpoints.push(Endpoint {
                    target: FlowTarget {
                        service: key.clone(),
                        port: port.port,
                        protocol: port.protocol,
                    },
                    target_port: port
                        .target_port
                        .clone()
                        .unwrap_or(TargetPort::Number(port.port)),
                });
            }
        }
        endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Protocol;

    fn registration() -> Registration {
        let exported = ServiceList::parse(
            "services: [{name: web, ports: [{port: 80, targetPort: 8080}, {port: 53, protocol: UDP}]},
                        {name: api, namespace: shop, cluster: cluster-b, ports: [{port: 443, targetPort: https}]}]",
        )
        .unwrap();
        Registration::new(
            "default/web-0@10.244.1.7".parse().unwrap(),
            &exported,
            "cluster-a",
        )
    }

    #[test]
    fn round_trips_with_defaults_filled_in() {
        let original = registration();
        let parsed = Registration::parse(&original.to_json()).unwrap();
        assert_eq!(parsed, original);
        let endpoints = parsed.endpoints();
        let shown: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{} -> {:?}", e.target, e.target_port))
            .collect();
        assert_eq!(
            shown,
            [
                "web.default.cluster-a:80/TCP -> Number(8080)",
                "web.default.cluster-a:53/UDP -> Number(53)",
                "api.shop.cluster-b:443/TCP -> Name(\"https\")",
            ]
        );
        assert_eq!(endpoints[1].target.protocol, Protocol::Udp);
    }

    #[test]
    fn bad_registrations_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "not JSON"),
            (br#"{"version":2}"#, "version Some(2) is not supported"),
            (br#"{"version":1}"#, "pod: expected"),
            (br#"{"version":1,"pod":"a/b"}"#, "needs @ip"),
            (
                br#"{"version":1,"pod":"a/b@10.0.0.1","exported":{"services":[{"name":"x","ports":[{"port":1}]}]}}"#,
                "namespace and cluster must be filled in",
            ),
            (
                br#"{"version":1,"pod":"a/b@10.0.0.1","exported":{"services":[{"name":"x","namespace":"a","cluster":"c","ports":[{"port":0}]}]}}"#,
                "exported: ",
            ),
        ];
        for (body, expected) in cases {
            let error = Registration::parse(body).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        let huge = vec![b' '; MAX_REGISTRATION_BYTES + 1];
        assert!(
            Registration::parse(&huge)
                .unwrap_err()
                .to_string()
                .contains("over the")
        );
        let empty = br#"{"version":1,"pod":"a/b@10.0.0.1","exported":{"services":[]}}"#;
        assert!(Registration::parse(empty).unwrap().endpoints().is_empty());
    }
}
