//! The configured applications and their versions (`GET /applications`,
//! `GET /applications/{applicationName}`), read from the registry's catalogue.

use crate::auth::Caller;
use crate::handlers::{json_response, path, Result};
use crate::AppState;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use epr_core::auth::{Resource, Scope};
use epr_core::ids::{AppName, AppVersionName};
use serde::Serialize;
use std::collections::BTreeSet;

/// One application. Objects rather than bare names, so attributes (e.g. where an entry
/// came from) can be added without breaking clients.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationDto {
    pub name: String,
    pub versions: Vec<ApplicationVersionDto>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationVersionDto {
    pub name: String,
}

impl ApplicationDto {
    fn new(app: &AppName, versions: &BTreeSet<AppVersionName>) -> Self {
        Self {
            name: app.to_string(),
            versions: versions
                .iter()
                .map(|v| ApplicationVersionDto {
                    name: v.to_string(),
                })
                .collect(),
        }
    }
}

/// `GET /applications`: every configured application, by name, each with its versions by
/// name; `{totalElements, content}` like the other listings, unpaged (the catalogue is
/// configuration, small). Only the applications the caller may read are listed; a caller
/// who may read none is refused.
pub async fn list(State(s): State<AppState>, caller: Caller) -> Result<Response> {
    caller.require_anywhere(Scope::ApplicationRead)?;
    let content: Vec<ApplicationDto> = s
        .registry
        .catalog()
        .applications()
        .filter(|(app, _)| {
            caller
                .principal()
                .allows(Scope::ApplicationRead, Resource::Application(app.as_str()))
        })
        .map(|(app, versions)| ApplicationDto::new(app, versions))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &crate::dto::PageDto {
            total_elements: content.len() as u64,
            next_cursor: None,
            content,
        },
        None,
    ))
}

/// `GET /applications/{applicationName}`: one configured application; `404` (field
/// `applicationName`) when it is not configured, even if unknown versions are allowed.
pub async fn get(
    State(s): State<AppState>,
    caller: Caller,
    p: std::result::Result<Path<String>, PathRejection>,
) -> Result<Response> {
    let raw = path(p)?;
    caller.require(Scope::ApplicationRead, Resource::Application(&raw))?;
    let app = AppName::parse(&raw)?;
    let found = s
        .registry
        .catalog()
        .applications()
        .find(|(a, _)| **a == app)
        .map(|(a, versions)| ApplicationDto::new(a, versions))
        .ok_or_else(|| epr_core::DomainError::not_found("application", app.as_str()))?;
    Ok(json_response(StatusCode::OK, &found, None))
}
