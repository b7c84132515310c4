//! Kaa wire encoding for the Endpoint Register: NATS subjects and raw Avro datums.
//!
//! - [`encode`] turns one [`DomainEvent`] into the subject and payload that Kaa's services
//!   expect for 9/ELCE (`endpoint.lifecycle.*`) and 15/EME (`endpoint.metadata.updated`);
//!   [`encode_outbox`] encodes any [`OutboxEvent`] (endpoint or 18/EFE filter event).
//! - [`epmmp`] decodes 19/EPMMP requests and encodes their responses (and the reverse, for
//!   clients and tests).
//! - [`connectivity`] decodes the 9/ELCE `connected` event that EPR listens to.
//! - [`efe`] encodes the 18/EFE endpoint filter events (filter status, endpoint matched or
//!   unmatched) and decodes them for tests and tools.
//! - [`efmp`] decodes 20/EFMP requests and encodes their responses (and the reverse).
//! - [`tenant`] decodes the 21/TLE tenant lifecycle events that EPR listens to (and encodes
//!   them, for tests and tools).
//! - [`scmp`] decodes the 17/SCMP configuration updates from Kaa's Tekton (broadcast and
//!   targeted) and says what their null pattern asks to re-read.
//! - [`ecap`] decodes 16/ECAP endpoint token requests and encodes their responses (and the
//!   reverse), and encodes the `endpoint.token.revoked` event and our extension event
//!   `endpoint.token.status-changed`.
//!
//! All of it is pure (no NATS client, no clock).
//!
//! Why it is built this way:
//! - **The `.avsc` files are the source of truth.** Avro binary is positional, so the field
//!   order of the schema *is* the wire format. The upstream schemas are copied verbatim into
//!   `avro/` and compiled in with `include_str!`. The encoder walks each schema's fields in
//!   schema order and looks every field up *by name* in the values provided; the decoder hands
//!   out the decoded fields by name. No field list or field order is written down in Rust, so
//!   a schema update cannot silently drift from a hand-copied struct.
//! - **Payloads are raw Avro datums**: no object-container header, no single-object marker
//!   (`C3 01`), no fingerprint. That is what Kaa's own services write (`type.toBuffer(msg)` in
//!   avsc); a reader needs exactly the writer's schema.
//! - **Errors, not panics.** A schema that does not parse, a schema field that cannot be
//!   filled, a value that does not fit its field ([`EncodeError`]) and bytes that are not one
//!   complete datum of the schema ([`DecodeError`]) are all errors, so a relay or server can
//!   log and drop one message instead of crashing.
//!
//! See `README.md` in this crate for the choices made where Kaa's RFCs are silent.

mod avro;
pub mod connectivity;
pub mod ecap;
pub mod efe;
pub mod efmp;
pub mod epmmp;
mod rpc;
pub mod scmp;
pub mod tenant;

use avro::{CompiledSchema, Datum, Fields};
use epr_core::event::{DomainEvent, EventKind, OutboxEvent};
use epr_core::metadata::MetadataDiff;
use std::collections::BTreeMap;

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
    /// `kaa.v1.events.{instance}.endpoint.{group}.{type}` (9/ELCE, 15/EME) or
    /// `kaa.v1.events.{instance}.endpoint-filter.{filter id}.{type}` (18/EFE).
    pub subject: String,
    /// The Avro binary datum, encoded with the event's schema and nothing else around it.
    pub payload: Vec<u8>,
}

