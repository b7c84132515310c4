//! Use cases of device self-registration: a device registering itself under its
//! application's policy, and the operator's side (the policy, claim tokens, rejections).
//!
//! A device's request is checked in an order that tells an unauthenticated caller as
//! little as possible: the request's form, then whether the application (and version) is
//! known and open at all, then the credential, and only then the application's rules. What
//! only the store's transaction can decide (the claim token still unused, the ID free or
//! re-issued) is decided by [`crate::command::plan`] on [`Command::SelfRegister`].

use super::{Error, Registry};
use crate::command::{Command, Effect, Registration};
use crate::credentials::{
    claim_hash, hashes_equal, secret_hash, ClaimBinding, ClaimToken, IdPattern, Refusal,
    RefusalReason, Rejection, SelfRegistration,
};
use crate::endpoint::Precondition;
use crate::ids::{AppName, AppVersionName, ClaimId, EndpointId, EndpointToken, TenantId, TokenId};
use crate::metadata::Metadata;
use crate::ports::StoreError;
use crate::query::{Page, PageRequest};
use crate::self_registration::{etag_of, setting_key, Mode, Policy};
use crate::{DomainError, Timestamp, ValidationError};
use serde_json::Value;
use std::sync::Arc;

/// A device's registration request as received.
#[derive(Debug, Clone, Default)]
pub struct SelfRegisterInput {
    pub endpoint_id: Option<String>,
    pub app_version: Option<String>,
    pub metadata: Option<Value>,
    pub provisioning_secret: Option<String>,
    pub claim_token: Option<String>,
}

/// A successful self-registration: the endpoint's new token is returned once.
#[derive(Debug, Clone)]
pub struct SelfRegistered {
    pub endpoint_id: EndpointId,
    /// The endpoint's application version (a re-issue leaves the record as it was).
    pub app_version: AppVersionName,
    pub token: String,
    pub token_id: TokenId,
    /// `true`: the endpoint existed and got a new token (re-registration policy `reissue`).
    pub reregistered: bool,
}

/// An operator's request for claim tokens, as received (the HTTP layer parses `expiresAt`).
#[derive(Debug, Clone, Default)]
pub struct ClaimInput {
    pub claim_token: Option<String>,
    pub endpoint_id: Option<String>,
    pub endpoint_id_pattern: Option<String>,
    pub expires_at: Option<Timestamp>,
    pub ttl_seconds: Option<u64>,
    pub count: Option<u64>,
}

/// A claim token just created: the token itself (shown once) and its row.
#[derive(Debug, Clone)]
pub struct CreatedClaim {
    pub token: String,
    pub claim: ClaimToken,
}

/// How long a device request may use a policy text this replica read earlier: a policy
/// changed through another replica applies to this one's devices within this time.
pub const POLICY_MAX_AGE_MS: i64 = 1000;

/// The default lifetime of a claim token, and the longest.
pub const CLAIM_TTL_DEFAULT_SECS: u64 = 7 * 24 * 3600;
pub const CLAIM_TTL_MAX_SECS: u64 = 365 * 24 * 3600;
/// The most claim tokens one request creates.
pub const CLAIM_COUNT_MAX: u64 = 1000;
/// Length bounds of a claim token an operator chooses.
pub const CLAIM_MIN_CHARS: usize = 16;
pub const CLAIM_MAX_CHARS: usize = 512;

fn refused(reason: RefusalReason, message: impl Into<String>) -> Error {
    StoreError::Rejected(DomainError::Refused(Refusal::new(reason, message)))
}

fn refused_at(reason: RefusalReason, field: &str, message: impl Into<String>) -> Error {
    StoreError::Rejected(DomainError::Refused(
        Refusal::new(reason, message).with_field(field),
    ))
}

fn invalid(e: ValidationError) -> Error {
    refused_at(
        RefusalReason::InvalidRequest,
        &e.field.clone(),
        e.to_string(),
    )
}

