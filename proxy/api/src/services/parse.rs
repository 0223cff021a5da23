//! Turns a decoded JSON/YAML value into a [`ServiceList`], checking every field and recording
//! what is wrong with its path. Walking a generic value (rather than deriving `Deserialize`) is
//! what lets every message name the exact field, and lets `targetport` stand in for `targetPort`.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::{FieldError, Protocol, Service, ServiceList, ServicePort, TargetPort};
use crate::names::{check_dns1123_label, check_dns1123_subdomain, check_iana_svc_name};

/// Stop collecting after this many errors; the rest would only repeat the lesson.
const MAX_ERRORS: usize = 10;

const LIST_FIELDS: &[&str] = &["services"];
const SERVICE_FIELDS: &[&str] = &["name", "namespace", "cluster", "ports"];
const PORT_FIELDS: &[&str] = &["name", "port", "targetPort", "targetport", "protocol"];

pub(super) fn service_list(value: &Value) -> Result<ServiceList, Vec<FieldError>> {
    let mut walk = Walk::default();
    let list = walk.list(value);
    if walk.errors.is_empty() {
        Ok(list)
    } else {
        if walk.errors.len() > MAX_ERRORS {
            let more = walk.errors.len() - MAX_ERRORS;
            walk.errors.truncate(MAX_ERRORS);
            walk.errors
                .push(FieldError::new("", format!("and {more} more errors")));
        }
        Err(walk.errors)
    }
}

#[derive(Default)]
struct Walk {
    errors: Vec<FieldError>,
}

