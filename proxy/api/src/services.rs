//! The service list carried by `imported-services` and `exported-services`.
//!
//! One shape, written as JSON or YAML:
//! `services: [{name, namespace?, cluster?, ports: [{name?, port, targetPort?, protocol?}]}]`.
//! [`ServiceList::parse`] accepts either syntax and validates every field, reporting errors with
//! their path (`services[1].ports[0].protocol: ...`); [`ServiceList::to_canonical_json`] writes
//! the one form ServiceKeel itself emits.

mod parse;

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::defaults::{MAX_ANNOTATION_BYTES, MAX_IMPORTED_SERVICES};

/// A list of services, as carried by one annotation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServiceList {
    pub services: Vec<Service>,
}

/// One service: who it is and which of its ports matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    /// Defaults to the pod's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Defaults to the local cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetPort>,
    pub protocol: Protocol,
}

/// The port on the endpoint: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// `TCP` or `UDP`, in any case.
    pub fn parse(text: &str) -> Option<Protocol> {
        if text.eq_ignore_ascii_case("tcp") {
            Some(Protocol::Tcp)
        } else if text.eq_ignore_ascii_case("udp") {
            Some(Protocol::Udp)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service's identity with its defaults filled in: what makes two entries "the same service".
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub name: String,
    pub namespace: String,
    pub cluster: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.name, self.namespace, self.cluster)
    }
}

impl Service {
    /// The identity of this entry for a pod in `namespace` of cluster `cluster`.
    pub fn key(&self, namespace: &str, cluster: &str) -> ServiceKey {
        ServiceKey {
            name: self.name.clone(),
            namespace: self.namespace.as_deref().unwrap_or(namespace).to_string(),
            cluster: self.cluster.as_deref().unwrap_or(cluster).to_string(),
        }
    }
}

/// One invalid field, with its path from the top of the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a service list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("value is {0} bytes; at most {MAX_ANNOTATION_BYTES} are accepted")]
    TooLarge(usize),
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    #[error("invalid YAML: {0}")]
    Yaml(serde_yaml::Error),
    #[error("{}", join_errors(.0))]
    Invalid(Vec<FieldError>),
}

impl ParseError {
    /// The field errors, for an invalid (but well-formed) value.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            ParseError::Invalid(errors) => errors,
            _ => &[],
        }
    }
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ServiceList {
    /// Parses and validates a list written as JSON or YAML. Blank text is an empty list.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        if text.len() > MAX_ANNOTATION_BYTES {
            return Err(ParseError::TooLarge(text.len()));
        }
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Ok(ServiceList::default());
        }
        let value: serde_json::Value = if trimmed.starts_with('{') {
            // JSON, or YAML's flow style (`{services: []}`), which JSON refuses.
            match serde_json::from_str(trimmed) {
                Ok(value) => value,
                Err(json_error) => {
                    serde_yaml::from_str(trimmed).map_err(|_| ParseError::Json(json_error))?
                }
            }
        } else {
            serde_yaml::from_str(trimmed).map_err(ParseError::Yaml)?
        };
        Self::from_value(&value)
    }

    /// Validates an already-decoded value.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, ParseError> {
        parse::service_list(value).map_err(ParseError::Invalid)
    }

    /// The form ServiceKeel writes: compact JSON, fields in a fixed order, absent optionals left out.
    pub fn to_canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a service list always serializes")
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Refuses two entries naming the same service once defaults are filled in for a pod in
    /// `namespace` of cluster `cluster`.
    pub fn check_unique(&self, namespace: &str, cluster: &str) -> Result<(), FieldError> {
        let mut seen = std::collections::HashMap::new();
        for (index, service) in self.services.iter().enumerate() {
            let key = service.key(namespace, cluster);
            if let Some(first) = seen.insert(key.clone(), index) {
                return Err(FieldError::new(
                    format!("services[{index}]"),
                    format!("duplicate of services[{first}] ({key})"),
                ));
            }
        }
        Ok(())
    }

    /// Refuses more imports than there are local IPs for.
    pub fn check_import_limit(&self) -> Result<(), FieldError> {
        let count = self.services.len();
        if count > MAX_IMPORTED_SERVICES {
            return Err(FieldError::new(
                "services",
                format!(
                    "{count} services listed; at most {MAX_IMPORTED_SERVICES} can be imported \
                     (one local IP each)"
                ),
            ));
        }
        Ok(())
    }

    /// This list with the entries of `defaults` that it does not already name appended: an entry
    /// of `self` wins over a default for the same service (keys resolved for `namespace` and
    /// `cluster`).
    pub fn with_defaults(mut self, defaults: &ServiceList, namespace: &str, cluster: &str) -> Self {
        let present: std::collections::HashSet<ServiceKey> = self
            .services
            .iter()
            .map(|service| service.key(namespace, cluster))
            .collect();
        self.services.extend(
            defaults
                .services
                .iter()
                .filter(|default| !present.contains(&default.key(namespace, cluster)))
                .cloned(),
        );
        self
    }
}

impl<'de> Deserialize<'de> for ServiceList {
    /// Decodes through the same validation as [`ServiceList::parse`], so a config file holding a
    /// list gets the same checks and messages as an annotation.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        ServiceList::from_value(&value).map_err(serde::de::Error::custom)
    }
}
