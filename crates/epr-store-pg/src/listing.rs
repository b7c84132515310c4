//! Listing endpoints (slice C): `EndpointQuery` as SQL over the endpoints table (jsonb
//! metadata), exact totals, offset and keyset (cursor) paging, metadata keys per version.
//!
//! STUB: to be implemented.

use crate::Inner;
use epr_core::endpoint::Endpoint;
use epr_core::ids::{AppName, TenantId};
use epr_core::ports::StoreError;
use epr_core::query::{EndpointQuery, Page, PageRequest};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) async fn list(
    inner: &Inner,
    tenant: &TenantId,
    query: &EndpointQuery,
    page: PageRequest,
) -> Result<Page<Endpoint>, StoreError> {
    let _ = (inner, tenant, query, page);
    unimplemented!("slice C")
}

pub(crate) async fn metadata_keys(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
    let _ = (inner, tenant, app);
    unimplemented!("slice C")
}
