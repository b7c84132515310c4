//! Credentials on PostgreSQL beyond the conformance suite: token commands and their events
//! (after membership events), commands on tokens and claims within one group transaction,
//! claim tokens used by two replicas at once, claim creation all or nothing, the rejection
//! log's bound, export and import of token rows. Results are checked with SQL where the
//! store's reads could hide a wrong row.

use epr_core::command::{Command, Effect, Registration, WriteCtx};
use epr_core::credentials::{
    claim_hash, ClaimBinding, ClaimToken, IdPattern, RefusalReason, Rejection, Reregistration,
    SelfRegistration, StoredToken, TokenListQuery, TokenStatus, REJECTIONS_KEPT,
};
use epr_core::endpoint::Precondition;
use epr_core::endpoint_filter::{FilterCommand, FilterId, FilterSpec, FilterStatus};
use epr_core::event::{FilterEventKind, OutboxEvent, TokenEventKind};
use epr_core::ids::{
    AppName, AppVersionName, ClaimId, EndpointId, EndpointToken, TenantId, TokenId,
};
use epr_core::metadata::{Limits, Metadata};
use epr_core::ports::{BatchItem, BatchRequest, ImportOutcome, ImportRecord, Store, StoreError};
use epr_core::query::PageRequest;
use epr_core::{DomainError, Timestamp};
use epr_store_pg::testing::TestDb;
use epr_store_pg::{PgConfig, PgStore};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::NoTls;

const NOW: i64 = 1_700_000_000_000;

fn tenant() -> TenantId {
    TenantId::parse("t1").unwrap()
}

fn app() -> AppName {
    AppName::parse("app").unwrap()
}

fn ctx() -> WriteCtx {
    WriteCtx {
        tenant: tenant(),
        now: Timestamp(NOW),
        correlation_id: "corr".into(),
        limits: Limits::default(),
    }
}

fn at(now: i64) -> WriteCtx {
    WriteCtx {
        now: Timestamp(now),
        ..ctx()
    }
}

fn id(s: &str) -> EndpointId {
    EndpointId::parse(s).unwrap()
}

fn tid(s: &str) -> TokenId {
    TokenId::parse(s).unwrap()
}

fn hash(token: &str) -> epr_core::ids::TokenHash {
    EndpointToken::parse(token).unwrap().hash(&app())
}

fn registration(ep: &str, token: &str, token_id: &str, md: Value) -> Registration {
    Registration {
        id: id(ep),
        app: app(),
        app_version: AppVersionName::parse("app-v1").unwrap(),
        metadata: Metadata::parse(md, "metadata", &Limits::default()).unwrap(),
        token_hash: hash(token),
        token_id: tid(token_id),
    }
}

fn register(ep: &str, token: &str, token_id: &str) -> Command {
    Command::Register(registration(ep, token, token_id, json!({})))
}

fn issue(ep: &str, token: &str, token_id: &str) -> Command {
    Command::IssueToken {
        id: id(ep),
        app: app(),
        token_hash: hash(token),
        token_id: tid(token_id),
    }
}

fn transition(ep: &str, token_id: &str, target: TokenStatus) -> Command {
    Command::TransitionToken {
        id: id(ep),
        token_id: tid(token_id),
        target,
        precondition: Precondition::None,
        only_from: None,
    }
}

fn unregister(ep: &str) -> Command {
    Command::Unregister {
        id: id(ep),
        precondition: Precondition::None,
    }
}

fn self_register(
    ep: &str,
    token: &str,
    token_id: &str,
    claim: Option<&str>,
    rereg: Reregistration,
) -> Command {
    Command::SelfRegister(SelfRegistration {
        registration: registration(ep, token, token_id, json!({"self": true})),
        claim: claim.map(|c| claim_hash(&app(), c)),
        reregistration: rereg,
    })
}

fn claim(claim_id: &str, secret: &str, binding: ClaimBinding) -> ClaimToken {
    ClaimToken {
        id: ClaimId::parse(claim_id).unwrap(),
        app: app(),
        hash: claim_hash(&app(), secret),
        created: Timestamp(NOW - 1000),
        expires: Timestamp(NOW + 60_000),
        binding,
        used: None,
    }
}

