//! The write path: group-committing writer tasks, endpoint commands, batch registration,
//! endpoint reads by ID, batch outcomes, and import.
//!
//! Each writer task owns one connection and commits everything queued for it (up to
//! `max_group` jobs) in one transaction, answering only after COMMIT returned. A group:
//! 1. locks and loads every endpoint row its commands name (`FOR UPDATE`, in key order, so
//!    replicas lock in one order), then the token rows of endpoints whose plans need them,
//!    the holders of the token hashes and IDs its commands would insert, the claim token
//!    rows they use (`FOR UPDATE`, in key order, after every endpoint row), and a block of
//!    incarnations: one pipelined round trip;
//! 2. takes the *shared* advisory lock of every application it touches (filter changes take
//!    it exclusively) and reads the applications' filters;
//! 3. plans every command in memory over an overlay of the group's own changes (two
//!    commands on one endpoint see each other; a refused command changes nothing);
//! 4. writes the final state of each endpoint it changed, its token rows and the claim
//!    tokens used, with a few set-based statements (`unnest`), stores membership, appends
//!    the events to the outbox (per command: endpoint events, membership events, token
//!    events) and NOTIFYs;
//! 5. commits. An insert that finds its ID or token taken by another replica since step 1
//!    (fewer rows written than planned), or a deadlock / serialization failure, rolls the
//!    group back and runs it again: the re-run sees the other replica's row and refuses
//!    exactly as the domain does.

use crate::credentials::{claim_from_row, token_from_row, CLAIM_COLUMNS, TOKEN_COLUMNS};
use crate::error::{db, msg, pool, retryable};
use crate::filters::{AppFilters, MatchChange};
use crate::rows::{endpoint_from_row, ENDPOINT_COLUMNS};
use crate::{app_lock_key, Inner, PgConfig};
use epr_core::command::{plan, Command, Effect, Loaded, Plan, WriteCtx};
use epr_core::credentials::{ClaimToken, ClaimUse, StoredToken, TokenOp, TokenStatus};
use epr_core::endpoint::Endpoint;
use epr_core::event::OutboxEvent;
use epr_core::ids::{AppName, EndpointId, TenantId, TokenId};
use epr_core::log_gate::LogGate;
use epr_core::ports::{
    BatchCreated, BatchFailed, BatchOutcome, BatchRequest, EndpointExport, ImportOutcome,
    ImportRecord, StoreError,
};
use epr_core::{DomainError, Timestamp};
use epr_store::codec;
// `try_join*` poll their futures in order: statements are sent in the order written.
use futures_util::future::{try_join, try_join3, try_join_all};
use futures_util::TryFutureExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::types::Json;
use tokio_postgres::{Statement, Transaction};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Runs of one group before its failure is answered: deadlocks and races with other
/// replicas are resolved by running the group again.
const MAX_ATTEMPTS: usize = 3;
/// Batch outcomes past their retention are deleted at most this often (by writer 0).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Import records handled per preload (rows locked, tokens read, incarnations taken).
const IMPORT_CHUNK: usize = 1000;

enum Job {
    Execute(Command, WriteCtx, Reply<Effect>),
    Batch(BatchWork, Reply<BatchOutcome>),
    Import(Vec<ImportRecord>, Reply<Vec<ImportOutcome>>),
    /// Stop accepting commands; the sender is dropped once the queue is empty.
    Close(oneshot::Sender<()>),
}

/// A batch registration with its items made commands once (a group may run twice).
struct BatchWork {
    task_id: String,
    app: AppName,
    ctx: WriteCtx,
    items: Vec<BatchWorkItem>,
}

struct BatchWorkItem {
    cmd: Result<Command, String>,
    endpoint_id: Option<String>,
    metadata_text: String,
}

/// The writers' queues (one per writer task; commands are routed by endpoint ID).
pub(crate) struct Writer {
    queues: Vec<mpsc::Sender<Job>>,
    /// Taken by [`start`].
    receivers: Mutex<Vec<mpsc::Receiver<Job>>>,
    /// Round robin for work that names no single endpoint (batches, imports).
    next: AtomicUsize,
}

impl Writer {
    pub(crate) fn new(cfg: &PgConfig) -> Self {
        let (queues, receivers) = (0..cfg.writers.max(1))
            .map(|_| mpsc::channel(cfg.max_group.max(1) * 4))
            .unzip();
        Self {
            queues,
            receivers: Mutex::new(receivers),
            next: AtomicUsize::new(0),
        }
    }

    /// One endpoint's commands always go to one writer, so this process never races itself
    /// on a row (FNV-1a: the same in every process).
    fn route(&self, tenant: &TenantId, id: &EndpointId) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in tenant
            .as_str()
            .bytes()
            .chain([0])
            .chain(id.as_str().bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % self.queues.len() as u64) as usize
    }

    fn any(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len()
    }

    async fn send<T>(
        &self,
        writer: usize,
        make: impl FnOnce(Reply<T>) -> Job,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queues[writer]
            .send(make(tx))
            .await
            .map_err(|_| msg("the store is shut down"))?;
        rx.await.map_err(|_| msg("the store writer stopped"))?
    }
}

/// Starts the writer tasks.
pub(crate) fn start(inner: &Arc<Inner>) -> Vec<JoinHandle<()>> {
    let receivers = std::mem::take(
        &mut *inner
            .writer
            .receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    // Count shards of this process: a random block of 64, so writers of two replicas
    // rarely update the same `filter_counts` row (they would queue on its lock, and could
    // deadlock on two filters taken in different orders).
    let base = (uuid::Uuid::new_v4().as_u128() % 256) as usize * 64;
    receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| {
            let task = WriterTask {
                inner: inner.clone(),
                index: i,
                shard: base + i % 64,
                conn: None,
                last_prune: None,
                failure_log: LogGate::default(),
            };
            tokio::spawn(task.run(rx))
        })
        .collect()
}

/// Stops accepting commands and waits until every accepted one has been answered.
pub(crate) async fn drain(inner: &Inner) {
    let mut acks = Vec::new();
    for queue in &inner.writer.queues {
        let (tx, rx) = oneshot::channel();
        // Fails only when that writer already stopped (a second drain).
        if queue.send(Job::Close(tx)).await.is_ok() {
            acks.push(rx);
        }
    }
    for ack in acks {
        let _ = ack.await;
    }
}

pub(crate) async fn execute(
    inner: &Inner,
    cmd: Command,
    ctx: WriteCtx,
) -> Result<Effect, StoreError> {
    let writer = inner.writer.route(&ctx.tenant, cmd.endpoint_id());
    inner
        .writer
        .send(writer, |r| Job::Execute(cmd, ctx, r))
        .await
}

pub(crate) async fn register_batch(
    inner: &Inner,
    batch: BatchRequest,
    ctx: WriteCtx,
) -> Result<BatchOutcome, StoreError> {
    let work = BatchWork {
        task_id: batch.task_id,
        app: batch.app,
        ctx,
        items: batch
            .items
            .into_iter()
            .map(|item| BatchWorkItem {
                cmd: item.registration.map(Command::Register),
                endpoint_id: item.endpoint_id,
                metadata_text: item.metadata_text,
            })
            .collect(),
    };
    let writer = inner.writer.any();
    inner.writer.send(writer, |r| Job::Batch(work, r)).await
}

static GET: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE tenant=$1 AND endpoint_id=$2")
});

pub(crate) async fn get(
    inner: &Inner,
    tenant: &TenantId,
    id: &EndpointId,
) -> Result<Option<Endpoint>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client.prepare_cached(&GET).await.map_err(db)?;
    let row = client
        .query_opt(&st, &[&tenant.as_str(), &id.as_str()])
        .await
        .map_err(db)?;
    row.as_ref().map(endpoint_from_row).transpose()
}

pub(crate) async fn batch_outcome(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    task_id: &str,
) -> Result<Option<BatchOutcome>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client
        .prepare_cached("SELECT outcome FROM batch_tasks WHERE tenant=$1 AND task_id=$2 AND app=$3")
        .await
        .map_err(db)?;
    let row = client
        .query_opt(&st, &[&tenant.as_str(), &task_id, &app.as_str()])
        .await
        .map_err(db)?;
    row.map(|r| {
        let text: &str = r.get(0);
        codec::decode_outcome(text).map_err(|e| crate::error::corrupt("batch outcome", e))
    })
    .transpose()
}

