//! Read locks that linger in the process: a database file opened through either of this
//! crate's VFSes takes the WAL index's read-slot locks through [`Node`], which keeps the
//! platform VFS's shared lock on a read slot after its last reader in this process lets go.
//!
//! Why: every read transaction takes a shared lock on one of the WAL index's read slots and
//! drops it at its end. The platform VFS makes each of those an `fcntl` on the `-shm` file
//! (when no other connection of the process holds the same slot) under one process-wide mutex;
//! on a get by ID that was a quarter of the server's time (BENCHMARKS.md, issue 13). Here the
//! first reader of a slot takes the platform lock and becomes the slot's *owner*; later readers
//! of the slot only count themselves in, and leaving takes no system call either. The platform
//! lock is let go only when a connection of the process asks for the slot exclusively (a
//! reader moving a read mark, a checkpoint, the writer restarting the log): then the owner's
//! lock is dropped first, so the exclusive request meets exactly the conflicts it met before.
//!
//! To other processes (an online backup's reader) the process looks like a reader that holds
//! its read slots a little longer, which SQLite's protocol already allows for: it never changes
//! what they may read, only which slot they end up on.
//!
//! Only the read slots linger; the writer, checkpointer and recovery slots go straight through.
//! The store opens all its connections on [`crate::NAME`] or [`crate::READ_NAME`]. A
//! connection of the same process on the platform VFS alone still reads and writes correctly
//! (the platform VFS counts the process's holders underneath), but its exclusive requests on a
//! read slot meet a lingering lock as a reader that has not left: a checkpoint from it may
//! report itself blocked, a log restart from it is put off.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::ffi;

use crate::{inner, inner_methods};

/// The first read slot (`WAL_READ_LOCK(0)`); the slots below it are the writer's, the
/// checkpointer's and recovery's.
const FIRST_READ_SLOT: usize = 3;
const SLOTS: usize = ffi::SQLITE_SHM_NLOCK as usize;

/// A database file opened through the shim: SQLite's file header, the node it shares with
/// the process's other connections to the same file, then the platform VFS's file object at
/// [`crate::INNER_OFFSET`].
#[repr(C)]
pub(crate) struct DbFile {
    base: ffi::sqlite3_file,
    node: *const Node,
}

/// The read-slot locks of one database file, shared by every connection of the process to it.
#[derive(Default)]
pub(crate) struct Node {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    slot: [Slot; SLOTS],
    /// Shared read-slot locks asked for, and how many of them reached the platform VFS.
    read_locks: u64,
    read_locks_passed: u64,
}

#[derive(Default)]
struct Slot {
    /// The connections (platform file objects) of this process reading through the slot.
    readers: Vec<*mut ffi::sqlite3_file>,
    /// The connection whose platform shared lock stands for the process's hold on the slot,
    /// or null when the process holds no platform lock on it.
    owner: *mut ffi::sqlite3_file,
}

// SAFETY: the raw pointers are platform file objects of open connections, only used under the
// node's mutex, and only to call the platform VFS's thread-safe `xShmLock` (see `forget`).
unsafe impl Send for Slot {}

/// The nodes of the files open through the shim, by path (SQLite passes a full, resolved one).
static NODES: Mutex<Option<HashMap<Vec<u8>, Arc<Node>>>> = Mutex::new(None);

impl Node {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn nodes() -> MutexGuard<'static, Option<HashMap<Vec<u8>, Arc<Node>>>> {
    NODES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Finishes opening a main database file whose platform object is open at `inner(file)`.
///
/// # Safety
/// `file` is a file object of this crate's `szOsFile` bytes whose inner object was just opened
/// as `name`, a main database file.
pub(crate) unsafe fn opened(file: *mut ffi::sqlite3_file, name: &[u8]) {
    let node = nodes()
        .get_or_insert_with(HashMap::new)
        .entry(name.to_vec())
        .or_default()
        .clone();
    // SAFETY: per the contract; the pointer is given back in `db_close`.
    unsafe {
        ptr::addr_of_mut!((*file.cast::<DbFile>()).node).write(Arc::into_raw(node));
        (*file).pMethods = &DB_METHODS;
    }
}

/// Drops the file's locks from its node: a slot it owns passes to another reader of the slot
/// (taken before the owner's is let go, so the process never stops holding it) or is released.
///
/// # Safety
/// `file` is an open database file of this shim.
unsafe fn forget(file: *mut ffi::sqlite3_file) {
    // SAFETY: per the contract; other connections' objects in `readers` are open (a connection
    // leaves every slot, through this function, before it closes), and the platform's
    // `xShmLock` serializes on its own mutex.
    unsafe {
        let me = inner(file);
        let lock = inner_methods(file).xShmLock.expect("unix files have shm");
        let node = &*(*file.cast::<DbFile>()).node;
        let mut slots = node.lock();
        for (k, slot) in slots.slot.iter_mut().enumerate().skip(FIRST_READ_SLOT) {
            slot.readers.retain(|r| *r != me);
            if slot.owner != me {
                continue;
            }
            if let Some(&heir) = slot.readers.first() {
                // The platform counts the process's holders: no system call.
                let rc = lock(
                    heir,
                    k as c_int,
                    1,
                    ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_SHARED,
                );
                slot.owner = if rc == ffi::SQLITE_OK {
                    heir
                } else {
                    ptr::null_mut()
                };
            } else {
                slot.owner = ptr::null_mut();
            }
            lock(
                me,
                k as c_int,
                1,
                ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_SHARED,
            );
        }
    }
}

unsafe extern "C" fn db_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: `file` is an open database file of this shim; see `forget` for the owners.
    unsafe {
        let me = inner(file);
        let lock = inner_methods(file).xShmLock.expect("unix files have shm");
        let (Ok(first), Ok(count)) = (usize::try_from(offset), usize::try_from(n)) else {
            return lock(me, offset, n, flags);
        };
        let end = first.saturating_add(count).min(SLOTS);
        let node = &*(*file.cast::<DbFile>()).node;
        let mut slots = node.lock();
        let shared = flags & ffi::SQLITE_SHM_SHARED != 0;
        let locking = flags & ffi::SQLITE_SHM_LOCK != 0;
        if shared && first >= FIRST_READ_SLOT && count == 1 && first < SLOTS {
            if locking {
                slots.read_locks += 1;
            }
            let slot = &mut slots.slot[first];
            if locking {
                if slot.owner.is_null() {
                    let rc = lock(me, offset, 1, flags);
                    if rc != ffi::SQLITE_OK {
                        return rc;
                    }
                    slot.owner = me;
                    slot.readers.push(me);
                    slots.read_locks_passed += 1;
                    return ffi::SQLITE_OK;
                }
                slot.readers.push(me);
            } else if let Some(i) = slot.readers.iter().position(|r| *r == me) {
                // The owner's platform lock stays: the next reader takes no system call.
                slot.readers.swap_remove(i);
            }
            return ffi::SQLITE_OK;
        }
        if locking && !shared {
            let read_slots = first.max(FIRST_READ_SLOT).min(end)..end;
            // A reader of the process on the slot: the platform would refuse too.
            if slots.slot[read_slots.clone()]
                .iter()
                .any(|s| !s.readers.is_empty())
            {
                return ffi::SQLITE_BUSY;
            }
            for k in read_slots {
                let owner = std::mem::replace(&mut slots.slot[k].owner, ptr::null_mut());
                if !owner.is_null() {
                    lock(
                        owner,
                        k as c_int,
                        1,
                        ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_SHARED,
                    );
                }
            }
        }
        lock(me, offset, n, flags)
    }
}

