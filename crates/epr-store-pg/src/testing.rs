//! Test support: a fresh database per test on a shared PostgreSQL server, dropped after.

use tokio_postgres::NoTls;

/// A database created for one test. [`TestDb::drop_db`] removes it; databases a crashed
/// run left behind are removed by the next run's [`TestDb::create`] once they are an hour old.
pub struct TestDb {
    /// The server's maintenance URL (the `postgres` database).
    admin_url: String,
    pub name: String,
    /// The URL of the test database.
    pub url: String,
}

/// `EPR_TEST_DATABASE_URL`, set by `scripts/services-up.sh`. Tests that need PostgreSQL
/// fail (they are never skipped) when it is missing.
pub fn admin_url() -> String {
    std::env::var("EPR_TEST_DATABASE_URL").expect(
        "EPR_TEST_DATABASE_URL is not set: run the tests through scripts/test.sh, or \
         eval \"$(scripts/services-up.sh)\" first",
    )
}

impl TestDb {
    /// Creates `epr_test_<random>` on the server of `EPR_TEST_DATABASE_URL`.
    pub async fn create() -> Self {
        let admin_url = admin_url();
        let name = format!("epr_test_{}", uuid::Uuid::new_v4().simple());
        let client = admin(&admin_url).await;
        // Leftovers of killed runs (the name carries no time: use the catalog's).
        let stale = client
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'epr_test_%' \
                 AND (pg_stat_file('base/'||oid||'/PG_VERSION')).modification \
                     < now() - interval '1 hour'",
                &[],
            )
            .await
            .unwrap_or_default();
        for row in stale {
            let old: String = row.get(0);
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{old}\" WITH (FORCE)"))
                .await;
        }
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("creating a test database");
        let url = with_database(&admin_url, &name);
        Self {
            admin_url,
            name,
            url,
        }
    }

    /// Drops the database (closing its connections).
    pub async fn drop_db(self) {
        let client = admin(&self.admin_url).await;
        let _ = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// `url` with its database replaced by `db` (URL form: `postgres://…/db?…`).
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}
