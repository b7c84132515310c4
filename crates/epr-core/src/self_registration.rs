//! Device self-registration rules: the per-application policy document an operator sets
//! (`PUT /applications/{app}/self-registration`) and the checks a device's registration
//! request meets.
//!
//! The document, in its REST form:
//!
//! ```json
//! { "mode": "open" | "claim-token" | "closed",
//!   "provisioningSecret": "…",            // write-only, ≥ 16 characters
//!   "reregistration": "refuse" | "reissue",
//!   "endpointIdPattern": "regex" | null,
//!   "maxMetadataBytes": 1..=limit | null,
//!   "requiredMetadataKeys": ["k"],
//!   "allowedMetadataValues": { "k": {"values": [json]} | {"pattern": "regex"}
//!                                   | {"min": n, "max": n} },
//!   "versions": { "<appVersion>": { "mode"?, "endpointIdPattern"?, "maxMetadataBytes"?,
//!                 "requiredMetadataKeys"?, "allowedMetadataValues"? } } }
//! ```
//!
//! A version entry overrides the fields it sets (`null` sets "none" for the nullable ones);
//! versions not listed use the application's rules. The provisioning secret is kept only as
//! [`secret_hash`]. The stored form (a setting, see [`setting_key`]) is the same document
//! with `provisioningSecretHash` instead of the secret. Core types are not `Serialize`: both
//! forms are built by hand here, from one field list.

use crate::credentials::{secret_hash, IdPattern, Refusal, RefusalReason, Reregistration};
use crate::ids::{AppName, AppVersionName, EndpointId, TenantId, TokenHash};
use crate::metadata::{Limits, Metadata, MetadataKey};
use crate::ValidationError;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Provisioning secrets: long enough not to be guessed within the rate limits, short
/// enough to bound hashing work.
pub const SECRET_MIN_CHARS: usize = 16;
pub const SECRET_MAX_CHARS: usize = 512;
/// Bounds of the document's lists (it is read on every self-registration).
pub const MAX_KEYS: usize = 256;
pub const MAX_VALUES: usize = 1000;
pub const MAX_VERSIONS: usize = 1000;

/// The setting (see [`crate::ports::Store::put_setting`]) holding an application's policy.
pub fn setting_key(tenant: &TenantId, app: &AppName) -> String {
    format!("{}{app}", tenant_setting_prefix(tenant))
}

/// The start of every policy setting key of a tenant (the `/` keeps tenant `a` from matching
/// tenant `ab`).
pub fn tenant_setting_prefix(tenant: &TenantId) -> String {
    format!("self-registration/{tenant}/")
}

/// The strong entity tag of a stored policy document.
pub fn etag_of(stored: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(stored.as_bytes());
    format!("\"sr-{}\"", hex::encode(&digest[..12]))
}

/// Which credentials a self-registration may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The application's provisioning secret (when one is set) or a claim token.
    Open,
    /// Claim tokens only.
    ClaimToken,
    /// Every self-registration is refused.
    Closed,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::ClaimToken => "claim-token",
            Self::Closed => "closed",
        }
    }

    fn parse(v: &Value, field: &str) -> Result<Self, ValidationError> {
        match v.as_str() {
            Some("open") => Ok(Self::Open),
            Some("claim-token") => Ok(Self::ClaimToken),
            Some("closed") => Ok(Self::Closed),
            _ => Err(ValidationError::new(
                field,
                "enum",
                format!("{field} must be one of open, claim-token, closed"),
            )),
        }
    }
}

fn rereg_str(r: Reregistration) -> &'static str {
    match r {
        Reregistration::Refuse => "refuse",
        Reregistration::Reissue => "reissue",
    }
}

/// An anchored regular expression (the whole value must match), compiled once: the
/// endpoint-ID pattern type serves metadata value patterns too.
pub type Pattern = IdPattern;

/// What a metadata value under a key may be.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueRule {
    /// One of these JSON values (numbers compare by value: `1` is `1.0`).
    OneOf(Vec<Value>),
    /// A string matching the pattern.
    Pattern(Pattern),
    /// A number within the bounds (inclusive; at least one is set).
    Range { min: Option<f64>, max: Option<f64> },
}

fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

