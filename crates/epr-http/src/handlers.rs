//! Endpoint, metadata and batch handlers, and the helpers every handler shares (the filter
//! handlers are in `filters`). Thin: parse the wire format, call the registry, shape the
//! answer.

use crate::auth::Caller;
use crate::dto::{self, EndpointDto, Include, MatchedFilters, PageDto};
use crate::error::ApiError;
use crate::extract::{
    correlation_id, list_param, not_modified, number_param, parse_json, parse_object, precondition,
    query_pairs, single_param, BodyKind, RawBody,
};
use crate::AppState;
use axum::extract::rejection::PathRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use epr_core::auth::{Resource, Scope};
use epr_core::command::MetadataChange;
use epr_core::endpoint_filter::FilterId;
use epr_core::ids::{AppName, AppVersionName, EndpointId};
use epr_core::metadata::{Metadata, MetadataKey};
use epr_core::query::{EndpointQuery, MetadataCondition, PageRequest};
use epr_core::registry::{BatchInput, RegisterInput};
use epr_core::ValidationError;
use serde::Serialize;
use serde_json::Value;

pub(crate) type Result<T> = std::result::Result<T, ApiError>;

pub(crate) fn path<T>(p: std::result::Result<Path<T>, PathRejection>) -> Result<T> {
    p.map(|Path(v)| v).map_err(|rej| {
        let text = rej.body_text();
        // axum names the parameter in backticks (`Invalid UTF-8 in `endpointId``).
        let field = text
            .split('`')
            .nth(1)
            .filter(|name| !name.is_empty())
            .unwrap_or("path")
            .to_owned();
        ApiError::new(StatusCode::BAD_REQUEST, text).with(field, "path-parameter")
    })
}

fn endpoint_id(raw: &str) -> Result<EndpointId> {
    Ok(EndpointId::parse(raw)?)
}

/// The endpoint of the path, once the caller is allowed `scope` on it: checked on the raw
/// ID before it is validated or looked up, so a refusal tells nothing about it.
pub(crate) fn authorized_endpoint(
    caller: &Caller,
    scope: Scope,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<EndpointId> {
    let raw = path(p)?;
    caller.require(scope, Resource::Endpoint(&raw))?;
    endpoint_id(&raw)
}

/// Like [`authorized_endpoint`], for the routes that also name a metadata key.
fn authorized_endpoint_key(
    s: &AppState,
    caller: &Caller,
    scope: Scope,
    p: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<(EndpointId, MetadataKey)> {
    let (raw_id, raw_key) = path(p)?;
    caller.require(scope, Resource::Endpoint(&raw_id))?;
    Ok((endpoint_id(&raw_id)?, metadata_key(s, &raw_key)?))
}

/// The application an application version belongs to, for authorizing a registration
/// before the registry is asked (which resolves it again: a map lookup).
fn app_of_version(s: &AppState, caller: &Caller, version: &str) -> Result<AppName> {
    let version = AppVersionName::parse(version)?;
    Ok(s.registry.catalog(caller.tenant()).resolve(&version)?)
}

pub(crate) fn json_response(
    status: StatusCode,
    body: &impl Serialize,
    etag: Option<&str>,
) -> Response {
    json_bytes_response(status, serde_json::to_vec(body).unwrap_or_default(), etag)
}

/// A JSON answer from already serialised bytes (when the tag is computed from them).
pub(crate) fn json_bytes_response(
    status: StatusCode,
    bytes: Vec<u8>,
    etag: Option<&str>,
) -> Response {
    let mut resp = (status, bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(tag) = etag.and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert(header::ETAG, tag);
    }
    resp
}

/// A read answer honouring `If-None-Match`.
fn read_response(headers: &HeaderMap, body: &impl Serialize, etag: &str) -> Result<Response> {
    if not_modified(headers, etag)? {
        return Ok(not_modified_response(etag));
    }
    Ok(json_response(StatusCode::OK, body, Some(etag)))
}

pub(crate) fn not_modified_response(etag: &str) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

pub(crate) fn with_location(mut resp: Response, location: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn no_content(etag: &str) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

pub(crate) fn require_json(body: &RawBody) -> Result<()> {
    if body.kind != BodyKind::Json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "this operation takes application/json",
        )
        .with("Content-Type", "media-type"));
    }
    Ok(())
}

