//! Saved filters (slice B): filter commands, reads, the compiled filter cache that writers
//! match endpoints against, stored membership, and the back-fill worker with its lease.
//!
//! STUB: to be implemented. The signatures below are what lib.rs and write.rs use.

use crate::Inner;
use epr_core::command::{Effect, WriteCtx};
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::{EndpointFilter, FilterCommand, FilterId};
use epr_core::event::OutboxEvent;
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::ports::{ImportOutcome, StoreError};
use epr_core::query::{Page, PageRequest};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_postgres::Transaction;

/// Every application's compiled filters, as last read, with the `app_filters` version they
/// were read at. Shared by the writer tasks.
#[derive(Default)]
pub(crate) struct FilterCache {}

/// One application's filters at one version.
pub(crate) struct AppFilters {}

/// One membership change a write causes (before it is stored: whether the row really
/// changes decides whether an event is emitted).
#[derive(Debug, Clone)]
pub(crate) struct MatchChange {
    pub(crate) filter_id: FilterId,
    pub(crate) filter_name: String,
    /// Active filters emit `ep-matched`/`ep-unmatched`; pending ones change silently.
    pub(crate) active: bool,
    pub(crate) incarnation: i64,
    pub(crate) endpoint_id: EndpointId,
    pub(crate) app_version: AppVersionName,
    /// Now a member (insert) or not (delete).
    pub(crate) matched: bool,
}

impl FilterCache {
    /// The application's current filters. Called inside a writer transaction that holds
    /// the application's *shared* advisory lock (`crate::app_lock_key`): reads the
    /// application's `app_filters` version and reloads the filters when it differs from
    /// the cached copy.
    pub(crate) async fn current(
        &self,
        tx: &Transaction<'_>,
        tenant: &TenantId,
        app: &AppName,
    ) -> Result<Arc<AppFilters>, StoreError> {
        let _ = (tx, tenant, app);
        unimplemented!("slice B")
    }
}

impl AppFilters {
    pub(crate) fn is_empty(&self) -> bool {
        unimplemented!("slice B")
    }

    /// The membership changes of one endpoint write (pure): `old` is the state before the
    /// write, `changed_keys` the metadata keys a metadata write changed (filters that read
    /// none of them are skipped).
    pub(crate) fn evaluate(
        &self,
        effect: &Effect,
        old: Option<&Endpoint>,
        changed_keys: Option<&BTreeSet<&str>>,
    ) -> Vec<MatchChange> {
        let _ = (effect, old, changed_keys);
        unimplemented!("slice B")
    }
}

/// Stores membership changes inside the writer's transaction; rows that did not change
/// (a pending filter that has not seen the endpoint yet) emit nothing. Counts go to the
/// writer's counter `shard`. Returns `ep-matched` / `ep-unmatched` events for active
/// filters, in the order of `changes`.
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    app: &AppName,
    changes: &[MatchChange],
    ctx: &WriteCtx,
    shard: i16,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let _ = (tx, tenant, app, changes, ctx, shard);
    unimplemented!("slice B")
}

/// Stores an imported filter as a new pending filter (see `Store::import`), inside the
/// importing transaction, which holds the application's exclusive lock.
pub(crate) async fn import_filter(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    filter: &EndpointFilter,
) -> Result<ImportOutcome, StoreError> {
    let _ = (tx, tenant, filter);
    unimplemented!("slice B")
}

/// Starts the back-fill worker.
pub(crate) fn start(inner: &Arc<Inner>) -> Vec<JoinHandle<()>> {
    let _ = inner;
    Vec::new()
}

pub(crate) async fn execute(
    inner: &Inner,
    cmd: FilterCommand,
    ctx: WriteCtx,
) -> Result<EndpointFilter, StoreError> {
    let _ = (inner, cmd, ctx);
    unimplemented!("slice B")
}

pub(crate) async fn get(
    inner: &Inner,
    tenant: &TenantId,
    id: &FilterId,
) -> Result<Option<EndpointFilter>, StoreError> {
    let _ = (inner, tenant, id);
    unimplemented!("slice B")
}

pub(crate) async fn list(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    name: Option<&str>,
    page: PageRequest,
) -> Result<Page<EndpointFilter>, StoreError> {
    let _ = (inner, tenant, app, name, page);
    unimplemented!("slice B")
}

pub(crate) async fn matched_filters(
    inner: &Inner,
    tenant: &TenantId,
    endpoints: &[EndpointId],
) -> Result<BTreeMap<EndpointId, Vec<FilterId>>, StoreError> {
    let _ = (inner, tenant, endpoints);
    unimplemented!("slice B")
}

pub(crate) async fn members(
    inner: &Inner,
    tenant: &TenantId,
    id: &FilterId,
) -> Result<Vec<(AppVersionName, EndpointId)>, StoreError> {
    let _ = (inner, tenant, id);
    unimplemented!("slice B")
}