impl ValueRule {
    pub fn allows(&self, v: &Value) -> bool {
        match self {
            Self::OneOf(values) => values.iter().any(|a| json_equal(a, v)),
            Self::Pattern(p) => v.as_str().is_some_and(|s| p.matches(s)),
            Self::Range { min, max } => v
                .as_f64()
                .is_some_and(|n| min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::OneOf(values) => {
                let shown: Vec<String> = values.iter().take(10).map(Value::to_string).collect();
                let more = if values.len() > 10 { ", …" } else { "" };
                format!("one of {}{more}", shown.join(", "))
            }
            Self::Pattern(p) => format!("a string matching the pattern {}", p.as_str()),
            Self::Range { min, max } => match (min, max) {
                (Some(a), Some(b)) => format!("a number from {a} to {b}"),
                (Some(a), None) => format!("a number of at least {a}"),
                (None, Some(b)) => format!("a number of at most {b}"),
                (None, None) => "a number".to_owned(),
            },
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::OneOf(values) => json!({ "values": values }),
            Self::Pattern(p) => json!({ "pattern": p.as_str() }),
            Self::Range { min, max } => {
                let mut m = Map::new();
                if let Some(a) = min {
                    m.insert("min".into(), json!(a));
                }
                if let Some(b) = max {
                    m.insert("max".into(), json!(b));
                }
                Value::Object(m)
            }
        }
    }
}

/// The rules a self-registration of one application version meets.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub mode: Mode,
    pub endpoint_id_pattern: Option<Pattern>,
    pub max_metadata_bytes: Option<usize>,
    pub required_metadata_keys: Vec<String>,
    pub allowed_metadata_values: BTreeMap<String, ValueRule>,
}

impl Rules {
    /// The endpoint ID the device will get must match the pattern, if there is one.
    pub fn check_endpoint_id(&self, id: &EndpointId) -> Result<(), Refusal> {
        match &self.endpoint_id_pattern {
            Some(p) if !p.matches(id.as_str()) => Err(Refusal::new(
                RefusalReason::EndpointIdNotAllowed,
                format!(
                    "endpoint ID '{id}' is not allowed: endpoint IDs of this application must \
                     match {}",
                    p.as_str()
                ),
            )
            .with_field("endpointId")),
            _ => Ok(()),
        }
    }

    /// Required keys present, values allowed, size within the bound, in that order.
    pub fn check_metadata(&self, md: &Metadata) -> Result<(), Refusal> {
        for key in &self.required_metadata_keys {
            if md.get(key).is_none() {
                return Err(Refusal::new(
                    RefusalReason::MetadataKeyMissing,
                    format!("metadata key '{key}' is required"),
                )
                .with_field(format!("metadata.{key}")));
            }
        }
        for (key, rule) in &self.allowed_metadata_values {
            if let Some(v) = md.get(key) {
                if !rule.allows(v) {
                    return Err(Refusal::new(
                        RefusalReason::MetadataValueNotAllowed,
                        format!(
                            "metadata key '{key}' must be {}; got {}",
                            rule.describe(),
                            short(v)
                        ),
                    )
                    .with_field(format!("metadata.{key}")));
                }
            }
        }
        if let Some(max) = self.max_metadata_bytes {
            let size = md.serialized_len();
            if size > max {
                return Err(Refusal::new(
                    RefusalReason::MetadataTooLarge,
                    format!(
                        "metadata is {size} bytes; self-registrations of this application may \
                         carry at most {max}"
                    ),
                )
                .with_field("metadata"));
            }
        }
        Ok(())
    }
}

/// A value shown in a message, cut short.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 64 {
        format!("{}…", s.chars().take(64).collect::<String>())
    } else {
        s
    }
}

/// A version entry: the fields it sets override the application's. For the nullable
/// fields, `Some(None)` is an explicit `null` (no pattern, no size bound).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VersionRules {
    pub mode: Option<Mode>,
    pub endpoint_id_pattern: Option<Option<Pattern>>,
    pub max_metadata_bytes: Option<Option<usize>>,
    pub required_metadata_keys: Option<Vec<String>>,
    pub allowed_metadata_values: Option<BTreeMap<String, ValueRule>>,
}

/// An application's self-registration policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub rules: Rules,
    pub provisioning_secret: Option<TokenHash>,
    pub reregistration: Reregistration,
    pub versions: BTreeMap<AppVersionName, VersionRules>,
}

/// Where a document comes from: its checks differ slightly.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// An operator's `PUT`: the secret in clear, every bound checked.
    Rest,
    /// Read back from the store: the secret's hash; bounds that configuration can change
    /// (the metadata size limit) are not checked again, so a lowered limit does not make
    /// a stored policy unreadable.
    Stored,
}

const TOP_FIELDS: &[&str] = &[
    "mode",
    "provisioningSecret",
    "provisioningSecretSet",
    "reregistration",
    "endpointIdPattern",
    "maxMetadataBytes",
    "requiredMetadataKeys",
    "allowedMetadataValues",
    "versions",
];
const STORED_FIELDS: &[&str] = &[
    "formatVersion",
    "mode",
    "provisioningSecretHash",
    "reregistration",
    "endpointIdPattern",
    "maxMetadataBytes",
    "requiredMetadataKeys",
    "allowedMetadataValues",
    "versions",
];
const VERSION_FIELDS: &[&str] = &[
    "mode",
    "endpointIdPattern",
    "maxMetadataBytes",
    "requiredMetadataKeys",
    "allowedMetadataValues",
];

fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ValidationError> {
    v.as_object()
        .ok_or_else(|| ValidationError::new(field, "type", format!("{field} must be an object")))
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn only_fields(
    m: &Map<String, Value>,
    prefix: &str,
    allowed: &[&str],
) -> Result<(), ValidationError> {
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(ValidationError::new(
                join(prefix, k),
                "unknown-field",
                format!("unknown field '{k}'; the fields are {}", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

struct Ctx<'a> {
    form: Form,
    limits: &'a Limits,
}

impl Ctx<'_> {
    fn pattern(&self, v: &Value, field: &str) -> Result<Option<Pattern>, ValidationError> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Pattern::parse(s, field).map(Some),
            _ => Err(ValidationError::new(
                field,
                "type",
                format!("{field} must be a regular expression (a string) or null"),
            )),
        }
    }

    fn max_bytes(&self, v: &Value, field: &str) -> Result<Option<usize>, ValidationError> {
        if v.is_null() {
            return Ok(None);
        }
        let limit = match self.form {
            Form::Rest => self.limits.metadata_max_bytes,
            Form::Stored => usize::MAX,
        };
        match v.as_u64() {
            Some(n) if n >= 1 && n as u128 <= limit as u128 => Ok(Some(n as usize)),
            _ => Err(ValidationError::new(
                field,
                "range",
                format!(
                    "{field} must be an integer from 1 to {} (the metadata size limit) or null",
                    self.limits.metadata_max_bytes
                ),
            )),
        }
    }

    fn keys(&self, v: &Value, field: &str) -> Result<Vec<String>, ValidationError> {
        let list = v.as_array().ok_or_else(|| {
            ValidationError::new(field, "type", format!("{field} must be an array of keys"))
        })?;
        if list.len() > MAX_KEYS {
            return Err(ValidationError::new(
                field,
                "max-items",
                format!("{field} may list at most {MAX_KEYS} keys"),
            ));
        }
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        for (i, k) in list.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let s = k.as_str().ok_or_else(|| {
                ValidationError::new(&at, "type", format!("{at} must be a string"))
            })?;
            MetadataKey::parse(s, self.limits).map_err(|e| e.at(&at))?;
            if out.iter().any(|o| o == s) {
                return Err(ValidationError::new(
                    &at,
                    "unique",
                    format!("{field} lists '{s}' twice"),
                ));
            }
            out.push(s.to_owned());
        }
        Ok(out)
    }

    fn value_rules(
        &self,
        v: &Value,
        field: &str,
    ) -> Result<BTreeMap<String, ValueRule>, ValidationError> {
        let m = object(v, field)?;
        if m.len() > MAX_KEYS {
            return Err(ValidationError::new(
                field,
                "max-items",
                format!("{field} may name at most {MAX_KEYS} keys"),
            ));
        }
        let mut out = BTreeMap::new();
        for (key, rule) in m {
            let at = format!("{field}.{key}");
            MetadataKey::parse(key, self.limits).map_err(|e| e.at(&at))?;
            out.insert(key.clone(), self.value_rule(rule, &at)?);
        }
        Ok(out)
    }

    fn value_rule(&self, v: &Value, field: &str) -> Result<ValueRule, ValidationError> {
        let m = object(v, field)?;
        only_fields(m, field, &["values", "pattern", "min", "max"])?;
        let kinds = [
            m.contains_key("values"),
            m.contains_key("pattern"),
            m.contains_key("min") || m.contains_key("max"),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(ValidationError::new(
                field,
                "one-of",
                format!(
                    "{field} must be exactly one of {{\"values\": [...]}}, {{\"pattern\": \
                     \"regex\"}} or {{\"min\": n, \"max\": n}}"
                ),
            ));
        }
        if let Some(values) = m.get("values") {
            let at = format!("{field}.values");
            let list = values.as_array().filter(|l| !l.is_empty()).ok_or_else(|| {
                ValidationError::new(
                    &at,
                    "type",
                    format!("{at} must be a non-empty array of JSON values"),
                )
            })?;
            if list.len() > MAX_VALUES {
                return Err(ValidationError::new(
                    &at,
                    "max-items",
                    format!("{at} may list at most {MAX_VALUES} values"),
                ));
            }
            return Ok(ValueRule::OneOf(list.clone()));
        }
        if let Some(p) = m.get("pattern") {
            let at = format!("{field}.pattern");
            let s = p.as_str().ok_or_else(|| {
                ValidationError::new(
                    &at,
                    "type",
                    format!("{at} must be a regular expression (a string)"),
                )
            })?;
            return Ok(ValueRule::Pattern(Pattern::parse(s, &at)?));
        }
        let bound = |name: &str| -> Result<Option<f64>, ValidationError> {
            match m.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|n| n.is_finite())
                    .map(Some)
                    .ok_or_else(|| {
                        let at = format!("{field}.{name}");
                        ValidationError::new(&at, "type", format!("{at} must be a number"))
                    }),
            }
        };
        let (min, max) = (bound("min")?, bound("max")?);
        if min.is_none() && max.is_none() {
            return Err(ValidationError::new(
                field,
                "required",
                format!("{field} needs min, max or both"),
            ));
        }
        if let (Some(a), Some(b)) = (min, max) {
            if a > b {
                return Err(ValidationError::new(
                    format!("{field}.min"),
                    "range",
                    format!("{field}.min ({a}) is greater than {field}.max ({b})"),
                ));
            }
        }
        Ok(ValueRule::Range { min, max })
    }
}