impl Registry {
    /// A device registers itself in `app` of `tenant` (see the module documentation for
    /// the order of the checks). Every refusal is a [`DomainError::Refused`].
    pub async fn self_register(
        &self,
        tenant: &TenantId,
        app: &str,
        input: SelfRegisterInput,
        correlation_id: &str,
    ) -> Result<SelfRegistered, Error> {
        use RefusalReason::*;
        // The request's form.
        let version = input
            .app_version
            .as_deref()
            .ok_or_else(|| refused_at(InvalidRequest, "appVersion", "appVersion is required"))?;
        let version = AppVersionName::parse(version).map_err(|e| invalid(e.at("appVersion")))?;
        let given_id = input
            .endpoint_id
            .as_deref()
            .map(EndpointId::parse)
            .transpose()
            .map_err(invalid)?;
        let limits = self.limits();
        let metadata = match input.metadata {
            None | Some(Value::Null) => Metadata::empty(),
            Some(v) => Metadata::parse(v, "metadata", &limits).map_err(|e| match e {
                DomainError::Invalid(v) => invalid(v),
                DomainError::TooLarge { .. } => {
                    refused_at(MetadataTooLarge, "metadata", e.to_string())
                }
                other => StoreError::Rejected(other),
            })?,
        };
        let (secret, claim) = match (input.provisioning_secret, input.claim_token) {
            (Some(_), Some(_)) => {
                return Err(refused_at(
                    InvalidRequest,
                    "claimToken",
                    "give either provisioningSecret or claimToken, not both",
                ))
            }
            pair => pair,
        };
        // The application and version, in the tenant's catalogue.
        let unknown_app = || {
            refused_at(
                UnknownApplication,
                "applicationName",
                format!("application '{app}' is not known"),
            )
        };
        let app = AppName::parse(app).map_err(|_| unknown_app())?;
        let catalog = self.catalog(tenant);
        if !catalog.knows_app(&app) && !catalog.allows_unknown() {
            return Err(unknown_app());
        }
        match catalog.resolve(&version) {
            Ok(owner) if owner == app => {}
            _ => {
                return Err(refused_at(
                    UnknownApplication,
                    "appVersion",
                    format!("application version '{version}' is not a version of '{app}'"),
                ))
            }
        }
        // Open at all?
        let Some((policy, _)) = self.load_policy(tenant, &app, POLICY_MAX_AGE_MS).await? else {
            return Err(refused(
                Closed,
                format!("self-registration is closed for application '{app}'"),
            ));
        };
        let rules = policy.rules_for(&version);
        if rules.mode == Mode::Closed {
            return Err(refused(
                Closed,
                format!("self-registration is closed for application '{app}' version '{version}'"),
            ));
        }
        // The credential.
        let now = self.clock.now();
        let (id, claim) = match (secret, claim) {
            (None, None) => {
                return Err(refused(
                    CredentialMissing,
                    "a credential is required: provisioningSecret or claimToken",
                ))
            }
            (Some(secret), None) => {
                let Some(expected) = policy
                    .provisioning_secret
                    .filter(|_| rules.mode == Mode::Open)
                else {
                    return Err(refused_at(
                        ClaimTokenRequired,
                        "provisioningSecret",
                        "this application accepts claim tokens only",
                    ));
                };
                if !hashes_equal(&secret_hash(&app, &secret), &expected) {
                    return Err(refused_at(
                        CredentialInvalid,
                        "provisioningSecret",
                        "the provisioning secret is not valid",
                    ));
                }
                let id = match given_id {
                    Some(id) => id,
                    None => EndpointId::parse(&self.ids.endpoint_id())?,
                };
                (id, None)
            }
            (None, Some(claim)) => {
                let hash = claim_hash(&app, &claim);
                let row = self
                    .store
                    .find_claim(tenant, &app, &hash)
                    .await?
                    .ok_or_else(|| {
                        refused_at(
                            CredentialInvalid,
                            "claimToken",
                            "the claim token is not valid",
                        )
                    })?;
                let id = match (given_id, &row.binding) {
                    (Some(id), _) => id,
                    // A claim made for one endpoint names it: the device need not.
                    (None, ClaimBinding::Endpoint(e)) => e.clone(),
                    (None, _) => EndpointId::parse(&self.ids.endpoint_id())?,
                };
                row.check(&app, &id, now).map_err(|r| {
                    StoreError::Rejected(DomainError::Refused(r.with_field("claimToken")))
                })?;
                (id, Some(hash))
            }
            (Some(_), Some(_)) => unreachable!("refused above"),
        };
        // The version's rules.
        rules
            .check_endpoint_id(&id)
            .map_err(|r| StoreError::Rejected(DomainError::Refused(r)))?;
        rules
            .check_metadata(&metadata)
            .map_err(|r| StoreError::Rejected(DomainError::Refused(r)))?;
        // Register (or re-issue) with a new token.
        let token = EndpointToken::parse(&self.ids.token())?;
        let token_id = TokenId::parse(&self.ids.token_id())?;
        let cmd = Command::SelfRegister(SelfRegistration {
            registration: Registration {
                id: id.clone(),
                app: app.clone(),
                app_version: version,
                metadata,
                token_hash: token.hash(&app),
                token_id: token_id.clone(),
            },
            claim,
            reregistration: policy.reregistration,
        });
        let effect = match self
            .store
            .execute(cmd, self.ctx(tenant, correlation_id))
            .await
        {
            Ok(effect) => effect,
            // A store that finds the ID taken before planning says so as a conflict.
            Err(StoreError::Rejected(DomainError::Conflict {
                field: "endpointId",
                message,
            })) => return Err(refused_at(AlreadyRegistered, "endpointId", message)),
            Err(e) => return Err(e),
        };
        let reregistered = matches!(effect, Effect::Unchanged(_));
        let ep = effect.endpoint();
        Ok(SelfRegistered {
            endpoint_id: ep.id.clone(),
            app_version: ep.app_version.clone(),
            token: token.into_string(),
            token_id,
            reregistered,
        })
    }

