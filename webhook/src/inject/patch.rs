//! Building a JSON Patch against a pod: paths from unescaped tokens (annotation keys hold `/`,
//! which a pointer must write as `~1`), and parents created before anything is added into them.
//! Values are built per pod, or encoded once and shared (the sidecar's container and volumes,
//! which only change with the config): those are written out as they are, never rebuilt.

use std::sync::Arc;

use json_patch::jsonptr::PointerBuf;
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Serialize, Serializer};
use serde_json::value::{RawValue, to_raw_value};
use serde_json::{Map, Value};

/// A value the patch adds.
#[derive(Debug, Clone)]
pub enum PatchValue {
    Json(Value),
    /// Already encoded JSON, shared between patches.
    Encoded(Arc<RawValue>),
}

impl PatchValue {
    /// `value` encoded once, to be shared.
    pub fn encoded(value: &impl Serialize) -> PatchValue {
        let raw = to_raw_value(value).expect("Kubernetes objects always serialize");
        PatchValue::Encoded(Arc::from(raw))
    }

    /// An array of `values`.
    fn array(values: Vec<PatchValue>) -> PatchValue {
        PatchValue::encoded(&values)
    }

    /// The value as JSON, whichever way it is held.
    fn to_value(&self) -> Value {
        match self {
            PatchValue::Json(value) => value.clone(),
            PatchValue::Encoded(raw) => {
                serde_json::from_str(raw.get()).expect("encoded values are valid JSON")
            }
        }
    }

    /// Whether `self` and `other` encode to the same bytes: held the same way, with the same
    /// text or value (`serde_json` keeps an object's members sorted, so equal values encode
    /// alike). Cheaper than [`PartialEq`], which decodes encoded values to compare them; values
    /// that are the same JSON held differently are not the same here.
    fn encodes_as(&self, other: &PatchValue) -> bool {
        match (self, other) {
            (PatchValue::Json(a), PatchValue::Json(b)) => a == b,
            (PatchValue::Encoded(a), PatchValue::Encoded(b)) => a.get() == b.get(),
            _ => false,
        }
    }
}

impl From<Value> for PatchValue {
    fn from(value: Value) -> Self {
        PatchValue::Json(value)
    }
}

/// Equal when they are the same JSON, held either way.
impl PartialEq for PatchValue {
    fn eq(&self, other: &Self) -> bool {
        self.to_value() == other.to_value()
    }
}

impl Serialize for PatchValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PatchValue::Json(value) => value.serialize(serializer),
            PatchValue::Encoded(raw) => (**raw).serialize(serializer),
        }
    }
}

/// A JSON Patch of `add` operations, the only kind injection makes. It serializes to the
/// RFC 6902 document the apiserver applies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonPatch {
    ops: Vec<(PointerBuf, PatchValue)>,
}

impl JsonPatch {
    /// Whether the two patches encode to the same bytes (see `PatchValue::encodes_as`).
    pub fn encodes_as(&self, other: &JsonPatch) -> bool {
        self.ops.len() == other.ops.len()
            && self
                .ops
                .iter()
                .zip(&other.ops)
                .all(|((a, x), (b, y))| a == b && x.encodes_as(y))
    }

    /// The RFC 6902 document, as JSON text.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a patch always serializes")
    }

    /// The operations as a `json_patch::Patch`, to apply to a document.
    pub fn to_patch(&self) -> json_patch::Patch {
        serde_json::from_slice(&self.to_vec()).expect("a serialized patch decodes")
    }
}

impl Serialize for JsonPatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Add<'a>(&'a PointerBuf, &'a PatchValue);
        impl Serialize for Add<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut op = serializer.serialize_struct("Operation", 3)?;
                op.serialize_field("op", "add")?;
                op.serialize_field("path", self.0.as_str())?;
                op.serialize_field("value", self.1)?;
                op.end()
            }
        }
        let mut seq = serializer.serialize_seq(Some(self.ops.len()))?;
        for (path, value) in &self.ops {
            seq.serialize_element(&Add(path, value))?;
        }
        seq.end()
    }
}

#[derive(Debug, Default)]
pub(super) struct PatchBuilder {
    patch: JsonPatch,
}

pub(super) fn to_json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).expect("Kubernetes objects always serialize to JSON")
}

