//! Conformance of saved filters: lifecycle, live matching, and agreement between live
//! matching and back-fill under random writes racing the back-fill.

use super::{ctx, id, register, rejected, tenant};
use epr_core::command::{Command, MetadataChange, WriteCtx};
use epr_core::endpoint::Precondition;
use epr_core::endpoint_filter::{
    EndpointFilter, FilterCommand, FilterId, FilterPatch, FilterSpec, FilterStatus,
};
use epr_core::event::{FilterEvent, FilterEventKind, OutboxEvent};
use epr_core::filter::Filter;
use epr_core::ids::{AppName, AppVersionName};
use epr_core::metadata::{Limits, MetadataKey};
use epr_core::ports::Store;
use epr_core::query::{EndpointQuery, PageRequest};
use epr_core::DomainError;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

fn app(a: &str) -> AppName {
    AppName::parse(a).unwrap()
}

fn fid(f: &str) -> FilterId {
    FilterId::parse(f).unwrap()
}

fn create_cmd(app_name: &str, id: &str, name: &str, query: Value) -> FilterCommand {
    FilterCommand::Create {
        id: fid(id),
        app: app(app_name),
        spec: FilterSpec::parse(name, "", &query).unwrap(),
    }
}

pub(crate) async fn create(
    s: &dyn Store,
    t: &str,
    app_name: &str,
    id: &str,
    query: Value,
) -> EndpointFilter {
    s.execute_filter(
        create_cmd(app_name, id, &format!("name of {id}"), query),
        ctx(t),
    )
    .await
    .expect("filter created")
}

/// Polls until the filter is active (back-fill runs in the background), and its activation
/// event is in the outbox: a store may show a committed write a moment before the outbox
/// releases its events (the embedded store releases them once they are durable).
pub(crate) async fn wait_active(s: &dyn Store, t: &str, id: &str) -> EndpointFilter {
    for _ in 0..4000 {
        let f = s.get_filter(&tenant(t), &fid(id)).await.unwrap().unwrap();
        if f.status == FilterStatus::Active && !activation_held_back(s, t, id).await {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("filter {id} did not turn active in 20 s");
}

/// Whether the filter's latest lifecycle event in the outbox is still `pending` (its
/// `activated` not released yet).
async fn activation_held_back(s: &dyn Store, t: &str, id: &str) -> bool {
    let last = s
        .outbox_pending(0, 1_000_000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            OutboxEvent::Filter(f)
                if f.tenant.as_str() == t
                    && f.filter_id.as_str() == id
                    && matches!(
                        f.kind,
                        FilterEventKind::Pending | FilterEventKind::Activated
                    ) =>
            {
                Some(f.kind)
            }
            _ => None,
        })
        .next_back();
    matches!(last, Some(FilterEventKind::Pending))
}

pub(crate) async fn members(s: &dyn Store, t: &str, id: &str) -> BTreeSet<String> {
    s.filter_members(&tenant(t), &fid(id))
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| e.to_string())
        .collect()
}

/// The endpoints of `app_name` the query matches, evaluated from scratch over a listing.
async fn reference(s: &dyn Store, t: &str, app_name: &str, query: &Value) -> BTreeSet<String> {
    let filter = Filter::parse(query).unwrap();
    let q = EndpointQuery {
        app: Some(app(app_name)),
        ..Default::default()
    };
    let page = PageRequest {
        offset: 0,
        limit: u32::MAX,
        after: None,
    };
    s.list(&tenant(t), &q, page)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| filter.matches(e.app_version.as_str(), e.metadata.as_map()))
        .map(|e| e.id.to_string())
        .collect()
}

async fn filter_events(s: &dyn Store) -> Vec<FilterEvent> {
    s.outbox_pending(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            OutboxEvent::Filter(f) => Some(f),
            OutboxEvent::Endpoint(_) | OutboxEvent::Token(_) => None,
        })
        .collect()
}

