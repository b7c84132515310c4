//! Credentials in the embedded store: endpoint token rows, claim tokens and recorded
//! rejections. Token rows change only through endpoint commands (the writer's `execute`, in
//! the command's transaction); claim tokens and rejections have writer jobs of their own.
//! Reads run on read-only connections.

use crate::embedded::{unavailable, unavailable_msg};
use crate::key_index::{KeyIndex, KeyJournal};
use epr_core::credentials::{
    ClaimBinding, ClaimToken, ClaimUse, IdPattern, RefusalReason, Rejection, StoredToken,
    TokenListQuery, TokenOp, TokenStatus,
};
use epr_core::ids::{AppName, ClaimId, EndpointId, TokenHash, TokenId};
use epr_core::ports::StoreError;
use epr_core::query::{Page, PageRequest};
use epr_core::{DomainError, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::collections::BTreeSet;

// The token table's columns (schema 6), shared by `SCHEMA` and `UPGRADE_TOKENS_TO_V6`.
macro_rules! token_table_v6 {
    () => {
        "(
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    app TEXT NOT NULL,
    token_hash BLOB NOT NULL,
    endpoint_id TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    created INTEGER NOT NULL,
    token_id TEXT NOT NULL,
    status TEXT NOT NULL,
    updated INTEGER
);"
    };
}

/// The credential tables (schema version 8). Token hashes are unique per application, token
/// and claim token IDs per tenant.
///
/// Token rows are kept in the order they were made (a rowid table) and found by endpoint
/// through the endpoint's incarnation, so a registration appends its token to both instead
/// of placing a whole row under a random hash and an index entry under a random endpoint ID.
/// They are found by hash through the store's in-memory [`KeyIndex`] (schema 7 dropped the
/// `tokens_by_hash` B-tree, each of whose inserts dirtied a random page), which also enforces
/// the hash's uniqueness (in [`insert_token`]). An endpoint's tokens all belong to its current
/// incarnation (unregistering deletes them).
pub(crate) const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS tokens",
    token_table_v6!(),
    "
DROP INDEX IF EXISTS tokens_by_hash;
CREATE UNIQUE INDEX IF NOT EXISTS tokens_by_id ON tokens(tenant, token_id);
CREATE INDEX IF NOT EXISTS tokens_by_incarnation ON tokens(tenant, incarnation, created, token_id);
CREATE TABLE IF NOT EXISTS claim_tokens(
    tenant TEXT NOT NULL,
    app TEXT NOT NULL,
    claim_hash BLOB NOT NULL,
    claim_id TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    binding_kind TEXT NOT NULL,
    binding TEXT,
    used_at INTEGER,
    used_by TEXT,
    PRIMARY KEY(tenant, app, claim_hash)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS claim_tokens_by_id ON claim_tokens(tenant, claim_id);
CREATE INDEX IF NOT EXISTS claim_tokens_by_app ON claim_tokens(tenant, app, created, claim_id);
CREATE TABLE IF NOT EXISTS rejections(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    app TEXT NOT NULL,
    at INTEGER NOT NULL,
    app_version TEXT,
    endpoint_id TEXT,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_by_app ON rejections(tenant, app, id);
"
);

/// Version 2 → 3: token rows gain an ID, a state and the time of their last change. SQLite
/// adds no NOT NULL column without a default, so the table is rebuilt; every existing token
/// becomes `Inactive` under a random UUID-shaped ID. Runs inside the migration's transaction,
/// before [`SCHEMA`] creates the new indexes.
pub(crate) const UPGRADE_TOKENS_TO_V3: &str = "
CREATE TABLE tokens_v3(
    tenant TEXT NOT NULL,
    app TEXT NOT NULL,
    token_hash BLOB NOT NULL,
    endpoint_id TEXT NOT NULL,
    created INTEGER NOT NULL,
    token_id TEXT NOT NULL,
    status TEXT NOT NULL,
    updated INTEGER,
    PRIMARY KEY(tenant, app, token_hash)
) WITHOUT ROWID;
INSERT INTO tokens_v3(tenant, app, token_hash, endpoint_id, created, token_id, status, updated)
    SELECT tenant, app, token_hash, endpoint_id, created,
        lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-' || hex(randomblob(2))
            || '-' || hex(randomblob(2)) || '-' || hex(randomblob(6))),
        'Inactive', NULL
    FROM tokens;
