//! Kaa's Tekton as a source of applications and versions, per tenant.
//!
//! - **Read at start** for every tenant served (`GET {url}/api/v1/applications`). A tenant
//!   whose read fails starts with the last catalogue read for it, stored durably in the
//!   store (`tekton.catalogue.<tenant>`), and the log and `/health` say so; it is read again
//!   every few seconds until it succeeds.
//! - **Kept current** by 17/SCMP messages (the listener calls [`CatalogControl::refresh`]):
//!   the null pattern decides what is read again: everything, one tenant
//!   (`GET /applications`), one application (`GET /applications/{app}`, 404 = removed) or one
//!   version (`GET /applications/{app}/app-versions/{ver}`, 404 = removed). Upserts and
//!   deletes are read the same way: Tekton's answer is the truth.
//! - **Safety net**: a full read of every tenant every `kaa.tekton.refresh_secs`.
//! - **Authentication**: with authentication on, each call carries this service's token
//!   from the tenant's issuer (client credentials grant with `kaa.tekton.client_id`, else
//!   the Tenant Manager's client); a 401 gets one new token and one retry.
//!
//! Refreshes run one at a time on one task, so a tenant's entries change in message order;
//! queued messages are taken together (a full read covers any narrower one).

use crate::catalogue::{CatalogueSources, TektonEntries};
use epr_auth::{HttpClient, ServiceTokens};
use epr_core::apps::{CatalogControl, RefreshScope, SourceEntries};
use epr_core::auth::{TenantInfo, TenantSnapshot};
use epr_core::ids::{AppName, AppVersionName, TenantId};
use epr_core::ports::Store;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// `kaa.tekton.*`, with Kaa's names for the first two (`KAA_TEKTON_ENABLED`,
/// `KAA_TEKTON_URL` are read as well as `EPR__KAA__TEKTON__*`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TektonSettings {
    /// Read applications and versions from Tekton and follow its 17/SCMP updates.
    pub enabled: bool,
    /// Tekton's base URL; the REST API is under `/api/v1` (appended unless present).
    pub url: String,
    /// Full re-read of every tenant, in seconds (the safety net for lost messages).
    pub refresh_secs: u64,
    /// Timeout of one call to Tekton (or to an issuer for a token), in milliseconds.
    pub timeout_ms: u64,
    /// This service's client at the tenants' issuers; empty: `auth.tenant_manager`'s.
    pub client_id: String,
    pub client_secret: String,
}

impl Default for TektonSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "http://tekton".into(),
            refresh_secs: 300,
            timeout_ms: 5000,
            client_id: String::new(),
            client_secret: String::new(),
        }
    }
}

// By hand: the client secret must not reach a log through `{:?}`.
impl std::fmt::Debug for TektonSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TektonSettings")
            .field("enabled", &self.enabled)
            .field("url", &self.url)
            .field("refresh_secs", &self.refresh_secs)
            .field("timeout_ms", &self.timeout_ms)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &if self.client_secret.is_empty() {
                    ""
                } else {
                    "***"
                },
            )
            .finish()
    }
}

impl TektonSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            anyhow::bail!(
                "kaa.tekton.url '{}' must be an http:// or https:// URL",
                self.url
            );
        }
        if !(1..=86_400).contains(&self.refresh_secs) {
            anyhow::bail!("kaa.tekton.refresh_secs must be between 1 and 86400");
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            anyhow::bail!("kaa.tekton.timeout_ms must be between 100 and 60000");
        }
        Ok(())
    }

    /// The REST API's base: `{url}/api/v1`.
    pub fn api_base(&self) -> String {
        let url = self.url.trim_end_matches('/');
        if url.ends_with("/api/v1") {
            url.to_owned()
        } else {
            format!("{url}/api/v1")
        }
    }

    /// Kaa's own environment variables for the two documented keys.
    pub fn apply_kaa_env(&mut self) -> anyhow::Result<()> {
        if let Ok(v) = std::env::var("KAA_TEKTON_ENABLED") {
            self.enabled = match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" | "" => false,
                other => anyhow::bail!("KAA_TEKTON_ENABLED '{other}' is not true or false"),
            };
        }
        if let Ok(v) = std::env::var("KAA_TEKTON_URL") {
            self.url = v.trim().to_owned();
        }
        Ok(())
    }
}

