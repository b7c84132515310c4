//! The configured applications and their versions (`GET /applications`,
//! `GET /applications/{applicationName}`), read from the catalogue in effect for the
//! caller's tenant: each entry says which sources declare it (`file`, `environment`,
//! `tekton`), and removed versions are listed apart.

use crate::auth::Caller;
use crate::handlers::{json_response, path, Result};
use crate::AppState;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use epr_core::apps::AppCatalog;
use epr_core::auth::{Resource, Scope};
use epr_core::ids::{AppName, AppVersionName};
use serde::Serialize;
use std::collections::BTreeSet;

/// One application. Objects rather than bare names, so attributes can be added without
/// breaking clients.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationDto {
    pub name: String,
    /// The sources that declare it: `environment`, `file`, `tekton`.
    pub origins: Vec<&'static str>,
    pub versions: Vec<ApplicationVersionDto>,
    /// Versions that were declared and no longer are: their endpoints stay, new
    /// registrations and moves to them are refused.
    pub removed_versions: Vec<RemovedVersionDto>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationVersionDto {
    pub name: String,
    pub origins: Vec<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemovedVersionDto {
    pub name: String,
}

impl ApplicationDto {
    fn new(catalog: &AppCatalog, app: &AppName, versions: &BTreeSet<AppVersionName>) -> Self {
        Self {
            name: app.to_string(),
            origins: catalog.app_origins(app).map(|o| o.as_str()).collect(),
            versions: versions
                .iter()
                .map(|v| ApplicationVersionDto {
                    name: v.to_string(),
                    origins: catalog.version_origins(v).map(|o| o.as_str()).collect(),
                })
                .collect(),
            removed_versions: catalog
                .removed_versions(app)
                .map(|v| RemovedVersionDto {
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
    let catalog = s.registry.catalog(caller.tenant());
    let content: Vec<ApplicationDto> = catalog
        .applications()
        .filter(|(app, _)| {
            caller
                .principal()
                .allows(Scope::ApplicationRead, Resource::Application(app.as_str()))
        })
        .map(|(app, versions)| ApplicationDto::new(&catalog, app, versions))
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
    let catalog = s.registry.catalog(caller.tenant());
    let found = catalog
        .applications()
        .find(|(a, _)| **a == app)
        .map(|(a, versions)| ApplicationDto::new(&catalog, a, versions))
        .ok_or_else(|| epr_core::DomainError::not_found("application", app.as_str()))?;
    Ok(json_response(StatusCode::OK, &found, None))
}
