//! Export reads over rows in the stored shapes (the write path's own tests cover how they
//! get there): tenants, endpoint pages with token hashes, filters with their counts.

use crate::{connect, open};
use epr_core::endpoint_filter::FilterStatus;
use epr_core::ids::TenantId;
use epr_core::ports::{Store, StoreError};
use epr_store_pg::testing::TestDb;
use serde_json::json;

fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

async fn endpoint(c: &tokio_postgres::Client, t: &str, id: &str, incarnation: i64, hash: &[u8]) {
    let md = json!({"city": "Kyiv", "n": incarnation});
    let updated: Option<i64> = (incarnation % 2 == 1).then_some(2_000 + incarnation);
    c.execute(
        "INSERT INTO endpoints(tenant, incarnation, endpoint_id, app, app_version, \
         app_version_registered, created, metadata, metadata_updated, version, \
         metadata_version, token_hash) VALUES($1,$2,$3,'app','app-v1',$4,$5,$6,$7,$8,$9,$10)",
        &[
            &t,
            &incarnation,
            &id,
            &(1_000 + incarnation),
            &(1_000 + incarnation),
            &md,
            &updated,
            &(incarnation + 10),
            &(incarnation + 20),
            &hash,
        ],
    )
    .await
    .unwrap();
}

async fn filter(c: &tokio_postgres::Client, t: &str, id: &str, app: &str, created: i64) {
    c.execute(
        "INSERT INTO filters(tenant, filter_id, app, name, description, query, status, \
         created, updated, version) VALUES($1,$2,$3,$4,'about it',$5,$6,$7,$8,3)",
        &[
            &t,
            &id,
            &app,
            &format!("name-{id}"),
            &json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}),
            &if created % 2 == 0 {
                "active"
            } else {
                "pending"
            },
            &created,
            &(created + 5),
        ],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_tenants_endpoints_and_filters_in_order() {
    let db = TestDb::create().await;
    let s = open(&db.url).await;
    let c = connect(&db.url).await;
    // Interleaved tenants: each tenant's pages follow its own incarnations.
    for (t, id, inc) in [
        ("t1", "ep-a", 1),
        ("t2", "ep-x", 2),
        ("t1", "ep-b", 3),
        ("t2", "ep-y", 4),
        ("t1", "ep-c", 5),
    ] {
        endpoint(&c, t, id, inc, &[inc as u8; 32]).await;
    }
    filter(&c, "t1", "f-b", "b", 10).await;
    filter(&c, "t1", "f-a2", "a", 31).await;
    filter(&c, "t1", "f-a1", "a", 20).await;
    filter(&c, "t3", "f-only", "a", 1).await; // a tenant with filters only
    for (shard, n) in [(0i16, 2i64), (1, 3), (2, -1)] {
        c.execute(
            "INSERT INTO filter_counts(tenant, filter_id, shard, n) VALUES('t1','f-a1',$1,$2)",
            &[&shard, &n],
        )
        .await
        .unwrap();
    }
    // Another tenant's count of a filter with the same ID is not added.
    c.execute(
        "INSERT INTO filter_counts(tenant, filter_id, shard, n) VALUES('t3','f-a1',0,100)",
        &[],
    )
    .await
    .unwrap();

    let tenants = s.export_tenants().await.unwrap();
    assert_eq!(tenants, [tenant("t1"), tenant("t2"), tenant("t3")]);

    let page1 = s.export_endpoints(&tenant("t1"), 0, 2).await.unwrap();
    let page2 = s
        .export_endpoints(&tenant("t1"), page1[1].endpoint.incarnation, 2)
        .await
        .unwrap();
    let ids: Vec<_> = page1
        .iter()
        .chain(&page2)
        .map(|e| (e.endpoint.id.to_string(), e.endpoint.incarnation))
        .collect();
    assert_eq!(
        ids,
        [("ep-a".into(), 1), ("ep-b".into(), 3), ("ep-c".into(), 5)]
    );
    assert!(s
        .export_endpoints(&tenant("t1"), 5, 2)
        .await
        .unwrap()
        .is_empty());
    let b = &page1[1];
    assert_eq!(b.tenant, tenant("t1"));
    assert_eq!(b.token_hash.0, [3u8; 32]);
    assert_eq!(b.endpoint.app.as_str(), "app");
    assert_eq!(b.endpoint.app_version.as_str(), "app-v1");
    assert_eq!(b.endpoint.created.0, 1_003);
    assert_eq!(b.endpoint.metadata_updated.map(|t| t.0), Some(2_003));
    assert_eq!((b.endpoint.version, b.endpoint.metadata_version), (13, 23));
    assert_eq!(b.endpoint.metadata.get("city"), Some(&json!("Kyiv")));
    let x = s.export_endpoints(&tenant("t2"), 0, 10).await.unwrap();
    assert_eq!(x.len(), 2);
    assert_eq!(x[0].endpoint.metadata_updated, None);

    let filters = s.export_filters(&tenant("t1")).await.unwrap();
    let order: Vec<_> = filters.iter().map(|f| f.id.to_string()).collect();
    assert_eq!(
        order,
        ["f-a1", "f-a2", "f-b"],
        "by application, oldest first"
    );
    let a1 = &filters[0];
    assert_eq!(a1.matched, 4, "the sum of the count shards");
    assert_eq!(a1.status, FilterStatus::Active);
    assert_eq!(filters[1].status, FilterStatus::Pending);
    assert_eq!(filters[1].matched, 0);
    assert_eq!(a1.spec.name, "name-f-a1");
    assert_eq!(a1.spec.description, "about it");
    assert_eq!(
        serde_json::Value::Object(a1.spec.query.clone()),
        json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}})
    );
    assert_eq!((a1.created.0, a1.updated.0, a1.version), (20, 25, 3));
    assert_eq!(s.export_filters(&tenant("t3")).await.unwrap().len(), 1);
    assert!(s.export_filters(&tenant("t2")).await.unwrap().is_empty());

    // A stored value this build cannot read is a store failure (503), not a panic.
    c.execute(
        "UPDATE endpoints SET token_hash = '\\x0102' WHERE tenant = 't2' AND endpoint_id = 'ep-x'",
        &[],
    )
    .await
    .unwrap();
    assert!(matches!(
        s.export_endpoints(&tenant("t2"), 0, 10).await,
        Err(StoreError::Unavailable(_))
    ));
    s.shutdown().await;
    db.drop_db().await;
}
