//! The conformance suite: behaviour every [`Store`] backend must show, written against the
//! trait only. A backend runs it with [`run_all`], giving a factory of fresh, empty stores.

use epr_core::command::{Command, Effect, MetadataChange, Registration, WriteCtx};
use epr_core::endpoint::Precondition;
use epr_core::event::{EventKind, OutboxEvent, TokenEventKind};
use epr_core::ids::{AppName, AppVersionName, EndpointId, EndpointToken, TenantId};
use epr_core::metadata::{Limits, Metadata, MetadataKey};
use epr_core::ports::{BatchItem, BatchRequest, Store, StoreError};
use epr_core::query::{EndpointQuery, MetadataCondition, PageRequest};
use epr_core::{DomainError, Timestamp};
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

type Case = fn(Arc<dyn Store>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("register_then_get", |s| Box::pin(register_then_get(s))),
    ("duplicate_id_is_refused", |s| {
        Box::pin(duplicate_id_is_refused(s))
    }),
    ("token_unique_per_app", |s| {
        Box::pin(token_unique_per_app(s))
    }),
    ("tenants_are_isolated", |s| {
        Box::pin(tenants_are_isolated(s))
    }),
    ("metadata_updates", |s| Box::pin(metadata_updates(s))),
    ("preconditions", |s| Box::pin(preconditions(s))),
    ("app_version_update", |s| Box::pin(app_version_update(s))),
    ("unregister_frees_id_and_token", |s| {
        Box::pin(unregister_frees_id_and_token(s))
    }),
    ("listing_pages_and_filters", |s| {
        Box::pin(listing_pages_and_filters(s))
    }),
    ("metadata_keys_by_version", |s| {
        Box::pin(metadata_keys_by_version(s))
    }),
    ("batch_registration", |s| Box::pin(batch_registration(s))),
    ("outbox_order_and_ack", |s| {
        Box::pin(outbox_order_and_ack(s))
    }),
    ("concurrent_writes", |s| Box::pin(concurrent_writes(s))),
    ("filter_lifecycle", |s| {
        Box::pin(filters::filter_lifecycle(s))
    }),
    ("filter_live_matching", |s| {
        Box::pin(filters::filter_live_matching(s))
    }),
    ("filter_update_and_delete", |s| {
        Box::pin(filters::filter_update_and_delete(s))
    }),
    ("filter_tenants_isolated", |s| {
        Box::pin(filters::filter_tenants_isolated(s))
    }),
    ("filter_live_vs_backfill", |s| {
        Box::pin(filters::filter_live_vs_backfill(s))
    }),
    ("export_import_round_trip", |s| {
        Box::pin(export::export_import_round_trip(s))
    }),
    ("import_conflicts_and_validation", |s| {
        Box::pin(export::import_conflicts(s))
    }),
    ("listing_agrees_with_reference", |s| {
        Box::pin(listing::listing_agrees_with_reference(s))
    }),
    ("settings_round_trip", |s| Box::pin(settings_round_trip(s))),
    ("token_life_cycle", |s| {
        Box::pin(credentials::token_life_cycle(s))
    }),
    ("find_token_by_hash", |s| {
        Box::pin(credentials::find_token_by_hash(s))
    }),
    ("list_tokens_order_filter_paging", |s| {
        Box::pin(credentials::list_tokens_order_filter_paging(s))
    }),
    ("unregister_revokes_and_deletes_tokens", |s| {
        Box::pin(credentials::unregister_revokes_and_deletes_tokens(s))
    }),
    ("issue_with_taken_hash_or_id", |s| {
        Box::pin(credentials::issue_with_taken_hash_or_id(s))
    }),
    ("claims_create_get_list_delete", |s| {
        Box::pin(credentials::claims_create_get_list_delete(s))
    }),
    ("self_registration_uses_claims", |s| {
        Box::pin(credentials::self_registration_uses_claims(s))
    }),
    ("reregistration_policies", |s| {
        Box::pin(credentials::reregistration_policies(s))
    }),
    ("concurrent_self_registrations", |s| {
        Box::pin(credentials::concurrent_self_registrations(s))
    }),
    ("rejections_recorded_and_trimmed", |s| {
        Box::pin(credentials::rejections_recorded_and_trimmed(s))
    }),
    ("export_import_keeps_tokens", |s| {
        Box::pin(credentials::export_import_keeps_tokens(s))
    }),
    ("purge_tenant_credentials", |s| {
        Box::pin(credentials::purge_tenant_credentials(s))
    }),
];

