//! The schema-driven Avro layer shared by every message this crate reads or writes.
//!
//! Encoding takes values keyed by Avro field name ([`Fields`]) and walks the schema, so the
//! schema alone decides field order and union branches. Decoding reads a raw datum with the
//! schema and hands out a [`Record`] whose fields are looked up by name with typed
//! accessors. Neither side holds a field list or a field order.

use crate::{DecodeError, EncodeError};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{RecordField, RecordSchema, Schema, UnionSchema};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::LazyLock;

/// One `.avsc` file from `avro/`, compiled in and parsed on first use.
pub(crate) struct CompiledSchema {
    /// The file name under `avro/`, for error messages.
    pub(crate) file: &'static str,
    /// The parse error is kept as text so that the static can be shared.
    schema: LazyLock<Result<Schema, String>>,
}

macro_rules! compiled_schemas {
    ($($name:ident => $file:literal,)*) => {
        $(
            pub(crate) static $name: CompiledSchema = CompiledSchema {
                file: $file,
                schema: LazyLock::new(|| {
                    Schema::parse_str(include_str!(concat!("../avro/", $file)))
                        .map_err(|e| e.to_string())
                }),
            };
        )*
        /// Every compiled-in schema; a test checks that this covers every file in `avro/`.
        #[cfg(test)]
        pub(crate) static ALL: &[&CompiledSchema] = &[$(&$name),*];
    };
}

compiled_schemas! {
    EP_REGISTERED => "0009-ep-registered.avsc",
    EP_UNREGISTERED => "0009-ep-unregistered.avsc",
    EP_APP_VERSION_UPDATED => "0009-ep-appversion-updated.avsc",
    EP_CONNECTED => "0009-ep-connected.avsc",
    EP_METADATA_UPDATED => "0015-ep-metadata-updated.avsc",
    EPMMP_METADATA_GET_REQUEST => "0019-endpoint-metadata-get-request.avsc",
    EPMMP_METADATA_GET_RESPONSE => "0019-endpoint-metadata-get-response.avsc",
    EPMMP_METADATA_PATCH_REQUEST => "0019-endpoint-metadata-patch-request.avsc",
    EPMMP_METADATA_PATCH_RESPONSE => "0019-endpoint-metadata-patch-response.avsc",
    EPMMP_KEY_UPDATE_REQUEST => "0019-endpoint-metadata-key-update-request.avsc",
    EPMMP_KEY_UPDATE_RESPONSE => "0019-endpoint-metadata-key-update-response.avsc",
    EPMMP_KEY_BATCH_UPDATE_REQUEST => "0019-endpoint-metadata-key-batch-update-request.avsc",
    EPMMP_KEY_BATCH_UPDATE_RESPONSE => "0019-endpoint-metadata-key-batch-update-response.avsc",
    EPMMP_KEYS_GET_REQUEST => "0019-endpoint-metadata-keys-get-request.avsc",
    EPMMP_KEYS_GET_RESPONSE => "0019-endpoint-metadata-keys-get-response.avsc",
    EPMMP_APP_VERSIONS_REQUEST => "0019-endpoints-app-version-request.avsc",
    EPMMP_APP_VERSIONS_RESPONSE => "0019-endpoints-app-version-response.avsc",
    EFE_PENDING => "0018-epf-pending.avsc",
    EFE_ACTIVATED => "0018-epf-activated.avsc",
    EFE_DELETED => "0018-epf-deleted.avsc",
    EFE_EP_MATCHED => "0018-epf-ep-matched.avsc",
    EFE_EP_UNMATCHED => "0018-epf-ep-unmatched.avsc",
    EFMP_ENDPOINT_FILTERS_REQUEST => "0020-endpoint-filters-request.avsc",
    EFMP_ENDPOINT_FILTERS_RESPONSE => "0020-endpoint-filters-response.avsc",
    EFMP_LIST_BY_FILTER_REQUEST => "0020-endpoint-list-by-filter-request.avsc",
    EFMP_LIST_BY_FILTER_RESPONSE => "0020-endpoint-list-by-filter-response.avsc",
    TLE_UPDATED => "0021-tenant-updated.avsc",
    TLE_UNREGISTERED => "0021-tenant-unregistered.avsc",
    SCMP_BROADCAST => "0017-broadcast_configuration_update.avsc",
    SCMP_TARGETED => "0017-service_specific_configuration_update.avsc",
    ECAP_TOKEN_VALIDATION_REQUEST => "0016-endpoint-token-validation-request.avsc",
    ECAP_TOKEN_VALIDATION_RESPONSE => "0016-endpoint-token-validation-response.avsc",
    ECAP_TOKEN_TRANSITION_REQUEST => "0016-endpoint-token-status-transition-request.avsc",
    ECAP_TOKEN_TRANSITION_RESPONSE => "0016-endpoint-token-status-transition-response.avsc",
    ECAP_TOKEN_REVOKED => "0016-endpoint-token-revoked.avsc",
    // EPR's own extension schemas live in `ext/`, apart from Kaa's verbatim copies.
    EXT_TOKEN_STATUS_CHANGED => "ext/epr-endpoint-token-status-changed.avsc",
}

