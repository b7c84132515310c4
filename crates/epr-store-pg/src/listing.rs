//! Listing endpoints (slice C): `EndpointQuery` as SQL over the endpoints table (jsonb
//! metadata), exact totals, offset and keyset (cursor) paging, metadata keys per version.
//!
//! **Semantics.** A listing agrees with [`EndpointQuery::matches`] on the endpoints as read
//! back (serde_json `Value` equality: `3`, `3.0` and `"3"` are three values). PostgreSQL's
//! jsonb `=` and `@>` compare numbers numerically, so they are not used to decide a match:
//! a value is compared by its jsonb *text*, which keeps a number's written scale (`3` vs
//! `3.0`), and the candidate is written so that its text equals the stored text exactly when
//! the values are equal ([`render`]). Values are always bound parameters.
//!
//! **Plans.** With at least one `key=value` condition (and no endpoint IDs), the matches come
//! from `endpoint_values` (one row per endpoint and key, maintained by triggers, schema.rs):
//! the total is an index-only count of that value's entries and the page's incarnations an
//! index-only range scan from the cursor; only the page's rows are read from `endpoints`.
//! A `key!=value` is an anti-join on the same index; `key` and `!key` are checked on the
//! endpoint row (the index is ordered by value first, so it cannot probe a key). Without such
//! a condition, the endpoints table's own indexes (by application, version, ID) narrow the
//! rows and every condition is checked on the row. Count and page are one statement (one
//! snapshot, one round trip); statements are prepared and cached per connection, by shape.

use crate::error::{db, pool};
use crate::rows::{endpoint_from_row, ENDPOINT_COLUMNS};
use crate::Inner;
use epr_core::endpoint::Endpoint;
use epr_core::ids::{AppName, TenantId};
use epr_core::ports::StoreError;
use epr_core::query::{EndpointQuery, MetadataCondition, Page, PageRequest};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use tokio_postgres::types::{ToSql, Type};

/// Listings with at most this many metadata conditions keep their statement prepared.
const CACHED_CONDITIONS: usize = 4;

pub(crate) async fn list(
    inner: &Inner,
    tenant: &TenantId,
    query: &EndpointQuery,
    page: PageRequest,
) -> Result<Page<Endpoint>, StoreError> {
    let plan = plan(tenant, query, page);
    let client = inner.pool.get().await.map_err(pool)?;
    // Shapes repeat (a few conditions); a long list of conditions is prepared once and
    // closed, so odd requests cannot grow every connection's statement cache.
    let stmt = if query.metadata.len() <= CACHED_CONDITIONS {
        client.prepare_typed_cached(&plan.sql, &plan.types).await
    } else {
        client.prepare_typed(&plan.sql, &plan.types).await
    }
    .map_err(db)?;
    let params: Vec<&(dyn ToSql + Sync)> = plan
        .params
        .iter()
        .map(|p| &**p as &(dyn ToSql + Sync))
        .collect();
    let rows = client.query(&stmt, &params).await.map_err(db)?;
    let total_col = 10; // after ENDPOINT_COLUMNS
    let total: i64 = match rows.first() {
        Some(r) => r.try_get(total_col).map_err(db)?,
        None => 0,
    };
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        // An empty page is one row of NULLs beside the total (LEFT JOIN).
        if row.try_get::<_, Option<i64>>(0).map_err(db)?.is_none() {
            continue;
        }
        items.push(endpoint_from_row(row)?);
    }
    // One row more than the page was asked for: it tells whether another page follows.
    let more = items.len() > page.limit as usize;
    items.truncate(page.limit as usize);
    let next = if more {
        items.last().map(|e| e.incarnation)
    } else {
        None
    };
    Ok(Page {
        total: total.max(0) as u64,
        items,
        next,
    })
}

/// The keys in use per application version, exactly (what the rows hold now). Reads every
/// entry of the tenant's `endpoint_values` (index-only): 0.9 to 1.5 s at a million
/// endpoints with ten keys each (tests/listing_bench.rs); reading the rows' jsonb instead
/// took 2.9 s.
pub(crate) async fn metadata_keys(
    inner: &Inner,
    tenant: &TenantId,
    app: &AppName,
) -> Result<BTreeMap<String, BTreeSet<String>>, StoreError> {
    let client = inner.pool.get().await.map_err(pool)?;
    let stmt = client
        .prepare_cached(
            "SELECT DISTINCT app_version, key FROM endpoint_values WHERE tenant=$1 AND app=$2",
        )
        .await
        .map_err(db)?;
    let rows = client
        .query(&stmt, &[&tenant.as_str(), &app.as_str()])
        .await
        .map_err(db)?;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in rows {
        let version: String = row.try_get(0).map_err(db)?;
        let key: String = row.try_get(1).map_err(db)?;
        out.entry(version).or_default().insert(key);
    }
    Ok(out)
}

