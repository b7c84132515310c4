//! Metadata changes: RFC 6902 JSON Patch, RFC 7396 merge patch and single-key writes
//! applied to a metadata document. Input: one byte choosing the limits, the current
//! document as JSON, a NUL byte, then the patch as JSON.
//!
//! Invariants: no panic, bounded time and memory whatever the patch does (`copy` doubles a
//! document); a change either fails or gives valid metadata within the limits.
#![no_main]

use epr_core::command::{apply_change, MetadataChange};
use epr_core::metadata::{Metadata, MetadataKey};
use epr_fuzz::{assert_valid_metadata, limits, split2};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let limits = limits(selector);
    let (current, patch) = split2(rest);
    let current = serde_json::from_slice::<Value>(current)
        .ok()
        .and_then(|v| Metadata::parse(v, "metadata", &limits).ok())
        .unwrap_or_default();
    let Ok(patch) = serde_json::from_slice::<Value>(patch) else {
        return;
    };
    let mut changes = vec![MetadataChange::MergePatch(patch.clone())];
    if let Ok(p) = serde_json::from_value::<json_patch::Patch>(patch.clone()) {
        changes.push(MetadataChange::JsonPatch(p));
    }
    if let Ok(key) = MetadataKey::parse("k", &limits) {
        changes.push(MetadataChange::PutKey(key, patch));
    }
    for change in &changes {
        if let Ok(md) = apply_change(&current, change, &limits) {
            assert_valid_metadata(&md, &limits);
        }
    }
});
