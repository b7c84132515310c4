//! Helpers shared by the fuzz targets: splitting one input into parts, sample metadata
//! documents to evaluate against, and the invariants every valid metadata document keeps.

use epr_core::metadata::{depth, Limits, Metadata, MetadataKey};
use serde_json::{json, Map, Value};

/// Splits an input at its first NUL byte: `(before, after)`; `after` is empty without one.
/// Lets a target take two JSON texts (e.g. a document and a patch) from one input.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Metadata documents that exercise every JSON type, nesting and Kaa-style keys.
pub fn sample_metadata() -> Vec<Map<String, Value>> {
    [
        json!({}),
        json!({"city": "Kyiv", "level": 3, "on": true, "n": null, "s": "3"}),
        json!({"a": [1, 2, [3, 4]], "b": {"c": {"d": "e"}}, "x": -0.5, "": 1}),
        json!({"connectivity.ts": 1_591_005_600_000i64, "tags": ["a", "b"], "key": "value",
               "value": {"key": 1}, "$weird": "$in", "big": 1.0e300, "i": i64::MIN}),
        json!({"metadata": [{"key": "k", "value": 1}], "application_version": "demo-v1"}),
    ]
    .into_iter()
    .map(|v| match v {
        Value::Object(m) => m,
        _ => unreachable!("samples are objects"),
    })
    .collect()
}

/// Limits picked by one byte of input: the defaults, or small ones so that the edges are
/// reachable with short inputs.
pub fn limits(selector: u8) -> Limits {
    match selector % 4 {
        0 => Limits::default(),
        1 => Limits {
            metadata_max_bytes: 256,
            metadata_key_max_len: 8,
            metadata_max_depth: 4,
        },
        2 => Limits {
            metadata_max_bytes: 4096,
            metadata_key_max_len: 64,
            metadata_max_depth: 1,
        },
        _ => Limits {
            metadata_max_bytes: 2,
            metadata_key_max_len: 1,
            metadata_max_depth: 2,
        },
    }
}

/// Panics unless `md` keeps every promise of [`Metadata`] under `limits`, and survives a
/// round trip through its JSON text unchanged (what the store does with it).
pub fn assert_valid_metadata(md: &Metadata, limits: &Limits) {
    let text = md.to_json_string();
    assert!(
        text.len() <= limits.metadata_max_bytes,
        "metadata of {} bytes exceeds the limit {}",
        text.len(),
        limits.metadata_max_bytes
    );
    for (k, v) in md.as_map() {
        MetadataKey::parse(k, limits).expect("every key of valid metadata is a valid key");
        assert!(
            depth(v) <= limits.metadata_max_depth,
            "value of {k:?} nests deeper than {}",
            limits.metadata_max_depth
        );
    }
    let back: Value = serde_json::from_str(&text).expect("stored metadata parses back");
    let again = Metadata::parse(back, "metadata", limits).expect("stored metadata revalidates");
    assert_eq!(&again, md, "metadata changed in a round trip through JSON");
}
