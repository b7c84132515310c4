//! Credentials outside the write path: token reads (the 16/ECAP validation's lookup is one
//! prepared primary-key probe), claim tokens (created, read, deleted on the pool: a claim's
//! *use* is part of a self-registration, in the writer's group), and the rejection log.
//!
//! Token rows change only through endpoint commands (`write`); claim rows are created and
//! deleted here, each call one transaction. Listings count and page in one statement (one
//! snapshot), as `listing` does: `SELECT count, page.* FROM (count) LEFT JOIN LATERAL (page)`,
//! so an empty page is one row of NULLs beside the total.

use crate::error::{corrupt, db, pool};
use crate::Inner;
use epr_core::credentials::{
    ClaimBinding, ClaimToken, ClaimUse, IdPattern, RefusalReason, Rejection, StoredToken,
    TokenListQuery, TokenStatus, REJECTIONS_KEPT,
};
use epr_core::ids::{AppName, ClaimId, EndpointId, TenantId, TokenHash, TokenId};
use epr_core::ports::StoreError;
use epr_core::query::{Page, PageRequest};
use epr_core::{DomainError, Timestamp};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

/// The columns [`token_from_row`] reads, in its order, from `offset`.
pub(crate) const TOKEN_COLUMNS: &str =
    "token_id, endpoint_id, app, token_hash, status, created, updated";

/// A token from a row selected with [`TOKEN_COLUMNS`] starting at column `at`; `None` when
/// that column is NULL (the empty page of a listing).
pub(crate) fn token_from_row(row: &Row, at: usize) -> Result<Option<StoredToken>, StoreError> {
    let bad = |e: &dyn std::fmt::Display| corrupt("token", e);
    let Some(id) = row.try_get::<_, Option<&str>>(at).map_err(|e| bad(&e))? else {
        return Ok(None);
    };
    let hash: &[u8] = row.try_get(at + 3).map_err(|e| bad(&e))?;
    let status: &str = row.try_get(at + 4).map_err(|e| bad(&e))?;
    Ok(Some(StoredToken {
        id: TokenId::parse(id).map_err(|e| bad(&e))?,
        endpoint_id: EndpointId::parse(row.try_get(at + 1).map_err(|e| bad(&e))?)
            .map_err(|e| bad(&e))?,
        app: AppName::parse(row.try_get(at + 2).map_err(|e| bad(&e))?).map_err(|e| bad(&e))?,
        hash: hash_from(hash)?,
        status: TokenStatus::parse(status, "status").map_err(|e| bad(&e))?,
        created: Timestamp(row.try_get(at + 5).map_err(|e| bad(&e))?),
        updated: row
            .try_get::<_, Option<i64>>(at + 6)
            .map_err(|e| bad(&e))?
            .map(Timestamp),
    }))
}

pub(crate) fn hash_from(bytes: &[u8]) -> Result<TokenHash, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(TokenHash)
        .map_err(|_| corrupt("token hash", "not 32 bytes"))
}

/// The columns [`claim_from_row`] reads, in its order, from `offset`.
pub(crate) const CLAIM_COLUMNS: &str =
    "claim_id, app, claim_hash, created, expires, binding_kind, binding, used_at, used_by";

