//! The embedded backend: SQLite in WAL mode. A commit does not wait for the disk: the
//! writer's connection writes its WAL through `epr_sqlite_vfs`, which turns the commit's sync
//! into one write of its frames; a syncer thread fdatasyncs the WAL and only then answers, so
//! every acknowledged commit is on disk, and a torn write is rolled back by SQLite's recovery
//! on open.
//!
//! Writes go through one writer thread that drains its queue and commits everything queued
//! in one transaction (group commit), and one sync covers every group committed before it
//! while the writer goes on: batching is what lifts throughput above the few thousand syncs
//! per second a disk allows. Every command checks all its rules before its first write (the
//! new-token rule by that very insert), so a refused command leaves nothing behind and does
//! not affect its neighbours. Reads use
//! a pool of read-only connections on blocking threads; WAL lets them run beside the writer.

use crate::codec;
use crate::integrity::{self, IntegrityCheck, StoreHealth};
use crate::key_index::{KeyIndex, KeyJournal, WriterKeys};
use crate::lock::DataDirLock;
use crate::meta_index::{IndexChange, MetaIndex};
use crate::sqlite_credentials;
pub use crate::sqlite_filters::BackfillPace;
use crate::sqlite_filters::{self, FilterCache, Precomputed, SharedFilterView};
use async_trait::async_trait;
use epr_core::command::{plan, Command, Effect, Loaded, WriteCtx};
use epr_core::credentials::{ClaimToken, Rejection, StoredToken, TokenListQuery, TokenOp};
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::{EndpointFilter, FilterCommand, FilterId};
use epr_core::event::OutboxEvent;
use epr_core::ids::{AppName, AppVersionName, ClaimId, EndpointId, TenantId, TokenHash, TokenId};
use epr_core::log_gate::LogGate;
use epr_core::metadata::Metadata;
use epr_core::ports::{
    BatchCreated, BatchFailed, BatchOutcome, BatchRequest, EndpointExport, ImportOutcome,
    ImportRecord, OutboxEntry, OutboxWaker, Store, StoreError,
};
use epr_core::query::{EndpointQuery, Page, PageRequest};
use epr_core::Timestamp;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub data_dir: PathBuf,
    /// Most commands committed together in one transaction.
    pub max_group: usize,
    /// Read connections kept open, and reads run at once (others wait for a connection).
    pub readers: usize,
    /// How long batch outcomes are kept, in milliseconds.
    pub batch_retention_ms: i64,
    /// Write each change's events to the outbox. Off when nothing publishes them (no NATS):
    /// an outbox nobody reads would only cost writes.
    pub record_events: bool,
    /// How filter back-fill shares the writer with writes.
    pub backfill: BackfillPace,
    /// SQLite page cache of the writer, in MiB (4 by default). When a page split reorders
    /// sibling pages, SQLite parks a page under the number of the lock page (byte offset
    /// 1 GiB) for a moment; its cache remembers that as its largest key, and the commit then
    /// trims every page past the end of the file by walking the whole cache: with 64 MiB
    /// (~58,000 pages of 1 KiB) that was 38 % of the writer's time. `epr_sqlite_vfs` wraps the
    /// cache to skip that walk (when it is installed before SQLite starts, as in the server);
    /// a bigger cache then saves page reads but costs as much in lookups, so the default
    /// stayed small. Pages the writer misses come from the operating system's file cache.
    pub cache_mib: u32,
    /// The check of the database file when the store opens.
    pub integrity_check: IntegrityCheck,
    /// Rejected self-registrations kept per application (the oldest go first).
    pub rejections_kept: u64,
}

impl EmbeddedConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_group: 1024,
            readers: 8,
            batch_retention_ms: 7 * 24 * 3_600_000,
            record_events: true,
            backfill: BackfillPace::default(),
            cache_mib: 4,
            integrity_check: IntegrityCheck::default(),
            rejections_kept: epr_core::credentials::REJECTIONS_KEPT,
        }
    }
}

/// The database file in the data directory.
pub const DB_FILE: &str = "epr.sqlite3";
/// 2 added saved filters (tables only); 3 gave token rows an ID, a state and a time of
/// change, and added claim tokens and rejections. Older directories are upgraded in place at
/// open, in one transaction (see [`migrate`]). 4 dropped `filter_matches` (memberships are
/// derived at open); 5 dropped the `endpoints_by_version` index (the listing index answers
/// every query by version, and each registration paid for one more B-tree insert); 6 made
/// the token table a rowid table found by endpoint through its incarnation (a registration
/// appends its token instead of placing it at random twice); 7 dropped `tokens_by_hash` (the
/// token hash index is in memory, rebuilt at open: see [`crate::key_index`]); 8 dropped
/// `endpoints_by_id` (the endpoint ID index is in memory too).
pub(crate) const SCHEMA_VERSION: i64 = 8;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS schema_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints(
    incarnation INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    app TEXT NOT NULL,
    app_version TEXT NOT NULL,
    app_version_registered INTEGER NOT NULL,
    created INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    metadata_updated INTEGER,
    version INTEGER NOT NULL,
    metadata_version INTEGER NOT NULL,
    token_hash BLOB NOT NULL
);
DROP INDEX IF EXISTS endpoints_by_id;
CREATE INDEX IF NOT EXISTS endpoints_by_app ON endpoints(tenant, app, incarnation);
DROP INDEX IF EXISTS endpoints_by_version;
CREATE TABLE IF NOT EXISTS outbox(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings(
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_tasks(
    tenant TEXT NOT NULL,
    task_id TEXT NOT NULL,
    app TEXT NOT NULL,
    created INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY(tenant, task_id)
) WITHOUT ROWID;
";

pub(crate) const ENDPOINT_COLUMNS: &str = "incarnation, endpoint_id, app, app_version, \
    app_version_registered, created, metadata, metadata_updated, version, metadata_version";

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Job {
    /// With a new endpoint's filter matches when it was evaluated before the queue.
    Execute(Command, WriteCtx, Option<Precomputed>, Reply<Effect>),
    Batch(BatchRequest, WriteCtx, Reply<BatchOutcome>),
    Filter(FilterCommand, WriteCtx, Reply<EndpointFilter>),
    OutboxAck(i64, Reply<()>),
    PutSetting(String, String, Reply<()>),
    Import(Vec<ImportRecord>, Reply<Vec<ImportOutcome>>),
    CreateClaims(TenantId, Vec<ClaimToken>, Reply<()>),
    DeleteClaim(TenantId, AppName, ClaimId, Reply<bool>),
    RecordRejection(TenantId, Rejection, Reply<()>),
    PurgeCredentials(TenantId, String, Reply<()>),
    Ping(Reply<()>),
    Shutdown(Reply<()>),
}

/// The embedded store. Cheap to share behind an `Arc`; [`EmbeddedStore::shutdown`] drains
/// the writer.
pub struct EmbeddedStore {
    jobs: mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop_checkpointer: Arc<std::sync::atomic::AtomicBool>,
    waker: Arc<Mutex<Option<OutboxWaker>>>,
    store_id: String,
    /// Whether the file is known to be damaged (then writes are refused).
    health: Arc<StoreHealth>,
    /// The last outbox ID known to be on disk: the relay publishes nothing past it.
    durable_outbox: Arc<AtomicI64>,
    /// The writer's filters, for evaluating new endpoints before they reach the writer.
    filter_view: SharedFilterView,
    /// The data directory lock, released by `shutdown` (or on drop), so the directory can
    /// be opened again in the same process.
    lock: Mutex<Option<DataDirLock>>,
    /// The listing index (application, version, metadata values), kept by the writer.
    index: Arc<MetaIndex>,
    /// Endpoint ID → candidate incarnations (see [`crate::key_index`]), kept by the writer.
    endpoint_keys: Arc<KeyIndex>,
    /// Token hash → candidate token rows, kept by the writer.
    token_keys: Arc<KeyIndex>,
    /// One permit per pooled read connection: reads beyond the pool wait for one instead
    /// of opening (and then closing) a connection of their own, which cost more than a
    /// listing itself (BENCHMARKS.md, issue 13).
    read_slots: Arc<tokio::sync::Semaphore>,
}

pub(crate) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

pub(crate) fn unavailable_msg(msg: impl Into<String>) -> StoreError {
    StoreError::Unavailable(msg.into().into())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `config.data_dir` and starts its writer.
    ///
    /// Takes the data directory's exclusive lock first (see [`crate::lock`]): a directory
    /// already open in this or another process is refused. Then checks the database file
    /// as `config.integrity_check` says and refuses a damaged one. Tools that only read
    /// the database while a server runs (e.g. an online backup) open the file with their
    /// own read-only SQLite connection instead: they need no lock.
    pub fn open(config: EmbeddedConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(unavailable)?;
        let lock = DataDirLock::acquire(&config.data_dir).map_err(unavailable)?;
        let path = config.data_dir.join(DB_FILE);
        // The writer's connection writes its WAL through `epr_sqlite_vfs`: one `pwrite` per
        // commit instead of two per page.
        let vfs = epr_sqlite_vfs::register().map_err(unavailable_msg)?;
        let mut conn =
            Connection::open_with_flags_and_vfs(&path, rusqlite::OpenFlags::default(), vfs)
                .map_err(unavailable)?;
        // Before anything else on this connection: every sync that protects the database file
        // (a checkpoint's) must be marked FULL, which the shim passes through.
        conn.execute_batch("PRAGMA checkpoint_fullfsync=ON; PRAGMA busy_timeout=5000;")
            .map_err(unavailable)?;
        integrity::check_at_open(&conn, &path, config.integrity_check)?;
        // A commit writes the WAL without waiting for the disk: `synchronous=FULL` makes SQLite
        // call the WAL's sync at each commit, which the VFS shim turns into the flush of its
        // buffer only; the syncer thread (see `syncer`) fsyncs the WAL after it and only then
        // answers, so an acknowledged write survives power loss and the writer goes on to the
        // next group meanwhile. `checkpoint_fullfsync` marks the syncs SQLite makes before a
        // checkpoint and of the WAL header when the log is reused, which the shim passes
        // through. Checkpoints run on their own thread (see `checkpointer`), off the commit
        // path; the writer checkpoints itself only if the WAL grows past ~64 MiB.
        conn.execute_batch(
            "PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
             PRAGMA checkpoint_fullfsync=ON; PRAGMA busy_timeout=5000; \
             PRAGMA temp_store=MEMORY; PRAGMA wal_autocheckpoint=65536;",
        )
        .map_err(unavailable)?;
        conn.execute_batch(&format!(
            "PRAGMA cache_size=-{};",
            u64::from(config.cache_mib.max(1)) * 1024
        ))
        .map_err(unavailable)?;
        // The writer runs a few dozen distinct statements; rusqlite keeps 16 by default, and
        // an evicted statement is parsed again on its next use.
        conn.set_prepared_statement_cache_capacity(128);
        migrate(&mut conn)?;
        let token_keys = Arc::new(KeyIndex::default());
        let started = Instant::now();
        sqlite_credentials::load_token_keys(&conn, &token_keys).map_err(unavailable)?;
        tracing::info!(
            tokens = token_keys.len(),
            ms = started.elapsed().as_millis() as u64,
            "token hash index built"
        );
        // A random identity made once per data directory: outbox IDs are unique only within
        // one store, so `{store_id}-{outbox id}` names an event across replicas and restarts.
        conn.execute(
            "INSERT OR IGNORE INTO schema_meta(key, value) VALUES('store_id', abs(random()))",
            [],
        )
        .map_err(unavailable)?;
        let store_id: i64 = conn
            .query_row(
                "SELECT value FROM schema_meta WHERE key='store_id'",
                [],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        let next_incarnation: i64 = conn
            .query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name='endpoints'), 0)",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(unavailable)?
            + 1;
        let readers = Arc::new(ReaderPool {
            id: NEXT_POOL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            path: path.clone(),
            idle: Mutex::new(Vec::new()),
            keep: config.readers,
        });
        let (tx, rx) = mpsc::channel(config.max_group.max(1) * 4);
        let waker: Arc<Mutex<Option<OutboxWaker>>> = Arc::default();
        let index = Arc::new(MetaIndex::default());
        let filter_view = SharedFilterView::default();
        let mut filters = FilterCache::load(&conn, index.clone(), filter_view.clone())?;
        let endpoint_keys = Arc::new(KeyIndex::default());
        build_index(&conn, &index, &endpoint_keys, &mut filters)?;
        let health = Arc::new(StoreHealth::new(path.clone()));
        // The WAL exists once the connection has read in WAL mode (above). What it holds now
        // is made durable before anything is published from it.
        let wal = std::fs::File::open(wal_path(&path)).map_err(|e| {
            unavailable_msg(format!(
                "cannot open the write-ahead log beside {} ({e}); the store needs SQLite's WAL \
                 mode, which some file systems (network mounts) do not support",
                path.display()
            ))
        })?;
        wal.sync_data().map_err(unavailable)?;
        let durable_outbox = Arc::new(AtomicI64::new(
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM outbox", [], |r| r.get(0))
                .map_err(unavailable)?,
        ));
        let (sync_tx, sync_rx) = std::sync::mpsc::channel();
        let syncer_handle = {
            let (health, waker, durable) = (health.clone(), waker.clone(), durable_outbox.clone());
            std::thread::Builder::new()
                .name("epr-store-sync".into())
                .spawn(move || syncer(wal, sync_rx, durable, waker, health))
                .map_err(unavailable)?
        };
        let mut writer = Writer {
            syncer: Some((sync_tx, syncer_handle)),
            health: health.clone(),
            failure_log: LogGate::default(),
            filters,
            index: index.clone(),
            keys: WriterKeys {
                endpoints: KeyJournal::new(endpoint_keys.clone()),
                tokens: KeyJournal::new(token_keys.clone()),
            },
            conn,
            next_incarnation,
            max_group: config.max_group.max(1),
            batch_retention_ms: config.batch_retention_ms,
            record_events: config.record_events,
            backfill: config.backfill,
            rejections_kept: config.rejections_kept,
            last_prune: None,
        };
        let handle = std::thread::Builder::new()
            .name("epr-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(unavailable)?;
        let stop_checkpointer = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpoint_conn = Connection::open_with_flags_and_vfs(
            &path,
            rusqlite::OpenFlags::default(),
            epr_sqlite_vfs::READ_NAME,
        )
        .map_err(unavailable)?;
        checkpoint_conn
            .execute_batch("PRAGMA busy_timeout=5000;")
            .map_err(unavailable)?;
        let stop = stop_checkpointer.clone();
        let ckpt_health = health.clone();
        std::thread::Builder::new()
            .name("epr-store-ckpt".into())
            .spawn(move || checkpointer(checkpoint_conn, stop, ckpt_health))
            .map_err(unavailable)?;
        tracing::info!(path = %path.display(), "embedded store open");
        Ok(Self {
            jobs: tx,
            readers,
            writer: Mutex::new(Some(handle)),
            stop_checkpointer,
            waker,
            store_id: format!("{store_id:x}"),
            health,
            durable_outbox,
            filter_view,
            lock: Mutex::new(Some(lock)),
            index,
            endpoint_keys,
            token_keys,
            read_slots: Arc::new(tokio::sync::Semaphore::new(config.readers.max(1))),
        })
    }

    /// Commits everything queued before this call, then stops the writer and joins it.
    /// Writes sent afterwards fail with [`StoreError::Unavailable`].
    pub async fn shutdown(&self) {
        let _ = self.send(Job::Shutdown).await;
        self.stop_checkpointer
            .store(true, std::sync::atomic::Ordering::Release);
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // Nothing writes any more: the directory may be opened again.
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Sends a job that writes (or checks the writer); refused at once once the database
    /// file is known to be damaged.
    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        if let Some(refused) = self.health.refusal() {
            return Err(refused);
        }
        self.send(make).await
    }

    /// Notes a read's failure (a damaged page latches the corrupted state).
    fn observed<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            self.health.observe(e);
        }
        result
    }

    /// A filter read from its row, with its member count from the in-memory membership.
    fn with_count(&self, tenant: &TenantId, mut f: EndpointFilter) -> EndpointFilter {
        f.matched = self.index.members_count(tenant.as_str(), f.id.as_str());
        f
    }

    async fn send<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(make(tx))
            .await
            .map_err(|_| unavailable_msg("the store is shut down"))?;
        rx.await
            .map_err(|_| unavailable_msg("the store writer stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pool = self.readers.clone();
        let slot = self
            .read_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(unavailable)?;
        let result = tokio::task::spawn_blocking(move || {
            let conn = pool.take()?;
            let result = f(&conn);
            pool.give_back(conn);
            drop(slot);
            result
        })
        .await
        .map_err(unavailable)
        .and_then(|r| r);
        self.observed(result)
    }
}

/// Copies committed WAL frames into the database file in the background, so the writer's
/// commits never wait for a checkpoint. PASSIVE never blocks the writer or readers.
fn checkpointer(
    conn: Connection,
    stop: Arc<std::sync::atomic::AtomicBool>,
    health: Arc<StoreHealth>,
) {
    // A failing checkpoint (a full disk) fails every 100 ms: one line per interval.
    let failure_log = LogGate::default();
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((log, done)) => {
                metrics::gauge!("epr_store_wal_frames").set(log as f64);
                if done > 0 {
                    metrics::histogram!("epr_store_checkpoint_seconds")
                        .record(started.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                health.observe_sqlite(&e);
                if let Some(suppressed) = failure_log.admit(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "background checkpoint failed");
                }
            }
        }
    }
}

