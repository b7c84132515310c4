//! Versioned, forward-only schema migrations. Each migration runs in its own transaction
//! under a transaction-level advisory lock, so replicas starting at once apply it once.
//!
//! Conventions every table follows: the tenant leads every primary key and index; times are
//! milliseconds since the epoch (`bigint`), as in the domain; metadata is `jsonb`; stored
//! events and batch outcomes are the JSON text of `epr_store::codec` (shared with the
//! embedded store, so both backends store the same shapes).

use crate::error::db;
use epr_core::ports::StoreError;
use tokio_postgres::Client;

/// The advisory lock key that serialises migrations (any fixed number; "EPRMIGR" in ASCII).
const MIGRATION_LOCK: i64 = 0x0045_5052_4d49_4752;

/// `(version, SQL)`, in order. Never edit a released migration: add one.
pub(crate) const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2)];

const V1: &str = r#"
CREATE TABLE store_meta(
    key text PRIMARY KEY,
    value text NOT NULL
);

-- Registration order; an endpoint's incarnation is its position (paging cursor, back-fill
-- cursor). Taken in blocks by the writers.
CREATE SEQUENCE endpoint_incarnation;

CREATE TABLE endpoints(
    tenant text NOT NULL,
    endpoint_id text NOT NULL,
    incarnation bigint NOT NULL,
    app text NOT NULL,
    app_version text NOT NULL,
    app_version_registered bigint NOT NULL,
    created bigint NOT NULL,
    metadata jsonb NOT NULL,
    metadata_updated bigint,
    version bigint NOT NULL,
    metadata_version bigint NOT NULL,
    token_hash bytea NOT NULL,
    PRIMARY KEY(tenant, endpoint_id)
);
CREATE UNIQUE INDEX endpoints_by_incarnation ON endpoints(tenant, incarnation);
CREATE INDEX endpoints_by_app ON endpoints(tenant, app, incarnation);
CREATE INDEX endpoints_by_version ON endpoints(tenant, app_version, incarnation);
-- No index on `metadata` itself: listings use endpoint_values, filters are evaluated in
-- the service (a GIN index measured ~2x the insert cost and served no query).

