//! The use cases. Front-ends (REST now, NATS later) parse their wire format, call these, and
//! map the results back; every rule lives here or in [`crate::command::plan`].

mod credentials;
mod self_registration;

pub use credentials::{IssuedToken, TokenValidation};
pub use self_registration::{
    ClaimInput, CreatedClaim, SelfRegisterInput, SelfRegistered, CLAIM_COUNT_MAX,
    CLAIM_TTL_DEFAULT_SECS, CLAIM_TTL_MAX_SECS,
};

use crate::apps::AppCatalog;
use crate::command::{Command, Effect, MetadataChange, Registration, WriteCtx};
use crate::endpoint::{Endpoint, Precondition};
use crate::endpoint_filter::{
    EndpointFilter, FilterCommand, FilterId, FilterPatch, FilterSpec, FilterStatus,
};
use crate::ids::{AppName, AppVersionName, EndpointId, EndpointToken, TenantId, TokenId};
use crate::metadata::{Limits, Metadata};
use crate::ports::{BatchItem, BatchOutcome, BatchRequest, Clock, IdSource, Store, StoreError};
use crate::query::{EndpointQuery, Page, PageRequest};
use crate::{DomainError, Timestamp, ValidationError};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

/// The error of every use case: refused by the rules, or the store failed.
pub type Error = StoreError;

/// A registration request as received, before validation.
#[derive(Debug, Clone, Default)]
pub struct RegisterInput {
    pub endpoint_id: Option<String>,
    pub app_version: String,
    pub metadata: Option<Value>,
    pub token: Option<String>,
}

/// A filter definition as received (create: `name` and `mongoQuery` required; update: any
/// subset).
#[derive(Debug, Clone, Default)]
pub struct FilterInput {
    pub name: Option<String>,
    pub description: Option<String>,
    /// A JSON object, or a string holding one.
    pub mongo_query: Option<Value>,
}

/// A registered endpoint and its initial token, which is returned once and never stored in
/// plain text.
#[derive(Debug, Clone)]
pub struct Registered {
    pub endpoint: Endpoint,
    pub token: String,
}

/// One item of a batch registration request.
#[derive(Debug, Clone, Default)]
pub struct BatchInput {
    pub endpoint_id: Option<String>,
    pub metadata: Option<Value>,
    pub token: Option<String>,
}

/// A batch outcome with the tokens of its items, while they are still held in memory.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub outcome: BatchOutcome,
    /// Token of each request item by index; `None` after a restart or once the retention
    /// window has passed, since tokens are never persisted in plain text.
    pub tokens: Option<Vec<Option<String>>>,
}

/// Settings of the registry that come from configuration.
#[derive(Debug, Clone, Copy)]
pub struct RegistrySettings {
    pub limits: Limits,
    pub batch_max_items: usize,
    /// How long batch tokens stay available to the status call, in milliseconds.
    pub batch_token_retention_ms: i64,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            batch_max_items: 1000,
            batch_token_retention_ms: 3_600_000,
        }
    }
}

/// What one [`Registry::purge_tenant_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeStep {
    pub filters_deleted: u64,
    pub endpoints_deleted: u64,
    /// Nothing of the tenant was left to delete.
    pub done: bool,
}

type BatchTokens = HashMap<(TenantId, String), (Timestamp, Vec<Option<String>>)>;

/// The application catalogues in effect: one per tenant that has entries of its own
/// (from Tekton), the shared one (file and environment) for every other tenant.
#[derive(Debug, Clone, Default)]
pub struct Catalogs {
    pub shared: Arc<AppCatalog>,
    pub tenants: HashMap<TenantId, Arc<AppCatalog>>,
}

impl Catalogs {
    pub fn of(&self, tenant: &TenantId) -> &Arc<AppCatalog> {
        self.tenants.get(tenant).unwrap_or(&self.shared)
    }
}

pub struct Registry {
    store: Arc<dyn Store>,
    /// Swapped whole on reload; readers clone the `Arc` under a lock held for nanoseconds
    /// (a std lock: the hot path never awaits it).
    catalogs: RwLock<Arc<Catalogs>>,
    settings: RwLock<RegistrySettings>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdSource>,
    batch_tokens: Mutex<BatchTokens>,
    /// Parsed self-registration policies by (tenant, application), with the stored text, the
    /// limits they were parsed under and when the text was read. A policy is parsed (and its
    /// patterns compiled) only when its text changed; device requests reuse a text read less
    /// than `self_registration::POLICY_MAX_AGE_MS` ago, operator requests always read it.
    /// This replica's own policy writes drop the entry at once; another replica's are seen
    /// within that age.
    policies: Mutex<PolicyCache>,
}

