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

/// Tables whose plans depend on statistics.
const ANALYZED: &[&str] = &[
    "endpoints",
    "tokens",
    "claim_tokens",
    "endpoint_values",
    "filter_matches",
    "outbox",
];

/// Analyzes each table once it holds 1,000 rows and was never analyzed, then ends. A new
/// database otherwise runs on plans made without statistics until autovacuum's first visit
/// (up to a minute), and they can be very wrong (a range scan per lookup); autovacuum keeps
/// the statistics current after that. Harmless when several replicas do it.
pub(crate) async fn first_statistics(
    pool: deadpool_postgres::Pool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut pending: Vec<&str> = ANALYZED.to_vec();
    while !pending.is_empty() && !*stop.borrow() {
        if let Ok(client) = pool.get().await {
            let rows = client
                .query(
                    "SELECT relname::text, (coalesce(last_analyze, last_autoanalyze) IS NOT NULL), \
                     n_live_tup + n_mod_since_analyze FROM pg_stat_user_tables \
                     WHERE relname = ANY($1)",
                    &[&pending],
                )
                .await
                .unwrap_or_default();
            for row in rows {
                let (table, analyzed, rows): (String, bool, i64) =
                    (row.get(0), row.get(1), row.get(2));
                if analyzed {
                    pending.retain(|t| *t != table);
                } else if rows >= 1_000 {
                    // The table name comes from the constant list above, not from input.
                    if client
                        .batch_execute(&format!("ANALYZE {table}"))
                        .await
                        .is_ok()
                    {
                        tracing::debug!(table, rows, "first statistics gathered");
                        pending.retain(|t| *t != table);
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            _ = stop.changed() => {}
        }
    }
}