fn include_param(pairs: &[(String, String)]) -> Result<Include> {
    let mut include = Include::default();
    for v in list_param(pairs, "include")? {
        match v.as_str() {
            "metadata" => include.metadata = true,
            "filters" => include.filters = true,
            other => {
                return Err(ApiError::bad_request(
                    "include",
                    "enum",
                    format!("include takes 'metadata' and/or 'filters', not '{other}'"),
                ))
            }
        }
    }
    Ok(include)
}

/// The absolute URL of `path` on this server, as the caller reached it (`Host`, and
/// `X-Forwarded-Proto` when behind a proxy), for `Location`.
pub(crate) fn absolute_url(headers: &HeaderMap, path: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("http");
    format!("{scheme}://{host}{path}")
}

/// `offset` and `limit` of a listing. Out-of-range values are refused rather than clamped,
/// so a client never silently gets fewer rows than it asked for.
pub(crate) fn page_params(s: &AppState, pairs: &[(String, String)]) -> Result<PageRequest> {
    let limit = number_param(
        pairs,
        "limit",
        s.settings.page_default,
        1,
        s.settings.page_max,
    )?;
    let offset = number_param(pairs, "offset", 0, 0, u64::MAX >> 1)?;
    Ok(PageRequest {
        offset,
        // page_max is a u32-sized setting; saturate rather than wrap if it is not.
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        after: None,
    })
}

/// The text of a keyset cursor: opaque to clients (docs/api.md), versioned so that its
/// form can change.
fn cursor_text(incarnation: i64) -> String {
    format!("c1.{incarnation:x}")
}

/// `cursor`: a token of [`cursor_text`]; not together with a non-zero `offset`.
fn cursor_param(pairs: &[(String, String)], page: &mut PageRequest) -> Result<()> {
    let Some(raw) = single_param(pairs, "cursor")? else {
        return Ok(());
    };
    let bad = || {
        ApiError::bad_request(
            "cursor",
            "format",
            format!("cursor '{raw}' is not a cursor of this server: pass a nextCursor as given"),
        )
    };
    let hex = raw.strip_prefix("c1.").ok_or_else(bad)?;
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let after = u64::from_str_radix(hex, 16).map_err(|_| bad())?;
    // With a cursor, `offset` skips that many matches after the cursor's position.
    page.after = Some(i64::try_from(after).map_err(|_| bad())?);
    Ok(())
}

/// An application named in a path that must be configured (or unknown applications be
/// allowed); otherwise `404` (field `applicationName`).
pub(crate) fn known_app(s: &AppState, caller: &Caller, raw: &str) -> Result<AppName> {
    let app = AppName::parse(raw)?;
    let catalog = s.registry.catalog(caller.tenant());
    if !catalog.knows_app(&app) && !catalog.allows_unknown() {
        return Err(epr_core::DomainError::not_found("application", app.as_str()).into());
    }
    Ok(app)
}

/// The filters the endpoints of a read match, in one store call, only when asked for.
async fn matched_filters(
    s: &AppState,
    caller: &Caller,
    include: Include,
    ids: &[EndpointId],
) -> Result<MatchedFilters> {
    if !include.filters {
        return Ok(MatchedFilters::new());
    }
    Ok(s.registry.matched_filters(caller.tenant(), ids).await?)
}

fn required_name(v: Option<dto::AppVersionRef>, field: &str) -> Result<String> {
    v.and_then(|a| a.name)
        .ok_or_else(|| ApiError::bad_request(field, "required", format!("{field} is required")))
}

/// `POST /endpoints`
pub async fn register(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: RawBody,
) -> Result<Response> {
    // The application is in the body: a caller who may create in none is refused first.
    caller.require_anywhere(Scope::ApplicationEndpointCreate)?;
    require_json(&body)?;
    let req: dto::RegisterBody = parse_object(&body.bytes)?;
    let input = RegisterInput {
        app_version: required_name(req.app_version, "appVersion.name")?,
        endpoint_id: req.endpoint_id,
        metadata: req.metadata.filter(|m| !m.is_null()),
        token: req.endpoint_token,
    };
    let app = app_of_version(&s, &caller, &input.app_version)?;
    caller.require(
        Scope::ApplicationEndpointCreate,
        Resource::Application(app.as_str()),
    )?;
    let corr = correlation_id(&headers);
    let done = s.registry.register(caller.tenant(), input, &corr).await?;
    let ep = &done.endpoint;
    let base = uri
        .path()
        .trim_end_matches('/')
        .trim_end_matches("/endpoints");
    let location = absolute_url(&headers, &format!("{base}/endpoints/{}", ep.id));
    let resp = json_response(
        StatusCode::CREATED,
        &dto::RegisterResponse {
            endpoint_id: ep.id.to_string(),
            token: done.token,
            status: "Inactive",
        },
        Some(&ep.etag()),
    );
    Ok(with_location(resp, &location))
}

