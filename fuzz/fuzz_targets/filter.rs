//! Endpoint filters (Kaa's MongoDB-query criteria): parse a query and, when it parses,
//! evaluate it against metadata. Input: a query JSON text, optionally a NUL byte and a
//! metadata JSON object to evaluate against besides the built-in samples.
//!
//! Invariants: no panic; errors name a `mongoQuery...` field and a rule; a filter whose
//! `metadata_keys` is a closed set answers the same on metadata restricted to those keys;
//! the string form of a query (Kaa's UI) parses exactly like the object form.
#![no_main]

use epr_core::endpoint_filter::FilterSpec;
use epr_core::filter::Filter;
use epr_core::DomainError;
use epr_fuzz::{sample_metadata, split2};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let (query, extra) = split2(data);
    let Ok(query) = serde_json::from_slice::<Value>(query) else {
        return;
    };
    let filter = match Filter::parse(&query) {
        Ok(f) => f,
        Err(e) => {
            assert!(
                e.field.starts_with("mongoQuery"),
                "error field {:?}",
                e.field
            );
            assert!(!e.rule.is_empty());
            // The saved-filter path and its string form refuse it too, the same way (a
            // string query is itself the string form: FilterSpec unwraps it, by design).
            if query.is_string() {
                return;
            }
            let as_text = Value::String(query.to_string());
            for q in [&query, &as_text] {
                match FilterSpec::parse("n", "", q) {
                    Err(DomainError::Invalid(v)) => {
                        assert_eq!((v.field, v.rule), (e.field.clone(), e.rule))
                    }
                    other => panic!("Filter::parse refused but FilterSpec::parse gave {other:?}"),
                }
            }
            return;
        }
    };
    let spec = FilterSpec::parse("n", "", &Value::String(query.to_string()))
        .expect("the string form of a valid query is valid");
    let mut docs = sample_metadata();
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(extra) {
        docs.push(m);
    }
    let keys = filter.metadata_keys();
    for md in &docs {
        for version in ["demo-v1", "", "other"] {
            let hit = filter.matches(version, md);
            assert_eq!(
                hit,
                spec.compiled.matches(version, md),
                "string form differs"
            );
            if let Some(keys) = &keys {
                let restricted: Map<String, Value> = md
                    .iter()
                    .filter(|(k, _)| keys.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(
                    hit,
                    filter.matches(version, &restricted),
                    "metadata_keys {keys:?} is not all the filter reads"
                );
            }
        }
    }
});
