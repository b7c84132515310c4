//! Authentication adapter: bearer JWTs checked against each tenant's OAuth 2.0 issuer.
//!
//! - [`AuthSettings`]: the `auth` configuration section.
//! - [`Auth`]: implements [`epr_core::auth::Authenticator`] (token → principal) and
//!   [`epr_core::auth::TenantControl`] (21/TLE notices); publishes the tenant set.
//!
//! Modules: `settings` (the section, validation), `jwks` (an issuer's keys), `verify`
//! (token checks), `cache` (verified tokens), `scopes` (claims → scopes), `directory`
//! (tenants and the unregistration rule), `tenant_manager` (Kaa's Tenant Manager client),
//! `service_token` (this service's client-credentials tokens per issuer, for Tekton),
//! `testkit` (feature `testkit`: loopback issuer, minter and Tenant Manager).

mod cache;
mod directory;
mod http;
mod jwks;
pub mod scopes;
mod service_token;
mod settings;
mod tenant_manager;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
#[cfg(test)]
mod tests;
mod verify;

pub use http::{Answer, HttpClient};
pub use service_token::ServiceTokens;
pub use settings::{
    AuthSettings, ScopeSettings, TenantManagerSettings, TenantSettings, ALGORITHMS,
};

use async_trait::async_trait;
use directory::{Directory, TenantSpec};
use epr_core::auth::{AuthError, Authenticator, Principal, TenantControl, TenantSnapshot};
use epr_core::ids::TenantId;
use futures_util::future::join_all;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tenant_manager::TenantManager;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use verify::Verifier;

/// How long a `tenant_updated` notice waits for others before the list is re-read, so a
/// burst of notices costs one read.
const TM_DEBOUNCE: Duration = Duration::from_millis(200);

/// After a failed Tenant Manager read, the next one comes this soon (or at the refresh
/// interval, if shorter).
const TM_RETRY: Duration = Duration::from_secs(5);

/// The authenticator and tenant directory.
pub struct Auth {
    settings: AuthSettings,
    /// `settings.enabled()`, settled once: asked on every request while authentication is
    /// off.
    enabled: bool,
    default_tenant: TenantId,
    tenants_tx: watch::Sender<Arc<TenantSnapshot>>,
    dir: Directory,
    verifier: Verifier,
    tm: Option<TenantManager>,
    /// `tenant_updated`: re-read the Tenant Manager now. Capacity 1: notices arriving
    /// while one is pending coalesce; the receiver is taken by [`Auth::run`].
    tm_wake_tx: mpsc::Sender<()>,
    tm_wake_rx: std::sync::Mutex<Option<mpsc::Receiver<()>>>,
    /// New issuers appeared: fetch their keys now.
    keys_wake: Notify,
    /// `epr_auth_tokens_total` per outcome (ok, invalid, unavailable). Registered on the
    /// first check, not per request: a labelled `counter!` looks its key up in the
    /// recorder's registry every time, a measurable share of a cached-token check. Not in
    /// `new`: the recorder may be installed after the `Auth` is built.
    outcomes: OnceLock<[metrics::Counter; 3]>,
}

impl Auth {
    /// Build from settings (validated). No I/O yet: [`Auth::run`] fetches.
    pub fn new(settings: AuthSettings, default_tenant: TenantId) -> Result<Arc<Auth>, String> {
        settings.validate()?;
        let http = http::HttpClient::new(Duration::from_millis(settings.http_timeout_ms));
        let mut config = Vec::new();
        for (i, t) in settings.tenants.iter().enumerate() {
            let id = TenantId::parse(&t.id).map_err(|e| format!("auth.tenants[{i}].id: {e}"))?;
            config.push(TenantSpec {
                id,
                issuer: t.issuer.clone(),
                audiences: if t.audiences.is_empty() {
                    settings.audiences.clone()
                } else {
                    t.audiences.clone()
                },
                jwks_uri: (!t.jwks_uri.is_empty()).then(|| t.jwks_uri.clone()),
            });
        }
        let accepted = settings.algorithm_list();
        let dir = Directory::new(
            config,
            accepted.clone(),
            Duration::from_secs(settings.jwks_min_refetch_secs),
        );
        let snapshot = if settings.enabled() {
            dir.snapshot()
        } else {
            TenantSnapshot::single(default_tenant.clone())
        };
        let (tenants_tx, _) = watch::channel(Arc::new(snapshot));
        let tm = (!settings.tenant_manager.url.is_empty())
            .then(|| TenantManager::new(&settings.tenant_manager, settings.audiences.clone()));
        let verifier = Verifier {
            accepted,
            leeway: settings.leeway_secs,
            mapper: scopes::ScopeMapper::new(&settings.scopes, settings.authorization),
            cache: cache::TokenCache::new(settings.token_cache_entries),
            http,
        };
        let (tm_wake_tx, tm_wake_rx) = mpsc::channel(1);
        Ok(Arc::new(Auth {
            enabled: settings.enabled(),
            settings,
            default_tenant,
            tenants_tx,
            dir,
            verifier,
            tm,
            tm_wake_tx,
            tm_wake_rx: std::sync::Mutex::new(Some(tm_wake_rx)),
            keys_wake: Notify::new(),
            outcomes: OnceLock::new(),
        }))
    }