/// `GET /endpoints`
pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response> {
    // A listing spans endpoints: grants on single endpoints do not allow it.
    caller.require(Scope::EndpointRead, Resource::Tenant)?;
    let pairs = query_pairs(uri.query());
    let include = include_param(&pairs)?;
    let mut q = EndpointQuery::default();
    if let Some(app) = single_param(&pairs, "applicationName")? {
        q.app = Some(AppName::parse(app)?);
    }
    if let Some(v) = single_param(&pairs, "applicationVersionName")? {
        q.app_version = Some(AppVersionName::parse(v).map_err(|e| e.at("applicationVersionName"))?);
    }
    for id in list_param(&pairs, "endpointId")? {
        q.endpoint_ids.push(EndpointId::parse(&id)?);
    }
    for (k, v) in &pairs {
        if k == "metadataFilter" {
            q.metadata.extend(MetadataCondition::parse_param(v)?);
        }
    }
    if let Some(f) = single_param(&pairs, "filterId")? {
        // The registry checks that it exists (in `applicationName`, if given) and is active.
        q.filter = Some(FilterId::parse(f)?);
    }
    // Listing by a filter, or with each endpoint's filters, reads filter membership.
    if q.filter.is_some() || include.filters {
        let on = q
            .app
            .as_ref()
            .map_or(Resource::Tenant, |a| Resource::Application(a.as_str()));
        caller.require(Scope::FilterRead, on)?;
    }
    let mut page = page_params(&s, &pairs)?;
    cursor_param(&pairs, &mut page)?;
    let page = s.registry.list(caller.tenant(), &q, page).await?;
    let ids: Vec<EndpointId> = page.items.iter().map(|e| e.id.clone()).collect();
    let matched = matched_filters(&s, &caller, include, &ids).await?;
    let dto = PageDto {
        total_elements: page.total,
        next_cursor: page.next.map(cursor_text),
        content: page
            .items
            .iter()
            .map(|e| EndpointDto::from_endpoint(e, include, &matched))
            .collect(),
    };
    let bytes = serde_json::to_vec(&dto).unwrap_or_default();
    let etag = body_etag(&bytes);
    if not_modified(&headers, &etag)? {
        return Ok(not_modified_response(&etag));
    }
    Ok(json_bytes_response(StatusCode::OK, bytes, Some(&etag)))
}

/// A weak tag over a computed body: equal bodies, equal tags.
pub(crate) fn body_etag(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    format!("W/\"{}\"", hex::encode(&digest[..12]))
}

/// `GET /endpoints/{endpointId}`
pub async fn get(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointRead, p)?;
    let include = include_param(&query_pairs(uri.query()))?;
    let ep = s.registry.get(caller.tenant(), &id).await?;
    if include.filters {
        // The endpoint's filters are its application's.
        caller.require(Scope::FilterRead, Resource::Application(ep.app.as_str()))?;
    }
    let body = EndpointDto::from_endpoint(
        &ep,
        include,
        &matched_filters(&s, &caller, include, std::slice::from_ref(&ep.id)).await?,
    );
    if include.filters {
        // Checked for its form only: a malformed header is refused on every read.
        not_modified(&headers, "")?;
        // Membership changes (a filter created, activated, deleted) leave the endpoint's
        // tag as it is, so that tag cannot validate this body: never `304`. The header
        // stays the endpoint's tag, for `If-Match` on later writes.
        return Ok(json_response(StatusCode::OK, &body, Some(&ep.etag())));
    }
    read_response(&headers, &body, &ep.etag())
}

