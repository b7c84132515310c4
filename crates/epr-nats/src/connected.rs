//! The 9/ELCE `connected` listener: when a connected endpoint reports an application
//! version other than the stored one, the stored version is updated (which publishes
//! `appversion-updated` through the outbox). Unknown endpoints are logged and counted, never
//! created; a version removed from the catalogue is counted (`outcome="removed-version"`)
//! and ignored: the endpoint keeps its stored version.
//!
//! Subscribed in the instance's queue group, so each event is handled by one replica. Work is
//! spread over shards by endpoint ID: one endpoint's reports are applied in arrival order,
//! different endpoints in parallel (their writes share group commits).
//!
//! The event carries no tenant: its publisher's instance name (the subject's originator
//! token) picks it through `nats.connected_tenants`; an originator not listed there belongs
//! to the default tenant. An event whose tenant is not a current tenant is ignored
//! (counted as `epr_connected_events_ignored_total{reason="unknown-tenant"}`). Kaa's unmerged
//! `EndpointMeta {appVersion, tenantId}` map values are not decoded (such an event is
//! undecodable).

use crate::connection::{now_millis, Nats};
use crate::tenancy::Tenancy;
use epr_core::endpoint::Precondition;
use epr_core::ids::{AppVersionName, EndpointId, TenantId};
use epr_core::ports::StoreError;
use epr_core::registry::Registry;
use epr_core::DomainError;
use epr_events::connectivity::{connected_subject_wildcard, decode_connected};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone)]
pub struct ConnectedSettings {
    /// Parallel workers (each applies its endpoints' reports in order).
    pub shards: usize,
    /// The tenant of the events of each publisher instance (the subject's originator token);
    /// other publishers' events belong to the default tenant.
    pub tenants_by_originator: BTreeMap<String, TenantId>,
}

/// One endpoint's report from one `connected` event.
struct Report {
    tenant: Arc<TenantId>,
    endpoint_id: String,
    app_version: String,
    correlation_id: String,
}

fn count(outcome: &'static str) {
    metrics::counter!("epr_connected_endpoints_total", "outcome" => outcome).increment(1);
}

/// Listens until `stop` turns true, then finishes the reports already received.
pub async fn listen(
    nats: Nats,
    registry: Arc<Registry>,
    tenancy: Tenancy,
    settings: ConnectedSettings,
    mut stop: watch::Receiver<bool>,
) -> Result<(), async_nats::SubscribeError> {
    let mut sub = nats
        .client
        .queue_subscribe(
            connected_subject_wildcard().to_owned(),
            tenancy.naming.instance_name.clone(),
        )
        .await?;
    let by_originator: BTreeMap<String, Arc<TenantId>> = settings
        .tenants_by_originator
        .iter()
        .map(|(o, t)| (o.clone(), Arc::new(t.clone())))
        .collect();
    let default_tenant = Arc::new(tenancy.naming.default_tenant.clone());
    let shards = settings.shards.max(1);
    let mut senders = Vec::with_capacity(shards);
    let mut workers = Vec::with_capacity(shards);
    for _ in 0..shards {
        let (tx, rx) = mpsc::channel::<Report>(1024);
        senders.push(tx);
        workers.push(tokio::spawn(worker(rx, registry.clone())));
    }
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = stop.changed() => None,
        };
        let Some(msg) = msg else { break };
        let event = match decode_connected(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!("epr_connected_events_invalid_total").increment(1);
                tracing::warn!(subject = %msg.subject, error = %e, "undecodable 9/ELCE connected event ignored");
                continue;
            }
        };
        if event.timeout > 0 && event.timestamp.saturating_add(event.timeout) < now_millis() {
            metrics::counter!("epr_connected_events_expired_total").increment(1);
            tracing::info!(correlation_id = %event.correlation_id, "expired connected event dropped");
            continue;
        }
        let originator = msg.subject.split('.').nth(3).unwrap_or_default();
        let tenant = by_originator
            .get(originator)
            .unwrap_or(&default_tenant)
            .clone();
        if !tenancy.tenants.borrow().contains(&tenant) {
            metrics::counter!("epr_connected_events_ignored_total", "reason" => "unknown-tenant")
                .increment(1);
            if let Some(suppressed) = UNKNOWN_TENANT_LOG.admit(std::time::Instant::now()) {
                tracing::warn!(originator, tenant = %tenant, suppressed,
                    "connected event of a tenant that is not served ignored \
                     (see nats.connected_tenants)");
            }
            continue;
        }
        for (endpoint_id, app_version) in event.endpoints {
            let shard = shard_of(&endpoint_id, shards);
            let report = Report {
                tenant: tenant.clone(),
                endpoint_id,
                app_version,
                correlation_id: event.correlation_id.clone(),
            };
            // A full shard makes the subscription wait, and the client's buffer absorbs it.
            if senders[shard].send(report).await.is_err() {
                break;
            }
        }
    }
    drop(sub);
    drop(senders);
    for w in workers {
        let _ = w.await;
    }
    Ok(())
}