fn kind_of(e: &FilterEvent) -> String {
    match &e.kind {
        FilterEventKind::Pending => format!("{} pending", e.filter_id),
        FilterEventKind::Activated => format!("{} activated", e.filter_id),
        FilterEventKind::Deleted => format!("{} deleted", e.filter_id),
        FilterEventKind::EndpointMatched { endpoint_id, .. } => {
            format!("{} +{endpoint_id}", e.filter_id)
        }
        FilterEventKind::EndpointUnmatched { endpoint_id, .. } => {
            format!("{} -{endpoint_id}", e.filter_id)
        }
    }
}

pub(super) async fn put(s: &dyn Store, t: &str, ep: &str, k: &str, v: Value) {
    let cmd = Command::UpdateMetadata {
        id: id(ep),
        change: MetadataChange::PutKey(MetadataKey::parse(k, &Limits::default()).unwrap(), v),
        precondition: Precondition::None,
    };
    s.execute(cmd, ctx(t)).await.expect("metadata update");
}

pub(super) const KYIV: fn() -> Value =
    || json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}});

pub(super) async fn filter_lifecycle(s: Arc<dyn Store>) {
    for (i, city) in ["Kyiv", "Lviv", "Kyiv", "Odesa"].iter().enumerate() {
        register(
            &*s,
            "t1",
            &format!("ep-{i}"),
            "app-v1",
            json!({ "city": city }),
        )
        .await;
    }
    register(&*s, "t1", "other-0", "other-v1", json!({"city": "Kyiv"})).await;
    let f = create(&*s, "t1", "app", "f1", KYIV()).await;
    assert_eq!(f.status, FilterStatus::Pending);
    assert_eq!(f.version, 1);
    let f = wait_active(&*s, "t1", "f1").await;
    assert_eq!(f.matched, 2, "only the application's own endpoints");
    assert_eq!(members(&*s, "t1", "f1").await, set(&["ep-0", "ep-2"]));
    // Listing by the filter is the stored membership.
    let q = EndpointQuery {
        filter: Some(fid("f1")),
        ..Default::default()
    };
    let page = s
        .list(
            &tenant("t1"),
            &q,
            PageRequest {
                offset: 0,
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.total, 2);
    assert_eq!(page.items[0].id.as_str(), "ep-0", "registration order");
    let matched = s
        .matched_filters(&tenant("t1"), &[id("ep-0"), id("ep-1")])
        .await
        .unwrap();
    assert_eq!(matched.get(&id("ep-0")), Some(&vec![fid("f1")]));
    assert!(!matched.contains_key(&id("ep-1")));
    // Lifecycle events; no membership events while pending.
    let kinds: Vec<String> = filter_events(&*s).await.iter().map(kind_of).collect();
    assert_eq!(kinds, ["f1 pending", "f1 activated"]);
    let listed = s
        .list_filters(
            &tenant("t1"),
            &app("app"),
            None,
            PageRequest {
                offset: 0,
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.items[0].spec.name, "name of f1");
    let by_name = s
        .list_filters(
            &tenant("t1"),
            &app("app"),
            Some("nope"),
            PageRequest {
                offset: 0,
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(by_name.total, 0);
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub(super) async fn filter_live_matching(s: Arc<dyn Store>) {
    create(&*s, "t1", "app", "f1", KYIV()).await;
    wait_active(&*s, "t1", "f1").await;
    register(&*s, "t1", "ep-1", "app-v1", json!({"city": "Kyiv"})).await;
    register(&*s, "t1", "ep-2", "app-v1", json!({"city": "Lviv"})).await;
    put(&*s, "t1", "ep-2", "city", json!("Kyiv")).await;
    put(&*s, "t1", "ep-1", "city", json!("Odesa")).await;
    put(&*s, "t1", "ep-2", "n", json!(1)).await; // still matching: no event
    s.execute(
        Command::Unregister {
            id: id("ep-2"),
            precondition: Precondition::None,
        },
        ctx("t1"),
    )
    .await
    .unwrap();
    let events = filter_events(&*s).await;
    let kinds: Vec<String> = events.iter().map(kind_of).collect();
    assert_eq!(
        kinds,
        [
            "f1 pending",
            "f1 activated",
            "f1 +ep-1",
            "f1 +ep-2",
            "f1 -ep-1",
            "f1 -ep-2"
        ]
    );
    let matched = &events[2];
    assert_eq!(matched.filter_name, "name of f1");
    assert_eq!(matched.app.as_str(), "app");
    assert_eq!(matched.correlation_id, "corr-1");
    assert!(
        matches!(&matched.kind, FilterEventKind::EndpointMatched { app_version, .. }
        if app_version.as_str() == "app-v1")
    );
    let f = s
        .get_filter(&tenant("t1"), &fid("f1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.matched, 0);
    assert!(members(&*s, "t1", "f1").await.is_empty());
    // The endpoint event comes first, then the membership event, in one commit.
    let all = s.outbox_pending(0, 1000).await.unwrap();
    let registered = all
        .iter()
        .position(|e| {
            e.event
                .as_endpoint()
                .is_some_and(|d| d.endpoint_id.as_str() == "ep-1")
        })
        .unwrap();
    assert!(
        matches!(&all[registered + 2].event, OutboxEvent::Filter(f)
        if matches!(f.kind, FilterEventKind::EndpointMatched { .. })),
        "registered, metadata.updated, then ep-matched"
    );
    // An app version change re-evaluates too.
    let by_version = json!({"application_version": "app-v2"});
    create(&*s, "t1", "app", "f2", by_version).await;
    wait_active(&*s, "t1", "f2").await;
    s.execute(
        Command::SetAppVersion {
            id: id("ep-1"),
            app: app("app"),
            app_version: AppVersionName::parse("app-v2").unwrap(),
            precondition: Precondition::None,
        },
        ctx("t1"),
    )
    .await
    .unwrap();
    assert_eq!(members(&*s, "t1", "f2").await, set(&["ep-1"]));
}

pub(super) async fn filter_update_and_delete(s: Arc<dyn Store>) {
    for (i, city) in ["Kyiv", "Lviv"].iter().enumerate() {
        register(
            &*s,
            "t1",
            &format!("ep-{i}"),
            "app-v1",
            json!({ "city": city }),
        )
        .await;
    }
    create(&*s, "t1", "app", "f1", KYIV()).await;
    let f = wait_active(&*s, "t1", "f1").await;
    let update = |patch: FilterPatch, pre: Precondition| FilterCommand::Update {
        id: fid("f1"),
        app: app("app"),
        patch,
        precondition: pre,
    };
    // Renaming keeps it active and its membership; the tag changes.
    let renamed = s
        .execute_filter(
            update(
                FilterPatch::parse(Some("renamed"), None, None).unwrap(),
                Precondition::OneOf(vec![f.etag()]),
            ),
            ctx("t1"),
        )
        .await
        .unwrap();
    assert_eq!(renamed.status, FilterStatus::Active);
    assert_eq!(renamed.matched, 1);
    assert_ne!(renamed.etag(), f.etag());
    // A stale tag is refused and changes nothing.
    let stale = s
        .execute_filter(
            update(
                FilterPatch::parse(Some("again"), None, None).unwrap(),
                Precondition::OneOf(vec![f.etag()]),
            ),
            ctx("t1"),
        )
        .await;
    assert!(matches!(
        rejected(stale),
        DomainError::PreconditionFailed { .. }
    ));
    // Names are unique per application, not across applications.
    s.execute_filter(create_cmd("app", "f2", "renamed", json!({})), ctx("t1"))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
        .expect_err("duplicate name refused");
    s.execute_filter(create_cmd("other", "f3", "renamed", json!({})), ctx("t1"))
        .await
        .unwrap();
    // Another application does not see the filter.
    let foreign = s
        .execute_filter(
            FilterCommand::Delete {
                id: fid("f1"),
                app: app("other"),
                precondition: Precondition::None,
            },
            ctx("t1"),
        )
        .await;
    assert!(matches!(rejected(foreign), DomainError::NotFound { .. }));
    // A new query sends it back to pending and rebuilds the membership.
    let lviv = json!({"metadata": {"$elemMatch": {"key": "city", "value": "Lviv"}}});
    let changed = s
        .execute_filter(
            update(
                FilterPatch::parse(None, None, Some(&lviv)).unwrap(),
                Precondition::None,
            ),
            ctx("t1"),
        )
        .await
        .unwrap();
    assert_eq!(changed.status, FilterStatus::Pending);
    wait_active(&*s, "t1", "f1").await;
    assert_eq!(members(&*s, "t1", "f1").await, set(&["ep-1"]));
    // Deleting removes the filter and its membership.
    let deleted = s
        .execute_filter(
            FilterCommand::Delete {
                id: fid("f1"),
                app: app("app"),
                precondition: Precondition::Any,
            },
            ctx("t1"),
        )
        .await
        .unwrap();
    assert_eq!(deleted.id, fid("f1"));
    assert!(s
        .get_filter(&tenant("t1"), &fid("f1"))
        .await
        .unwrap()
        .is_none());
    assert!(members(&*s, "t1", "f1").await.is_empty());
    put(&*s, "t1", "ep-1", "x", json!(1)).await; // no events for a deleted filter
    let kinds: Vec<String> = filter_events(&*s)
        .await
        .iter()
        .filter(|e| e.filter_id.as_str() == "f1")
        .map(kind_of)
        .collect();
    assert_eq!(
        kinds,
        [
            "f1 pending",
            "f1 activated",
            "f1 pending",
            "f1 activated",
            "f1 deleted"
        ]
    );
}

pub(super) async fn filter_tenants_isolated(s: Arc<dyn Store>) {
    register(&*s, "t1", "ep-1", "app-v1", json!({"city": "Kyiv"})).await;
    register(&*s, "t2", "ep-1", "app-v1", json!({"city": "Kyiv"})).await;
    create(&*s, "t1", "app", "f1", KYIV()).await;
    wait_active(&*s, "t1", "f1").await;
    assert!(s
        .get_filter(&tenant("t2"), &fid("f1"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .matched_filters(&tenant("t2"), &[id("ep-1")])
        .await
        .unwrap()
        .is_empty());
    // The same ID may exist in another tenant.
    create(
        &*s,
        "t2",
        "app",
        "f1",
        json!({"application_version": "app-v9"}),
    )
    .await;
    wait_active(&*s, "t2", "f1").await;
    assert!(members(&*s, "t2", "f1").await.is_empty());
    assert_eq!(members(&*s, "t1", "f1").await, set(&["ep-1"]));
}

/// A small deterministic generator (xorshift), so a failure replays from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn queries() -> Vec<Value> {
    vec![
        json!({"metadata": {"$elemMatch": {"key": "k0", "value": {"$gte": 2}}}}),
        json!({"application_version": "app-v2"}),
        json!({"$or": [{"metadata": {"$elemMatch": {"key": "k1", "value": "a"}}},
                       {"metadata": {"$size": 0}}]}),
        json!({"metadata": {"$not": {"$elemMatch": {"key": "k2"}}}}),
        json!({"$and": [{"application_version": {"$in": ["app-v1", "app-v3"]}},
                        {"metadata": {"$elemMatch": {"key": "k3", "value": {"$type": "string"}}}}]}),
    ]
}

/// One random write to one of 40 endpoints of application `app` in tenant `t`.
async fn random_write(s: &dyn Store, t: &str, rng: &mut Rng, c: &WriteCtx) {
    let ep = format!("e{}", rng.below(40));
    let value = match rng.below(4) {
        0 => json!(rng.below(4)),
        1 => json!(["a", "b"][rng.below(2) as usize]),
        2 => json!(null),
        _ => json!({"x": rng.below(3)}),
    };
    let key = MetadataKey::parse(&format!("k{}", rng.below(4)), &Limits::default()).unwrap();
    let cmd = match rng.below(6) {
        0 => Command::Register(super::reg(
            &ep,
            &format!("app-v{}", 1 + rng.below(3)),
            &format!("tok-{ep}-{}", rng.below(1_000_000)),
            json!({"k0": rng.below(4), "k3": "s"}),
        )),
        1 => Command::Unregister {
            id: id(&ep),
            precondition: Precondition::None,
        },
        2 => Command::SetAppVersion {
            id: id(&ep),
            app: app("app"),
            app_version: AppVersionName::parse(&format!("app-v{}", 1 + rng.below(3))).unwrap(),
            precondition: Precondition::None,
        },
        3 => Command::UpdateMetadata {
            id: id(&ep),
            change: MetadataChange::DeleteKey(key),
            precondition: Precondition::None,
        },
        _ => Command::UpdateMetadata {
            id: id(&ep),
            change: MetadataChange::PutKey(key, value),
            precondition: Precondition::None,
        },
    };
    // Refusals (duplicate, missing endpoint or key) are part of the sequence.
    let _ = s
        .execute(
            cmd,
            WriteCtx {
                tenant: tenant(t),
                ..c.clone()
            },
        )
        .await;
}

/// Random writes race the back-fill of filters created in the middle of them; afterwards
/// every filter's stored membership (built by back-fill plus live matching) equals a fresh
/// evaluation, its count equals its membership, and a filter back-filled after all writes
/// agrees with it.
pub(super) async fn filter_live_vs_backfill(s: Arc<dyn Store>) {
    let queries = queries();
    for seed in 1..=6u64 {
        let t = format!("seed{seed}");
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let c = ctx(&t);
        for _ in 0..60 {
            random_write(&*s, &t, &mut rng, &c).await;
        }
        // Filters are created while writes go on.
        let creator = {
            let (s, t, queries) = (s.clone(), t.clone(), queries.clone());
            tokio::spawn(async move {
                for (i, q) in queries.into_iter().enumerate() {
                    create(&*s, &t, "app", &format!("live{i}"), q).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        for _ in 0..200 {
            random_write(&*s, &t, &mut rng, &c).await;
        }
        creator.await.unwrap();
        for _ in 0..40 {
            random_write(&*s, &t, &mut rng, &c).await;
        }
        for (i, q) in queries.iter().enumerate() {
            let live = format!("live{i}");
            let f = wait_active(&*s, &t, &live).await;
            let expected = reference(&*s, &t, "app", q).await;
            let got = members(&*s, &t, &live).await;
            assert_eq!(got, expected, "seed {seed}, query {q}");
            assert_eq!(f.matched as usize, got.len(), "seed {seed}, count of {q}");
            // Membership events alternate per endpoint and end in the stored state.
            let mut last: HashMap<String, bool> = HashMap::new();
            for e in filter_events(&*s).await {
                if e.tenant.as_str() != t || e.filter_id.as_str() != live {
                    continue;
                }
                let (ep, matched) = match &e.kind {
                    FilterEventKind::EndpointMatched { endpoint_id, .. } => (endpoint_id, true),
                    FilterEventKind::EndpointUnmatched { endpoint_id, .. } => (endpoint_id, false),
                    _ => continue,
                };
                let before = last.insert(ep.to_string(), matched);
                assert_ne!(
                    before,
                    Some(matched),
                    "seed {seed}, {q}: repeated event for {ep}"
                );
            }
            for (ep, matched) in last {
                assert_eq!(
                    got.contains(&ep),
                    matched,
                    "seed {seed}, {q}: last event of {ep}"
                );
            }
            let fresh = format!("fresh{i}");
            create(&*s, &t, "app", &fresh, q.clone()).await;
            wait_active(&*s, &t, &fresh).await;
            assert_eq!(
                members(&*s, &t, &fresh).await,
                got,
                "seed {seed}, fresh {q}"
            );
        }
    }
}
