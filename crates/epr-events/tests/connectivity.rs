//! 9/ELCE `connected` round trips against the schema parsed independently from the file.

mod common;

use apache_avro::types::Value;
use common::{fields, map, read, s, write};
use epr_events::connectivity::{
    connected_subject_wildcard, decode_connected, encode_connected, ConnectedEvent,
};
use epr_events::DecodeError;
use std::collections::BTreeMap;

const FILE: &str = "0009-ep-connected.avsc";
const TS: i64 = 1_700_000_000_123;

fn event(endpoints: &[(&str, &str)]) -> ConnectedEvent {
    ConnectedEvent {
        correlation_id: "corr-9".into(),
        timestamp: TS,
        timeout: 60_000,
        endpoints: endpoints
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        originator_replica_id: "kpc-3".into(),
    }
}

fn wire(endpoints: &[(&str, Value)]) -> Vec<(String, Value)> {
    fields(&[
        ("correlationId", s("corr-9")),
        ("timestamp", Value::Long(TS)),
        ("timeout", Value::Long(60_000)),
        ("endpoints", map(endpoints)),
        ("originatorReplicaId", s("kpc-3")),
    ])
}

#[test]
fn encoded_event_decodes_independently_field_by_field() {
    let ev = event(&[("ep-1", "demo-v1"), ("ep-2", "demo-v2")]);
    assert_eq!(
        read(FILE, &encode_connected(&ev).unwrap()),
        wire(&[("ep-1", s("demo-v1")), ("ep-2", s("demo-v2"))])
    );
    assert_eq!(
        read(FILE, &encode_connected(&event(&[])).unwrap()),
        wire(&[])
    );
}

#[test]
fn independently_written_event_decodes() {
    let payload = write(
        FILE,
        wire(&[("ep-1", s("demo-v1")), ("ep.2", s("")), ("ep-3", s("v3"))]),
    );
    assert_eq!(
        decode_connected(&payload).unwrap(),
        event(&[("ep-1", "demo-v1"), ("ep.2", ""), ("ep-3", "v3")])
    );
    assert_eq!(
        decode_connected(&write(FILE, wire(&[]))).unwrap(),
        event(&[])
    );
}

#[test]
fn truncated_or_padded_events_are_errors() {
    let payload = encode_connected(&event(&[("ep-1", "demo-v1")])).unwrap();
    common::assert_exact_datum("connected", &payload, decode_connected);
    let mut padded = payload.clone();
    padded.push(0);
    assert_eq!(
        decode_connected(&padded).unwrap_err(),
        DecodeError::TrailingBytes {
            file: FILE,
            count: 1
        }
    );
}

#[test]
fn the_unmerged_endpoint_meta_shape_is_rejected_not_misread() {
    // Spec §14.2: an unmerged RFC change makes each map value a record
    // {appVersion, tenantId}. This payload in that shape must fail to decode with the master
    // schema (here: the tenant ID is read as the next map block's count and runs off the end).
    let unmerged =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/spec/avro/unmerged");
    let Some(file) = std::fs::read_dir(unmerged).ok().and_then(|dir| {
        dir.map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains("connected"))
    }) else {
        eprintln!("skipped: no unmerged connected schema next to this repository");
        return;
    };
    let schema = apache_avro::Schema::parse_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let meta = Value::Record(fields(&[
        ("appVersion", s("demo-v1")),
        ("tenantId", s("t1")),
    ]));
    let mut record = wire(&[("ep-1", meta)]);
    // Write with whatever field order the unmerged schema has, by name.
    if let apache_avro::Schema::Record(r) = &schema {
        record.sort_by_key(|(name, _)| r.lookup[name]);
    }
    let payload = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value_to_vec(Value::Record(record))
        .unwrap();
    assert!(decode_connected(&payload).is_err());
}

#[test]
fn subject_wildcard() {
    assert_eq!(
        connected_subject_wildcard(),
        "kaa.v1.events.*.endpoint.connectivity.connected"
    );
}
