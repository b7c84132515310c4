//! RFC 6902 JSON Patch applied to metadata with the limits enforced after every operation.
//!
//! Checking the limits only on the result is not enough: `copy` of the root doubles the
//! document per operation (40 operations ask for terabytes), and copies into a deep path
//! nest it thousands of levels deep, which overflows the stack when the document is
//! dropped. Operations also apply to a scratch copy without `json_patch`'s undo log, so a
//! failed patch cannot hit its undo panic (moving a value to the root cannot be undone).

use crate::metadata::{depth, Limits, Metadata};
use crate::{DomainError, ValidationError};
use json_patch::PatchOperation;
use serde_json::Value;

/// Operations in one JSON Patch. Each operation may cost time in proportion to the document
/// (a copy clones a value, an insert into an array shifts it), and the store applies patches
/// on its one writer thread: without a bound, a 4 MiB body of copy/remove pairs on a 28 KB
/// value held the writer for about a minute.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 256;

/// Applies `patch` to `current`. Every intermediate document stays within
/// `limits.metadata_max_depth` and `limits.metadata_max_bytes`, else the patch is refused
/// (`max-depth` naming the key, or `TooLarge`); a failed operation is refused as
/// `json-patch` naming it. The result is validated like any metadata document.
pub fn apply_json_patch(
    current: &Metadata,
    patch: &json_patch::Patch,
    limits: &Limits,
) -> Result<Metadata, DomainError> {
    if patch.len() > MAX_JSON_PATCH_OPERATIONS {
        return Err(ValidationError::new(
            format!("[{MAX_JSON_PATCH_OPERATIONS}]"),
            "max-operations",
            format!(
                "a JSON Patch may hold at most {MAX_JSON_PATCH_OPERATIONS} operations, this one \
                 has {}",
                patch.len()
            ),
        )
        .into());
    }
    let mut doc = current.to_value();
    // An upper bound of the document's serialised size, made exact whenever it passes the
    // limit: measuring then costs no more than the operations that grew the document.
    let mut size_bound = current.serialized_len();
    for (i, op) in patch.iter().enumerate() {
        let at = || format!("[{i}]");
        let placed = match op {
            PatchOperation::Add(o) => Some((&o.path, Some(&o.value))),
            PatchOperation::Replace(o) => Some((&o.path, Some(&o.value))),
            PatchOperation::Copy(o) => Some((&o.path, doc.pointer(o.from.as_str()))),
            PatchOperation::Move(o) => Some((&o.path, doc.pointer(o.from.as_str()))),
            PatchOperation::Remove(_) | PatchOperation::Test(_) => None,
        };
        // A missing source is left to json_patch, which names the error.
        if let Some((path, Some(value))) = placed {
            // The root object is level 1, so a key's value may reach level max + 1.
            if path.count() + depth(value) > limits.metadata_max_depth + 1 {
                return Err(too_deep(path, value, limits));
            }
            size_bound = size_bound
                .saturating_add(path.as_str().len())
                .saturating_add(serialized_len(value));
        }
        json_patch::patch_unsafe(&mut doc, std::slice::from_ref(op)).map_err(|e| {
            ValidationError::new(
                at(),
                "json-patch",
                format!("JSON Patch operation {i} failed: {}", patch_failure(op, &e)),
            )
        })?;
        if size_bound > limits.metadata_max_bytes {
            size_bound = serialized_len(&doc);
            if size_bound > limits.metadata_max_bytes {
                return Err(DomainError::TooLarge {
                    field: "metadata",
                    actual: size_bound,
                    limit: limits.metadata_max_bytes,
                });
            }
        }
    }
    Metadata::parse(doc, "metadata", limits)
}

/// The error for a value that would nest too deep at `path`, naming the top-level key as
/// metadata validation does (`metadata.<key>`), so it does not matter at which step of a
/// patch the limit is crossed.
fn too_deep(path: &json_patch::jsonptr::Pointer, value: &Value, limits: &Limits) -> DomainError {
    let key = match path.first() {
        Some(token) => Some(token.decoded().into_owned()),
        // The whole document is replaced: name its first key that is too deep.
        None => value.as_object().and_then(|m| {
            m.iter()
                .find(|(_, v)| depth(v) > limits.metadata_max_depth)
                .map(|(k, _)| k.clone())
        }),
    };
    let field = key.map_or_else(|| "metadata".to_owned(), |k| format!("metadata.{k}"));
    ValidationError::new(
        field,
        "max-depth",
        format!(
            "metadata values may nest at most {} levels deep",
            limits.metadata_max_depth
        ),
    )
    .into()
}

/// Serialised JSON size of a value, counted without building the text.
fn serialized_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// Why a JSON Patch operation failed, naming the path (and `from`) it was about.
fn patch_failure(op: &PatchOperation, e: &json_patch::PatchError) -> String {
    use json_patch::{PatchErrorKind as K, PatchOperation as Op};
    let path = &e.path;
    let op = Some(op);
    let from = match op {
        Some(Op::Move(m)) => m.from.to_string(),
        Some(Op::Copy(c)) => c.from.to_string(),
        _ => String::new(),
    };
    match (&e.kind, op) {
        (K::TestFailed, _) => format!("the value at path '{path}' is not the test value"),
        (K::InvalidFromPointer, _) => format!("from path '{from}' does not exist"),
        (K::CannotMoveInsideItself, _) => {
            format!("cannot move '{from}' into its own child '{path}'")
        }
        (K::InvalidPointer, Some(Op::Add(_) | Op::Move(_) | Op::Copy(_))) => format!(
            "cannot add at path '{path}': its parent does not exist or the array index is out \
             of range"
        ),
        (K::InvalidPointer, _) => format!("path '{path}' does not exist"),
        (other, _) => format!("{other} (path '{path}')"),
    }
}

