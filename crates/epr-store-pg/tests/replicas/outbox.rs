//! The outbox across replicas: one leader publishes, sequencing never skips a row that
//! committed late, failover publishes the rest (at least once, same IDs).

use crate::{connect, drain, eventually, open};
use epr_core::event::{DomainEvent, EventKind, OutboxEvent};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::ports::{OutboxEntry, Store, StoreError};
use epr_core::Timestamp;
use epr_store_pg::testing::TestDb;
use epr_store_pg::PgStore;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An event of endpoint `key`, its `n`th: the correlation ID says which, for order checks.
fn event(key: &str, n: usize) -> OutboxEvent {
    OutboxEvent::Endpoint(DomainEvent {
        tenant: TenantId::parse("t1").unwrap(),
        endpoint_id: EndpointId::parse(&format!("ep-{key}")).unwrap(),
        app: AppName::parse("app").unwrap(),
        app_version: AppVersionName::parse("app-v1").unwrap(),
        kind: EventKind::Registered,
        correlation_id: format!("{key}/{n}"),
        timestamp: Timestamp(1_700_000_000_000 + n as i64),
    })
}

fn label(e: &OutboxEntry) -> String {
    e.event.correlation_id().to_owned()
}

/// Appends events as a writer does: in one transaction that also notifies.
async fn append(client: &mut tokio_postgres::Client, events: &[OutboxEvent]) {
    let tx = client.transaction().await.unwrap();
    for e in events {
        tx.execute(
            "INSERT INTO outbox(event) VALUES($1)",
            &[&epr_store::codec::encode_outbox(e)],
        )
        .await
        .unwrap();
    }
    tx.batch_execute("NOTIFY epr_outbox").await.unwrap();
    tx.commit().await.unwrap();
}

fn counting_waker(s: &PgStore) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let m = n.clone();
    s.set_outbox_waker(Arc::new(move || {
        m.fetch_add(1, Ordering::SeqCst);
    }));
    n
}

