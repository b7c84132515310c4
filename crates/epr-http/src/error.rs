//! The one place where domain and store errors become HTTP responses.
//!
//! Body: `{"status", "error", "message", "field"?, "rule"?}`. `message` is Kaa's error
//! field; `field` and `rule` say which input broke which rule. 5xx bodies are opaque and
//! the cause is logged, at most once per interval with a count of the repeats (a full disk
//! fails every request). Every 503 carries `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use epr_core::auth::{AuthError, Forbidden};
use epr_core::credentials::{Refusal, RefusalReason};
use epr_core::log_gate::{LogGate, DEFAULT_LOG_INTERVAL};
use epr_core::ports::StoreError;
use epr_core::{DomainError, ValidationError};
use serde::Serialize;

/// Seconds a client is asked to wait before retrying a 503 (`Retry-After`).
pub const RETRY_AFTER_SECS: u32 = 1;

/// "Store unavailable" repeats on every request while the cause lasts: one line per
/// interval says it.
static STORE_UNAVAILABLE_LOG: LogGate = LogGate::new(DEFAULT_LOG_INTERVAL);

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
    pub rule: Option<String>,
    /// The `WWW-Authenticate` challenge of a 401.
    pub challenge: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    status: u16,
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
            rule: None,
            challenge: None,
        }
    }

    pub fn with(mut self, field: impl Into<String>, rule: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self.rule = Some(rule.into());
        self
    }

    pub fn bad_request(field: impl Into<String>, rule: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message).with(field, rule)
    }

    /// A refused self-registration: `rule` is the machine-readable reason.
    pub fn refused(r: Refusal) -> Self {
        use RefusalReason::*;
        let status = match r.reason {
            InvalidRequest => StatusCode::BAD_REQUEST,
            UnknownApplication => StatusCode::NOT_FOUND,
            CredentialMissing | CredentialInvalid | ClaimTokenRequired | ClaimTokenUsed
            | ClaimTokenExpired => StatusCode::UNAUTHORIZED,
            Closed | ClaimTokenWrongEndpoint | EndpointIdNotAllowed => StatusCode::FORBIDDEN,
            MetadataKeyMissing | MetadataValueNotAllowed | MetadataTooLarge => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AlreadyRegistered => StatusCode::CONFLICT,
            RateLimited => StatusCode::TOO_MANY_REQUESTS,
        };
        let mut err = Self::new(status, r.message);
        err.field = r.field;
        err.rule = Some(r.reason.as_str().to_owned());
        if status == StatusCode::UNAUTHORIZED {
            err.challenge = Some(format!("Provisioning realm=\"{REALM}-device\""));
        }
        err
    }
}

impl From<ValidationError> for ApiError {
    fn from(v: ValidationError) -> Self {
        let message = v.to_string();
        Self::new(StatusCode::BAD_REQUEST, message).with(v.field, v.rule)
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> Self {
        let message = e.to_string();
        match e {
            DomainError::Invalid(v) => v.into(),
            DomainError::NotFound { what, .. } => {
                let field = match what {
                    "endpoint" => "endpointId",
                    "metadata key" => "metadataKey",
                    "batch task" => "taskId",
                    "application" => "applicationName",
                    "endpoint filter" => "filterId",
                    "self-registration policy" => "applicationName",
                    "claim token" => "claimTokenId",
                    "endpoint token" => "endpointTokenId",
                    other => other,
                };
                Self::new(StatusCode::NOT_FOUND, message).with(field, "exists")
            }
            // A token's refused life-cycle step is the one conflict that is not a taken name.
            DomainError::Conflict {
                field: "status", ..
            } => Self::new(StatusCode::CONFLICT, message).with("status", "transition"),
            DomainError::Conflict { field, .. } => {
                Self::new(StatusCode::CONFLICT, message).with(field, "unique")
            }
            DomainError::FilterPending { .. } => {
                Self::new(StatusCode::CONFLICT, message).with("filterId", "filter-active")
            }
            DomainError::PreconditionFailed { .. } => {
                Self::new(StatusCode::PRECONDITION_FAILED, message).with("If-Match", "etag-match")
            }
            DomainError::TooLarge { field, .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, message).with(field, "max-bytes")
            }
            DomainError::Refused(r) => Self::refused(r),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Rejected(d) => d.into(),
            StoreError::Unavailable(cause) => {
                if let Some(suppressed) = STORE_UNAVAILABLE_LOG.admit(std::time::Instant::now()) {
                    tracing::error!(
                        error = %cause,
                        suppressed,
                        "store unavailable (repeats are logged at most every {}s, counted in \
                         `suppressed`)",
                        DEFAULT_LOG_INTERVAL.as_secs()
                    );
                }
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the store is unavailable; retry later",
                )
            }
        }
    }
}

