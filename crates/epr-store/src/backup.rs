//! Online backup and restore of the embedded store's data directory.
//!
//! A backup is `VACUUM INTO` on a connection of its own that opens the database read-only,
//! without [`crate::EmbeddedStore::open`] (so it takes none of the server's locks and works
//! whether a server runs on the directory or not). It runs in one read transaction, so the
//! copy is the consistent state of one commit; in WAL mode a reader never blocks the writer,
//! which goes on committing meanwhile (the background checkpoint only waits for the copy to
//! end before it can recycle the WAL). The copy is written next to its destination under a
//! temporary name, checked (`PRAGMA quick_check`), synced and then renamed into place, so a
//! file at the destination is always a complete backup.
//!
//! A restore puts such a file into an empty (or, when forced, a stopped store's) data
//! directory, with a new store identity: see [`restore`].

use crate::embedded::{DB_FILE, SCHEMA_VERSION};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The operator's request cannot be done as asked (nothing was changed).
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

fn sql(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Sqlite { context, source }
}

/// What a backup or restore copied.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub file: PathBuf,
    pub bytes: u64,
    pub endpoints: u64,
    pub filters: u64,
    /// Undelivered events copied with the data (the outbox).
    pub outbox: u64,
    pub took: Duration,
}

/// The database file of a data directory.
pub fn database_file(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

/// Writes a consistent copy of the store in `data_dir` to `dest`, which must not exist.
/// Safe while a server writes to the store.
pub fn backup(data_dir: &Path, dest: &Path) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let src = database_file(data_dir);
    if !src.is_file() {
        return Err(BackupError::Refused(format!(
            "no store in '{}' (no {DB_FILE})",
            data_dir.display()
        )));
    }
    if dest.exists() {
        return Err(BackupError::Refused(format!(
            "'{}' exists; a backup never overwrites a file",
            dest.display()
        )));
    }
    let name = dest
        .file_name()
        .ok_or_else(|| BackupError::Refused(format!("'{}' is not a file name", dest.display())))?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".partial-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let conn = open_read_only(&src)?;
        let text = tmp
            .to_str()
            .ok_or_else(|| BackupError::Refused(format!("'{}' is not UTF-8", tmp.display())))?;
        conn.execute("VACUUM INTO ?1", [text])
            .map_err(sql(format!("copying '{}'", src.display())))?;
        drop(conn);
        let mut report = check(&tmp)?;
        sync_file(&tmp)?;
        std::fs::rename(&tmp, dest).map_err(io(format!("renaming to '{}'", dest.display())))?;
        sync_dir(&dir)?;
        report.file = dest.to_path_buf();
        report.took = started.elapsed();
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What [`restore`] may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Only into a missing or empty directory.
    Never,
    /// Replace the store of a directory (its server must be stopped).
    Store,
}

