//! SQLite VFS shims for the embedded store. For the writer connection: **one `pwrite` per commit**
//! to the write-ahead log, and **the commit's sync left to the store's syncer thread**.
//!
//! Why: SQLite writes each WAL frame with two `write` calls (its 24-byte header, then the
//! page), so a group commit of a few hundred dirty 1 KiB pages costs several hundred system
//! calls; on the registration path that was ~30 % of the writer thread's time. This shim,
//! [`NAME`], wraps the platform VFS (`unix`) and, for WAL files only, gathers consecutive
//! writes in a buffer, writing it out when the commit ends (in calls of at most 64 KiB).
//! The crate also wraps SQLite's page cache (module `pcache`, installed by [`register`]).
//!
//! The contract it relies on, from SQLite's `walFrames` (checked by this crate's tests):
//! - With `PRAGMA synchronous=FULL`, a commit calls `xSync` on the WAL with
//!   `SQLITE_SYNC_NORMAL` **after** writing its frames and **before** publishing them in the
//!   shared WAL index, so flushing the buffer there makes every frame readable by other
//!   connections before any of them can look for it.
//! - With `PRAGMA checkpoint_fullfsync=ON`, every sync that protects the database file (before
//!   a checkpoint copies frames back, and of the WAL header when the log restarts) is called
//!   with `SQLITE_SYNC_FULL`.
//!
//! So a sync with `SQLITE_SYNC_FULL` is passed through (flush, then `fdatasync`), and a sync
//! with `SQLITE_SYNC_NORMAL` (a commit) only flushes: the store's syncer thread `fdatasync`s
//! the WAL after the commit and answers its writes only then, as it did with
//! `synchronous=NORMAL`. Reads, size queries, truncation, file controls and close flush first,
//! so the connection itself never sees a file without its buffered writes. Other files are the
//! platform VFS's own, untouched, except the database file's read locks (below).
//!
//! Both of the crate's VFSes, [`NAME`] for the writer and [`READ_NAME`] for every other
//! connection of the process, take the WAL index's read-slot locks through module `shm`: a
//! read slot's platform lock (an `fcntl`) lingers in the process after its last reader leaves
//! and is dropped only when a connection of the process wants the slot exclusively, so a
//! read transaction takes no system call in the common case.
//!
//! A buffer never holds a committed frame: it is empty at the end of every commit (the sync
//! flushes it), so a process crash loses only a transaction that was never committed.
//!
//! This is the workspace's only `unsafe` code (SQLite's C interface).

use std::ffi::{c_int, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::OnceLock;

use rusqlite::ffi;

mod pcache;
mod shm;

pub use shm::read_lock_stats;

/// The name the shim is registered under; pass it to `Connection::open_with_flags_and_vfs`.
pub const NAME: &str = "epr-wal-batch";
const NAME_C: &CStr = c"epr-wal-batch";

/// The name of the VFS for the process's other connections to the store (readers, the
/// checkpointer): the platform VFS with [`shm`]'s read locks, WAL files untouched. Every
/// connection to a database the writer has open must use one of the two (see [`shm`]).
pub const READ_NAME: &str = "epr-read";
const READ_NAME_C: &CStr = c"epr-read";

/// A buffer this large is written out at once, even in the middle of a transaction.
const FLUSH_AT: usize = 1 << 20;

/// The most the platform VFS writes in one call: its `seekAndWriteFd` keeps only the low 17
/// bits of the length (a 128 KiB write would become an empty one, reported as a full disk).
const CHUNK: usize = 64 << 10;

static INNER: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());
static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
static PAGE_CACHE_WRAPPED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether [`register`] could also install the page cache wrapper (`pcache` module): only
/// when it ran before anything else in the process initialized SQLite.
pub fn page_cache_wrapped() -> bool {
    PAGE_CACHE_WRAPPED.load(Ordering::Relaxed)
}

static WRITES_IN: AtomicU64 = AtomicU64::new(0);
static WRITES_OUT: AtomicU64 = AtomicU64::new(0);
static SYNCS_LEFT: AtomicU64 = AtomicU64::new(0);
static SYNCS_PASSED: AtomicU64 = AtomicU64::new(0);

