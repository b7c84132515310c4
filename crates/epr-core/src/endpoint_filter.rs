//! Saved endpoint filters: a named [`Filter`] query in one application, with its status
//! (`pending` while the back-fill evaluates it over the application's endpoints, then
//! `active`) and its membership count.
//!
//! Filter IDs become a token of 18/EFE subjects (`kaa.v1.events.{epr}.endpoint-filter.{id}.…`),
//! so they are restricted to characters that are valid there.

use crate::command::WriteCtx;
use crate::endpoint::Precondition;
use crate::event::{FilterEvent, FilterEventKind};
use crate::filter::{Filter, FilterSet};
use crate::ids::AppName;
use crate::{DomainError, Timestamp, ValidationError};
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

/// A filter's ID: 1 to 64 of `A-Z a-z 0-9 _ -`, so it is one NATS subject token and safe
/// in a URL path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilterId(String);

impl FilterId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        if s.is_empty() || s.len() > 64 {
            return Err(ValidationError::new(
                "filterId",
                "pattern",
                "a filter ID has 1 to 64 characters",
            ));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(ValidationError::new(
                "filterId",
                "pattern",
                format!(
                    "a filter ID may hold only A-Z, a-z, 0-9, '_' and '-'; '{}' is not allowed",
                    bad.escape_default()
                ),
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FilterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterStatus {
    /// Being evaluated over the application's endpoints; listing by it is refused.
    Pending,
    /// Membership is complete and kept up to date by every write.
    Active,
}

impl FilterStatus {
    /// Kaa's wire form (`"pending"`, `"active"`).
    pub fn as_str(self) -> &'static str {
        match self {
            FilterStatus::Pending => "pending",
            FilterStatus::Active => "active",
        }
    }
}

/// Longest filter name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 4096;

/// A validated filter definition: what create and update set.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    pub name: String,
    pub description: String,
    /// The query as given (returned as is by reads).
    pub query: Map<String, Value>,
    pub compiled: Arc<Filter>,
}

impl FilterSpec {
    /// Validates a definition. `mongoQuery` is accepted as a JSON object or as a string
    /// holding one (Kaa's UI sends a string, its API returns an object).
    pub fn parse(name: &str, description: &str, mongo_query: &Value) -> Result<Self, DomainError> {
        let name = check_name(name)?;
        if description.len() > MAX_DESCRIPTION_LEN {
            return Err(ValidationError::new(
                "description",
                "max-length",
                format!("a description has at most {MAX_DESCRIPTION_LEN} bytes"),
            )
            .into());
        }
        // PostgreSQL's text and jsonb cannot hold U+0000; refused on every backend alike.
        if description.contains('\0') {
            return Err(ValidationError::new(
                "description",
                "pattern",
                "a description must not contain the NUL character (U+0000)",
            )
            .into());
        }
        let query = match mongo_query {
            Value::String(text) => serde_json::from_str::<Value>(text).map_err(|e| {
                ValidationError::new(
                    "mongoQuery",
                    "type",
                    format!("mongoQuery is a string but not JSON: {e}"),
                )
            })?,
            other => other.clone(),
        };
        if crate::metadata::contains_nul(&query) {
            return Err(ValidationError::new(
                "mongoQuery",
                "pattern",
                "mongoQuery must not contain the NUL character (U+0000)",
            )
            .into());
        }
        let compiled = Filter::parse(&query)?;
        let Value::Object(query) = query else {
            // Filter::parse accepts only objects; kept for the type.
            return Err(ValidationError::new("mongoQuery", "type", "must be a JSON object").into());
        };
        Ok(Self {
            name,
            description: description.to_owned(),
            query,
            compiled: Arc::new(compiled),
        })
    }
}

fn check_name(name: &str) -> Result<String, DomainError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(ValidationError::new("name", "required", "a filter needs a name").into());
    }
    if trimmed.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            "name",
            "max-length",
            format!("a filter name has at most {MAX_NAME_LEN} bytes"),
        )
        .into());
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "name",
            "pattern",
            "a filter name must not contain control characters",
        )
        .into());
    }
    Ok(trimmed.to_owned())
}

