//! The store survives a database restart: calls fail fast with `Unavailable` while the
//! server is down, and succeed again once it is back, without reopening the store.

use crate::{config, eventually};
use epr_core::ports::{Store, StoreError};
use epr_store_pg::testing::PrivatePg;
use epr_store_pg::PgStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn unavailable<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Unavailable(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_fails_fast_then_recovers_without_reopening() {
    // The server programs block: off the runtime's workers.
    let pg = Arc::new(tokio::task::spawn_blocking(PrivatePg::start).await.unwrap());
    let cfg = config(&pg.url());
    let connect_timeout = cfg.connect_timeout;
    let s = PgStore::open(cfg).await.expect("the store opens");
    assert!(
        eventually(Duration::from_secs(5), || async { s.is_outbox_leader() }).await,
        "the only replica leads"
    );
    s.put_setting("k", "v").await.unwrap();

    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(2), || async { !s.is_outbox_leader() }).await,
        "leadership is lost with the server"
    );
    let limit = connect_timeout + Duration::from_secs(1);
    let t = Instant::now();
    assert!(unavailable(s.ping().await));
    assert!(unavailable(s.get_setting("k").await));
    assert!(unavailable(s.export_tenants().await));
    assert!(unavailable(s.outbox_depth().await));
    assert!(
        t.elapsed() < limit * 4,
        "four calls failed in {:?}, not hanging",
        t.elapsed()
    );
    let t = Instant::now();
    assert!(unavailable(s.ping().await));
    assert!(t.elapsed() < limit, "one call failed in {:?}", t.elapsed());

    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.start_again())
        .await
        .unwrap();
    // The pool drops the connections the server closed: the first call succeeds.
    s.ping()
        .await
        .expect("the first ping after the restart succeeds");
    assert_eq!(s.get_setting("k").await.unwrap().as_deref(), Some("v"));
    assert_eq!(s.outbox_depth().await.unwrap(), 0);
    assert!(
        eventually(Duration::from_secs(10), || async { s.is_outbox_leader() }).await,
        "leadership is regained after the restart"
    );

    // Again, as a crash: sessions vanish without a goodbye; the server recovers at start.
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.crash())
        .await
        .unwrap();
    let t = Instant::now();
    assert!(unavailable(s.get_setting("k").await));
    assert!(t.elapsed() < limit, "failed in {:?}", t.elapsed());
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.start_again())
        .await
        .unwrap();
    s.ping()
        .await
        .expect("the first ping after recovery succeeds");
    assert_eq!(s.get_setting("k").await.unwrap().as_deref(), Some("v"));
    assert!(
        eventually(Duration::from_secs(10), || async { s.is_outbox_leader() }).await,
        "leadership is regained after the crash"
    );
    s.shutdown().await;
    drop(s);
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
