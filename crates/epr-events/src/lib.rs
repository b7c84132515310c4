//! Kaa wire encoding of the Endpoint Register's domain events.
//!
//! [`encode`] turns one [`DomainEvent`] into the NATS subject and the Avro payload that Kaa's
//! services expect for 9/ELCE (`endpoint.lifecycle.*`) and 15/EME (`endpoint.metadata.updated`).
//! It is pure (no NATS client, no clock): the outbox relay that publishes the result is a
//! separate component.
//!
//! Why it is built this way:
//! - **The `.avsc` files are the source of truth.** Avro binary is positional, so the field
//!   order of the schema *is* the wire format. The four upstream schemas are copied verbatim
//!   into `avro/` and compiled in with `include_str!`; the encoder walks each schema's fields in
//!   schema order and looks every field up *by name* in the values the event provides. No field
//!   list or field order is written down in Rust, so a schema update cannot silently drift from
//!   a hand-copied struct.
//! - **Payloads are raw Avro datums**: no object-container header, no single-object marker
//!   (`C3 01`), no fingerprint. That is what Kaa's own services write (`type.toBuffer(msg)` in
//!   avsc); a reader needs exactly the writer's schema.
//! - **Errors, not panics.** A schema that does not parse, a schema field the event cannot fill
//!   and that has no default, or a value that does not fit its field are all [`EncodeError`]s,
//!   so a relay can log and dead-letter one event instead of crashing.
//!
//! See `README.md` in this crate for the choices made where Kaa's RFCs are silent.

use apache_avro::schema::{RecordField, RecordSchema, Schema, UnionSchema};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use epr_core::event::{DomainEvent, EventKind};
use epr_core::metadata::MetadataDiff;
use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

/// Who publishes: the two identities every Kaa event carries.
///
/// They are not part of [`DomainEvent`] because they describe the running process, not the
/// endpoint: the same outbox row must encode identically whichever replica relays it, apart
/// from these two values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Originator {
    /// The service *instance* name (e.g. `epr`), shared by all replicas of this deployment.
    /// It becomes the `{originator-service-instance-name}` token of the subject, so it must
    /// be one NATS subject token: non-empty, without `.`, `*`, `>` or whitespace.
    pub instance_name: String,
    /// This replica's identifier, written to `originatorReplicaId` (a required string in every
    /// event schema, so it is always filled).
    pub replica_id: String,
}

/// A ready-to-publish event: the subject and the raw Avro datum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `kaa.v1.events.{instance}.endpoint.{group}.{type}`.
    pub subject: String,
    /// The Avro binary datum, encoded with the event's schema and nothing else around it.
    pub payload: Vec<u8>,
}

