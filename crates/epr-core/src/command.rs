//! Write commands and [`plan`]: given the current record, decide the new record and the
//! events. Stores call `plan` inside their transaction, so the rules are shared by every
//! backend and the check-then-write is atomic.

use crate::credentials::{
    ClaimToken, ClaimUse, Refusal, RefusalReason, Reregistration, SelfRegistration, StoredToken,
    TokenOp, TokenStatus,
};
use crate::endpoint::{Endpoint, Precondition, TagKind};
use crate::event::{DomainEvent, EventKind};
use crate::event::{TokenEvent, TokenEventKind};
use crate::ids::{AppName, AppVersionName, EndpointId, TenantId, TokenHash, TokenId};
use crate::metadata::{Limits, Metadata, MetadataDiff, MetadataKey};
use crate::{DomainError, Timestamp, ValidationError};
use serde_json::Value;

/// A new endpoint, validated and resolved against the application catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub id: EndpointId,
    pub app: AppName,
    pub app_version: AppVersionName,
    pub metadata: Metadata,
    /// Hash of the endpoint's initial token; unique within the application.
    pub token_hash: TokenHash,
    /// The initial token's ID (`endpointTokenId`).
    pub token_id: TokenId,
}

/// A change to an endpoint's metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataChange {
    Replace(Metadata),
    /// RFC 6902 JSON Patch.
    JsonPatch(json_patch::Patch),
    /// RFC 7396 JSON Merge Patch (the patch document as given).
    MergePatch(Value),
    PutKey(MetadataKey, Value),
    DeleteKey(MetadataKey),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Register(Registration),
    Unregister {
        id: EndpointId,
        precondition: Precondition,
    },
    SetAppVersion {
        id: EndpointId,
        app: AppName,
        app_version: AppVersionName,
        precondition: Precondition,
    },
    UpdateMetadata {
        id: EndpointId,
        change: MetadataChange,
        precondition: Precondition,
    },
    /// Issues one more token to an existing endpoint (Kaa CM `POST /endpoints/{id}/tokens`).
    IssueToken {
        id: EndpointId,
        /// The application the caller named; it must be the endpoint's.
        app: AppName,
        token_hash: TokenHash,
        token_id: TokenId,
    },
    /// Moves one of the endpoint's tokens to `target` (suspend, reactivate, revoke, and
    /// the activation of an `Inactive` token on its first validation).
    TransitionToken {
        id: EndpointId,
        token_id: TokenId,
        target: TokenStatus,
        /// Against the token's entity tag ([`StoredToken::etag`]).
        precondition: Precondition,
        /// Only when the token is in this state (else `409`, field `status`); a token
        /// already in `target` is left unchanged either way.
        only_from: Option<TokenStatus>,
    },
    /// A device's self-registration (see [`SelfRegistration`]).
    SelfRegister(SelfRegistration),
}

impl Command {
    pub fn endpoint_id(&self) -> &EndpointId {
        match self {
            Self::Register(r) => &r.id,
            Self::SelfRegister(s) => &s.registration.id,
            Self::Unregister { id, .. }
            | Self::SetAppVersion { id, .. }
            | Self::UpdateMetadata { id, .. }
            | Self::IssueToken { id, .. }
            | Self::TransitionToken { id, .. } => id,
        }
    }

    /// The registration a command may insert (`Register`, `SelfRegister`).
    pub fn registration(&self) -> Option<&Registration> {
        match self {
            Self::Register(r) => Some(r),
            Self::SelfRegister(s) => Some(&s.registration),
            _ => None,
        }
    }

    /// The token hash a command may insert, with its application: stores look up whether
    /// it is taken before planning (and refuse with `409`, field `endpointToken`).
    pub fn new_token(&self) -> Option<(&AppName, &TokenHash)> {
        match self {
            Self::Register(r) => Some((&r.app, &r.token_hash)),
            Self::SelfRegister(s) => Some((&s.registration.app, &s.registration.token_hash)),
            Self::IssueToken {
                app, token_hash, ..
            } => Some((app, token_hash)),
            _ => None,
        }
    }