/// See `Store::import`.
pub(crate) async fn import(
    inner: &Inner,
    records: Vec<ImportRecord>,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let writer = inner.writer.any();
    inner.writer.send(writer, |r| Job::Import(records, r)).await
}

// ---------------------------------------------------------------------------------------
// Statements

// Lookups are one primary-key probe per element (LATERAL, fenced by `OFFSET 0` so it is
// not flattened into a join), whatever the statistics: with `= ANY($n)` or a plain join,
// the planner of a table that was never analyzed (a new database, its first minute)
// estimated one row for the (tenant, app) range and read all of it for every lookup;
// registrations fell from ~7,000 to ~2,000/s until autovacuum analyzed the tables.
static LOCK_ROWS: LazyLock<String> = LazyLock::new(|| {
    // Locks in the order of the array (the caller sorts it: processes lock in one order).
    format!(
        "SELECT e.* FROM unnest($2::text[]) WITH ORDINALITY AS k(id, n) \
         CROSS JOIN LATERAL (SELECT {ENDPOINT_COLUMNS} FROM endpoints \
             WHERE tenant=$1 AND endpoint_id=k.id OFFSET 0 FOR UPDATE) e ORDER BY k.n"
    )
});
static INSERT_ENDPOINTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO endpoints(tenant, {ENDPOINT_COLUMNS}, token_hash) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], \
         $6::bigint[], $7::bigint[], $8::jsonb[], $9::bigint[], $10::bigint[], $11::bigint[], \
         $12::bytea[]) ON CONFLICT DO NOTHING"
    )
});
const TOKENS: &str = "SELECT t.token_hash, t.endpoint_id FROM unnest($3::bytea[]) AS k(h) \
    CROSS JOIN LATERAL (SELECT token_hash, endpoint_id FROM tokens \
        WHERE tenant=$1 AND app=$2 AND token_hash=k.h OFFSET 0) t";
/// The token rows of endpoints, in creation order. Sent after `LOCK_ROWS`: read once the
/// endpoint rows are locked, and every token write is a command on its (locked) endpoint.
static ENDPOINT_TOKENS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT t.* FROM unnest($2::text[]) WITH ORDINALITY AS k(id, n) \
         CROSS JOIN LATERAL (SELECT {TOKEN_COLUMNS} FROM tokens \
             WHERE tenant=$1 AND endpoint_id=k.id OFFSET 0) t \
         ORDER BY k.n, t.created, t.token_id COLLATE \"C\""
    )
});
/// Claim tokens by hash, locked in the order of the array (sorted by the caller): two
/// replicas using one claim token serialise on its row.
static LOCK_CLAIMS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT c.* FROM unnest($3::bytea[]) WITH ORDINALITY AS k(h, n) \
         CROSS JOIN LATERAL (SELECT {CLAIM_COLUMNS} FROM claim_tokens \
             WHERE tenant=$1 AND app=$2 AND claim_hash=k.h OFFSET 0 FOR UPDATE) c \
         ORDER BY k.n"
    )
});
/// Holders of token IDs (imports bring their own IDs).
const TOKEN_IDS: &str = "SELECT t.token_id, t.endpoint_id FROM unnest($2::text[]) AS k(id) \
    CROSS JOIN LATERAL (SELECT token_id, endpoint_id FROM tokens \
        WHERE tenant=$1 AND token_id=k.id OFFSET 0) t";
const INCARNATIONS: &str =
    "SELECT nextval('endpoint_incarnation') FROM generate_series(1::bigint, $1::bigint)";
/// Locks in the order given (the caller sorts the keys, so processes lock in one order).
const LOCK_APPS_SHARED: &str =
    "SELECT pg_advisory_xact_lock_shared(k) FROM unnest($1::bigint[]) AS k";
const LOCK_APPS: &str = "SELECT CASE WHEN x THEN pg_advisory_xact_lock(k) \
    ELSE pg_advisory_xact_lock_shared(k) END FROM unnest($1::bigint[], $2::bool[]) AS u(k, x)";
/// The tokens and the rows of deleted (or deleted and registered again) endpoints.
const DELETE_ENDPOINTS: &str =
    "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[]) AS k(t, id)), \
    gone AS (DELETE FROM tokens USING k WHERE tokens.tenant=k.t AND tokens.endpoint_id=k.id) \
    DELETE FROM endpoints USING k WHERE endpoints.tenant=k.t AND endpoints.endpoint_id=k.id";
const UPDATE_ENDPOINTS: &str = "UPDATE endpoints e SET app_version=u.av, \
    app_version_registered=u.avr, metadata=u.md, metadata_updated=u.mu, version=u.v, \
    metadata_version=u.mv \
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::jsonb[], $6::bigint[], \
    $7::bigint[], $8::bigint[]) AS u(t, id, av, avr, md, mu, v, mv) \
    WHERE e.tenant=u.t AND e.endpoint_id=u.id";
const INSERT_TOKENS: &str = "INSERT INTO tokens(tenant, app, token_hash, endpoint_id, created, \
    token_id, status, updated) \
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bigint[], \
    $6::text[], $7::text[], $8::bigint[]) ON CONFLICT DO NOTHING";
const UPDATE_TOKENS: &str = "UPDATE tokens t SET status=u.s, updated=u.up \
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
        AS u(t, ep, id, s, up) \
    WHERE t.tenant=u.t AND t.token_id=u.id AND t.endpoint_id=u.ep";
/// Only an unused claim token: the row is locked since the preload, so all of them.
const USE_CLAIMS: &str = "UPDATE claim_tokens c SET used_at=u.at, used_by=u.by \
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::text[]) \
        AS u(t, app, h, at, by) \
    WHERE c.tenant=u.t AND c.app=u.app AND c.claim_hash=u.h AND c.used_at IS NULL";
const INSERT_BATCH: &str =
    "INSERT INTO batch_tasks(tenant, task_id, app, created, outcome) VALUES($1,$2,$3,$4,$5)";
/// `WITH ORDINALITY … ORDER BY n`: the ids (`bigserial`) follow the events' order.
const INSERT_OUTBOX: &str = "INSERT INTO outbox(event) \
    SELECT e FROM unnest($1::text[]) WITH ORDINALITY AS u(e, n) ORDER BY n";
const NOTIFY: &str = "SELECT pg_notify($1, '')";

/// A writer's statements, prepared once per connection.
struct Statements {
    lock_rows: Statement,
    tokens: Statement,
    endpoint_tokens: Statement,
    lock_claims: Statement,
    token_ids: Statement,
    incarnations: Statement,
    lock_apps_shared: Statement,
    lock_apps: Statement,
    delete: Statement,
    update: Statement,
    insert_tokens: Statement,
    update_tokens: Statement,
    use_claims: Statement,
    insert_endpoints: Statement,
    insert_batch: Statement,
    outbox: Statement,
    notify: Statement,
}

impl Statements {
    async fn prepare(c: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        // Pipelined: one round trip for all of them.
        let all = try_join_all(
            [
                LOCK_ROWS.as_str(),
                TOKENS,
                ENDPOINT_TOKENS.as_str(),
                LOCK_CLAIMS.as_str(),
                TOKEN_IDS,
                INCARNATIONS,
                LOCK_APPS_SHARED,
                LOCK_APPS,
                DELETE_ENDPOINTS,
                UPDATE_ENDPOINTS,
                INSERT_TOKENS,
                UPDATE_TOKENS,
                USE_CLAIMS,
                INSERT_ENDPOINTS.as_str(),
                INSERT_BATCH,
                INSERT_OUTBOX,
                NOTIFY,
            ]
            .map(|sql| c.prepare(sql)),
        )
        .await?;
        let mut it = all.into_iter();
        let mut next = || it.next().expect("one statement per SQL text");
        Ok(Self {
            lock_rows: next(),
            tokens: next(),
            endpoint_tokens: next(),
            lock_claims: next(),
            token_ids: next(),
            incarnations: next(),
            lock_apps_shared: next(),
            lock_apps: next(),
            delete: next(),
            update: next(),
            insert_tokens: next(),
            update_tokens: next(),
            use_claims: next(),
            insert_endpoints: next(),
            insert_batch: next(),
            outbox: next(),
            notify: next(),
        })
    }
}

/// A writer's own connection.
struct Conn {
    client: deadpool_postgres::Object,
    st: Statements,
}

