//! 16/ECAP, the endpoint token half: EPR is the *authentication provider* that answers
//! endpoint token validation and status transition requests; other services (Kaa's
//! communication services, tools) are consumers. It also publishes the
//! `endpoint.token.revoked` event and our extension event `endpoint.token.status-changed`.
//!
//! Requests arrive on `kaa.v1.service.{instance}.ecap.{request-type}` ([`request_subject`])
//! and the response goes to the request's reply subject. Server side: [`decode_request`],
//! then [`encode_response`]; client side (tests and tools): [`encode_request`] and
//! [`decode_response`]. The envelope and the status are 19/EPMMP's ([`Envelope`],
//! [`Status`]); the Avro field order comes from the `0016-endpoint-token-*.avsc` files and
//! `ext/epr-endpoint-token-status-changed.avsc`, and every value is mapped to its field by
//! name.
//!
//! The RFC lists no status codes; EPR's (HTTP meanings) are in `docs/credentials.md`.

use crate::avro::{self, CompiledSchema, Datum, Fields, Record};
use crate::{
    check_instance_name, event_fields, rpc, DecodeError, EncodeError, Encoded, Originator,
};
use epr_core::event::{TokenEvent, TokenEventKind};

pub use crate::rpc::{Envelope, Status};

/// The two request/response pairs of 16/ECAP's endpoint token half.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestType {
    /// Resolve the endpoint of a token (and activate a token never validated before).
    TokenValidation,
    /// Move a token to another status, by its value.
    TokenStatusTransition,
}

impl RequestType {
    /// Every request type, e.g. to subscribe to all request subjects.
    pub const ALL: [RequestType; 2] = [
        RequestType::TokenValidation,
        RequestType::TokenStatusTransition,
    ];

    /// The last subject token of the request: `ep-token-request` or
    /// `ep-token-status-transition-request`.
    pub fn request_token(self) -> &'static str {
        match self {
            RequestType::TokenValidation => "ep-token-request",
            RequestType::TokenStatusTransition => "ep-token-status-transition-request",
        }
    }

    /// The last token of the recommended reply subject: `ep-token-response` or
    /// `ep-token-status-transition-response`. A server never needs this (it replies to
    /// whatever reply subject the request carries).
    pub fn response_token(self) -> &'static str {
        match self {
            RequestType::TokenValidation => "ep-token-response",
            RequestType::TokenStatusTransition => "ep-token-status-transition-response",
        }
    }

    /// The request type whose [`request_token`](Self::request_token) is `token`.
    pub fn from_request_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.request_token() == token)
    }

    fn request_schema(self) -> &'static CompiledSchema {
        match self {
            RequestType::TokenValidation => &avro::ECAP_TOKEN_VALIDATION_REQUEST,
            RequestType::TokenStatusTransition => &avro::ECAP_TOKEN_TRANSITION_REQUEST,
        }
    }

    fn response_schema(self) -> &'static CompiledSchema {
        match self {
            RequestType::TokenValidation => &avro::ECAP_TOKEN_VALIDATION_RESPONSE,
            RequestType::TokenStatusTransition => &avro::ECAP_TOKEN_TRANSITION_RESPONSE,
        }
    }
}

rpc::request_reply_api!("ecap");

/// The body of a 16/ECAP request (everything but the [`Envelope`]). Values are as sent:
/// the server validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    TokenValidation {
        app_name: String,
        token: String,
    },
    TokenStatusTransition {
        app_name: String,
        token: String,
        /// `Active`, `Suspended`, `Revoked` (or `Inactive`, which is refused).
        target_status: String,
    },
}

impl Request {
    pub fn request_type(&self) -> RequestType {
        match self {
            Request::TokenValidation { .. } => RequestType::TokenValidation,
            Request::TokenStatusTransition { .. } => RequestType::TokenStatusTransition,
        }
    }

    fn fields(&self) -> Fields {
        match self {
            Request::TokenValidation { app_name, token } => Fields::from([
                ("appName", Datum::String(app_name.clone())),
                ("token", Datum::String(token.clone())),
            ]),
            Request::TokenStatusTransition {
                app_name,
                token,
                target_status,
            } => Fields::from([
                ("appName", Datum::String(app_name.clone())),
                ("token", Datum::String(token.clone())),
                ("targetStatus", Datum::String(target_status.clone())),
            ]),
        }
    }

