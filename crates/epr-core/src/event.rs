//! Domain events. A write and its events commit in one store transaction (the outbox);
//! the Avro/NATS encoding of Kaa's 9/ELCE and 15/EME lives in the events adapter.

use crate::credentials::TokenStatus;
use crate::endpoint_filter::FilterId;
use crate::ids::{AppName, AppVersionName, EndpointId, TenantId, TokenId};
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

/// What happened to a saved filter (18/EFE).
#[derive(Debug, Clone, PartialEq)]
pub enum FilterEventKind {
    /// `pending`: created, or its query changed and it is evaluated again.
    Pending,
    /// `activated`: the back-fill finished; membership is complete.
    Activated,
    /// `deleted`.
    Deleted,
    /// `ep-matched`: the endpoint started matching the (active) filter.
    EndpointMatched {
        endpoint_id: EndpointId,
        app_version: AppVersionName,
    },
    /// `ep-unmatched`: the endpoint stopped matching, or was unregistered.
    EndpointUnmatched {
        endpoint_id: EndpointId,
        app_version: AppVersionName,
    },
}

/// One event about one saved filter.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterEvent {
    pub tenant: TenantId,
    pub app: AppName,
    pub filter_id: FilterId,
    pub filter_name: String,
    pub kind: FilterEventKind,
    pub correlation_id: String,
    pub timestamp: Timestamp,
}

/// What happened to an endpoint's tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEventKind {
    /// 16/ECAP `endpoint.token.revoked`: these tokens can no longer identify the endpoint
    /// (revoked one by one, all of them when the endpoint is unregistered, the earlier ones
    /// when a device re-registers).
    Revoked { token_ids: Vec<TokenId> },
    /// Any other change of a token's status, and a token issued after registration
    /// (`previous: None`). Kaa defines no event for these; ours is
    /// `endpoint.token.status-changed` (an extension schema).
    StatusChanged {
        token_id: TokenId,
        previous: Option<TokenStatus>,
        status: TokenStatus,
    },
}

/// One event about an endpoint's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub tenant: TenantId,
    pub app: AppName,
    pub endpoint_id: EndpointId,
    pub kind: TokenEventKind,
    pub correlation_id: String,
    pub timestamp: Timestamp,
}

/// Anything the outbox carries, in commit order.
#[derive(Debug, Clone, PartialEq)]
pub enum OutboxEvent {
    Endpoint(DomainEvent),
    Filter(FilterEvent),
    Token(TokenEvent),
}

impl OutboxEvent {
    pub fn timestamp(&self) -> Timestamp {
        match self {
            Self::Endpoint(e) => e.timestamp,
            Self::Filter(e) => e.timestamp,
            Self::Token(e) => e.timestamp,
        }
    }

    /// The tenant the event belongs to.
    pub fn tenant(&self) -> &TenantId {
        match self {
            Self::Endpoint(e) => &e.tenant,
            Self::Filter(e) => &e.tenant,
            Self::Token(e) => &e.tenant,
        }
    }

    /// The endpoint event, if this is one.
    pub fn as_endpoint(&self) -> Option<&DomainEvent> {
        match self {
            Self::Endpoint(e) => Some(e),
            Self::Filter(_) | Self::Token(_) => None,
        }
    }

    pub fn correlation_id(&self) -> &str {
        match self {
            Self::Endpoint(e) => &e.correlation_id,
            Self::Filter(e) => &e.correlation_id,
            Self::Token(e) => &e.correlation_id,
        }
    }
}

impl From<DomainEvent> for OutboxEvent {
    fn from(e: DomainEvent) -> Self {
        Self::Endpoint(e)
    }
}

impl From<TokenEvent> for OutboxEvent {
    fn from(e: TokenEvent) -> Self {
        Self::Token(e)
    }
}

impl From<FilterEvent> for OutboxEvent {
    fn from(e: FilterEvent) -> Self {
        Self::Filter(e)
    }
}
