//! 17/SCMP service configuration updates, published by Kaa's Tekton when tenant-,
//! application- or version-level configuration changes. EPR consumes them and re-reads
//! the configuration through Tekton's REST API; it never acknowledges them.
//!
//! - Broadcast: `kaa.v1.events.{provider}.service.configuration.{upsert|delete}`, record
//!   `BroadcastConfigurationUpdateEvent` (`0017-broadcast_configuration_update.avsc`):
//!   `tenantID`, `appName` and `appVerName` are all nullable.
//! - Targeted: `kaa.v1.service.{consumer}.scmp.configuration.{upsert|delete}`, record
//!   `ServiceSpecificConfigurationUpdateEvent`
//!   (`0017-service_specific_configuration_update.avsc`): `tenantID` is required.
//!
//! Which fields are null says how much changed ([`ConfigUpdate::scope`]): nothing set →
//! everything; the tenant → that tenant; tenant and application → that application; all
//! three → that version. Other combinations are refused.

use crate::avro::{self, Datum, Fields};
use crate::{DecodeError, EncodeError};

/// `upsert` (created or changed) or `delete` (removed): the subject's last token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateType {
    Upsert,
    Delete,
}

impl UpdateType {
    pub fn token(self) -> &'static str {
        match self {
            UpdateType::Upsert => "upsert",
            UpdateType::Delete => "delete",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        match token {
            "upsert" => Some(UpdateType::Upsert),
            "delete" => Some(UpdateType::Delete),
            _ => None,
        }
    }
}

/// Broadcast updates of every provider instance, both types.
pub const BROADCAST_WILDCARD: &str = "kaa.v1.events.*.service.configuration.*";

/// Targeted updates to every consumer instance, both types (the listener keeps its own).
pub const TARGETED_WILDCARD: &str = "kaa.v1.service.*.scmp.configuration.*";

/// The broadcast subject of `provider` for `kind`.
pub fn broadcast_subject(provider: &str, kind: UpdateType) -> String {
    format!(
        "kaa.v1.events.{provider}.service.configuration.{}",
        kind.token()
    )
}

/// The targeted subject of `consumer` (a service instance name) for `kind`.
pub fn targeted_subject(consumer: &str, kind: UpdateType) -> String {
    format!(
        "kaa.v1.service.{consumer}.scmp.configuration.{}",
        kind.token()
    )
}

/// Which message a subject carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScmpSubject {
    Broadcast { provider: String, kind: UpdateType },
    Targeted { consumer: String, kind: UpdateType },
}

/// Recognises the two subject forms; `None` for anything else.
pub fn parse_subject(subject: &str) -> Option<ScmpSubject> {
    let t: Vec<&str> = subject.split('.').collect();
    match t.as_slice() {
        ["kaa", "v1", "events", provider, "service", "configuration", kind] => {
            Some(ScmpSubject::Broadcast {
                provider: (*provider).to_owned(),
                kind: UpdateType::parse(kind)?,
            })
        }
        ["kaa", "v1", "service", consumer, "scmp", "configuration", kind] => {
            Some(ScmpSubject::Targeted {
                consumer: (*consumer).to_owned(),
                kind: UpdateType::parse(kind)?,
            })
        }
        _ => None,
    }
}

/// Either message, decoded. The targeted record has no `originatorReplicaId` and always a
/// tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigUpdate {
    pub correlation_id: String,
    /// Message creation time, Unix milliseconds (17/SCMP messages have no `timeout`).
    pub timestamp: i64,
    pub originator_replica_id: Option<String>,
    pub tenant_id: Option<String>,
    pub app_name: Option<String>,
    pub app_version_name: Option<String>,
}

/// How much configuration a message says changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigScope {
    /// Several tenants or applications: re-read everything.
    All,
    /// One tenant and all its applications and versions.
    Tenant { tenant: String },
    /// One application of a tenant.
    App { tenant: String, app: String },
    /// One version of an application.
    Version {
        tenant: String,
        app: String,
        version: String,
    },
}

impl ConfigScope {
    /// The tenant it is limited to, if any.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            ConfigScope::All => None,
            ConfigScope::Tenant { tenant }
            | ConfigScope::App { tenant, .. }
            | ConfigScope::Version { tenant, .. } => Some(tenant),
        }
    }

    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ConfigScope::All => "all",
            ConfigScope::Tenant { .. } => "tenant",
            ConfigScope::App { .. } => "application",
            ConfigScope::Version { .. } => "version",
        }
    }
}