/// Why an event could not be encoded. Every variant is a bug or a misconfiguration rather
/// than bad endpoint data, so a relay should log it loudly and not retry blindly.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A compiled-in `.avsc` file does not parse. Tests parse all of them, so this only
    /// happens if a broken schema was copied in.
    #[error("Avro schema {file} does not parse: {message}")]
    Schema { file: &'static str, message: String },
    /// The instance name cannot be a single NATS subject token.
    #[error("instance name {name:?} cannot be used in a NATS subject: {reason}")]
    InvalidInstanceName { name: String, reason: &'static str },
    /// The schema has a field that the event does not provide a value for, and the field has
    /// no default. Typically a schema was updated and this crate was not.
    #[error("schema field {path} has no value in the event and no default")]
    MissingField { path: String },
    /// The event provides a value under a name that the schema does not have. Catches a
    /// misspelt field name or a field that a schema update removed.
    #[error("the event provides {path}, but the schema has no such field")]
    UnmappedValue { path: String },
    /// A value's shape does not fit the schema type at that position.
    #[error("{path}: a {value} value does not fit schema type {schema}")]
    TypeMismatch {
        path: String,
        value: &'static str,
        schema: String,
    },
    /// A field's default in the schema cannot be turned into a value of the field's type.
    #[error("invalid default for schema field {path}: {source}")]
    Default {
        path: String,
        #[source]
        source: apache_avro::Error,
    },
    /// A metadata value could not be written as JSON text.
    #[error("metadata value {path} cannot be written as JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// apache-avro rejected the value or failed to write it.
    #[error("Avro encoding failed: {0}")]
    Avro(#[from] apache_avro::Error),
}

/// One Kaa event type: where its schema comes from and which subject tokens it uses.
struct WireEvent {
    /// The `.avsc` file name under `avro/`, for error messages.
    file: &'static str,
    /// `{event-group}` token of the subject.
    group: &'static str,
    /// `{event-type}` token of the subject.
    event_type: &'static str,
    /// Parsed once, on first use. The error is kept as text so that the static can be shared.
    schema: LazyLock<Result<Schema, String>>,
}

impl WireEvent {
    fn schema(&self) -> Result<&Schema, EncodeError> {
        self.schema.as_ref().map_err(|message| EncodeError::Schema {
            file: self.file,
            message: message.clone(),
        })
    }
}

macro_rules! wire_event {
    ($name:ident, $file:literal, $group:literal, $event_type:literal) => {
        static $name: WireEvent = WireEvent {
            file: $file,
            group: $group,
            event_type: $event_type,
            schema: LazyLock::new(|| {
                Schema::parse_str(include_str!(concat!("../avro/", $file)))
                    .map_err(|e| e.to_string())
            }),
        };
    };
}

wire_event!(
    REGISTERED,
    "0009-ep-registered.avsc",
    "lifecycle",
    "registered"
);
wire_event!(
    UNREGISTERED,
    "0009-ep-unregistered.avsc",
    "lifecycle",
    "unregistered"
);
wire_event!(
    APP_VERSION_UPDATED,
    "0009-ep-appversion-updated.avsc",
    "lifecycle",
    "appversion-updated"
);
wire_event!(
    METADATA_UPDATED,
    "0015-ep-metadata-updated.avsc",
    "metadata",
    "updated"
);

/// Encodes `event` as the Kaa event it stands for, published by `origin`.
///
/// The subject is `kaa.v1.events.{origin.instance_name}.endpoint.{group}.{type}` (9/ELCE
/// layout, reused by 15/EME); the payload is a raw Avro datum of the matching schema.
pub fn encode(event: &DomainEvent, origin: &Originator) -> Result<Encoded, EncodeError> {
    check_subject_token(&origin.instance_name)?;
    let wire = match event.kind {
        EventKind::Registered => &REGISTERED,
        EventKind::Unregistered => &UNREGISTERED,
        EventKind::AppVersionUpdated { .. } => &APP_VERSION_UPDATED,
        EventKind::MetadataUpdated(_) => &METADATA_UPDATED,
    };
    let schema = wire.schema()?;
    let root = schema
        .name()
        .map_or_else(|| wire.file.to_owned(), |n| n.name().to_owned());
    let value = to_avro(Datum::Record(event_values(event, origin)?), schema, &root)?;
    let payload = GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(value)?;
    Ok(Encoded {
        subject: format!(
            "kaa.v1.events.{}.endpoint.{}.{}",
            origin.instance_name, wire.group, wire.event_type
        ),
        payload,
    })
}

/// A NATS subject token must be non-empty and free of separators, wildcards and whitespace;
/// otherwise the subject would have a different token structure and Kaa's subscribers
/// (`kaa.v1.events.*.endpoint.…`) would never see the event.
fn check_subject_token(name: &str) -> Result<(), EncodeError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.contains('.') {
        "it contains '.', the subject token separator"
    } else if name.contains(['*', '>']) {
        "it contains a NATS wildcard ('*' or '>')"
    } else if name.chars().any(char::is_whitespace) {
        "it contains whitespace"
    } else {
        return Ok(());
    };
    Err(EncodeError::InvalidInstanceName {
        name: name.to_owned(),
        reason,
    })
}

/// A value the event offers for one schema field, before the schema gives it its Avro type.
#[derive(Debug)]
enum Datum {
    String(String),
    Long(i64),
    /// A JSON value as JSON text, `None` for JSON `null` (15/EME: "Value null is used to
    /// represent a null JSON").
    JsonText(Option<String>),
    Map(BTreeMap<String, Datum>),
    Record(Fields),
}

/// Values keyed by Avro field name. Order is irrelevant: the schema decides it.
type Fields = BTreeMap<&'static str, Datum>;

impl Datum {
    fn kind(&self) -> &'static str {
        match self {
            Datum::String(_) => "string",
            Datum::Long(_) => "long",
            Datum::JsonText(None) => "JSON null",
            Datum::JsonText(Some(_)) => "JSON text",
            Datum::Map(_) => "map",
            Datum::Record(_) => "record",
        }
    }
}

