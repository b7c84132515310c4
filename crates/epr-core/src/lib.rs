//! The domain of the Endpoint Register (EPR).
//!
//! Everything here is pure: no sockets, files, clocks or randomness. Time, identifiers and
//! storage come in through the ports in [`ports`], so the same rules run unchanged on the
//! embedded store, on PostgreSQL and in unit tests.
//!
//! Layout:
//! - [`ids`]: validating newtypes for every identifier and constrained string.
//! - [`metadata`]: the endpoint metadata document and its size limits.
//! - [`endpoint`]: the endpoint record, ETags and preconditions.
//! - [`command`]: write commands and [`command::plan`], the one function that decides what a
//!   write does to an endpoint and which events it emits.
//! - [`credentials`]: endpoint tokens (Kaa CM's life cycle), claim tokens, self-registration
//!   refusals.
//! - [`event`]: domain events (the outbox carries them; wire encoding lives elsewhere).
//! - [`patch`]: RFC 6902 JSON Patch on metadata, with the limits enforced per operation.
//! - [`query`]: endpoint listing queries and the `metadataFilter` language.
//! - [`filter`]: endpoint filters, Kaa's MongoDB-query criteria language.
//! - [`endpoint_filter`]: saved filters (definition, status, commands and `plan_filter`).
//! - [`auth`]: principals, Kaa's scopes and which tenant NATS subjects belong to.
//! - [`apps`]: the application / application-version catalogue.
//! - [`ports`]: the [`ports::Store`] trait and its error type.
//! - [`log_gate`]: one log line per interval for failures that repeat on every request.
//! - [`self_registration`]: the per-application self-registration policy and its checks.
//! - [`registry`]: the use cases the HTTP and NATS front-ends call.

pub mod apps;
pub mod auth;
pub mod command;
pub mod credentials;
pub mod endpoint;
pub mod endpoint_filter;
pub mod error;
pub mod event;
pub mod filter;
pub mod ids;
pub mod log_gate;
pub mod metadata;
pub mod patch;
pub mod ports;
pub mod query;
pub mod registry;
pub mod self_registration;

pub use error::{DomainError, ValidationError};

/// Milliseconds since the UNIX epoch. Kaa's events carry time in this unit, so it is the
/// one time type of the domain; adapters format it for their wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn millis(self) -> i64 {
        self.0
    }
}