// ---------------------------------------------------------------------------------------
// The writer task

struct WriterTask {
    inner: Arc<Inner>,
    /// The writer's position in this process (writer 0 also prunes batch outcomes).
    index: usize,
    /// Its `filter_counts` shard (see `start`).
    shard: usize,
    /// Taken from the pool at the first job and kept; dropped after a failure (a fresh
    /// session next time: the old one may be dead or in an unknown state).
    conn: Option<Conn>,
    last_prune: Option<Instant>,
    failure_log: LogGate,
}

/// Why a group's run failed.
enum Failure {
    /// Worth running again: a deadlock, a serialization failure, or an ID or token taken by
    /// another replica after the rows were read.
    Again(String),
    Fatal(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let again = match &e {
            StoreError::Unavailable(b) => b
                .downcast_ref::<tokio_postgres::Error>()
                .is_some_and(retryable),
            StoreError::Rejected(_) => false,
        };
        if again {
            Failure::Again(e.to_string())
        } else {
            Failure::Fatal(e)
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        db(e).into()
    }
}

enum Work {
    Execute(Command, WriteCtx),
    Batch(BatchWork),
}

enum ReplyTo {
    Effect(Reply<Effect>),
    Batch(Reply<BatchOutcome>),
}

impl ReplyTo {
    fn fail(self, text: &str) {
        match self {
            Self::Effect(r) => drop(r.send(Err(msg(text)))),
            Self::Batch(r) => drop(r.send(Err(msg(text)))),
        }
    }
}

enum Answer {
    Effect(Result<Effect, StoreError>),
    Batch(BatchOutcome),
}

/// A committed group: one answer per job, and whether events were appended.
struct Done {
    answers: Vec<Answer>,
    appended: bool,
}

impl WriterTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let max = self.inner.cfg.max_group.max(1);
        // Drain acknowledgements: dropped (answered) when the loop ends.
        let mut closers = Vec::new();
        // A store dropped without `shutdown` sets `stop`: accept nothing more, answer what
        // is queued, then end (releasing the connection and the shared state).
        let mut stop = self.inner.stop.subscribe();
        let mut stopping = false;
        loop {
            let first = tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                _ = stop.wait_for(|s| *s), if !stopping => {
                    stopping = true;
                    rx.close();
                    continue;
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < max {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let mut group = Vec::with_capacity(jobs.len());
            let mut imports = Vec::new();
            for job in jobs {
                match job {
                    Job::Execute(cmd, ctx, r) => {
                        group.push((Work::Execute(cmd, ctx), ReplyTo::Effect(r)))
                    }
                    Job::Batch(b, r) => group.push((Work::Batch(b), ReplyTo::Batch(r))),
                    Job::Import(records, r) => imports.push((records, r)),
                    Job::Close(ack) => {
                        // Later sends fail; what is queued is still received and answered.
                        rx.close();
                        closers.push(ack);
                    }
                }
            }
            // Before the group: a clock far behind (tests, imports of old data) must not
            // remove the outcome this group is about to store.
            self.prune().await;
            if !group.is_empty() {
                self.commit_group(group).await;
            }
            // An import is a transaction of its own: it takes exclusive application locks.
            for (records, reply) in imports {
                let result = self.import(records).await;
                let _ = reply.send(result);
            }
        }
        drop(closers);
        tracing::debug!(writer = self.index, "PostgreSQL writer stopped");
    }

    /// The writer's connection, taken from the pool (and its statements prepared) if needed.
    async fn connection(inner: &Inner, slot: &mut Option<Conn>) -> Result<(), StoreError> {
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            let client = inner.pool.get().await.map_err(pool)?;
            let st = Statements::prepare(&client).await.map_err(db)?;
            *slot = Some(Conn { client, st });
        }
        Ok(())
    }

    async fn commit_group(&mut self, jobs: Vec<(Work, ReplyTo)>) {
        let started = Instant::now();
        let size = jobs.len();
        let (works, replies): (Vec<Work>, Vec<ReplyTo>) = jobs.into_iter().unzip();
        let shard = i16::try_from(self.shard).unwrap_or(i16::MAX);
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            if let Err(e) = Self::connection(&self.inner, &mut self.conn).await {
                break Err(e);
            }
            let Conn { client, st } = self.conn.as_mut().expect("connected above");
            match run_group(&self.inner, client, st, shard, &works).await {
                Ok(done) => break Ok(done),
                Err(Failure::Again(why)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(attempt, reason = %why, "write group runs again");
                    metrics::counter!("epr_pg_errors_total", "kind" => "group_retry").increment(1);
                }
                Err(Failure::Again(why)) => {
                    break Err(msg(format!(
                        "the write group failed {MAX_ATTEMPTS} times, last: {why}"
                    )))
                }
                Err(Failure::Fatal(e)) => {
                    self.conn = None;
                    break Err(e);
                }
            }
        };
        match outcome {
            Ok(done) => {
                for (reply, answer) in replies.into_iter().zip(done.answers) {
                    match (reply, answer) {
                        (ReplyTo::Effect(r), Answer::Effect(a)) => drop(r.send(a)),
                        (ReplyTo::Batch(r), Answer::Batch(a)) => drop(r.send(Ok(a))),
                        (reply, _) => reply.fail("internal error: answers out of order"),
                    }
                }
                if done.appended {
                    self.inner.outbox.wake();
                }
            }
            Err(e) => {
                if let Some(suppressed) = self.failure_log.admit(Instant::now()) {
                    tracing::error!(error = %e, suppressed, "write group failed; nothing of it was acknowledged");
                }
                let text = e.to_string();
                replies.into_iter().for_each(|r| r.fail(&text));
            }
        }
        metrics::histogram!("epr_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("epr_store_commit_group_size").record(size as f64);
    }