/// The store key of a tenant's last Tekton catalogue.
pub fn setting_key(tenant: &TenantId) -> String {
    format!("tekton.catalogue.{tenant}")
}

/// Stored form: `{"applications": {app: [versions]}, "removed": {version: app},
/// "storedAt": ms}`.
fn to_stored(e: &TektonEntries) -> String {
    let apps: BTreeMap<&str, Vec<&str>> = e
        .entries
        .iter()
        .map(|(a, vs)| (a.as_str(), vs.iter().map(|v| v.as_str()).collect()))
        .collect();
    let removed: BTreeMap<&str, &str> = e
        .removed
        .iter()
        .map(|(v, a)| (v.as_str(), a.as_str()))
        .collect();
    json!({"applications": apps, "removed": removed, "storedAt": now_ms()}).to_string()
}

fn from_stored(raw: &str) -> Result<(TektonEntries, i64), String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let mut out = TektonEntries::default();
    let apps = v
        .get("applications")
        .and_then(Value::as_object)
        .ok_or("no applications object")?;
    for (app, versions) in apps {
        let app = AppName::parse(app).map_err(|e| e.message)?;
        let set = out.entries.entry(app).or_default();
        for ver in versions.as_array().into_iter().flatten() {
            let ver = ver.as_str().ok_or("a version is not a string")?;
            set.insert(AppVersionName::parse(ver).map_err(|e| e.message)?);
        }
    }
    if let Some(removed) = v.get("removed").and_then(Value::as_object) {
        for (ver, app) in removed {
            let app = app
                .as_str()
                .ok_or("a removed version's app is not a string")?;
            out.removed.insert(
                AppVersionName::parse(ver).map_err(|e| e.message)?,
                AppName::parse(app).map_err(|e| e.message)?,
            );
        }
    }
    Ok((out, v.get("storedAt").and_then(Value::as_i64).unwrap_or(0)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The list of an answer: a JSON array, or a page object with `content`.
fn items(v: &Value) -> Option<&Vec<Value>> {
    v.as_array()
        .or_else(|| v.get("content").and_then(Value::as_array))
}

/// A name: a string, or an object's `name`.
fn name_of(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("name").and_then(Value::as_str))
}

fn versions_of(app: &AppName, list: &[Value]) -> BTreeSet<AppVersionName> {
    let mut out = BTreeSet::new();
    for item in list {
        match name_of(item).map(AppVersionName::parse) {
            Some(Ok(v)) => {
                out.insert(v);
            }
            _ => tracing::warn!(application = %app, item = %item,
                "Tekton lists an application version this service cannot use; skipped"),
        }
    }
    out
}

/// Tekton's REST API for one tenant at a time.
struct Client {
    base: String,
    http: HttpClient,
    tokens: Option<ServiceTokens>,
}

impl Client {
    /// `None` for 404.
    async fn get(&self, tenant: &TenantInfo, path: &str) -> Result<Option<Value>, String> {
        let url = format!("{}{path}", self.base);
        for attempt in 0..2 {
            let issuer = tenant.issuer.as_deref();
            let bearer = match (&self.tokens, issuer) {
                (Some(t), Some(iss)) => Some(t.bearer(iss).await?),
                _ => None,
            };
            let a = self.http.get(&url, bearer.as_deref()).await?;
            if a.status == 401 && attempt == 0 && bearer.is_some() {
                if let (Some(t), Some(iss)) = (&self.tokens, issuer) {
                    t.forget(iss);
                }
                continue;
            }
            if a.status == 404 {
                return Ok(None);
            }
            if !(200..300).contains(&a.status) {
                return Err(format!("{url}: HTTP {}", a.status));
            }
            return a.json.map(Some);
        }
        Err(format!("{url}: HTTP 401 with a fresh service token"))
    }

    /// The versions of one application object; read from `/app-versions` when the object
    /// does not list them.
    async fn versions(
        &self,
        tenant: &TenantInfo,
        app: &AppName,
        obj: &Value,
    ) -> Result<BTreeSet<AppVersionName>, String> {
        if let Some(list) = obj.get("versions").and_then(Value::as_array) {
            return Ok(versions_of(app, list));
        }
        let path = format!("/applications/{app}/app-versions");
        match self.get(tenant, &path).await? {
            None => Ok(BTreeSet::new()),
            Some(v) => {
                let list = items(&v).ok_or_else(|| format!("{path}: not a list"))?;
                Ok(versions_of(app, list))
            }
        }
    }

    async fn applications(&self, tenant: &TenantInfo) -> Result<SourceEntries, String> {
        let v = self
            .get(tenant, "/applications")
            .await?
            .ok_or("/applications: HTTP 404")?;
        let list = items(&v).ok_or("/applications: not a list")?;
        let mut out = SourceEntries::new();
        for obj in list {
            let app = match name_of(obj).map(AppName::parse) {
                Some(Ok(a)) => a,
                _ => {
                    tracing::warn!(tenant = %tenant.id, item = %obj,
                        "Tekton lists an application this service cannot use; skipped");
                    continue;
                }
            };
            let versions = self.versions(tenant, &app, obj).await?;
            out.insert(app, versions);
        }
        Ok(out)
    }

    async fn application(
        &self,
        tenant: &TenantInfo,
        app: &AppName,
    ) -> Result<Option<BTreeSet<AppVersionName>>, String> {
        match self.get(tenant, &format!("/applications/{app}")).await? {
            None => Ok(None),
            Some(obj) => Ok(Some(self.versions(tenant, app, &obj).await?)),
        }
    }

    async fn version_exists(
        &self,
        tenant: &TenantInfo,
        app: &AppName,
        version: &AppVersionName,
    ) -> Result<bool, String> {
        let path = format!("/applications/{app}/app-versions/{version}");
        Ok(self.get(tenant, &path).await?.is_some())
    }
}

/// Where a tenant's Tekton entries come from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Read from Tekton (the last read may have failed since: see `last_error`).
    Tekton,
    /// The stored copy: Tekton has not answered since the start.
    Stored,
    /// Nothing: Tekton has not answered and nothing was stored.
    None,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Tekton => "tekton",
            Source::Stored => "stored",
            Source::None => "none",
        }
    }
}

