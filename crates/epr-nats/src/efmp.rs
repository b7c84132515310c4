//! The 20/EFMP repository: answers endpoint filter requests on
//! `kaa.v1.service.{instance}.efmp.ep-filters-request` and `…efmp.ep-list-by-filter-request`,
//! in the instance's queue group so replicas share the work; each tenant has its own
//! instance name, and a request is served in that tenant only (see [`crate::tenancy`]). The
//! reply rules (drops, `400` for an undecodable request, metrics) are the shared
//! `crate::rpc` server's.
//!
//! - **ep-filters**: the *active* filters the endpoint matches (a pending filter's membership
//!   is incomplete); `404` for an unknown endpoint.
//! - **ep-list-by-filter**: app version → matching endpoints; `404` for an unknown filter,
//!   `409` while it is pending, and `413` with an empty map when the reply would exceed the
//!   connection's `max_payload`: the protocol has no paging, and a truncated list would look
//!   complete.

use crate::connection::{now_millis, Nats};
use crate::rpc::{self, error_status, status, Protocol};
use crate::tenancy::Tenancy;
use epr_core::endpoint_filter::{EndpointFilter, FilterId, FilterStatus};
use epr_core::ids::{AppVersionName, EndpointId, TenantId};
use epr_core::ports::StoreError;
use epr_core::registry::Registry;
use epr_core::DomainError;
use epr_events::efmp::{list_by_filter_response_size, Envelope, Request, Response, Status};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct EfmpSettings {
    /// Requests handled at once.
    pub max_in_flight: usize,
}

/// Serves every current tenant of `tenancy` (each on its own instance name, see
/// [`crate::tenancy`]) until `stop` turns true, then stops taking requests and waits
/// (briefly) for the ones in flight.
pub async fn serve(
    nats: Nats,
    registry: Arc<Registry>,
    tenancy: Tenancy,
    settings: EfmpSettings,
    stop: watch::Receiver<bool>,
) -> Result<(), async_nats::SubscribeError> {
    let handler = Handler {
        client: nats.client.clone(),
        registry,
    };
    rpc::serve(nats, handler, tenancy, settings.max_in_flight, stop).await
}

struct Handler {
    /// For the server's `max_payload`, which bounds a reply.
    client: async_nats::Client,
    registry: Arc<Registry>,
}

impl Protocol for Handler {
    rpc::wire!("20/EFMP", efmp);

    async fn answer(&self, tenant: &TenantId, req: Request, corr: &str) -> (Status, Response) {
        match req {
            Request::EndpointFilters { endpoint_id } => {
                match self.endpoint_filters(tenant, &endpoint_id).await {
                    Ok(filter_ids) => (
                        Status::OK,
                        Response::EndpointFilters {
                            endpoint_id,
                            filter_ids,
                        },
                    ),
                    Err(s) => (
                        s,
                        Response::EndpointFilters {
                            endpoint_id,
                            filter_ids: Vec::new(),
                        },
                    ),
                }
            }
            Request::ListByFilter { filter_id } => {
                let (status, map) = match self.list_by_filter(tenant, &filter_id, corr).await {
                    Ok(map) => (Status::OK, map),
                    Err(s) => (s, BTreeMap::new()),
                };
                (
                    status,
                    Response::ListByFilter {
                        filter_id,
                        app_versions_to_endpoints: map,
                    },
                )
            }
        }
    }
}

impl Handler {
    /// The active filters the endpoint matches: 400 for a malformed ID, 404 for an unknown
    /// endpoint.
    async fn endpoint_filters(&self, tenant: &TenantId, raw: &str) -> Result<Vec<String>, Status> {
        let id = EndpointId::parse(raw).map_err(|e| status(400, e.at("endpointId").to_string()))?;
        // An endpoint in no filter and an unknown endpoint both give an empty list; only the
        // endpoint read tells them apart.
        self.registry
            .get(tenant, &id)
            .await
            .map_err(|e| error_status(&e))?;
        let mut matched = self
            .registry
            .matched_filters(tenant, std::slice::from_ref(&id))
            .await
            .map_err(|e| error_status(&e))?;
        Ok(matched
            .remove(&id)
            .unwrap_or_default()
            .iter()
            .map(|f| f.as_str().to_owned())
            .collect())
    }

