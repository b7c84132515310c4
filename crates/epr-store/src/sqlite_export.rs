//! Export and import in the embedded store (see `Store::export_endpoints` and
//! `Store::import`): paged reads with token hashes and token rows, and the writer's import of
//! records that keep their identity, timestamps, versions and tokens.

use crate::codec::initial_token_id;
use crate::embedded::{endpoint_from_row, load, unavailable, ENDPOINT_COLUMNS};
use crate::key_index::{KeyIndex, WriterKeys};
use crate::sqlite_credentials::{endpoint_tokens, insert_token, token_holders};
use crate::sqlite_filters::{filter_from_row, FilterCache, FILTER_COLUMNS};
use epr_core::command::{Effect, WriteCtx};
use epr_core::credentials::{StoredToken, TokenStatus};
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::EndpointFilter;
use epr_core::ids::{TenantId, TokenHash};
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, StoreError};
use epr_core::Timestamp;
use rusqlite::{params, Connection};
use std::collections::BTreeSet;

pub(crate) fn tenants(conn: &Connection) -> rusqlite::Result<Vec<TenantId>> {
    let mut stmt = conn.prepare(
        "SELECT DISTINCT tenant FROM endpoints UNION SELECT DISTINCT tenant FROM filters \
         ORDER BY 1",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|t| {
        let t = t?;
        TenantId::parse(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                e.to_string().into(),
            )
        })
    })
    .collect()
}

pub(crate) fn endpoints(
    conn: &Connection,
    tenant: &TenantId,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<EndpointExport>> {
    // One read transaction: the token rows are those of the same snapshot as the endpoints.
    let tx = conn.unchecked_transaction()?;
    // The rowid is the incarnation: this walks the table in registration order.
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {ENDPOINT_COLUMNS}, token_hash FROM endpoints \
         WHERE incarnation>?2 AND tenant=?1 ORDER BY incarnation LIMIT ?3"
    ))?;
    let rows = stmt.query_map(
        params![tenant.as_str(), after, limit.min(i64::MAX as usize) as i64],
        |row| {
            let endpoint = endpoint_from_row(row)?;
            let hash: Vec<u8> = row.get(10)?;
            let token_hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| {
                rusqlite::Error::FromSqlConversionFailure(
                    10,
                    rusqlite::types::Type::Blob,
                    "a token hash is not 32 bytes".into(),
                )
            })?;
            Ok(EndpointExport {
                tenant: tenant.clone(),
                endpoint,
                token_hash: TokenHash(token_hash),
                tokens: vec![],
            })
        },
    )?;
    let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    drop(stmt);
    for e in &mut out {
        e.tokens = endpoint_tokens(&tx, tenant.as_str(), e.endpoint.incarnation)?;
    }
    tx.finish()?;
    Ok(out)
}

pub(crate) fn filters(
    conn: &Connection,
    tenant: &TenantId,
) -> rusqlite::Result<Vec<EndpointFilter>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {FILTER_COLUMNS} FROM filters WHERE tenant=?1 ORDER BY app, created, filter_id"
    ))?;
    let rows = stmt.query_map([tenant.as_str()], filter_from_row)?;
    rows.collect()
}

