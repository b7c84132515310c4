//! Conformance of endpoint credentials: token rows (their life cycle, lookups, listings,
//! their end with the endpoint), claim tokens, self-registration in the store's transaction
//! (claims used up once, the re-registration policy, concurrent attempts), recorded
//! rejections, and tokens through export and import.

use super::{ctx, id, rejected, tenant};
use crate::codec::initial_token_id;
use epr_core::command::{Command, Effect, Registration, WriteCtx};
use epr_core::credentials::{
    claim_hash, ClaimBinding, ClaimToken, ClaimUse, IdPattern, RefusalReason, Rejection,
    Reregistration, SelfRegistration, StoredToken, TokenListQuery, TokenStatus, REJECTIONS_KEPT,
};
use epr_core::endpoint::Precondition;
use epr_core::event::{EventKind, OutboxEvent, TokenEventKind};
use epr_core::ids::{AppName, AppVersionName, ClaimId, EndpointToken, TokenHash, TokenId};
use epr_core::metadata::{Limits, Metadata};
use epr_core::ports::{EndpointExport, ImportOutcome, ImportRecord, Store, StoreError};
use epr_core::query::PageRequest;
use epr_core::{DomainError, Timestamp};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;

/// The conformance cases' clock (`super::ctx`), in milliseconds.
const T0: i64 = 1_700_000_000_000;

fn app(a: &str) -> AppName {
    AppName::parse(a).unwrap()
}

fn tid(s: &str) -> TokenId {
    TokenId::parse(s).unwrap()
}

fn cid(s: &str) -> ClaimId {
    ClaimId::parse(s).unwrap()
}

fn hash(a: &str, token: &str) -> TokenHash {
    EndpointToken::parse(token).unwrap().hash(&app(a))
}

/// A write context `ms` milliseconds after the cases' clock.
fn ctx_at(t: &str, ms: i64) -> WriteCtx {
    WriteCtx {
        now: Timestamp(T0 + ms),
        ..ctx(t)
    }
}

fn all() -> PageRequest {
    PageRequest::new(0, 1000)
}

/// A registration of `ep` in the application of `version` with token `token`, whose token
/// row gets the ID `token_id`.
fn registration(ep: &str, version: &str, token: &str, token_id: &str, md: Value) -> Registration {
    let a = app(version.rsplit_once('-').unwrap().0);
    Registration {
        id: id(ep),
        app_version: AppVersionName::parse(version).unwrap(),
        metadata: Metadata::parse(md, "metadata", &Limits::default()).unwrap(),
        token_hash: EndpointToken::parse(token).unwrap().hash(&a),
        token_id: tid(token_id),
        app: a,
    }
}

async fn register(s: &dyn Store, t: &str, ep: &str, token: &str, token_id: &str) -> Effect {
    s.execute(
        Command::Register(registration(ep, "app-v1", token, token_id, json!({}))),
        ctx(t),
    )
    .await
    .expect("registration succeeds")
}

fn issue_cmd(ep: &str, a: &str, token: &str, token_id: &str) -> Command {
    Command::IssueToken {
        id: id(ep),
        app: app(a),
        token_hash: hash(a, token),
        token_id: tid(token_id),
    }
}

async fn issue(s: &dyn Store, t: &str, ep: &str, token: &str, token_id: &str, ms: i64) {
    let effect = s
        .execute(issue_cmd(ep, "app", token, token_id), ctx_at(t, ms))
        .await
        .expect("token issued");
    assert!(
        matches!(effect, Effect::Unchanged(_)),
        "a token write leaves the record: {effect:?}"
    );
}

fn transition_cmd(
    ep: &str,
    token_id: &str,
    target: TokenStatus,
    precondition: Precondition,
    only_from: Option<TokenStatus>,
) -> Command {
    Command::TransitionToken {
        id: id(ep),
        token_id: tid(token_id),
        target,
        precondition,
        only_from,
    }
}

async fn transition(
    s: &dyn Store,
    t: &str,
    ep: &str,
    token_id: &str,
    target: TokenStatus,
    ms: i64,
) -> Result<Effect, StoreError> {
    s.execute(
        transition_cmd(ep, token_id, target, Precondition::None, None),
        ctx_at(t, ms),
    )
    .await
}

async fn token(s: &dyn Store, t: &str, ep: &str, token_id: &str) -> StoredToken {
    s.get_token(&tenant(t), &id(ep), &tid(token_id))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("token {token_id} of {ep} exists"))
}

async fn tokens(s: &dyn Store, t: &str, ep: &str) -> Vec<StoredToken> {
    s.list_tokens(
        &tenant(t),
        &id(ep),
        &TokenListQuery {
            statuses: vec![],
            ascending: true,
        },
        all(),
    )
    .await
    .unwrap()
    .items
}

fn statuses(tokens: &[StoredToken]) -> Vec<(String, TokenStatus)> {
    tokens
        .iter()
        .map(|t| (t.id.to_string(), t.status))
        .collect()
}

/// The ID of the last event in the outbox (0 when empty).
async fn mark(s: &dyn Store) -> i64 {
    s.outbox_pending(0, 1_000_000)
        .await
        .unwrap()
        .last()
        .map_or(0, |e| e.id)
}

