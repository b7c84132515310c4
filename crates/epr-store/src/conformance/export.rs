//! Conformance of export and import: what one store exports, another (here: another tenant
//! of the same store) imports into the same endpoints, filters and memberships, silently and
//! idempotently.

use super::filters::{create, members, put, wait_active, KYIV};
use super::{ctx, id, reg, register, rejected, tenant};
use epr_core::command::Command;
use epr_core::endpoint::Endpoint;
use epr_core::event::{FilterEventKind, OutboxEvent};
use epr_core::ids::{AppName, EndpointToken};
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, Store};
use epr_core::DomainError;
use serde_json::json;
use std::sync::Arc;

/// Every endpoint of a tenant, through pages of `page` records.
async fn export_all(s: &dyn Store, t: &str, page: usize) -> Vec<EndpointExport> {
    let mut out: Vec<EndpointExport> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.endpoint.incarnation);
        let next = s.export_endpoints(&tenant(t), after, page).await.unwrap();
        assert!(next.len() <= page);
        if next.is_empty() {
            return out;
        }
        out.extend(next);
    }
}

/// The record without what is the store's own (its incarnation).
fn portable(e: &Endpoint) -> Endpoint {
    Endpoint {
        incarnation: 0,
        ..e.clone()
    }
}

async fn records_for(s: &dyn Store, from: &str, to: &str) -> Vec<ImportRecord> {
    let mut records: Vec<ImportRecord> = s
        .export_filters(&tenant(from))
        .await
        .unwrap()
        .into_iter()
        .map(|filter| ImportRecord::Filter {
            tenant: tenant(to),
            filter,
        })
        .collect();
    for mut e in export_all(s, from, 2).await {
        e.tenant = tenant(to);
        records.push(ImportRecord::Endpoint(e));
    }
    records
}

pub(super) async fn export_import_round_trip(s: Arc<dyn Store>) {
    for (ep, city) in [("ep-a", "Kyiv"), ("ep-b", "Lviv"), ("ep-c", "Kyiv")] {
        register(&*s, "t1", ep, "app-v1", json!({"city": city})).await;
    }
    register(&*s, "t1", "ep-d", "other-v1", json!({})).await;
    put(&*s, "t1", "ep-a", "n", json!(1)).await;
    create(&*s, "t1", "app", "f-kyiv", KYIV()).await;
    wait_active(&*s, "t1", "f-kyiv").await;

    assert!(s.export_tenants().await.unwrap().contains(&tenant("t1")));
    let exported = export_all(&*s, "t1", 2).await;
    let ids: Vec<_> = exported.iter().map(|e| e.endpoint.id.to_string()).collect();
    assert_eq!(ids, ["ep-a", "ep-b", "ep-c", "ep-d"], "registration order");
    let app = AppName::parse("app").unwrap();
    assert_eq!(
        exported[0].token_hash,
        EndpointToken::parse("tok-ep-a").unwrap().hash(&app),
        "the token hash is exported"
    );
    let original_a = s.get(&tenant("t1"), &id("ep-a")).await.unwrap().unwrap();
    assert_eq!(exported[0].endpoint, original_a);
    assert!(original_a.version > 1 && original_a.metadata_updated.is_some());

    let last_event = s
        .outbox_pending(0, 1_000_000)
        .await
        .unwrap()
        .last()
        .map_or(0, |e| e.id);
    let records = records_for(&*s, "t1", "t2").await;
    assert_eq!(records.len(), 5);
    let outcomes = s.import(records.clone()).await.unwrap();
    assert!(
        outcomes.iter().all(|o| *o == ImportOutcome::Imported),
        "{outcomes:?}"
    );

    // The same endpoints, with their timestamps, versions and metadata.
    for ep in ["ep-a", "ep-b", "ep-c", "ep-d"] {
        let before = s.get(&tenant("t1"), &id(ep)).await.unwrap().unwrap();
        let after = s.get(&tenant("t2"), &id(ep)).await.unwrap().unwrap();
        assert_eq!(portable(&before), portable(&after), "{ep}");
    }
    let reimported = export_all(&*s, "t2", 3).await;
    let ids2: Vec<_> = reimported
        .iter()
        .map(|e| e.endpoint.id.to_string())
        .collect();
    assert_eq!(ids, ids2, "registration order is kept");
    assert!(reimported
        .iter()
        .zip(&exported)
        .all(|(a, b)| a.token_hash == b.token_hash));
    // The token still belongs to its endpoint: registering another endpoint with it fails.
    let taken = s
        .execute(
            Command::Register(reg("ep-new", "app-v1", "tok-ep-a", json!({}))),
            ctx("t2"),
        )
        .await;
    assert!(
        matches!(
            rejected(taken),
            DomainError::Conflict {
                field: "endpointToken",
                ..
            }
        ),
        "the imported token hash is in use"
    );

    // The same filter, active after its back-fill, with the same members.
    let f = wait_active(&*s, "t2", "f-kyiv").await;
    let original = s.get_filter(&tenant("t1"), &f.id).await.unwrap().unwrap();
    assert_eq!(
        (&f.app, &f.spec.name, &f.spec.description, &f.spec.query),
        (
            &original.app,
            &original.spec.name,
            &original.spec.description,
            &original.spec.query
        )
    );
    assert_eq!((f.created, f.updated), (original.created, original.updated));
    assert_eq!(
        members(&*s, "t2", "f-kyiv").await,
        members(&*s, "t1", "f-kyiv").await
    );
    assert_eq!(f.matched, 2);

    // Silent: no registration or membership events; only the back-fill's `activated`.
    let events = s.outbox_pending(last_event, 1_000_000).await.unwrap();
    for e in &events {
        match &e.event {
            OutboxEvent::Filter(f) if matches!(f.kind, FilterEventKind::Activated) => {}
            other => panic!("an import emitted {other:?}"),
        }
    }

    // A re-import changes nothing.
    let again = s.import(records).await.unwrap();
    assert!(
        again.iter().all(|o| *o == ImportOutcome::Exists),
        "{again:?}"
    );
    assert_eq!(export_all(&*s, "t2", 10).await, reimported);
    assert_eq!(
        s.outbox_pending(last_event, 1_000_000).await.unwrap().len(),
        events.len()
    );
}

