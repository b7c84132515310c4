//! Helpers for reading and writing datums with schemas parsed here, independently of the
//! crate, from the copied `.avsc` files on disk.

#![allow(dead_code)] // each test binary uses a subset

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use std::collections::HashMap;
use std::path::Path;

pub fn schema(file: &str) -> Schema {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("avro")
        .join(file);
    Schema::parse_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Decodes `payload` as one record of `file`'s schema and checks that it uses every byte.
pub fn read(file: &str, payload: &[u8]) -> Vec<(String, Value)> {
    let schema = schema(file);
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

/// Writes a record of `file`'s schema; the fields must be given in wire order.
pub fn write(file: &str, fields: Vec<(String, Value)>) -> Vec<u8> {
    let schema = schema(file);
    GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value_to_vec(Value::Record(fields))
        .unwrap()
}

pub fn fields(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

pub fn s(v: &str) -> Value {
    Value::String(v.into())
}

pub fn b(v: &[u8]) -> Value {
    Value::Bytes(v.to_vec())
}

pub fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|v| s(v)).collect())
}

/// Branch `index` of a union.
pub fn branch(index: u32, v: Value) -> Value {
    Value::Union(index, Box::new(v))
}

pub fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<HashMap<_, _>>(),
    )
}
