//! The 19/EPMMP repository: answers metadata requests on
//! `kaa.v1.service.{instance}.epmmp.*-request`, in the instance's queue group so replicas
//! share the work; each tenant has its own instance name, and a request is served in that
//! tenant only (see [`crate::tenancy`]).
//!
//! The reply rules (drops, `400` for an undecodable request, metrics) are the shared
//! `crate::rpc` server's. Changes go through the same [`Registry`] use cases as REST, so they
//! emit 15/EME `metadata.updated` through the outbox like any other change.

use crate::connection::Nats;
use crate::rpc::{self, error_status, status, Protocol};
use crate::tenancy::Tenancy;
use epr_core::command::MetadataChange;
use epr_core::endpoint::Precondition;
use epr_core::ids::{EndpointId, TenantId};
use epr_core::metadata::MetadataKey;
use epr_core::ports::StoreError;
use epr_core::registry::Registry;
use epr_core::DomainError;
use epr_events::epmmp::{KeyUpdateCommand, Request, Response, Status};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct EpmmpSettings {
    /// Keys that requests may not create, change or delete (answered with 403).
    pub restricted_keys: BTreeSet<String>,
    /// Requests handled at once.
    pub max_in_flight: usize,
    /// Most endpoint IDs in one app-versions request (a bigger reply could exceed the NATS
    /// message size limit).
    pub max_endpoint_ids: usize,
}

/// A reply: status and body.
type Answer = (Status, Response);

/// Serves every current tenant of `tenancy` (each on its own instance name, see
/// [`crate::tenancy`]) until `stop` turns true, then stops taking requests and waits
/// (briefly) for the ones in flight.
pub async fn serve(
    nats: Nats,
    registry: Arc<Registry>,
    tenancy: Tenancy,
    settings: EpmmpSettings,
    stop: watch::Receiver<bool>,
) -> Result<(), async_nats::SubscribeError> {
    let max_in_flight = settings.max_in_flight;
    let handler = Handler { registry, settings };
    rpc::serve(nats, handler, tenancy, max_in_flight, stop).await
}

struct Handler {
    registry: Arc<Registry>,
    settings: EpmmpSettings,
}

impl Protocol for Handler {
    rpc::wire!("19/EPMMP", epmmp);

    async fn answer(&self, tenant: &TenantId, req: Request, corr: &str) -> Answer {
        self.reply(tenant, req, corr).await
    }
}

impl Handler {
    async fn reply(&self, tenant: &TenantId, req: Request, corr: &str) -> Answer {
        let on_error = error_body(&req);
        let result = match req {
            Request::MetadataGet {
                endpoint_id,
                include,
                include_metadata,
            } => {
                self.get(tenant, endpoint_id, include, include_metadata)
                    .await
            }
            Request::MetadataPatch {
                endpoint_id,
                if_match,
                patch,
            } => {
                self.patch(tenant, endpoint_id, if_match, &patch, corr)
                    .await
            }
            Request::KeyUpdate {
                endpoint_id,
                key,
                value,
            } => {
                let cmd = KeyUpdateCommand {
                    endpoint_id: endpoint_id.clone(),
                    key,
                    value,
                };
                self.key_update(tenant, &[cmd], corr)
                    .await
                    .map(|()| Response::KeyUpdate { endpoint_id })
            }
            Request::KeyBatchUpdate { commands } => self
                .key_update(tenant, &commands, corr)
                .await
                .map(|()| Response::KeyBatchUpdate),
            Request::KeysGet { endpoint_id } => self.keys(tenant, endpoint_id).await,
            Request::AppVersionsGet { endpoint_ids } => {
                self.app_versions(tenant, endpoint_ids).await
            }
        };
        match result {
            Ok(body) => (Status::OK, body),
            Err(s) => (s, on_error),
        }
    }

    fn endpoint_id(&self, raw: &str) -> Result<EndpointId, Status> {
        EndpointId::parse(raw).map_err(|e| status(400, e.at("endpointId").to_string()))
    }

    /// The endpoint a request names: 400 for a malformed ID, 404 for an unknown one.
    async fn endpoint(
        &self,
        tenant: &TenantId,
        raw: &str,
    ) -> Result<epr_core::endpoint::Endpoint, Status> {
        let id = self.endpoint_id(raw)?;
        self.registry
            .get(tenant, &id)
            .await
            .map_err(|e| error_status(&e))
    }

