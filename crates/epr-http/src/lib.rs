//! The REST adapter of the Endpoint Register.
//!
//! [`router`] builds the whole HTTP surface: the Kaa-compatible API under both `/api/v1`
//! (service-native) and `/epr/api/v1` (as behind Kaa's ingress), plus the operational routes
//! `/health`, `/health/live`, `/health/ready`, `/metrics` and `/openapi.json`, and the
//! device routes ([`DEVICE_ROUTES`]) at the root, outside the bearer-token middleware.

mod applications;
pub mod auth;
pub mod cors;
pub mod dto;
pub mod error;
pub mod extract;
mod filters;
mod handlers;
mod ops;
pub mod rate_limit;
pub mod self_registration;
pub mod strict;
mod tokens;
mod tracking;
mod wire_terms;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post, put};
use axum::Router;
use epr_core::auth::{Authenticator, Principal};
use epr_core::registry::Registry;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Renders the Prometheus exposition; the server supplies it so this crate does not pick
/// an exporter.
pub type MetricsRenderer = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    pub page_default: u64,
    pub page_max: u64,
    pub max_body_bytes: usize,
    /// One `info` line per request (request ID, method, route, status, latency).
    pub log_requests: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            page_default: 20,
            page_max: 1000,
            max_body_bytes: 4 * 1024 * 1024,
            log_requests: true,
        }
    }
}

/// A dependency that health reports on (NATS), beside the store. It is informative: the
/// service keeps serving while it is down (events wait in the outbox), so it does not make
/// readiness fail.
pub trait HealthComponent: Send + Sync {
    fn name(&self) -> &'static str;
    /// `UP`, `DOWN` or `DISABLED`, and details for the readiness body.
    fn check(&self) -> ComponentHealth;
}

#[derive(Debug, Clone, PartialEq)]
pub struct ComponentHealth {
    pub status: &'static str,
    pub details: serde_json::Value,
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    /// Turns bearer tokens into callers; each request's tenant is its caller's.
    pub auth: Arc<dyn Authenticator>,
    /// The caller of every request while authentication is off: the default tenant, every
    /// scope.
    pub anonymous: Arc<Principal>,
    /// Paths served without a token while authentication is on (exact paths).
    pub open_routes: Arc<[String]>,
    pub settings: HttpSettings,
    /// False while starting and once shutdown begins; readiness reports it.
    pub ready: Arc<AtomicBool>,
    pub metrics: Option<MetricsRenderer>,
    /// Reported by `/health` and `/health/ready`. A shared slice: `State` clones the whole
    /// state on every request, and a `Vec` clone allocates.
    pub components: Arc<[Arc<dyn HealthComponent>]>,
    /// The device routes' tenants and rate limits.
    pub device: Arc<self_registration::DeviceState>,
}

/// Every API route as (method, path template) relative to the API prefix. The OpenAPI
/// document is checked against this list by a test.
pub const API_ROUTES: &[(&str, &str)] = &[
    ("POST", "/endpoints"),
    ("GET", "/endpoints"),
    ("POST", "/endpoints/batch"),
    ("GET", "/endpoints/batch/status"),
    ("GET", "/endpoints/{endpointId}"),
    ("DELETE", "/endpoints/{endpointId}"),
    ("GET", "/endpoints/{endpointId}/app-version"),
    ("PUT", "/endpoints/{endpointId}/app-version"),
    ("GET", "/endpoints/{endpointId}/metadata"),
    ("PUT", "/endpoints/{endpointId}/metadata"),
    ("PATCH", "/endpoints/{endpointId}/metadata"),
    ("GET", "/endpoints/{endpointId}/metadata/{metadataKey}"),
    ("PUT", "/endpoints/{endpointId}/metadata/{metadataKey}"),
    ("DELETE", "/endpoints/{endpointId}/metadata/{metadataKey}"),
    ("GET", "/endpoints/{endpointId}/metadata-keys"),
    ("GET", "/endpoints/{endpointId}/tokens"),
    ("POST", "/endpoints/{endpointId}/tokens"),
    ("GET", "/endpoints/{endpointId}/tokens/{endpointTokenId}"),
    (
        "PUT",
        "/endpoints/{endpointId}/tokens/{endpointTokenId}/status",
    ),
    ("GET", "/applications/{applicationName}/metadata-keys"),
    ("GET", "/applications"),
    ("GET", "/applications/{applicationName}"),
    ("GET", "/applications/{applicationName}/filters"),
    ("POST", "/applications/{applicationName}/filters"),
    ("GET", "/applications/{applicationName}/filters/{filterId}"),
    (
        "PATCH",
        "/applications/{applicationName}/filters/{filterId}",
    ),
    (
        "DELETE",
        "/applications/{applicationName}/filters/{filterId}",
    ),
    ("GET", "/applications/{applicationName}/self-registration"),
    ("PUT", "/applications/{applicationName}/self-registration"),
    (
        "DELETE",
        "/applications/{applicationName}/self-registration",
    ),
    (
        "GET",
        "/applications/{applicationName}/self-registration/rejections",
    ),
    ("POST", "/applications/{applicationName}/claim-tokens"),
    ("GET", "/applications/{applicationName}/claim-tokens"),
    (
        "GET",
        "/applications/{applicationName}/claim-tokens/{claimTokenId}",
    ),
    (
        "DELETE",
        "/applications/{applicationName}/claim-tokens/{claimTokenId}",
    ),
];