impl Policy {
    /// A policy from its REST form. `current` is the policy it replaces, whose secret is
    /// kept when `provisioningSecret` is absent (`null` removes it). Field names in errors
    /// are JSON paths of the document (`versions.app-v1.endpointIdPattern`).
    pub fn from_rest(
        doc: &Value,
        current: Option<&Policy>,
        app: &AppName,
        limits: &Limits,
    ) -> Result<Policy, ValidationError> {
        let m = object(doc, "body")?;
        only_fields(m, "", TOP_FIELDS)?;
        let secret = match m.get("provisioningSecret") {
            None => current.and_then(|c| c.provisioning_secret),
            Some(Value::Null) => None,
            Some(Value::String(s)) => {
                let n = s.chars().count();
                if !(SECRET_MIN_CHARS..=SECRET_MAX_CHARS).contains(&n) {
                    return Err(ValidationError::new(
                        "provisioningSecret",
                        "length",
                        format!(
                            "provisioningSecret must be {SECRET_MIN_CHARS} to \
                             {SECRET_MAX_CHARS} characters long"
                        ),
                    ));
                }
                if s.chars().any(char::is_control) {
                    return Err(ValidationError::new(
                        "provisioningSecret",
                        "pattern",
                        "provisioningSecret must not contain control characters",
                    ));
                }
                Some(secret_hash(app, s))
            }
            Some(_) => {
                return Err(ValidationError::new(
                    "provisioningSecret",
                    "type",
                    "provisioningSecret must be a string, or null to remove it",
                ))
            }
        };
        Self::parse_body(
            m,
            secret,
            &Ctx {
                form: Form::Rest,
                limits,
            },
        )
    }