mod credentials;
mod export;
pub(crate) mod filters;
mod listing;

/// Runs every case on a fresh store from `make`, naming the case that fails.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    for (name, case) in CASES {
        eprintln!("conformance: {name}");
        case(make().await).await;
    }
}

pub(crate) fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

pub(crate) fn ctx(t: &str) -> WriteCtx {
    WriteCtx {
        tenant: tenant(t),
        now: Timestamp(1_700_000_000_000),
        correlation_id: "corr-1".into(),
        limits: Limits::default(),
    }
}

pub(crate) fn reg(id: &str, version: &str, token: &str, md: Value) -> Registration {
    let app = AppName::parse(version.rsplit_once('-').unwrap().0).unwrap();
    Registration {
        id: EndpointId::parse(id).unwrap(),
        app_version: AppVersionName::parse(version).unwrap(),
        metadata: Metadata::parse(md, "metadata", &Limits::default()).unwrap(),
        token_hash: EndpointToken::parse(token).unwrap().hash(&app),
        token_id: epr_core::ids::TokenId::parse(
            &EndpointToken::parse(token).unwrap().hash(&app).to_hex()[..32],
        )
        .unwrap(),
        app,
    }
}

pub(crate) async fn register(s: &dyn Store, t: &str, id: &str, version: &str, md: Value) -> Effect {
    s.execute(
        Command::Register(reg(id, version, &format!("tok-{id}"), md)),
        ctx(t),
    )
    .await
    .expect("registration succeeds")
}

fn id(s: &str) -> EndpointId {
    EndpointId::parse(s).unwrap()
}

fn key(k: &str) -> MetadataKey {
    MetadataKey::parse(k, &Limits::default()).unwrap()
}

async fn update(
    s: &dyn Store,
    ep: &str,
    change: MetadataChange,
    pre: Precondition,
) -> Result<Effect, StoreError> {
    s.execute(
        Command::UpdateMetadata {
            id: id(ep),
            change,
            precondition: pre,
        },
        ctx("t1"),
    )
    .await
}