async fn unsequenced(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox WHERE seq IS NULL", &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_leader(s: &PgStore) {
    assert!(
        eventually(Duration::from_secs(5), || async { s.is_outbox_leader() }).await,
        "the store became the relay leader"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_publishes_and_another_takes_over_after_shutdown() {
    failover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_leader_hands_over_too() {
    failover(false).await;
}

/// Two replicas; the leader goes away (shut down, or dropped without `shutdown`).
async fn failover(shutdown: bool) {
    let db = TestDb::create().await;
    let a = open(&db.url).await;
    wait_leader(&a).await;
    let b = open(&db.url).await;
    let woken_a = counting_waker(&a);
    let woken_b = counting_waker(&b);
    // b tries every second: it must never get the lock while a holds it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!b.is_outbox_leader());

    let mut c = connect(&db.url).await;
    let first: Vec<_> = (0..5).map(|n| event("k", n)).collect();
    append(&mut c, &first).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            woken_a.load(Ordering::SeqCst) > 0
        })
        .await,
        "the leader's LISTEN wakes its relay"
    );
    assert!(b.outbox_pending(0, 100).await.unwrap().is_empty());
    assert_eq!(unsequenced(&c).await, 5, "a non-leader sequences nothing");

    let got = a.outbox_pending(0, 100).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        got.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        first
    );
    a.outbox_ack_through(2).await.unwrap();
    assert_eq!(b.outbox_depth().await.unwrap(), 3);

    // The leader goes away with 3..5 published but not acknowledged.
    let gone = Instant::now();
    if shutdown {
        a.shutdown().await;
    }
    drop(a);
    assert!(
        eventually(Duration::from_secs(3), || async { b.is_outbox_leader() }).await,
        "b takes over within a few seconds"
    );
    let took = gone.elapsed();
    assert!(
        woken_b.load(Ordering::SeqCst) > 0,
        "gaining the leadership wakes the relay (backlog)"
    );
    append(&mut c, &(5..8).map(|n| event("k", n)).collect::<Vec<_>>()).await;
    let rest = drain(&b, 0).await;
    assert_eq!(
        rest.iter().map(|e| e.id).collect::<Vec<_>>(),
        [3, 4, 5, 6, 7, 8],
        "republished with the same IDs, then the new ones"
    );
    assert_eq!(
        rest.iter().map(label).collect::<Vec<_>>(),
        (2..8).map(|n| format!("k/{n}")).collect::<Vec<_>>()
    );
    b.outbox_ack_through(8).await.unwrap();
    assert_eq!(b.outbox_depth().await.unwrap(), 0);
    eprintln!("failover (shutdown: {shutdown}) took {took:?}");
    b.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_leadership_connection_hands_over() {
    let db = TestDb::create().await;
    let a = open(&db.url).await;
    wait_leader(&a).await;
    let b = open(&db.url).await;
    let mut c = connect(&db.url).await;
    append(&mut c, &(0..3).map(|n| event("k", n)).collect::<Vec<_>>()).await;
    assert_eq!(a.outbox_pending(0, 100).await.unwrap().len(), 3);

    let holder = "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
                  WHERE l.locktype = 'advisory' AND l.granted \
                  AND s.datname = current_database() \
                  AND s.application_name = 'epr-outbox-leader'";
    let old: i32 = c.query_one(holder, &[]).await.unwrap().get(0);
    c.execute("SELECT pg_terminate_backend($1)", &[&old])
        .await
        .unwrap();
    // a learns at once that its session is gone (it may take the lock again later).
    assert!(
        eventually(Duration::from_millis(1000), || async {
            !a.is_outbox_leader()
        })
        .await,
        "the terminated leader drops its leadership"
    );
    let c = &c;
    assert!(
        eventually(Duration::from_secs(4), || async {
            match c.query_opt(holder, &[]).await.unwrap() {
                Some(r) => r.get::<_, i32>(0) != old,
                None => false,
            }
        })
        .await,
        "a new session holds the leadership"
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            a.is_outbox_leader() != b.is_outbox_leader()
        })
        .await,
        "exactly one of them leads"
    );
    let (leader, other) = if a.is_outbox_leader() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(other.outbox_pending(0, 100).await.unwrap().is_empty());
    let mut c2 = connect(&db.url).await;
    append(&mut c2, &(3..5).map(|n| event("k", n)).collect::<Vec<_>>()).await;
    let all = drain(leader, 0).await;
    assert_eq!(
        all.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        all.iter().map(label).collect::<Vec<_>>(),
        (0..5).map(|n| format!("k/{n}")).collect::<Vec<_>>()
    );
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// A row inserted first but committed last is published after the others, never skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_of_a_lower_id_is_not_skipped() {
    let db = TestDb::create().await;
    let a = open(&db.url).await;
    wait_leader(&a).await;
    let mut c1 = connect(&db.url).await;
    let mut c2 = connect(&db.url).await;
    let insert = "INSERT INTO outbox(event) VALUES($1) RETURNING id";
    let t1 = c1.transaction().await.unwrap();
    let id1: i64 = t1
        .query_one(insert, &[&epr_store::codec::encode_outbox(&event("x", 0))])
        .await
        .unwrap()
        .get(0);
    let t2 = c2.transaction().await.unwrap();
    let id2: i64 = t2
        .query_one(insert, &[&epr_store::codec::encode_outbox(&event("y", 0))])
        .await
        .unwrap()
        .get(0);
    assert!(id1 < id2);
    t2.commit().await.unwrap();

    let first = a.outbox_pending(0, 10).await.unwrap();
    assert_eq!(first.iter().map(label).collect::<Vec<_>>(), ["y/0"]);
    let cursor = first[0].id;
    a.outbox_ack_through(cursor).await.unwrap();
    t1.commit().await.unwrap();
    let second = a.outbox_pending(cursor, 10).await.unwrap();
    assert_eq!(
        second.iter().map(label).collect::<Vec<_>>(),
        ["x/0"],
        "the row with the lower ID, committed later, comes after the cursor"
    );
    assert!(second[0].id > cursor);
    a.shutdown().await;
    db.drop_db().await;
}