type PolicyCache = HashMap<
    (TenantId, AppName),
    (
        String,
        Limits,
        Arc<crate::self_registration::Policy>,
        Timestamp,
    ),
>;

impl Registry {
    pub fn new(
        store: Arc<dyn Store>,
        catalog: AppCatalog,
        settings: RegistrySettings,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn IdSource>,
    ) -> Self {
        Self {
            store,
            catalogs: RwLock::new(Arc::new(Catalogs {
                shared: Arc::new(catalog),
                tenants: HashMap::new(),
            })),
            settings: RwLock::new(settings),
            clock,
            ids,
            batch_tokens: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
        }
    }

    /// The settings in effect (they may be reloaded at run time).
    pub fn settings(&self) -> RegistrySettings {
        *self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the settings (configuration reload); requests already running keep the
    /// ones they started with.
    pub fn set_settings(&self, settings: RegistrySettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    pub fn limits(&self) -> Limits {
        self.settings().limits
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The catalogue in effect for `tenant`.
    pub fn catalog(&self, tenant: &TenantId) -> Arc<AppCatalog> {
        self.catalogs().of(tenant).clone()
    }

    /// Every catalogue in effect.
    pub fn catalogs(&self) -> Arc<Catalogs> {
        self.catalogs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the shared catalogue, keeping no tenant's own (tools and tests).
    pub fn set_catalog(&self, catalog: AppCatalog) {
        self.set_catalogs(Catalogs {
            shared: Arc::new(catalog),
            tenants: HashMap::new(),
        });
    }

    /// Replaces every catalogue at once (configuration reload, Tekton refresh).
    pub fn set_catalogs(&self, catalogs: Catalogs) {
        *self.catalogs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(catalogs);
    }

    fn ctx(&self, tenant: &TenantId, correlation_id: &str) -> WriteCtx {
        WriteCtx {
            tenant: tenant.clone(),
            now: self.clock.now(),
            correlation_id: correlation_id.to_owned(),
            limits: self.limits(),
        }
    }

    fn resolve_version(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<(AppName, AppVersionName), DomainError> {
        let version = AppVersionName::parse(name)?;
        let app = self.catalog(tenant).resolve(&version)?;
        Ok((app, version))
    }

    /// Validates one registration; field names follow Kaa's JSON (`endpointId`, ...).
    fn registration(
        &self,
        app: &AppName,
        app_version: &AppVersionName,
        endpoint_id: Option<&str>,
        metadata: Option<Value>,
        token: Option<&str>,
    ) -> Result<(Registration, String), DomainError> {
        let id = match endpoint_id {
            Some(id) => EndpointId::parse(id)?,
            None => EndpointId::parse(&self.ids.endpoint_id())?,
        };
        let token = match token {
            Some(t) => EndpointToken::parse(t)?,
            None => EndpointToken::parse(&self.ids.token())?,
        };
        let metadata = match metadata {
            None => Metadata::empty(),
            Some(v) => Metadata::parse(v, "metadata", &self.limits())?,
        };
        let reg = Registration {
            id,
            app: app.clone(),
            app_version: app_version.clone(),
            metadata,
            token_hash: token.hash(app),
            token_id: TokenId::parse(&self.ids.token_id())?,
        };
        Ok((reg, token.into_string()))
    }

    pub async fn register(
        &self,
        tenant: &TenantId,
        input: RegisterInput,
        correlation_id: &str,
    ) -> Result<Registered, Error> {
        let (app, version) = self.resolve_version(tenant, &input.app_version)?;
        let (reg, token) = self.registration(
            &app,
            &version,
            input.endpoint_id.as_deref(),
            input.metadata,
            input.token.as_deref(),
        )?;
        let effect = self
            .store
            .execute(Command::Register(reg), self.ctx(tenant, correlation_id))
            .await?;
        Ok(Registered {
            endpoint: effect.endpoint().clone(),
            token,
        })
    }

    pub async fn get(&self, tenant: &TenantId, id: &EndpointId) -> Result<Endpoint, Error> {
        self.store
            .get(tenant, id)
            .await?
            .ok_or_else(|| DomainError::not_found("endpoint", id.as_str()).into())
    }

    /// Lists endpoints. With a filter, the filter must exist (in the queried application,
    /// when one is given) and be active: a pending filter's membership is incomplete.
    pub async fn list(
        &self,
        tenant: &TenantId,
        query: &EndpointQuery,
        page: PageRequest,
    ) -> Result<Page<Endpoint>, Error> {
        if let Some(id) = &query.filter {
            let filter = self
                .store
                .get_filter(tenant, id)
                .await?
                .filter(|f| query.app.as_ref().is_none_or(|a| *a == f.app))
                .ok_or_else(|| DomainError::not_found("endpoint filter", id.as_str()))?;
            if filter.status != FilterStatus::Active {
                return Err(DomainError::FilterPending { id: id.to_string() }.into());
            }
        }
        self.store.list(tenant, query, page).await
    }

    /// The active filters each endpoint matches (`include=filters`).
    pub async fn matched_filters(
        &self,
        tenant: &TenantId,
        endpoints: &[EndpointId],
    ) -> Result<BTreeMap<EndpointId, Vec<FilterId>>, Error> {
        if endpoints.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.store.matched_filters(tenant, endpoints).await
    }

    fn check_app(&self, tenant: &TenantId, app: &str) -> Result<AppName, DomainError> {
        let app = AppName::parse(app)?;
        let catalog = self.catalog(tenant);
        if !catalog.allows_unknown() && !catalog.knows_app(&app) {
            return Err(DomainError::not_found("application", app.as_str()));
        }
        Ok(app)
    }

    /// Creates a filter in an application; it starts `pending` while its back-fill runs.
    pub async fn create_filter(
        &self,
        tenant: &TenantId,
        app: &str,
        input: FilterInput,
        correlation_id: &str,
    ) -> Result<EndpointFilter, Error> {
        let app = self.check_app(tenant, app)?;
        let query = input.mongo_query.ok_or_else(|| {
            DomainError::from(ValidationError::new(
                "mongoQuery",
                "required",
                "a filter needs a mongoQuery",
            ))
        })?;
        let name = input.name.ok_or_else(|| {
            DomainError::from(ValidationError::new(
                "name",
                "required",
                "a filter needs a name",
            ))
        })?;
        let spec = FilterSpec::parse(&name, input.description.as_deref().unwrap_or(""), &query)?;
        let id = FilterId::parse(&self.ids.filter_id())?;
        let cmd = FilterCommand::Create { id, app, spec };
        self.store
            .execute_filter(cmd, self.ctx(tenant, correlation_id))
            .await
    }

    /// One filter of an application.
    pub async fn get_filter(
        &self,
        tenant: &TenantId,
        app: &str,
        id: &str,
    ) -> Result<EndpointFilter, Error> {
        let app = AppName::parse(app)?;
        let id = FilterId::parse(id)?;
        self.store
            .get_filter(tenant, &id)
            .await?
            .filter(|f| f.app == app)
            .ok_or_else(|| DomainError::not_found("endpoint filter", id.as_str()).into())
    }

    pub async fn list_filters(
        &self,
        tenant: &TenantId,
        app: &str,
        name: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<EndpointFilter>, Error> {
        let app = AppName::parse(app)?;
        self.store.list_filters(tenant, &app, name, page).await
    }

    /// Changes a filter's name, description and/or query. A new query sends it back to
    /// `pending` and rebuilds its membership.
    pub async fn update_filter(
        &self,
        tenant: &TenantId,
        app: &str,
        id: &str,
        input: FilterInput,
        precondition: Precondition,
        correlation_id: &str,
    ) -> Result<EndpointFilter, Error> {
        let app = AppName::parse(app)?;
        let id = FilterId::parse(id)?;
        let patch = FilterPatch::parse(
            input.name.as_deref(),
            input.description.as_deref(),
            input.mongo_query.as_ref(),
        )?;
        let cmd = FilterCommand::Update {
            id,
            app,
            patch,
            precondition,
        };
        self.store
            .execute_filter(cmd, self.ctx(tenant, correlation_id))
            .await
    }

    pub async fn delete_filter(
        &self,
        tenant: &TenantId,
        app: &str,
        id: &str,
        precondition: Precondition,
        correlation_id: &str,
    ) -> Result<EndpointFilter, Error> {
        let app = AppName::parse(app)?;
        let id = FilterId::parse(id)?;
        let cmd = FilterCommand::Delete {
            id,
            app,
            precondition,
        };
        self.store
            .execute_filter(cmd, self.ctx(tenant, correlation_id))
            .await
    }

    pub async fn unregister(
        &self,
        tenant: &TenantId,
        id: EndpointId,
        precondition: Precondition,
        correlation_id: &str,
    ) -> Result<Endpoint, Error> {
        let cmd = Command::Unregister { id, precondition };
        let effect = self
            .store
            .execute(cmd, self.ctx(tenant, correlation_id))
            .await?;
        Ok(effect.endpoint().clone())
    }

    pub async fn set_app_version(
        &self,
        tenant: &TenantId,
        id: EndpointId,
        app_version: &str,
        precondition: Precondition,
        correlation_id: &str,
    ) -> Result<Endpoint, Error> {
        let version =
            AppVersionName::parse(app_version).map_err(|e| DomainError::from(e.at("name")))?;
        let app = self
            .catalog(tenant)
            .resolve(&version)
            .map_err(|e| match e {
                DomainError::Invalid(v) => DomainError::Invalid(v.at("name")),
                other => other,
            })?;
        let cmd = Command::SetAppVersion {
            id,
            app,
            app_version: version,
            precondition,
        };
        let effect = self
            .store
            .execute(cmd, self.ctx(tenant, correlation_id))
            .await?;
        Ok(effect.endpoint().clone())
    }

    pub async fn update_metadata(
        &self,
        tenant: &TenantId,
        id: EndpointId,
        change: MetadataChange,
        precondition: Precondition,
        correlation_id: &str,
    ) -> Result<Effect, Error> {
        let cmd = Command::UpdateMetadata {
            id,
            change,
            precondition,
        };
        self.store
            .execute(cmd, self.ctx(tenant, correlation_id))
            .await
    }

    pub async fn metadata_keys(
        &self,
        tenant: &TenantId,
        app: &AppName,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, Error> {
        self.store.metadata_keys(tenant, app).await
    }

    /// Registers up to `batch_max_items` endpoints into one application version. A refused
    /// request (unknown version, too many items) is an error; refused items are reported in
    /// the outcome. Returns the task ID.
    pub async fn register_batch(
        &self,
        tenant: &TenantId,
        app_version: &str,
        inputs: Vec<BatchInput>,
        correlation_id: &str,
    ) -> Result<BatchReport, Error> {
        let (app, version) = self.resolve_version(tenant, app_version)?;
        let batch_max_items = self.settings().batch_max_items;
        if inputs.is_empty() || inputs.len() > batch_max_items {
            return Err(DomainError::from(ValidationError::new(
                "endpoints",
                "batch-size",
                format!(
                    "a batch holds 1 to {} endpoints, this one holds {}",
                    batch_max_items,
                    inputs.len()
                ),
            ))
            .into());
        }
        let mut tokens = Vec::with_capacity(inputs.len());
        let mut generated = Vec::with_capacity(inputs.len());
        let mut items = Vec::with_capacity(inputs.len());
        for input in inputs {
            generated.push(input.token.is_none());
            let metadata_text = input
                .metadata
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_else(|| "{}".to_owned());
            let given_id = input.endpoint_id.clone();
            match self.registration(
                &app,
                &version,
                input.endpoint_id.as_deref(),
                input.metadata,
                input.token.as_deref(),
            ) {
                Ok((reg, token)) => {
                    tokens.push(Some(token));
                    items.push(BatchItem {
                        endpoint_id: Some(reg.id.to_string()),
                        registration: Ok(reg),
                        metadata_text,
                    });
                }
                Err(e) => {
                    tokens.push(input.token);
                    items.push(BatchItem {
                        endpoint_id: given_id,
                        registration: Err(e.to_string()),
                        metadata_text,
                    });
                }
            }
        }
        let task_id = self.ids.task_id();
        let request = BatchRequest {
            task_id: task_id.clone(),
            app,
            items,
        };
        let ctx = self.ctx(tenant, correlation_id);
        let now = ctx.now;
        let outcome = self.store.register_batch(request, ctx).await?;
        // A generated token of an item that was not registered was never issued.
        for f in &outcome.failed {
            if generated[f.index] {
                tokens[f.index] = None;
            }
        }
        let mut held = self.batch_tokens.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, (expires, _)| *expires > now);
        held.insert(
            (tenant.clone(), task_id),
            (
                Timestamp(now.0 + self.settings().batch_token_retention_ms),
                tokens.clone(),
            ),
        );
        Ok(BatchReport {
            outcome,
            tokens: Some(tokens),
        })
    }

    /// One step of deleting a removed tenant's data: up to `limit` of its saved filters or,
    /// once none is left, up to `limit` of its endpoints, each through the ordinary delete
    /// use case, so every deletion emits its events (18/EFE `deleted`, 9/ELCE
    /// `unregistered`). Filters go first, so unregistering the endpoints emits no
    /// `ep-unmatched` events. Idempotent: call until [`PurgeStep::done`]; something deleted
    /// meanwhile by someone else is skipped. The caller paces the steps.
    pub async fn purge_tenant_step(
        &self,
        tenant: &TenantId,
        limit: usize,
        correlation_id: &str,
    ) -> Result<PurgeStep, Error> {
        let limit = limit.max(1);
        let filters = self.store.export_filters(tenant).await?;
        if !filters.is_empty() {
            let deletions = filters.iter().take(limit).map(|f| {
                let cmd = FilterCommand::Delete {
                    id: f.id.clone(),
                    app: f.app.clone(),
                    precondition: Precondition::None,
                };
                // Concurrently, so the store commits them together.
                self.store
                    .execute_filter(cmd, self.ctx(tenant, correlation_id))
            });
            let deleted = count_deleted(futures_util::future::join_all(deletions).await)?;
            return Ok(PurgeStep {
                filters_deleted: deleted,
                endpoints_deleted: 0,
                done: false,
            });
        }
        let page = self
            .store
            .list(
                tenant,
                &EndpointQuery::default(),
                PageRequest {
                    offset: 0,
                    limit: u32::try_from(limit).unwrap_or(u32::MAX),
                    after: None,
                },
            )
            .await?;
        if page.items.is_empty() {
            // Last: what the tenant holds besides endpoints and filters (claim tokens,
            // rejections, self-registration policies). Idempotent, so a purge resumed after a
            // crash finishes it.
            self.store
                .purge_tenant_credentials(
                    tenant,
                    &crate::self_registration::tenant_setting_prefix(tenant),
                )
                .await?;
            return Ok(PurgeStep {
                filters_deleted: 0,
                endpoints_deleted: 0,
                done: true,
            });
        }
        let deletions = page.items.into_iter().map(|ep| {
            let cmd = Command::Unregister {
                id: ep.id,
                precondition: Precondition::None,
            };
            self.store.execute(cmd, self.ctx(tenant, correlation_id))
        });
        let deleted = count_deleted(futures_util::future::join_all(deletions).await)?;
        Ok(PurgeStep {
            filters_deleted: 0,
            endpoints_deleted: deleted,
            done: false,
        })
    }

    pub async fn batch_status(
        &self,
        tenant: &TenantId,
        app: &AppName,
        task_id: &str,
    ) -> Result<BatchReport, Error> {
        let outcome = self
            .store
            .batch_outcome(tenant, app, task_id)
            .await?
            .ok_or_else(|| DomainError::not_found("batch task", task_id))?;
        let now = self.clock.now();
        let tokens = self
            .batch_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(tenant.clone(), task_id.to_owned()))
            .filter(|(expires, _)| *expires > now)
            .map(|(_, t)| t.clone());
        Ok(BatchReport { outcome, tokens })
    }
}

/// How many of a purge step's deletions happened; one already gone (deleted meanwhile, or by
/// an earlier, interrupted run) is not an error.
fn count_deleted<T>(results: Vec<Result<T, StoreError>>) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for result in results {
        match result {
            Ok(_) => deleted += 1,
            Err(StoreError::Rejected(DomainError::NotFound { .. })) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
