//! 20/EFMP, the Endpoint Filter Management Protocol: EPR is the *repository* that answers it;
//! other services are clients.
//!
//! Requests arrive on `kaa.v1.service.{instance}.efmp.{request-type}` ([`request_subject`])
//! and the response goes to the request's reply subject. Server side: [`decode_request`], then
//! [`encode_response`] (check [`list_by_filter_response_size`] first: the protocol has no
//! paging). Client side (tests and tools): [`encode_request`] and [`decode_response`].
//!
//! The envelope, the status and the request/reply plumbing are 19/EPMMP's ([`Envelope`] and
//! [`Status`] are the same types as in [`crate::epmmp`]); the Avro field order comes from the
//! `0020-*.avsc` files, and every value is mapped to its field by name.

use crate::avro::{self, size, CompiledSchema, Datum, Fields, Record};
use crate::rpc;
use crate::DecodeError;
use std::collections::BTreeMap;

pub use crate::rpc::{Envelope, Status};

/// The two request/response pairs of 20/EFMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestType {
    /// The filters an endpoint matches.
    EndpointFilters,
    /// The endpoints that match a filter, grouped by app version.
    ListByFilter,
}

impl RequestType {
    /// Every request type, e.g. to subscribe to all request subjects.
    pub const ALL: [RequestType; 2] = [RequestType::EndpointFilters, RequestType::ListByFilter];

    /// The last subject token of the request: `ep-filters-request` or
    /// `ep-list-by-filter-request`.
    pub fn request_token(self) -> &'static str {
        match self {
            RequestType::EndpointFilters => "ep-filters-request",
            RequestType::ListByFilter => "ep-list-by-filter-request",
        }
    }

    /// The last token of the RFC's recommended reply subject: `ep-filters-response` or
    /// `ep-list-by-filter-response`. A server never needs this (it replies to whatever reply
    /// subject the request carries).
    pub fn response_token(self) -> &'static str {
        match self {
            RequestType::EndpointFilters => "ep-filters-response",
            RequestType::ListByFilter => "ep-list-by-filter-response",
        }
    }

    /// The request type whose [`request_token`](Self::request_token) is `token`.
    pub fn from_request_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.request_token() == token)
    }

    fn request_schema(self) -> &'static CompiledSchema {
        match self {
            RequestType::EndpointFilters => &avro::EFMP_ENDPOINT_FILTERS_REQUEST,
            RequestType::ListByFilter => &avro::EFMP_LIST_BY_FILTER_REQUEST,
        }
    }

    fn response_schema(self) -> &'static CompiledSchema {
        match self {
            RequestType::EndpointFilters => &avro::EFMP_ENDPOINT_FILTERS_RESPONSE,
            RequestType::ListByFilter => &avro::EFMP_LIST_BY_FILTER_RESPONSE,
        }
    }
}

rpc::request_reply_api!("efmp");

/// The body of a 20/EFMP request (everything but the [`Envelope`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    EndpointFilters { endpoint_id: String },
    ListByFilter { filter_id: String },
}

impl Request {
    pub fn request_type(&self) -> RequestType {
        match self {
            Request::EndpointFilters { .. } => RequestType::EndpointFilters,
            Request::ListByFilter { .. } => RequestType::ListByFilter,
        }
    }

    /// The body's values under the schema's field names.
    fn fields(&self) -> Fields {
        match self {
            Request::EndpointFilters { endpoint_id } => {
                Fields::from([("endpointId", Datum::String(endpoint_id.clone()))])
            }
            Request::ListByFilter { filter_id } => {
                Fields::from([("filterId", Datum::String(filter_id.clone()))])
            }
        }
    }

    fn read(t: RequestType, r: &mut Record) -> Result<Self, DecodeError> {
        Ok(match t {
            RequestType::EndpointFilters => Request::EndpointFilters {
                endpoint_id: r.string("endpointId")?,
            },
            RequestType::ListByFilter => Request::ListByFilter {
                filter_id: r.string("filterId")?,
            },
        })
    }
}

/// The body of a 20/EFMP response (everything but the [`Envelope`] and the [`Status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    EndpointFilters {
        /// Echo of the requested endpoint ID.
        endpoint_id: String,
        /// The filters the endpoint matches.
        filter_ids: Vec<String>,
    },
    ListByFilter {
        /// Echo of the requested filter ID.
        filter_id: String,
        /// App version name → the endpoints of that version that match the filter.
        app_versions_to_endpoints: BTreeMap<String, Vec<String>>,
    },
}

impl Response {
    pub fn request_type(&self) -> RequestType {
        match self {
            Response::EndpointFilters { .. } => RequestType::EndpointFilters,
            Response::ListByFilter { .. } => RequestType::ListByFilter,
        }
    }

    /// An empty body of type `t` (empty ID, no filters, empty map), for error replies, in
    /// particular to a request that could not even be decoded.
    pub fn empty(t: RequestType) -> Self {
        match t {
            RequestType::EndpointFilters => Response::EndpointFilters {
                endpoint_id: String::new(),
                filter_ids: Vec::new(),
            },
            RequestType::ListByFilter => Response::ListByFilter {
                filter_id: String::new(),
                app_versions_to_endpoints: BTreeMap::new(),
            },
        }
    }

    fn fields(&self) -> Fields {
        match self {
            Response::EndpointFilters {
                endpoint_id,
                filter_ids,
            } => Fields::from([
                ("endpointId", Datum::String(endpoint_id.clone())),
                ("filterIds", Datum::strings(filter_ids.iter().cloned())),
            ]),
            Response::ListByFilter {
                filter_id,
                app_versions_to_endpoints,
            } => Fields::from([
                ("filterId", Datum::String(filter_id.clone())),
                (
                    "appVersionsToEndpoints",
                    Datum::string_lists(app_versions_to_endpoints),
                ),
            ]),
        }
    }

    fn read(t: RequestType, r: &mut Record) -> Result<Self, DecodeError> {
        Ok(match t {
            RequestType::EndpointFilters => Response::EndpointFilters {
                endpoint_id: r.string("endpointId")?,
                filter_ids: r.strings("filterIds")?,
            },
            RequestType::ListByFilter => Response::ListByFilter {
                filter_id: r.string("filterId")?,
                app_versions_to_endpoints: r.string_lists("appVersionsToEndpoints")?,
            },
        })
    }
}

/// The exact length in bytes of the payload that
/// `encode_response(env, status, &Response::ListByFilter { filter_id, app_versions_to_endpoints })`
/// would produce, computed in one pass over the strings without building or encoding
/// anything.
///
/// 20/EFMP has no paging, so the reply to a large filter can exceed the NATS server's
/// `max_payload` (1 MiB by default; the client learns the value from the server's `INFO`).
/// Compare this with that limit and answer with an error status (EPR uses 413, see README)
/// and an empty body instead of a reply that NATS would refuse. The payload is all that
/// counts: EPR sends no NATS headers (which would count towards the same limit).
///
/// The size depends on the values and on each field's Avro type, not on the field order; it
/// assumes apache-avro's layout for maps and arrays (one block, then the terminating 0). A
/// test compares it with real encodings of arbitrary responses.
pub fn list_by_filter_response_size(
    env: &Envelope,
    status: &Status,
    filter_id: &str,
    app_versions_to_endpoints: &BTreeMap<String, Vec<String>>,
) -> usize {
    let entries = app_versions_to_endpoints
        .iter()
        .map(|(version, endpoints)| size::string(version) + size::strings(endpoints))
        .sum();
    env.encoded_len()
        + status.encoded_len()
        + size::string(filter_id)
        + size::block(app_versions_to_endpoints.len(), entries)
}
