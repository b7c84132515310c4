//! Saved filters (slice B): filter commands, reads, the compiled filter cache that writers
//! match endpoints against, stored membership, and the back-fill worker with its lease.
//!
//! The membership invariant is the embedded store's (`epr_store::sqlite_filters`): a
//! `filter_matches` row exists exactly when the filter matches the endpoint's current state,
//! for every endpoint the filter has seen. Here several writers and replicas share the
//! database, so what the embedded store gets from its single writer comes from the
//! application's advisory lock (`crate::app_lock_key`):
//! - endpoint writes hold it *shared* and read the application's filter version
//!   (`app_filters`) under it, so they match against the filters as committed;
//! - filter commands and back-fill steps hold it *exclusive*, so no write of the
//!   application is in flight while they read endpoints or change filters, and in READ
//!   COMMITTED every statement after the lock sees every committed write.
//!
//! Counts are sharded deltas (`filter_counts`): a filter's `matched` is their sum.
//! A back-fill is run by one replica at a time, under a lease on the filter rows
//! (`backfill_owner`, `backfill_lease_until`); another replica takes it over when the lease
//! runs out, and a stopping replica hands it back at once.

use crate::error::{corrupt, db, pool};
use crate::outbox::NOTIFY_CHANNEL;
use crate::{app_lock_key, Inner};
use epr_core::command::{Effect, WriteCtx};
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::{
    membership_change, membership_changes, plan_filter, EndpointFilter, FilterCommand,
    FilterEffect, FilterId, FilterSpec, FilterStatus,
};
use epr_core::event::{FilterEvent, FilterEventKind, OutboxEvent};
use epr_core::filter::{Filter, FilterSet};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::log_gate::LogGate;
use epr_core::ports::{ImportOutcome, StoreError};
use epr_core::query::{Page, PageRequest};
use epr_core::{DomainError, Timestamp};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Row, Transaction};

/// The `filter_counts` shard the back-fill adds to. Writers use their own shards (`>= 0`);
/// the back-fill holds the application's exclusive lock, so nothing else of the application
/// writes counts meanwhile and this shard never queues.
pub(crate) const BACKFILL_SHARD: i16 = -1;

/// How often an idle back-fill worker looks for pending filters (filters changed by other
/// replicas; local commands wake it at once).
const IDLE_POLL: Duration = Duration::from_millis(200);

/// How long a failed back-fill step waits before it is tried again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The columns [`filter_from_row`] reads, in its order, from `filters` aliased `f`
/// (`matched` is the sum of the filter's count shards).
pub(crate) const FILTER_COLUMNS: &str = "f.filter_id, f.app, f.name, f.description, f.query, \
    f.status, (SELECT coalesce(sum(c.n), 0)::bigint FROM filter_counts c \
    WHERE c.tenant=f.tenant AND c.filter_id=f.filter_id), f.created, f.updated, f.version";

/// Every application's compiled filters, as last read, with the `app_filters` version they
/// were read at. Shared by the writer tasks.
#[derive(Default)]
pub(crate) struct FilterCache {
    /// Never held across an `.await`.
    apps: RwLock<HashMap<(TenantId, AppName), Arc<AppFilters>>>,
    /// Wakes this process's back-fill worker (a local filter command made a filter pending).
    backfill_wake: tokio::sync::Notify,
}

/// One application's filters at one version.
#[derive(Default)]
pub(crate) struct AppFilters {
    version: i64,
    filters: Vec<Cached>,
    /// The same filters indexed, to evaluate a registration against all of them at once.
    set: FilterSet,
}

/// What live matching needs of one filter, compiled once per version.
struct Cached {
    id: FilterId,
    name: String,
    compiled: Arc<Filter>,
    /// The metadata keys the filter reads, when it says (`Filter::metadata_keys`).
    keys: Option<Vec<String>>,
    active: bool,
}

/// One membership change a write causes (before it is stored: whether the row really
/// changes decides whether an event is emitted).
#[derive(Debug, Clone)]
pub(crate) struct MatchChange {
    pub(crate) filter_id: FilterId,
    pub(crate) filter_name: String,
    /// Active filters emit `ep-matched`/`ep-unmatched`; pending ones change silently.
    pub(crate) active: bool,
    pub(crate) incarnation: i64,
    pub(crate) endpoint_id: EndpointId,
    pub(crate) app_version: AppVersionName,
    /// Now a member (insert) or not (delete).
    pub(crate) matched: bool,
}