    /// Whether [`plan`] needs the endpoint's token rows ([`Loaded::tokens`]).
    pub fn needs_tokens(&self) -> bool {
        matches!(
            self,
            Self::Unregister { .. } | Self::TransitionToken { .. } | Self::SelfRegister(_)
        )
    }

    /// The claim token a command uses up, by application and hash: stores load (and lock)
    /// that row into [`Loaded::claim`] before planning.
    pub fn claim(&self) -> Option<(&AppName, &TokenHash)> {
        match self {
            Self::SelfRegister(s) => s.claim.as_ref().map(|h| (&s.registration.app, h)),
            _ => None,
        }
    }
}

/// What a store loads besides the endpoint row for [`plan`]: the endpoint's tokens when
/// [`Command::needs_tokens`], the claim token row when [`Command::claim`] names one (absent
/// when no such claim token exists).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub tokens: Vec<StoredToken>,
    pub claim: Option<ClaimToken>,
}

/// A plan's changes besides the endpoint row: token rows, token events, a claim token used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenChanges {
    pub ops: Vec<TokenOp>,
    /// Appended to the outbox after the plan's endpoint events.
    pub events: Vec<TokenEvent>,
    /// The claim token (by hash, in the endpoint's application) to mark used.
    pub claim_used: Option<(TokenHash, ClaimUse)>,
}

/// What every write knows besides its command.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    pub tenant: TenantId,
    pub now: Timestamp,
    pub correlation_id: String,
    pub limits: Limits,
}

/// The store-level effect of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Insert(Endpoint),
    Update(Endpoint),
    Delete(Endpoint),
    /// The command was valid but changed nothing (e.g. the same value written again).
    Unchanged(Endpoint),
}

