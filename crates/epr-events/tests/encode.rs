//! Round-trip tests: encode with the crate, decode with a schema parsed here, independently,
//! from the copied `.avsc` file on disk, and check every field in wire order.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use epr_core::event::{DomainEvent, EventKind};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::metadata::MetadataDiff;
use epr_core::Timestamp;
use epr_events::{encode, EncodeError, Encoded, Originator};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const TS: i64 = 1_700_000_000_123;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn origin() -> Originator {
    Originator {
        instance_name: "epr".into(),
        replica_id: "epr-replica-7".into(),
    }
}

fn event(kind: EventKind) -> DomainEvent {
    DomainEvent {
        tenant: TenantId::parse("kaa").unwrap(),
        endpoint_id: EndpointId::parse("ep-1.a_b~c").unwrap(),
        app: AppName::parse("demo").unwrap(),
        app_version: AppVersionName::parse("demo-v2").unwrap(),
        kind,
        correlation_id: "corr-42".into(),
        timestamp: Timestamp(TS),
    }
}

/// Decodes `payload` with a schema parsed from the copied file, and checks that the datum
/// uses every byte (no header before it, nothing after it).
fn decode(file: &str, payload: &[u8]) -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(crate_dir().join("avro").join(file)).unwrap();
    let schema = Schema::parse_str(&text).unwrap();
    let mut rest = payload;
    let value = GenericDatumReader::builder(&schema)
        .build()
        .unwrap()
        .read_value(&mut rest)
        .unwrap();
    assert!(rest.is_empty(), "{} trailing bytes", rest.len());
    match value {
        Value::Record(fields) => fields,
        other => panic!("not a record: {other:?}"),
    }
}

/// A raw datum of these schemas starts with `correlationId`: its zig-zag length, then bytes.
/// So no container header (`Obj\x01`) and no single-object marker (`C3 01`) precede it.
fn assert_raw_datum(encoded: &Encoded) {
    let corr = b"corr-42";
    assert_eq!(encoded.payload[0], (corr.len() * 2) as u8);
    assert_eq!(&encoded.payload[1..=corr.len()], corr);
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn fields(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[test]
fn registered() {
    let encoded = encode(&event(EventKind::Registered), &origin()).unwrap();
    assert_eq!(
        encoded.subject,
        "kaa.v1.events.epr.endpoint.lifecycle.registered"
    );
    assert_raw_datum(&encoded);
    assert_eq!(
        decode("0009-ep-registered.avsc", &encoded.payload),
        fields(&[
            ("correlationId", s("corr-42")),
            ("timestamp", Value::Long(TS)),
            ("timeout", Value::Long(0)),
            ("appVersionName", s("demo-v2")),
            ("endpointId", s("ep-1.a_b~c")),
            ("originatorReplicaId", s("epr-replica-7")),
        ])
    );
}

#[test]
fn unregistered() {
    let encoded = encode(&event(EventKind::Unregistered), &origin()).unwrap();
    assert_eq!(
        encoded.subject,
        "kaa.v1.events.epr.endpoint.lifecycle.unregistered"
    );
    assert_raw_datum(&encoded);
    assert_eq!(
        decode("0009-ep-unregistered.avsc", &encoded.payload),
        fields(&[
            ("correlationId", s("corr-42")),
            ("timestamp", Value::Long(TS)),
            ("timeout", Value::Long(0)),
            ("appVersionName", s("demo-v2")),
            ("endpointId", s("ep-1.a_b~c")),
            ("originatorReplicaId", s("epr-replica-7")),
        ])
    );
}

#[test]
fn appversion_updated() {
    let kind = EventKind::AppVersionUpdated {
        previous: AppVersionName::parse("demo-v1").unwrap(),
    };
    let encoded = encode(&event(kind), &origin()).unwrap();
    assert_eq!(
        encoded.subject,
        "kaa.v1.events.epr.endpoint.lifecycle.appversion-updated"
    );
    assert_raw_datum(&encoded);
    assert_eq!(
        decode("0009-ep-appversion-updated.avsc", &encoded.payload),
        fields(&[
            ("correlationId", s("corr-42")),
            ("timestamp", Value::Long(TS)),
            ("timeout", Value::Long(0)),
            ("appVersionName", s("demo-v2")),
            ("previousAppVersionName", s("demo-v1")),
            ("endpointId", s("ep-1.a_b~c")),
            ("originatorReplicaId", s("epr-replica-7")),
        ])
    );
}

/// `["null","string"]`: JSON null is branch 0 (Avro null), anything else branch 1 (JSON text).
fn null_branch() -> Value {
    Value::Union(0, Box::new(Value::Null))
}
fn text_branch(json_text: &str) -> Value {
    Value::Union(1, Box::new(s(json_text)))
}
fn dto(new: Value, old: Value) -> Value {
    Value::Record(fields(&[("newValue", new), ("oldValue", old)]))
}
fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<HashMap<_, _>>(),
    )
}

