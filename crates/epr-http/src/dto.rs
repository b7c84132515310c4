//! Wire shapes, spelled as Kaa spells them. Only this module knows them.

use epr_core::credentials::StoredToken;
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::{EndpointFilter, FilterId};
use epr_core::ids::EndpointId;
use epr_core::registry::{BatchReport, FilterInput};
use epr_core::Timestamp;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

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

/// The active filters each endpoint of a read matches (`include=filters`); endpoints that
/// match none are absent.
pub type MatchedFilters = BTreeMap<EndpointId, Vec<FilterId>>;

impl EndpointDto {
    /// `matched` is consulted only with `include.filters`.
    pub fn from_endpoint(ep: &Endpoint, include: Include, matched: &MatchedFilters) -> Self {
        Self {
            endpoint_id: ep.id.to_string(),
            app_version: AppVersionDto {
                name: ep.app_version.to_string(),
                registered_date: iso(ep.app_version_registered),
            },
            created_date: iso(ep.created),
            metadata: include.metadata.then(|| ep.metadata.to_value()),
            metadata_updated_date: ep.metadata_updated.map(iso),
            filters: include.filters.then(|| {
                matched
                    .get(&ep.id)
                    .map(|ids| ids.iter().map(ToString::to_string).collect())
                    .unwrap_or_default()
            }),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PageDto<T> {
    pub total_elements: u64,
    pub content: Vec<T>,
    /// Endpoint listings: the `cursor` of the next page, when one follows (ours; Kaa
    /// clients ignore unknown fields).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `POST /applications/{app}/filters`. `mongoQuery` is an object or a string holding one
/// (Kaa's UI sends a string). Unknown fields are ignored, as on every body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateFilterBody {
    pub name: Option<String>,
    pub description: Option<String>,
    pub mongo_query: Option<Value>,
}

impl From<CreateFilterBody> for FilterInput {
    fn from(b: CreateFilterBody) -> Self {
        Self {
            name: b.name,
            description: b.description,
            // `null` is as good as absent: the registry answers `mongoQuery` required.
            mongo_query: b.mongo_query.filter(|q| !q.is_null()),
        }
    }
}

/// `PATCH /applications/{app}/filters/{filterId}`: the parts to change. Each field is
/// absent (unchanged), `null`, or a value; the outer `Option` tells absent from `null`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatchFilterBody {
    #[serde(default, deserialize_with = "present")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub mongo_query: Option<Option<Value>>,
}

/// Marks a field as present (possibly `null`); absent fields stay `None` via `default`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FilterDto {
    pub id: String,
    pub application_name: String,
    pub name: String,
    pub description: String,
    pub mongo_query: Map<String, Value>,
    pub status: &'static str,
    pub matched_endpoints_count: u64,
    pub created_date: String,
    pub updated_date: String,
}

impl FilterDto {
    pub fn from_filter(f: &EndpointFilter) -> Self {
        Self {
            id: f.id.to_string(),
            application_name: f.app.to_string(),
            name: f.spec.name.clone(),
            description: f.spec.description.clone(),
            mongo_query: f.spec.query.clone(),
            status: f.status.as_str(),
            matched_endpoints_count: f.matched,
            created_date: iso(f.created),
            updated_date: iso(f.updated),
        }
    }
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
    /// The item's position in the request's `endpoints` (from 0).
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_token: Option<String>,
    pub endpoint_id: String,
    pub metadata: Value,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchFailedDto {
    /// The item's position in the request's `endpoints` (from 0).
    pub index: usize,
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
                    index: c.index,
                    endpoint_token: token(c.index),
                    endpoint_id: c.endpoint_id.to_string(),
                    metadata: c.metadata.to_value(),
                })
                .collect(),
            failed: o
                .failed
                .iter()
                .map(|f| BatchFailedDto {
                    index: f.index,
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

/// One endpoint token as Kaa's CM shows it (`GET …/tokens`, `GET …/tokens/{id}`, the answer
/// of `PUT …/status`). Never the token itself: only its hash is stored.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenDto {
    pub status: &'static str,
    pub endpoint_token_id: String,
    pub created_date: String,
    pub application_name: String,
    /// The last status change; absent while the token never changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_date: Option<String>,
}

impl TokenDto {
    pub fn from_token(t: &StoredToken) -> Self {
        Self {
            status: t.status.as_str(),
            endpoint_token_id: t.id.to_string(),
            created_date: iso(t.created),
            application_name: t.app.to_string(),
            update_date: t.updated.map(iso),
        }
    }
}

/// `POST /endpoints/{id}/tokens`. Unknown fields are ignored, as on every body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueTokenBody {
    pub application_name: Option<String>,
    /// The token to issue; generated when absent or `null`.
    pub token: Option<String>,
}

/// The answer to `POST /endpoints/{id}/tokens`: the only time the token itself is shown.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedTokenDto {
    pub token: String,
    pub endpoint_token_id: String,
    pub created_date: String,
    pub application_name: String,
    pub status: &'static str,
}

/// `PUT /endpoints/{id}/tokens/{tokenId}/status`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatusBody {
    pub status: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use epr_core::endpoint_filter::{FilterSpec, FilterStatus};
    use epr_core::ids::AppName;
    use serde_json::json;

    #[test]
    fn filter_has_kaas_shape_with_the_query_as_an_object() {
        // Kaa's UI sends the query as a string; it is returned as an object.
        let spec = FilterSpec::parse(
            " Kyiv ",
            "in Kyiv",
            &json!(r#"{"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}"#),
        )
        .unwrap();
        let f = EndpointFilter {
            id: FilterId::parse("f-1").unwrap(),
            app: AppName::parse("demo").unwrap(),
            spec,
            status: FilterStatus::Active,
            matched: 7,
            created: Timestamp(1_591_005_600_000),
            updated: Timestamp(1_591_005_600_123),
            version: 2,
        };
        let v = serde_json::to_value(FilterDto::from_filter(&f)).unwrap();
        assert_eq!(
            v,
            json!({
                "id": "f-1",
                "applicationName": "demo",
                "name": "Kyiv",
                "description": "in Kyiv",
                "mongoQuery": {"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}},
                "status": "active",
                "matchedEndpointsCount": 7,
                "createdDate": "2020-06-01T10:00:00.000Z",
                "updatedDate": "2020-06-01T10:00:00.123Z",
            })
        );
    }

    #[test]
    fn create_body_null_query_is_absent() {
        let b: CreateFilterBody =
            serde_json::from_value(json!({"name": "n", "mongoQuery": null, "extra": 1})).unwrap();
        let input = FilterInput::from(b);
        assert!(input.mongo_query.is_none());
        assert_eq!(input.name.as_deref(), Some("n"));
    }
}
