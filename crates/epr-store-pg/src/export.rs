//! Export reads (slice D) and import (delegated to the write path).
//!
//! STUB: to be implemented.

use crate::Inner;
use epr_core::endpoint_filter::EndpointFilter;
use epr_core::ids::TenantId;
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, StoreError};

pub(crate) async fn tenants(inner: &Inner) -> Result<Vec<TenantId>, StoreError> {
    let _ = inner;
    unimplemented!("slice D")
}

pub(crate) async fn endpoints(
    inner: &Inner,
    tenant: &TenantId,
    after: i64,
    limit: usize,
) -> Result<Vec<EndpointExport>, StoreError> {
    let _ = (inner, tenant, after, limit);
    unimplemented!("slice D")
}

pub(crate) async fn filters(
    inner: &Inner,
    tenant: &TenantId,
) -> Result<Vec<EndpointFilter>, StoreError> {
    let _ = (inner, tenant);
    unimplemented!("slice D")
}

pub(crate) async fn import(
    inner: &Inner,
    records: Vec<ImportRecord>,
) -> Result<Vec<ImportOutcome>, StoreError> {
    crate::write::import(inner, records).await
}
