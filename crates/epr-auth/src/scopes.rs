//! Scopes from a verified token's claims (`auth.scopes`).

use crate::settings::ScopeSettings;
use epr_core::auth::{Scope, ScopeSet};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

/// Keycloak resource names that stand for the whole tenant: UMA permissions on them grant
/// their scopes tenant-wide (`kaa-system` in Kaa 1.2, `tenant-system` later).
pub const TENANT_RESOURCES: [&str; 2] = ["tenant-system", "kaa-system"];

/// The roles used when `auth.scopes.roles` is empty, named after Kaa's default realm
/// roles. Readers read; `endpoint-admin` manages endpoints (register, update, delete) and
/// reads filters; `application-admin` manages an application's filters and its device
/// self-registration, and registers its endpoints.
pub fn default_roles() -> BTreeMap<String, Vec<String>> {
    use Scope::*;
    let names = |s: &[Scope]| s.iter().map(|x| x.as_str().to_owned()).collect::<Vec<_>>();
    let reader = [
        EndpointRead,
        ApplicationRead,
        ApplicationMetadataKeysRead,
        FilterRead,
    ];
    let app_reader = [ApplicationRead, ApplicationMetadataKeysRead, FilterRead];
    let endpoint_admin = [
        EndpointRead,
        EndpointUpdate,
        EndpointDelete,
        ApplicationEndpointCreate,
        ApplicationRead,
        ApplicationMetadataKeysRead,
        FilterRead,
    ];
    let app_admin = [
        ApplicationRead,
        ApplicationMetadataKeysRead,
        ApplicationEndpointCreate,
        FilterRead,
        FilterCreate,
        FilterUpdate,
        FilterDelete,
        SelfRegistrationRead,
        SelfRegistrationUpdate,
    ];
    BTreeMap::from([
        ("endpoint-reader".to_owned(), names(&reader)),
        ("endpoint-admin".to_owned(), names(&endpoint_admin)),
        ("application-reader".to_owned(), names(&app_reader)),
        ("application-admin".to_owned(), names(&app_admin)),
    ])
}

/// Where to read values in the claims.
#[derive(Debug, Clone)]
enum ClaimForm {
    /// A space-separated string.
    Scope,
    /// An array of strings, or a space-separated string.
    Scp,
    /// An array of strings at a path.
    Roles(Vec<String>),
    /// Keycloak UMA `authorization.permissions`.
    Permissions,
}

/// Turns claims into granted scopes; built once from settings.
#[derive(Debug, Clone)]
pub struct ScopeMapper {
    forms: Vec<ClaimForm>,
    /// Claim value → scopes it grants (scope names grant themselves).
    grants: HashMap<String, ScopeSet>,
    /// `auth.authorization: false`: every valid token gets every scope.
    everything: bool,
}

/// What a token grants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grants {
    pub scopes: ScopeSet,
    pub resource_scopes: BTreeMap<String, ScopeSet>,
}