impl PatchBuilder {
    /// Adds, or replaces when present, the value at `path` (whose parent must exist).
    pub(super) fn set(&mut self, path: &[&str], value: impl Into<PatchValue>) {
        self.patch
            .ops
            .push((PointerBuf::from_tokens(path.iter().copied()), value.into()));
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
    pub(super) fn prepend(&mut self, path: &[&str], exists: bool, value: PatchValue) {
        if exists {
            let mut first = path.to_vec();
            first.push("0");
            self.set(&first, value);
        } else {
            self.set(path, PatchValue::array(vec![value]));
        }
    }

    /// Appends `values` to the array at `path`, creating the array when it does not exist.
    pub(super) fn append(&mut self, path: &[&str], exists: bool, values: Vec<PatchValue>) {
        if exists {
            let mut end = path.to_vec();
            end.push("-");
            for value in values {
                self.set(&end, value);
            }
        } else {
            self.set(path, PatchValue::array(values));
        }
    }

    pub(super) fn build(self) -> JsonPatch {
        self.patch
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
        assert_eq!(patch[0]["op"], "add");
        assert_eq!(
            patch[0]["path"],
            "/metadata/annotations/servicekeel.io~1status"
        );
        assert_eq!(patch[1]["path"], "/metadata/annotations/a~0b");
    }

    #[test]
    fn values_compare_as_json_however_held() {
        let value = json!({"name": "a", "ports": [1, 2]});
        assert_eq!(PatchValue::Json(value.clone()), PatchValue::encoded(&value));
        assert_ne!(
            PatchValue::Json(value),
            PatchValue::encoded(&json!({"name": "b"}))
        );
    }

    #[test]
    fn patches_encode_the_same_when_their_operations_are_held_the_same() {
        let build = |name: &str, encoded: bool| {
            let mut builder = PatchBuilder::default();
            let value = json!({"name": name});
            let value = match encoded {
                true => PatchValue::encoded(&value),
                false => value.into(),
            };
            builder.set(&["spec", "x"], value);
            builder.build()
        };
        let encode = |patch: &JsonPatch| serde_json::to_vec(patch).unwrap();
        for held in [true, false] {
            assert!(build("a", held).encodes_as(&build("a", held)));
            assert_eq!(encode(&build("a", held)), encode(&build("a", held)));
            assert!(!build("a", held).encodes_as(&build("b", held)));
        }
        assert!(
            !build("a", true).encodes_as(&build("a", false)),
            "held differently: not taken as the same bytes, though the same JSON"
        );
        let mut longer = PatchBuilder::default();
        longer.set(&["spec", "x"], PatchValue::encoded(&json!({"name": "a"})));
        longer.set(&["spec", "y"], json!(1));
        assert!(!build("a", true).encodes_as(&longer.build()));
        // Objects whose members were added in another order.
        let mut ab = Map::new();
        ab.insert("a".into(), json!(1));
        ab.insert("b".into(), json!(2));
        let mut ba = Map::new();
        ba.insert("b".into(), json!(2));
        ba.insert("a".into(), json!(1));
        let [ab, ba] = [ab, ba].map(|members| {
            let mut builder = PatchBuilder::default();
            builder.set(&["spec", "x"], Value::Object(members));
            builder.build()
        });
        assert!(ab.encodes_as(&ba));
        assert_eq!(encode(&ab), encode(&ba));
        let mut elsewhere = PatchBuilder::default();
        elsewhere.set(&["spec", "z"], PatchValue::encoded(&json!({"name": "a"})));
        assert!(!build("a", true).encodes_as(&elsewhere.build()));
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
        builder.prepend(
            &["spec", "initContainers"],
            false,
            PatchValue::encoded(&json!({"name": "a"})),
        );
        builder.prepend(&["spec", "containers"], true, json!({"name": "b"}).into());
        builder.append(
            &["spec", "volumes"],
            false,
            vec![json!(1).into(), PatchValue::encoded(&2)],
        );
        json_patch::patch(&mut doc, &builder.build().to_patch()).unwrap();
        assert_eq!(
            doc,
            json!({
                "metadata": {"annotations": {"k/1": "v"}},
                "spec": {"containers": [{"name": "b"}], "initContainers": [{"name": "a"}], "volumes": [1, 2]}
            })
        );
    }
}
