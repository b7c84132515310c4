//! Authentication of HTTP requests and the caller handlers authorize against.
//!
//! [`authenticate`] runs on every request but the open routes (`auth.open_routes`) and the
//! device routes ([`crate::DEVICE_ROUTES`]) while authentication is on: it reads `Authorization: Bearer <token>`, asks the
//! [`Authenticator`](epr_core::auth::Authenticator) and puts the [`Caller`] into the
//! request's extensions. It is not installed at all while authentication is off: the
//! [`Caller`] extractor then gives the anonymous principal (the default tenant, every
//! scope) without looking at any header. CORS preflights are answered by the CORS layer,
//! outside this one, so they need no token.
//!
//! Handlers authorize with [`Caller::require`] before touching the body or the store
//! where the resource is known from the path, so a refusal tells nothing about the
//! resource (not even whether it exists).

use crate::error::ApiError;
use crate::AppState;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use epr_core::auth::{AuthError, Authenticator, Forbidden, Principal, Resource, Scope};
use epr_core::ids::TenantId;
use std::sync::Arc;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

impl Caller {
    pub fn tenant(&self) -> &TenantId {
        &self.0.tenant
    }

    pub fn principal(&self) -> &Principal {
        &self.0
    }

    /// `Ok` when the caller holds `scope` on `resource`, else `403` naming the scope.
    pub fn require(&self, scope: Scope, resource: Resource<'_>) -> Result<(), ApiError> {
        Ok(self.0.require(scope, resource)?)
    }

    /// Whether the caller holds `scope` anywhere: tenant-wide or on at least one resource.
    pub fn holds_anywhere(&self, scope: Scope) -> bool {
        self.0.scopes.contains(scope) || self.0.resource_scopes.values().any(|s| s.contains(scope))
    }

    /// `403` unless the caller holds `scope` somewhere: checked before reading a body that
    /// names the resource, so a caller who can never succeed is refused without it.
    pub fn require_anywhere(&self, scope: Scope) -> Result<(), ApiError> {
        if self.holds_anywhere(scope) {
            return Ok(());
        }
        Err(Forbidden {
            scope,
            resource: Resource::Tenant.name(),
        }
        .into())
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        if let Some(c) = parts.extensions.get::<Caller>() {
            return Ok(c.clone());
        }
        if !s.auth.enabled() {
            return Ok(Caller(s.anonymous.clone()));
        }
        // Authentication is on but the middleware did not run: fail closed.
        Err(AuthError::Missing.into())
    }
}

/// What the middleware needs of [`AppState`].
pub(crate) struct Gate {
    pub auth: Arc<dyn Authenticator>,
    pub open_routes: Arc<[String]>,
}

/// The middleware: every request but the open routes needs a valid bearer token.
pub(crate) async fn authenticate(
    State(s): State<Arc<Gate>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    // Devices authenticate with the credential in their body (self-registration).
    if path.starts_with(crate::DEVICE_PREFIX) || s.open_routes.iter().any(|r| r == path) {
        return next.run(req).await;
    }
    let token = match bearer_token(req.headers()) {
        Ok(t) => t,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match s.auth.authenticate(token).await {
        Ok(principal) => {
            req.extensions_mut().insert(Caller(principal));
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The token of `Authorization: Bearer <token68>` (scheme in any case, one space). No
/// header: [`AuthError::Missing`]; any other form: [`AuthError::Invalid`], saying what is
/// wrong without echoing the value.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthError::Missing);
    };
    if values.next().is_some() {
        return Err(AuthError::Invalid(
            "more than one Authorization header".into(),
        ));
    }
    let malformed =
        || AuthError::Invalid("the Authorization header is not 'Bearer <token>'".into());
    // On bytes: the token68 check below admits ASCII only, so `HeaderValue::to_str`'s
    // own pass over the (~600-byte) value would be a second scan for nothing.
    let value = value.as_bytes();
    let space = value
        .iter()
        .position(|&b| b == b' ')
        .ok_or_else(malformed)?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthError::Invalid(
            "the Authorization scheme must be Bearer".into(),
        ));
    }
    if !is_token68(token) {
        return Err(malformed());
    }
    std::str::from_utf8(token).map_err(|_| malformed())
}

/// The token68 characters besides `=` (RFC 7235): ALPHA / DIGIT / "-" / "." / "_" / "~" /
/// "+" / "/". A table: this runs over every byte of every request's token.
const TOKEN68: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    t
};

/// RFC 7235 token68: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(t: &[u8]) -> bool {
    let body_len = t.len() - t.iter().rev().take_while(|&&b| b == b'=').count();
    let body = &t[..body_len];
    !body.is_empty() && body.iter().all(|&b| TOKEN68[b as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_forms() {
        assert_eq!(bearer_token(&with(&[])), Err(AuthError::Missing));
        for ok in [
            "Bearer abc.def-g_h",
            "bearer abc",
            "BEARER a+b/c==",
            "bEaReR x~",
        ] {
            assert!(bearer_token(&with(&[ok])).is_ok(), "{ok}");
        }
        assert_eq!(bearer_token(&with(&["Bearer a.b.c"])), Ok("a.b.c"));
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearer  abc",
            "Bearer abc def",
            "Bearer ===",
            "Bearer a=b",
            "Basic dXNlcjpwdw==",
            "Bearerabc",
            "Bearer ab\"c",
        ] {
            assert!(
                matches!(bearer_token(&with(&[bad])), Err(AuthError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            bearer_token(&with(&["Bearer a", "Bearer b"])),
            Err(AuthError::Invalid(_))
        ));
    }
}