    /// Background work until `shutdown`: the first tenant list and key fetch, periodic
    /// refreshes of tenants and keys.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.enabled {
            shutdown.cancelled().await;
            return;
        }
        tokio::join!(self.tenants_loop(&shutdown), self.keys_loop(&shutdown));
    }

    async fn tenants_loop(&self, shutdown: &CancellationToken) {
        let every = Duration::from_secs(self.settings.tenant_manager.refresh_secs);
        let mut wake = self.tm_wake_rx.lock().expect("wake lock").take();
        loop {
            let mut wait = every;
            if let Some(tm) = &self.tm {
                let started = self.dir.read_started();
                match tm.list(&self.verifier.http).await {
                    Ok(list) => {
                        self.dir.apply_tm(list, started);
                        self.publish();
                    }
                    // The last list stays: an outage of the Tenant Manager locks no one out.
                    // The next attempt comes sooner than the refresh interval.
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the Tenant Manager failed; the last tenant list is kept");
                        wait = every.min(TM_RETRY);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait), if self.tm.is_some() => {}
                Some(()) = async { match wake.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } } => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(TM_DEBOUNCE) => {}
                    }
                    // Notices of the burst that arrived meanwhile are served by this read.
                    if let Some(w) = wake.as_mut() {
                        while w.try_recv().is_ok() {}
                    }
                }
            }
        }
    }

    async fn keys_loop(&self, shutdown: &CancellationToken) {
        let every = Duration::from_secs(self.settings.jwks_refresh_secs);
        let mut next_full = tokio::time::Instant::now();
        loop {
            let full = tokio::time::Instant::now() >= next_full;
            if full {
                next_full = tokio::time::Instant::now() + every;
            }
            let issuers: Vec<_> = self
                .dir
                .issuers()
                .into_iter()
                .filter(|k| full || !k.ever_attempted())
                .collect();
            let http = &self.verifier.http;
            join_all(issuers.iter().map(|k| k.refresh(http))).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next_full) => {}
                _ = self.keys_wake.notified() => {}
            }
        }
    }

    /// Publish the directory's tenants if they changed.
    fn publish(&self) {
        let next = self.dir.snapshot();
        let count = next.tenants.len();
        let changed = self.tenants_tx.send_if_modified(|cur| {
            if **cur == next {
                return false;
            }
            *cur = Arc::new(next);
            true
        });
        if changed {
            metrics::gauge!("epr_auth_tenants").set(count as f64);
            tracing::info!(tenants = count, "tenant list changed");
            self.keys_wake.notify_one();
        }
    }

    /// The current tenants, updated whenever they change.
    pub fn tenants(&self) -> watch::Receiver<Arc<TenantSnapshot>> {
        self.tenants_tx.subscribe()
    }

    /// For readiness: `UP`, `DOWN` or `DISABLED`, and details (issuers and their key fetch
    /// state, Tenant Manager state). `DOWN` while no tenant can be served: the Tenant
    /// Manager never answered and no tenant is configured, or no issuer's keys were ever
    /// loaded. One issuer without keys answers 503 for its tenant only; it shows here.
    pub fn health(&self) -> (&'static str, serde_json::Value) {
        if !self.enabled {
            return ("DISABLED", serde_json::json!({}));
        }
        let issuers = self.dir.issuers();
        let any_loaded = issuers.iter().any(|k| k.is_loaded());
        let tm_ok =
            self.tm.as_ref().is_none_or(|t| t.ever_read()) || !self.settings.tenants.is_empty();
        let status = if tm_ok && any_loaded { "UP" } else { "DOWN" };
        let details = serde_json::json!({
            "tenants": self.dir.state().by_id.len(),
            "issuers": issuers.iter().map(|k| k.health()).collect::<Vec<_>>(),
            "tenant_manager": self.tm.as_ref().map(|t| t.health()),
            "token_cache_entries": self.verifier.cache.len(),
        });
        (status, details)
    }
}

#[async_trait]
impl Authenticator for Auth {
    fn enabled(&self) -> bool {
        self.enabled
    }

    async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        if !self.enabled {
            return Ok(Arc::new(Principal::anonymous(self.default_tenant.clone())));
        }
        let r = self.verifier.authenticate(&self.dir, token).await;
        let outcome = match &r {
            Ok(_) => 0,
            Err(AuthError::Unavailable(_)) => 2,
            Err(_) => 1,
        };
        let counters = self.outcomes.get_or_init(|| {
            ["ok", "invalid", "unavailable"]
                .map(|o| metrics::counter!("epr_auth_tokens_total", "outcome" => o))
        });
        counters[outcome].increment(1);
        r
    }
}

impl TenantControl for Auth {
    fn tenant_updated(&self, tenant: &str) {
        if let Ok(id) = TenantId::parse(tenant) {
            self.dir.updated(&id);
            self.publish();
        }
        // Full: a re-read is pending already.
        let _ = self.tm_wake_tx.try_send(());
    }

    fn tenant_unregistered(&self, tenant: &str) {
        let Ok(id) = TenantId::parse(tenant) else {
            tracing::warn!(
                tenant,
                "a tenant unregistered notice names an invalid tenant id; ignored"
            );
            return;
        };
        tracing::info!(tenant = %id, "tenant unregistered: its tokens are refused from now on");
        self.dir.unregister(id);
        self.publish();
    }
}
