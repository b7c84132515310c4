//! Stored forms of domain values that a backend keeps as documents: outbox events and batch
//! outcomes. Core types are not `Serialize` (a serialisable type is a compatibility
//! promise), so the storage format is spelled out here and versioned with the schema.

use epr_core::event::{DomainEvent, EventKind};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::metadata::{Metadata, MetadataDiff};
use epr_core::ports::{BatchCreated, BatchFailed, BatchOutcome};
use epr_core::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Serialize, Deserialize)]
struct StoredEvent {
    tenant: String,
    endpoint_id: String,
    app: String,
    app_version: String,
    correlation_id: String,
    timestamp: i64,
    #[serde(flatten)]
    kind: StoredKind,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum StoredKind {
    Registered,
    Unregistered,
    AppVersionUpdated {
        previous: String,
    },
    MetadataUpdated {
        added: BTreeMap<String, Value>,
        removed: BTreeMap<String, Value>,
        updated: BTreeMap<String, (Value, Value)>,
    },
}

pub fn encode_event(e: &DomainEvent) -> String {
    let kind = match &e.kind {
        EventKind::Registered => StoredKind::Registered,
        EventKind::Unregistered => StoredKind::Unregistered,
        EventKind::AppVersionUpdated { previous } => StoredKind::AppVersionUpdated {
            previous: previous.to_string(),
        },
        EventKind::MetadataUpdated(d) => StoredKind::MetadataUpdated {
            added: d.added.clone(),
            removed: d.removed.clone(),
            updated: d.updated.clone(),
        },
    };
    let stored = StoredEvent {
        tenant: e.tenant.to_string(),
        endpoint_id: e.endpoint_id.to_string(),
        app: e.app.to_string(),
        app_version: e.app_version.to_string(),
        correlation_id: e.correlation_id.clone(),
        timestamp: e.timestamp.0,
        kind,
    };
    serde_json::to_string(&stored).expect("stored events serialise")
}

fn bad(what: &str, e: impl std::fmt::Display) -> String {
    format!("corrupt stored {what}: {e}")
}

pub fn decode_event(text: &str) -> Result<DomainEvent, String> {
    let s: StoredEvent = serde_json::from_str(text).map_err(|e| bad("event", e))?;
    let kind = match s.kind {
        StoredKind::Registered => EventKind::Registered,
        StoredKind::Unregistered => EventKind::Unregistered,
        StoredKind::AppVersionUpdated { previous } => EventKind::AppVersionUpdated {
            previous: AppVersionName::parse(&previous).map_err(|e| bad("event", e))?,
        },
        StoredKind::MetadataUpdated {
            added,
            removed,
            updated,
        } => EventKind::MetadataUpdated(MetadataDiff {
            added,
            removed,
            updated,
        }),
    };
    Ok(DomainEvent {
        tenant: TenantId::parse(&s.tenant).map_err(|e| bad("event", e))?,
        endpoint_id: EndpointId::parse(&s.endpoint_id).map_err(|e| bad("event", e))?,
        app: AppName::parse(&s.app).map_err(|e| bad("event", e))?,
        app_version: AppVersionName::parse(&s.app_version).map_err(|e| bad("event", e))?,
        kind,
        correlation_id: s.correlation_id,
        timestamp: Timestamp(s.timestamp),
    })
}

#[derive(Serialize, Deserialize)]
struct StoredOutcome {
    task_id: String,
    app: String,
    created_at: i64,
    created: Vec<(usize, String, Map<String, Value>)>,
    failed: Vec<(usize, Option<String>, String, String)>,
}

pub fn encode_outcome(o: &BatchOutcome) -> String {
    let stored = StoredOutcome {
        task_id: o.task_id.clone(),
        app: o.app.to_string(),
        created_at: o.created_at.0,
        created: o
            .created
            .iter()
            .map(|c| {
                (
                    c.index,
                    c.endpoint_id.to_string(),
                    c.metadata.as_map().clone(),
                )
            })
            .collect(),
        failed: o
            .failed
            .iter()
            .map(|f| {
                (
                    f.index,
                    f.endpoint_id.clone(),
                    f.metadata_text.clone(),
                    f.reason.clone(),
                )
            })
            .collect(),
    };
    serde_json::to_string(&stored).expect("stored outcomes serialise")
}

pub fn decode_outcome(text: &str) -> Result<BatchOutcome, String> {
    let s: StoredOutcome = serde_json::from_str(text).map_err(|e| bad("batch outcome", e))?;
    let mut created = Vec::with_capacity(s.created.len());
    for (index, id, md) in s.created {
        created.push(BatchCreated {
            index,
            endpoint_id: EndpointId::parse(&id).map_err(|e| bad("batch outcome", e))?,
            metadata: Metadata::from_stored(md),
        });
    }
    Ok(BatchOutcome {
        task_id: s.task_id,
        app: AppName::parse(&s.app).map_err(|e| bad("batch outcome", e))?,
        created_at: Timestamp(s.created_at),
        created,
        failed: s
            .failed
            .into_iter()
            .map(|(index, endpoint_id, metadata_text, reason)| BatchFailed {
                index,
                endpoint_id,
                metadata_text,
                reason,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_round_trip() {
        let mut d = MetadataDiff::default();
        d.added.insert("a".into(), json!(1));
        d.updated.insert("b".into(), (json!(null), json!("x")));
        for kind in [
            EventKind::Registered,
            EventKind::Unregistered,
            EventKind::AppVersionUpdated {
                previous: AppVersionName::parse("a-v0").unwrap(),
            },
            EventKind::MetadataUpdated(d),
        ] {
            let e = DomainEvent {
                tenant: TenantId::parse("kaa").unwrap(),
                endpoint_id: EndpointId::parse("e1").unwrap(),
                app: AppName::parse("a").unwrap(),
                app_version: AppVersionName::parse("a-v1").unwrap(),
                kind,
                correlation_id: "c".into(),
                timestamp: Timestamp(5),
            };
            assert_eq!(decode_event(&encode_event(&e)).unwrap(), e);
        }
    }
}