/// Counters over every WAL file opened through the shim in this process (for tests and
/// diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Writes SQLite asked for.
    pub writes_in: u64,
    /// Writes made to the file.
    pub writes_out: u64,
    /// Commit syncs left to the caller (flushed, not synced).
    pub syncs_left: u64,
    /// Syncs passed through to the file system.
    pub syncs_passed: u64,
}

pub fn stats() -> Stats {
    Stats {
        writes_in: WRITES_IN.load(Ordering::Relaxed),
        writes_out: WRITES_OUT.load(Ordering::Relaxed),
        syncs_left: SYNCS_LEFT.load(Ordering::Relaxed),
        syncs_passed: SYNCS_PASSED.load(Ordering::Relaxed),
    }
}

/// Registers the shim (once per process; later calls return the first outcome). It is not
/// made the default VFS: only connections that name it use it. Called before anything else
/// in the process initializes SQLite, it also wraps SQLite's page cache for every connection
/// (see [`page_cache_wrapped`]).
/// Both VFSes are registered: [`NAME`] (returned) and [`READ_NAME`].
pub fn register() -> Result<&'static str, String> {
    REGISTERED
        .get_or_init(|| {
            PAGE_CACHE_WRAPPED.store(pcache::install(), Ordering::Relaxed);
            // SAFETY: `sqlite3_vfs_find` returns a registered VFS that lives as long as the
            // process (the platform VFS is never unregistered); the copies made from it are
            // leaked, as `sqlite3_vfs_register` requires pointers that stay valid.
            unsafe {
                let inner = ffi::sqlite3_vfs_find(c"unix".as_ptr());
                if inner.is_null() {
                    return Err("SQLite has no \"unix\" VFS on this platform".into());
                }
                INNER.store(inner, Ordering::Release);
                for (name, open) in [
                    (NAME_C, x_open::<true> as XOpen),
                    (READ_NAME_C, x_open::<false> as XOpen),
                ] {
                    let mut vfs: ffi::sqlite3_vfs = *inner;
                    vfs.pNext = ptr::null_mut();
                    vfs.zName = name.as_ptr();
                    vfs.szOsFile = c_int::try_from(INNER_OFFSET)
                        .ok()
                        .and_then(|o| o.checked_add((*inner).szOsFile))
                        .ok_or("VFS file size overflow")?;
                    vfs.xOpen = Some(open);
                    let rc = ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 0);
                    if rc != ffi::SQLITE_OK {
                        return Err(format!("sqlite3_vfs_register failed ({rc})"));
                    }
                }
                Ok(())
            }
        })
        .clone()
        .map(|()| NAME)
}

type XOpen = unsafe extern "C" fn(
    *mut ffi::sqlite3_vfs,
    ffi::sqlite3_filename,
    *mut ffi::sqlite3_file,
    c_int,
    *mut c_int,
) -> c_int;

/// A WAL file opened through the shim: SQLite's file header, the buffer, then the platform
/// VFS's own file object at `INNER_OFFSET`.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    /// Bytes not yet written, starting at file offset `buf_off`.
    buf: Vec<u8>,
    buf_off: i64,
}

/// Where the platform VFS's file object starts inside ours (WAL and database files alike).
const INNER_OFFSET: usize = {
    let wal = std::mem::size_of::<WalFile>();
    let db = std::mem::size_of::<shm::DbFile>();
    (if wal > db { wal } else { db }).next_multiple_of(16)
};

fn inner_vfs() -> *mut ffi::sqlite3_vfs {
    INNER.load(Ordering::Acquire)
}

/// The platform VFS's file object inside ours.
///
/// # Safety
/// `file` points to a file object of at least `szOsFile` bytes allocated by SQLite for this VFS.
pub(crate) unsafe fn inner(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: the allocation is `INNER_OFFSET + inner szOsFile` bytes (see `register`).
    unsafe { file.cast::<u8>().add(INNER_OFFSET).cast() }
}

/// The platform VFS's methods of an opened inner file.
///
/// # Safety
/// As for [`inner`], and the inner file is open.
pub(crate) unsafe fn inner_methods(
    file: *mut ffi::sqlite3_file,
) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: an open unix file's methods are a static table.
    unsafe { &*(*inner(file)).pMethods }
}

