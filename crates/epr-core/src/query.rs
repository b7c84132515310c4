//! Endpoint listing: the query, paging, and the `metadataFilter` mini-language.
//!
//! `metadataFilter` is not specified by Kaa's public documents; ours (documented in
//! docs/api.md) is deliberately small, and repeated parameters are ANDed:
//! - `key=value`: the key holds `value`, either as a JSON string equal to the raw text or as
//!   the JSON value the text parses to (`level=3` matches the number 3, `on=true` a boolean);
//! - `key!=value`: the key is absent or holds something else;
//! - `key`: the key exists (any value, including null); `!key`: the key is absent;
//! - a JSON object `{"k": v, ...}`: every key equals its JSON value exactly.
//!
//! The richer MongoDB-style language belongs to endpoint filters.

use crate::endpoint::Endpoint;
use crate::endpoint_filter::FilterId;
use crate::ids::{AppName, AppVersionName, EndpointId};
use crate::ValidationError;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum MetadataCondition {
    Exists(String),
    Absent(String),
    /// The key holds one of these values.
    Equals(String, Vec<Value>),
    /// The key is absent or holds none of these values.
    NotEquals(String, Vec<Value>),
}

impl MetadataCondition {
    /// Parses one `metadataFilter` parameter into its conditions.
    pub fn parse_param(raw: &str) -> Result<Vec<Self>, ValidationError> {
        let err = |rule, msg: String| ValidationError::new("metadataFilter", rule, msg);
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(err("required", "metadataFilter must not be empty".into()));
        }
        if raw.starts_with('{') {
            let value: Value = serde_json::from_str(raw)
                .map_err(|e| err("json", format!("metadataFilter is not valid JSON: {e}")))?;
            let Value::Object(map) = value else {
                unreachable!("a JSON text starting with '{{' is an object")
            };
            return Ok(map
                .into_iter()
                .map(|(k, v)| Self::Equals(k, vec![v]))
                .collect());
        }
        let key_ok = |k: &str| -> Result<String, ValidationError> {
            if k.is_empty() {
                Err(err("syntax", format!("'{raw}' has an empty key")))
            } else {
                Ok(k.to_owned())
            }
        };
        if let Some((k, v)) = raw.split_once("!=") {
            return Ok(vec![Self::NotEquals(key_ok(k)?, candidates(v))]);
        }
        if let Some((k, v)) = raw.split_once('=') {
            return Ok(vec![Self::Equals(key_ok(k)?, candidates(v))]);
        }
        if let Some(k) = raw.strip_prefix('!') {
            return Ok(vec![Self::Absent(key_ok(k)?)]);
        }
        Ok(vec![Self::Exists(raw.to_owned())])
    }

    pub fn matches(&self, md: &serde_json::Map<String, Value>) -> bool {
        match self {
            Self::Exists(k) => md.contains_key(k),
            Self::Absent(k) => !md.contains_key(k),
            Self::Equals(k, vs) => md.get(k).is_some_and(|v| vs.contains(v)),
            Self::NotEquals(k, vs) => md.get(k).is_none_or(|v| !vs.contains(v)),
        }
    }
}

/// The values a raw `key=value` text stands for: the string itself and, when the text is
/// JSON, the value it denotes.
fn candidates(text: &str) -> Vec<Value> {
    let mut out = vec![Value::String(text.to_owned())];
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// Which endpoints a listing returns. Empty fields do not restrict.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EndpointQuery {
    pub app: Option<AppName>,
    pub app_version: Option<AppVersionName>,
    pub endpoint_ids: Vec<EndpointId>,
    pub metadata: Vec<MetadataCondition>,
    /// Only endpoints in this filter's stored membership. Backends apply it; callers check
    /// first that the filter exists and is active (see `Registry::list`).
    pub filter: Option<FilterId>,
}

impl EndpointQuery {
    /// Reference semantics of everything but `filter` (which needs the stored membership);
    /// backends may push parts of it down but must agree with this.
    pub fn matches(&self, ep: &Endpoint) -> bool {
        self.app.as_ref().is_none_or(|a| &ep.app == a)
            && self
                .app_version
                .as_ref()
                .is_none_or(|v| &ep.app_version == v)
            && (self.endpoint_ids.is_empty() || self.endpoint_ids.contains(&ep.id))
            && self
                .metadata
                .iter()
                .all(|c| c.matches(ep.metadata.as_map()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Matches skipped (after `after`, when given).
    pub offset: u64,
    pub limit: u32,
    /// Keyset paging: start after the match with this incarnation (the listing order), so
    /// a deep page costs what the first one does. Backends other than endpoint listings
    /// ignore it.
    pub after: Option<i64>,
}

impl PageRequest {
    /// `limit` matches from `offset`, without a cursor.
    pub fn new(offset: u64, limit: u32) -> Self {
        Self {
            offset,
            limit,
            after: None,
        }
    }
}

/// One page of a listing, with the total number of matches. Listings are ordered by
/// registration (oldest first), a stable order across pages.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// Every match of the query, whatever the page (not only those after a cursor).
    pub total: u64,
    pub items: Vec<T>,
    /// When matches follow this page: the `after` of the next page (the last item's
    /// incarnation). Endpoint listings only.
    pub next: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn md(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn filter_forms() {
        let m = md(json!({"city": "Kyiv", "level": 3, "on": true, "n": null, "s": "3"}));
        let ok = |f: &str| {
            MetadataCondition::parse_param(f)
                .unwrap()
                .iter()
                .all(|c| c.matches(&m))
        };
        assert!(ok("city=Kyiv"));
        assert!(ok("city=\"Kyiv\""));
        assert!(!ok("city=Lviv"));
        assert!(ok("level=3"));
        assert!(ok("s=3"), "string '3' matches raw text 3");
        assert!(ok("on=true"));
        assert!(ok("n"));
        assert!(ok("!missing"));
        assert!(!ok("!city"));
        assert!(ok("city!=Lviv"));
        assert!(ok("missing!=x"));
        assert!(!ok("level!=3"));
        assert!(ok(r#"{"city":"Kyiv","level":3}"#));
        assert!(!ok(r#"{"level":"3"}"#), "JSON form is exact");
        assert!(MetadataCondition::parse_param("=x").is_err());
        assert!(MetadataCondition::parse_param("{bad").is_err());
    }
}
