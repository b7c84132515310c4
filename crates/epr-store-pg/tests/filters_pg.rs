//! Saved filters on PostgreSQL, through the `Store` trait, with endpoint rows written by SQL
//! (as a registration leaves them) so that filters are tested apart from the write path:
//! lifecycle, reads, commands and their errors, back-fill and its lease across replicas.

use epr_core::endpoint::Precondition;
use epr_core::endpoint_filter::{
    EndpointFilter, FilterCommand, FilterId, FilterPatch, FilterSpec, FilterStatus,
};
use epr_core::event::{FilterEvent, FilterEventKind, OutboxEvent};
use epr_core::filter::Filter;
use epr_core::ids::{AppName, EndpointId, TenantId};
use epr_core::metadata::Limits;
use epr_core::ports::{Store, StoreError};
use epr_core::query::PageRequest;
use epr_core::{command::WriteCtx, DomainError, Timestamp};
use epr_store_pg::testing::TestDb;
use epr_store_pg::{PgConfig, PgStore};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_postgres::NoTls;

fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

fn app(a: &str) -> AppName {
    AppName::parse(a).unwrap()
}

fn fid(f: &str) -> FilterId {
    FilterId::parse(f).unwrap()
}

fn ctx(t: &str, corr: &str) -> WriteCtx {
    WriteCtx {
        tenant: tenant(t),
        now: Timestamp(1_700_000_000_000),
        correlation_id: corr.into(),
        limits: Limits::default(),
    }
}