/// Why a message (event, request or response) could not be encoded. Every variant is a bug
/// or a misconfiguration rather than bad endpoint data, so log it loudly and do not retry
/// blindly.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A compiled-in `.avsc` file does not parse. Tests parse all of them, so this only
    /// happens if a broken schema was copied in.
    #[error("Avro schema {file} does not parse: {message}")]
    Schema { file: &'static str, message: String },
    /// The instance name cannot be a single NATS subject token.
    #[error("instance name {name:?} cannot be used in a NATS subject: {reason}")]
    InvalidInstanceName { name: String, reason: &'static str },
    /// The filter ID of an 18/EFE event cannot be a single NATS subject token (it is the
    /// event group, the 6th token of the subject).
    #[error("filter ID {id:?} cannot be used in a NATS subject: {reason}")]
    InvalidFilterId { id: String, reason: &'static str },
    /// The schema has a field that the message does not provide a value for, and the field
    /// has no default. Typically a schema was updated and this crate was not.
    #[error("schema field {path} has no value in the message and no default")]
    MissingField { path: String },
    /// The message provides a value under a name that the schema does not have. Catches a
    /// misspelt field name or a field that a schema update removed.
    #[error("the message provides {path}, but the schema has no such field")]
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

/// Why a payload could not be decoded. Apart from [`DecodeError::Schema`], every variant
/// means the peer sent something that is not a datum of the expected schema (or the schema
/// changed under this crate), so a server should answer or log it and carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A compiled-in `.avsc` file does not parse (a broken schema was copied in).
    #[error("Avro schema {file} does not parse: {message}")]
    Schema { file: &'static str, message: String },
    /// The bytes are not a datum of the schema (bad union index, invalid UTF-8, a length
    /// beyond apache-avro's allocation limit, ...).
    #[error("payload is not a datum of {file}: {message}")]
    Malformed { file: &'static str, message: String },
    /// The payload ends in the middle of the datum.
    #[error("payload is a truncated datum of {file}")]
    Truncated { file: &'static str },
    /// A complete datum is followed by more bytes: the peer used another schema or framing.
    #[error("{count} bytes follow the datum of {file}")]
    TrailingBytes { file: &'static str, count: usize },
    /// This crate asks for a field the schema does not have (the schema changed).
    #[error("schema has no field {path}")]
    MissingField { path: String },
    /// The field exists but holds another type than this crate reads it as.
    #[error("{path}: expected {expected}, found {found}")]
    WrongType {
        path: String,
        expected: &'static str,
        found: String,
    },
}

/// One Kaa event type: its schema and the subject tokens it uses.
struct WireEvent {
    schema: &'static CompiledSchema,
    /// `{event-group}` token of the subject.
    group: &'static str,
    /// `{event-type}` token of the subject.
    event_type: &'static str,
}

static REGISTERED: WireEvent = WireEvent {
    schema: &avro::EP_REGISTERED,
    group: "lifecycle",
    event_type: "registered",
};
static UNREGISTERED: WireEvent = WireEvent {
    schema: &avro::EP_UNREGISTERED,
    group: "lifecycle",
    event_type: "unregistered",
};
static APP_VERSION_UPDATED: WireEvent = WireEvent {
    schema: &avro::EP_APP_VERSION_UPDATED,
    group: "lifecycle",
    event_type: "appversion-updated",
};
static METADATA_UPDATED: WireEvent = WireEvent {
    schema: &avro::EP_METADATA_UPDATED,
    group: "metadata",
    event_type: "updated",
};

/// Encodes `event` as the Kaa event it stands for, published by `origin`.
///
/// The subject is `kaa.v1.events.{origin.instance_name}.endpoint.{group}.{type}` (9/ELCE
/// layout, reused by 15/EME); the payload is a raw Avro datum of the matching schema.
pub fn encode(event: &DomainEvent, origin: &Originator) -> Result<Encoded, EncodeError> {
    check_instance_name(&origin.instance_name)?;
    let wire = match event.kind {
        EventKind::Registered => &REGISTERED,
        EventKind::Unregistered => &UNREGISTERED,
        EventKind::AppVersionUpdated { .. } => &APP_VERSION_UPDATED,
        EventKind::MetadataUpdated(_) => &METADATA_UPDATED,
    };
    let payload = wire.schema.encode(event_values(event, origin)?)?;
    Ok(Encoded {
        subject: format!(
            "kaa.v1.events.{}.endpoint.{}.{}",
            origin.instance_name, wire.group, wire.event_type
        ),
        payload,
    })
}

/// Encodes anything the outbox carries: endpoint events with [`encode`] (9/ELCE, 15/EME),
/// filter events with [`efe::encode_filter_event`] (18/EFE), token events with
/// [`ecap::encode_token_event`] (16/ECAP and its extension).
pub fn encode_outbox(event: &OutboxEvent, origin: &Originator) -> Result<Encoded, EncodeError> {
    match event {
        OutboxEvent::Endpoint(e) => encode(e, origin),
        OutboxEvent::Filter(e) => efe::encode_filter_event(e, origin),
        OutboxEvent::Token(e) => ecap::encode_token_event(e, origin),
    }
}

/// Why `token` cannot be one NATS subject token, if it cannot. A token must be non-empty and
/// free of separators, wildcards and whitespace; otherwise the subject would have a different
/// token structure and Kaa's subscribers (`kaa.v1.events.*.endpoint.…`) would never see the
/// event.
fn subject_token_problem(token: &str) -> Option<&'static str> {
    if token.is_empty() {
        Some("it is empty")
    } else if token.contains('.') {
        Some("it contains '.', the subject token separator")
    } else if token.contains(['*', '>']) {
        Some("it contains a NATS wildcard ('*' or '>')")
    } else if token.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else {
        None
    }
}

/// The publisher's instance name must be one subject token
/// ([`EncodeError::InvalidInstanceName`] otherwise).
fn check_instance_name(name: &str) -> Result<(), EncodeError> {
    match subject_token_problem(name) {
        None => Ok(()),
        Some(reason) => Err(EncodeError::InvalidInstanceName {
            name: name.to_owned(),
            reason,
        }),
    }
}

/// The fields every event EPR publishes carries, whatever their position in the schema:
/// tracing ID, creation time in Unix milliseconds, and the emitting replica. `timeout` is
/// deliberately absent: the schema default applies (0, "never expires"); EPR's events do not
/// expire.
fn event_fields(correlation_id: &str, timestamp: i64, origin: &Originator) -> Fields {
    Fields::from([
        ("correlationId", Datum::String(correlation_id.to_owned())),
        ("timestamp", Datum::Long(timestamp)),
        (
            "originatorReplicaId",
            Datum::String(origin.replica_id.clone()),
        ),
    ])
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
    // The tracing ID is the triggering request's.
    let mut f = event_fields(&event.correlation_id, event.timestamp.millis(), origin);
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
        return Ok(Datum::Null);
    }
    serde_json::to_string(value)
        .map(Datum::String)
        .map_err(|source| EncodeError::Json {
            path: path.to_owned(),
            source,
        })
}
