//! Listings on PostgreSQL against the reference semantics ([`EndpointQuery::matches`]):
//! endpoint rows are written with SQL (as a serde_json writer stores them), changed and
//! removed, then every query is walked by offset and by cursor. The conformance suite checks
//! the same through the store's own writes.

use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::FilterId;
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::ports::Store;
use epr_core::query::{EndpointQuery, MetadataCondition, PageRequest};
use epr_store_pg::testing::TestDb;
use epr_store_pg::{PgConfig, PgStore};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Values that `==` on JSON tells apart and jsonb does not (or the reverse): integers and
/// integral floats (small, 1e16 and beyond, out of u64), -0.0, strings of digits, keys in
/// another order, nested floats, long values (hashed keys), escapes.
fn value(r: u64) -> Value {
    match r % 24 {
        0 => json!(3),
        1 => json!(3.0),
        2 => json!("3"),
        3 => json!(0.0),
        4 => json!(-0.0),
        5 => json!(true),
        6 => json!(false),
        7 => Value::Null,
        8 => json!({"a": 1, "b": [1, 2]}),
        9 => serde_json::from_str(r#"{"b": [1, 2], "a": 1}"#).unwrap(),
        10 => json!({"a": 1.0, "b": [1, 2]}),
        11 => json!([1, "x"]),
        12 => json!([1.0, "x"]),
        13 => json!("Kyiv"),
        14 => json!("Lviv \"old\"\n"),
        15 => json!(1e16),
        16 => json!(10_000_000_000_000_000u64),
        17 => json!(1e20),
        18 => json!(u64::MAX),
        19 => json!(0.1),
        20 => json!(-7),
        21 => json!("x".repeat(80)),
        22 => json!(["y".repeat(70), 2.5]),
        _ => json!(r % 7),
    }
}

const KEYS: [&str; 4] = ["city", "level", "o", "n"];

fn metadata(rng: &mut u64) -> Value {
    let mut m = serde_json::Map::new();
    for k in KEYS {
        let r = xorshift(rng);
        if !r.is_multiple_of(4) {
            m.insert(k.into(), value(r >> 8));
        }
    }
    Value::Object(m)
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Inserts an endpoint row as the write path would (metadata in serde_json's text).
async fn insert(c: &Client, tenant: &str, id: &str, version: &str, md: &Value) {
    let app = version.split('-').next().unwrap();
    c.execute(
        "INSERT INTO endpoints(tenant, endpoint_id, incarnation, app, app_version, \
         app_version_registered, created, metadata, metadata_updated, version, \
         metadata_version, token_hash) \
         VALUES($1, $2, nextval('endpoint_incarnation'), $3, $4, 0, 0, $5::text::jsonb, NULL, \
         1, 1, sha256(convert_to($2, 'UTF8')))",
        &[&tenant, &id, &app, &version, &md.to_string()],
    )
    .await
    .unwrap();
}

fn q_page(offset: u64, limit: u32, after: Option<i64>) -> PageRequest {
    PageRequest {
        offset,
        limit,
        after,
    }
}

/// Every page of `q` by offset and by cursor gives `want` and its number as the total.
async fn check_walks(s: &dyn Store, t: &TenantId, q: &EndpointQuery, want: &[String], what: &str) {
    let limit = 3;
    let mut by_offset = Vec::new();
    loop {
        let p = s
            .list(t, q, q_page(by_offset.len() as u64, limit, None))
            .await
            .unwrap();
        assert_eq!(p.total, want.len() as u64, "{what}: total by offset");
        let n = p.items.len();
        by_offset.extend(p.items.iter().map(|e| e.id.to_string()));
        assert_eq!(
            p.next.is_some(),
            by_offset.len() < want.len(),
            "{what}: next when more follow"
        );
        if n < limit as usize {
            break;
        }
    }
    assert_eq!(by_offset, want, "{what}: pages by offset");
    let mut by_cursor = Vec::new();
    let mut after = None;
    loop {
        let p = s.list(t, q, q_page(0, limit, after)).await.unwrap();
        assert_eq!(p.total, want.len() as u64, "{what}: total by cursor");
        by_cursor.extend(p.items.iter().map(|e| e.id.to_string()));
        match p.next {
            Some(next) => {
                assert_eq!(
                    p.items.len(),
                    limit as usize,
                    "{what}: full page before next"
                );
                assert_eq!(Some(next), p.items.last().map(|e| e.incarnation));
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(by_cursor, want, "{what}: pages by cursor");
    // Offset counted from the cursor.
    if want.len() > 2 {
        let first = s.list(t, q, q_page(0, 1, None)).await.unwrap();
        let p = s.list(t, q, q_page(1, 10_000, first.next)).await.unwrap();
        let ids: Vec<String> = p.items.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, want[2..], "{what}: offset after a cursor");
    }
}

fn all_page() -> PageRequest {
    q_page(0, 1_000_000, None)
}

async fn everything(s: &dyn Store, t: &TenantId) -> Vec<Endpoint> {
    s.list(t, &EndpointQuery::default(), all_page())
        .await
        .unwrap()
        .items
}

const QUERIES: &[&[&str]] = &[
    &["city=Kyiv"],
    &["level=3"],
    &[r#"{"level":3}"#],
    &[r#"{"level":3.0}"#],
    &["level=0.0"],
    &[r#"{"level":-0.0}"#],
    &[r#"{"o":{"b":[1,2],"a":1}}"#],
    &[r#"{"o":{"b":[1,2],"a":1.0}}"#],
    &[r#"o=[1,"x"]"#],
    &[r#"o=[1.0,"x"]"#],
    &["n=null"],
    &["n"],
    &["!city"],
    &["city!=Kyiv"],
    &["level!=3", "city"],
    &["city=Kyiv", "level=true"],
    &["city=Lviv", "!o", "n!=false"],
    &["level=1e16"],
    &["level=10000000000000000"],
    &[r#"{"level":10000000000000000.0}"#],
    &["level=1e20"],
    &["level=100000000000000000000"],
    &["level=18446744073709551615"],
    &["level=0.1"],
    &["level=0.10"],
    &["level=-7"],
    &["o=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"],
    &[r#"n=["yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy",2.5]"#],
    &[r#"{"city":"Lviv \"old\"\n"}"#],
    &["city=3", "level=3"],
    &["level=3", "n!=3"],
    &["o=3", "n=3", "city"],
    // More conditions than keep a cached statement.
    &["n", "city", "level!=3", "o!=Kyiv", "!zzz"],
    &["level=3", "city", "n!=3", "o!=Kyiv", "!zzz"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_agrees_with_reference() {
    let db = TestDb::create().await;
    let mut cfg = PgConfig::new(&db.url);
    cfg.pool_size = 2;
    let store = PgStore::open(cfg).await.unwrap();
    let c = connect(&db.url).await;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut ids: Vec<(String, String)> = Vec::new();
    for round in 0..3 {
        for i in 0..60 {
            let r = xorshift(&mut rng);
            let t = if r.is_multiple_of(5) { "t2" } else { "t1" };
            let version = if r.is_multiple_of(3) {
                "zzz-v1"
            } else {
                "app-v1"
            };
            let name = format!("l{round}-{i}");
            insert(&c, t, &name, version, &metadata(&mut rng)).await;
            ids.push((t.to_owned(), name));
        }
        // Changes through the update and delete triggers.
        for _ in 0..80 {
            let r = xorshift(&mut rng);
            let (t, ep) = &ids[(r % ids.len() as u64) as usize];
            match (r >> 8) % 6 {
                0 => {
                    let md = metadata(&mut rng).to_string();
                    c.execute(
                        "UPDATE endpoints SET metadata=$3::text::jsonb \
                         WHERE tenant=$1 AND endpoint_id=$2",
                        &[t, ep, &md],
                    )
                    .await
                    .unwrap();
                }
                1 | 2 => {
                    let k = KEYS[(r >> 16) as usize % 4];
                    let v = value(r >> 20).to_string();
                    c.execute(
                        "UPDATE endpoints SET metadata=jsonb_set(metadata, ARRAY[$3], \
                         $4::text::jsonb) WHERE tenant=$1 AND endpoint_id=$2",
                        &[t, ep, &k, &v],
                    )
                    .await
                    .unwrap();
                }
                3 => {
                    let k = KEYS[(r >> 16) as usize % 2];
                    c.execute(
                        "UPDATE endpoints SET metadata=metadata - $3 \
                         WHERE tenant=$1 AND endpoint_id=$2",
                        &[t, ep, &k],
                    )
                    .await
                    .unwrap();
                }
                4 => {
                    c.execute(
                        "UPDATE endpoints SET app_version='app-v2' \
                         WHERE tenant=$1 AND endpoint_id=$2 AND app='app'",
                        &[t, ep],
                    )
                    .await
                    .unwrap();
                }
                _ => {
                    c.execute(
                        "DELETE FROM endpoints WHERE tenant=$1 AND endpoint_id=$2",
                        &[t, ep],
                    )
                    .await
                    .unwrap();
                }
            }
        }
    }
    // The side table holds exactly one entry per stored key (the triggers kept it).
    let drift: i64 = c
        .query_one(
            "SELECT count(*) FROM (\
               (SELECT e.tenant, j.key, epr_value_key(j.value), e.incarnation, e.app, \
                       e.app_version FROM endpoints e, jsonb_each(e.metadata) j \
                EXCEPT ALL SELECT tenant, key, vkey, incarnation, app, app_version \
                FROM endpoint_values) \
               UNION ALL \
               (SELECT tenant, key, vkey, incarnation, app, app_version FROM endpoint_values \
                EXCEPT ALL SELECT e.tenant, j.key, epr_value_key(j.value), e.incarnation, \
                       e.app, e.app_version FROM endpoints e, jsonb_each(e.metadata) j)) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(drift, 0, "endpoint_values drifted from endpoints");
    // A filter's membership: every third endpoint of t1.
    let f = FilterId::parse("f1").unwrap();
    c.execute(
        "INSERT INTO filter_matches(tenant, filter_id, incarnation) \
         SELECT tenant, 'f1', incarnation FROM endpoints WHERE tenant='t1' AND incarnation % 3 = 0",
        &[],
    )
    .await
    .unwrap();

    let (mut empty, mut non_empty) = (0, 0);
    let mut hits = std::collections::BTreeMap::<String, usize>::new();
    for t in ["t1", "t2"] {
        let tenant = TenantId::parse(t).unwrap();
        let all = everything(&store, &tenant).await;
        assert!(all.windows(2).all(|w| w[0].incarnation < w[1].incarnation));
        let mine: Vec<EndpointId> = all.iter().map(|e| e.id.clone()).collect();
        let apps = [None, Some("app"), Some("zzz")];
        let versions = [None, Some("app-v2")];
        let mut queries: Vec<Vec<MetadataCondition>> = vec![Vec::new()];
        for params in QUERIES {
            let mut md = Vec::new();
            for p in *params {
                md.extend(MetadataCondition::parse_param(p).unwrap());
            }
            queries.push(md);
        }
        queries.push(vec![MetadataCondition::Equals("level".into(), vec![])]);
        for metadata in &queries {
            for app in apps {
                for version in versions {
                    for filter in [None, Some(f.clone())] {
                        let q = EndpointQuery {
                            app: app.map(|a| AppName::parse(a).unwrap()),
                            app_version: version.map(|v| AppVersionName::parse(v).unwrap()),
                            metadata: metadata.clone(),
                            filter: filter.clone(),
                            ..Default::default()
                        };
                        let in_filter: Vec<i64> = if filter.is_some() {
                            c.query(
                                "SELECT incarnation FROM filter_matches WHERE tenant=$1",
                                &[&t],
                            )
                            .await
                            .unwrap()
                            .iter()
                            .map(|r| r.get(0))
                            .collect()
                        } else {
                            Vec::new()
                        };
                        let want: Vec<String> = all
                            .iter()
                            .filter(|e| q.matches(e))
                            .filter(|e| filter.is_none() || in_filter.contains(&e.incarnation))
                            .map(|e| e.id.to_string())
                            .collect();
                        if want.is_empty() {
                            empty += 1;
                        } else {
                            non_empty += 1;
                            *hits.entry(format!("{metadata:?}")).or_insert(0) += 1;
                        }
                        let what =
                            format!("{t} {metadata:?} app {app:?} version {version:?} {filter:?}");
                        check_walks(&store, &tenant, &q, &want, &what).await;
                        if filter.is_none() {
                            let by_ids = EndpointQuery {
                                endpoint_ids: mine.clone(),
                                ..q.clone()
                            };
                            check_walks(&store, &tenant, &by_ids, &want, &format!("{what} by IDs"))
                                .await;
                        }
                    }
                }
            }
        }
    }
    // The mix must exercise both outcomes, and the value forms that only equal themselves
    // (3.0, 1e16 read back as an integer, long values) must have matches.
    assert!(
        non_empty * 5 >= non_empty + empty && empty > 0,
        "{non_empty} queries with matches, {empty} without"
    );
    for needed in [
        r#"{"level":3.0}"#,
        "level=10000000000000000",
        "level=1e20",
        "level=0.1",
    ] {
        let md = MetadataCondition::parse_param(needed).unwrap();
        assert!(
            hits.contains_key(&format!("{md:?}")),
            "{needed} never matched: {hits:?}"
        );
    }
    eprintln!("{hits:#?}");
    store.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_keys_per_version() {
    let db = TestDb::create().await;
    let store = PgStore::open(PgConfig::new(&db.url)).await.unwrap();
    let c = connect(&db.url).await;
    insert(&c, "t1", "a", "app-v1", &json!({"x": 1, "y": 2})).await;
    insert(&c, "t1", "b", "app-v1", &json!({"z": 1})).await;
    insert(&c, "t1", "c", "app-v2", &json!({"x": 1})).await;
    insert(&c, "t1", "d", "other-v1", &json!({"secret": 1})).await;
    insert(&c, "t2", "e", "app-v1", &json!({"t2only": 1})).await;
    insert(&c, "t1", "f", "app-v3", &json!({})).await;
    let app = AppName::parse("app").unwrap();
    let keys = store
        .metadata_keys(&TenantId::parse("t1").unwrap(), &app)
        .await
        .unwrap();
    let v1: Vec<_> = keys["app-v1"].iter().cloned().collect();
    assert_eq!(v1, vec!["x", "y", "z"]);
    assert_eq!(keys["app-v2"].len(), 1);
    assert_eq!(keys.len(), 2, "{keys:?}");
    // A key's last holder changing version or dropping it removes it.
    c.execute(
        "UPDATE endpoints SET metadata = metadata - 'z' WHERE endpoint_id='b'",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE endpoints SET app_version='app-v2' WHERE endpoint_id='a'",
        &[],
    )
    .await
    .unwrap();
    let keys = store
        .metadata_keys(&TenantId::parse("t1").unwrap(), &app)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let v2: Vec<_> = keys["app-v2"].iter().cloned().collect();
    assert_eq!(v2, vec!["x", "y"]);
    store.shutdown().await;
    db.drop_db().await;
}
