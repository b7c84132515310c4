//! The PostgreSQL backend of [`epr_core::ports::Store`]: the same registry as the embedded
//! store, on a database that several `epr` processes (replicas) share.
//!
//! How replicas stay correct together (docs/postgres.md has the operator's view):
//! - **Writes** run in group transactions on a few writer connections per process
//!   (`write`): each command locks its endpoint row (`SELECT … FOR UPDATE`), is planned by
//!   `epr_core::command::plan`, and is written with its outbox events in the same
//!   transaction. Commands are routed to writers by endpoint ID, so one process never races
//!   itself on a row; another replica's write waits for the row lock.
//! - **Filters** (`filters`): every endpoint write holds the *shared* advisory lock of its
//!   application ([`app_lock_key`]) and checks the application's filter version
//!   (`app_filters`) against its cached compiled filters; filter changes and back-fill steps
//!   hold the *exclusive* lock. So live matching and back-fill never see a stale state, as
//!   on the embedded store's single writer. Back-fill runs under a lease (`backfill_owner`),
//!   taken over when it expires.
//! - **Outbox** (`outbox`): one relay leader per database (a session advisory lock on a
//!   dedicated connection, released by PostgreSQL when the process dies). The leader gives
//!   visible rows a sequence number (`seq`) in visibility order; relays page by `seq`.
//!   Writers `NOTIFY epr_outbox` in their transaction; the leader `LISTEN`s and wakes its
//!   relay at once.
//! - **Credentials** (`credentials`, `write`): token rows change only through endpoint
//!   commands, so the endpoint's row lock guards them; the group's preload reads them after
//!   locking the rows. A claim token's row is locked (`FOR UPDATE`) by the group that uses
//!   it, after its endpoint rows, so two replicas using one claim serialise.
//! - **Errors** (`error`): every database failure is `StoreError::Unavailable` (HTTP 503
//!   with `Retry-After`); nothing is acknowledged before its commit returned.

mod credentials;
mod error;
mod export;
mod filters;
mod listing;
mod outbox;
mod rows;
pub mod schema;
mod settings;
pub mod testing;
mod write;

use async_trait::async_trait;
use epr_core::command::{Effect, WriteCtx};
use epr_core::credentials::{ClaimToken, Rejection, StoredToken, TokenListQuery};
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::{EndpointFilter, FilterCommand, FilterId};
use epr_core::ids::{AppName, AppVersionName, ClaimId, EndpointId, TenantId, TokenHash, TokenId};
use epr_core::ports::{
    BatchOutcome, BatchRequest, EndpointExport, ImportOutcome, ImportRecord, OutboxEntry,
    OutboxWaker, Store, StoreError,
};
use epr_core::query::{EndpointQuery, Page, PageRequest};
use epr_store::BackfillPace;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// How to reach and use the database.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/database` (libpq URL; key=value also accepted).
    pub url: String,
    /// Connections in the pool (reads, filter changes, back-fill, relay), besides the
    /// writers' own and the relay leader's.
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// `statement_timeout` of every session: a statement running longer fails (503).
    pub statement_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: the server ends a session that holds a
    /// transaction open doing nothing (a hung process cannot keep its locks).
    pub idle_in_transaction_timeout: Duration,
    /// Writer tasks, each with its own connection.
    pub writers: usize,
    /// Most commands in one group transaction.
    pub max_group: usize,
    /// Write events to the outbox (off when nothing publishes them).
    pub record_events: bool,
    pub backfill: BackfillPace,
    /// How long a back-fill lease lasts without renewal before another replica takes over.
    pub backfill_lease: Duration,
    /// How long batch outcomes are kept, in milliseconds.
    pub batch_retention_ms: i64,
    /// Run the schema migrations at open (otherwise a database behind this build is refused).
    pub migrate: bool,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            idle_in_transaction_timeout: Duration::from_secs(60),
            writers: 4,
            max_group: 256,
            record_events: true,
            backfill: BackfillPace::default(),
            backfill_lease: Duration::from_secs(15),
            batch_retention_ms: 7 * 24 * 3_600_000,
            migrate: true,
        }
    }
}

