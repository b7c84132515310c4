//! The request/reply plumbing that 19/EPMMP and 20/EFMP share: the leading envelope fields,
//! the response status, the subjects, and the encode/decode steps around a protocol's body.
//!
//! Both protocols follow the same pattern (3/ISM): every request and response record starts
//! with `correlationId`, `timestamp` and `timeout`; every response adds `statusCode` and
//! `reasonPhrase`. Which fields a body has, and where the schema puts them, stays with the
//! protocol module and the schema; this module only contributes values under these names.

use crate::avro::{self, CompiledSchema, Datum, Fields, Record};
use crate::{DecodeError, EncodeError};

/// The three fields every 19/EPMMP and 20/EFMP message starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Tracing ID. A server echoes the request's value in its response.
    pub correlation_id: String,
    /// Message creation time, Unix milliseconds.
    pub timestamp: i64,
    /// Milliseconds after `timestamp` at which the message expires; 0 (or less) = never.
    pub timeout: i64,
}

impl Envelope {
    /// Whether the message had expired at `now_ms`: `timeout > 0` and
    /// `timestamp + timeout < now_ms`. A message is still valid at exactly its deadline.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.timeout > 0 && self.timestamp.saturating_add(self.timeout) < now_ms
    }

    fn fields(&self) -> Fields {
        Fields::from([
            ("correlationId", Datum::String(self.correlation_id.clone())),
            ("timestamp", Datum::Long(self.timestamp)),
            ("timeout", Datum::Long(self.timeout)),
        ])
    }

    const FIELD_NAMES: [&'static str; 3] = ["correlationId", "timestamp", "timeout"];

    fn read(r: &mut Record) -> Result<Self, DecodeError> {
        Ok(Envelope {
            correlation_id: r.string("correlationId")?,
            timestamp: r.long("timestamp")?,
            timeout: r.long("timeout")?,
        })
    }

    /// Bytes these three fields take in a datum (a string and two longs).
    pub(crate) fn encoded_len(&self) -> usize {
        avro::size::string(&self.correlation_id)
            + avro::size::long(self.timestamp)
            + avro::size::long(self.timeout)
    }
}

/// `statusCode` and `reasonPhrase`, present in every response. The RFCs list no codes; EPR
/// uses HTTP semantics (see README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// An HTTP status code.
    pub code: i32,
    /// A human-readable reason; `None` is Avro `null`.
    pub reason: Option<String>,
}

impl Status {
    /// 200 without a reason phrase.
    pub const OK: Status = Status {
        code: 200,
        reason: None,
    };

    fn fields(&self) -> Fields {
        Fields::from([
            ("statusCode", Datum::Int(self.code)),
            (
                "reasonPhrase",
                Datum::optional(self.reason.clone(), Datum::String),
            ),
        ])
    }

    fn read(r: &mut Record) -> Result<Self, DecodeError> {
        Ok(Status {
            code: r.int("statusCode")?,
            reason: r.opt_string("reasonPhrase")?,
        })
    }

    /// Bytes these two fields take in a datum (an int and a two-branch `null`/string union).
    pub(crate) fn encoded_len(&self) -> usize {
        avro::size::int(self.code) + avro::size::optional_string(self.reason.as_deref())
    }
}

/// Decodes a request: the [`Envelope`], then the body with `body`.
pub(crate) fn decode_request<B>(
    schema: &CompiledSchema,
    payload: &[u8],
    body: impl FnOnce(&mut Record) -> Result<B, DecodeError>,
) -> Result<(Envelope, B), DecodeError> {
    let mut r = schema.decode(payload)?;
    let envelope = Envelope::read(&mut r)?;
    Ok((envelope, body(&mut r)?))
}

/// Reads only the [`Envelope`] at the start of a datum of `schema`, ignoring the rest.
pub(crate) fn decode_envelope(
    schema: &CompiledSchema,
    payload: &[u8],
) -> Result<Envelope, DecodeError> {
    let mut r = schema.decode_prefix(payload, &Envelope::FIELD_NAMES)?;
    Envelope::read(&mut r)
}