impl Walk {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }

    fn list(&mut self, value: &Value) -> ServiceList {
        let Some(object) = self.object("", value, LIST_FIELDS) else {
            return ServiceList::default();
        };
        let services = match object.get("services") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(index, item)| self.service(&format!("services[{index}]"), item))
                .collect(),
            Some(other) => {
                self.error(
                    "services",
                    format!("must be a list, got {}", describe(other)),
                );
                Vec::new()
            }
        };
        ServiceList { services }
    }

    fn service(&mut self, path: &str, value: &Value) -> Option<Service> {
        let object = self.object(path, value, SERVICE_FIELDS)?;
        let name = self.required_string(path, object, "name", check_dns1123_label);
        let namespace = self.optional_string(path, object, "namespace", check_dns1123_label);
        let cluster = self.optional_string(path, object, "cluster", check_dns1123_subdomain);
        let ports = self.ports(path, object.get("ports"));
        Some(Service {
            name: name?,
            namespace,
            cluster,
            ports,
        })
    }

    fn ports(&mut self, service_path: &str, value: Option<&Value>) -> Vec<ServicePort> {
        let path = format!("{service_path}.ports");
        let items = match value {
            Some(Value::Array(items)) if !items.is_empty() => items,
            None | Some(Value::Null) | Some(Value::Array(_)) => {
                self.error(path, "must list at least one port");
                return Vec::new();
            }
            Some(other) => {
                self.error(path, format!("must be a list, got {}", describe(other)));
                return Vec::new();
            }
        };
        let mut ports = Vec::new();
        let mut by_number: HashMap<(u16, Protocol), usize> = HashMap::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for (index, item) in items.iter().enumerate() {
            let port_path = format!("{path}[{index}]");
            let Some(port) = self.port(&port_path, item) else {
                continue;
            };
            if let Some(first) = by_number.insert((port.port, port.protocol), index) {
                self.error(
                    &port_path,
                    format!(
                        "duplicate of ports[{first}] ({}/{})",
                        port.port, port.protocol
                    ),
                );
            }
            if let Some(name) = &port.name
                && let Some(first) = by_name.insert(name.clone(), index)
            {
                self.error(
                    format!("{port_path}.name"),
                    format!("{name:?} is already used by ports[{first}]"),
                );
            }
            ports.push(port);
        }
        ports
    }

    fn port(&mut self, path: &str, value: &Value) -> Option<ServicePort> {
        let object = self.object(path, value, PORT_FIELDS)?;
        let name = self.optional_string(path, object, "name", check_dns1123_label);
        let port = match object.get("port") {
            None | Some(Value::Null) => {
                self.error(format!("{path}.port"), "is required");
                None
            }
            Some(value) => self.port_number(&format!("{path}.port"), value),
        };
        let target_port = self.target_port(path, object);
        let protocol = self.protocol(path, object.get("protocol"));
        Some(ServicePort {
            name,
            port: port?,
            target_port,
            protocol: protocol?,
        })
    }

    fn target_port(&mut self, path: &str, object: &Map<String, Value>) -> Option<TargetPort> {
        let (field, value) = match (object.get("targetPort"), object.get("targetport")) {
            (Some(_), Some(_)) => {
                self.error(
                    format!("{path}.targetport"),
                    "targetPort is also set; give one of targetPort and targetport",
                );
                return None;
            }
            (Some(value), None) => ("targetPort", value),
            (None, Some(value)) => ("targetport", value),
            (None, None) => return None,
        };
        let path = format!("{path}.{field}");
        match value {
            Value::Null => None,
            Value::String(name) => match check_iana_svc_name(name) {
                Ok(()) => Some(TargetPort::Name(name.clone())),
                Err(message) => {
                    self.error(
                        path,
                        format!("{name:?} {message}, or a number from 1 to 65535"),
                    );
                    None
                }
            },
            other => self.port_number(&path, other).map(TargetPort::Number),
        }
    }

    fn protocol(&mut self, path: &str, value: Option<&Value>) -> Option<Protocol> {
        match value {
            None | Some(Value::Null) => Some(Protocol::default()),
            Some(other) => {
                let parsed = other.as_str().and_then(Protocol::parse);
                if parsed.is_none() {
                    self.error(
                        format!("{path}.protocol"),
                        format!("{} is not supported (TCP or UDP)", describe(other)),
                    );
                }
                parsed
            }
        }
    }

    fn port_number(&mut self, path: &str, value: &Value) -> Option<u16> {
        match value.as_u64().and_then(|n| u16::try_from(n).ok()) {
            Some(n) if n >= 1 => Some(n),
            _ => {
                self.error(
                    path,
                    format!(
                        "must be an integer from 1 to 65535, got {}",
                        describe(value)
                    ),
                );
                None
            }
        }
    }

    /// The value as a mapping, with any field outside `known` reported.
    fn object<'v>(
        &mut self,
        path: &str,
        value: &'v Value,
        known: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let Value::Object(object) = value else {
            let expected = if path.is_empty() {
                "must be a mapping with a `services` list"
            } else {
                "must be a mapping"
            };
            self.error(path, format!("{expected}, got {}", describe(value)));
            return None;
        };
        for field in object
            .keys()
            .filter(|field| !known.contains(&field.as_str()))
        {
            self.error(
                join(path, field),
                format!("unknown field; expected one of {}", known.join(", ")),
            );
        }
        Some(object)
    }

    fn required_string(
        &mut self,
        path: &str,
        object: &Map<String, Value>,
        field: &str,
        check: fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        if matches!(object.get(field), None | Some(Value::Null)) {
            self.error(join(path, field), "is required");
            return None;
        }
        self.optional_string(path, object, field, check)
    }

    fn optional_string(
        &mut self,
        path: &str,
        object: &Map<String, Value>,
        field: &str,
        check: fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        let path = join(path, field);
        match object.get(field)? {
            Value::Null => None,
            Value::String(text) => match check(text) {
                Ok(()) => Some(text.clone()),
                Err(message) => {
                    self.error(path, format!("{text:?} {message}"));
                    None
                }
            },
            other => {
                self.error(path, format!("must be a string, got {}", describe(other)));
                None
            }
        }
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// A short rendering of an offending value: the value itself when small, else its type.
fn describe(value: &Value) -> String {
    const SHOWN: usize = 40;
    let text = value.to_string();
    match value {
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
        _ if text.len() <= SHOWN => text,
        Value::String(_) => "a long string".into(),
        _ => "a long value".into(),
    }
}
