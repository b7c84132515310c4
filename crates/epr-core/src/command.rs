//! Write commands and [`plan`]: given the current record, decide the new record and the
//! events. Stores call `plan` inside their transaction, so the rules are shared by every
//! backend and the check-then-write is atomic.

use crate::endpoint::{Endpoint, Precondition, TagKind};
use crate::event::{DomainEvent, EventKind};
use crate::ids::{AppName, AppVersionName, EndpointId, TenantId, TokenHash};
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
}

impl Command {
    pub fn endpoint_id(&self) -> &EndpointId {
        match self {
            Self::Register(r) => &r.id,
            Self::Unregister { id, .. }
            | Self::SetAppVersion { id, .. }
            | Self::UpdateMetadata { id, .. } => id,
        }
    }
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

/// Decides what `cmd` does given the `current` record. `incarnation` is a store-assigned
/// number unique per registration; it is only used when the command creates an endpoint.
pub fn plan(
    current: Option<Endpoint>,
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
    match cmd {
        Command::Register(reg) => {
            if current.is_some() {
                return Err(DomainError::Conflict {
                    field: "endpointId",
                    message: format!("endpoint '{}' already exists", reg.id),
                });
            }
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
            // Initial metadata is a metadata change too (15/EME: "any change"): consumers
            // that track metadata from events would otherwise never learn it.
            let mut events = vec![event(&ep, EventKind::Registered)];
            let initial = MetadataDiff::between(&Metadata::empty(), &ep.metadata);
            if !initial.is_empty() {
                events.push(event(&ep, EventKind::MetadataUpdated(initial)));
            }
            Ok(Plan {
                effect: Effect::Insert(ep),
                events,
            })
        }
        Command::Unregister { id, precondition } => {
            let ep = current.ok_or_else(|| DomainError::not_found("endpoint", id.as_str()))?;
            precondition.check(&ep, TagKind::Endpoint)?;
            let events = vec![event(&ep, EventKind::Unregistered)];
            Ok(Plan {
                effect: Effect::Delete(ep),
                events,
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
                return Ok(Plan {
                    effect: Effect::Unchanged(ep),
                    events: vec![],
                });
            }
            let previous = std::mem::replace(&mut ep.app_version, app_version.clone());
            ep.app_version_registered = ctx.now;
            ep.version += 1;
            let events = vec![event(&ep, EventKind::AppVersionUpdated { previous })];
            Ok(Plan {
                effect: Effect::Update(ep),
                events,
            })
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
                return Ok(Plan {
                    effect: Effect::Unchanged(ep),
                    events: vec![],
                });
            }
            ep.metadata = new_md;
            ep.metadata_updated = Some(ctx.now);
            ep.version += 1;
            ep.metadata_version += 1;
            let events = vec![event(&ep, EventKind::MetadataUpdated(diff))];
            Ok(Plan {
                effect: Effect::Update(ep),
                events,
            })
        }
    }
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
        };
        let has_metadata = !reg.metadata.as_map().is_empty();
        let p = plan(None, &Command::Register(reg), &ctx(), 7).unwrap();
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
        };
        let err = plan(Some(ep), &Command::Register(reg), &ctx(), 8).unwrap_err();
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
            plan(Some(ep.clone()), &cmd, &ctx(), 0),
            Err(DomainError::PreconditionFailed { .. })
        ));
        let cmd = Command::UpdateMetadata {
            id: ep.id.clone(),
            change: MetadataChange::MergePatch(json!({"a": 1})),
            precondition: Precondition::OneOf(vec![ep.metadata_etag()]),
        };
        assert!(plan(Some(ep), &cmd, &ctx(), 0).is_ok());
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
        assert!(plan(Some(ep.clone()), &cmd("other", "other-v1"), &ctx(), 0).is_err());
        let p = plan(Some(ep.clone()), &cmd("demo", "demo-v2"), &ctx(), 0).unwrap();
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
}