    /// The members of an active filter by app version, if the reply fits in one NATS message.
    async fn list_by_filter(
        &self,
        tenant: &TenantId,
        raw: &str,
        corr: &str,
    ) -> Result<BTreeMap<String, Vec<String>>, Status> {
        let id = FilterId::parse(raw).map_err(|e| status(400, e.at("filterId").to_string()))?;
        let store = self.registry.store();
        let before = self.active_filter(tenant, &id).await?;
        let members = store
            .filter_members(tenant, &id)
            .await
            .map_err(|e| error_status(&e))?;
        // The filter may have been changed (sent back to pending) or deleted while its
        // members were read; then they may belong to a half-built membership.
        let after = self.active_filter(tenant, &id).await?;
        if after.version != before.version {
            return Err(pending(&id));
        }
        let map = group_by_version(members);
        let reply = Envelope {
            correlation_id: corr.to_owned(),
            // The reply is stamped a moment later; a Unix-ms timestamp keeps its encoded
            // length (6 bytes until 2039), so the size is exact.
            timestamp: now_millis(),
            timeout: 0,
        };
        let size = list_by_filter_response_size(&reply, &Status::OK, raw, &map);
        check_size(&map, size, max_payload(&self.client))?;
        Ok(map)
    }

    /// The filter, if it exists and is active (404, 409 otherwise).
    async fn active_filter(
        &self,
        tenant: &TenantId,
        id: &FilterId,
    ) -> Result<EndpointFilter, Status> {
        let filter = self
            .registry
            .store()
            .get_filter(tenant, id)
            .await
            .map_err(|e| error_status(&e))?
            .ok_or_else(|| {
                error_status(&StoreError::Rejected(DomainError::not_found(
                    "endpoint filter",
                    id.as_str(),
                )))
            })?;
        if filter.status != FilterStatus::Active {
            return Err(pending(id));
        }
        Ok(filter)
    }
}

/// 409: listing by a pending filter would give an incomplete membership.
fn pending(id: &FilterId) -> Status {
    error_status(&StoreError::Rejected(DomainError::FilterPending {
        id: id.to_string(),
    }))
}

/// NATS's default `max_payload`, for a connection that has not received the server's `INFO`
/// yet (its limit then reads 0).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

fn max_payload(client: &async_nats::Client) -> usize {
    match client.server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD,
        n => n,
    }
}

/// Members (in registration order) grouped by app version; each list keeps that order.
fn group_by_version(members: Vec<(AppVersionName, EndpointId)>) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (version, endpoint) in members {
        map.entry(version.as_str().to_owned())
            .or_default()
            .push(endpoint.as_str().to_owned());
    }
    map
}

/// 413 when a reply of `size` bytes exceeds `limit`: NATS would refuse it, and 20/EFMP has
/// no paging, so the client learns how big the membership is instead of a truncated list.
fn check_size(
    map: &BTreeMap<String, Vec<String>>,
    size: usize,
    limit: usize,
) -> Result<(), Status> {
    if size <= limit {
        return Ok(());
    }
    let endpoints: usize = map.values().map(Vec::len).sum();
    Err(status(
        413,
        format!(
            "{endpoints} endpoints match the filter: the reply would be {size} bytes, more than \
             the NATS server's max_payload of {limit} bytes, and 20/EFMP has no paging (the \
             REST endpoint list by filterId pages)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(version: &str, id: &str) -> (AppVersionName, EndpointId) {
        (
            AppVersionName::parse(version).unwrap(),
            EndpointId::parse(id).unwrap(),
        )
    }

    #[test]
    fn members_are_grouped_by_version_in_their_order() {
        let map = group_by_version(vec![
            member("app-v2", "e3"),
            member("app-v1", "e1"),
            member("app-v2", "e2"),
        ]);
        assert_eq!(
            map,
            BTreeMap::from([
                ("app-v1".to_owned(), vec!["e1".to_owned()]),
                ("app-v2".to_owned(), vec!["e3".to_owned(), "e2".to_owned()]),
            ])
        );
        assert!(group_by_version(Vec::new()).is_empty());
    }

    #[test]
    fn a_reply_over_the_limit_is_refused_with_its_size() {
        let map = group_by_version(vec![member("app-v1", "e1"), member("app-v2", "e2")]);
        assert_eq!(check_size(&map, 100, 100), Ok(()));
        let s = check_size(&map, 101, 100).unwrap_err();
        assert_eq!(s.code, 413);
        let reason = s.reason.unwrap();
        assert!(reason.starts_with("2 endpoints match"), "{reason}");
        assert!(
            reason.contains("101 bytes") && reason.contains("100 bytes"),
            "{reason}"
        );
    }

    #[test]
    fn a_pending_filter_is_a_conflict() {
        let s = pending(&FilterId::parse("f-1").unwrap());
        assert_eq!(s.code, 409);
        assert!(s.reason.unwrap().contains("pending"));
    }
}
