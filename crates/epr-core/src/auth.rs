//! Who is calling, on behalf of which tenant, allowed to do what: the domain side of
//! authentication and authorization. Token formats, key fetching and caches are adapters
//! (`epr-auth`); the rules of which operation needs which scope live here, so every
//! front-end applies the same ones.

use crate::ids::TenantId;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Kaa's scopes for the resources the EPR manages (Keycloak UMA resource types
/// `endpoint-<id>` and `application-<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// `endpoint:read`: read an endpoint, its app version, metadata and metadata keys.
    EndpointRead,
    /// `endpoint:update`: change an endpoint's app version or metadata.
    EndpointUpdate,
    /// `endpoint:delete`: unregister an endpoint.
    EndpointDelete,
    /// `application:endpoint:create`: register endpoints of an application (also batch).
    ApplicationEndpointCreate,
    /// `application:endpoints-metadata-keys:read`: the metadata keys used in an application.
    ApplicationMetadataKeysRead,
    /// `application:read`: the configured applications and versions.
    ApplicationRead,
    /// `application:endpoint-filter:read`.
    FilterRead,
    /// `application:endpoint-filter:create`.
    FilterCreate,
    /// `application:endpoint-filter:update`.
    FilterUpdate,
    /// `application:endpoint-filter:delete`.
    FilterDelete,
    /// `application:self-registration:read`: an application's self-registration policy,
    /// claim tokens and rejections.
    SelfRegistrationRead,
    /// `application:self-registration:update`: set or remove the policy, create and
    /// delete claim tokens.
    SelfRegistrationUpdate,
}

impl Scope {
    pub const ALL: [Scope; 12] = [
        Scope::EndpointRead,
        Scope::EndpointUpdate,
        Scope::EndpointDelete,
        Scope::ApplicationEndpointCreate,
        Scope::ApplicationMetadataKeysRead,
        Scope::ApplicationRead,
        Scope::FilterRead,
        Scope::FilterCreate,
        Scope::FilterUpdate,
        Scope::FilterDelete,
        Scope::SelfRegistrationRead,
        Scope::SelfRegistrationUpdate,
    ];

    /// The scope's name as Kaa spells it in tokens and in Keycloak.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EndpointRead => "endpoint:read",
            Scope::EndpointUpdate => "endpoint:update",
            Scope::EndpointDelete => "endpoint:delete",
            Scope::ApplicationEndpointCreate => "application:endpoint:create",
            Scope::ApplicationMetadataKeysRead => "application:endpoints-metadata-keys:read",
            Scope::ApplicationRead => "application:read",
            Scope::FilterRead => "application:endpoint-filter:read",
            Scope::FilterCreate => "application:endpoint-filter:create",
            Scope::FilterUpdate => "application:endpoint-filter:update",
            Scope::FilterDelete => "application:endpoint-filter:delete",
            Scope::SelfRegistrationRead => "application:self-registration:read",
            Scope::SelfRegistrationUpdate => "application:self-registration:update",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes (a bit set: checked on every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ScopeSet(u16);

impl ScopeSet {
    pub const EMPTY: ScopeSet = ScopeSet(0);

    pub fn all() -> ScopeSet {
        Scope::ALL.into_iter().collect()
    }
    pub fn contains(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }
    pub fn insert(&mut self, s: Scope) {
        self.0 |= s.bit();
    }
    pub fn union(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 | other.0)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut set = ScopeSet::EMPTY;
        for s in iter {
            set.insert(s);
        }
        set
    }
}

/// The resource an operation acts on, in Keycloak's `<type>-<handle>` naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// `endpoint-<endpointId>`.
    Endpoint(&'a str),
    /// `application-<applicationName>`.
    Application(&'a str),
    /// Every resource of the tenant (listings across endpoints).
    Tenant,
}

impl Resource<'_> {
    /// The Keycloak resource name (`tenant-system` for the tenant-wide resource).
    pub fn name(&self) -> String {
        match self {
            Resource::Endpoint(id) => format!("endpoint-{id}"),
            Resource::Application(app) => format!("application-{app}"),
            Resource::Tenant => "tenant-system".to_owned(),
        }
    }
}

/// The authenticated caller: its tenant and what it may do there.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub tenant: TenantId,
    /// The token's `sub`, for logs; `None` while authentication is off.
    pub subject: Option<String>,
    /// Scopes granted on every resource of the tenant.
    pub scopes: ScopeSet,
    /// Scopes granted on named resources only (UMA permissions: resource name → scopes).
    pub resource_scopes: BTreeMap<String, ScopeSet>,
    /// When the token stops being valid (ms since the epoch); `None` while authentication
    /// is off.
    pub expires_at_ms: Option<i64>,
}

impl Principal {
    /// The caller while authentication is off: the default tenant, every scope.
    pub fn anonymous(tenant: TenantId) -> Self {
        Self {
            tenant,
            subject: None,
            scopes: ScopeSet::all(),
            resource_scopes: BTreeMap::new(),
            expires_at_ms: None,
        }
    }

