//! 9/ELCE connectivity: the `connected` event that KPC publishes when endpoints open a
//! session, and EPR consumes to keep each endpoint's app version current.

use crate::avro::{self, Datum, Fields};
use crate::{DecodeError, EncodeError};
use std::collections::BTreeMap;

/// A 9/ELCE `ConnectedEvent` (schema `0009-ep-connected.avsc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedEvent {
    /// Tracing ID.
    pub correlation_id: String,
    /// Message creation time, Unix milliseconds.
    pub timestamp: i64,
    /// Milliseconds after `timestamp` at which the event expires; 0 = never.
    pub timeout: i64,
    /// Endpoint ID → the application version name the endpoint reported on connect.
    pub endpoints: BTreeMap<String, String>,
    /// The KPC replica that published the event.
    pub originator_replica_id: String,
}

/// The subject to subscribe to for `connected` events from any publisher instance:
/// `kaa.v1.events.*.endpoint.connectivity.connected`.
pub fn connected_subject_wildcard() -> &'static str {
    "kaa.v1.events.*.endpoint.connectivity.connected"
}

/// Decodes a `connected` event payload.
pub fn decode_connected(payload: &[u8]) -> Result<ConnectedEvent, DecodeError> {
    let mut r = avro::EP_CONNECTED.decode(payload)?;
    Ok(ConnectedEvent {
        correlation_id: r.string("correlationId")?,
        timestamp: r.long("timestamp")?,
        timeout: r.long("timeout")?,
        endpoints: r
            .field("endpoints")?
            .map()?
            .into_iter()
            .map(|(id, version)| Ok((id, version.string()?)))
            .collect::<Result<_, DecodeError>>()?,
        originator_replica_id: r.string("originatorReplicaId")?,
    })
}

/// Encodes a `connected` event, as KPC would (for tests and tools; EPR only consumes it).
pub fn encode_connected(ev: &ConnectedEvent) -> Result<Vec<u8>, EncodeError> {
    let endpoints = ev
        .endpoints
        .iter()
        .map(|(id, version)| (id.clone(), Datum::String(version.clone())))
        .collect();
    avro::EP_CONNECTED.encode(Fields::from([
        ("correlationId", Datum::String(ev.correlation_id.clone())),
        ("timestamp", Datum::Long(ev.timestamp)),
        ("timeout", Datum::Long(ev.timeout)),
        ("endpoints", Datum::Map(endpoints)),
        (
            "originatorReplicaId",
            Datum::String(ev.originator_replica_id.clone()),
        ),
    ]))
}
