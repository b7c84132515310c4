//! Export reads and import (delegated to the write path). Reference: the embedded store's
//! `sqlite_export`: same orders, same shapes.

use crate::error::{corrupt, db, pool};
use crate::rows::{endpoint_from_row, ENDPOINT_COLUMNS};
use crate::Inner;
use epr_core::endpoint_filter::{EndpointFilter, FilterId, FilterSpec, FilterStatus};
use epr_core::ids::{AppName, TenantId, TokenHash};
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, StoreError};
use epr_core::Timestamp;
use tokio_postgres::Row;

/// The columns [`filter_from_row`] reads, in its order, from `filters` aliased `f`. The
/// member count is the sum of the filter's count shards (`filter_counts`).
pub(crate) const FILTER_COLUMNS: &str = "f.filter_id, f.app, f.name, f.description, f.query, \
    f.status, \
    COALESCE((SELECT sum(c.n) FROM filter_counts c \
              WHERE c.tenant = f.tenant AND c.filter_id = f.filter_id), 0)::bigint, \
    f.created, f.updated, f.version";

/// A stored filter row (selected with [`FILTER_COLUMNS`]) as the domain value. The query
/// is compiled again: the stored JSON is the source of truth.
pub(crate) fn filter_from_row(row: &Row) -> Result<EndpointFilter, StoreError> {
    let text = |i: usize| -> Result<&str, StoreError> {
        row.try_get::<_, &str>(i).map_err(|e| corrupt("filter", e))
    };
    let int = |i: usize| -> Result<i64, StoreError> {
        row.try_get::<_, i64>(i).map_err(|e| corrupt("filter", e))
    };
    let query: serde_json::Value = row.try_get(4).map_err(|e| corrupt("filter query", e))?;
    let spec =
        FilterSpec::parse(text(2)?, text(3)?, &query).map_err(|e| corrupt("filter query", e))?;
    let status = match text(5)? {
        "pending" => FilterStatus::Pending,
        "active" => FilterStatus::Active,
        other => return Err(corrupt("filter status", other)),
    };
    Ok(EndpointFilter {
        id: FilterId::parse(text(0)?).map_err(|e| corrupt("filter ID", e))?,
        app: AppName::parse(text(1)?).map_err(|e| corrupt("application", e))?,
        spec,
        status,
        matched: int(6)?.max(0) as u64,
        created: Timestamp(int(7)?),
        updated: Timestamp(int(8)?),
        version: int(9)? as u64,
    })
}

// Text orders are byte orders (`COLLATE "C"`), as in the embedded store, whatever the
// database's collation.
pub(crate) async fn tenants(inner: &Inner) -> Result<Vec<TenantId>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let rows = client
        .query(
            "SELECT tenant FROM (SELECT DISTINCT tenant FROM endpoints \
                                 UNION SELECT DISTINCT tenant FROM filters) t \
             ORDER BY tenant COLLATE \"C\"",
            &[],
        )
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| TenantId::parse(r.get::<_, &str>(0)).map_err(|e| corrupt("tenant", e)))
        .collect()
}

pub(crate) async fn endpoints(
    inner: &Inner,
    tenant: &TenantId,
    after: i64,
    limit: usize,
) -> Result<Vec<EndpointExport>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    // `endpoints_by_incarnation` (tenant, incarnation): registration order.
    let rows = client
        .query(
            &format!(
                "SELECT {ENDPOINT_COLUMNS}, token_hash FROM endpoints \
                 WHERE tenant = $1 AND incarnation > $2 ORDER BY incarnation LIMIT $3"
            ),
            &[
                &tenant.as_str(),
                &after,
                &(limit.min(i64::MAX as usize) as i64),
            ],
        )
        .await
        .map_err(db)?;
    rows.iter()
        .map(|row| {
            let endpoint = endpoint_from_row(row)?;
            let hash: &[u8] = row.try_get(10).map_err(|e| corrupt("token hash", e))?;
            let hash =
                <[u8; 32]>::try_from(hash).map_err(|_| corrupt("token hash", "not 32 bytes"))?;
            Ok(EndpointExport {
                tenant: tenant.clone(),
                endpoint,
                token_hash: TokenHash(hash),
            })
        })
        .collect()
}

pub(crate) async fn filters(
    inner: &Inner,
    tenant: &TenantId,
) -> Result<Vec<EndpointFilter>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let rows = client
        .query(
            &format!(
                "SELECT {FILTER_COLUMNS} FROM filters f WHERE f.tenant = $1 \
                 ORDER BY f.app COLLATE \"C\", f.created, f.filter_id COLLATE \"C\""
            ),
            &[&tenant.as_str()],
        )
        .await
        .map_err(db)?;
    rows.iter().map(filter_from_row).collect()
}

pub(crate) async fn import(
    inner: &Inner,
    records: Vec<ImportRecord>,
) -> Result<Vec<ImportOutcome>, StoreError> {
    crate::write::import(inner, records).await
}
