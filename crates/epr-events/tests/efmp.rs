//! 20/EFMP round trips against schemas parsed independently from the `.avsc` files: the
//! crate's encoding is read back with apache-avro and checked field by field in wire order,
//! and hand-built datums written with apache-avro are decoded by the crate. Also checks
//! `list_by_filter_response_size` against real encodings.

#[macro_use]
mod common;

use apache_avro::types::Value;
use common::{branch, fields, map, s, strings};
use epr_events::efmp::{
    decode_request, decode_request_envelope, decode_response, encode_request, encode_response,
    list_by_filter_response_size, reply_subject, request_subject, Envelope, Request, RequestType,
    Response, Status,
};
use epr_events::DecodeError;
use proptest::prelude::*;
use std::collections::BTreeMap;

const TS: i64 = 1_700_000_000_123;

/// A record's fields in wire order, as apache-avro reads them.
type Wire = Vec<(String, Value)>;

fn env(timeout: i64) -> Envelope {
    Envelope {
        correlation_id: "corr-20".into(),
        timestamp: TS,
        timeout,
    }
}

fn with_env(timeout: i64, body: Wire) -> Wire {
    let mut f = fields(&[
        ("correlationId", s("corr-20")),
        ("timestamp", Value::Long(TS)),
        ("timeout", Value::Long(timeout)),
    ]);
    f.extend(body);
    f
}

fn request_file(t: RequestType) -> &'static str {
    match t {
        RequestType::EndpointFilters => "0020-endpoint-filters-request.avsc",
        RequestType::ListByFilter => "0020-endpoint-list-by-filter-request.avsc",
    }
}

fn response_file(t: RequestType) -> &'static str {
    match t {
        RequestType::EndpointFilters => "0020-endpoint-filters-response.avsc",
        RequestType::ListByFilter => "0020-endpoint-list-by-filter-response.avsc",
    }
}

fn request_cases() -> Vec<(Request, Wire)> {
    vec![
        (
            Request::EndpointFilters {
                endpoint_id: "ep-1.a_b~c".into(),
            },
            fields(&[("endpointId", s("ep-1.a_b~c"))]),
        ),
        (
            Request::EndpointFilters {
                endpoint_id: String::new(),
            },
            fields(&[("endpointId", s(""))]),
        ),
        (
            Request::ListByFilter {
                filter_id: "f-1".into(),
            },
            fields(&[("filterId", s("f-1"))]),
        ),
    ]
}

/// Each response with its status and its fields after the envelope, in wire order (the body
/// before the status, as both schemas have it).
fn response_cases() -> Vec<(Status, Response, Wire)> {
    let ok = |wire: &[(&str, Value)]| {
        let mut f = fields(wire);
        f.push(("statusCode".into(), Value::Int(200)));
        f.push(("reasonPhrase".into(), branch(0, Value::Null)));
        f
    };
    vec![
        (
            Status::OK,
            Response::EndpointFilters {
                endpoint_id: "ep-1".into(),
                filter_ids: vec!["f-1".into(), "f-2".into()],
            },
            ok(&[
                ("endpointId", s("ep-1")),
                ("filterIds", strings(&["f-1", "f-2"])),
            ]),
        ),
        (
            Status {
                code: 404,
                reason: Some("endpoint not found".into()),
            },
            Response::EndpointFilters {
                endpoint_id: "ep-9".into(),
                filter_ids: vec![],
            },
            fields(&[
                ("endpointId", s("ep-9")),
                ("filterIds", strings(&[])),
                ("statusCode", Value::Int(404)),
                ("reasonPhrase", branch(1, s("endpoint not found"))),
            ]),
        ),
        (
            Status::OK,
            Response::ListByFilter {
                filter_id: "f-1".into(),
                app_versions_to_endpoints: BTreeMap::from([
                    ("demo-v1".into(), vec!["ep-1".into(), "ep-3".into()]),
                    ("demo-v2".into(), vec!["ep-2".into()]),
                    ("empty".into(), vec![]),
                ]),
            },
            ok(&[
                ("filterId", s("f-1")),
                (
                    "appVersionsToEndpoints",
                    map(&[
                        ("demo-v1", strings(&["ep-1", "ep-3"])),
                        ("demo-v2", strings(&["ep-2"])),
                        ("empty", strings(&[])),
                    ]),
                ),
            ]),
        ),
        (
            Status {
                code: 413,
                reason: Some("reply exceeds the NATS max payload".into()),
            },
            Response::ListByFilter {
                filter_id: "f-big".into(),
                app_versions_to_endpoints: BTreeMap::new(),
            },
            fields(&[
                ("filterId", s("f-big")),
                ("appVersionsToEndpoints", map(&[])),
                ("statusCode", Value::Int(413)),
                (
                    "reasonPhrase",
                    branch(1, s("reply exceeds the NATS max payload")),
                ),
            ]),
        ),
    ]
}

#[test]
fn the_envelope_types_are_epmmps() {
    // One type, re-exported: a server can share its envelope handling between protocols.
    let e: epr_events::epmmp::Envelope = env(1);
    let s: epr_events::epmmp::Status = Status::OK;
    assert_eq!(e, env(1));
    assert_eq!(s, epr_events::epmmp::Status::OK);
}

