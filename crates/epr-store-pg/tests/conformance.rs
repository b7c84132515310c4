//! The store conformance suite on PostgreSQL: every case on a fresh database.

use epr_core::ports::Store;
use epr_store_pg::testing::TestDb;
use epr_store_pg::{PgConfig, PgStore};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every store made, with its database, to shut down and drop at the end.
type Made = Arc<Mutex<Vec<(Arc<PgStore>, TestDb)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let made: Made = Arc::default();
    let m = made.clone();
    epr_store::conformance::run_all(move || {
        let m = m.clone();
        async move {
            // The previous case is over: its store's sessions (writers, pool, relay leader)
            // are closed now, not at the end, or 22 stores exceed `max_connections`.
            let done = std::mem::take(&mut *m.lock().unwrap());
            for (store, db) in done {
                store.shutdown().await;
                db.drop_db().await;
            }
            let db = TestDb::create().await;
            let mut cfg = PgConfig::new(&db.url);
            // Tiny back-fill steps, so back-fills interleave with the cases' writes.
            cfg.backfill = epr_store::BackfillPace {
                step: Duration::ZERO,
                batch: 2,
                pause: Duration::from_micros(500),
            };
            cfg.pool_size = 4;
            let store = Arc::new(PgStore::open(cfg).await.expect("the store opens"));
            // The cases read the outbox, which only the relay leader does: on a loaded
            // machine the leadership task may not have taken the lock yet when `open`
            // returns (a case then saw an empty outbox).
            for _ in 0..1000 {
                if store.is_outbox_leader() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                store.is_outbox_leader(),
                "the only store of its database leads"
            );
            m.lock().unwrap().push((store.clone(), db));
            store as Arc<dyn Store>
        }
    })
    .await;
    let made = std::mem::take(&mut *made.lock().unwrap());
    for (store, db) in made {
        store.shutdown().await;
        db.drop_db().await;
    }
}