impl Effect {
    /// The endpoint after the command (before it, for a deletion).
    pub fn endpoint(&self) -> &Endpoint {
        match self {
            Self::Insert(e) | Self::Update(e) | Self::Delete(e) | Self::Unchanged(e) => e,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub effect: Effect,
    pub events: Vec<DomainEvent>,
    pub tokens: TokenChanges,
}

impl Plan {
    /// The metadata keys a metadata command changed (its diff), or `None` when the command
    /// may have changed anything a filter reads (registration, version change, deletion).
    /// Filters reading none of these keys keep their answer, so stores skip them.
    pub fn changed_metadata_keys(&self, cmd: &Command) -> Option<std::collections::BTreeSet<&str>> {
        match (cmd, self.events.as_slice()) {
            (
                Command::UpdateMetadata { .. },
                [DomainEvent {
                    kind: EventKind::MetadataUpdated(diff),
                    ..
                }],
            ) => Some(
                diff.added
                    .keys()
                    .chain(diff.removed.keys())
                    .chain(diff.updated.keys())
                    .map(String::as_str)
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// Decides what `cmd` does given the `current` record and what else the store `loaded` for
/// it (see [`Loaded`]). `incarnation` is a store-assigned number unique per registration; it
/// is only used when the command creates an endpoint.
pub fn plan(
    current: Option<Endpoint>,
    loaded: &Loaded,
    cmd: &Command,
    ctx: &WriteCtx,
    incarnation: i64,
) -> Result<Plan, DomainError> {
    let event = |ep: &Endpoint, kind: EventKind| DomainEvent {
        tenant: ctx.tenant.clone(),
        endpoint_id: ep.id.clone(),
        app: ep.app.clone(),
        app_version: ep.app_version.clone(),
        kind,
        correlation_id: ctx.correlation_id.clone(),
        timestamp: ctx.now,
    };
    let token_event = |ep: &Endpoint, kind: TokenEventKind| TokenEvent {
        tenant: ctx.tenant.clone(),
        app: ep.app.clone(),
        endpoint_id: ep.id.clone(),
        kind,
        correlation_id: ctx.correlation_id.clone(),
        timestamp: ctx.now,
    };
    let plain = |effect, events| Plan {
        effect,
        events,
        tokens: TokenChanges::default(),
    };
    let new_token = |reg: &Registration| {
        TokenOp::Insert(StoredToken {
            id: reg.token_id.clone(),
            endpoint_id: reg.id.clone(),
            app: reg.app.clone(),
            hash: reg.token_hash,
            status: TokenStatus::Inactive,
            created: ctx.now,
            updated: None,
        })
    };
    // The endpoint's tokens that can still identify it.
    let usable = || -> Vec<TokenId> {
        loaded
            .tokens
            .iter()
            .filter(|t| t.status != TokenStatus::Revoked)
            .map(|t| t.id.clone())
            .collect()
    };
    match cmd {
        Command::Register(reg) => {
            if current.is_some() {
                return Err(DomainError::Conflict {
                    field: "endpointId",
                    message: format!("endpoint '{}' already exists", reg.id),
                });
            }
            let (ep, events) = registered(reg, ctx, incarnation, &event);
            Ok(Plan {
                effect: Effect::Insert(ep),
                events,
                tokens: TokenChanges {
                    ops: vec![new_token(reg)],
                    ..TokenChanges::default()
                },
            })
        }
        Command::SelfRegister(SelfRegistration {
            registration: reg,
            claim,
            reregistration,
        }) => {
            let claim_used = match claim {
                None => None,
                Some(hash) => {
                    let row = loaded
                        .claim
                        .as_ref()
                        .filter(|c| c.hash == *hash)
                        .ok_or_else(|| {
                            DomainError::Refused(Refusal::new(
                                RefusalReason::CredentialInvalid,
                                "the claim token is not known",
                            ))
                        })?;
                    row.check(&reg.app, &reg.id, ctx.now)
                        .map_err(DomainError::Refused)?;
                    Some((
                        *hash,
                        ClaimUse {
                            at: ctx.now,
                            endpoint_id: reg.id.clone(),
                        },
                    ))
                }
            };
            match current {
                None => {
                    let (ep, events) = registered(reg, ctx, incarnation, &event);
                    Ok(Plan {
                        effect: Effect::Insert(ep),
                        events,
                        tokens: TokenChanges {
                            ops: vec![new_token(reg)],
                            events: vec![],
                            claim_used,
                        },
                    })
                }
                Some(ep) if ep.app != reg.app || *reregistration == Reregistration::Refuse => {
                    Err(DomainError::Refused(Refusal::new(
                        RefusalReason::AlreadyRegistered,
                        format!("endpoint '{}' is already registered", reg.id),
                    )))
                }
                Some(ep) => {
                    // A factory reset: the device gets a new token, every earlier one is
                    // revoked; the record stays as it is.
                    let old = usable();
                    let mut ops: Vec<TokenOp> = old
                        .iter()
                        .map(|id| TokenOp::SetStatus {
                            id: id.clone(),
                            status: TokenStatus::Revoked,
                            updated: ctx.now,
                        })
                        .collect();
                    ops.push(new_token(reg));
                    let mut events = Vec::new();
                    if !old.is_empty() {
                        events.push(token_event(&ep, TokenEventKind::Revoked { token_ids: old }));
                    }
                    events.push(token_event(
                        &ep,
                        TokenEventKind::StatusChanged {
                            token_id: reg.token_id.clone(),
                            previous: None,
                            status: TokenStatus::Inactive,
                        },
                    ));
                    Ok(Plan {
                        effect: Effect::Unchanged(ep),
                        events: vec![],
                        tokens: TokenChanges {
                            ops,
                            events,
                            claim_used,
                        },
                    })
                }
            }
        }
        Command::Unregister { id, precondition } => {
            let ep = current.ok_or_else(|| DomainError::not_found("endpoint", id.as_str()))?;
            precondition.check(&ep, TagKind::Endpoint)?;
            let events = vec![event(&ep, EventKind::Unregistered)];
            let revoked = usable();
            let token_events = if revoked.is_empty() {
                vec![]
            } else {
                vec![token_event(
                    &ep,
                    TokenEventKind::Revoked { token_ids: revoked },
                )]
            };
            Ok(Plan {
                effect: Effect::Delete(ep),
                events,
                tokens: TokenChanges {
                    ops: vec![TokenOp::DeleteAll],
                    events: token_events,
                    claim_used: None,
                },
            })
        }
        Command::SetAppVersion {
            id,
            app,
            app_version,
            precondition,
        } => {
            let mut ep = current.ok_or_else(|| DomainError::not_found("endpoint", id.as_str()))?;
            precondition.check(&ep, TagKind::Endpoint)?;
            if &ep.app != app {
                return Err(ValidationError::new(
                    "name",
                    "same-application",
                    format!(
                        "application version '{app_version}' belongs to application '{app}', \
                         but endpoint '{id}' belongs to application '{}'",
                        ep.app
                    ),
                )
                .into());
            }
            if &ep.app_version == app_version {
                return Ok(plain(Effect::Unchanged(ep), vec![]));
            }
            let previous = std::mem::replace(&mut ep.app_version, app_version.clone());
            ep.app_version_registered = ctx.now;
            ep.version += 1;
            let events = vec![event(&ep, EventKind::AppVersionUpdated { previous })];
            Ok(plain(Effect::Update(ep), events))
        }
        Command::UpdateMetadata {
            id,
            change,
            precondition,
        } => {
            let mut ep = current.ok_or_else(|| DomainError::not_found("endpoint", id.as_str()))?;
            precondition.check(&ep, TagKind::Metadata)?;
            let new_md = apply_change(&ep.metadata, change, &ctx.limits)?;
            let diff = MetadataDiff::between(&ep.metadata, &new_md);
            if diff.is_empty() {
                return Ok(plain(Effect::Unchanged(ep), vec![]));
            }
            ep.metadata = new_md;
            ep.metadata_updated = Some(ctx.now);
            ep.version += 1;
            ep.metadata_version += 1;
            let events = vec![event(&ep, EventKind::MetadataUpdated(diff))];
            Ok(plain(Effect::Update(ep), events))
        }
        Command::IssueToken {
            id,
            app,
            token_hash,
            token_id,
        } => {
            let ep = current.ok_or_else(|| DomainError::not_found("endpoint", id.as_str()))?;
            if &ep.app != app {
                return Err(ValidationError::new(
                    "applicationName",
                    "same-application",
                    format!(
                        "endpoint '{id}' belongs to application '{}', not '{app}'",
                        ep.app
                    ),
                )
                .into());
            }
            let op = TokenOp::Insert(StoredToken {
                id: token_id.clone(),
                endpoint_id: ep.id.clone(),
                app: ep.app.clone(),
                hash: *token_hash,
                status: TokenStatus::Inactive,
                created: ctx.now,
                updated: None,
            });
            let ev = token_event(
                &ep,
                TokenEventKind::StatusChanged {
                    token_id: token_id.clone(),
                    previous: None,
                    status: TokenStatus::Inactive,
                },
            );
            Ok(Plan {
                effect: Effect::Unchanged(ep),
                events: vec![],
                tokens: TokenChanges {
                    ops: vec![op],
                    events: vec![ev],
                    claim_used: None,
                },
            })
        }
        Command::TransitionToken {
            id,
            token_id,
            target,
            precondition,
            only_from,
        } => {
            let ep = current.ok_or_else(|| DomainError::not_found("endpoint", id.as_str()))?;
            let token = loaded
                .tokens
                .iter()
                .find(|t| &t.id == token_id)
                .ok_or_else(|| DomainError::not_found("endpoint token", token_id.as_str()))?;
            precondition.check_tag(token.etag())?;
            if token.status == *target {
                return Ok(plain(Effect::Unchanged(ep), vec![]));
            }
            if let Some(from) = only_from {
                if token.status != *from {
                    return Err(DomainError::Conflict {
                        field: "status",
                        message: format!(
                            "the token is {}, not {}",
                            token.status.as_str(),
                            from.as_str()
                        ),
                    });
                }
            }
            token.status.check_transition(*target)?;
            let kind = if *target == TokenStatus::Revoked {
                TokenEventKind::Revoked {
                    token_ids: vec![token_id.clone()],
                }
            } else {
                TokenEventKind::StatusChanged {
                    token_id: token_id.clone(),
                    previous: Some(token.status),
                    status: *target,
                }
            };
            let ev = token_event(&ep, kind);
            Ok(Plan {
                effect: Effect::Unchanged(ep),
                events: vec![],
                tokens: TokenChanges {
                    ops: vec![TokenOp::SetStatus {
                        id: token_id.clone(),
                        status: *target,
                        updated: ctx.now,
                    }],
                    events: vec![ev],
                    claim_used: None,
                },
            })
        }
    }
}

/// A new endpoint record and its events.
fn registered(
    reg: &Registration,
    ctx: &WriteCtx,
    incarnation: i64,
    event: &dyn Fn(&Endpoint, EventKind) -> DomainEvent,
) -> (Endpoint, Vec<DomainEvent>) {
    let ep = Endpoint {
        id: reg.id.clone(),
        app: reg.app.clone(),
        app_version: reg.app_version.clone(),
        app_version_registered: ctx.now,
        created: ctx.now,
        metadata: reg.metadata.clone(),
        metadata_updated: None,
        incarnation,
        version: 1,
        metadata_version: 1,
    };
    // Initial metadata is a metadata change too (15/EME: "any change"): consumers that track
    // metadata from events would otherwise never learn it.
    let mut events = vec![event(&ep, EventKind::Registered)];
    let initial = MetadataDiff::between(&Metadata::empty(), &ep.metadata);
    if !initial.is_empty() {
        events.push(event(&ep, EventKind::MetadataUpdated(initial)));
    }
    (ep, events)
}

/// Applies a metadata change to a document, validating the result.
pub fn apply_change(
    current: &Metadata,
    change: &MetadataChange,
    limits: &Limits,
) -> Result<Metadata, DomainError> {
    match change {
        MetadataChange::Replace(md) => Ok(md.clone()),
        MetadataChange::JsonPatch(patch) => crate::patch::apply_json_patch(current, patch, limits),
        MetadataChange::MergePatch(patch) => {
            if !patch.is_object() {
                return Err(ValidationError::new(
                    "body",
                    "type",
                    "a merge patch of metadata must be a JSON object",
                )
                .into());
            }
            let mut doc = current.to_value();
            json_patch::merge(&mut doc, patch);
            Metadata::parse(doc, "metadata", limits)
        }
        MetadataChange::PutKey(key, value) => {
            let mut map = current.as_map().clone();
            map.insert(key.as_str().to_owned(), value.clone());
            Metadata::from_map(map, "metadata", limits)
        }
        MetadataChange::DeleteKey(key) => {
            let mut map = current.as_map().clone();
            if map.remove(key.as_str()).is_none() {
                return Err(DomainError::not_found("metadata key", key.as_str()));
            }
            Ok(Metadata::from_stored(map))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EndpointToken;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn ctx() -> WriteCtx {
        WriteCtx {
            tenant: TenantId::parse("kaa").unwrap(),
            now: Timestamp(1000),
            correlation_id: "c1".into(),
            limits: Limits::default(),
        }
    }

    fn registered(md: Value) -> Endpoint {
        let app = AppName::parse("demo").unwrap();
        let reg = Registration {
            id: EndpointId::parse("e1").unwrap(),
            app: app.clone(),
            app_version: AppVersionName::parse("demo-v1").unwrap(),
            metadata: Metadata::parse(md, "metadata", &Limits::default()).unwrap(),
            token_hash: EndpointToken::parse("t").unwrap().hash(&app),
            token_id: TokenId::parse("tok-1").unwrap(),
        };
        let has_metadata = !reg.metadata.as_map().is_empty();
        let p = plan(None, &Loaded::default(), &Command::Register(reg), &ctx(), 7).unwrap();
        assert_eq!(p.events[0].kind, EventKind::Registered);
        // Initial metadata is announced as added keys, right after `registered`.
        match &p.events[1..] {
            [] => assert!(!has_metadata),
            [e] => match &e.kind {
                EventKind::MetadataUpdated(d) => {
                    assert!(has_metadata);
                    let all: BTreeMap<_, _> = p
                        .effect
                        .endpoint()
                        .metadata
                        .as_map()
                        .clone()
                        .into_iter()
                        .collect();
                    assert_eq!(d.added, all);
                }
                other => panic!("unexpected {other:?}"),
            },
            more => panic!("unexpected events {more:?}"),
        }
        p.effect.endpoint().clone()
    }

    fn update(ep: &Endpoint, change: MetadataChange) -> Result<Plan, DomainError> {
        plan(
            Some(ep.clone()),
            &Loaded::default(),
            &Command::UpdateMetadata {
                id: ep.id.clone(),
                change,
                precondition: Precondition::None,
            },
            &ctx(),
            0,
        )
    }

    #[test]
    fn register_twice_conflicts() {
        let ep = registered(json!({}));
        let reg = Registration {
            id: ep.id.clone(),
            app: ep.app.clone(),
            app_version: ep.app_version.clone(),
            metadata: Metadata::empty(),
            token_hash: EndpointToken::parse("x").unwrap().hash(&ep.app),
            token_id: TokenId::parse("tok-2").unwrap(),
        };
        let err = plan(
            Some(ep),
            &Loaded::default(),
            &Command::Register(reg),
            &ctx(),
            8,
        )
        .unwrap_err();
        assert!(matches!(err, DomainError::Conflict { .. }));
    }

    #[test]
    fn metadata_update_emits_diff_and_bumps_versions() {
        let ep = registered(json!({"a": 1}));
        let key = MetadataKey::parse("b", &Limits::default()).unwrap();
        let p = update(&ep, MetadataChange::PutKey(key, json!("x"))).unwrap();
        let new = p.effect.endpoint();
        assert_eq!(new.version, 2);
        assert_eq!(new.metadata_version, 2);
        assert_eq!(new.metadata_updated, Some(Timestamp(1000)));
        match &p.events[0].kind {
            EventKind::MetadataUpdated(d) => assert_eq!(d.added.get("b"), Some(&json!("x"))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unchanged_writes_emit_nothing() {
        let ep = registered(json!({"a": 1}));
        let key = MetadataKey::parse("a", &Limits::default()).unwrap();
        let p = update(&ep, MetadataChange::PutKey(key, json!(1))).unwrap();
        assert!(matches!(p.effect, Effect::Unchanged(_)));
        assert!(p.events.is_empty());
    }

    #[test]
    fn precondition_is_checked_against_metadata_tag() {
        let ep = registered(json!({}));
        let cmd = Command::UpdateMetadata {
            id: ep.id.clone(),
            change: MetadataChange::MergePatch(json!({"a": 1})),
            precondition: Precondition::OneOf(vec![ep.etag()]),
        };
        // The endpoint tag is not the metadata tag.
        assert!(matches!(
            plan(Some(ep.clone()), &Loaded::default(), &cmd, &ctx(), 0),
            Err(DomainError::PreconditionFailed { .. })
        ));
        let cmd = Command::UpdateMetadata {
            id: ep.id.clone(),
            change: MetadataChange::MergePatch(json!({"a": 1})),
            precondition: Precondition::OneOf(vec![ep.metadata_etag()]),
        };
        assert!(plan(Some(ep), &Loaded::default(), &cmd, &ctx(), 0).is_ok());
    }

    #[test]
    fn failed_json_patch_names_the_operation() {
        let ep = registered(json!({"a": 1}));
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/b", "value": 2},
            {"op": "test", "path": "/a", "value": 9}
        ]))
        .unwrap();
        match update(&ep, MetadataChange::JsonPatch(patch)) {
            Err(DomainError::Invalid(v)) => {
                assert_eq!(v.field, "[1]");
                assert_eq!(v.rule, "json-patch");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn patch_result_must_stay_an_object_within_limits() {
        let ep = registered(json!({"a": 1}));
        let patch: json_patch::Patch =
            serde_json::from_value(json!([{"op": "replace", "path": "", "value": [1]}])).unwrap();
        assert!(update(&ep, MetadataChange::JsonPatch(patch)).is_err());
        let big = "x".repeat(70_000);
        assert!(matches!(
            update(&ep, MetadataChange::MergePatch(json!({ "b": big }))),
            Err(DomainError::TooLarge { .. })
        ));
    }

    #[test]
    fn app_version_change_stays_in_application() {
        let ep = registered(json!({}));
        let cmd = |app: &str, ver: &str| Command::SetAppVersion {
            id: ep.id.clone(),
            app: AppName::parse(app).unwrap(),
            app_version: AppVersionName::parse(ver).unwrap(),
            precondition: Precondition::None,
        };
        assert!(plan(
            Some(ep.clone()),
            &Loaded::default(),
            &cmd("other", "other-v1"),
            &ctx(),
            0
        )
        .is_err());
        let p = plan(
            Some(ep.clone()),
            &Loaded::default(),
            &cmd("demo", "demo-v2"),
            &ctx(),
            0,
        )
        .unwrap();
        assert!(matches!(
            &p.events[0].kind,
            EventKind::AppVersionUpdated { previous } if previous.as_str() == "demo-v1"
        ));
        assert_eq!(
            p.effect.endpoint().metadata_version,
            1,
            "metadata tag unchanged"
        );
    }

    fn token(ep: &Endpoint, id: &str, status: TokenStatus) -> StoredToken {
        StoredToken {
            id: TokenId::parse(id).unwrap(),
            endpoint_id: ep.id.clone(),
            app: ep.app.clone(),
            hash: EndpointToken::parse(id).unwrap().hash(&ep.app),
            status,
            created: Timestamp(1),
            updated: None,
        }
    }

    fn transition(
        ep: &Endpoint,
        loaded: &Loaded,
        target: TokenStatus,
    ) -> Result<Plan, DomainError> {
        plan(
            Some(ep.clone()),
            loaded,
            &Command::TransitionToken {
                id: ep.id.clone(),
                token_id: TokenId::parse("t1").unwrap(),
                target,
                precondition: Precondition::None,
                only_from: None,
            },
            &ctx(),
            0,
        )
    }

    #[test]
    fn registration_inserts_an_inactive_token() {
        let app = AppName::parse("demo").unwrap();
        let reg = Registration {
            id: EndpointId::parse("e1").unwrap(),
            app: app.clone(),
            app_version: AppVersionName::parse("demo-v1").unwrap(),
            metadata: Metadata::empty(),
            token_hash: EndpointToken::parse("t").unwrap().hash(&app),
            token_id: TokenId::parse("tok-1").unwrap(),
        };
        let p = plan(None, &Loaded::default(), &Command::Register(reg), &ctx(), 7).unwrap();
        match p.tokens.ops.as_slice() {
            [TokenOp::Insert(t)] => {
                assert_eq!(t.status, TokenStatus::Inactive);
                assert_eq!(t.id.as_str(), "tok-1");
            }
            other => panic!("{other:?}"),
        }
        assert!(p.tokens.events.is_empty());
    }

    #[test]
    fn token_transitions_emit_their_events() {
        let ep = registered(json!({}));
        let loaded = Loaded {
            tokens: vec![token(&ep, "t1", TokenStatus::Active)],
            claim: None,
        };
        let p = transition(&ep, &loaded, TokenStatus::Suspended).unwrap();
        assert!(matches!(p.effect, Effect::Unchanged(_)));
        assert!(matches!(
            p.tokens.events[0].kind,
            TokenEventKind::StatusChanged {
                previous: Some(TokenStatus::Active),
                status: TokenStatus::Suspended,
                ..
            }
        ));
        let p = transition(&ep, &loaded, TokenStatus::Revoked).unwrap();
        assert!(
            matches!(&p.tokens.events[0].kind, TokenEventKind::Revoked { token_ids } if token_ids.len() == 1)
        );
        // The same state again changes nothing.
        let p = transition(&ep, &loaded, TokenStatus::Active).unwrap();
        assert!(p.tokens.ops.is_empty() && p.tokens.events.is_empty());
        // Revoked is final; unknown tokens are 404.
        let revoked = Loaded {
            tokens: vec![token(&ep, "t1", TokenStatus::Revoked)],
            claim: None,
        };
        assert!(matches!(
            transition(&ep, &revoked, TokenStatus::Active),
            Err(DomainError::Conflict {
                field: "status",
                ..
            })
        ));
        assert!(matches!(
            transition(&ep, &Loaded::default(), TokenStatus::Active),
            Err(DomainError::NotFound { .. })
        ));
    }

    #[test]
    fn unregistration_revokes_usable_tokens() {
        let ep = registered(json!({}));
        let loaded = Loaded {
            tokens: vec![
                token(&ep, "t1", TokenStatus::Active),
                token(&ep, "t2", TokenStatus::Revoked),
                token(&ep, "t3", TokenStatus::Suspended),
            ],
            claim: None,
        };
        let cmd = Command::Unregister {
            id: ep.id.clone(),
            precondition: Precondition::None,
        };
        let p = plan(Some(ep), &loaded, &cmd, &ctx(), 0).unwrap();
        assert_eq!(p.tokens.ops, vec![TokenOp::DeleteAll]);
        match &p.tokens.events[0].kind {
            TokenEventKind::Revoked { token_ids } => {
                let ids: Vec<_> = token_ids.iter().map(TokenId::as_str).collect();
                assert_eq!(ids, ["t1", "t3"]);
            }
            other => panic!("{other:?}"),
        }
    }

    fn self_reg(ep_id: &str, claim: Option<&str>, rereg: Reregistration) -> Command {
        let app = AppName::parse("demo").unwrap();
        Command::SelfRegister(SelfRegistration {
            registration: Registration {
                id: EndpointId::parse(ep_id).unwrap(),
                app: app.clone(),
                app_version: AppVersionName::parse("demo-v1").unwrap(),
                metadata: Metadata::empty(),
                token_hash: EndpointToken::parse("new").unwrap().hash(&app),
                token_id: TokenId::parse("t-new").unwrap(),
            },
            claim: claim.map(|c| crate::credentials::claim_hash(&app, c)),
            reregistration: rereg,
        })
    }

    #[test]
    fn self_registration_uses_up_its_claim_and_follows_the_reregistration_policy() {
        use crate::credentials::{claim_hash, ClaimBinding};
        let app = AppName::parse("demo").unwrap();
        let claim = ClaimToken {
            id: crate::ids::ClaimId::parse("c1").unwrap(),
            app: app.clone(),
            hash: claim_hash(&app, "claim"),
            created: Timestamp(0),
            expires: Timestamp(5000),
            binding: ClaimBinding::Any,
            used: None,
        };
        let with_claim = Loaded {
            tokens: vec![],
            claim: Some(claim),
        };
        let cmd = self_reg("e1", Some("claim"), Reregistration::Refuse);
        let p = plan(None, &with_claim, &cmd, &ctx(), 3).unwrap();
        assert!(matches!(p.effect, Effect::Insert(_)));
        assert_eq!(
            p.tokens.claim_used.as_ref().unwrap().1.endpoint_id.as_str(),
            "e1"
        );
        // An unknown claim token is an invalid credential.
        let refused = |r: Result<Plan, DomainError>| match r {
            Err(DomainError::Refused(r)) => r.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(plan(None, &Loaded::default(), &cmd, &ctx(), 3)),
            RefusalReason::CredentialInvalid
        );
        // An existing ID: refused, or a new token with the old ones revoked.
        let ep = registered(json!({}));
        assert_eq!(
            refused(plan(Some(ep.clone()), &with_claim, &cmd, &ctx(), 3)),
            RefusalReason::AlreadyRegistered
        );
        let loaded = Loaded {
            tokens: vec![token(&ep, "t1", TokenStatus::Active)],
            claim: None,
        };
        let cmd = self_reg("e1", None, Reregistration::Reissue);
        let p = plan(Some(ep), &loaded, &cmd, &ctx(), 3).unwrap();
        assert!(matches!(p.effect, Effect::Unchanged(_)));
        assert_eq!(p.tokens.ops.len(), 2);
        assert!(
            matches!(&p.tokens.events[0].kind, TokenEventKind::Revoked { token_ids } if token_ids[0].as_str() == "t1")
        );
    }
}
