//! The outbox across replicas: relay leadership, sequencing, LISTEN/NOTIFY wake-ups,
//! pending/ack/depth.
//!
//! **Why a sequence number and not the row ID.** Writers insert `outbox(event)` rows in
//! their transaction; `id` is a `bigserial`, taken when the row is inserted, long before the
//! transaction commits. So a lower ID can become visible *after* a higher one (two writers,
//! the first to insert commits last). A relay cursor over `id` ("everything above the last
//! ID I published") would step over that late row and never publish it. Instead, the one
//! relay leader gives every *visible* unsequenced row a `seq`, consecutive after the last
//! one given, in ID order, in a transaction holding the `outbox_sequencer` row lock; the
//! relay pages by `seq`. A row that commits late is simply sequenced later, after the rows
//! that were visible before it, so a cursor over `seq` never skips. One endpoint's events
//! keep their order: its writes are serialised by its row lock, so a later write's rows are
//! inserted (higher IDs) after the earlier write committed, and are never visible without
//! them. `seq` is durable, so the same event keeps its number across relays and failovers
//! (JetStream deduplicates republished events by `Nats-Msg-Id` = store ID + `seq`).
//!
//! **Leadership.** Only one process publishes: the holder of a session advisory lock
//! ([`LEADER_LOCK`]) on a dedicated connection (not the pool's, so it lives as long as the
//! process). Every process tries to take it every second; PostgreSQL releases it when the
//! session ends (process dead, connection dropped, `pg_terminate_backend`), and another
//! process takes over within about a second. The holder `LISTEN`s on [`NOTIFY_CHANNEL`]
//! (writers `NOTIFY` in their transaction) and wakes its relay on each notification. A
//! non-leader's [`pending`] returns nothing, so its relay idles. Leadership is dropped at
//! once when the connection fails, and when a liveness query on it does not answer within
//! the connect timeout (a half-open connection). Should two processes still briefly both
//! believe they lead, the sequencer's row lock keeps their numbering from interleaving, and
//! the only cost is an event published twice (delivery is at least once anyway).

use crate::error::{corrupt, db, pool};
use crate::{Inner, PgConfig};
use epr_core::ports::{OutboxEntry, OutboxWaker, StoreError};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

/// The channel writers `NOTIFY` (inside their transaction) after appending events.
pub(crate) const NOTIFY_CHANNEL: &str = "epr_outbox";

/// The session advisory lock whose holder is the relay leader ("EPROUTB" in ASCII).
/// Advisory locks are per database, so each database has its own leader.
pub(crate) const LEADER_LOCK: i64 = 0x0045_5052_4f55_5442;

/// How often a non-leader tries to take the lock, and a leader checks its connection.
const LEADER_TICK: Duration = Duration::from_secs(1);

/// Longest wait between reconnection attempts of the leadership connection.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Below this many rows, [`depth`] counts exactly; above, it estimates from the ID range.
const EXACT_DEPTH_UP_TO: i64 = 10_000;

/// What the leadership task and the `Store` methods share.
#[derive(Default)]
struct Shared {
    leader: AtomicBool,
    waker: Mutex<Option<OutboxWaker>>,
}

impl Shared {
    fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(w) = waker {
            w();
        }
    }

    fn set_leader(&self, leader: bool) {
        let was = self.leader.swap(leader, Ordering::SeqCst);
        metrics::gauge!("epr_outbox_leader").set(if leader { 1.0 } else { 0.0 });
        if was != leader {
            if leader {
                tracing::info!("this process is now the outbox relay leader");
            } else {
                tracing::info!("this process is no longer the outbox relay leader");
            }
        }
    }
}

pub(crate) struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    pub(crate) fn new(cfg: &PgConfig) -> Self {
        let _ = cfg;
        Self {
            shared: Arc::default(),
        }
    }

    pub(crate) fn set_waker(&self, waker: OutboxWaker) {
        *self.shared.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }

    /// Wakes this process's relay (after a local commit that appended events).
    pub(crate) fn wake(&self) {
        self.shared.wake();
    }

    /// Whether this process holds the relay leadership (and so publishes).
    pub(crate) fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::SeqCst)
    }
}

