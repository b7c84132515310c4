//! The outbox across replicas (slice D): relay leadership, sequencing, LISTEN/NOTIFY
//! wake-ups, pending/ack/depth.
//!
//! STUB: to be implemented.

use crate::{Inner, PgConfig};
use epr_core::ports::{OutboxEntry, OutboxWaker, StoreError};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// The channel writers `NOTIFY` (inside their transaction) after appending events.
pub(crate) const NOTIFY_CHANNEL: &str = "epr_outbox";

pub(crate) struct Outbox {}

impl Outbox {
    pub(crate) fn new(cfg: &PgConfig) -> Self {
        let _ = cfg;
        Self {}
    }

    pub(crate) fn set_waker(&self, waker: OutboxWaker) {
        let _ = waker;
    }

    /// Wakes this process's relay (after a local commit that appended events).
    pub(crate) fn wake(&self) {}
}

/// Starts the leadership / LISTEN task.
pub(crate) fn start(inner: &Arc<Inner>) -> Vec<JoinHandle<()>> {
    let _ = inner;
    Vec::new()
}

pub(crate) async fn pending(
    inner: &Inner,
    after: i64,
    limit: usize,
) -> Result<Vec<OutboxEntry>, StoreError> {
    let _ = (inner, after, limit);
    unimplemented!("slice D")
}

pub(crate) async fn ack_through(inner: &Inner, last_id: i64) -> Result<(), StoreError> {
    let _ = (inner, last_id);
    unimplemented!("slice D")
}

pub(crate) async fn depth(inner: &Inner) -> Result<u64, StoreError> {
    let _ = inner;
    unimplemented!("slice D")
}
