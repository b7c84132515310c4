//! Strict query strings: every operation declares the query parameters it takes
//! ([`QUERY_PARAMS`]); any other parameter is refused with `400` naming it, so a misspelt
//! filter (`applicatonName=demo`) never silently widens a listing. The OpenAPI document is
//! checked against the same table by a test.

use crate::error::ApiError;
use crate::API_PREFIXES;
use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The query parameters of each operation, as (method, path template relative to the API
/// prefix or the root for operational routes, parameters). Operations not listed take none.
pub const QUERY_PARAMS: &[(&str, &str, &[&str])] = &[
    (
        "GET",
        "/endpoints",
        &[
            "applicationName",
            "applicationVersionName",
            "endpointId",
            "metadataFilter",
            "filterId",
            "include",
            "offset",
            "limit",
            "cursor",
        ],
    ),
    ("GET", "/endpoints/batch/status", &["appName", "taskId"]),
    ("GET", "/endpoints/{endpointId}", &["include"]),
    ("GET", "/endpoints/{endpointId}/metadata", &["include"]),
    (
        "GET",
        "/endpoints/{endpointId}/tokens",
        &["status", "order", "offset", "limit"],
    ),
    (
        "GET",
        "/applications/{applicationName}/filters",
        &["name", "offset", "limit"],
    ),
    (
        "GET",
        "/applications/{applicationName}/self-registration/rejections",
        &["offset", "limit"],
    ),
    (
        "GET",
        "/applications/{applicationName}/claim-tokens",
        &["offset", "limit"],
    ),
];

/// The parameters `method` on `template` takes (empty when none).
pub fn allowed_params(method: &Method, template: &str) -> &'static [&'static str] {
    // HEAD is served by the GET handlers.
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    let template = API_PREFIXES
        .iter()
        .find_map(|p| template.strip_prefix(p))
        .unwrap_or(template);
    // Collection routes are also served with a trailing slash.
    let template = match template.strip_suffix('/') {
        Some(t) if !t.is_empty() => t,
        _ => template,
    };
    QUERY_PARAMS
        .iter()
        .find(|(m, p, _)| *m == method && *p == template)
        .map(|(_, _, params)| *params)
        .unwrap_or(&[])
}

/// Route middleware: refuses unknown query parameters before the handler runs. Requests
/// without a query string (the hot paths: registration, get by ID) pass straight through.
pub async fn reject_unknown_query(req: Request, next: Next) -> Response {
    if let Some(query) = req.uri().query().filter(|q| !q.is_empty()) {
        let template = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str())
            .unwrap_or("");
        let allowed = allowed_params(req.method(), template);
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if !allowed.contains(&name.as_ref()) {
                return unknown_param(&name, allowed).into_response();
            }
            // SQL text cannot hold U+0000 (the PostgreSQL store would fail with 503), and
            // no identifier, name or metadata value may contain it: refused alike on every
            // backend.
            if value.contains('\0') {
                return ApiError::bad_request(
                    name.as_ref(),
                    "pattern",
                    format!("query parameter {name} must not contain the character U+0000"),
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

fn unknown_param(name: &str, allowed: &[&str]) -> ApiError {
    let takes = if allowed.is_empty() {
        "this operation takes no query parameters".to_owned()
    } else {
        format!("this operation takes: {}", allowed.join(", "))
    };
    ApiError::bad_request(
        name,
        "unknown-parameter",
        format!("unknown query parameter '{name}'; {takes}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_strips_prefixes_and_trailing_slashes() {
        let list = allowed_params(&Method::GET, "/api/v1/endpoints/");
        assert!(list.contains(&"applicationName"));
        assert_eq!(
            allowed_params(&Method::HEAD, "/epr/api/v1/endpoints/{endpointId}"),
            ["include"]
        );
        assert!(allowed_params(&Method::POST, "/api/v1/endpoints").is_empty());
        assert!(allowed_params(&Method::GET, "/health").is_empty());
    }
}
