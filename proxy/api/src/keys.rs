//! Annotation and label keys, and lookup of the service annotations with their aliases.

use std::collections::BTreeMap;

/// Services this pod wants to reach.
pub const IMPORTED_SERVICES: &str = "servicekeel.io/imported-services";
/// Services this pod serves.
pub const EXPORTED_SERVICES: &str = "servicekeel.io/exported-services";
/// Alias of [`IMPORTED_SERVICES`], accepted on read.
pub const IMPORTED_SERVICES_ALIAS: &str = "edge.io/imported-services";
/// Alias of [`EXPORTED_SERVICES`], accepted on read.
pub const EXPORTED_SERVICES_ALIAS: &str = "edge.io/exported-services";

/// Pod annotation or label: `"false"` opts the pod out of injection.
pub const INJECT: &str = "servicekeel.io/inject";
/// Value of [`INJECT`] that opts a pod out.
pub const INJECT_DISABLED: &str = "false";
/// Namespace label key that turns injection on for the namespace.
pub const NAMESPACE_INJECT_LABEL: &str = INJECT;
/// Value of [`NAMESPACE_INJECT_LABEL`] that turns injection on.
pub const NAMESPACE_INJECT_ENABLED: &str = "enabled";

/// Namespace annotation: default imported services for every injected pod of the namespace.
pub const DEFAULT_IMPORTED_SERVICES: &str = "servicekeel.io/default-imported-services";

/// Pod annotation: `native` or `classic`, overriding the configured sidecar mode.
pub const SIDECAR_MODE: &str = "servicekeel.io/sidecar-mode";

/// Written by the webhook: what it injected, so a second pass changes nothing.
pub const STATUS: &str = "servicekeel.io/status";

/// The standard annotation naming the container `kubectl exec`/`logs` pick by default.
pub const KUBECTL_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Which of the two service annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Imported,
    Exported,
}

impl Direction {
    /// The canonical key, the one ServiceKeel writes.
    pub fn key(self) -> &'static str {
        match self {
            Direction::Imported => IMPORTED_SERVICES,
            Direction::Exported => EXPORTED_SERVICES,
        }
    }

    /// The alias accepted on read.
    pub fn alias(self) -> &'static str {
        match self {
            Direction::Imported => IMPORTED_SERVICES_ALIAS,
            Direction::Exported => EXPORTED_SERVICES_ALIAS,
        }
    }

    /// Finds the annotation: the canonical key first, then the alias. Returns the key found.
    pub fn find(self, annotations: &BTreeMap<String, String>) -> Option<(&'static str, &str)> {
        [self.key(), self.alias()]
            .into_iter()
            .find_map(|key| annotations.get(key).map(|value| (key, value.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_key_wins_over_alias() {
        let mut annotations = BTreeMap::new();
        annotations.insert(IMPORTED_SERVICES_ALIAS.to_string(), "alias".to_string());
        assert_eq!(
            Direction::Imported.find(&annotations),
            Some((IMPORTED_SERVICES_ALIAS, "alias"))
        );
        annotations.insert(IMPORTED_SERVICES.to_string(), "canonical".to_string());
        assert_eq!(
            Direction::Imported.find(&annotations),
            Some((IMPORTED_SERVICES, "canonical"))
        );
        assert_eq!(Direction::Exported.find(&annotations), None);
    }
}