    async fn import(
        &mut self,
        records: Vec<ImportRecord>,
    ) -> Result<Vec<ImportOutcome>, StoreError> {
        let started = Instant::now();
        let shard = i16::try_from(self.shard).unwrap_or(i16::MAX);
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            Self::connection(&self.inner, &mut self.conn).await?;
            let Conn { client, st } = self.conn.as_mut().expect("connected above");
            match run_import(&self.inner, client, st, shard, &records).await {
                Ok(outcomes) => break Ok(outcomes),
                Err(Failure::Again(why)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(attempt, reason = %why, "import runs again");
                }
                Err(Failure::Again(why)) => {
                    break Err(msg(format!(
                        "the import failed {MAX_ATTEMPTS} times, last: {why}"
                    )))
                }
                Err(Failure::Fatal(e)) => {
                    self.conn = None;
                    break Err(e);
                }
            }
        };
        metrics::histogram!("epr_store_commit_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    /// Deletes batch outcomes past their retention, now and then, outside any group (a
    /// failure here must not fail writes).
    async fn prune(&mut self) {
        if self.index != 0 || self.last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        self.last_prune = Some(Instant::now());
        if Self::connection(&self.inner, &mut self.conn).await.is_err() {
            return; // the group that follows reports it
        }
        let Some(conn) = &self.conn else { return };
        let cutoff = now_millis() - self.inner.cfg.batch_retention_ms;
        if let Err(e) = conn
            .client
            .execute("DELETE FROM batch_tasks WHERE created < $1", &[&cutoff])
            .await
        {
            tracing::warn!(error = %e, "pruning old batch outcomes failed");
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------
// One run of a group

/// Every command of the group with its context, in order (batch items included).
fn commands(works: &[Work]) -> impl Iterator<Item = (&Command, &WriteCtx)> {
    works.iter().flat_map(
        |w| -> Box<dyn Iterator<Item = (&Command, &WriteCtx)> + '_> {
            match w {
                Work::Execute(cmd, ctx) => Box::new(std::iter::once((cmd, ctx))),
                Work::Batch(b) => Box::new(
                    b.items
                        .iter()
                        .filter_map(move |i| i.cmd.as_ref().ok().map(|c| (c, &b.ctx))),
                ),
            }
        },
    )
}

/// The ID of the token a command may insert (with [`Command::new_token`]).
fn new_token_id(cmd: &Command) -> Option<&TokenId> {
    match cmd {
        Command::IssueToken { token_id, .. } => Some(token_id),
        other => other.registration().map(|r| &r.token_id),
    }
}

/// A token hash's owner, by tenant, application and hash.
type TokenKey<'w> = (&'w str, &'w str, [u8; 32]);
/// An endpoint, by tenant and ID.
type Key<'w> = (&'w str, &'w str);

/// One applied command's outputs, in command order.
struct Step<'w> {
    key: Key<'w>,
    ctx: &'w WriteCtx,
    app: AppName,
    changes: Vec<MatchChange>,
    /// The endpoint's events, then the membership events of `changes` (added once applied).
    events: Vec<OutboxEvent>,
    /// Appended after `events`.
    token_events: Vec<OutboxEvent>,
}

/// An endpoint's token rows as the group sees them: as read (when a plan needed them) and
/// the group's changes.
#[derive(Default)]
struct TokenState {
    /// Rows as read, with the group's status changes applied (empty once `deleted_all`).
    loaded: Vec<StoredToken>,
    /// IDs of `loaded` rows whose status the group changed.
    dirty: BTreeSet<String>,
    /// Every row of the endpoint as read is deleted (its endpoint was unregistered).
    deleted_all: bool,
    /// Rows the group inserts, in their state now.
    inserted: Vec<StoredToken>,
}

impl TokenState {
    fn view(&self) -> Vec<StoredToken> {
        self.loaded
            .iter()
            .chain(self.inserted.iter())
            .cloned()
            .collect()
    }

    fn apply(&mut self, op: TokenOp) -> Result<(), StoreError> {
        match op {
            TokenOp::Insert(t) => self.inserted.push(t),
            TokenOp::SetStatus {
                id,
                status,
                updated,
            } => {
                if let Some(t) = self.inserted.iter_mut().find(|t| t.id == id) {
                    t.status = status;
                    t.updated = Some(updated);
                } else if let Some(t) = self.loaded.iter_mut().find(|t| t.id == id) {
                    t.status = status;
                    t.updated = Some(updated);
                    self.dirty.insert(id.as_str().to_owned());
                } else {
                    return Err(msg("internal error: a status change of a token not loaded"));
                }
            }
            TokenOp::DeleteAll => {
                self.deleted_all = true;
                self.loaded.clear();
                self.dirty.clear();
                self.inserted.clear();
            }
        }
        Ok(())
    }
}

/// The group's view of the database: rows as read (locked), and its own changes on top.
struct Overlay<'w> {
    initial: HashMap<Key<'w>, Endpoint>,
    /// Endpoints this group changed: their state now (`None`: deleted).
    changed: HashMap<Key<'w>, Option<Endpoint>>,
    /// Holders of the token hashes the group's commands would insert (as read, then as the
    /// group changed them).
    holders: HashMap<TokenKey<'w>, String>,
    /// Holders of the token IDs the group's commands would insert, likewise.
    id_holders: HashMap<Key<'w>, String>,
    /// The initial token hash of every endpoint the group registered (and still holds).
    new_tokens: HashMap<Key<'w>, [u8; 32]>,
    /// Token rows by endpoint: those read for the plans, and every endpoint whose tokens
    /// the group changed.
    tokens: HashMap<Key<'w>, TokenState>,
    /// Claim tokens as read (locked), with the group's uses.
    claims: HashMap<TokenKey<'w>, ClaimToken>,
    /// Claim tokens the group used up, in order.
    claim_uses: Vec<(TokenKey<'w>, ClaimUse)>,
    filters: HashMap<String, HashMap<String, Arc<AppFilters>>>,
    incarnations: std::vec::IntoIter<i64>,
    steps: Vec<Step<'w>>,
}

impl<'w> Overlay<'w> {
    fn current(&self, key: &Key<'w>) -> Option<Endpoint> {
        match self.changed.get(key) {
            Some(state) => state.clone(),
            None => self.initial.get(key).cloned(),
        }
    }

    /// Plans one command over the group's state. `Rejected` changes nothing.
    fn command(&mut self, cmd: &'w Command, ctx: &'w WriteCtx) -> Result<Effect, StoreError> {
        let tenant = ctx.tenant.as_str();
        let key = (tenant, cmd.endpoint_id().as_str());
        let before = self.current(&key);
        let incarnation = match cmd.registration() {
            Some(_) => self
                .incarnations
                .next()
                .ok_or_else(|| msg("internal error: too few incarnations taken"))?,
            None => 0,
        };
        let claim_key = cmd
            .claim()
            .map(|(app, hash)| (tenant, app.as_str(), hash.0));
        let loaded = Loaded {
            tokens: match self.tokens.get(&key) {
                Some(state) if cmd.needs_tokens() => state.view(),
                _ => Vec::new(),
            },
            claim: claim_key.and_then(|k| self.claims.get(&k).cloned()),
        };
        let plan = plan(before.clone(), &loaded, cmd, ctx, incarnation)?;
        // A token the plan inserts must be free in its application (the row's primary key).
        let inserts_token = plan
            .tokens
            .ops
            .iter()
            .any(|op| matches!(op, TokenOp::Insert(_)));
        let new_token = match cmd.new_token() {
            Some((app, hash)) if inserts_token => {
                let token_key = (tenant, app.as_str(), hash.0);
                if self.holders.contains_key(&token_key) {
                    return Err(DomainError::Conflict {
                        field: "endpointToken",
                        message: format!(
                            "the endpoint token is already in use in application '{app}'"
                        ),
                    }
                    .into());
                }
                Some(token_key)
            }
            None if inserts_token => {
                return Err(msg(
                    "internal error: a plan inserted a token its command does not name",
                ))
            }
            _ => None,
        };
        // Token IDs are generated (UUIDs), so this never refuses in practice; checked so
        // that a clash refuses one command instead of failing its whole group.
        let new_id = match new_token_id(cmd) {
            Some(token_id) if inserts_token => {
                if self.id_holders.contains_key(&(tenant, token_id.as_str())) {
                    return Err(DomainError::Conflict {
                        field: "endpointTokenId",
                        message: format!("the endpoint token ID '{token_id}' is already in use"),
                    }
                    .into());
                }
                Some((tenant, token_id.as_str()))
            }
            _ => None,
        };
        let changed_keys = plan.changed_metadata_keys(cmd);
        let app = plan.effect.endpoint().app.clone();
        let changes = match self
            .filters
            .get(tenant)
            .and_then(|apps| apps.get(app.as_str()))
        {
            Some(f) if !f.is_empty() && !matches!(plan.effect, Effect::Unchanged(_)) => {
                f.evaluate(&plan.effect, before.as_ref(), changed_keys.as_ref())
            }
            _ => Vec::new(),
        };
        drop(changed_keys);
        match (&plan.effect, cmd.registration()) {
            (Effect::Insert(ep), Some(reg)) => {
                self.new_tokens.insert(key, reg.token_hash.0);
                self.changed.insert(key, Some(ep.clone()));
            }
            (Effect::Update(ep), _) => {
                self.changed.insert(key, Some(ep.clone()));
            }
            (Effect::Delete(ep), _) => {
                // Its tokens are free again (for a later command of this group too).
                self.holders
                    .retain(|(t, _, _), holder| !(*t == tenant && holder == ep.id.as_str()));
                self.id_holders
                    .retain(|(t, _), holder| !(*t == tenant && holder == ep.id.as_str()));
                self.new_tokens.remove(&key);
                self.changed.insert(key, None);
            }
            (Effect::Unchanged(_), _) => {}
            (Effect::Insert(_), None) => {
                return Err(msg("plan inserted for a non-registration command"));
            }
        }
        let Plan {
            effect,
            events,
            tokens,
            ..
        } = plan;
        if !tokens.ops.is_empty() {
            let state = self.tokens.entry(key).or_default();
            for op in tokens.ops {
                state.apply(op)?;
            }
        }
        if let Some(token_key) = new_token {
            self.holders.insert(token_key, key.1.to_owned());
        }
        if let Some(id_key) = new_id {
            self.id_holders.insert(id_key, key.1.to_owned());
        }
        if let Some((hash, used)) = tokens.claim_used {
            let k = claim_key
                .filter(|k| k.2 == hash.0)
                .ok_or_else(|| msg("internal error: a plan used a claim token not loaded"))?;
            if let Some(c) = self.claims.get_mut(&k) {
                c.used = Some(used.clone());
            }
            self.claim_uses.push((k, used));
        }
        let events: Vec<OutboxEvent> = events.into_iter().map(OutboxEvent::from).collect();
        let token_events: Vec<OutboxEvent> =
            tokens.events.into_iter().map(OutboxEvent::from).collect();
        if !events.is_empty() || !changes.is_empty() || !token_events.is_empty() {
            self.steps.push(Step {
                key,
                ctx,
                app,
                changes,
                events,
                token_events,
            });
        }
        Ok(effect)
    }
}

/// The rows a group writes: the final state of every endpoint it changed, its tokens, the
/// claim tokens it used.
#[derive(Default)]
struct FinalWrites<'a> {
    del_tenant: Vec<&'a str>,
    del_id: Vec<&'a str>,
    upd: Vec<(&'a str, &'a Endpoint)>,
    /// Endpoints inserted, with their initial token's hash.
    ins: Vec<(&'a str, &'a Endpoint, [u8; 32])>,
    /// Token rows inserted (after the deletions: an endpoint deleted and registered again).
    tok_ins: Vec<(&'a str, &'a StoredToken)>,
    /// Token rows as they are now, whose status changed.
    tok_upd: Vec<(&'a str, &'a StoredToken)>,
    claim_uses: Vec<(TokenKey<'a>, &'a ClaimUse)>,
}

/// Rows [`FinalWrites::run`] wrote, to compare with what it meant to.
#[derive(Debug, PartialEq, Eq)]
struct Written {
    endpoints: u64,
    tokens: u64,
    token_updates: u64,
    claims: u64,
}

impl<'a> FinalWrites<'a> {
    fn delete(&mut self, tenant: &'a str, id: &'a str) {
        self.del_tenant.push(tenant);
        self.del_id.push(id);
    }

