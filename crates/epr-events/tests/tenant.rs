//! 21/TLE round trips against the schemas parsed independently from the files.

mod common;

use apache_avro::types::Value;
use common::{fields, read, s, write};
use epr_events::tenant::{decode_tenant_event, encode_tenant_event, TenantEvent, TenantEventKind};
use epr_events::DecodeError;

const TS: i64 = 1_700_000_000_123;

fn file(kind: TenantEventKind) -> &'static str {
    match kind {
        TenantEventKind::Updated => "0021-tenant-updated.avsc",
        TenantEventKind::Unregistered => "0021-tenant-unregistered.avsc",
    }
}

fn event() -> TenantEvent {
    TenantEvent {
        correlation_id: "corr-21".into(),
        timestamp: TS,
        timeout: 30_000,
        tenant_id: "acme".into(),
        originator_replica_id: "tm-1".into(),
    }
}

fn wire() -> Vec<(String, Value)> {
    fields(&[
        ("correlationId", s("corr-21")),
        ("timestamp", Value::Long(TS)),
        ("timeout", Value::Long(30_000)),
        ("tenantId", s("acme")),
        ("originatorReplicaId", s("tm-1")),
    ])
}

#[test]
fn both_events_round_trip_against_the_files() {
    for kind in TenantEventKind::ALL {
        let payload = encode_tenant_event(kind, &event()).unwrap();
        assert_eq!(read(file(kind), &payload), wire(), "{kind:?}");
        assert_eq!(
            decode_tenant_event(kind, &write(file(kind), wire())).unwrap(),
            event()
        );
    }
}

#[test]
fn truncated_or_padded_events_are_errors() {
    for kind in TenantEventKind::ALL {
        let payload = encode_tenant_event(kind, &event()).unwrap();
        common::assert_exact_datum("tenant event", &payload, |b| decode_tenant_event(kind, b));
        let mut padded = payload.clone();
        padded.push(0);
        assert_eq!(
            decode_tenant_event(kind, &padded).unwrap_err(),
            DecodeError::TrailingBytes {
                file: file(kind),
                count: 1
            }
        );
    }
}

#[test]
fn expiry_and_subjects() {
    let mut ev = event();
    assert!(!ev.expired(TS + 30_000));
    assert!(ev.expired(TS + 30_001));
    ev.timeout = 0;
    assert!(!ev.expired(i64::MAX));
    assert_eq!(
        TenantEventKind::Updated.subject_wildcard(),
        "kaa.v1.events.*.tenant.lifecycle.updated"
    );
    assert_eq!(
        TenantEventKind::Unregistered.subject_wildcard(),
        "kaa.v1.events.*.tenant.lifecycle.unregistered"
    );
}