    /// A policy from its stored form ([`Policy::to_stored`]).
    pub fn from_stored(text: &str, limits: &Limits) -> Result<Policy, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let read = || -> Result<Policy, ValidationError> {
            let m = object(&doc, "policy")?;
            only_fields(m, "", STORED_FIELDS)?;
            let secret = match m.get("provisioningSecretHash") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_str().and_then(TokenHash::from_hex).ok_or_else(|| {
                    ValidationError::new("provisioningSecretHash", "hex", "not a hash")
                })?),
            };
            // The stored form has no secret in clear: no key size limit changes apply to it.
            let lenient = Limits {
                metadata_key_max_len: usize::MAX,
                ..*limits
            };
            Self::parse_body(
                m,
                secret,
                &Ctx {
                    form: Form::Stored,
                    limits: &lenient,
                },
            )
        };
        read().map_err(|e| e.to_string())
    }

    fn parse_body(
        m: &Map<String, Value>,
        provisioning_secret: Option<TokenHash>,
        cx: &Ctx<'_>,
    ) -> Result<Policy, ValidationError> {
        let mode = match m.get("mode") {
            None => {
                return Err(ValidationError::new(
                    "mode",
                    "required",
                    "mode is required: open, claim-token or closed",
                ))
            }
            Some(v) => Mode::parse(v, "mode")?,
        };
        let reregistration = match m.get("reregistration") {
            None | Some(Value::Null) => Reregistration::Refuse,
            Some(v) => match v.as_str() {
                Some("refuse") => Reregistration::Refuse,
                Some("reissue") => Reregistration::Reissue,
                _ => {
                    return Err(ValidationError::new(
                        "reregistration",
                        "enum",
                        "reregistration must be refuse or reissue",
                    ))
                }
            },
        };
        let rules = Rules {
            mode,
            endpoint_id_pattern: match m.get("endpointIdPattern") {
                None => None,
                Some(v) => cx.pattern(v, "endpointIdPattern")?,
            },
            max_metadata_bytes: match m.get("maxMetadataBytes") {
                None => None,
                Some(v) => cx.max_bytes(v, "maxMetadataBytes")?,
            },
            required_metadata_keys: match m.get("requiredMetadataKeys") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => cx.keys(v, "requiredMetadataKeys")?,
            },
            allowed_metadata_values: match m.get("allowedMetadataValues") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(v) => cx.value_rules(v, "allowedMetadataValues")?,
            },
        };
        let mut versions = BTreeMap::new();
        if let Some(v) = m.get("versions").filter(|v| !v.is_null()) {
            let vm = object(v, "versions")?;
            if vm.len() > MAX_VERSIONS {
                return Err(ValidationError::new(
                    "versions",
                    "max-items",
                    format!("versions may name at most {MAX_VERSIONS} application versions"),
                ));
            }
            for (name, entry) in vm {
                let at = format!("versions.{name}");
                let version = AppVersionName::parse(name).map_err(|e| e.at(&at))?;
                versions.insert(version, Self::parse_version(entry, &at, cx)?);
            }
        }
        Ok(Policy {
            rules,
            provisioning_secret,
            reregistration,
            versions,
        })
    }

    fn parse_version(v: &Value, at: &str, cx: &Ctx<'_>) -> Result<VersionRules, ValidationError> {
        let m = object(v, at)?;
        only_fields(m, at, VERSION_FIELDS)?;
        let f = |name: &str| format!("{at}.{name}");
        Ok(VersionRules {
            mode: m
                .get("mode")
                .map(|v| Mode::parse(v, &f("mode")))
                .transpose()?,
            endpoint_id_pattern: m
                .get("endpointIdPattern")
                .map(|v| cx.pattern(v, &f("endpointIdPattern")))
                .transpose()?,
            max_metadata_bytes: m
                .get("maxMetadataBytes")
                .map(|v| cx.max_bytes(v, &f("maxMetadataBytes")))
                .transpose()?,
            required_metadata_keys: match m.get("requiredMetadataKeys") {
                None => None,
                Some(Value::Null) => Some(Vec::new()),
                Some(v) => Some(cx.keys(v, &f("requiredMetadataKeys"))?),
            },
            allowed_metadata_values: match m.get("allowedMetadataValues") {
                None => None,
                Some(Value::Null) => Some(BTreeMap::new()),
                Some(v) => Some(cx.value_rules(v, &f("allowedMetadataValues"))?),
            },
        })
    }

    /// The rules of `version`: the application's, overridden by the version's entry.
    pub fn rules_for(&self, version: &AppVersionName) -> Rules {
        let mut r = self.rules.clone();
        if let Some(v) = self.versions.get(version) {
            if let Some(m) = v.mode {
                r.mode = m;
            }
            if let Some(p) = &v.endpoint_id_pattern {
                r.endpoint_id_pattern = p.clone();
            }
            if let Some(b) = v.max_metadata_bytes {
                r.max_metadata_bytes = b;
            }
            if let Some(k) = &v.required_metadata_keys {
                r.required_metadata_keys = k.clone();
            }
            if let Some(a) = &v.allowed_metadata_values {
                r.allowed_metadata_values = a.clone();
            }
        }
        r
    }

    fn fields(&self) -> Map<String, Value> {
        let r = &self.rules;
        let mut m = Map::new();
        m.insert("mode".into(), json!(r.mode.as_str()));
        m.insert(
            "reregistration".into(),
            json!(rereg_str(self.reregistration)),
        );
        m.insert(
            "endpointIdPattern".into(),
            json!(r.endpoint_id_pattern.as_ref().map(Pattern::as_str)),
        );
        m.insert("maxMetadataBytes".into(), json!(r.max_metadata_bytes));
        m.insert(
            "requiredMetadataKeys".into(),
            json!(r.required_metadata_keys),
        );
        m.insert(
            "allowedMetadataValues".into(),
            value_rules_json(&r.allowed_metadata_values),
        );
        let mut versions = Map::new();
        for (name, v) in &self.versions {
            let mut e = Map::new();
            if let Some(mode) = v.mode {
                e.insert("mode".into(), json!(mode.as_str()));
            }
            if let Some(p) = &v.endpoint_id_pattern {
                e.insert(
                    "endpointIdPattern".into(),
                    json!(p.as_ref().map(Pattern::as_str)),
                );
            }
            if let Some(b) = v.max_metadata_bytes {
                e.insert("maxMetadataBytes".into(), json!(b));
            }
            if let Some(k) = &v.required_metadata_keys {
                e.insert("requiredMetadataKeys".into(), json!(k));
            }
            if let Some(a) = &v.allowed_metadata_values {
                e.insert("allowedMetadataValues".into(), value_rules_json(a));
            }
            versions.insert(name.to_string(), Value::Object(e));
        }
        m.insert("versions".into(), Value::Object(versions));
        m
    }

    /// The REST form: the secret is write-only; `provisioningSecretSet` says whether one is.
    pub fn to_rest(&self) -> Value {
        let mut m = self.fields();
        m.insert(
            "provisioningSecretSet".into(),
            json!(self.provisioning_secret.is_some()),
        );
        Value::Object(m)
    }

    /// The stored form (compact JSON, deterministic: its hash is the entity tag).
    pub fn to_stored(&self) -> String {
        let mut m = self.fields();
        m.insert("formatVersion".into(), json!(1));
        m.insert(
            "provisioningSecretHash".into(),
            json!(self.provisioning_secret.map(TokenHash::to_hex)),
        );
        Value::Object(m).to_string()
    }
}