    fn read(t: RequestType, r: &mut Record) -> Result<Self, DecodeError> {
        Ok(match t {
            RequestType::TokenValidation => Request::TokenValidation {
                app_name: r.string("appName")?,
                token: r.string("token")?,
            },
            RequestType::TokenStatusTransition => Request::TokenStatusTransition {
                app_name: r.string("appName")?,
                token: r.string("token")?,
                target_status: r.string("targetStatus")?,
            },
        })
    }
}

/// The body of a 16/ECAP response (everything but the [`Envelope`] and the [`Status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    TokenValidation {
        /// The token's `endpointTokenId`; `None` (Avro `null`) when no token was found.
        token_id: Option<String>,
        /// The endpoint the token identifies; `None` when no token was found.
        endpoint_id: Option<String>,
    },
    /// The transition response has no body beyond the status.
    TokenStatusTransition,
}

impl Response {
    pub fn request_type(&self) -> RequestType {
        match self {
            Response::TokenValidation { .. } => RequestType::TokenValidation,
            Response::TokenStatusTransition => RequestType::TokenStatusTransition,
        }
    }

    /// The body of an error reply of type `t` (no token, no endpoint).
    pub fn empty(t: RequestType) -> Self {
        match t {
            RequestType::TokenValidation => Response::TokenValidation {
                token_id: None,
                endpoint_id: None,
            },
            RequestType::TokenStatusTransition => Response::TokenStatusTransition,
        }
    }

    fn fields(&self) -> Fields {
        let text = |s: &Option<String>| Datum::optional(s.clone(), Datum::String);
        match self {
            Response::TokenValidation {
                token_id,
                endpoint_id,
            } => Fields::from([
                ("tokenId", text(token_id)),
                ("endpointId", text(endpoint_id)),
            ]),
            Response::TokenStatusTransition => Fields::new(),
        }
    }

    fn read(t: RequestType, r: &mut Record) -> Result<Self, DecodeError> {
        Ok(match t {
            RequestType::TokenValidation => Response::TokenValidation {
                token_id: r.opt_string("tokenId")?,
                endpoint_id: r.opt_string("endpointId")?,
            },
            RequestType::TokenStatusTransition => Response::TokenStatusTransition,
        })
    }
}

/// `{event-type}` token of the 16/ECAP revocation event.
pub const REVOKED: &str = "revoked";
/// `{event-type}` token of our extension event.
pub const STATUS_CHANGED: &str = "status-changed";

/// `kaa.v1.events.{instance}.endpoint.token.{event_type}` ([`REVOKED`] or
/// [`STATUS_CHANGED`]).
pub fn event_subject(instance: &str, event_type: &str) -> String {
    format!("kaa.v1.events.{instance}.endpoint.token.{event_type}")
}

/// 16/ECAP `endpoint.token.revoked`: these tokens no longer identify the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRevokedEvent {
    pub correlation_id: String,
    /// Unix milliseconds.
    pub timestamp: i64,
    pub app_name: String,
    pub endpoint_id: String,
    /// The revoked tokens' `endpointTokenId`s (never the tokens themselves).
    pub token_ids: Vec<String>,
}

/// Extension `endpoint.token.status-changed`: a token changed status other than to
/// `Revoked`, or was issued to a registered endpoint (`previous_status: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatusChangedEvent {
    pub correlation_id: String,
    /// Unix milliseconds.
    pub timestamp: i64,
    pub app_name: String,
    pub endpoint_id: String,
    pub token_id: String,
    /// `Inactive`, `Active` or `Suspended`; `None` (Avro `null`) for a new token.
    pub previous_status: Option<String>,
    pub status: String,
}

