//! The PostgreSQL write path beyond the conformance suite: replicas racing on one ID, a
//! group holding refused and accepted commands, commits cut off by a terminated session,
//! and a rough throughput figure (ignored by default). Results are checked by SQL, apart
//! from the store's own reads.

use epr_core::command::{Command, MetadataChange, Registration, WriteCtx};
use epr_core::endpoint::Precondition;
use epr_core::event::OutboxEvent;
use epr_core::ids::{AppName, AppVersionName, EndpointId, EndpointToken, TenantId};
use epr_core::metadata::{Limits, Metadata, MetadataKey};
use epr_core::ports::{Store, StoreError};
use epr_core::{DomainError, Timestamp};
use epr_store_pg::testing::TestDb;
use epr_store_pg::{PgConfig, PgStore};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

fn tenant() -> TenantId {
    TenantId::parse("t1").unwrap()
}

fn ctx() -> WriteCtx {
    WriteCtx {
        tenant: tenant(),
        now: Timestamp(1_700_000_000_000),
        correlation_id: "corr".into(),
        limits: Limits::default(),
    }
}

fn id(s: &str) -> EndpointId {
    EndpointId::parse(s).unwrap()
}

fn register(ep: &str, token: &str, md: Value) -> Command {
    let app = AppName::parse("app").unwrap();
    Command::Register(Registration {
        id: id(ep),
        app_version: AppVersionName::parse("app-v1").unwrap(),
        metadata: Metadata::parse(md, "metadata", &Limits::default()).unwrap(),
        token_hash: EndpointToken::parse(token).unwrap().hash(&app),
        token_id: epr_core::ids::TokenId::parse(
            &EndpointToken::parse(token).unwrap().hash(&app).to_hex()[..32],
        )
        .unwrap(),
        app,
    })
}

fn put(ep: &str, key: &str, value: Value) -> Command {
    Command::UpdateMetadata {
        id: id(ep),
        change: MetadataChange::PutKey(MetadataKey::parse(key, &Limits::default()).unwrap(), value),
        precondition: Precondition::None,
    }
}

fn unregister(ep: &str) -> Command {
    Command::Unregister {
        id: id(ep),
        precondition: Precondition::None,
    }
}

