//! Storage adapters of the Endpoint Register.
//!
//! - [`embedded`]: the zero-setup default, SQLite in WAL mode behind one group-committing
//!   writer thread, a syncer thread that makes commits durable before answering them, and a
//!   pool of reader connections.
//! - [`conformance`]: the behaviour every backend of [`epr_core::ports::Store`] must show,
//!   written against the trait only.
//! - [`backup`]: online backup (`VACUUM INTO` on a read-only connection) and restore of the
//!   embedded store's data directory.
//! - [`codec`]: the stored (JSON) form of outbox events and batch outcomes.
//! - [`lock`]: the data directory lock (one open store per directory).
//! - [`integrity`]: the database check at open and the corrupted state at run time.
//! - `sqlite_credentials`: endpoint token rows, claim tokens and recorded rejections in the
//!   embedded store.
//! - `sqlite_filters`: saved filters in the embedded store (rows, live matching, back-fill).
//! - `meta_index`: the embedded store's in-memory listing index (application, version and
//!   metadata values as bitmaps of incarnations).
//! - `key_index`: the embedded store's in-memory hash indexes of endpoint IDs and token
//!   hashes (row candidates, checked in the reader's snapshot).

pub mod backup;
pub mod codec;
pub mod conformance;
pub mod embedded;
pub mod integrity;
mod key_index;
pub mod lock;
mod meta_index;
mod sqlite_credentials;
mod sqlite_export;
mod sqlite_filters;

pub use embedded::{BackfillPace, EmbeddedConfig, EmbeddedStore};
pub use integrity::IntegrityCheck;
pub use lock::{DataDirLock, LockError};