fn config(url: &str) -> PgConfig {
    let mut cfg = PgConfig::new(url);
    cfg.pool_size = 4;
    cfg.backfill = epr_store::BackfillPace {
        step: Duration::ZERO,
        batch: 2,
        pause: Duration::ZERO,
    };
    cfg
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// An endpoint row as a registration leaves it (nothing else: no matching, no events).
async fn insert_endpoint(db: &tokio_postgres::Client, t: &str, id: &str, version: &str, md: Value) {
    let app = version.rsplit_once('-').unwrap().0;
    db.execute(
        "INSERT INTO endpoints(tenant, endpoint_id, incarnation, app, app_version, \
         app_version_registered, created, metadata, metadata_updated, version, \
         metadata_version, token_hash) \
         VALUES($1, $2, nextval('endpoint_incarnation'), $3, $4, 1, 1, $5, NULL, 1, 1, $6)",
        &[&t, &id, &app, &version, &md, &id.as_bytes()],
    )
    .await
    .unwrap();
}

fn create_cmd(app_name: &str, id: &str, name: &str, query: Value) -> FilterCommand {
    FilterCommand::Create {
        id: fid(id),
        app: app(app_name),
        spec: FilterSpec::parse(name, "", &query).unwrap(),
    }
}

async fn create(s: &PgStore, t: &str, app_name: &str, id: &str, query: Value) -> EndpointFilter {
    s.execute_filter(
        create_cmd(app_name, id, &format!("name of {id}"), query),
        ctx(t, &format!("create-{id}")),
    )
    .await
    .expect("filter created")
}

async fn wait_active(s: &PgStore, t: &str, id: &str, within: Duration) -> EndpointFilter {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let f = s.get_filter(&tenant(t), &fid(id)).await.unwrap().unwrap();
        if f.status == FilterStatus::Active {
            return f;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "filter {id} did not turn active in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn members(s: &PgStore, t: &str, id: &str) -> Vec<String> {
    s.filter_members(&tenant(t), &fid(id))
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.to_string())
        .collect()
}

/// The filter events in the outbox, in order (read directly: the relay is another slice).
async fn filter_events(db: &tokio_postgres::Client) -> Vec<FilterEvent> {
    db.query("SELECT event FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .filter_map(
            |r| match epr_store::codec::decode_outbox(r.get(0)).unwrap() {
                OutboxEvent::Filter(f) => Some(f),
                OutboxEvent::Endpoint(_) | OutboxEvent::Token(_) => None,
            },
        )
        .collect()
}

fn kind_of(e: &FilterEvent) -> String {
    match &e.kind {
        FilterEventKind::Pending => format!("{} pending", e.filter_id),
        FilterEventKind::Activated => format!("{} activated", e.filter_id),
        FilterEventKind::Deleted => format!("{} deleted", e.filter_id),
        FilterEventKind::EndpointMatched { endpoint_id, .. } => {
            format!("{} +{endpoint_id}", e.filter_id)
        }
        FilterEventKind::EndpointUnmatched { endpoint_id, .. } => {
            format!("{} -{endpoint_id}", e.filter_id)
        }
    }
}

fn rejected(r: Result<EndpointFilter, StoreError>) -> DomainError {
    match r {
        Err(StoreError::Rejected(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const PAGE: PageRequest = PageRequest {
    offset: 0,
    limit: 10,
    after: None,
};

fn kyiv() -> Value {
    json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_reads() {
    let tdb = TestDb::create().await;
    let s = PgStore::open(config(&tdb.url)).await.unwrap();
    let db = sql(&tdb.url).await;
    for (i, city) in ["Kyiv", "Lviv", "Kyiv", "Odesa", "Kyiv"].iter().enumerate() {
        insert_endpoint(
            &db,
            "t1",
            &format!("ep-{i}"),
            "app-v1",
            json!({ "city": city }),
        )
        .await;
    }
    insert_endpoint(&db, "t1", "other-0", "other-v1", json!({"city": "Kyiv"})).await;
    insert_endpoint(&db, "t2", "ep-0", "app-v1", json!({"city": "Kyiv"})).await;

    let f = create(&s, "t1", "app", "f1", kyiv()).await;
    assert_eq!(f.status, FilterStatus::Pending);
    assert_eq!((f.version, f.matched), (1, 0));
    let f = wait_active(&s, "t1", "f1", Duration::from_secs(20)).await;
    assert_eq!(
        f.matched, 3,
        "only the tenant's application's own endpoints"
    );
    assert_eq!(f.spec.query, *kyiv().as_object().unwrap());
    assert_eq!(members(&s, "t1", "f1").await, ["ep-0", "ep-2", "ep-4"]);
    let matched = s
        .matched_filters(
            &tenant("t1"),
            &[
                EndpointId::parse("ep-0").unwrap(),
                EndpointId::parse("ep-1").unwrap(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(matched.len(), 1);
    assert_eq!(
        matched[&EndpointId::parse("ep-0").unwrap()],
        vec![fid("f1")]
    );
    // Other tenants see nothing of it.
    assert!(s
        .get_filter(&tenant("t2"), &fid("f1"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .matched_filters(&tenant("t2"), &[EndpointId::parse("ep-0").unwrap()])
        .await
        .unwrap()
        .is_empty());
    // A pending filter is not in `matched_filters`.
    create(
        &s,
        "t1",
        "app",
        "f0",
        json!({"application_version": "app-v1"}),
    )
    .await;
    let listed = s
        .list_filters(&tenant("t1"), &app("app"), None, PAGE)
        .await
        .unwrap();
    assert_eq!(listed.total, 2);
    let ids: Vec<&str> = listed.items.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["f0", "f1"], "same creation time: by ID");
    let by_name = s
        .list_filters(&tenant("t1"), &app("app"), Some("name of f1"), PAGE)
        .await
        .unwrap();
    assert_eq!((by_name.total, by_name.items[0].matched), (1, 3));
    let second = s
        .list_filters(
            &tenant("t1"),
            &app("app"),
            None,
            PageRequest {
                offset: 1,
                limit: 1,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!((second.total, second.items.len()), (2, 1));
    assert_eq!(second.items[0].id.as_str(), "f1");
    wait_active(&s, "t1", "f0", Duration::from_secs(20)).await;

    let events = filter_events(&db).await;
    let kinds: Vec<String> = events.iter().map(kind_of).collect();
    assert_eq!(
        kinds,
        ["f1 pending", "f1 activated", "f0 pending", "f0 activated"]
    );
    assert!(events[..2].iter().all(|e| e.correlation_id == "create-f1"
        && e.filter_name == "name of f1"
        && e.app.as_str() == "app"));
    s.shutdown().await;
    tdb.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_delete() {
    let tdb = TestDb::create().await;
    let s = PgStore::open(config(&tdb.url)).await.unwrap();
    let db = sql(&tdb.url).await;
    for (i, city) in ["Kyiv", "Lviv"].iter().enumerate() {
        insert_endpoint(
            &db,
            "t1",
            &format!("ep-{i}"),
            "app-v1",
            json!({ "city": city }),
        )
        .await;
    }
    create(&s, "t1", "app", "f1", kyiv()).await;
    let f = wait_active(&s, "t1", "f1", Duration::from_secs(20)).await;
    let update = |patch: FilterPatch, pre: Precondition| FilterCommand::Update {
        id: fid("f1"),
        app: app("app"),
        patch,
        precondition: pre,
    };
    let renamed = s
        .execute_filter(
            update(
                FilterPatch::parse(Some("renamed"), None, None).unwrap(),
                Precondition::OneOf(vec![f.etag()]),
            ),
            ctx("t1", "c"),
        )
        .await
        .unwrap();
    assert_eq!((renamed.status, renamed.matched), (FilterStatus::Active, 1));
    assert_ne!(renamed.etag(), f.etag());
    let stored = s
        .get_filter(&tenant("t1"), &fid("f1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.spec.name.as_str(), stored.version), ("renamed", 2));
    // The same definition again changes nothing.
    let same = s
        .execute_filter(
            update(
                FilterPatch::parse(Some("renamed"), None, None).unwrap(),
                Precondition::None,
            ),
            ctx("t1", "c"),
        )
        .await
        .unwrap();
    assert_eq!(same.version, 2);
    let stale = s
        .execute_filter(
            update(
                FilterPatch::parse(Some("again"), None, None).unwrap(),
                Precondition::OneOf(vec![f.etag()]),
            ),
            ctx("t1", "c"),
        )
        .await;
    assert!(matches!(
        rejected(stale),
        DomainError::PreconditionFailed { .. }
    ));
    // Names are unique per application (the embedded store's message), IDs per tenant.
    let dup = s
        .execute_filter(
            create_cmd("app", "f2", "renamed", json!({})),
            ctx("t1", "c"),
        )
        .await;
    match rejected(dup) {
        DomainError::Conflict { field, message } => {
            assert_eq!(field, "name");
            assert_eq!(
                message,
                "application 'app' already has a filter named 'renamed' ('f1')"
            );
        }
        other => panic!("{other:?}"),
    }
    s.execute_filter(
        create_cmd("other", "f3", "renamed", json!({})),
        ctx("t1", "c"),
    )
    .await
    .unwrap();
    let same_id = s
        .execute_filter(create_cmd("other", "f1", "x", json!({})), ctx("t1", "c"))
        .await;
    assert!(matches!(
        rejected(same_id),
        DomainError::Conflict {
            field: "filterId",
            ..
        }
    ));
    let foreign = s
        .execute_filter(
            FilterCommand::Delete {
                id: fid("f1"),
                app: app("other"),
                precondition: Precondition::None,
            },
            ctx("t1", "c"),
        )
        .await;
    assert!(matches!(rejected(foreign), DomainError::NotFound { .. }));
    // A new query: pending again, membership rebuilt by a new back-fill.
    let lviv = json!({"metadata": {"$elemMatch": {"key": "city", "value": "Lviv"}}});
    let changed = s
        .execute_filter(
            update(
                FilterPatch::parse(None, None, Some(&lviv)).unwrap(),
                Precondition::None,
            ),
            ctx("t1", "requery"),
        )
        .await
        .unwrap();
    assert_eq!(
        (changed.status, changed.matched),
        (FilterStatus::Pending, 0)
    );
    let f = wait_active(&s, "t1", "f1", Duration::from_secs(20)).await;
    assert_eq!(f.matched, 1);
    assert_eq!(members(&s, "t1", "f1").await, ["ep-1"]);
    let deleted = s
        .execute_filter(
            FilterCommand::Delete {
                id: fid("f1"),
                app: app("app"),
                precondition: Precondition::Any,
            },
            ctx("t1", "c"),
        )
        .await
        .unwrap();
    assert_eq!((deleted.id.as_str(), deleted.matched), ("f1", 1));
    assert!(s
        .get_filter(&tenant("t1"), &fid("f1"))
        .await
        .unwrap()
        .is_none());
    assert!(members(&s, "t1", "f1").await.is_empty());
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM filter_counts WHERE filter_id='f1') \
                  + (SELECT count(*) FROM filter_matches WHERE filter_id='f1')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let events = filter_events(&db).await;
    let f1: Vec<&FilterEvent> = events
        .iter()
        .filter(|e| e.filter_id.as_str() == "f1")
        .collect();
    let kinds: Vec<String> = f1.iter().map(|e| kind_of(e)).collect();
    assert_eq!(
        kinds,
        [
            "f1 pending",
            "f1 activated",
            "f1 pending",
            "f1 activated",
            "f1 deleted"
        ]
    );
    assert_eq!(
        f1[3].correlation_id, "requery",
        "activated carries the request's ID"
    );
    assert_eq!(f1[3].filter_name, "renamed");
    s.shutdown().await;
    tdb.drop_db().await;
}

/// The endpoints of `app_name` the query matches, evaluated from the rows.
async fn reference(db: &tokio_postgres::Client, t: &str, app: &str, q: &Value) -> Vec<String> {
    let filter = Filter::parse(q).unwrap();
    db.query(
        "SELECT endpoint_id, app_version, metadata FROM endpoints \
         WHERE tenant=$1 AND app=$2 ORDER BY incarnation",
        &[&t, &app],
    )
    .await
    .unwrap()
    .iter()
    .filter(|r| {
        let md: Value = r.get(2);
        filter.matches(r.get(1), md.as_object().unwrap())
    })
    .map(|r| r.get(0))
    .collect()
}

async fn lease(db: &tokio_postgres::Client, id: &str) -> (Option<String>, Option<i64>, String) {
    let r = db
        .query_one(
            "SELECT backfill_owner, backfill_after, status FROM filters WHERE filter_id=$1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// A replica stopped in the middle of a back-fill hands it over; a replica that died keeps
/// it until its lease runs out; either way another replica finishes it, every endpoint is
/// evaluated, and `activated` is emitted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_lease_takeover() {
    let tdb = TestDb::create().await;
    let db = sql(&tdb.url).await;
    let slow = |url: &str| {
        let mut cfg = config(url);
        cfg.backfill = epr_store::BackfillPace {
            step: Duration::ZERO,
            batch: 1,
            pause: Duration::from_millis(50),
        };
        cfg.backfill_lease = Duration::from_millis(1500);
        cfg
    };
    let a = PgStore::open(slow(&tdb.url)).await.unwrap();
    for i in 0..30 {
        let city = ["Kyiv", "Lviv", "Odesa"][i % 3];
        insert_endpoint(
            &db,
            "t1",
            &format!("ep-{i:02}"),
            "app-v1",
            json!({ "city": city }),
        )
        .await;
    }
    create(&a, "t1", "app", "f1", kyiv()).await;
    // A gets going, then stops (gracefully: its lease is released).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (owner, after, _) = lease(&db, "f1").await;
        if owner.is_some() && after.unwrap_or(0) >= 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "A never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.shutdown().await;
    let (owner, after, status) = lease(&db, "f1").await;
    assert_eq!(
        (owner, status.as_str()),
        (None, "pending"),
        "released at shutdown"
    );
    let stopped_at = after.unwrap();
    assert!(
        (3..30).contains(&stopped_at),
        "stopped mid-way at {stopped_at}"
    );

    // Now pretend a replica that died holds it for another 1.5 s.
    db.execute(
        "UPDATE filters SET backfill_owner='dead-replica', \
         backfill_lease_until=now() + interval '1500 milliseconds' WHERE filter_id='f1'",
        &[],
    )
    .await
    .unwrap();
    let opened = std::time::Instant::now();
    let b = PgStore::open(config(&tdb.url)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (owner, after, _) = lease(&db, "f1").await;
    assert_eq!(
        owner.as_deref(),
        Some("dead-replica"),
        "a live lease is respected"
    );
    assert_eq!(after, Some(stopped_at));
    let f = wait_active(&b, "t1", "f1", Duration::from_secs(20)).await;
    assert!(
        opened.elapsed() >= Duration::from_millis(1000),
        "taken over only once expired"
    );
    let expected = reference(&db, "t1", "app", &kyiv()).await;
    assert_eq!(expected.len(), 10);
    assert_eq!(members(&b, "t1", "f1").await, expected);
    assert_eq!(f.matched, 10);
    let kinds: Vec<String> = filter_events(&db).await.iter().map(kind_of).collect();
    assert_eq!(kinds, ["f1 pending", "f1 activated"]);
    b.shutdown().await;
    tdb.drop_db().await;
}

/// Two live replicas: each pending filter is back-filled by one of them, completely, and
/// activated once; filters created on either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_backfills() {
    let tdb = TestDb::create().await;
    let db = sql(&tdb.url).await;
    let a = PgStore::open(config(&tdb.url)).await.unwrap();
    let b = PgStore::open(config(&tdb.url)).await.unwrap();
    for i in 0..40 {
        insert_endpoint(
            &db,
            "t1",
            &format!("e{i:02}"),
            &format!("app-v{}", 1 + i % 3),
            json!({"k0": i % 4, "k1": (["a", "b"][i % 2])}),
        )
        .await;
    }
    let queries = [
        json!({"metadata": {"$elemMatch": {"key": "k0", "value": {"$gte": 2}}}}),
        json!({"application_version": "app-v2"}),
        json!({"metadata": {"$elemMatch": {"key": "k1", "value": "a"}}}),
        json!({"metadata": {"$size": 2}}),
    ];
    for (i, q) in queries.iter().enumerate() {
        let s = if i % 2 == 0 { &a } else { &b };
        create(s, "t1", "app", &format!("q{i}"), q.clone()).await;
    }
    for (i, q) in queries.iter().enumerate() {
        let id = format!("q{i}");
        let f = wait_active(&a, "t1", &id, Duration::from_secs(20)).await;
        let expected = reference(&db, "t1", "app", q).await;
        assert_eq!(members(&b, "t1", &id).await, expected, "{q}");
        assert_eq!(f.matched as usize, expected.len(), "{q}");
    }
    let events = filter_events(&db).await;
    for i in 0..queries.len() {
        let id = format!("q{i}");
        let kinds: Vec<String> = events
            .iter()
            .filter(|e| e.filter_id.as_str() == id)
            .map(kind_of)
            .collect();
        assert_eq!(kinds, [format!("{id} pending"), format!("{id} activated")]);
    }
    let leased: i64 = db
        .query_one(
            "SELECT count(*) FROM filters WHERE backfill_owner IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leased, 0, "active filters hold no lease");
    a.shutdown().await;
    b.shutdown().await;
    tdb.drop_db().await;
}

/// An application with no endpoints: the filter turns active at once, with nothing matched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_application() {
    let tdb = TestDb::create().await;
    let s = PgStore::open(config(&tdb.url)).await.unwrap();
    create(&s, "t1", "app", "f1", kyiv()).await;
    let f = wait_active(&s, "t1", "f1", Duration::from_secs(5)).await;
    assert_eq!(f.matched, 0);
    assert!(members(&s, "t1", "f1").await.is_empty());
    assert!(s
        .matched_filters(&tenant("t1"), &[])
        .await
        .unwrap()
        .is_empty());
    // Same creation time: by ID in byte order, whatever the database's collation.
    for id in ["b", "B", "a"] {
        create(&s, "t1", "app2", id, json!({})).await;
    }
    let listed = s
        .list_filters(&tenant("t1"), &app("app2"), None, PAGE)
        .await
        .unwrap();
    let ids: Vec<&str> = listed.items.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["B", "a", "b"]);
    s.shutdown().await;
    tdb.drop_db().await;
}
