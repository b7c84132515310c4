//! Saved filters in the embedded store: their rows, the writer's in-memory copy of every
//! filter's compiled query, live matching of endpoint writes, and the back-fill.
//!
//! Invariant (what makes live matching and back-fill agree): an endpoint is in a filter's
//! membership (a bitmap in [`MetaIndex`]) exactly when the filter matches the endpoint's
//! *current* state, for every endpoint the filter has "seen". An active filter has seen every
//! endpoint; a pending one has seen the endpoints written since its back-fill started plus
//! those the back-fill has passed. Both the writes and the back-fill run on the one writer
//! thread, so an endpoint is never evaluated on a stale state. When a query changes, the old
//! membership is cleared in the same group and the back-fill starts over.
//!
//! Memberships are not stored: they are a function of the committed endpoint rows and the
//! filters' queries, so the store derives them again when it opens (every filter, pending
//! ones included, is evaluated over every endpoint in the scan that builds the listing
//! index; a pending filter then only has its `activated` left to do). A membership change
//! thus writes no page: the writer stages it during the transaction and applies it to the
//! bitmaps once the group committed, with the listing index's changes. Until version 3 of
//! the schema they were rows of a `filter_matches` table, whose pages every change dirtied
//! (BENCHMARKS.md, issue 13); the upgrade drops it.

use epr_core::command::{Effect, WriteCtx};
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::{
    membership_change, membership_changes, plan_filter, reads_changed, EndpointFilter,
    FilterCommand, FilterEffect, FilterId, FilterSpec, FilterStatus,
};
use epr_core::event::{FilterEvent, FilterEventKind, OutboxEvent};
use epr_core::filter::{Filter, FilterSet};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::ports::{ImportOutcome, StoreError};
use epr_core::{DomainError, Timestamp};

use crate::key_index::KeyIndex;
use crate::meta_index::{MemberChange, MetaIndex};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const SCHEMA: &str = "
-- A rowid table, not WITHOUT ROWID: with 1 KiB pages an index B-tree keeps at most ~230
-- bytes of a row in place, so a filter row (its query) would spill to overflow pages that
-- every counter update rewrites.
CREATE TABLE IF NOT EXISTS filters(
    tenant TEXT NOT NULL,
    filter_id TEXT NOT NULL,
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    query TEXT NOT NULL,
    status TEXT NOT NULL,
    matched INTEGER NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    version INTEGER NOT NULL,
    backfill_after INTEGER,
    backfill_until INTEGER,
    backfill_correlation TEXT,
    PRIMARY KEY(tenant, filter_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS filters_by_name ON filters(tenant, app, name);
-- Memberships live in memory (see the module docs); schema 3 stored them here.
DROP INDEX IF EXISTS filter_matches_by_endpoint;
DROP TABLE IF EXISTS filter_matches;
";

pub(crate) const FILTER_COLUMNS: &str =
    "filter_id, app, name, description, query, status, matched, \
    created, updated, version";

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn corrupt(i: usize, e: impl ToString) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.to_string().into())
}

fn parse_status(s: &str) -> rusqlite::Result<FilterStatus> {
    match s {
        "pending" => Ok(FilterStatus::Pending),
        "active" => Ok(FilterStatus::Active),
        other => Err(corrupt(5, format!("unknown filter status '{other}'"))),
    }
}

/// A stored filter row as the domain value (the query is compiled again: reads are rare
/// next to writes, and the stored text is the source of truth).
pub(crate) fn filter_from_row(row: &Row<'_>) -> rusqlite::Result<EndpointFilter> {
    let query_text: String = row.get(4)?;
    let query: Value = serde_json::from_str(&query_text).map_err(|e| corrupt(4, e))?;
    let spec = FilterSpec::parse(&row.get::<_, String>(2)?, &row.get::<_, String>(3)?, &query)
        .map_err(|e| corrupt(4, e))?;
    Ok(EndpointFilter {
        id: FilterId::parse(&row.get::<_, String>(0)?).map_err(|e| corrupt(0, e))?,
        app: AppName::parse(&row.get::<_, String>(1)?).map_err(|e| corrupt(1, e))?,
        spec,
        status: parse_status(&row.get::<_, String>(5)?)?,
        matched: row.get::<_, i64>(6)?.max(0) as u64,
        created: Timestamp(row.get(7)?),
        updated: Timestamp(row.get(8)?),
        version: row.get::<_, i64>(9)? as u64,
    })
}