DROP TABLE tokens;
ALTER TABLE tokens_v3 RENAME TO tokens;
";

/// Version 3, 4 or 5 → 6: the token table becomes a rowid table whose rows carry their
/// endpoint's incarnation (see [`SCHEMA`]). Runs inside the migration's transaction, before
/// [`SCHEMA`] creates the new indexes. A token whose endpoint is gone (none should be) gets
/// incarnation 0: it stays unique and findable by hash and ID, and belongs to no endpoint.
pub(crate) const UPGRADE_TOKENS_TO_V6: &str = concat!(
    "
CREATE TABLE tokens_v6",
    token_table_v6!(),
    "
INSERT INTO tokens_v6(tenant, app, token_hash, endpoint_id, incarnation, created, token_id,
        status, updated)
    SELECT t.tenant, t.app, t.token_hash, t.endpoint_id, COALESCE(e.incarnation, 0), t.created,
        t.token_id, t.status, t.updated
    FROM tokens t LEFT JOIN endpoints e ON e.tenant = t.tenant AND e.endpoint_id = t.endpoint_id
    ORDER BY t.created, t.token_id;
DROP TABLE tokens;
ALTER TABLE tokens_v6 RENAME TO tokens;
"
);

const TOKEN_COLUMNS: &str = "token_id, endpoint_id, app, token_hash, status, created, updated";

fn corrupt(i: usize, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.to_string().into())
}

fn hash_at(row: &Row<'_>, i: usize) -> rusqlite::Result<TokenHash> {
    let bytes: Vec<u8> = row.get(i)?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map(TokenHash)
        .map_err(|_| corrupt(i, "a hash is not 32 bytes"))
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<StoredToken> {
    let text = |i: usize| row.get::<_, String>(i);
    Ok(StoredToken {
        id: TokenId::parse(&text(0)?).map_err(|e| corrupt(0, e))?,
        endpoint_id: EndpointId::parse(&text(1)?).map_err(|e| corrupt(1, e))?,
        app: AppName::parse(&text(2)?).map_err(|e| corrupt(2, e))?,
        hash: hash_at(row, 3)?,
        status: TokenStatus::parse(&text(4)?, "status").map_err(|e| corrupt(4, e))?,
        created: Timestamp(row.get(5)?),
        updated: row.get::<_, Option<i64>>(6)?.map(Timestamp),
    })
}

/// Every token of an endpoint (by its incarnation), oldest first (ties by ID).
pub(crate) fn endpoint_tokens(
    conn: &Connection,
    tenant: &str,
    incarnation: i64,
) -> rusqlite::Result<Vec<StoredToken>> {
    conn.prepare_cached(&format!(
        "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant=?1 AND incarnation=?2 \
         ORDER BY created, token_id"
    ))?
    .query_map(params![tenant, incarnation], token_from_row)?
    .collect()
}

pub(crate) fn get_token(
    conn: &Connection,
    tenant: &str,
    endpoint: &str,
    id: &str,
) -> rusqlite::Result<Option<StoredToken>> {
    conn.prepare_cached(&format!(
        "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant=?1 AND token_id=?2 AND endpoint_id=?3"
    ))?
    .query_row(params![tenant, id, endpoint], token_from_row)
    .optional()
}

/// A token row's key in the token hash index.
pub(crate) fn token_key(keys: &KeyIndex, tenant: &str, app: &str, hash: &[u8]) -> u64 {
    keys.key(&[tenant.as_bytes(), app.as_bytes(), hash])
}

/// Every token row's entry for the token hash index (built at open).
pub(crate) fn load_token_keys(conn: &Connection, keys: &KeyIndex) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT id, tenant, app, token_hash FROM tokens")?;
    let mut rows = stmt.query([])?;
    let mut entries = Vec::new();
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let tenant = row.get_ref(1)?.as_str()?;
        let app = row.get_ref(2)?.as_str()?;
        let hash = row.get_ref(3)?.as_blob()?;
        entries.push((token_key(keys, tenant, app, hash), id));
    }
    keys.extend(entries);
    Ok(())
}

