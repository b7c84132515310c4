//! Domain events. A write and its events commit in one store transaction (the outbox);
//! the Avro/NATS encoding of Kaa's 9/ELCE and 15/EME lives in the events adapter.

use crate::ids::{AppName, AppVersionName, EndpointId, TenantId};
use crate::metadata::MetadataDiff;
use crate::Timestamp;

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// 9/ELCE `endpoint.lifecycle.registered`.
    Registered,
    /// 9/ELCE `endpoint.lifecycle.unregistered`.
    Unregistered,
    /// 9/ELCE `endpoint.lifecycle.appversion-updated`.
    AppVersionUpdated { previous: AppVersionName },
    /// 15/EME `endpoint.metadata.updated`.
    MetadataUpdated(MetadataDiff),
}

/// One event about one endpoint, with what every Kaa event envelope needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainEvent {
    pub tenant: TenantId,
    pub endpoint_id: EndpointId,
    pub app: AppName,
    /// The endpoint's application version after the change (before it, for unregistration).
    pub app_version: AppVersionName,
    pub kind: EventKind,
    /// Ties the event to the request that caused it.
    pub correlation_id: String,
    pub timestamp: Timestamp,
}