/// Reads every endpoint into the (empty) listing index and evaluates every saved filter on
/// it for the memberships (both live in memory only, so every data directory, old ones
/// included, gets them at open).
fn build_index(
    conn: &Connection,
    index: &MetaIndex,
    endpoint_keys: &KeyIndex,
    filters: &mut FilterCache,
) -> Result<(), StoreError> {
    const BATCH: usize = 4096;
    let started = Instant::now();
    let evaluator = filters.evaluator();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {ENDPOINT_COLUMNS}, tenant FROM endpoints ORDER BY incarnation"
        ))
        .map_err(unavailable)?;
    let mut rows = stmt.query([]).map_err(unavailable)?;
    let mut n = 0u64;
    let mut mine = sqlite_filters::Found::default();
    let mut ids = Vec::new();
    // Every filter is evaluated on every endpoint (a million endpoints and 100 filters: 100
    // million evaluations), so a helper thread takes every other batch: it evaluates the
    // filters on it and adds it to the index while this thread reads and parses the rows.
    let theirs = std::thread::scope(|scope| -> Result<sqlite_filters::Found, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<IndexChange>>(2);
        let evaluator = &evaluator;
        let helper = std::thread::Builder::new()
            .name("epr-store-open".into())
            .spawn_scoped(scope, move || {
                let mut found = sqlite_filters::Found::default();
                for mut batch in rx {
                    open_batch(evaluator, index, &mut batch, &mut found);
                }
                found
            })
            .map_err(unavailable)?;
        let here = |batch: &mut Vec<IndexChange>, found: &mut sqlite_filters::Found| {
            open_batch(evaluator, index, batch, found)
        };
        let mut batch = Vec::with_capacity(BATCH);
        let mut to_helper = false;
        while let Some(row) = rows.next().map_err(unavailable)? {
            let ep = endpoint_from_row(row).map_err(unavailable)?;
            let tenant: String = row.get(10).map_err(unavailable)?;
            let tenant = TenantId::parse(&tenant).map_err(|e| unavailable_msg(e.to_string()))?;
            ids.push((
                endpoint_key(endpoint_keys, tenant.as_str(), ep.id.as_str()),
                ep.incarnation,
            ));
            batch.push(IndexChange {
                tenant,
                old: None,
                new: Some(ep),
            });
            n += 1;
            if batch.len() == BATCH {
                if to_helper {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    if let Err(back) = tx.send(full) {
                        // The helper is gone (it panicked): this thread does the batch.
                        let mut back = back.0;
                        here(&mut back, &mut mine);
                    }
                } else {
                    here(&mut batch, &mut mine);
                }
                to_helper = !to_helper;
            }
        }
        here(&mut batch, &mut mine);
        drop(tx);
        helper
            .join()
            .map_err(|_| unavailable_msg("the store's open-time evaluation thread panicked"))
    })?;
    endpoint_keys.extend(ids);
    filters.add_found(mine);
    filters.add_found(theirs);
    index.apply_members(&filters.take_staged());
    filters.all_seen();
    tracing::info!(
        endpoints = n,
        filters = filters.len(),
        ms = started.elapsed().as_millis() as u64,
        "listing index and filter memberships built"
    );
    Ok(())
}

/// At open: one batch of stored endpoints evaluated by every filter and added to the
/// listing index (the batch is left empty).
fn open_batch(
    evaluator: &sqlite_filters::FilterView,
    index: &MetaIndex,
    batch: &mut Vec<IndexChange>,
    found: &mut sqlite_filters::Found,
) {
    for c in batch.iter() {
        if let Some(ep) = &c.new {
            evaluator.evaluate_stored(found, &c.tenant, ep);
        }
    }
    index.apply(batch);
    batch.clear();
}

/// Creates or upgrades the schema, all in one transaction: an upgrade that fails leaves the
/// directory as it was.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )
    .map_err(unavailable)?;
    let found: Option<i64> = tx
        .query_row(
            "SELECT value FROM schema_meta WHERE key='schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    match found {
        None | Some(SCHEMA_VERSION) => {}
        // 1 → 2 only added tables (created below); 2 → 3 rebuilds the token table before the
        // new schema's indexes name its new columns; 3 → 4 drops `filter_matches` (the
        // filters' schema below: memberships are derived at open); 4 → 5 drops
        // `endpoints_by_version` (the schema below); 5 → 6 rebuilds the token table again;
        // 6 → 7 drops `tokens_by_hash` (the credentials' schema below), 7 → 8
        // `endpoints_by_id` (the schema below).
        Some(v @ (1..=7)) => {
            if v <= 2 {
                tx.execute_batch(sqlite_credentials::UPGRADE_TOKENS_TO_V3)
                    .map_err(unavailable)?;
            }
            if v <= 5 {
                tx.execute_batch(sqlite_credentials::UPGRADE_TOKENS_TO_V6)
                    .map_err(unavailable)?;
            }
            tracing::info!(from = v, to = SCHEMA_VERSION, "schema upgraded");
        }
        Some(v) => {
            return Err(unavailable_msg(format!(
                "the data directory holds schema version {v}, this build knows {SCHEMA_VERSION}"
            )))
        }
    }
    for schema in [SCHEMA, sqlite_filters::SCHEMA, sqlite_credentials::SCHEMA] {
        tx.execute_batch(schema).map_err(unavailable)?;
    }
    if found != Some(SCHEMA_VERSION) {
        tx.execute(
            "INSERT INTO schema_meta(key, value) VALUES('schema_version', ?1) \
             ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            [SCHEMA_VERSION],
        )
        .map_err(unavailable)?;
    }
    tx.commit().map_err(unavailable)
}

/// Read-only connections, opened on demand and kept up to `keep`, plus one per runtime
/// thread for point reads.
struct ReaderPool {
    id: u64,
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    keep: usize,
}

static NEXT_POOL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static LOCAL_READERS: std::cell::RefCell<std::collections::HashMap<u64, Connection>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

impl ReaderPool {
    fn with_local<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        LOCAL_READERS.with(|cell| {
            let mut map = cell.borrow_mut();
            let conn = match map.entry(self.id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(open_reader(&self.path)?),
            };
            f(conn)
        })
    }

    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        open_reader(&self.path)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.keep {
            idle.push(conn);
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    // Through the shim's read VFS (registered by `EmbeddedStore::open`), as every connection of
    // the store: its read locks linger in the process instead of costing two `fcntl`s per read
    // (`epr_sqlite_vfs`, module `shm`).
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        epr_sqlite_vfs::READ_NAME,
    )
    .map_err(unavailable)?;
    conn.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=1;")
        .map_err(unavailable)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// The text of column `i`, borrowed from the row: every read and write loads a row, and a