impl FilterCache {
    /// The application's current filters. Called inside a writer transaction that holds
    /// the application's *shared* advisory lock (`crate::app_lock_key`): reads the
    /// application's `app_filters` version and reloads the filters when it differs from
    /// the cached copy.
    pub(crate) async fn current(
        &self,
        tx: &Transaction<'_>,
        tenant: &TenantId,
        app: &AppName,
    ) -> Result<Arc<AppFilters>, StoreError> {
        let key = (tenant.clone(), app.clone());
        let version: Option<i64> = tx
            .query_opt(
                "SELECT version FROM app_filters WHERE tenant=$1 AND app=$2",
                &[&tenant.as_str(), &app.as_str()],
            )
            .await
            .map_err(db)?
            .map(|r| r.get(0));
        let Some(version) = version else {
            // Never had a filter.
            return Ok(Arc::default());
        };
        if let Some(hit) = self.read().get(&key).filter(|f| f.version == version) {
            return Ok(hit.clone());
        }
        let filters = load_app(tx, tenant, app).await?;
        let set = FilterSet::new(filters.iter().map(|f| f.compiled.clone()).collect());
        let loaded = Arc::new(AppFilters {
            version,
            filters,
            set,
        });
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        // Concurrent writers may load different versions; versions only grow, so the newest
        // copy wins.
        match apps.get(&key) {
            Some(have) if have.version >= version => {}
            _ => {
                apps.insert(key, loaded.clone());
            }
        }
        Ok(loaded)
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<(TenantId, AppName), Arc<AppFilters>>> {
        self.apps.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the back-fill worker look for pending filters now.
    pub(crate) fn wake_backfill(&self) {
        self.backfill_wake.notify_one();
    }
}

/// The application's filters, compiled, in creation order (then ID in byte order, as the
/// embedded store: the order of one write's membership events).
async fn load_app(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    app: &AppName,
) -> Result<Vec<Cached>, StoreError> {
    let rows = tx
        .query(
            "SELECT filter_id, name, query, status FROM filters WHERE tenant=$1 AND app=$2 \
             ORDER BY created, filter_id COLLATE \"C\"",
            &[&tenant.as_str(), &app.as_str()],
        )
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| {
            let query: Value = r.try_get(2).map_err(|e| corrupt("filter query", e))?;
            let compiled = Filter::parse(&query).map_err(|e| corrupt("filter query", e))?;
            Ok(Cached {
                id: FilterId::parse(r.try_get(0).map_err(|e| corrupt("filter", e))?)
                    .map_err(|e| corrupt("filter ID", e))?,
                name: r.try_get(1).map_err(|e| corrupt("filter", e))?,
                keys: compiled.metadata_keys(),
                compiled: Arc::new(compiled),
                active: parse_status(r.try_get(3).map_err(|e| corrupt("filter", e))?)?
                    == FilterStatus::Active,
            })
        })
        .collect()
}

impl AppFilters {
    pub(crate) fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The membership changes of one endpoint write (pure): `old` is the state before the
    /// write, `changed_keys` the metadata keys a metadata write changed (filters that read
    /// none of them are skipped).
    ///
    /// Whether the endpoint was a member is the filter evaluated on `old`, not a read of the
    /// stored rows: by the invariant the two agree wherever a row can exist, and where a
    /// pending filter has not seen the endpoint yet the insert or delete changes nothing
    /// ([`apply`] tells) and its back-fill decides later. Pending filters are evaluated too:
    /// that is what lets a back-fill stop at the incarnation bound fixed when it started.
    pub(crate) fn evaluate(
        &self,
        effect: &Effect,
        old: Option<&Endpoint>,
        changed_keys: Option<&BTreeSet<&str>>,
    ) -> Vec<MatchChange> {
        let (ep, deleted) = match effect {
            Effect::Unchanged(_) => return Vec::new(),
            Effect::Insert(ep) | Effect::Update(ep) => (ep, false),
            Effect::Delete(ep) => (ep, true),
        };
        let mut out = Vec::new();
        let new = (!deleted).then_some(ep);
        // A write of the whole endpoint: every filter at once, through the index.
        let at_once = changed_keys
            .is_none()
            .then(|| membership_changes(&self.set, old, new));
        for (i, f) in self.filters.iter().enumerate() {
            let change = match &at_once {
                Some(changes) => changes[i],
                None => membership_change(&f.compiled, f.keys.as_deref(), old, new, changed_keys),
            };
            let Some(is) = change else {
                continue;
            };
            out.push(MatchChange {
                filter_id: f.id.clone(),
                filter_name: f.name.clone(),
                active: f.active,
                incarnation: ep.incarnation,
                endpoint_id: ep.id.clone(),
                app_version: ep.app_version.clone(),
                matched: is,
            });
        }
        out
    }
}

/// Stores membership changes inside the writer's transaction; rows that did not change
/// (a pending filter that has not seen the endpoint yet) emit nothing. Counts go to the
/// writer's counter `shard`. Returns `ep-matched` / `ep-unmatched` events for active
/// filters, in the order of `changes`.
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    app: &AppName,
    changes: &[MatchChange],
    ctx: &WriteCtx,
    shard: i16,
) -> Result<Vec<OutboxEvent>, StoreError> {
    // Whether each change really changed its row.
    let mut changed = vec![false; changes.len()];
    // One statement per run of changes that touch each (filter, endpoint) once: the parts
    // of one statement share a snapshot, so a row inserted and deleted again (two commands
    // on one endpoint in a group) must be split across statements, in order.
    let mut start = 0;
    while start < changes.len() {
        let mut run: HashMap<(&str, i64), usize> = HashMap::new();
        let mut end = start;
        while end < changes.len() {
            let c = &changes[end];
            let key = (c.filter_id.as_str(), c.incarnation);
            if run.contains_key(&key) {
                break;
            }
            run.insert(key, end);
            end += 1;
        }
        for (f, i) in apply_run(tx, tenant, &changes[start..end], shard).await? {
            if let Some(&at) = run.get(&(f.as_str(), i)) {
                changed[at] = true;
            }
        }
        start = end;
    }
    let n = changed.iter().filter(|c| **c).count();
    if n > 0 {
        metrics::counter!("epr_filter_membership_changes_total").increment(n as u64);
    }
    Ok(changes
        .iter()
        .zip(changed)
        .filter(|(c, changed)| c.active && *changed)
        .map(|(c, _)| {
            let (endpoint_id, app_version) = (c.endpoint_id.clone(), c.app_version.clone());
            let kind = if c.matched {
                FilterEventKind::EndpointMatched {
                    endpoint_id,
                    app_version,
                }
            } else {
                FilterEventKind::EndpointUnmatched {
                    endpoint_id,
                    app_version,
                }
            };
            OutboxEvent::Filter(FilterEvent {
                tenant: tenant.clone(),
                app: app.clone(),
                filter_id: c.filter_id.clone(),
                filter_name: c.filter_name.clone(),
                kind,
                correlation_id: ctx.correlation_id.clone(),
                timestamp: ctx.now,
            })
        })
        .collect())
}

