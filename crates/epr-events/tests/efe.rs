//! 18/EFE round trips against schemas parsed independently from the `.avsc` files: the
//! crate's encoding is read back with apache-avro and checked field by field in wire order,
//! and hand-built datums written with apache-avro are decoded by the crate. Domain filter
//! events from the outbox go through the same encoders (`encode_outbox`).

mod common;

use apache_avro::types::Value;
use common::{branch, fields, read, s, write};
use epr_core::endpoint_filter::FilterId;
use epr_core::event::{DomainEvent, EventKind, FilterEvent, OutboxEvent};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::Timestamp;
use epr_events::efe::{
    decode_endpoint_filter, decode_filter_status, encode_endpoint_filter, encode_filter_status,
    endpoint_filter_token, matched_from_token, EndpointFilterEvent, FilterEventKind,
    FilterStatusEvent,
};
use epr_events::{encode_outbox, EncodeError, Originator};

const TS: i64 = 1_700_000_000_123;
const FILTER: &str = "4f1c7b2e-9a1d-4a43-8d6e-0c5b0e9f1a22";

/// A record's fields in wire order, as apache-avro reads them.
type Wire = Vec<(String, Value)>;

fn origin() -> Originator {
    Originator {
        instance_name: "epr".into(),
        replica_id: "epr-replica-7".into(),
    }
}

fn status_file(kind: FilterEventKind) -> &'static str {
    match kind {
        FilterEventKind::Pending => "0018-epf-pending.avsc",
        FilterEventKind::Activated => "0018-epf-activated.avsc",
        FilterEventKind::Deleted => "0018-epf-deleted.avsc",
    }
}

fn endpoint_file(matched: bool) -> &'static str {
    if matched {
        "0018-epf-ep-matched.avsc"
    } else {
        "0018-epf-ep-unmatched.avsc"
    }
}

fn status_event(kind: FilterEventKind, filter_name: Option<&str>) -> FilterStatusEvent {
    FilterStatusEvent {
        correlation_id: "corr-18".into(),
        timestamp: TS,
        filter_id: FILTER.into(),
        application_name: "smart-kettle".into(),
        filter_name: filter_name.map(str::to_owned),
        kind,
    }
}

fn endpoint_event(matched: bool, filter_name: Option<&str>) -> EndpointFilterEvent {
    EndpointFilterEvent {
        correlation_id: "corr-18".into(),
        timestamp: TS,
        filter_id: FILTER.into(),
        application_name: "smart-kettle".into(),
        app_version_name: "smart-kettle-v3".into(),
        filter_name: filter_name.map(str::to_owned),
        endpoint_id: "ep-1.a_b~c".into(),
        matched,
    }
}

/// `filterName` is `["null","string"]` without a default: always on the wire.
fn name_value(filter_name: Option<&str>) -> Value {
    match filter_name {
        Some(name) => branch(1, s(name)),
        None => branch(0, Value::Null),
    }
}

/// The status record in the schema's wire order (§8 of the spec).
fn status_wire(timeout: i64, filter_name: Option<&str>) -> Wire {
    fields(&[
        ("timestamp", Value::Long(TS)),
        ("timeout", Value::Long(timeout)),
        ("correlationId", s("corr-18")),
        ("originatorReplicaId", s("epr-replica-7")),
        ("filterId", s(FILTER)),
        ("applicationName", s("smart-kettle")),
        ("filterName", name_value(filter_name)),
    ])
}

/// The endpoint record in the schema's wire order: `appVersionName` before `filterName`,
/// `endpointId` last.
fn endpoint_wire(timeout: i64, filter_name: Option<&str>) -> Wire {
    fields(&[
        ("timestamp", Value::Long(TS)),
        ("timeout", Value::Long(timeout)),
        ("correlationId", s("corr-18")),
        ("originatorReplicaId", s("epr-replica-7")),
        ("filterId", s(FILTER)),
        ("applicationName", s("smart-kettle")),
        ("appVersionName", s("smart-kettle-v3")),
        ("filterName", name_value(filter_name)),
        ("endpointId", s("ep-1.a_b~c")),
    ])
}

const NAMES: [Option<&str>; 3] = [Some("kettles on v3"), Some(""), None];

#[test]
fn filter_status_events_decode_independently_field_by_field() {
    for kind in FilterEventKind::ALL {
        for name in NAMES {
            let encoded = encode_filter_status(&status_event(kind, name), &origin()).unwrap();
            assert_eq!(
                encoded.subject,
                format!(
                    "kaa.v1.events.epr.endpoint-filter.{FILTER}.{}",
                    kind.token()
                )
            );
            assert_eq!(
                read(status_file(kind), &encoded.payload),
                status_wire(0, name),
                "{kind:?} {name:?}"
            );
        }
    }
}