/// `String` per column would be copied once more by the parsing newtypes.
fn text_at<'r>(row: &'r Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(i)?.as_str().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(crate) fn endpoint_from_row(row: &Row<'_>) -> rusqlite::Result<Endpoint> {
    let text = |i: usize| text_at(row, i);
    let corrupt = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let metadata: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text(6)?).map_err(|e| corrupt(6, e.to_string()))?;
    Ok(Endpoint {
        incarnation: row.get(0)?,
        id: EndpointId::parse(text(1)?).map_err(|e| corrupt(1, e.to_string()))?,
        app: AppName::parse(text(2)?).map_err(|e| corrupt(2, e.to_string()))?,
        app_version: AppVersionName::parse(text(3)?).map_err(|e| corrupt(3, e.to_string()))?,
        app_version_registered: Timestamp(row.get(4)?),
        created: Timestamp(row.get(5)?),
        metadata: Metadata::from_stored(metadata),
        metadata_updated: row.get::<_, Option<i64>>(7)?.map(Timestamp),
        version: row.get::<_, i64>(8)? as u64,
        metadata_version: row.get::<_, i64>(9)? as u64,
    })
}

/// An endpoint's key in the endpoint ID index.
pub(crate) fn endpoint_key(keys: &KeyIndex, tenant: &str, id: &str) -> u64 {
    keys.key(&[tenant.as_bytes(), id.as_bytes()])
}

/// An endpoint by ID, found through the endpoint ID index (each candidate checked in
/// `conn`'s snapshot: see [`KeyIndex::find`]).
pub(crate) fn load(
    conn: &Connection,
    keys: &KeyIndex,
    tenant: &str,
    id: &str,
) -> rusqlite::Result<Option<Endpoint>> {
    // A literal (not format!) so the hot path does not allocate to find its statement.
    const LOAD: &str = "SELECT incarnation, endpoint_id, app, app_version, \
        app_version_registered, created, metadata, metadata_updated, version, metadata_version \
        FROM endpoints WHERE incarnation=?1 AND tenant=?2 AND endpoint_id=?3";
    debug_assert!(LOAD.contains(ENDPOINT_COLUMNS));
    keys.find(endpoint_key(keys, tenant, id), |inc| {
        conn.prepare_cached(LOAD)?
            .query_row(params![inc, tenant, id], endpoint_from_row)
            .optional()
    })
}

/// The single writer. Owns the read-write connection.
struct Writer {
    conn: Connection,
    /// Where committed groups go to be made durable and answered (see [`syncer`]); taken
    /// and joined when the writer stops.
    syncer: Option<(
        std::sync::mpsc::Sender<Durable>,
        std::thread::JoinHandle<()>,
    )>,
    next_incarnation: i64,
    max_group: usize,
    batch_retention_ms: i64,
    record_events: bool,
    last_prune: Option<Instant>,
    /// Every saved filter, compiled; mirrors the committed `filters` rows.
    filters: FilterCache,
    /// The listing index: a group's changes are applied once it committed.
    index: Arc<MetaIndex>,
    /// The endpoint ID and token hash indexes, with this group's changes to them.
    keys: WriterKeys,
    backfill: BackfillPace,
    rejections_kept: u64,
    health: Arc<StoreHealth>,
    /// Failed groups are logged once per interval (a full disk fails every group).
    failure_log: LogGate,
}

/// A job's answer, held until the group commits.
enum Pending {
    Effect(Reply<Effect>, Result<Effect, StoreError>),
    Filter(Reply<EndpointFilter>, Result<EndpointFilter, StoreError>),
    Batch(Reply<BatchOutcome>, Result<BatchOutcome, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Bool(Reply<bool>, Result<bool, StoreError>),
    Import(
        Reply<Vec<ImportOutcome>>,
        Result<Vec<ImportOutcome>, StoreError>,
    ),
}

impl Pending {
    /// A store failure (not a domain refusal), which aborts the group.
    fn unexpected_error(&self) -> Option<&StoreError> {
        let err = match self {
            Self::Effect(_, Err(e)) => e,
            Self::Filter(_, Err(e)) => e,
            Self::Batch(_, Err(e)) => e,
            Self::Unit(_, Err(e)) => e,
            Self::Bool(_, Err(e)) => e,
            Self::Import(_, Err(e)) => e,
            _ => return None,
        };
        match err {
            StoreError::Unavailable(_) => Some(err),
            StoreError::Rejected(_) => None,
        }
    }

    fn fail(self, msg: &str) {
        let err = || unavailable_msg(msg.to_owned());
        match self {
            Self::Effect(r, _) => drop(r.send(Err(err()))),
            Self::Filter(r, _) => drop(r.send(Err(err()))),
            Self::Batch(r, _) => drop(r.send(Err(err()))),
            Self::Unit(r, _) => drop(r.send(Err(err()))),
            Self::Bool(r, _) => drop(r.send(Err(err()))),
            Self::Import(r, _) => drop(r.send(Err(err()))),
        }
    }

