//! 21/TLE tenant lifecycle events: `updated` (the tenant's data changed) and `unregistered`
//! (the tenant was removed from the platform), published by the Tenant Manager on
//! `kaa.v1.events.{originator}.tenant.lifecycle.{updated|unregistered}`. EPR consumes them.

use crate::avro::{self, CompiledSchema, Datum, Fields};
use crate::{DecodeError, EncodeError};

/// Which 21/TLE event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TenantEventKind {
    /// `updated` (schema `0021-tenant-updated.avsc`).
    Updated,
    /// `unregistered` (schema `0021-tenant-unregistered.avsc`).
    Unregistered,
}

impl TenantEventKind {
    pub const ALL: [TenantEventKind; 2] = [TenantEventKind::Updated, TenantEventKind::Unregistered];

    /// The subject's last token, also a metric label.
    pub fn token(self) -> &'static str {
        match self {
            TenantEventKind::Updated => "updated",
            TenantEventKind::Unregistered => "unregistered",
        }
    }

    /// The subject to subscribe to for this event from any publisher instance:
    /// `kaa.v1.events.*.tenant.lifecycle.{type}`.
    pub fn subject_wildcard(self) -> &'static str {
        match self {
            TenantEventKind::Updated => "kaa.v1.events.*.tenant.lifecycle.updated",
            TenantEventKind::Unregistered => "kaa.v1.events.*.tenant.lifecycle.unregistered",
        }
    }

    fn schema(self) -> &'static CompiledSchema {
        match self {
            TenantEventKind::Updated => &avro::TLE_UPDATED,
            TenantEventKind::Unregistered => &avro::TLE_UNREGISTERED,
        }
    }
}

/// A 21/TLE event; both types have the same fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantEvent {
    pub correlation_id: String,
    /// Message creation time, Unix milliseconds.
    pub timestamp: i64,
    /// Milliseconds after `timestamp` at which the event expires; 0 = never.
    pub timeout: i64,
    /// The tenant updated or unregistered.
    pub tenant_id: String,
    /// The replica that published the event.
    pub originator_replica_id: String,
}

impl TenantEvent {
    /// Whether the event has expired at `now_ms` (a `timeout` of 0 never expires).
    pub fn expired(&self, now_ms: i64) -> bool {
        self.timeout > 0 && self.timestamp.saturating_add(self.timeout) < now_ms
    }
}

/// Decodes a 21/TLE event payload of the given type.
pub fn decode_tenant_event(
    kind: TenantEventKind,
    payload: &[u8],
) -> Result<TenantEvent, DecodeError> {
    let mut r = kind.schema().decode(payload)?;
    Ok(TenantEvent {
        correlation_id: r.string("correlationId")?,
        timestamp: r.long("timestamp")?,
        timeout: r.long("timeout")?,
        tenant_id: r.string("tenantId")?,
        originator_replica_id: r.string("originatorReplicaId")?,
    })
}

/// Encodes a 21/TLE event, as the Tenant Manager would (for tests and tools; EPR only
/// consumes them).
pub fn encode_tenant_event(
    kind: TenantEventKind,
    ev: &TenantEvent,
) -> Result<Vec<u8>, EncodeError> {
    kind.schema().encode(Fields::from([
        ("correlationId", Datum::String(ev.correlation_id.clone())),
        ("timestamp", Datum::Long(ev.timestamp)),
        ("timeout", Datum::Long(ev.timeout)),
        ("tenantId", Datum::String(ev.tenant_id.clone())),
        (
            "originatorReplicaId",
            Datum::String(ev.originator_replica_id.clone()),
        ),
    ]))
}