/// Routes devices call, at the root (not under [`API_PREFIXES`]) and without a bearer
/// token: a device proves itself with a provisioning secret or a claim token in the body.
pub const DEVICE_ROUTES: &[(&str, &str)] = &[
    (
        "POST",
        "/device/v1/applications/{applicationName}/registrations",
    ),
    (
        "POST",
        "/device/v1/tenants/{tenant}/applications/{applicationName}/registrations",
    ),
];

/// The path prefix of [`DEVICE_ROUTES`]: the bearer-token middleware lets it through.
pub const DEVICE_PREFIX: &str = "/device/";

/// Operational routes, served at the root only.
pub const OPS_ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

pub use ops::OPENAPI;
pub use tracking::{new_request_id, valid_request_id, X_REQUEST_ID};

/// The API prefixes every route of [`API_ROUTES`] is served under.
pub const API_PREFIXES: &[&str] = &["/api/v1", "/epr/api/v1"];

/// Collection routes that are also served with a trailing slash (`/endpoints/` is
/// `/endpoints`), since clients and proxies commonly add one.
pub const TRAILING_SLASH_ROUTES: &[&str] = &[
    "/endpoints",
    "/applications",
    "/applications/{applicationName}/filters",
];

fn api() -> Router<AppState> {
    use applications as a;
    use filters as f;
    use handlers as h;
    use self_registration as sr;
    use tokens as t;
    Router::new()
        .route("/endpoints", post(h::register).get(h::list))
        .route("/endpoints/", post(h::register).get(h::list))
        .route("/applications", get(a::list))
        .route("/applications/", get(a::list))
        .route("/applications/{applicationName}", get(a::get))
        .route("/endpoints/batch", post(h::batch_register))
        .route("/endpoints/batch/status", get(h::batch_status))
        .route("/endpoints/{endpointId}", get(h::get).delete(h::unregister))
        .route(
            "/endpoints/{endpointId}/app-version",
            get(h::get_app_version).put(h::put_app_version),
        )
        .route(
            "/endpoints/{endpointId}/metadata",
            get(h::get_metadata)
                .put(h::put_metadata)
                .patch(h::patch_metadata),
        )
        .route(
            "/endpoints/{endpointId}/metadata/{metadataKey}",
            get(h::get_metadata_key)
                .put(h::put_metadata_key)
                .delete(h::delete_metadata_key),
        )
        .route(
            "/endpoints/{endpointId}/metadata-keys",
            get(h::endpoint_metadata_keys),
        )
        .route(
            "/endpoints/{endpointId}/tokens",
            get(t::list).post(t::issue),
        )
        .route(
            "/endpoints/{endpointId}/tokens/{endpointTokenId}",
            get(t::get),
        )
        .route(
            "/endpoints/{endpointId}/tokens/{endpointTokenId}/status",
            put(t::set_status),
        )
        .route(
            "/applications/{applicationName}/metadata-keys",
            get(h::application_metadata_keys),
        )
        .route(
            "/applications/{applicationName}/filters",
            get(f::list).post(f::create),
        )
        .route(
            "/applications/{applicationName}/filters/",
            get(f::list).post(f::create),
        )
        .route(
            "/applications/{applicationName}/filters/{filterId}",
            get(f::get).patch(f::patch).delete(f::delete),
        )
        .route(
            "/applications/{applicationName}/self-registration",
            get(sr::get_policy)
                .put(sr::put_policy)
                .delete(sr::delete_policy),
        )
        .route(
            "/applications/{applicationName}/self-registration/rejections",
            get(sr::rejections),
        )
        .route(
            "/applications/{applicationName}/claim-tokens",
            post(sr::create_claims).get(sr::list_claims),
        )
        .route(
            "/applications/{applicationName}/claim-tokens/{claimTokenId}",
            get(sr::get_claim).delete(sr::delete_claim),
        )
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.max_body_bytes;
    let log_requests = state.settings.log_requests;
    // Not installed while authentication is off: requests then cost nothing for it (the
    // `Caller` extractor gives the anonymous principal).
    let auth = state.auth.enabled().then(|| {
        // Its own small state: `AppState` is cloned per request by `State`, and its
        // clone allocates (a measurable share of a cached-token request).
        let gate = Arc::new(auth::Gate {
            auth: state.auth.clone(),
            open_routes: state.open_routes.clone(),
        });
        middleware::from_fn_with_state(gate, auth::authenticate)
    });
    let mut app = Router::new()
        .route("/health", get(ops::health))
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route(
            DEVICE_ROUTES[0].1,
            post(self_registration::register_default),
        )
        .route(
            DEVICE_ROUTES[1].1,
            post(self_registration::register_in_tenant),
        );
    for prefix in API_PREFIXES {
        app = app.nest(prefix, api());
    }
    let app = app
        .route_layer(middleware::from_fn(strict::reject_unknown_query))
        .fallback(ops::no_route)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body));
    // Inside the tracking layer, so refused requests are counted and logged too.
    let app = match auth {
        Some(layer) => app.layer(layer),
        None => app,
    };
    app.layer(middleware::from_fn_with_state(
        log_requests,
        tracking::track,
    ))
    .with_state(state)
}