/// Starts the leadership / LISTEN task. It holds no reference to [`Inner`]: dropping the
/// store (without `shutdown`) ends it too, and so releases the leadership.
pub(crate) fn start(inner: &Arc<Inner>) -> Vec<JoinHandle<()>> {
    let pg = match leader_config(&inner.cfg) {
        Ok(pg) => pg,
        Err(e) => {
            // `open` parsed the same URL already; kept as a log line rather than a panic.
            tracing::error!(error = %e, "the outbox leadership task cannot start");
            return Vec::new();
        }
    };
    let shared = inner.outbox.shared.clone();
    let stop = inner.stop.subscribe();
    vec![tokio::spawn(lead(
        pg,
        inner.cfg.connect_timeout,
        shared,
        stop,
    ))]
}

fn leader_config(cfg: &PgConfig) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| crate::error::msg(format!("store.postgres.url cannot be parsed: {e}")))?;
    pg.connect_timeout(cfg.connect_timeout);
    pg.options(format!(
        "-c statement_timeout={}",
        cfg.statement_timeout.as_millis()
    ));
    pg.application_name("epr-outbox-leader");
    Ok(pg)
}

/// How a leadership session ended.
enum Ended {
    /// The store shuts down (or was dropped).
    Stop,
    /// The connection failed: connect again.
    Lost,
}

/// Connects, takes the leadership when it is free, leads until the connection fails;
/// again, until the store stops.
async fn lead(
    pg: tokio_postgres::Config,
    check_timeout: Duration,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    let failures = epr_core::log_gate::LogGate::default();
    loop {
        if *stop.borrow() {
            break;
        }
        let connected = tokio::select! {
            c = pg.connect(tokio_postgres::NoTls) => c,
            _ = stop.changed() => break,
        };
        let ended = match connected {
            Ok((client, connection)) => {
                let (dead_tx, dead) = watch::channel(());
                let driver = tokio::spawn(drive(connection, shared.clone(), dead_tx));
                let ended = session(&client, check_timeout, &shared, &mut stop, dead).await;
                shared.set_leader(false);
                // Dropping the client ends the session, which releases the lock at once.
                drop(client);
                let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
                backoff = Duration::ZERO;
                ended
            }
            Err(e) => {
                if let Some(suppressed) = failures.admit(std::time::Instant::now()) {
                    tracing::warn!(error = %e, suppressed,
                        "the outbox leadership connection cannot connect; retrying");
                }
                Ended::Lost
            }
        };
        if matches!(ended, Ended::Stop) {
            break;
        }
        backoff = (backoff * 2).clamp(Duration::from_millis(200), MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => break,
        }
    }
    shared.set_leader(false);
}

/// One connection's life: try the lock every tick; once held, LISTEN, lead and watch the
/// connection.
async fn session(
    client: &tokio_postgres::Client,
    check_timeout: Duration,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    mut dead: watch::Receiver<()>,
) -> Ended {
    loop {
        let taken = tokio::select! {
            r = client.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]) => r,
            _ = stop.changed() => return Ended::Stop,
            _ = dead.changed() => return Ended::Lost,
        };
        match taken {
            Ok(row) if row.get::<_, bool>(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "trying the outbox leadership failed");
                return Ended::Lost;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LEADER_TICK) => {}
            _ = stop.changed() => return Ended::Stop,
            _ = dead.changed() => return Ended::Lost,
        }
    }
    // Listen before leading, so that no commit after the first wake-up goes unnoticed.
    if let Err(e) = client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
    {
        tracing::warn!(error = %e, "LISTEN on the outbox leadership connection failed");
        return Ended::Lost;
    }
    shared.set_leader(true);
    // The previous leader may have left a backlog.
    shared.wake();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LEADER_TICK) => {}
            _ = stop.changed() => return Ended::Stop,
            _ = dead.changed() => return Ended::Lost,
        }
        // A connection that silently stopped answering (half open) must not keep this
        // process believing it leads while the server may have ended the session.
        match tokio::time::timeout(check_timeout, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the outbox leadership connection failed");
                return Ended::Lost;
            }
            Err(_) => {
                tracing::warn!("the outbox leadership connection stopped answering");
                return Ended::Lost;
            }
        }
    }
}