/// One listing statement and its parameters.
struct Plan {
    sql: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    /// Declared, since a shape may leave a parameter unused (its type then unknown).
    types: Vec<Type>,
}

impl Plan {
    /// Binds `v` and returns its placeholder.
    fn bind<T: ToSql + Sync + Send + 'static>(&mut self, v: T) -> String {
        let ty = if T::accepts(&Type::TEXT) {
            Type::TEXT
        } else if T::accepts(&Type::INT8) {
            Type::INT8
        } else {
            Type::TEXT_ARRAY
        };
        self.params.push(Box::new(v));
        self.types.push(ty);
        format!("${}", self.params.len())
    }
}

/// The text a candidate value is sent as: parsed by PostgreSQL into jsonb and written out
/// again, it gives the stored text of exactly the values that read back equal to it.
///
/// serde_json writes integral floats below 1e16 as `3.0` (stored with scale 1, read back as
/// a float) but larger ones as `1e16`, which jsonb stores as the integer
/// `10000000000000000`, read back as an integer. So an integral float within the integers
/// serde_json reads (`i64::MIN..=u64::MAX`) is written with `.0`: it matches only a stored
/// float. Everything else is serde_json's own text (the stored form of what it wrote).
fn render(v: &Value, out: &mut String) {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0
                && (-9_223_372_036_854_775_808.0..18_446_744_073_709_551_616.0).contains(&f)
            {
                let _ = write!(out, "{}.0", f as i128);
            } else {
                let _ = write!(out, "{n}");
            }
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                render(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                render(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The candidates of an `Equals`/`NotEquals`, rendered and without repeats.
fn rendered(values: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for v in values {
        let mut text = String::new();
        render(v, &mut text);
        if !out.contains(&text) {
            out.push(text);
        }
    }
    out
}

/// A condition on the row `e` (exact: compares jsonb texts).
fn row_predicate(plan: &mut Plan, c: &MetadataCondition) -> String {
    match c {
        MetadataCondition::Exists(k) => format!("e.metadata ? {}", plan.bind(k.clone())),
        MetadataCondition::Absent(k) => format!("NOT (e.metadata ? {})", plan.bind(k.clone())),
        MetadataCondition::Equals(k, vs) | MetadataCondition::NotEquals(k, vs) => {
            let k = plan.bind(k.clone());
            let vs = plan.bind(rendered(vs));
            // The candidates' texts once per statement (an init plan), not per row.
            let holds = format!(
                "coalesce((e.metadata -> {k})::text = ANY (ARRAY(\
                 SELECT x::jsonb::text FROM unnest({vs}::text[]) x)), false)"
            );
            if matches!(c, MetadataCondition::Equals(..)) {
                holds
            } else {
                format!("NOT {holds}")
            }
        }
    }
}

fn plan(tenant: &TenantId, q: &EndpointQuery, page: PageRequest) -> Plan {
    let mut plan = Plan {
        sql: String::new(),
        params: Vec::new(),
        types: Vec::new(),
    };
    let t = plan.bind(tenant.to_string());
    let app = q.app.as_ref().map(|a| plan.bind(a.to_string()));
    let version = q.app_version.as_ref().map(|v| plan.bind(v.to_string()));
    let filter = q.filter.as_ref().map(|f| plan.bind(f.to_string()));
    let in_filter = |inc: &str| {
        filter.as_ref().map(|f| {
            format!(
                "EXISTS (SELECT 1 FROM filter_matches fm WHERE fm.tenant={t} \
                 AND fm.filter_id={f} AND fm.incarnation={inc})"
            )
        })
    };
    let equals: Vec<(&String, &Vec<Value>)> = q
        .metadata
        .iter()
        .filter_map(|c| match c {
            MetadataCondition::Equals(k, vs) => Some((k, vs)),
            _ => None,
        })
        .collect();
    let matches_sql = if q.endpoint_ids.is_empty() && !equals.is_empty() {
        // Driven by endpoint_values: each `key=value` is an ordered index range per
        // candidate; several conditions join on the incarnation.
        let mut from = String::new();
        for (i, (k, vs)) in equals.iter().enumerate() {
            let k = plan.bind((*k).clone());
            let mut branches = Vec::new();
            for text in rendered(vs) {
                let v = plan.bind(text);
                let mut b = format!(
                    "SELECT incarnation FROM endpoint_values WHERE tenant={t} AND key={k} \
                     AND vkey=epr_value_key({v}::text::jsonb)"
                );
                if let Some(a) = &app {
                    let _ = write!(b, " AND app={a}");
                }
                if let Some(ver) = &version {
                    let _ = write!(b, " AND app_version={ver}");
                }
                branches.push(b);
            }
            let source = if branches.is_empty() {
                // `Equals` with no candidate holds nowhere.
                "SELECT NULL::bigint AS incarnation WHERE false".to_owned()
            } else {
                branches.join(" UNION ALL ")
            };
            if i == 0 {
                let _ = write!(from, "({source}) v0");
            } else {
                let _ = write!(
                    from,
                    " JOIN ({source}) v{i} ON v{i}.incarnation = v0.incarnation"
                );
            }
        }
        let mut conds = Vec::new();
        let mut rest = Vec::new();
        for c in &q.metadata {
            match c {
                MetadataCondition::Equals(..) => {}
                // An anti-join on the same index: no endpoint row read per match.
                MetadataCondition::NotEquals(k, vs) => {
                    let k = plan.bind(k.clone());
                    let vs = plan.bind(rendered(vs));
                    conds.push(format!(
                        "NOT EXISTS (SELECT 1 FROM endpoint_values x WHERE x.tenant={t} \
                         AND x.key={k} AND x.vkey = ANY (ARRAY(SELECT epr_value_key(c::jsonb) \
                         FROM unnest({vs}::text[]) c)) AND x.incarnation=v0.incarnation)"
                    ));
                }
                MetadataCondition::Exists(_) | MetadataCondition::Absent(_) => {
                    rest.push(row_predicate(&mut plan, c));
                }
            }
        }
        if !rest.is_empty() {
            conds.push(format!(
                "EXISTS (SELECT 1 FROM endpoints e WHERE e.tenant={t} \
                 AND e.incarnation=v0.incarnation AND {})",
                rest.join(" AND ")
            ));
        }
        conds.extend(in_filter("v0.incarnation"));
        let mut sql = format!("SELECT v0.incarnation FROM {from}");
        if !conds.is_empty() {
            let _ = write!(sql, " WHERE {}", conds.join(" AND "));
        }
        sql
    } else {
        // The endpoints table's indexes narrow; every condition is checked on the row.
        let mut conds = vec![format!("e.tenant={t}")];
        if let Some(a) = &app {
            conds.push(format!("e.app={a}"));
        }
        if let Some(v) = &version {
            conds.push(format!("e.app_version={v}"));
        }
        if !q.endpoint_ids.is_empty() {
            let ids: Vec<String> = q.endpoint_ids.iter().map(|i| i.to_string()).collect();
            let ids = plan.bind(ids);
            conds.push(format!("e.endpoint_id = ANY ({ids}::text[])"));
        }
        conds.extend(in_filter("e.incarnation"));
        for c in &q.metadata {
            conds.push(row_predicate(&mut plan, c));
        }
        format!(
            "SELECT e.incarnation FROM endpoints e WHERE {}",
            conds.join(" AND ")
        )
    };
    let after = plan.bind(page.after.unwrap_or(i64::MIN));
    let limit = plan.bind(i64::from(page.limit) + 1);
    let offset = plan.bind(i64::try_from(page.offset).unwrap_or(i64::MAX));
    // NOT MATERIALIZED: the count and the page each plan `m` on their own (an index-only
    // count; an ordered range from the cursor), in one statement and one snapshot.
    plan.sql = format!(
        "WITH m AS NOT MATERIALIZED ({matches_sql}) \
         SELECT p.*, t.total FROM (SELECT count(*) AS total FROM m) t \
         LEFT JOIN LATERAL (SELECT {ENDPOINT_COLUMNS} FROM endpoints \
           WHERE tenant={t} AND incarnation IN (SELECT incarnation FROM m \
             WHERE incarnation > {after} ORDER BY incarnation LIMIT {limit} OFFSET {offset})) p \
         ON true ORDER BY p.incarnation"
    );
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(v: Value) -> String {
        let mut s = String::new();
        render(&v, &mut s);
        s
    }

    #[test]
    fn renders_floats_so_integers_differ() {
        assert_eq!(r(json!(3)), "3");
        assert_eq!(r(json!(3.0)), "3.0");
        assert_eq!(r(json!(-0.0)), "0.0");
        assert_eq!(r(json!(1e16)), "10000000000000000.0");
        assert_eq!(r(json!(1e20)), "1e+20");
        assert_eq!(r(json!(0.5)), "0.5");
        assert_eq!(r(json!(u64::MAX)), u64::MAX.to_string());
        assert_eq!(
            r(json!({"b": [1.0, "x"], "a": null})),
            r#"{"a":null,"b":[1.0,"x"]}"#
        );
        assert_eq!(r(json!("a\"b")), r#""a\"b""#);
    }
}