/// What the event knows, under Kaa's field names. This is a name → value mapping, not a
/// field list: which of these a schema uses, and in which order, is read from the schema.
///
/// Deliberately absent:
/// - `timeout`: the schema default applies (0, "never expires"); EPR's events do not expire.
/// - the tenant and the application name: none of the 9/ELCE lifecycle or 15/EME schemas has
///   a field for them. Kaa consumers derive app and tenant from `appVersionName` (unique
///   within a tenant) via their configuration; see README.md.
fn event_values(event: &DomainEvent, origin: &Originator) -> Result<Fields, EncodeError> {
    let mut f = Fields::new();
    // Every current Kaa event: tracing ID (the triggering request's), creation time in Unix
    // milliseconds, and the emitting replica.
    f.insert("correlationId", Datum::String(event.correlation_id.clone()));
    f.insert("timestamp", Datum::Long(event.timestamp.millis()));
    f.insert(
        "originatorReplicaId",
        Datum::String(origin.replica_id.clone()),
    );
    f.insert(
        "endpointId",
        Datum::String(event.endpoint_id.as_str().to_owned()),
    );
    // The version after the change; for `unregistered`, the version the endpoint had when it
    // was removed (see `DomainEvent::app_version`).
    f.insert(
        "appVersionName",
        Datum::String(event.app_version.as_str().to_owned()),
    );
    match &event.kind {
        EventKind::Registered | EventKind::Unregistered => {}
        EventKind::AppVersionUpdated { previous } => {
            f.insert(
                "previousAppVersionName",
                Datum::String(previous.as_str().to_owned()),
            );
        }
        EventKind::MetadataUpdated(diff) => metadata_values(diff, &mut f)?,
    }
    Ok(f)
}

/// 15/EME's three maps. All three are always present (possibly empty): the schema has no
/// defaults for them.
fn metadata_values(diff: &MetadataDiff, f: &mut Fields) -> Result<(), EncodeError> {
    let json_map = |field: &str, map: &BTreeMap<String, serde_json::Value>| {
        map.iter()
            .map(|(k, v)| Ok((k.clone(), json_text(&format!("{field}[{k:?}]"), v)?)))
            .collect::<Result<BTreeMap<_, _>, EncodeError>>()
    };
    f.insert("added", Datum::Map(json_map("added", &diff.added)?));
    f.insert("removed", Datum::Map(json_map("removed", &diff.removed)?));
    let updated = diff
        .updated
        .iter()
        .map(|(k, (old, new))| {
            let path = format!("updated[{k:?}]");
            let mut dto = Fields::new();
            dto.insert("oldValue", json_text(&format!("{path}.oldValue"), old)?);
            dto.insert("newValue", json_text(&format!("{path}.newValue"), new)?);
            Ok((k.clone(), Datum::Record(dto)))
        })
        .collect::<Result<BTreeMap<_, _>, EncodeError>>()?;
    f.insert("updated", Datum::Map(updated));
    Ok(())
}

/// A metadata value as 15/EME carries it: its compact JSON text (`"abc"` travels as
/// `"\"abc\""`, `42` as `"42"`), and JSON `null` as Avro `null`, never as the text `null`.
fn json_text(path: &str, value: &serde_json::Value) -> Result<Datum, EncodeError> {
    if value.is_null() {
        return Ok(Datum::JsonText(None));
    }
    serde_json::to_string(value)
        .map(|text| Datum::JsonText(Some(text)))
        .map_err(|source| EncodeError::Json {
            path: path.to_owned(),
            source,
        })
}

/// Gives `datum` the Avro type `schema` asks for, recursively. `path` names the position for
/// error messages.
fn to_avro(datum: Datum, schema: &Schema, path: &str) -> Result<Value, EncodeError> {
    match (schema, datum) {
        (Schema::Union(union), datum) => to_union(union, datum, path),
        (Schema::Null, Datum::JsonText(None)) => Ok(Value::Null),
        (Schema::String, Datum::String(s) | Datum::JsonText(Some(s))) => Ok(Value::String(s)),
        (Schema::Long, Datum::Long(n)) => Ok(Value::Long(n)),
        (Schema::Map(map), Datum::Map(entries)) => entries
            .into_iter()
            .map(|(k, v)| {
                let value = to_avro(v, &map.types, &format!("{path}[{k:?}]"))?;
                Ok((k, value))
            })
            .collect::<Result<HashMap<_, _>, EncodeError>>()
            .map(Value::Map),
        (Schema::Record(record), Datum::Record(fields)) => to_record(record, fields, path),
        (schema, datum) => Err(mismatch(path, &datum, schema)),
    }
}

/// Picks the union branch by what the value is, not by position: JSON null goes to the `null`
/// branch, anything else to the first non-null branch that can hold it. Kaa writes both
/// `["null","string"]` and `["string","null"]`, so the branch index must come from the schema.
fn to_union(union: &UnionSchema, datum: Datum, path: &str) -> Result<Value, EncodeError> {
    let fits = |variant: &Schema| {
        matches!(
            (&datum, variant),
            (Datum::JsonText(None), Schema::Null)
                | (Datum::String(_) | Datum::JsonText(Some(_)), Schema::String)
                | (Datum::Long(_), Schema::Long)
                | (Datum::Map(_), Schema::Map(_))
                | (Datum::Record(_), Schema::Record(_))
        )
    };
    let Some((index, variant)) = union.variants().iter().enumerate().find(|(_, v)| fits(v)) else {
        return Err(mismatch(path, &datum, &Schema::Union(union.clone())));
    };
    let index = u32::try_from(index).map_err(|_| mismatch(path, &datum, variant))?;
    Ok(Value::Union(
        index,
        Box::new(to_avro(datum, variant, path)?),
    ))
}