/// Drives the leadership connection: wakes the relay on each notification; when the
/// connection ends, drops the leadership at once (before the session notices).
async fn drive(
    mut connection: tokio_postgres::Connection<
        tokio_postgres::Socket,
        tokio_postgres::tls::NoTlsStream,
    >,
    shared: Arc<Shared>,
    dead: watch::Sender<()>,
) {
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(_)) => shared.wake(),
            Ok(_) => {} // notices
            Err(e) => {
                tracing::debug!(error = %e, "the outbox leadership connection ended");
                break;
            }
        }
    }
    shared.set_leader(false);
    drop(dead);
}

/// The leader sequences the visible unsequenced rows, then returns the rows after `after`
/// by `seq`. A non-leader returns nothing (its relay idles).
pub(crate) async fn pending(
    inner: &Inner,
    after: i64,
    limit: usize,
) -> Result<Vec<OutboxEntry>, StoreError> {
    if limit == 0 || !inner.outbox.is_leader() {
        return Ok(Vec::new());
    }
    let limit = limit.min(i64::MAX as usize) as i64;
    let mut client = inner.pool.get().await.map_err(pool)?;
    // Cheap check on the partial index first: an idle poll takes no lock and writes nothing.
    let unsequenced: bool = client
        .query_one("SELECT EXISTS(SELECT 1 FROM outbox WHERE seq IS NULL)", &[])
        .await
        .map_err(db)?
        .get(0);
    if unsequenced {
        let tx = client.transaction().await.map_err(db)?;
        let last: i64 = tx
            .query_one("SELECT last_seq FROM outbox_sequencer FOR UPDATE", &[])
            .await
            .map_err(db)?
            .get(0);
        // A statement of its own after the lock: under READ COMMITTED it sees every row
        // committed so far, including the seqs another sequencer gave before we got the lock.
        let n = tx
            .execute(
                "UPDATE outbox o SET seq = $1 + s.rn \
                 FROM (SELECT id, row_number() OVER (ORDER BY id) AS rn \
                       FROM outbox WHERE seq IS NULL ORDER BY id LIMIT $2) s \
                 WHERE o.id = s.id",
                &[&last, &limit],
            )
            .await
            .map_err(db)?;
        if n > 0 {
            tx.execute(
                "UPDATE outbox_sequencer SET last_seq = $1",
                &[&(last + n as i64)],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
    }
    let rows = client
        .query(
            "SELECT seq, event FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &limit],
        )
        .await
        .map_err(db)?;
    rows.iter()
        .map(|row| {
            let text: &str = row.get(1);
            let event =
                epr_store::codec::decode_outbox(text).map_err(|e| corrupt("outbox event", e))?;
            Ok(OutboxEntry {
                id: row.get(0),
                event,
            })
        })
        .collect()
}

/// Deletes the published rows up to `last_id` (a `seq`); unsequenced rows (`seq` NULL)
/// are never touched.
pub(crate) async fn ack_through(inner: &Inner, last_id: i64) -> Result<(), StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    client
        .execute("DELETE FROM outbox WHERE seq <= $1", &[&last_id])
        .await
        .map_err(db)?;
    Ok(())
}

/// Rows in the outbox: exact up to [`EXACT_DEPTH_UP_TO`] (an index scan of at most that
/// many entries); above, `max(id) - min(id) + 1`, two index lookups, which counts IDs lost
/// to rolled-back transactions too (an overestimate, fine for a gauge and health).
pub(crate) async fn depth(inner: &Inner) -> Result<u64, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $1) t), \
                    (SELECT max(id) - min(id) + 1 FROM outbox)",
            &[&(EXACT_DEPTH_UP_TO + 1)],
        )
        .await
        .map_err(db)?;
    let counted: i64 = row.get(0);
    let range: Option<i64> = row.get(1);
    Ok(if counted <= EXACT_DEPTH_UP_TO {
        counted
    } else {
        range.unwrap_or(counted).max(counted)
    }
    .max(0) as u64)
}