    /// Records a refused self-registration for the operator.
    pub async fn record_rejection(
        &self,
        tenant: &TenantId,
        rejection: Rejection,
    ) -> Result<(), Error> {
        self.store.record_rejection(tenant, rejection).await
    }

    /// An application's refused self-registrations, newest first.
    pub async fn list_rejections(
        &self,
        tenant: &TenantId,
        app: &str,
        page: PageRequest,
    ) -> Result<Page<Rejection>, Error> {
        let app = self.check_app(tenant, app)?;
        self.store.list_rejections(tenant, &app, page).await
    }

    /// The stored policy and its entity tag; `None` when there is none (an empty setting
    /// is a deleted policy: settings cannot be removed).
    async fn load_policy(
        &self,
        tenant: &TenantId,
        app: &AppName,
        max_age_ms: i64,
    ) -> Result<Option<(Arc<Policy>, String)>, Error> {
        let limits = self.limits();
        let key = (tenant.clone(), app.clone());
        let now = self.clock.now();
        if max_age_ms > 0 {
            let cache = self.policies.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((text, l, policy, read_at)) = cache.get(&key) {
                if *l == limits && now.0.saturating_sub(read_at.0) < max_age_ms {
                    return Ok(Some((Arc::clone(policy), etag_of(text))));
                }
            }
        }
        let Some(text) = self
            .store
            .get_setting(&setting_key(tenant, app))
            .await?
            .filter(|t| !t.is_empty())
        else {
            self.forget_policy(tenant, app);
            return Ok(None);
        };
        let cached = {
            let mut cache = self.policies.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get_mut(&key)
                .filter(|(t, l, _, _)| *t == text && *l == limits)
                .map(|(_, _, p, read_at)| {
                    *read_at = now;
                    Arc::clone(p)
                })
        };
        let policy = match cached {
            Some(p) => p,
            None => {
                let policy = Arc::new(Policy::from_stored(&text, &limits).map_err(|e| {
                    StoreError::Unavailable(
                        format!(
                            "the stored self-registration policy of application '{app}' \
                             cannot be read: {e}"
                        )
                        .into(),
                    )
                })?);
                let mut cache = self.policies.lock().unwrap_or_else(|p| p.into_inner());
                // Bounded: an entry per application with a policy; cleared wholesale if a
                // tenant churn ever makes it large.
                if cache.len() >= 10_000 {
                    cache.clear();
                }
                cache.insert(key, (text.clone(), limits, Arc::clone(&policy), now));
                policy
            }
        };
        let tag = etag_of(&text);
        Ok(Some((policy, tag)))
    }