/// Puts the backup `from` into `data_dir` as its store. The directory must be missing or
/// empty unless `overwrite` is [`Overwrite::Store`], which replaces the database and removes
/// its WAL and shared-memory files (a stale WAL must never be replayed onto another
/// database). The restored store gets a new `store_id`: its outbox IDs continue from the
/// backup's, below IDs the original may have published since, so keeping the identity would
/// let JetStream's deduplication drop new events as duplicates of old ones. Events still in
/// the backup's outbox are published again under the new identity (at least once).
pub fn restore(
    from: &Path,
    data_dir: &Path,
    overwrite: Overwrite,
) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    if !from.is_file() {
        return Err(BackupError::Refused(format!(
            "'{}' is not a file",
            from.display()
        )));
    }
    // A WAL beside the source holds commits a file copy would leave behind (and, after an
    // interrupted checkpoint, the main file alone may be inconsistent).
    let mut wal = from.as_os_str().to_os_string();
    wal.push("-wal");
    if std::fs::metadata(PathBuf::from(wal)).is_ok_and(|m| m.len() > 0) {
        return Err(BackupError::Refused(format!(
            "'{}' has a write-ahead log beside it: restore from a file made by `epr backup`, \
             or start and cleanly stop a server on its directory first",
            from.display()
        )));
    }
    // Checked before anything is touched: a bad file changes nothing.
    check(from)?;
    std::fs::create_dir_all(data_dir).map_err(io(format!("creating '{}'", data_dir.display())))?;
    // Held until the restore is done: a server running on the directory refuses it, and no
    // server can start on a half-restored one.
    let _lock = crate::lock::DataDirLock::acquire(data_dir)
        .map_err(|e| BackupError::Refused(e.to_string()))?;
    let entries: Vec<_> = std::fs::read_dir(data_dir)
        .map_err(io(format!("reading '{}'", data_dir.display())))?
        .collect::<Result<_, _>>()
        .map_err(io(format!("reading '{}'", data_dir.display())))?;
    let occupied = entries
        .iter()
        .any(|e| e.file_name() != crate::lock::LOCK_FILE);
    if occupied && overwrite == Overwrite::Never {
        return Err(BackupError::Refused(format!(
            "'{}' is not empty; restore into a new directory, or stop its server and pass \
             --force to replace its store",
            data_dir.display()
        )));
    }
    let db = database_file(data_dir);
    let mut tmp_name = db.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".restoring-{}", std::process::id()));
    let tmp = data_dir.join(tmp_name);
    let result = (|| {
        std::fs::copy(from, &tmp).map_err(io(format!("copying to '{}'", tmp.display())))?;
        {
            let conn = Connection::open_with_flags(&tmp, OpenFlags::SQLITE_OPEN_READ_WRITE)
                .map_err(sql("opening the copy"))?;
            // Journal mode DELETE while it is a loose file: no WAL next to the temporary name.
            conn.execute_batch("PRAGMA journal_mode=DELETE;")
                .map_err(sql("opening the copy"))?;
            // A new identity (see above), made as the store makes it at creation.
            conn.execute(
                "UPDATE schema_meta SET value=abs(random()) WHERE key='store_id'",
                [],
            )
            .map_err(sql("giving the restored store a new identity"))?;
        }
        sync_file(&tmp)?;
        // The copy is checked before the old store is touched.
        check(&tmp)?;
        for suffix in ["-wal", "-shm"] {
            let mut p = db.clone().into_os_string();
            p.push(suffix);
            match std::fs::remove_file(PathBuf::from(p)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing the old store's WAL")(e)),
            }
        }
        std::fs::rename(&tmp, &db).map_err(io(format!("renaming to '{}'", db.display())))?;
        sync_dir(data_dir)?;
        let mut report = check(&db)?;
        report.took = started.elapsed();
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Opens a store's database read-only, with no lock of the server's: readers and the writer of
/// a running server are not disturbed.
fn open_read_only(path: &Path) -> Result<Connection, BackupError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(format!("opening '{}'", path.display())))?;
    conn.execute_batch("PRAGMA busy_timeout=5000;")
        .map_err(sql(format!("opening '{}'", path.display())))?;
    Ok(conn)
}

/// Checks that `path` is an intact store database this build can open, and counts its rows.
fn check(path: &Path) -> Result<BackupReport, BackupError> {
    let bad = |why: String| {
        BackupError::Refused(format!(
            "'{}' is not a usable backup: {why}",
            path.display()
        ))
    };
    let conn = open_read_only(path)?;
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| bad(e.to_string()))?;
    if verdict != "ok" {
        return Err(bad(format!("integrity check: {verdict}")));
    }
    let version: Option<i64> = conn
        .query_row(
            "SELECT value FROM schema_meta WHERE key='schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| bad(e.to_string()))?;
    match version {
        Some(v) if (1..=SCHEMA_VERSION).contains(&v) => {}
        Some(v) => {
            return Err(bad(format!(
                "schema version {v}, this build knows up to {SCHEMA_VERSION}"
            )))
        }
        None => return Err(bad("no schema version".into())),
    }
    let count = |table: &str| -> Result<u64, BackupError> {
        let exists: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type='table' AND name=?1)",
                [table],
                |r| r.get(0),
            )
            .map_err(|e| bad(e.to_string()))?;
        if !exists {
            return Ok(0);
        }
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n.max(0) as u64)
        .map_err(|e| bad(e.to_string()))
    };
    Ok(BackupReport {
        file: path.to_path_buf(),
        bytes: std::fs::metadata(path)
            .map_err(io(format!("reading '{}'", path.display())))?
            .len(),
        endpoints: count("endpoints")?,
        filters: count("filters")?,
        outbox: count("outbox")?,
        took: Duration::ZERO,
    })
}

fn sync_file(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("syncing '{}'", path.display())))
}