    /// What [`FinalWrites::run`] writes when no other replica got in the way.
    fn expected(&self) -> Written {
        Written {
            endpoints: self.ins.len() as u64,
            tokens: self.tok_ins.len() as u64,
            token_updates: self.tok_upd.len() as u64,
            claims: self.claim_uses.len() as u64,
        }
    }

    /// Runs the statements, pipelined, in an order that keeps them independent: deletions
    /// first (an ID deleted and registered again), inserts after. Token status changes
    /// touch only rows that existed before the group and are not deleted.
    async fn run(&self, tx: &Transaction<'_>, st: &Statements) -> Result<Written, StoreError> {
        let deletes = async {
            if self.del_id.is_empty() {
                return Ok(0);
            }
            tx.execute(&st.delete, &[&self.del_tenant, &self.del_id])
                .await
        };
        let updates = async {
            if self.upd.is_empty() {
                return Ok(0);
            }
            let t: Vec<&str> = self.upd.iter().map(|(t, _)| *t).collect();
            let id: Vec<&str> = self.upd.iter().map(|(_, e)| e.id.as_str()).collect();
            let av: Vec<&str> = self
                .upd
                .iter()
                .map(|(_, e)| e.app_version.as_str())
                .collect();
            let avr: Vec<i64> = self
                .upd
                .iter()
                .map(|(_, e)| e.app_version_registered.0)
                .collect();
            let md: Vec<Json<&serde_json::Map<String, serde_json::Value>>> = self
                .upd
                .iter()
                .map(|(_, e)| Json(e.metadata.as_map()))
                .collect();
            let mu: Vec<Option<i64>> = self
                .upd
                .iter()
                .map(|(_, e)| e.metadata_updated.map(|t| t.0))
                .collect();
            let v: Vec<i64> = self.upd.iter().map(|(_, e)| e.version as i64).collect();
            let mv: Vec<i64> = self
                .upd
                .iter()
                .map(|(_, e)| e.metadata_version as i64)
                .collect();
            tx.execute(&st.update, &[&t, &id, &av, &avr, &md, &mu, &v, &mv])
                .await
        };
        let token_updates = async {
            if self.tok_upd.is_empty() {
                return Ok(0);
            }
            let t: Vec<&str> = self.tok_upd.iter().map(|(t, _)| *t).collect();
            let ep: Vec<&str> = self
                .tok_upd
                .iter()
                .map(|(_, k)| k.endpoint_id.as_str())
                .collect();
            let id: Vec<&str> = self.tok_upd.iter().map(|(_, k)| k.id.as_str()).collect();
            let status: Vec<&str> = self
                .tok_upd
                .iter()
                .map(|(_, k)| k.status.as_str())
                .collect();
            let updated: Vec<Option<i64>> = self
                .tok_upd
                .iter()
                .map(|(_, k)| k.updated.map(|u| u.0))
                .collect();
            tx.execute(&st.update_tokens, &[&t, &ep, &id, &status, &updated])
                .await
        };
        let tokens = async {
            if self.tok_ins.is_empty() {
                return Ok(0);
            }
            let k = || self.tok_ins.iter().map(|(_, k)| *k);
            let t: Vec<&str> = self.tok_ins.iter().map(|(t, _)| *t).collect();
            let app: Vec<&str> = k().map(|k| k.app.as_str()).collect();
            let hash: Vec<&[u8]> = k().map(|k| &k.hash.0[..]).collect();
            let ep: Vec<&str> = k().map(|k| k.endpoint_id.as_str()).collect();
            let created: Vec<i64> = k().map(|k| k.created.0).collect();
            let id: Vec<&str> = k().map(|k| k.id.as_str()).collect();
            let status: Vec<&str> = k().map(|k| k.status.as_str()).collect();
            let updated: Vec<Option<i64>> = k().map(|k| k.updated.map(|u| u.0)).collect();
            tx.execute(
                &st.insert_tokens,
                &[&t, &app, &hash, &ep, &created, &id, &status, &updated],
            )
            .await
        };
        let inserts = async {
            if self.ins.is_empty() {
                return Ok(0);
            }
            let e = || self.ins.iter().map(|i| i.1);
            let t: Vec<&str> = self.ins.iter().map(|i| i.0).collect();
            let inc: Vec<i64> = e().map(|e| e.incarnation).collect();
            let id: Vec<&str> = e().map(|e| e.id.as_str()).collect();
            let app: Vec<&str> = e().map(|e| e.app.as_str()).collect();
            let av: Vec<&str> = e().map(|e| e.app_version.as_str()).collect();
            let avr: Vec<i64> = e().map(|e| e.app_version_registered.0).collect();
            let created: Vec<i64> = e().map(|e| e.created.0).collect();
            let md: Vec<Json<&serde_json::Map<String, serde_json::Value>>> =
                e().map(|e| Json(e.metadata.as_map())).collect();
            let mu: Vec<Option<i64>> = e().map(|e| e.metadata_updated.map(|t| t.0)).collect();
            let v: Vec<i64> = e().map(|e| e.version as i64).collect();
            let mv: Vec<i64> = e().map(|e| e.metadata_version as i64).collect();
            let hash: Vec<&[u8]> = self.ins.iter().map(|i| &i.2[..]).collect();
            tx.execute(
                &st.insert_endpoints,
                &[
                    &t, &inc, &id, &app, &av, &avr, &created, &md, &mu, &v, &mv, &hash,
                ],
            )
            .await
        };
        let claims = async {
            if self.claim_uses.is_empty() {
                return Ok(0);
            }
            let c = || self.claim_uses.iter();
            let t: Vec<&str> = c().map(|((t, _, _), _)| *t).collect();
            let app: Vec<&str> = c().map(|((_, a, _), _)| *a).collect();
            let hash: Vec<&[u8]> = c().map(|((_, _, h), _)| &h[..]).collect();
            let at: Vec<i64> = c().map(|(_, u)| u.at.0).collect();
            let by: Vec<&str> = c().map(|(_, u)| u.endpoint_id.as_str()).collect();
            tx.execute(&st.use_claims, &[&t, &app, &hash, &at, &by])
                .await
        };
        let ((_, _, token_updates), (tokens, endpoints, claims)) = try_join(
            try_join3(deletes, updates, token_updates),
            try_join3(tokens, inserts, claims),
        )
        .await
        .map_err(db)?;
        Ok(Written {
            endpoints,
            tokens,
            token_updates,
            claims,
        })
    }
}

/// What a group (or an import chunk) reads before planning, by tenant (and application).
#[derive(Default)]
struct Wanted<'w> {
    /// Endpoint rows, locked.
    ids: BTreeMap<&'w str, BTreeSet<&'w str>>,
    /// Token hashes whose holders are looked up (the tokens the commands would insert).
    hashes: BTreeMap<(&'w str, &'w str), BTreeSet<[u8; 32]>>,
    /// Endpoints whose token rows the plans need.
    token_owners: BTreeMap<&'w str, BTreeSet<&'w str>>,
    /// Claim tokens by hash, locked.
    claims: BTreeMap<(&'w str, &'w str), BTreeSet<[u8; 32]>>,
    /// Token IDs whose holders are looked up (of the tokens the commands or records would
    /// insert).
    token_ids: BTreeMap<&'w str, BTreeSet<&'w str>>,
    /// Incarnations to take.
    registrations: i64,
}

