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
    // Each version once, by whichever run got its lock first.
    let mut all: Vec<i32> = applied.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=schema::latest()).collect::<Vec<_>>(),
        "{applied:?}"
    );
    let c = connect(&db.url).await;
    let versions: Vec<i32> = c
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=schema::latest()).collect::<Vec<_>>());

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
    assert_eq!(n, i64::from(schema::latest()));
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

/// A database at version 1 (one token per endpoint, no states) upgrades in place: every
/// token keeps its endpoint and hash, and gets an ID of its own and the state `Inactive`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_upgrades_keeping_its_tokens() {
    use epr_core::credentials::{TokenListQuery, TokenStatus};
    use epr_core::ids::{AppName, EndpointId, EndpointToken, TenantId};
    use epr_core::query::PageRequest;

    let db = TestDb::create().await;
    let mut c = connect(&db.url).await;
    assert_eq!(schema::migrate_to(&mut c, 1).await.unwrap(), [1]);
    let app = AppName::parse("app").unwrap();
    let hash = |t: &str| EndpointToken::parse(t).unwrap().hash(&app);
    // Rows as a version-1 build wrote them.
    for (i, ep) in ["ep-1", "ep-2"].iter().enumerate() {
        let h = hash(&format!("tok-{ep}"));
        c.execute(
            "INSERT INTO endpoints(tenant, endpoint_id, incarnation, app, app_version, \
             app_version_registered, created, metadata, metadata_updated, version, \
             metadata_version, token_hash) \
             VALUES('t1', $1, $2, 'app', 'app-v1', 1000, 1000, '{\"a\":1}', NULL, 1, 1, $3)",
            &[ep, &(i as i64 + 1), &&h.0[..]],
        )
        .await
        .unwrap();
        c.execute(
            "INSERT INTO tokens(tenant, app, token_hash, endpoint_id, created) \
             VALUES('t1', 'app', $1, $2, 1000)",
            &[&&h.0[..], ep],
        )
        .await
        .unwrap();
    }
    // A store of this build refuses the old schema without migrating, then upgrades it.
    let mut cfg = config(&db.url);
    cfg.migrate = false;
    assert!(PgStore::open(cfg).await.is_err());
    let s = open(&db.url).await;
    let tenant = TenantId::parse("t1").unwrap();
    let mut ids = Vec::new();
    for ep in ["ep-1", "ep-2"] {
        let found = s
            .find_token(&tenant, &app, &hash(&format!("tok-{ep}")))
            .await
            .unwrap()
            .expect("the token survived the upgrade");
        assert_eq!(found.endpoint_id.as_str(), ep);
        assert_eq!(found.status, TokenStatus::Inactive);
        assert_eq!(found.updated, None);
        assert_eq!(found.created.0, 1000);
        assert!(
            uuid::Uuid::parse_str(found.id.as_str()).is_ok(),
            "{}",
            found.id
        );
        let listed = s
            .list_tokens(
                &tenant,
                &EndpointId::parse(ep).unwrap(),
                &TokenListQuery::default(),
                PageRequest::new(0, 10),
            )
            .await
            .unwrap();
        assert_eq!(listed.items, std::slice::from_ref(&found));
        ids.push(found.id);
    }
    assert_ne!(ids[0], ids[1], "an ID of its own each");
    // The new index replaced the old one; the new tables are there.
    let indexes: Vec<String> = c
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'tokens' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        ["tokens_by_endpoint_created", "tokens_by_id", "tokens_pkey"]
    );
    for table in ["claim_tokens", "rejections"] {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
    // A replica of the previous version, still running during a rolling upgrade, inserts
    // its registrations' tokens as before: they get an ID and the first state.
    c.execute(
        "INSERT INTO tokens(tenant, app, token_hash, endpoint_id, created) \
         VALUES('t1', 'app', $1, 'ep-3', 2000)",
        &[&&hash("tok-ep-3").0[..]],
    )
    .await
    .expect("an insert of the previous version's shape");
    let old_shape = s
        .find_token(&tenant, &app, &hash("tok-ep-3"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(old_shape.status, TokenStatus::Inactive);
    assert!(uuid::Uuid::parse_str(old_shape.id.as_str()).is_ok());
    // An unknown state cannot be stored.
    let bad = c
        .execute("UPDATE tokens SET status = 'Lost'", &[])
        .await
        .unwrap_err();
    assert_eq!(
        bad.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );
    s.shutdown().await;
    db.drop_db().await;
}