/// SQLite's `xOpen` of both VFSes: `BATCH_WAL` for the writer's (see `open_wrapped`).
unsafe extern "C" fn x_open<const BATCH_WAL: bool>(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: as for `open_wrapped`.
    unsafe { open_wrapped(vfs, name, file, flags, out_flags, BATCH_WAL) }
}

/// Opens a file through the platform VFS: a main database file wrapped for its read locks
/// (`shm`), a WAL file wrapped for its buffer when `batch_wal`, anything else as it is.
///
/// # Safety
/// SQLite's `xOpen` contract, for a VFS registered by [`register`].
unsafe fn open_wrapped(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
    batch_wal: bool,
) -> c_int {
    let vfs = inner_vfs();
    // SAFETY: SQLite hands us a file object of our `szOsFile` bytes; the platform VFS's object
    // fits at its start (files not wrapped, which then carry its methods and never reach this
    // shim again) or at `INNER_OFFSET` (wrapped files).
    unsafe {
        let Some(open) = (*vfs).xOpen else {
            return ffi::SQLITE_ERROR;
        };
        let db = flags & ffi::SQLITE_OPEN_MAIN_DB != 0 && !name.is_null();
        let wal = batch_wal && flags & ffi::SQLITE_OPEN_WAL != 0;
        if !db && !wal {
            return open(vfs, name, file, flags, out_flags);
        }
        (*file).pMethods = ptr::null();
        let rc = open(vfs, name, inner(file), flags, out_flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if db {
            shm::opened(file, CStr::from_ptr(name).to_bytes());
            return ffi::SQLITE_OK;
        }
        let wal = file.cast::<WalFile>();
        ptr::addr_of_mut!((*wal).buf).write(Vec::new());
        ptr::addr_of_mut!((*wal).buf_off).write(0);
        (*file).pMethods = &WAL_METHODS;
        ffi::SQLITE_OK
    }
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    // Version 1: a WAL file is never memory-mapped and has no shared memory of its own.
    iVersion: 1,
    xClose: Some(w_close),
    xRead: Some(w_read),
    xWrite: Some(w_write),
    xTruncate: Some(w_truncate),
    xSync: Some(w_sync),
    xFileSize: Some(w_file_size),
    xLock: Some(w_lock),
    xUnlock: Some(w_unlock),
    xCheckReservedLock: Some(w_check_reserved_lock),
    xFileControl: Some(w_file_control),
    xSectorSize: Some(w_sector_size),
    xDeviceCharacteristics: Some(w_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// Writes the buffer out (one call) and empties it.
///
/// # Safety
/// `file` is an open WAL file of this shim.
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: per the contract above; SQLite calls a file's methods from one thread at a time.
    unsafe {
        let wal = &mut *file.cast::<WalFile>();
        if wal.buf.is_empty() {
            return ffi::SQLITE_OK;
        }
        let write = inner_methods(file)
            .xWrite
            .expect("unix files can be written");
        let mut rc = ffi::SQLITE_OK;
        let mut offset = wal.buf_off;
        for chunk in wal.buf.chunks(CHUNK) {
            // `CHUNK` fits a c_int.
            rc = write(
                inner(file),
                chunk.as_ptr().cast(),
                chunk.len() as c_int,
                offset,
            );
            WRITES_OUT.fetch_add(1, Ordering::Relaxed);
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += chunk.len() as i64;
        }
        // On failure too: the transaction fails and rolls back; its frames are not retried.
        wal.buf.clear();
        rc
    }
}

unsafe extern "C" fn w_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim; after this call SQLite forgets it.
    unsafe {
        let rc = flush(file);
        ptr::drop_in_place(ptr::addr_of_mut!((*file.cast::<WalFile>()).buf));
        let close = inner_methods(file)
            .xClose
            .expect("unix files can be closed");
        let closed = close(inner(file));
        (*file).pMethods = ptr::null();
        if rc != ffi::SQLITE_OK {
            rc
        } else {
            closed
        }
    }
}

unsafe extern "C" fn w_read(
    file: *mut ffi::sqlite3_file,
    out: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim; `out` holds `amount` bytes.
    unsafe {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let read = inner_methods(file).xRead.expect("unix files can be read");
        read(inner(file), out, amount, offset)
    }
}

unsafe extern "C" fn w_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    WRITES_IN.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `file` is an open WAL file of this shim; `data` holds `amount` bytes.
    unsafe {
        let wal = &mut *file.cast::<WalFile>();
        if !wal.buf.is_empty() && offset != wal.buf_off + wal.buf.len() as i64 {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        let wal = &mut *file.cast::<WalFile>();
        if wal.buf.is_empty() {
            wal.buf_off = offset;
        }
        let len = usize::try_from(amount).unwrap_or(0);
        wal.buf
            .extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), len));
        if wal.buf.len() >= FLUSH_AT {
            return flush(file);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn w_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim.
    unsafe {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let truncate = inner_methods(file)
            .xTruncate
            .expect("unix files can be truncated");
        truncate(inner(file), size)
    }
}