#[test]
fn metadata_updated() {
    let nested = json!({"a": [1, 2, {"b": null}], "z": "q\"uote"});
    let diff = MetadataDiff {
        added: BTreeMap::from([
            ("str".to_owned(), json!("abc")),
            ("num".to_owned(), json!(42)),
            ("nul".to_owned(), json!(null)),
            ("obj".to_owned(), nested.clone()),
            ("connectivity.ts".to_owned(), json!(false)),
        ]),
        removed: BTreeMap::from([
            ("gone".to_owned(), json!(true)),
            ("gone-null".to_owned(), json!(null)),
        ]),
        updated: BTreeMap::from([
            ("u".to_owned(), (json!("x"), json!({"k": 1}))),
            ("from-null".to_owned(), (json!(null), json!(1.5))),
            ("to-null".to_owned(), (json!([1]), json!(null))),
            ("empty-string".to_owned(), (json!(""), json!("null"))),
        ]),
    };
    let encoded = encode(&event(EventKind::MetadataUpdated(diff)), &origin()).unwrap();
    assert_eq!(
        encoded.subject,
        "kaa.v1.events.epr.endpoint.metadata.updated"
    );
    assert_raw_datum(&encoded);

    let nested_text = r#"{"a":[1,2,{"b":null}],"z":"q\"uote"}"#;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(nested_text).unwrap(),
        nested
    );
    assert_eq!(
        decode("0015-ep-metadata-updated.avsc", &encoded.payload),
        fields(&[
            ("correlationId", s("corr-42")),
            ("timestamp", Value::Long(TS)),
            ("timeout", Value::Long(0)),
            ("appVersionName", s("demo-v2")),
            ("endpointId", s("ep-1.a_b~c")),
            (
                "removed",
                map(&[("gone", text_branch("true")), ("gone-null", null_branch())])
            ),
            (
                "added",
                map(&[
                    ("str", text_branch(r#""abc""#)),
                    ("num", text_branch("42")),
                    ("nul", null_branch()),
                    ("obj", text_branch(nested_text)),
                    ("connectivity.ts", text_branch("false")),
                ])
            ),
            (
                "updated",
                map(&[
                    ("u", dto(text_branch(r#"{"k":1}"#), text_branch(r#""x""#))),
                    ("from-null", dto(text_branch("1.5"), null_branch())),
                    ("to-null", dto(null_branch(), text_branch("[1]"))),
                    // The JSON *string* "null" is text, distinct from JSON null.
                    (
                        "empty-string",
                        dto(text_branch(r#""null""#), text_branch(r#""""#))
                    ),
                ])
            ),
            ("originatorReplicaId", s("epr-replica-7")),
        ])
    );
}

#[test]
fn metadata_updated_with_empty_diff_sends_three_empty_maps() {
    let encoded = encode(
        &event(EventKind::MetadataUpdated(MetadataDiff::default())),
        &origin(),
    )
    .unwrap();
    assert_eq!(
        decode("0015-ep-metadata-updated.avsc", &encoded.payload),
        fields(&[
            ("correlationId", s("corr-42")),
            ("timestamp", Value::Long(TS)),
            ("timeout", Value::Long(0)),
            ("appVersionName", s("demo-v2")),
            ("endpointId", s("ep-1.a_b~c")),
            ("removed", map(&[])),
            ("added", map(&[])),
            ("updated", map(&[])),
            ("originatorReplicaId", s("epr-replica-7")),
        ])
    );
}

#[test]
fn subject_uses_the_instance_name_and_rejects_bad_tokens() {
    let mut o = origin();
    o.instance_name = "epr-eu_1".into();
    let encoded = encode(&event(EventKind::Registered), &o).unwrap();
    assert_eq!(
        encoded.subject,
        "kaa.v1.events.epr-eu_1.endpoint.lifecycle.registered"
    );
    for bad in ["", "epr.eu", "epr*", ">", "epr eu", "epr\t"] {
        o.instance_name = bad.into();
        let err = encode(&event(EventKind::Registered), &o).unwrap_err();
        assert!(
            matches!(err, EncodeError::InvalidInstanceName { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn lifecycle_encoding_is_deterministic() {
    let e = event(EventKind::Registered);
    assert_eq!(
        encode(&e, &origin()).unwrap(),
        encode(&e, &origin()).unwrap()
    );
}

#[test]
fn copied_schemas_are_byte_identical_to_the_shared_spec() {
    let spec: PathBuf = crate_dir().join("../../../shared/spec/avro");
    if !spec.is_dir() {
        eprintln!(
            "skipped: {} does not exist (a clone without ../shared); cannot compare schemas",
            spec.display()
        );
        return;
    }
    let mut compared = 0;
    for entry in std::fs::read_dir(crate_dir().join("avro")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            // `ext/` holds EPR's own extension schemas, which have no upstream copy.
            continue;
        }
        let file = entry.file_name().into_string().unwrap();
        let ours = std::fs::read(entry.path()).unwrap();
        let theirs = std::fs::read(spec.join(&file))
            .unwrap_or_else(|e| panic!("avro/{file} is not in {}: {e}", spec.display()));
        assert!(
            ours == theirs,
            "avro/{file} differs from {}",
            spec.display()
        );
        compared += 1;
    }
    // The 4 event schemas EPR publishes, 9/ELCE connected, the 12 of 19/EPMMP, the 5 of
    // 18/EFE, the 4 of 20/EFMP, the 2 of 21/TLE, the 2 of 17/SCMP and the 5 endpoint
    // token schemas of 16/ECAP.
    assert_eq!(compared, 35);
}
