//! Operational routes: health, metrics, the OpenAPI document, and JSON answers for
//! unknown routes.

use crate::error::{ApiError, RETRY_AFTER_SECS};
use crate::AppState;
use axum::extract::{OriginalUri, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::atomic::Ordering;

/// The OpenAPI 3 document of the API; `tests` check it against the router.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Liveness: the process serves HTTP. Cheap on purpose (also the benchmark baseline).
pub async fn live() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        concat!(
            r#"{"status":"UP","version":""#,
            env!("CARGO_PKG_VERSION"),
            r#""}"#
        ),
    )
        .into_response()
}

/// Health: the process serves HTTP, with the state of each component (NATS). Cheap: no
/// store round trip (that is readiness).
pub async fn health(State(s): State<AppState>) -> Response {
    let mut components = serde_json::Map::new();
    for c in s.components.iter() {
        components.insert(c.name().to_owned(), json!(c.check().status));
    }
    let body = json!({
        "status": "UP",
        "version": env!("CARGO_PKG_VERSION"),
        "components": components,
    });
    axum::Json(body).into_response()
}

/// Readiness: started, not shutting down, and the store answers (a store that found its
/// database file damaged does not: it refuses writes). Components (NATS) are
/// reported with details but do not decide readiness: writes are accepted while NATS is
/// down and their events wait in the outbox.
pub async fn ready(State(s): State<AppState>) -> Response {
    let accepting = s.ready.load(Ordering::Acquire);
    let store = s.registry.store().ping().await;
    let up = accepting && store.is_ok();
    let mut checks = serde_json::Map::new();
    checks.insert(
        "accepting".into(),
        json!(if accepting { "UP" } else { "DOWN" }),
    );
    checks.insert(
        "store".into(),
        json!(match &store {
            Ok(()) => "UP".to_owned(),
            Err(e) => format!("DOWN: {e}"),
        }),
    );
    let mut components = serde_json::Map::new();
    for c in s.components.iter() {
        let h = c.check();
        components.insert(
            c.name().to_owned(),
            json!({"status": h.status, "details": h.details}),
        );
    }
    let body = json!({
        "status": if up { "UP" } else { "DOWN" },
        "checks": checks,
        "components": components,
    });
    if up {
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS))],
            axum::Json(body),
        )
            .into_response()
    }
}

pub async fn metrics(State(s): State<AppState>) -> Response {
    match &s.metrics {
        Some(render) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            )],
            render(),
        )
            .into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "metrics are disabled").into_response(),
    }
}

/// The document as served while authentication is off: no operation asks for a token
/// (none is looked at), so it declares no security requirement. Computed once.
static OPENAPI_WITHOUT_AUTH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut doc: serde_json::Value =
        serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON (tested)");
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut().filter_map(|i| i.as_object_mut()) {
            for op in item.values_mut().filter_map(|o| o.as_object_mut()) {
                op.remove("security");
                if let Some(r) = op.get_mut("responses").and_then(|r| r.as_object_mut()) {
                    r.remove("401");
                    r.remove("403");
                }
            }
        }
    }
    if let Some(c) = doc["components"].as_object_mut() {
        c.remove("securitySchemes");
    }
    serde_json::to_string(&doc).unwrap_or_default()
});

/// The OpenAPI document: as written while authentication is on, without its security
/// requirements while it is off (so it describes the server that serves it).
pub async fn openapi(State(s): State<AppState>) -> Response {
    let doc: &'static str = if s.auth.enabled() {
        OPENAPI
    } else {
        OPENAPI_WITHOUT_AUTH.as_str()
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        doc,
    )
        .into_response()
}

pub async fn no_route(method: Method, OriginalUri(uri): OriginalUri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
    .with("path", "route")
    .into_response()
}

pub async fn method_not_allowed(method: Method, OriginalUri(uri): OriginalUri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .with("method", "allowed-method")
    .into_response()
}
