//! Saved endpoint filter handlers (`/applications/{applicationName}/filters`). Thin, like
//! the endpoint handlers: the rules (validation of the definition, name uniqueness, status,
//! back-fill) live in the registry and the store.
//!
//! The filter's `ETag` covers its definition (name, description, query): it is what
//! `If-Match` on `PATCH` and `DELETE` is checked against. Status and
//! `matchedEndpointsCount` change without changing it, so reads never answer `304` on it.

use crate::auth::Caller;
use crate::dto::{self, FilterDto, PageDto};
use crate::error::ApiError;
use crate::extract::{
    correlation_id, not_modified, parse_object, precondition, query_pairs, single_param, BodyKind,
    RawBody,
};
use crate::handlers::{
    absolute_url, body_etag, json_bytes_response, json_response, known_app, not_modified_response,
    page_params, path, require_json, with_location, Result,
};
use crate::AppState;
use axum::extract::rejection::PathRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use epr_core::auth::{Resource, Scope};
use epr_core::registry::FilterInput;

type AppAndId = std::result::Result<Path<(String, String)>, PathRejection>;

/// `GET /applications/{applicationName}/filters?name=&offset=&limit=`: the application's
/// filters, oldest first; `name` keeps only the one with that exact name.
pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let raw = path(p)?;
    caller.require(Scope::FilterRead, Resource::Application(&raw))?;
    let app = known_app(&s, &caller, &raw)?;
    let pairs = query_pairs(uri.query());
    // Names are stored trimmed; an empty `name=` (a cleared search box) filters nothing.
    let name = single_param(&pairs, "name")?
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let page = s
        .registry
        .list_filters(
            caller.tenant(),
            app.as_str(),
            name,
            page_params(&s, &pairs)?,
        )
        .await?;
    let dto = PageDto {
        total_elements: page.total,
        next_cursor: None,
        content: page.items.iter().map(FilterDto::from_filter).collect(),
    };
    // Like the endpoint listing: a weak tag over the body, so status and counts count.
    let bytes = serde_json::to_vec(&dto).unwrap_or_default();
    let etag = body_etag(&bytes);
    if not_modified(&headers, &etag)? {
        return Ok(not_modified_response(&etag));
    }
    Ok(json_bytes_response(StatusCode::OK, bytes, Some(&etag)))
}

/// `POST /applications/{applicationName}/filters`, body `{name, description?, mongoQuery}`:
/// `201`, the new filter (`pending`), its `ETag` and `Location`.
pub async fn create(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
    body: RawBody,
) -> Result<Response> {
    let app = path(p)?;
    caller.require(Scope::FilterCreate, Resource::Application(&app))?;
    require_json(&body)?;
    let req: dto::CreateFilterBody = parse_object(&body.bytes)?;
    let corr = correlation_id(&headers);
    let f = s
        .registry
        .create_filter(caller.tenant(), &app, req.into(), &corr)
        .await?;
    let location = absolute_url(
        &headers,
        &format!("{}/{}", uri.path().trim_end_matches('/'), f.id),
    );
    let resp = json_response(
        StatusCode::CREATED,
        &FilterDto::from_filter(&f),
        Some(&f.etag()),
    );
    Ok(with_location(resp, &location))
}

/// `GET /applications/{applicationName}/filters/{filterId}`: a filter of another
/// application is not found through this one.
pub async fn get(State(s): State<AppState>, caller: Caller, p: AppAndId) -> Result<Response> {
    let (app, id) = path(p)?;
    caller.require(Scope::FilterRead, Resource::Application(&app))?;
    let f = s.registry.get_filter(caller.tenant(), &app, &id).await?;
    Ok(json_response(
        StatusCode::OK,
        &FilterDto::from_filter(&f),
        Some(&f.etag()),
    ))
}

