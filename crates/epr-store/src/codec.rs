//! Stored forms of domain values that a backend keeps as documents: outbox events and batch
//! outcomes. Core types are not `Serialize` (a serialisable type is a compatibility
//! promise), so the storage format is spelled out here and versioned with the schema.

use epr_core::credentials::TokenStatus;
use epr_core::endpoint_filter::FilterId;
use epr_core::event::{
    DomainEvent, EventKind, FilterEvent, FilterEventKind, OutboxEvent, TokenEvent, TokenEventKind,
};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId, TokenHash, TokenId};
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

/// A filter event, stored as `{"filter": {...}}` so its first bytes tell it from an endpoint
/// event (whose first key is `tenant`) without a second parse.
#[derive(Serialize, Deserialize)]
struct StoredFilterEnvelope {
    filter: StoredFilterEvent,
}

#[derive(Serialize, Deserialize)]
struct StoredFilterEvent {
    tenant: String,
    app: String,
    filter_id: String,
    filter_name: String,
    correlation_id: String,
    timestamp: i64,
    #[serde(flatten)]
    kind: StoredFilterKind,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum StoredFilterKind {
    Pending,
    Activated,
    Deleted,
    EpMatched {
        endpoint_id: String,
        app_version: String,
    },
    EpUnmatched {
        endpoint_id: String,
        app_version: String,
    },
}

const FILTER_PREFIX: &str = "{\"filter\":";
const TOKEN_PREFIX: &str = "{\"token\":";

/// A token event, stored as `{"token": {...}}` (see [`StoredFilterEnvelope`]).
#[derive(Serialize, Deserialize)]
struct StoredTokenEnvelope {
    token: StoredTokenEvent,
}

#[derive(Serialize, Deserialize)]
struct StoredTokenEvent {
    tenant: String,
    app: String,
    endpoint_id: String,
    correlation_id: String,
    timestamp: i64,
    #[serde(flatten)]
    kind: StoredTokenKind,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum StoredTokenKind {
    Revoked {
        token_ids: Vec<String>,
    },
    StatusChanged {
        token_id: String,
        previous: Option<String>,
        status: String,
    },
}

/// The stored form of any outbox event.
pub fn encode_outbox(e: &OutboxEvent) -> String {
    match e {
        OutboxEvent::Endpoint(e) => encode_event(e),
        OutboxEvent::Filter(f) => encode_filter_event(f),
        OutboxEvent::Token(t) => encode_token_event(t),
    }
}

pub fn decode_outbox(text: &str) -> Result<OutboxEvent, String> {
    if text.starts_with(FILTER_PREFIX) {
        decode_filter_event(text).map(OutboxEvent::Filter)
    } else if text.starts_with(TOKEN_PREFIX) {
        decode_token_event(text).map(OutboxEvent::Token)
    } else {
        decode_event(text).map(OutboxEvent::Endpoint)
    }
}

fn encode_token_event(t: &TokenEvent) -> String {
    let kind = match &t.kind {
        TokenEventKind::Revoked { token_ids } => StoredTokenKind::Revoked {
            token_ids: token_ids.iter().map(|i| i.to_string()).collect(),
        },
        TokenEventKind::StatusChanged {
            token_id,
            previous,
            status,
        } => StoredTokenKind::StatusChanged {
            token_id: token_id.to_string(),
            previous: previous.map(|p| p.as_str().to_owned()),
            status: status.as_str().to_owned(),
        },
    };
    let stored = StoredTokenEnvelope {
        token: StoredTokenEvent {
            tenant: t.tenant.to_string(),
            app: t.app.to_string(),
            endpoint_id: t.endpoint_id.to_string(),
            correlation_id: t.correlation_id.clone(),
            timestamp: t.timestamp.0,
            kind,
        },
    };
    let text = serde_json::to_string(&stored).expect("stored events serialise");
    debug_assert!(text.starts_with(TOKEN_PREFIX));
    text
}

fn decode_token_event(text: &str) -> Result<TokenEvent, String> {
    let s: StoredTokenEnvelope = serde_json::from_str(text).map_err(|e| bad("event", e))?;
    let s = s.token;
    let id = |t: &str| TokenId::parse(t).map_err(|e| bad("event", e));
    let status = |t: &str| TokenStatus::parse(t, "status").map_err(|e| bad("event", e));
    let kind = match &s.kind {
        StoredTokenKind::Revoked { token_ids } => TokenEventKind::Revoked {
            token_ids: token_ids.iter().map(|t| id(t)).collect::<Result<_, _>>()?,
        },
        StoredTokenKind::StatusChanged {
            token_id,
            previous,
            status: now,
        } => TokenEventKind::StatusChanged {
            token_id: id(token_id)?,
            previous: previous.as_deref().map(status).transpose()?,
            status: status(now)?,
        },
    };
    Ok(TokenEvent {
        tenant: TenantId::parse(&s.tenant).map_err(|e| bad("event", e))?,
        app: AppName::parse(&s.app).map_err(|e| bad("event", e))?,
        endpoint_id: EndpointId::parse(&s.endpoint_id).map_err(|e| bad("event", e))?,
        kind,
        correlation_id: s.correlation_id,
        timestamp: Timestamp(s.timestamp),
    })
}

fn encode_filter_event(f: &FilterEvent) -> String {
    let kind = match &f.kind {
        FilterEventKind::Pending => StoredFilterKind::Pending,
        FilterEventKind::Activated => StoredFilterKind::Activated,
        FilterEventKind::Deleted => StoredFilterKind::Deleted,
        FilterEventKind::EndpointMatched {
            endpoint_id,
            app_version,
        } => StoredFilterKind::EpMatched {
            endpoint_id: endpoint_id.to_string(),
            app_version: app_version.to_string(),
        },
        FilterEventKind::EndpointUnmatched {
            endpoint_id,
            app_version,
        } => StoredFilterKind::EpUnmatched {
            endpoint_id: endpoint_id.to_string(),
            app_version: app_version.to_string(),
        },
    };
    let stored = StoredFilterEnvelope {
        filter: StoredFilterEvent {
            tenant: f.tenant.to_string(),
            app: f.app.to_string(),
            filter_id: f.filter_id.to_string(),
            filter_name: f.filter_name.clone(),
            correlation_id: f.correlation_id.clone(),
            timestamp: f.timestamp.0,
            kind,
        },
    };
    let text = serde_json::to_string(&stored).expect("stored events serialise");
    debug_assert!(text.starts_with(FILTER_PREFIX));
    text
}

fn decode_filter_event(text: &str) -> Result<FilterEvent, String> {
    let s: StoredFilterEnvelope = serde_json::from_str(text).map_err(|e| bad("event", e))?;
    let s = s.filter;
    let ep = |id: &str, v: &str| -> Result<(EndpointId, AppVersionName), String> {
        Ok((
            EndpointId::parse(id).map_err(|e| bad("event", e))?,
            AppVersionName::parse(v).map_err(|e| bad("event", e))?,
        ))
    };
    let kind = match &s.kind {
        StoredFilterKind::Pending => FilterEventKind::Pending,
        StoredFilterKind::Activated => FilterEventKind::Activated,
        StoredFilterKind::Deleted => FilterEventKind::Deleted,
        StoredFilterKind::EpMatched {
            endpoint_id,
            app_version,
        } => {
            let (endpoint_id, app_version) = ep(endpoint_id, app_version)?;
            FilterEventKind::EndpointMatched {
                endpoint_id,
                app_version,
            }
        }
        StoredFilterKind::EpUnmatched {
            endpoint_id,
            app_version,
        } => {
            let (endpoint_id, app_version) = ep(endpoint_id, app_version)?;
            FilterEventKind::EndpointUnmatched {
                endpoint_id,
                app_version,
            }
        }
    };
    Ok(FilterEvent {
        tenant: TenantId::parse(&s.tenant).map_err(|e| bad("event", e))?,
        app: AppName::parse(&s.app).map_err(|e| bad("event", e))?,
        filter_id: FilterId::parse(&s.filter_id).map_err(|e| bad("event", e))?,
        filter_name: s.filter_name,
        kind,
        correlation_id: s.correlation_id,
        timestamp: Timestamp(s.timestamp),
    })
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

/// The ID a token gets when it is restored without one (an export made before tokens had
/// IDs and states): the first 16 bytes of its hash, UUID-shaped (lowercase hex). Derived, not
/// drawn, so importing the same file again finds the same token. Every backend uses this.
pub fn initial_token_id(hash: &TokenHash) -> TokenId {
    let h = hash.to_hex();
    let id = format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    TokenId::parse(&id).expect("hex digits and dashes make a token ID")
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

/// Parses a stored metadata document, keeping only `wanted` keys when given (the others are
/// skipped without being built).
pub fn parse_metadata(
    text: &str,
    wanted: Option<&[String]>,
) -> serde_json::Result<Map<String, Value>> {
    match wanted {
        None => serde_json::from_str(text),
        Some([]) => Ok(Map::new()),
        Some(keys) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let map = serde::de::DeserializeSeed::deserialize(Only(keys), &mut de)?;
            de.end()?;
            Ok(map)
        }
    }
}

/// A map visitor that builds only the entries whose key is listed.
struct Only<'k>(&'k [String]);

impl<'de> serde::de::DeserializeSeed<'de> for Only<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Only<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a metadata object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut access: A,
    ) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        // Borrowed when the key has no escapes, so skipped keys cost no allocation.
        while let Some(key) = access.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.0.iter().any(|k| *k == key) {
                out.insert(key.into_owned(), access.next_value()?);
            } else {
                access.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_parse_keeps_only_wanted_keys() {
        let text = json!({"a": 1, "b": {"x": [1, 2]}, "c\"q": "s", "d": null}).to_string();
        let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let full: Map<String, Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(parse_metadata(&text, None).unwrap(), full);
        assert!(parse_metadata(&text, Some(&[])).unwrap().is_empty());
        let some = parse_metadata(&text, Some(&keys(&["b", "c\"q", "zz"]))).unwrap();
        assert_eq!(some.len(), 2);
        assert_eq!(some["b"], json!({"x": [1, 2]}));
        assert_eq!(some["c\"q"], json!("s"), "escaped keys compare unescaped");
        assert!(parse_metadata("{\"a\": 1} x", Some(&keys(&["a"]))).is_err());
    }
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
            let e = OutboxEvent::Endpoint(e);
            assert_eq!(decode_outbox(&encode_outbox(&e)).unwrap(), e);
        }
    }

    #[test]
    fn filter_events_round_trip() {
        let endpoint_id = EndpointId::parse("e1").unwrap();
        let app_version = AppVersionName::parse("a-v1").unwrap();
        for kind in [
            FilterEventKind::Pending,
            FilterEventKind::Activated,
            FilterEventKind::Deleted,
            FilterEventKind::EndpointMatched {
                endpoint_id: endpoint_id.clone(),
                app_version: app_version.clone(),
            },
            FilterEventKind::EndpointUnmatched {
                endpoint_id: endpoint_id.clone(),
                app_version: app_version.clone(),
            },
        ] {
            let e = OutboxEvent::Filter(FilterEvent {
                tenant: TenantId::parse("kaa").unwrap(),
                app: AppName::parse("a").unwrap(),
                filter_id: FilterId::parse("f-1").unwrap(),
                filter_name: "{\"filter\": tricky name".into(),
                kind,
                correlation_id: "c".into(),
                timestamp: Timestamp(5),
            });
            assert_eq!(decode_outbox(&encode_outbox(&e)).unwrap(), e);
        }
    }

    #[test]
    fn token_events_round_trip() {
        let id = |s: &str| TokenId::parse(s).unwrap();
        for kind in [
            TokenEventKind::Revoked {
                token_ids: vec![id("t1"), id("t2")],
            },
            TokenEventKind::StatusChanged {
                token_id: id("t1"),
                previous: None,
                status: TokenStatus::Inactive,
            },
            TokenEventKind::StatusChanged {
                token_id: id("t1"),
                previous: Some(TokenStatus::Active),
                status: TokenStatus::Suspended,
            },
        ] {
            let e = OutboxEvent::Token(TokenEvent {
                tenant: TenantId::parse("kaa").unwrap(),
                app: AppName::parse("a").unwrap(),
                endpoint_id: EndpointId::parse("e1").unwrap(),
                kind,
                correlation_id: "c".into(),
                timestamp: Timestamp(5),
            });
            assert_eq!(decode_outbox(&encode_outbox(&e)).unwrap(), e);
        }
    }
}