    /// Whether the caller holds `scope` on `resource` (tenant-wide or on that resource).
    pub fn allows(&self, scope: Scope, resource: Resource<'_>) -> bool {
        if self.scopes.contains(scope) {
            return true;
        }
        match resource {
            Resource::Tenant => false,
            r => self
                .resource_scopes
                .get(&r.name())
                .is_some_and(|s| s.contains(scope)),
        }
    }

    /// `Ok` if allowed, else the refusal naming the missing scope.
    pub fn require(&self, scope: Scope, resource: Resource<'_>) -> Result<(), Forbidden> {
        if self.allows(scope, resource) {
            Ok(())
        } else {
            Err(Forbidden {
                scope,
                resource: resource.name(),
            })
        }
    }
}

/// A valid caller without the scope an operation needs (HTTP 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the access token lacks the scope {scope} on {resource}")]
pub struct Forbidden {
    pub scope: Scope,
    pub resource: String,
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header (HTTP 401, no `error` attribute).
    #[error("an access token is required (Authorization: Bearer <token>)")]
    Missing,
    /// The token is malformed, badly signed, expired, not yet valid, for another audience,
    /// from an unknown issuer or of a removed tenant (HTTP 401, `invalid_token`). The
    /// message says which, without echoing the token.
    #[error("{0}")]
    Invalid(String),
    /// The token may be valid but cannot be checked now: the issuer's keys are
    /// unreachable and none are cached (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
}

/// The authentication port: turns a bearer token into a [`Principal`].
#[async_trait]
pub trait Authenticator: Send + Sync {
    /// `false`: authentication is off; every request is [`Principal::anonymous`] in the
    /// default tenant.
    fn enabled(&self) -> bool;
    /// Check a bearer token (the header value's token part, without `Bearer `).
    /// The principal is shared: a remembered token's is handed out without a copy.
    async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, AuthError>;
}

/// How NATS subjects carry the tenant. Kaa's 19/EPMMP, 20/EFMP, 9/ELCE and 15/EME messages
/// carry no tenant, so each tenant gets its own service instance name: requests to
/// `kaa.v1.service.<instance>.…` act in that tenant only, and its events are published as
/// `kaa.v1.events.<instance>.…`. The default tenant uses the configured instance name
/// itself; every other tenant `<instance>-<tenant>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantNaming {
    pub instance_name: String,
    pub default_tenant: TenantId,
}

impl TenantNaming {
    pub fn instance_of(&self, tenant: &TenantId) -> String {
        if *tenant == self.default_tenant {
            self.instance_name.clone()
        } else {
            format!("{}-{}", self.instance_name, tenant.as_str())
        }
    }
}

/// One known tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantInfo {
    pub id: TenantId,
    /// The OAuth 2.0 issuer of its tokens; `None` while authentication is off.
    pub issuer: Option<String>,
}

/// The tenants known at one moment (from configuration and the Tenant Manager). Published
/// to front-ends whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantSnapshot {
    pub tenants: BTreeMap<TenantId, TenantInfo>,
}

impl TenantSnapshot {
    pub fn single(tenant: TenantId) -> Self {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            tenant.clone(),
            TenantInfo {
                id: tenant,
                issuer: None,
            },
        );
        Self { tenants }
    }
    pub fn contains(&self, t: &TenantId) -> bool {
        self.tenants.contains_key(t)
    }
}

/// Tenant life-cycle notices from outside (21/TLE over NATS) for the tenant directory.
pub trait TenantControl: Send + Sync {
    /// `tenant.lifecycle.updated`: re-read the tenant list now.
    fn tenant_updated(&self, tenant: &str);
    /// `tenant.lifecycle.unregistered`: the tenant's tokens stop working at once.
    fn tenant_unregistered(&self, tenant: &str);
}

/// Shared handle to an authenticator.
pub type DynAuthenticator = Arc<dyn Authenticator>;

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    #[test]
    fn scope_names_round_trip() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("endpoint:write"), None);
    }

    #[test]
    fn tenant_wide_and_resource_grants() {
        let mut p = Principal {
            tenant: t(),
            subject: None,
            scopes: [Scope::EndpointRead].into_iter().collect(),
            resource_scopes: BTreeMap::new(),
            expires_at_ms: None,
        };
        p.resource_scopes.insert(
            "endpoint-e1".into(),
            [Scope::EndpointDelete].into_iter().collect(),
        );
        assert!(p.allows(Scope::EndpointRead, Resource::Tenant));
        assert!(p.allows(Scope::EndpointDelete, Resource::Endpoint("e1")));
        assert!(!p.allows(Scope::EndpointDelete, Resource::Endpoint("e2")));
        assert!(!p.allows(Scope::EndpointDelete, Resource::Tenant));
        let err = p
            .require(Scope::FilterRead, Resource::Application("app"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the access token lacks the scope application:endpoint-filter:read on application-app"
        );
    }

    #[test]
    fn instance_names() {
        let n = TenantNaming {
            instance_name: "epr".into(),
            default_tenant: TenantId::parse("kaa").unwrap(),
        };
        assert_eq!(n.instance_of(&TenantId::parse("kaa").unwrap()), "epr");
        assert_eq!(n.instance_of(&t()), "epr-acme");
    }
}