pub(crate) fn load_filter(
    conn: &Connection,
    tenant: &str,
    id: &str,
) -> rusqlite::Result<Option<EndpointFilter>> {
    conn.prepare_cached(&format!(
        "SELECT {FILTER_COLUMNS} FROM filters WHERE tenant=?1 AND filter_id=?2"
    ))?
    .query_row(params![tenant, id], filter_from_row)
    .optional()
}

pub(crate) fn list_filters(
    conn: &Connection,
    tenant: &str,
    app: &str,
    name: Option<&str>,
    offset: u64,
    limit: u32,
) -> rusqlite::Result<(u64, Vec<EndpointFilter>)> {
    let cond = "tenant=?1 AND app=?2 AND (?3 IS NULL OR name=?3)";
    let total: i64 = conn
        .prepare_cached(&format!("SELECT COUNT(*) FROM filters WHERE {cond}"))?
        .query_row(params![tenant, app, name], |r| r.get(0))?;
    let items = conn
        .prepare_cached(&format!(
            "SELECT {FILTER_COLUMNS} FROM filters WHERE {cond} ORDER BY created, filter_id \
             LIMIT ?4 OFFSET ?5"
        ))?
        .query_map(
            params![tenant, app, name, limit as i64, offset as i64],
            filter_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((total as u64, items))
}

/// Where a pending filter's back-fill stands: every endpoint with an incarnation in
/// `(0, after]` has been evaluated; it is complete once `after >= until`. Endpoints
/// registered after the back-fill started (incarnation > `until`) are matched live.
#[derive(Debug, Clone, Copy)]
struct Backfill {
    after: i64,
    until: i64,
    /// When this process started (or resumed) the back-fill, for the duration metric.
    started: Instant,
    /// Endpoints evaluated by this process, for the rate in the log.
    evaluated: u64,
}

/// The writer's copy of one filter: what matching needs, without parsing anything.
struct Cached {
    id: FilterId,
    name: String,
    compiled: Arc<Filter>,
    /// The metadata keys the filter reads, when it says (`Filter::metadata_keys`).
    keys: Option<Vec<String>>,
    /// `None` when active.
    backfill: Option<Backfill>,
    /// The correlation ID of the request that started the back-fill, so that `activated`
    /// carries it too.
    correlation: String,
}

/// The writer's compiled filters as of one version of its filter set, shared with other
/// threads: a new endpoint is evaluated against it on the request's thread, in parallel,
/// instead of on the writer (with 100 filters that was a quarter of the writer's time per
/// registration), and the evaluation at open runs on two threads with it. The writer uses a
/// request thread's answer only if its filter set is still that version.
#[derive(Default)]
pub(crate) struct FilterView {
    generation: u64,
    /// By tenant, then application: the filters in the writer's order.
    apps: HashMap<String, HashMap<String, AppFilters>>,
}

/// One application's filters: their IDs, and their queries indexed to be evaluated together.
struct AppFilters {
    ids: Vec<FilterId>,
    set: FilterSet,
}

/// The view the writer last published (see [`FilterView`]).
pub(crate) type SharedFilterView = Arc<std::sync::RwLock<Arc<FilterView>>>;

/// Which of its application's filters a new endpoint matches, as evaluated by the view of
/// `generation` (in the order of that view).
pub(crate) struct Precomputed {
    generation: u64,
    pub(crate) matches: Vec<bool>,
}

impl FilterView {
    fn app(&self, tenant: &str, app: &str) -> Option<&AppFilters> {
        self.apps.get(tenant)?.get(app)
    }

    /// Evaluates a new endpoint (`None` when its application has no filter).
    pub(crate) fn evaluate(
        &self,
        tenant: &str,
        app: &str,
        version: &str,
        metadata: &serde_json::Map<String, Value>,
    ) -> Option<Precomputed> {
        let filters = self.app(tenant, app)?;
        Some(Precomputed {
            generation: self.generation,
            matches: filters.set.matches(version, metadata),
        })
    }

    /// Notes in `found` every filter of its application that one stored endpoint matches
    /// (pending filters included; see [`FilterCache::all_seen`]).
    pub(crate) fn evaluate_stored(&self, found: &mut Found, tenant: &TenantId, ep: &Endpoint) {
        let Some(filters) = self.app(tenant.as_str(), ep.app.as_str()) else {
            return;
        };
        let matches = filters
            .set
            .matches(ep.app_version.as_str(), ep.metadata.as_map());
        for (id, _) in filters.ids.iter().zip(matches).filter(|(_, m)| *m) {
            note_member(found, tenant, id, ep.incarnation as u64);
        }
    }
}

/// Versions of the filter set, unique within the process (a cache loaded again after a
/// rollback must not reuse the number of the one it replaces).
static FILTER_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Every filter, by tenant and application. Owned by the writer thread.
pub(crate) struct FilterCache {
    apps: HashMap<(TenantId, AppName), Vec<Cached>>,
    /// This filter set's version, and where it is published for the request threads.
    generation: u64,
    view: SharedFilterView,
    /// Where the committed memberships are (shared with the readers).
    index: Arc<MetaIndex>,
    /// Membership changes of the open transaction, applied once it committed.
    staged: Vec<MemberChange>,
    /// Members found by a back-fill step or the evaluation at open, per filter: staged as
    /// one bitmap each (a million single changes would each copy two IDs). Only ever adds,
    /// and never in the same transaction as `staged`'s changes of the same filter.
    found: Found,
}

/// Members found, per tenant and filter.
pub(crate) type Found = HashMap<TenantId, HashMap<FilterId, roaring::RoaringTreemap>>;

/// Notes `inc` as a member of `filter` in `found`.
fn note_member(found: &mut Found, tenant: &TenantId, filter: &FilterId, inc: u64) {
    let filters = match found.get_mut(tenant) {
        Some(f) => f,
        None => found.entry(tenant.clone()).or_default(),
    };
    match filters.get_mut(filter) {
        Some(set) => {
            set.insert(inc);
        }
        None => {
            filters.entry(filter.clone()).or_default().insert(inc);
        }
    }
}

/// How the back-fill is paced.
#[derive(Debug, Clone, Copy)]
pub struct BackfillPace {
    /// How long one step may run before the writer looks at its queue again: a write that
    /// arrives meanwhile waits at most about this long (plus one batch).
    pub step: Duration,
    /// Endpoints read per query; a step runs at least one.
    pub batch: u32,
    /// Rest after each step (a throttle: leaves the disk and a core to the writes).
    pub pause: Duration,
}

impl Default for BackfillPace {
    fn default() -> Self {
        Self {
            step: Duration::from_millis(5),
            batch: 512,
            pause: Duration::ZERO,
        }
    }
}

impl FilterCache {
    /// Loads every filter (at open, and after a rolled-back group). The memberships in
    /// `index` are the committed ones; a pending filter's back-fill resumes from its stored
    /// cursor (the start, since the cursor is no longer written: evaluating an endpoint
    /// again changes nothing), unless [`Self::evaluate`] saw every endpoint at open.
    pub(crate) fn load(
        conn: &Connection,
        index: Arc<MetaIndex>,
        view: SharedFilterView,
    ) -> Result<Self, StoreError> {
        let mut cache = Self {
            apps: HashMap::new(),
            generation: 0,
            view,
            index,
            staged: Vec::new(),
            found: HashMap::new(),
        };
        let mut stmt = conn
            .prepare(
                "SELECT tenant, filter_id, app, name, query, backfill_after, \
                 backfill_until, backfill_correlation FROM filters \
                 ORDER BY tenant, app, created, filter_id",
            )
            .map_err(unavailable)?;
        let mut rows = stmt.query([]).map_err(unavailable)?;
        while let Some(row) = rows.next().map_err(unavailable)? {
            let read = || -> rusqlite::Result<((TenantId, AppName), Cached)> {
                let tenant =
                    TenantId::parse(&row.get::<_, String>(0)?).map_err(|e| corrupt(0, e))?;
                let app = AppName::parse(&row.get::<_, String>(2)?).map_err(|e| corrupt(2, e))?;
                let query: Value =
                    serde_json::from_str(&row.get::<_, String>(4)?).map_err(|e| corrupt(4, e))?;
                let compiled = Filter::parse(&query).map_err(|e| corrupt(4, e))?;
                let after: Option<i64> = row.get(5)?;
                let until: Option<i64> = row.get(6)?;
                Ok((
                    (tenant, app),
                    Cached {
                        id: FilterId::parse(&row.get::<_, String>(1)?)
                            .map_err(|e| corrupt(1, e))?,
                        name: row.get(3)?,
                        keys: compiled.metadata_keys(),
                        compiled: Arc::new(compiled),
                        backfill: after.map(|after| Backfill {
                            after,
                            until: until.unwrap_or(after),
                            started: Instant::now(),
                            evaluated: 0,
                        }),
                        correlation: row.get::<_, Option<String>>(7)?.unwrap_or_default(),
                    },
                ))
            };
            let (key, cached) = read().map_err(unavailable)?;
            cache.apps.entry(key).or_default().push(cached);
        }
        cache.publish();
        Ok(cache)
    }

    /// Where this cache publishes its view (a cache loaded again keeps publishing there).
    pub(crate) fn view(&self) -> SharedFilterView {
        self.view.clone()
    }

    /// Takes a new version number for the filter set and publishes its view. Called after
    /// anything that may have added, removed, reordered or recompiled a filter.
    fn publish(&mut self) {
        self.generation = FILTER_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut apps: HashMap<String, HashMap<String, AppFilters>> = HashMap::new();
        for ((tenant, app), filters) in &self.apps {
            if filters.is_empty() {
                continue;
            }
            apps.entry(tenant.to_string()).or_default().insert(
                app.to_string(),
                AppFilters {
                    ids: filters.iter().map(|f| f.id.clone()).collect(),
                    set: FilterSet::new(filters.iter().map(|f| f.compiled.clone()).collect()),
                },
            );
        }
        let view = Arc::new(FilterView {
            generation: self.generation,
            apps,
        });
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
    }

    pub(crate) fn backfill_pending(&self) -> bool {
        self.apps.values().flatten().any(|f| f.backfill.is_some())
    }

    /// The membership changes of the transaction that is about to commit, to apply with
    /// [`MetaIndex::apply_members`] once it did (dropped with a rolled-back group).
    pub(crate) fn take_staged(&mut self) -> Vec<MemberChange> {
        let mut out = std::mem::take(&mut self.staged);
        for (tenant, filters) in self.found.drain() {
            for (filter, incs) in filters {
                out.push(MemberChange::Add {
                    tenant: tenant.clone(),
                    filter,
                    incs,
                });
            }
        }
        out
    }

    /// The filters' queries for the evaluation at open.
    pub(crate) fn evaluator(&self) -> Arc<FilterView> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stages the members a [`FilterView`] found (applied with the next [`Self::take_staged`]).
    pub(crate) fn add_found(&mut self, found: Found) {
        for (tenant, filters) in found {
            let mine = self.found.entry(tenant).or_default();
            for (filter, incs) in filters {
                *mine.entry(filter).or_default() |= incs;
            }
        }
    }

    /// At open, once a [`FilterView`] saw every endpoint: pending filters have seen them
    /// all, so their back-fill has only its `activated` left.
    pub(crate) fn all_seen(&mut self) {
        for f in self.apps.values_mut().flatten() {
            if let Some(b) = f.backfill.as_mut() {
                b.after = b.until;
            }
        }
    }

    /// The number of filters (the open log says it).
    pub(crate) fn len(&self) -> usize {
        self.apps.values().map(Vec::len).sum()
    }

    /// Whether any filter exists for this application (so a write needs matching).
    pub(crate) fn has_filters(&self, tenant: &TenantId, app: &AppName) -> bool {
        self.apps
            .get(&(tenant.clone(), app.clone()))
            .is_some_and(|fs| !fs.is_empty())
    }

    /// Re-evaluates one written endpoint against its application's filters and stages the
    /// membership changes, with `ep-matched` / `ep-unmatched` events for active filters.
    ///
    /// Whether the endpoint was a member is the filter evaluated on its state before the
    /// write (`old`), not a read of the membership: by the invariant (module docs) the two
    /// agree wherever the filter has seen the endpoint, and where it has not, the back-fill
    /// decides later. `changed_keys` (the
    /// metadata keys a metadata write changed) lets filters that read other keys only be
    /// skipped: their answer cannot have changed.
    pub(crate) fn match_endpoint(
        &mut self,
        effect: &Effect,
        old: Option<&Endpoint>,
        changed_keys: Option<&BTreeSet<&str>>,
        ctx: &WriteCtx,
        mut events: Option<&mut Vec<OutboxEvent>>,
        precomputed: Option<&Precomputed>,
    ) -> Result<(), StoreError> {
        let ep = match effect {
            Effect::Unchanged(_) => return Ok(()),
            Effect::Insert(ep) | Effect::Update(ep) | Effect::Delete(ep) => ep,
        };
        let Self {
            apps,
            staged,
            generation,
            view,
            ..
        } = self;
        let Some(filters) = apps.get(&(ctx.tenant.clone(), ep.app.clone())) else {
            return Ok(());
        };
        let deleted = matches!(effect, Effect::Delete(_));
        let new = (!deleted).then_some(ep);
        // A new endpoint evaluated by the request's thread against this very filter set.
        let precomputed = precomputed.filter(|p| {
            matches!(effect, Effect::Insert(_))
                && old.is_none()
                && p.generation == *generation
                && p.matches.len() == filters.len()
        });
        // Otherwise a write of the whole endpoint (a registration in a batch, a deletion) is
        // evaluated by every filter at once, through the published view's index when it is
        // this very filter set.
        let at_once = if precomputed.is_none() && changed_keys.is_none() {
            let view = view.read().unwrap_or_else(|p| p.into_inner()).clone();
            (view.generation == *generation)
                .then(|| view.app(ctx.tenant.as_str(), ep.app.as_str()))
                .flatten()
                .filter(|a| a.ids.len() == filters.len())
                .map(|a| membership_changes(&a.set, old, new))
        } else {
            None
        };
        let mut changed = 0;
        for (i, f) in filters.iter().enumerate() {
            let change = match (precomputed, &at_once) {
                // Nothing was a member before: a match is the one change there can be.
                (Some(p), _) if reads_changed(f.keys.as_deref(), changed_keys) => {
                    p.matches[i].then_some(true)
                }
                (Some(_), _) => None,
                (None, Some(changes)) => changes[i],
                (None, None) => {
                    membership_change(&f.compiled, f.keys.as_deref(), old, new, changed_keys)
                }
            };
            let Some(is) = change else {
                continue;
            };
            // For a pending filter that has not seen the endpoint yet this may set what is
            // already so; its back-fill evaluates the endpoint again, to the same answer.
            staged.push(MemberChange::Set {
                tenant: ctx.tenant.clone(),
                filter: f.id.clone(),
                inc: ep.incarnation as u64,
                member: is,
            });
            changed += 1;
            // A pending filter's membership is built silently (see docs/filters.md). Without
            // an outbox (no NATS) no event is built at all.
            let Some(events) = events.as_deref_mut() else {
                continue;
            };
            if f.backfill.is_none() {
                let (endpoint_id, app_version) = (ep.id.clone(), ep.app_version.clone());
                let kind = if is {
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
                events.push(OutboxEvent::Filter(FilterEvent {
                    tenant: ctx.tenant.clone(),
                    app: ep.app.clone(),
                    filter_id: f.id.clone(),
                    filter_name: f.name.clone(),
                    kind,
                    correlation_id: ctx.correlation_id.clone(),
                    timestamp: ctx.now,
                }));
            }
        }
        if changed > 0 {
            metrics::counter!("epr_filter_membership_changes_total").increment(changed);
        }
        Ok(())
    }

    /// Executes a filter command inside the writer's transaction. `last_incarnation` bounds
    /// the back-fill of a new query: later registrations are matched live.
    pub(crate) fn execute(
        &mut self,
        conn: &Connection,
        cmd: &FilterCommand,
        ctx: &WriteCtx,
        last_incarnation: i64,
        events: &mut Vec<OutboxEvent>,
    ) -> Result<EndpointFilter, StoreError> {
        let result = self.execute_filter(conn, cmd, ctx, last_incarnation, events);
        // Refused or not, the set may have changed (filter commands are rare).
        self.publish();
        result
    }

    fn execute_filter(
        &mut self,
        conn: &Connection,
        cmd: &FilterCommand,
        ctx: &WriteCtx,
        last_incarnation: i64,
        events: &mut Vec<OutboxEvent>,
    ) -> Result<EndpointFilter, StoreError> {
        let tenant = ctx.tenant.as_str();
        let current = load_filter(conn, tenant, cmd.filter_id().as_str()).map_err(unavailable)?;
        let plan = plan_filter(current, cmd, ctx)?;
        let key = |f: &EndpointFilter| (ctx.tenant.clone(), f.app.clone());
        let mut result = plan.effect.filter().clone();
        match &plan.effect {
            FilterEffect::Insert(f) => {
                self.check_name_free(conn, tenant, f)?;
                conn.prepare_cached(&format!(
                    "INSERT INTO filters(tenant, {FILTER_COLUMNS}, backfill_after, backfill_until, \
                     backfill_correlation) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,0,?12,?13)"
                ))
                .and_then(|mut s| {
                    s.execute(params![
                        tenant,
                        f.id.as_str(),
                        f.app.as_str(),
                        f.spec.name,
                        f.spec.description,
                        Value::Object(f.spec.query.clone()).to_string(),
                        f.status.as_str(),
                        0i64,
                        f.created.0,
                        f.updated.0,
                        f.version as i64,
                        last_incarnation,
                        ctx.correlation_id
                    ])
                })
                .map_err(unavailable)?;
                // A new ID has no membership; this only guards against a stale one.
                self.staged.push(MemberChange::Clear {
                    tenant: ctx.tenant.clone(),
                    filter: f.id.clone(),
                });
                self.apps.entry(key(f)).or_default().push(Cached {
                    id: f.id.clone(),
                    name: f.spec.name.clone(),
                    compiled: f.spec.compiled.clone(),
                    keys: f.spec.compiled.metadata_keys(),
                    backfill: Some(Backfill::new(last_incarnation)),
                    correlation: ctx.correlation_id.clone(),
                });
            }
            FilterEffect::Update { filter: f, restart } => {
                self.check_name_free(conn, tenant, f)?;
                let backfill = restart.then_some(0i64);
                if *restart {
                    self.staged.push(MemberChange::Clear {
                        tenant: ctx.tenant.clone(),
                        filter: f.id.clone(),
                    });
                }
                conn.prepare_cached(
                    "UPDATE filters SET name=?3, description=?4, query=?5, status=?6, updated=?7, \
                     version=?8, backfill_after=CASE WHEN ?9 IS NULL THEN backfill_after ELSE ?9 END, \
                     backfill_until=CASE WHEN ?9 IS NULL THEN backfill_until ELSE ?10 END, \
                     backfill_correlation=CASE WHEN ?9 IS NULL THEN backfill_correlation ELSE ?11 END \
                     WHERE tenant=?1 AND filter_id=?2",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        tenant,
                        f.id.as_str(),
                        f.spec.name,
                        f.spec.description,
                        Value::Object(f.spec.query.clone()).to_string(),
                        f.status.as_str(),
                        f.updated.0,
                        f.version as i64,
                        backfill,
                        last_incarnation,
                        ctx.correlation_id
                    ])
                })
                .map_err(unavailable)?;
                let cached = self.find_mut(&key(f), &f.id)?;
                cached.name = f.spec.name.clone();
                if *restart {
                    cached.compiled = f.spec.compiled.clone();
                    cached.keys = f.spec.compiled.metadata_keys();
                    cached.backfill = Some(Backfill::new(last_incarnation));
                    cached.correlation = ctx.correlation_id.clone();
                }
                // The count as of the last commit (changes staged in this group are not in it).
                result.matched = if *restart {
                    0
                } else {
                    self.index.members_count(tenant, f.id.as_str())
                };
            }
            FilterEffect::Delete(f) => {
                conn.prepare_cached("DELETE FROM filters WHERE tenant=?1 AND filter_id=?2")
                    .and_then(|mut s| s.execute(params![tenant, f.id.as_str()]))
                    .map_err(unavailable)?;
                self.staged.push(MemberChange::Clear {
                    tenant: ctx.tenant.clone(),
                    filter: f.id.clone(),
                });
                result.matched = self.index.members_count(tenant, f.id.as_str());
                self.apps
                    .entry(key(f))
                    .or_default()
                    .retain(|c| c.id != f.id);
            }
            FilterEffect::Unchanged(f) => {
                self.find_mut(&key(f), &f.id)?;
                result.matched = self.index.members_count(tenant, f.id.as_str());
            }
        }
        events.extend(plan.events.into_iter().map(OutboxEvent::Filter));
        Ok(result)
    }

    /// Stores an imported filter's definition as a new pending filter whose back-fill derives
    /// its membership over every endpoint up to `last_incarnation` (later ones are matched
    /// live), exactly like a created one but without its `pending` event. An existing ID is
    /// left alone; a name held by another filter is a conflict.
    pub(crate) fn import(
        &mut self,
        conn: &Connection,
        tenant: &TenantId,
        f: &EndpointFilter,
        last_incarnation: i64,
    ) -> Result<ImportOutcome, StoreError> {
        let result = self.import_filter(conn, tenant, f, last_incarnation);
        self.publish();
        result
    }

    fn import_filter(
        &mut self,
        conn: &Connection,
        tenant: &TenantId,
        f: &EndpointFilter,
        last_incarnation: i64,
    ) -> Result<ImportOutcome, StoreError> {
        if load_filter(conn, tenant.as_str(), f.id.as_str())
            .map_err(unavailable)?
            .is_some()
        {
            return Ok(ImportOutcome::Exists);
        }
        match self.check_name_free(conn, tenant.as_str(), f) {
            Ok(()) => {}
            Err(StoreError::Rejected(e)) => return Ok(ImportOutcome::Conflict(e.to_string())),
            Err(e) => return Err(e),
        }
        const CORRELATION: &str = "import";
        conn.prepare_cached(&format!(
            "INSERT INTO filters(tenant, {FILTER_COLUMNS}, backfill_after, backfill_until, \
             backfill_correlation) VALUES(?1,?2,?3,?4,?5,?6,?7,0,?8,?9,?10,0,?11,?12)"
        ))
        .and_then(|mut s| {
            s.execute(params![
                tenant.as_str(),
                f.id.as_str(),
                f.app.as_str(),
                f.spec.name,
                f.spec.description,
                Value::Object(f.spec.query.clone()).to_string(),
                FilterStatus::Pending.as_str(),
                f.created.0,
                f.updated.0,
                f.version as i64,
                last_incarnation,
                CORRELATION
            ])
        })
        .map_err(unavailable)?;
        self.staged.push(MemberChange::Clear {
            tenant: tenant.clone(),
            filter: f.id.clone(),
        });
        self.apps
            .entry((tenant.clone(), f.app.clone()))
            .or_default()
            .push(Cached {
                id: f.id.clone(),
                name: f.spec.name.clone(),
                compiled: f.spec.compiled.clone(),
                keys: f.spec.compiled.metadata_keys(),
                backfill: Some(Backfill::new(last_incarnation)),
                correlation: CORRELATION.into(),
            });
        Ok(ImportOutcome::Imported)
    }

    fn find_mut(
        &mut self,
        key: &(TenantId, AppName),
        id: &FilterId,
    ) -> Result<&mut Cached, StoreError> {
        self.apps
            .get_mut(key)
            .and_then(|l| l.iter_mut().find(|c| &c.id == id))
            .ok_or_else(|| {
                StoreError::Unavailable(
                    format!("filter '{id}' is stored but not in the writer's cache").into(),
                )
            })
    }

    fn check_name_free(
        &self,
        conn: &Connection,
        tenant: &str,
        f: &EndpointFilter,
    ) -> Result<(), StoreError> {
        let holder: Option<String> = conn
            .prepare_cached("SELECT filter_id FROM filters WHERE tenant=?1 AND app=?2 AND name=?3")
            .and_then(|mut s| {
                s.query_row(params![tenant, f.app.as_str(), f.spec.name], |r| r.get(0))
                    .optional()
            })
            .map_err(unavailable)?;
        match holder {
            Some(other) if other != f.id.as_str() => Err(DomainError::Conflict {
                field: "name",
                message: format!(
                    "application '{}' already has a filter named '{}' ('{other}')",
                    f.app, f.spec.name
                ),
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// Runs one bounded step of the back-fill of the first application that has pending
    /// filters: reads its endpoints in incarnation order from the smallest cursor, evaluates
    /// the pending filters that have not seen each one, and stores the matches. Filters whose
    /// back-fill completes turn active (with an `activated` event). The caller commits.
    pub(crate) fn backfill_step(
        &mut self,
        conn: &Connection,
        pace: BackfillPace,
        now: Timestamp,
        events: &mut Vec<OutboxEvent>,
    ) -> Result<(), StoreError> {
        let Self { apps, found, .. } = self;
        let Some(((tenant, app), filters)) = apps
            .iter_mut()
            .find(|(_, fs)| fs.iter().any(|f| f.backfill.is_some()))
        else {
            return Ok(());
        };
        let deadline = Instant::now() + pace.step;
        let batch = i64::from(pace.batch.max(1));
        let mut pending: Vec<&mut Cached> = filters
            .iter_mut()
            .filter(|f| f.backfill.is_some())
            .collect();
        let bounds = |p: &[&mut Cached]| {
            let after = p.iter().filter_map(|f| f.backfill.map(|b| b.after)).min();
            let until = p.iter().filter_map(|f| f.backfill.map(|b| b.until)).max();
            (after.unwrap_or(0), until.unwrap_or(0))
        };
        let (mut cursor, until) = bounds(&pending);
        // Parse only the metadata keys the filters read, when they say which (Kaa's usual
        // `$elemMatch` on a key): parsing is most of the cost of a scan.
        let wanted: Option<Vec<String>> = pending.iter().try_fold(Vec::new(), |mut all, f| {
            all.extend(f.compiled.metadata_keys()?);
            Some(all)
        });
        let mut stmt = conn
            .prepare_cached(
                "SELECT incarnation, app_version, metadata FROM endpoints \
                 WHERE tenant=?1 AND app=?2 AND incarnation>?3 AND incarnation<=?4 \
                 ORDER BY incarnation LIMIT ?5",
            )
            .map_err(unavailable)?;
        let done = loop {
            let mut rows = stmt
                .query(params![tenant.as_str(), app.as_str(), cursor, until, batch])
                .map_err(unavailable)?;
            let mut read = 0;
            while let Some(row) = rows.next().map_err(unavailable)? {
                read += 1;
                let incarnation: i64 = row.get(0).map_err(unavailable)?;
                let version = row
                    .get_ref(1)
                    .map_err(unavailable)?
                    .as_str()
                    .map_err(unavailable)?;
                let metadata = row
                    .get_ref(2)
                    .map_err(unavailable)?
                    .as_str()
                    .map_err(unavailable)?;
                let metadata = crate::codec::parse_metadata(metadata, wanted.as_deref())
                    .map_err(|e| unavailable(corrupt(2, e)))?;
                for f in pending.iter_mut() {
                    let Some(b) = f.backfill.as_mut() else {
                        continue;
                    };
                    if incarnation <= b.after || incarnation > b.until {
                        continue;
                    }
                    b.evaluated += 1;
                    if f.compiled.matches(version, &metadata) {
                        note_member(found, tenant, &f.id, incarnation as u64);
                    }
                }
                cursor = incarnation;
            }
            metrics::counter!("epr_filter_backfill_endpoints_total").increment(read);
            // Fewer rows than asked: nothing is left up to `until`.
            if read < batch as u64 {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
        };
        let last = if done { until } else { cursor };
        for f in pending.iter_mut() {
            let Some(b) = f.backfill.as_mut() else {
                continue;
            };
            b.after = b.after.max(last.min(b.until));
            if b.after < b.until {
                continue;
            }
            let secs = b.started.elapsed().as_secs_f64();
            metrics::histogram!("epr_filter_backfill_seconds").record(secs);
            tracing::info!(filter = %f.id, app = %app, evaluated = b.evaluated,
                seconds = secs, "filter back-fill complete; filter active");
            f.backfill = None;
            conn.prepare_cached(
                "UPDATE filters SET status='active', backfill_after=NULL, backfill_until=NULL, \
                 backfill_correlation=NULL WHERE tenant=?1 AND filter_id=?2",
            )
            .and_then(|mut s| s.execute(params![tenant.as_str(), f.id.as_str()]))
            .map_err(unavailable)?;
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
        Ok(())
    }
}

impl Backfill {
    fn new(until: i64) -> Self {
        Self {
            after: 0,
            until,
            started: Instant::now(),
            evaluated: 0,
        }
    }
}

/// The active filters of each endpoint (`include=filters`, 20/EFMP).
pub(crate) fn matched_filters(
    conn: &Connection,
    index: &MetaIndex,
    keys: &KeyIndex,
    tenant: &str,
    endpoints: &[EndpointId],
) -> rusqlite::Result<Vec<(EndpointId, FilterId)>> {
    let mut active = conn.prepare_cached(
        "SELECT filter_id FROM filters WHERE tenant=?1 AND app=?2 AND status='active' \
         ORDER BY filter_id",
    )?;
    let mut out = Vec::new();
    // The endpoints of a page mostly share one application: its active filters are read once.
    let mut active_of: HashMap<String, Vec<String>> = HashMap::new();
    for ep in endpoints {
        let Some(found) = crate::embedded::load(conn, keys, tenant, ep.as_str())? else {
            continue;
        };
        let (inc, app) = (found.incarnation, found.app.to_string());
        let ids = match active_of.get(&app) {
            Some(ids) => ids,
            None => {
                let ids = active
                    .query_map(params![tenant, app], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                active_of.entry(app).or_insert(ids)
            }
        };
        for id in ids {
            if index.is_member(tenant, id, inc) {
                out.push((ep.clone(), FilterId::parse(id).map_err(|e| corrupt(0, e))?));
            }
        }
    }
    Ok(out)
}

/// A filter's membership with each endpoint's application version, in incarnation order.
pub(crate) fn filter_members(
    conn: &Connection,
    index: &MetaIndex,
    tenant: &str,
    id: &str,
) -> rusqlite::Result<Vec<(AppVersionName, EndpointId)>> {
    let members = index.members(tenant, id);
    let tx = conn.unchecked_transaction()?;
    let mut out = Vec::with_capacity(members.len() as usize);
    {
        let mut stmt = tx.prepare_cached(
            "SELECT app_version, endpoint_id FROM endpoints WHERE incarnation=?1 AND tenant=?2",
        )?;
        for inc in members.iter() {
            // A member deleted since the bitmap was read is simply gone.
            let row = stmt
                .query_row(params![inc as i64, tenant], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .optional()?;
            if let Some((v, e)) = row {
                out.push((
                    AppVersionName::parse(&v).map_err(|e| corrupt(0, e))?,
                    EndpointId::parse(&e).map_err(|e| corrupt(1, e))?,
                ));
            }
        }
    }
    tx.finish()?;
    Ok(out)
}
