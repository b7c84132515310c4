//! Device self-registration over REST (docs/self-registration.md).
//!
//! Two families of routes:
//! - the operator's, in [`crate::API_ROUTES`] (authorized like every API route):
//!   `/applications/{applicationName}/self-registration` (the policy, and its
//!   `rejections`) and `/applications/{applicationName}/claim-tokens[/{claimTokenId}]`;
//! - the devices', [`crate::DEVICE_ROUTES`] at the root, outside the API prefixes and not
//!   behind the bearer-token middleware: a device proves itself with the application's
//!   provisioning secret or a claim token in the body.
//!
//! Every refused device request is logged (tenant, application, reason, source), counted
//! (`epr_self_registration_refusals_total{reason}`) and, when the application is declared
//! in the tenant's catalogue, recorded for the operator (`Store::record_rejection`; a
//! failure to record is logged, the device's answer stays the refusal). Requests are rate
//! limited per client address and per claim token ([`DeviceState`]).

use crate::auth::Caller;
use crate::dto::{iso, PageDto};
use crate::error::ApiError;
use crate::extract::{correlation_id, parse_json, precondition, query_pairs, BodyKind, RawBody};
use crate::handlers::{json_response, page_params, path, require_json, Result};
use crate::rate_limit::{retry_after_secs, Limiter, Rate};
use crate::AppState;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, FromRequestParts, OriginalUri, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use epr_core::auth::{Resource, Scope, TenantSnapshot};
use epr_core::credentials::{
    claim_hash, ClaimBinding, ClaimToken, Refusal, RefusalReason, Rejection,
};
use epr_core::ids::{AppName, TenantId, TokenHash};
use epr_core::log_gate::{LogGate, DEFAULT_LOG_INTERVAL};
use epr_core::ports::StoreError;
use epr_core::registry::{ClaimInput, SelfRegisterInput};
use epr_core::{DomainError, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// The device routes' rate limits (`self_registration.rate_limit.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Every device request, by client address.
    pub per_source: Rate,
    /// Every attempt with a claim token, by the token's hash.
    pub per_claim: Rate,
    /// Buckets kept per limit, at most (memory bound).
    pub max_keys: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            per_source: Rate {
                per_minute: 60,
                burst: 20,
            },
            per_claim: Rate {
                per_minute: 5,
                burst: 5,
            },
            max_keys: 100_000,
        }
    }
}

/// What the device routes keep between requests.
pub struct DeviceState {
    /// The tenants that exist (a device names its tenant in the path); `None`: only the
    /// default tenant.
    tenants: Option<watch::Receiver<Arc<TenantSnapshot>>>,
    by_source: Limiter<IpAddr>,
    by_claim: Limiter<(TenantId, TokenHash)>,
}

impl DeviceState {
    pub fn new(limits: RateLimits, tenants: Option<watch::Receiver<Arc<TenantSnapshot>>>) -> Self {
        Self {
            tenants,
            by_source: Limiter::new(limits.per_source, limits.max_keys),
            by_claim: Limiter::new(limits.per_claim, limits.max_keys),
        }
    }

    fn knows_tenant(&self, tenant: &TenantId, default: &TenantId) -> bool {
        match &self.tenants {
            Some(rx) => rx.borrow().contains(tenant),
            None => tenant == default,
        }
    }
}

impl Default for DeviceState {
    fn default() -> Self {
        Self::new(RateLimits::default(), None)
    }
}

/// The TCP peer of the connection, when the server provides it (`ConnectInfo`). Proxy
/// headers (`X-Forwarded-For`) are not trusted: anyone can send them.
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

// ---------------------------------------------------------------- device routes

/// The device's request body. Unknown fields are ignored (newer devices may send more).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceBody {
    endpoint_id: Option<String>,
    app_version: Option<String>,
    metadata: Option<Value>,
    provisioning_secret: Option<String>,
    claim_token: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceRegistered {
    endpoint_id: String,
    endpoint_token: String,
    endpoint_token_id: String,
    app_version: String,
    reregistered: bool,
}

/// Rate-limited requests are not logged one by one (a flood would flood the log).
static RATE_LIMITED_LOG: LogGate = LogGate::new(DEFAULT_LOG_INTERVAL);