/// Runs inside the writer's group transaction. Every record checks its rules before its first
/// write, so a refused record leaves nothing (as commands do).
pub(crate) fn import(
    conn: &Connection,
    filters: &mut FilterCache,
    keys: &mut WriterKeys,
    changes: &mut Vec<crate::meta_index::IndexChange>,
    records: Vec<ImportRecord>,
    next_incarnation: &mut i64,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(records.len());
    for record in records {
        let outcome = match record {
            ImportRecord::Endpoint(e) => {
                import_endpoint(conn, filters, keys, changes, e, next_incarnation)?
            }
            ImportRecord::Filter { tenant, filter } => {
                filters.import(conn, &tenant, &filter, *next_incarnation - 1)?
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn import_endpoint(
    conn: &Connection,
    filters: &mut FilterCache,
    keys: &mut WriterKeys,
    changes: &mut Vec<crate::meta_index::IndexChange>,
    record: EndpointExport,
    next_incarnation: &mut i64,
) -> Result<ImportOutcome, StoreError> {
    let EndpointExport {
        tenant,
        mut endpoint,
        token_hash,
        tokens,
    } = record;
    let t = tenant.as_str();
    if load(conn, keys.endpoints.index(), t, endpoint.id.as_str())
        .map_err(unavailable)?
        .is_some()
    {
        return Ok(ImportOutcome::Exists);
    }
    let tokens = restored_tokens(&endpoint, token_hash, tokens);
    if let Some(conflict) = token_conflict(conn, keys.tokens.index(), t, &endpoint, &tokens)? {
        return Ok(ImportOutcome::Conflict(conflict));
    }
    // A fresh incarnation: this store's own entity tags and registration order.
    endpoint.incarnation = *next_incarnation;
    *next_incarnation += 1;
    crate::embedded::insert_endpoint_row(conn, &mut keys.endpoints, t, &endpoint, &token_hash)
        .map_err(unavailable)?;
    for token in &tokens {
        insert_token(conn, &mut keys.tokens, t, endpoint.incarnation, token)
            .map_err(unavailable)?;
    }
    // Membership as for a registration; its events are dropped (an import emits none).
    let ctx = WriteCtx {
        tenant,
        now: Timestamp(endpoint.created.0),
        correlation_id: String::new(),
        limits: Default::default(),
    };
    let effect = Effect::Insert(endpoint);
    filters.match_endpoint(&effect, None, None, &ctx, None, None)?;
    changes.push(crate::meta_index::IndexChange {
        tenant: ctx.tenant,
        old: None,
        new: Some(effect.endpoint().clone()),
    });
    Ok(ImportOutcome::Imported)
}

/// The token rows an imported endpoint gets: those of the record (as the endpoint's), or, for
/// a record without any (an export made before tokens had states), one `Inactive` token from
/// its hash under an ID derived from the hash, so a re-import finds the same row.
pub(crate) fn restored_tokens(
    endpoint: &Endpoint,
    token_hash: TokenHash,
    tokens: Vec<StoredToken>,
) -> Vec<StoredToken> {
    if tokens.is_empty() {
        return vec![StoredToken {
            id: initial_token_id(&token_hash),
            endpoint_id: endpoint.id.clone(),
            app: endpoint.app.clone(),
            hash: token_hash,
            status: TokenStatus::Inactive,
            created: endpoint.created,
            updated: None,
        }];
    }
    tokens
        .into_iter()
        .map(|t| StoredToken {
            endpoint_id: endpoint.id.clone(),
            app: endpoint.app.clone(),
            ..t
        })
        .collect()
}

/// Why these token rows cannot be stored for a new endpoint, if they cannot: a hash or ID
/// listed twice, a hash held by another endpoint of the application, an ID in use in the
/// tenant.
fn token_conflict(
    conn: &Connection,
    keys: &KeyIndex,
    tenant: &str,
    endpoint: &Endpoint,
    tokens: &[StoredToken],
) -> Result<Option<String>, StoreError> {
    let mut hashes = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for token in tokens {
        if !hashes.insert(token.hash.0) || !ids.insert(token.id.as_str()) {
            return Ok(Some(format!(
                "the record lists endpoint token '{}' (or its hash) twice",
                token.id
            )));
        }
        let (holder, id_taken) = token_holders(conn, keys, tenant, token).map_err(unavailable)?;
        if let Some(other) = holder {
            return Ok(Some(format!(
                "the endpoint token is already in use by endpoint '{other}' in application '{}'",
                endpoint.app
            )));
        }
        if id_taken {
            return Ok(Some(format!(
                "endpoint token ID '{}' is already in use",
                token.id
            )));
        }
    }
    Ok(None)
}