/// A claim token from a row selected with [`CLAIM_COLUMNS`] starting at column `at`; `None`
/// when that column is NULL.
pub(crate) fn claim_from_row(row: &Row, at: usize) -> Result<Option<ClaimToken>, StoreError> {
    let bad = |e: &dyn std::fmt::Display| corrupt("claim token", e);
    let Some(id) = row.try_get::<_, Option<&str>>(at).map_err(|e| bad(&e))? else {
        return Ok(None);
    };
    let kind: &str = row.try_get(at + 5).map_err(|e| bad(&e))?;
    let binding: Option<&str> = row.try_get(at + 6).map_err(|e| bad(&e))?;
    let binding = match (kind, binding) {
        ("any", None) => ClaimBinding::Any,
        ("endpoint", Some(b)) => ClaimBinding::Endpoint(EndpointId::parse(b).map_err(|e| bad(&e))?),
        ("pattern", Some(b)) => {
            ClaimBinding::Pattern(IdPattern::parse(b, "binding").map_err(|e| bad(&e))?)
        }
        (k, _) => return Err(bad(&format!("binding kind '{k}'"))),
    };
    let used_at: Option<i64> = row.try_get(at + 7).map_err(|e| bad(&e))?;
    let used_by: Option<&str> = row.try_get(at + 8).map_err(|e| bad(&e))?;
    let used = match (used_at, used_by) {
        (Some(at), Some(by)) => Some(ClaimUse {
            at: Timestamp(at),
            endpoint_id: EndpointId::parse(by).map_err(|e| bad(&e))?,
        }),
        (None, None) => None,
        _ => return Err(bad(&"half a use (used_at and used_by disagree)")),
    };
    Ok(Some(ClaimToken {
        id: ClaimId::parse(id).map_err(|e| bad(&e))?,
        app: AppName::parse(row.try_get(at + 1).map_err(|e| bad(&e))?).map_err(|e| bad(&e))?,
        hash: hash_from(row.try_get(at + 2).map_err(|e| bad(&e))?)?,
        created: Timestamp(row.try_get(at + 3).map_err(|e| bad(&e))?),
        expires: Timestamp(row.try_get(at + 4).map_err(|e| bad(&e))?),
        binding,
        used,
    }))
}

/// A claim binding as stored: `(binding_kind, binding)`.
pub(crate) fn binding_columns(b: &ClaimBinding) -> (&'static str, Option<&str>) {
    match b {
        ClaimBinding::Any => ("any", None),
        ClaimBinding::Endpoint(id) => ("endpoint", Some(id.as_str())),
        ClaimBinding::Pattern(p) => ("pattern", Some(p.as_str())),
    }
}

fn limit_offset(page: PageRequest) -> (i64, i64) {
    (
        i64::from(page.limit),
        page.offset.min(i64::MAX as u64) as i64,
    )
}

/// A page from rows of `SELECT total, columns…` (see the module doc).
fn page_of<T>(
    rows: &[Row],
    item: impl Fn(&Row) -> Result<Option<T>, StoreError>,
) -> Result<Page<T>, StoreError> {
    let total: i64 = match rows.first() {
        Some(r) => r.try_get(0).map_err(db)?,
        None => 0,
    };
    let mut items = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(t) = item(row)? {
            items.push(t);
        }
    }
    Ok(Page {
        total: total.max(0) as u64,
        items,
        next: None,
    })
}

// ---------------------------------------------------------------------------------------
// Tokens

pub(crate) async fn get_token(
    inner: &Inner,
    tenant: &TenantId,
    endpoint: &EndpointId,
    id: &TokenId,
) -> Result<Option<StoredToken>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens \
             WHERE tenant=$1 AND token_id=$2 AND endpoint_id=$3"
        ))
        .await
        .map_err(db)?;
    let row = client
        .query_opt(&st, &[&tenant.as_str(), &id.as_str(), &endpoint.as_str()])
        .await
        .map_err(db)?;
    Ok(match row {
        Some(r) => token_from_row(&r, 0)?,
        None => None,
    })
}

/// The 16/ECAP hot path: a primary-key probe, prepared once per pooled connection.
pub(crate) async fn find_token(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    hash: &TokenHash,
) -> Result<Option<StoredToken>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE tenant=$1 AND app=$2 AND token_hash=$3"
        ))
        .await
        .map_err(db)?;
    let row = client
        .query_opt(&st, &[&tenant.as_str(), &app.as_str(), &&hash.0[..]])
        .await
        .map_err(db)?;
    Ok(match row {
        Some(r) => token_from_row(&r, 0)?,
        None => None,
    })
}

