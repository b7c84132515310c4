//! 16/ECAP (endpoint tokens) against schemas parsed independently from the `.avsc` files:
//! requests and responses both ways, field by field in wire order; the `revoked` event and
//! the extension `status-changed` event, encoded from outbox events and decoded again.

#[macro_use]
mod common;

use apache_avro::types::Value;
use common::{branch, fields, read, s, strings, write};
use epr_core::credentials::TokenStatus;
use epr_core::event::{OutboxEvent, TokenEvent, TokenEventKind};
use epr_core::ids::{AppName, EndpointId, TenantId, TokenId};
use epr_core::Timestamp;
use epr_events::ecap::{
    decode_request, decode_request_envelope, decode_response, decode_revoked,
    decode_status_changed, encode_request, encode_response, encode_revoked, encode_status_changed,
    event_subject, reply_subject, request_subject, Envelope, Request, RequestType, Response,
    Status, TokenRevokedEvent, TokenStatusChangedEvent,
};
use epr_events::{encode_outbox, EncodeError, Originator};

const TS: i64 = 1_700_000_000_123;

/// A record's fields in wire order, as apache-avro reads them.
type Wire = Vec<(String, Value)>;

fn env(timeout: i64) -> Envelope {
    Envelope {
        correlation_id: "corr-16".into(),
        timestamp: TS,
        timeout,
    }
}

fn with_env(timeout: i64, body: Wire) -> Wire {
    let mut f = fields(&[
        ("correlationId", s("corr-16")),
        ("timestamp", Value::Long(TS)),
        ("timeout", Value::Long(timeout)),
    ]);
    f.extend(body);
    f
}

fn request_file(t: RequestType) -> &'static str {
    match t {
        RequestType::TokenValidation => "0016-endpoint-token-validation-request.avsc",
        RequestType::TokenStatusTransition => "0016-endpoint-token-status-transition-request.avsc",
    }
}

fn response_file(t: RequestType) -> &'static str {
    match t {
        RequestType::TokenValidation => "0016-endpoint-token-validation-response.avsc",
        RequestType::TokenStatusTransition => "0016-endpoint-token-status-transition-response.avsc",
    }
}

fn request_cases() -> Vec<(Request, Wire)> {
    vec![
        (
            Request::TokenValidation {
                app_name: "demo".into(),
                token: "tok-Ω-1".into(),
            },
            fields(&[("appName", s("demo")), ("token", s("tok-Ω-1"))]),
        ),
        (
            Request::TokenValidation {
                app_name: String::new(),
                token: String::new(),
            },
            fields(&[("appName", s("")), ("token", s(""))]),
        ),
        (
            Request::TokenStatusTransition {
                app_name: "demo".into(),
                token: "tok-1".into(),
                target_status: "Suspended".into(),
            },
            fields(&[
                ("appName", s("demo")),
                ("token", s("tok-1")),
                ("targetStatus", s("Suspended")),
            ]),
        ),
    ]
}

/// Each response with its status and its fields after the envelope, in wire order (the body
/// before the status, as the validation schema has it).
fn response_cases() -> Vec<(Status, Response, Wire)> {
    vec![
        (
            Status::OK,
            Response::TokenValidation {
                token_id: Some("t-1".into()),
                endpoint_id: Some("ep-1".into()),
            },
            fields(&[
                ("tokenId", branch(0, s("t-1"))),
                ("endpointId", branch(0, s("ep-1"))),
                ("statusCode", Value::Int(200)),
                ("reasonPhrase", branch(0, Value::Null)),
            ]),
        ),
        (
            Status {
                code: 404,
                reason: Some("unknown token".into()),
            },
            Response::TokenValidation {
                token_id: None,
                endpoint_id: None,
            },
            fields(&[
                ("tokenId", branch(1, Value::Null)),
                ("endpointId", branch(1, Value::Null)),
                ("statusCode", Value::Int(404)),
                ("reasonPhrase", branch(1, s("unknown token"))),
            ]),
        ),
        (
            Status::OK,
            Response::TokenStatusTransition,
            fields(&[
                ("statusCode", Value::Int(200)),
                ("reasonPhrase", branch(0, Value::Null)),
            ]),
        ),
        (
            Status {
                code: 409,
                reason: Some("the token is revoked".into()),
            },
            Response::TokenStatusTransition,
            fields(&[
                ("statusCode", Value::Int(409)),
                ("reasonPhrase", branch(1, s("the token is revoked"))),
            ]),
        ),
    ]
}