/// The row holding a token hash in an application, found through the index (each candidate
/// checked in `conn`'s snapshot: see [`KeyIndex::find`]).
fn token_by_hash<T>(
    conn: &Connection,
    keys: &KeyIndex,
    tenant: &str,
    app: &str,
    hash: &TokenHash,
    columns: &str,
    read: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    keys.find(token_key(keys, tenant, app, &hash.0), |id| {
        conn.prepare_cached(&format!(
            "SELECT {columns} FROM tokens WHERE id=?1 AND tenant=?2 AND app=?3 AND token_hash=?4"
        ))?
        .query_row(params![id, tenant, app, &hash.0[..]], &read)
        .optional()
    })
}

pub(crate) fn find_token(
    conn: &Connection,
    keys: &KeyIndex,
    tenant: &str,
    app: &str,
    hash: &TokenHash,
) -> rusqlite::Result<Option<StoredToken>> {
    token_by_hash(conn, keys, tenant, app, hash, TOKEN_COLUMNS, token_from_row)
}

/// The count and the page in one read transaction, so they agree.
pub(crate) fn list_tokens(
    conn: &Connection,
    endpoint_keys: &KeyIndex,
    tenant: &str,
    endpoint: &str,
    query: &TokenListQuery,
    page: PageRequest,
) -> rusqlite::Result<Page<StoredToken>> {
    let tx = conn.unchecked_transaction()?;
    // The endpoint's current incarnation, read in the same transaction as the tokens.
    let Some(incarnation) =
        crate::embedded::load(&tx, endpoint_keys, tenant, endpoint)?.map(|e| e.incarnation)
    else {
        tx.finish()?;
        return Ok(Page {
            total: 0,
            items: Vec::new(),
            next: None,
        });
    };
    let mut cond = String::from("tenant=?1 AND incarnation=?5 AND endpoint_id=?2");
    if !query.statuses.is_empty() {
        // The states are an enumeration: their names go into the SQL as they are.
        let names: BTreeSet<&str> = query.statuses.iter().map(|s| s.as_str()).collect();
        let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
        cond.push_str(&format!(" AND status IN ({})", list.join(",")));
    }
    let order = if query.ascending { "ASC" } else { "DESC" };
    // ?3 and ?4 are the page's: the count leaves them unused (SQLite allows that), so both
    // statements take the same parameters.
    let paging = (
        i64::from(page.limit),
        page.offset.min(i64::MAX as u64) as i64,
    );
    let total: i64 = tx
        .prepare_cached(&format!("SELECT COUNT(*) FROM tokens WHERE {cond}"))?
        .query_row(
            params![tenant, endpoint, paging.0, paging.1, incarnation],
            |r| r.get(0),
        )?;
    let items = tx
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE {cond} \
             ORDER BY created {order}, token_id {order} LIMIT ?3 OFFSET ?4"
        ))?
        .query_map(
            params![tenant, endpoint, paging.0, paging.1, incarnation],
            token_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.finish()?;
    Ok(Page {
        total: total.max(0) as u64,
        items,
        next: None,
    })
}

/// Why a new token row cannot be stored: its hash is held in the application, or its ID in
/// the tenant, probed before any write (for commands with several new tokens).
pub(crate) fn check_new_token(
    conn: &Connection,
    keys: &KeyIndex,
    tenant: &str,
    token: &StoredToken,
) -> Result<(), StoreError> {
    let (hash_taken, id_taken) = token_taken(conn, keys, tenant, token)?;
    token_conflict(token, hash_taken, id_taken)
}