pub(crate) async fn list_tokens(
    inner: &Inner,
    tenant: &TenantId,
    endpoint: &EndpointId,
    query: &TokenListQuery,
    page: PageRequest,
) -> Result<Page<StoredToken>, StoreError> {
    // Creation order, ties by ID (byte order); newest first reverses both, so it is a
    // backward scan of `tokens_by_endpoint_created`.
    let dir = if query.ascending { "ASC" } else { "DESC" };
    let cond = "tenant=$1 AND endpoint_id=$2 \
                AND (cardinality($3::text[]) = 0 OR status = ANY($3::text[]))";
    let sql = format!(
        "SELECT c.n, p.* FROM (SELECT count(*) AS n FROM tokens WHERE {cond}) c \
         LEFT JOIN LATERAL (SELECT {TOKEN_COLUMNS} FROM tokens WHERE {cond} \
             ORDER BY created {dir}, token_id COLLATE \"C\" {dir} LIMIT $4 OFFSET $5) p ON true"
    );
    let statuses: Vec<&str> = query.statuses.iter().map(|s| s.as_str()).collect();
    let (limit, offset) = limit_offset(page);
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client.prepare_cached(&sql).await.map_err(db)?;
    let rows = client
        .query(
            &st,
            &[
                &tenant.as_str(),
                &endpoint.as_str(),
                &statuses,
                &limit,
                &offset,
            ],
        )
        .await
        .map_err(db)?;
    page_of(&rows, |r| token_from_row(r, 1))
}

// ---------------------------------------------------------------------------------------
// Claim tokens

/// All or nothing, in one statement: a unique violation names the constraint, which tells
/// a taken hash (the primary key, per application) from a taken ID (per tenant).
pub(crate) async fn create_claims(
    inner: &Inner,
    tenant: &TenantId,
    claims: Vec<ClaimToken>,
) -> Result<(), StoreError> {
    if claims.is_empty() {
        return Ok(());
    }
    let n = claims.len();
    let mut t = Vec::with_capacity(n);
    let mut app = Vec::with_capacity(n);
    let mut hash: Vec<&[u8]> = Vec::with_capacity(n);
    let mut id = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut expires = Vec::with_capacity(n);
    let mut kind = Vec::with_capacity(n);
    let mut binding = Vec::with_capacity(n);
    let mut used_at = Vec::with_capacity(n);
    let mut used_by = Vec::with_capacity(n);
    for c in &claims {
        let (k, b) = binding_columns(&c.binding);
        t.push(tenant.as_str());
        app.push(c.app.as_str());
        hash.push(&c.hash.0[..]);
        id.push(c.id.as_str());
        created.push(c.created.0);
        expires.push(c.expires.0);
        kind.push(k);
        binding.push(b);
        used_at.push(c.used.as_ref().map(|u| u.at.0));
        used_by.push(c.used.as_ref().map(|u| u.endpoint_id.as_str()));
    }
    let client = inner.pool.get().await.map_err(pool)?;
    let result = client
        .execute(
            "INSERT INTO claim_tokens(tenant, app, claim_hash, claim_id, created, expires, \
                 binding_kind, binding, used_at, used_by) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], \
                 $5::bigint[], $6::bigint[], $7::text[], $8::text[], $9::bigint[], $10::text[])",
            &[
                &t, &app, &hash, &id, &created, &expires, &kind, &binding, &used_at, &used_by,
            ],
        )
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            let constraint = e
                .as_db_error()
                .and_then(|d| d.constraint())
                .unwrap_or_default();
            Err(match constraint {
                "claim_tokens_pkey" => DomainError::Conflict {
                    field: "claimToken",
                    message: "a claim token with this value already exists in the application"
                        .into(),
                },
                "claim_tokens_by_id" => DomainError::Conflict {
                    field: "claimTokenId",
                    message: "a claim token with this ID already exists".into(),
                },
                _ => return Err(db(e)),
            }
            .into())
        }
        Err(e) => Err(db(e)),
    }
}