-- The exact key of a top-level metadata value (listing.rs): its jsonb text, which tells
-- 3 from 3.0 and "3" as serde_json's `==` on the values read back does; SHA-256 of it
-- when long (an index entry is limited to a third of a page).
CREATE FUNCTION epr_value_key(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN octet_length(v::text) <= 64 THEN v::text
                ELSE '#' || encode(sha256(convert_to(v::text, 'UTF8')), 'base64') END
$$;

-- One row per endpoint and top-level metadata key: listing by metadata value counts and
-- pages matches with index-only scans (a GIN index must re-check every match in the heap:
-- ~150 ms to count 50,000 of a million). Maintained by the triggers below, so every writer
-- (any replica, import, purge) keeps it exact in its own transaction.
CREATE TABLE endpoint_values(
    tenant text NOT NULL,
    key text NOT NULL,
    vkey text NOT NULL,
    incarnation bigint NOT NULL,
    app text NOT NULL,
    app_version text NOT NULL,
    PRIMARY KEY(tenant, key, vkey, incarnation) INCLUDE (app, app_version)
);

CREATE FUNCTION endpoint_values_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO endpoint_values(tenant, key, vkey, incarnation, app, app_version)
        SELECT n.tenant, j.key, epr_value_key(j.value), n.incarnation, n.app, n.app_version
        FROM new_rows n, jsonb_each(n.metadata) j;
    RETURN NULL;
END $$;

CREATE FUNCTION endpoint_values_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM endpoint_values v USING old_rows o, jsonb_each(o.metadata) j
        WHERE v.tenant = o.tenant AND v.key = j.key AND v.vkey = epr_value_key(j.value)
          AND v.incarnation = o.incarnation;
    RETURN NULL;
END $$;

-- Only the keys whose value changed (by text: jsonb `=` holds 3 = 3.0), unless the row
-- moved (incarnation, application, version): then all of them.
CREATE FUNCTION endpoint_values_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved boolean := NEW.tenant <> OLD.tenant OR NEW.incarnation <> OLD.incarnation
        OR NEW.app <> OLD.app OR NEW.app_version <> OLD.app_version;
BEGIN
    DELETE FROM endpoint_values v USING jsonb_each(OLD.metadata) j
        WHERE v.tenant = OLD.tenant AND v.key = j.key AND v.vkey = epr_value_key(j.value)
          AND v.incarnation = OLD.incarnation
          AND (moved OR (NEW.metadata -> j.key)::text IS DISTINCT FROM j.value::text);
    INSERT INTO endpoint_values(tenant, key, vkey, incarnation, app, app_version)
        SELECT NEW.tenant, j.key, epr_value_key(j.value), NEW.incarnation, NEW.app,
               NEW.app_version
        FROM jsonb_each(NEW.metadata) j
        WHERE moved OR (OLD.metadata -> j.key)::text IS DISTINCT FROM j.value::text;
    RETURN NULL;
END $$;

-- Inserts and deletes per statement (a group's rows at once); updates per row, skipped
-- in C when nothing indexed changed.
CREATE TRIGGER endpoint_values_inserted AFTER INSERT ON endpoints
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION endpoint_values_inserted();
CREATE TRIGGER endpoint_values_deleted AFTER DELETE ON endpoints
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION endpoint_values_deleted();
CREATE TRIGGER endpoint_values_updated AFTER UPDATE ON endpoints
    FOR EACH ROW
    WHEN (OLD.metadata::text IS DISTINCT FROM NEW.metadata::text
          OR OLD.tenant IS DISTINCT FROM NEW.tenant
          OR OLD.incarnation IS DISTINCT FROM NEW.incarnation
          OR OLD.app IS DISTINCT FROM NEW.app
          OR OLD.app_version IS DISTINCT FROM NEW.app_version)
    EXECUTE FUNCTION endpoint_values_updated();

-- Endpoint tokens by hash, unique per application.
CREATE TABLE tokens(
    tenant text NOT NULL,
    app text NOT NULL,
    token_hash bytea NOT NULL,
    endpoint_id text NOT NULL,
    created bigint NOT NULL,
    PRIMARY KEY(tenant, app, token_hash)
);
CREATE INDEX tokens_by_endpoint ON tokens(tenant, endpoint_id);

-- The transactional outbox. Writers insert with `seq` NULL; the one relay leader gives
-- rows a `seq` in the order they became visible (see outbox.rs), so a relay cursor over
-- `seq` never skips a row that committed late, and per-endpoint order is kept.
CREATE TABLE outbox(
    id bigserial PRIMARY KEY,
    seq bigint UNIQUE,
    event text NOT NULL
);
CREATE INDEX outbox_unsequenced ON outbox(id) WHERE seq IS NULL;
-- The last `seq` given (one row): the leader takes its row lock to sequence, so two
-- processes that both believe they lead cannot interleave.
CREATE TABLE outbox_sequencer(
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_seq bigint NOT NULL
);
INSERT INTO outbox_sequencer(last_seq) VALUES(0);

CREATE TABLE batch_tasks(
    tenant text NOT NULL,
    task_id text NOT NULL,
    app text NOT NULL,
    created bigint NOT NULL,
    outcome text NOT NULL,
    PRIMARY KEY(tenant, task_id)
);
CREATE INDEX batch_tasks_by_created ON batch_tasks(created);

-- Saved filters. `backfill_*` as in the embedded store: a pending filter has evaluated the
-- endpoints with incarnation in (0, backfill_after]; it is complete at backfill_until.
-- `backfill_owner`/`backfill_lease_until` name the replica running the back-fill.
CREATE TABLE filters(
    tenant text NOT NULL,
    filter_id text NOT NULL,
    app text NOT NULL,
    name text NOT NULL,
    description text NOT NULL,
    query jsonb NOT NULL,
    status text NOT NULL,
    created bigint NOT NULL,
    updated bigint NOT NULL,
    version bigint NOT NULL,
    backfill_after bigint,
    backfill_until bigint,
    backfill_correlation text,
    backfill_owner text,
    backfill_lease_until timestamptz,
    PRIMARY KEY(tenant, filter_id)
);
CREATE UNIQUE INDEX filters_by_name ON filters(tenant, app, name);
CREATE INDEX filters_pending ON filters(tenant, app) WHERE status = 'pending';

-- Bumped by every change of an application's filters (create, change, delete,
-- activation): writers compare it with their cached copy under the application lock.
CREATE TABLE app_filters(
    tenant text NOT NULL,
    app text NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY(tenant, app)
);

CREATE TABLE filter_matches(
    tenant text NOT NULL,
    filter_id text NOT NULL,
    incarnation bigint NOT NULL,
    PRIMARY KEY(tenant, filter_id, incarnation)
);

-- A filter's member count, as sharded deltas: writers of one application do not queue on
-- one counter row. The count is the sum over shards.
CREATE TABLE filter_counts(
    tenant text NOT NULL,
    filter_id text NOT NULL,
    shard smallint NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY(tenant, filter_id, shard)
);

-- Small durable settings (e.g. the last configuration read from a central source).
CREATE TABLE settings(
    key text PRIMARY KEY,
    value text NOT NULL,
    updated bigint NOT NULL
);
"#;

/// Endpoint credentials (issue 11): token states and IDs, claim tokens, rejections.
const V2: &str = r#"
-- Several tokens per endpoint, each with Kaa CM's state. Rows of a v1 database (one token
-- per endpoint, issued at registration) get an ID each and start Inactive: the volatile
-- default gives every existing row its own value (a rewrite of the table). The default
-- stays for replicas of the previous version still running during a rolling upgrade,
-- whose inserts name no ID; this version always names it.
ALTER TABLE tokens ADD COLUMN token_id text NOT NULL DEFAULT gen_random_uuid()::text;
ALTER TABLE tokens ADD COLUMN status text NOT NULL DEFAULT 'Inactive'
    CHECK (status IN ('Inactive', 'Active', 'Suspended', 'Revoked'));