fn config(url: &str) -> PgConfig {
    let mut cfg = PgConfig::new(url);
    cfg.pool_size = 4;
    cfg
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn refused(r: Result<Effect, StoreError>) -> DomainError {
    match r {
        Err(StoreError::Rejected(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn reason(r: Result<Effect, StoreError>) -> RefusalReason {
    match refused(r) {
        DomainError::Refused(r) => r.reason,
        other => panic!("expected a refused self-registration, got {other:?}"),
    }
}

/// Every outbox event, in order (read with SQL: the relay's reads wait for the leader's
/// sequencing).
async fn events(url: &str) -> Vec<OutboxEvent> {
    let c = sql(url).await;
    c.query("SELECT event FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| epr_store::codec::decode_outbox(r.get(0)).unwrap())
        .collect()
}

async fn setup() -> (TestDb, Arc<PgStore>) {
    let db = TestDb::create().await;
    let s = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    (db, s)
}

async fn tokens(s: &PgStore, ep: &str, query: TokenListQuery) -> Vec<StoredToken> {
    s.list_tokens(&tenant(), &id(ep), &query, PageRequest::new(0, 100))
        .await
        .unwrap()
        .items
}

fn ids(tokens: &[StoredToken]) -> Vec<&str> {
    tokens.iter().map(|t| t.id.as_str()).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn token_life_cycle_and_its_events() {
    let (db, s) = setup().await;
    s.execute(register("e1", "tok-1", "t1"), at(NOW))
        .await
        .unwrap();
    let t1 = s
        .find_token(&tenant(), &app(), &hash("tok-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t1.id.as_str(), t1.status), ("t1", TokenStatus::Inactive));
    assert_eq!((t1.created.0, t1.updated), (NOW, None));
    assert_eq!(
        s.get_token(&tenant(), &id("e1"), &tid("t1")).await.unwrap(),
        Some(t1.clone())
    );
    // Another endpoint's token ID is not found under this endpoint.
    s.execute(register("e2", "tok-2", "t2"), at(NOW))
        .await
        .unwrap();
    assert_eq!(
        s.get_token(&tenant(), &id("e1"), &tid("t2")).await.unwrap(),
        None
    );

    // A second token; then states.
    assert!(matches!(
        s.execute(issue("e1", "tok-1b", "t1b"), at(NOW + 1))
            .await
            .unwrap(),
        Effect::Unchanged(_)
    ));
    let activate = Command::TransitionToken {
        id: id("e1"),
        token_id: tid("t1"),
        target: TokenStatus::Active,
        precondition: Precondition::None,
        only_from: Some(TokenStatus::Inactive),
    };
    s.execute(activate.clone(), at(NOW + 2)).await.unwrap();
    // Again: already Active, unchanged, no event.
    s.execute(activate, at(NOW + 3)).await.unwrap();
    let active = s
        .get_token(&tenant(), &id("e1"), &tid("t1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (active.status, active.updated),
        (TokenStatus::Active, Some(Timestamp(NOW + 2)))
    );
    // Preconditions against the token's tag.
    let stale = Command::TransitionToken {
        id: id("e1"),
        token_id: tid("t1"),
        target: TokenStatus::Suspended,
        precondition: Precondition::OneOf(vec![t1.etag()]),
        only_from: None,
    };
    assert!(matches!(
        refused(s.execute(stale, at(NOW + 4)).await),
        DomainError::PreconditionFailed { .. }
    ));
    let fresh = Command::TransitionToken {
        id: id("e1"),
        token_id: tid("t1"),
        target: TokenStatus::Suspended,
        precondition: Precondition::OneOf(vec![active.etag()]),
        only_from: None,
    };
    s.execute(fresh, at(NOW + 5)).await.unwrap();
    s.execute(transition("e1", "t1", TokenStatus::Revoked), at(NOW + 6))
        .await
        .unwrap();
    assert!(matches!(
        refused(
            s.execute(transition("e1", "t1", TokenStatus::Active), at(NOW + 7))
                .await
        ),
        DomainError::Conflict {
            field: "status",
            ..
        }
    ));
    assert!(matches!(
        refused(
            s.execute(transition("e1", "nope", TokenStatus::Active), at(NOW + 7))
                .await
        ),
        DomainError::NotFound { .. }
    ));

    // Listing: newest first by default, oldest first on request, by state, paged.
    assert_eq!(
        ids(&tokens(&s, "e1", TokenListQuery::default()).await),
        ["t1b", "t1"]
    );
    let asc = TokenListQuery {
        ascending: true,
        ..Default::default()
    };
    assert_eq!(ids(&tokens(&s, "e1", asc).await), ["t1", "t1b"]);
    let revoked = TokenListQuery {
        statuses: vec![TokenStatus::Revoked, TokenStatus::Suspended],
        ..Default::default()
    };
    assert_eq!(ids(&tokens(&s, "e1", revoked).await), ["t1"]);
    let page = s
        .list_tokens(
            &tenant(),
            &id("e1"),
            &TokenListQuery::default(),
            PageRequest::new(1, 1),
        )
        .await
        .unwrap();
    assert_eq!((page.total, ids(&page.items)), (2, vec!["t1"]));
    let beyond = s
        .list_tokens(
            &tenant(),
            &id("e1"),
            &TokenListQuery::default(),
            PageRequest::new(5, 1),
        )
        .await
        .unwrap();
    assert_eq!((beyond.total, beyond.items.len()), (2, 0));
    let none = s
        .list_tokens(
            &tenant(),
            &id("nobody"),
            &TokenListQuery::default(),
            PageRequest::new(0, 9),
        )
        .await
        .unwrap();
    assert_eq!((none.total, none.items.len()), (0, 0));

    // The token events, in order.
    let token_events: Vec<TokenEventKind> = events(&db.url)
        .await
        .into_iter()
        .filter_map(|e| match e {
            OutboxEvent::Token(t) => Some(t.kind),
            _ => None,
        })
        .collect();
    use TokenStatus::*;
    assert_eq!(
        token_events,
        [
            TokenEventKind::StatusChanged {
                token_id: tid("t1b"),
                previous: None,
                status: Inactive
            },
            TokenEventKind::StatusChanged {
                token_id: tid("t1"),
                previous: Some(Inactive),
                status: Active
            },
            TokenEventKind::StatusChanged {
                token_id: tid("t1"),
                previous: Some(Active),
                status: Suspended
            },
            TokenEventKind::Revoked {
                token_ids: vec![tid("t1")]
            },
        ]
    );
    s.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "current_thread")]
async fn issued_tokens_are_unique_per_application_and_unregistration_frees_them() {
    let (db, s) = setup().await;
    s.execute(register("e1", "tok-1", "t1"), ctx())
        .await
        .unwrap();
    s.execute(register("e2", "tok-2", "t2"), ctx())
        .await
        .unwrap();
    // Taken by another endpoint's initial token, or by an issued one.
    for token in ["tok-1", "tok-2"] {
        assert!(matches!(
            refused(s.execute(issue("e2", token, "tx"), ctx()).await),
            DomainError::Conflict {
                field: "endpointToken",
                ..
            }
        ));
    }
    s.execute(issue("e1", "tok-1b", "t1b"), ctx())
        .await
        .unwrap();
    // Token IDs are unique in the tenant.
    assert!(matches!(
        refused(s.execute(issue("e2", "tok-fresh", "t1b"), ctx()).await),
        DomainError::Conflict {
            field: "endpointTokenId",
            ..
        }
    ));
    assert!(matches!(
        refused(s.execute(register("e3", "tok-1b", "t3"), ctx()).await),
        DomainError::Conflict {
            field: "endpointToken",
            ..
        }
    ));
    // Unknown endpoint, another application.
    assert!(matches!(
        refused(s.execute(issue("nobody", "tok-9", "t9"), ctx()).await),
        DomainError::NotFound { .. }
    ));
    let other_app = Command::IssueToken {
        id: id("e1"),
        app: AppName::parse("other").unwrap(),
        token_hash: EndpointToken::parse("tok-9")
            .unwrap()
            .hash(&AppName::parse("other").unwrap()),
        token_id: tid("t9"),
    };
    assert!(matches!(
        refused(s.execute(other_app, ctx()).await),
        DomainError::Invalid(v) if v.field == "applicationName"
    ));
    // Unregistering revokes the usable tokens (one event, after `unregistered`) and
    // deletes every row.
    s.execute(transition("e1", "t1b", TokenStatus::Revoked), ctx())
        .await
        .unwrap();
    let before = events(&db.url).await.len();
    s.execute(unregister("e1"), ctx()).await.unwrap();
    let after = events(&db.url).await;
    match &after[before..] {
        [OutboxEvent::Endpoint(u), OutboxEvent::Token(t)] => {
            assert_eq!(u.kind, epr_core::event::EventKind::Unregistered);
            assert_eq!(
                t.kind,
                TokenEventKind::Revoked {
                    token_ids: vec![tid("t1")]
                }
            );
        }
        other => panic!("{other:?}"),
    }
    let c = sql(&db.url).await;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM tokens WHERE endpoint_id='e1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    // Both hashes are free again.
    s.execute(issue("e2", "tok-1", "t2a"), ctx()).await.unwrap();
    s.execute(register("e3", "tok-1b", "t3"), ctx())
        .await
        .unwrap();
    s.shutdown().await;
    db.drop_db().await;
}

/// An unregistration of a member of an active filter: `unregistered`, `ep-unmatched`,
/// then the token revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_events_follow_membership_events() {
    let (db, s) = setup().await;
    s.execute(
        Command::Register(registration("e1", "tok-1", "t1", json!({"city": "Kyiv"}))),
        ctx(),
    )
    .await
    .unwrap();
    let fid = FilterId::parse("f1").unwrap();
    s.execute_filter(
        FilterCommand::Create {
            id: fid.clone(),
            app: app(),
            spec: FilterSpec::parse(
                "kyiv",
                "",
                &json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}),
            )
            .unwrap(),
        },
        ctx(),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.get_filter(&tenant(), &fid).await.unwrap().unwrap().status != FilterStatus::Active {
        assert!(
            std::time::Instant::now() < deadline,
            "the filter turned active"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = events(&db.url).await.len();
    s.execute(unregister("e1"), ctx()).await.unwrap();
    let after = events(&db.url).await;
    let kinds: Vec<String> = after[before..]
        .iter()
        .map(|e| match e {
            OutboxEvent::Endpoint(e) => format!("{:?}", e.kind),
            OutboxEvent::Filter(f) => match f.kind {
                FilterEventKind::EndpointUnmatched { .. } => "ep-unmatched".into(),
                ref other => format!("{other:?}"),
            },
            OutboxEvent::Token(t) => match t.kind {
                TokenEventKind::Revoked { .. } => "revoked".into(),
                ref other => format!("{other:?}"),
            },
        })
        .collect();
    assert_eq!(kinds, ["Unregistered", "ep-unmatched", "revoked"]);
    s.shutdown().await;
    db.drop_db().await;
}

/// One writer, held on a row lock while commands queue, so they run as one group: each
/// command sees the tokens and claim uses of the commands before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_sees_its_own_tokens_and_claim_uses() {
    let db = TestDb::create().await;
    let mut cfg = config(&db.url);
    cfg.writers = 1;
    let s = Arc::new(PgStore::open(cfg).await.unwrap());
    s.execute(register("blocker", "tok-b", "tb"), ctx())
        .await
        .unwrap();
    s.execute(register("e1", "tok-1", "t1"), ctx())
        .await
        .unwrap();
    s.execute(register("gone", "tok-g", "tg"), ctx())
        .await
        .unwrap();
    s.create_claims(&tenant(), vec![claim("c1", "claim-1", ClaimBinding::Any)])
        .await
        .unwrap();
    let mut admin = sql(&db.url).await;
    let hold = admin.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM endpoints WHERE tenant='t1' AND endpoint_id='blocker' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let s2 = s.clone();
    let first = tokio::spawn(async move {
        s2.execute(transition("blocker", "tb", TokenStatus::Active), ctx())
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    type Check = fn(&Result<Effect, StoreError>) -> bool;
    let ok: Check = |r| r.is_ok();
    let taken: Check = |r| {
        matches!(
            r,
            Err(StoreError::Rejected(DomainError::Conflict {
                field: "endpointToken",
                ..
            }))
        )
    };
    let used: Check = |r| matches!(r, Err(StoreError::Rejected(DomainError::Refused(x))) if x.reason == RefusalReason::ClaimTokenUsed);
    let cmds: Vec<(Command, Check)> = vec![
        (issue("e1", "tok-1b", "t1b"), ok),
        (transition("e1", "t1b", TokenStatus::Suspended), ok), // sees t1b issued above
        (issue("blocker", "tok-1b", "tx"), taken),             // taken by e1's new token
        (unregister("gone"), ok),
        (issue("e1", "tok-g", "t1g"), ok), // gone's token is free again
        (
            self_register(
                "s1",
                "tok-s1",
                "ts1",
                Some("claim-1"),
                Reregistration::Refuse,
            ),
            ok,
        ),
        (
            self_register(
                "s2",
                "tok-s2",
                "ts2",
                Some("claim-1"),
                Reregistration::Refuse,
            ),
            used,
        ),
        (
            self_register("s1", "tok-s1b", "ts1b", None, Reregistration::Reissue),
            ok,
        ), // s1 registered above: its token is revoked
        (transition("s1", "ts1", TokenStatus::Active), |r| {
            matches!(
                r,
                Err(StoreError::Rejected(DomainError::Conflict {
                    field: "status",
                    ..
                }))
            )
        }),
    ];
    let mut tasks = Vec::new();
    for (cmd, _) in &cmds {
        let (st, cmd) = (s.clone(), cmd.clone());
        tasks.push(tokio::spawn(async move { st.execute(cmd, ctx()).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hold.commit().await.unwrap();
    first.await.unwrap().unwrap();
    for (t, (cmd, check)) in tasks.into_iter().zip(&cmds) {
        let r = t.await.unwrap();
        assert!(check(&r), "{cmd:?}: {r:?}");
    }
    let rows: Vec<(String, String, String)> = admin
        .query(
            "SELECT endpoint_id, token_id, status FROM tokens ORDER BY endpoint_id, token_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let rows: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("blocker", "tb", "Active"),
            ("e1", "t1", "Inactive"),
            ("e1", "t1b", "Suspended"),
            ("e1", "t1g", "Inactive"),
            ("s1", "ts1", "Revoked"),
            ("s1", "ts1b", "Inactive"),
        ]
    );
    let c = s
        .get_claim(&tenant(), &app(), &ClaimId::parse("c1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.used.map(|u| u.endpoint_id), Some(id("s1")));
    s.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "current_thread")]
async fn self_registration_checks_and_uses_its_claim() {
    let (db, s) = setup().await;
    s.create_claims(
        &tenant(),
        vec![
            claim("c-any", "any", ClaimBinding::Any),
            claim("c-bound", "bound", ClaimBinding::Endpoint(id("dev-1"))),
            claim(
                "c-pattern",
                "pattern",
                ClaimBinding::Pattern(IdPattern::parse("dev-[0-9]+", "binding").unwrap()),
            ),
            ClaimToken {
                expires: Timestamp(NOW),
                ..claim("c-old", "old", ClaimBinding::Any)
            },
        ],
    )
    .await
    .unwrap();
    let sr = |ep: &str, c: &str| {
        self_register(
            ep,
            &format!("tok-{ep}"),
            &format!("id-{ep}"),
            Some(c),
            Reregistration::Refuse,
        )
    };
    assert_eq!(
        reason(s.execute(sr("dev-1", "unknown"), ctx()).await),
        RefusalReason::CredentialInvalid
    );
    assert_eq!(
        reason(s.execute(sr("dev-1", "old"), ctx()).await),
        RefusalReason::ClaimTokenExpired
    );
    assert_eq!(
        reason(s.execute(sr("dev-2", "bound"), ctx()).await),
        RefusalReason::ClaimTokenWrongEndpoint
    );
    assert_eq!(
        reason(s.execute(sr("box-1", "pattern"), ctx()).await),
        RefusalReason::ClaimTokenWrongEndpoint
    );
    // Nothing of the refused ones was stored or used.
    let c = sql(&db.url).await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM claim_tokens WHERE used_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert!(events(&db.url).await.is_empty());

    let inserted = s.execute(sr("dev-1", "bound"), ctx()).await.unwrap();
    assert!(
        matches!(inserted, Effect::Insert(ref ep) if ep.metadata.get("self") == Some(&json!(true)))
    );
    let used = s
        .find_claim(&tenant(), &app(), &claim_hash(&app(), "bound"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        used.used.as_ref().map(|u| (u.at.0, u.endpoint_id.as_str())),
        Some((NOW, "dev-1"))
    );
    assert_eq!(
        reason(s.execute(sr("dev-1", "any"), ctx()).await),
        RefusalReason::AlreadyRegistered
    );
    assert_eq!(
        reason(s.execute(sr("dev-9", "bound"), ctx()).await),
        RefusalReason::ClaimTokenUsed
    );
    s.execute(sr("dev-22", "pattern"), ctx()).await.unwrap();
    // The claim "any" was not used by the refused registration.
    assert!(s
        .find_claim(&tenant(), &app(), &claim_hash(&app(), "any"))
        .await
        .unwrap()
        .unwrap()
        .used
        .is_none());

    // Re-registration: the new token, the old ones revoked; the record as it was.
    s.execute(transition("dev-1", "id-dev-1", TokenStatus::Active), ctx())
        .await
        .unwrap();
    let before = events(&db.url).await.len();
    let again = s
        .execute(
            self_register("dev-1", "tok-new", "id-new", None, Reregistration::Reissue),
            ctx(),
        )
        .await
        .unwrap();
    assert!(matches!(again, Effect::Unchanged(ref ep) if ep.version == 1));
    let listed = tokens(
        &s,
        "dev-1",
        TokenListQuery {
            ascending: true,
            ..Default::default()
        },
    )
    .await;
    let states: Vec<(&str, TokenStatus)> =
        listed.iter().map(|t| (t.id.as_str(), t.status)).collect();
    assert_eq!(
        states,
        [
            ("id-dev-1", TokenStatus::Revoked),
            ("id-new", TokenStatus::Inactive)
        ]
    );
    let new_events: Vec<TokenEventKind> = events(&db.url).await[before..]
        .iter()
        .map(|e| match e {
            OutboxEvent::Token(t) => t.kind.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        new_events,
        [
            TokenEventKind::Revoked {
                token_ids: vec![tid("id-dev-1")]
            },
            TokenEventKind::StatusChanged {
                token_id: tid("id-new"),
                previous: None,
                status: TokenStatus::Inactive
            },
        ]
    );
    // The old token's hash stays taken (its row is kept, revoked).
    assert!(matches!(
        refused(
            s.execute(
                self_register("dev-1", "tok-dev-1", "id-x", None, Reregistration::Reissue),
                ctx()
            )
            .await
        ),
        DomainError::Conflict {
            field: "endpointToken",
            ..
        }
    ));
    s.shutdown().await;
    db.drop_db().await;
}

/// Two replicas, 32 concurrent self-registrations of one ID with one claim token: exactly
/// one registers it, and the claim is used once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_on_one_claim_use_it_once() {
    let db = TestDb::create().await;
    let a = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let b = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let c = sql(&db.url).await;
    for round in 0..3 {
        let secret = format!("claim-{round}");
        let ep = format!("dev-{round}");
        a.create_claims(
            &tenant(),
            vec![claim(&format!("c{round}"), &secret, ClaimBinding::Any)],
        )
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for i in 0..32 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let cmd = self_register(
                &ep,
                &format!("tok-{round}-{i}"),
                &format!("id-{round}-{i}"),
                Some(&secret),
                Reregistration::Refuse,
            );
            tasks.push(tokio::spawn(async move { store.execute(cmd, ctx()).await }));
        }
        let mut inserted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(Effect::Insert(_)) => inserted += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(StoreError::Rejected(DomainError::Refused(r))) => assert!(
                    matches!(
                        r.reason,
                        RefusalReason::ClaimTokenUsed | RefusalReason::AlreadyRegistered
                    ),
                    "{r}"
                ),
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(inserted, 1, "round {round}");
        let row = c
            .query_one(
                "SELECT used_by, used_at FROM claim_tokens WHERE claim_id=$1",
                &[&format!("c{round}")],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, Option<String>>(0), Some(ep.clone()));
        assert_eq!(row.get::<_, Option<i64>>(1), Some(NOW));
        let (rows, tokens): (i64, i64) = {
            let r = c
                .query_one(
                    "SELECT (SELECT count(*) FROM endpoints WHERE endpoint_id=$1), \
                            (SELECT count(*) FROM tokens WHERE endpoint_id=$1)",
                    &[&ep],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!((rows, tokens), (1, 1), "round {round}");
        // One `registered` event for it.
        let registered = events(&db.url)
            .await
            .into_iter()
            .filter(|e| {
                matches!(e, OutboxEvent::Endpoint(d) if d.endpoint_id.as_str() == ep
                && d.kind == epr_core::event::EventKind::Registered)
            })
            .count();
        assert_eq!(registered, 1, "round {round}");
    }
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// Two replicas, 32 concurrent self-registrations of 32 different IDs with one claim
/// token: only the claim row's lock stops a second use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_on_one_claim_with_different_ids_use_it_once() {
    let db = TestDb::create().await;
    let a = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let b = Arc::new(PgStore::open(config(&db.url)).await.unwrap());
    let c = sql(&db.url).await;
    for round in 0..3 {
        let secret = format!("claim-{round}");
        a.create_claims(
            &tenant(),
            vec![claim(&format!("c{round}"), &secret, ClaimBinding::Any)],
        )
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for i in 0..32 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let cmd = self_register(
                &format!("dev-{round}-{i}"),
                &format!("tok-{round}-{i}"),
                &format!("id-{round}-{i}"),
                Some(&secret),
                Reregistration::Refuse,
            );
            tasks.push(tokio::spawn(async move { store.execute(cmd, ctx()).await }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(Effect::Insert(ep)) => winners.push(ep.id.to_string()),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(StoreError::Rejected(DomainError::Refused(r))) => {
                    assert_eq!(r.reason, RefusalReason::ClaimTokenUsed, "{r}")
                }
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let stored: i64 = c
            .query_one(
                "SELECT count(*) FROM endpoints WHERE endpoint_id LIKE $1",
                &[&format!("dev-{round}-%")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, 1, "round {round}");
        let used_by: Option<String> = c
            .query_one(
                "SELECT used_by FROM claim_tokens WHERE claim_id=$1",
                &[&format!("c{round}")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(used_by.as_deref(), Some(winners[0].as_str()));
    }
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "current_thread")]
async fn claims_are_created_all_or_nothing_read_and_deleted() {
    let (db, s) = setup().await;
    s.create_claims(
        &tenant(),
        vec![
            claim("c1", "one", ClaimBinding::Any),
            claim("c2", "two", ClaimBinding::Endpoint(id("d"))),
        ],
    )
    .await
    .unwrap();
    let conflict = |r: Result<(), StoreError>| match r {
        Err(StoreError::Rejected(DomainError::Conflict { field, .. })) => field,
        other => panic!("{other:?}"),
    };
    // A taken hash, a taken ID, a repeat within the lot: nothing of the lot is stored.
    assert_eq!(
        conflict(
            s.create_claims(
                &tenant(),
                vec![
                    claim("c3", "three", ClaimBinding::Any),
                    claim("c4", "one", ClaimBinding::Any)
                ]
            )
            .await
        ),
        "claimToken"
    );
    assert_eq!(
        conflict(
            s.create_claims(
                &tenant(),
                vec![
                    claim("c3", "three", ClaimBinding::Any),
                    claim("c1", "four", ClaimBinding::Any)
                ]
            )
            .await
        ),
        "claimTokenId"
    );
    assert_eq!(
        conflict(
            s.create_claims(
                &tenant(),
                vec![
                    claim("c3", "three", ClaimBinding::Any),
                    claim("c5", "three", ClaimBinding::Any)
                ]
            )
            .await
        ),
        "claimToken"
    );
    // The same ID is taken in the whole tenant, the same value only in its application.
    let mut elsewhere = claim("c1", "one", ClaimBinding::Any);
    elsewhere.app = AppName::parse("other").unwrap();
    assert_eq!(
        conflict(s.create_claims(&tenant(), vec![elsewhere.clone()]).await),
        "claimTokenId"
    );
    elsewhere.id = ClaimId::parse("c9").unwrap();
    s.create_claims(&tenant(), vec![elsewhere]).await.unwrap();
    // Another tenant is another namespace.
    s.create_claims(
        &TenantId::parse("t2").unwrap(),
        vec![claim("c1", "one", ClaimBinding::Any)],
    )
    .await
    .unwrap();

    let page = s
        .list_claims(&tenant(), &app(), PageRequest::new(0, 10))
        .await
        .unwrap();
    let listed: Vec<&str> = page.items.iter().map(|c| c.id.as_str()).collect();
    assert_eq!((page.total, listed), (2, vec!["c1", "c2"]));
    let second = s
        .list_claims(&tenant(), &app(), PageRequest::new(1, 5))
        .await
        .unwrap();
    assert_eq!((second.total, second.items.len()), (2, 1));
    assert_eq!(
        second.items[0],
        claim("c2", "two", ClaimBinding::Endpoint(id("d")))
    );
    let c1 = ClaimId::parse("c1").unwrap();
    assert_eq!(
        s.get_claim(&tenant(), &app(), &c1).await.unwrap(),
        Some(claim("c1", "one", ClaimBinding::Any))
    );
    // By ID within its application only.
    assert_eq!(
        s.get_claim(&tenant(), &AppName::parse("other").unwrap(), &c1)
            .await
            .unwrap(),
        None
    );
    assert!(s.delete_claim(&tenant(), &app(), &c1).await.unwrap());
    assert!(!s.delete_claim(&tenant(), &app(), &c1).await.unwrap());
    assert_eq!(
        s.find_claim(&tenant(), &app(), &claim_hash(&app(), "one"))
            .await
            .unwrap(),
        None
    );
    // Its value and ID are free again.
    s.create_claims(&tenant(), vec![claim("c1", "one", ClaimBinding::Any)])
        .await
        .unwrap();
    s.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rejection_log_keeps_the_latest_per_application() {
    let (db, s) = setup().await;
    let rejection = |app_name: &str, n: u64| Rejection {
        at: Timestamp(NOW + n as i64),
        app: AppName::parse(app_name).unwrap(),
        app_version: n.is_multiple_of(2).then(|| format!("v{n}")),
        endpoint_id: Some(format!("dev-{n}")),
        source: "10.0.0.1".into(),
        reason: RefusalReason::ALL[(n % 15) as usize],
        message: format!("refusal {n}"),
    };
    let extra = 5;
    for n in 0..REJECTIONS_KEPT + extra {
        s.record_rejection(&tenant(), rejection("app", n))
            .await
            .unwrap();
    }
    s.record_rejection(&tenant(), rejection("other", 0))
        .await
        .unwrap();
    let page = s
        .list_rejections(&tenant(), &app(), PageRequest::new(0, 3))
        .await
        .unwrap();
    assert_eq!(page.total, REJECTIONS_KEPT);
    let last = REJECTIONS_KEPT + extra - 1;
    assert_eq!(
        page.items,
        [
            rejection("app", last),
            rejection("app", last - 1),
            rejection("app", last - 2)
        ]
    );
    let tail = s
        .list_rejections(&tenant(), &app(), PageRequest::new(REJECTIONS_KEPT - 1, 10))
        .await
        .unwrap();
    assert_eq!(tail.items, [rejection("app", extra)]);
    let other = s
        .list_rejections(
            &tenant(),
            &AppName::parse("other").unwrap(),
            PageRequest::new(0, 10),
        )
        .await
        .unwrap();
    assert_eq!((other.total, other.items.len()), (1, 1));
    let nobody = s
        .list_rejections(
            &TenantId::parse("t2").unwrap(),
            &app(),
            PageRequest::new(0, 10),
        )
        .await
        .unwrap();
    assert_eq!((nobody.total, nobody.items.len()), (0, 0));
    s.shutdown().await;
    db.drop_db().await;
}

/// Token rows travel with their endpoint: export gives them in creation order, import
/// restores them as they were; a record without any gets one `Inactive` token whose ID
/// comes from its hash, so a re-import is a no-op.
#[tokio::test(flavor = "current_thread")]
async fn export_and_import_carry_token_rows() {
    let (db, s) = setup().await;
    s.execute(register("e1", "tok-1", "t1"), at(NOW))
        .await
        .unwrap();
    s.execute(issue("e1", "tok-1b", "t1b"), at(NOW + 1))
        .await
        .unwrap();
    s.execute(transition("e1", "t1", TokenStatus::Suspended), at(NOW + 2))
        .await
        .unwrap();
    let exported = s.export_endpoints(&tenant(), 0, 10).await.unwrap();
    assert_eq!(exported.len(), 1);
    let rows: Vec<(&str, TokenStatus, Option<i64>)> = exported[0]
        .tokens
        .iter()
        .map(|t| (t.id.as_str(), t.status, t.updated.map(|u| u.0)))
        .collect();
    assert_eq!(
        rows,
        [
            ("t1", TokenStatus::Suspended, Some(NOW + 2)),
            ("t1b", TokenStatus::Inactive, None)
        ]
    );
    assert_eq!(exported[0].token_hash, hash("tok-1"));

    // Into another tenant: as they were.
    let t2 = TenantId::parse("t2").unwrap();
    let mut copy = exported[0].clone();
    copy.tenant = t2.clone();
    // Token IDs are unique per tenant, so the copy is refused in the same tenant…
    let mut clash = exported[0].clone();
    clash.endpoint.id = id("e-clash");
    clash
        .tokens
        .iter_mut()
        .for_each(|t| t.hash = hash(&format!("other-{}", t.id)));
    let outcome = s.import(vec![ImportRecord::Endpoint(clash)]).await.unwrap();
    assert!(
        matches!(&outcome[0], ImportOutcome::Conflict(m) if m.contains("token ID")),
        "{outcome:?}"
    );
    // …and stored in another.
    assert_eq!(
        s.import(vec![ImportRecord::Endpoint(copy.clone())])
            .await
            .unwrap(),
        [ImportOutcome::Imported]
    );
    let back = s.export_endpoints(&t2, 0, 10).await.unwrap();
    assert_eq!(back[0].tokens, exported[0].tokens);

    // A record of an older export: no rows, one token from `token_hash`.
    let mut old = copy.clone();
    old.endpoint.id = id("e-old");
    old.token_hash = hash("tok-old");
    old.tokens.clear();
    let records = vec![ImportRecord::Endpoint(old)];
    assert_eq!(
        s.import(records.clone()).await.unwrap(),
        [ImportOutcome::Imported]
    );
    let found = s
        .find_token(&t2, &app(), &hash("tok-old"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.status, TokenStatus::Inactive);
    assert_eq!(found.created, copy.endpoint.created);
    let h = hash("tok-old").to_hex();
    let want = format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    assert_eq!(found.id.as_str(), want);
    assert_eq!(s.import(records).await.unwrap(), [ImportOutcome::Exists]);
    // An import emits no token events either.
    assert!(events(&db.url)
        .await
        .iter()
        .all(|e| !matches!(e, OutboxEvent::Token(t) if t.tenant == t2)));
    s.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "current_thread")]
async fn batch_registrations_store_their_token_rows() {
    let (db, s) = setup().await;
    let item = |ep: &str, token: &str, token_id: &str| BatchItem {
        registration: Ok(registration(ep, token, token_id, json!({}))),
        endpoint_id: Some(ep.into()),
        metadata_text: "{}".into(),
    };
    let outcome = s
        .register_batch(
            BatchRequest {
                task_id: "task".into(),
                app: app(),
                items: vec![
                    item("b1", "tok-b1", "tb1"),
                    item("b2", "tok-b1", "tb2"),
                    item("b3", "tok-b3", "tb3"),
                ],
            },
            ctx(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.created.len(), 2);
    assert_eq!(outcome.failed.len(), 1);
    for (ep, token, token_id) in [("b1", "tok-b1", "tb1"), ("b3", "tok-b3", "tb3")] {
        let t = s
            .find_token(&tenant(), &app(), &hash(token))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.endpoint_id.as_str(), t.id.as_str(), t.status),
            (ep, token_id, TokenStatus::Inactive)
        );
    }
    s.shutdown().await;
    db.drop_db().await;
}
