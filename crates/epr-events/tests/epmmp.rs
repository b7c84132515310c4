//! 19/EPMMP round trips against schemas parsed independently from the `.avsc` files: the
//! crate's encoding is read back with apache-avro and checked field by field in wire order,
//! and hand-built datums written with apache-avro are decoded by the crate.

#[macro_use]
mod common;

use apache_avro::types::Value;
use common::{b, branch, fields, map, s, strings, write};
use epr_events::epmmp::{
    decode_request, decode_request_envelope, decode_response, encode_request, encode_response,
    reply_subject, request_subject, Envelope, KeyUpdateCommand, Request, RequestType, Response,
    Status,
};
use epr_events::DecodeError;
use std::collections::BTreeMap;

const TS: i64 = 1_700_000_000_123;

/// A record's fields in wire order, as apache-avro reads them.
type Wire = Vec<(String, Value)>;

fn env(timeout: i64) -> Envelope {
    Envelope {
        correlation_id: "corr-19".into(),
        timestamp: TS,
        timeout,
    }
}

/// The envelope's three fields as they lead every 19/EPMMP record.
fn env_fields(timeout: i64) -> Wire {
    fields(&[
        ("correlationId", s("corr-19")),
        ("timestamp", Value::Long(TS)),
        ("timeout", Value::Long(timeout)),
    ])
}

fn request_file(t: RequestType) -> &'static str {
    match t {
        RequestType::MetadataGet => "0019-endpoint-metadata-get-request.avsc",
        RequestType::MetadataPatch => "0019-endpoint-metadata-patch-request.avsc",
        RequestType::KeyUpdate => "0019-endpoint-metadata-key-update-request.avsc",
        RequestType::KeyBatchUpdate => "0019-endpoint-metadata-key-batch-update-request.avsc",
        RequestType::KeysGet => "0019-endpoint-metadata-keys-get-request.avsc",
        RequestType::AppVersionsGet => "0019-endpoints-app-version-request.avsc",
    }
}

fn response_file(t: RequestType) -> &'static str {
    match t {
        RequestType::MetadataGet => "0019-endpoint-metadata-get-response.avsc",
        RequestType::MetadataPatch => "0019-endpoint-metadata-patch-response.avsc",
        RequestType::KeyUpdate => "0019-endpoint-metadata-key-update-response.avsc",
        RequestType::KeyBatchUpdate => "0019-endpoint-metadata-key-batch-update-response.avsc",
        RequestType::KeysGet => "0019-endpoint-metadata-keys-get-response.avsc",
        RequestType::AppVersionsGet => "0019-endpoints-app-version-response.avsc",
    }
}

const PATCH: &[u8] = br#"[{"op":"add","path":"/a","value":1}]"#;