    /// Drops a cached policy (this replica changed or removed it).
    fn forget_policy(&self, tenant: &TenantId, app: &AppName) {
        let mut cache = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        cache.remove(&(tenant.clone(), app.clone()));
    }

    /// An application's self-registration policy and its entity tag (`404` when none).
    pub async fn self_registration_policy(
        &self,
        tenant: &TenantId,
        app: &str,
    ) -> Result<(Policy, String), Error> {
        let app = self.check_app(tenant, app)?;
        self.load_policy(tenant, &app, 0)
            .await?
            .map(|(p, tag)| (Policy::clone(&p), tag))
            .ok_or_else(|| DomainError::not_found("self-registration policy", app.as_str()).into())
    }

    /// Sets an application's policy from its REST form; `If-Match` is checked against the
    /// current one first. Answers the policy, its tag, and whether it is new. Two
    /// concurrent writes on different replicas are last-writer-wins once past `If-Match`
    /// (docs/self-registration.md).
    pub async fn put_self_registration_policy(
        &self,
        tenant: &TenantId,
        app: &str,
        doc: &Value,
        precondition: Precondition,
    ) -> Result<(Policy, String, bool), Error> {
        let app = self.check_app(tenant, app)?;
        let current = self.load_policy(tenant, &app, 0).await?;
        // The body first (here and the versions below): a malformed document is 400
        // whatever the precondition says.
        let policy = Policy::from_rest(
            doc,
            current.as_ref().map(|(p, _)| &**p),
            &app,
            &self.limits(),
        )?;
        let catalog = self.catalog(tenant);
        for version in policy.versions.keys() {
            if let Ok(owner) = catalog.resolve(version) {
                if owner != app {
                    return Err(DomainError::from(ValidationError::new(
                        format!("versions.{version}"),
                        "same-application",
                        format!(
                            "application version '{version}' belongs to application '{owner}', \
                             not '{app}'"
                        ),
                    ))
                    .into());
                }
            }
        }
        check_precondition(&precondition, current.as_ref().map(|(_, t)| t.as_str()))?;
        let stored = policy.to_stored();
        self.store
            .put_setting(&setting_key(tenant, &app), &stored)
            .await?;
        self.forget_policy(tenant, &app);
        Ok((policy, etag_of(&stored), current.is_none()))
    }

    /// Removes an application's policy: self-registration is closed again.
    pub async fn delete_self_registration_policy(
        &self,
        tenant: &TenantId,
        app: &str,
        precondition: Precondition,
    ) -> Result<(), Error> {
        let app = self.check_app(tenant, app)?;
        let Some((_, tag)) = self.load_policy(tenant, &app, 0).await? else {
            return Err(DomainError::not_found("self-registration policy", app.as_str()).into());
        };
        check_precondition(&precondition, Some(&tag))?;
        self.store
            .put_setting(&setting_key(tenant, &app), "")
            .await?;
        self.forget_policy(tenant, &app);
        Ok(())
    }