/// No ID field of an error body is an empty string: the validation response's are `null`.
fn empty_id_field(_t: RequestType) -> Option<&'static str> {
    None
}

fn tokens() -> [(RequestType, &'static str, &'static str); 2] {
    [
        (
            RequestType::TokenValidation,
            "ep-token-request",
            "ep-token-response",
        ),
        (
            RequestType::TokenStatusTransition,
            "ep-token-status-transition-request",
            "ep-token-status-transition-response",
        ),
    ]
}

request_reply_tests!("ecap");

#[test]
fn an_error_validation_reply_has_null_ids() {
    let status = Status {
        code: 400,
        reason: Some("undecodable".into()),
    };
    let payload = encode_response(
        &env(0),
        &status,
        &Response::empty(RequestType::TokenValidation),
    )
    .unwrap();
    let wire = read(response_file(RequestType::TokenValidation), &payload);
    assert_eq!(wire[3], ("tokenId".into(), branch(1, Value::Null)));
    assert_eq!(wire[4], ("endpointId".into(), branch(1, Value::Null)));
}

#[test]
fn the_envelope_of_a_broken_request_can_still_be_read() {
    let req = Request::TokenStatusTransition {
        app_name: "demo".into(),
        token: "tok".into(),
        target_status: "Active".into(),
    };
    let payload = encode_request(&env(700), &req).unwrap();
    let cut = &payload[..payload.len() - 2];
    assert!(decode_request(RequestType::TokenStatusTransition, cut).is_err());
    assert_eq!(
        decode_request_envelope(RequestType::TokenStatusTransition, cut).unwrap(),
        env(700)
    );
}

fn origin() -> Originator {
    Originator {
        instance_name: "epr".into(),
        replica_id: "epr-replica-7".into(),
    }
}

fn token_event(kind: TokenEventKind) -> OutboxEvent {
    OutboxEvent::Token(TokenEvent {
        tenant: TenantId::parse("kaa").unwrap(),
        app: AppName::parse("demo").unwrap(),
        endpoint_id: EndpointId::parse("ep-1").unwrap(),
        kind,
        correlation_id: "corr-ev".into(),
        timestamp: Timestamp(TS),
    })
}

fn id(s: &str) -> TokenId {
    TokenId::parse(s).unwrap()
}

#[test]
fn a_revoked_outbox_event_is_16_ecap_revoked() {
    let ev = token_event(TokenEventKind::Revoked {
        token_ids: vec![id("t-1"), id("t-2")],
    });
    let enc = encode_outbox(&ev, &origin()).unwrap();
    assert_eq!(enc.subject, "kaa.v1.events.epr.endpoint.token.revoked");
    assert_eq!(
        read("0016-endpoint-token-revoked.avsc", &enc.payload),
        fields(&[
            ("correlationId", s("corr-ev")),
            ("timestamp", Value::Long(TS)),
            ("timeout", Value::Long(0)),
            ("appName", s("demo")),
            ("endpointId", s("ep-1")),
            ("tokenIds", strings(&["t-1", "t-2"])),
            ("originatorReplicaId", s("epr-replica-7")),
        ])
    );
    let (decoded, replica) = decode_revoked(&enc.payload).unwrap();
    assert_eq!(replica, "epr-replica-7");
    assert_eq!(
        decoded,
        TokenRevokedEvent {
            correlation_id: "corr-ev".into(),
            timestamp: TS,
            app_name: "demo".into(),
            endpoint_id: "ep-1".into(),
            token_ids: vec!["t-1".into(), "t-2".into()],
        }
    );
}

