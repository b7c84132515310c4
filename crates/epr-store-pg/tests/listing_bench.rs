//! Listing speed at 1,000,000 endpoints (issue 12: a 100-row page by one metadata value,
//! with the exact total, within 20 ms at p99), and what the listing side table costs
//! registrations. Not part of the normal run (minutes, a few GB of disk):
//!
//! ```text
//! eval "$(scripts/services-up.sh)"; export EPR_TEST_DATABASE_URL
//! cargo test -p epr-store-pg --test listing_bench -- --ignored --nocapture
//! ```
//! `EPR_BENCH_ENDPOINTS` changes the size (default 1,000,000); `EPR_BENCH_KEEP=1` keeps the
//! database (its URL is printed) for EXPLAIN, and `EPR_BENCH_DB=<that URL>` times the
//! listings again on it without loading.

use epr_core::ids::{AppName, AppVersionName, TenantId};
use epr_core::ports::Store;
use epr_core::query::{EndpointQuery, MetadataCondition, PageRequest};
use epr_store_pg::testing::TestDb;
use epr_store_pg::{PgConfig, PgStore};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// `n` endpoints from incarnation `from`, 10 metadata keys each: `serial` unique, `model`
/// 1 of 20, `region` 1 of 5, `fw` 1 of 50, `lot` 1 of 5,000 (a number), `level` 1 of 10,
/// `on` a boolean, `temp` a float, `site` 1 of 200, `owner` 1 of 1,000; one application,
/// two versions. Values as serde_json writes them (`temp` like 34.1).
fn insert_sql(from: i64, n: i64) -> String {
    format!(
        "INSERT INTO endpoints(tenant, endpoint_id, incarnation, app, app_version, \
           app_version_registered, created, metadata, metadata_updated, version, \
           metadata_version, token_hash) \
         SELECT 't1', 'ep-' || i, i, 'app', CASE WHEN i % 2 = 0 THEN 'app-v1' ELSE 'app-v2' END, \
           0, 0, jsonb_build_object( \
             'serial', 'sn-' || lpad(i::text, 8, '0'), \
             'model', 'model-' || h(i, 1) % 20, \
             'region', 'region-' || h(i, 2) % 5, \
             'fw', '1.' || h(i, 3) % 50, \
             'lot', h(i, 4) % 5000, \
             'level', h(i, 5) % 10, \
             'on', h(i, 6) % 2 = 0, \
             'temp', round((h(i, 7) % 1000) / 10.0, 1), \
             'site', 'site-' || h(i, 8) % 200, \
             'owner', 'owner-' || h(i, 9) % 1000), \
           NULL, 1, 1, sha256(convert_to('tok' || i, 'UTF8')) \
         FROM generate_series({from}, {}) i",
        from + n - 1
    )
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// A listing to time: call number → query and page.
type Scenario<'a> = Box<dyn Fn(usize) -> (EndpointQuery, PageRequest) + 'a>;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn md(params: &[&str]) -> Vec<MetadataCondition> {
    params
        .iter()
        .flat_map(|p| MetadataCondition::parse_param(p).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: minutes and GBs; run with --ignored"]
async fn listing_at_a_million() {
    let n: i64 = std::env::var("EPR_BENCH_ENDPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // A database a kept run loaded (EPR_BENCH_DB=<its URL>): listings only.
    let reuse = std::env::var("EPR_BENCH_DB").ok();
    let db = match reuse {
        Some(_) => None,
        None => Some(TestDb::create().await),
    };
    let url = reuse
        .clone()
        .unwrap_or_else(|| db.as_ref().unwrap().url.clone());
    let store = PgStore::open(PgConfig::new(&url)).await.unwrap();
    let c = connect(&url).await;
    if reuse.is_none() {
        c.batch_execute(
            "CREATE FUNCTION h(i bigint, s int) RETURNS bigint LANGUAGE sql IMMUTABLE \
             AS $$ SELECT abs(hashtextextended(i::text, s)) $$",
        )
        .await
        .unwrap();
        let started = Instant::now();
        let chunk = 100_000;
        let mut at = 1;
        while at <= n {
            let k = chunk.min(n - at + 1);
            c.batch_execute(&insert_sql(at, k)).await.unwrap();
            at += k;
        }
        c.batch_execute(&format!("SELECT setval('endpoint_incarnation', {n})"))
            .await
            .unwrap();
        eprintln!(
            "loaded {n} endpoints in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    c.batch_execute("VACUUM ANALYZE endpoints, endpoint_values")
        .await
        .unwrap();
    eprintln!("VACUUM ANALYZE {:.1} s", started.elapsed().as_secs_f64());
    for row in c
        .query(
            "SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class \
             WHERE relname IN ('endpoints', 'endpoint_values', 'endpoint_values_pkey', \
               'endpoints_metadata', 'endpoints_pkey') ORDER BY relname",
            &[],
        )
        .await
        .unwrap()
    {
        eprintln!(
            "  {:<24} {}",
            row.get::<_, String>(0),
            row.get::<_, String>(1)
        );
    }

    let t = TenantId::parse("t1").unwrap();
    let app = Some(AppName::parse("app").unwrap());
    let by = |params: &[&str]| EndpointQuery {
        app: app.clone(),
        metadata: md(params),
        ..Default::default()
    };
    let first = PageRequest::new(0, 100);
    let calls = 200;
    let mut report = Vec::new();
    let scenarios: Vec<(&str, Scenario)> = vec![
        (
            "model=<1 of 20>, first page",
            Box::new(|i| (by(&[&format!("model=model-{}", i % 20)]), first)),
        ),
        (
            "lot=<1 of 5000> (rare, ~200)",
            Box::new(|i| (by(&[&format!("lot={}", i * 7 % 5000)]), first)),
        ),
        (
            "serial=<unique>",
            Box::new(|i| (by(&[&format!("serial=sn-{:08}", 1 + i * 4999)]), first)),
        ),
        (
            "model=.. AND region=..",
            Box::new(|i| {
                (
                    by(&[
                        &format!("model=model-{}", i % 20),
                        &format!("region=region-{}", i % 5),
                    ]),
                    first,
                )
            }),
        ),
        (
            "model=.., offset 10,000",
            Box::new(|i| {
                (
                    by(&[&format!("model=model-{}", i % 20)]),
                    PageRequest::new(10_000, 100),
                )
            }),
        ),
        (
            "model=.. AND level!=3",
            Box::new(|i| (by(&[&format!("model=model-{}", i % 20), "level!=3"]), first)),
        ),
        (
            "appVersion only",
            Box::new(|i| {
                (
                    EndpointQuery {
                        app_version: Some(
                            AppVersionName::parse(if i % 2 == 0 { "app-v1" } else { "app-v2" })
                                .unwrap(),
                        ),
                        ..Default::default()
                    },
                    first,
                )
            }),
        ),
        (
            "no condition (tenant)",
            Box::new(|_| (EndpointQuery::default(), first)),
        ),
        ("application only", Box::new(|_| (by(&[]), first))),
    ];
    for (name, make) in &scenarios {
        let (q, p) = make(0);
        let warm = store.list(&t, &q, p).await.unwrap();
        let mut times = Vec::with_capacity(calls);
        for i in 0..calls {
            let (q, p) = make(i);
            let started = Instant::now();
            let page = store.list(&t, &q, p).await.unwrap();
            times.push(started.elapsed());
            assert!(page.items.len() <= 100);
        }
        times.sort();
        report.push(format!(
            "{name:<32} total {:>7}  p50 {:>7.2} ms  p99 {:>7.2} ms",
            warm.total,
            pct(&times, 0.5),
            pct(&times, 0.99)
        ));
    }
    // Cursor pages: one walk through model-7's matches, a call per page.
    let q = by(&["model=model-7"]);
    let mut after = None;
    let mut times = Vec::new();
    for _ in 0..calls {
        let started = Instant::now();
        let page = store
            .list(
                &t,
                &q,
                PageRequest {
                    offset: 0,
                    limit: 100,
                    after,
                },
            )
            .await
            .unwrap();
        times.push(started.elapsed());
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    times.sort();
    report.push(format!(
        "{:<32} pages {:>7}  p50 {:>7.2} ms  p99 {:>7.2} ms",
        "model=model-7, cursor walk",
        times.len(),
        pct(&times, 0.5),
        pct(&times, 0.99)
    ));
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let keys = store
            .metadata_keys(&t, &AppName::parse("app").unwrap())
            .await
            .unwrap();
        times.push(started.elapsed());
        assert_eq!(keys.len(), 2);
    }
    times.sort();
    report.push(format!(
        "{:<32} calls {:>7}  p50 {:>7.2} ms  max {:>7.2} ms",
        "metadata_keys",
        times.len(),
        pct(&times, 0.5),
        pct(&times, 1.0)
    ));

    // Write cost: 100,000 more registrations with the side table's triggers and without
    // (the rows removed again in between), as one statement and as single-row statements
    // (the writers' shape) run server-side, so round trips do not hide the difference.
    let extra = if reuse.is_some() { 0 } else { 100_000 };
    let single = |from: i64| {
        format!(
            "DO $$ BEGIN FOR j IN {from}..{} LOOP {}; END LOOP; END $$",
            from + extra - 1,
            insert_sql(0, 1).replace("generate_series(0, 0) i", "(SELECT j::bigint AS i) s")
        )
    };
    let runs = if extra == 0 {
        Vec::new()
    } else {
        vec![
            ("one statement", insert_sql(n + 1, extra)),
            ("single rows", single(n + 1)),
        ]
    };
    for (what, sql) in runs {
        for with in [true, false] {
            if !with {
                c.batch_execute("ALTER TABLE endpoints DISABLE TRIGGER USER")
                    .await
                    .unwrap();
            }
            let started = Instant::now();
            c.batch_execute(&sql).await.unwrap();
            let took = started.elapsed().as_secs_f64();
            c.batch_execute(&format!(
                "DELETE FROM endpoints WHERE tenant='t1' AND incarnation > {n}; \
                 ALTER TABLE endpoints ENABLE TRIGGER USER"
            ))
            .await
            .unwrap();
            c.batch_execute("VACUUM endpoints, endpoint_values")
                .await
                .unwrap();
            report.push(format!(
                "insert {extra} ({what}), {} side table: {took:.1} s = {:.0}/s",
                if with { "with" } else { "without" },
                extra as f64 / took
            ));
        }
    }
    eprintln!("\n{}", report.join("\n"));
    store.shutdown().await;
    if let Some(db) = db {
        if std::env::var_os("EPR_BENCH_KEEP").is_some() {
            eprintln!("kept database {} for inspection ({})", db.name, db.url);
        } else {
            db.drop_db().await;
        }
    }
}
