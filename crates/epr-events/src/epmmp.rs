//! 19/EPMMP, the Endpoint Metadata Management Protocol: EPR is the *repository* that answers
//! it; other services are clients.
//!
//! Requests arrive on `kaa.v1.service.{instance}.epmmp.{request-type}` ([`request_subject`])
//! and the response goes to the request's reply subject. Server side: [`decode_request`], then
//! [`encode_response`]. Client side (tests and tools): [`encode_request`] and
//! [`decode_response`].
//!
//! The Rust types here name *what* a message carries; the Avro field order comes from the
//! `0019-*.avsc` files, and every value is mapped to its field by name.

use crate::avro::{self, CompiledSchema, Datum, Fields, Record};
use crate::rpc;
use crate::DecodeError;
use std::collections::BTreeMap;

pub use crate::rpc::{Envelope, Status};

/// The six request/response pairs of 19/EPMMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestType {
    /// Get an endpoint's metadata (and app version).
    MetadataGet,
    /// Apply an RFC 6902 JSON Patch to an endpoint's metadata.
    MetadataPatch,
    /// Set one metadata key of one endpoint.
    KeyUpdate,
    /// Set several keys, possibly of several endpoints, with one status for the whole batch.
    KeyBatchUpdate,
    /// List an endpoint's metadata keys.
    KeysGet,
    /// Get the app versions of many endpoints.
    AppVersionsGet,
}

impl RequestType {
    /// Every request type, e.g. to subscribe to all request subjects.
    pub const ALL: [RequestType; 6] = [
        RequestType::MetadataGet,
        RequestType::MetadataPatch,
        RequestType::KeyUpdate,
        RequestType::KeyBatchUpdate,
        RequestType::KeysGet,
        RequestType::AppVersionsGet,
    ];

    /// The last subject token of the request, e.g. `ep-metadata-get-request`.
    pub fn request_token(self) -> &'static str {
        match self {
            RequestType::MetadataGet => "ep-metadata-get-request",
            RequestType::MetadataPatch => "ep-metadata-patch-request",
            RequestType::KeyUpdate => "ep-metadata-key-update-request",
            RequestType::KeyBatchUpdate => "ep-metadata-key-batch-update-request",
            RequestType::KeysGet => "ep-metadata-keys-get-request",
            RequestType::AppVersionsGet => "ep-app-version-get-request",
        }
    }

    /// The last token of the RFC's recommended reply subject, e.g. `ep-metadata-get-response`.
    ///
    /// For [`RequestType::KeyBatchUpdate`] this is `ep-metadata-key-batch-update-response`:
    /// the RFC text says `ep-metadata-key-update-response`, an apparent copy-paste slip that
    /// would put two different schemas on one reply subject. A server never needs this (it
    /// replies to whatever reply subject the request carries).
    pub fn response_token(self) -> &'static str {
        match self {
            RequestType::MetadataGet => "ep-metadata-get-response",
            RequestType::MetadataPatch => "ep-metadata-patch-response",
            RequestType::KeyUpdate => "ep-metadata-key-update-response",
            RequestType::KeyBatchUpdate => "ep-metadata-key-batch-update-response",
            RequestType::KeysGet => "ep-metadata-keys-get-response",
            RequestType::AppVersionsGet => "ep-app-version-get-response",
        }
    }

    /// The request type whose [`request_token`](Self::request_token) is `token`.
    pub fn from_request_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.request_token() == token)
    }

    fn request_schema(self) -> &'static CompiledSchema {
        match self {
            RequestType::MetadataGet => &avro::EPMMP_METADATA_GET_REQUEST,
            RequestType::MetadataPatch => &avro::EPMMP_METADATA_PATCH_REQUEST,
            RequestType::KeyUpdate => &avro::EPMMP_KEY_UPDATE_REQUEST,
            RequestType::KeyBatchUpdate => &avro::EPMMP_KEY_BATCH_UPDATE_REQUEST,
            RequestType::KeysGet => &avro::EPMMP_KEYS_GET_REQUEST,
            RequestType::AppVersionsGet => &avro::EPMMP_APP_VERSIONS_REQUEST,
        }
    }

    fn response_schema(self) -> &'static CompiledSchema {
        match self {
            RequestType::MetadataGet => &avro::EPMMP_METADATA_GET_RESPONSE,
            RequestType::MetadataPatch => &avro::EPMMP_METADATA_PATCH_RESPONSE,
            RequestType::KeyUpdate => &avro::EPMMP_KEY_UPDATE_RESPONSE,
            RequestType::KeyBatchUpdate => &avro::EPMMP_KEY_BATCH_UPDATE_RESPONSE,
            RequestType::KeysGet => &avro::EPMMP_KEYS_GET_RESPONSE,
            RequestType::AppVersionsGet => &avro::EPMMP_APP_VERSIONS_RESPONSE,
        }
    }
}