/// Makes a rename durable (the directory entry).
fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("syncing '{}'", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn empty_store(dir: &Path) {
        let store = crate::EmbeddedStore::open(crate::EmbeddedConfig::new(dir)).unwrap();
        store.shutdown().await;
    }

    #[tokio::test]
    async fn a_missing_store_or_an_existing_destination_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("b.sqlite3");
        let e = backup(&dir.path().join("nothing"), &dest).unwrap_err();
        assert!(e.to_string().contains("no store"), "{e}");
        std::fs::write(&dest, b"x").unwrap();
        let data = dir.path().join("data");
        empty_store(&data).await;
        let e = backup(&data, &dest).unwrap_err();
        assert!(e.to_string().contains("never overwrites"), "{e}");
    }

    #[tokio::test]
    async fn a_restored_store_has_the_data_and_a_new_identity() {
        use epr_core::ports::Store;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store =
            Arc::new(crate::EmbeddedStore::open(crate::EmbeddedConfig::new(&data)).unwrap());
        (crate::conformance::CASES[0].1)(store.clone()).await;
        let original_id = store.store_id();
        let file = dir.path().join("b.sqlite3");
        let report = backup(&data, &file).unwrap();
        assert_eq!(report.endpoints, 1);
        store.shutdown().await;
        drop(store);

        let restored = dir.path().join("restored");
        restore(&file, &restored, Overwrite::Never).unwrap();
        let copy = crate::EmbeddedStore::open(crate::EmbeddedConfig::new(&restored)).unwrap();
        assert_ne!(
            copy.store_id(),
            original_id,
            "a restored store gets a new identity"
        );
        let t1 = epr_core::ids::TenantId::parse("t1").unwrap();
        let ep1 = epr_core::ids::EndpointId::parse("ep-1").unwrap();
        assert!(copy.get(&t1, &ep1).await.unwrap().is_some());
        copy.ping().await.unwrap();
        copy.shutdown().await;
    }

    #[tokio::test]
    async fn a_forced_restore_replaces_the_store_and_drops_its_wal() {
        use epr_core::ports::Store;
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        empty_store(&empty).await;
        let file = dir.path().join("empty.sqlite3");
        backup(&empty, &file).unwrap();

        let data = dir.path().join("data");
        let store =
            Arc::new(crate::EmbeddedStore::open(crate::EmbeddedConfig::new(&data)).unwrap());
        (crate::conformance::CASES[0].1)(store.clone()).await;
        store.shutdown().await;
        drop(store);
        // A WAL left beside the old database (e.g. after a crash) must not be replayed.
        std::fs::write(data.join("epr.sqlite3-wal"), b"stale").unwrap();
        restore(&file, &data, Overwrite::Store).unwrap();
        assert!(!data.join("epr.sqlite3-wal").exists());
        let store = crate::EmbeddedStore::open(crate::EmbeddedConfig::new(&data)).unwrap();
        let t1 = epr_core::ids::TenantId::parse("t1").unwrap();
        let ep1 = epr_core::ids::EndpointId::parse("ep-1").unwrap();
        assert!(
            store.get(&t1, &ep1).await.unwrap().is_none(),
            "the old store is replaced"
        );
        store.shutdown().await;
    }

    #[tokio::test]
    async fn restore_refuses_a_source_with_a_wal_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        empty_store(&data).await;
        let file = dir.path().join("b.sqlite3");
        backup(&data, &file).unwrap();
        std::fs::write(dir.path().join("b.sqlite3-wal"), b"frames").unwrap();
        let target = dir.path().join("restored");
        let e = restore(&file, &target, Overwrite::Never).unwrap_err();
        assert!(e.to_string().contains("write-ahead log"), "{e}");
        assert!(!target.join("epr.sqlite3").exists());
    }

    #[tokio::test]
    async fn restore_refuses_a_non_store_file_and_a_non_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not a database at all, just text").unwrap();
        let target = dir.path().join("target");
        let e = restore(&junk, &target, Overwrite::Never).unwrap_err();
        assert!(e.to_string().contains("not a usable backup"), "{e}");
        assert!(!target.exists(), "nothing was created");

        let data = dir.path().join("data");
        empty_store(&data).await;
        let file = dir.path().join("b.sqlite3");
        backup(&data, &file).unwrap();
        let e = restore(&file, &data, Overwrite::Never).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
    }
}