/// Decodes a response: the [`Envelope`], the [`Status`], then the body with `body`.
pub(crate) fn decode_response<B>(
    schema: &CompiledSchema,
    payload: &[u8],
    body: impl FnOnce(&mut Record) -> Result<B, DecodeError>,
) -> Result<(Envelope, Status, B), DecodeError> {
    let mut r = schema.decode(payload)?;
    let envelope = Envelope::read(&mut r)?;
    let status = Status::read(&mut r)?;
    Ok((envelope, status, body(&mut r)?))
}

/// Encodes a request from its envelope and its body's values.
pub(crate) fn encode_request(
    schema: &CompiledSchema,
    env: &Envelope,
    mut body: Fields,
) -> Result<Vec<u8>, EncodeError> {
    let mut f = env.fields();
    f.append(&mut body);
    schema.encode(f)
}

/// Encodes a response from its envelope, its status and its body's values.
pub(crate) fn encode_response(
    schema: &CompiledSchema,
    env: &Envelope,
    status: &Status,
    mut body: Fields,
) -> Result<Vec<u8>, EncodeError> {
    let mut f = env.fields();
    f.append(&mut status.fields());
    f.append(&mut body);
    schema.encode(f)
}

/// Defines a protocol module's public subjects and encode/decode entry points, which are the
/// same for 19/EPMMP and 20/EFMP. The module provides `RequestType` (with `request_token`,
/// `response_token`, `request_schema` and `response_schema`), and `Request` and `Response`
/// (with `request_type`, `fields` and `read`), and imports [`Envelope`] and [`Status`].
macro_rules! request_reply_api {
    ($protocol:literal) => {
        #[doc = concat!("`kaa.v1.service.{instance}.", $protocol, ".{request_token}`: where a")]
        /// repository named `instance` receives requests of type `t`. `instance` must be one
        /// NATS subject token.
        pub fn request_subject(instance: &str, t: RequestType) -> String {
            format!(
                concat!("kaa.v1.service.{}.", $protocol, ".{}"),
                instance,
                t.request_token()
            )
        }

        #[doc = concat!("`kaa.v1.replica.{client_replica}.", $protocol, ".{response_token}`:")]
        /// the reply subject the RFC recommends to clients. A client may use any other (e.g. a
        /// NATS `_INBOX`).
        pub fn reply_subject(client_replica: &str, t: RequestType) -> String {
            format!(
                concat!("kaa.v1.replica.{}.", $protocol, ".{}"),
                client_replica,
                t.response_token()
            )
        }

        /// Server side: decodes a request of type `t` (known from the subject it arrived on).
        pub fn decode_request(
            t: RequestType,
            payload: &[u8],
        ) -> Result<(Envelope, Request), $crate::DecodeError> {
            $crate::rpc::decode_request(t.request_schema(), payload, |r| Request::read(t, r))
        }

        /// Server side: reads only the [`Envelope`] at the start of a request of type `t`,
        /// ignoring the rest. For when [`decode_request`] fails: the error reply can still
        /// echo the `correlationId`, which a client sharing one reply subject needs to match
        /// it.
        pub fn decode_request_envelope(
            t: RequestType,
            payload: &[u8],
        ) -> Result<Envelope, $crate::DecodeError> {
            $crate::rpc::decode_envelope(t.request_schema(), payload)
        }

        /// Server side: encodes the response with `body`'s type. `env` is the response's own
        /// envelope (the server echoes the request's `correlationId` and puts its own
        /// `timestamp`).
        pub fn encode_response(
            env: &Envelope,
            status: &Status,
            body: &Response,
        ) -> Result<Vec<u8>, $crate::EncodeError> {
            let schema = body.request_type().response_schema();
            $crate::rpc::encode_response(schema, env, status, body.fields())
        }

        /// Client side: encodes a request with `req`'s type.
        pub fn encode_request(
            env: &Envelope,
            req: &Request,
        ) -> Result<Vec<u8>, $crate::EncodeError> {
            $crate::rpc::encode_request(req.request_type().request_schema(), env, req.fields())
        }

        /// Client side: decodes a response to a request of type `t`.
        pub fn decode_response(
            t: RequestType,
            payload: &[u8],
        ) -> Result<(Envelope, Status, Response), $crate::DecodeError> {
            $crate::rpc::decode_response(t.response_schema(), payload, |r| Response::read(t, r))
        }
    };
}
pub(crate) use request_reply_api;