async fn events_since(s: &dyn Store, after: i64) -> Vec<OutboxEvent> {
    s.outbox_pending(after, 1_000_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

fn token_kinds(events: &[OutboxEvent]) -> Vec<TokenEventKind> {
    events
        .iter()
        .filter_map(|e| match e {
            OutboxEvent::Token(t) => Some(t.kind.clone()),
            _ => None,
        })
        .collect()
}

fn status_changed(
    token_id: &str,
    previous: Option<TokenStatus>,
    status: TokenStatus,
) -> TokenEventKind {
    TokenEventKind::StatusChanged {
        token_id: tid(token_id),
        previous,
        status,
    }
}

fn revoked(ids: &[&str]) -> TokenEventKind {
    TokenEventKind::Revoked {
        token_ids: ids.iter().map(|i| tid(i)).collect(),
    }
}

/// Revoked token IDs as a set (the order within one event is the store's).
fn revoked_set(kind: &TokenEventKind) -> BTreeSet<String> {
    match kind {
        TokenEventKind::Revoked { token_ids } => token_ids.iter().map(|t| t.to_string()).collect(),
        other => panic!("expected a revocation, got {other:?}"),
    }
}

fn conflict_field(r: Result<Effect, StoreError>) -> &'static str {
    match rejected(r) {
        DomainError::Conflict { field, .. } => field,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn refusal<T: std::fmt::Debug>(r: Result<T, StoreError>) -> RefusalReason {
    match rejected(r) {
        DomainError::Refused(r) => r.reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub(super) async fn token_life_cycle(s: Arc<dyn Store>) {
    let s = &*s;
    register(s, "t1", "ep-1", "tok-1", "id-1").await;
    register(s, "t1", "ep-2", "tok-2", "id-2").await;
    let start = mark(s).await;

    // A registration gives the endpoint one Inactive token under the registration's ID.
    let first = token(s, "t1", "ep-1", "id-1").await;
    assert_eq!(
        first,
        StoredToken {
            id: tid("id-1"),
            endpoint_id: id("ep-1"),
            app: app("app"),
            hash: hash("app", "tok-1"),
            status: TokenStatus::Inactive,
            created: Timestamp(T0),
            updated: None,
        }
    );
    assert_eq!(statuses(&tokens(s, "t1", "ep-1").await).len(), 1);
    let t1 = tenant("t1");
    assert!(
        s.get_token(&t1, &id("ep-1"), &tid("id-2"))
            .await
            .unwrap()
            .is_none(),
        "another endpoint's token is not this endpoint's"
    );
    assert!(s
        .get_token(&t1, &id("ep-1"), &tid("nope"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .get_token(&tenant("t2"), &id("ep-1"), &tid("id-1"))
        .await
        .unwrap()
        .is_none());

    // More tokens: each Inactive, announced.
    issue(s, "t1", "ep-1", "tok-1b", "id-1b", 10).await;
    let second = token(s, "t1", "ep-1", "id-1b").await;
    assert_eq!(
        (second.status, second.created, second.updated),
        (TokenStatus::Inactive, Timestamp(T0 + 10), None)
    );
    assert_eq!(second.hash, hash("app", "tok-1b"));
    // Issuing to an unknown endpoint, or naming another application: refused, nothing kept.
    assert!(matches!(
        rejected(
            s.execute(issue_cmd("nope", "app", "tok-x", "id-x"), ctx("t1"))
                .await
        ),
        DomainError::NotFound { .. }
    ));
    assert!(matches!(
        rejected(s.execute(issue_cmd("ep-1", "other", "tok-x", "id-x"), ctx("t1")).await),
        DomainError::Invalid(v) if v.field == "applicationName"
    ));
    assert_eq!(tokens(s, "t1", "ep-1").await.len(), 2);

    // Inactive → Active on the first validation (only from Inactive).
    let activate = transition_cmd(
        "ep-1",
        "id-1",
        TokenStatus::Active,
        Precondition::None,
        Some(TokenStatus::Inactive),
    );
    s.execute(activate.clone(), ctx_at("t1", 20)).await.unwrap();
    let active = token(s, "t1", "ep-1", "id-1").await;
    assert_eq!(
        (active.status, active.updated),
        (TokenStatus::Active, Some(Timestamp(T0 + 20)))
    );
    assert_ne!(
        active.etag(),
        first.etag(),
        "the entity tag follows the state"
    );
    // Again: already Active, unchanged and silent (a concurrent validation).
    s.execute(activate, ctx_at("t1", 21)).await.unwrap();
    assert_eq!(token(s, "t1", "ep-1", "id-1").await, active);
    // `only_from` refuses another starting state.
    let from_inactive = transition_cmd(
        "ep-1",
        "id-1",
        TokenStatus::Suspended,
        Precondition::None,
        Some(TokenStatus::Inactive),
    );
    assert_eq!(
        conflict_field(s.execute(from_inactive, ctx_at("t1", 22)).await),
        "status"
    );

    // The entity tag precondition.
    let stale = transition_cmd(
        "ep-1",
        "id-1",
        TokenStatus::Suspended,
        Precondition::OneOf(vec![first.etag()]),
        None,
    );
    assert!(matches!(
        rejected(s.execute(stale, ctx_at("t1", 23)).await),
        DomainError::PreconditionFailed { .. }
    ));
    assert_eq!(token(s, "t1", "ep-1", "id-1").await, active);
    let current = transition_cmd(
        "ep-1",
        "id-1",
        TokenStatus::Suspended,
        Precondition::OneOf(vec![active.etag()]),
        None,
    );
    s.execute(current, ctx_at("t1", 30)).await.unwrap();
    let suspended = token(s, "t1", "ep-1", "id-1").await;
    assert_eq!(
        (suspended.status, suspended.updated),
        (TokenStatus::Suspended, Some(Timestamp(T0 + 30)))
    );

    // Never back to Inactive; Revoked is final.
    assert_eq!(
        conflict_field(transition(s, "t1", "ep-1", "id-1", TokenStatus::Inactive, 31).await),
        "status"
    );
    transition(s, "t1", "ep-1", "id-1", TokenStatus::Active, 40)
        .await
        .unwrap();
    transition(s, "t1", "ep-1", "id-1", TokenStatus::Revoked, 50)
        .await
        .unwrap();
    for target in [TokenStatus::Active, TokenStatus::Suspended] {
        assert_eq!(
            conflict_field(transition(s, "t1", "ep-1", "id-1", target, 51).await),
            "status"
        );
    }
    assert_eq!(
        token(s, "t1", "ep-1", "id-1").await.status,
        TokenStatus::Revoked
    );
    // Unknown tokens, and another endpoint's token, are not found.
    for (ep, token_id) in [("ep-1", "nope"), ("ep-1", "id-2"), ("nope", "id-1")] {
        assert!(matches!(
            rejected(transition(s, "t1", ep, token_id, TokenStatus::Suspended, 52).await),
            DomainError::NotFound { .. }
        ));
    }
    assert_eq!(
        token(s, "t1", "ep-2", "id-2").await.status,
        TokenStatus::Inactive
    );

    // Exactly one event per change, in order; refusals and no-ops emit nothing.
    let events = events_since(s, start).await;
    assert!(events.iter().all(|e| matches!(e, OutboxEvent::Token(_))));
    assert_eq!(
        token_kinds(&events),
        vec![
            status_changed("id-1b", None, TokenStatus::Inactive),
            status_changed("id-1", Some(TokenStatus::Inactive), TokenStatus::Active),
            status_changed("id-1", Some(TokenStatus::Active), TokenStatus::Suspended),
            status_changed("id-1", Some(TokenStatus::Suspended), TokenStatus::Active),
            revoked(&["id-1"]),
        ]
    );
    let OutboxEvent::Token(e) = &events[0] else {
        unreachable!()
    };
    assert_eq!(
        (e.tenant.as_str(), e.app.as_str(), e.endpoint_id.as_str()),
        ("t1", "app", "ep-1")
    );
    assert_eq!(
        (e.timestamp, e.correlation_id.as_str()),
        (Timestamp(T0 + 10), "corr-1")
    );
    // The endpoint record itself never changed.
    let ep = s.get(&t1, &id("ep-1")).await.unwrap().unwrap();
    assert_eq!((ep.version, ep.metadata_version), (1, 1));
}

pub(super) async fn find_token_by_hash(s: Arc<dyn Store>) {
    let s = &*s;
    register(s, "t1", "ep-1", "tok-1", "id-1").await;
    issue(s, "t1", "ep-1", "tok-1b", "id-1b", 1).await;
    let t1 = tenant("t1");
    let found = s
        .find_token(&t1, &app("app"), &hash("app", "tok-1b"))
        .await
        .unwrap()
        .expect("found by hash");
    assert_eq!(found, token(s, "t1", "ep-1", "id-1b").await);
    // The hash is scoped by tenant and application.
    assert!(s
        .find_token(&tenant("t2"), &app("app"), &hash("app", "tok-1b"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .find_token(&t1, &app("other"), &hash("app", "tok-1b"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .find_token(&t1, &app("app"), &hash("app", "nope"))
        .await
        .unwrap()
        .is_none());
    // Found whatever its state.
    transition(s, "t1", "ep-1", "id-1", TokenStatus::Revoked, 2)
        .await
        .unwrap();
    let found = s
        .find_token(&t1, &app("app"), &hash("app", "tok-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.id, found.status),
        (tid("id-1"), TokenStatus::Revoked)
    );
}

pub(super) async fn list_tokens_order_filter_paging(s: Arc<dyn Store>) {
    let s = &*s;
    register(s, "t1", "ep-1", "tok-0", "id-0").await;
    register(s, "t1", "ep-2", "tok-other", "id-other").await;
    // Created at 0 (id-0), 10 (id-a), 20 (id-b and id-c: a tie), 30 (id-d).
    issue(s, "t1", "ep-1", "tok-a", "id-a", 10).await;
    issue(s, "t1", "ep-1", "tok-c", "id-c", 20).await;
    issue(s, "t1", "ep-1", "tok-b", "id-b", 20).await;
    issue(s, "t1", "ep-1", "tok-d", "id-d", 30).await;
    transition(s, "t1", "ep-1", "id-a", TokenStatus::Active, 40)
        .await
        .unwrap();
    transition(s, "t1", "ep-1", "id-c", TokenStatus::Suspended, 41)
        .await
        .unwrap();
    transition(s, "t1", "ep-1", "id-d", TokenStatus::Revoked, 42)
        .await
        .unwrap();
    let list = |statuses: Vec<TokenStatus>, ascending: bool, offset: u64, limit: u32| {
        let query = TokenListQuery {
            statuses,
            ascending,
        };
        async move {
            let page = s
                .list_tokens(
                    &tenant("t1"),
                    &id("ep-1"),
                    &query,
                    PageRequest::new(offset, limit),
                )
                .await
                .unwrap();
            let ids: Vec<String> = page.items.iter().map(|t| t.id.to_string()).collect();
            (page.total, ids)
        }
    };
    // Newest first by default, ties by token ID (descending with the rest).
    assert_eq!(
        list(vec![], false, 0, 100).await,
        (
            5,
            vec![
                "id-d".into(),
                "id-c".into(),
                "id-b".into(),
                "id-a".into(),
                "id-0".into()
            ]
        )
    );
    assert_eq!(
        list(vec![], true, 0, 100).await,
        (
            5,
            vec![
                "id-0".into(),
                "id-a".into(),
                "id-b".into(),
                "id-c".into(),
                "id-d".into()
            ]
        )
    );
    // Pages: `total` counts every match.
    assert_eq!(
        list(vec![], false, 1, 2).await,
        (5, vec!["id-c".into(), "id-b".into()])
    );
    assert_eq!(list(vec![], false, 10, 2).await, (5, vec![]));
    // By state.
    assert_eq!(
        list(vec![TokenStatus::Inactive], true, 0, 100).await,
        (2, vec!["id-0".into(), "id-b".into()])
    );
    assert_eq!(
        list(
            vec![TokenStatus::Active, TokenStatus::Suspended],
            false,
            0,
            1
        )
        .await,
        (2, vec!["id-c".into()])
    );
    assert_eq!(
        list(vec![TokenStatus::Revoked], false, 0, 100).await,
        (1, vec!["id-d".into()])
    );
    // Every field of a listed token is the stored one.
    let listed = tokens(s, "t1", "ep-1").await;
    for t in &listed {
        assert_eq!(*t, token(s, "t1", "ep-1", t.id.as_str()).await);
    }
    // An unknown endpoint (or another tenant's) has none.
    for (t, ep) in [("t1", "nope"), ("t2", "ep-1")] {
        let page = s
            .list_tokens(&tenant(t), &id(ep), &TokenListQuery::default(), all())
            .await
            .unwrap();
        assert_eq!((page.total, page.items.len()), (0, 0));
    }
}

pub(super) async fn unregister_revokes_and_deletes_tokens(s: Arc<dyn Store>) {
    let s = &*s;
    register(s, "t1", "ep", "tok-1", "id-1").await;
    issue(s, "t1", "ep", "tok-2", "id-2", 1).await;
    issue(s, "t1", "ep", "tok-3", "id-3", 2).await;
    transition(s, "t1", "ep", "id-2", TokenStatus::Revoked, 3)
        .await
        .unwrap();
    transition(s, "t1", "ep", "id-3", TokenStatus::Suspended, 4)
        .await
        .unwrap();
    let start = mark(s).await;
    s.execute(
        Command::Unregister {
            id: id("ep"),
            precondition: Precondition::None,
        },
        ctx_at("t1", 5),
    )
    .await
    .unwrap();
    let events = events_since(s, start).await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(
        &events[0],
        OutboxEvent::Endpoint(e) if e.kind == EventKind::Unregistered
    ));
    let OutboxEvent::Token(revocation) = &events[1] else {
        panic!("the revocation follows `unregistered`: {events:?}")
    };
    assert_eq!(
        revoked_set(&revocation.kind),
        ["id-1".to_string(), "id-3".to_string()].into(),
        "the tokens that could still identify the endpoint"
    );
    assert_eq!(revocation.endpoint_id.as_str(), "ep");
    // The rows are gone.
    let t1 = tenant("t1");
    assert!(tokens(s, "t1", "ep").await.is_empty());
    for token_id in ["id-1", "id-2", "id-3"] {
        assert!(s
            .get_token(&t1, &id("ep"), &tid(token_id))
            .await
            .unwrap()
            .is_none());
    }
    assert!(s
        .find_token(&t1, &app("app"), &hash("app", "tok-1"))
        .await
        .unwrap()
        .is_none());
    // Hashes and IDs are free again: a new endpoint may have them.
    register(s, "t1", "ep-new", "tok-1", "id-1").await;
    s.execute(issue_cmd("ep-new", "app", "tok-2", "id-2"), ctx("t1"))
        .await
        .expect("a deleted token's hash and ID are free");
    assert_eq!(tokens(s, "t1", "ep-new").await.len(), 2);

    // An endpoint without usable tokens is unregistered without a revocation.
    register(s, "t1", "lone", "tok-lone", "id-lone").await;
    transition(s, "t1", "lone", "id-lone", TokenStatus::Revoked, 6)
        .await
        .unwrap();
    let start = mark(s).await;
    s.execute(
        Command::Unregister {
            id: id("lone"),
            precondition: Precondition::None,
        },
        ctx("t1"),
    )
    .await
    .unwrap();
    let events = events_since(s, start).await;
    assert!(token_kinds(&events).is_empty(), "{events:?}");
    assert!(tokens(s, "t1", "lone").await.is_empty());
}

pub(super) async fn issue_with_taken_hash_or_id(s: Arc<dyn Store>) {
    let s = &*s;
    register(s, "t1", "a", "tok-a", "id-a").await;
    register(s, "t1", "b", "tok-b", "id-b").await;
    let start = mark(s).await;
    // Another endpoint's hash, or the endpoint's own.
    for taken in ["tok-a", "tok-b"] {
        let r = s
            .execute(issue_cmd("b", "app", taken, "id-new"), ctx("t1"))
            .await;
        assert_eq!(conflict_field(r), "endpointToken");
    }
    // A token ID in use in the tenant.
    let r = s
        .execute(issue_cmd("b", "app", "tok-fresh", "id-a"), ctx("t1"))
        .await;
    assert_eq!(conflict_field(r), "endpointTokenId");
    // A registration with a token ID in use.
    let r = s
        .execute(
            Command::Register(registration("c", "app-v1", "tok-c", "id-b", json!({}))),
            ctx("t1"),
        )
        .await;
    assert_eq!(conflict_field(r), "endpointTokenId");
    assert!(s.get(&tenant("t1"), &id("c")).await.unwrap().is_none());
    // Nothing was written.
    assert_eq!(
        statuses(&tokens(s, "t1", "b").await),
        [("id-b".into(), TokenStatus::Inactive)]
    );
    assert!(s
        .get_token(&tenant("t1"), &id("b"), &tid("id-new"))
        .await
        .unwrap()
        .is_none());
    assert!(events_since(s, start).await.is_empty());
    // Hashes are scoped by application, IDs by tenant.
    s.execute(
        Command::Register(registration("o", "other-v1", "tok-o", "id-o", json!({}))),
        ctx("t1"),
    )
    .await
    .unwrap();
    s.execute(
        Command::IssueToken {
            id: id("o"),
            app: app("other"),
            token_hash: hash("app", "tok-a"),
            token_id: tid("id-o2"),
        },
        ctx("t1"),
    )
    .await
    .expect("the same hash in another application");
    register(s, "t2", "a", "tok-a", "id-a").await;
}

fn claim(claim_id: &str, a: &str, secret: &str, ms: i64, binding: ClaimBinding) -> ClaimToken {
    ClaimToken {
        id: cid(claim_id),
        app: app(a),
        hash: claim_hash(&app(a), secret),
        created: Timestamp(T0 + ms),
        expires: Timestamp(T0 + 1_000_000),
        binding,
        used: None,
    }
}

async fn get_claim(s: &dyn Store, t: &str, a: &str, claim_id: &str) -> Option<ClaimToken> {
    s.get_claim(&tenant(t), &app(a), &cid(claim_id))
        .await
        .unwrap()
}

pub(super) async fn claims_create_get_list_delete(s: Arc<dyn Store>) {
    let s = &*s;
    let t1 = tenant("t1");
    let c1 = claim("c1", "app", "secret-1", 0, ClaimBinding::Any);
    let c2 = claim(
        "c2",
        "app",
        "secret-2",
        5,
        ClaimBinding::Endpoint(id("dev-9")),
    );
    let c3 = claim(
        "c3",
        "app",
        "secret-3",
        5,
        ClaimBinding::Pattern(IdPattern::parse("dev-[0-9]+", "binding").unwrap()),
    );
    s.create_claims(&t1, vec![c3.clone(), c1.clone(), c2.clone()])
        .await
        .unwrap();
    for c in [&c1, &c2, &c3] {
        assert_eq!(
            get_claim(s, "t1", "app", c.id.as_str()).await.as_ref(),
            Some(c)
        );
        assert_eq!(
            s.find_claim(&t1, &app("app"), &c.hash)
                .await
                .unwrap()
                .as_ref(),
            Some(c)
        );
    }
    assert!(get_claim(s, "t1", "other", "c1").await.is_none());
    assert!(get_claim(s, "t2", "app", "c1").await.is_none());
    assert!(s
        .find_claim(&t1, &app("other"), &c1.hash)
        .await
        .unwrap()
        .is_none());
    // Oldest first, ties by ID; `total` counts all.
    let page = s.list_claims(&t1, &app("app"), all()).await.unwrap();
    let ids: Vec<_> = page.items.iter().map(|c| c.id.to_string()).collect();
    assert_eq!(
        (page.total, ids),
        (3, vec!["c1".into(), "c2".into(), "c3".into()])
    );
    assert_eq!(page.items[1], c2);
    let page = s
        .list_claims(&t1, &app("app"), PageRequest::new(1, 1))
        .await
        .unwrap();
    assert_eq!((page.total, page.items), (3, vec![c2.clone()]));

    // All or nothing: a taken hash (in the application), a taken ID (in the tenant), or a
    // duplicate within the call refuses the lot.
    let fresh = claim("c-fresh", "app", "secret-fresh", 9, ClaimBinding::Any);
    let same_hash = claim("c4", "app", "secret-1", 9, ClaimBinding::Any);
    let same_id = claim("c1", "other", "secret-x", 9, ClaimBinding::Any);
    let twin_a = claim("c5", "app", "secret-twin", 9, ClaimBinding::Any);
    let twin_b = claim("c6", "app", "secret-twin", 9, ClaimBinding::Any);
    let twin_id = claim("c5", "app", "secret-y", 9, ClaimBinding::Any);
    for (batch, field) in [
        (vec![fresh.clone(), same_hash], "claimToken"),
        (vec![fresh.clone(), same_id], "claimTokenId"),
        (vec![fresh.clone(), twin_a.clone(), twin_b], "claimToken"),
        (vec![fresh.clone(), twin_a, twin_id], "claimTokenId"),
    ] {
        match rejected(s.create_claims(&t1, batch).await) {
            DomainError::Conflict { field: f, .. } => assert_eq!(f, field),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(get_claim(s, "t1", "app", "c-fresh").await.is_none());
    }
    assert_eq!(
        s.list_claims(&t1, &app("app"), all()).await.unwrap().total,
        3
    );
    // The same secret in another application, or another tenant, is another claim token.
    s.create_claims(
        &t1,
        vec![claim("c7", "other", "secret-1", 9, ClaimBinding::Any)],
    )
    .await
    .unwrap();
    s.create_claims(&tenant("t2"), vec![c1.clone()])
        .await
        .unwrap();

    // Deletion.
    assert!(s.delete_claim(&t1, &app("app"), &cid("c2")).await.unwrap());
    assert!(!s.delete_claim(&t1, &app("app"), &cid("c2")).await.unwrap());
    assert!(
        !s.delete_claim(&t1, &app("app"), &cid("c7")).await.unwrap(),
        "c7 is another application's"
    );
    assert!(get_claim(s, "t1", "app", "c2").await.is_none());
    assert!(s
        .find_claim(&t1, &app("app"), &c2.hash)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        s.list_claims(&t1, &app("app"), all()).await.unwrap().total,
        2
    );
    assert!(get_claim(s, "t2", "app", "c1").await.is_some());
    assert!(get_claim(s, "t1", "other", "c7").await.is_some());
    // Its hash and ID are free again.
    s.create_claims(
        &t1,
        vec![claim("c2", "app", "secret-2", 20, ClaimBinding::Any)],
    )
    .await
    .unwrap();
}

fn self_reg(
    ep: &str,
    version: &str,
    token: &str,
    token_id: &str,
    claim_secret: Option<&str>,
    reregistration: Reregistration,
) -> Command {
    let registration = registration(ep, version, token, token_id, json!({"k": ep}));
    let claim = claim_secret.map(|c| claim_hash(&registration.app, c));
    Command::SelfRegister(SelfRegistration {
        registration,
        claim,
        reregistration,
    })
}

pub(super) async fn self_registration_uses_claims(s: Arc<dyn Store>) {
    let s = &*s;
    let t1 = tenant("t1");
    let mut expired = claim("c-old", "app", "old", 0, ClaimBinding::Any);
    expired.expires = Timestamp(T0 + 50);
    s.create_claims(
        &t1,
        vec![
            claim("c-any", "app", "any", 0, ClaimBinding::Any),
            expired,
            claim(
                "c-bound",
                "app",
                "bound",
                0,
                ClaimBinding::Endpoint(id("dev-x")),
            ),
            claim(
                "c-pattern",
                "app",
                "pattern",
                0,
                ClaimBinding::Pattern(IdPattern::parse("dev-[0-9]+", "binding").unwrap()),
            ),
            claim("c-other-app", "other", "other-app", 0, ClaimBinding::Any),
        ],
    )
    .await
    .unwrap();
    let start = mark(s).await;

    // Refusals write nothing: no endpoint, no token, no event, the claim token unused.
    let cases = [
        ("dev-1", "old", RefusalReason::ClaimTokenExpired),
        ("dev-y", "bound", RefusalReason::ClaimTokenWrongEndpoint),
        ("dev-y", "pattern", RefusalReason::ClaimTokenWrongEndpoint),
        ("dev-1", "never-created", RefusalReason::CredentialInvalid),
        ("dev-1", "other-app", RefusalReason::CredentialInvalid),
    ];
    for (ep, secret, reason) in cases {
        let cmd = self_reg(
            ep,
            "app-v1",
            "dev-token",
            "id-dev",
            Some(secret),
            Reregistration::Refuse,
        );
        assert_eq!(
            refusal(s.execute(cmd, ctx_at("t1", 100)).await),
            reason,
            "{ep} with {secret}"
        );
        assert!(s.get(&t1, &id(ep)).await.unwrap().is_none());
    }
    assert!(events_since(s, start).await.is_empty());
    assert!(s
        .find_token(&t1, &app("app"), &hash("app", "dev-token"))
        .await
        .unwrap()
        .is_none());
    for (a, c) in [
        ("app", "c-old"),
        ("app", "c-bound"),
        ("app", "c-pattern"),
        ("other", "c-other-app"),
    ] {
        assert_eq!(get_claim(s, "t1", a, c).await.unwrap().used, None, "{c}");
    }

    // A valid claim registers the endpoint and is used up in the same transaction.
    let cmd = self_reg(
        "dev-1",
        "app-v1",
        "dev-token",
        "id-dev",
        Some("any"),
        Reregistration::Refuse,
    );
    let effect = s.execute(cmd, ctx_at("t1", 10)).await.unwrap();
    let Effect::Insert(ep) = effect else {
        panic!("a registration: {effect:?}")
    };
    assert_eq!(ep.metadata.get("k"), Some(&json!("dev-1")));
    assert_eq!(s.get(&t1, &id("dev-1")).await.unwrap(), Some(ep));
    assert_eq!(
        statuses(&tokens(s, "t1", "dev-1").await),
        [("id-dev".into(), TokenStatus::Inactive)]
    );
    assert_eq!(
        get_claim(s, "t1", "app", "c-any").await.unwrap().used,
        Some(ClaimUse {
            at: Timestamp(T0 + 10),
            endpoint_id: id("dev-1"),
        })
    );
    let events = events_since(s, start).await;
    assert!(
        matches!(&events[0], OutboxEvent::Endpoint(e) if e.kind == EventKind::Registered),
        "{events:?}"
    );
    assert!(token_kinds(&events).is_empty(), "{events:?}");
    // A second use is refused, whatever the ID.
    for ep in ["dev-2", "dev-1"] {
        let cmd = self_reg(
            ep,
            "app-v1",
            "dev-token-2",
            "id-dev-2",
            Some("any"),
            Reregistration::Reissue,
        );
        assert_eq!(
            refusal(s.execute(cmd, ctx_at("t1", 11)).await),
            RefusalReason::ClaimTokenUsed
        );
    }
    assert!(s.get(&t1, &id("dev-2")).await.unwrap().is_none());
    assert_eq!(tokens(s, "t1", "dev-1").await.len(), 1);
    // A pattern-bound claim token registers a matching ID.
    let cmd = self_reg(
        "dev-22",
        "app-v1",
        "dev-token-22",
        "id-dev-22",
        Some("pattern"),
        Reregistration::Refuse,
    );
    s.execute(cmd, ctx_at("t1", 12)).await.unwrap();
    // A valid claim token for an ID that is registered (policy: refuse) stays unused.
    s.execute(
        Command::Register(registration(
            "dev-x",
            "app-v1",
            "x-token",
            "id-x",
            json!({}),
        )),
        ctx("t1"),
    )
    .await
    .unwrap();
    let cmd = self_reg(
        "dev-x",
        "app-v1",
        "dev-token-3",
        "id-dev-3",
        Some("bound"),
        Reregistration::Refuse,
    );
    assert_eq!(
        refusal(s.execute(cmd, ctx_at("t1", 14)).await),
        RefusalReason::AlreadyRegistered
    );
    assert_eq!(
        get_claim(s, "t1", "app", "c-bound").await.unwrap().used,
        None
    );
    // A deleted claim token can no longer be used.
    assert!(s
        .delete_claim(&t1, &app("app"), &cid("c-bound"))
        .await
        .unwrap());
    s.execute(
        Command::Unregister {
            id: id("dev-x"),
            precondition: Precondition::None,
        },
        ctx("t1"),
    )
    .await
    .unwrap();
    let cmd = self_reg(
        "dev-x",
        "app-v1",
        "dev-token-3",
        "id-dev-3",
        Some("bound"),
        Reregistration::Refuse,
    );
    assert_eq!(
        refusal(s.execute(cmd, ctx_at("t1", 15)).await),
        RefusalReason::CredentialInvalid
    );
}

pub(super) async fn reregistration_policies(s: Arc<dyn Store>) {
    let s = &*s;
    let t1 = tenant("t1");
    let first = self_reg(
        "dev",
        "app-v1",
        "tok-1",
        "id-1",
        None,
        Reregistration::Refuse,
    );
    s.execute(first, ctx("t1")).await.unwrap();
    issue(s, "t1", "dev", "tok-2", "id-2", 1).await;
    issue(s, "t1", "dev", "tok-3", "id-3", 2).await;
    transition(s, "t1", "dev", "id-1", TokenStatus::Active, 3)
        .await
        .unwrap();
    transition(s, "t1", "dev", "id-2", TokenStatus::Revoked, 4)
        .await
        .unwrap();
    let record = s.get(&t1, &id("dev")).await.unwrap().unwrap();
    let before = tokens(s, "t1", "dev").await;
    let start = mark(s).await;

    // Refuse: nothing changes.
    let again = self_reg(
        "dev",
        "app-v2",
        "tok-4",
        "id-4",
        None,
        Reregistration::Refuse,
    );
    assert_eq!(
        refusal(s.execute(again, ctx_at("t1", 10)).await),
        RefusalReason::AlreadyRegistered
    );
    // Reissue, in another application than the endpoint's: refused too.
    let elsewhere = self_reg(
        "dev",
        "other-v1",
        "tok-4",
        "id-4",
        None,
        Reregistration::Reissue,
    );
    assert_eq!(
        refusal(s.execute(elsewhere, ctx_at("t1", 10)).await),
        RefusalReason::AlreadyRegistered
    );
    // Reissue with a hash in use (here: the device's current token): 409, nothing written.
    let reused = self_reg(
        "dev",
        "app-v1",
        "tok-1",
        "id-4",
        None,
        Reregistration::Reissue,
    );
    assert_eq!(
        conflict_field(s.execute(reused, ctx_at("t1", 10)).await),
        "endpointToken"
    );
    assert_eq!(tokens(s, "t1", "dev").await, before);
    assert!(events_since(s, start).await.is_empty());

    // Reissue: a new Inactive token, every usable earlier one revoked, the record kept.
    let reissue = self_reg(
        "dev",
        "app-v2",
        "tok-4",
        "id-4",
        None,
        Reregistration::Reissue,
    );
    let effect = s.execute(reissue, ctx_at("t1", 20)).await.unwrap();
    assert_eq!(effect, Effect::Unchanged(record.clone()));
    assert_eq!(s.get(&t1, &id("dev")).await.unwrap(), Some(record));
    let after = tokens(s, "t1", "dev").await;
    assert_eq!(
        statuses(&after),
        [
            ("id-1".into(), TokenStatus::Revoked),
            ("id-2".into(), TokenStatus::Revoked),
            ("id-3".into(), TokenStatus::Revoked),
            ("id-4".into(), TokenStatus::Inactive),
        ]
    );
    assert_eq!(after[0].updated, Some(Timestamp(T0 + 20)));
    assert_eq!(
        after[1].updated,
        Some(Timestamp(T0 + 4)),
        "a token revoked earlier is left as it was"
    );
    assert_eq!(after[3].created, Timestamp(T0 + 20));
    let events = events_since(s, start).await;
    let kinds = token_kinds(&events);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        revoked_set(&kinds[0]),
        ["id-1".to_string(), "id-3".to_string()].into()
    );
    assert_eq!(
        kinds[1],
        status_changed("id-4", None, TokenStatus::Inactive)
    );

    // Reissue with a claim token uses it up.
    s.create_claims(&t1, vec![claim("c", "app", "claim", 0, ClaimBinding::Any)])
        .await
        .unwrap();
    let with_claim = self_reg(
        "dev",
        "app-v1",
        "tok-5",
        "id-5",
        Some("claim"),
        Reregistration::Reissue,
    );
    s.execute(with_claim, ctx_at("t1", 30)).await.unwrap();
    assert_eq!(
        get_claim(s, "t1", "app", "c")
            .await
            .unwrap()
            .used
            .map(|u| u.endpoint_id),
        Some(id("dev"))
    );
    assert_eq!(
        token(s, "t1", "dev", "id-4").await.status,
        TokenStatus::Revoked
    );
}

pub(super) async fn concurrent_self_registrations(s: Arc<dyn Store>) {
    const N: usize = 32;
    let t1 = tenant("t1");
    s.create_claims(&t1, vec![claim("c", "app", "claim", 0, ClaimBinding::Any)])
        .await
        .unwrap();
    let attempt = |ep: &'static str, claim: Option<&'static str>, policy: Reregistration| {
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let cmd = self_reg(
                        ep,
                        "app-v1",
                        &format!("{ep}-tok-{i}"),
                        &format!("{ep}-id-{i}"),
                        claim,
                        policy,
                    );
                    s.execute(cmd, ctx("t1")).await
                })
            })
            .collect();
        async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let inserted = |results: &[Result<Effect, StoreError>]| {
        results
            .iter()
            .filter(|r| matches!(r, Ok(Effect::Insert(_))))
            .count()
    };

    // One claim token, one ID: exactly one registration; the others meet a used claim.
    let results = attempt("dev-claim", Some("claim"), Reregistration::Refuse).await;
    assert_eq!(inserted(&results), 1, "{results:?}");
    for r in results.into_iter().filter(|r| r.is_err()) {
        assert_eq!(refusal(r), RefusalReason::ClaimTokenUsed);
    }
    assert_eq!(tokens(&*s, "t1", "dev-claim").await.len(), 1);

    // No claim, policy refuse: one registration, the others already registered.
    let results = attempt("dev-refuse", None, Reregistration::Refuse).await;
    assert_eq!(inserted(&results), 1, "{results:?}");
    for r in results.into_iter().filter(|r| r.is_err()) {
        assert_eq!(refusal(r), RefusalReason::AlreadyRegistered);
    }
    assert_eq!(tokens(&*s, "t1", "dev-refuse").await.len(), 1);

    // Policy reissue: one registration, every other attempt a reissue; one token is left
    // usable, the last one issued.
    let start = mark(&*s).await;
    let results = attempt("dev-reissue", None, Reregistration::Reissue).await;
    assert_eq!(inserted(&results), 1, "{results:?}");
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(Effect::Insert(_) | Effect::Unchanged(_)))));
    let all_tokens = tokens(&*s, "t1", "dev-reissue").await;
    assert_eq!(all_tokens.len(), N);
    let usable: Vec<_> = all_tokens
        .iter()
        .filter(|t| t.status != TokenStatus::Revoked)
        .collect();
    assert_eq!(usable.len(), 1, "{all_tokens:?}");
    // Every token but the usable one was revoked exactly once.
    let mut revoked_ids = Vec::new();
    for kind in token_kinds(&events_since(&*s, start).await) {
        if let TokenEventKind::Revoked { token_ids } = kind {
            revoked_ids.extend(token_ids.into_iter().map(|t| t.to_string()));
        }
    }
    revoked_ids.sort();
    let mut expected: Vec<_> = all_tokens
        .iter()
        .filter(|t| t.status == TokenStatus::Revoked)
        .map(|t| t.id.to_string())
        .collect();
    expected.sort();
    assert_eq!(revoked_ids, expected);
}

fn rejection(a: &str, ms: i64, message: &str) -> Rejection {
    Rejection {
        at: Timestamp(T0 + ms),
        app: app(a),
        app_version: Some(format!("{a}-v1")),
        endpoint_id: Some("dev-1".into()),
        source: "192.0.2.1".into(),
        reason: RefusalReason::CredentialInvalid,
        message: message.into(),
    }
}

pub(super) async fn rejections_recorded_and_trimmed(s: Arc<dyn Store>) {
    let t1 = tenant("t1");
    let first = Rejection {
        app_version: None,
        endpoint_id: None,
        reason: RefusalReason::Closed,
        ..rejection("app", 0, "first")
    };
    s.record_rejection(&t1, first.clone()).await.unwrap();
    s.record_rejection(&t1, rejection("app", 1, "second"))
        .await
        .unwrap();
    s.record_rejection(&t1, rejection("app", 2, "third"))
        .await
        .unwrap();
    s.record_rejection(&t1, rejection("other", 3, "elsewhere"))
        .await
        .unwrap();
    s.record_rejection(&tenant("t2"), rejection("app", 4, "t2"))
        .await
        .unwrap();
    let page = s.list_rejections(&t1, &app("app"), all()).await.unwrap();
    let messages: Vec<_> = page.items.iter().map(|r| r.message.clone()).collect();
    assert_eq!(
        (page.total, messages),
        (3, vec!["third".into(), "second".into(), "first".into()]),
        "newest first"
    );
    assert_eq!(page.items[2], first, "every field kept");
    assert_eq!(page.items[0], rejection("app", 2, "third"));
    let page = s
        .list_rejections(&t1, &app("app"), PageRequest::new(1, 1))
        .await
        .unwrap();
    assert_eq!(
        (page.total, page.items),
        (3, vec![rejection("app", 1, "second")])
    );

    // The latest REJECTIONS_KEPT of an application are kept; other applications keep theirs.
    const CHUNK: usize = 100;
    let extra = 5;
    let n = REJECTIONS_KEPT as usize + extra;
    let mut recorded = 0;
    while recorded < n {
        let chunk: Vec<_> = (recorded..n.min(recorded + CHUNK))
            .map(|i| {
                let s = s.clone();
                let r = rejection("busy", i as i64, &format!("r{i}"));
                tokio::spawn(async move { s.record_rejection(&tenant("t1"), r).await })
            })
            .collect();
        for task in chunk {
            task.await.unwrap().unwrap();
        }
        recorded = n.min(recorded + CHUNK);
    }
    let kept = s.list_rejections(&t1, &app("busy"), all()).await.unwrap();
    assert_eq!(kept.total, REJECTIONS_KEPT);
    assert_eq!(kept.items.len(), REJECTIONS_KEPT.min(1000) as usize);
    let messages: BTreeSet<_> = kept.items.iter().map(|r| r.message.clone()).collect();
    // Chunks are recorded one after another: only the first chunk lost some.
    for i in CHUNK..n {
        assert!(messages.contains(&format!("r{i}")), "r{i} kept");
    }
    let first_chunk = (0..CHUNK)
        .filter(|i| messages.contains(&format!("r{i}")))
        .count();
    assert_eq!(first_chunk, CHUNK - extra);
    assert_eq!(
        s.list_rejections(&t1, &app("app"), all())
            .await
            .unwrap()
            .total,
        3
    );
    assert_eq!(
        s.list_rejections(&t1, &app("other"), all())
            .await
            .unwrap()
            .total,
        1
    );
    assert_eq!(
        s.list_rejections(&tenant("t2"), &app("app"), all())
            .await
            .unwrap()
            .total,
        1
    );
}

/// Every endpoint of a tenant.
async fn export_all(s: &dyn Store, t: &str) -> Vec<EndpointExport> {
    s.export_endpoints(&tenant(t), 0, 1_000_000).await.unwrap()
}

fn moved(mut e: EndpointExport, to: &str) -> ImportRecord {
    e.tenant = tenant(to);
    ImportRecord::Endpoint(e)
}

pub(super) async fn export_import_keeps_tokens(s: Arc<dyn Store>) {
    let s = &*s;
    register(s, "t1", "ep-a", "tok-a", "id-a").await;
    issue(s, "t1", "ep-a", "tok-a2", "id-a2", 1).await;
    issue(s, "t1", "ep-a", "tok-a3", "id-a3", 2).await;
    transition(s, "t1", "ep-a", "id-a", TokenStatus::Active, 3)
        .await
        .unwrap();
    transition(s, "t1", "ep-a", "id-a2", TokenStatus::Suspended, 4)
        .await
        .unwrap();
    transition(s, "t1", "ep-a", "id-a3", TokenStatus::Revoked, 5)
        .await
        .unwrap();
    register(s, "t1", "ep-b", "tok-b", "id-b").await;

    let exported = export_all(s, "t1").await;
    assert_eq!(exported.len(), 2);
    let by_id = |tokens: &[StoredToken]| {
        let mut v = tokens.to_vec();
        v.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        v
    };
    assert_eq!(
        by_id(&exported[0].tokens),
        by_id(&tokens(s, "t1", "ep-a").await)
    );
    assert_eq!(exported[0].tokens.len(), 3);
    assert_eq!(exported[0].token_hash, hash("app", "tok-a"));
    assert_eq!(
        statuses(&exported[1].tokens),
        [("id-b".into(), TokenStatus::Inactive)]
    );

    // Into another tenant: every token with its ID, state and times; silently.
    let start = mark(s).await;
    let records: Vec<_> = exported.iter().cloned().map(|e| moved(e, "t2")).collect();
    let outcomes = s.import(records.clone()).await.unwrap();
    assert_eq!(outcomes, [ImportOutcome::Imported, ImportOutcome::Imported]);
    for ep in ["ep-a", "ep-b"] {
        let original: Vec<_> = tokens(s, "t1", ep).await;
        let copy: Vec<_> = tokens(s, "t2", ep).await;
        assert_eq!(copy, original, "{ep}");
    }
    let found = s
        .find_token(&tenant("t2"), &app("app"), &hash("app", "tok-a2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.id, found.status),
        (tid("id-a2"), TokenStatus::Suspended)
    );
    assert!(
        events_since(s, start).await.is_empty(),
        "an import emits nothing"
    );
    // The imported tokens are the endpoint's: transitions and hash checks see them.
    assert_eq!(
        conflict_field(
            s.execute(issue_cmd("ep-b", "app", "tok-a3", "id-new"), ctx("t2"))
                .await
        ),
        "endpointToken"
    );
    transition(s, "t2", "ep-a", "id-a2", TokenStatus::Active, 6)
        .await
        .unwrap();
    // A re-import changes nothing.
    assert_eq!(
        s.import(records).await.unwrap(),
        [ImportOutcome::Exists, ImportOutcome::Exists]
    );
    assert_eq!(
        token(s, "t2", "ep-a", "id-a2").await.status,
        TokenStatus::Active
    );

    // A record without tokens (an older export): one Inactive token from its hash, under an
    // ID derived from the hash, so importing it again is a no-op.
    let mut old = exported[1].clone();
    old.tokens.clear();
    let outcomes = s.import(vec![moved(old.clone(), "t3")]).await.unwrap();
    assert_eq!(outcomes, [ImportOutcome::Imported]);
    let restored = tokens(s, "t3", "ep-b").await;
    assert_eq!(
        restored,
        [StoredToken {
            id: initial_token_id(&old.token_hash),
            endpoint_id: id("ep-b"),
            app: app("app"),
            hash: old.token_hash,
            status: TokenStatus::Inactive,
            created: old.endpoint.created,
            updated: None,
        }]
    );
    assert_eq!(
        s.import(vec![moved(old, "t3")]).await.unwrap(),
        [ImportOutcome::Exists]
    );
    assert_eq!(tokens(s, "t3", "ep-b").await, restored);

    // A token hash or ID held by another endpoint: the record conflicts, nothing stored.
    let mut clash = exported[0].clone();
    clash.endpoint.id = id("ep-clash");
    clash.token_hash = hash("app", "tok-clash");
    let mut by_hash = clash.clone();
    by_hash.tokens = vec![StoredToken {
        id: tid("id-clash"),
        endpoint_id: id("ep-clash"),
        ..exported[0].tokens[0].clone()
    }];
    let mut by_id = clash.clone();
    by_id.tokens = vec![StoredToken {
        hash: hash("app", "tok-clash"),
        endpoint_id: id("ep-clash"),
        ..exported[0].tokens[0].clone()
    }];
    let outcomes = s
        .import(vec![moved(by_hash, "t2"), moved(by_id, "t2")])
        .await
        .unwrap();
    for o in &outcomes {
        assert!(
            matches!(o, ImportOutcome::Conflict(m) if m.contains("token")),
            "{outcomes:?}"
        );
    }
    assert!(s
        .get(&tenant("t2"), &id("ep-clash"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .find_token(&tenant("t2"), &app("app"), &hash("app", "tok-clash"))
        .await
        .unwrap()
        .is_none());
}

/// A purged tenant's claim tokens, rejections and prefixed settings go; another tenant's
/// (including one whose name extends the first's) stay.
pub(super) async fn purge_tenant_credentials(s: Arc<dyn Store>) {
    let s = &*s;
    for t in ["t1", "t10"] {
        s.create_claims(
            &tenant(t),
            vec![claim("c1", "app", "secret-1", 0, ClaimBinding::Any)],
        )
        .await
        .unwrap();
        s.record_rejection(&tenant(t), rejection("app", 1, "refused"))
            .await
            .unwrap();
        s.put_setting(&format!("self-registration/{t}/app"), "{}")
            .await
            .unwrap();
    }
    s.put_setting("other/key", "kept").await.unwrap();
    s.purge_tenant_credentials(&tenant("t1"), "self-registration/t1/")
        .await
        .unwrap();
    assert!(get_claim(s, "t1", "app", "c1").await.is_none());
    let gone = s
        .list_rejections(&tenant("t1"), &app("app"), all())
        .await
        .unwrap();
    assert_eq!(gone.total, 0);
    assert_eq!(
        s.get_setting("self-registration/t1/app").await.unwrap(),
        None
    );
    // Untouched: the other tenant, and settings outside the prefix.
    assert!(get_claim(s, "t10", "app", "c1").await.is_some());
    let kept = s
        .list_rejections(&tenant("t10"), &app("app"), all())
        .await
        .unwrap();
    assert_eq!(kept.total, 1);
    assert_eq!(
        s.get_setting("self-registration/t10/app")
            .await
            .unwrap()
            .as_deref(),
        Some("{}")
    );
    assert_eq!(
        s.get_setting("other/key").await.unwrap().as_deref(),
        Some("kept")
    );
    // Idempotent (a resumed purge runs it again).
    s.purge_tenant_credentials(&tenant("t1"), "self-registration/t1/")
        .await
        .unwrap();
}