    fn deliver(self) {
        match self {
            Self::Effect(r, v) => drop(r.send(v)),
            Self::Filter(r, v) => drop(r.send(v)),
            Self::Batch(r, v) => drop(r.send(v)),
            Self::Unit(r, v) => drop(r.send(v)),
            Self::Bool(r, v) => drop(r.send(v)),
            Self::Import(r, v) => drop(r.send(v)),
        }
    }
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Job>) {
        let mut stop = false;
        while !stop {
            // Back-fill runs only while no write is waiting, one bounded step at a time (and
            // not at all on a damaged file).
            let first = if self.filters.backfill_pending() && self.health.corrupted().is_none() {
                match rx.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.backfill_step();
                        if !self.backfill.pause.is_zero() {
                            std::thread::sleep(self.backfill.pause);
                        }
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            } else {
                match rx.blocking_recv() {
                    Some(job) => job,
                    None => break,
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < self.max_group {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            stop = jobs.iter().any(|j| matches!(j, Job::Shutdown(_)));
            self.commit_group(jobs);
        }
        // Every committed group is synced and answered before the final checkpoint.
        if let Some((tx, handle)) = self.syncer.take() {
            drop(tx);
            let _ = handle.join();
        }
        // A clean stop folds the WAL into the database file, so the file alone holds every
        // commit (for copies and checks) and the next start replays nothing.
        // The checkpoint answers "busy" (and folds nothing) while the background
        // checkpointer or a reader holds the WAL, so it is retried for a moment.
        if self.health.corrupted().is_none() {
            // No busy waits inside SQLite: a reader beside the server (an online backup or
            // export) may hold the WAL for long, and shutdown must not wait for it.
            let _ = self.conn.execute_batch("PRAGMA busy_timeout=0;");
            let mut outcome = Ok(1);
            for _ in 0..100 {
                outcome = self
                    .conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        r.get::<_, i64>(0)
                    });
                if !matches!(outcome, Ok(busy) if busy != 0) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            match outcome {
                Ok(0) => {}
                Ok(_) => tracing::warn!("final checkpoint stayed busy; the WAL is kept"),
                Err(e) => tracing::warn!(error = %e, "final checkpoint failed; the WAL is kept"),
            }
        }
        tracing::info!("embedded store writer stopped");
    }

    fn commit_group(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        let size = jobs.len();
        // Jobs queued before the damage was found: nothing more goes into the file.
        if let Some(reason) = self.health.corrupted() {
            for job in jobs {
                match job {
                    Job::Shutdown(reply) => drop(reply.send(Ok(()))),
                    job => reply_unavailable(job, reason),
                }
            }
            return;
        }
        let mut pending = Vec::with_capacity(size);
        let tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => {
                self.health.observe_sqlite(&e);
                if let Some(suppressed) = self.failure_log.admit(Instant::now()) {
                    tracing::error!(error = %e, suppressed, "cannot begin a write transaction");
                }
                for job in jobs {
                    reply_unavailable(job, &e.to_string());
                }
                return;
            }
        };
        // Commands check every rule before their first write, so a refused command leaves
        // nothing behind and needs no savepoint. An unexpected SQLite error mid-command
        // aborts the whole group: nothing in it was acknowledged, all of it is rolled back.
        let mut failure: Option<String> = None;
        let mut appended = false;
        let mut changes: Vec<IndexChange> = Vec::new();
        for job in jobs {
            if let Some(msg) = &failure {
                reply_unavailable(job, msg);
                continue;
            }
            appended |= matches!(job, Job::Execute(..) | Job::Batch(..) | Job::Filter(..));
            let outcome = match job {
                Job::Execute(cmd, ctx, precomputed, reply) => {
                    let inc = self.next_incarnation;
                    self.next_incarnation += 1;
                    let result = execute(
                        &tx,
                        &mut self.filters,
                        &mut self.keys,
                        &mut changes,
                        &cmd,
                        &ctx,
                        inc,
                        self.record_events,
                        precomputed.as_ref(),
                    );
                    Pending::Effect(reply, result)
                }
                Job::Batch(batch, ctx, reply) => {
                    let result = register_batch(
                        &tx,
                        &mut self.filters,
                        &mut self.keys,
                        &mut changes,
                        batch,
                        &ctx,
                        &mut self.next_incarnation,
                        self.record_events,
                    );
                    Pending::Batch(reply, result)
                }
                Job::Filter(cmd, ctx, reply) => {
                    let mut events = Vec::new();
                    let result = self
                        .filters
                        .execute(&tx, &cmd, &ctx, self.next_incarnation - 1, &mut events)
                        .and_then(|f| {
                            if self.record_events {
                                append_events(&tx, &events).map_err(unavailable)?;
                            }
                            Ok(f)
                        });
                    Pending::Filter(reply, result)
                }
                Job::OutboxAck(last, reply) => Pending::Unit(reply, outbox_delete(&tx, last)),
                Job::PutSetting(key, value, reply) => {
                    Pending::Unit(reply, put_setting(&tx, &key, &value))
                }
                Job::Import(records, reply) => {
                    let result = crate::sqlite_export::import(
                        &tx,
                        &mut self.filters,
                        &mut self.keys,
                        &mut changes,
                        records,
                        &mut self.next_incarnation,
                    );
                    Pending::Import(reply, result)
                }
                Job::CreateClaims(tenant, claims, reply) => Pending::Unit(
                    reply,
                    sqlite_credentials::create_claims(&tx, tenant.as_str(), &claims),
                ),
                Job::DeleteClaim(tenant, app, id, reply) => Pending::Bool(
                    reply,
                    sqlite_credentials::delete_claim(
                        &tx,
                        tenant.as_str(),
                        app.as_str(),
                        id.as_str(),
                    ),
                ),
                Job::RecordRejection(tenant, rejection, reply) => Pending::Unit(
                    reply,
                    sqlite_credentials::record_rejection(
                        &tx,
                        tenant.as_str(),
                        &rejection,
                        self.rejections_kept,
                    ),
                ),
                Job::PurgeCredentials(tenant, prefix, reply) => Pending::Unit(
                    reply,
                    sqlite_credentials::purge_tenant(&tx, tenant.as_str(), &prefix),
                ),
                Job::Ping(reply) | Job::Shutdown(reply) => Pending::Unit(reply, Ok(())),
            };
            match outcome.unexpected_error() {
                Some(err) => {
                    self.health.observe(err);
                    let msg = err.to_string();
                    outcome.fail(&msg);
                    failure = Some(msg);
                }
                None => pending.push(outcome),
            }
        }
        if let Some(msg) = failure {
            if let Some(suppressed) = self.failure_log.admit(Instant::now()) {
                tracing::error!(error = %msg, suppressed, "write group aborted");
            }
            drop(tx); // rolls back
            self.keys.rolled_back();
            pending.into_iter().for_each(|p| p.fail(&msg));
            self.reload_filters();
            return;
        }
        if self
            .last_prune
            .is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
        {
            self.last_prune = Some(Instant::now());
            let cutoff = now_millis() - self.batch_retention_ms;
            if let Err(e) = tx.execute("DELETE FROM batch_tasks WHERE created < ?1", [cutoff]) {
                // A damaged page found here latches the corrupted state like any other.
                self.health.observe(&unavailable(e));
                tracing::warn!("pruning old batch outcomes failed");
            }
        }
        match tx.commit() {
            Ok(()) => {
                self.keys.committed();
                // Before any answer: a listing started after an acknowledged write sees it.
                self.index.apply(&changes);
                self.index.apply_members(&self.filters.take_staged());
                let outbox_through = if appended && self.record_events {
                    self.last_outbox_id()
                } else {
                    None
                };
                self.make_durable(Durable {
                    pending,
                    outbox_through,
                });
            }
            Err(e) => {
                self.health.observe_sqlite(&e);
                if let Some(suppressed) = self.failure_log.admit(Instant::now()) {
                    tracing::error!(error = %e, suppressed, "group commit failed");
                }
                let msg = format!("commit failed: {e}");
                self.keys.rolled_back();
                pending.into_iter().for_each(|p| p.fail(&msg));
                self.reload_filters();
            }
        }
        metrics::histogram!("epr_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("epr_store_commit_group_size").record(size as f64);
    }
}

impl Writer {
    /// Makes the filter cache match the committed rows again after a rollback.
    fn reload_filters(&mut self) {
        match FilterCache::load(&self.conn, self.index.clone(), self.filters.view()) {
            Ok(cache) => self.filters = cache,
            // Keep the old copy: the next group's reads of stored membership still hold.
            Err(e) => tracing::error!(error = %e, "reloading filters after a rollback failed"),
        }
    }

    /// One bounded step of filter back-fill in its own transaction. Nothing acknowledged
    /// waits for it: the rows and the cursor commit together, and only its events go through
    /// the syncer (none is published before it is on disk). A step lost to power loss is
    /// simply done again.
    fn backfill_step(&mut self) {
        let result = (|| -> Result<bool, StoreError> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let mut events = Vec::new();
            self.filters
                .backfill_step(&tx, self.backfill, Timestamp(now_millis()), &mut events)?;
            // Before the commit: a back-fill's matches describe rows already committed (the
            // writer is their only writer), so they hold whether or not this step commits,
            // and a reader that sees the filter `active` finds its whole membership.
            self.index.apply_members(&self.filters.take_staged());
            if self.record_events {
                append_events(&tx, &events).map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(!events.is_empty())
        })();
        match result {
            Ok(true) if self.record_events => {
                let outbox_through = self.last_outbox_id();
                self.make_durable(Durable {
                    pending: Vec::new(),
                    outbox_through,
                });
            }
            Ok(_) => {}
            Err(e) => {
                self.health.observe(&e);
                if let Some(suppressed) = self.failure_log.admit(Instant::now()) {
                    tracing::error!(
                        error = %e,
                        suppressed,
                        "filter back-fill step failed; retrying in 1 s"
                    );
                }
                self.reload_filters();
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// The newest outbox row, read after a commit that may have appended events.
    fn last_outbox_id(&self) -> Option<i64> {
        match self.conn.query_row("SELECT MAX(id) FROM outbox", [], |r| {
            r.get::<_, Option<i64>>(0)
        }) {
            Ok(id) => id,
            Err(e) => {
                // The events stay unpublished until a later commit names a newer row.
                tracing::warn!(error = %e, "reading the outbox's last ID failed");
                None
            }
        }
    }

    /// Hands a committed group to the syncer, which answers it once the WAL is on disk.
    fn make_durable(&self, group: Durable) {
        match &self.syncer {
            Some((tx, _)) => {
                if let Err(std::sync::mpsc::SendError(group)) = tx.send(group) {
                    // The syncer stopped (it panicked): nothing can be confirmed any more.
                    let msg = "the store's syncer stopped; the write's durability is unknown";
                    group.pending.into_iter().for_each(|p| p.fail(msg));
                }
            }
            None => {
                let msg = "the store is stopping";
                group.pending.into_iter().for_each(|p| p.fail(msg));
            }
        }
    }
}

/// A committed group on its way to the disk: its answers, and the last outbox row it wrote.
struct Durable {
    pending: Vec<Pending>,
    outbox_through: Option<i64>,
}

/// Makes committed groups durable: one `fdatasync` of the WAL covers every group committed
/// before it, so while it runs the writer commits the next groups, and the next sync takes
/// them all. Only then are the groups answered and their events released to the relay.
/// A failed sync leaves the commits' fate on disk unknown: their writers get `503`, and
/// writes are refused from then on (the kernel may have dropped the pages it failed to
/// write, so a later sync succeeding would prove nothing).
fn syncer(
    wal: std::fs::File,
    rx: std::sync::mpsc::Receiver<Durable>,
    durable_outbox: Arc<AtomicI64>,
    waker: Arc<Mutex<Option<OutboxWaker>>>,
    health: Arc<StoreHealth>,
) {
    // Once a sync failed, every later group fails too: the WAL may lack frames the kernel
    // dropped, and recovery stops at the first missing frame.
    let mut failure: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut groups = vec![first];
        groups.extend(rx.try_iter());
        // Groups committed before a damaged page was found elsewhere are still synced and
        // answered: their commits succeeded.
        if failure.is_none() {
            let started = Instant::now();
            let synced = wal.sync_data();
            metrics::histogram!("epr_store_sync_seconds").record(started.elapsed().as_secs_f64());
            if let Err(e) = synced {
                let reason = format!("syncing the write-ahead log to disk failed: {e}");
                health.refuse_writes(&reason);
                failure = Some(reason);
            }
        }
        if let Some(reason) = &failure {
            for group in groups {
                group.pending.into_iter().for_each(|p| p.fail(reason));
            }
            continue;
        }
        let mut events = false;
        for group in groups {
            if let Some(id) = group.outbox_through {
                durable_outbox.fetch_max(id, Ordering::AcqRel);
                events = true;
            }
            group.pending.into_iter().for_each(Pending::deliver);
        }
        if events {
            let waker = waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(wake) = waker {
                wake();
            }
        }
    }
}

/// The WAL file SQLite keeps beside the database file.
fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn reply_unavailable(job: Job, msg: &str) {
    let err = || unavailable_msg(msg.to_owned());
    match job {
        Job::Execute(_, _, _, r) => drop(r.send(Err(err()))),
        Job::Batch(_, _, r) => drop(r.send(Err(err()))),
        Job::Filter(_, _, r) => drop(r.send(Err(err()))),
        Job::Import(_, r) => drop(r.send(Err(err()))),
        Job::DeleteClaim(_, _, _, r) => drop(r.send(Err(err()))),
        Job::OutboxAck(_, r)
        | Job::PutSetting(_, _, r)
        | Job::CreateClaims(_, _, r)
        | Job::RecordRejection(_, _, r)
        | Job::PurgeCredentials(_, _, r)
        | Job::Ping(r)
        | Job::Shutdown(r) => drop(r.send(Err(err()))),
    }
}

#[allow(clippy::too_many_arguments)]
fn execute(
    conn: &Connection,
    filters: &mut FilterCache,
    keys: &mut WriterKeys,
    changes: &mut Vec<IndexChange>,
    cmd: &Command,
    ctx: &WriteCtx,
    incarnation: i64,
    record_events: bool,
    precomputed: Option<&Precomputed>,
) -> Result<Effect, StoreError> {
    let tenant = ctx.tenant.as_str();
    let endpoint_id = cmd.endpoint_id();
    let current =
        load(conn, keys.endpoints.index(), tenant, endpoint_id.as_str()).map_err(unavailable)?;
    // The state before the write, for membership changes (only where filters exist).
    let old = current
        .as_ref()
        .filter(|e| filters.has_filters(&ctx.tenant, &e.app))
        .cloned();
    // The listing index needs the state before an update (kept only if one happens).
    let before = current.clone();
    let loaded = Loaded {
        // Tokens belong to an endpoint that exists (unregistering deletes them).
        tokens: match (&before, cmd.needs_tokens()) {
            (Some(ep), true) => sqlite_credentials::endpoint_tokens(conn, tenant, ep.incarnation)
                .map_err(unavailable)?,
            _ => Vec::new(),
        },
        claim: match cmd.claim() {
            Some((app, hash)) => sqlite_credentials::find_claim(conn, tenant, app.as_str(), hash)
                .map_err(unavailable)?,
            None => None,
        },
    };
    let plan = plan(current, &loaded, cmd, ctx, incarnation)?;
    // The last rule: a new token's hash (and ID) is free. A single new token is checked by
    // its own insert, made the command's first write: a taken hash or ID fails just that
    // statement (SQLite undoes it), so the command is refused with nothing written, and no
    // probe walks the token indexes first. Several are checked before any write.
    let new_tokens = plan
        .tokens
        .ops
        .iter()
        .filter(|op| matches!(op, TokenOp::Insert(_)))
        .count();
    if new_tokens > 1 {
        for op in &plan.tokens.ops {
            if let TokenOp::Insert(token) = op {
                sqlite_credentials::check_new_token(conn, keys.tokens.index(), tenant, token)?;
            }
        }
    }
    // The endpoint's incarnation after the command (a registration's new one).
    let owner = plan.effect.endpoint().incarnation;
    for op in &plan.tokens.ops {
        if let TokenOp::Insert(token) = op {
            if new_tokens == 1 {
                sqlite_credentials::insert_new_token(conn, &mut keys.tokens, tenant, owner, token)?;
            } else {
                // Checked above; a failure now (two of them alike) must not leave the first
                // behind under a refusal: it aborts the group instead.
                sqlite_credentials::insert_token(conn, &mut keys.tokens, tenant, owner, token)
                    .map_err(unavailable)?;
            }
        }
    }
    let change = match &plan.effect {
        Effect::Insert(ep) => Some(IndexChange {
            tenant: ctx.tenant.clone(),
            old: None,
            new: Some(ep.clone()),
        }),
        Effect::Update(ep)
            if before
                .as_ref()
                .is_none_or(|b| b.app_version != ep.app_version || b.metadata != ep.metadata) =>
        {
            Some(IndexChange {
                tenant: ctx.tenant.clone(),
                old: before,
                new: Some(ep.clone()),
            })
        }
        Effect::Delete(ep) => Some(IndexChange {
            tenant: ctx.tenant.clone(),
            old: Some(ep.clone()),
            new: None,
        }),
        Effect::Update(_) | Effect::Unchanged(_) => None,
    };
    match &plan.effect {
        Effect::Insert(ep) => {
            let reg = cmd
                .registration()
                .ok_or_else(|| unavailable_msg("plan inserted for a non-registration command"))?;
            insert_endpoint_row(conn, &mut keys.endpoints, tenant, ep, &reg.token_hash)
                .map_err(unavailable)?;
        }
        Effect::Update(ep) => {
            conn.prepare_cached(
                "UPDATE endpoints SET app_version=?3, app_version_registered=?4, metadata=?5, \
                 metadata_updated=?6, version=?7, metadata_version=?8 WHERE tenant=?1 AND incarnation=?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    tenant,
                    ep.incarnation,
                    ep.app_version.as_str(),
                    ep.app_version_registered.0,
                    ep.metadata.to_json_string(),
                    ep.metadata_updated.map(|t| t.0),
                    ep.version as i64,
                    ep.metadata_version as i64
                ])
            })
            .map_err(unavailable)?;
        }
        Effect::Delete(ep) => {
            conn.prepare_cached("DELETE FROM endpoints WHERE tenant=?1 AND incarnation=?2")
                .and_then(|mut s| s.execute(params![tenant, ep.incarnation]))
                .map_err(unavailable)?;
            let key = endpoint_key(keys.endpoints.index(), tenant, ep.id.as_str());
            keys.endpoints.deleted(key, ep.incarnation);
        }
        Effect::Unchanged(_) => {}
    }
    // The inserts went in first (above).
    sqlite_credentials::apply_ops(
        conn,
        &mut keys.tokens,
        tenant,
        endpoint_id,
        owner,
        &plan.tokens.ops,
    )
    .map_err(unavailable)?;
    if let Some((hash, used)) = &plan.tokens.claim_used {
        let app = &plan.effect.endpoint().app;
        sqlite_credentials::mark_claim_used(conn, tenant, app.as_str(), hash, used)
            .map_err(unavailable)?;
    }
    let changed_keys = plan.changed_metadata_keys(cmd);
    // The endpoint's own events first, then its membership events (built only when they
    // are recorded: with 100 filters that is a few dozen events per registration).
    let mut membership = Vec::new();
    filters.match_endpoint(
        &plan.effect,
        old.as_ref(),
        changed_keys.as_ref(),
        ctx,
        record_events.then_some(&mut membership),
        precomputed,
    )?;
    if record_events {
        // Then the token events.
        let events: Vec<OutboxEvent> = plan
            .events
            .into_iter()
            .map(OutboxEvent::from)
            .chain(membership)
            .chain(plan.tokens.events.into_iter().map(OutboxEvent::from))
            .collect();
        append_events(conn, &events).map_err(unavailable)?;
    }
    // Only now: a refused command changes nothing, the index included.
    changes.extend(change);
    Ok(plan.effect)
}

/// The endpoint row (registration and import share it).
pub(crate) fn insert_endpoint_row(
    conn: &Connection,
    keys: &mut KeyJournal,
    tenant: &str,
    ep: &Endpoint,
    token_hash: &epr_core::ids::TokenHash,
) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO endpoints(tenant, {ENDPOINT_COLUMNS}, token_hash) \
         VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"
    ))?
    .execute(params![
        tenant,
        ep.incarnation,
        ep.id.as_str(),
        ep.app.as_str(),
        ep.app_version.as_str(),
        ep.app_version_registered.0,
        ep.created.0,
        ep.metadata.to_json_string(),
        ep.metadata_updated.map(|t| t.0),
        ep.version as i64,
        ep.metadata_version as i64,
        &token_hash.0[..]
    ])?;
    keys.inserted(
        endpoint_key(keys.index(), tenant, ep.id.as_str()),
        ep.incarnation,
    );
    Ok(())
}