impl ScopeMapper {
    /// From validated settings.
    pub fn new(settings: &ScopeSettings, authorization: bool) -> Self {
        let forms = settings
            .claims
            .iter()
            .map(|c| match c.as_str() {
                "scope" => ClaimForm::Scope,
                "scp" => ClaimForm::Scp,
                "authorization.permissions" => ClaimForm::Permissions,
                "realm_access.roles" => {
                    ClaimForm::Roles(vec!["realm_access".into(), "roles".into()])
                }
                other => {
                    // resource_access.<client>.roles: the client ID may itself contain dots.
                    let client = other
                        .strip_prefix("resource_access.")
                        .and_then(|r| r.strip_suffix(".roles"))
                        .unwrap_or_default();
                    ClaimForm::Roles(vec![
                        "resource_access".into(),
                        client.into(),
                        "roles".into(),
                    ])
                }
            })
            .collect();
        let mut grants: HashMap<String, ScopeSet> = Scope::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), [*s].into_iter().collect()))
            .collect();
        let roles = if settings.roles.is_empty() {
            default_roles()
        } else {
            settings.roles.clone()
        };
        for (role, scopes) in roles {
            let set: ScopeSet = scopes.iter().filter_map(|s| Scope::parse(s)).collect();
            let e = grants.entry(role).or_default();
            *e = e.union(set);
        }
        Self {
            forms,
            grants,
            everything: !authorization,
        }
    }

    fn grant(&self, value: &str) -> ScopeSet {
        self.grants.get(value).copied().unwrap_or_default()
    }

    /// The scopes the claims grant, the union over every configured claim.
    pub fn grants(&self, claims: &Value) -> Grants {
        let mut out = Grants::default();
        if self.everything {
            out.scopes = ScopeSet::all();
            return out;
        }
        for form in &self.forms {
            match form {
                ClaimForm::Scope => {
                    if let Some(s) = claims.get("scope").and_then(Value::as_str) {
                        for v in s.split_ascii_whitespace() {
                            out.scopes = out.scopes.union(self.grant(v));
                        }
                    }
                }
                ClaimForm::Scp => match claims.get("scp") {
                    Some(Value::String(s)) => {
                        for v in s.split_ascii_whitespace() {
                            out.scopes = out.scopes.union(self.grant(v));
                        }
                    }
                    Some(Value::Array(a)) => {
                        for v in a.iter().filter_map(Value::as_str) {
                            out.scopes = out.scopes.union(self.grant(v));
                        }
                    }
                    _ => {}
                },
                ClaimForm::Roles(path) => {
                    let mut at = Some(claims);
                    for p in path {
                        at = at.and_then(|v| v.get(p));
                    }
                    if let Some(Value::Array(a)) = at {
                        for v in a.iter().filter_map(Value::as_str) {
                            out.scopes = out.scopes.union(self.grant(v));
                        }
                    }
                }
                ClaimForm::Permissions => {
                    let perms = claims
                        .get("authorization")
                        .and_then(|a| a.get("permissions"))
                        .and_then(Value::as_array);
                    for p in perms.into_iter().flatten() {
                        let Some(rsname) = p.get("rsname").and_then(Value::as_str) else {
                            continue;
                        };
                        let set: ScopeSet = p
                            .get("scopes")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .fold(ScopeSet::EMPTY, |acc, v| acc.union(self.grant(v)));
                        if set.is_empty() {
                            continue;
                        }
                        if TENANT_RESOURCES.contains(&rsname) {
                            out.scopes = out.scopes.union(set);
                        } else {
                            let e = out.resource_scopes.entry(rsname.to_owned()).or_default();
                            *e = e.union(set);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapper(claims: &[&str]) -> ScopeMapper {
        ScopeMapper::new(
            &ScopeSettings {
                claims: claims.iter().map(|c| c.to_string()).collect(),
                roles: BTreeMap::new(),
            },
            true,
        )
    }

    fn set(s: &[Scope]) -> ScopeSet {
        s.iter().copied().collect()
    }

    #[test]
    fn scope_string() {
        let g = mapper(&["scope"])
            .grants(&json!({"scope": "openid endpoint:read  application:read profile"}));
        assert_eq!(
            g.scopes,
            set(&[Scope::EndpointRead, Scope::ApplicationRead])
        );
        assert!(g.resource_scopes.is_empty());
    }

    #[test]
    fn scp_array_and_string() {
        let m = mapper(&["scp"]);
        assert_eq!(
            m.grants(&json!({"scp": ["endpoint:delete", "x"]})).scopes,
            set(&[Scope::EndpointDelete])
        );
        assert_eq!(
            m.grants(&json!({"scp": "endpoint:update application:endpoint-filter:read"}))
                .scopes,
            set(&[Scope::EndpointUpdate, Scope::FilterRead])
        );
        // A claim not configured is not read.
        assert!(m
            .grants(&json!({"scope": "endpoint:read"}))
            .scopes
            .is_empty());
    }

    #[test]
    fn realm_and_client_roles_with_default_role_map() {
        let m = mapper(&["realm_access.roles", "resource_access.kaa.rest.roles"]);
        let g = m.grants(&json!({
            "realm_access": {"roles": ["offline_access", "endpoint-reader"]},
            "resource_access": {"kaa.rest": {"roles": ["application-admin"]}, "other": {"roles": ["endpoint-admin"]}}
        }));
        let want: ScopeSet = [
            Scope::EndpointRead,
            Scope::ApplicationRead,
            Scope::ApplicationMetadataKeysRead,
            Scope::FilterRead,
            Scope::ApplicationEndpointCreate,
            Scope::FilterCreate,
            Scope::FilterUpdate,
            Scope::FilterDelete,
            Scope::SelfRegistrationRead,
            Scope::SelfRegistrationUpdate,
        ]
        .into_iter()
        .collect();
        assert_eq!(g.scopes, want);
        assert!(
            !g.scopes.contains(Scope::EndpointDelete),
            "the other client's roles are not read"
        );
    }

    #[test]
    fn configured_roles_replace_the_defaults() {
        let m = ScopeMapper::new(
            &ScopeSettings {
                claims: vec!["realm_access.roles".into()],
                roles: BTreeMap::from([("ops".to_owned(), vec!["endpoint:delete".to_owned()])]),
            },
            true,
        );
        let g = m.grants(
            &json!({"realm_access": {"roles": ["ops", "endpoint-admin", "endpoint:read"]}}),
        );
        assert_eq!(g.scopes, set(&[Scope::EndpointDelete, Scope::EndpointRead]));
    }

    #[test]
    fn uma_permissions_per_resource_and_tenant_wide() {
        let g = mapper(&["authorization.permissions"]).grants(&json!({
            "authorization": {"permissions": [
                {"rsname": "endpoint-e1", "scopes": ["endpoint:read", "endpoint:update"]},
                {"rsname": "endpoint-e1", "scopes": ["endpoint:delete"]},
                {"rsname": "application-demo", "scopes": ["application:endpoint:create", "bogus"]},
                {"rsname": "tenant-system", "scopes": ["application:read"]},
                {"rsname": "kaa-system", "scopes": ["application:endpoint-filter:read"]},
                {"rsname": "endpoint-e2", "scopes": ["bogus"]},
                {"scopes": ["endpoint:read"]}
            ]}
        }));
        assert_eq!(g.scopes, set(&[Scope::ApplicationRead, Scope::FilterRead]));
        assert_eq!(
            g.resource_scopes.get("endpoint-e1"),
            Some(&set(&[
                Scope::EndpointRead,
                Scope::EndpointUpdate,
                Scope::EndpointDelete
            ]))
        );
        assert_eq!(
            g.resource_scopes.get("application-demo"),
            Some(&set(&[Scope::ApplicationEndpointCreate]))
        );
        assert!(!g.resource_scopes.contains_key("endpoint-e2"));
    }

    #[test]
    fn union_of_claims_in_order() {
        let g = mapper(&["scope", "scp", "realm_access.roles"]).grants(&json!({
            "scope": "endpoint:read",
            "scp": ["endpoint:delete"],
            "realm_access": {"roles": ["application-reader"]}
        }));
        assert_eq!(
            g.scopes,
            set(&[
                Scope::EndpointRead,
                Scope::EndpointDelete,
                Scope::ApplicationRead,
                Scope::ApplicationMetadataKeysRead,
                Scope::FilterRead
            ])
        );
    }

    #[test]
    fn malformed_claims_grant_nothing() {
        let g = mapper(&[
            "scope",
            "scp",
            "realm_access.roles",
            "authorization.permissions",
        ])
        .grants(&json!({
            "scope": ["endpoint:read"], "scp": 5, "realm_access": "endpoint-admin",
            "authorization": {"permissions": {"rsname": "tenant-system"}}
        }));
        assert_eq!(g, Grants::default());
    }

    #[test]
    fn without_authorization_every_scope() {
        let m = ScopeMapper::new(&ScopeSettings::default(), false);
        assert_eq!(m.grants(&json!({})).scopes, ScopeSet::all());
    }
}
