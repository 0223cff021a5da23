//! Building a JSON Patch against a pod: paths from unescaped tokens (annotation keys hold `/`,
//! which a pointer must write as `~1`), and parents created before anything is added into them.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Default)]
pub(super) struct PatchBuilder {
    ops: Vec<PatchOperation>,
}

pub(super) fn to_json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).expect("Kubernetes objects always serialize to JSON")
}

impl PatchBuilder {
    /// Adds, or replaces when present, the value at `path` (whose parent must exist).
    pub(super) fn set(&mut self, path: &[&str], value: Value) {
        self.ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(path.iter().copied()),
            value,
        }));
    }

    /// Sets members of the object at `parent`, creating the object when it does not exist.
    pub(super) fn set_members(
        &mut self,
        parent: &[&str],
        exists: bool,
        members: Vec<(&str, Value)>,
    ) {
        if members.is_empty() {
            return;
        }
        if exists {
            for (key, value) in members {
                let mut path = parent.to_vec();
                path.push(key);
                self.set(&path, value);
            }
        } else {
            let object: Map<String, Value> = members
                .into_iter()
                .map(|(key, value)| (key.to_string(), value))
                .collect();
            self.set(parent, Value::Object(object));
        }
    }

    /// Puts `value` first in the array at `path`, creating the array when it does not exist.
    pub(super) fn prepend(&mut self, path: &[&str], exists: bool, value: Value) {
        if exists {
            let mut first = path.to_vec();
            first.push("0");
            self.set(&first, value);
        } else {
            self.set(path, Value::Array(vec![value]));
        }
    }

    /// Appends `values` to the array at `path`, creating the array when it does not exist.
    pub(super) fn append(&mut self, path: &[&str], exists: bool, values: Vec<Value>) {
        if exists {
            let mut end = path.to_vec();
            end.push("-");
            for value in values {
                self.set(&end, value);
            }
        } else {
            self.set(path, Value::Array(values));
        }
    }

    pub(super) fn build(self) -> Patch {
        Patch(self.ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_with_slashes_and_tildes_are_escaped() {
        let mut builder = PatchBuilder::default();
        builder.set_members(
            &["metadata", "annotations"],
            true,
            vec![("servicekeel.io/status", json!("x")), ("a~b", json!("y"))],
        );
        let patch = serde_json::to_value(builder.build()).unwrap();
        assert_eq!(
            patch[0]["path"],
            "/metadata/annotations/servicekeel.io~1status"
        );
        assert_eq!(patch[1]["path"], "/metadata/annotations/a~0b");
    }

    #[test]
    fn missing_parents_are_created_and_applied_in_order() {
        let mut doc = json!({"metadata": {}, "spec": {"containers": []}});
        let mut builder = PatchBuilder::default();
        builder.set_members(
            &["metadata", "annotations"],
            false,
            vec![("k/1", json!("v"))],
        );
        builder.prepend(&["spec", "initContainers"], false, json!({"name": "a"}));
        builder.prepend(&["spec", "containers"], true, json!({"name": "b"}));
        builder.append(&["spec", "volumes"], false, vec![json!(1), json!(2)]);
        json_patch::patch(&mut doc, &builder.build()).unwrap();
        assert_eq!(
            doc,
            json!({
                "metadata": {"annotations": {"k/1": "v"}},
                "spec": {"containers": [{"name": "b"}], "initContainers": [{"name": "a"}], "volumes": [1, 2]}
            })
        );
    }
}
