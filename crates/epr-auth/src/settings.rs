//! The `auth` configuration section and its validation.

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

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
    /// scopes. A value that is itself a scope name grants that scope. Empty: the defaults
    /// of [`crate::scopes::default_roles`] (Kaa's default realm roles).
    pub roles: BTreeMap<String, Vec<String>>,
}

// `Debug` by hand: the client secret must not reach a log through `{:?}`.
#[derive(Clone, Serialize, Deserialize)]
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

impl std::fmt::Debug for TenantManagerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = if self.client_secret.is_empty() {
            ""
        } else {
            "***"
        };
        f.debug_struct("TenantManagerSettings")
            .field("url", &self.url)
            .field("refresh_secs", &self.refresh_secs)
            .field("page_size", &self.page_size)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &secret)
            .finish()
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

/// The algorithms `auth.algorithms` may name. HMAC (`HS*`) is left out on purpose: with a
/// public JWKS, accepting it would let anyone sign with the public key as the secret.
pub const ALGORITHMS: [(&str, Algorithm); 9] = [
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

/// An algorithm name of [`ALGORITHMS`].
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    ALGORITHMS.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

/// The claim forms `auth.scopes.claims` may name (`resource_access.<client>.roles` has a
/// client part).
pub fn valid_scope_claim(claim: &str) -> bool {
    matches!(
        claim,
        "scope" | "scp" | "realm_access.roles" | "authorization.permissions"
    ) || claim
        .strip_prefix("resource_access.")
        .and_then(|rest| rest.strip_suffix(".roles"))
        .is_some_and(|client| !client.is_empty())
}

impl AuthSettings {
    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.tenants.iter().any(|t| !t.issuer.is_empty()) || !self.tenant_manager.url.is_empty()
    }

    /// Check the section; the error names the key and the rule.
    pub fn validate(&self) -> Result<(), String> {
        let mut issuers: HashMap<&str, &str> = HashMap::new();
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let key = format!("auth.tenants[{i}]");
            epr_core::ids::TenantId::parse(&t.id).map_err(|e| format!("{key}.id: {e}"))?;
            if let Some(j) = ids.insert(&t.id, i) {
                return Err(format!(
                    "{key}.id: tenant `{}` is listed twice (also auth.tenants[{j}]); ids must be unique",
                    t.id
                ));
            }
            if t.issuer.is_empty() {
                return Err(format!(
                    "{key}.issuer: is required (the `iss` of the tenant's tokens)"
                ));
            }
            check_url(&format!("{key}.issuer"), &t.issuer)?;
            if let Some(other) = issuers.insert(&t.issuer, &t.id) {
                return Err(format!(
                    "{key}.issuer: `{}` is also the issuer of tenant `{other}`; an issuer selects one tenant",
                    t.issuer
                ));
            }
            if !t.jwks_uri.is_empty() {
                check_url(&format!("{key}.jwks_uri"), &t.jwks_uri)?;
            }
            if t.audiences.iter().any(|a| a.is_empty()) {
                return Err(format!("{key}.audiences: must not contain an empty string"));
            }
        }
        if self.enabled() {
            let every_tenant_has_own = !self.tenant_manager.url.is_empty()
                || self.tenants.iter().any(|t| t.audiences.is_empty());
            if every_tenant_has_own && self.audiences.is_empty() {
                return Err("auth.audiences: must not be empty while authentication is on (a token's `aud` must contain one of them)".into());
            }
        }
        if self.audiences.iter().any(|a| a.is_empty()) {
            return Err("auth.audiences: must not contain an empty string".into());
        }
        if self.algorithms.is_empty() {
            return Err("auth.algorithms: must name at least one algorithm".into());
        }
        for a in &self.algorithms {
            if parse_algorithm(a).is_none() {
                let known: Vec<&str> = ALGORITHMS.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "auth.algorithms: `{a}` is not accepted; use {} (none and HMAC are never accepted)",
                    known.join(", ")
                ));
            }
        }
        if self.leeway_secs > 600 {
            return Err("auth.leeway_secs: must be at most 600".into());
        }
        if self.jwks_refresh_secs < 1 {
            return Err("auth.jwks_refresh_secs: must be at least 1".into());
        }
        if self.jwks_min_refetch_secs < 1 {
            return Err("auth.jwks_min_refetch_secs: must be at least 1 (it bounds the key fetches a flood of unknown `kid`s causes)".into());
        }
        if !(100..=120_000).contains(&self.http_timeout_ms) {
            return Err("auth.http_timeout_ms: must be between 100 and 120000".into());
        }
        if self.token_cache_entries > 10_000_000 {
            return Err(
                "auth.token_cache_entries: must be at most 10000000 (0 turns the cache off)".into(),
            );
        }
        if self.scopes.claims.is_empty() && self.authorization {
            return Err(
                "auth.scopes.claims: must name at least one claim while auth.authorization is on"
                    .into(),
            );
        }
        for c in &self.scopes.claims {
            if !valid_scope_claim(c) {
                return Err(format!("auth.scopes.claims: `{c}` is not a known claim form; use scope, scp, realm_access.roles, resource_access.<client>.roles or authorization.permissions"));
            }
        }
        for (role, scopes) in &self.scopes.roles {
            if role.is_empty() {
                return Err("auth.scopes.roles: a role name must not be empty".into());
            }
            for s in scopes {
                if epr_core::auth::Scope::parse(s).is_none() {
                    return Err(format!(
                        "auth.scopes.roles.{role}: `{s}` is not a scope; use one of {}",
                        scope_names()
                    ));
                }
            }
        }
        let tm = &self.tenant_manager;
        if !tm.url.is_empty() {
            check_url("auth.tenant_manager.url", &tm.url)?;
        }
        if tm.refresh_secs < 1 {
            return Err("auth.tenant_manager.refresh_secs: must be at least 1".into());
        }
        if !(1..=1000).contains(&tm.page_size) {
            return Err("auth.tenant_manager.page_size: must be between 1 and 1000".into());
        }
        if !tm.token_url.is_empty() {
            check_url("auth.tenant_manager.token_url", &tm.token_url)?;
            if tm.client_id.is_empty() {
                return Err(
                    "auth.tenant_manager.client_id: is required with auth.tenant_manager.token_url"
                        .into(),
                );
            }
        }
        if !matches!(self.removed_tenant_data.as_str(), "keep" | "purge") {
            return Err(format!(
                "auth.removed_tenant_data: `{}` is not allowed; use keep or purge",
                self.removed_tenant_data
            ));
        }
        for r in &self.open_routes {
            if !r.starts_with('/') {
                return Err(format!(
                    "auth.open_routes: `{r}` must be a path starting with /"
                ));
            }
        }
        Ok(())
    }

    /// The accepted algorithms (validated).
    pub(crate) fn algorithm_list(&self) -> Vec<Algorithm> {
        self.algorithms
            .iter()
            .filter_map(|a| parse_algorithm(a))
            .collect()
    }
}

