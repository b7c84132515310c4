//! The 16/ECAP endpoint token provider: answers token validation requests on
//! `kaa.v1.service.{instance}.ecap.ep-token-request` and status transition requests on
//! `…ecap.ep-token-status-transition-request`, in the instance's queue group so replicas share
//! the work; each tenant has its own instance name, and a request is served in that tenant
//! only (see [`crate::tenancy`]). The reply rules (no reply subject or expired: dropped;
//! undecodable: `400` with the `correlationId` if it can be read) are the shared `crate::rpc`
//! server's.
//!
//! Status codes (the RFC lists none; HTTP meanings, as in docs/credentials.md):
//! - **validation**: `200` the token is `Active` (an `Inactive` token is activated by this,
//!   its first validation); `404` no such token in the application (`tokenId` and
//!   `endpointId` null); `403` the token is `Suspended` or `Revoked` (both IDs set, the reason
//!   says which); `400` malformed request, application name or token; `503` store unavailable.
//! - **status transition**: `200` done, also when the token already is in the target status;
//!   `400` unknown `targetStatus` (or malformed request); `404` no such token; `409` refused
//!   (from `Revoked`, or to `Inactive`); `503` store unavailable.

use crate::connection::Nats;
use crate::rpc::{self, error_status, status, Protocol};
use crate::tenancy::Tenancy;
use epr_core::credentials::{StoredToken, TokenStatus};
use epr_core::ids::TenantId;
use epr_core::registry::{Registry, TokenValidation};
use epr_events::ecap::{Request, Response, Status};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct EcapSettings {
    /// Requests handled at once.
    pub max_in_flight: usize,
}

/// Serves every current tenant of `tenancy` until `stop` turns true, then stops taking
/// requests and waits (briefly) for the ones in flight.
pub async fn serve(
    nats: Nats,
    registry: Arc<Registry>,
    tenancy: Tenancy,
    settings: EcapSettings,
    stop: watch::Receiver<bool>,
) -> Result<(), async_nats::SubscribeError> {
    rpc::serve(
        nats,
        Handler { registry },
        tenancy,
        settings.max_in_flight,
        stop,
    )
    .await
}

struct Handler {
    registry: Arc<Registry>,
}

impl Protocol for Handler {
    rpc::wire!("16/ECAP", ecap);

    async fn answer(&self, tenant: &TenantId, req: Request, corr: &str) -> (Status, Response) {
        match req {
            Request::TokenValidation { app_name, token } => {
                let result = self
                    .registry
                    .validate_token(tenant, &app_name, &token, corr)
                    .await;
                match result {
                    Ok(v) => validation_reply(v),
                    Err(e) => (
                        error_status(&e),
                        Response::empty(epr_events::ecap::RequestType::TokenValidation),
                    ),
                }
            }
            Request::TokenStatusTransition {
                app_name,
                token,
                target_status,
            } => {
                let status = self
                    .transition(tenant, &app_name, &token, &target_status, corr)
                    .await;
                (status, Response::TokenStatusTransition)
            }
        }
    }
}

impl Handler {
    async fn transition(
        &self,
        tenant: &TenantId,
        app: &str,
        token: &str,
        target: &str,
        corr: &str,
    ) -> Status {
        let target = match TokenStatus::parse(target, "targetStatus") {
            Ok(t) => t,
            Err(v) => return status(400, v.to_string()),
        };
        match self
            .registry
            .transition_token_by_value(tenant, app, token, target, corr)
            .await
        {
            Ok(Some(_)) => Status::OK,
            Ok(None) => not_found(),
            Err(e) => error_status(&e),
        }
    }
}

fn not_found() -> Status {
    status(404, "no such token in the application")
}

fn ids(t: &StoredToken) -> Response {
    Response::TokenValidation {
        token_id: Some(t.id.as_str().to_owned()),
        endpoint_id: Some(t.endpoint_id.as_str().to_owned()),
    }
}

/// The reply to a validation: the IDs whenever the token exists, so a refused device can be
/// told apart from an unknown one.
fn validation_reply(v: TokenValidation) -> (Status, Response) {
    match v {
        TokenValidation::Valid(t) => (Status::OK, ids(&t)),
        TokenValidation::Unknown => (
            not_found(),
            Response::empty(epr_events::ecap::RequestType::TokenValidation),
        ),
        TokenValidation::Refused(t) => (
            status(403, format!("the token is {}", t.status.as_str())),
            ids(&t),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epr_core::ids::{AppName, EndpointId, TokenHash, TokenId};
    use epr_core::Timestamp;

    fn token(status: TokenStatus) -> StoredToken {
        StoredToken {
            id: TokenId::parse("t-1").unwrap(),
            endpoint_id: EndpointId::parse("ep-1").unwrap(),
            app: AppName::parse("demo").unwrap(),
            hash: TokenHash([0; 32]),
            status,
            created: Timestamp(1),
            updated: None,
        }
    }

    #[test]
    fn validation_replies() {
        let with_ids = Response::TokenValidation {
            token_id: Some("t-1".into()),
            endpoint_id: Some("ep-1".into()),
        };
        assert_eq!(
            validation_reply(TokenValidation::Valid(token(TokenStatus::Active))),
            (Status::OK, with_ids.clone())
        );
        let (s, body) = validation_reply(TokenValidation::Unknown);
        assert_eq!(s.code, 404);
        assert_eq!(
            body,
            Response::TokenValidation {
                token_id: None,
                endpoint_id: None
            }
        );
        for st in [TokenStatus::Suspended, TokenStatus::Revoked] {
            let (s, body) = validation_reply(TokenValidation::Refused(token(st)));
            assert_eq!(s.code, 403);
            assert!(s.reason.unwrap().contains(st.as_str()));
            assert_eq!(body, with_ids);
        }
    }
}