fn append_events(conn: &Connection, events: &[OutboxEvent]) -> rusqlite::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached("INSERT INTO outbox(event) VALUES(?1)")?;
    for e in events {
        stmt.execute([codec::encode_outbox(e)])?;
    }
    Ok(())
}

fn put_setting(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO settings(key, value, updated) VALUES(?1, ?2, ?3) \
         ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated=excluded.updated",
    )
    .and_then(|mut s| s.execute(params![key, value, now_millis()]))
    .map(|_| ())
    .map_err(unavailable)
}

fn outbox_delete(conn: &Connection, through: i64) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM outbox WHERE id<=?1")
        .and_then(|mut s| s.execute([through]))
        .map(|_| ())
        .map_err(unavailable)
}

#[allow(clippy::too_many_arguments)]
fn register_batch(
    conn: &Connection,
    filters: &mut FilterCache,
    keys: &mut WriterKeys,
    changes: &mut Vec<IndexChange>,
    batch: BatchRequest,
    ctx: &WriteCtx,
    next_incarnation: &mut i64,
    record_events: bool,
) -> Result<BatchOutcome, StoreError> {
    let mut outcome = BatchOutcome {
        task_id: batch.task_id,
        app: batch.app,
        created_at: ctx.now,
        created: Vec::new(),
        failed: Vec::new(),
    };
    for (index, item) in batch.items.into_iter().enumerate() {
        let result = match item.registration {
            Err(reason) => Err(reason),
            Ok(reg) => {
                let inc = *next_incarnation;
                *next_incarnation += 1;
                let cmd = Command::Register(reg);
                match execute(
                    conn,
                    filters,
                    keys,
                    changes,
                    &cmd,
                    ctx,
                    inc,
                    record_events,
                    None,
                ) {
                    Ok(effect) => Ok(effect),
                    Err(StoreError::Rejected(e)) => Err(e.to_string()),
                    Err(e) => return Err(e),
                }
            }
        };
        match result {
            Ok(effect) => {
                let ep = effect.endpoint();
                outcome.created.push(BatchCreated {
                    index,
                    endpoint_id: ep.id.clone(),
                    metadata: ep.metadata.clone(),
                });
            }
            Err(reason) => outcome.failed.push(BatchFailed {
                index,
                endpoint_id: item.endpoint_id,
                metadata_text: item.metadata_text,
                reason,
            }),
        }
    }
    conn.execute(
        "INSERT INTO batch_tasks(tenant, task_id, app, created, outcome) VALUES(?1,?2,?3,?4,?5)",
        params![
            ctx.tenant.as_str(),
            outcome.task_id,
            outcome.app.as_str(),
            ctx.now.0,
            codec::encode_outcome(&outcome)
        ],
    )
    .map_err(unavailable)?;
    Ok(outcome)
}

/// SQL condition and parameters for the parts of a query SQLite can evaluate. A query by
/// endpoint IDs also names the incarnations the endpoint ID index gives for them
/// (`candidates`), so SQLite reads those rows by key instead of scanning the tenant's.
fn where_clause(tenant: &TenantId, q: &EndpointQuery, candidates: &[i64]) -> (String, Vec<String>) {
    let mut sql = String::from("tenant=?1");
    let mut args = vec![tenant.to_string()];
    if let Some(app) = &q.app {
        args.push(app.to_string());
        sql.push_str(&format!(" AND app=?{}", args.len()));
    }
    if let Some(v) = &q.app_version {
        args.push(v.to_string());
        sql.push_str(&format!(" AND app_version=?{}", args.len()));
    }
    if !q.endpoint_ids.is_empty() {
        let mut marks = Vec::new();
        for id in &q.endpoint_ids {
            args.push(id.to_string());
            marks.push(format!("?{}", args.len()));
        }
        sql.push_str(&format!(" AND endpoint_id IN ({})", marks.join(",")));
        let incs: Vec<String> = candidates.iter().map(i64::to_string).collect();
        sql.push_str(&format!(" AND incarnation IN ({})", incs.join(",")));
    }
    (sql, args)
}

fn list(
    conn: &Connection,
    index: &MetaIndex,
    keys: &KeyIndex,
    tenant: &TenantId,
    q: &EndpointQuery,
    page: PageRequest,
) -> rusqlite::Result<Page<Endpoint>> {
    if MetaIndex::serves(q) {
        return list_indexed(conn, index, tenant, q, page);
    }
    // By endpoint IDs: SQL narrows to those few rows. If their candidates changed while the
    // query ran (a commit replaced one of the endpoints), it runs again with the new ones, so
    // an endpoint replaced in one commit is not left out (as in `KeyIndex::find`).
    let candidates = || {
        let mut all: Vec<i64> = q
            .endpoint_ids
            .iter()
            .flat_map(|id| keys.candidates(endpoint_key(keys, tenant.as_str(), id.as_str())))
            .collect();
        all.sort_unstable();
        all
    };
    let mut found = candidates();
    for _ in 0..8 {
        let page = list_rows(conn, index, tenant, q, page, &found)?;
        let again = candidates();
        if again == found {
            return Ok(page);
        }
        found = again;
    }
    list_rows(conn, index, tenant, q, page, &found)
}

/// [`list`]'s SQL part, given the candidate incarnations of the queried endpoint IDs.
fn list_rows(
    conn: &Connection,
    index: &MetaIndex,
    tenant: &TenantId,
    q: &EndpointQuery,
    page: PageRequest,
    candidates: &[i64],
) -> rusqlite::Result<Page<Endpoint>> {
    let (cond, args) = where_clause(tenant, q, candidates);
    let after = page.after.unwrap_or(i64::MIN);
    if q.metadata.is_empty() && q.filter.is_none() {
        let total: i64 = conn
            .prepare_cached(&format!("SELECT COUNT(*) FROM endpoints WHERE {cond}"))?
            .query_row(rusqlite::params_from_iter(args.iter()), |r| r.get(0))?;
        // One row more than the page tells whether another page follows.
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE {cond} AND incarnation > {after} \
             ORDER BY incarnation LIMIT {} OFFSET {}",
            u64::from(page.limit) + 1,
            page.offset
        ))?;
        let mut items = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), endpoint_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let more = items.len() > page.limit as usize;
        items.truncate(page.limit as usize);
        let next = more.then(|| items.last().map(|e| e.incarnation)).flatten();
        return Ok(Page {
            total: total as u64,
            items,
            next,
        });
    }
    // Metadata conditions (and a saved filter's membership) are checked here, with the
    // domain's reference semantics.
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE {cond} ORDER BY incarnation"
    ))?;
    let (mut total, mut skipped, mut more) = (0u64, 0u64, false);
    let mut items = Vec::new();
    let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
    while let Some(row) = rows.next()? {
        let ep = endpoint_from_row(row)?;
        let member = |f: &FilterId| index.is_member(tenant.as_str(), f.as_str(), ep.incarnation);
        if !q.matches(&ep) || q.filter.as_ref().is_some_and(|f| !member(f)) {
            continue;
        }
        total += 1;
        if ep.incarnation <= after {
            continue;
        }
        if skipped < page.offset {
            skipped += 1;
        } else if items.len() < page.limit as usize {
            items.push(ep);
        } else {
            more = true;
        }
    }
    let next = more.then(|| items.last().map(|e| e.incarnation)).flatten();
    Ok(Page { total, items, next })
}