/// One round trip: inserts and deletes the rows, adds the net change per filter to the
/// shard (in filter order, so concurrent transactions lock counters in one order), and
/// returns the rows that really changed.
async fn apply_run(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    changes: &[MatchChange],
    shard: i16,
) -> Result<Vec<(String, i64)>, StoreError> {
    let (mut ins_f, mut ins_i, mut del_f, mut del_i) = (vec![], vec![], vec![], vec![]);
    for c in changes {
        if c.matched {
            ins_f.push(c.filter_id.as_str());
            ins_i.push(c.incarnation);
        } else {
            del_f.push(c.filter_id.as_str());
            del_i.push(c.incarnation);
        }
    }
    let rows = tx
        .query(
            "WITH ins AS ( \
               INSERT INTO filter_matches(tenant, filter_id, incarnation) \
               SELECT $1, u.f, u.i FROM unnest($2::text[], $3::bigint[]) AS u(f, i) \
               ON CONFLICT DO NOTHING \
               RETURNING filter_id, incarnation, 1::bigint AS d), \
             del AS ( \
               DELETE FROM filter_matches m USING unnest($4::text[], $5::bigint[]) AS u(f, i) \
               WHERE m.tenant=$1 AND m.filter_id=u.f AND m.incarnation=u.i \
               RETURNING m.filter_id, m.incarnation, -1::bigint AS d), \
             ch AS (SELECT * FROM ins UNION ALL SELECT * FROM del), \
             cnt AS ( \
               INSERT INTO filter_counts(tenant, filter_id, shard, n) \
               SELECT $1, filter_id, $6, sum(d)::bigint FROM ch \
               GROUP BY filter_id HAVING sum(d) <> 0 ORDER BY filter_id \
               ON CONFLICT (tenant, filter_id, shard) DO UPDATE SET n = filter_counts.n + EXCLUDED.n) \
             SELECT filter_id, incarnation FROM ch",
            &[
                &tenant.as_str(),
                &ins_f,
                &ins_i,
                &del_f,
                &del_i,
                &shard,
            ],
        )
        .await
        .map_err(db)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Stores an imported filter as a new pending filter (see `Store::import`), inside the
/// importing transaction, which holds the application's exclusive lock. Like a created
/// filter (its back-fill derives its membership over every endpoint registered so far;
/// later ones are matched live), but without a `pending` event. An existing ID is left
/// alone; a name held by another filter is a conflict.
pub(crate) async fn import_filter(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    filter: &EndpointFilter,
) -> Result<ImportOutcome, StoreError> {
    if load_filter(tx, tenant, &filter.id, false).await?.is_some() {
        return Ok(ImportOutcome::Exists);
    }
    match check_name_free(tx, tenant, filter).await {
        Ok(()) => {}
        Err(StoreError::Rejected(e)) => return Ok(ImportOutcome::Conflict(e.to_string())),
        Err(e) => return Err(e),
    }
    let imported = EndpointFilter {
        status: FilterStatus::Pending,
        ..filter.clone()
    };
    insert_filter(tx, tenant, &imported, "import").await?;
    Ok(ImportOutcome::Imported)
}

pub(crate) async fn execute(
    inner: &Inner,
    cmd: FilterCommand,
    ctx: WriteCtx,
) -> Result<EndpointFilter, StoreError> {
    let app = match &cmd {
        FilterCommand::Create { app, .. }
        | FilterCommand::Update { app, .. }
        | FilterCommand::Delete { app, .. } => app.clone(),
    };
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(db)?;
    // The command's application: a filter of another one is refused by `plan_filter`
    // before anything is written, and a filter's application never changes.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&app_lock_key(&ctx.tenant, &app)],
    )
    .await
    .map_err(db)?;
    let tenant = &ctx.tenant;
    let current = load_filter(&*tx, tenant, cmd.filter_id(), true).await?;
    let plan = plan_filter(current, &cmd, &ctx)?;
    let mut result = plan.effect.filter().clone();
    let mut backfill = false;
    match &plan.effect {
        FilterEffect::Insert(f) => {
            check_name_free(&tx, tenant, f).await?;
            insert_filter(&tx, tenant, f, &ctx.correlation_id).await?;
            backfill = true;
        }
        FilterEffect::Update { filter: f, restart } => {
            check_name_free(&tx, tenant, f).await?;
            if *restart {
                delete_membership(&tx, tenant, &f.id).await?;
                // The back-fill starts over; a replica holding its lease keeps it (and
                // sees the reset cursor at its next step).
                tx.execute(
                    "UPDATE filters SET name=$3, description=$4, query=$5, status=$6, \
                     updated=$7, version=$8, backfill_after=0, \
                     backfill_until=(SELECT coalesce(max(incarnation), 0) FROM endpoints \
                                     WHERE tenant=$1 AND app=$9), \
                     backfill_correlation=$10 \
                     WHERE tenant=$1 AND filter_id=$2",
                    &[
                        &tenant.as_str(),
                        &f.id.as_str(),
                        &f.spec.name,
                        &f.spec.description,
                        &Value::Object(f.spec.query.clone()),
                        &f.status.as_str(),
                        &f.updated.0,
                        &(f.version as i64),
                        &f.app.as_str(),
                        &ctx.correlation_id,
                    ],
                )
                .await
                .map_err(|e| unique_conflict(e, f))?;
                result.matched = 0;
                backfill = true;
            } else {
                tx.execute(
                    "UPDATE filters SET name=$3, description=$4, updated=$5, version=$6 \
                     WHERE tenant=$1 AND filter_id=$2",
                    &[
                        &tenant.as_str(),
                        &f.id.as_str(),
                        &f.spec.name,
                        &f.spec.description,
                        &f.updated.0,
                        &(f.version as i64),
                    ],
                )
                .await
                .map_err(|e| unique_conflict(e, f))?;
            }
            bump_version(&tx, tenant, &f.app).await?;
        }
        FilterEffect::Delete(f) => {
            delete_membership(&tx, tenant, &f.id).await?;
            tx.execute(
                "DELETE FROM filters WHERE tenant=$1 AND filter_id=$2",
                &[&tenant.as_str(), &f.id.as_str()],
            )
            .await
            .map_err(db)?;
            bump_version(&tx, tenant, &f.app).await?;
        }
        FilterEffect::Unchanged(_) => {}
    }
    let events: Vec<OutboxEvent> = plan.events.into_iter().map(OutboxEvent::Filter).collect();
    let appended = inner.cfg.record_events && !events.is_empty();
    if appended {
        append_events(&tx, &events).await?;
    }
    tx.commit().await.map_err(db)?;
    if appended {
        inner.outbox.wake();
    }
    if backfill {
        inner.filters.wake_backfill();
    }
    Ok(result)
}

/// A new filter row, pending, its back-fill bounded by the application's endpoints
/// registered so far (the caller holds the application's exclusive lock, so no
/// registration of it is in flight: later ones see the filter and are matched live).
async fn insert_filter(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    f: &EndpointFilter,
    correlation: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO filters(tenant, filter_id, app, name, description, query, status, \
         created, updated, version, backfill_after, backfill_until, backfill_correlation) \
         VALUES($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, \
                (SELECT coalesce(max(incarnation), 0) FROM endpoints \
                 WHERE tenant=$1 AND app=$3), $11)",
        &[
            &tenant.as_str(),
            &f.id.as_str(),
            &f.app.as_str(),
            &f.spec.name,
            &f.spec.description,
            &Value::Object(f.spec.query.clone()),
            &FilterStatus::Pending.as_str(),
            &f.created.0,
            &f.updated.0,
            &(f.version as i64),
            &correlation,
        ],
    )
    .await
    .map_err(|e| unique_conflict(e, f))?;
    bump_version(tx, tenant, &f.app).await
}

