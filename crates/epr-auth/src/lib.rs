//! Authentication adapter: bearer JWTs checked against each tenant's OAuth 2.0 issuer.
//!
//! - [`AuthSettings`]: the `auth` configuration section.
//! - [`Auth`]: implements [`epr_core::auth::Authenticator`] (token → principal) and
//!   [`epr_core::auth::TenantControl`] (21/TLE notices); publishes the tenant set.
//!
//! SKELETON: the public API is settled; the implementation is being written.

use async_trait::async_trait;
use epr_core::auth::{
    AuthError, Authenticator, Principal, TenantControl, TenantInfo, TenantSnapshot,
};
use epr_core::ids::TenantId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The `auth` configuration section. Authentication is on when at least one tenant has an
/// issuer or a Tenant Manager URL is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Tenants and their issuers, from configuration.
    pub tenants: Vec<TenantSettings>,
    /// Audiences accepted when a tenant names none: a token's `aud` must contain one.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Signature algorithms accepted (of RS256, RS384, RS512, PS256, PS384, PS512, ES256,
    /// ES384, EdDSA). `none` and HMAC are never accepted.
    pub algorithms: Vec<String>,
    /// How often an issuer's keys are re-read, in seconds.
    pub jwks_refresh_secs: u64,
    /// A token with an unknown `kid` makes the keys be re-read at most once per this many
    /// seconds per issuer.
    pub jwks_min_refetch_secs: u64,
    /// Timeout of calls to issuers and the Tenant Manager, in milliseconds.
    pub http_timeout_ms: u64,
    /// Checked tokens remembered (until they expire), so a token's signature is verified
    /// once, not on every request.
    pub token_cache_entries: usize,
    /// `false`: authentication without authorization (any valid token of the tenant may do
    /// everything in it).
    pub authorization: bool,
    pub scopes: ScopeSettings,
    pub tenant_manager: TenantManagerSettings,
    /// What happens to an unregistered tenant's data: `keep` or `purge` (endpoints and
    /// filters deleted in the background, with their events).
    pub removed_tenant_data: String,
    /// Allow a non-loopback listener without authentication.
    pub insecure_allow_remote: bool,
    /// Routes served without a token (exact paths).
    pub open_routes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    pub id: String,
    /// The issuer URL, exactly as in the tokens' `iss`; its OpenID configuration is at
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// Audiences accepted for this tenant; empty: `auth.audiences`.
    pub audiences: Vec<String>,
    /// Where the keys are, if not discoverable from the issuer.
    pub jwks_uri: String,
}

/// Where a token's scopes come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScopeSettings {
    /// `scope` (space-separated string), `scp` (array or string), `realm_access.roles`,
    /// `resource_access.<client>.roles`, or `authorization.permissions` (Keycloak UMA
    /// RPT: `[{rsname, scopes}]`, scopes per resource).
    pub claims: Vec<String>,
    /// Roles (or any claim value) that grant scopes, e.g. `endpoint-admin` → all endpoint
    /// scopes. A value that is itself a scope name grants that scope.
    pub roles: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantManagerSettings {
    /// Base URL of the Tenant Manager REST API (e.g. `http://tenant-manager/api/v1`);
    /// empty: tenants come from configuration only.
    pub url: String,
    /// How often the tenant list is re-read, in seconds.
    pub refresh_secs: u64,
    /// Tenants per page (`limit`).
    pub page_size: u32,
    /// Service account for the Tenant Manager (OAuth 2.0 client credentials grant);
    /// empty token URL: no `Authorization` header.
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            tenants: Vec::new(),
            audiences: vec!["kaa-rest-api".into()],
            leeway_secs: 30,
            algorithms: vec!["RS256".into(), "ES256".into(), "EdDSA".into()],
            jwks_refresh_secs: 300,
            jwks_min_refetch_secs: 10,
            http_timeout_ms: 5000,
            token_cache_entries: 100_000,
            authorization: true,
            scopes: ScopeSettings::default(),
            tenant_manager: TenantManagerSettings::default(),
            removed_tenant_data: "keep".into(),
            insecure_allow_remote: false,
            open_routes: vec![
                "/health".into(),
                "/health/live".into(),
                "/health/ready".into(),
                "/metrics".into(),
                "/openapi.json".into(),
            ],
        }
    }
}