/// "Cannot check tokens now" repeats on every request while the issuer is unreachable.
static AUTH_UNAVAILABLE_LOG: LogGate = LogGate::new(DEFAULT_LOG_INTERVAL);

/// The realm of every bearer challenge.
pub const REALM: &str = "epr";

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => {
                let mut err = Self::new(StatusCode::UNAUTHORIZED, AuthError::Missing.to_string())
                    .with("Authorization", "bearer-token");
                err.challenge = Some(format!("Bearer realm=\"{REALM}\""));
                err
            }
            AuthError::Invalid(why) => {
                let mut err = Self::new(
                    StatusCode::UNAUTHORIZED,
                    format!("the access token is not valid: {why}"),
                )
                .with("Authorization", "valid-token");
                err.challenge = Some(format!(
                    "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                    challenge_text(&why)
                ));
                err
            }
            AuthError::Unavailable(cause) => {
                if let Some(suppressed) = AUTH_UNAVAILABLE_LOG.admit(std::time::Instant::now()) {
                    tracing::error!(
                        error = %cause,
                        suppressed,
                        "access tokens cannot be checked (repeats are logged at most every {}s, \
                         counted in `suppressed`)",
                        DEFAULT_LOG_INTERVAL.as_secs()
                    );
                }
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the access token cannot be checked now; retry later",
                )
            }
        }
    }
}

impl From<Forbidden> for ApiError {
    fn from(e: Forbidden) -> Self {
        let rule = format!("scope:{}", e.scope);
        Self::new(StatusCode::FORBIDDEN, e.to_string()).with("Authorization", rule)
    }
}

/// `error_description` is a quoted-string limited to printable ASCII without `"` and `\`
/// (RFC 6750 §3): anything else is replaced, and the text is kept short.
fn challenge_text(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            status: self.status.as_u16(),
            error: self.status.canonical_reason().unwrap_or("Error"),
            message: &self.message,
            field: self.field.as_deref(),
            rule: self.rule.as_deref(),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (self.status, bytes).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(v) = self
            .challenge
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_quoted_string_safe() {
        let e = ApiError::from(AuthError::Invalid("bad \"kid\" \\ \u{7f} é".into()));
        let c = e.challenge.unwrap();
        assert_eq!(
            c,
            "Bearer realm=\"epr\", error=\"invalid_token\", error_description=\"bad 'kid' / ? ?\""
        );
        assert!(HeaderValue::from_str(&c).is_ok());
        let e = ApiError::from(AuthError::Missing);
        assert_eq!(e.challenge.as_deref(), Some("Bearer realm=\"epr\""));
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn forbidden_names_the_scope() {
        let e = ApiError::from(Forbidden {
            scope: epr_core::auth::Scope::EndpointRead,
            resource: "endpoint-e1".into(),
        });
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.rule.as_deref(), Some("scope:endpoint:read"));
        assert!(
            e.message.contains("endpoint:read on endpoint-e1"),
            "{}",
            e.message
        );
    }

    /// A database outage (any backend) is 503 with `Retry-After` and a JSON body that says
    /// to retry, without the cause (logged instead: it may name hosts or SQL).
    #[tokio::test]
    async fn store_unavailable_is_503_with_retry_after() {
        let e = ApiError::from(StoreError::Unavailable(
            "connection refused: postgres://db.internal:5432".into(),
        ));
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["status"], 503);
        assert_eq!(json["message"], "the store is unavailable; retry later");
        assert!(!String::from_utf8_lossy(&body).contains("db.internal"));
    }
}
