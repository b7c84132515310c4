//! Export and import in the embedded store (see `Store::export_endpoints` and
//! `Store::import`): paged reads with token hashes, and the writer's import of records that
//! keep their identity, timestamps and versions.

use crate::embedded::{endpoint_from_row, load, unavailable, ENDPOINT_COLUMNS};
use crate::sqlite_filters::{filter_from_row, FilterCache, FILTER_COLUMNS};
use epr_core::command::{Effect, WriteCtx};
use epr_core::endpoint_filter::EndpointFilter;
use epr_core::ids::{TenantId, TokenHash};
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, StoreError};
use epr_core::Timestamp;
use rusqlite::{params, Connection};

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
    // The rowid is the incarnation: this walks the table in registration order.
    let mut stmt = conn.prepare_cached(&format!(
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
    rows.collect()
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
    changes: &mut Vec<crate::meta_index::IndexChange>,
    records: Vec<ImportRecord>,
    next_incarnation: &mut i64,
) -> Result<Vec<ImportOutcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(records.len());
    for record in records {
        let outcome = match record {
            ImportRecord::Endpoint(e) => {
                import_endpoint(conn, filters, changes, e, next_incarnation)?
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
    changes: &mut Vec<crate::meta_index::IndexChange>,
    record: EndpointExport,
    next_incarnation: &mut i64,
) -> Result<ImportOutcome, StoreError> {
    let EndpointExport {
        tenant,
        mut endpoint,
        token_hash,
        tokens: _,
    } = record;
    let t = tenant.as_str();
    if load(conn, t, endpoint.id.as_str())
        .map_err(unavailable)?
        .is_some()
    {
        return Ok(ImportOutcome::Exists);
    }
    let holder: Option<String> = conn
        .prepare_cached(
            "SELECT endpoint_id FROM tokens WHERE tenant=?1 AND app=?2 AND token_hash=?3",
        )
        .and_then(|mut s| {
            s.query_row(params![t, endpoint.app.as_str(), &token_hash.0[..]], |r| {
                r.get(0)
            })
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
        })
        .map_err(unavailable)?;
    if let Some(other) = holder {
        return Ok(ImportOutcome::Conflict(format!(
            "the endpoint token is already in use by endpoint '{other}' in application '{}'",
            endpoint.app
        )));
    }
    // A fresh incarnation: this store's own entity tags and registration order.
    endpoint.incarnation = *next_incarnation;
    *next_incarnation += 1;
    crate::embedded::insert_endpoint_row(conn, t, &endpoint, &token_hash).map_err(unavailable)?;
    conn.prepare_cached(
        "INSERT INTO tokens(tenant, app, token_hash, endpoint_id, created) VALUES(?1,?2,?3,?4,?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            t,
            endpoint.app.as_str(),
            &token_hash.0[..],
            endpoint.id.as_str(),
            endpoint.created.0
        ])
    })
    .map_err(unavailable)?;
    // Membership as for a registration; its events are dropped (an import emits none).
    let ctx = WriteCtx {
        tenant,
        now: Timestamp(endpoint.created.0),
        correlation_id: String::new(),
        limits: Default::default(),
    };
    let mut discarded = Vec::new();
    let effect = Effect::Insert(endpoint);
    filters.match_endpoint(conn, &effect, None, None, &ctx, &mut discarded)?;
    changes.push(crate::meta_index::IndexChange {
        tenant: ctx.tenant,
        old: None,
        new: Some(effect.endpoint().clone()),
    });
    Ok(ImportOutcome::Imported)
}
