//! Export reads and import (delegated to the write path). Reference: the embedded store's
//! `sqlite_export`: same orders, same shapes.

use crate::credentials::{hash_from, token_from_row, TOKEN_COLUMNS};
use crate::error::{corrupt, db, pool};
use crate::filters::{filter_from_row, FILTER_COLUMNS};
use crate::rows::{endpoint_from_row, ENDPOINT_COLUMNS};
use crate::Inner;
use epr_core::credentials::StoredToken;
use epr_core::endpoint_filter::EndpointFilter;
use epr_core::ids::TenantId;
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, StoreError};
use std::collections::HashMap;

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
    let mut client = inner.pool.get().await.map_err(pool)?;
    // The page and its tokens from one snapshot.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)?;
    // `endpoints_by_incarnation` (tenant, incarnation): registration order.
    let rows = tx
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
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r.try_get(1).map_err(|e| corrupt("endpoint", e)))
        .collect::<Result<_, _>>()?;
    // Each endpoint's rows in creation order (`tokens_by_endpoint_created`).
    let token_rows = tx
        .query(
            &format!(
                "SELECT t.* FROM unnest($2::text[]) AS k(id) \
                 CROSS JOIN LATERAL (SELECT {TOKEN_COLUMNS} FROM tokens \
                     WHERE tenant=$1 AND endpoint_id=k.id OFFSET 0) t \
                 ORDER BY t.created, t.token_id COLLATE \"C\""
            ),
            &[&tenant.as_str(), &ids],
        )
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    let mut tokens: HashMap<String, Vec<StoredToken>> = HashMap::new();
    for row in &token_rows {
        if let Some(t) = token_from_row(row, 0)? {
            tokens
                .entry(t.endpoint_id.as_str().to_owned())
                .or_default()
                .push(t);
        }
    }
    rows.iter()
        .map(|row| {
            let endpoint = endpoint_from_row(row)?;
            let hash: &[u8] = row.try_get(10).map_err(|e| corrupt("token hash", e))?;
            Ok(EndpointExport {
                tenant: tenant.clone(),
                tokens: tokens.remove(endpoint.id.as_str()).unwrap_or_default(),
                endpoint,
                token_hash: hash_from(hash)?,
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