impl CompiledSchema {
    fn parsed(&self) -> Result<&Schema, String> {
        self.schema.as_ref().map_err(Clone::clone)
    }

    /// The record name, used as the root of field paths in error messages.
    fn root(&self) -> String {
        match self.parsed() {
            Ok(schema) => schema
                .name()
                .map_or_else(|| self.file.to_owned(), |n| n.name().to_owned()),
            Err(_) => self.file.to_owned(),
        }
    }

    /// Encodes a record of this schema as a raw datum from values keyed by field name.
    pub(crate) fn encode(&self, fields: Fields) -> Result<Vec<u8>, EncodeError> {
        let schema = self.parsed().map_err(|message| EncodeError::Schema {
            file: self.file,
            message,
        })?;
        let value = to_avro(Datum::Record(fields), schema, &self.root())?;
        Ok(GenericDatumWriter::builder(schema)
            .build()?
            .write_value_to_vec(value)?)
    }

    /// Decodes a raw datum that must be exactly one record of this schema.
    pub(crate) fn decode(&self, payload: &[u8]) -> Result<Record, DecodeError> {
        let schema = self.parsed_for_decode()?;
        self.read(schema, payload, false)
    }

    /// Decodes only the leading fields of the record, up to and including the last of `names`
    /// in schema order; whatever follows is not looked at. Lets a server recover e.g. the
    /// `correlationId` of a request whose body is broken.
    pub(crate) fn decode_prefix(
        &self,
        payload: &[u8],
        names: &[&str],
    ) -> Result<Record, DecodeError> {
        let root = self.root();
        let Schema::Record(record) = self.parsed_for_decode()? else {
            return Err(DecodeError::WrongType {
                path: root,
                expected: "record",
                found: "non-record schema".to_owned(),
            });
        };
        let mut end = 0;
        for name in names {
            let index = record
                .lookup
                .get(*name)
                .ok_or_else(|| DecodeError::MissingField {
                    path: format!("{root}.{name}"),
                })?;
            end = end.max(*index);
        }
        let mut prefix: RecordSchema = record.clone();
        prefix.fields.truncate(end + 1);
        prefix.lookup.retain(|_, index| *index <= end);
        self.read(&Schema::Record(prefix), payload, true)
    }

    fn parsed_for_decode(&self) -> Result<&Schema, DecodeError> {
        self.parsed().map_err(|message| DecodeError::Schema {
            file: self.file,
            message,
        })
    }