/// The advisory lock key of a tenant's application (`pg_advisory_xact_lock[_shared]`). A
/// collision of two applications only makes them wait for each other, never wrong.
pub(crate) fn app_lock_key(tenant: &TenantId, app: &AppName) -> i64 {
    // FNV-1a: stable across builds and processes (std's hasher is seeded per process).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant
        .as_str()
        .bytes()
        .chain([0u8])
        .chain(app.as_str().bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// What the background tasks and the `Store` methods share.
pub(crate) struct Inner {
    pub(crate) cfg: PgConfig,
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) store_id: String,
    /// This process, for leases (back-fill owner).
    pub(crate) node_id: String,
    pub(crate) writer: write::Writer,
    pub(crate) filters: filters::FilterCache,
    pub(crate) outbox: outbox::Outbox,
    /// Set when the store shuts down; background tasks end.
    pub(crate) stop: tokio::sync::watch::Sender<bool>,
}

/// The PostgreSQL store. Cheap to share behind an `Arc`; [`PgStore::shutdown`] stops its
/// background tasks after the writers drained.
pub struct PgStore {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl PgStore {
    /// Connects, migrates (when `cfg.migrate`), reads the store ID and starts the writers,
    /// the back-fill worker and the relay leadership task.
    pub async fn open(cfg: PgConfig) -> Result<Self, StoreError> {
        let pool = connect(&cfg)?;
        let mut client = pool.get().await.map_err(error::pool)?;
        if cfg.migrate {
            schema::migrate(&mut client).await?;
        } else {
            schema::check(&client).await?;
        }
        let store_id = settings::store_id(&client).await?;
        drop(client);
        let (stop, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            writer: write::Writer::new(&cfg),
            filters: filters::FilterCache::default(),
            outbox: outbox::Outbox::new(&cfg),
            node_id: uuid::Uuid::new_v4().to_string(),
            cfg,
            pool,
            store_id,
            stop,
        });
        let mut tasks = Vec::new();
        tasks.extend(write::start(&inner));
        tasks.extend(filters::start(&inner));
        tasks.extend(outbox::start(&inner));
        tasks.push(tokio::spawn(settings::first_statistics(
            inner.pool.clone(),
            inner.stop.subscribe(),
        )));
        tracing::info!(store_id = %inner.store_id, node = %inner.node_id, "PostgreSQL store open");
        Ok(Self {
            inner,
            tasks: Mutex::new(tasks),
        })
    }

    /// Whether this process is the relay leader of its database (the only one whose
    /// `outbox_pending` returns events; see `outbox`).
    pub fn is_outbox_leader(&self) -> bool {
        self.inner.outbox.is_leader()
    }

    /// Drains the writers (every accepted command commits or fails), then stops the
    /// background tasks and releases the relay leadership.
    pub async fn shutdown(&self) {
        write::drain(&self.inner).await;
        let _ = self.inner.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
        self.inner.pool.close();
    }
}

/// A store dropped without [`PgStore::shutdown`] still stops its background tasks, so its
/// relay leadership goes to another replica (writes in flight are not drained).
impl Drop for PgStore {
    fn drop(&mut self) {
        let _ = self.inner.stop.send(true);
    }
}

/// The connection pool: every session gets the configured timeouts.
fn connect(cfg: &PgConfig) -> Result<deadpool_postgres::Pool, StoreError> {
    let mut pg: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| error::msg(format!("store.postgres.url cannot be parsed: {e}")))?;
    pg.connect_timeout(cfg.connect_timeout);
    pg.options(format!(
        "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        cfg.statement_timeout.as_millis(),
        cfg.idle_in_transaction_timeout.as_millis()
    ));
    pg.application_name("epr");
    let mgr = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(mgr)
        .max_size(cfg.pool_size.max(1) + cfg.writers.max(1))
        .wait_timeout(Some(cfg.connect_timeout))
        .create_timeout(Some(cfg.connect_timeout))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| error::msg(format!("building the connection pool: {e}")))
}

#[async_trait]
impl Store for PgStore {
    async fn execute(
        &self,
        cmd: epr_core::command::Command,
        ctx: WriteCtx,
    ) -> Result<Effect, StoreError> {
        write::execute(&self.inner, cmd, ctx).await
    }

    async fn register_batch(
        &self,
        batch: BatchRequest,
        ctx: WriteCtx,
    ) -> Result<BatchOutcome, StoreError> {
        write::register_batch(&self.inner, batch, ctx).await
    }

    async fn get(
        &self,
        tenant: &TenantId,
        id: &EndpointId,
    ) -> Result<Option<Endpoint>, StoreError> {
        write::get(&self.inner, tenant, id).await
    }

    async fn list(
        &self,
        tenant: &TenantId,
        query: &EndpointQuery,
        page: PageRequest,
    ) -> Result<Page<Endpoint>, StoreError> {
        listing::list(&self.inner, tenant, query, page).await
    }

    async fn metadata_keys(
        &self,
        tenant: &TenantId,
        app: &AppName,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
        listing::metadata_keys(&self.inner, tenant, app).await
    }

    async fn batch_outcome(
        &self,
        tenant: &TenantId,
        app: &AppName,
        task_id: &str,
    ) -> Result<Option<BatchOutcome>, StoreError> {
        write::batch_outcome(&self.inner, tenant, app, task_id).await
    }

    async fn execute_filter(
        &self,
        cmd: FilterCommand,
        ctx: WriteCtx,
    ) -> Result<EndpointFilter, StoreError> {
        filters::execute(&self.inner, cmd, ctx).await
    }