/// Inserts a new token, refusing it (`409`, nothing written) when its hash is taken in the
/// application or its ID in the tenant: [`insert_token`]'s check and the unique `tokens_by_id`
/// say so.
pub(crate) fn insert_new_token(
    conn: &Connection,
    keys: &mut KeyJournal,
    tenant: &str,
    incarnation: i64,
    token: &StoredToken,
) -> Result<(), StoreError> {
    match insert_token(conn, keys, tenant, incarnation, token) {
        Ok(()) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            // The error code alone does not say which rule refused the token.
            let (hash_taken, id_taken) = token_taken(conn, keys.index(), tenant, token)?;
            token_conflict(token, hash_taken, id_taken)?;
            Err(unavailable_msg(format!(
                "a token insert broke a constraint without a taken hash or ID: {e}"
            )))
        }
        Err(e) => Err(unavailable(e)),
    }
}

/// Whether a token's hash is taken in its application, and its ID in the tenant.
fn token_taken(
    conn: &Connection,
    keys: &KeyIndex,
    tenant: &str,
    token: &StoredToken,
) -> Result<(bool, bool), StoreError> {
    let (holder, id_taken) = token_holders(conn, keys, tenant, token).map_err(unavailable)?;
    Ok((holder.is_some(), id_taken))
}

fn token_conflict(token: &StoredToken, hash_taken: bool, id_taken: bool) -> Result<(), StoreError> {
    if hash_taken {
        return Err(DomainError::Conflict {
            field: "endpointToken",
            message: format!(
                "the endpoint token is already in use in application '{}'",
                token.app
            ),
        }
        .into());
    }
    if id_taken {
        return Err(DomainError::Conflict {
            field: "endpointTokenId",
            message: format!("endpoint token ID '{}' is already in use", token.id),
        }
        .into());
    }
    Ok(())
}

/// Who holds a token hash in an application, and whether a token ID is in use in the tenant
/// (for imports, which report conflicts instead of refusing).
pub(crate) fn token_holders(
    conn: &Connection,
    keys: &KeyIndex,
    tenant: &str,
    token: &StoredToken,
) -> rusqlite::Result<(Option<String>, bool)> {
    let holder = token_by_hash(
        conn,
        keys,
        tenant,
        token.app.as_str(),
        &token.hash,
        "endpoint_id",
        |r| r.get::<_, String>(0),
    )?;
    let id_taken: bool = conn
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM tokens WHERE tenant=?1 AND token_id=?2)")?
        .query_row(params![tenant, token.id.as_str()], |r| r.get(0))?;
    Ok((holder, id_taken))
}

/// Inserts a token of the endpoint whose incarnation is `incarnation`.
///
/// A hash already held in the application fails the insert as a unique index would (a
/// constraint violation, nothing written): the token hash index is in memory.
pub(crate) fn insert_token(
    conn: &Connection,
    keys: &mut KeyJournal,
    tenant: &str,
    incarnation: i64,
    t: &StoredToken,
) -> rusqlite::Result<()> {
    let app = t.app.as_str();
    let held = token_by_hash(conn, keys.index(), tenant, app, &t.hash, "1", |_| Ok(()))?;
    if held.is_some() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE),
            Some("the token hash is already held in the application".into()),
        ));
    }
    conn.prepare_cached(
        "INSERT INTO tokens(tenant, app, token_hash, endpoint_id, incarnation, created, \
         token_id, status, updated) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9)",
    )?
    .execute(params![
        tenant,
        t.app.as_str(),
        &t.hash.0[..],
        t.endpoint_id.as_str(),
        incarnation,
        t.created.0,
        t.id.as_str(),
        t.status.as_str(),
        t.updated.map(|u| u.0)
    ])?;
    let key = token_key(keys.index(), tenant, app, &t.hash.0);
    keys.inserted(key, conn.last_insert_rowid());
    Ok(())
}