    fn read(
        &self,
        schema: &Schema,
        payload: &[u8],
        trailing_ok: bool,
    ) -> Result<Record, DecodeError> {
        let malformed = |e: apache_avro::Error| DecodeError::Malformed {
            file: self.file,
            message: e.to_string(),
        };
        let reader = GenericDatumReader::builder(schema)
            .build()
            .map_err(malformed)?;
        let mut input = EofTracking {
            rest: payload,
            hit_eof: false,
        };
        let result = reader.read_value(&mut input);
        // apache-avro turns an EOF inside a string, boolean or union index into a `null` value
        // instead of an error, so a truncated datum can "decode". Any read past the end means
        // the datum was cut short, whatever the result says.
        if input.hit_eof {
            return Err(DecodeError::Truncated { file: self.file });
        }
        let value = result.map_err(malformed)?;
        if !trailing_ok && !input.rest.is_empty() {
            return Err(DecodeError::TrailingBytes {
                file: self.file,
                count: input.rest.len(),
            });
        }
        Field {
            path: self.root(),
            value,
        }
        .record()
    }
}

/// A slice reader that remembers whether anyone tried to read beyond its end. Avro decoding
/// reads exactly the bytes a datum has, so a complete datum never does.
struct EofTracking<'a> {
    rest: &'a [u8],
    hit_eof: bool,
}

impl Read for EofTracking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && self.rest.is_empty() {
            self.hit_eof = true;
        }
        self.rest.read(buf)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// A value for one schema position, before the schema gives it its Avro type.
#[derive(Debug)]
pub(crate) enum Datum {
    Null,
    Boolean(bool),
    Int(i32),
    Long(i64),
    Bytes(Vec<u8>),
    String(String),
    Array(Vec<Datum>),
    Map(BTreeMap<String, Datum>),
    Record(Fields),
}

/// Values keyed by Avro field name. Order is irrelevant: the schema decides it.
pub(crate) type Fields = BTreeMap<&'static str, Datum>;

impl Datum {
    /// `None` becomes Avro `null` (a union's `null` branch), `Some` the value.
    pub(crate) fn optional<T>(value: Option<T>, f: impl FnOnce(T) -> Datum) -> Datum {
        value.map_or(Datum::Null, f)
    }

    pub(crate) fn strings<I: IntoIterator<Item = String>>(items: I) -> Datum {
        Datum::Array(items.into_iter().map(Datum::String).collect())
    }

    /// A `map<array<string>>`.
    pub(crate) fn string_lists(map: &BTreeMap<String, Vec<String>>) -> Datum {
        Datum::Map(
            map.iter()
                .map(|(k, items)| (k.clone(), Datum::strings(items.iter().cloned())))
                .collect(),
        )
    }

    fn kind(&self) -> &'static str {
        match self {
            Datum::Null => "null",
            Datum::Boolean(_) => "boolean",
            Datum::Int(_) => "int",
            Datum::Long(_) => "long",
            Datum::Bytes(_) => "bytes",
            Datum::String(_) => "string",
            Datum::Array(_) => "array",
            Datum::Map(_) => "map",
            Datum::Record(_) => "record",
        }
    }

    /// Whether this value can be written with `schema` without conversion. Strict on purpose
    /// (an int is not a long): a mismatch means the schema and this crate disagree.
    fn fits(&self, schema: &Schema) -> bool {
        matches!(
            (self, schema),
            (Datum::Null, Schema::Null)
                | (Datum::Boolean(_), Schema::Boolean)
                | (Datum::Int(_), Schema::Int)
                | (Datum::Long(_), Schema::Long)
                | (Datum::Bytes(_), Schema::Bytes)
                | (Datum::String(_), Schema::String)
                | (Datum::Array(_), Schema::Array(_))
                | (Datum::Map(_), Schema::Map(_))
                | (Datum::Record(_), Schema::Record(_))
        )
    }
}