fn shard_of(id: &str, shards: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

async fn worker(mut rx: mpsc::Receiver<Report>, registry: Arc<Registry>) {
    while let Some(r) = rx.recv().await {
        let tenant = r.tenant.clone();
        apply(&registry, &tenant, r).await;
    }
}

/// Events of an unserved tenant may come on every connection: one line per interval.
static UNKNOWN_TENANT_LOG: epr_core::log_gate::LogGate =
    epr_core::log_gate::LogGate::new(epr_core::log_gate::DEFAULT_LOG_INTERVAL);

/// A store refusing writes fails every connected event: one line per interval (counted in
/// the `failed` outcome all the same).
static STORE_FAILURE_LOG: epr_core::log_gate::LogGate =
    epr_core::log_gate::LogGate::new(epr_core::log_gate::DEFAULT_LOG_INTERVAL);

fn log_store_failure(id: &EndpointId, e: &StoreError) {
    if let Some(suppressed) = STORE_FAILURE_LOG.admit(std::time::Instant::now()) {
        tracing::warn!(endpoint = %id, error = %e, suppressed, "connected event not applied");
    }
}

async fn apply(registry: &Registry, tenant: &TenantId, r: Report) {
    let Ok(id) = EndpointId::parse(&r.endpoint_id) else {
        count("unknown");
        tracing::info!(endpoint = %r.endpoint_id, "connected event names an invalid endpoint ID");
        return;
    };
    // A read first: most connections report the version already stored, and a read costs
    // far less than a write through the commit queue.
    match registry.get(tenant, &id).await {
        Ok(ep) if ep.app_version.as_str() == r.app_version => {
            count("unchanged");
            return;
        }
        Ok(_) => {}
        Err(StoreError::Rejected(DomainError::NotFound { .. })) => {
            count("unknown");
            tracing::info!(endpoint = %id, correlation_id = %r.correlation_id,
                "connected event for an unknown endpoint ignored");
            return;
        }
        Err(e) => {
            count("failed");
            log_store_failure(&id, &e);
            return;
        }
    }
    match registry
        .set_app_version(
            tenant,
            id.clone(),
            &r.app_version,
            Precondition::None,
            &r.correlation_id,
        )
        .await
    {
        Ok(_) => count("updated"),
        Err(StoreError::Rejected(DomainError::NotFound { .. })) => count("unknown"),
        // A version taken out of the catalogue: the endpoint keeps its stored version.
        Err(StoreError::Rejected(DomainError::Invalid(_)))
            if AppVersionName::parse(&r.app_version)
                .is_ok_and(|v| registry.catalog(tenant).is_removed(&v)) =>
        {
            count("removed-version");
            tracing::info!(endpoint = %id, app_version = %r.app_version,
                correlation_id = %r.correlation_id,
                "connected event reports a removed app version; ignored");
        }
        Err(StoreError::Rejected(e)) => {
            count("rejected");
            tracing::warn!(endpoint = %id, app_version = %r.app_version, error = %e,
                "connected event reports an app version that cannot be applied");
        }
        Err(e) => {
            count("failed");
            log_store_failure(&id, &e);
        }
    }
}
