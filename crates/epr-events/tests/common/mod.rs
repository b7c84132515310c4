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

/// Checks that `payload` is exactly one datum for `decode`: it decodes, every proper prefix is
/// an error (truncated or malformed, never a silently shortened message), and so is the
/// payload followed by two more bytes.
pub fn assert_exact_datum<T>(
    what: &str,
    payload: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, epr_events::DecodeError>,
) {
    use epr_events::DecodeError;
    if let Err(err) = decode(payload) {
        panic!("{what}: the complete datum does not decode: {err}");
    }
    for len in 0..payload.len() {
        match decode(&payload[..len]) {
            Err(DecodeError::Truncated { .. } | DecodeError::Malformed { .. }) => {}
            Err(err) => panic!("{what} cut at {len}: unexpected error {err}"),
            Ok(_) => panic!("{what} cut at {len}: decoded"),
        }
    }
    let mut padded = payload.to_vec();
    padded.extend([0, 0]);
    match decode(&padded) {
        Err(DecodeError::TrailingBytes { count: 2, .. }) => {}
        Err(err) => panic!("{what} padded: unexpected error {err}"),
        Ok(_) => panic!("{what} padded: decoded"),
    }
}

/// The tests every request/reply protocol module (19/EPMMP, 20/EFMP) gets; the argument is
/// the protocol's subject token. The invoking test file defines:
/// - `env(timeout) -> Envelope`, `with_env(timeout, body) -> Wire` (the envelope fields, then
///   `body`);
/// - `request_file(t)`, `response_file(t)`: the `.avsc` file names;
/// - `request_cases() -> Vec<(Request, Wire)>`, `response_cases() -> Vec<(Status, Response,
///   Wire)>`: each body with its fields after the envelope, in wire order;
/// - `empty_id_field(t) -> Option<&str>`: the ID field `Response::empty(t)` leaves empty;
/// - `tokens() -> [(RequestType, request token, response token); N]`, in `RequestType::ALL`
///   order;
///
/// and imports the module's `RequestType`, `Request`, `Response`, `Status`, the subject
/// functions and the four encode/decode functions.
#[allow(unused_macros)]
macro_rules! request_reply_tests {
    ($protocol:literal) => {
        #[test]
        fn every_request_type_is_covered_by_the_cases() {
            for t in RequestType::ALL {
                assert!(request_cases().iter().any(|(r, _)| r.request_type() == t));
                assert!(response_cases()
                    .iter()
                    .any(|(_, r, _)| r.request_type() == t));
            }
        }

        #[test]
        fn encoded_requests_decode_independently_field_by_field() {
            for (req, body) in request_cases() {
                let payload = encode_request(&env(500), &req).unwrap();
                let file = request_file(req.request_type());
                assert_eq!(common::read(file, &payload), with_env(500, body), "{req:?}");
            }
        }

        #[test]
        fn independently_written_requests_decode() {
            for (req, body) in request_cases() {
                let t = req.request_type();
                let payload = common::write(request_file(t), with_env(0, body));
                assert_eq!(decode_request(t, &payload).unwrap(), (env(0), req.clone()));
                // And the crate's own round trip is byte-identical (no maps in requests).
                assert_eq!(encode_request(&env(0), &req).unwrap(), payload, "{req:?}");
            }
        }

        #[test]
        fn encoded_responses_decode_independently_field_by_field() {
            for (status, resp, wire) in response_cases() {
                let payload = encode_response(&env(0), &status, &resp).unwrap();
                let file = response_file(resp.request_type());
                assert_eq!(common::read(file, &payload), with_env(0, wire), "{resp:?}");
            }
        }

        #[test]
        fn independently_written_responses_decode() {
            for (status, resp, wire) in response_cases() {
                let t = resp.request_type();
                let payload = common::write(response_file(t), with_env(30_000, wire));
                assert_eq!(
                    decode_response(t, &payload).unwrap(),
                    (env(30_000), status, resp)
                );
            }
        }

        #[test]
        fn empty_responses_encode_for_every_type() {
            for t in RequestType::ALL {
                let status = Status {
                    code: 400,
                    reason: Some("undecodable request".into()),
                };
                let payload = encode_response(&env(0), &status, &Response::empty(t)).unwrap();
                let decoded = common::read(response_file(t), &payload);
                let by_name = |name: &str| decoded.iter().find(|(n, _)| n == name).map(|(_, v)| v);
                assert_eq!(
                    by_name("statusCode"),
                    Some(&apache_avro::types::Value::Int(400))
                );
                assert_eq!(
                    by_name("reasonPhrase"),
                    Some(&common::branch(1, common::s("undecodable request")))
                );
                if let Some(id) = empty_id_field(t) {
                    assert_eq!(by_name(id), Some(&common::s("")), "{t:?}");
                }
                assert_eq!(
                    decode_response(t, &payload).unwrap(),
                    (env(0), status, Response::empty(t))
                );
            }
        }

        #[test]
        fn subjects_and_tokens() {
            let expected = tokens();
            assert_eq!(expected.map(|(t, _, _)| t), RequestType::ALL);
            for (t, request, response) in expected {
                assert_eq!(t.request_token(), request);
                assert_eq!(t.response_token(), response);
                assert_eq!(RequestType::from_request_token(request), Some(t));
                assert_eq!(RequestType::from_request_token(response), None);
                assert_eq!(
                    request_subject("epr", t),
                    format!(concat!("kaa.v1.service.epr.", $protocol, ".{}"), request)
                );
                assert_eq!(
                    reply_subject("epl-7", t),
                    format!(concat!("kaa.v1.replica.epl-7.", $protocol, ".{}"), response)
                );
            }
        }

        /// Every proper prefix of every datum is an error, and so is a complete datum followed
        /// by more bytes.
        #[test]
        fn truncated_and_padded_datums_are_errors() {
            for (req, _) in request_cases() {
                let t = req.request_type();
                let payload = encode_request(&env(9), &req).unwrap();
                common::assert_exact_datum(&format!("{req:?}"), &payload, |b| decode_request(t, b));
            }
            for (status, resp, _) in response_cases() {
                let t = resp.request_type();
                let payload = encode_response(&env(9), &status, &resp).unwrap();
                common::assert_exact_datum(&format!("{resp:?}"), &payload, |b| {
                    decode_response(t, b)
                });
            }
        }
    };
}