pub(super) async fn import_conflicts(s: Arc<dyn Store>) {
    register(&*s, "t1", "ep-a", "app-v1", json!({"city": "Kyiv"})).await;
    create(&*s, "t1", "app", "f-kyiv", KYIV()).await;
    let records = records_for(&*s, "t1", "t1").await;
    let (ImportRecord::Filter { filter, .. }, ImportRecord::Endpoint(ep)) =
        (&records[0], &records[1])
    else {
        panic!("a filter then an endpoint: {records:?}");
    };
    // A different ID with a token hash or a filter name in use: refused, nothing stored.
    let mut other_ep = ep.clone();
    other_ep.endpoint.id = id("ep-z");
    let mut other_filter = filter.clone();
    other_filter.id = epr_core::endpoint_filter::FilterId::parse("f-other").unwrap();
    let outcomes = s
        .import(vec![
            ImportRecord::Endpoint(other_ep),
            ImportRecord::Filter {
                tenant: tenant("t1"),
                filter: other_filter.clone(),
            },
            ImportRecord::Endpoint(ep.clone()),
        ])
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0], ImportOutcome::Conflict(m) if m.contains("token")),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[1], ImportOutcome::Conflict(m) if m.contains("already has a filter")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], ImportOutcome::Exists);
    assert!(s.get(&tenant("t1"), &id("ep-z")).await.unwrap().is_none());
    assert!(s
        .get_filter(&tenant("t1"), &other_filter.id)
        .await
        .unwrap()
        .is_none());
    // An import into an application with an active filter keeps membership live.
    wait_active(&*s, "t1", "f-kyiv").await;
    let mut kyiv = ep.clone();
    kyiv.endpoint.id = id("ep-k");
    kyiv.token_hash = EndpointToken::parse("tok-k")
        .unwrap()
        .hash(&AppName::parse("app").unwrap());
    // Without token rows: its one token comes from `token_hash`.
    kyiv.tokens.clear();
    let outcomes = s.import(vec![ImportRecord::Endpoint(kyiv)]).await.unwrap();
    assert_eq!(outcomes, [ImportOutcome::Imported]);
    assert_eq!(
        members(&*s, "t1", "f-kyiv").await,
        ["ep-a".to_string(), "ep-k".to_string()].into()
    );
}
