//! 16/ECAP, the token half: token validation and status transition requests and responses
//! (EPR serves them as the credential provider), the `endpoint.token.revoked` event, and our
//! extension event `endpoint.token.status-changed`.

use crate::{EncodeError, Encoded, Originator};
use epr_core::event::TokenEvent;

/// Encodes a token event: `kaa.v1.events.{instance}.endpoint.token.revoked` (16/ECAP) or
/// `….endpoint.token.status-changed` (extension).
pub fn encode_token_event(event: &TokenEvent, origin: &Originator) -> Result<Encoded, EncodeError> {
    // Skeleton: replaced by the 16/ECAP slice.
    let _ = (event, origin);
    Err(EncodeError::MissingField {
        path: "16/ECAP encoding is not implemented yet".into(),
    })
}