unsafe extern "C" fn w_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim.
    unsafe {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if flags & 0x0f == ffi::SQLITE_SYNC_FULL {
            SYNCS_PASSED.fetch_add(1, Ordering::Relaxed);
            let sync = inner_methods(file).xSync.expect("unix files can be synced");
            sync(inner(file), flags)
        } else {
            // A commit: the caller's syncer makes it durable before anyone is told.
            SYNCS_LEFT.fetch_add(1, Ordering::Relaxed);
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn w_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim; `size` is writable.
    unsafe {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let file_size = inner_methods(file)
            .xFileSize
            .expect("unix files have a size");
        file_size(inner(file), size)
    }
}

unsafe extern "C" fn w_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim.
    unsafe { inner_methods(file).xLock.expect("unix files lock")(inner(file), level) }
}

unsafe extern "C" fn w_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim.
    unsafe { inner_methods(file).xUnlock.expect("unix files unlock")(inner(file), level) }
}

unsafe extern "C" fn w_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim; `out` is writable.
    unsafe {
        inner_methods(file)
            .xCheckReservedLock
            .expect("unix files lock")(inner(file), out)
    }
}

unsafe extern "C" fn w_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim; `arg` is as `op` requires.
    unsafe {
        // Some controls look at the file (its size, its identity): show them everything.
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let control = inner_methods(file)
            .xFileControl
            .expect("unix files take file controls");
        control(inner(file), op, arg)
    }
}

unsafe extern "C" fn w_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim.
    unsafe {
        inner_methods(file)
            .xSectorSize
            .expect("unix files have sectors")(inner(file))
    }
}