impl Default for ScopeSettings {
    fn default() -> Self {
        Self {
            claims: vec!["scope".into(), "realm_access.roles".into()],
            roles: BTreeMap::new(),
        }
    }
}

impl Default for TenantManagerSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            refresh_secs: 60,
            page_size: 50,
            token_url: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
        }
    }
}

impl AuthSettings {
    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.tenants.iter().any(|t| !t.issuer.is_empty()) || !self.tenant_manager.url.is_empty()
    }

    /// Check the section; the error names the key and the rule.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The authenticator and tenant directory.
pub struct Auth {
    settings: AuthSettings,
    default_tenant: TenantId,
    tenants_tx: watch::Sender<Arc<TenantSnapshot>>,
}

impl Auth {
    /// Build from settings (validated). No I/O yet: [`Auth::run`] fetches.
    pub fn new(settings: AuthSettings, default_tenant: TenantId) -> Result<Arc<Auth>, String> {
        settings.validate()?;
        let (tenants_tx, _) =
            watch::channel(Arc::new(initial_tenants(&settings, &default_tenant)?));
        Ok(Arc::new(Auth {
            settings,
            default_tenant,
            tenants_tx,
        }))
    }

    /// Background work until `shutdown`: the first tenant list and key fetch, periodic
    /// refreshes of tenants and keys.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }

    /// The current tenants, updated whenever they change.
    pub fn tenants(&self) -> watch::Receiver<Arc<TenantSnapshot>> {
        self.tenants_tx.subscribe()
    }

    /// For readiness: `UP`, `DOWN` or `DISABLED`, and details (issuers and their key fetch
    /// state, Tenant Manager state).
    pub fn health(&self) -> (&'static str, serde_json::Value) {
        if self.settings.enabled() {
            ("UP", serde_json::json!({}))
        } else {
            ("DISABLED", serde_json::json!({}))
        }
    }
}

#[async_trait]
impl Authenticator for Auth {
    fn enabled(&self) -> bool {
        self.settings.enabled()
    }

    async fn authenticate(&self, _token: &str) -> Result<Principal, AuthError> {
        if !self.settings.enabled() {
            return Ok(Principal::anonymous(self.default_tenant.clone()));
        }
        Err(AuthError::Unavailable("not implemented yet".into()))
    }
}

/// Authentication off: the default tenant alone. On: the configured tenants (the Tenant
/// Manager's are added by [`Auth::run`]).
fn initial_tenants(settings: &AuthSettings, default: &TenantId) -> Result<TenantSnapshot, String> {
    if !settings.enabled() {
        return Ok(TenantSnapshot::single(default.clone()));
    }
    let mut snap = TenantSnapshot::default();
    for (i, t) in settings.tenants.iter().enumerate() {
        let id = TenantId::parse(&t.id).map_err(|e| format!("auth.tenants[{i}].id: {e}"))?;
        snap.tenants.insert(
            id.clone(),
            TenantInfo {
                id,
                issuer: Some(t.issuer.clone()),
            },
        );
    }
    Ok(snap)
}

impl TenantControl for Auth {
    fn tenant_updated(&self, _tenant: &str) {}
    fn tenant_unregistered(&self, tenant: &str) {
        self.tenants_tx.send_if_modified(|snap| {
            let Ok(id) = TenantId::parse(tenant) else {
                return false;
            };
            if !snap.contains(&id) {
                return false;
            }
            let mut next = (**snap).clone();
            next.tenants.remove(&id);
            *snap = Arc::new(next);
            true
        });
    }
}
