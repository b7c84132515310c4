//! Fresh PostgreSQL databases for the `--pg-url` servers.

use anyhow::{Context, Result};

/// Creates database `name` on the server of `admin_url`, after dropping the databases of
/// earlier runs (`epr_bench_*`, any run: benches do not run at once); returns its URL.
pub async fn create(admin_url: &str, name: &str) -> Result<String> {
    let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {admin_url}"))?;
    tokio::spawn(conn);
    let old = client
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'epr\\_bench\\_%'",
            &[],
        )
        .await?;
    for row in old {
        let old: String = row.get(0);
        if !name.starts_with(old.split("_pg").next().unwrap_or_default()) {
            // Separate statements: CREATE/DROP DATABASE cannot run in a transaction block.
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{old}\" WITH (FORCE)"))
                .await?;
        }
    }
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .with_context(|| format!("creating database {name}"))?;
    eprintln!("postgres: database {name} created (dropped by the next bench run)");
    Ok(epr_store_pg::testing::with_database(admin_url, name))
}

/// `CHECKPOINT` on the server: dirty buffers written and synced now, not during the next
/// measurement.
pub async fn checkpoint(admin_url: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {admin_url}"))?;
    tokio::spawn(conn);
    client.batch_execute("CHECKPOINT").await?;
    Ok(())
}
