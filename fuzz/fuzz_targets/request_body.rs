//! Request bodies of the REST API: body bytes to the DTOs of `epr_http::dto` (via
//! `extract::parse_object` / `parse_json`, as the handlers do), then the validation that
//! turns them into domain requests (identifiers, tokens, metadata, filter definitions,
//! JSON Patch documents). Input: one byte choosing the body kind, then the body.
//!
//! Invariants: no panic; a refused body is a 400 naming a field and a rule.
#![no_main]

use epr_core::endpoint_filter::FilterSpec;
use epr_core::ids::{AppVersionName, EndpointId, EndpointToken};
use epr_core::metadata::{Limits, Metadata};
use epr_core::registry::FilterInput;
use epr_core::DomainError;
use epr_fuzz::assert_valid_metadata;
use epr_http::dto;
use epr_http::error::ApiError;
use epr_http::extract::{parse_json, parse_object};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn refused(e: ApiError) {
    assert_eq!(e.status.as_u16(), 400, "{e:?}");
    assert!(e.field.as_deref().is_some_and(|f| !f.is_empty()), "{e:?}");
    assert!(e.rule.as_deref().is_some_and(|r| !r.is_empty()), "{e:?}");
}

fn metadata(v: Option<Value>, limits: &Limits) {
    if let Some(v) = v.filter(|v| !v.is_null()) {
        match Metadata::parse(v, "metadata", limits) {
            Ok(md) => assert_valid_metadata(&md, limits),
            Err(DomainError::Invalid(_) | DomainError::TooLarge { .. }) => {}
            Err(other) => panic!("unexpected metadata error {other:?}"),
        }
    }
}

fn registration(id: Option<&str>, token: Option<&str>, md: Option<Value>, limits: &Limits) {
    if let Some(id) = id {
        if let Ok(id) = EndpointId::parse(id) {
            assert_eq!(EndpointId::parse(id.as_str()).ok(), Some(id));
        }
    }
    if let Some(t) = token {
        let _ = EndpointToken::parse(t);
    }
    metadata(md, limits);
}

fn filter(input: FilterInput) {
    if let (Some(name), Some(query)) = (input.name, input.mongo_query) {
        let _ = FilterSpec::parse(&name, input.description.as_deref().unwrap_or(""), &query);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let limits = Limits::default();
    match selector % 8 {
        0 => match parse_object::<dto::RegisterBody>(body) {
            Ok(b) => {
                if let Some(v) = b.app_version.and_then(|a| a.name) {
                    let _ = AppVersionName::parse(&v);
                }
                registration(
                    b.endpoint_id.as_deref(),
                    b.endpoint_token.as_deref(),
                    b.metadata,
                    &limits,
                );
            }
            Err(e) => refused(e),
        },
        1 => match parse_object::<dto::BatchBody>(body) {
            Ok(b) => {
                for e in b.endpoints.unwrap_or_default() {
                    registration(
                        e.endpoint_id.as_deref(),
                        e.endpoint_token.as_deref(),
                        e.metadata,
                        &limits,
                    );
                }
            }
            Err(e) => refused(e),
        },
        2 => match parse_object::<dto::AppVersionBody>(body) {
            Ok(b) => {
                if let Some(v) = b.name {
                    let _ = AppVersionName::parse(&v);
                }
            }
            Err(e) => refused(e),
        },
        3 => match parse_object::<dto::CreateFilterBody>(body) {
            Ok(b) => filter(b.into()),
            Err(e) => refused(e),
        },
        4 => match parse_object::<dto::PatchFilterBody>(body) {
            Ok(b) => filter(FilterInput {
                name: b.name.flatten(),
                description: b.description.flatten(),
                mongo_query: b.mongo_query.flatten(),
            }),
            Err(e) => refused(e),
        },
        5 => match parse_json::<json_patch::Patch>(body) {
            Ok(p) => {
                let _ = serde_json::to_string(&p).expect("a patch serialises");
            }
            Err(e) => refused(e),
        },
        // PUT /endpoints/{id}/metadata and PATCH with a merge patch: any JSON value.
        _ => match parse_json::<Value>(body) {
            Ok(v) => metadata(Some(v), &limits),
            Err(e) => refused(e),
        },
    }
});