fn rejected<T: std::fmt::Debug>(r: Result<T, StoreError>) -> DomainError {
    match r {
        Err(StoreError::Rejected(e)) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn register_then_get(s: Arc<dyn Store>) {
    let e = register(&*s, "t1", "ep-1", "app-v1", json!({"city": "Kyiv", "n": 1})).await;
    let got = s.get(&tenant("t1"), &id("ep-1")).await.unwrap().unwrap();
    assert_eq!(&got, e.endpoint());
    assert_eq!(got.app.as_str(), "app");
    assert_eq!(got.metadata.get("city"), Some(&json!("Kyiv")));
    assert_eq!(got.created, Timestamp(1_700_000_000_000));
    assert!(s.get(&tenant("t1"), &id("nope")).await.unwrap().is_none());
    let out = s.outbox_pending(0, 10).await.unwrap();
    assert_eq!(out.len(), 2, "registered, then the initial metadata");
    assert_eq!(
        out[0].event.as_endpoint().expect("an endpoint event").kind,
        EventKind::Registered
    );
    assert_eq!(out[0].event.correlation_id(), "corr-1");
    match &out[1].event.as_endpoint().expect("an endpoint event").kind {
        EventKind::MetadataUpdated(d) => {
            assert_eq!(d.added.len(), 2);
            assert!(d.removed.is_empty() && d.updated.is_empty());
        }
        other => panic!("expected metadata.updated, got {other:?}"),
    }
}

async fn duplicate_id_is_refused(s: Arc<dyn Store>) {
    register(&*s, "t1", "ep-1", "app-v1", json!({"a": 1})).await;
    let again = s
        .execute(
            Command::Register(reg("ep-1", "app-v1", "other", json!({}))),
            ctx("t1"),
        )
        .await;
    assert!(matches!(
        rejected(again),
        DomainError::Conflict {
            field: "endpointId",
            ..
        }
    ));
    let got = s.get(&tenant("t1"), &id("ep-1")).await.unwrap().unwrap();
    assert_eq!(
        got.metadata.get("a"),
        Some(&json!(1)),
        "the first registration stands"
    );
    assert_eq!(
        s.outbox_pending(0, 10).await.unwrap().len(),
        2,
        "registered + initial metadata of the first; no event for a refusal"
    );
}

async fn token_unique_per_app(s: Arc<dyn Store>) {
    let r = |i: &str, v: &str| Command::Register(reg(i, v, "shared", json!({})));
    s.execute(r("a1", "app-v1"), ctx("t1")).await.unwrap();
    let dup = s.execute(r("a2", "app-v2"), ctx("t1")).await;
    assert!(matches!(
        rejected(dup),
        DomainError::Conflict {
            field: "endpointToken",
            ..
        }
    ));
    assert!(
        s.get(&tenant("t1"), &id("a2")).await.unwrap().is_none(),
        "nothing half-written"
    );
    s.execute(r("b1", "other-v1"), ctx("t1"))
        .await
        .expect("another application may reuse it");
}

async fn tenants_are_isolated(s: Arc<dyn Store>) {
    register(&*s, "t1", "same", "app-v1", json!({"owner": 1})).await;
    register(&*s, "t2", "same", "app-v1", json!({"owner": 2})).await;
    let one = s.get(&tenant("t1"), &id("same")).await.unwrap().unwrap();
    let two = s.get(&tenant("t2"), &id("same")).await.unwrap().unwrap();
    assert_eq!(one.metadata.get("owner"), Some(&json!(1)));
    assert_eq!(two.metadata.get("owner"), Some(&json!(2)));
    assert!(s.get(&tenant("t3"), &id("same")).await.unwrap().is_none());
    let page = PageRequest {
        offset: 0,
        limit: 10,
        after: None,
    };
    let listed = s
        .list(&tenant("t2"), &EndpointQuery::default(), page)
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
    s.execute(
        Command::Unregister {
            id: id("same"),
            precondition: Precondition::None,
        },
        ctx("t1"),
    )
    .await
    .unwrap();
    assert!(s.get(&tenant("t2"), &id("same")).await.unwrap().is_some());
}

async fn metadata_updates(s: Arc<dyn Store>) {
    register(&*s, "t1", "ep", "app-v1", json!({"a": 1, "b": 2})).await;
    let e = update(
        &*s,
        "ep",
        MetadataChange::PutKey(key("c"), json!("x")),
        Precondition::None,
    )
    .await
    .unwrap();
    assert!(matches!(e, Effect::Update(_)));
    let e = update(
        &*s,
        "ep",
        MetadataChange::MergePatch(json!({"a": null, "b": 3})),
        Precondition::None,
    )
    .await
    .unwrap();
    assert_eq!(e.endpoint().metadata.to_value(), json!({"b": 3, "c": "x"}));
    let unchanged = update(
        &*s,
        "ep",
        MetadataChange::PutKey(key("b"), json!(3)),
        Precondition::None,
    )
    .await
    .unwrap();
    assert!(matches!(unchanged, Effect::Unchanged(_)));
    let missing = update(
        &*s,
        "ep",
        MetadataChange::DeleteKey(key("zz")),
        Precondition::None,
    )
    .await;
    assert!(matches!(rejected(missing), DomainError::NotFound { .. }));
    let got = s.get(&tenant("t1"), &id("ep")).await.unwrap().unwrap();
    assert_eq!(got.metadata.to_value(), json!({"b": 3, "c": "x"}));
    assert_eq!(got.metadata_version, 3);
    let events = s.outbox_pending(0, 10).await.unwrap();
    assert_eq!(
        events.len(),
        4,
        "registered + initial metadata + two real changes"
    );
    match &events[3]
        .event
        .as_endpoint()
        .expect("an endpoint event")
        .kind
    {
        EventKind::MetadataUpdated(d) => {
            assert_eq!(d.removed.get("a"), Some(&json!(1)));
            assert_eq!(d.updated.get("b"), Some(&(json!(2), json!(3))));
        }
        other => panic!("{other:?}"),
    }
}

async fn preconditions(s: Arc<dyn Store>) {
    let e = register(&*s, "t1", "ep", "app-v1", json!({})).await;
    let tag = e.endpoint().metadata_etag();
    let stale = Precondition::OneOf(vec!["\"0-m0\"".into()]);
    let r = update(&*s, "ep", MetadataChange::PutKey(key("k"), json!(1)), stale).await;
    assert!(matches!(
        rejected(r),
        DomainError::PreconditionFailed { .. }
    ));
    let ok = update(
        &*s,
        "ep",
        MetadataChange::PutKey(key("k"), json!(1)),
        Precondition::OneOf(vec![tag.clone()]),
    )
    .await
    .unwrap();
    assert_ne!(ok.endpoint().metadata_etag(), tag);
    let again = update(
        &*s,
        "ep",
        MetadataChange::PutKey(key("k"), json!(2)),
        Precondition::OneOf(vec![tag]),
    )
    .await;
    assert!(
        matches!(rejected(again), DomainError::PreconditionFailed { .. }),
        "old tag is stale"
    );
    let gone = s
        .execute(
            Command::Unregister {
                id: id("ep"),
                precondition: Precondition::OneOf(vec!["\"x\"".into()]),
            },
            ctx("t1"),
        )
        .await;
    assert!(matches!(
        rejected(gone),
        DomainError::PreconditionFailed { .. }
    ));
    assert!(s.get(&tenant("t1"), &id("ep")).await.unwrap().is_some());
}

async fn app_version_update(s: Arc<dyn Store>) {
    register(&*s, "t1", "ep", "app-v1", json!({})).await;
    let cmd = Command::SetAppVersion {
        id: id("ep"),
        app: AppName::parse("app").unwrap(),
        app_version: AppVersionName::parse("app-v2").unwrap(),
        precondition: Precondition::None,
    };
    s.execute(cmd.clone(), ctx("t1")).await.unwrap();
    let got = s.get(&tenant("t1"), &id("ep")).await.unwrap().unwrap();
    assert_eq!(got.app_version.as_str(), "app-v2");
    assert!(matches!(
        s.execute(cmd, ctx("t1")).await.unwrap(),
        Effect::Unchanged(_)
    ));
    let events = s.outbox_pending(0, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        matches!(&events[1].event.as_endpoint().expect("an endpoint event").kind, EventKind::AppVersionUpdated { previous } if previous.as_str() == "app-v1")
    );
}

async fn unregister_frees_id_and_token(s: Arc<dyn Store>) {
    let first = register(&*s, "t1", "ep", "app-v1", json!({})).await;
    s.execute(
        Command::Unregister {
            id: id("ep"),
            precondition: Precondition::Any,
        },
        ctx("t1"),
    )
    .await
    .unwrap();
    assert!(s.get(&tenant("t1"), &id("ep")).await.unwrap().is_none());
    let again = s
        .execute(
            Command::Unregister {
                id: id("ep"),
                precondition: Precondition::None,
            },
            ctx("t1"),
        )
        .await;
    assert!(matches!(rejected(again), DomainError::NotFound { .. }));
    let second = register(&*s, "t1", "ep", "app-v1", json!({})).await;
    assert_ne!(
        first.endpoint().etag(),
        second.endpoint().etag(),
        "a new registration, a new tag"
    );
    // The unregistration revokes the endpoint's token (an event of its own, after it).
    let kinds: Vec<_> = s
        .outbox_pending(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| match e.event {
            OutboxEvent::Endpoint(e) => format!("{:?}", e.kind),
            OutboxEvent::Token(t) => format!("token {:?}", t.kind),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let token_id = reg("ep", "app-v1", "tok-ep", json!({})).token_id;
    assert_eq!(
        kinds,
        vec![
            format!("{:?}", EventKind::Registered),
            format!("{:?}", EventKind::Unregistered),
            format!(
                "token {:?}",
                TokenEventKind::Revoked {
                    token_ids: vec![token_id]
                }
            ),
            format!("{:?}", EventKind::Registered),
        ]
    );
}

async fn listing_pages_and_filters(s: Arc<dyn Store>) {
    for i in 0..25 {
        let version = if i % 2 == 0 { "app-v1" } else { "app-v2" };
        register(
            &*s,
            "t1",
            &format!("ep-{i:02}"),
            version,
            json!({"i": i, "even": i % 2 == 0}),
        )
        .await;
    }
    register(&*s, "t1", "other", "zzz-v1", json!({})).await;
    let t = tenant("t1");
    let q = EndpointQuery {
        app: Some(AppName::parse("app").unwrap()),
        ..Default::default()
    };
    let p1 = s
        .list(
            &t,
            &q,
            PageRequest {
                offset: 0,
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(p1.total, 25);
    let ids: Vec<_> = p1.items.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids[0], "ep-00");
    assert_eq!(ids[9], "ep-09", "registration order");
    let p3 = s
        .list(
            &t,
            &q,
            PageRequest {
                offset: 20,
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(p3.items.len(), 5);
    let beyond = s
        .list(
            &t,
            &q,
            PageRequest {
                offset: 100,
                limit: 10,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!((beyond.total, beyond.items.len()), (25, 0));
    let all = s
        .list(
            &t,
            &EndpointQuery::default(),
            PageRequest {
                offset: 0,
                limit: 100,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(all.total, 26);
    let v2 = EndpointQuery {
        app_version: Some(AppVersionName::parse("app-v2").unwrap()),
        ..Default::default()
    };
    assert_eq!(
        s.list(
            &t,
            &v2,
            PageRequest {
                offset: 0,
                limit: 1,
                after: None,
            }
        )
        .await
        .unwrap()
        .total,
        12
    );
    let by_ids = EndpointQuery {
        endpoint_ids: vec![id("ep-03"), id("other"), id("nope")],
        ..Default::default()
    };
    assert_eq!(
        s.list(
            &t,
            &by_ids,
            PageRequest {
                offset: 0,
                limit: 10,
                after: None,
            }
        )
        .await
        .unwrap()
        .total,
        2
    );
    let md = EndpointQuery {
        app: Some(AppName::parse("app").unwrap()),
        metadata: MetadataCondition::parse_param("even=true").unwrap(),
        ..Default::default()
    };
    let page = s
        .list(
            &t,
            &md,
            PageRequest {
                offset: 2,
                limit: 3,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.total, 13);
    let ids: Vec<_> = page.items.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids, vec!["ep-04", "ep-06", "ep-08"]);
}

async fn metadata_keys_by_version(s: Arc<dyn Store>) {
    register(&*s, "t1", "a", "app-v1", json!({"x": 1, "y": 2})).await;
    register(&*s, "t1", "b", "app-v1", json!({"z": 1})).await;
    register(&*s, "t1", "c", "app-v2", json!({"x": 1})).await;
    register(&*s, "t1", "d", "other-v1", json!({"secret": 1})).await;
    register(&*s, "t2", "e", "app-v1", json!({"t2only": 1})).await;
    let keys = s
        .metadata_keys(&tenant("t1"), &AppName::parse("app").unwrap())
        .await
        .unwrap();
    let v1: Vec<_> = keys["app-v1"].iter().cloned().collect();
    assert_eq!(v1, vec!["x", "y", "z"]);
    assert_eq!(keys["app-v2"].len(), 1);
    assert_eq!(keys.len(), 2);
}

async fn batch_registration(s: Arc<dyn Store>) {
    register(&*s, "t1", "taken", "app-v1", json!({})).await;
    let item = |r: Result<Registration, String>, eid: &str| BatchItem {
        endpoint_id: Some(eid.to_owned()),
        registration: r,
        metadata_text: "{}".into(),
    };
    let batch = BatchRequest {
        task_id: "task-1".into(),
        app: AppName::parse("app").unwrap(),
        items: vec![
            item(Ok(reg("b1", "app-v1", "t-b1", json!({"k": 1}))), "b1"),
            item(Err("endpointId: must match".into()), "bad id"),
            item(Ok(reg("taken", "app-v1", "t-x", json!({}))), "taken"),
            item(Ok(reg("b1", "app-v1", "t-b1-again", json!({}))), "b1"),
            item(Ok(reg("b2", "app-v1", "t-b1", json!({}))), "b2"),
            item(Ok(reg("b3", "app-v1", "t-b3", json!({}))), "b3"),
        ],
    };
    let out = s.register_batch(batch, ctx("t1")).await.unwrap();
    let created: Vec<_> = out
        .created
        .iter()
        .map(|c| (c.index, c.endpoint_id.to_string()))
        .collect();
    assert_eq!(created, vec![(0, "b1".to_owned()), (5, "b3".to_owned())]);
    let failed: Vec<_> = out.failed.iter().map(|f| f.index).collect();
    assert_eq!(failed, vec![1, 2, 3, 4]);
    assert!(
        out.failed[3].reason.contains("token"),
        "{}",
        out.failed[3].reason
    );
    assert!(s.get(&tenant("t1"), &id("b3")).await.unwrap().is_some());
    assert!(s.get(&tenant("t1"), &id("b2")).await.unwrap().is_none());
    // Each created endpoint has its token row, under the registration's token ID.
    let b3 = reg("b3", "app-v1", "t-b3", json!({}));
    let token = s
        .get_token(&tenant("t1"), &id("b3"), &b3.token_id)
        .await
        .unwrap()
        .expect("the batch registration's token row");
    assert_eq!(
        (token.hash, token.status),
        (b3.token_hash, epr_core::credentials::TokenStatus::Inactive)
    );
    let app = AppName::parse("app").unwrap();
    assert_eq!(
        s.batch_outcome(&tenant("t1"), &app, "task-1")
            .await
            .unwrap(),
        Some(out)
    );
    assert!(s
        .batch_outcome(&tenant("t2"), &app, "task-1")
        .await
        .unwrap()
        .is_none());
    let other = AppName::parse("other").unwrap();
    assert!(s
        .batch_outcome(&tenant("t1"), &other, "task-1")
        .await
        .unwrap()
        .is_none());
}

async fn outbox_order_and_ack(s: Arc<dyn Store>) {
    for i in 0..5 {
        register(&*s, "t1", &format!("e{i}"), "app-v1", json!({})).await;
    }
    let first = s.outbox_pending(0, 3).await.unwrap();
    let ids: Vec<_> = first
        .iter()
        .map(|e| {
            e.event
                .as_endpoint()
                .expect("an endpoint event")
                .endpoint_id
                .to_string()
        })
        .collect();
    assert_eq!(ids, vec!["e0", "e1", "e2"]);
    assert_eq!(s.outbox_depth().await.unwrap(), 5);
    assert!(!s.store_id().is_empty());
    assert_eq!(s.store_id(), s.store_id(), "stable");
    // Reading on from the last published ID does not need the acknowledgement first.
    let after = s.outbox_pending(first[2].id, 10).await.unwrap();
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|e| e.id > first[2].id));
    s.outbox_ack_through(first[2].id).await.unwrap();
    let rest = s.outbox_pending(0, 10).await.unwrap();
    let ids: Vec<_> = rest
        .iter()
        .map(|e| {
            e.event
                .as_endpoint()
                .expect("an endpoint event")
                .endpoint_id
                .to_string()
        })
        .collect();
    assert_eq!(ids, vec!["e3", "e4"]);
    assert_eq!(s.outbox_depth().await.unwrap(), 2);
    // Acknowledging twice (a relay retrying after a lost answer) is harmless.
    s.outbox_ack_through(first[2].id).await.unwrap();
    assert_eq!(s.outbox_depth().await.unwrap(), 2);
}

async fn concurrent_writes(s: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            register(&*s, "t1", &format!("c{i}"), "app-v1", json!({"i": i})).await;
            update(
                &*s,
                &format!("c{i}"),
                MetadataChange::PutKey(key("j"), json!(i)),
                Precondition::None,
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let page = s
        .list(
            &tenant("t1"),
            &EndpointQuery::default(),
            PageRequest {
                offset: 0,
                limit: 1000,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.total, 200);
    assert!(page
        .items
        .iter()
        .all(|e| e.metadata.get("j") == e.metadata.get("i")));
    // registered + initial metadata + one update, per endpoint
    assert_eq!(s.outbox_pending(0, 1000).await.unwrap().len(), 600);
}

async fn settings_round_trip(s: Arc<dyn Store>) {
    assert_eq!(s.get_setting("catalogue").await.unwrap(), None);
    s.put_setting("catalogue", "{\"a\":1}").await.unwrap();
    s.put_setting("other", "x").await.unwrap();
    assert_eq!(
        s.get_setting("catalogue").await.unwrap().as_deref(),
        Some("{\"a\":1}")
    );
    s.put_setting("catalogue", "second").await.unwrap();
    assert_eq!(
        s.get_setting("catalogue").await.unwrap().as_deref(),
        Some("second")
    );
    assert_eq!(s.get_setting("other").await.unwrap().as_deref(), Some("x"));
}
