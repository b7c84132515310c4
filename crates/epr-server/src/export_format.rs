//! The export file: NDJSON, one JSON object per line with a `type`. A `header` line first
//! (format name and version), then `filter` and `endpoint` lines, then an `end` line with the
//! counts, so a truncated file is recognised. Times are milliseconds since the UNIX epoch.
//! The format names no backend: it is how data moves between stores (docs/operations.md).

use epr_core::credentials::{StoredToken, TokenStatus};
use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::{EndpointFilter, FilterId, FilterSpec, FilterStatus};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId, TokenHash, TokenId};
use epr_core::metadata::{Limits, Metadata};
use epr_core::ports::{EndpointExport, ImportRecord};
use epr_core::{DomainError, Timestamp, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;

/// The `format` of the header line.
pub const FORMAT: &str = "epr-export";
/// The version of the format this build writes. 2 added the endpoints' `tokens`.
pub const VERSION: u32 = 2;
/// The oldest version this build reads (a version-1 file has no `tokens`: each endpoint
/// gets one `Inactive` token from its `tokenHash`).
pub const OLDEST_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Line {
    Header(Header),
    Filter(FilterLine),
    Endpoint(EndpointLine),
    End(End),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub exported_at: i64,
    /// The identity of the exporting store (informational).
    pub store_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterLine {
    pub tenant: String,
    pub id: String,
    pub application_name: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub mongo_query: Value,
    /// At export time (informational: an import derives membership again).
    pub status: String,
    pub created: i64,
    pub updated: i64,
    pub version: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointLine {
    pub tenant: String,
    pub endpoint_id: String,
    pub application_name: String,
    pub app_version: String,
    pub app_version_registered: i64,
    pub created: i64,
    pub metadata: Value,
    pub metadata_updated: Option<i64>,
    pub version: u64,
    pub metadata_version: u64,
    /// SHA-256 of the endpoint token scoped to its application, 64 hex digits.
    pub token_hash: String,
    /// Every token row of the endpoint (absent in version-1 files).
    #[serde(default)]
    pub tokens: Vec<TokenLine>,
}

/// One token of an endpoint, as stored: its hash, never the token.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenLine {
    pub token_id: String,
    /// SHA-256 of the token scoped to its application, 64 hex digits.
    pub token_hash: String,
    /// `Inactive`, `Active`, `Suspended` or `Revoked`.
    pub status: String,
    pub created: i64,
    /// The last status change, if any.
    pub updated: Option<i64>,
}

impl From<&StoredToken> for TokenLine {
    fn from(t: &StoredToken) -> Self {
        Self {
            token_id: t.id.to_string(),
            token_hash: t.hash.to_hex(),
            status: t.status.as_str().to_owned(),
            created: t.created.0,
            updated: t.updated.map(|u| u.0),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct End {
    pub filters: u64,
    pub endpoints: u64,
}

impl From<&EndpointExport> for EndpointLine {
    fn from(e: &EndpointExport) -> Self {
        let ep = &e.endpoint;
        Self {
            tenant: e.tenant.to_string(),
            endpoint_id: ep.id.to_string(),
            application_name: ep.app.to_string(),
            app_version: ep.app_version.to_string(),
            app_version_registered: ep.app_version_registered.0,
            created: ep.created.0,
            metadata: ep.metadata.to_value(),
            metadata_updated: ep.metadata_updated.map(|t| t.0),
            version: ep.version,
            metadata_version: ep.metadata_version,
            token_hash: e.token_hash.to_hex(),
            tokens: e.tokens.iter().map(TokenLine::from).collect(),
        }
    }
}

impl FilterLine {
    pub fn new(tenant: &TenantId, f: &EndpointFilter) -> Self {
        Self {
            tenant: tenant.to_string(),
            id: f.id.to_string(),
            application_name: f.app.to_string(),
            name: f.spec.name.clone(),
            description: f.spec.description.clone(),
            mongo_query: Value::Object(f.spec.query.clone()),
            status: f.status.as_str().to_owned(),
            created: f.created.0,
            updated: f.updated.0,
            version: f.version,
        }
    }
}

/// Why a line cannot be imported: the field and the rule, as the API names them.
#[derive(Debug, PartialEq)]
pub struct Invalid {
    /// Empty when the line is not a JSON object of a known type.
    pub field: String,
    pub rule: String,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{} (rule '{}')", self.message, self.rule)
        } else {
            write!(
                f,
                "field '{}': {} (rule '{}')",
                self.field, self.message, self.rule
            )
        }
    }
}

fn invalid(field: &str, rule: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        rule: rule.into(),
        message: message.into(),
    }
}

/// A newtype's refusal, under the export's name of the field.
fn checked<T>(field: &str, r: Result<T, ValidationError>) -> Result<T, Invalid> {
    r.map_err(|e| invalid(field, e.rule, e.message))
}

fn domain(field: &str, e: DomainError) -> Invalid {
    match e {
        DomainError::Invalid(v) => invalid(&v.field, v.rule, v.message),
        DomainError::TooLarge { .. } => invalid(field, "max-size", e.to_string()),
        other => invalid(field, "invalid", other.to_string()),
    }
}

fn time(field: &str, ms: i64) -> Result<Timestamp, Invalid> {
    if ms < 0 {
        return Err(invalid(
            field,
            "minimum",
            "must be milliseconds since 1970 (not negative)",
        ));
    }
    Ok(Timestamp(ms))
}

fn token_hash(field: &str, hex: &str) -> Result<TokenHash, Invalid> {
    TokenHash::from_hex(hex).ok_or_else(|| {
        invalid(
            field,
            "pattern",
            "must be 64 lowercase hexadecimal digits (a SHA-256)",
        )
    })
}

fn positive(field: &str, n: u64) -> Result<u64, Invalid> {
    if n == 0 || n > i64::MAX as u64 {
        return Err(invalid(field, "minimum", "must be a positive integer"));
    }
    Ok(n)
}

impl EndpointLine {
    /// The domain record, with every rule a registration checks (metadata within `limits`).
    pub fn validate(self, limits: &Limits) -> Result<ImportRecord, Invalid> {
        let tenant = checked("tenant", TenantId::parse(&self.tenant))?;
        let app = checked("applicationName", AppName::parse(&self.application_name))?;
        let metadata = Metadata::parse(self.metadata, "metadata", limits)
            .map_err(|e| domain("metadata", e))?;
        let hash = token_hash("tokenHash", &self.token_hash)?;
        let id = checked("endpointId", EndpointId::parse(&self.endpoint_id))?;
        let mut tokens = Vec::with_capacity(self.tokens.len());
        let (mut ids, mut hashes) = (BTreeSet::new(), BTreeSet::new());
        for (i, t) in self.tokens.into_iter().enumerate() {
            let field = |name: &str| format!("tokens[{i}].{name}");
            let token = StoredToken {
                id: checked(&field("tokenId"), TokenId::parse(&t.token_id))?,
                endpoint_id: id.clone(),
                app: app.clone(),
                hash: token_hash(&field("tokenHash"), &t.token_hash)?,
                status: checked(&field("status"), TokenStatus::parse(&t.status, "status"))?,
                created: time(&field("created"), t.created)?,
                updated: t.updated.map(|u| time(&field("updated"), u)).transpose()?,
            };
            if !ids.insert(token.id.clone()) {
                return Err(invalid(
                    &field("tokenId"),
                    "unique",
                    "the endpoint lists this token ID twice",
                ));
            }
            if !hashes.insert(token.hash.0) {
                return Err(invalid(
                    &field("tokenHash"),
                    "unique",
                    "the endpoint lists this token hash twice",
                ));
            }
            tokens.push(token);
        }
        let endpoint = Endpoint {
            id,
            app,
            app_version: checked("appVersion", AppVersionName::parse(&self.app_version))?,
            app_version_registered: time("appVersionRegistered", self.app_version_registered)?,
            created: time("created", self.created)?,
            metadata,
            metadata_updated: self
                .metadata_updated
                .map(|t| time("metadataUpdated", t))
                .transpose()?,
            incarnation: 0,
            version: positive("version", self.version)?,
            metadata_version: positive("metadataVersion", self.metadata_version)?,
        };
        Ok(ImportRecord::Endpoint(EndpointExport {
            tenant,
            endpoint,
            token_hash: hash,
            tokens,
        }))
    }
}

impl FilterLine {
    /// The domain filter, with every rule a creation checks (name, query language).
    pub fn validate(self) -> Result<ImportRecord, Invalid> {
        let tenant = checked("tenant", TenantId::parse(&self.tenant))?;
        if !self.mongo_query.is_object() {
            return Err(invalid("mongoQuery", "type", "must be a JSON object"));
        }
        let spec = FilterSpec::parse(&self.name, &self.description, &self.mongo_query)
            .map_err(|e| domain("mongoQuery", e))?;
        let status = match self.status.as_str() {
            "pending" => FilterStatus::Pending,
            "active" => FilterStatus::Active,
            _ => return Err(invalid("status", "enum", "must be 'pending' or 'active'")),
        };
        Ok(ImportRecord::Filter {
            tenant,
            filter: EndpointFilter {
                id: checked("id", FilterId::parse(&self.id))?,
                app: checked("applicationName", AppName::parse(&self.application_name))?,
                spec,
                status,
                matched: 0,
                created: time("created", self.created)?,
                updated: time("updated", self.updated)?,
                version: positive("version", self.version)?,
            },
        })
    }
}

/// Parses one line (its JSON shape only).
pub fn parse(line: &str) -> Result<Line, Invalid> {
    // serde's message names the unknown `type` or field, or where the JSON is broken.
    serde_json::from_str(line).map_err(|e| invalid("", "json", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoint_line() -> Value {
        json!({"type": "endpoint", "tenant": "default", "endpointId": "ep-1",
               "applicationName": "app", "appVersion": "app-v1", "appVersionRegistered": 1,
               "created": 1, "metadata": {"k": 1}, "metadataUpdated": null, "version": 1,
               "metadataVersion": 1, "tokenHash": "ab".repeat(32)})
    }

    fn validate(v: Value) -> Result<ImportRecord, Invalid> {
        match parse(&v.to_string())? {
            Line::Endpoint(e) => e.validate(&Limits::default()),
            Line::Filter(f) => f.validate(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_valid_endpoint_line_is_accepted() {
        let Ok(ImportRecord::Endpoint(e)) = validate(endpoint_line()) else {
            panic!()
        };
        assert_eq!(e.endpoint.id.as_str(), "ep-1");
        assert_eq!(e.token_hash.0, [0xab; 32]);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("endpointId", json!("a b")),
            ("tenant", json!("x.y")),
            ("tokenHash", json!("AB")),
            ("version", json!(0)),
            ("created", json!(-5)),
            ("appVersion", json!("Bad Version")),
        ];
        for (field, value) in cases {
            let mut line = endpoint_line();
            line[field] = value;
            let e = validate(line).map(|_| ()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        let mut line = endpoint_line();
        line["metadata"] = json!([1]);
        assert_eq!(validate(line).map(|_| ()).unwrap_err().field, "metadata");
    }

    fn token_line() -> Value {
        json!({"tokenId": "t-1", "tokenHash": "cd".repeat(32), "status": "Suspended",
               "created": 1, "updated": 2})
    }

    #[test]
    fn tokens_are_optional_and_checked() {
        // Without `tokens` (a version-1 line): none listed; the store derives one.
        let Ok(ImportRecord::Endpoint(e)) = validate(endpoint_line()) else {
            panic!()
        };
        assert!(e.tokens.is_empty());
        let mut line = endpoint_line();
        line["tokens"] = json!([token_line()]);
        let Ok(ImportRecord::Endpoint(e)) = validate(line) else {
            panic!()
        };
        let [t] = e.tokens.as_slice() else { panic!() };
        assert_eq!(
            (t.id.as_str(), t.endpoint_id.as_str(), t.app.as_str()),
            ("t-1", "ep-1", "app")
        );
        assert_eq!(
            (t.hash.0, t.status, t.created, t.updated),
            (
                [0xcd; 32],
                TokenStatus::Suspended,
                Timestamp(1),
                Some(Timestamp(2))
            )
        );
        let cases = [
            ("tokenId", json!("a b"), "tokens[1].tokenId"),
            ("tokenHash", json!("xyz"), "tokens[1].tokenHash"),
            ("status", json!("Lost"), "tokens[1].status"),
            ("created", json!(-1), "tokens[1].created"),
            ("updated", json!(-1), "tokens[1].updated"),
        ];
        for (name, value, field) in cases {
            let mut second = token_line();
            second["tokenId"] = json!("t-2");
            second["tokenHash"] = json!("ef".repeat(32));
            second[name] = value;
            let mut line = endpoint_line();
            line["tokens"] = json!([token_line(), second]);
            let e = validate(line).map(|_| ()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
        // A token ID or hash twice.
        for name in ["tokenId", "tokenHash"] {
            let mut second = token_line();
            second["tokenId"] = json!("t-2");
            second["tokenHash"] = json!("ef".repeat(32));
            second[name] = token_line()[name].clone();
            let mut line = endpoint_line();
            line["tokens"] = json!([token_line(), second]);
            let e = validate(line).map(|_| ()).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.rule.as_str()),
                (format!("tokens[1].{name}").as_str(), "unique")
            );
        }
        let mut line = endpoint_line();
        let mut extra = token_line();
        extra["token"] = json!("plain text");
        line["tokens"] = json!([extra]);
        assert!(validate(line).is_err(), "unknown token fields are refused");
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        let mut line = endpoint_line();
        line["extra"] = json!(1);
        assert!(validate(line)
            .map(|_| ())
            .unwrap_err()
            .message
            .contains("extra"));
        let e = parse(r#"{"type":"gadget"}"#).unwrap_err();
        assert!(e.message.contains("gadget"), "{e}");
    }

    #[test]
    fn a_filter_query_is_checked() {
        let line = json!({"type": "filter", "tenant": "default", "id": "f1",
            "applicationName": "app", "name": "n", "mongoQuery": {"$where": "1"},
            "status": "active", "created": 1, "updated": 1, "version": 1});
        let e = validate(line).map(|_| ()).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.rule.as_str()),
            ("mongoQuery.$where", "unsupported-operator")
        );
    }
}
