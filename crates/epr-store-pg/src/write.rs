//! The write path (slice A): group-committing writer tasks, endpoint commands, batch
//! registration, endpoint reads by ID, batch outcomes, and import.
//!
//! STUB: to be implemented. The signatures below are what lib.rs and the other modules use.

use crate::{Inner, PgConfig};
use epr_core::command::{Command, Effect, WriteCtx};
use epr_core::endpoint::Endpoint;
use epr_core::ids::{AppName, EndpointId, TenantId};
use epr_core::ports::{BatchOutcome, BatchRequest, ImportOutcome, ImportRecord, StoreError};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// The writers' queues (one per writer task; commands are routed by endpoint ID).
pub(crate) struct Writer {}

impl Writer {
    pub(crate) fn new(cfg: &PgConfig) -> Self {
        let _ = cfg;
        Self {}
    }
}

/// Starts the writer tasks.
pub(crate) fn start(inner: &Arc<Inner>) -> Vec<JoinHandle<()>> {
    let _ = inner;
    Vec::new()
}

/// Stops accepting commands and waits until every accepted one has been answered.
pub(crate) async fn drain(inner: &Inner) {
    let _ = inner;
}

pub(crate) async fn execute(
    inner: &Inner,
    cmd: Command,
    ctx: WriteCtx,
) -> Result<Effect, StoreError> {
    let _ = (inner, cmd, ctx);
    unimplemented!("slice A")
}

pub(crate) async fn register_batch(
    inner: &Inner,
    batch: BatchRequest,
    ctx: WriteCtx,
) -> Result<BatchOutcome, StoreError> {
    let _ = (inner, batch, ctx);
    unimplemented!("slice A")
}

pub(crate) async fn get(
    inner: &Inner,
    tenant: &TenantId,
    id: &EndpointId,
) -> Result<Option<Endpoint>, StoreError> {
    let _ = (inner, tenant, id);
    unimplemented!("slice A")
}

pub(crate) async fn batch_outcome(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    task_id: &str,
) -> Result<Option<BatchOutcome>, StoreError> {
    let _ = (inner, tenant, app, task_id);
    unimplemented!("slice A")
}

/// See `Store::import`.
pub(crate) async fn import(
    inner: &Inner,
    records: Vec<ImportRecord>,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let _ = (inner, records);
    unimplemented!("slice A")
}
