//! The `metadataFilter` query parameter of endpoint listings. Input: the parameter's text.
//!
//! Invariants: no panic; errors name `metadataFilter`; `key!=v` is exactly the negation of
//! `key=v`, and `!key` of `key`.
#![no_main]

use epr_core::query::MetadataCondition;
use epr_fuzz::sample_metadata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let conds = match MetadataCondition::parse_param(text) {
        Ok(c) => c,
        Err(e) => {
            assert_eq!(e.field, "metadataFilter");
            return;
        }
    };
    for md in sample_metadata() {
        for c in &conds {
            let hit = c.matches(&md);
            let opposite = match c.clone() {
                MetadataCondition::Exists(k) => MetadataCondition::Absent(k),
                MetadataCondition::Absent(k) => MetadataCondition::Exists(k),
                MetadataCondition::Equals(k, v) => MetadataCondition::NotEquals(k, v),
                MetadataCondition::NotEquals(k, v) => MetadataCondition::Equals(k, v),
            };
            assert_ne!(hit, opposite.matches(&md), "{c:?} and its negation agree");
        }
    }
});