unsafe extern "C" fn w_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: `file` is an open WAL file of this shim.
    unsafe {
        inner_methods(file)
            .xDeviceCharacteristics
            .expect("unix files have characteristics")(inner(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};

    fn open_writer(path: &std::path::Path) -> Connection {
        let conn = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            register().unwrap(),
        )
        .unwrap();
        conn.execute_batch(
            "PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
             PRAGMA checkpoint_fullfsync=ON; PRAGMA wal_autocheckpoint=0; \
             CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY, v BLOB NOT NULL); \
             CREATE INDEX IF NOT EXISTS t_v ON t(v);",
        )
        .unwrap();
        conn
    }

    /// One test, so the process-wide counters move only for it.
    #[test]
    fn commits_write_once_and_leave_their_sync_while_checkpoints_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut writer = open_writer(&path);
        // A reader on the platform VFS, as the store's reader connections are.
        let reader = Connection::open(&path).unwrap();

        let before = stats();
        let commits = 50u64;
        for c in 0..commits {
            let tx = writer.transaction().unwrap();
            for i in 0..40u64 {
                // Random-looking index keys: each commit dirties many scattered pages.
                let v = (c * 40 + i)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .to_be_bytes();
                tx.execute("INSERT INTO t(v) VALUES(?1)", [&v[..]]).unwrap();
            }
            tx.commit().unwrap();
            // Every committed row is readable at once by another connection: the frames
            // reached the file before the WAL index named them.
            let n: i64 = reader
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n as u64, (c + 1) * 40);
        }
        let after = stats();
        let writes_in = after.writes_in - before.writes_in;
        let writes_out = after.writes_out - before.writes_out;
        assert_eq!(
            after.syncs_left - before.syncs_left,
            commits,
            "one left sync per commit"
        );
        assert_eq!(after.syncs_passed, before.syncs_passed, "no commit syncs");
        assert!(writes_in >= 10 * commits, "{writes_in} writes asked for");
        assert!(
            writes_out <= 2 * commits,
            "{writes_out} writes for {commits} commits"
        );

        // A checkpoint syncs the WAL before copying it back, and the database after.
        let before = stats();
        writer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        assert!(stats().syncs_passed > before.syncs_passed);

        // The log restarts after the truncation: its header is synced (a passed sync).
        let before = stats();
        writer
            .execute("INSERT INTO t(v) VALUES(x'00')", [])
            .unwrap();
        let after = stats();
        assert_eq!(
            after.syncs_passed - before.syncs_passed,
            1,
            "the restarted header"
        );
        assert_eq!(after.syncs_left - before.syncs_left, 1, "the commit");

        // A transaction larger than the page cache spills pages to the WAL before its commit
        // and reads them back: the reads see the buffered writes.
        writer.execute_batch("PRAGMA cache_size=16;").unwrap();
        {
            let tx = writer.transaction().unwrap();
            for i in 0..3000u64 {
                let v = i.wrapping_mul(0x2545_f491_4f6c_dd1d).to_be_bytes();
                tx.execute("INSERT INTO t(v) VALUES(?1)", [&v[..]]).unwrap();
            }
            let n: i64 = tx
                .query_row(
                    "SELECT count(*) FROM t INDEXED BY t_v WHERE v > x''",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n as u64, commits * 40 + 1 + 3000);
            tx.commit().unwrap();
        }

        // A commit of ~2 MB: past the buffer's limit and many times the largest single write.
        writer.execute_batch("PRAGMA cache_size=-16384;").unwrap();
        {
            let tx = writer.transaction().unwrap();
            for i in 0..1000u64 {
                let v: Vec<u8> = (0..1500u64)
                    .map(|j| (i * 1500 + j).wrapping_mul(0x9e37_79b9) as u8)
                    .collect();
                tx.execute(
                    "INSERT INTO t(k, v) VALUES(?1, ?2)",
                    rusqlite::params![1_000_000 + i as i64, v],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let big: i64 = reader
            .query_row("SELECT count(*) FROM t WHERE length(v) = 1500", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(big, 1000);

        // A rolled-back transaction leaves nothing behind; a reopened store has every row.
        {
            let tx = writer.transaction().unwrap();
            tx.execute("INSERT INTO t(v) VALUES(x'01')", []).unwrap();
            tx.rollback().unwrap();
        }
        drop(reader);
        drop(writer);
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n as u64, commits * 40 + 1 + 3000 + 1000);
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    /// Random inserts split pages out of order (parking pages under the lock page's number);
    /// rolled-back transactions that grew the file must still lose their pages. The data
    /// stays whole, and most truncations are skipped.
    #[test]
    fn the_page_cache_wrapper_skips_walks_and_keeps_data_whole() {
        register().unwrap();
        assert!(
            page_cache_wrapped(),
            "installed before SQLite was initialized"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA page_size=1024; PRAGMA journal_mode=WAL; PRAGMA cache_size=-2048; \
             CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB NOT NULL); CREATE INDEX t_v ON t(v);",
        )
        .unwrap();
        let skipped = pcache::SKIPPED.load(Ordering::Relaxed);
        let mut kept = 0i64;
        for round in 0..60u64 {
            let tx = conn.transaction().unwrap();
            for i in 0..200u64 {
                let v = (round * 200 + i)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .to_be_bytes();
                tx.execute("INSERT INTO t(v) VALUES(?1)", [&v[..]]).unwrap();
            }
            if round % 5 == 4 {
                // Grows the file, then gives it all back.
                tx.rollback().unwrap();
            } else {
                tx.commit().unwrap();
                kept += 200;
            }
        }
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM t INDEXED BY t_v WHERE v > x''",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, kept);
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        assert!(
            pcache::SKIPPED.load(Ordering::Relaxed) > skipped + 20,
            "walks skipped"
        );
    }

    #[test]
    fn registering_twice_names_the_same_vfs() {
        assert_eq!(register().unwrap(), NAME);
        assert_eq!(register().unwrap(), NAME);
    }

    fn open_on(path: &std::path::Path, vfs: &str, flags: OpenFlags) -> Connection {
        let conn = Connection::open_with_flags_and_vfs(path, flags, vfs).unwrap();
        conn.execute_batch("PRAGMA busy_timeout=5000;").unwrap();
        conn
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// The other process of `read_locks_linger_and_give_way`: a plain reader on the platform
    /// VFS, as an online backup's. Does nothing unless that test started it.
    #[test]
    fn other_process_reader() {
        let Ok(path) = std::env::var("EPR_VFS_OTHER_PROCESS_DB") else {
            return;
        };
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        conn.execute_batch("PRAGMA busy_timeout=5000;").unwrap();
        println!("rows={}", count(&conn));
    }

    fn count_in_other_process(path: &std::path::Path) -> i64 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::other_process_reader", "--nocapture"])
            .env("EPR_VFS_OTHER_PROCESS_DB", path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("rows="))
            .unwrap_or_else(|| panic!("no count in {text}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn read_locks_linger_and_give_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let rw = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let ro = OpenFlags::SQLITE_OPEN_READ_ONLY;
        // All on the read VFS: the WAL counters of the other test stay its own.
        register().unwrap();
        let read = READ_NAME;
        let writer = open_on(&path, read, rw);
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; \
                 CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);",
            )
            .unwrap();
        let readers: Vec<Connection> = (0..3).map(|_| open_on(&path, read, ro)).collect();

        // Reads between commits: every reader sees every commit.
        for i in 1..=20i64 {
            writer
                .execute("INSERT INTO t(v) VALUES(randomblob(100))", [])
                .unwrap();
            for r in &readers {
                assert_eq!(count(r), i);
            }
        }
        // Reads with no commit between them take the platform lock once.
        let (asked, passed) = read_lock_stats(&path).unwrap();
        for _ in 0..100 {
            for r in &readers {
                assert_eq!(count(r), 20);
            }
        }
        let (asked2, passed2) = read_lock_stats(&path).unwrap();
        assert!(asked2 - asked >= 300, "{asked} -> {asked2} asked");
        assert!(passed2 - passed <= 1, "{passed} -> {passed2} passed");

        // Another process reads past the lingering locks and sees every commit.
        assert_eq!(count_in_other_process(&path), 20);

        // The lingering locks give way to a checkpoint that must wait for no reader.
        let (busy, log, done): (i64, i64, i64) = writer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((busy, log, done), (0, 0, 0), "a truncated log");
        let wal = std::fs::metadata(dir.path().join("db.sqlite-wal")).unwrap();
        assert_eq!(wal.len(), 0);

        // A reader inside a transaction holds its snapshot while another leaves, closes (it
        // may own the slot) and the writer commits; a checkpoint cannot truncate under it.
        let mut readers = readers;
        let mut holder = readers.pop().unwrap();
        let tx = holder.transaction().unwrap();
        assert_eq!(count(&tx), 20);
        for r in &readers {
            assert_eq!(count(r), 20);
        }
        drop(readers);
        writer
            .execute("INSERT INTO t(v) VALUES(randomblob(100))", [])
            .unwrap();
        assert_eq!(count(&tx), 20, "the snapshot holds");
        writer.execute_batch("PRAGMA busy_timeout=50;").unwrap();
        let busy: i64 = writer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap_or(1);
        assert_eq!(busy, 1, "a reader still uses the log");
        assert_eq!(count_in_other_process(&path), 21);
        tx.commit().unwrap();
        assert_eq!(count(&holder), 21);
        let (busy, log): (i64, i64) = writer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((busy, log), (0, 0));

        // The last connection closes: the file's node goes.
        drop(holder);
        drop(writer);
        assert_eq!(read_lock_stats(&path), None);
    }
}
