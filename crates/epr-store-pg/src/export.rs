//! Export reads and import (delegated to the write path). Reference: the embedded store's
//! `sqlite_export`: same orders, same shapes.

use crate::error::{corrupt, db, pool};
use crate::filters::{filter_from_row, FILTER_COLUMNS};
use crate::rows::{endpoint_from_row, ENDPOINT_COLUMNS};
use crate::Inner;
use epr_core::endpoint_filter::EndpointFilter;
use epr_core::ids::{TenantId, TokenHash};
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, StoreError};

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
                tokens: vec![],
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
