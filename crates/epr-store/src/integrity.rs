//! Detection of a damaged database file: a check when the store opens, and a latch that
//! turns writes off once SQLite reports corruption at run time.
//!
//! A database damaged on disk (a bad sector, a copy taken mid-write, a stray write) still
//! opens, and SQLite reports the damage only when a statement reads a damaged page. Left
//! alone, reads of those pages fail while new writes keep landing in the damaged file.
//! So: `PRAGMA quick_check` (or `integrity_check`) at open refuses to start on a damaged
//! file, and the first `SQLITE_CORRUPT` / `SQLITE_NOTADB` seen by the writer or a reader
//! latches the store into a "corrupted" state: writes are refused at once, readiness goes
//! down naming the reason, `epr_store_corruption_detected` is 1 and one ERROR line is
//! logged. Reads go on (what is undamaged can still be read or exported). The way back is
//! a restore from a backup.

use epr_core::ports::StoreError;
use rusqlite::{Connection, ErrorCode};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How thoroughly the database is checked when the store opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IntegrityCheck {
    /// `PRAGMA quick_check`: every page and record is well formed; indexes are not compared
    /// with their tables. Linear in the file size.
    #[default]
    Quick,
    /// `PRAGMA integrity_check`: also that every index matches its table. Several times
    /// slower than `quick`.
    Full,
    /// No check at open (damage is then found only by the statements that meet it).
    Off,
}

impl IntegrityCheck {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "quick" => Some(Self::Quick),
            "full" => Some(Self::Full),
            "off" => Some(Self::Off),
            _ => None,
        }
    }

    fn pragma(self) -> Option<&'static str> {
        match self {
            Self::Quick => Some("quick_check"),
            Self::Full => Some("integrity_check"),
            Self::Off => None,
        }
    }
}

/// Problems listed in the start-up error (SQLite can report thousands).
const REPORTED_PROBLEMS: usize = 5;

/// Runs the configured check on an open connection; `Err` names the file and the first
/// problems found.
pub(crate) fn check_at_open(
    conn: &Connection,
    path: &Path,
    mode: IntegrityCheck,
) -> Result<(), StoreError> {
    let Some(pragma) = mode.pragma() else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    let damaged = |detail: String| {
        StoreError::Unavailable(
            format!(
                "the database file {} is damaged ({pragma} failed: {detail}); \
                 restore it from a backup (see the README, \"Storage and durability\")",
                path.display()
            )
            .into(),
        )
    };
    // The answer is one row "ok", or one row per problem (up to 100 by default).
    let rows = (|| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!("PRAGMA {pragma}({})", REPORTED_PROBLEMS))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    })();
    match rows {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => {
            tracing::info!(
                path = %path.display(),
                check = pragma,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "database check passed"
            );
            Ok(())
        }
        Ok(rows) => Err(damaged(rows.join("; "))),
        Err(e) if is_corruption_code(&e) => Err(damaged(e.to_string())),
        Err(e) => Err(StoreError::Unavailable(Box::new(e))),
    }
}

fn is_corruption_code(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Whether an error (or one of its causes) is SQLite reporting a damaged file.
pub(crate) fn is_corruption(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.downcast_ref::<rusqlite::Error>()
            .is_some_and(is_corruption_code)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The run-time state of the database file, shared by the writer and the readers.
#[derive(Debug)]
pub(crate) struct StoreHealth {
    path: PathBuf,
    /// Set once, by the first statement that met a damaged page; never cleared (the file
    /// does not heal while the process runs).
    corrupted: OnceLock<String>,
}

impl StoreHealth {
    pub(crate) fn new(path: PathBuf) -> Self {
        metrics::gauge!("epr_store_corruption_detected").set(0.0);
        Self {
            path,
            corrupted: OnceLock::new(),
        }
    }

    /// The reason writes are refused, once the file is known to be damaged. One atomic load:
    /// cheap enough for every write.
    pub(crate) fn corrupted(&self) -> Option<&str> {
        self.corrupted.get().map(String::as_str)
    }

    /// The error every write gets once the file is known to be damaged.
    pub(crate) fn refusal(&self) -> Option<StoreError> {
        self.corrupted()
            .map(|reason| StoreError::Unavailable(reason.to_owned().into()))
    }

    /// Looks at a store error; a corruption report latches the corrupted state (logged and
    /// counted once).
    pub(crate) fn observe(&self, err: &StoreError) {
        if let StoreError::Unavailable(cause) = err {
            if is_corruption(cause.as_ref()) {
                self.latch(&cause.to_string());
            }
        }
    }

    /// Same as [`StoreHealth::observe`], for a SQLite error not yet wrapped.
    pub(crate) fn observe_sqlite(&self, err: &rusqlite::Error) {
        if is_corruption_code(err) {
            self.latch(&err.to_string());
        }
    }

    /// Refuses writes from now on for a failure that is not damage to the file (a failed
    /// sync of the WAL): readiness goes DOWN, and a restart recovers what is on disk.
    pub(crate) fn refuse_writes(&self, cause: &str) {
        let mut first = false;
        self.corrupted.get_or_init(|| {
            first = true;
            format!("{cause}; writes are refused until the server restarts")
        });
        if first {
            tracing::error!(
                path = %self.path.display(),
                error = %cause,
                "the store cannot make writes durable: writes are refused from now on and \
                 readiness is DOWN; restart the server"
            );
        }
    }

    fn latch(&self, cause: &str) {
        let mut first = false;
        self.corrupted.get_or_init(|| {
            first = true;
            format!(
                "the database file {} is damaged ({cause}); writes are refused until it is \
                 restored from a backup",
                self.path.display()
            )
        });
        if first {
            metrics::gauge!("epr_store_corruption_detected").set(1.0);
            tracing::error!(
                path = %self.path.display(),
                error = %cause,
                "database corruption detected: writes are refused from now on and readiness \
                 is DOWN; restore the data directory from a backup"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrity_check_names_parse() {
        assert_eq!(IntegrityCheck::parse("quick"), Some(IntegrityCheck::Quick));
        assert_eq!(IntegrityCheck::parse("full"), Some(IntegrityCheck::Full));
        assert_eq!(IntegrityCheck::parse("off"), Some(IntegrityCheck::Off));
        assert_eq!(IntegrityCheck::parse("fast"), None);
    }

    #[test]
    fn corruption_latches_once_and_other_errors_do_not() {
        let health = StoreHealth::new(PathBuf::from("/data/epr.sqlite3"));
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        health.observe(&StoreError::Unavailable(Box::new(busy)));
        assert!(health.corrupted().is_none());
        let corrupt = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some("database disk image is malformed".into()),
        );
        health.observe(&StoreError::Unavailable(Box::new(corrupt)));
        let reason = health.corrupted().unwrap().to_owned();
        assert!(reason.contains("/data/epr.sqlite3"), "{reason}");
        assert!(reason.contains("malformed"), "{reason}");
        assert!(health.refusal().is_some());
    }
}