/// Applies a plan's token operations to one endpoint's rows, all but the inserts (which
/// `execute` makes first, each checking its own rule).
pub(crate) fn apply_ops(
    conn: &Connection,
    keys: &mut KeyJournal,
    tenant: &str,
    endpoint: &EndpointId,
    incarnation: i64,
    ops: &[TokenOp],
) -> rusqlite::Result<()> {
    for op in ops {
        match op {
            // Made before the other writes (see the doc above).
            TokenOp::Insert(_) => {}
            TokenOp::SetStatus {
                id,
                status,
                updated,
            } => {
                conn.prepare_cached(
                    "UPDATE tokens SET status=?4, updated=?5 \
                     WHERE tenant=?1 AND token_id=?2 AND endpoint_id=?3",
                )?
                .execute(params![
                    tenant,
                    id.as_str(),
                    endpoint.as_str(),
                    status.as_str(),
                    updated.0
                ])?;
            }
            TokenOp::DeleteAll => {
                let mut stmt = conn.prepare_cached(
                    "DELETE FROM tokens WHERE tenant=?1 AND incarnation=?2 AND endpoint_id=?3 \
                     RETURNING id, app, token_hash",
                )?;
                let mut rows = stmt.query(params![tenant, incarnation, endpoint.as_str()])?;
                while let Some(row) = rows.next()? {
                    let id: i64 = row.get(0)?;
                    let app = row.get_ref(1)?.as_str()?;
                    let hash = row.get_ref(2)?.as_blob()?;
                    let key = token_key(keys.index(), tenant, app, hash);
                    keys.deleted(key, id);
                }
            }
        }
    }
    Ok(())
}

const CLAIM_COLUMNS: &str =
    "claim_id, app, claim_hash, created, expires, binding_kind, binding, used_at, used_by";

fn claim_from_row(row: &Row<'_>) -> rusqlite::Result<ClaimToken> {
    let text = |i: usize| row.get::<_, String>(i);
    let binding = match text(5)?.as_str() {
        "any" => ClaimBinding::Any,
        "endpoint" => {
            ClaimBinding::Endpoint(EndpointId::parse(&text(6)?).map_err(|e| corrupt(6, e))?)
        }
        "pattern" => ClaimBinding::Pattern(
            IdPattern::parse(&text(6)?, "binding").map_err(|e| corrupt(6, e))?,
        ),
        other => return Err(corrupt(5, format!("unknown binding kind '{other}'"))),
    };
    let used = match (
        row.get::<_, Option<i64>>(7)?,
        row.get::<_, Option<String>>(8)?,
    ) {
        (Some(at), Some(by)) => Some(ClaimUse {
            at: Timestamp(at),
            endpoint_id: EndpointId::parse(&by).map_err(|e| corrupt(8, e))?,
        }),
        _ => None,
    };
    Ok(ClaimToken {
        id: ClaimId::parse(&text(0)?).map_err(|e| corrupt(0, e))?,
        app: AppName::parse(&text(1)?).map_err(|e| corrupt(1, e))?,
        hash: hash_at(row, 2)?,
        created: Timestamp(row.get(3)?),
        expires: Timestamp(row.get(4)?),
        binding,
        used,
    })
}

pub(crate) fn find_claim(
    conn: &Connection,
    tenant: &str,
    app: &str,
    hash: &TokenHash,
) -> rusqlite::Result<Option<ClaimToken>> {
    conn.prepare_cached(&format!(
        "SELECT {CLAIM_COLUMNS} FROM claim_tokens WHERE tenant=?1 AND app=?2 AND claim_hash=?3"
    ))?
    .query_row(params![tenant, app, &hash.0[..]], claim_from_row)
    .optional()
}

pub(crate) fn get_claim(
    conn: &Connection,
    tenant: &str,
    app: &str,
    id: &str,
) -> rusqlite::Result<Option<ClaimToken>> {
    conn.prepare_cached(&format!(
        "SELECT {CLAIM_COLUMNS} FROM claim_tokens WHERE tenant=?1 AND claim_id=?2 AND app=?3"
    ))?
    .query_row(params![tenant, id, app], claim_from_row)
    .optional()
}

