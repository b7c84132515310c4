//! Request parsing helpers: JSON bodies with field-naming errors, query parameters,
//! preconditions, correlation IDs.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
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
    // Valid bodies (nearly all) are parsed once without path tracking, which costs about
    // as much as the parse itself; a refused body is parsed again to name its field.
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
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
            _ => crate::wire_terms::type_error(&field, &msg),
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

/// All values of a parameter, with comma-separated lists split. Values are taken as
/// given (not trimmed: a space is part of a metadata key). An empty value (`name=`,
/// `name=a,,b`) is refused (rule `required`): dropping it would answer something else
/// than was asked, e.g. every endpoint for `endpointId=`.
pub fn list_param(pairs: &[(String, String)], name: &str) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for (_, v) in pairs.iter().filter(|(k, _)| k == name) {
        for item in v.split(',') {
            if item.is_empty() {
                return Err(ApiError::bad_request(
                    name,
                    "required",
                    format!(
                        "{name} must not be empty: give one or more values (comma-separated \
                         or repeated), or leave the parameter out"
                    ),
                ));
            }
            out.push(item.to_owned());
        }
    }
    Ok(out)
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
    let n: u64 = raw.parse().map_err(|_| {
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

/// The `If-Match` precondition of a write. A malformed header is `400` (field
/// `If-Match`, rule `etag-list`), not a failed precondition: it is the client's bug.
pub fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(Precondition::None),
        Some(v) => {
            let text = etag_list(v, "If-Match")?;
            Ok(Precondition::parse_if_match(text))
        }
    }
}

/// Whether `If-None-Match` names the current tag (weak comparison, RFC 9110 §13.1.2); a
/// malformed header is `400` (field `If-None-Match`, rule `etag-list`).
pub fn not_modified(headers: &HeaderMap, etag: &str) -> Result<bool, ApiError> {
    let Some(v) = headers.get(header::IF_NONE_MATCH) else {
        return Ok(false);
    };
    let v = etag_list(v, "If-None-Match")?;
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    Ok(v.trim() == "*" || v.split(',').any(|t| bare(t) == bare(etag)))
}

/// Checks a precondition header against RFC 9110: `*`, or a comma-separated list of
/// entity tags (`"tag"` or `W/"tag"`, no quotes or controls inside). An empty list is
/// refused too: a precondition naming no tag can only be a client bug.
fn etag_list<'a>(v: &'a HeaderValue, name: &str) -> Result<&'a str, ApiError> {
    let bad = |why: &str| {
        ApiError::bad_request(
            name,
            "etag-list",
            format!(
                "{name} must be * or a comma-separated list of entity tags such as \"1-2\" \
                 or W/\"1-2\" ({why})"
            ),
        )
    };
    let text = v.to_str().map_err(|_| bad("not ASCII"))?;
    if text.trim() == "*" {
        return Ok(text);
    }
    // A tag may itself contain commas, so scan quoted strings rather than split.
    let bytes = text.as_bytes();
    let (mut i, mut tags) = (0, 0);
    let skip = |i: &mut usize, set: &[u8]| {
        while *i < bytes.len() && set.contains(&bytes[*i]) {
            *i += 1;
        }
    };
    loop {
        // RFC 9110 §5.6.1: empty list elements are ignored.
        skip(&mut i, b" \t,");
        if i == bytes.len() {
            break;
        }
        let start = i;
        if bytes[i..].starts_with(b"W/") {
            i += 2;
        }
        if bytes.get(i) != Some(&b'"') {
            let item: String = text[start..].chars().take(64).collect();
            return Err(bad(&format!("'{item}' is not a quoted entity tag")));
        }
        i += 1;
        // etagc = %x21 / %x23-7E (obs-text is not ASCII, refused above).
        while i < bytes.len() && bytes[i] != b'"' {
            if !(bytes[i] == 0x21 || (0x23..=0x7e).contains(&bytes[i])) {
                return Err(bad("a tag holds a character that tags cannot hold"));
            }
            i += 1;
        }
        if i == bytes.len() {
            return Err(bad("an entity tag is not closed by a quote"));
        }
        i += 1;
        tags += 1;
        skip(&mut i, b" \t");
        if i < bytes.len() && bytes[i] != b',' {
            return Err(bad("entity tags must be separated by commas"));
        }
    }
    if tags == 0 {
        return Err(bad("no entity tag given"));
    }
    Ok(text)
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
