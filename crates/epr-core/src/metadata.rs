//! Endpoint metadata: a free-form JSON object whose keys are validated and whose serialised
//! size is bounded.

use crate::{DomainError, ValidationError};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Limits applied to every write. They come from configuration; the defaults are generous
/// enough for device attributes and small enough to keep a record in one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Serialised JSON size of an endpoint's whole metadata object.
    pub metadata_max_bytes: usize,
    /// Length of one metadata key, in bytes.
    pub metadata_key_max_len: usize,
    /// Nesting depth of a metadata value (a scalar under a key is depth 1). Bounded so that
    /// every stored document can be parsed back (serde_json stops at 128 levels).
    pub metadata_max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            metadata_max_bytes: 64 * 1024,
            metadata_key_max_len: 256,
            metadata_max_depth: 32,
        }
    }
}

/// A metadata key: non-empty, bounded, free of control characters. Any other character
/// is allowed, since Kaa stores metadata as `{key, value}` pairs and keys such as
/// `connectivity.ts` exist in the wild.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetadataKey(String);

impl MetadataKey {
    pub fn parse(s: &str, limits: &Limits) -> Result<Self, ValidationError> {
        Self::check(s, limits)?;
        Ok(Self(s.to_owned()))
    }

    /// The rules of [`MetadataKey::parse`] without making a key (a document's keys are
    /// checked where they are).
    pub fn check(s: &str, limits: &Limits) -> Result<(), ValidationError> {
        if s.is_empty() {
            return Err(ValidationError::new(
                "metadataKey",
                "required",
                "metadata keys must not be empty",
            ));
        }
        if s.len() > limits.metadata_key_max_len {
            return Err(ValidationError::new(
                "metadataKey",
                "max-length",
                format!(
                    "metadata key '{}…' is longer than {} bytes",
                    s.chars().take(32).collect::<String>(),
                    limits.metadata_key_max_len
                ),
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "metadataKey",
                "pattern",
                "metadata keys must not contain control characters",
            ));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An endpoint's metadata document. Always a JSON object with valid keys and within
/// [`Limits::metadata_max_bytes`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata(Map<String, Value>);

impl Metadata {
    pub fn empty() -> Self {
        Self(Map::new())
    }

    /// Validates a JSON value as a metadata document. `field` names it in errors.
    pub fn parse(value: Value, field: &str, limits: &Limits) -> Result<Self, DomainError> {
        let Value::Object(map) = value else {
            return Err(
                ValidationError::new(field, "type", "metadata must be a JSON object").into(),
            );
        };
        Self::from_map(map, field, limits)
    }

    pub fn from_map(
        map: Map<String, Value>,
        field: &str,
        limits: &Limits,
    ) -> Result<Self, DomainError> {
        for key in map.keys() {
            MetadataKey::check(key, limits).map_err(|e| e.at(format!("{field}.{key}")))?;
        }
        for (key, value) in &map {
            // PostgreSQL's jsonb cannot hold U+0000; refused on every backend alike.
            if contains_nul(value) {
                return Err(ValidationError::new(
                    format!("{field}.{key}"),
                    "pattern",
                    "metadata values must not contain the NUL character (U+0000)",
                )
                .into());
            }
            if depth(value) > limits.metadata_max_depth {
                return Err(ValidationError::new(
                    format!("{field}.{key}"),
                    "max-depth",
                    format!(
                        "metadata values may nest at most {} levels deep",
                        limits.metadata_max_depth
                    ),
                )
                .into());
            }
        }
        let md = Self(map);
        let size = md.serialized_len();
        if size > limits.metadata_max_bytes {
            return Err(DomainError::TooLarge {
                field: "metadata",
                actual: size,
                limit: limits.metadata_max_bytes,
            });
        }
        Ok(md)
    }

    /// Trusted construction from the store, whose rows were validated when written.
    pub fn from_stored(map: Map<String, Value>) -> Self {
        Self(map)
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    pub fn to_value(&self) -> Value {
        Value::Object(self.0.clone())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    pub fn serialized_len(&self) -> usize {
        serde_json::to_vec(&self.0)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    }

    pub fn to_json_string(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// Nesting depth of a JSON value: scalars are 1, `[1]` is 2. Iterative, so a hostile
/// document cannot overflow the stack.
pub fn depth(v: &Value) -> usize {
    // Most values are scalars: no stack to allocate.
    if !matches!(v, Value::Array(_) | Value::Object(_)) {
        return 1;
    }
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

/// Whether a string anywhere in a JSON value (object keys included) holds U+0000.
/// Iterative, like [`depth`].
pub fn contains_nul(v: &Value) -> bool {
    // Most values are scalars: no stack to allocate.
    match v {
        Value::String(s) => return s.contains('\0'),
        Value::Array(_) | Value::Object(_) => {}
        _ => return false,
    }
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return true,
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(o) => {
                if o.keys().any(|k| k.contains('\0')) {
                    return true;
                }
                stack.extend(o.values());
            }
            _ => {}
        }
    }
    false
}

/// What changed between two metadata documents, in the shape of Kaa's 15/EME event:
/// keys added with their values, keys removed with their former values, keys whose value
/// changed with old and new values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetadataDiff {
    pub added: BTreeMap<String, Value>,
    pub removed: BTreeMap<String, Value>,
    pub updated: BTreeMap<String, (Value, Value)>,
}

impl MetadataDiff {
    pub fn between(old: &Metadata, new: &Metadata) -> Self {
        let mut diff = Self::default();
        for (k, v) in old.as_map() {
            match new.get(k) {
                None => {
                    diff.removed.insert(k.clone(), v.clone());
                }
                Some(nv) if nv != v => {
                    diff.updated.insert(k.clone(), (v.clone(), nv.clone()));
                }
                Some(_) => {}
            }
        }
        for (k, v) in new.as_map() {
            if !old.as_map().contains_key(k) {
                diff.added.insert(k.clone(), v.clone());
            }
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rejects_non_objects_and_oversize() {
        let l = Limits::default();
        assert!(Metadata::parse(json!([1]), "metadata", &l).is_err());
        let small = Limits {
            metadata_max_bytes: 10,
            ..l
        };
        let err = Metadata::parse(json!({"k": "0123456789"}), "metadata", &small).unwrap_err();
        assert!(matches!(err, DomainError::TooLarge { limit: 10, .. }));
    }

    #[test]
    fn rejects_bad_keys_with_path() {
        let l = Limits::default();
        let err = Metadata::parse(json!({"": 1}), "metadata", &l).unwrap_err();
        match err {
            DomainError::Invalid(v) => assert_eq!(v.field, "metadata."),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn depth_is_bounded() {
        let l = Limits {
            metadata_max_depth: 3,
            ..Limits::default()
        };
        assert!(Metadata::parse(json!({"a": [[1]]}), "metadata", &l).is_ok());
        match Metadata::parse(json!({"a": [[[1]]]}), "metadata", &l).unwrap_err() {
            DomainError::Invalid(v) => {
                assert_eq!((v.field.as_str(), v.rule), ("metadata.a", "max-depth"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// Fuzzing finding (`metadata_patch`): without serde_json's `float_roundtrip`, this
    /// number parsed to a float whose JSON text parses to a different float, so stored
    /// metadata read back differed from what was written.
    #[test]
    fn floats_survive_a_round_trip_through_json_text() {
        let l = Limits::default();
        let written: Value =
            serde_json::from_str(r#"{"k": 33333333333333333333333333333333}"#).expect("valid JSON");
        let md = Metadata::parse(written, "metadata", &l).unwrap();
        let text = md.to_json_string();
        let back = Metadata::parse(serde_json::from_str(&text).unwrap(), "metadata", &l).unwrap();
        assert_eq!(back, md, "{text}");
    }

    #[test]
    fn nul_characters_are_refused_at_any_depth() {
        let l = Limits::default();
        for bad in [
            json!({"a": "x\u{0}y"}),
            json!({"a": [1, {"b": "\u{0}"}]}),
            json!({"a": {"k\u{0}": 1}}),
        ] {
            match Metadata::parse(bad.clone(), "metadata", &l).unwrap_err() {
                DomainError::Invalid(v) => {
                    assert_eq!(
                        (v.field.as_str(), v.rule),
                        ("metadata.a", "pattern"),
                        "{bad}"
                    );
                    assert!(v.message.contains("U+0000"), "{}", v.message);
                }
                other => panic!("{other:?}"),
            }
        }
        // Other control characters stay allowed in values (JSON escapes them).
        assert!(Metadata::parse(json!({"a": "x\u{1}\ny"}), "metadata", &l).is_ok());
    }

    #[test]
    fn diff_classifies_keys() {
        let l = Limits::default();
        let a = Metadata::parse(json!({"a": 1, "b": 2, "c": 3}), "m", &l).unwrap();
        let b = Metadata::parse(json!({"a": 1, "b": 5, "d": null}), "m", &l).unwrap();
        let d = MetadataDiff::between(&a, &b);
        assert_eq!(d.added.get("d"), Some(&Value::Null));
        assert_eq!(d.removed.get("c"), Some(&json!(3)));
        assert_eq!(d.updated.get("b"), Some(&(json!(2), json!(5))));
        assert!(!d.updated.contains_key("a"));
    }
}