/// Each request with its body fields in wire order (after the envelope).
fn request_cases() -> Vec<(Request, Wire)> {
    let command = |ep: &str, key: &str, value: &[u8]| {
        Value::Record(fields(&[
            ("endpointId", s(ep)),
            ("metadataKey", s(key)),
            ("metadataValue", b(value)),
        ]))
    };
    vec![
        (
            Request::MetadataGet {
                endpoint_id: "ep-1".into(),
                include: vec!["a".into(), "b.c".into()],
                include_metadata: false,
            },
            fields(&[
                ("endpointId", s("ep-1")),
                ("include", strings(&["a", "b.c"])),
                ("includeMetadata", Value::Boolean(false)),
            ]),
        ),
        (
            Request::MetadataGet {
                endpoint_id: "ep-2".into(),
                include: vec![],
                include_metadata: true,
            },
            fields(&[
                ("endpointId", s("ep-2")),
                ("include", strings(&[])),
                ("includeMetadata", Value::Boolean(true)),
            ]),
        ),
        (
            Request::MetadataPatch {
                endpoint_id: "ep-1".into(),
                if_match: Some("\"v7\"".into()),
                patch: PATCH.to_vec(),
            },
            fields(&[
                ("endpointId", s("ep-1")),
                ("ifMatch", branch(1, s("\"v7\""))),
                ("patch", b(PATCH)),
            ]),
        ),
        (
            Request::MetadataPatch {
                endpoint_id: "ep-1".into(),
                if_match: None,
                patch: vec![],
            },
            fields(&[
                ("endpointId", s("ep-1")),
                ("ifMatch", branch(0, Value::Null)),
                ("patch", b(b"")),
            ]),
        ),
        (
            Request::KeyUpdate {
                endpoint_id: "ep-1".into(),
                key: "location".into(),
                value: br#"{"lat":1.5}"#.to_vec(),
            },
            fields(&[
                ("endpointId", s("ep-1")),
                ("metadataKey", s("location")),
                ("metadataValue", b(br#"{"lat":1.5}"#)),
            ]),
        ),
        (
            Request::KeyBatchUpdate {
                commands: vec![
                    KeyUpdateCommand {
                        endpoint_id: "ep-1".into(),
                        key: "k".into(),
                        value: b"\"v\"".to_vec(),
                    },
                    KeyUpdateCommand {
                        endpoint_id: "ep-2".into(),
                        key: "n".into(),
                        value: b"42".to_vec(),
                    },
                ],
            },
            fields(&[(
                "commands",
                Value::Array(vec![
                    command("ep-1", "k", b"\"v\""),
                    command("ep-2", "n", b"42"),
                ]),
            )]),
        ),
        (
            Request::KeyBatchUpdate { commands: vec![] },
            fields(&[("commands", Value::Array(vec![]))]),
        ),
        (
            Request::KeysGet {
                endpoint_id: "ep-3".into(),
            },
            fields(&[("endpointId", s("ep-3"))]),
        ),
        (
            Request::AppVersionsGet {
                endpoint_ids: vec!["ep-1".into(), "ep-2".into(), "ep-1".into()],
            },
            fields(&[("endpointIds", strings(&["ep-1", "ep-2", "ep-1"]))]),
        ),
        (
            Request::AppVersionsGet {
                endpoint_ids: vec![],
            },
            fields(&[("endpointIds", strings(&[]))]),
        ),
    ]
}

/// Each response with its status and its fields after the envelope, in wire order.
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
            Response::MetadataGet {
                endpoint_id: "ep-1".into(),
                e_tag: Some("\"v7\"".into()),
                payload: Some(br#"{"a":1}"#.to_vec()),
                app_version_name: Some("demo-v2".into()),
            },
            fields(&[
                ("endpointId", s("ep-1")),
                ("eTag", branch(1, s("\"v7\""))),
                ("payload", branch(1, b(br#"{"a":1}"#))),
                ("statusCode", Value::Int(200)),
                ("reasonPhrase", branch(0, Value::Null)),
                ("appVersionName", branch(1, s("demo-v2"))),
            ]),
        ),
        (
            Status {
                code: 404,
                reason: Some("endpoint not found".into()),
            },
            Response::MetadataGet {
                endpoint_id: "ep-9".into(),
                e_tag: None,
                payload: None,
                app_version_name: None,
            },
            fields(&[
                ("endpointId", s("ep-9")),
                ("eTag", branch(0, Value::Null)),
                ("payload", branch(0, Value::Null)),
                ("statusCode", Value::Int(404)),
                ("reasonPhrase", branch(1, s("endpoint not found"))),
                ("appVersionName", branch(0, Value::Null)),
            ]),
        ),
        (
            Status::OK,
            Response::MetadataPatch {
                endpoint_id: "ep-1".into(),
            },
            ok(&[("endpointId", s("ep-1"))]),
        ),
        (
            Status {
                code: 403,
                reason: Some("restricted key".into()),
            },
            Response::KeyUpdate {
                endpoint_id: "ep-1".into(),
            },
            fields(&[
                ("endpointId", s("ep-1")),
                ("statusCode", Value::Int(403)),
                ("reasonPhrase", branch(1, s("restricted key"))),
            ]),
        ),
        (Status::OK, Response::KeyBatchUpdate, ok(&[])),
        (
            Status {
                code: -1,
                reason: Some(String::new()),
            },
            Response::KeyBatchUpdate,
            fields(&[
                ("statusCode", Value::Int(-1)),
                ("reasonPhrase", branch(1, s(""))),
            ]),
        ),
        (
            Status::OK,
            Response::KeysGet {
                endpoint_id: "ep-1".into(),
                keys: vec!["a".into(), "z".into()],
            },
            ok(&[("endpointId", s("ep-1")), ("keys", strings(&["a", "z"]))]),
        ),
        (
            Status::OK,
            Response::AppVersionsGet {
                endpoint_ids: vec!["ep-1".into(), "ep-2".into(), "ep-3".into()],
                app_versions_to_endpoints: BTreeMap::from([
                    ("demo-v1".into(), vec!["ep-1".into(), "ep-3".into()]),
                    ("demo-v2".into(), vec!["ep-2".into()]),
                    ("empty".into(), vec![]),
                ]),
            },
            ok(&[
                ("endpointIds", strings(&["ep-1", "ep-2", "ep-3"])),
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
    ]
}

fn with_env(timeout: i64, body: Wire) -> Wire {
    let mut f = env_fields(timeout);
    f.extend(body);
    f
}

#[test]
fn a_request_of_one_type_does_not_decode_as_another() {
    // KeysGet's datum is a prefix of MetadataGet's layout: decoding must see the cut.
    let keys_get = encode_request(
        &env(0),
        &Request::KeysGet {
            endpoint_id: "ep-1".into(),
        },
    )
    .unwrap();
    let err = decode_request(RequestType::MetadataGet, &keys_get).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
    // And MetadataGet's datum has bytes left over when read as KeysGet.
    let get = encode_request(&env(0), &request_cases()[0].0).unwrap();
    let err = decode_request(RequestType::KeysGet, &get).unwrap_err();
    assert!(matches!(err, DecodeError::TrailingBytes { .. }), "{err}");
}

#[test]
fn the_envelope_of_a_broken_request_can_still_be_read() {
    let payload = encode_request(&env(700), &request_cases()[2].0).unwrap();
    let cut = &payload[..payload.len() - 3];
    assert!(decode_request(RequestType::MetadataPatch, cut).is_err());
    assert_eq!(
        decode_request_envelope(RequestType::MetadataPatch, cut).unwrap(),
        env(700)
    );
    // Garbage after a readable envelope is fine too; a broken envelope is not.
    // KeysGet with an empty ID is the envelope plus one byte (the ID's zero length).
    let empty_id = Request::KeysGet {
        endpoint_id: String::new(),
    };
    let env_len = encode_request(&env(700), &empty_id).unwrap().len() - 1;
    let mut garbage = payload[..env_len].to_vec();
    garbage.extend([0xff; 8]);
    assert_eq!(
        decode_request_envelope(RequestType::MetadataPatch, &garbage).unwrap(),
        env(700)
    );
    assert!(matches!(
        decode_request_envelope(RequestType::MetadataPatch, &payload[..5]).unwrap_err(),
        DecodeError::Truncated { .. }
    ));
}

fn empty_id_field(t: RequestType) -> Option<&'static str> {
    match t {
        RequestType::KeyBatchUpdate | RequestType::AppVersionsGet => None,
        _ => Some("endpointId"),
    }
}

fn tokens() -> [(RequestType, &'static str, &'static str); 6] {
    [
        (
            RequestType::MetadataGet,
            "ep-metadata-get-request",
            "ep-metadata-get-response",
        ),
        (
            RequestType::MetadataPatch,
            "ep-metadata-patch-request",
            "ep-metadata-patch-response",
        ),
        (
            RequestType::KeyUpdate,
            "ep-metadata-key-update-request",
            "ep-metadata-key-update-response",
        ),
        (
            RequestType::KeyBatchUpdate,
            "ep-metadata-key-batch-update-request",
            "ep-metadata-key-batch-update-response",
        ),
        (
            RequestType::KeysGet,
            "ep-metadata-keys-get-request",
            "ep-metadata-keys-get-response",
        ),
        (
            RequestType::AppVersionsGet,
            "ep-app-version-get-request",
            "ep-app-version-get-response",
        ),
    ]
}

request_reply_tests!("epmmp");

#[test]
fn envelope_expiry() {
    let e = |timestamp, timeout| Envelope {
        correlation_id: String::new(),
        timestamp,
        timeout,
    };
    // 0 never expires, whatever the clock says; so does a negative timeout.
    assert!(!e(1_000, 0).expired(i64::MAX));
    assert!(!e(i64::MIN, 0).expired(i64::MAX));
    assert!(!e(1_000, -5).expired(i64::MAX));
    // Valid up to and including timestamp + timeout.
    assert!(!e(1_000, 100).expired(0));
    assert!(!e(1_000, 100).expired(1_000));
    assert!(!e(1_000, 100).expired(1_100));
    assert!(e(1_000, 100).expired(1_101));
    assert!(e(1_000, 1).expired(i64::MAX));
    // No overflow panic at the edges.
    assert!(!e(i64::MAX, i64::MAX).expired(i64::MAX));
    assert!(e(i64::MIN, 1).expired(i64::MIN + 2));
}

#[test]
fn bad_union_index_and_invalid_utf8_are_malformed() {
    let (_, _, wire) = response_cases().remove(0);
    let good = write(response_file(RequestType::MetadataGet), with_env(0, wire));
    assert!(decode_response(RequestType::MetadataGet, &good).is_ok());

    // The eTag union index follows the envelope and the endpoint ID "ep-1" (5 bytes).
    let empty_id = Request::KeysGet {
        endpoint_id: String::new(),
    };
    let env_len = encode_request(&env(0), &empty_id).unwrap().len() - 1;
    let union_at = env_len + 5;
    assert_eq!(good[union_at], 2, "branch 1 zig-zag encoded");
    let mut bad_union = good.clone();
    bad_union[union_at] = 4; // branch 2 of a two-branch union
    let err = decode_response(RequestType::MetadataGet, &bad_union).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");

    let mut bad_utf8 = good.clone();
    bad_utf8[env_len + 1] = 0xff; // first byte of "ep-1"
    let err = decode_response(RequestType::MetadataGet, &bad_utf8).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
}