/// Builds the record in schema field order: each field takes the event's value of the same
/// name, else the schema default, else it is an error.
fn to_record(record: &RecordSchema, mut fields: Fields, path: &str) -> Result<Value, EncodeError> {
    let mut out = Vec::with_capacity(record.fields.len());
    for field in &record.fields {
        let field_path = format!("{path}.{}", field.name);
        let value = match fields.remove(field.name.as_str()) {
            Some(datum) => to_avro(datum, &field.schema, &field_path)?,
            None => default_value(field, &field_path)?
                .ok_or(EncodeError::MissingField { path: field_path })?,
        };
        out.push((field.name.clone(), value));
    }
    if let Some(name) = fields.keys().next() {
        return Err(EncodeError::UnmappedValue {
            path: format!("{path}.{name}"),
        });
    }
    Ok(Value::Record(out))
}

/// The field's schema default as a value of the field's type, if it has one. Per the Avro
/// specification, a union field's default belongs to the union's first branch.
fn default_value(field: &RecordField, path: &str) -> Result<Option<Value>, EncodeError> {
    let Some(json) = &field.default else {
        return Ok(None);
    };
    let bad_default = |source| EncodeError::Default {
        path: path.to_owned(),
        source,
    };
    let raw = Value::try_from(json.clone()).map_err(bad_default)?;
    let value = match &field.schema {
        Schema::Union(union) => match union.variants().first() {
            Some(first) => Value::Union(0, Box::new(raw.resolve(first).map_err(bad_default)?)),
            None => return Ok(None),
        },
        schema => raw.resolve(schema).map_err(bad_default)?,
    };
    Ok(Some(value))
}

fn mismatch(path: &str, datum: &Datum, schema: &Schema) -> EncodeError {
    EncodeError::TypeMismatch {
        path: path.to_owned(),
        value: datum.kind(),
        schema: schema.canonical_form(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_compiled_in_schemas_parse() {
        for wire in [
            &REGISTERED,
            &UNREGISTERED,
            &APP_VERSION_UPDATED,
            &METADATA_UPDATED,
        ] {
            assert!(wire.schema().is_ok(), "{}", wire.file);
        }
    }

    #[test]
    fn missing_field_without_default_is_an_error() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"a","type":"string"},
                {"name":"t","type":"long","default":7}]}"#,
        )
        .unwrap();
        let err = to_avro(Datum::Record(Fields::new()), &schema, "R").unwrap_err();
        assert!(
            matches!(&err, EncodeError::MissingField { path } if path == "R.a"),
            "{err}"
        );

        let mut fields = Fields::new();
        fields.insert("a", Datum::String("x".into()));
        let value = to_avro(Datum::Record(fields), &schema, "R").unwrap();
        assert_eq!(
            value,
            Value::Record(vec![
                ("a".into(), Value::String("x".into())),
                ("t".into(), Value::Long(7)),
            ])
        );
    }

    #[test]
    fn unmapped_value_and_type_mismatch_are_errors() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"}]}"#,
        )
        .unwrap();
        let mut fields = Fields::new();
        fields.insert("a", Datum::Long(1));
        fields.insert("b", Datum::Long(2));
        let err = to_avro(Datum::Record(fields), &schema, "R").unwrap_err();
        assert!(matches!(&err, EncodeError::UnmappedValue { path } if path == "R.b"));

        let mut fields = Fields::new();
        fields.insert("a", Datum::String("1".into()));
        let err = to_avro(Datum::Record(fields), &schema, "R").unwrap_err();
        assert!(matches!(&err, EncodeError::TypeMismatch { path, .. } if path == "R.a"));
    }

    #[test]
    fn union_branch_comes_from_the_schema_not_a_fixed_index() {
        let schema = Schema::parse_str(r#"["string","null"]"#).unwrap();
        assert_eq!(
            to_avro(Datum::JsonText(None), &schema, "u").unwrap(),
            Value::Union(1, Box::new(Value::Null))
        );
        assert_eq!(
            to_avro(Datum::JsonText(Some("1".into())), &schema, "u").unwrap(),
            Value::Union(0, Box::new(Value::String("1".into())))
        );
    }

    #[test]
    fn union_default_uses_the_first_branch() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"n","type":["null","string"],"default":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            to_avro(Datum::Record(Fields::new()), &schema, "R").unwrap(),
            Value::Record(vec![("n".into(), Value::Union(0, Box::new(Value::Null)))])
        );
    }
}
