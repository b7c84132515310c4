//! The store's identity, readiness, and small durable settings.

use crate::error::{db, pool};
use crate::Inner;
use epr_core::ports::StoreError;
use tokio_postgres::Client;

/// This database's store ID, made once by the first process that opens it.
pub(crate) async fn store_id(client: &Client) -> Result<String, StoreError> {
    let fresh = uuid::Uuid::new_v4().to_string();
    client
        .execute(
            "INSERT INTO store_meta(key, value) VALUES('store_id', $1) ON CONFLICT DO NOTHING",
            &[&fresh],
        )
        .await
        .map_err(db)?;
    let row = client
        .query_one("SELECT value FROM store_meta WHERE key='store_id'", &[])
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

/// Readiness: a connection answers a query.
pub(crate) async fn ping(inner: &Inner) -> Result<(), StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    client.simple_query("SELECT 1").await.map_err(db)?;
    Ok(())
}

pub(crate) async fn get(inner: &Inner, key: &str) -> Result<Option<String>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let row = client
        .query_opt("SELECT value FROM settings WHERE key=$1", &[&key])
        .await
        .map_err(db)?;
    Ok(row.map(|r| r.get(0)))
}

pub(crate) async fn put(inner: &Inner, key: &str, value: &str) -> Result<(), StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    client
        .execute(
            "INSERT INTO settings(key, value, updated) VALUES($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET value=EXCLUDED.value, updated=EXCLUDED.updated",
            &[&key, &value, &now],
        )
        .await
        .map_err(db)?;
    Ok(())
}