#[test]
fn the_envelope_of_a_broken_request_can_still_be_read() {
    let req = Request::ListByFilter {
        filter_id: "f-1".into(),
    };
    let payload = encode_request(&env(700), &req).unwrap();
    let cut = &payload[..payload.len() - 2];
    assert!(decode_request(RequestType::ListByFilter, cut).is_err());
    assert_eq!(
        decode_request_envelope(RequestType::ListByFilter, cut).unwrap(),
        env(700)
    );
    let mut garbage = cut.to_vec();
    garbage.extend([0xff; 8]);
    assert_eq!(
        decode_request_envelope(RequestType::EndpointFilters, &garbage).unwrap(),
        env(700)
    );
    assert!(matches!(
        decode_request_envelope(RequestType::ListByFilter, &payload[..5]).unwrap_err(),
        DecodeError::Truncated { .. }
    ));
}

fn empty_id_field(t: RequestType) -> Option<&'static str> {
    Some(match t {
        RequestType::EndpointFilters => "endpointId",
        RequestType::ListByFilter => "filterId",
    })
}

fn tokens() -> [(RequestType, &'static str, &'static str); 2] {
    [
        (
            RequestType::EndpointFilters,
            "ep-filters-request",
            "ep-filters-response",
        ),
        (
            RequestType::ListByFilter,
            "ep-list-by-filter-request",
            "ep-list-by-filter-response",
        ),
    ]
}

request_reply_tests!("efmp");

fn list_by_filter_size(env: &Envelope, status: &Status, body: &Response) -> usize {
    let Response::ListByFilter {
        filter_id,
        app_versions_to_endpoints,
    } = body
    else {
        panic!("not a list-by-filter response: {body:?}");
    };
    list_by_filter_response_size(env, status, filter_id, app_versions_to_endpoints)
}

#[test]
fn list_by_filter_size_matches_the_cases() {
    for (status, resp, _) in response_cases() {
        if resp.request_type() != RequestType::ListByFilter {
            continue;
        }
        for e in [env(0), env(i64::MAX), env(-1)] {
            let payload = encode_response(&e, &status, &resp).unwrap();
            assert_eq!(list_by_filter_size(&e, &status, &resp), payload.len());
        }
    }
}

/// The situation the size function exists for: a filter matching ~30,000 endpoints (UUIDs)
/// does not fit NATS's default 1 MiB max payload, and the size says so exactly.
#[test]
fn a_large_filter_exceeds_the_default_max_payload() {
    const MAX_PAYLOAD: usize = 1024 * 1024;
    let endpoints = |version: usize| {
        (0..10_000)
            .map(|i| format!("{version:08x}-0000-4000-8000-{i:012x}"))
            .collect::<Vec<_>>()
    };
    let body = Response::ListByFilter {
        filter_id: "f-all".into(),
        app_versions_to_endpoints: (0..3)
            .map(|v| (format!("app-v{v}"), endpoints(v)))
            .collect(),
    };
    let size = list_by_filter_size(&env(0), &Status::OK, &body);
    assert!(size > MAX_PAYLOAD, "{size}");
    assert_eq!(
        size,
        encode_response(&env(0), &Status::OK, &body).unwrap().len()
    );
}

fn text() -> impl Strategy<Value = String> {
    // Includes multi-byte characters and the empty string.
    "\\PC{0,12}"
}

fn status() -> impl Strategy<Value = Status> {
    (
        prop_oneof![Just(200), Just(413), any::<i32>()],
        proptest::option::of(text()),
    )
        .prop_map(|(code, reason)| Status { code, reason })
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (text(), any::<i64>(), any::<i64>()).prop_map(|(correlation_id, timestamp, timeout)| Envelope {
        correlation_id,
        timestamp,
        timeout,
    })
}

proptest! {
    // Fewer cases than the default 256: each one builds up to ~500 strings.
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn list_by_filter_size_is_the_encoded_length(
        env in envelope(),
        status in status(),
        filter_id in text(),
        map in proptest::collection::btree_map(
            text(),
            // Up to 80 endpoints: the array count needs a 2-byte varint from 64 items on.
            proptest::collection::vec(text(), 0..80),
            0..6,
        ),
    ) {
        let body = Response::ListByFilter { filter_id, app_versions_to_endpoints: map };
        let payload = encode_response(&env, &status, &body).unwrap();
        prop_assert_eq!(list_by_filter_size(&env, &status, &body), payload.len());
        let decoded = decode_response(RequestType::ListByFilter, &payload).unwrap();
        prop_assert_eq!(decoded, (env, status, body));
    }

    #[test]
    fn arbitrary_endpoint_filters_responses_round_trip(
        env in envelope(),
        status in status(),
        endpoint_id in text(),
        filter_ids in proptest::collection::vec(text(), 0..8),
    ) {
        let body = Response::EndpointFilters { endpoint_id, filter_ids };
        let payload = encode_response(&env, &status, &body).unwrap();
        prop_assert_eq!(
            decode_response(RequestType::EndpointFilters, &payload).unwrap(),
            (env, status, body)
        );
    }
}