async fn delete_membership(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    id: &FilterId,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM filter_matches WHERE tenant=$1 AND filter_id=$2",
        &[&tenant.as_str(), &id.as_str()],
    )
    .await
    .map_err(db)?;
    tx.execute(
        "DELETE FROM filter_counts WHERE tenant=$1 AND filter_id=$2",
        &[&tenant.as_str(), &id.as_str()],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Tells the writers (of every replica) that the application's filters changed.
async fn bump_version(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    app: &AppName,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO app_filters(tenant, app, version) VALUES($1, $2, 1) \
         ON CONFLICT (tenant, app) DO UPDATE SET version = app_filters.version + 1",
        &[&tenant.as_str(), &app.as_str()],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Appends events to the outbox and notifies the relay leader (delivered at commit).
async fn append_events(tx: &Transaction<'_>, events: &[OutboxEvent]) -> Result<(), StoreError> {
    let texts: Vec<String> = events.iter().map(epr_store::codec::encode_outbox).collect();
    tx.execute(
        "INSERT INTO outbox(event) SELECT e FROM unnest($1::text[]) WITH ORDINALITY AS u(e, n) \
         ORDER BY n",
        &[&texts],
    )
    .await
    .map_err(db)?;
    tx.execute("SELECT pg_notify($1, '')", &[&NOTIFY_CHANNEL])
        .await
        .map_err(db)?;
    Ok(())
}

/// The name check with the embedded store's message. The unique index `filters_by_name`
/// backs it against anything the check could miss ([`unique_conflict`]).
async fn check_name_free(
    tx: &Transaction<'_>,
    tenant: &TenantId,
    f: &EndpointFilter,
) -> Result<(), StoreError> {
    let holder: Option<String> = tx
        .query_opt(
            "SELECT filter_id FROM filters WHERE tenant=$1 AND app=$2 AND name=$3",
            &[&tenant.as_str(), &f.app.as_str(), &f.spec.name],
        )
        .await
        .map_err(db)?
        .map(|r| r.get(0));
    match holder {
        Some(other) if other != f.id.as_str() => Err(name_taken(f, &other).into()),
        _ => Ok(()),
    }
}

fn name_taken(f: &EndpointFilter, holder: &str) -> DomainError {
    DomainError::Conflict {
        field: "name",
        message: format!(
            "application '{}' already has a filter named '{}' ('{holder}')",
            f.app, f.spec.name
        ),
    }
}

/// A unique violation of a filter row is what the checks refuse, raced by another replica
/// (same ID in another application, whose lock this command does not hold): the same
/// conflict. Anything else is a database failure.
fn unique_conflict(e: tokio_postgres::Error, f: &EndpointFilter) -> StoreError {
    let constraint = e
        .as_db_error()
        .filter(|d| *d.code() == SqlState::UNIQUE_VIOLATION)
        .and_then(|d| d.constraint().map(str::to_owned));
    match constraint.as_deref() {
        Some("filters_by_name") => DomainError::Conflict {
            field: "name",
            message: format!(
                "application '{}' already has a filter named '{}'",
                f.app, f.spec.name
            ),
        }
        .into(),
        Some("filters_pkey") => DomainError::Conflict {
            field: "filterId",
            message: format!("endpoint filter '{}' already exists", f.id),
        }
        .into(),
        _ => db(e),
    }
}

fn parse_status(s: &str) -> Result<FilterStatus, StoreError> {
    match s {
        "pending" => Ok(FilterStatus::Pending),
        "active" => Ok(FilterStatus::Active),
        other => Err(corrupt("filter status", format!("unknown '{other}'"))),
    }
}

/// A stored filter as the domain value, from a row selected with [`FILTER_COLUMNS`] first.
pub(crate) fn filter_from_row(row: &Row) -> Result<EndpointFilter, StoreError> {
    let bad = |e: tokio_postgres::Error| corrupt("filter", e);
    let query: Value = row.try_get(4).map_err(bad)?;
    let spec = FilterSpec::parse(
        row.try_get(2).map_err(bad)?,
        row.try_get(3).map_err(bad)?,
        &query,
    )
    .map_err(|e| corrupt("filter", e))?;
    Ok(EndpointFilter {
        id: FilterId::parse(row.try_get(0).map_err(bad)?).map_err(|e| corrupt("filter ID", e))?,
        app: AppName::parse(row.try_get(1).map_err(bad)?).map_err(|e| corrupt("application", e))?,
        spec,
        status: parse_status(row.try_get(5).map_err(bad)?)?,
        matched: row.try_get::<_, i64>(6).map_err(bad)?.max(0) as u64,
        created: Timestamp(row.try_get(7).map_err(bad)?),
        updated: Timestamp(row.try_get(8).map_err(bad)?),
        version: row.try_get::<_, i64>(9).map_err(bad)? as u64,
    })
}

async fn load_filter(
    c: &impl GenericClient,
    tenant: &TenantId,
    id: &FilterId,
    for_update: bool,
) -> Result<Option<EndpointFilter>, StoreError> {
    let sql = format!(
        "SELECT {FILTER_COLUMNS} FROM filters f WHERE f.tenant=$1 AND f.filter_id=$2{}",
        if for_update { " FOR UPDATE OF f" } else { "" }
    );
    c.query_opt(&sql, &[&tenant.as_str(), &id.as_str()])
        .await
        .map_err(db)?
        .as_ref()
        .map(filter_from_row)
        .transpose()
}

pub(crate) async fn get(
    inner: &Inner,
    tenant: &TenantId,
    id: &FilterId,
) -> Result<Option<EndpointFilter>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    load_filter(&**client, tenant, id, false).await
}

pub(crate) async fn list(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    name: Option<&str>,
    page: PageRequest,
) -> Result<Page<EndpointFilter>, StoreError> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    // One snapshot for the total and the page. IDs sort in byte order (`COLLATE "C"`), as
    // in the embedded store, whatever the database's collation.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)?;
    let cond = "f.tenant=$1 AND f.app=$2 AND ($3::text IS NULL OR f.name=$3)";
    let total: i64 = tx
        .query_one(
            &format!("SELECT count(*) FROM filters f WHERE {cond}"),
            &[&tenant.as_str(), &app.as_str(), &name],
        )
        .await
        .map_err(db)?
        .get(0);
    let rows = tx
        .query(
            &format!(
                "SELECT {FILTER_COLUMNS} FROM filters f WHERE {cond} \
                 ORDER BY f.created, f.filter_id COLLATE \"C\" LIMIT $4 OFFSET $5"
            ),
            &[
                &tenant.as_str(),
                &app.as_str(),
                &name,
                &i64::from(page.limit),
                &(page.offset.min(i64::MAX as u64) as i64),
            ],
        )
        .await
        .map_err(db)?;
    let items = rows
        .iter()
        .map(filter_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit().await.map_err(db)?;
    Ok(Page {
        total: total.max(0) as u64,
        items,
        next: None,
    })
}

/// The active filters of each endpoint (`include=filters`, 20/EFMP); endpoints without
/// any are absent.
pub(crate) async fn matched_filters(
    inner: &Inner,
    tenant: &TenantId,
    endpoints: &[EndpointId],
) -> Result<BTreeMap<EndpointId, Vec<FilterId>>, StoreError> {
    let mut out: BTreeMap<EndpointId, Vec<FilterId>> = BTreeMap::new();
    if endpoints.is_empty() {
        return Ok(out);
    }
    let ids: Vec<&str> = endpoints.iter().map(EndpointId::as_str).collect();
    let client = inner.pool.get().await.map_err(pool)?;
    let rows = client
        .query(
            "SELECT e.endpoint_id, f.filter_id FROM endpoints e \
             JOIN filters f ON f.tenant=e.tenant AND f.app=e.app AND f.status='active' \
             JOIN filter_matches m \
               ON m.tenant=f.tenant AND m.filter_id=f.filter_id AND m.incarnation=e.incarnation \
             WHERE e.tenant=$1 AND e.endpoint_id = ANY($2::text[]) \
             ORDER BY e.endpoint_id, f.filter_id COLLATE \"C\"",
            &[&tenant.as_str(), &ids],
        )
        .await
        .map_err(db)?;
    for r in &rows {
        let ep = EndpointId::parse(r.get(0)).map_err(|e| corrupt("endpoint ID", e))?;
        let f = FilterId::parse(r.get(1)).map_err(|e| corrupt("filter ID", e))?;
        out.entry(ep).or_default().push(f);
    }
    Ok(out)
}

/// A filter's stored membership with each endpoint's application version, in registration
/// order.
pub(crate) async fn members(
    inner: &Inner,
    tenant: &TenantId,
    id: &FilterId,
) -> Result<Vec<(AppVersionName, EndpointId)>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let rows = client
        .query(
            "SELECT e.app_version, e.endpoint_id FROM filter_matches m \
             JOIN endpoints e ON e.tenant=m.tenant AND e.incarnation=m.incarnation \
             WHERE m.tenant=$1 AND m.filter_id=$2 ORDER BY m.incarnation",
            &[&tenant.as_str(), &id.as_str()],
        )
        .await
        .map_err(db)?;
    rows.iter()
        .map(|r| {
            Ok((
                AppVersionName::parse(r.get(0)).map_err(|e| corrupt("application version", e))?,
                EndpointId::parse(r.get(1)).map_err(|e| corrupt("endpoint ID", e))?,
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Back-fill

/// Starts the back-fill worker.
pub(crate) fn start(inner: &Arc<Inner>) -> Vec<JoinHandle<()>> {
    vec![tokio::spawn(run_backfill(inner.clone()))]
}

/// The worker: claims the pending filters of one application at a time and back-fills
/// them in paced steps until they are active, then looks for more.
async fn run_backfill(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let gate = LogGate::default();
    while !*stop.borrow() {
        let wait = match backfill_cycle(&inner, &mut stop).await {
            Ok(true) => continue,
            Ok(false) => IDLE_POLL,
            Err(e) => {
                if let Some(suppressed) = gate.admit(Instant::now()) {
                    tracing::error!(error = %e, suppressed,
                        "filter back-fill step failed; retrying in 1 s");
                }
                RETRY_AFTER_FAILURE
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = inner.filters.backfill_wake.notified() => {}
            _ = stop.changed() => {}
        }
    }
    // Hands unfinished back-fills to the other replicas now, rather than when the lease
    // runs out.
    if let Err(e) = release_leases(&inner).await {
        tracing::warn!(error = %e, "releasing back-fill leases at shutdown failed; \
            other replicas take over when they expire");
    }
}

/// Claims one application's back-fill and runs it to the end (or until stopped). `false`
/// when there was nothing to claim.
async fn backfill_cycle(
    inner: &Inner,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<bool, StoreError> {
    let Some((tenant, app)) = claim(inner).await? else {
        return Ok(false);
    };
    let started = Instant::now();
    let mut evaluated = 0u64;
    loop {
        if *stop.borrow() {
            return Ok(true);
        }
        let step = backfill_step(inner, &tenant, &app).await?;
        evaluated += step.evaluated;
        for (id, matched) in &step.activated {
            let secs = started.elapsed().as_secs_f64();
            metrics::histogram!("epr_filter_backfill_seconds").record(secs);
            tracing::info!(filter = %id, tenant = %tenant, app = %app, evaluated, matched,
                seconds = secs, "filter back-fill complete; filter active");
        }
        if step.done {
            return Ok(true);
        }
        let pause = inner.cfg.backfill.pause;
        if pause.is_zero() {
            // Lets this process's writers run between steps.
            tokio::task::yield_now().await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Takes the lease of the pending filters of one application whose lease is free, run out
/// or already ours. Rows a running step holds are skipped, not waited for.
async fn claim(inner: &Inner) -> Result<Option<(String, String)>, StoreError> {
    const CLAIMABLE: &str = "status='pending' AND (backfill_owner IS NULL OR backfill_owner=$1 \
        OR backfill_lease_until IS NULL OR backfill_lease_until < now())";
    let client = inner.pool.get().await.map_err(pool)?;
    let Some(found) = client
        .query_opt(
            &format!(
                "SELECT tenant, app FROM filters WHERE {CLAIMABLE} \
                 ORDER BY created, tenant, filter_id LIMIT 1"
            ),
            &[&inner.node_id],
        )
        .await
        .map_err(db)?
    else {
        return Ok(None);
    };
    let (tenant, app): (String, String) = (found.get(0), found.get(1));
    let claimed = client
        .query(
            &format!(
                "UPDATE filters f SET backfill_owner=$1, \
                   backfill_lease_until=now() + $4::bigint * interval '1 millisecond' \
                 FROM (SELECT tenant, filter_id FROM filters \
                       WHERE tenant=$2 AND app=$3 AND {CLAIMABLE} \
                       ORDER BY filter_id FOR UPDATE SKIP LOCKED) c \
                 WHERE f.tenant=c.tenant AND f.filter_id=c.filter_id \
                 RETURNING f.filter_id"
            ),
            &[&inner.node_id, &tenant, &app, &lease_millis(inner)],
        )
        .await
        .map_err(db)?;
    Ok((!claimed.is_empty()).then_some((tenant, app)))
}

fn lease_millis(inner: &Inner) -> i64 {
    inner.cfg.backfill_lease.as_millis().min(i64::MAX as u128) as i64
}

async fn release_leases(inner: &Inner) -> Result<(), StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    client
        .execute(
            "UPDATE filters SET backfill_owner=NULL, backfill_lease_until=NULL \
             WHERE status='pending' AND backfill_owner=$1",
            &[&inner.node_id],
        )
        .await
        .map_err(db)?;
    Ok(())
}

/// A pending filter leased by this process, as one step reads it.
struct Pending {
    id: FilterId,
    name: String,
    compiled: Filter,
    after: i64,
    until: i64,
    correlation: String,
}

struct StepOutcome {
    /// Nothing of this application is left for this process.
    done: bool,
    evaluated: u64,
    /// Filters that turned active, with their member counts.
    activated: Vec<(FilterId, i64)>,
}

/// One bounded step in its own transaction under the application's exclusive lock:
/// evaluates the endpoints after the smallest cursor of this process's pending filters of
/// the application, stores the matches, advances the cursors and renews the lease;
/// filters whose back-fill completes turn active with their `activated` event.
async fn backfill_step(
    inner: &Inner,
    tenant_s: &str,
    app_s: &str,
) -> Result<StepOutcome, StoreError> {
    let tenant = TenantId::parse(tenant_s).map_err(|e| corrupt("tenant", e))?;
    let app = AppName::parse(app_s).map_err(|e| corrupt("application", e))?;
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(db)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&app_lock_key(&tenant, &app)],
    )
    .await
    .map_err(db)?;
    // Locked, so a claim by another replica waits for this step (and then sees the lease
    // renewed) instead of taking the filter in the middle of it.
    let rows = tx
        .query(
            "SELECT filter_id, name, query, backfill_after, backfill_until, \
                    backfill_correlation FROM filters \
             WHERE tenant=$1 AND app=$2 AND status='pending' AND backfill_owner=$3 \
             ORDER BY filter_id FOR UPDATE",
            &[&tenant_s, &app_s, &inner.node_id],
        )
        .await
        .map_err(db)?;
    let mut pending = rows
        .iter()
        .map(|r| {
            let bad = |e: tokio_postgres::Error| corrupt("filter", e);
            let query: Value = r.try_get(2).map_err(bad)?;
            let after: Option<i64> = r.try_get(3).map_err(bad)?;
            let until: Option<i64> = r.try_get(4).map_err(bad)?;
            let after = after.unwrap_or(0);
            Ok(Pending {
                id: FilterId::parse(r.try_get(0).map_err(bad)?)
                    .map_err(|e| corrupt("filter ID", e))?,
                name: r.try_get(1).map_err(bad)?,
                compiled: Filter::parse(&query).map_err(|e| corrupt("filter query", e))?,
                after,
                until: until.unwrap_or(after),
                correlation: r
                    .try_get::<_, Option<String>>(5)
                    .map_err(bad)?
                    .unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    if pending.is_empty() {
        tx.commit().await.map_err(db)?;
        return Ok(StepOutcome {
            done: true,
            evaluated: 0,
            activated: vec![],
        });
    }
    let pace = inner.cfg.backfill;
    let deadline = Instant::now() + pace.step;
    let batch = i64::from(pace.batch.max(1));
    let mut cursor = pending.iter().map(|f| f.after).min().unwrap_or(0);
    let until = pending.iter().map(|f| f.until).max().unwrap_or(0);
    // Parse only the metadata keys the filters read, when they say which (Kaa's usual
    // `$elemMatch` on a key): parsing is most of the cost of a scan.
    let wanted: Option<Vec<String>> = pending.iter().try_fold(Vec::new(), |mut all, f| {
        all.extend(f.compiled.metadata_keys()?);
        Some(all)
    });
    let mut evaluated = 0u64;
    let done = loop {
        let rows = tx
            .query(
                "SELECT incarnation, app_version, metadata::text FROM endpoints \
                 WHERE tenant=$1 AND app=$2 AND incarnation>$3 AND incarnation<=$4 \
                 ORDER BY incarnation LIMIT $5",
                &[&tenant_s, &app_s, &cursor, &until, &batch],
            )
            .await
            .map_err(db)?;
        let (mut hit_f, mut hit_i): (Vec<&str>, Vec<i64>) = (vec![], vec![]);
        for row in &rows {
            let incarnation: i64 = row.get(0);
            let version: &str = row.get(1);
            let metadata = epr_store::codec::parse_metadata(row.get(2), wanted.as_deref())
                .map_err(|e| corrupt("metadata", e))?;
            for f in &pending {
                if incarnation <= f.after || incarnation > f.until {
                    continue;
                }
                evaluated += 1;
                if f.compiled.matches(version, &metadata) {
                    hit_f.push(f.id.as_str());
                    hit_i.push(incarnation);
                }
            }
            cursor = incarnation;
        }
        if !hit_f.is_empty() {
            // Rows written live meanwhile are kept (and already counted).
            tx.execute(
                "WITH ins AS ( \
                   INSERT INTO filter_matches(tenant, filter_id, incarnation) \
                   SELECT $1, u.f, u.i FROM unnest($2::text[], $3::bigint[]) AS u(f, i) \
                   ON CONFLICT DO NOTHING RETURNING filter_id) \
                 INSERT INTO filter_counts(tenant, filter_id, shard, n) \
                 SELECT $1, filter_id, $4, count(*) FROM ins GROUP BY filter_id \
                 ORDER BY filter_id \
                 ON CONFLICT (tenant, filter_id, shard) DO UPDATE SET n = filter_counts.n + EXCLUDED.n",
                &[&tenant_s, &hit_f, &hit_i, &BACKFILL_SHARD],
            )
            .await
            .map_err(db)?;
        }
        metrics::counter!("epr_filter_backfill_endpoints_total").increment(rows.len() as u64);
        // Fewer rows than asked: nothing is left up to `until`.
        if (rows.len() as i64) < batch {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
    };
    let last = if done { until } else { cursor };
    let mut events = Vec::new();
    let mut activated = Vec::new();
    let now = Timestamp(now_millis());
    for f in &mut pending {
        f.after = f.after.max(last.min(f.until));
        if f.after < f.until {
            tx.execute(
                "UPDATE filters SET backfill_after=$3, \
                   backfill_lease_until=now() + $4::bigint * interval '1 millisecond' \
                 WHERE tenant=$1 AND filter_id=$2",
                &[&tenant_s, &f.id.as_str(), &f.after, &lease_millis(inner)],
            )
            .await
            .map_err(db)?;
            continue;
        }
        let matched: i64 = tx
            .query_one(
                "UPDATE filters SET status='active', backfill_after=NULL, backfill_until=NULL, \
                   backfill_correlation=NULL, backfill_owner=NULL, backfill_lease_until=NULL \
                 WHERE tenant=$1 AND filter_id=$2 \
                 RETURNING (SELECT coalesce(sum(n), 0)::bigint FROM filter_counts \
                            WHERE tenant=$1 AND filter_id=$2)",
                &[&tenant_s, &f.id.as_str()],
            )
            .await
            .map_err(db)?
            .get(0);
        activated.push((f.id.clone(), matched));
        events.push(OutboxEvent::Filter(FilterEvent {
            tenant: tenant.clone(),
            app: app.clone(),
            filter_id: f.id.clone(),
            filter_name: f.name.clone(),
            kind: FilterEventKind::Activated,
            correlation_id: std::mem::take(&mut f.correlation),
            timestamp: now,
        }));
    }
    if !activated.is_empty() {
        // Writers learn that the filters now emit membership events.
        bump_version(&tx, &tenant, &app).await?;
    }
    let appended = inner.cfg.record_events && !events.is_empty();
    if appended {
        append_events(&tx, &events).await?;
    }
    tx.commit().await.map_err(db)?;
    if appended {
        inner.outbox.wake();
    }
    Ok(StepOutcome {
        done: activated.len() == pending.len(),
        evaluated,
        activated,
    })
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Live matching as a writer does it, in a transaction opened here: the cached filters
    /// at the current version, events only for active filters and only for rows that
    /// really changed, counts in the writer's shard, and a reload after a filter change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_matching_in_a_writer_transaction() {
        use crate::rows::{endpoint_from_row, ENDPOINT_COLUMNS};
        use epr_core::endpoint::Precondition;
        use epr_core::endpoint_filter::FilterPatch;
        use epr_core::metadata::{Limits, Metadata};

        let tdb = crate::testing::TestDb::create().await;
        let store = crate::PgStore::open(crate::PgConfig::new(&tdb.url))
            .await
            .unwrap();
        let inner = store.inner.clone();
        let t = TenantId::parse("t1").unwrap();
        let a = AppName::parse("app").unwrap();
        let ctx = WriteCtx {
            tenant: t.clone(),
            now: Timestamp(7),
            correlation_id: "write-1".into(),
            limits: Limits::default(),
        };
        let mut client = inner.pool.get().await.unwrap();
        let insert = "INSERT INTO endpoints(tenant, endpoint_id, incarnation, app, app_version, \
             app_version_registered, created, metadata, metadata_updated, version, \
             metadata_version, token_hash) \
             VALUES('t1', $1, nextval('endpoint_incarnation'), 'app', 'app-v1', 1, 1, $2, \
                    NULL, 1, 1, $3)";
        for (id, city) in [("ep-0", "Kyiv"), ("ep-1", "Lviv")] {
            client
                .execute(insert, &[&id, &json!({ "city": city }), &id.as_bytes()])
                .await
                .unwrap();
        }
        let kyiv = json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}});
        let lviv = json!({"metadata": {"$elemMatch": {"key": "city", "value": "Lviv"}}});
        execute(
            &inner,
            FilterCommand::Create {
                id: FilterId::parse("fa").unwrap(),
                app: a.clone(),
                spec: FilterSpec::parse("active one", "", &kyiv).unwrap(),
            },
            ctx.clone(),
        )
        .await
        .unwrap();
        for _ in 0..2000 {
            let f = get(&inner, &t, &FilterId::parse("fa").unwrap())
                .await
                .unwrap();
            if f.unwrap().status == FilterStatus::Active {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A pending filter whose back-fill another replica holds (imported, then leased).
        let tx = client.transaction().await.unwrap();
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&app_lock_key(&t, &a)])
            .await
            .unwrap();
        let pending = EndpointFilter {
            id: FilterId::parse("fp").unwrap(),
            app: a.clone(),
            spec: FilterSpec::parse("pending one", "", &lviv).unwrap(),
            status: FilterStatus::Active,
            matched: 5,
            created: Timestamp(8),
            updated: Timestamp(8),
            version: 3,
        };
        assert!(matches!(
            import_filter(&tx, &t, &pending).await.unwrap(),
            ImportOutcome::Imported
        ));
        assert!(matches!(
            import_filter(&tx, &t, &pending).await.unwrap(),
            ImportOutcome::Exists
        ));
        let clash = EndpointFilter {
            id: FilterId::parse("fx").unwrap(),
            ..pending.clone()
        };
        assert!(matches!(
            import_filter(&tx, &t, &clash).await.unwrap(),
            ImportOutcome::Conflict(_)
        ));
        tx.execute(
            "UPDATE filters SET backfill_owner='elsewhere', \
             backfill_lease_until=now() + interval '1 hour' WHERE filter_id='fp'",
            &[],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let load = |row: &tokio_postgres::Row| endpoint_from_row(row).unwrap();
        let select = format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE tenant='t1' AND endpoint_id=$1"
        );
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&app_lock_key(&t, &a)],
        )
        .await
        .unwrap();
        let filters = inner.filters.current(&tx, &t, &a).await.unwrap();
        assert_eq!(filters.filters.len(), 2);
        let again = inner.filters.current(&tx, &t, &a).await.unwrap();
        assert!(
            Arc::ptr_eq(&filters, &again),
            "same version: the cached copy"
        );
        let other = inner
            .filters
            .current(&tx, &t, &AppName::parse("other").unwrap())
            .await
            .unwrap();
        assert!(other.is_empty());

        // ep-1: Lviv → Kyiv. The active filter gains it (event); the pending one has not
        // seen it (no row to delete): nothing.
        let old = load(&tx.query_one(&select, &[&"ep-1"]).await.unwrap());
        let mut new = old.clone();
        new.metadata =
            Metadata::parse(json!({"city": "Kyiv"}), "metadata", &Limits::default()).unwrap();
        let city: BTreeSet<&str> = ["city"].into();
        let unrelated: BTreeSet<&str> = ["floor"].into();
        let effect = Effect::Update(new.clone());
        assert!(filters
            .evaluate(&effect, Some(&old), Some(&unrelated))
            .is_empty());
        assert!(filters
            .evaluate(&Effect::Unchanged(new.clone()), Some(&old), None)
            .is_empty());
        let changes = filters.evaluate(&effect, Some(&old), Some(&city));
        let summary: Vec<(&str, bool, bool)> = changes
            .iter()
            .map(|c| (c.filter_id.as_str(), c.active, c.matched))
            .collect();
        assert_eq!(summary, [("fa", true, true), ("fp", false, false)]);
        let events = apply(&tx, &t, &a, &changes, &ctx, 3).await.unwrap();
        assert_eq!(events.len(), 1);
        let OutboxEvent::Filter(e) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(e.correlation_id, "write-1");
        assert_eq!(e.filter_name, "active one");
        assert_eq!(e.timestamp, Timestamp(7));
        assert!(
            matches!(&e.kind, FilterEventKind::EndpointMatched { endpoint_id, .. }
            if endpoint_id.as_str() == "ep-1")
        );
        // The same row inserted and deleted in one call (two commands of a group).
        let mut both = changes[..1].to_vec();
        both[0].matched = false;
        both.push(changes[0].clone());
        let events = apply(&tx, &t, &a, &both, &ctx, 3).await.unwrap();
        assert_eq!(events.len(), 2, "both rows changed: {events:?}");
        // Repeating a change that is already stored emits nothing.
        assert!(apply(&tx, &t, &a, &changes, &ctx, 3)
            .await
            .unwrap()
            .is_empty());
        // A registration the pending filter matches: stored silently (it has now seen it).
        tx.execute(
            insert,
            &[&"ep-2", &json!({"city": "Lviv"}), &b"ep-2".as_slice()],
        )
        .await
        .unwrap();
        let ep2 = load(&tx.query_one(&select, &[&"ep-2"]).await.unwrap());
        let changes = filters.evaluate(&Effect::Insert(ep2.clone()), None, None);
        assert_eq!(changes.len(), 1);
        assert!(apply(&tx, &t, &a, &changes, &ctx, 3)
            .await
            .unwrap()
            .is_empty());
        // Unregistering ep-0 leaves the active filter.
        let ep0 = load(&tx.query_one(&select, &[&"ep-0"]).await.unwrap());
        let changes = filters.evaluate(&Effect::Delete(ep0.clone()), Some(&ep0), None);
        let events = apply(&tx, &t, &a, &changes, &ctx, 4).await.unwrap();
        assert!(matches!(
            &events[..],
            [OutboxEvent::Filter(FilterEvent {
                kind: FilterEventKind::EndpointUnmatched { .. },
                ..
            })]
        ));
        tx.commit().await.unwrap();
        let counts: Vec<(String, i16, i64)> = client
            .query(
                "SELECT filter_id, shard, n FROM filter_counts WHERE tenant='t1' \
                 ORDER BY filter_id, shard",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            counts,
            [
                ("fa".to_string(), BACKFILL_SHARD, 1),
                ("fa".to_string(), 3, 1),
                ("fa".to_string(), 4, -1),
                ("fp".to_string(), 3, 1),
            ]
        );
        let fa = get(&inner, &t, &FilterId::parse("fa").unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fa.matched, 1, "the sum of the shards");
        assert_eq!(members(&inner, &t, &fa.id).await.unwrap().len(), 1);

        // A rename (another connection) bumps the version: the next write reloads.
        execute(
            &inner,
            FilterCommand::Update {
                id: fa.id.clone(),
                app: a.clone(),
                patch: FilterPatch::parse(Some("renamed"), None, None).unwrap(),
                precondition: Precondition::None,
            },
            ctx.clone(),
        )
        .await
        .unwrap();
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&app_lock_key(&t, &a)],
        )
        .await
        .unwrap();
        let reloaded = inner.filters.current(&tx, &t, &a).await.unwrap();
        assert!(reloaded.version > filters.version);
        assert_eq!(reloaded.filters[0].name, "renamed");
        tx.commit().await.unwrap();
        drop(client);
        store.shutdown().await;
        tdb.drop_db().await;
    }

    /// One endpoint write as the write path does it: the application's shared lock, the
    /// current filters, the row locked, changed, matched and stored in one transaction.
    async fn simulated_write(inner: &Inner, writer: i16, rng: &mut u64) {
        use crate::rows::{endpoint_from_row, ENDPOINT_COLUMNS};
        let mut next = |n: u64| {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng % n
        };
        let (t, a) = (
            TenantId::parse("t1").unwrap(),
            AppName::parse("app").unwrap(),
        );
        // Each writer its own endpoints, as the write path routes them (by ID).
        let id = format!("e{}", next(10) * 2 + writer as u64);
        let op = next(4);
        let value = next(4) as i64;
        let version = format!("app-v{}", 1 + next(2));
        let mut client = inner.pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "SELECT pg_advisory_xact_lock_shared($1)",
            &[&app_lock_key(&t, &a)],
        )
        .await
        .unwrap();
        let filters = inner.filters.current(&tx, &t, &a).await.unwrap();
        let select = format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE tenant='t1' AND endpoint_id=$1"
        );
        let old = tx
            .query_opt(&format!("{select} FOR UPDATE"), &[&id])
            .await
            .unwrap()
            .map(|r| endpoint_from_row(&r).unwrap());
        let keys: BTreeSet<&str> = ["k0"].into();
        let (effect, changed) = match (op, &old) {
            (0, None) => {
                tx.execute(
                    "INSERT INTO endpoints(tenant, endpoint_id, incarnation, app, app_version, \
                     app_version_registered, created, metadata, metadata_updated, version, \
                     metadata_version, token_hash) \
                     VALUES('t1', $1, nextval('endpoint_incarnation'), 'app', $2, 1, 1, \
                            jsonb_build_object('k0', $3::bigint), NULL, 1, 1, '\\x00')",
                    &[&id, &version, &value],
                )
                .await
                .unwrap();
                let new = endpoint_from_row(&tx.query_one(&select, &[&id]).await.unwrap());
                (Effect::Insert(new.unwrap()), None)
            }
            (1, Some(o)) => {
                tx.execute(
                    "DELETE FROM endpoints WHERE tenant='t1' AND endpoint_id=$1",
                    &[&id],
                )
                .await
                .unwrap();
                (Effect::Delete(o.clone()), None)
            }
            (2, Some(_)) | (3, Some(_)) => {
                let sql = if op == 2 {
                    "UPDATE endpoints SET metadata = metadata || jsonb_build_object('k0', $2::bigint) \
                     WHERE tenant='t1' AND endpoint_id=$1"
                } else {
                    "UPDATE endpoints SET metadata = metadata - 'k0' || jsonb_build_object('x', $2::bigint) \
                     WHERE tenant='t1' AND endpoint_id=$1"
                };
                tx.execute(sql, &[&id, &value]).await.unwrap();
                let new = endpoint_from_row(&tx.query_one(&select, &[&id]).await.unwrap());
                (Effect::Update(new.unwrap()), Some(&keys))
            }
            _ => return,
        };
        let changes = filters.evaluate(&effect, old.as_ref(), changed);
        let ctx = WriteCtx {
            tenant: t.clone(),
            now: Timestamp(1),
            correlation_id: "w".into(),
            limits: epr_core::metadata::Limits::default(),
        };
        apply(&tx, &t, &a, &changes, &ctx, writer).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// Writers (following the write path's protocol) race filter creation and back-fill:
    /// afterwards each filter's stored membership is a fresh evaluation of the rows and its
    /// count is its membership.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_racing_backfill_agree_with_a_fresh_evaluation() {
        let tdb = crate::testing::TestDb::create().await;
        let mut cfg = crate::PgConfig::new(&tdb.url);
        cfg.backfill = epr_store::BackfillPace {
            step: Duration::ZERO,
            batch: 2,
            pause: Duration::ZERO,
        };
        let store = crate::PgStore::open(cfg).await.unwrap();
        let inner = store.inner.clone();
        let queries = [
            json!({"metadata": {"$elemMatch": {"key": "k0", "value": {"$gte": 2}}}}),
            json!({"application_version": "app-v2"}),
            json!({"metadata": {"$not": {"$elemMatch": {"key": "k0"}}}}),
            json!({"metadata": {"$size": 1}}),
        ];
        for seed in 1..=3u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for _ in 0..40 {
                simulated_write(&inner, 0, &mut rng).await;
            }
            let writers: Vec<_> = (0..2i16)
                .map(|w| {
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        let mut rng = (seed * 31 + w as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
                        for _ in 0..150 {
                            simulated_write(&inner, w, &mut rng).await;
                        }
                    })
                })
                .collect();
            for (i, q) in queries.iter().enumerate() {
                let ctx = WriteCtx {
                    tenant: TenantId::parse("t1").unwrap(),
                    now: Timestamp(1),
                    correlation_id: "c".into(),
                    limits: epr_core::metadata::Limits::default(),
                };
                execute(
                    &inner,
                    FilterCommand::Create {
                        id: FilterId::parse(&format!("s{seed}q{i}")).unwrap(),
                        app: AppName::parse("app").unwrap(),
                        spec: FilterSpec::parse(&format!("s{seed}q{i}"), "", q).unwrap(),
                    },
                    ctx,
                )
                .await
                .unwrap();
                tokio::task::yield_now().await;
            }
            for w in writers {
                w.await.unwrap();
            }
            let client = inner.pool.get().await.unwrap();
            for (i, q) in queries.iter().enumerate() {
                let id = FilterId::parse(&format!("s{seed}q{i}")).unwrap();
                let f = loop {
                    let f = get(&inner, &TenantId::parse("t1").unwrap(), &id)
                        .await
                        .unwrap()
                        .unwrap();
                    if f.status == FilterStatus::Active {
                        break f;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let compiled = Filter::parse(q).unwrap();
                let expected: Vec<String> = client
                    .query(
                        "SELECT endpoint_id, app_version, metadata FROM endpoints \
                         WHERE tenant='t1' AND app='app' ORDER BY incarnation",
                        &[],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .filter(|r| {
                        let md: Value = r.get(2);
                        compiled.matches(r.get(1), md.as_object().unwrap())
                    })
                    .map(|r| r.get(0))
                    .collect();
                let got: Vec<String> = members(&inner, &TenantId::parse("t1").unwrap(), &id)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(_, e)| e.to_string())
                    .collect();
                assert_eq!(got, expected, "seed {seed}, {q}");
                assert_eq!(f.matched as usize, got.len(), "seed {seed}, count of {q}");
            }
        }
        store.shutdown().await;
        tdb.drop_db().await;
    }

    #[test]
    fn lock_keys_differ_by_tenant_and_app() {
        let t = |s: &str| TenantId::parse(s).unwrap();
        let a = |s: &str| AppName::parse(s).unwrap();
        assert_ne!(
            app_lock_key(&t("t1"), &a("app")),
            app_lock_key(&t("t2"), &a("app"))
        );
        assert_eq!(
            app_lock_key(&t("t1"), &a("app")),
            app_lock_key(&t("t1"), &a("app"))
        );
    }
}