    async fn get(
        &self,
        tenant: &TenantId,
        endpoint_id: String,
        include: Vec<String>,
        include_metadata: bool,
    ) -> Result<Response, Status> {
        let ep = self.endpoint(tenant, &endpoint_id).await?;
        let payload = include_metadata.then(|| {
            let map = ep.metadata.as_map();
            let selected: serde_json::Map<String, Value> = if include.is_empty() {
                map.clone()
            } else {
                include
                    .iter()
                    .filter_map(|k| map.get(k).map(|v| (k.clone(), v.clone())))
                    .collect()
            };
            Value::Object(selected).to_string().into_bytes()
        });
        Ok(Response::MetadataGet {
            endpoint_id,
            e_tag: Some(ep.metadata_etag()),
            payload,
            app_version_name: Some(ep.app_version.to_string()),
        })
    }

    fn check_restricted(&self, key: &str) -> Result<(), Status> {
        if self.settings.restricted_keys.contains(key) {
            return Err(status(
                403,
                format!("metadata key '{key}' is restricted: it cannot be changed over 19/EPMMP"),
            ));
        }
        Ok(())
    }

    async fn patch(
        &self,
        tenant: &TenantId,
        endpoint_id: String,
        if_match: Option<String>,
        patch: &[u8],
        corr: &str,
    ) -> Result<Response, Status> {
        let id = self.endpoint_id(&endpoint_id)?;
        let patch: json_patch::Patch = serde_json::from_slice(patch).map_err(|e| {
            status(
                400,
                format!("patch: not an RFC 6902 JSON Patch document: {e}"),
            )
        })?;
        for op in &patch.0 {
            for key in touched_keys(op) {
                if key.is_empty() && !self.settings.restricted_keys.is_empty() {
                    // Metadata keys are never empty: "" is the whole document.
                    return Err(status(
                        403,
                        "the patch replaces the whole metadata document, which holds restricted keys",
                    ));
                }
                self.check_restricted(&key)?;
            }
        }
        let precondition = match if_match {
            None => Precondition::None,
            Some(tag) if tag.trim() == "*" => Precondition::Any,
            Some(tag) => Precondition::OneOf(vec![tag]),
        };
        self.registry
            .update_metadata(
                tenant,
                id,
                MetadataChange::JsonPatch(patch),
                precondition,
                corr,
            )
            .await
            .map_err(|e| error_status(&e))?;
        Ok(Response::MetadataPatch { endpoint_id })
    }

    /// Sets keys. All commands are validated first (a bad one refuses the whole request and
    /// changes nothing), and all endpoints must exist; then each endpoint's keys are set in
    /// one atomic change (one 15/EME event per endpoint).
    async fn key_update(
        &self,
        tenant: &TenantId,
        commands: &[KeyUpdateCommand],
        corr: &str,
    ) -> Result<(), Status> {
        let limits = self.registry.limits();
        let mut per_endpoint: BTreeMap<EndpointId, Vec<json_patch::PatchOperation>> =
            BTreeMap::new();
        for (i, c) in commands.iter().enumerate() {
            let at = |field: &str| {
                if commands.len() > 1 {
                    format!("commands[{i}].{field}")
                } else {
                    field.to_owned()
                }
            };
            let id = EndpointId::parse(&c.endpoint_id)
                .map_err(|e| status(400, e.at(at("endpointId")).to_string()))?;
            let key = MetadataKey::parse(&c.key, &limits)
                .map_err(|e| status(400, e.at(at("metadataKey")).to_string()))?;
            self.check_restricted(key.as_str())?;
            let value: Value = serde_json::from_slice(&c.value).map_err(|e| {
                status(
                    400,
                    format!("{}: must be UTF-8 JSON text: {e}", at("metadataValue")),
                )
            })?;
            let op = json_patch::PatchOperation::Add(json_patch::AddOperation {
                path: json_patch::jsonptr::PointerBuf::from_tokens([key.as_str()]),
                value,
            });
            per_endpoint.entry(id).or_default().push(op);
        }
        let mut missing = Vec::new();
        for id in per_endpoint.keys() {
            match self.registry.get(tenant, id).await {
                Ok(_) => {}
                Err(StoreError::Rejected(DomainError::NotFound { .. })) => {
                    missing.push(id.to_string())
                }
                Err(e) => return Err(error_status(&e)),
            }
        }
        if !missing.is_empty() {
            return Err(status(
                404,
                format!(
                    "endpoint(s) not found, nothing was changed: {}",
                    missing.join(", ")
                ),
            ));
        }
        let updates = per_endpoint.into_iter().map(|(id, ops)| {
            self.registry.update_metadata(
                tenant,
                id,
                MetadataChange::JsonPatch(json_patch::Patch(ops)),
                Precondition::None,
                corr,
            )
        });
        // Concurrently, so the store commits them together.
        for result in futures_util::future::join_all(updates).await {
            result.map_err(|e| error_status(&e))?;
        }
        Ok(())
    }