/// Encodes a token event from the outbox: `kaa.v1.events.{instance}.endpoint.token.revoked`
/// (16/ECAP, `0016-endpoint-token-revoked.avsc`) or `….endpoint.token.status-changed` (our
/// extension, `ext/epr-endpoint-token-status-changed.avsc`). `timeout` is left to the schema
/// default (0).
pub fn encode_token_event(event: &TokenEvent, origin: &Originator) -> Result<Encoded, EncodeError> {
    match &event.kind {
        TokenEventKind::Revoked { token_ids } => encode_revoked(
            &TokenRevokedEvent {
                correlation_id: event.correlation_id.clone(),
                timestamp: event.timestamp.millis(),
                app_name: event.app.as_str().to_owned(),
                endpoint_id: event.endpoint_id.as_str().to_owned(),
                token_ids: token_ids.iter().map(|t| t.as_str().to_owned()).collect(),
            },
            origin,
        ),
        TokenEventKind::StatusChanged {
            token_id,
            previous,
            status,
        } => encode_status_changed(
            &TokenStatusChangedEvent {
                correlation_id: event.correlation_id.clone(),
                timestamp: event.timestamp.millis(),
                app_name: event.app.as_str().to_owned(),
                endpoint_id: event.endpoint_id.as_str().to_owned(),
                token_id: token_id.as_str().to_owned(),
                previous_status: previous.map(|p| p.as_str().to_owned()),
                status: status.as_str().to_owned(),
            },
            origin,
        ),
    }
}

/// Encodes an `endpoint.token.revoked` event published by `origin`.
pub fn encode_revoked(ev: &TokenRevokedEvent, origin: &Originator) -> Result<Encoded, EncodeError> {
    check_instance_name(&origin.instance_name)?;
    let mut f = event_fields(&ev.correlation_id, ev.timestamp, origin);
    f.insert("appName", Datum::String(ev.app_name.clone()));
    f.insert("endpointId", Datum::String(ev.endpoint_id.clone()));
    f.insert("tokenIds", Datum::strings(ev.token_ids.iter().cloned()));
    Ok(Encoded {
        subject: event_subject(&origin.instance_name, REVOKED),
        payload: avro::ECAP_TOKEN_REVOKED.encode(f)?,
    })
}

/// Encodes an `endpoint.token.status-changed` event published by `origin`.
pub fn encode_status_changed(
    ev: &TokenStatusChangedEvent,
    origin: &Originator,
) -> Result<Encoded, EncodeError> {
    check_instance_name(&origin.instance_name)?;
    let mut f = event_fields(&ev.correlation_id, ev.timestamp, origin);
    f.insert("appName", Datum::String(ev.app_name.clone()));
    f.insert("endpointId", Datum::String(ev.endpoint_id.clone()));
    f.insert("tokenId", Datum::String(ev.token_id.clone()));
    f.insert(
        "previousStatus",
        Datum::optional(ev.previous_status.clone(), Datum::String),
    );
    f.insert("status", Datum::String(ev.status.clone()));
    Ok(Encoded {
        subject: event_subject(&origin.instance_name, STATUS_CHANGED),
        payload: avro::EXT_TOKEN_STATUS_CHANGED.encode(f)?,
    })
}

/// Decodes an `endpoint.token.revoked` event; also returns the publisher's
/// `originatorReplicaId`.
pub fn decode_revoked(payload: &[u8]) -> Result<(TokenRevokedEvent, String), DecodeError> {
    let mut r = avro::ECAP_TOKEN_REVOKED.decode(payload)?;
    let ev = TokenRevokedEvent {
        correlation_id: r.string("correlationId")?,
        timestamp: r.long("timestamp")?,
        app_name: r.string("appName")?,
        endpoint_id: r.string("endpointId")?,
        token_ids: r.strings("tokenIds")?,
    };
    Ok((ev, r.string("originatorReplicaId")?))
}

/// Decodes an `endpoint.token.status-changed` event; also returns the publisher's
/// `originatorReplicaId`.
pub fn decode_status_changed(
    payload: &[u8],
) -> Result<(TokenStatusChangedEvent, String), DecodeError> {
    let mut r = avro::EXT_TOKEN_STATUS_CHANGED.decode(payload)?;
    let ev = TokenStatusChangedEvent {
        correlation_id: r.string("correlationId")?,
        timestamp: r.long("timestamp")?,
        app_name: r.string("appName")?,
        endpoint_id: r.string("endpointId")?,
        token_id: r.string("tokenId")?,
        previous_status: r.opt_string("previousStatus")?,
        status: r.string("status")?,
    };
    Ok((ev, r.string("originatorReplicaId")?))
}
