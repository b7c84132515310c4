//! Errors of the domain. The HTTP status mapping lives in one place, in the HTTP adapter.

use std::fmt;

/// Input that breaks a rule. `field` names the offending field (a JSON path such as
/// `appVersion.name` or a query parameter name), `rule` names the rule in a stable,
/// machine-readable way (`pattern`, `required`, `max-length`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: String,
    pub rule: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, rule: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule,
            message: message.into(),
        }
    }

    /// The same error reported under a different field name (e.g. when a path parameter and
    /// a body field share a validator).
    pub fn at(mut self, field: impl Into<String>) -> Self {
        self.field = field.into();
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Why a use case refused to act. None of these change anything in the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    #[error("{message}")]
    Conflict {
        field: &'static str,
        message: String,
    },
    /// Listing by a filter whose back-fill has not finished (its membership is incomplete).
    #[error("endpoint filter '{id}' is pending: its matches are still being computed; retry once it is active")]
    FilterPending { id: String },
    #[error("precondition failed: the current entity tag is {current}")]
    PreconditionFailed { current: String },
    /// A device's self-registration refused for a reason it is told (see
    /// [`crate::credentials::RefusalReason`]).
    #[error("{0}")]
    Refused(crate::credentials::Refusal),
    #[error("{field} is {actual} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        field: &'static str,
        actual: usize,
        limit: usize,
    },
}

impl DomainError {
    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            what,
            id: id.into(),
        }
    }
}