/// `POST /device/v1/applications/{applicationName}/registrations`: the default tenant.
pub async fn register_default(
    State(s): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
    body: std::result::Result<RawBody, ApiError>,
) -> Response {
    let tenant = Some(s.anonymous.tenant.clone());
    let app = p.ok().map(|Path(a)| a);
    register(&s, tenant, app, peer, &headers, body).await
}

/// `POST /device/v1/tenants/{tenant}/applications/{applicationName}/registrations`. A
/// tenant that does not exist is answered like an unknown application.
pub async fn register_in_tenant(
    State(s): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    p: std::result::Result<Path<(String, String)>, PathRejection>,
    body: std::result::Result<RawBody, ApiError>,
) -> Response {
    let (tenant, app) = match p {
        Ok(Path((t, a))) => (TenantId::parse(&t).ok(), Some(a)),
        Err(_) => (None, None),
    };
    register(&s, tenant, app, peer, &headers, body).await
}

/// What the rejection log and the log line say about a refused request.
struct Attempt<'a> {
    tenant: Option<&'a TenantId>,
    app: Option<&'a str>,
    app_version: Option<&'a str>,
    endpoint_id: Option<&'a str>,
    source: &'a str,
}

async fn register(
    s: &AppState,
    tenant: Option<TenantId>,
    app: Option<String>,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    body: std::result::Result<RawBody, ApiError>,
) -> Response {
    let source = peer.map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
    let app_raw = app.as_deref();
    let mut attempt = Attempt {
        tenant: tenant.as_ref(),
        app: app_raw,
        app_version: None,
        endpoint_id: None,
        source: &source,
    };
    let now = Instant::now();
    if let Some(ip) = peer.map(|a| a.ip()) {
        if let Err(wait) = s.device.by_source.check(&ip, now) {
            return rate_limited(&attempt, wait);
        }
    }
    let known_tenant = tenant
        .as_ref()
        .filter(|t| s.device.knows_tenant(t, &s.anonymous.tenant));
    let (Some(tenant), Some(app_raw)) = (known_tenant, app_raw) else {
        let r = Refusal::new(
            RefusalReason::UnknownApplication,
            "no such application (or tenant)",
        )
        .with_field("applicationName");
        return refuse(s, &attempt, r).await;
    };
    let body = match body.and_then(|b| {
        if b.kind == BodyKind::Json {
            Ok(b)
        } else {
            Err(
                ApiError::new(StatusCode::BAD_REQUEST, "send application/json")
                    .with("Content-Type", "media-type"),
            )
        }
    }) {
        Ok(b) => b,
        Err(e) => return refuse(s, &attempt, invalid_request(e)).await,
    };
    let req: DeviceBody = match crate::extract::parse_object(&body.bytes) {
        Ok(r) => r,
        Err(e) => return refuse(s, &attempt, invalid_request(e)).await,
    };
    attempt.app_version = req.app_version.as_deref();
    attempt.endpoint_id = req.endpoint_id.as_deref();
    if let (Some(claim), Ok(app)) = (&req.claim_token, AppName::parse(app_raw)) {
        let key = (tenant.clone(), claim_hash(&app, claim));
        if let Err(wait) = s.device.by_claim.check(&key, now) {
            return rate_limited(&attempt, wait);
        }
    }
    let input = SelfRegisterInput {
        endpoint_id: req.endpoint_id.clone(),
        app_version: req.app_version.clone(),
        metadata: req.metadata,
        provisioning_secret: req.provisioning_secret,
        claim_token: req.claim_token,
    };
    let corr = correlation_id(headers);
    match s
        .registry
        .self_register(tenant, app_raw, input, &corr)
        .await
    {
        Ok(r) => {
            let outcome = if r.reregistered {
                "reregistered"
            } else {
                "registered"
            };
            metrics::counter!("epr_self_registrations_total", "outcome" => outcome).increment(1);
            tracing::info!(
                tenant = %tenant,
                app = app_raw,
                endpoint_id = %r.endpoint_id,
                source = %source,
                outcome,
                "device self-registered"
            );
            let status = if r.reregistered {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let mut resp = json_response(
                status,
                &DeviceRegistered {
                    endpoint_id: r.endpoint_id.to_string(),
                    endpoint_token: r.token,
                    endpoint_token_id: r.token_id.to_string(),
                    app_version: r.app_version.to_string(),
                    reregistered: r.reregistered,
                },
                None,
            );
            // The answer carries a credential.
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(StoreError::Rejected(DomainError::Refused(r))) => refuse(s, &attempt, r).await,
        Err(StoreError::Rejected(other)) => {
            refuse(s, &attempt, invalid_request(ApiError::from(other))).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// A request-form error as a refusal (`invalid-request`), keeping the field and saying
/// the broken rule in the message.
fn invalid_request(e: ApiError) -> Refusal {
    let message = match &e.rule {
        Some(rule) => format!("{} (rule {rule})", e.message),
        None => e.message,
    };
    let r = Refusal::new(RefusalReason::InvalidRequest, message);
    match e.field {
        Some(f) => r.with_field(f),
        None => r,
    }
}

fn cut(s: &str) -> String {
    s.chars().take(256).collect()
}

async fn refuse(s: &AppState, a: &Attempt<'_>, r: Refusal) -> Response {
    let reason = r.reason;
    metrics::counter!("epr_self_registration_refusals_total", "reason" => reason.as_str())
        .increment(1);
    tracing::info!(
        tenant = a.tenant.map(TenantId::as_str),
        app = a.app,
        reason = reason.as_str(),
        source = a.source,
        endpoint_id = a.endpoint_id,
        "device self-registration refused: {}",
        r.message
    );
    // Recorded only for applications the catalogue declares: a device naming any
    // application could otherwise make the store keep rejections of made-up ones.
    let declared = |t: &TenantId| {
        a.app
            .and_then(|app| AppName::parse(app).ok())
            .filter(|app| s.registry.catalog(t).knows_app(app))
    };
    if let Some((tenant, app)) = a.tenant.and_then(|t| declared(t).map(|app| (t, app))) {
        if s.device.knows_tenant(tenant, &s.anonymous.tenant) {
            let rejection = Rejection {
                at: now_ms(),
                app,
                app_version: a.app_version.map(cut),
                endpoint_id: a.endpoint_id.map(cut),
                source: a.source.to_owned(),
                reason,
                message: r.message.clone(),
            };
            if let Err(e) = s.registry.record_rejection(tenant, rejection).await {
                tracing::warn!(error = %e, tenant = %tenant, "a self-registration rejection could not be recorded");
            }
        }
    }
    device_error(ApiError::refused(r), reason, None)
}

fn rate_limited(a: &Attempt<'_>, wait: std::time::Duration) -> Response {
    let reason = RefusalReason::RateLimited;
    metrics::counter!("epr_self_registration_refusals_total", "reason" => reason.as_str())
        .increment(1);
    if let Some(suppressed) = RATE_LIMITED_LOG.admit(Instant::now()) {
        tracing::warn!(
            tenant = a.tenant.map(TenantId::as_str),
            app = a.app,
            source = a.source,
            suppressed,
            "device self-registration rate-limited (logged at most every {}s, counted in \
             `suppressed`)",
            DEFAULT_LOG_INTERVAL.as_secs()
        );
    }
    let secs = retry_after_secs(wait);
    let r = Refusal::new(
        reason,
        format!("too many self-registration attempts; retry in {secs} s"),
    );
    device_error(ApiError::refused(r), reason, Some(secs))
}

/// The usual error body, with `reason` (the refusal's code) for devices.
fn device_error(e: ApiError, reason: RefusalReason, retry_after: Option<u64>) -> Response {
    let mut body = json!({
        "status": e.status.as_u16(),
        "error": e.status.canonical_reason().unwrap_or("Error"),
        "message": e.message,
        "rule": reason.as_str(),
        "reason": reason.as_str(),
    });
    if let Some(f) = &e.field {
        body["field"] = json!(f);
    }
    let mut resp = json_response(e.status, &body, None);
    let h = resp.headers_mut();
    if let Some(v) = e
        .challenge
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    if let Some(secs) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn now_ms() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Timestamp(ms)
}

// ---------------------------------------------------------------- operator routes

type AppAndId = std::result::Result<Path<(String, String)>, PathRejection>;
type AppOnly = std::result::Result<Path<String>, PathRejection>;

fn policy_response(status: StatusCode, body: &Value, etag: &str) -> Response {
    json_response(status, body, Some(etag))
}

/// `GET /applications/{applicationName}/self-registration`: the policy (`404` when none).
pub async fn get_policy(State(s): State<AppState>, caller: Caller, p: AppOnly) -> Result<Response> {
    let app = path(p)?;
    caller.require(Scope::SelfRegistrationRead, Resource::Application(&app))?;
    let (policy, etag) = s
        .registry
        .self_registration_policy(caller.tenant(), &app)
        .await?;
    Ok(policy_response(StatusCode::OK, &policy.to_rest(), &etag))
}

/// `PUT /applications/{applicationName}/self-registration`: sets the whole policy (`201`
/// when there was none); `If-Match` against the current policy's tag.
pub async fn put_policy(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: AppOnly,
    body: RawBody,
) -> Result<Response> {
    let app = path(p)?;
    caller.require(Scope::SelfRegistrationUpdate, Resource::Application(&app))?;
    require_json(&body)?;
    let doc: Value = parse_json(&body.bytes)?;
    let pre = precondition(&headers)?;
    let (policy, etag, created) = s
        .registry
        .put_self_registration_policy(caller.tenant(), &app, &doc, pre)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(policy_response(status, &policy.to_rest(), &etag))
}

/// `DELETE /applications/{applicationName}/self-registration`: `204`; self-registration is
/// closed again.
pub async fn delete_policy(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: AppOnly,
) -> Result<Response> {
    let app = path(p)?;
    caller.require(Scope::SelfRegistrationUpdate, Resource::Application(&app))?;
    let pre = precondition(&headers)?;
    s.registry
        .delete_self_registration_policy(caller.tenant(), &app, pre)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RejectionDto {
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint_id: Option<String>,
    source: String,
    reason: &'static str,
    message: String,
}

/// `GET /applications/{applicationName}/self-registration/rejections?offset=&limit=`:
/// newest first.
pub async fn rejections(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    p: AppOnly,
) -> Result<Response> {
    let app = path(p)?;
    caller.require(Scope::SelfRegistrationRead, Resource::Application(&app))?;
    let pairs = query_pairs(uri.query());
    let page = s
        .registry
        .list_rejections(caller.tenant(), &app, page_params(&s, &pairs)?)
        .await?;
    let dto = PageDto {
        total_elements: page.total,
        next_cursor: None,
        content: page
            .items
            .into_iter()
            .map(|r| RejectionDto {
                at: iso(r.at),
                app_version: r.app_version,
                endpoint_id: r.endpoint_id,
                source: r.source,
                reason: r.reason.as_str(),
                message: r.message,
            })
            .collect(),
    };
    Ok(json_response(StatusCode::OK, &dto, None))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClaimDto {
    claim_token_id: String,
    /// Only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    claim_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint_id_pattern: Option<String>,
    created_at: String,
    expires_at: String,
    /// `available`, `used` or `expired`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    used_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    used_by_endpoint_id: Option<String>,
}

impl ClaimDto {
    fn from_claim(c: &ClaimToken, token: Option<String>, now: Timestamp) -> Self {
        let (endpoint_id, endpoint_id_pattern) = match &c.binding {
            ClaimBinding::Any => (None, None),
            ClaimBinding::Endpoint(e) => (Some(e.to_string()), None),
            ClaimBinding::Pattern(p) => (None, Some(p.as_str().to_owned())),
        };
        let state = match (&c.used, now >= c.expires) {
            (Some(_), _) => "used",
            (None, true) => "expired",
            (None, false) => "available",
        };
        Self {
            claim_token_id: c.id.to_string(),
            claim_token: token,
            endpoint_id,
            endpoint_id_pattern,
            created_at: iso(c.created),
            expires_at: iso(c.expires),
            state,
            used_at: c.used.as_ref().map(|u| iso(u.at)),
            used_by_endpoint_id: c.used.as_ref().map(|u| u.endpoint_id.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimBody {
    claim_token: Option<String>,
    endpoint_id: Option<String>,
    endpoint_id_pattern: Option<String>,
    expires_at: Option<String>,
    ttl_seconds: Option<u64>,
    count: Option<u64>,
}

const CLAIM_FIELDS: &[&str] = &[
    "claimToken",
    "endpointId",
    "endpointIdPattern",
    "expiresAt",
    "ttlSeconds",
    "count",
];

/// `POST /applications/{applicationName}/claim-tokens`: `201 {totalElements, content}`,
/// each claim token with its value (shown this once). Unknown fields are refused here: a
/// misspelt binding would silently make a claim token good for any endpoint.
pub async fn create_claims(
    State(s): State<AppState>,
    caller: Caller,
    p: AppOnly,
    body: RawBody,
) -> Result<Response> {
    let app = path(p)?;
    caller.require(Scope::SelfRegistrationUpdate, Resource::Application(&app))?;
    require_json(&body)?;
    let raw: Value = crate::extract::parse_object(&body.bytes)?;
    if let Some(obj) = raw.as_object() {
        if let Some(k) = obj.keys().find(|k| !CLAIM_FIELDS.contains(&k.as_str())) {
            return Err(ApiError::bad_request(
                k.as_str(),
                "unknown-field",
                format!(
                    "unknown field '{k}'; the fields are {}",
                    CLAIM_FIELDS.join(", ")
                ),
            ));
        }
        // No field is nullable (the OpenAPI document says so): a `null` binding must not
        // pass for an absent one and mint a claim token good for any endpoint.
        if let Some((k, _)) = obj.iter().find(|(_, v)| v.is_null()) {
            return Err(ApiError::bad_request(
                k.as_str(),
                "type",
                format!("'{k}' must not be null; leave it out instead"),
            ));
        }
    }
    let req: ClaimBody = parse_json(&body.bytes)?;
    let expires_at = req
        .expires_at
        .as_deref()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| Timestamp(d.timestamp_millis()))
                .map_err(|e| {
                    ApiError::bad_request(
                        "expiresAt",
                        "rfc3339",
                        format!(
                            "expiresAt must be an RFC 3339 date-time such as \
                             2030-01-01T00:00:00Z ({e})"
                        ),
                    )
                })
        })
        .transpose()?;
    let created = s
        .registry
        .create_claims(
            caller.tenant(),
            &app,
            ClaimInput {
                claim_token: req.claim_token,
                endpoint_id: req.endpoint_id,
                endpoint_id_pattern: req.endpoint_id_pattern,
                expires_at,
                ttl_seconds: req.ttl_seconds,
                count: req.count,
            },
        )
        .await?;
    let now = now_ms();
    let dto = PageDto {
        total_elements: created.len() as u64,
        next_cursor: None,
        content: created
            .into_iter()
            .map(|c| ClaimDto::from_claim(&c.claim, Some(c.token), now))
            .collect(),
    };
    let mut resp = json_response(StatusCode::CREATED, &dto, None);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `GET /applications/{applicationName}/claim-tokens?offset=&limit=`: oldest first, without
/// the tokens themselves (never stored).
pub async fn list_claims(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    p: AppOnly,
) -> Result<Response> {
    let app = path(p)?;
    caller.require(Scope::SelfRegistrationRead, Resource::Application(&app))?;
    let pairs = query_pairs(uri.query());
    let page = s
        .registry
        .list_claims(caller.tenant(), &app, page_params(&s, &pairs)?)
        .await?;
    let now = now_ms();
    let dto = PageDto {
        total_elements: page.total,
        next_cursor: None,
        content: page
            .items
            .iter()
            .map(|c| ClaimDto::from_claim(c, None, now))
            .collect(),
    };
    Ok(json_response(StatusCode::OK, &dto, None))
}

/// `GET /applications/{applicationName}/claim-tokens/{claimTokenId}`.
pub async fn get_claim(State(s): State<AppState>, caller: Caller, p: AppAndId) -> Result<Response> {
    let (app, id) = path(p)?;
    caller.require(Scope::SelfRegistrationRead, Resource::Application(&app))?;
    let c = s.registry.get_claim(caller.tenant(), &app, &id).await?;
    Ok(json_response(
        StatusCode::OK,
        &ClaimDto::from_claim(&c, None, now_ms()),
        None,
    ))
}

/// `DELETE /applications/{applicationName}/claim-tokens/{claimTokenId}`: `204` (used or not).
pub async fn delete_claim(
    State(s): State<AppState>,
    caller: Caller,
    p: AppAndId,
) -> Result<Response> {
    let (app, id) = path(p)?;
    caller.require(Scope::SelfRegistrationUpdate, Resource::Application(&app))?;
    s.registry.delete_claim(caller.tenant(), &app, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
