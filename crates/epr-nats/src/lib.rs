//! The NATS adapter of the Endpoint Register.
//!
//! - [`connection`]: one client for the process, connected (and reconnected) in the
//!   background, with the state that health reports.
//! - [`relay`]: the outbox relay that publishes 9/ELCE and 15/EME events.
//! - [`connected`]: the 9/ELCE `connected` listener (app version updates).
//! - [`epmmp`]: the 19/EPMMP request/reply server.

pub mod connected;
pub mod connection;
pub mod epmmp;
pub mod relay;

pub use connection::{ConnectionState, Nats, NatsSettings};
pub use relay::{Relay, RelaySettings, Sink};