/// A listing answered by the index: it picks the page's incarnations and counts the
/// matches; the rows are then read by incarnation (the table's key) in one read
/// transaction and checked again, since a write may land between the two reads.
fn list_indexed(
    conn: &Connection,
    index: &MetaIndex,
    tenant: &TenantId,
    q: &EndpointQuery,
    page: PageRequest,
) -> rusqlite::Result<Page<Endpoint>> {
    let picked = index.page(tenant.as_str(), q, page);
    let mut items = Vec::with_capacity(picked.incarnations.len());
    if !picked.incarnations.is_empty() {
        let tx = conn.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {ENDPOINT_COLUMNS}, tenant FROM endpoints WHERE incarnation=?1"
            ))?;
            for inc in &picked.incarnations {
                let row = stmt
                    .query_row([inc], |r| {
                        Ok((endpoint_from_row(r)?, r.get::<_, String>(10)?))
                    })
                    .optional()?;
                if let Some((ep, t)) = row {
                    if t == tenant.as_str() && q.matches(&ep) {
                        items.push(ep);
                    }
                }
            }
        }
        tx.finish()?;
    }
    let next = if picked.more {
        picked.incarnations.last().copied()
    } else {
        None
    };
    Ok(Page {
        total: picked.total,
        items,
        next,
    })
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn execute(&self, cmd: Command, ctx: WriteCtx) -> Result<Effect, StoreError> {
        // A registration's filters are evaluated here, on the request's thread, in parallel
        // with the others; the writer checks the answer still applies.
        let precomputed = match &cmd {
            Command::Register(reg) => {
                let view = self
                    .filter_view
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                view.evaluate(
                    ctx.tenant.as_str(),
                    reg.app.as_str(),
                    reg.app_version.as_str(),
                    reg.metadata.as_map(),
                )
            }
            _ => None,
        };
        self.write(|r| Job::Execute(cmd, ctx, precomputed, r)).await
    }

    async fn register_batch(
        &self,
        batch: BatchRequest,
        ctx: WriteCtx,
    ) -> Result<BatchOutcome, StoreError> {
        self.write(|r| Job::Batch(batch, ctx, r)).await
    }

    async fn get(
        &self,
        tenant: &TenantId,
        id: &EndpointId,
    ) -> Result<Option<Endpoint>, StoreError> {
        // A point read by rowid takes microseconds from the page cache: cheaper to
        // run in place on a per-thread connection than to hop to a blocking thread.
        let found = self.readers.with_local(|c| {
            load(c, &self.endpoint_keys, tenant.as_str(), id.as_str()).map_err(unavailable)
        });
        self.observed(found)
    }

    async fn list(
        &self,
        tenant: &TenantId,
        query: &EndpointQuery,
        page: PageRequest,
    ) -> Result<Page<Endpoint>, StoreError> {
        let (tenant, query, index) = (tenant.clone(), query.clone(), self.index.clone());
        let keys = self.endpoint_keys.clone();
        self.read(move |c| list(c, &index, &keys, &tenant, &query, page).map_err(unavailable))
            .await
    }

    async fn metadata_keys(
        &self,
        tenant: &TenantId,
        app: &AppName,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
        let (tenant, app) = (tenant.clone(), app.clone());
        self.read(move |c| {
            let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut stmt = c
                .prepare_cached(
                    "SELECT DISTINCT e.app_version, j.key FROM endpoints e, json_each(e.metadata) j \
                     WHERE e.tenant=?1 AND e.app=?2",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params![tenant.as_str(), app.as_str()], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(unavailable)?;
            for row in rows {
                let (version, key) = row.map_err(unavailable)?;
                out.entry(version).or_default().insert(key);
            }
            Ok(out)
        })
        .await
    }

    async fn batch_outcome(
        &self,
        tenant: &TenantId,
        app: &AppName,
        task_id: &str,
    ) -> Result<Option<BatchOutcome>, StoreError> {
        let (tenant, app, task_id) = (tenant.clone(), app.clone(), task_id.to_owned());
        self.read(move |c| {
            let text: Option<String> = c
                .prepare_cached(
                    "SELECT outcome FROM batch_tasks WHERE tenant=?1 AND task_id=?2 AND app=?3",
                )
                .and_then(|mut s| {
                    s.query_row(params![tenant.as_str(), task_id, app.as_str()], |r| {
                        r.get(0)
                    })
                    .optional()
                })
                .map_err(unavailable)?;
            text.map(|t| codec::decode_outcome(&t).map_err(unavailable_msg))
                .transpose()
        })
        .await
    }

    async fn execute_filter(
        &self,
        cmd: FilterCommand,
        ctx: WriteCtx,
    ) -> Result<EndpointFilter, StoreError> {
        self.write(|r| Job::Filter(cmd, ctx, r)).await
    }

    async fn get_filter(
        &self,
        tenant: &TenantId,
        id: &FilterId,
    ) -> Result<Option<EndpointFilter>, StoreError> {
        let found = self.readers.with_local(|c| {
            sqlite_filters::load_filter(c, tenant.as_str(), id.as_str()).map_err(unavailable)
        });
        self.observed(found)
            .map(|f| f.map(|f| self.with_count(tenant, f)))
    }

    async fn list_filters(
        &self,
        tenant: &TenantId,
        app: &AppName,
        name: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<EndpointFilter>, StoreError> {
        let (tenant, app, name) = (tenant.clone(), app.clone(), name.map(str::to_owned));
        let index = self.index.clone();
        self.read(move |c| {
            let (total, items) = sqlite_filters::list_filters(
                c,
                tenant.as_str(),
                app.as_str(),
                name.as_deref(),
                page.offset,
                page.limit,
            )
            .map_err(unavailable)?;
            let items = items
                .into_iter()
                .map(|mut f| {
                    f.matched = index.members_count(tenant.as_str(), f.id.as_str());
                    f
                })
                .collect();
            Ok(Page {
                total,
                items,
                next: None,
            })
        })
        .await
    }

    async fn matched_filters(
        &self,
        tenant: &TenantId,
        endpoints: &[EndpointId],
    ) -> Result<BTreeMap<EndpointId, Vec<FilterId>>, StoreError> {
        let (tenant, endpoints, index) = (tenant.clone(), endpoints.to_vec(), self.index.clone());
        let keys = self.endpoint_keys.clone();
        self.read(move |c| {
            let mut out: BTreeMap<EndpointId, Vec<FilterId>> = BTreeMap::new();
            let t = tenant.as_str();
            for (ep, f) in sqlite_filters::matched_filters(c, &index, &keys, t, &endpoints)
                .map_err(unavailable)?
            {
                out.entry(ep).or_default().push(f);
            }
            Ok(out)
        })
        .await
    }

    async fn filter_members(
        &self,
        tenant: &TenantId,
        id: &FilterId,
    ) -> Result<Vec<(AppVersionName, EndpointId)>, StoreError> {
        let (tenant, id, index) = (tenant.clone(), id.clone(), self.index.clone());
        self.read(move |c| {
            sqlite_filters::filter_members(c, &index, tenant.as_str(), id.as_str())
                .map_err(unavailable)
        })
        .await
    }

    async fn outbox_pending(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        // Rows past the durable mark may belong to a commit a power loss would undo.
        let through = self.durable_outbox.load(Ordering::Acquire);
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, event FROM outbox WHERE id>?1 AND id<=?3 ORDER BY id LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map([after, limit as i64, through], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, text) = row.map_err(unavailable)?;
                let event = codec::decode_outbox(&text).map_err(unavailable_msg)?;
                out.push(OutboxEntry { id, event });
            }
            Ok(out)
        })
        .await
    }

    async fn outbox_ack_through(&self, last_id: i64) -> Result<(), StoreError> {
        self.write(|r| Job::OutboxAck(last_id, r)).await
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(unavailable)
        })
        .await
    }

    fn store_id(&self) -> String {
        self.store_id.clone()
    }

    fn set_outbox_waker(&self, waker: OutboxWaker) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }

    async fn export_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.read(|c| crate::sqlite_export::tenants(c).map_err(unavailable))
            .await
    }

    async fn export_endpoints(
        &self,
        tenant: &TenantId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EndpointExport>, StoreError> {
        let tenant = tenant.clone();
        self.read(move |c| {
            crate::sqlite_export::endpoints(c, &tenant, after, limit).map_err(unavailable)
        })
        .await
    }

    async fn export_filters(&self, tenant: &TenantId) -> Result<Vec<EndpointFilter>, StoreError> {
        let tenant = tenant.clone();
        self.read(move |c| crate::sqlite_export::filters(c, &tenant).map_err(unavailable))
            .await
    }

    async fn import(&self, records: Vec<ImportRecord>) -> Result<Vec<ImportOutcome>, StoreError> {
        self.write(|r| Job::Import(records, r)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.write(Job::Ping).await?;
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT value FROM settings WHERE key=?1")
                .and_then(|mut s| s.query_row([&key], |r| r.get(0)).optional())
                .map_err(unavailable)
        })
        .await
    }

    async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.write(|r| Job::PutSetting(key, value, r)).await
    }

    async fn shutdown(&self) {
        EmbeddedStore::shutdown(self).await
    }

    async fn get_token(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        id: &TokenId,
    ) -> Result<Option<StoredToken>, StoreError> {
        let found = self.readers.with_local(|c| {
            sqlite_credentials::get_token(c, tenant.as_str(), endpoint.as_str(), id.as_str())
                .map_err(unavailable)
        });
        self.observed(found)
    }

    async fn find_token(
        &self,
        tenant: &TenantId,
        app: &AppName,
        hash: &TokenHash,
    ) -> Result<Option<StoredToken>, StoreError> {
        // The 16/ECAP hot path: one primary-key probe, in place like `get`.
        let found = self.readers.with_local(|c| {
            sqlite_credentials::find_token(c, &self.token_keys, tenant.as_str(), app.as_str(), hash)
                .map_err(unavailable)
        });
        self.observed(found)
    }

    async fn list_tokens(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        query: &TokenListQuery,
        page: PageRequest,
    ) -> Result<Page<StoredToken>, StoreError> {
        let (tenant, endpoint, query) = (tenant.clone(), endpoint.clone(), query.clone());
        let keys = self.endpoint_keys.clone();
        self.read(move |c| {
            let (t, e) = (tenant.as_str(), endpoint.as_str());
            sqlite_credentials::list_tokens(c, &keys, t, e, &query, page).map_err(unavailable)
        })
        .await
    }

    async fn create_claims(
        &self,
        tenant: &TenantId,
        claims: Vec<ClaimToken>,
    ) -> Result<(), StoreError> {
        let tenant = tenant.clone();
        self.write(|r| Job::CreateClaims(tenant, claims, r)).await
    }

    async fn get_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        id: &ClaimId,
    ) -> Result<Option<ClaimToken>, StoreError> {
        let found = self.readers.with_local(|c| {
            sqlite_credentials::get_claim(c, tenant.as_str(), app.as_str(), id.as_str())
                .map_err(unavailable)
        });
        self.observed(found)
    }

    async fn find_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        hash: &TokenHash,
    ) -> Result<Option<ClaimToken>, StoreError> {
        let found = self.readers.with_local(|c| {
            sqlite_credentials::find_claim(c, tenant.as_str(), app.as_str(), hash)
                .map_err(unavailable)
        });
        self.observed(found)
    }

    async fn list_claims(
        &self,
        tenant: &TenantId,
        app: &AppName,
        page: PageRequest,
    ) -> Result<Page<ClaimToken>, StoreError> {
        let (tenant, app) = (tenant.clone(), app.clone());
        self.read(move |c| {
            sqlite_credentials::list_claims(c, tenant.as_str(), app.as_str(), page)
                .map_err(unavailable)
        })
        .await
    }

    async fn delete_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        id: &ClaimId,
    ) -> Result<bool, StoreError> {
        let (tenant, app, id) = (tenant.clone(), app.clone(), id.clone());
        self.write(|r| Job::DeleteClaim(tenant, app, id, r)).await
    }

    async fn record_rejection(
        &self,
        tenant: &TenantId,
        rejection: Rejection,
    ) -> Result<(), StoreError> {
        let tenant = tenant.clone();
        self.write(|r| Job::RecordRejection(tenant, rejection, r))
            .await
    }

    async fn purge_tenant_credentials(
        &self,
        tenant: &TenantId,
        setting_prefix: &str,
    ) -> Result<(), StoreError> {
        let (tenant, prefix) = (tenant.clone(), setting_prefix.to_owned());
        self.write(|r| Job::PurgeCredentials(tenant, prefix, r))
            .await
    }

    async fn list_rejections(
        &self,
        tenant: &TenantId,
        app: &AppName,
        page: PageRequest,
    ) -> Result<Page<Rejection>, StoreError> {
        let (tenant, app) = (tenant.clone(), app.clone());
        self.read(move |c| {
            sqlite_credentials::list_rejections(c, tenant.as_str(), app.as_str(), page)
                .map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dirs = Arc::new(Mutex::new(Vec::new()));
        crate::conformance::run_all(|| {
            let dirs = dirs.clone();
            async move {
                let dir = tempfile::tempdir().unwrap();
                let mut cfg = EmbeddedConfig::new(dir.path());
                // Tiny back-fill steps, so back-fills interleave with the cases' writes.
                cfg.backfill = BackfillPace {
                    step: Duration::ZERO,
                    batch: 2,
                    pause: Duration::from_micros(500),
                };
                let store = EmbeddedStore::open(cfg).unwrap();
                dirs.lock().unwrap().push(dir);
                Arc::new(store) as Arc<dyn Store>
            }
        })
        .await;
    }

    async fn ep1(store: &EmbeddedStore) -> Endpoint {
        let t1 = TenantId::parse("t1").unwrap();
        let id = EndpointId::parse("ep-1").unwrap();
        store.get(&t1, &id).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn without_event_recording_the_outbox_stays_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = EmbeddedConfig::new(dir.path());
        cfg.record_events = false;
        let store = EmbeddedStore::open(cfg).unwrap();
        let app = AppName::parse("app").unwrap();
        let reg = epr_core::command::Registration {
            id: EndpointId::parse("ep-1").unwrap(),
            app: app.clone(),
            app_version: AppVersionName::parse("app-v1").unwrap(),
            metadata: Metadata::parse(serde_json::json!({"k": 1}), "metadata", &Default::default())
                .unwrap(),
            token_hash: epr_core::ids::EndpointToken::parse("t").unwrap().hash(&app),
            token_id: epr_core::ids::TokenId::parse("tid-1").unwrap(),
        };
        let ctx = WriteCtx {
            tenant: TenantId::parse("t1").unwrap(),
            now: Timestamp(1),
            correlation_id: "c".into(),
            limits: Default::default(),
        };
        store.execute(Command::Register(reg), ctx).await.unwrap();
        assert_eq!(
            ep1(&store).await.metadata.get("k"),
            Some(&serde_json::json!(1))
        );
        assert_eq!(store.outbox_depth().await.unwrap(), 0);
        store.shutdown().await;
    }

    /// The schema of version 2 as it was, without the filter tables (unchanged since).
    const SCHEMA_V2: &str = "
        CREATE TABLE schema_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE endpoints(
            incarnation INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant TEXT NOT NULL, endpoint_id TEXT NOT NULL, app TEXT NOT NULL,
            app_version TEXT NOT NULL, app_version_registered INTEGER NOT NULL,
            created INTEGER NOT NULL, metadata TEXT NOT NULL, metadata_updated INTEGER,
            version INTEGER NOT NULL, metadata_version INTEGER NOT NULL,
            token_hash BLOB NOT NULL);
        CREATE UNIQUE INDEX endpoints_by_id ON endpoints(tenant, endpoint_id);
        CREATE INDEX endpoints_by_app ON endpoints(tenant, app, incarnation);
        CREATE INDEX endpoints_by_version ON endpoints(tenant, app_version, incarnation);
        CREATE TABLE tokens(
            tenant TEXT NOT NULL, app TEXT NOT NULL, token_hash BLOB NOT NULL,
            endpoint_id TEXT NOT NULL, created INTEGER NOT NULL,
            PRIMARY KEY(tenant, app, token_hash)) WITHOUT ROWID;
        CREATE TABLE outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
        CREATE TABLE settings(key TEXT PRIMARY KEY, value TEXT NOT NULL, updated INTEGER NOT NULL);
        CREATE TABLE batch_tasks(
            tenant TEXT NOT NULL, task_id TEXT NOT NULL, app TEXT NOT NULL,
            created INTEGER NOT NULL, outcome TEXT NOT NULL,
            PRIMARY KEY(tenant, task_id)) WITHOUT ROWID;
        INSERT INTO schema_meta(key, value) VALUES('schema_version', 2);
    ";

    fn token_hash(app: &AppName, token: &str) -> TokenHash {
        epr_core::ids::EndpointToken::parse(token)
            .unwrap()
            .hash(app)
    }

    #[tokio::test]
    async fn a_version_2_directory_is_upgraded_keeping_its_tokens() {
        use epr_core::credentials::TokenStatus;
        let dir = tempfile::tempdir().unwrap();
        let app = AppName::parse("app").unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(SCHEMA_V2).unwrap();
            conn.execute_batch(sqlite_filters::SCHEMA).unwrap();
            for (i, ep) in ["ep-1", "ep-2"].into_iter().enumerate() {
                let hash = token_hash(&app, &format!("tok-{ep}"));
                conn.execute(
                    "INSERT INTO endpoints(tenant, endpoint_id, app, app_version, \
                     app_version_registered, created, metadata, metadata_updated, version, \
                     metadata_version, token_hash) VALUES('t1', ?1, 'app', 'app-v1', 5, ?2, '{}', \
                     NULL, 1, 1, ?3)",
                    params![ep, 5 + i as i64, &hash.0[..]],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO tokens(tenant, app, token_hash, endpoint_id, created) \
                     VALUES('t1', 'app', ?1, ?2, ?3)",
                    params![&hash.0[..], ep, 5 + i as i64],
                )
                .unwrap();
            }
        }
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let t1 = TenantId::parse("t1").unwrap();
        let mut ids = BTreeSet::new();
        for (i, ep) in ["ep-1", "ep-2"].into_iter().enumerate() {
            let ep = EndpointId::parse(ep).unwrap();
            let page = store
                .list_tokens(
                    &t1,
                    &ep,
                    &TokenListQuery::default(),
                    PageRequest::new(0, 10),
                )
                .await
                .unwrap();
            let [token] = page.items.as_slice() else {
                panic!("one token each: {page:?}")
            };
            let hash = token_hash(&app, &format!("tok-{ep}"));
            assert_eq!(
                (&token.endpoint_id, token.hash, token.status),
                (&ep, hash, TokenStatus::Inactive)
            );
            assert_eq!(
                (token.created, token.updated),
                (Timestamp(5 + i as i64), None)
            );
            // A random UUID-shaped ID.
            let id = token.id.as_str();
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert!(id
                .chars()
                .all(|c| c == '-' || matches!(c, '0'..='9' | 'a'..='f')));
            ids.insert(id.to_owned());
            assert_eq!(
                store.find_token(&t1, &app, &hash).await.unwrap().as_ref(),
                Some(token)
            );
        }
        assert_eq!(ids.len(), 2);
        // The upgraded tables take the new writes: the old hash is still taken, new tokens
        // and claims go in, an unregistration deletes the old row.
        let ctx = WriteCtx {
            tenant: t1.clone(),
            now: Timestamp(10),
            correlation_id: "c".into(),
            limits: Default::default(),
        };
        let issue = |token: &str, id: &str| Command::IssueToken {
            id: EndpointId::parse("ep-1").unwrap(),
            app: app.clone(),
            token_hash: token_hash(&app, token),
            token_id: TokenId::parse(id).unwrap(),
        };
        assert!(matches!(
            store.execute(issue("tok-ep-2", "new"), ctx.clone()).await,
            Err(StoreError::Rejected(epr_core::DomainError::Conflict {
                field: "endpointToken",
                ..
            }))
        ));
        store
            .execute(issue("tok-new", "new"), ctx.clone())
            .await
            .unwrap();
        store
            .execute(
                Command::Unregister {
                    id: EndpointId::parse("ep-2").unwrap(),
                    precondition: epr_core::endpoint::Precondition::None,
                },
                ctx.clone(),
            )
            .await
            .unwrap();
        assert!(store
            .find_token(&t1, &app, &token_hash(&app, "tok-ep-2"))
            .await
            .unwrap()
            .is_none());
        store.shutdown().await;
        drop(store);
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let version: i64 = conn
            .query_row(
                "SELECT value FROM schema_meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // Schemas 7 and 8 find tokens by hash and endpoints by ID in memory: the B-trees in
        // those orders are gone.
        let random_indexes: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master \
                 WHERE name IN ('tokens_by_hash', 'endpoints_by_id')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(random_indexes, 0);
        let claims: i64 = conn
            .query_row("SELECT COUNT(*) FROM claim_tokens", [], |r| r.get(0))
            .unwrap();
        assert_eq!(claims, 0, "the new tables exist");
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO schema_meta(key, value) VALUES('schema_version', 99);",
            )
            .unwrap();
        }
        let Err(err) = EmbeddedStore::open(EmbeddedConfig::new(dir.path())) else {
            panic!("a newer schema must be refused");
        };
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[tokio::test]
    async fn rejections_beyond_the_kept_number_are_forgotten() {
        use epr_core::credentials::{RefusalReason, Rejection};
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = EmbeddedConfig::new(dir.path());
        cfg.rejections_kept = 3;
        let store = EmbeddedStore::open(cfg).unwrap();
        let t1 = TenantId::parse("t1").unwrap();
        let rejection = |app: &str, i: i64| Rejection {
            at: Timestamp(i),
            app: AppName::parse(app).unwrap(),
            app_version: None,
            endpoint_id: None,
            source: "127.0.0.1".into(),
            reason: RefusalReason::RateLimited,
            message: format!("m{i}"),
        };
        for i in 0..7 {
            store
                .record_rejection(&t1, rejection("a", i))
                .await
                .unwrap();
        }
        store
            .record_rejection(&t1, rejection("b", 0))
            .await
            .unwrap();
        let page = store
            .list_rejections(&t1, &AppName::parse("a").unwrap(), PageRequest::new(0, 10))
            .await
            .unwrap();
        let messages: Vec<_> = page.items.iter().map(|r| r.message.as_str()).collect();
        assert_eq!((page.total, messages), (3, vec!["m6", "m5", "m4"]));
        let other = store
            .list_rejections(&t1, &AppName::parse("b").unwrap(), PageRequest::new(0, 10))
            .await
            .unwrap();
        assert_eq!(other.total, 1);
        store.shutdown().await;
    }

    #[tokio::test]
    async fn a_directory_opens_once_until_shut_down() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let Err(err) = EmbeddedStore::open(EmbeddedConfig::new(dir.path())) else {
            panic!("a second open of one directory must fail");
        };
        let text = err.to_string();
        assert!(text.contains("in use by another EPR process"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // Shutdown releases the lock even while the store value is still around.
        store.shutdown().await;
        let again = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        again.shutdown().await;
        drop(again);
        drop(store);
    }

    /// Memberships are not stored: a reopened store derives them from the rows, a filter
    /// that was pending when the store stopped turns active (with its event), and a schema
    /// 3 directory loses its `filter_matches` table.
    #[tokio::test]
    async fn filter_memberships_are_derived_again_at_open() {
        use crate::conformance::filters::{create, members, wait_active};
        use crate::conformance::{register, tenant};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        for i in 0..20 {
            let md = serde_json::json!({ "n": i, "even": i % 2 == 0 });
            register(&store, "t1", &format!("ep-{i}"), "app-v1", md).await;
        }
        let high =
            serde_json::json!({"metadata": {"$elemMatch": {"key": "n", "value": {"$gte": 10}}}});
        let even = serde_json::json!({"metadata": {"$elemMatch": {"key": "even", "value": true}}});
        create(&store, "t1", "app", "f-high", high).await;
        create(&store, "t1", "app", "f-even", even).await;
        wait_active(&store, "t1", "f-high").await;
        wait_active(&store, "t1", "f-even").await;
        let high_members = members(&store, "t1", "f-high").await;
        let even_members = members(&store, "t1", "f-even").await;
        assert_eq!(high_members.len(), 10);
        assert_eq!(even_members.len(), 10);
        store.shutdown().await;
        drop(store);
        // As a schema 3 store left it: a membership table, and f-even stopped mid back-fill.
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(
                "UPDATE schema_meta SET value=3 WHERE key='schema_version';
                 CREATE TABLE filter_matches(tenant TEXT NOT NULL, filter_id TEXT NOT NULL,
                    incarnation INTEGER NOT NULL, PRIMARY KEY(tenant, filter_id, incarnation))
                    WITHOUT ROWID;
                 INSERT INTO filter_matches VALUES('t1', 'f-high', 1);
                 UPDATE filters SET status='pending', backfill_after=3, backfill_until=20,
                    backfill_correlation='corr-x' WHERE filter_id='f-even';",
            )
            .unwrap();
        }
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let t1 = tenant("t1");
        let high = store
            .get_filter(&t1, &FilterId::parse("f-high").unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(high.matched, 10);
        assert_eq!(members(&store, "t1", "f-high").await, high_members);
        let even = wait_active(&store, "t1", "f-even").await;
        assert_eq!(even.matched, 10);
        assert_eq!(members(&store, "t1", "f-even").await, even_members);
        let activated = store
            .outbox_pending(0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| match &e.event {
                OutboxEvent::Filter(f) => {
                    f.filter_id.as_str() == "f-even"
                        && f.kind == epr_core::event::FilterEventKind::Activated
                        && f.correlation_id == "corr-x"
                }
                _ => false,
            })
            .count();
        assert_eq!(activated, 1, "the resumed filter's activation is an event");
        // Listing by a filter and a metadata value together is an intersection.
        let q = EndpointQuery {
            filter: Some(FilterId::parse("f-high").unwrap()),
            metadata: vec![epr_core::query::MetadataCondition::Equals(
                "even".into(),
                vec![serde_json::json!(true)],
            )],
            ..Default::default()
        };
        let page = store.list(&t1, &q, PageRequest::new(0, 100)).await.unwrap();
        assert_eq!(page.total, 5);
        assert_eq!(page.items.len(), 5);
        let readers = store.readers.clone();
        let tables: i64 = readers
            .with_local(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE name='filter_matches'",
                    [],
                    |r| r.get(0),
                )
                .map_err(unavailable)
            })
            .unwrap();
        assert_eq!(tables, 0, "the upgrade dropped the membership table");
        store.shutdown().await;
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_incarnations_grow() {
        use crate::conformance::CASES;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap());
        (CASES[0].1)(store.clone()).await;
        let before = ep1(&store).await;
        store.shutdown().await;
        assert!(store.ping().await.is_err(), "writes fail after shutdown");
        drop(store);
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let after = ep1(&store).await;
        assert_eq!(before, after);
        // The listing index lives in memory: the reopened store built it from the rows.
        let t1 = TenantId::parse("t1").unwrap();
        let (k, v) = after
            .metadata
            .as_map()
            .iter()
            .next()
            .expect("case 0 registers with metadata");
        let q = EndpointQuery {
            metadata: vec![epr_core::query::MetadataCondition::Equals(
                k.clone(),
                vec![v.clone()],
            )],
            ..Default::default()
        };
        let page = store.list(&t1, &q, PageRequest::new(0, 10)).await.unwrap();
        assert_eq!(page.total, 1);
        assert_eq!(page.items, vec![after.clone()]);
        // Incarnations keep growing across restarts, so old entity tags never match again.
        let app = AppName::parse("app").unwrap();
        let reg = epr_core::command::Registration {
            id: EndpointId::parse("ep-2").unwrap(),
            app: app.clone(),
            app_version: AppVersionName::parse("app-v1").unwrap(),
            metadata: Metadata::empty(),
            token_hash: epr_core::ids::EndpointToken::parse("t2")
                .unwrap()
                .hash(&app),
            token_id: epr_core::ids::TokenId::parse("tid-2").unwrap(),
        };
        let ctx = WriteCtx {
            tenant: TenantId::parse("t1").unwrap(),
            now: Timestamp(1),
            correlation_id: "c".into(),
            limits: Default::default(),
        };
        let next = store.execute(Command::Register(reg), ctx).await.unwrap();
        assert!(next.endpoint().incarnation > before.incarnation);
        store.shutdown().await;
    }

    /// The relay reads only rows at or below the durable mark: a row committed but not yet
    /// synced (here: one written beside the writer, which no sync of the store covered) is
    /// not handed out, and the rows of an acknowledged write are.
    #[tokio::test]
    async fn the_relay_sees_only_rows_made_durable() {
        use crate::conformance::register;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        register(&store, "t1", "ep-1", "app-v1", serde_json::json!({"a": 1})).await;
        let acknowledged = store.outbox_pending(0, 100).await.unwrap();
        assert!(
            !acknowledged.is_empty(),
            "an acknowledged write's events are published"
        );
        let last = acknowledged.last().unwrap().id;
        let side = Connection::open(dir.path().join(DB_FILE)).unwrap();
        side.execute_batch("PRAGMA busy_timeout=5000;").unwrap();
        let unsynced = acknowledged[0].event.clone();
        side.execute(
            "INSERT INTO outbox(event) VALUES(?1)",
            [codec::encode_outbox(&unsynced)],
        )
        .unwrap();
        let pending = store.outbox_pending(0, 100).await.unwrap();
        assert_eq!(
            pending.last().unwrap().id,
            last,
            "no row past the durable mark"
        );
        // The next acknowledged write's sync covers the row written beside it too.
        register(&store, "t1", "ep-2", "app-v1", serde_json::json!({"a": 2})).await;
        let pending = store.outbox_pending(0, 100).await.unwrap();
        assert!(pending.iter().any(|e| e.id == last + 1));
        assert!(pending.len() > acknowledged.len() + 1);
        store.shutdown().await;
    }

    /// A registration's filters evaluated before the queue are used only against the filter
    /// set they were evaluated with: after a filter is added, a stale answer is ignored and
    /// the writer evaluates again; with the current set, the answer is taken as given.
    #[tokio::test]
    async fn precomputed_filter_matches_apply_only_to_their_filter_set() {
        use crate::conformance::filters::{create, members, wait_active};
        use crate::conformance::{ctx, reg};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let high =
            serde_json::json!({"metadata": {"$elemMatch": {"key": "n", "value": {"$gte": 10}}}});
        create(&store, "t1", "app", "f-a", high.clone()).await;
        wait_active(&store, "t1", "f-a").await;
        let view = || store.filter_view.read().unwrap().clone();
        let md = serde_json::json!({"n": 15});
        let evaluate = || {
            view()
                .evaluate("t1", "app", "app-v1", md.as_object().unwrap())
                .unwrap()
        };
        let stale = evaluate();
        assert_eq!(stale.matches, vec![true]);
        create(&store, "t1", "app", "f-b", high).await;
        wait_active(&store, "t1", "f-b").await;
        let send = |id: &str, pre: Precomputed| {
            let cmd = Command::Register(reg(id, "app-v1", &format!("tok-{id}"), md.clone()));
            store.write(move |r| Job::Execute(cmd, ctx("t1"), Some(pre), r))
        };
        send("ep-stale", stale).await.unwrap();
        let mut current = evaluate();
        assert_eq!(current.matches, vec![true, true]);
        current.matches = vec![false, true];
        send("ep-current", current).await.unwrap();
        let ids = |m: BTreeSet<String>| -> Vec<String> { m.into_iter().collect() };
        assert_eq!(
            ids(members(&store, "t1", "f-b").await),
            ["ep-current", "ep-stale"],
            "the stale answer knew nothing of f-b; the writer evaluated again"
        );
        assert_eq!(
            ids(members(&store, "t1", "f-a").await),
            ["ep-stale"],
            "the current answer (forged: not f-a) was taken as given"
        );
        store.shutdown().await;
    }

    /// The token hash and endpoint ID indexes are in memory (schemas 7 and 8): rebuilt at open
    /// they still find tokens and endpoints and refuse a taken hash, and a hash (and an
    /// endpoint ID) freed and taken again by commands queued together belong to the new
    /// endpoint, before and after another restart.
    #[tokio::test]
    async fn key_indexes_stay_right_across_restarts_and_reuse() {
        use crate::conformance::{ctx, reg, tenant};
        let dir = tempfile::tempdir().unwrap();
        let app = AppName::parse("app").unwrap();
        let t1 = tenant("t1");
        let hash = epr_core::ids::EndpointToken::parse("tok-1")
            .unwrap()
            .hash(&app);
        let register =
            |id: &str| Command::Register(reg(id, "app-v1", "tok-1", serde_json::json!({})));
        let taken = |r: Result<Effect, StoreError>| {
            matches!(
                r,
                Err(StoreError::Rejected(epr_core::DomainError::Conflict {
                    field: "endpointToken",
                    ..
                }))
            )
        };
        async fn holder(
            store: &EmbeddedStore,
            t: &TenantId,
            app: &AppName,
            h: &TokenHash,
        ) -> Option<String> {
            let found = store.find_token(t, app, h).await.unwrap();
            found.map(|t| t.endpoint_id.as_str().to_owned())
        }
        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        store.execute(register("a"), ctx("t1")).await.unwrap();
        store.shutdown().await;
        drop(store);

        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        assert_eq!(holder(&store, &t1, &app, &hash).await.as_deref(), Some("a"));
        assert!(taken(store.execute(register("b"), ctx("t1")).await));
        let b = EndpointId::parse("b").unwrap();
        assert!(store.get(&t1, &b).await.unwrap().is_none());
        // Another tenant's or application's rows do not hold it.
        store.execute(register("a"), ctx("t2")).await.unwrap();
        // Freed and taken again by commands queued together (in one group or two: the
        // outcome is the same).
        let unregister = Command::Unregister {
            id: EndpointId::parse("a").unwrap(),
            precondition: epr_core::endpoint::Precondition::None,
        };
        let (gone, again) = tokio::join!(
            store.execute(unregister, ctx("t1")),
            store.execute(register("c"), ctx("t1"))
        );
        gone.unwrap();
        again.unwrap();
        assert_eq!(holder(&store, &t1, &app, &hash).await.as_deref(), Some("c"));
        assert!(taken(store.execute(register("d"), ctx("t1")).await));
        // The endpoint ID too: "c" unregistered and registered again in one go (with another
        // token: its own is still held until the unregistration commits).
        let c = EndpointId::parse("c").unwrap();
        let first = store.get(&t1, &c).await.unwrap().unwrap().incarnation;
        let unregister_c = Command::Unregister {
            id: c.clone(),
            precondition: epr_core::endpoint::Precondition::None,
        };
        let (gone, again) = tokio::join!(
            store.execute(unregister_c, ctx("t1")),
            store.execute(
                Command::Register(reg("c", "app-v1", "tok-2", serde_json::json!({}))),
                ctx("t1")
            )
        );
        gone.unwrap();
        again.unwrap();
        let second = store.get(&t1, &c).await.unwrap().unwrap().incarnation;
        assert!(second > first);
        store.shutdown().await;
        drop(store);

        let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap();
        let hash_2 = epr_core::ids::EndpointToken::parse("tok-2")
            .unwrap()
            .hash(&app);
        assert_eq!(
            holder(&store, &t1, &app, &hash_2).await.as_deref(),
            Some("c")
        );
        assert!(holder(&store, &t1, &app, &hash).await.is_none());
        assert!(taken(store.execute(register("d"), ctx("t2")).await));
        assert_eq!(store.token_keys.len(), 2, "c's token in t1 and a's in t2");
        assert_eq!(store.endpoint_keys.len(), 2, "c in t1 and a in t2");
        let got = store.get(&t1, &c).await.unwrap().unwrap();
        assert_eq!(got.incarnation, second);
        let a = EndpointId::parse("a").unwrap();
        assert!(store.get(&t1, &a).await.unwrap().is_none());
        assert!(store.get(&tenant("t2"), &a).await.unwrap().is_some());
        // Listing by IDs, the tokens of an endpoint, its filters.
        let q = EndpointQuery {
            endpoint_ids: vec![a.clone(), c.clone(), b.clone()],
            ..Default::default()
        };
        let page = store.list(&t1, &q, PageRequest::new(0, 10)).await.unwrap();
        let ids: Vec<&str> = page.items.iter().map(|e| e.id.as_str()).collect();
        assert_eq!((ids, page.total), (vec!["c"], 1));
        let tokens = store
            .list_tokens(&t1, &c, &Default::default(), PageRequest::new(0, 10))
            .await
            .unwrap();
        assert_eq!(tokens.total, 1);
        assert_eq!(tokens.items[0].hash, hash_2);
        let none = store
            .list_tokens(&t1, &a, &Default::default(), PageRequest::new(0, 10))
            .await
            .unwrap();
        assert_eq!((none.total, none.items.len()), (0, 0));
        let matched = store.matched_filters(&t1, &[a, c.clone()]).await.unwrap();
        assert!(matched.values().all(Vec::is_empty), "{matched:?}");
        // A second registration of "c" is refused or leaves it as it is, as before.
        let _ = store
            .execute(
                Command::Register(reg("c", "app-v1", "tok-3", serde_json::json!({}))),
                ctx("t1"),
            )
            .await;
        assert_eq!(
            store.get(&t1, &c).await.unwrap().unwrap().incarnation,
            second
        );
        assert_eq!(store.endpoint_keys.len(), 2);
        store.shutdown().await;
    }
}