pub(crate) fn list_claims(
    conn: &Connection,
    tenant: &str,
    app: &str,
    page: PageRequest,
) -> rusqlite::Result<Page<ClaimToken>> {
    let tx = conn.unchecked_transaction()?;
    let total: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM claim_tokens WHERE tenant=?1 AND app=?2")?
        .query_row(params![tenant, app], |r| r.get(0))?;
    let items = tx
        .prepare_cached(&format!(
            "SELECT {CLAIM_COLUMNS} FROM claim_tokens WHERE tenant=?1 AND app=?2 \
             ORDER BY created, claim_id LIMIT ?3 OFFSET ?4"
        ))?
        .query_map(
            params![
                tenant,
                app,
                i64::from(page.limit),
                page.offset.min(i64::MAX as u64) as i64
            ],
            claim_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.finish()?;
    Ok(Page {
        total: total.max(0) as u64,
        items,
        next: None,
    })
}

/// All or nothing: every claim is checked (against the table and the others of the call)
/// before the first is written.
pub(crate) fn create_claims(
    conn: &Connection,
    tenant: &str,
    claims: &[ClaimToken],
) -> Result<(), StoreError> {
    let mut hashes = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for c in claims {
        let hash_taken = !hashes.insert((c.app.as_str(), c.hash.0))
            || conn
                .prepare_cached(
                    "SELECT EXISTS(SELECT 1 FROM claim_tokens \
                     WHERE tenant=?1 AND app=?2 AND claim_hash=?3)",
                )
                .and_then(|mut s| {
                    s.query_row(params![tenant, c.app.as_str(), &c.hash.0[..]], |r| {
                        r.get::<_, bool>(0)
                    })
                })
                .map_err(unavailable)?;
        if hash_taken {
            return Err(DomainError::Conflict {
                field: "claimToken",
                message: format!(
                    "a claim token with this value already exists in application '{}'",
                    c.app
                ),
            }
            .into());
        }
        let id_taken = !ids.insert(c.id.as_str())
            || conn
                .prepare_cached(
                    "SELECT EXISTS(SELECT 1 FROM claim_tokens WHERE tenant=?1 AND claim_id=?2)",
                )
                .and_then(|mut s| {
                    s.query_row(params![tenant, c.id.as_str()], |r| r.get::<_, bool>(0))
                })
                .map_err(unavailable)?;
        if id_taken {
            return Err(DomainError::Conflict {
                field: "claimTokenId",
                message: format!("claim token ID '{}' is already in use", c.id),
            }
            .into());
        }
    }
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO claim_tokens(tenant, app, claim_hash, claim_id, created, expires, \
             binding_kind, binding, used_at, used_by) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)",
        )
        .map_err(unavailable)?;
    for c in claims {
        let (kind, binding) = match &c.binding {
            ClaimBinding::Any => ("any", None),
            ClaimBinding::Endpoint(e) => ("endpoint", Some(e.as_str())),
            ClaimBinding::Pattern(p) => ("pattern", Some(p.as_str())),
        };
        insert
            .execute(params![
                tenant,
                c.app.as_str(),
                &c.hash.0[..],
                c.id.as_str(),
                c.created.0,
                c.expires.0,
                kind,
                binding,
                c.used.as_ref().map(|u| u.at.0),
                c.used.as_ref().map(|u| u.endpoint_id.as_str())
            ])
            .map_err(unavailable)?;
    }
    Ok(())
}

pub(crate) fn delete_claim(
    conn: &Connection,
    tenant: &str,
    app: &str,
    id: &str,
) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM claim_tokens WHERE tenant=?1 AND claim_id=?2 AND app=?3")
        .and_then(|mut s| s.execute(params![tenant, id, app]))
        .map(|n| n > 0)
        .map_err(unavailable)
}