struct TenantState {
    info: TenantInfo,
    entries: TektonEntries,
    source: Source,
    /// Last successful read, Unix ms.
    refreshed_at: Option<i64>,
    /// Set by a failed read, cleared by a successful full read; such tenants are read
    /// again every [`RETRY`].
    last_error: Option<String>,
}

/// A failed read is retried (as a full read of the tenant) this soon.
const RETRY: Duration = Duration::from_secs(5);

/// The Tekton source: its client, the tenants' entries, the refresh queue.
pub struct Tekton {
    client: Client,
    url: String,
    sources: Arc<CatalogueSources>,
    store: Arc<dyn Store>,
    tenants: watch::Receiver<Arc<TenantSnapshot>>,
    refresh_every: Duration,
    queue: mpsc::UnboundedSender<RefreshScope>,
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<RefreshScope>>>,
    state: Mutex<BTreeMap<TenantId, TenantState>>,
}

/// What the 17/SCMP listener calls: queues the scope for the refresh task.
pub struct TektonControl(mpsc::UnboundedSender<RefreshScope>);

impl CatalogControl for TektonControl {
    fn refresh(&self, scope: RefreshScope, _correlation_id: &str) {
        let _ = self.0.send(scope);
    }
}

impl Tekton {
    pub fn new(
        settings: &TektonSettings,
        auth: &epr_auth::AuthSettings,
        sources: Arc<CatalogueSources>,
        store: Arc<dyn Store>,
        tenants: watch::Receiver<Arc<TenantSnapshot>>,
    ) -> Arc<Self> {
        let http = HttpClient::new(Duration::from_millis(settings.timeout_ms));
        let (client_id, client_secret) = if settings.client_id.is_empty() {
            (
                &auth.tenant_manager.client_id,
                &auth.tenant_manager.client_secret,
            )
        } else {
            (&settings.client_id, &settings.client_secret)
        };
        let tokens = if auth.enabled() && !client_id.is_empty() {
            Some(ServiceTokens::new(http.clone(), client_id, client_secret))
        } else {
            if auth.enabled() {
                tracing::warn!(
                    "authentication is on but no client is set for Tekton \
                     (kaa.tekton.client_id or auth.tenant_manager.client_id): \
                     calls to Tekton carry no token"
                );
            }
            None
        };
        let (queue, rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            client: Client {
                base: settings.api_base(),
                http,
                tokens,
            },
            url: crate::summary::redact_urls(&settings.url),
            sources,
            store,
            tenants,
            refresh_every: Duration::from_secs(settings.refresh_secs),
            queue,
            queue_rx: Mutex::new(Some(rx)),
            state: Mutex::default(),
        })
    }

    /// For the 17/SCMP listener.
    pub fn control(&self) -> Arc<dyn CatalogControl> {
        Arc::new(TektonControl(self.queue.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<TenantId, TenantState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first read of every current tenant (concurrently); a tenant Tekton does not
    /// answer for starts with its stored catalogue.
    pub async fn start(&self) {
        let snapshot = self.tenants.borrow().clone();
        let reads = snapshot
            .tenants
            .values()
            .map(|t| self.first_read(t.clone()));
        futures_util::future::join_all(reads).await;
        self.gauges();
    }

    async fn first_read(&self, info: TenantInfo) {
        let tenant = info.id.clone();
        match self.client.applications(&info).await {
            Ok(entries) => {
                self.lock().insert(
                    tenant.clone(),
                    TenantState {
                        info,
                        entries: TektonEntries::default(),
                        source: Source::None,
                        refreshed_at: None,
                        last_error: None,
                    },
                );
                // The stored removed versions still count: keep them refused.
                let stored = self.stored(&tenant).await.map(|(e, _)| e);
                if let Some(s) = stored {
                    if let Some(st) = self.lock().get_mut(&tenant) {
                        st.entries = s;
                    }
                }
                self.apply(&tenant, entries).await;
            }
            Err(e) => {
                failure();
                let stored = self.stored(&tenant).await;
                let (entries, source) = match &stored {
                    Some((entries, at)) => {
                        tracing::warn!(tenant = %tenant, error = %e, stored_at_ms = at,
                            "Tekton is unreachable at start: using the application catalogue \
                             stored from an earlier read; retrying every {} s", RETRY.as_secs());
                        (entries.clone(), Source::Stored)
                    }
                    None => {
                        tracing::warn!(tenant = %tenant, error = %e,
                            "Tekton is unreachable at start and no catalogue of it is stored: \
                             only locally configured applications are known; retrying every {} s",
                            RETRY.as_secs());
                        (TektonEntries::default(), Source::None)
                    }
                };
                self.lock().insert(
                    tenant.clone(),
                    TenantState {
                        info,
                        entries: entries.clone(),
                        source,
                        refreshed_at: None,
                        last_error: Some(e),
                    },
                );
                self.sources.set_tekton(tenant, entries);
            }
        }
    }

    async fn stored(&self, tenant: &TenantId) -> Option<(TektonEntries, i64)> {
        match self.store.get_setting(&setting_key(tenant)).await {
            Ok(Some(raw)) => match from_stored(&raw) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, "the stored Tekton catalogue is unreadable; ignored");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "the stored Tekton catalogue could not be read");
                None
            }
        }
    }

    /// Makes `entries` the tenant's Tekton entries after a successful read: versions that
    /// disappear become removed ones; stored durably when anything changed.
    async fn apply(&self, tenant: &TenantId, entries: SourceEntries) {
        let next = {
            let mut state = self.lock();
            let Some(st) = state.get_mut(tenant) else {
                return;
            };
            let mut removed = st.entries.removed.clone();
            for (app, versions) in &st.entries.entries {
                for v in versions {
                    removed.insert(v.clone(), app.clone());
                }
            }
            removed.retain(|v, _| !entries.values().any(|vs| vs.contains(v)));
            let next = TektonEntries { entries, removed };
            st.source = Source::Tekton;
            st.refreshed_at = Some(now_ms());
            let changed = st.entries != next;
            st.entries = next.clone();
            (changed, next)
        };
        let (changed, next) = next;
        metrics::gauge!("epr_config_last_refresh_timestamp_seconds", "source" => "tekton")
            .set(now_ms() as f64 / 1000.0);
        if changed {
            // Applied even if storing fails: the store only serves the next start.
            if let Err(e) = self
                .store
                .put_setting(&setting_key(tenant), &to_stored(&next))
                .await
            {
                tracing::warn!(tenant = %tenant, error = %e, "the Tekton catalogue could not be stored");
            }
            tracing::info!(tenant = %tenant,
                applications = next.entries.len(),
                versions = next.entries.values().map(BTreeSet::len).sum::<usize>(),
                "application catalogue read from Tekton");
        }
        // A no-op when the sources hold these entries already.
        self.sources.set_tekton(tenant.clone(), next);
    }

    fn failed(&self, tenant: &TenantId, e: String) {
        failure();
        tracing::warn!(tenant = %tenant, error = %e,
            "reading Tekton failed; the tenant's catalogue is unchanged and is read again in {} s",
            RETRY.as_secs());
        if let Some(st) = self.lock().get_mut(tenant) {
            st.last_error = Some(e);
        }
    }

    fn info(&self, tenant: &TenantId) -> Option<TenantInfo> {
        self.lock().get(tenant).map(|s| s.info.clone())
    }

    async fn full(&self, tenant: &TenantId) {
        let Some(info) = self.info(tenant) else {
            return;
        };
        match self.client.applications(&info).await {
            Ok(entries) => {
                if let Some(st) = self.lock().get_mut(tenant) {
                    st.last_error = None;
                }
                self.apply(tenant, entries).await;
            }
            Err(e) => self.failed(tenant, e),
        }
    }

    async fn scoped(&self, scope: RefreshScope) {
        let Some(tenant) = scope.tenant().cloned() else {
            return;
        };
        let Some(info) = self.info(&tenant) else {
            return;
        };
        let current = || {
            self.lock()
                .get(&tenant)
                .map(|s| s.entries.entries.clone())
                .unwrap_or_default()
        };
        match scope {
            RefreshScope::App(_, app) => match self.client.application(&info, &app).await {
                Ok(found) => {
                    let mut next = current();
                    match found {
                        Some(vs) => next.insert(app, vs),
                        None => next.remove(&app),
                    };
                    self.apply(&tenant, next).await;
                }
                Err(e) => self.failed(&tenant, e),
            },
            RefreshScope::Version(_, app, version) => {
                match self.client.version_exists(&info, &app, &version).await {
                    Ok(exists) => {
                        let mut next = current();
                        if exists {
                            next.entry(app).or_default().insert(version);
                        } else if let Some(vs) = next.get_mut(&app) {
                            vs.remove(&version);
                        }
                        self.apply(&tenant, next).await;
                    }
                    Err(e) => self.failed(&tenant, e),
                }
            }
            RefreshScope::Tenant(_) | RefreshScope::All => self.full(&tenant).await,
        }
    }

    /// Handles queued scopes together: everything once if any asks for everything, else
    /// each tenant once in full if asked, else each narrower scope in order.
    async fn handle(&self, scopes: Vec<RefreshScope>) {
        if scopes.contains(&RefreshScope::All) {
            return self.all().await;
        }
        let whole: BTreeSet<TenantId> = scopes
            .iter()
            .filter_map(|s| match s {
                RefreshScope::Tenant(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        for t in &whole {
            self.full(t).await;
        }
        for s in scopes {
            if !s.tenant().is_some_and(|t| whole.contains(t)) {
                self.scoped(s).await;
            }
        }
        self.gauges();
    }

    async fn all(&self) {
        let tenants: Vec<TenantId> = self.lock().keys().cloned().collect();
        for t in tenants {
            self.full(&t).await;
        }
        self.gauges();
    }

    async fn retry_failed(&self) {
        let failed: Vec<TenantId> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.last_error.is_some())
            .map(|(t, _)| t.clone())
            .collect();
        for t in failed {
            self.full(&t).await;
        }
        self.gauges();
    }

    /// New tenants are read (stored copy if Tekton fails); gone ones are forgotten.
    async fn follow_tenants(&self) {
        let snapshot = self.tenants.borrow().clone();
        let gone: Vec<TenantId> = self
            .lock()
            .keys()
            .filter(|t| !snapshot.contains(t))
            .cloned()
            .collect();
        for t in gone {
            self.lock().remove(&t);
            self.sources.drop_tekton(&t);
        }
        let new: Vec<TenantInfo> = {
            let state = self.lock();
            snapshot
                .tenants
                .values()
                .filter(|t| !state.contains_key(&t.id))
                .cloned()
                .collect()
        };
        for info in new {
            self.first_read(info).await;
        }
        self.gauges();
    }

    fn gauges(&self) {
        let state = self.lock();
        for source in [Source::Tekton, Source::Stored, Source::None] {
            let n = state.values().filter(|s| s.source == source).count();
            metrics::gauge!("epr_config_source", "source" => source.as_str()).set(n as f64);
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(mut rx) = self
            .queue_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let mut tenants = self.tenants.clone();
        let start = tokio::time::Instant::now();
        let mut full = tokio::time::interval_at(start + self.refresh_every, self.refresh_every);
        let mut retry = tokio::time::interval_at(start + RETRY, RETRY);
        for i in [&mut full, &mut retry] {
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                // The guard `wait_for` returns is not `Send`: dropped inside.
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                Some(scope) = rx.recv() => {
                    let mut scopes = vec![scope];
                    while let Ok(s) = rx.try_recv() {
                        scopes.push(s);
                    }
                    self.handle(scopes).await;
                }
                _ = full.tick() => self.all().await,
                _ = retry.tick() => self.retry_failed().await,
                Ok(()) = tenants.changed() => self.follow_tenants().await,
            }
        }
    }

    /// For `/health`: per tenant, where its entries come from and the last error.
    pub fn health(&self) -> (&'static str, Value) {
        let state = self.lock();
        let tenants: serde_json::Map<String, Value> = state
            .iter()
            .map(|(t, s)| {
                (
                    t.to_string(),
                    json!({
                        "source": s.source.as_str(),
                        "refreshedAt": s.refreshed_at,
                        "lastError": s.last_error,
                    }),
                )
            })
            .collect();
        let up = state.values().all(|s| s.last_error.is_none());
        (
            if up { "UP" } else { "DOWN" },
            json!({"url": self.url, "tenants": tenants}),
        )
    }
}

fn failure() {
    metrics::counter!("epr_config_refresh_failures_total", "source" => "tekton").increment(1);
}

/// `/health` component `tekton` (informative, like NATS: the service runs on the last
/// known catalogue while Tekton is away).
pub struct TektonHealth(pub Arc<Tekton>);

impl epr_http::HealthComponent for TektonHealth {
    fn name(&self) -> &'static str {
        "tekton"
    }

    fn check(&self) -> epr_http::ComponentHealth {
        let (status, details) = self.0.health();
        epr_http::ComponentHealth { status, details }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips() {
        let mut e = TektonEntries::default();
        e.entries.insert(
            AppName::parse("demo").unwrap(),
            [AppVersionName::parse("demo-v1").unwrap()].into(),
        );
        e.entries
            .insert(AppName::parse("empty").unwrap(), BTreeSet::new());
        e.removed.insert(
            AppVersionName::parse("demo-v0").unwrap(),
            AppName::parse("demo").unwrap(),
        );
        let (back, at) = from_stored(&to_stored(&e)).unwrap();
        assert_eq!(back, e);
        assert!(at > 0);
        assert!(from_stored("{}").is_err());
    }

    #[test]
    fn api_base_and_answer_shapes() {
        let mut s = TektonSettings::default();
        assert_eq!(s.api_base(), "http://tekton/api/v1");
        s.url = "http://t:1/api/v1/".into();
        assert_eq!(s.api_base(), "http://t:1/api/v1");
        let page = json!({"content": [{"name": "a"}, "b"]});
        let names: Vec<_> = items(&page).unwrap().iter().filter_map(name_of).collect();
        assert_eq!(names, ["a", "b"]);
        let app = AppName::parse("a").unwrap();
        let vs = versions_of(&app, &[json!({"name": "a-v1"}), json!("a-v2"), json!(7)]);
        assert_eq!(vs.len(), 2);
    }
}