/// What [`preload`] read.
struct Preloaded<'w> {
    initial: HashMap<Key<'w>, Endpoint>,
    holders: HashMap<TokenKey<'w>, String>,
    /// The token rows of `Wanted::token_owners` that have any, in creation order.
    tokens: HashMap<Key<'w>, Vec<StoredToken>>,
    claims: HashMap<TokenKey<'w>, ClaimToken>,
    /// Holders of `Wanted::token_ids`: (tenant, token ID) → endpoint.
    id_holders: HashMap<Key<'w>, String>,
    incarnations: Vec<i64>,
}

/// Reads what the commands name, under row locks, and takes incarnations: one round trip.
/// Statements run in the order sent: endpoint rows are locked (in key order) before their
/// tokens are read and before any claim row is locked (in key order), so groups of several
/// replicas take their locks in one order.
async fn preload<'w>(
    tx: &Transaction<'_>,
    st: &Statements,
    w: &Wanted<'w>,
) -> Result<Preloaded<'w>, StoreError> {
    let rows = try_join_all(w.ids.iter().map(|(tenant, ids)| async move {
        let list: Vec<&str> = ids.iter().copied().collect();
        tx.query(&st.lock_rows, &[tenant, &list]).await
    }));
    let tokens = try_join_all(w.hashes.iter().map(|((tenant, app), hashes)| async move {
        let list: Vec<&[u8]> = hashes.iter().map(|h| &h[..]).collect();
        tx.query(&st.tokens, &[tenant, app, &list]).await
    }));
    let owned = try_join_all(w.token_owners.iter().map(|(tenant, ids)| async move {
        let list: Vec<&str> = ids.iter().copied().collect();
        tx.query(&st.endpoint_tokens, &[tenant, &list]).await
    }));
    let claims = try_join_all(w.claims.iter().map(|((tenant, app), hashes)| async move {
        let list: Vec<&[u8]> = hashes.iter().map(|h| &h[..]).collect();
        tx.query(&st.lock_claims, &[tenant, app, &list]).await
    }));
    let token_ids = try_join_all(w.token_ids.iter().map(|(tenant, ids)| async move {
        let list: Vec<&str> = ids.iter().copied().collect();
        tx.query(&st.token_ids, &[tenant, &list]).await
    }));
    let registrations = w.registrations;
    let incarnations = async {
        if registrations == 0 {
            return Ok(Vec::new());
        }
        tx.query(&st.incarnations, &[&registrations]).await
    };
    let ((rows, tokens, owned), (claims, token_ids, incarnations)) = try_join(
        try_join3(rows, tokens, owned),
        try_join3(claims, token_ids, incarnations),
    )
    .await
    .map_err(db)?;
    let mut initial = HashMap::new();
    for ((tenant, ids), rows) in w.ids.iter().zip(rows) {
        for row in rows {
            let ep = endpoint_from_row(&row)?;
            // The key borrows the group's own strings.
            if let Some(id) = ids.get(ep.id.as_str()) {
                initial.insert((*tenant, *id), ep);
            }
        }
    }
    let mut holders = HashMap::new();
    for (((tenant, app), _), rows) in w.hashes.iter().zip(tokens) {
        for row in rows {
            let hash: &[u8] = row
                .try_get(0)
                .map_err(|e| crate::error::corrupt("token", e))?;
            let hash = crate::credentials::hash_from(hash)?.0;
            let holder: String = row
                .try_get(1)
                .map_err(|e| crate::error::corrupt("token", e))?;
            holders.insert((*tenant, *app, hash), holder);
        }
    }
    let mut by_endpoint: HashMap<Key<'w>, Vec<StoredToken>> = HashMap::new();
    for ((tenant, ids), rows) in w.token_owners.iter().zip(owned) {
        for row in rows {
            let Some(t) = token_from_row(&row, 0)? else {
                continue;
            };
            if let Some(id) = ids.get(t.endpoint_id.as_str()) {
                by_endpoint.entry((*tenant, *id)).or_default().push(t);
            }
        }
    }
    let mut claimed = HashMap::new();
    for (((tenant, app), _), rows) in w.claims.iter().zip(claims) {
        for row in rows {
            if let Some(c) = claim_from_row(&row, 0)? {
                claimed.insert((*tenant, *app, c.hash.0), c);
            }
        }
    }
    let mut id_holders = HashMap::new();
    for ((tenant, ids), rows) in w.token_ids.iter().zip(token_ids) {
        for row in rows {
            let id: &str = row
                .try_get(0)
                .map_err(|e| crate::error::corrupt("token", e))?;
            let holder: String = row
                .try_get(1)
                .map_err(|e| crate::error::corrupt("token", e))?;
            if let Some(id) = ids.get(id) {
                id_holders.insert((*tenant, *id), holder);
            }
        }
    }
    let mut incs: Vec<i64> = incarnations.iter().map(|r| r.get(0)).collect();
    incs.sort_unstable();
    Ok(Preloaded {
        initial,
        holders,
        tokens: by_endpoint,
        claims: claimed,
        id_holders,
        incarnations: incs,
    })
}

