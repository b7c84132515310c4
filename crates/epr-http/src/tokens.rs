//! Endpoint token handlers in Kaa CM's REST shape (`/endpoints/{endpointId}/tokens`). Thin,
//! like the other handlers: the life cycle (which transitions are allowed, uniqueness of a
//! token in its application) lives in `epr_core::command::plan` and the store.
//!
//! - `GET …/tokens?status=&order=&offset=&limit=`: the endpoint's tokens, newest first by
//!   default; a strong `ETag` over the body, `If-None-Match` → `304`.
//! - `POST …/tokens`: issues a token (given or generated), `201`, shown this once.
//! - `GET …/tokens/{endpointTokenId}`: one token; `ETag` is the token's tag.
//! - `PUT …/tokens/{endpointTokenId}/status`: suspend, reactivate, revoke; `If-Match` against
//!   the token's tag.

use crate::auth::Caller;
use crate::dto::{self, IssuedTokenDto, PageDto, TokenDto};
use crate::error::ApiError;
use crate::extract::{
    correlation_id, list_param, not_modified, parse_object, precondition, query_pairs,
    single_param, RawBody,
};
use crate::handlers::{
    absolute_url, authorized_endpoint, json_bytes_response, json_response, not_modified_response,
    page_params, path, require_json, with_location, Result,
};
use crate::AppState;
use axum::extract::rejection::PathRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use epr_core::auth::{Resource, Scope};
use epr_core::credentials::{TokenListQuery, TokenStatus};
use epr_core::ids::{EndpointId, EndpointToken, TokenId};

type EndpointAndToken = std::result::Result<Path<(String, String)>, PathRejection>;

/// A token status as Kaa spells it, exactly (`Inactive`, `Active`, `Suspended`, `Revoked`);
/// anything else is `400` (rule `enum`) naming `field`.
fn status_value(raw: &str, field: &str) -> Result<TokenStatus> {
    TokenStatus::ALL
        .into_iter()
        .find(|s| s.as_str() == raw)
        .ok_or_else(|| {
            ApiError::bad_request(
                field,
                "enum",
                format!("{field} must be one of Inactive, Active, Suspended, Revoked; got '{raw}'"),
            )
        })
}

/// `order`: `ASC` (oldest first) or `DESC` (newest first, the default, as in Kaa's CM).
fn ascending(pairs: &[(String, String)]) -> Result<bool> {
    match single_param(pairs, "order")? {
        None | Some("DESC") => Ok(false),
        Some("ASC") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            "order",
            "enum",
            format!("order must be ASC or DESC; got '{other}'"),
        )),
    }
}

/// A strong tag over a computed body: the same bytes, the same tag.
fn strong_body_etag(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    format!("\"{}\"", hex::encode(&digest[..12]))
}

/// The endpoint and token of the path, once the caller may use `scope` on the endpoint
/// (checked on the raw ID, before anything is validated or looked up).
fn authorized_token(
    caller: &Caller,
    scope: Scope,
    p: EndpointAndToken,
) -> Result<(EndpointId, TokenId)> {
    let (raw_endpoint, raw_token) = path(p)?;
    caller.require(scope, Resource::Endpoint(&raw_endpoint))?;
    Ok((
        EndpointId::parse(&raw_endpoint)?,
        TokenId::parse(&raw_token)?,
    ))
}

/// `GET /endpoints/{endpointId}/tokens`
pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointRead, p)?;
    let pairs = query_pairs(uri.query());
    let mut query = TokenListQuery {
        statuses: Vec::new(),
        ascending: ascending(&pairs)?,
    };
    for raw in list_param(&pairs, "status")? {
        let status = status_value(&raw, "status")?;
        if !query.statuses.contains(&status) {
            query.statuses.push(status);
        }
    }
    let page = s
        .registry
        .list_tokens(caller.tenant(), &id, &query, page_params(&s, &pairs)?)
        .await?;
    let dto = PageDto {
        total_elements: page.total,
        next_cursor: None,
        content: page.items.iter().map(TokenDto::from_token).collect(),
    };
    let bytes = serde_json::to_vec(&dto).unwrap_or_default();
    let etag = strong_body_etag(&bytes);
    if not_modified(&headers, &etag)? {
        return Ok(not_modified_response(&etag));
    }
    Ok(json_bytes_response(StatusCode::OK, bytes, Some(&etag)))
}