/// `PATCH /applications/{applicationName}/filters/{filterId}`, body a partial
/// `{name?, description?, mongoQuery?}` (a merge patch: `application/json` or
/// `application/merge-patch+json`). A new query sends the filter back to `pending`.
pub async fn patch(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: AppAndId,
    body: RawBody,
) -> Result<Response> {
    let (app, id) = path(p)?;
    caller.require(Scope::FilterUpdate, Resource::Application(&app))?;
    if body.kind == BodyKind::JsonPatch {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a filter is changed by a merge patch: send application/json or application/merge-patch+json",
        )
        .with("Content-Type", "media-type"));
    }
    let req: dto::PatchFilterBody = parse_object(&body.bytes)?;
    let input = patch_input(req)?;
    let pre = precondition(&headers)?;
    let f = s
        .registry
        .update_filter(
            caller.tenant(),
            &app,
            &id,
            input,
            pre,
            &correlation_id(&headers),
        )
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &FilterDto::from_filter(&f),
        Some(&f.etag()),
    ))
}

/// The change a patch body asks for. `null` removes a part where that means something
/// (`description` becomes empty); a filter cannot be without a name or a query.
fn patch_input(req: dto::PatchFilterBody) -> Result<FilterInput> {
    if req.name.is_none() && req.description.is_none() && req.mongo_query.is_none() {
        // An empty patch is almost certainly a client bug (a misspelt field, since unknown
        // fields are ignored); answering 200 would hide it.
        return Err(ApiError::bad_request(
            "body",
            "required",
            "the patch changes nothing: give at least one of name, description, mongoQuery",
        ));
    }
    let cannot_remove = |field: &str| {
        ApiError::bad_request(
            field,
            "required",
            format!("{field} cannot be removed (null); give a new value or leave it out"),
        )
    };
    let name = match req.name {
        Some(None) => return Err(cannot_remove("name")),
        other => other.flatten(),
    };
    let mongo_query = match req.mongo_query {
        Some(None) => return Err(cannot_remove("mongoQuery")),
        other => other.flatten(),
    };
    Ok(FilterInput {
        name,
        description: req.description.map(Option::unwrap_or_default),
        mongo_query,
    })
}

/// `DELETE /applications/{applicationName}/filters/{filterId}`: `204`; `If-Match` against
/// the filter's tag.
pub async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: AppAndId,
) -> Result<Response> {
    let (app, id) = path(p)?;
    caller.require(Scope::FilterDelete, Resource::Application(&app))?;
    let pre = precondition(&headers)?;
    s.registry
        .delete_filter(caller.tenant(), &app, &id, pre, &correlation_id(&headers))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patch_body(v: serde_json::Value) -> Result<FilterInput> {
        patch_input(crate::extract::parse_object(v.to_string().as_bytes())?)
    }

    #[test]
    fn empty_patch_is_refused_naming_the_body() {
        for body in [json!({}), json!({"nmae": "typo"})] {
            let e = patch_body(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.field.as_deref(), Some("body"));
        }
    }

    #[test]
    fn patch_parts_absent_null_and_given() {
        let i = patch_body(json!({"name": "n"})).unwrap();
        assert_eq!(i.name.as_deref(), Some("n"));
        assert!(i.description.is_none() && i.mongo_query.is_none());
        // null clears the description...
        let i = patch_body(json!({"description": null})).unwrap();
        assert_eq!(i.description.as_deref(), Some(""));
        // ...but a filter cannot lose its name or query.
        for field in ["name", "mongoQuery"] {
            let e = patch_body(json!({ field: null })).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field));
            assert_eq!(e.rule.as_deref(), Some("required"));
        }
        let i = patch_body(json!({"mongoQuery": "{\"application_version\": \"a-v1\"}"})).unwrap();
        assert!(i.mongo_query.unwrap().is_string());
    }

    #[test]
    fn patch_type_errors_name_the_field() {
        let e = patch_body(json!({"name": 5})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("name"));
        assert_eq!(e.rule.as_deref(), Some("type"));
        let e = patch_body(json!({"description": ["x"]})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("description"));
    }
}
