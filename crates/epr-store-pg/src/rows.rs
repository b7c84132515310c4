//! Rows ↔ domain values shared by every module (one reading of an endpoint row).

use crate::error::corrupt;
use epr_core::endpoint::Endpoint;
use epr_core::ids::{AppName, AppVersionName, EndpointId};
use epr_core::metadata::Metadata;
use epr_core::ports::StoreError;
use epr_core::Timestamp;
use tokio_postgres::Row;

/// The columns [`endpoint_from_row`] reads, in its order (prefix them with a table alias
/// where needed).
pub(crate) const ENDPOINT_COLUMNS: &str = "incarnation, endpoint_id, app, app_version, \
    app_version_registered, created, metadata, metadata_updated, version, metadata_version";

/// An endpoint from a row selected with [`ENDPOINT_COLUMNS`] first.
pub(crate) fn endpoint_from_row(row: &Row) -> Result<Endpoint, StoreError> {
    let get_str = |i: usize| -> Result<&str, StoreError> {
        row.try_get::<_, &str>(i)
            .map_err(|e| corrupt("endpoint", e))
    };
    let metadata: serde_json::Value = row.try_get(6).map_err(|e| corrupt("metadata", e))?;
    let serde_json::Value::Object(metadata) = metadata else {
        return Err(corrupt("metadata", "not a JSON object"));
    };
    Ok(Endpoint {
        incarnation: row.try_get(0).map_err(|e| corrupt("endpoint", e))?,
        id: EndpointId::parse(get_str(1)?).map_err(|e| corrupt("endpoint ID", e))?,
        app: AppName::parse(get_str(2)?).map_err(|e| corrupt("application", e))?,
        app_version: AppVersionName::parse(get_str(3)?)
            .map_err(|e| corrupt("application version", e))?,
        app_version_registered: Timestamp(row.try_get(4).map_err(|e| corrupt("endpoint", e))?),
        created: Timestamp(row.try_get(5).map_err(|e| corrupt("endpoint", e))?),
        metadata: Metadata::from_stored(metadata),
        metadata_updated: row
            .try_get::<_, Option<i64>>(7)
            .map_err(|e| corrupt("endpoint", e))?
            .map(Timestamp),
        version: row
            .try_get::<_, i64>(8)
            .map_err(|e| corrupt("endpoint", e))? as u64,
        metadata_version: row
            .try_get::<_, i64>(9)
            .map_err(|e| corrupt("endpoint", e))? as u64,
    })
}