    async fn keys(&self, tenant: &TenantId, endpoint_id: String) -> Result<Response, Status> {
        let ep = self.endpoint(tenant, &endpoint_id).await?;
        Ok(Response::KeysGet {
            endpoint_id,
            keys: ep.metadata.as_map().keys().cloned().collect(),
        })
    }

    async fn app_versions(
        &self,
        tenant: &TenantId,
        endpoint_ids: Vec<String>,
    ) -> Result<Response, Status> {
        if endpoint_ids.len() > self.settings.max_endpoint_ids {
            return Err(status(
                400,
                format!(
                    "endpointIds: at most {} IDs per request, got {}",
                    self.settings.max_endpoint_ids,
                    endpoint_ids.len()
                ),
            ));
        }
        let mut by_version: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for raw in &endpoint_ids {
            // Unknown or malformed IDs are simply absent from the map; duplicates count once.
            let Ok(id) = EndpointId::parse(raw) else {
                continue;
            };
            if !seen.insert(id.clone()) {
                continue;
            }
            match self.registry.get(tenant, &id).await {
                Ok(ep) => by_version
                    .entry(ep.app_version.to_string())
                    .or_default()
                    .push(raw.clone()),
                Err(StoreError::Rejected(DomainError::NotFound { .. })) => {}
                Err(e) => return Err(error_status(&e)),
            }
        }
        Ok(Response::AppVersionsGet {
            endpoint_ids,
            app_versions_to_endpoints: by_version,
        })
    }
}

/// The body of an error reply: empty, but still naming what the request was about (its
/// endpoint, or the echoed endpoint IDs).
fn error_body(req: &Request) -> Response {
    match req {
        Request::MetadataGet { endpoint_id, .. } => Response::MetadataGet {
            endpoint_id: endpoint_id.clone(),
            e_tag: None,
            payload: None,
            app_version_name: None,
        },
        Request::MetadataPatch { endpoint_id, .. } => Response::MetadataPatch {
            endpoint_id: endpoint_id.clone(),
        },
        Request::KeyUpdate { endpoint_id, .. } => Response::KeyUpdate {
            endpoint_id: endpoint_id.clone(),
        },
        Request::KeyBatchUpdate { .. } => Response::KeyBatchUpdate,
        Request::KeysGet { endpoint_id } => Response::KeysGet {
            endpoint_id: endpoint_id.clone(),
            keys: Vec::new(),
        },
        Request::AppVersionsGet { endpoint_ids } => Response::AppVersionsGet {
            endpoint_ids: endpoint_ids.clone(),
            app_versions_to_endpoints: BTreeMap::new(),
        },
    }
}

/// The top-level metadata keys a JSON Patch operation creates, changes or removes (`test`
/// only reads). The root path `""` touches every key.
fn touched_keys(op: &json_patch::PatchOperation) -> Vec<String> {
    use json_patch::PatchOperation as Op;
    let first = |p: &json_patch::jsonptr::Pointer| -> Option<String> {
        p.tokens().next().map(|t| t.decoded().into_owned())
    };
    let mut out = Vec::new();
    let mut push = |p: &json_patch::jsonptr::Pointer| match first(p) {
        Some(k) => out.push(k),
        None => out.push(String::new()),
    };
    match op {
        Op::Add(o) => push(&o.path),
        Op::Remove(o) => push(&o.path),
        Op::Replace(o) => push(&o.path),
        Op::Move(o) => {
            push(&o.from);
            push(&o.path);
        }
        Op::Copy(o) => push(&o.path),
        Op::Test(_) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(op: Value) -> Vec<String> {
        let op: json_patch::PatchOperation = serde_json::from_value(op).unwrap();
        touched_keys(&op)
    }

    #[test]
    fn patch_operations_name_the_top_level_keys_they_change() {
        assert_eq!(
            keys(json!({"op": "add", "path": "/a/b/0", "value": 1})),
            ["a"]
        );
        assert_eq!(keys(json!({"op": "remove", "path": "/a~1b"})), ["a/b"]);
        assert_eq!(
            keys(json!({"op": "replace", "path": "/m~0n", "value": 1})),
            ["m~n"]
        );
        assert_eq!(
            keys(json!({"op": "move", "from": "/x", "path": "/y"})),
            ["x", "y"]
        );
        assert_eq!(
            keys(json!({"op": "copy", "from": "/x", "path": "/y"})),
            ["y"]
        );
        assert!(keys(json!({"op": "test", "path": "/x", "value": 1})).is_empty());
        // The root: the whole document.
        assert_eq!(
            keys(json!({"op": "replace", "path": "", "value": {}})),
            [""]
        );
    }
}