#[test]
fn endpoint_filter_events_decode_independently_field_by_field() {
    for matched in [true, false] {
        for name in NAMES {
            let encoded =
                encode_endpoint_filter(&endpoint_event(matched, name), &origin()).unwrap();
            let token = if matched {
                "ep-matched"
            } else {
                "ep-unmatched"
            };
            assert_eq!(
                encoded.subject,
                format!("kaa.v1.events.epr.endpoint-filter.{FILTER}.{token}")
            );
            assert_eq!(
                read(endpoint_file(matched), &encoded.payload),
                endpoint_wire(0, name),
                "matched={matched} {name:?}"
            );
        }
    }
}

#[test]
fn independently_written_events_decode_and_re_encode_byte_identically() {
    for kind in FilterEventKind::ALL {
        for name in NAMES {
            let ev = status_event(kind, name);
            let payload = write(status_file(kind), status_wire(0, name));
            assert_eq!(
                decode_filter_status(kind, &payload).unwrap(),
                (ev.clone(), "epr-replica-7".to_owned())
            );
            // No maps: the encoding is deterministic and equals apache-avro's own.
            let encoded = encode_filter_status(&ev, &origin()).unwrap();
            assert_eq!(encoded.payload, payload, "{kind:?} {name:?}");
        }
    }
    for matched in [true, false] {
        for name in NAMES {
            let ev = endpoint_event(matched, name);
            let payload = write(endpoint_file(matched), endpoint_wire(0, name));
            assert_eq!(
                decode_endpoint_filter(matched, &payload).unwrap(),
                (ev.clone(), "epr-replica-7".to_owned())
            );
            let encoded = encode_endpoint_filter(&ev, &origin()).unwrap();
            assert_eq!(encoded.payload, payload, "matched={matched} {name:?}");
        }
    }
}

#[test]
fn a_peer_timeout_is_accepted_but_not_returned() {
    let payload = write(
        status_file(FilterEventKind::Activated),
        status_wire(60_000, None),
    );
    let (ev, _) = decode_filter_status(FilterEventKind::Activated, &payload).unwrap();
    assert_eq!(ev, status_event(FilterEventKind::Activated, None));
}

#[test]
fn the_filter_id_is_the_sixth_subject_token() {
    let ev = status_event(FilterEventKind::Pending, None);
    let subject = encode_filter_status(&ev, &origin()).unwrap().subject;
    let tokens: Vec<&str> = subject.split('.').collect();
    assert_eq!(
        tokens,
        [
            "kaa",
            "v1",
            "events",
            "epr",
            "endpoint-filter",
            FILTER,
            "pending"
        ]
    );
    let subject = encode_endpoint_filter(&endpoint_event(false, None), &origin())
        .unwrap()
        .subject;
    assert_eq!(subject.split('.').nth(5), Some(FILTER));
    assert_eq!(subject.split('.').count(), 7);
}

#[test]
fn invalid_filter_ids_are_rejected() {
    for bad in ["", "f.1", "f*", ">", "a>b", "f 1", "f\t", "f\n", "f\u{a0}"] {
        let mut status = status_event(FilterEventKind::Deleted, Some("n"));
        status.filter_id = bad.into();
        let err = encode_filter_status(&status, &origin()).unwrap_err();
        assert!(
            matches!(&err, EncodeError::InvalidFilterId { id, .. } if id == bad),
            "{bad:?}: {err}"
        );
        let mut endpoint = endpoint_event(true, None);
        endpoint.filter_id = bad.into();
        let err = encode_endpoint_filter(&endpoint, &origin()).unwrap_err();
        assert!(
            matches!(&err, EncodeError::InvalidFilterId { id, .. } if id == bad),
            "{bad:?}: {err}"
        );
    }
    // Any other characters are fine, e.g. '-', '_', '~', ':' and non-ASCII letters.
    for good in ["f-1_a~b:c", "ф", "F"] {
        let mut status = status_event(FilterEventKind::Deleted, None);
        status.filter_id = good.into();
        let encoded = encode_filter_status(&status, &origin()).unwrap();
        assert_eq!(encoded.subject.split('.').nth(5), Some(good));
    }
}