impl ConfigUpdate {
    /// The null pattern: which of `tenantID`, `appName`, `appVerName` are set decides the
    /// scope. An empty string counts as null. A version without its application, or an
    /// application without its tenant, is an error (no provider may send it).
    pub fn scope(&self) -> Result<ConfigScope, String> {
        let set = |f: &Option<String>| f.as_deref().filter(|s| !s.is_empty()).map(str::to_owned);
        match (
            set(&self.tenant_id),
            set(&self.app_name),
            set(&self.app_version_name),
        ) {
            (None, None, None) => Ok(ConfigScope::All),
            (Some(tenant), None, None) => Ok(ConfigScope::Tenant { tenant }),
            (Some(tenant), Some(app), None) => Ok(ConfigScope::App { tenant, app }),
            (Some(tenant), Some(app), Some(version)) => Ok(ConfigScope::Version {
                tenant,
                app,
                version,
            }),
            (t, a, v) => Err(format!(
                "tenantID {}, appName {}, appVerName {} is not an allowed combination",
                presence(&t),
                presence(&a),
                presence(&v)
            )),
        }
    }
}

fn presence(f: &Option<String>) -> &'static str {
    if f.is_some() {
        "set"
    } else {
        "null"
    }
}

/// Decodes a broadcast payload.
pub fn decode_broadcast(payload: &[u8]) -> Result<ConfigUpdate, DecodeError> {
    let mut r = avro::SCMP_BROADCAST.decode(payload)?;
    Ok(ConfigUpdate {
        correlation_id: r.string("correlationId")?,
        timestamp: r.long("timestamp")?,
        originator_replica_id: Some(r.string("originatorReplicaId")?),
        tenant_id: r.opt_string("tenantID")?,
        app_name: r.opt_string("appName")?,
        app_version_name: r.opt_string("appVerName")?,
    })
}

/// Decodes a targeted payload.
pub fn decode_targeted(payload: &[u8]) -> Result<ConfigUpdate, DecodeError> {
    let mut r = avro::SCMP_TARGETED.decode(payload)?;
    Ok(ConfigUpdate {
        correlation_id: r.string("correlationId")?,
        timestamp: r.long("timestamp")?,
        originator_replica_id: None,
        tenant_id: Some(r.string("tenantID")?),
        app_name: r.opt_string("appName")?,
        app_version_name: r.opt_string("appVerName")?,
    })
}

fn opt(s: &Option<String>) -> Datum {
    Datum::optional(s.clone(), Datum::String)
}

/// Encodes a broadcast update, as Tekton would (for tests and tools).
pub fn encode_broadcast(u: &ConfigUpdate) -> Result<Vec<u8>, EncodeError> {
    avro::SCMP_BROADCAST.encode(Fields::from([
        ("correlationId", Datum::String(u.correlation_id.clone())),
        ("timestamp", Datum::Long(u.timestamp)),
        (
            "originatorReplicaId",
            Datum::String(u.originator_replica_id.clone().unwrap_or_default()),
        ),
        ("tenantID", opt(&u.tenant_id)),
        ("appName", opt(&u.app_name)),
        ("appVerName", opt(&u.app_version_name)),
    ]))
}

