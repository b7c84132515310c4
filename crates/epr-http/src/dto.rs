//! Wire shapes, spelled as Kaa spells them. Only this module knows them.

use epr_core::endpoint::Endpoint;
use epr_core::registry::BatchReport;
use epr_core::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// ISO-8601 UTC with milliseconds, e.g. `2020-06-01T10:00:00.000Z`.
pub fn iso(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.millis())
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppVersionRef {
    pub name: Option<String>,
}

/// `POST /endpoints`. Unknown fields (e.g. `relations` from newer clients) are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterBody {
    pub app_version: Option<AppVersionRef>,
    pub metadata: Option<Value>,
    pub endpoint_token: Option<String>,
    pub endpoint_id: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub endpoint_id: String,
    pub token: String,
    /// Always `Inactive` for a new token; it becomes `Active` on first use.
    pub status: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppVersionDto {
    pub name: String,
    pub registered_date: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDto {
    pub endpoint_id: String,
    pub app_version: AppVersionDto,
    pub created_date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_updated_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<String>>,
}

/// Which optional parts of an endpoint a read includes (`include=metadata,filters`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Include {
    pub metadata: bool,
    pub filters: bool,
}

impl EndpointDto {
    pub fn from_endpoint(ep: &Endpoint, include: Include) -> Self {
        Self {
            endpoint_id: ep.id.to_string(),
            app_version: AppVersionDto {
                name: ep.app_version.to_string(),
                registered_date: iso(ep.app_version_registered),
            },
            created_date: iso(ep.created),
            metadata: include.metadata.then(|| ep.metadata.to_value()),
            metadata_updated_date: ep.metadata_updated.map(iso),
            // Endpoint filters arrive with the filters feature; until then none match.
            filters: include.filters.then(Vec::new),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PageDto<T> {
    pub total_elements: u64,
    pub content: Vec<T>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppVersionBody {
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchBody {
    pub app_version: Option<AppVersionRef>,
    pub endpoints: Option<Vec<BatchEndpoint>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchEndpoint {
    pub endpoint_token: Option<String>,
    pub endpoint_id: Option<String>,
    pub metadata: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchAccepted {
    pub task_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchCreatedDto {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_token: Option<String>,
    pub endpoint_id: String,
    pub metadata: Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchFailedDto {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<String>,
    /// Kaa types this as a string (the metadata as given, JSON-encoded).
    pub metadata: String,
    pub status: &'static str,
    pub status_reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchStatusDto {
    pub task_id: String,
    pub created_count: usize,
    pub failed_count: usize,
    pub created: Vec<BatchCreatedDto>,
    pub failed: Vec<BatchFailedDto>,
}

impl BatchStatusDto {
    pub fn from_report(r: &BatchReport) -> Self {
        let token = |i: usize| r.tokens.as_ref().and_then(|t| t.get(i).cloned().flatten());
        let o = &r.outcome;
        Self {
            task_id: o.task_id.clone(),
            created_count: o.created.len(),
            failed_count: o.failed.len(),
            created: o
                .created
                .iter()
                .map(|c| BatchCreatedDto {
                    endpoint_token: token(c.index),
                    endpoint_id: c.endpoint_id.to_string(),
                    metadata: c.metadata.to_value(),
                })
                .collect(),
            failed: o
                .failed
                .iter()
                .map(|f| BatchFailedDto {
                    endpoint_token: token(f.index),
                    endpoint_id: f.endpoint_id.clone(),
                    metadata: f.metadata_text.clone(),
                    status: "FAILED",
                    status_reason: f.reason.clone(),
                })
                .collect(),
        }
    }
}