#[test]
fn invalid_instance_names_are_rejected() {
    for bad in ["", "epr.eu", "epr*", ">", "epr eu"] {
        let o = Originator {
            instance_name: bad.into(),
            replica_id: "r".into(),
        };
        let err =
            encode_filter_status(&status_event(FilterEventKind::Pending, None), &o).unwrap_err();
        assert!(
            matches!(err, EncodeError::InvalidInstanceName { .. }),
            "{bad:?}: {err}"
        );
        let err = encode_endpoint_filter(&endpoint_event(true, None), &o).unwrap_err();
        assert!(
            matches!(err, EncodeError::InvalidInstanceName { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn event_type_tokens() {
    let expected = [
        (FilterEventKind::Pending, "pending"),
        (FilterEventKind::Activated, "activated"),
        (FilterEventKind::Deleted, "deleted"),
    ];
    assert_eq!(expected.map(|(k, _)| k), FilterEventKind::ALL);
    for (kind, token) in expected {
        assert_eq!(kind.token(), token);
        assert_eq!(FilterEventKind::from_token(token), Some(kind));
        assert_eq!(matched_from_token(token), None);
    }
    // The first draft's `deactivated` is not a token of the merged RFC.
    assert_eq!(FilterEventKind::from_token("deactivated"), None);
    assert_eq!(FilterEventKind::from_token("ep-matched"), None);
    assert_eq!(endpoint_filter_token(true), "ep-matched");
    assert_eq!(endpoint_filter_token(false), "ep-unmatched");
    assert_eq!(matched_from_token("ep-matched"), Some(true));
    assert_eq!(matched_from_token("ep-unmatched"), Some(false));
    assert_eq!(matched_from_token("matched"), None);
}

/// Every proper prefix of every datum is an error, and so is a datum followed by more bytes.
#[test]
fn truncated_and_padded_events_are_errors() {
    for kind in FilterEventKind::ALL {
        let ev = status_event(kind, Some("n"));
        let payload = encode_filter_status(&ev, &origin()).unwrap().payload;
        common::assert_exact_datum(&format!("{kind:?}"), &payload, |b| {
            decode_filter_status(kind, b)
        });
    }
    for matched in [true, false] {
        let ev = endpoint_event(matched, None);
        let payload = encode_endpoint_filter(&ev, &origin()).unwrap().payload;
        common::assert_exact_datum(&format!("matched={matched}"), &payload, |b| {
            decode_endpoint_filter(matched, b)
        });
    }
}

#[test]
fn a_status_event_does_not_decode_as_an_endpoint_event() {
    let status = encode_filter_status(&status_event(FilterEventKind::Pending, None), &origin())
        .unwrap()
        .payload;
    assert!(decode_endpoint_filter(true, &status).is_err());
    let endpoint = encode_endpoint_filter(&endpoint_event(true, None), &origin())
        .unwrap()
        .payload;
    assert!(decode_filter_status(FilterEventKind::Pending, &endpoint).is_err());
}

/// A domain filter event of `kind`, as the store puts it in the outbox.
fn outbox_filter_event(kind: epr_core::event::FilterEventKind) -> OutboxEvent {
    OutboxEvent::Filter(FilterEvent {
        tenant: TenantId::parse("kaa").unwrap(),
        app: AppName::parse("smart-kettle").unwrap(),
        filter_id: FilterId::parse(FILTER).unwrap(),
        filter_name: "kettles on v3".into(),
        kind,
        correlation_id: "corr-18".into(),
        timestamp: Timestamp(TS),
    })
}

#[test]
fn outbox_filter_events_encode_as_18_efe_and_decode_with_the_avsc() {
    use epr_core::event::FilterEventKind as K;
    let name = Some("kettles on v3");
    for (kind, wire) in [
        (K::Pending, FilterEventKind::Pending),
        (K::Activated, FilterEventKind::Activated),
        (K::Deleted, FilterEventKind::Deleted),
    ] {
        let encoded = encode_outbox(&outbox_filter_event(kind), &origin()).unwrap();
        assert_eq!(
            encoded.subject,
            format!(
                "kaa.v1.events.epr.endpoint-filter.{FILTER}.{}",
                wire.token()
            )
        );
        assert_eq!(
            read(status_file(wire), &encoded.payload),
            status_wire(0, name)
        );
    }
    let endpoint = EndpointId::parse("ep-1.a_b~c").unwrap();
    let version = AppVersionName::parse("smart-kettle-v3").unwrap();
    for matched in [true, false] {
        let kind = if matched {
            K::EndpointMatched {
                endpoint_id: endpoint.clone(),
                app_version: version.clone(),
            }
        } else {
            K::EndpointUnmatched {
                endpoint_id: endpoint.clone(),
                app_version: version.clone(),
            }
        };
        let encoded = encode_outbox(&outbox_filter_event(kind), &origin()).unwrap();
        assert_eq!(
            encoded.subject,
            format!(
                "kaa.v1.events.epr.endpoint-filter.{FILTER}.{}",
                endpoint_filter_token(matched)
            )
        );
        assert_eq!(
            read(endpoint_file(matched), &encoded.payload),
            endpoint_wire(0, name)
        );
    }
}

#[test]
fn outbox_endpoint_events_encode_as_before() {
    let ev = DomainEvent {
        tenant: TenantId::parse("kaa").unwrap(),
        endpoint_id: EndpointId::parse("ep-1").unwrap(),
        app: AppName::parse("demo").unwrap(),
        app_version: AppVersionName::parse("demo-v1").unwrap(),
        kind: EventKind::Registered,
        correlation_id: "c".into(),
        timestamp: Timestamp(TS),
    };
    assert_eq!(
        encode_outbox(&OutboxEvent::Endpoint(ev.clone()), &origin()).unwrap(),
        epr_events::encode(&ev, &origin()).unwrap()
    );
}