pub(crate) async fn get_claim(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    id: &ClaimId,
) -> Result<Option<ClaimToken>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client
        .prepare_cached(&format!(
            "SELECT {CLAIM_COLUMNS} FROM claim_tokens WHERE tenant=$1 AND claim_id=$2 AND app=$3"
        ))
        .await
        .map_err(db)?;
    let row = client
        .query_opt(&st, &[&tenant.as_str(), &id.as_str(), &app.as_str()])
        .await
        .map_err(db)?;
    Ok(match row {
        Some(r) => claim_from_row(&r, 0)?,
        None => None,
    })
}

pub(crate) async fn find_claim(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    hash: &TokenHash,
) -> Result<Option<ClaimToken>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client
        .prepare_cached(&format!(
            "SELECT {CLAIM_COLUMNS} FROM claim_tokens \
             WHERE tenant=$1 AND app=$2 AND claim_hash=$3"
        ))
        .await
        .map_err(db)?;
    let row = client
        .query_opt(&st, &[&tenant.as_str(), &app.as_str(), &&hash.0[..]])
        .await
        .map_err(db)?;
    Ok(match row {
        Some(r) => claim_from_row(&r, 0)?,
        None => None,
    })
}

pub(crate) async fn list_claims(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    page: PageRequest,
) -> Result<Page<ClaimToken>, StoreError> {
    let cond = "tenant=$1 AND app=$2";
    let sql = format!(
        "SELECT c.n, p.* FROM (SELECT count(*) AS n FROM claim_tokens WHERE {cond}) c \
         LEFT JOIN LATERAL (SELECT {CLAIM_COLUMNS} FROM claim_tokens WHERE {cond} \
             ORDER BY created, claim_id COLLATE \"C\" LIMIT $3 OFFSET $4) p ON true"
    );
    let (limit, offset) = limit_offset(page);
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client.prepare_cached(&sql).await.map_err(db)?;
    let rows = client
        .query(&st, &[&tenant.as_str(), &app.as_str(), &limit, &offset])
        .await
        .map_err(db)?;
    page_of(&rows, |r| claim_from_row(r, 1))
}

pub(crate) async fn delete_claim(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    id: &ClaimId,
) -> Result<bool, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    // Waits for a self-registration holding the row (it may be using it up right now).
    let n = client
        .execute(
            "DELETE FROM claim_tokens WHERE tenant=$1 AND claim_id=$2 AND app=$3",
            &[&tenant.as_str(), &id.as_str(), &app.as_str()],
        )
        .await
        .map_err(db)?;
    Ok(n > 0)
}