#[cfg(test)]
mod tests {
    //! Regression tests for fuzzing findings (the `metadata_patch` target), with the
    //! minimized inputs.
    use crate::command::{apply_change, MetadataChange};
    use crate::metadata::{Limits, Metadata};
    use crate::DomainError;
    use serde_json::{json, Value};

    fn apply(current: Value, patch: Value) -> Result<Metadata, DomainError> {
        let current = Metadata::parse(current, "metadata", &Limits::default()).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        apply_change(
            &current,
            &MetadataChange::JsonPatch(patch),
            &Limits::default(),
        )
    }

    fn invalid(r: Result<Metadata, DomainError>) -> (String, &'static str) {
        match r {
            Err(DomainError::Invalid(v)) => (v.field, v.rule),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    /// Moving a value to the root and then failing: json_patch's undo cannot move the root
    /// back inside itself and panicked (`unreachable!`), on the store's writer thread.
    #[test]
    fn failed_patch_after_move_to_root_is_refused_not_panicking() {
        let r = apply(
            json!({"a": {}}),
            json!([
                {"op": "move", "from": "/a", "path": ""},
                {"op": "test", "path": "/x", "value": 1}
            ]),
        );
        assert_eq!(invalid(r), ("[1]".to_owned(), "json-patch"));
    }

    /// Each `copy` of the root doubles the document: 64 of them asked for 2^64 times its
    /// size before the limit was checked on the result.
    #[test]
    fn copies_of_the_root_stop_at_the_size_limit() {
        let ops: Vec<Value> = (0..64)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/k{i}")}))
            .collect();
        let started = std::time::Instant::now();
        let r = apply(json!({"a": "x".repeat(100)}), Value::Array(ops));
        assert!(
            matches!(r, Err(DomainError::TooLarge { limit: 65_536, .. })),
            "{r:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Copying the root into its deepest object doubles the nesting per operation: 16
    /// copies built a document 65,536 levels deep, whose (recursive) drop overflowed the
    /// stack. The k-th copy goes to `/a` repeated 2^k times.
    #[test]
    fn copies_into_deep_paths_stop_at_the_depth_limit() {
        let ops: Vec<Value> = (0..16)
            .map(|k| json!({"op": "copy", "from": "", "path": "/a".repeat(1 << k)}))
            .collect();
        let (field, rule) = invalid(apply(json!({}), Value::Array(ops)));
        // The 6th copy would put the root (32 levels) 32 levels down: past 32 + 1.
        assert_eq!((field.as_str(), rule), ("metadata.a", "max-depth"));
    }

    /// 100,000 copy/remove operations on a 28 KB array (a 3.3 MB body) took about a minute,
    /// on the store's writer thread.
    #[test]
    fn operations_per_patch_are_bounded() {
        let ops = |n: usize| -> Value {
            (0..n)
                .map(|i| match i % 2 {
                    0 => json!({"op": "copy", "from": "/a", "path": "/b"}),
                    _ => json!({"op": "remove", "path": "/b"}),
                })
                .collect()
        };
        let doc = json!({"a": vec![0; 14_000]});
        assert!(apply(doc.clone(), ops(256)).is_ok());
        let started = std::time::Instant::now();
        let (field, rule) = invalid(apply(doc, ops(100_000)));
        assert_eq!((field.as_str(), rule), ("[256]", "max-operations"));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn limits_hold_at_every_step_and_the_result_is_validated() {
        // Within the depth limit at every step: fine.
        let deep = (0..31).fold(json!(1), |v, _| json!([v]));
        assert!(apply(
            json!({}),
            json!([{"op": "add", "path": "/a", "value": deep}])
        )
        .is_ok());
        let (field, rule) = invalid(apply(
            json!({"a": {}}),
            json!([{"op": "add", "path": "/a/b", "value": deep}]),
        ));
        assert_eq!((field.as_str(), rule), ("metadata.a", "max-depth"));
        let (field, rule) = invalid(apply(
            json!({}),
            json!([{"op": "replace", "path": "", "value": {"ok": 1, "deep": [deep]}}]),
        ));
        assert_eq!((field.as_str(), rule), ("metadata.deep", "max-depth"));
        // An ordinary patch still applies, and failures still name the operation.
        let md = apply(
            json!({"a": 1, "b": [1]}),
            json!([
                {"op": "copy", "from": "/b", "path": "/c"},
                {"op": "move", "from": "/a", "path": "/b/-"},
                {"op": "remove", "path": "/c/0"},
                {"op": "test", "path": "/b", "value": [1, 1]}
            ]),
        )
        .unwrap();
        assert_eq!(md.to_value(), json!({"b": [1, 1], "c": []}));
        let (field, rule) = invalid(apply(json!({}), json!([{"op": "remove", "path": "/nope"}])));
        assert_eq!((field.as_str(), rule), ("[0]", "json-patch"));
    }
}