/// `POST /endpoints/{endpointId}/tokens`, body `{applicationName, token?}`: `201`, the token
/// (shown only here), its `ETag` and `Location`.
pub async fn issue(
    State(s): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    p: std::result::Result<Path<String>, PathRejection>,
    body: RawBody,
) -> Result<Response> {
    let id = authorized_endpoint(&caller, Scope::EndpointUpdate, p)?;
    require_json(&body)?;
    let req: dto::IssueTokenBody = parse_object(&body.bytes)?;
    let app = req.application_name.ok_or_else(|| {
        ApiError::bad_request("applicationName", "required", "applicationName is required")
    })?;
    if let Some(t) = &req.token {
        // Named as the body names it (the registry's rule calls it `endpointToken`).
        EndpointToken::parse(t).map_err(|e| e.at("token"))?;
    }
    let corr = correlation_id(&headers);
    let issued = s
        .registry
        .issue_token(caller.tenant(), id, &app, req.token.as_deref(), &corr)
        .await?;
    let t = &issued.stored;
    let location = absolute_url(
        &headers,
        &format!("{}/{}", uri.path().trim_end_matches('/'), t.id),
    );
    let resp = json_response(
        StatusCode::CREATED,
        &IssuedTokenDto {
            token: issued.token.clone(),
            endpoint_token_id: t.id.to_string(),
            created_date: dto::iso(t.created),
            application_name: t.app.to_string(),
            status: t.status.as_str(),
        },
        Some(&t.etag()),
    );
    Ok(with_location(resp, &location))
}

/// `GET /endpoints/{endpointId}/tokens/{endpointTokenId}`
pub async fn get(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: EndpointAndToken,
) -> Result<Response> {
    let (endpoint, token) = authorized_token(&caller, Scope::EndpointRead, p)?;
    let t = s
        .registry
        .get_token(caller.tenant(), &endpoint, &token)
        .await?;
    let etag = t.etag();
    if not_modified(&headers, &etag)? {
        return Ok(not_modified_response(&etag));
    }
    Ok(json_response(
        StatusCode::OK,
        &TokenDto::from_token(&t),
        Some(&etag),
    ))
}

/// `PUT /endpoints/{endpointId}/tokens/{endpointTokenId}/status`, body `{status}`: `200`, the
/// token after the change (also when it already was in that status), with its `ETag`.
pub async fn set_status(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    p: EndpointAndToken,
    body: RawBody,
) -> Result<Response> {
    let (endpoint, token) = authorized_token(&caller, Scope::EndpointUpdate, p)?;
    require_json(&body)?;
    let req: dto::TokenStatusBody = parse_object(&body.bytes)?;
    let raw = req
        .status
        .ok_or_else(|| ApiError::bad_request("status", "required", "status is required"))?;
    let target = status_value(&raw, "status")?;
    let pre = precondition(&headers)?;
    let t = s
        .registry
        .transition_token(
            caller.tenant(),
            endpoint,
            token,
            target,
            pre,
            &correlation_id(&headers),
        )
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &TokenDto::from_token(&t),
        Some(&t.etag()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<(String, String)> {
        query_pairs(Some(q))
    }

    #[test]
    fn statuses_are_spelled_as_kaa_spells_them() {
        for s in TokenStatus::ALL {
            assert_eq!(status_value(s.as_str(), "status").unwrap(), s);
        }
        let e = status_value("active", "status").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            (e.field.as_deref(), e.rule.as_deref()),
            (Some("status"), Some("enum"))
        );
    }

    #[test]
    fn order_defaults_to_newest_first() {
        assert!(!ascending(&pairs("")).unwrap());
        assert!(!ascending(&pairs("order=DESC")).unwrap());
        assert!(ascending(&pairs("order=ASC")).unwrap());
        let e = ascending(&pairs("order=up")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("order"));
        assert_eq!(
            ascending(&pairs("order=ASC&order=DESC"))
                .unwrap_err()
                .rule
                .as_deref(),
            Some("single")
        );
    }

    #[test]
    fn the_list_tag_is_strong_and_follows_the_body() {
        let a = strong_body_etag(b"{\"totalElements\":0}");
        assert!(a.starts_with('"') && a.ends_with('"'), "{a}");
        assert_eq!(a, strong_body_etag(b"{\"totalElements\":0}"));
        assert_ne!(a, strong_body_etag(b"{\"totalElements\":1}"));
    }
}