/// A purged tenant's claim tokens, rejections and settings under `prefix`, in one
/// transaction.
pub(crate) async fn purge_tenant(
    inner: &Inner,
    tenant: &TenantId,
    prefix: &str,
) -> Result<(), StoreError> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(db)?;
    tx.execute(
        "DELETE FROM claim_tokens WHERE tenant=$1",
        &[&tenant.as_str()],
    )
    .await
    .map_err(db)?;
    tx.execute(
        "DELETE FROM rejections WHERE tenant=$1",
        &[&tenant.as_str()],
    )
    .await
    .map_err(db)?;
    // `starts_with`, not LIKE: `_` and `%` may be in the prefix.
    tx.execute(
        "DELETE FROM settings WHERE starts_with(key, $1)",
        &[&prefix],
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

// ---------------------------------------------------------------------------------------
// Rejections

/// The class of the per-application rejection locks (`pg_advisory_xact_lock(int, int)`:
/// two-key locks never conflict with the one-key application locks of writes and filters).
const REJECTION_LOCK_CLASS: i32 = 0x4550_524a; // "EPRJ"

/// Inserts one rejection and deletes the application's rejections older than the latest
/// [`REJECTIONS_KEPT`], in one transaction that holds the application's rejection lock, so
/// concurrent inserts trim in turn and exactly that many remain (a backward range scan of
/// at most that many index entries; rejections are rate-limited, the lock is brief).
pub(crate) async fn record_rejection(
    inner: &Inner,
    tenant: &TenantId,
    r: Rejection,
) -> Result<(), StoreError> {
    let mut client = inner.pool.get().await.map_err(pool)?;
    let tx = client.transaction().await.map_err(db)?;
    let (lock, insert, prune) = futures_util::future::try_join3(
        tx.prepare_cached("SELECT pg_advisory_xact_lock($1, $2)"),
        tx.prepare_cached(
            "INSERT INTO rejections(tenant, app, at, app_version, endpoint_id, source, reason, \
                 message) VALUES($1, $2, $3, $4, $5, $6, $7, $8)",
        ),
        tx.prepare_cached(
            "DELETE FROM rejections WHERE tenant=$1 AND app=$2 AND id < \
                 (SELECT id FROM rejections WHERE tenant=$1 AND app=$2 \
                  ORDER BY id DESC OFFSET $3 LIMIT 1)",
        ),
    )
    .await
    .map_err(db)?;
    // A collision of two applications' keys only makes them wait for each other.
    let key = crate::app_lock_key(tenant, &r.app) as i32;
    let kept = (REJECTIONS_KEPT - 1).min(i64::MAX as u64) as i64;
    // Pipelined, run in order: the insert and the trim after the lock is held, each with a
    // snapshot that sees every earlier holder's commit.
    futures_util::future::try_join3(
        tx.execute(&lock, &[&REJECTION_LOCK_CLASS, &key]),
        tx.execute(
            &insert,
            &[
                &tenant.as_str(),
                &r.app.as_str(),
                &r.at.0,
                &r.app_version,
                &r.endpoint_id,
                &r.source,
                &r.reason.as_str(),
                &r.message,
            ],
        ),
        tx.execute(&prune, &[&tenant.as_str(), &r.app.as_str(), &kept]),
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

pub(crate) async fn list_rejections(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
    page: PageRequest,
) -> Result<Page<Rejection>, StoreError> {
    let cond = "tenant=$1 AND app=$2";
    let sql = format!(
        "SELECT c.n, p.* FROM (SELECT count(*) AS n FROM rejections WHERE {cond}) c \
         LEFT JOIN LATERAL (SELECT id, app, at, app_version, endpoint_id, source, reason, \
             message FROM rejections WHERE {cond} ORDER BY id DESC LIMIT $3 OFFSET $4) p ON true"
    );
    let (limit, offset) = limit_offset(page);
    let client = inner.pool.get().await.map_err(pool)?;
    let st = client.prepare_cached(&sql).await.map_err(db)?;
    let rows = client
        .query(&st, &[&tenant.as_str(), &app.as_str(), &limit, &offset])
        .await
        .map_err(db)?;
    page_of(&rows, |row| {
        let bad = |e: &dyn std::fmt::Display| corrupt("rejection", e);
        if row
            .try_get::<_, Option<i64>>(1)
            .map_err(|e| bad(&e))?
            .is_none()
        {
            return Ok(None);
        }
        let reason: &str = row.try_get(7).map_err(|e| bad(&e))?;
        Ok(Some(Rejection {
            app: AppName::parse(row.try_get(2).map_err(|e| bad(&e))?).map_err(|e| bad(&e))?,
            at: Timestamp(row.try_get(3).map_err(|e| bad(&e))?),
            app_version: row.try_get(4).map_err(|e| bad(&e))?,
            endpoint_id: row.try_get(5).map_err(|e| bad(&e))?,
            source: row.try_get(6).map_err(|e| bad(&e))?,
            reason: RefusalReason::parse(reason)
                .ok_or_else(|| bad(&format!("reason '{reason}'")))?,
            message: row.try_get(8).map_err(|e| bad(&e))?,
        }))
    })
}