rpc::request_reply_api!("epmmp");

/// One command of a batch key update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUpdateCommand {
    pub endpoint_id: String,
    pub key: String,
    /// The new value; EPR reads it as UTF-8 JSON text (see README).
    pub value: Vec<u8>,
}

/// The body of a 19/EPMMP request (everything but the [`Envelope`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    MetadataGet {
        endpoint_id: String,
        /// Keys to return; empty means all.
        include: Vec<String>,
        /// When false, return no metadata (only the app version).
        include_metadata: bool,
    },
    MetadataPatch {
        endpoint_id: String,
        /// Apply only if the metadata's current eTag equals this (HTTP If-Match).
        if_match: Option<String>,
        /// An RFC 6902 JSON Patch document.
        patch: Vec<u8>,
    },
    KeyUpdate {
        endpoint_id: String,
        key: String,
        /// The new value; EPR reads it as UTF-8 JSON text (see README).
        value: Vec<u8>,
    },
    KeyBatchUpdate {
        commands: Vec<KeyUpdateCommand>,
    },
    KeysGet {
        endpoint_id: String,
    },
    AppVersionsGet {
        endpoint_ids: Vec<String>,
    },
}

impl Request {
    pub fn request_type(&self) -> RequestType {
        match self {
            Request::MetadataGet { .. } => RequestType::MetadataGet,
            Request::MetadataPatch { .. } => RequestType::MetadataPatch,
            Request::KeyUpdate { .. } => RequestType::KeyUpdate,
            Request::KeyBatchUpdate { .. } => RequestType::KeyBatchUpdate,
            Request::KeysGet { .. } => RequestType::KeysGet,
            Request::AppVersionsGet { .. } => RequestType::AppVersionsGet,
        }
    }

    /// The body's values under the schema's field names.
    fn fields(&self) -> Fields {
        let mut f = Fields::new();
        match self {
            Request::MetadataGet {
                endpoint_id,
                include,
                include_metadata,
            } => {
                f.insert("endpointId", Datum::String(endpoint_id.clone()));
                f.insert("include", Datum::strings(include.iter().cloned()));
                f.insert("includeMetadata", Datum::Boolean(*include_metadata));
            }
            Request::MetadataPatch {
                endpoint_id,
                if_match,
                patch,
            } => {
                f.insert("endpointId", Datum::String(endpoint_id.clone()));
                f.insert("ifMatch", Datum::optional(if_match.clone(), Datum::String));
                f.insert("patch", Datum::Bytes(patch.clone()));
            }
            Request::KeyUpdate {
                endpoint_id,
                key,
                value,
            } => key_update_fields(&mut f, endpoint_id, key, value),
            Request::KeyBatchUpdate { commands } => {
                let commands = commands
                    .iter()
                    .map(|c| {
                        let mut cf = Fields::new();
                        key_update_fields(&mut cf, &c.endpoint_id, &c.key, &c.value);
                        Datum::Record(cf)
                    })
                    .collect();
                f.insert("commands", Datum::Array(commands));
            }
            Request::KeysGet { endpoint_id } => {
                f.insert("endpointId", Datum::String(endpoint_id.clone()));
            }
            Request::AppVersionsGet { endpoint_ids } => {
                f.insert("endpointIds", Datum::strings(endpoint_ids.iter().cloned()));
            }
        }
        f
    }