fn scope_names() -> String {
    epr_core::auth::Scope::ALL
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_url(key: &str, value: &str) -> Result<(), String> {
    // Checked first, so that the message need not echo the credentials.
    let authority = value
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split(['/', '?', '#'])
        .next();
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(format!(
            "{key}: must not contain user information (`user:password@`): it is never sent, \
             and URLs are logged and shown in health"
        ));
    }
    crate::http::parse(value)
        .map(|_| ())
        .map_err(|e| format!("{key}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> AuthSettings {
        AuthSettings {
            tenants: vec![TenantSettings {
                id: "acme".into(),
                issuer: "https://id.example.com/realms/acme".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn err(f: impl FnOnce(&mut AuthSettings)) -> String {
        let mut s = on();
        f(&mut s);
        s.validate().unwrap_err()
    }

    #[test]
    fn defaults_are_valid_and_off() {
        AuthSettings::default().validate().unwrap();
        assert!(!AuthSettings::default().enabled());
        on().validate().unwrap();
        assert!(on().enabled());
    }

    #[test]
    fn each_key_is_checked_by_name() {
        assert!(err(|s| s.tenants[0].id = "a b".into()).starts_with("auth.tenants[0].id:"));
        assert!(err(|s| s.tenants[0].issuer = "not a url".into())
            .starts_with("auth.tenants[0].issuer: `not a url` is not a URL"));
        assert!(err(|s| s.tenants[0].issuer.clear()).contains("is required"));
        assert!(err(|s| s.tenants[0].jwks_uri = "ftp://x/keys".into())
            .starts_with("auth.tenants[0].jwks_uri: `ftp://x/keys` must be an http or https URL"));
        let dup = err(|s| {
            let mut t = s.tenants[0].clone();
            t.id = "other".into();
            s.tenants.push(t);
        });
        assert!(
            dup.starts_with("auth.tenants[1].issuer:") && dup.contains("tenant `acme`"),
            "{dup}"
        );
        assert!(err(|s| {
            let mut t = s.tenants[0].clone();
            t.issuer = "https://x".into();
            s.tenants.push(t);
        })
        .contains("listed twice"));
        assert!(err(|s| s.audiences.clear()).starts_with("auth.audiences: must not be empty"));
        assert!(err(|s| s.algorithms = vec!["HS256".into()])
            .starts_with("auth.algorithms: `HS256` is not accepted"));
        assert!(err(|s| s.algorithms = vec!["none".into()]).contains("`none` is not accepted"));
        assert!(err(|s| s.algorithms.clear()).starts_with("auth.algorithms:"));
        assert!(err(|s| s.jwks_refresh_secs = 0)
            .starts_with("auth.jwks_refresh_secs: must be at least 1"));
        assert!(err(|s| s.jwks_min_refetch_secs = 0).starts_with("auth.jwks_min_refetch_secs:"));
        assert!(err(|s| s.http_timeout_ms = 5).starts_with("auth.http_timeout_ms:"));
        assert!(err(|s| s.leeway_secs = 3600).starts_with("auth.leeway_secs:"));
        assert!(err(|s| s.scopes.claims = vec!["groups".into()])
            .starts_with("auth.scopes.claims: `groups` is not a known claim form"));
        assert!(err(|s| {
            s.scopes
                .roles
                .insert("admin".into(), vec!["endpoint:write".into()]);
        })
        .starts_with("auth.scopes.roles.admin: `endpoint:write` is not a scope"));
        assert!(err(|s| s.tenant_manager.url = "tm".into()).starts_with("auth.tenant_manager.url:"));
        assert!(err(|s| s.tenant_manager.refresh_secs = 0)
            .starts_with("auth.tenant_manager.refresh_secs: must be at least 1"));
        assert!(
            err(|s| s.tenant_manager.page_size = 0).starts_with("auth.tenant_manager.page_size:")
        );
        assert!(
            err(|s| s.tenant_manager.token_url = "http://kc/token".into())
                .starts_with("auth.tenant_manager.client_id: is required")
        );
        assert!(err(|s| s.removed_tenant_data = "delete".into())
            .starts_with("auth.removed_tenant_data: `delete` is not allowed; use keep or purge"));
        assert!(err(|s| s.open_routes = vec!["health".into()]).starts_with("auth.open_routes:"));
        // Credentials in a URL are refused without being echoed.
        for (e, key) in [
            (
                err(|s| s.tenants[0].issuer = "https://u:pw1@id.example.com/r".into()),
                "auth.tenants[0].issuer:",
            ),
            (
                err(|s| s.tenants[0].jwks_uri = "https://u:pw1@id.example.com/jwks".into()),
                "auth.tenants[0].jwks_uri:",
            ),
            (
                err(|s| s.tenant_manager.url = "http://tok@tm/api/v1".into()),
                "auth.tenant_manager.url:",
            ),
        ] {
            assert!(e.starts_with(key), "{e}");
            assert!(e.contains("must not contain user information"), "{e}");
            assert!(!e.contains("pw1") && !e.contains("tok@"), "{e}");
        }
        // An `@` in the path or query is not user information.
        let mut ok = on();
        ok.tenants[0].jwks_uri = "https://id.example.com/jwks?owner=a@b".into();
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn tenant_audiences_make_the_global_list_optional() {
        let mut s = on();
        s.audiences.clear();
        s.tenants[0].audiences = vec!["epr".into()];
        s.validate().unwrap();
    }

    #[test]
    fn scope_claim_forms() {
        for c in [
            "scope",
            "scp",
            "realm_access.roles",
            "resource_access.kaa-rest.roles",
            "authorization.permissions",
        ] {
            assert!(valid_scope_claim(c), "{c}");
        }
        for c in ["resource_access..roles", "resource_access.x", "roles"] {
            assert!(!valid_scope_claim(c), "{c}");
        }
    }
}