/// A purged tenant's claim tokens, rejections and settings under `prefix`.
pub(crate) fn purge_tenant(
    conn: &Connection,
    tenant: &str,
    prefix: &str,
) -> Result<(), StoreError> {
    let run = || -> rusqlite::Result<()> {
        conn.prepare_cached("DELETE FROM claim_tokens WHERE tenant=?1")?
            .execute(params![tenant])?;
        conn.prepare_cached("DELETE FROM rejections WHERE tenant=?1")?
            .execute(params![tenant])?;
        // A prefix match without LIKE's wildcards (`_` and `%` may be in the prefix).
        conn.prepare_cached("DELETE FROM settings WHERE substr(key, 1, length(?1)) = ?1")?
            .execute(params![prefix])?;
        Ok(())
    };
    run().map_err(unavailable)
}

pub(crate) fn mark_claim_used(
    conn: &Connection,
    tenant: &str,
    app: &str,
    hash: &TokenHash,
    used: &ClaimUse,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE claim_tokens SET used_at=?4, used_by=?5 \
         WHERE tenant=?1 AND app=?2 AND claim_hash=?3",
    )?
    .execute(params![
        tenant,
        app,
        &hash.0[..],
        used.at.0,
        used.endpoint_id.as_str()
    ])?;
    Ok(())
}

/// Records a rejection and forgets the application's rejections beyond the latest `kept`
/// (a walk of at most `kept` index entries, no table scan).
pub(crate) fn record_rejection(
    conn: &Connection,
    tenant: &str,
    r: &Rejection,
    kept: u64,
) -> Result<(), StoreError> {
    let app = r.app.as_str();
    conn.prepare_cached(
        "INSERT INTO rejections(tenant, app, at, app_version, endpoint_id, source, reason, \
         message) VALUES(?1,?2,?3,?4,?5,?6,?7,?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            tenant,
            app,
            r.at.0,
            r.app_version,
            r.endpoint_id,
            r.source,
            r.reason.as_str(),
            r.message
        ])
    })
    .map_err(unavailable)?;
    conn.prepare_cached(
        "DELETE FROM rejections WHERE tenant=?1 AND app=?2 AND id <= (SELECT id FROM rejections \
         WHERE tenant=?1 AND app=?2 ORDER BY id DESC LIMIT 1 OFFSET ?3)",
    )
    .and_then(|mut s| s.execute(params![tenant, app, kept.min(i64::MAX as u64) as i64]))
    .map_err(unavailable)?;
    Ok(())
}

fn rejection_from_row(row: &Row<'_>) -> rusqlite::Result<Rejection> {
    let reason: String = row.get(5)?;
    Ok(Rejection {
        at: Timestamp(row.get(0)?),
        app: AppName::parse(&row.get::<_, String>(1)?).map_err(|e| corrupt(1, e))?,
        app_version: row.get(2)?,
        endpoint_id: row.get(3)?,
        source: row.get(4)?,
        reason: RefusalReason::parse(&reason)
            .ok_or_else(|| corrupt(5, format!("unknown refusal reason '{reason}'")))?,
        message: row.get(6)?,
    })
}

/// Newest first.
pub(crate) fn list_rejections(
    conn: &Connection,
    tenant: &str,
    app: &str,
    page: PageRequest,
) -> rusqlite::Result<Page<Rejection>> {
    let tx = conn.unchecked_transaction()?;
    let total: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM rejections WHERE tenant=?1 AND app=?2")?
        .query_row(params![tenant, app], |r| r.get(0))?;
    let items = tx
        .prepare_cached(
            "SELECT at, app, app_version, endpoint_id, source, reason, message FROM rejections \
             WHERE tenant=?1 AND app=?2 ORDER BY id DESC LIMIT ?3 OFFSET ?4",
        )?
        .query_map(
            params![
                tenant,
                app,
                i64::from(page.limit),
                page.offset.min(i64::MAX as u64) as i64
            ],
            rejection_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.finish()?;
    Ok(Page {
        total: total.max(0) as u64,
        items,
        next: None,
    })
}
