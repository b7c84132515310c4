//! Bearer token → principal: the cache first, else the issuer selected by `iss`, its key by
//! `kid`, the signature and the time and audience claims.

use crate::cache::{key_of, Cached, TokenCache};
use crate::directory::Directory;
use crate::jwks::KeyMiss;
use crate::scopes::ScopeMapper;
use base64::Engine;
use epr_core::auth::{AuthError, Principal};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Verifier {
    pub accepted: Vec<Algorithm>,
    pub leeway: u64,
    pub mapper: ScopeMapper,
    pub cache: TokenCache,
    pub http: crate::http::HttpClient,
}

fn invalid(reason: &str) -> AuthError {
    AuthError::Invalid(reason.to_owned())
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Verifier {
    pub async fn authenticate(
        &self,
        dir: &Directory,
        token: &str,
    ) -> Result<Arc<Principal>, AuthError> {
        let key = key_of(token);
        let now = now_secs();
        if let Some(hit) = self.cache.get(&key) {
            match self.still_valid(dir, &hit, now) {
                Ok(true) => return Ok(hit.principal.clone()),
                Ok(false) => self.cache.remove(&key),
                Err(e) => {
                    self.cache.remove(&key);
                    return Err(e);
                }
            }
        }
        let (principal, cached) = self.verify(dir, token).await?;
        self.cache.insert(key, cached, now);
        Ok(principal)
    }

    /// A cached token: `Ok(false)` if it must be verified again (its key is gone).
    fn still_valid(&self, dir: &Directory, hit: &Cached, now: i64) -> Result<bool, AuthError> {
        if now > hit.exp.saturating_add(self.leeway as i64) {
            return Err(invalid("the access token has expired"));
        }
        let st = dir.state();
        match st.by_id.get(&hit.tenant) {
            Some(t) if t.spec.issuer == hit.issuer => Ok(t.keys.contains(&hit.key_id)),
            Some(_) => Ok(false),
            None if st.removed_issuers.contains_key(&hit.issuer) => {
                Err(invalid("tenant unregistered"))
            }
            None => Err(invalid("unknown issuer")),
        }
    }

    async fn verify(
        &self,
        dir: &Directory,
        token: &str,
    ) -> Result<(Arc<Principal>, Cached), AuthError> {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(_) => {
                return Err(match raw_alg(token) {
                    Some(a) => invalid(&format!("the token algorithm {a} is not accepted")),
                    None => invalid("the access token is malformed"),
                })
            }
        };
        if !self.accepted.contains(&header.alg) {
            return Err(invalid(&format!(
                "the token algorithm {:?} is not accepted",
                header.alg
            )));
        }
        // The issuer selects the tenant (and its keys) before any signature check; an
        // unknown issuer causes no fetch.
        let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| invalid("the access token is malformed"))?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("the access token has no issuer (iss)"))?;
        let st = dir.state();
        let tenant = match st.by_issuer.get(iss) {
            Some(t) => t.clone(),
            None if st.removed_issuers.contains_key(iss) => {
                return Err(invalid("tenant unregistered"))
            }
            None => return Err(invalid("unknown issuer")),
        };
        drop(st);
        let keys = match tenant
            .keys
            .find(&self.http, header.kid.as_deref(), header.alg)
            .await
        {
            Ok(k) => k,
            Err(KeyMiss::Unknown) => return Err(invalid("unknown signing key")),
            Err(KeyMiss::Unavailable(why)) => return Err(AuthError::Unavailable(why)),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[iss]);
        validation.set_audience(&tenant.spec.audiences);
        let mut last = None;
        for k in &keys {
            match jsonwebtoken::decode::<Value>(token, &k.key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    // Checked present and numeric by `decode`; a fractional `exp` is cut to seconds.
                    let exp = claims
                        .get("exp")
                        .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
                        .unwrap_or(0);
                    let grants = self.mapper.grants(&claims);
                    let principal = Arc::new(Principal {
                        tenant: tenant.spec.id.clone(),
                        subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
                        scopes: grants.scopes,
                        resource_scopes: grants.resource_scopes,
                        expires_at_ms: Some(exp.saturating_mul(1000)),
                    });
                    let cached = Cached {
                        principal: principal.clone(),
                        exp,
                        tenant: tenant.spec.id.clone(),
                        issuer: tenant.spec.issuer.clone(),
                        key_id: k.id.clone(),
                    };
                    return Ok((principal, cached));
                }
                Err(e) => {
                    // A bad signature with one kid-less key may verify with the next one;
                    // every other failure is the token's, whatever the key.
                    if *e.kind() != ErrorKind::InvalidSignature {
                        return Err(reason(e.kind()));
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.map_or_else(|| invalid("unknown signing key"), |e| reason(e.kind())))
    }
}

fn reason(kind: &ErrorKind) -> AuthError {
    invalid(match kind {
        ErrorKind::ExpiredSignature => "the access token has expired",
        ErrorKind::ImmatureSignature => "the access token is not valid yet (nbf)",
        ErrorKind::InvalidAudience => "the access token is not meant for this service (aud)",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => "the access token has no expiry (exp)",
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
            "the access token has no audience (aud)"
        }
        ErrorKind::MissingRequiredClaim(_) => "the access token lacks a required claim",
        ErrorKind::InvalidClaimFormat(_) => "a claim of the access token has the wrong type",
        ErrorKind::InvalidAlgorithm => "the key does not match the token algorithm",
        _ => "the access token is malformed",
    })
}

/// The header's `alg` when jsonwebtoken could not parse the header (e.g. `none`), to say
/// why the token is refused.
fn raw_alg(token: &str) -> Option<String> {
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let alg = v.get("alg")?.as_str()?;
    // Only a short printable name is echoed.
    (alg.len() <= 16 && alg.chars().all(|c| c.is_ascii_alphanumeric())).then(|| alg.to_owned())
}