unsafe extern "C" fn db_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: `file` is an open database file of this shim.
    unsafe {
        forget(file);
        inner_methods(file).xShmUnmap.expect("unix files have shm")(inner(file), delete)
    }
}

unsafe extern "C" fn db_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: `file` is an open database file of this shim; after this call SQLite forgets it.
    unsafe {
        forget(file);
        let rc = inner_methods(file)
            .xClose
            .expect("unix files can be closed")(inner(file));
        let node = Arc::from_raw((*file.cast::<DbFile>()).node);
        let mut nodes = nodes();
        if let Some(map) = nodes.as_mut() {
            // The map's reference and this file's: the last connection to the file.
            if Arc::strong_count(&node) == 2 {
                map.retain(|_, n| !Arc::ptr_eq(n, &node));
            }
        }
        drop(nodes);
        (*file).pMethods = ptr::null();
        rc
    }
}

/// Forwards a method to the platform file object unchanged.
macro_rules! forward {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: `file` is an open database file of this shim; the arguments are
            // SQLite's, passed on as they came.
            unsafe {
                inner_methods(file)
                    .$method
                    .expect(concat!("unix files have ", stringify!($method)))(
                    inner(file) $(, $arg)*
                )
            }
        }
    };
}

forward!(db_read, xRead, (out: *mut c_void, amount: c_int, offset: i64));
forward!(db_write, xWrite, (data: *const c_void, amount: c_int, offset: i64));
forward!(db_truncate, xTruncate, (size: i64));
forward!(db_sync, xSync, (flags: c_int));
forward!(db_file_size, xFileSize, (size: *mut i64));
forward!(db_lock, xLock, (level: c_int));
forward!(db_unlock, xUnlock, (level: c_int));
forward!(db_check_reserved_lock, xCheckReservedLock, (out: *mut c_int));
forward!(db_file_control, xFileControl, (op: c_int, arg: *mut c_void));
forward!(db_sector_size, xSectorSize, ());
forward!(db_device_characteristics, xDeviceCharacteristics, ());
forward!(db_shm_map, xShmMap, (region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void));
forward!(db_fetch, xFetch, (offset: i64, amount: c_int, out: *mut *mut c_void));
forward!(db_unfetch, xUnfetch, (offset: i64, page: *mut c_void));

unsafe extern "C" fn db_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: `file` is an open database file of this shim.
    unsafe {
        inner_methods(file)
            .xShmBarrier
            .expect("unix files have shm")(inner(file))
    }
}

static DB_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    // Version 3, as the platform's: shared memory (WAL) and memory-mapped reads.
    iVersion: 3,
    xClose: Some(db_close),
    xRead: Some(db_read),
    xWrite: Some(db_write),
    xTruncate: Some(db_truncate),
    xSync: Some(db_sync),
    xFileSize: Some(db_file_size),
    xLock: Some(db_lock),
    xUnlock: Some(db_unlock),
    xCheckReservedLock: Some(db_check_reserved_lock),
    xFileControl: Some(db_file_control),
    xSectorSize: Some(db_sector_size),
    xDeviceCharacteristics: Some(db_device_characteristics),
    xShmMap: Some(db_shm_map),
    xShmLock: Some(db_shm_lock),
    xShmBarrier: Some(db_shm_barrier),
    xShmUnmap: Some(db_shm_unmap),
    xFetch: Some(db_fetch),
    xUnfetch: Some(db_unfetch),
};

/// The read locks of a database file open through the shim in this process: how many shared
/// read-slot locks its connections asked for, and how many of them reached the platform VFS
/// (an `fcntl` unless another connection of the process held the slot). `None` when no
/// connection of the process has the file open.
pub fn read_lock_stats(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::fs::canonicalize(path).ok()?;
    let node = nodes().as_ref()?.get(path.as_os_str().as_bytes())?.clone();
    let slots = node.lock();
    Some((slots.read_locks, slots.read_locks_passed))
}