async fn run_group(
    inner: &Inner,
    client: &mut deadpool_postgres::Object,
    st: &Statements,
    shard: i16,
    works: &[Work],
) -> Result<Done, Failure> {
    let txn = client.transaction().await?;
    let tx: &Transaction<'_> = &txn;
    // 1. What the group reads.
    let mut wanted = Wanted::default();
    for (cmd, ctx) in commands(works) {
        let tenant = ctx.tenant.as_str();
        let id = cmd.endpoint_id().as_str();
        wanted.ids.entry(tenant).or_default().insert(id);
        if cmd.registration().is_some() {
            wanted.registrations += 1;
        }
        if let Some((app, hash)) = cmd.new_token() {
            wanted
                .hashes
                .entry((tenant, app.as_str()))
                .or_default()
                .insert(hash.0);
        }
        if let Some(token_id) = new_token_id(cmd) {
            wanted
                .token_ids
                .entry(tenant)
                .or_default()
                .insert(token_id.as_str());
        }
        if cmd.needs_tokens() {
            wanted.token_owners.entry(tenant).or_default().insert(id);
        }
        if let Some((app, hash)) = cmd.claim() {
            wanted
                .claims
                .entry((tenant, app.as_str()))
                .or_default()
                .insert(hash.0);
        }
    }
    let Preloaded {
        initial,
        holders,
        tokens,
        claims,
        id_holders,
        incarnations,
    } = preload(tx, st, &wanted).await?;
    // Every endpoint whose tokens a plan needs has a state (empty when it has no rows).
    let mut tokens: HashMap<Key<'_>, TokenState> = tokens
        .into_iter()
        .map(|(k, loaded)| {
            (
                k,
                TokenState {
                    loaded,
                    ..TokenState::default()
                },
            )
        })
        .collect();
    for (tenant, ids) in &wanted.token_owners {
        for id in ids {
            tokens.entry((*tenant, *id)).or_default();
        }
    }

    // 2. The applications' shared locks (sorted: one order in every process), then their
    // filters as of now.
    let mut apps: BTreeSet<(&TenantId, AppName)> = BTreeSet::new();
    for (cmd, ctx) in commands(works) {
        let app = match cmd.registration() {
            Some(reg) => &reg.app,
            None => match initial.get(&(ctx.tenant.as_str(), cmd.endpoint_id().as_str())) {
                Some(ep) => &ep.app,
                // Registered earlier in this group (its application is in the set) or
                // absent (refused).
                None => continue,
            },
        };
        apps.insert((&ctx.tenant, app.clone()));
    }
    let mut keys: Vec<i64> = apps.iter().map(|(t, a)| app_lock_key(t, a)).collect();
    keys.sort_unstable();
    keys.dedup();
    let lock = async {
        if !keys.is_empty() {
            tx.execute(&st.lock_apps_shared, &[&keys])
                .await
                .map_err(db)?;
        }
        Ok::<_, StoreError>(())
    };
    // Sent after the lock statement on the same session, so they run once it is held.
    let reads = try_join_all(apps.iter().map(|(t, a)| inner.filters.current(tx, t, a)));
    let ((), read) = try_join(lock, reads).await?;
    let mut filters: HashMap<String, HashMap<String, Arc<AppFilters>>> = HashMap::new();
    for ((tenant, app), f) in apps.into_iter().zip(read) {
        filters
            .entry(tenant.as_str().to_owned())
            .or_default()
            .insert(app.into_string(), f);
    }

    // 3. Plan every command over the group's own state.
    let mut g = Overlay {
        initial,
        changed: HashMap::new(),
        holders,
        id_holders,
        new_tokens: HashMap::new(),
        tokens,
        claims,
        claim_uses: Vec::new(),
        filters,
        incarnations: incarnations.into_iter(),
        steps: Vec::new(),
    };
    let mut answers = Vec::with_capacity(works.len());
    let mut batches: Vec<(&str, &str, &str, i64, String)> = Vec::new();
    for work in works {
        match work {
            Work::Execute(cmd, ctx) => match g.command(cmd, ctx) {
                Err(StoreError::Unavailable(e)) => return Err(StoreError::Unavailable(e).into()),
                result => answers.push(Answer::Effect(result)),
            },
            Work::Batch(b) => {
                let mut outcome = BatchOutcome {
                    task_id: b.task_id.clone(),
                    app: b.app.clone(),
                    created_at: b.ctx.now,
                    created: Vec::new(),
                    failed: Vec::new(),
                };
                for (index, item) in b.items.iter().enumerate() {
                    let result = match &item.cmd {
                        Err(reason) => Err(reason.clone()),
                        Ok(cmd) => match g.command(cmd, &b.ctx) {
                            Ok(effect) => Ok(effect),
                            Err(StoreError::Rejected(e)) => Err(e.to_string()),
                            Err(e) => return Err(e.into()),
                        },
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
                            endpoint_id: item.endpoint_id.clone(),
                            metadata_text: item.metadata_text.clone(),
                            reason,
                        }),
                    }
                }
                batches.push((
                    b.ctx.tenant.as_str(),
                    b.task_id.as_str(),
                    b.app.as_str(),
                    b.ctx.now.0,
                    codec::encode_outcome(&outcome),
                ));
                answers.push(Answer::Batch(outcome));
            }
        }
    }

    // 4. The final state of every endpoint the group changed (sorted: replicas inserting
    // the same IDs wait for each other in one order instead of deadlocking).
    let mut writes = FinalWrites::default();
    let mut changed: Vec<(&Key<'_>, &Option<Endpoint>)> = g.changed.iter().collect();
    changed.sort_unstable_by_key(|(k, _)| **k);
    for (key, now) in changed {
        let (tenant, id) = *key;
        let token = g.new_tokens.get(key).copied();
        let token = |ep| {
            token
                .map(|hash| (tenant, ep, hash))
                .ok_or_else(|| msg("internal error: a registered endpoint without its token"))
        };
        match (g.initial.get(key), now) {
            (Some(_), None) => writes.delete(tenant, id),
            (Some(was), Some(ep)) if was.incarnation == ep.incarnation => {
                if was != ep {
                    writes.upd.push((tenant, ep));
                }
            }
            (Some(_), Some(ep)) => {
                writes.delete(tenant, id);
                writes.ins.push(token(ep)?);
            }
            (None, Some(ep)) => writes.ins.push(token(ep)?),
            (None, None) => {}
        }
    }
    // Token rows: a `deleted_all` endpoint's rows as read go with the endpoint's deletion
    // above (an endpoint whose tokens were all deleted was unregistered, so it is deleted,
    // or deleted and registered again, or was not there before the group).
    let mut token_keys: Vec<(&Key<'_>, &TokenState)> = g.tokens.iter().collect();
    token_keys.sort_unstable_by_key(|(k, _)| **k);
    for ((tenant, _), state) in token_keys {
        for t in &state.loaded {
            if state.dirty.contains(t.id.as_str()) {
                writes.tok_upd.push((tenant, t));
            }
        }
        writes
            .tok_ins
            .extend(state.inserted.iter().map(|t| (*tenant, t)));
    }
    writes.claim_uses = g.claim_uses.iter().map(|(k, u)| (*k, u)).collect();
    let expected = writes.expected();
    let batch_rows = try_join_all(batches.iter().map(
        |(t, task, app, created, outcome)| async move {
            tx.execute(&st.insert_batch, &[t, task, app, created, outcome])
                .await
        },
    ));
    // Membership, one command after the other (in command order, as its events).
    let mut steps = std::mem::take(&mut g.steps);
    let record = inner.cfg.record_events;
    let has_membership = steps.iter().any(|s| !s.changes.is_empty());
    let writes = try_join(writes.run(tx, st), batch_rows.map_err(db));
    let appended;
    let (written, _) = if has_membership {
        // Commands on different endpoints touch different membership rows (counts are
        // added deltas): their statements are pipelined. One endpoint's run in order.
        let mut chains: HashMap<Key<'_>, Vec<usize>> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            if !step.changes.is_empty() {
                chains.entry(step.key).or_default().push(i);
            }
        }
        let steps_ref = &steps;
        let membership = try_join_all(chains.into_values().map(|chain| async move {
            let mut out = Vec::with_capacity(chain.len());
            for i in chain {
                let step = &steps_ref[i];
                let events = crate::filters::apply(
                    tx,
                    &step.ctx.tenant,
                    &step.app,
                    &step.changes,
                    step.ctx,
                    shard,
                )
                .await?;
                out.push((i, events));
            }
            Ok::<_, StoreError>(out)
        }));
        let (written, events) = try_join(writes, membership).await?;
        for (i, events) in events.into_iter().flatten() {
            steps[i].events.extend(events);
        }
        appended = record && append(tx, st, &steps).await?;
        written
    } else if record {
        // No membership: the events are known, so they go in the same round trip.
        let (written, was) = try_join(writes, append(tx, st, &steps)).await?;
        appended = was;
        written
    } else {
        appended = false;
        writes.await?
    };
    if written != expected {
        // Another replica took an ID or a token since the rows were read; its commit is
        // visible to the next run, whose plan then refuses as the domain does.
        return Err(Failure::Again(format!(
            "an endpoint ID or token was taken by a concurrent write \
             (wrote {written:?}, meant {expected:?})"
        )));
    }
    drop(steps);
    // 5. Commit; nothing was acknowledged before this returned.
    txn.commit().await?;
    Ok(Done { answers, appended })
}

/// Appends the steps' events to the outbox, in order, and notifies the relay leader (the
/// notification is delivered at commit). Whether anything was appended.
async fn append(
    tx: &Transaction<'_>,
    st: &Statements,
    steps: &[Step<'_>],
) -> Result<bool, StoreError> {
    let texts: Vec<String> = steps
        .iter()
        .flat_map(|s| s.events.iter().chain(s.token_events.iter()))
        .map(codec::encode_outbox)
        .collect();
    if texts.is_empty() {
        return Ok(false);
    }
    try_join(
        tx.execute(&st.outbox, &[&texts]),
        tx.execute(&st.notify, &[&crate::outbox::NOTIFY_CHANNEL]),
    )
    .await
    .map_err(db)?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// Import

/// One run of an import: one transaction, records in order, each all or nothing.
async fn run_import(
    inner: &Inner,
    client: &mut deadpool_postgres::Object,
    st: &Statements,
    shard: i16,
    records: &[ImportRecord],
) -> Result<Vec<ImportOutcome>, Failure> {
    let txn = client.transaction().await?;
    let tx: &Transaction<'_> = &txn;
    // Applications that receive filters are locked exclusively (as filter changes are), the
    // others shared (as writes); in key order.
    let mut locks: BTreeMap<i64, bool> = BTreeMap::new();
    for record in records {
        match record {
            ImportRecord::Endpoint(e) => {
                locks
                    .entry(app_lock_key(&e.tenant, &e.endpoint.app))
                    .or_insert(false);
            }
            ImportRecord::Filter { tenant, filter } => {
                locks.insert(app_lock_key(tenant, &filter.app), true);
            }
        }
    }
    if !locks.is_empty() {
        let (keys, exclusive): (Vec<i64>, Vec<bool>) = locks.into_iter().unzip();
        tx.execute(&st.lock_apps, &[&keys, &exclusive]).await?;
    }
    // Endpoints first, then filters: an imported filter's back-fill starts at the highest
    // incarnation in the table, so it covers every endpoint of the import, and no
    // application's filters are read after this transaction changed them (the shared
    // filter cache must only ever hold committed versions; this one may roll back).
    let mut outcomes: Vec<Option<ImportOutcome>> = vec![None; records.len()];
    let endpoints: Vec<(usize, &EndpointExport)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            ImportRecord::Endpoint(e) => Some((i, e)),
            ImportRecord::Filter { .. } => None,
        })
        .collect();
    let mut filters = HashMap::new();
    for chunk in endpoints.chunks(IMPORT_CHUNK) {
        import_chunk(inner, tx, st, shard, chunk, &mut filters, &mut outcomes).await?;
    }
    for (i, record) in records.iter().enumerate() {
        if let ImportRecord::Filter { tenant, filter } = record {
            outcomes[i] = Some(crate::filters::import_filter(tx, tenant, filter).await?);
        }
    }
    txn.commit().await?;
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| msg("internal error: an import record without outcome")))
        .collect::<Result<_, _>>()
        .map_err(Failure::Fatal)
}

