//! A wrapper around SQLite's own page cache that skips a needless walk of the whole cache at
//! the end of most write transactions.
//!
//! Why: when a B-tree page split leaves the new sibling pages out of order, SQLite's
//! `balance_nonroot` swaps their page numbers through a temporary one, the number of the lock
//! page (byte offset 1 GiB: page 1,048,577 at 1 KiB pages). The default cache remembers that
//! as its largest key, and the truncation to the file's size at the end of the transaction
//! then walks every slot of the cache to drop pages past the end, although none exists. On the
//! store's writer that walk took 38 % of the time with a 64 MiB cache, and still ~7 % with
//! 4 MiB.
//!
//! The wrapper keeps, per cache, an upper bound of the page numbers it holds (every page enters
//! through a fetch that creates it or a rekey), not counting pages parked under the lock page's
//! number (counted apart; they are always moved back within the same split). A truncation
//! that no held page can reach is not passed on; every other call is passed on unchanged.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// SQLite's own cache methods, read once before ours are installed.
static INNER: OnceLock<Methods> = OnceLock::new();

struct Methods(ffi::sqlite3_pcache_methods2);
// SAFETY: SQLite's default cache methods are plain functions; their `pArg` is SQLite's own
// and only ever handed back to them.
unsafe impl Send for Methods {}
unsafe impl Sync for Methods {}

/// Truncations not passed on (for tests and diagnostics).
pub(crate) static SKIPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Truncations passed on.
pub(crate) static PASSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// SQLite's lock byte offset (`PENDING_BYTE`, not changed in this build).
const PENDING_BYTE: u32 = 0x4000_0000;

struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The page number `balance_nonroot` parks pages under.
    parking: c_uint,
    /// Pages now parked there.
    parked: u32,
    /// No held page has a larger number (other than parked ones).
    max_key: c_uint,
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    &INNER.get().expect("installed before use").0
}

/// Installs the wrapper. Must run before SQLite is initialized (before any connection, VFS
/// lookup or other call that initializes it); returns `false` if it is too late (SQLite then
/// keeps its own cache, which is correct, only slower).
pub(crate) fn install() -> bool {
    // SAFETY: `sqlite3_config` is called with the argument types its options take; it refuses
    // (SQLITE_MISUSE) once SQLite is initialized, and then nothing is changed.
    unsafe {
        let mut default = std::mem::MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, default.as_mut_ptr())
            != ffi::SQLITE_OK
        {
            return false;
        }
        let default = default.assume_init();
        if default.xFetch.is_none() || INNER.set(Methods(default)).is_err() {
            return false;
        }
        // SQLite copies the methods.
        let methods = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: std::ptr::null_mut(),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            xCreate: Some(x_create),
            xCachesize: Some(x_cachesize),
            xPagecount: Some(x_pagecount),
            xFetch: Some(x_fetch),
            xUnpin: Some(x_unpin),
            xRekey: Some(x_rekey),
            xTruncate: Some(x_truncate),
            xDestroy: Some(x_destroy),
            xShrink: Some(x_shrink),
        };
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &methods as *const _) == ffi::SQLITE_OK
    }
}

// SAFETY (for every function below): SQLite calls them as its page cache interface says, with
// caches made by `x_create` (a `Box<Cache>` wrapping one of the default cache's), and never two
// calls on one cache at once (each cache belongs to one connection).

unsafe extern "C" fn x_init(_arg: *mut c_void) -> c_int {
    let i = inner();
    unsafe { i.xInit.map_or(ffi::SQLITE_OK, |f| f(i.pArg)) }
}

unsafe extern "C" fn x_shutdown(_arg: *mut c_void) {
    let i = inner();
    if let Some(f) = i.xShutdown {
        unsafe { f(i.pArg) }
    }
}

unsafe extern "C" fn x_create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let cache = unsafe { inner().xCreate.expect("default cache")(page_size, extra, purgeable) };
    if cache.is_null() {
        return cache;
    }
    let parking = PENDING_BYTE / (page_size.max(512) as u32) + 1;
    Box::into_raw(Box::new(Cache {
        inner: cache,
        parking,
        parked: 0,
        max_key: 0,
    }))
    .cast()
}

fn cache<'a>(c: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    // SAFETY: see above.
    unsafe { &mut *c.cast::<Cache>() }
}

unsafe extern "C" fn x_cachesize(c: *mut ffi::sqlite3_pcache, n: c_int) {
    unsafe { inner().xCachesize.expect("default cache")(cache(c).inner, n) }
}

unsafe extern "C" fn x_pagecount(c: *mut ffi::sqlite3_pcache) -> c_int {
    unsafe { inner().xPagecount.expect("default cache")(cache(c).inner) }
}

unsafe extern "C" fn x_fetch(
    c: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let c = cache(c);
    let page = unsafe { inner().xFetch.expect("default cache")(c.inner, key, create) };
    if create != 0 && !page.is_null() {
        c.max_key = c.max_key.max(key);
    }
    page
}

unsafe extern "C" fn x_unpin(
    c: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    unsafe { inner().xUnpin.expect("default cache")(cache(c).inner, page, discard) }
}

unsafe extern "C" fn x_rekey(
    c: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    let c = cache(c);
    unsafe { inner().xRekey.expect("default cache")(c.inner, page, old, new) };
    if old == c.parking {
        c.parked = c.parked.saturating_sub(1);
    }
    if new == c.parking {
        c.parked += 1;
    } else {
        c.max_key = c.max_key.max(new);
    }
}

unsafe extern "C" fn x_truncate(c: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let c = cache(c);
    // Nothing held at `limit` or past it: nothing to drop, no walk.
    if c.parked == 0 && c.max_key < limit {
        SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    PASSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    unsafe { inner().xTruncate.expect("default cache")(c.inner, limit) };
    c.max_key = c.max_key.min(limit.saturating_sub(1));
    if limit <= c.parking {
        c.parked = 0;
    }
}

unsafe extern "C" fn x_destroy(c: *mut ffi::sqlite3_pcache) {
    // SAFETY: made by `x_create`; SQLite does not use it again.
    let c = unsafe { Box::from_raw(c.cast::<Cache>()) };
    unsafe { inner().xDestroy.expect("default cache")(c.inner) }
}

unsafe extern "C" fn x_shrink(c: *mut ffi::sqlite3_pcache) {
    unsafe { inner().xShrink.expect("default cache")(cache(c).inner) }
}
