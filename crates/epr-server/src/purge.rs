//! Deleting a removed tenant's data (`auth.removed_tenant_data: purge`).
//!
//! When a 21/TLE `unregistered` event removes a tenant, a background job deletes its saved
//! filters, then its endpoints, through `Registry` (so each deletion emits its 18/EFE
//! `deleted` or 9/ELCE `unregistered` event, published under the tenant's instance name), a
//! page at a time at a bounded rate, logging progress and a final count. It is idempotent:
//! running it again (after a restart, with `epr purge-tenant`) finishes the job. It stops
//! when the server shuts down, and if the tenant comes back meanwhile.
//!
//! Only an explicit 21/TLE `unregistered` starts it: a tenant missing from a Tenant Manager
//! listing (perhaps a broken answer) never destroys data.

use epr_auth::Auth;
use epr_core::auth::{TenantControl, TenantSnapshot};
use epr_core::ids::TenantId;
use epr_core::ports::StoreError;
use epr_core::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `auth.removed_tenant_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedTenantData {
    /// The data stays in the store, unreachable (no token of the tenant is accepted).
    Keep,
    /// The data is deleted in the background, with its events.
    Purge,
}

impl RemovedTenantData {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "keep" => Ok(Self::Keep),
            "purge" => Ok(Self::Purge),
            other => anyhow::bail!("auth.removed_tenant_data '{other}' must be 'keep' or 'purge'"),
        }
    }
}

/// How fast a purge deletes.
#[derive(Debug, Clone, Copy)]
pub struct PurgePace {
    /// Records deleted per step (committed together).
    pub page: usize,
    /// Most deletions per second, so live traffic keeps the store's writer.
    pub per_second: u32,
}

impl Default for PurgePace {
    fn default() -> Self {
        Self {
            page: 100,
            per_second: 500,
        }
    }
}

/// What a purge deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PurgeReport {
    pub filters_deleted: u64,
    pub endpoints_deleted: u64,
    /// `false`: stopped before the end (shutdown, or the tenant came back).
    pub complete: bool,
}

/// Deletes `tenant`'s filters and endpoints until none is left, `stop` is cancelled, or
/// `still_removed` says the tenant is back. A store failure is retried with back-off.
pub async fn purge_tenant(
    registry: &Registry,
    tenant: &TenantId,
    pace: PurgePace,
    stop: &CancellationToken,
    still_removed: impl Fn() -> bool,
) -> PurgeReport {
    let correlation_id = format!("purge-tenant-{tenant}");
    let mut report = PurgeReport::default();
    let mut last_log = Instant::now();
    let mut backoff = Duration::ZERO;
    tracing::info!(tenant = %tenant, "purging a removed tenant's filters and endpoints");
    loop {
        if stop.is_cancelled() {
            tracing::info!(tenant = %tenant, filters = report.filters_deleted,
                endpoints = report.endpoints_deleted,
                "tenant purge stopped by shutdown; `epr purge-tenant` finishes it");
            return report;
        }
        if !still_removed() {
            tracing::warn!(tenant = %tenant, filters = report.filters_deleted,
                endpoints = report.endpoints_deleted,
                "tenant purge stopped: the tenant is registered again");
            return report;
        }
        let started = Instant::now();
        match registry
            .purge_tenant_step(tenant, pace.page, &correlation_id)
            .await
        {
            Ok(step) if step.done => {
                report.complete = true;
                metrics::counter!("epr_tenant_purges_total").increment(1);
                tracing::info!(tenant = %tenant, filters = report.filters_deleted,
                    endpoints = report.endpoints_deleted, "tenant purge finished");
                return report;
            }
            Ok(step) => {
                backoff = Duration::ZERO;
                report.filters_deleted += step.filters_deleted;
                report.endpoints_deleted += step.endpoints_deleted;
                metrics::counter!("epr_tenant_purge_deleted_total", "kind" => "filter")
                    .increment(step.filters_deleted);
                metrics::counter!("epr_tenant_purge_deleted_total", "kind" => "endpoint")
                    .increment(step.endpoints_deleted);
                if last_log.elapsed() >= Duration::from_secs(10) {
                    last_log = Instant::now();
                    tracing::info!(tenant = %tenant, filters = report.filters_deleted,
                        endpoints = report.endpoints_deleted, "tenant purge in progress");
                }
                let n = (step.filters_deleted + step.endpoints_deleted).max(1);
                let budget = Duration::from_secs_f64(n as f64 / f64::from(pace.per_second.max(1)));
                let rest = budget.saturating_sub(started.elapsed());
                tokio::select! {
                    _ = tokio::time::sleep(rest) => {}
                    _ = stop.cancelled() => {}
                }
            }
            Err(e) => {
                backoff = (backoff * 2)
                    .max(Duration::from_millis(500))
                    .min(Duration::from_secs(30));
                let unavailable = matches!(e, StoreError::Unavailable(_));
                tracing::warn!(tenant = %tenant, error = %e, retry_in = ?backoff, unavailable,
                    "tenant purge step failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
    }
}

/// The purges running in the server, one per tenant at most.
pub struct PurgeJobs {
    registry: Arc<Registry>,
    tenants: watch::Receiver<Arc<TenantSnapshot>>,
    pace: PurgePace,
    stop: CancellationToken,
    running: Mutex<BTreeMap<TenantId, JoinHandle<PurgeReport>>>,
}

impl PurgeJobs {
    pub fn new(
        registry: Arc<Registry>,
        tenants: watch::Receiver<Arc<TenantSnapshot>>,
        pace: PurgePace,
    ) -> Self {
        Self {
            registry,
            tenants,
            pace,
            stop: CancellationToken::new(),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts purging `tenant` unless a purge of it is already running.
    pub fn start(&self, tenant: TenantId) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.get(&tenant).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let (registry, tenants, pace, stop) = (
            self.registry.clone(),
            self.tenants.clone(),
            self.pace,
            self.stop.clone(),
        );
        let id = tenant.clone();
        let task = tokio::spawn(async move {
            purge_tenant(&registry, &id, pace, &stop, || {
                !tenants.borrow().contains(&id)
            })
            .await
        });
        running.insert(tenant, task);
    }

    /// Stops every purge after its current step and waits for them.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let tasks: Vec<_> =
            std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// What 21/TLE events do in the server: the tenant directory (`Auth`) applies them, and an
/// unregistration starts a purge when `auth.removed_tenant_data` is `purge`.
pub struct ServerTenantControl {
    pub auth: Arc<Auth>,
    pub purge: Option<Arc<PurgeJobs>>,
}

impl TenantControl for ServerTenantControl {
    fn tenant_updated(&self, tenant: &str) {
        self.auth.tenant_updated(tenant);
    }

    fn tenant_unregistered(&self, tenant: &str) {
        self.auth.tenant_unregistered(tenant);
        if let Some(purge) = &self.purge {
            match TenantId::parse(tenant) {
                Ok(id) => purge.start(id),
                Err(e) => {
                    tracing::warn!(tenant, error = %e, "unregistered tenant has an invalid ID; nothing to purge")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epr_core::apps::AppCatalog;
    use epr_core::ports::Store;
    use epr_core::query::{EndpointQuery, PageRequest};
    use epr_core::registry::{FilterInput, RegisterInput};
    use epr_store::{EmbeddedConfig, EmbeddedStore};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn t(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    async fn count(registry: &Registry, tenant: &str) -> (u64, usize) {
        let page = PageRequest {
            offset: 0,
            limit: 1,
            after: None,
        };
        let eps = registry
            .list(&t(tenant), &EndpointQuery::default(), page)
            .await
            .unwrap()
            .total;
        let filters = registry
            .store()
            .export_filters(&t(tenant))
            .await
            .unwrap()
            .len();
        (eps, filters)
    }

    /// Interrupted after a step, a purge finishes when run again; the other tenant keeps
    /// everything.
    #[tokio::test]
    async fn an_interrupted_purge_finishes_when_run_again_and_spares_other_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap());
        let mut catalog = AppCatalog::new(false);
        catalog
            .add(
                epr_core::ids::AppName::parse("demo").unwrap(),
                epr_core::ids::AppVersionName::parse("demo-v1").unwrap(),
            )
            .unwrap();
        let registry = Registry::new(
            store.clone() as Arc<dyn Store>,
            catalog,
            Default::default(),
            Arc::new(crate::SystemClock),
            Arc::new(crate::UuidIds),
        );
        for tenant in ["gone", "kept"] {
            for i in 0..25 {
                let input = RegisterInput {
                    endpoint_id: Some(format!("ep-{i}")),
                    app_version: "demo-v1".into(),
                    ..Default::default()
                };
                registry.register(&t(tenant), input, "c").await.unwrap();
            }
            for name in ["f1", "f2", "f3"] {
                let input = FilterInput {
                    name: Some(name.into()),
                    description: None,
                    mongo_query: Some(serde_json::json!({"application_version": "demo-v1"})),
                };
                registry
                    .create_filter(&t(tenant), "demo", input, "c")
                    .await
                    .unwrap();
            }
        }
        let pace = PurgePace {
            page: 2,
            per_second: 100_000,
        };
        let stop = CancellationToken::new();
        // The tenant "comes back" after three steps.
        let checks = AtomicUsize::new(0);
        let first = purge_tenant(&registry, &t("gone"), pace, &stop, || {
            checks.fetch_add(1, Ordering::Relaxed) < 3
        })
        .await;
        assert!(!first.complete);
        assert_eq!((first.filters_deleted, first.endpoints_deleted), (3, 2));
        assert_eq!(count(&registry, "gone").await, (23, 0));
        let second = purge_tenant(&registry, &t("gone"), pace, &stop, || true).await;
        assert!(second.complete);
        assert_eq!((second.filters_deleted, second.endpoints_deleted), (0, 23));
        assert_eq!(count(&registry, "gone").await, (0, 0));
        assert_eq!(count(&registry, "kept").await, (25, 3));
        // Shutdown stops a purge before its next step.
        stop.cancel();
        let third = purge_tenant(&registry, &t("kept"), pace, &stop, || true).await;
        assert_eq!(third, PurgeReport::default());
        assert_eq!(count(&registry, "kept").await, (25, 3));
        store.shutdown().await;
    }

    #[test]
    fn removed_tenant_data_setting() {
        assert_eq!(
            RemovedTenantData::parse("keep").unwrap(),
            RemovedTenantData::Keep
        );
        assert_eq!(
            RemovedTenantData::parse("purge").unwrap(),
            RemovedTenantData::Purge
        );
        let err = RemovedTenantData::parse("delete").unwrap_err().to_string();
        assert!(err.contains("auth.removed_tenant_data") && err.contains("'keep' or 'purge'"));
    }
}