/// A saved filter.
#[derive(Debug, Clone)]
pub struct EndpointFilter {
    pub id: FilterId,
    pub app: AppName,
    pub spec: FilterSpec,
    pub status: FilterStatus,
    /// Endpoints that match (complete once `active`).
    pub matched: u64,
    pub created: Timestamp,
    pub updated: Timestamp,
    /// Bumped by every change of the definition; the entity tag.
    pub version: u64,
}

impl EndpointFilter {
    /// Strong entity tag of the definition.
    pub fn etag(&self) -> String {
        format!("\"f{}\"", self.version)
    }
}

/// A partial change of a filter's definition (`PATCH`): absent parts stay as they are.
#[derive(Debug, Clone, Default)]
pub struct FilterPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    /// The new query and its compiled form.
    pub query: Option<(Map<String, Value>, Arc<Filter>)>,
}

impl FilterPatch {
    /// Validates the parts given, with the same rules as [`FilterSpec::parse`].
    pub fn parse(
        name: Option<&str>,
        description: Option<&str>,
        mongo_query: Option<&Value>,
    ) -> Result<Self, DomainError> {
        // Validate through FilterSpec so create and update share every rule.
        let probe = FilterSpec::parse(
            name.unwrap_or("x"),
            description.unwrap_or(""),
            mongo_query.unwrap_or(&Value::Object(Map::new())),
        )?;
        Ok(Self {
            name: name.map(|_| probe.name.clone()),
            description: description.map(|_| probe.description.clone()),
            query: mongo_query.map(|_| (probe.query.clone(), probe.compiled.clone())),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.name.is_none() && self.description.is_none() && self.query.is_none()
    }
}

/// A write to the saved filters of one application.
#[derive(Debug, Clone)]
pub enum FilterCommand {
    Create {
        id: FilterId,
        app: AppName,
        spec: FilterSpec,
    },
    Update {
        id: FilterId,
        app: AppName,
        patch: FilterPatch,
        precondition: Precondition,
    },
    Delete {
        id: FilterId,
        app: AppName,
        precondition: Precondition,
    },
}

impl FilterCommand {
    pub fn filter_id(&self) -> &FilterId {
        match self {
            Self::Create { id, .. } | Self::Update { id, .. } | Self::Delete { id, .. } => id,
        }
    }
}

/// What a filter command does to the stored filter.
#[derive(Debug, Clone)]
pub enum FilterEffect {
    /// A new filter, pending: its back-fill starts.
    Insert(EndpointFilter),
    /// A changed definition. `restart` when the query changed: the filter went (back) to
    /// pending, its membership is rebuilt by a new back-fill.
    Update {
        filter: EndpointFilter,
        restart: bool,
    },
    Delete(EndpointFilter),
    /// Valid, but nothing changed (the same definition written again).
    Unchanged(EndpointFilter),
}

impl FilterEffect {
    pub fn filter(&self) -> &EndpointFilter {
        match self {
            Self::Insert(f) | Self::Delete(f) | Self::Unchanged(f) => f,
            Self::Update { filter, .. } => filter,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FilterPlan {
    pub effect: FilterEffect,
    pub events: Vec<FilterEvent>,
}

/// Whether a write may change a filter's answer: `false` only when the filter says which
/// metadata keys it reads (`reads`) and the write changed none of them.
pub fn reads_changed(
    reads: Option<&[String]>,
    changed_keys: Option<&std::collections::BTreeSet<&str>>,
) -> bool {
    match (changed_keys, reads) {
        (Some(changed), Some(reads)) => reads.iter().any(|k| changed.contains(k.as_str())),
        _ => true,
    }
}

/// Whether an endpoint write changes its membership in a filter: `Some(now_member)` when it
/// does, `None` when it does not. `old` is the state before the write, `new` the state
/// after it (`None` for a deletion). `reads` are the metadata keys the filter reads
/// ([`Filter::metadata_keys`]) and `changed_keys` those a metadata write changed: when the
/// two are disjoint the answer cannot have changed and the filter is not evaluated. Both
/// stores' live matching decides with this.
pub fn membership_change(
    filter: &Filter,
    reads: Option<&[String]>,
    old: Option<&crate::endpoint::Endpoint>,
    new: Option<&crate::endpoint::Endpoint>,
    changed_keys: Option<&std::collections::BTreeSet<&str>>,
) -> Option<bool> {
    if !reads_changed(reads, changed_keys) {
        return None;
    }
    let matches =
        |e: &crate::endpoint::Endpoint| filter.matches(e.app_version.as_str(), e.metadata.as_map());
    let was = old.is_some_and(matches);
    let is = new.is_some_and(matches);
    (was != is).then_some(is)
}

/// [`membership_change`] of every filter of `set` at once (in its order), for a write that
/// may change anything about the endpoint (a registration, a deletion): the endpoint is
/// evaluated through the set's index, once before and once after the write.
pub fn membership_changes(
    set: &FilterSet,
    old: Option<&crate::endpoint::Endpoint>,
    new: Option<&crate::endpoint::Endpoint>,
) -> Vec<Option<bool>> {
    let matches =
        |e: &crate::endpoint::Endpoint| set.matches(e.app_version.as_str(), e.metadata.as_map());
    let (was, is) = (old.map(matches), new.map(matches));
    (0..set.len())
        .map(|i| {
            let was = was.as_ref().is_some_and(|w| w[i]);
            let is = is.as_ref().is_some_and(|n| n[i]);
            (was != is).then_some(is)
        })
        .collect()
}

/// Decides what a filter command does given the stored filter (`None` if there is none with
/// that ID in the tenant). Name uniqueness needs an index, so stores check it.
pub fn plan_filter(
    current: Option<EndpointFilter>,
    cmd: &FilterCommand,
    ctx: &WriteCtx,
) -> Result<FilterPlan, DomainError> {
    let event = |f: &EndpointFilter, kind: FilterEventKind| FilterEvent {
        tenant: ctx.tenant.clone(),
        app: f.app.clone(),
        filter_id: f.id.clone(),
        filter_name: f.spec.name.clone(),
        kind,
        correlation_id: ctx.correlation_id.clone(),
        timestamp: ctx.now,
    };
    // A filter of another application is not found through this one.
    let existing = |app: &AppName, id: &FilterId| -> Result<EndpointFilter, DomainError> {
        current
            .clone()
            .filter(|f| &f.app == app)
            .ok_or_else(|| DomainError::not_found("endpoint filter", id.as_str()))
    };
    match cmd {
        FilterCommand::Create { id, app, spec } => {
            if current.is_some() {
                return Err(DomainError::Conflict {
                    field: "filterId",
                    message: format!("endpoint filter '{id}' already exists"),
                });
            }
            let f = EndpointFilter {
                id: id.clone(),
                app: app.clone(),
                spec: spec.clone(),
                status: FilterStatus::Pending,
                matched: 0,
                created: ctx.now,
                updated: ctx.now,
                version: 1,
            };
            let events = vec![event(&f, FilterEventKind::Pending)];
            Ok(FilterPlan {
                effect: FilterEffect::Insert(f),
                events,
            })
        }
        FilterCommand::Update {
            id,
            app,
            patch,
            precondition,
        } => {
            let mut f = existing(app, id)?;
            precondition.check_tag(f.etag())?;
            let mut changed = false;
            if let Some(name) = &patch.name {
                changed |= *name != f.spec.name;
                f.spec.name = name.clone();
            }
            if let Some(d) = &patch.description {
                changed |= *d != f.spec.description;
                f.spec.description = d.clone();
            }
            let mut restart = false;
            if let Some((query, compiled)) = &patch.query {
                if *query != f.spec.query {
                    restart = true;
                    f.spec.query = query.clone();
                    f.spec.compiled = compiled.clone();
                }
            }
            if !changed && !restart {
                return Ok(FilterPlan {
                    effect: FilterEffect::Unchanged(f),
                    events: vec![],
                });
            }
            f.version += 1;
            f.updated = ctx.now;
            let mut events = vec![];
            if restart {
                // 18/EFE: `pending` on creation and on active → pending; a filter that is
                // still pending just starts its back-fill over.
                if f.status == FilterStatus::Active {
                    events.push(event(&f, FilterEventKind::Pending));
                }
                f.status = FilterStatus::Pending;
                f.matched = 0;
            }
            Ok(FilterPlan {
                effect: FilterEffect::Update { filter: f, restart },
                events,
            })
        }
        FilterCommand::Delete {
            id,
            app,
            precondition,
        } => {
            let f = existing(app, id)?;
            precondition.check_tag(f.etag())?;
            let events = vec![event(&f, FilterEventKind::Deleted)];
            Ok(FilterPlan {
                effect: FilterEffect::Delete(f),
                events,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filter_ids_are_subject_tokens() {
        assert!(FilterId::parse("a1_B-2").is_ok());
        for bad in ["", "a.b", "a*", "a>", "a b", &"x".repeat(65), "é"] {
            let e = FilterId::parse(bad).unwrap_err();
            assert_eq!(e.field, "filterId", "{bad:?}");
        }
    }

    #[test]
    fn spec_accepts_an_object_or_a_json_string() {
        let q = json!({"application_version": "demo-v1"});
        let a = FilterSpec::parse(" n ", "", &q).unwrap();
        let b = FilterSpec::parse("n", "", &json!(q.to_string())).unwrap();
        assert_eq!(a.name, "n", "trimmed");
        assert_eq!(a.query, b.query);
        assert!(a.compiled.matches("demo-v1", &Map::new()));
    }

    #[test]
    fn spec_rejections_name_the_field() {
        let q = json!({});
        let field = |r: Result<FilterSpec, DomainError>| match r.unwrap_err() {
            DomainError::Invalid(v) => (v.field, v.rule),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(FilterSpec::parse(" ", "", &q)),
            ("name".into(), "required")
        );
        assert_eq!(
            field(FilterSpec::parse(&"n".repeat(300), "", &q)),
            ("name".into(), "max-length")
        );
        assert_eq!(
            field(FilterSpec::parse("n", &"d".repeat(5000), &q)),
            ("description".into(), "max-length")
        );
        assert_eq!(
            field(FilterSpec::parse("n", "", &json!("{not json"))),
            ("mongoQuery".into(), "type")
        );
        assert_eq!(
            field(FilterSpec::parse("n", "", &json!([1]))).0,
            "mongoQuery"
        );
        assert_eq!(
            field(FilterSpec::parse("n", "", &json!({"$where": "1"}))).1,
            "unsupported-operator"
        );
        // U+0000 is refused in the description and anywhere in the query (string form too).
        assert_eq!(
            field(FilterSpec::parse("n", "a\0b", &q)),
            ("description".into(), "pattern")
        );
        assert_eq!(
            field(FilterSpec::parse("n", "", &json!({"metadata.a": "x\u{0}"}))),
            ("mongoQuery".into(), "pattern")
        );
        assert_eq!(
            field(FilterSpec::parse(
                "n",
                "",
                &json!(r#"{"metadata.a\u0000": 1}"#)
            )),
            ("mongoQuery".into(), "pattern")
        );
        assert_eq!(
            field(FilterSpec::parse(
                "n",
                "",
                &json!({"$or": [{"metadata.a": {"$in": ["\u{0}"]}}]})
            )),
            ("mongoQuery".into(), "pattern")
        );
        assert!(FilterPatch::parse(None, Some("\0"), None).is_err());
    }
}