/// Gives `datum` the Avro type `schema` asks for, recursively. `path` names the position for
/// error messages.
pub(crate) fn to_avro(datum: Datum, schema: &Schema, path: &str) -> Result<Value, EncodeError> {
    match (schema, datum) {
        (Schema::Union(union), datum) => to_union(union, datum, path),
        (Schema::Array(array), Datum::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| to_avro(item, &array.items, &format!("{path}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        (Schema::Map(map), Datum::Map(entries)) => entries
            .into_iter()
            .map(|(k, v)| {
                let value = to_avro(v, &map.types, &format!("{path}[{k:?}]"))?;
                Ok((k, value))
            })
            .collect::<Result<HashMap<_, _>, EncodeError>>()
            .map(Value::Map),
        (Schema::Record(record), Datum::Record(fields)) => to_record(record, fields, path),
        (schema, datum) if datum.fits(schema) => Ok(match datum {
            Datum::Null => Value::Null,
            Datum::Boolean(b) => Value::Boolean(b),
            Datum::Int(n) => Value::Int(n),
            Datum::Long(n) => Value::Long(n),
            Datum::Bytes(b) => Value::Bytes(b),
            Datum::String(s) => Value::String(s),
            Datum::Array(_) | Datum::Map(_) | Datum::Record(_) => {
                unreachable!("containers are matched above")
            }
        }),
        (schema, datum) => Err(mismatch(path, &datum, schema)),
    }
}

/// Picks the union branch by what the value is, not by position: `null` goes to the `null`
/// branch, anything else to the first branch of its kind. Kaa writes both
/// `["null","string"]` and `["string","null"]`, so the branch index must come from the schema.
fn to_union(union: &UnionSchema, datum: Datum, path: &str) -> Result<Value, EncodeError> {
    let Some((index, variant)) = union
        .variants()
        .iter()
        .enumerate()
        .find(|(_, v)| datum.fits(v))
    else {
        return Err(mismatch(path, &datum, &Schema::Union(union.clone())));
    };
    let index = u32::try_from(index).map_err(|_| mismatch(path, &datum, variant))?;
    Ok(Value::Union(
        index,
        Box::new(to_avro(datum, variant, path)?),
    ))
}

/// Builds the record in schema field order: each field takes the value of the same name, else
/// the schema default, else it is an error. A value for a field the schema lacks is an error
/// too, so a misspelt or removed name cannot go unnoticed.
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

// ---------------------------------------------------------------------------------------------
// Encoded sizes

/// Lengths of Avro binary encodings, as apache-avro writes them, for computing the size of a
/// datum without building it. These follow the Avro specification's binary encoding; tests
/// compare every caller's result with the real encoder's output.
pub(crate) mod size {
    /// A `long` (or an `int`, a length, a count, a union index): a zig-zag varint, 1 to 10
    /// bytes.
    pub(crate) fn long(n: i64) -> usize {
        let zigzag = ((n << 1) ^ (n >> 63)) as u64;
        let bits = 64 - zigzag.leading_zeros() as usize;
        bits.div_ceil(7).max(1)
    }

    /// An `int`: the same varint as a `long` of the same value.
    pub(crate) fn int(n: i32) -> usize {
        long(n.into())
    }

    /// A `string` (or `bytes`): its byte length as a `long`, then the bytes.
    pub(crate) fn string(s: &str) -> usize {
        len_prefix(s.len()) + s.len()
    }

    /// A `["null","string"]` or `["string","null"]` union: the branch index (0 or 1, one byte
    /// either way), then the string if there is one.
    pub(crate) fn optional_string(s: Option<&str>) -> usize {
        1 + s.map_or(0, string)
    }

    /// An `array` or `map` of `count` items whose encodings take `items` bytes. apache-avro
    /// writes one block (the count, then the items) followed by the terminating 0; an empty
    /// one is just the 0.
    pub(crate) fn block(count: usize, items: usize) -> usize {
        let header = if count == 0 { 0 } else { len_prefix(count) };
        header + items + 1
    }

    /// An `array<string>`.
    pub(crate) fn strings<S: AsRef<str>>(items: &[S]) -> usize {
        block(items.len(), items.iter().map(|s| string(s.as_ref())).sum())
    }

    fn len_prefix(len: usize) -> usize {
        // A length beyond i64::MAX cannot exist in memory; saturate rather than wrap.
        long(i64::try_from(len).unwrap_or(i64::MAX))
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A decoded record whose fields are taken out by name. Fields nobody asks for are ignored,
/// so a schema that gains a field still decodes.
#[derive(Debug)]
pub(crate) struct Record {
    path: String,
    fields: Vec<(String, Value)>,
}

impl Record {
    /// Takes the field `name` out of the record.
    pub(crate) fn field(&mut self, name: &str) -> Result<Field, DecodeError> {
        let path = format!("{}.{name}", self.path);
        match self.fields.iter().position(|(n, _)| n == name) {
            Some(index) => Ok(Field {
                path,
                value: self.fields.swap_remove(index).1,
            }),
            None => Err(DecodeError::MissingField { path }),
        }
    }

    pub(crate) fn string(&mut self, name: &str) -> Result<String, DecodeError> {
        self.field(name)?.string()
    }

    pub(crate) fn long(&mut self, name: &str) -> Result<i64, DecodeError> {
        self.field(name)?.long()
    }

    pub(crate) fn int(&mut self, name: &str) -> Result<i32, DecodeError> {
        self.field(name)?.int()
    }

    pub(crate) fn boolean(&mut self, name: &str) -> Result<bool, DecodeError> {
        self.field(name)?.boolean()
    }

    pub(crate) fn bytes(&mut self, name: &str) -> Result<Vec<u8>, DecodeError> {
        self.field(name)?.bytes()
    }

    pub(crate) fn strings(&mut self, name: &str) -> Result<Vec<String>, DecodeError> {
        self.field(name)?.strings()
    }

    /// A `map<array<string>>`.
    pub(crate) fn string_lists(
        &mut self,
        name: &str,
    ) -> Result<BTreeMap<String, Vec<String>>, DecodeError> {
        self.field(name)?
            .map()?
            .into_iter()
            .map(|(k, items)| Ok((k, items.strings()?)))
            .collect()
    }

    pub(crate) fn opt_string(&mut self, name: &str) -> Result<Option<String>, DecodeError> {
        self.field(name)?.optional().map(Field::string).transpose()
    }

    pub(crate) fn opt_bytes(&mut self, name: &str) -> Result<Option<Vec<u8>>, DecodeError> {
        self.field(name)?.optional().map(Field::bytes).transpose()
    }
}

/// One decoded value and where it sits, for error messages. The typed accessors look through
/// a union to the branch that was written, so `["null","string"]` holding a string reads as a
/// string; use [`Field::optional`] where `null` is acceptable.
#[derive(Debug)]
pub(crate) struct Field {
    path: String,
    value: Value,
}

impl Field {
    fn unwrap_union(self) -> Self {
        match self.value {
            Value::Union(_, inner) => Field {
                path: self.path,
                value: *inner,
            },
            value => Field {
                path: self.path,
                value,
            },
        }
    }

    /// `None` for Avro `null` (whichever union branch holds it), else the value.
    pub(crate) fn optional(self) -> Option<Self> {
        let field = self.unwrap_union();
        (field.value != Value::Null).then_some(field)
    }

    fn wrong_type(&self, expected: &'static str) -> DecodeError {
        DecodeError::WrongType {
            path: self.path.clone(),
            expected,
            found: value_kind(&self.value).to_owned(),
        }
    }

    pub(crate) fn string(self) -> Result<String, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::String(s),
                ..
            } => Ok(s),
            other => Err(other.wrong_type("string")),
        }
    }

    pub(crate) fn long(self) -> Result<i64, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::Long(n),
                ..
            } => Ok(n),
            other => Err(other.wrong_type("long")),
        }
    }

    pub(crate) fn int(self) -> Result<i32, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::Int(n),
                ..
            } => Ok(n),
            other => Err(other.wrong_type("int")),
        }
    }

    pub(crate) fn boolean(self) -> Result<bool, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::Boolean(b),
                ..
            } => Ok(b),
            other => Err(other.wrong_type("boolean")),
        }
    }

    pub(crate) fn bytes(self) -> Result<Vec<u8>, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::Bytes(b),
                ..
            } => Ok(b),
            other => Err(other.wrong_type("bytes")),
        }
    }

    pub(crate) fn array(self) -> Result<Vec<Field>, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::Array(items),
                path,
            } => Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, value)| Field {
                    path: format!("{path}[{i}]"),
                    value,
                })
                .collect()),
            other => Err(other.wrong_type("array")),
        }
    }

    pub(crate) fn map(self) -> Result<BTreeMap<String, Field>, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::Map(entries),
                path,
            } => Ok(entries
                .into_iter()
                .map(|(k, value)| {
                    let path = format!("{path}[{k:?}]");
                    (k, Field { path, value })
                })
                .collect()),
            other => Err(other.wrong_type("map")),
        }
    }

    pub(crate) fn record(self) -> Result<Record, DecodeError> {
        match self.unwrap_union() {
            Field {
                value: Value::Record(fields),
                path,
            } => Ok(Record { path, fields }),
            other => Err(other.wrong_type("record")),
        }
    }

    /// An `array<string>`.
    pub(crate) fn strings(self) -> Result<Vec<String>, DecodeError> {
        self.array()?.into_iter().map(Field::string).collect()
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Boolean(_) => "boolean",
        Value::Int(_) => "int",
        Value::Long(_) => "long",
        Value::Float(_) => "float",
        Value::Double(_) => "double",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "string",
        Value::Fixed(..) => "fixed",
        Value::Enum(..) => "enum",
        Value::Union(..) => "union",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Record(_) => "record",
        _ => "logical type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Schema {
        Schema::parse_str(text).unwrap()
    }

    #[test]
    fn varint_sizes_match_apache_avro() {
        let write = |schema: &Schema, value: Value| {
            GenericDatumWriter::builder(schema)
                .build()
                .unwrap()
                .write_value_to_vec(value)
                .unwrap()
                .len()
        };
        let long = parse(r#""long""#);
        let int = parse(r#""int""#);
        let mut values = vec![0, 1, -1, i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1];
        // Both sides of every 7-bit boundary of the zig-zag value.
        for bits in (7..64).step_by(7) {
            let edge = 1i64 << (bits - 1);
            values.extend([edge - 1, edge, -edge, -edge - 1]);
        }
        for n in values {
            assert_eq!(size::long(n), write(&long, Value::Long(n)), "{n}");
            if let Ok(small) = i32::try_from(n) {
                assert_eq!(size::int(small), write(&int, Value::Int(small)), "{n}");
            }
        }
        assert_eq!(size::long(i64::MIN), 10);
        assert_eq!(size::long(63), 1);
        assert_eq!(size::long(64), 2);
        assert_eq!(size::long(-64), 1);
        assert_eq!(size::long(-65), 2);
    }

    #[test]
    fn string_and_block_sizes_match_apache_avro() {
        let schema = parse(
            r#"{"type":"record","name":"R","fields":[
                {"name":"s","type":"string"},
                {"name":"o","type":["string","null"]},
                {"name":"a","type":{"type":"array","items":"string"}}]}"#,
        );
        let long_text = "é".repeat(40); // 80 bytes: a 2-byte length
        for (text, optional, items) in [
            ("", None, 0),
            ("x", Some(""), 1),
            (long_text.as_str(), Some(long_text.as_str()), 63),
            ("ü", Some("abc"), 64),
            ("", None, 200),
        ] {
            let array: Vec<String> = (0..items).map(|i| format!("item-{i}")).collect();
            let value = to_avro(
                Datum::Record(Fields::from([
                    ("s", Datum::String(text.to_owned())),
                    (
                        "o",
                        Datum::optional(optional, |o| Datum::String(o.to_owned())),
                    ),
                    ("a", Datum::strings(array.iter().cloned())),
                ])),
                &schema,
                "R",
            )
            .unwrap();
            let expected = GenericDatumWriter::builder(&schema)
                .build()
                .unwrap()
                .write_value_to_vec(value)
                .unwrap()
                .len();
            let computed =
                size::string(text) + size::optional_string(optional) + size::strings(&array);
            assert_eq!(computed, expected, "{text:?} {optional:?} {items}");
        }
    }

    #[test]
    fn every_file_in_avro_is_compiled_in_and_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("avro");
        let mut on_disk: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            if entry.file_type().unwrap().is_dir() {
                // `ext/`: our extension schemas, one level deep.
                for inner in std::fs::read_dir(entry.path()).unwrap() {
                    let inner = inner.unwrap().file_name().into_string().unwrap();
                    on_disk.push(format!("{name}/{inner}"));
                }
            } else {
                on_disk.push(name);
            }
        }
        on_disk.sort();
        let mut compiled: Vec<String> = ALL.iter().map(|s| s.file.to_owned()).collect();
        compiled.sort();
        assert_eq!(compiled, on_disk);
        for schema in ALL {
            assert!(schema.parsed().is_ok(), "{}", schema.file);
        }
    }

    #[test]
    fn missing_field_without_default_is_an_error() {
        let schema = parse(
            r#"{"type":"record","name":"R","fields":[
                {"name":"a","type":"string"},
                {"name":"t","type":"long","default":7}]}"#,
        );
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
        let schema = parse(r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"}]}"#);
        let mut fields = Fields::new();
        fields.insert("a", Datum::Long(1));
        fields.insert("b", Datum::Long(2));
        let err = to_avro(Datum::Record(fields), &schema, "R").unwrap_err();
        assert!(matches!(&err, EncodeError::UnmappedValue { path } if path == "R.b"));

        let mut fields = Fields::new();
        fields.insert("a", Datum::String("1".into()));
        let err = to_avro(Datum::Record(fields), &schema, "R").unwrap_err();
        assert!(matches!(&err, EncodeError::TypeMismatch { path, .. } if path == "R.a"));

        // An int is not silently widened to a long: the schema and the crate disagree.
        let mut fields = Fields::new();
        fields.insert("a", Datum::Int(1));
        let err = to_avro(Datum::Record(fields), &schema, "R").unwrap_err();
        assert!(matches!(&err, EncodeError::TypeMismatch { path, .. } if path == "R.a"));
    }

    #[test]
    fn union_branch_comes_from_the_schema_not_a_fixed_index() {
        for (text, null_index, string_index) in [
            (r#"["string","null"]"#, 1, 0),
            (r#"["null","string"]"#, 0, 1),
        ] {
            let schema = parse(text);
            assert_eq!(
                to_avro(Datum::Null, &schema, "u").unwrap(),
                Value::Union(null_index, Box::new(Value::Null)),
                "{text}"
            );
            assert_eq!(
                to_avro(Datum::String("1".into()), &schema, "u").unwrap(),
                Value::Union(string_index, Box::new(Value::String("1".into()))),
                "{text}"
            );
            let err = to_avro(Datum::Long(1), &schema, "u").unwrap_err();
            assert!(matches!(err, EncodeError::TypeMismatch { .. }), "{text}");
        }
        let schema = parse(r#"["null","bytes"]"#);
        assert_eq!(
            to_avro(Datum::Bytes(vec![1]), &schema, "u").unwrap(),
            Value::Union(1, Box::new(Value::Bytes(vec![1])))
        );
    }

    #[test]
    fn union_default_uses_the_first_branch() {
        let schema = parse(
            r#"{"type":"record","name":"R","fields":[
                {"name":"n","type":["null","string"],"default":null},
                {"name":"a","type":{"type":"array","items":"string"},"default":[]},
                {"name":"b","type":"boolean","default":true}]}"#,
        );
        assert_eq!(
            to_avro(Datum::Record(Fields::new()), &schema, "R").unwrap(),
            Value::Record(vec![
                ("n".into(), Value::Union(0, Box::new(Value::Null))),
                ("a".into(), Value::Array(vec![])),
                ("b".into(), Value::Boolean(true)),
            ])
        );
    }

    /// A [`CompiledSchema`] from a literal (a macro, so that the closure captures nothing).
    macro_rules! inline {
        ($text:literal $(,)?) => {
            CompiledSchema {
                file: "inline.avsc",
                schema: LazyLock::new(|| Schema::parse_str($text).map_err(|e| e.to_string())),
            }
        };
    }

    #[test]
    fn both_union_orders_round_trip_on_the_wire() {
        let schema = inline!(
            r#"{"type":"record","name":"R","fields":[
                {"name":"a","type":["null","string"]},
                {"name":"b","type":["string","null"]}]}"#,
        );
        let encode = |v: Option<&str>| {
            let datum = || Datum::optional(v, |s| Datum::String(s.to_owned()));
            schema
                .encode(Fields::from([("a", datum()), ("b", datum())]))
                .unwrap()
        };
        // Zig-zag branch indexes: 0 -> 0x00, 1 -> 0x02; "x" is length 1 (0x02) then 'x'.
        let none = encode(None);
        assert_eq!(none, [0x00, 0x02]);
        let some = encode(Some("x"));
        assert_eq!(some, [0x02, 0x02, b'x', 0x00, 0x02, b'x']);
        for (bytes, expected) in [(none, None), (some, Some("x".to_owned()))] {
            let mut r = schema.decode(&bytes).unwrap();
            assert_eq!(r.opt_string("b").unwrap(), expected);
            assert_eq!(r.opt_string("a").unwrap(), expected);
        }
    }

    fn record(fields: Vec<(&str, Value)>) -> Record {
        Record {
            path: "R".into(),
            fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    #[test]
    fn record_view_reads_by_name_and_names_the_path_in_errors() {
        let mut r = record(vec![
            ("s", Value::String("x".into())),
            ("n", Value::Union(1, Box::new(Value::String("y".into())))),
            ("z", Value::Union(0, Box::new(Value::Null))),
            ("l", Value::Long(3)),
            (
                "a",
                Value::Array(vec![Value::String("p".into()), Value::Long(1)]),
            ),
        ]);
        // Any order: names, not positions.
        assert_eq!(r.long("l").unwrap(), 3);
        assert_eq!(r.opt_string("z").unwrap(), None);
        assert_eq!(r.opt_string("n").unwrap(), Some("y".into()));
        assert_eq!(r.string("s").unwrap(), "x");

        let err = r.string("s").unwrap_err();
        assert!(matches!(&err, DecodeError::MissingField { path } if path == "R.s"));
        let err = r.strings("a").unwrap_err();
        assert!(
            matches!(&err, DecodeError::WrongType { path, expected: "string", found }
                if path == "R.a[1]" && found == "long"),
            "{err}"
        );
        let mut r = record(vec![("l", Value::Long(3))]);
        let err = r.int("l").unwrap_err();
        assert!(
            matches!(&err, DecodeError::WrongType { path, expected: "int", .. } if path == "R.l")
        );
        let mut r = record(vec![("z", Value::Union(0, Box::new(Value::Null)))]);
        let err = r.string("z").unwrap_err();
        assert!(matches!(&err, DecodeError::WrongType { found, .. } if found == "null"));
    }

    #[test]
    fn eof_inside_a_string_or_union_is_truncation_not_null() {
        // apache-avro reads both of these as `null` values; the EOF tracker must not.
        let schema = inline!(
            r#"{"type":"record","name":"R","fields":[
                {"name":"s","type":"string"},
                {"name":"u","type":["null","string"]}]}"#,
        );
        let mut full = schema
            .encode(Fields::from([
                ("s", Datum::String("abc".into())),
                ("u", Datum::Null),
            ]))
            .unwrap();
        assert_eq!(full, [6, b'a', b'b', b'c', 0]);
        assert!(schema.decode(&full).is_ok());
        for len in 0..full.len() {
            let err = schema.decode(&full[..len]).unwrap_err();
            assert!(matches!(err, DecodeError::Truncated { .. }), "{len}: {err}");
        }
        full.push(0);
        let err = schema.decode(&full).unwrap_err();
        assert!(matches!(err, DecodeError::TrailingBytes { count: 1, .. }));
        // The prefix decoder ignores what follows the fields it needs.
        let mut prefix = schema.decode_prefix(&full[..4], &["s"]).unwrap();
        assert_eq!(prefix.string("s").unwrap(), "abc");
        assert!(matches!(
            prefix.field("u").unwrap_err(),
            DecodeError::MissingField { .. }
        ));
    }
}
