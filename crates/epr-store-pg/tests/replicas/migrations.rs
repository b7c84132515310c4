//! Migrations: concurrent starts apply each version once; a newer database and an
//! unmigrated one are refused with a message that says what to do.

use crate::{config, connect, open};
use epr_core::ports::{Store, StoreError};
use epr_store_pg::testing::TestDb;
use epr_store_pg::{schema, PgStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_each_version_once() {
    let db = TestDb::create().await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        runs.push(tokio::spawn(async move {
            let mut c = connect(&url).await;
            schema::migrate(&mut c).await
        }));
    }
    let mut applied = Vec::new();
    for r in runs {
        applied.push(
            r.await
                .unwrap()
                .expect("every concurrent migration succeeds"),
        );
    }
    let applied_v1 = applied.iter().filter(|a| a.as_slice() == [1]).count();
    assert_eq!(applied_v1, 1, "{applied:?}");
    assert!(applied.iter().all(|a| a.is_empty() || a.as_slice() == [1]));
    let c = connect(&db.url).await;
    let versions: Vec<i32> = c
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [schema::latest()]);

    // Replicas opening at once agree on the store ID.
    let (s1, s2) = tokio::join!(open(&db.url), open(&db.url));
    assert_eq!(s1.store_id(), s2.store_id());
    s1.shutdown().await;
    s2.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_of_a_fresh_database_all_succeed() {
    let db = TestDb::create().await;
    let opened = futures_util::future::join_all((0..4).map(|_| open(&db.url))).await;
    let ids: Vec<String> = opened.iter().map(|s| s.store_id()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    for s in opened {
        s.shutdown().await;
    }
    let c = connect(&db.url).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_newer_than_this_build_is_refused() {
    let db = TestDb::create().await;
    let mut c = connect(&db.url).await;
    schema::migrate(&mut c).await.unwrap();
    let newer = schema::latest() + 1;
    c.execute("INSERT INTO schema_version(version) VALUES($1)", &[&newer])
        .await
        .unwrap();
    let refused = schema::migrate(&mut c).await.unwrap_err().to_string();
    assert!(
        refused.contains(&format!("schema version {newer}")) && refused.contains("upgrade"),
        "{refused}"
    );
    let opened = PgStore::open(config(&db.url)).await;
    assert!(matches!(opened, Err(StoreError::Unavailable(_))));
    let mut cfg = config(&db.url);
    cfg.migrate = false;
    let Err(e) = PgStore::open(cfg).await else {
        panic!("opened a database newer than this build without migrating");
    };
    assert!(
        e.to_string().contains(&format!("version {newer}")) && e.to_string().contains("upgrade"),
        "{e}"
    );
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_migrations_an_unmigrated_database_is_refused() {
    let db = TestDb::create().await;
    let mut cfg = config(&db.url);
    cfg.migrate = false;
    let Err(e) = PgStore::open(cfg.clone()).await else {
        panic!("opened an empty database without migrating");
    };
    assert!(matches!(e, StoreError::Unavailable(_)));
    assert!(e.to_string().contains("run `epr migrate`"), "{e}");
    // Nothing was created.
    let c = connect(&db.url).await;
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
    // Once migrated, the same configuration opens it.
    let mut client = connect(&db.url).await;
    schema::migrate(&mut client).await.unwrap();
    let s = PgStore::open(cfg).await.expect("a migrated database opens");
    s.ping().await.unwrap();
    s.shutdown().await;
    db.drop_db().await;
}