    async fn get_filter(
        &self,
        tenant: &TenantId,
        id: &FilterId,
    ) -> Result<Option<EndpointFilter>, StoreError> {
        filters::get(&self.inner, tenant, id).await
    }

    async fn list_filters(
        &self,
        tenant: &TenantId,
        app: &AppName,
        name: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<EndpointFilter>, StoreError> {
        filters::list(&self.inner, tenant, app, name, page).await
    }

    async fn matched_filters(
        &self,
        tenant: &TenantId,
        endpoints: &[EndpointId],
    ) -> Result<BTreeMap<EndpointId, Vec<FilterId>>, StoreError> {
        filters::matched_filters(&self.inner, tenant, endpoints).await
    }

    async fn filter_members(
        &self,
        tenant: &TenantId,
        id: &FilterId,
    ) -> Result<Vec<(AppVersionName, EndpointId)>, StoreError> {
        filters::members(&self.inner, tenant, id).await
    }

    async fn outbox_pending(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        outbox::pending(&self.inner, after, limit).await
    }

    async fn outbox_ack_through(&self, last_id: i64) -> Result<(), StoreError> {
        outbox::ack_through(&self.inner, last_id).await
    }

    async fn outbox_depth(&self) -> Result<u64, StoreError> {
        outbox::depth(&self.inner).await
    }

    fn store_id(&self) -> String {
        self.inner.store_id.clone()
    }

    fn set_outbox_waker(&self, waker: OutboxWaker) {
        self.inner.outbox.set_waker(waker);
    }

    async fn export_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        export::tenants(&self.inner).await
    }

    async fn export_endpoints(
        &self,
        tenant: &TenantId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EndpointExport>, StoreError> {
        export::endpoints(&self.inner, tenant, after, limit).await
    }

    async fn export_filters(&self, tenant: &TenantId) -> Result<Vec<EndpointFilter>, StoreError> {
        export::filters(&self.inner, tenant).await
    }

    async fn import(&self, records: Vec<ImportRecord>) -> Result<Vec<ImportOutcome>, StoreError> {
        export::import(&self.inner, records).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        settings::ping(&self.inner).await
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        settings::get(&self.inner, key).await
    }

    async fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        settings::put(&self.inner, key, value).await
    }

    async fn shutdown(&self) {
        PgStore::shutdown(self).await
    }

    async fn get_token(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        id: &TokenId,
    ) -> Result<Option<StoredToken>, StoreError> {
        credentials::get_token(&self.inner, tenant, endpoint, id).await
    }

    async fn find_token(
        &self,
        tenant: &TenantId,
        app: &AppName,
        hash: &TokenHash,
    ) -> Result<Option<StoredToken>, StoreError> {
        credentials::find_token(&self.inner, tenant, app, hash).await
    }

    async fn list_tokens(
        &self,
        tenant: &TenantId,
        endpoint: &EndpointId,
        query: &TokenListQuery,
        page: PageRequest,
    ) -> Result<Page<StoredToken>, StoreError> {
        credentials::list_tokens(&self.inner, tenant, endpoint, query, page).await
    }

    async fn create_claims(
        &self,
        tenant: &TenantId,
        claims: Vec<ClaimToken>,
    ) -> Result<(), StoreError> {
        credentials::create_claims(&self.inner, tenant, claims).await
    }

    async fn get_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        id: &ClaimId,
    ) -> Result<Option<ClaimToken>, StoreError> {
        credentials::get_claim(&self.inner, tenant, app, id).await
    }

    async fn find_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        hash: &TokenHash,
    ) -> Result<Option<ClaimToken>, StoreError> {
        credentials::find_claim(&self.inner, tenant, app, hash).await
    }

    async fn list_claims(
        &self,
        tenant: &TenantId,
        app: &AppName,
        page: PageRequest,
    ) -> Result<Page<ClaimToken>, StoreError> {
        credentials::list_claims(&self.inner, tenant, app, page).await
    }

    async fn delete_claim(
        &self,
        tenant: &TenantId,
        app: &AppName,
        id: &ClaimId,
    ) -> Result<bool, StoreError> {
        credentials::delete_claim(&self.inner, tenant, app, id).await
    }

    async fn record_rejection(
        &self,
        tenant: &TenantId,
        rejection: Rejection,
    ) -> Result<(), StoreError> {
        credentials::record_rejection(&self.inner, tenant, rejection).await
    }

    async fn purge_tenant_credentials(
        &self,
        tenant: &TenantId,
        setting_prefix: &str,
    ) -> Result<(), StoreError> {
        credentials::purge_tenant(&self.inner, tenant, setting_prefix).await
    }

    async fn list_rejections(
        &self,
        tenant: &TenantId,
        app: &AppName,
        page: PageRequest,
    ) -> Result<Page<Rejection>, StoreError> {
        credentials::list_rejections(&self.inner, tenant, app, page).await
    }
}