ALTER TABLE tokens ADD COLUMN updated bigint NULL;
ALTER TABLE tokens ADD CONSTRAINT tokens_by_id UNIQUE(tenant, token_id);
-- An endpoint's tokens in creation order (listing, the write path's preload, export); IDs
-- in byte order, as in the embedded store.
DROP INDEX tokens_by_endpoint;
CREATE INDEX tokens_by_endpoint_created
    ON tokens(tenant, endpoint_id, created, token_id COLLATE "C");

-- One-time claim tokens for self-registration, by hash, unique per application. A use is
-- recorded (used_at, used_by) in the transaction of the registration that used it.
CREATE TABLE claim_tokens(
    tenant text NOT NULL,
    app text NOT NULL,
    claim_hash bytea NOT NULL,
    claim_id text NOT NULL,
    created bigint NOT NULL,
    expires bigint NOT NULL,
    binding_kind text NOT NULL CHECK (binding_kind IN ('any', 'endpoint', 'pattern')),
    binding text NULL,
    used_at bigint NULL,
    used_by text NULL,
    CONSTRAINT claim_tokens_pkey PRIMARY KEY(tenant, app, claim_hash),
    CONSTRAINT claim_tokens_by_id UNIQUE(tenant, claim_id),
    CHECK ((binding_kind = 'any') = (binding IS NULL))
);
CREATE INDEX claim_tokens_by_created ON claim_tokens(tenant, app, created, claim_id COLLATE "C");

-- Refused self-registrations; the latest REJECTIONS_KEPT per application are kept (older
-- ones are deleted by each insert).
CREATE TABLE rejections(
    id bigserial PRIMARY KEY,
    tenant text NOT NULL,
    app text NOT NULL,
    at bigint NOT NULL,
    app_version text NULL,
    endpoint_id text NULL,
    source text NOT NULL,
    reason text NOT NULL,
    message text NOT NULL
);
CREATE INDEX rejections_by_app ON rejections(tenant, app, id);
"#;

/// The newest schema version this build knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Without migrations at open: the database must be at this build's version exactly.
pub async fn check(client: &Client) -> Result<(), StoreError> {
    let found = match client
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await
    {
        Ok(row) => row.get::<_, Option<i32>>(0).unwrap_or(0),
        // Never migrated (a missing table is the only answer that means version 0).
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
        Err(e) => return Err(db(e)),
    };
    match found {
        v if v == latest() => Ok(()),
        v if v > latest() => Err(newer(v)),
        v => Err(StoreError::Unavailable(
            format!(
                "the database is at schema version {v}, this build needs {}; run `epr migrate`",
                latest()
            )
            .into(),
        )),
    }
}

fn newer(found: i32) -> StoreError {
    StoreError::Unavailable(
        format!(
            "the database holds schema version {found}, this build knows {}; \
             upgrade this service",
            latest()
        )
        .into(),
    )
}

/// Applies every migration the database lacks. Safe to run from several processes at once:
/// each migration takes the advisory lock, re-reads the version and skips what another
/// process applied. Refuses a database newer than this build.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    migrate_to(client, latest()).await
}

/// [`migrate`], stopping at version `target` (tests of an upgrade from an older schema).
pub async fn migrate_to(client: &mut Client, target: i32) -> Result<Vec<i32>, StoreError> {
    // Under the migration lock: two processes running `CREATE TABLE IF NOT EXISTS` at once
    // can both miss the table and one then fails (duplicate type or key).
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version(
            version integer PRIMARY KEY,
            applied timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        let current: Option<i32> = tx
            .query_one("SELECT max(version) FROM schema_version", &[])
            .await
            .map_err(db)?
            .get(0);
        let current = current.unwrap_or(0);
        if current > latest() {
            return Err(newer(current));
        }
        if current >= *version || *version > target {
            continue;
        }
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute("INSERT INTO schema_version(version) VALUES($1)", &[version])
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        tracing::info!(version, "database schema migrated");
        applied.push(*version);
    }
    Ok(applied)
}