/// An imported endpoint waiting for its insert: tenant, record (as an insert), its initial
/// token's hash, its token rows.
type PendingImport<'w> = (&'w str, Effect, [u8; 32], Vec<StoredToken>);

/// The token rows an imported record brings: its own, or one `Inactive` token from its
/// `token_hash`. They belong to the record's endpoint whatever they say.
fn imported_tokens(record: &EndpointExport) -> Vec<StoredToken> {
    let ep = &record.endpoint;
    if record.tokens.is_empty() {
        return vec![StoredToken {
            id: codec::initial_token_id(&record.token_hash),
            endpoint_id: ep.id.clone(),
            app: ep.app.clone(),
            hash: record.token_hash,
            status: TokenStatus::Inactive,
            created: ep.created,
            updated: None,
        }];
    }
    record
        .tokens
        .iter()
        .map(|t| StoredToken {
            endpoint_id: ep.id.clone(),
            app: ep.app.clone(),
            ..t.clone()
        })
        .collect()
}

async fn import_chunk<'w>(
    inner: &Inner,
    tx: &Transaction<'_>,
    st: &Statements,
    shard: i16,
    chunk: &[(usize, &'w EndpointExport)],
    filters: &mut HashMap<(TenantId, AppName), Arc<AppFilters>>,
    outcomes: &mut [Option<ImportOutcome>],
) -> Result<(), Failure> {
    let tokens: Vec<Vec<StoredToken>> = chunk.iter().map(|(_, e)| imported_tokens(e)).collect();
    let mut wanted = Wanted::default();
    for ((_, e), tokens) in chunk.iter().zip(&tokens) {
        let t = e.tenant.as_str();
        wanted
            .ids
            .entry(t)
            .or_default()
            .insert(e.endpoint.id.as_str());
        let hashes = wanted
            .hashes
            .entry((t, e.endpoint.app.as_str()))
            .or_default();
        hashes.extend(tokens.iter().map(|k| k.hash.0));
        // The record's own IDs (the derived one is checked by its hash: same hash, same ID).
        wanted
            .token_ids
            .entry(t)
            .or_default()
            .extend(e.tokens.iter().map(|k| k.id.as_str()));
    }
    wanted.registrations = chunk.len() as i64;
    let Preloaded {
        initial,
        mut holders,
        mut id_holders,
        incarnations,
        ..
    } = preload(tx, st, &wanted).await?;
    let mut incarnations = incarnations.into_iter();
    let mut present: HashSet<Key<'w>> = initial.into_keys().collect();
    let mut pending: Vec<PendingImport<'w>> = Vec::new();
    for (&(index, record), tokens) in chunk.iter().zip(tokens) {
        let EndpointExport {
            tenant,
            endpoint,
            token_hash,
            tokens: own,
        } = record;
        let t = tenant.as_str();
        let key = (t, endpoint.id.as_str());
        if present.contains(&key) {
            outcomes[index] = Some(ImportOutcome::Exists);
            continue;
        }
        if let Some(conflict) = token_conflict(
            t,
            endpoint.app.as_str(),
            &tokens,
            own,
            &holders,
            &id_holders,
        ) {
            outcomes[index] = Some(ImportOutcome::Conflict(conflict));
            continue;
        }
        // A fresh incarnation: this store's own entity tags and registration order.
        let mut ep = endpoint.clone();
        ep.incarnation = incarnations
            .next()
            .ok_or_else(|| msg("internal error: too few incarnations taken"))?;
        present.insert(key);
        for k in &tokens {
            holders.insert(
                (t, endpoint.app.as_str(), k.hash.0),
                ep.id.as_str().to_owned(),
            );
        }
        for k in own {
            id_holders.insert((t, k.id.as_str()), ep.id.as_str().to_owned());
        }
        let app_filters = match filters.get(&(tenant.clone(), ep.app.clone())) {
            Some(f) => f.clone(),
            None => {
                let f = inner.filters.current(tx, tenant, &ep.app).await?;
                filters.insert((tenant.clone(), ep.app.clone()), f.clone());
                f
            }
        };
        let effect = Effect::Insert(ep);
        if !app_filters.is_empty() {
            let changes = app_filters.evaluate(&effect, None, None);
            if !changes.is_empty() {
                let ctx = WriteCtx {
                    tenant: tenant.clone(),
                    now: Timestamp(effect.endpoint().created.0),
                    correlation_id: String::new(),
                    limits: Default::default(),
                };
                // Membership as for a registration; an import emits no events.
                let _silent = crate::filters::apply(
                    tx,
                    tenant,
                    &effect.endpoint().app,
                    &changes,
                    &ctx,
                    shard,
                )
                .await?;
            }
        }
        pending.push((t, effect, token_hash.0, tokens));
        outcomes[index] = Some(ImportOutcome::Imported);
    }
    flush_imports(tx, st, &mut pending).await
}

/// Why a record's tokens cannot be stored: a hash held by another endpoint of the
/// application, an ID held by another token of the tenant, or a repeat within the record.
fn token_conflict(
    tenant: &str,
    app: &str,
    tokens: &[StoredToken],
    own: &[StoredToken],
    holders: &HashMap<TokenKey<'_>, String>,
    id_holders: &HashMap<Key<'_>, String>,
) -> Option<String> {
    let mut hashes = HashSet::new();
    for k in tokens {
        if let Some(other) = holders.get(&(tenant, app, k.hash.0)) {
            return Some(format!(
                "the endpoint token is already in use by endpoint '{other}' in application '{app}'"
            ));
        }
        if !hashes.insert(k.hash.0) {
            return Some("the record holds one endpoint token twice".into());
        }
    }
    let mut ids = HashSet::new();
    for k in own {
        if let Some(other) = id_holders.get(&(tenant, k.id.as_str())) {
            return Some(format!(
                "the endpoint token ID '{}' is already in use by endpoint '{other}'",
                k.id
            ));
        }
        if !ids.insert(k.id.as_str()) {
            return Some(format!("the record holds the token ID '{}' twice", k.id));
        }
    }
    None
}

async fn flush_imports(
    tx: &Transaction<'_>,
    st: &Statements,
    pending: &mut Vec<PendingImport<'_>>,
) -> Result<(), Failure> {
    if pending.is_empty() {
        return Ok(());
    }
    let writes = FinalWrites {
        ins: pending
            .iter()
            .map(|(t, ep, hash, _)| (*t, ep.endpoint(), *hash))
            .collect(),
        tok_ins: pending
            .iter()
            .flat_map(|(t, _, _, tokens)| tokens.iter().map(move |k| (*t, k)))
            .collect(),
        ..Default::default()
    };
    let expected = writes.expected();
    let written = writes.run(tx, st).await?;
    if written != expected {
        return Err(Failure::Again(
            "an endpoint ID or token was taken by a concurrent write".into(),
        ));
    }
    pending.clear();
    Ok(())
}