#[test]
fn a_status_change_is_the_extension_event() {
    let file = "ext/epr-endpoint-token-status-changed.avsc";
    for (previous, status) in [
        (None, TokenStatus::Inactive),
        (Some(TokenStatus::Inactive), TokenStatus::Active),
        (Some(TokenStatus::Active), TokenStatus::Suspended),
        (Some(TokenStatus::Suspended), TokenStatus::Active),
    ] {
        let ev = token_event(TokenEventKind::StatusChanged {
            token_id: id("t-9"),
            previous,
            status,
        });
        let enc = encode_outbox(&ev, &origin()).unwrap();
        assert_eq!(
            enc.subject,
            "kaa.v1.events.epr.endpoint.token.status-changed"
        );
        let previous_wire = match previous {
            None => branch(0, Value::Null),
            Some(p) => branch(1, s(p.as_str())),
        };
        assert_eq!(
            read(file, &enc.payload),
            fields(&[
                ("correlationId", s("corr-ev")),
                ("timestamp", Value::Long(TS)),
                ("timeout", Value::Long(0)),
                ("appName", s("demo")),
                ("endpointId", s("ep-1")),
                ("tokenId", s("t-9")),
                ("previousStatus", previous_wire),
                ("status", s(status.as_str())),
                ("originatorReplicaId", s("epr-replica-7")),
            ])
        );
        let (decoded, _) = decode_status_changed(&enc.payload).unwrap();
        assert_eq!(
            decoded,
            TokenStatusChangedEvent {
                correlation_id: "corr-ev".into(),
                timestamp: TS,
                app_name: "demo".into(),
                endpoint_id: "ep-1".into(),
                token_id: "t-9".into(),
                previous_status: previous.map(|p| p.as_str().to_owned()),
                status: status.as_str().into(),
            }
        );
    }
}

#[test]
fn independently_written_events_decode() {
    let payload = write(
        "0016-endpoint-token-revoked.avsc",
        fields(&[
            ("correlationId", s("c")),
            ("timestamp", Value::Long(1)),
            ("timeout", Value::Long(5)),
            ("appName", s("a")),
            ("endpointId", s("e")),
            ("tokenIds", strings(&[])),
            ("originatorReplicaId", s("r")),
        ]),
    );
    let (ev, replica) = decode_revoked(&payload).unwrap();
    assert_eq!((ev.token_ids.len(), replica.as_str()), (0, "r"));
    common::assert_exact_datum("revoked", &payload, decode_revoked);

    let payload = write(
        "ext/epr-endpoint-token-status-changed.avsc",
        fields(&[
            ("correlationId", s("c")),
            ("timestamp", Value::Long(1)),
            ("timeout", Value::Long(0)),
            ("appName", s("a")),
            ("endpointId", s("e")),
            ("tokenId", s("t")),
            ("previousStatus", branch(1, s("Active"))),
            ("status", s("Suspended")),
            ("originatorReplicaId", s("r")),
        ]),
    );
    let (ev, _) = decode_status_changed(&payload).unwrap();
    assert_eq!(ev.previous_status.as_deref(), Some("Active"));
    common::assert_exact_datum("status-changed", &payload, decode_status_changed);
}

#[test]
fn event_subjects_and_instance_names() {
    assert_eq!(
        event_subject("epr-acme", "revoked"),
        "kaa.v1.events.epr-acme.endpoint.token.revoked"
    );
    let bad = Originator {
        instance_name: "a.b".into(),
        replica_id: "r".into(),
    };
    let revoked = TokenRevokedEvent {
        correlation_id: "c".into(),
        timestamp: 1,
        app_name: "a".into(),
        endpoint_id: "e".into(),
        token_ids: vec![],
    };
    assert!(matches!(
        encode_revoked(&revoked, &bad),
        Err(EncodeError::InvalidInstanceName { .. })
    ));
    let changed = TokenStatusChangedEvent {
        correlation_id: "c".into(),
        timestamp: 1,
        app_name: "a".into(),
        endpoint_id: "e".into(),
        token_id: "t".into(),
        previous_status: None,
        status: "Inactive".into(),
    };
    assert!(matches!(
        encode_status_changed(&changed, &bad),
        Err(EncodeError::InvalidInstanceName { .. })
    ));
}