fn config(url: &str) -> PgConfig {
    let mut cfg = PgConfig::new(url);
    cfg.pool_size = 4;
    cfg
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn endpoint_ids(c: &tokio_postgres::Client) -> BTreeSet<String> {
    c.query("SELECT endpoint_id FROM endpoints WHERE tenant='t1'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Two replicas register one ID from 64 tasks at once: exactly one wins, every other is
/// the domain's conflict on `endpointId`, and one row and one token are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_on_one_id_register_it_once() {
    let db = TestDb::create().await;
    let a = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let b = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let c = sql(&db.url).await;
    for round in 0..4 {
        let ep = format!("same-{round}");
        let mut tasks = Vec::new();
        for i in 0..64 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let cmd = register(&ep, &format!("tok-{round}-{i}"), json!({"i": i}));
            tasks.push(tokio::spawn(async move { store.execute(cmd, ctx()).await }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(StoreError::Rejected(DomainError::Conflict { field, message })) => {
                    assert_eq!(field, "endpointId", "{message}");
                    assert_eq!(message, format!("endpoint '{ep}' already exists"));
                }
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
        let rows: i64 = c
            .query_one(
                "SELECT count(*) FROM endpoints WHERE endpoint_id=$1",
                &[&ep],
            )
            .await
            .unwrap()
            .get(0);
        let tokens: i64 = c
            .query_one("SELECT count(*) FROM tokens WHERE endpoint_id=$1", &[&ep])
            .await
            .unwrap()
            .get(0);
        assert_eq!((rows, tokens), (1, 1), "round {round}");
    }
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// One writer, blocked on a row lock held by a test transaction while commands queue up,
/// so they run as one group: refused commands change nothing, the others commit, and
/// commands on one endpoint see each other in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_refused_commands_commits_the_others() {
    let db = TestDb::create().await;
    let mut cfg = config(&db.url);
    cfg.writers = 1;
    let store = Arc::new(PgStore::open(cfg).await.unwrap());
    for (ep, token) in [
        ("blocker", "t-blocker"),
        ("old", "t-old"),
        ("gone", "t-gone"),
    ] {
        store
            .execute(register(ep, token, json!({})), ctx())
            .await
            .unwrap();
    }
    let mut admin = sql(&db.url).await;
    let hold = admin.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM endpoints WHERE tenant='t1' AND endpoint_id='blocker' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    // The first group waits for the row lock; everything after queues behind it.
    let s = store.clone();
    let first = tokio::spawn(async move { s.execute(put("blocker", "k", json!(1)), ctx()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cmds: Vec<(Command, bool)> = vec![
        (register("n1", "t-n1", json!({"a": 1})), true),
        (register("old", "t-other", json!({})), false), // ID taken
        (register("n2", "t-n1", json!({})), false),     // token taken by n1 in this group
        (put("n1", "b", json!(2)), true),               // sees n1 registered in this group
        (put("missing", "b", json!(2)), false),         // not found
        (unregister("gone"), true),
        (register("gone", "t-gone", json!({"again": true})), true), // ID and token free again
        (register("n3", "t-old", json!({})), false),                // token of "old"
        (register("n4", "t-n4", json!({})), true),
    ];
    let mut tasks = Vec::new();
    for (cmd, _) in &cmds {
        let (s, cmd) = (store.clone(), cmd.clone());
        tasks.push(tokio::spawn(async move { s.execute(cmd, ctx()).await }));
        // Queued in this order (one writer, one queue).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hold.commit().await.unwrap();
    first.await.unwrap().unwrap();
    for (t, (cmd, ok)) in tasks.into_iter().zip(&cmds) {
        match (t.await.unwrap(), ok) {
            (Ok(_), true) => {}
            (Err(StoreError::Rejected(_)), false) => {}
            (other, _) => panic!("{cmd:?}: unexpected {other:?}"),
        }
    }
    let ids = endpoint_ids(&admin).await;
    let want: BTreeSet<String> = ["blocker", "old", "gone", "n1", "n4"]
        .map(String::from)
        .into();
    assert_eq!(ids, want);
    let n1 = store.get(&tenant(), &id("n1")).await.unwrap().unwrap();
    assert_eq!(n1.metadata.get("b"), Some(&json!(2)));
    assert_eq!(n1.version, 2);
    let gone = store.get(&tenant(), &id("gone")).await.unwrap().unwrap();
    assert_eq!(gone.metadata.get("again"), Some(&json!(true)));
    let tokens: Vec<String> = admin
        .query(
            "SELECT endpoint_id FROM tokens WHERE tenant='t1' ORDER BY endpoint_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tokens, ["blocker", "gone", "n1", "n4", "old"]);
    // Events of the committed commands only, in command order (outbox ids follow it).
    let events: Vec<(i64, String)> = admin
        .query("SELECT id, event FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let kinds: Vec<(String, String)> = events
        .iter()
        .map(
            |(_, text)| match epr_store::codec::decode_outbox(text).unwrap() {
                OutboxEvent::Endpoint(e) => (
                    e.endpoint_id.to_string(),
                    format!("{:?}", e.kind)
                        .chars()
                        .take_while(|c| c.is_alphanumeric())
                        .collect(),
                ),
                OutboxEvent::Token(t) => (
                    t.endpoint_id.to_string(),
                    format!("Token{:?}", t.kind)
                        .chars()
                        .take_while(|c| c.is_alphanumeric())
                        .collect(),
                ),
                other => panic!("{other:?}"),
            },
        )
        .collect();
    // The first three: the set-up registrations (empty metadata: `registered` only).
    let tail: Vec<(&str, &str)> = kinds[3..]
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("blocker", "MetadataUpdated"),
            ("n1", "Registered"),
            ("n1", "MetadataUpdated"),
            ("n1", "MetadataUpdated"),
            ("gone", "Unregistered"),
            ("gone", "TokenRevoked"),
            ("gone", "Registered"),
            ("gone", "MetadataUpdated"),
            ("n4", "Registered"),
        ]
    );
    store.shutdown().await;
    db.drop_db().await;
}

/// Sessions of the store are terminated again and again under load: every acknowledged
/// registration is in the database, failures are `Unavailable` (never a refusal), and the
/// store writes again once the database is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_commit_is_never_acknowledged() {
    let db = TestDb::create().await;
    let store = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let admin = sql(&db.url).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..64 {
        let (s, stop) = (store.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ep = format!("e{task}-{n}");
                n += 1;
                match s
                    .execute(register(&ep, &format!("t-{ep}"), json!({"n": n})), ctx())
                    .await
                {
                    Ok(_) => acked.push(ep),
                    Err(StoreError::Unavailable(_)) => failed += 1,
                    Err(StoreError::Rejected(e)) => panic!("{ep}: refused {e}"),
                }
            }
            (acked, failed)
        }));
    }
    let mut kills = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'epr' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        kills += killed;
    }
    // Calm again: the writers reconnect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (a, f) = t.await.unwrap();
        acked.extend(a);
        failed += f;
    }
    let stored = endpoint_ids(&admin).await;
    let lost: Vec<&String> = acked.iter().filter(|e| !stored.contains(*e)).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    eprintln!(
        "{kills} sessions terminated; {} acknowledged, {failed} failed, {} stored",
        acked.len(),
        stored.len()
    );
    assert!(kills > 0 && !acked.is_empty());
    store
        .execute(register("after", "t-after", json!({})), ctx())
        .await
        .expect("the store writes again");
    store.shutdown().await;
    db.drop_db().await;
}

/// After shutdown, writes are refused as unavailable.
#[tokio::test]
async fn writes_after_shutdown_are_unavailable() {
    let db = TestDb::create().await;
    let store = PgStore::open(config(&db.url)).await.unwrap();
    store
        .execute(register("a", "t-a", json!({})), ctx())
        .await
        .unwrap();
    store.shutdown().await;
    match store.execute(register("b", "t-b", json!({})), ctx()).await {
        Err(StoreError::Unavailable(e)) => assert!(e.to_string().contains("shut down"), "{e}"),
        other => panic!("{other:?}"),
    }
    db.drop_db().await;
}

/// A store dropped without shutdown stops its writers: its sessions end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_store_releases_its_writer_sessions() {
    let db = TestDb::create().await;
    let store = PgStore::open(config(&db.url)).await.unwrap();
    for i in 0..8 {
        let ep = format!("d{i}");
        store
            .execute(register(&ep, &format!("t-{ep}"), json!({})), ctx())
            .await
            .unwrap();
    }
    drop(store);
    let admin = sql(&db.url).await;
    let started = Instant::now();
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'epr'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{left} sessions still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.drop_db().await;
}

/// Rough registrations per second with 64 concurrent tasks on one store (not a benchmark:
/// `cargo test -p epr-store-pg --test write -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn registration_throughput() {
    let db = TestDb::create().await;
    let store = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let per_task = 500;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..per_task {
                let ep = format!("e{task}-{n}");
                s.execute(
                    register(&ep, &format!("t-{ep}"), json!({"n": n, "city": "Kyiv"})),
                    ctx(),
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let total = 64 * per_task;
    eprintln!(
        "{total} registrations in {secs:.2} s: {:.0}/s (64 tasks, one store, {} writers)",
        total as f64 / secs,
        PgConfig::new("").writers
    );
    store.shutdown().await;
    db.drop_db().await;
}
