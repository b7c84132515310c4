//! The NATS adapter of the Endpoint Register.
//!
//! - [`connection`]: one client for the process, connected (and reconnected) in the
//!   background, with the state that health reports.
//! - [`relay`]: the outbox relay that publishes 9/ELCE and 15/EME events.

pub mod connection;
pub mod relay;

pub use connection::{ConnectionState, Nats, NatsSettings};
pub use relay::{Relay, RelaySettings, Sink};