/// Encodes a targeted update, as Tekton would (for tests and tools); the tenant is
/// required.
pub fn encode_targeted(u: &ConfigUpdate) -> Result<Vec<u8>, EncodeError> {
    avro::SCMP_TARGETED.encode(Fields::from([
        ("correlationId", Datum::String(u.correlation_id.clone())),
        ("timestamp", Datum::Long(u.timestamp)),
        (
            "tenantID",
            u.tenant_id.clone().map_or(Datum::Null, Datum::String),
        ),
        ("appName", opt(&u.app_name)),
        ("appVerName", opt(&u.app_version_name)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(t: Option<&str>, a: Option<&str>, v: Option<&str>) -> ConfigUpdate {
        ConfigUpdate {
            correlation_id: "c1".into(),
            timestamp: 1_700_000_000_000,
            originator_replica_id: Some("tekton-0".into()),
            tenant_id: t.map(Into::into),
            app_name: a.map(Into::into),
            app_version_name: v.map(Into::into),
        }
    }

    #[test]
    fn null_pattern_decides_the_scope() {
        assert_eq!(update(None, None, None).scope(), Ok(ConfigScope::All));
        assert_eq!(
            update(Some("acme"), None, None).scope(),
            Ok(ConfigScope::Tenant {
                tenant: "acme".into()
            })
        );
        assert_eq!(
            update(Some("acme"), Some("demo"), None).scope(),
            Ok(ConfigScope::App {
                tenant: "acme".into(),
                app: "demo".into()
            })
        );
        assert_eq!(
            update(Some("acme"), Some("demo"), Some("demo-v2")).scope(),
            Ok(ConfigScope::Version {
                tenant: "acme".into(),
                app: "demo".into(),
                version: "demo-v2".into()
            })
        );
        // Empty strings are nulls.
        assert_eq!(
            update(Some(""), Some(""), None).scope(),
            Ok(ConfigScope::All)
        );
        for (t, a, v) in [
            (None, Some("demo"), None),
            (None, None, Some("demo-v1")),
            (Some("acme"), None, Some("demo-v1")),
            (None, Some("demo"), Some("demo-v1")),
        ] {
            let e = update(t, a, v).scope().unwrap_err();
            assert!(e.contains("not an allowed combination"), "{e}");
        }
    }

    #[test]
    fn broadcast_round_trip_and_wire_form() {
        let u = update(Some("acme"), Some("demo"), None);
        let bytes = encode_broadcast(&u).unwrap();
        assert_eq!(decode_broadcast(&bytes).unwrap(), u);
        // Independent check with apache-avro against the schema file itself.
        let schema = apache_avro::Schema::parse_str(include_str!(
            "../avro/0017-broadcast_configuration_update.avsc"
        ))
        .unwrap();
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &bytes[..])
            .unwrap();
        let apache_avro::types::Value::Record(fields) = value else {
            panic!("not a record")
        };
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "correlationId",
                "timestamp",
                "originatorReplicaId",
                "tenantID",
                "appName",
                "appVerName"
            ]
        );
        let all_null = update(None, None, None);
        let bytes = encode_broadcast(&all_null).unwrap();
        assert_eq!(decode_broadcast(&bytes).unwrap(), all_null);
    }

    #[test]
    fn targeted_round_trip_requires_tenant() {
        let mut u = update(Some("acme"), Some("demo"), Some("demo-v1"));
        u.originator_replica_id = None;
        let bytes = encode_targeted(&u).unwrap();
        assert_eq!(decode_targeted(&bytes).unwrap(), u);
        u.tenant_id = None;
        assert!(encode_targeted(&u).is_err());
    }

    #[test]
    fn malformed_payloads_are_errors() {
        assert!(decode_broadcast(b"").is_err());
        assert!(decode_broadcast(&[0xff, 0xff, 0xff]).is_err());
        let u = update(Some("acme"), None, None);
        let mut bytes = encode_broadcast(&u).unwrap();
        bytes.push(0);
        assert!(decode_broadcast(&bytes).is_err());
        // A broadcast is not a targeted message (different layout).
        let bytes = encode_broadcast(&u).unwrap();
        assert!(decode_targeted(&bytes).map(|d| d != u).unwrap_or(true));
    }

    #[test]
    fn subjects() {
        assert_eq!(
            parse_subject("kaa.v1.events.tekton.service.configuration.upsert"),
            Some(ScmpSubject::Broadcast {
                provider: "tekton".into(),
                kind: UpdateType::Upsert
            })
        );
        assert_eq!(
            parse_subject(&targeted_subject("epr-acme", UpdateType::Delete)),
            Some(ScmpSubject::Targeted {
                consumer: "epr-acme".into(),
                kind: UpdateType::Delete
            })
        );
        assert_eq!(
            parse_subject(&broadcast_subject("t", UpdateType::Delete)),
            Some(ScmpSubject::Broadcast {
                provider: "t".into(),
                kind: UpdateType::Delete
            })
        );
        for bad in [
            "kaa.v1.events.tekton.service.configuration.patch",
            "kaa.v1.events.tekton.service.app-configuration.upsert",
            "kaa.v1.service.epr.scmp.configuration",
        ] {
            assert_eq!(parse_subject(bad), None, "{bad}");
        }
    }
}
