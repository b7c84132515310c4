//! Database errors as store errors. Every failure of the database (unreachable, restarted,
//! timed out, constraint the domain did not foresee) is `StoreError::Unavailable`: the HTTP
//! layer answers 503 with `Retry-After`, and nothing is acknowledged.

use epr_core::ports::StoreError;
use tokio_postgres::error::SqlState;

pub(crate) fn db(e: tokio_postgres::Error) -> StoreError {
    metrics::counter!("epr_pg_errors_total", "kind" => kind(&e)).increment(1);
    StoreError::Unavailable(Box::new(e))
}

pub(crate) fn pool(e: deadpool_postgres::PoolError) -> StoreError {
    metrics::counter!("epr_pg_errors_total", "kind" => "pool").increment(1);
    StoreError::Unavailable(Box::new(e))
}

pub(crate) fn msg(m: impl Into<String>) -> StoreError {
    StoreError::Unavailable(m.into().into())
}

/// A stored value this build cannot read (the database was written by something else).
pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    msg(format!("stored {what} cannot be read: {e}"))
}

/// Whether a transaction failed only because of concurrency (deadlock, serialization) and
/// can be retried as a whole.
pub(crate) fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

fn kind(e: &tokio_postgres::Error) -> &'static str {
    match e.code() {
        None if e.is_closed() => "closed",
        None => "connection",
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => "deadlock",
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => "serialization",
        Some(c) if *c == SqlState::QUERY_CANCELED => "timeout",
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => "unique",
        Some(_) => "other",
    }
}