    fn read(t: RequestType, r: &mut Record) -> Result<Self, DecodeError> {
        Ok(match t {
            RequestType::MetadataGet => Request::MetadataGet {
                endpoint_id: r.string("endpointId")?,
                include: r.strings("include")?,
                include_metadata: r.boolean("includeMetadata")?,
            },
            RequestType::MetadataPatch => Request::MetadataPatch {
                endpoint_id: r.string("endpointId")?,
                if_match: r.opt_string("ifMatch")?,
                patch: r.bytes("patch")?,
            },
            RequestType::KeyUpdate => Request::KeyUpdate {
                endpoint_id: r.string("endpointId")?,
                key: r.string("metadataKey")?,
                value: r.bytes("metadataValue")?,
            },
            RequestType::KeyBatchUpdate => Request::KeyBatchUpdate {
                commands: r
                    .field("commands")?
                    .array()?
                    .into_iter()
                    .map(|c| {
                        let mut c = c.record()?;
                        Ok(KeyUpdateCommand {
                            endpoint_id: c.string("endpointId")?,
                            key: c.string("metadataKey")?,
                            value: c.bytes("metadataValue")?,
                        })
                    })
                    .collect::<Result<_, DecodeError>>()?,
            },
            RequestType::KeysGet => Request::KeysGet {
                endpoint_id: r.string("endpointId")?,
            },
            RequestType::AppVersionsGet => Request::AppVersionsGet {
                endpoint_ids: r.strings("endpointIds")?,
            },
        })
    }
}

/// Shared by the single and the batch key update, whose command record uses the same names.
fn key_update_fields(f: &mut Fields, endpoint_id: &str, key: &str, value: &[u8]) {
    f.insert("endpointId", Datum::String(endpoint_id.to_owned()));
    f.insert("metadataKey", Datum::String(key.to_owned()));
    f.insert("metadataValue", Datum::Bytes(value.to_vec()));
}

/// The body of a 19/EPMMP response (everything but the [`Envelope`] and the [`Status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    MetadataGet {
        endpoint_id: String,
        /// Version tag of the metadata (HTTP ETag semantics).
        e_tag: Option<String>,
        /// The metadata; EPR writes a UTF-8 JSON object (see README).
        payload: Option<Vec<u8>>,
        app_version_name: Option<String>,
    },
    MetadataPatch {
        endpoint_id: String,
    },
    KeyUpdate {
        endpoint_id: String,
    },
    /// The schema has no endpoint ID and no per-command result.
    KeyBatchUpdate,
    KeysGet {
        endpoint_id: String,
        keys: Vec<String>,
    },
    AppVersionsGet {
        /// Echo of the requested endpoint IDs.
        endpoint_ids: Vec<String>,
        /// App version name → the requested endpoints that have it.
        app_versions_to_endpoints: BTreeMap<String, Vec<String>>,
    },
}

impl Response {
    pub fn request_type(&self) -> RequestType {
        match self {
            Response::MetadataGet { .. } => RequestType::MetadataGet,
            Response::MetadataPatch { .. } => RequestType::MetadataPatch,
            Response::KeyUpdate { .. } => RequestType::KeyUpdate,
            Response::KeyBatchUpdate => RequestType::KeyBatchUpdate,
            Response::KeysGet { .. } => RequestType::KeysGet,
            Response::AppVersionsGet { .. } => RequestType::AppVersionsGet,
        }
    }