/// Writers committing in random order beside a relay: every event arrives once, seqs are
/// consecutive, and each endpoint's events keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_lose_nothing_and_keep_each_endpoints_order() {
    const KEYS: usize = 4;
    const PER_KEY: usize = 40;
    let db = TestDb::create().await;
    let a = open(&db.url).await;
    wait_leader(&a).await;
    let mut writers = Vec::new();
    for k in 0..KEYS {
        let url = db.url.clone();
        writers.push(tokio::spawn(async move {
            let mut c = connect(&url).await;
            let mut rng = 0x9e37_79b9_u32.wrapping_mul(k as u32 + 1);
            for n in 0..PER_KEY {
                let tx = c.transaction().await.unwrap();
                tx.execute(
                    "INSERT INTO outbox(event) VALUES($1)",
                    &[&epr_store::codec::encode_outbox(&event(&k.to_string(), n))],
                )
                .await
                .unwrap();
                // Hold the transaction open a little: commits land out of ID order.
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                tokio::time::sleep(Duration::from_micros(u64::from(rng % 3000))).await;
                tx.batch_execute("NOTIFY epr_outbox").await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    let mut got: Vec<OutboxEntry> = Vec::new();
    let mut cursor = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < KEYS * PER_KEY {
        assert!(
            Instant::now() < deadline,
            "only {} events arrived",
            got.len()
        );
        let batch = a.outbox_pending(cursor, 16).await.unwrap();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        for e in &batch {
            assert_eq!(e.id, cursor + 1, "seqs are consecutive");
            cursor = e.id;
        }
        a.outbox_ack_through(cursor).await.unwrap();
        got.extend(batch);
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(a.outbox_pending(cursor, 16).await.unwrap().is_empty());
    for k in 0..KEYS {
        let mine: Vec<String> = got
            .iter()
            .map(label)
            .filter(|l| l.starts_with(&format!("{k}/")))
            .collect();
        let expected: Vec<String> = (0..PER_KEY).map(|n| format!("{k}/{n}")).collect();
        assert_eq!(mine, expected, "endpoint {k}'s events in order, once each");
    }
    assert_eq!(a.outbox_depth().await.unwrap(), 0);
    a.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledging_never_deletes_unsequenced_rows() {
    let db = TestDb::create().await;
    let a = open(&db.url).await;
    wait_leader(&a).await;
    let mut c = connect(&db.url).await;
    append(&mut c, &(0..3).map(|n| event("k", n)).collect::<Vec<_>>()).await;
    let two = a.outbox_pending(0, 2).await.unwrap();
    assert_eq!(two.len(), 2);
    assert_eq!(
        unsequenced(&c).await,
        1,
        "a batch sequences at most its limit"
    );
    a.outbox_ack_through(1000).await.unwrap();
    assert_eq!(a.outbox_depth().await.unwrap(), 1);
    assert_eq!(unsequenced(&c).await, 1);
    let last = a.outbox_pending(2, 10).await.unwrap();
    assert_eq!(last.iter().map(|e| e.id).collect::<Vec<_>>(), [3]);
    assert_eq!(label(&last[0]), "k/2");

    // A row this build cannot read is an error (503), as in the embedded store.
    c.execute("INSERT INTO outbox(event) VALUES('not an event')", &[])
        .await
        .unwrap();
    assert!(matches!(
        a.outbox_pending(3, 10).await,
        Err(StoreError::Unavailable(_))
    ));
    a.shutdown().await;
    db.drop_db().await;
}

/// Above 10 000 rows the depth is estimated from the ID range (no full count per sample).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_outbox_is_estimated_from_the_id_range() {
    let db = TestDb::create().await;
    let a = open(&db.url).await;
    let c = connect(&db.url).await;
    c.execute(
        "INSERT INTO outbox(event) SELECT 'e' FROM generate_series(1, 10050)",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.outbox_depth().await.unwrap(), 10_050);
    c.execute("DELETE FROM outbox WHERE id % 2 = 0 AND id > 100", &[])
        .await
        .unwrap();
    // 5 075 rows left: counted exactly again.
    assert_eq!(a.outbox_depth().await.unwrap(), 5_075);
    a.shutdown().await;
    db.drop_db().await;
}