    /// Creates `count` claim tokens (one when the token is given) in one durable write.
    pub async fn create_claims(
        &self,
        tenant: &TenantId,
        app: &str,
        input: ClaimInput,
    ) -> Result<Vec<CreatedClaim>, Error> {
        let app = self.check_app(tenant, app)?;
        let bad = |field: &str, rule: &'static str, message: String| -> Error {
            DomainError::from(ValidationError::new(field, rule, message)).into()
        };
        let count = input.count.unwrap_or(1);
        if !(1..=CLAIM_COUNT_MAX).contains(&count) {
            return Err(bad(
                "count",
                "range",
                format!("count must be from 1 to {CLAIM_COUNT_MAX}"),
            ));
        }
        if let Some(t) = &input.claim_token {
            if count > 1 {
                return Err(bad(
                    "count",
                    "exclusive",
                    "a given claimToken makes one claim token: leave count out or set it to 1"
                        .into(),
                ));
            }
            let n = t.chars().count();
            if !(CLAIM_MIN_CHARS..=CLAIM_MAX_CHARS).contains(&n) {
                return Err(bad(
                    "claimToken",
                    "length",
                    format!(
                        "claimToken must be {CLAIM_MIN_CHARS} to {CLAIM_MAX_CHARS} characters \
                         long"
                    ),
                ));
            }
            if t.chars().any(char::is_control) {
                return Err(bad(
                    "claimToken",
                    "pattern",
                    "claimToken must not contain control characters".into(),
                ));
            }
        }
        let binding = match (&input.endpoint_id, &input.endpoint_id_pattern) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "endpointIdPattern",
                    "exclusive",
                    "bind a claim token to an endpointId or to an endpointIdPattern, not both"
                        .into(),
                ))
            }
            (Some(id), None) => ClaimBinding::Endpoint(EndpointId::parse(id)?),
            (None, Some(p)) => ClaimBinding::Pattern(IdPattern::parse(p, "endpointIdPattern")?),
            (None, None) => ClaimBinding::Any,
        };
        let now = self.clock.now();
        let max = now.0.saturating_add(CLAIM_TTL_MAX_SECS as i64 * 1000);
        let expires = match (input.expires_at, input.ttl_seconds) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "ttlSeconds",
                    "exclusive",
                    "give expiresAt or ttlSeconds, not both".into(),
                ))
            }
            (Some(at), None) => {
                if at.0 <= now.0 || at.0 > max {
                    return Err(bad(
                        "expiresAt",
                        "range",
                        "expiresAt must be in the future and at most 365 days ahead".into(),
                    ));
                }
                at
            }
            (None, ttl) => {
                let ttl = ttl.unwrap_or(CLAIM_TTL_DEFAULT_SECS);
                if !(1..=CLAIM_TTL_MAX_SECS).contains(&ttl) {
                    return Err(bad(
                        "ttlSeconds",
                        "range",
                        format!("ttlSeconds must be from 1 to {CLAIM_TTL_MAX_SECS} (365 days)"),
                    ));
                }
                Timestamp(now.0 + ttl as i64 * 1000)
            }
        };
        let mut created = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let token = match &input.claim_token {
                Some(t) => t.clone(),
                // Two generated tokens: well over 128 random bits.
                None => format!("{}{}", self.ids.token(), self.ids.token()).replace('-', ""),
            };
            let claim = ClaimToken {
                id: ClaimId::parse(&self.ids.token_id())?,
                app: app.clone(),
                hash: claim_hash(&app, &token),
                created: now,
                expires,
                binding: binding.clone(),
                used: None,
            };
            created.push(CreatedClaim { token, claim });
        }
        self.store
            .create_claims(tenant, created.iter().map(|c| c.claim.clone()).collect())
            .await?;
        Ok(created)
    }

    pub async fn list_claims(
        &self,
        tenant: &TenantId,
        app: &str,
        page: PageRequest,
    ) -> Result<Page<ClaimToken>, Error> {
        let app = self.check_app(tenant, app)?;
        self.store.list_claims(tenant, &app, page).await
    }

    pub async fn get_claim(
        &self,
        tenant: &TenantId,
        app: &str,
        id: &str,
    ) -> Result<ClaimToken, Error> {
        let app = self.check_app(tenant, app)?;
        let id = ClaimId::parse(id)?;
        self.store
            .get_claim(tenant, &app, &id)
            .await?
            .ok_or_else(|| DomainError::not_found("claim token", id.as_str()).into())
    }

    pub async fn delete_claim(&self, tenant: &TenantId, app: &str, id: &str) -> Result<(), Error> {
        let app = self.check_app(tenant, app)?;
        let id = ClaimId::parse(id)?;
        if self.store.delete_claim(tenant, &app, &id).await? {
            Ok(())
        } else {
            Err(DomainError::not_found("claim token", id.as_str()).into())
        }
    }
}

/// `If-Match` against the current policy's tag (`None`: there is none, which fails any
/// precondition but the absent one).
fn check_precondition(pre: &Precondition, current: Option<&str>) -> Result<(), Error> {
    match (pre, current) {
        (Precondition::None, _) => Ok(()),
        (_, None) => Err(DomainError::PreconditionFailed {
            current: "(none: no policy is set)".into(),
        }
        .into()),
        (pre, Some(tag)) => Ok(pre.check_tag(tag.to_owned())?),
    }
}