fn value_rules_json(rules: &BTreeMap<String, ValueRule>) -> Value {
    Value::Object(
        rules
            .iter()
            .map(|(k, r)| (k.clone(), r.to_json()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> AppName {
        AppName::parse("demo").unwrap()
    }

    fn parse(doc: Value) -> Result<Policy, ValidationError> {
        Policy::from_rest(&doc, None, &app(), &Limits::default())
    }

    fn err(doc: Value) -> (String, &'static str) {
        let e = parse(doc).unwrap_err();
        (e.field, e.rule)
    }

    fn md(v: Value) -> Metadata {
        Metadata::parse(v, "metadata", &Limits::default()).unwrap()
    }

    fn v(name: &str) -> AppVersionName {
        AppVersionName::parse(name).unwrap()
    }

    #[test]
    fn minimal_document_and_defaults() {
        let p = parse(json!({"mode": "open"})).unwrap();
        assert_eq!(p.rules.mode, Mode::Open);
        assert_eq!(p.reregistration, Reregistration::Refuse);
        assert!(p.provisioning_secret.is_none());
        assert!(p.versions.is_empty());
        let r = p.rules_for(&v("demo-v1"));
        assert!(r.check_metadata(&md(json!({"any": 1}))).is_ok());
        assert!(r
            .check_endpoint_id(&EndpointId::parse("x").unwrap())
            .is_ok());
    }

    #[test]
    fn validation_errors_name_field_and_rule() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!({}), "mode", "required"),
            (json!({"mode": "wide-open"}), "mode", "enum"),
            (json!({"mode": 1}), "mode", "enum"),
            (json!({"mode": "open", "mdoe": 1}), "mdoe", "unknown-field"),
            (
                json!({"mode": "open", "provisioningSecret": "short"}),
                "provisioningSecret",
                "length",
            ),
            (
                json!({"mode": "open", "provisioningSecret": 5}),
                "provisioningSecret",
                "type",
            ),
            (
                json!({"mode": "open", "provisioningSecret": "0123456789abcde\u{7}"}),
                "provisioningSecret",
                "pattern",
            ),
            (
                json!({"mode": "open", "reregistration": "maybe"}),
                "reregistration",
                "enum",
            ),
            (
                json!({"mode": "open", "endpointIdPattern": "("}),
                "endpointIdPattern",
                "regex",
            ),
            (
                json!({"mode": "open", "endpointIdPattern": ""}),
                "endpointIdPattern",
                "max-length",
            ),
            (
                json!({"mode": "open", "endpointIdPattern": 3}),
                "endpointIdPattern",
                "type",
            ),
            (
                json!({"mode": "open", "maxMetadataBytes": 0}),
                "maxMetadataBytes",
                "range",
            ),
            (
                json!({"mode": "open", "maxMetadataBytes": 64 * 1024 + 1}),
                "maxMetadataBytes",
                "range",
            ),
            (
                json!({"mode": "open", "maxMetadataBytes": 1.5}),
                "maxMetadataBytes",
                "range",
            ),
            (
                json!({"mode": "open", "requiredMetadataKeys": "k"}),
                "requiredMetadataKeys",
                "type",
            ),
            (
                json!({"mode": "open", "requiredMetadataKeys": ["a", "a"]}),
                "requiredMetadataKeys[1]",
                "unique",
            ),
            (
                json!({"mode": "open", "requiredMetadataKeys": [""]}),
                "requiredMetadataKeys[0]",
                "required",
            ),
            (
                json!({"mode": "open", "requiredMetadataKeys": [7]}),
                "requiredMetadataKeys[0]",
                "type",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": []}),
                "allowedMetadataValues",
                "type",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {}}}),
                "allowedMetadataValues.k",
                "one-of",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {"values": [1], "pattern": "a"}}}),
                "allowedMetadataValues.k",
                "one-of",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {"values": []}}}),
                "allowedMetadataValues.k.values",
                "type",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {"pattern": "["}}}),
                "allowedMetadataValues.k.pattern",
                "regex",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {"min": "1"}}}),
                "allowedMetadataValues.k.min",
                "type",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {"min": 5, "max": 1}}}),
                "allowedMetadataValues.k.min",
                "range",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {"min": null}}}),
                "allowedMetadataValues.k",
                "required",
            ),
            (
                json!({"mode": "open", "allowedMetadataValues": {"k": {"values": [1], "extra": 1}}}),
                "allowedMetadataValues.k.extra",
                "unknown-field",
            ),
            (
                json!({"mode": "open", "versions": {"Bad Name": {}}}),
                "versions.Bad Name",
                "pattern",
            ),
            (
                json!({"mode": "open", "versions": {"demo-v1": {"mode": "x"}}}),
                "versions.demo-v1.mode",
                "enum",
            ),
            (
                json!({"mode": "open", "versions": {"demo-v1": {"reregistration": "reissue"}}}),
                "versions.demo-v1.reregistration",
                "unknown-field",
            ),
            (
                json!({"mode": "open", "versions": {"demo-v1": {"allowedMetadataValues": {"k": {"max": []}}}}}),
                "versions.demo-v1.allowedMetadataValues.k.max",
                "type",
            ),
            (json!({"mode": "open", "versions": []}), "versions", "type"),
            (json!([]), "body", "type"),
        ];
        for (doc, field, rule) in cases {
            assert_eq!(err(doc.clone()), (field.to_owned(), rule), "{doc}");
        }
    }

    #[test]
    fn secret_is_hashed_kept_replaced_and_removed() {
        let secret = "0123456789abcdef";
        let p = parse(json!({"mode": "open", "provisioningSecret": secret})).unwrap();
        assert_eq!(p.provisioning_secret, Some(secret_hash(&app(), secret)));
        let limits = Limits::default();
        // Absent: kept.
        let kept =
            Policy::from_rest(&json!({"mode": "closed"}), Some(&p), &app(), &limits).unwrap();
        assert_eq!(kept.provisioning_secret, p.provisioning_secret);
        // null: removed.
        let removed = Policy::from_rest(
            &json!({"mode": "open", "provisioningSecret": null}),
            Some(&p),
            &app(),
            &limits,
        )
        .unwrap();
        assert!(removed.provisioning_secret.is_none());
        // Never shown, in either form.
        let rest = p.to_rest();
        assert_eq!(rest["provisioningSecretSet"], true);
        assert!(!rest.to_string().contains(secret));
        assert!(!p.to_stored().contains(secret));
        // The REST form read back (GET → PUT) keeps the secret and means the same.
        let again = Policy::from_rest(&rest, Some(&p), &app(), &limits).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn stored_form_round_trips() {
        let p = parse(json!({
            "mode": "claim-token",
            "provisioningSecret": "0123456789abcdef",
            "reregistration": "reissue",
            "endpointIdPattern": "dev-[0-9]+",
            "maxMetadataBytes": 100,
            "requiredMetadataKeys": ["serial", "model"],
            "allowedMetadataValues": {
                "model": {"values": ["a", 1, {"x": true}]},
                "serial": {"pattern": "[A-Z]{2}[0-9]+"},
                "temp": {"min": -10.5, "max": 40},
                "level": {"min": 1}
            },
            "versions": {
                "demo-v2": {"mode": "open", "endpointIdPattern": null, "maxMetadataBytes": null,
                            "requiredMetadataKeys": [], "allowedMetadataValues": {}},
                "demo-v3": {"maxMetadataBytes": 10}
            }
        }))
        .unwrap();
        let stored = p.to_stored();
        let back = Policy::from_stored(&stored, &Limits::default()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.to_stored(), stored, "deterministic");
        assert_eq!(etag_of(&stored), etag_of(&back.to_stored()));
        // A lowered metadata limit does not make the stored policy unreadable.
        let small = Limits {
            metadata_max_bytes: 10,
            ..Limits::default()
        };
        assert!(Policy::from_stored(&stored, &small).is_ok());
        assert!(Policy::from_stored("{\"mode\": 1}", &small).is_err());
        assert!(Policy::from_stored("not json", &small).is_err());
    }

    #[test]
    fn versions_override_the_fields_they_set() {
        let p = parse(json!({
            "mode": "claim-token",
            "endpointIdPattern": "dev-[0-9]+",
            "maxMetadataBytes": 20,
            "requiredMetadataKeys": ["serial"],
            "versions": {
                "demo-v2": {"mode": "open", "endpointIdPattern": null},
                "demo-v3": {"requiredMetadataKeys": ["model"], "mode": "closed"}
            }
        }))
        .unwrap();
        let v1 = p.rules_for(&v("demo-v1"));
        assert_eq!(v1.mode, Mode::ClaimToken);
        assert_eq!(
            v1.endpoint_id_pattern.as_ref().unwrap().as_str(),
            "dev-[0-9]+"
        );
        let v2 = p.rules_for(&v("demo-v2"));
        assert_eq!(v2.mode, Mode::Open);
        assert!(v2.endpoint_id_pattern.is_none());
        // Not set in the entry: the application's.
        assert_eq!(v2.max_metadata_bytes, Some(20));
        assert_eq!(v2.required_metadata_keys, ["serial"]);
        let v3 = p.rules_for(&v("demo-v3"));
        assert_eq!(v3.mode, Mode::Closed);
        assert_eq!(v3.required_metadata_keys, ["model"]);
        assert!(v3.endpoint_id_pattern.is_some());
    }

    #[test]
    fn endpoint_id_pattern_is_anchored() {
        let p = parse(json!({"mode": "open", "endpointIdPattern": "dev-[0-9]+"})).unwrap();
        let r = p.rules_for(&v("demo-v1"));
        let id = |s: &str| EndpointId::parse(s).unwrap();
        assert!(r.check_endpoint_id(&id("dev-17")).is_ok());
        for bad in ["xdev-17", "dev-17x", "dev-"] {
            let e = r.check_endpoint_id(&id(bad)).unwrap_err();
            assert_eq!(e.reason, RefusalReason::EndpointIdNotAllowed);
            assert_eq!(e.field.as_deref(), Some("endpointId"));
        }
    }

    #[test]
    fn metadata_rules_accept_and_refuse() {
        let p = parse(json!({
            "mode": "open",
            "maxMetadataBytes": 120,
            "requiredMetadataKeys": ["serial"],
            "allowedMetadataValues": {
                "model": {"values": ["a", 1, {"x": true}]},
                "serial": {"pattern": "[A-Z]{2}[0-9]+"},
                "temp": {"min": -10.5, "max": 40},
                "level": {"min": 1}
            }
        }))
        .unwrap();
        let r = p.rules_for(&v("demo-v1"));
        let check = |m: Value| r.check_metadata(&md(m));
        assert!(check(json!({"serial": "AB12"})).is_ok());
        assert!(check(json!({"serial": "AB12", "model": 1.0, "temp": 40, "level": 9e9})).is_ok());
        assert!(check(json!({"serial": "AB12", "model": {"x": true}, "temp": -10.5})).is_ok());
        assert!(check(json!({"serial": "AB12", "unlisted": [1, 2]})).is_ok());
        let refused = |m: Value, reason: RefusalReason, field: &str| {
            let e = check(m.clone()).unwrap_err();
            assert_eq!(e.reason, reason, "{m}");
            assert_eq!(e.field.as_deref(), Some(field), "{m}");
        };
        use RefusalReason::*;
        refused(json!({}), MetadataKeyMissing, "metadata.serial");
        refused(
            json!({"serial": "ab12"}),
            MetadataValueNotAllowed,
            "metadata.serial",
        );
        refused(
            json!({"serial": 12}),
            MetadataValueNotAllowed,
            "metadata.serial",
        );
        refused(
            json!({"serial": "AB1", "model": "b"}),
            MetadataValueNotAllowed,
            "metadata.model",
        );
        refused(
            json!({"serial": "AB1", "temp": 40.01}),
            MetadataValueNotAllowed,
            "metadata.temp",
        );
        refused(
            json!({"serial": "AB1", "temp": "20"}),
            MetadataValueNotAllowed,
            "metadata.temp",
        );
        refused(
            json!({"serial": "AB1", "level": 0.5}),
            MetadataValueNotAllowed,
            "metadata.level",
        );
        refused(
            json!({"serial": "AB1", "pad": "x".repeat(120)}),
            MetadataTooLarge,
            "metadata",
        );
    }

    #[test]
    fn setting_keys_and_tags() {
        let t = TenantId::parse("acme").unwrap();
        assert_eq!(setting_key(&t, &app()), "self-registration/acme/demo");
        assert_ne!(etag_of("a"), etag_of("b"));
        assert!(etag_of("a").starts_with("\"sr-"));
    }
}