    /// An empty body of type `t` (empty endpoint ID, no payload, no keys, ...), for error
    /// replies, in particular to a request that could not even be decoded.
    pub fn empty(t: RequestType) -> Self {
        match t {
            RequestType::MetadataGet => Response::MetadataGet {
                endpoint_id: String::new(),
                e_tag: None,
                payload: None,
                app_version_name: None,
            },
            RequestType::MetadataPatch => Response::MetadataPatch {
                endpoint_id: String::new(),
            },
            RequestType::KeyUpdate => Response::KeyUpdate {
                endpoint_id: String::new(),
            },
            RequestType::KeyBatchUpdate => Response::KeyBatchUpdate,
            RequestType::KeysGet => Response::KeysGet {
                endpoint_id: String::new(),
                keys: Vec::new(),
            },
            RequestType::AppVersionsGet => Response::AppVersionsGet {
                endpoint_ids: Vec::new(),
                app_versions_to_endpoints: BTreeMap::new(),
            },
        }
    }

    fn fields(&self) -> Fields {
        let mut f = Fields::new();
        match self {
            Response::MetadataGet {
                endpoint_id,
                e_tag,
                payload,
                app_version_name,
            } => {
                f.insert("endpointId", Datum::String(endpoint_id.clone()));
                f.insert("eTag", Datum::optional(e_tag.clone(), Datum::String));
                f.insert("payload", Datum::optional(payload.clone(), Datum::Bytes));
                f.insert(
                    "appVersionName",
                    Datum::optional(app_version_name.clone(), Datum::String),
                );
            }
            Response::MetadataPatch { endpoint_id } | Response::KeyUpdate { endpoint_id } => {
                f.insert("endpointId", Datum::String(endpoint_id.clone()));
            }
            Response::KeyBatchUpdate => {}
            Response::KeysGet { endpoint_id, keys } => {
                f.insert("endpointId", Datum::String(endpoint_id.clone()));
                f.insert("keys", Datum::strings(keys.iter().cloned()));
            }
            Response::AppVersionsGet {
                endpoint_ids,
                app_versions_to_endpoints,
            } => {
                f.insert("endpointIds", Datum::strings(endpoint_ids.iter().cloned()));
                f.insert(
                    "appVersionsToEndpoints",
                    Datum::string_lists(app_versions_to_endpoints),
                );
            }
        }
        f
    }

    fn read(t: RequestType, r: &mut Record) -> Result<Self, DecodeError> {
        Ok(match t {
            RequestType::MetadataGet => Response::MetadataGet {
                endpoint_id: r.string("endpointId")?,
                e_tag: r.opt_string("eTag")?,
                payload: r.opt_bytes("payload")?,
                app_version_name: r.opt_string("appVersionName")?,
            },
            RequestType::MetadataPatch => Response::MetadataPatch {
                endpoint_id: r.string("endpointId")?,
            },
            RequestType::KeyUpdate => Response::KeyUpdate {
                endpoint_id: r.string("endpointId")?,
            },
            RequestType::KeyBatchUpdate => Response::KeyBatchUpdate,
            RequestType::KeysGet => Response::KeysGet {
                endpoint_id: r.string("endpointId")?,
                keys: r.strings("keys")?,
            },
            RequestType::AppVersionsGet => Response::AppVersionsGet {
                endpoint_ids: r.strings("endpointIds")?,
                app_versions_to_endpoints: r.string_lists("appVersionsToEndpoints")?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_tokens_round_trip_and_are_distinct() {
        for t in RequestType::ALL {
            assert_eq!(RequestType::from_request_token(t.request_token()), Some(t));
            assert!(t.request_token().ends_with("-request"));
            assert_eq!(
                t.response_token(),
                t.request_token().replace("-request", "-response")
            );
            assert_eq!(Response::empty(t).request_type(), t);
        }
        assert_eq!(RequestType::from_request_token("ep-metadata-get"), None);
        assert_eq!(RequestType::from_request_token(""), None);
    }
}
