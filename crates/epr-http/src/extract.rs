//! Request parsing helpers: JSON bodies with field-naming errors, query parameters,
//! preconditions, correlation IDs.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use epr_core::endpoint::Precondition;
use serde::de::DeserializeOwned;

/// What a request body's `Content-Type` says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    JsonPatch,
    MergePatch,
}

/// A raw body whose media type is one of the JSON types, within the configured size.
pub struct RawBody {
    pub kind: BodyKind,
    pub bytes: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let kind = body_kind(req.headers())?;
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            let status = rej.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "the request body is larger than the server accepts")
                    .with("body", "max-bytes")
            } else {
                ApiError::new(status, rej.body_text()).with("body", "readable")
            }
        })?;
        Ok(Self { kind, bytes })
    }
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        // curl and many device SDKs omit it; JSON is the only thing we accept anyway.
        return Ok(BodyKind::Json);
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    match essence {
        "application/json-patch+json" => Ok(BodyKind::JsonPatch),
        "application/merge-patch+json" => Ok(BodyKind::MergePatch),
        "application/json" | "" => Ok(BodyKind::Json),
        e if e.ends_with("+json") => Ok(BodyKind::Json),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type '{other}' is not supported; send application/json"),
        )
        .with("Content-Type", "media-type")),
    }
}

/// Parses a JSON object into `T`; any other JSON value is refused as a whole.
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(ApiError::bad_request(
            "body",
            "type",
            "the request body must be a JSON object",
        ));
    }
    parse_json(bytes)
}

/// Parses JSON into `T`, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "body",
            "required",
            "the request body is empty",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let msg = inner.to_string();
        let (field, rule) = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                ("body".to_owned(), "json")
            }
            _ if msg.starts_with("missing field `") => {
                let name = msg.trim_start_matches("missing field `");
                let name = name.split('`').next().unwrap_or("");
                let field = if path == "." {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                };
                (field, "required")
            }
            _ => (if path == "." { "body".to_owned() } else { path }, "type"),
        };
        let message = match rule {
            "json" => format!("the request body is not valid JSON: {msg}"),
            "required" => format!("{field} is required"),
            _ => format!("{field}: {msg}"),
        };
        ApiError::bad_request(field, rule, message)
    })
}

/// Query parameters in order; repeated names are kept.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// All values of a parameter, with comma-separated lists split.
pub fn list_param(pairs: &[(String, String)], name: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The single value of a parameter; repeated values are refused.
pub fn single_param<'a>(
    pairs: &'a [(String, String)],
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    let mut values = pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            name,
            "single",
            format!("query parameter {name} may be given once"),
        ));
    }
    Ok(first)
}

pub fn number_param(
    pairs: &[(String, String)],
    name: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    let Some(raw) = single_param(pairs, name)? else {
        return Ok(default);
    };
    let n: u64 = raw.trim().parse().map_err(|_| {
        ApiError::bad_request(
            name,
            "integer",
            format!("{name} must be a non-negative integer"),
        )
    })?;
    if n < min || n > max {
        return Err(ApiError::bad_request(
            name,
            "range",
            format!("{name} must be between {min} and {max}"),
        ));
    }
    Ok(n)
}

/// The `If-Match` precondition of a write.
pub fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(Precondition::None),
        Some(v) => {
            let text = v.to_str().map_err(|_| {
                ApiError::bad_request("If-Match", "etag-list", "If-Match must be ASCII")
            })?;
            Ok(Precondition::parse_if_match(text))
        }
    }
}

/// Whether `If-None-Match` names the current tag (weak comparison, RFC 9110 §13.1.2).
pub fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    let Some(v) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    v.trim() == "*" || v.split(',').any(|t| bare(t) == bare(etag))
}

/// The request's correlation ID: its `X-Request-Id`, which the tracking middleware has
/// already validated or generated (so it is also the response's); a new UUID without it.
pub fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get(&crate::X_REQUEST_ID)
        .filter(|v| crate::valid_request_id(v.as_bytes()))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}