/// `DELETE /endpoints/{endpointId}`
pub async fn unregister(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointDelete, p)?;
    let pre = precondition(&headers)?;
    s.registry
        .unregister(caller.tenant(), id, pre, &correlation_id(&headers))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /endpoints/{endpointId}/app-version`
pub async fn get_app_version(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointRead, p)?;
    let ep = s.registry.get(caller.tenant(), &id).await?;
    let body = dto::AppVersionDto {
        name: ep.app_version.to_string(),
        registered_date: dto::iso(ep.app_version_registered),
    };
    read_response(&headers, &body, &ep.etag())
}

/// `PUT /endpoints/{endpointId}/app-version`, body `{"name": "<appVersionName>"}`
pub async fn put_app_version(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
    body: RawBody,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointUpdate, p)?;
    require_json(&body)?;
    let req: dto::AppVersionBody = parse_object(&body.bytes)?;
    let name = req
        .name
        .ok_or_else(|| ApiError::bad_request("name", "required", "name is required"))?;
    let pre = precondition(&headers)?;
    let ep = s
        .registry
        .set_app_version(caller.tenant(), id, &name, pre, &correlation_id(&headers))
        .await?;
    Ok(no_content(&ep.etag()))
}

/// `GET /endpoints/{endpointId}/metadata[?include=k1,k2]`
pub async fn get_metadata(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointRead, p)?;
    let keys = list_param(&query_pairs(uri.query()), "include")?;
    let ep = s.registry.get(caller.tenant(), &id).await?;
    let body = if keys.is_empty() {
        ep.metadata.to_value()
    } else {
        Value::Object(
            ep.metadata
                .as_map()
                .iter()
                .filter(|(k, _)| keys.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    read_response(&headers, &body, &ep.metadata_etag())
}

async fn change_metadata(
    s: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    id: EndpointId,
    change: MetadataChange,
) -> Result<Response> {
    let pre = precondition(headers)?;
    let effect = s
        .registry
        .update_metadata(caller.tenant(), id, change, pre, &correlation_id(headers))
        .await?;
    Ok(no_content(&effect.endpoint().metadata_etag()))
}

/// `PUT /endpoints/{endpointId}/metadata`: replaces the whole document.
pub async fn put_metadata(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
    body: RawBody,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointUpdate, p)?;
    require_json(&body)?;
    let value: Value = parse_json(&body.bytes)?;
    let md = Metadata::parse(value, "body", &s.registry.limits())?;
    change_metadata(&s, &caller, &headers, id, MetadataChange::Replace(md)).await
}

/// `PATCH /endpoints/{endpointId}/metadata`: RFC 6902 JSON Patch
/// (`application/json-patch+json`) or RFC 7396 JSON Merge Patch
/// (`application/merge-patch+json`). With plain `application/json`, an array is taken as
/// a JSON Patch and an object as a merge patch.
pub async fn patch_metadata(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
    body: RawBody,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointUpdate, p)?;
    let value: Value = parse_json(&body.bytes)?;
    let as_json_patch = match body.kind {
        BodyKind::JsonPatch => true,
        BodyKind::MergePatch => false,
        BodyKind::Json => value.is_array(),
    };
    let change = if as_json_patch {
        let patch: json_patch::Patch = parse_json(&body.bytes).map_err(|mut e| {
            e.rule = Some("json-patch".into());
            e.message = format!("not a valid RFC 6902 JSON Patch: {}", e.message);
            e
        })?;
        MetadataChange::JsonPatch(patch)
    } else {
        MetadataChange::MergePatch(value)
    };
    change_metadata(&s, &caller, &headers, id, change).await
}

fn metadata_key(s: &AppState, raw: &str) -> Result<MetadataKey> {
    Ok(MetadataKey::parse(raw, &s.registry.limits())?)
}

/// `GET /endpoints/{endpointId}/metadata/{metadataKey}`: the key's raw JSON value.
pub async fn get_metadata_key(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Response> {
    let (id, key) = authorized_endpoint_key(&s, &caller, Scope::EndpointRead, p)?;
    let ep = s.registry.get(caller.tenant(), &id).await?;
    let value = ep.metadata.get(key.as_str()).ok_or_else(|| {
        ApiError::from(epr_core::DomainError::not_found(
            "metadata key",
            key.as_str(),
        ))
    })?;
    read_response(&headers, value, &ep.metadata_etag())
}

/// `PUT /endpoints/{endpointId}/metadata/{metadataKey}`: body is the raw JSON value.
pub async fn put_metadata_key(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<(String, String)>, PathRejection>,
    body: RawBody,
) -> Result<Response> {
    let (id, key) = authorized_endpoint_key(&s, &caller, Scope::EndpointUpdate, p)?;
    require_json(&body)?;
    let value: Value = parse_json(&body.bytes)?;
    change_metadata(
        &s,
        &caller,
        &headers,
        id,
        MetadataChange::PutKey(key, value),
    )
    .await
}

/// `DELETE /endpoints/{endpointId}/metadata/{metadataKey}`
pub async fn delete_metadata_key(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<(String, String)>, PathRejection>,
) -> Result<Response> {
    let (id, key) = authorized_endpoint_key(&s, &caller, Scope::EndpointUpdate, p)?;
    change_metadata(&s, &caller, &headers, id, MetadataChange::DeleteKey(key)).await
}

/// `GET /endpoints/{endpointId}/metadata-keys`
pub async fn endpoint_metadata_keys(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointRead, p)?;
    let ep = s.registry.get(caller.tenant(), &id).await?;
    let keys: Vec<&String> = ep.metadata.keys().collect();
    read_response(&headers, &keys, &ep.metadata_etag())
}

/// `GET /applications/{applicationName}/metadata-keys`: `{appVersionName: [keys]}`.
pub async fn application_metadata_keys(
    State(s): State<AppState>,
    caller: Caller,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let raw = path(p)?;
    caller.require(
        Scope::ApplicationMetadataKeysRead,
        Resource::Application(&raw),
    )?;
    let app = known_app(&s, &caller, &raw)?;
    let keys = s.registry.metadata_keys(caller.tenant(), &app).await?;
    Ok(json_response(StatusCode::OK, &keys, None))
}

/// `POST /endpoints/batch`: registers up to the configured number of endpoints in one
/// durable commit and answers `202` with the task ID; the result is then available at
/// `GET /endpoints/batch/status`.
pub async fn batch_register(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: RawBody,
) -> Result<Response> {
    caller.require_anywhere(Scope::ApplicationEndpointCreate)?;
    require_json(&body)?;
    let req: dto::BatchBody = parse_object(&body.bytes)?;
    let version = required_name(req.app_version, "appVersion.name")?;
    let app = app_of_version(&s, &caller, &version)?;
    caller.require(
        Scope::ApplicationEndpointCreate,
        Resource::Application(app.as_str()),
    )?;
    let endpoints = req
        .endpoints
        .ok_or_else(|| ApiError::bad_request("endpoints", "required", "endpoints is required"))?;
    let inputs = endpoints
        .into_iter()
        .map(|e| BatchInput {
            endpoint_id: e.endpoint_id,
            metadata: e.metadata.filter(|m| !m.is_null()),
            token: e.endpoint_token,
        })
        .collect();
    let report = s
        .registry
        .register_batch(caller.tenant(), &version, inputs, &correlation_id(&headers))
        .await?;
    let base = uri.path().trim_end_matches('/').trim_end_matches("/batch");
    let location = absolute_url(
        &headers,
        &format!(
            "{base}/batch/status?appName={}&taskId={}",
            report.outcome.app, report.outcome.task_id
        ),
    );
    let resp = json_response(
        StatusCode::ACCEPTED,
        &dto::BatchAccepted {
            task_id: report.outcome.task_id.clone(),
        },
        None,
    );
    Ok(with_location(resp, &location))
}

/// `GET /endpoints/batch/status?appName=&taskId=`
pub async fn batch_status(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
) -> Result<Response> {
    caller.require_anywhere(Scope::ApplicationEndpointCreate)?;
    let pairs = query_pairs(uri.query());
    let required = |name: &str| -> Result<String> {
        single_param(&pairs, name)?
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ApiError::bad_request(name, "required", format!("{name} is required")))
    };
    let app =
        AppName::parse(&required("appName")?).map_err(|e: ValidationError| e.at("appName"))?;
    caller.require(
        Scope::ApplicationEndpointCreate,
        Resource::Application(app.as_str()),
    )?;
    let task_id = required("taskId")?;
    let report = s
        .registry
        .batch_status(caller.tenant(), &app, &task_id)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &dto::BatchStatusDto::from_report(&report),
        None,
    ))
}
