//! The NATS adapter of the Endpoint Register.
//!
//! - [`connection`]: one client for the process, connected (and reconnected) in the
//!   background, with the state that health reports.
//! - [`relay`]: the outbox relay that publishes 9/ELCE, 15/EME, 18/EFE and 16/ECAP token events.
//! - [`connected`]: the 9/ELCE `connected` listener (app version updates).
//! - [`epmmp`]: the 19/EPMMP request/reply server.
//! - [`efmp`]: the 20/EFMP request/reply server (filters of an endpoint, endpoints of a
//!   filter).
//! - [`ecap`]: the 16/ECAP endpoint token provider (token validation, status transition).
//! - `rpc`: what the request/reply servers share (subscriptions per tenant, reply rules,
//!   metrics).
//! - [`tenancy`]: the tenants served and their service instance names.
//! - [`tenant_lifecycle`]: the 21/TLE listener (tenant updated or unregistered).
//! - [`scmp`]: the 17/SCMP listener (Tekton configuration updates, every replica).

pub mod connected;
pub mod connection;
pub mod ecap;
pub mod efmp;
pub mod epmmp;
pub mod relay;
mod rpc;
pub mod scmp;
pub mod tenancy;
pub mod tenant_lifecycle;

pub use connection::{ConnectionState, Nats, NatsSettings};
pub use relay::{Relay, RelaySettings, Sink};
pub use tenancy::Tenancy;
