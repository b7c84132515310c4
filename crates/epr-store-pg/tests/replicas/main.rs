//! Store-level tests of what several replicas share: the outbox leadership and sequencing,
//! export reads, migrations, and surviving a database restart. Each test makes its own
//! database (or, to restart it, its own server); rows other slices write are inserted with
//! SQL, in the stored shapes.

mod export;
mod migrations;
mod outbox;
mod resilience;

use epr_core::ports::Store;
use epr_store_pg::{PgConfig, PgStore};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

/// A small store: these tests need few connections.
pub fn config(url: &str) -> PgConfig {
    let mut cfg = PgConfig::new(url);
    cfg.pool_size = 3;
    cfg.writers = 1;
    cfg.connect_timeout = Duration::from_secs(2);
    cfg
}

pub async fn open(url: &str) -> PgStore {
    PgStore::open(config(url)).await.expect("the store opens")
}

/// A plain connection of the test's own.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connecting to the test database");
    tokio::spawn(conn);
    client
}

/// Waits until `cond` holds, at most `limit`; answers whether it did.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the outbox as a relay does: from `after`, everything there is.
pub async fn drain(s: &dyn Store, mut after: i64) -> Vec<epr_core::ports::OutboxEntry> {
    let mut all = Vec::new();
    loop {
        let batch = s.outbox_pending(after, 7).await.expect("outbox_pending");
        let Some(last) = batch.last() else {
            return all;
        };
        after = last.id;
        all.extend(batch);
    }
}
