//! An in-memory hash index of the embedded store: a key's 64-bit hash → the IDs of the rows
//! that may hold it. It replaces a unique B-tree index whose keys are random (endpoint IDs,
//! token hashes):
//! such an index makes every insert dirty a random page, which the WAL writes whole at the
//! commit and a checkpoint writes again. The map costs 17–35 bytes per row in memory and is
//! rebuilt from the table at open.
//!
//! The map is only a source of **candidates**: every lookup checks each candidate row in the
//! caller's own snapshot (the row's key columns must match), so a hash collision, a row not
//! committed yet or one deleted since is never taken for a match. Hence its invariant: it holds
//! at least every committed row (and possibly rows of the group being written, or rows deleted
//! by it). The writer adds a row's entry when it inserts the row, before the commit, and takes
//! a deleted row's entry out only after the commit ([`KeyJournal`]); a rolled-back group's
//! entries are taken out again.
//!
//! Entries form a multiset: a row deleted and a row inserted in one group can share an ID and a
//! key (a token value freed and taken again), and the deferred removal must leave the new one.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock};

/// The keys are already uniform hashes: the maps use them as they are.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in rather than panic.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdentityMap<V> = HashMap<u64, V, BuildHasherDefault<Identity>>;

#[derive(Default)]
struct Table {
    /// One row per key: nearly every key.
    first: IdentityMap<i64>,
    /// The rows beyond the first under the same key (collisions, and the multiset's repeats).
    more: IdentityMap<Vec<i64>>,
    len: usize,
}

pub(crate) struct KeyIndex {
    /// Keyed SipHash with a random key per process: row keys can be chosen by clients (endpoint
    /// IDs, token values), and a fixed hash would let them pile entries under one key.
    state: RandomState,
    table: RwLock<Table>,
}

impl Default for KeyIndex {
    fn default() -> Self {
        Self {
            state: RandomState::new(),
            table: RwLock::default(),
        }
    }
}

impl KeyIndex {
    /// The key of a tuple of byte strings (each length-prefixed, so `("ab","c")` and
    /// `("a","bc")` differ).
    pub(crate) fn key(&self, parts: &[&[u8]]) -> u64 {
        let mut h = self.state.build_hasher();
        for p in parts {
            h.write_usize(p.len());
            h.write(p);
        }
        h.finish()
    }

    /// The rows that may hold `key`, in no particular order (usually none or one).
    pub(crate) fn candidates(&self, key: u64) -> Vec<i64> {
        let t = self.read();
        let mut out = Vec::new();
        if let Some(&row) = t.first.get(&key) {
            out.push(row);
            if let Some(more) = t.more.get(&key) {
                out.extend_from_slice(more);
            }
        }
        out
    }

    /// The first candidate row of `key` that `probe` finds (it reads the row in the caller's
    /// snapshot and checks its key columns). If none is found and the candidates changed
    /// meanwhile (a commit replaced the row the lookup started from), the new ones are probed
    /// too, so a row replaced in one commit never seems absent.
    pub(crate) fn find<T, E>(
        &self,
        key: u64,
        mut probe: impl FnMut(i64) -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        let mut candidates = self.candidates(key);
        for _ in 0..8 {
            for &row in &candidates {
                if let Some(found) = probe(row)? {
                    return Ok(Some(found));
                }
            }
            let mut again = self.candidates(key);
            again.sort_unstable();
            candidates.sort_unstable();
            if again == candidates {
                break;
            }
            candidates = again;
        }
        Ok(None)
    }

    pub(crate) fn insert(&self, key: u64, row: i64) {
        let mut t = self.write();
        t.insert(key, row);
    }

    /// Takes one occurrence of `row` under `key` out (nothing if there is none).
    pub(crate) fn remove(&self, key: u64, row: i64) {
        let mut t = self.write();
        t.remove(key, row);
    }

    /// Adds many entries under one lock (the build at open).
    pub(crate) fn extend(&self, entries: impl IntoIterator<Item = (u64, i64)>) {
        let mut t = self.write();
        for (key, row) in entries {
            t.insert(key, row);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.read().len
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-changed (each change is
        // one map operation), so a poisoned lock is still usable.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Table {
    fn insert(&mut self, key: u64, row: i64) {
        self.len += 1;
        match self.first.entry(key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(row);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.more.entry(key).or_default().push(row);
            }
        }
    }

    fn remove(&mut self, key: u64, row: i64) {
        let Some(&first) = self.first.get(&key) else {
            return;
        };
        if first == row {
            // The first of the others (if any) takes its place.
            match self.more.get_mut(&key) {
                Some(more) => {
                    let next = more.swap_remove(0);
                    if more.is_empty() {
                        self.more.remove(&key);
                    }
                    self.first.insert(key, next);
                }
                None => {
                    self.first.remove(&key);
                }
            }
            self.len -= 1;
        } else if let Some(more) = self.more.get_mut(&key) {
            if let Some(at) = more.iter().position(|&r| r == row) {
                more.swap_remove(at);
                if more.is_empty() {
                    self.more.remove(&key);
                }
                self.len -= 1;
            }
        }
    }
}

/// The writer's changes to a [`KeyIndex`] within the group being written: entries of inserted
/// rows go in at once (so the group's later commands find them), entries of deleted rows leave
/// after the commit (readers on older snapshots still find those rows).
pub(crate) struct KeyJournal {
    index: Arc<KeyIndex>,
    added: Vec<(u64, i64)>,
    removed: Vec<(u64, i64)>,
}

impl KeyJournal {
    pub(crate) fn new(index: Arc<KeyIndex>) -> Self {
        Self {
            index,
            added: Vec::new(),
            removed: Vec::new(),
        }
    }

    pub(crate) fn index(&self) -> &KeyIndex {
        &self.index
    }

    /// A row was inserted in the open transaction.
    pub(crate) fn inserted(&mut self, key: u64, row: i64) {
        self.index.insert(key, row);
        self.added.push((key, row));
    }

    /// A row was deleted in the open transaction.
    pub(crate) fn deleted(&mut self, key: u64, row: i64) {
        self.removed.push((key, row));
    }

    /// The transaction committed.
    pub(crate) fn committed(&mut self) {
        self.added.clear();
        for (key, row) in self.removed.drain(..) {
            self.index.remove(key, row);
        }
    }

    /// The transaction rolled back: its inserted rows are gone, its deleted ones are back.
    pub(crate) fn rolled_back(&mut self) {
        self.removed.clear();
        for (key, row) in self.added.drain(..) {
            self.index.remove(key, row);
        }
    }
}

/// The writer's journals of the embedded store's two key indexes.
pub(crate) struct WriterKeys {
    /// (tenant, endpoint ID) → incarnation.
    pub(crate) endpoints: KeyJournal,
    /// (tenant, application, token hash) → token row ID.
    pub(crate) tokens: KeyJournal,
}

impl WriterKeys {
    pub(crate) fn committed(&mut self) {
        self.endpoints.committed();
        self.tokens.committed();
    }

    pub(crate) fn rolled_back(&mut self) {
        self.endpoints.rolled_back();
        self.tokens.rolled_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<i64>) -> Vec<i64> {
        v.sort_unstable();
        v
    }

    #[test]
    fn keys_separate_their_parts() {
        let ix = KeyIndex::default();
        assert_ne!(ix.key(&[b"ab", b"c"]), ix.key(&[b"a", b"bc"]));
        assert_eq!(ix.key(&[b"t", b"x"]), ix.key(&[b"t", b"x"]));
    }

    #[test]
    fn rows_under_one_key_are_a_multiset() {
        let ix = KeyIndex::default();
        assert!(ix.candidates(7).is_empty());
        ix.insert(7, 1);
        ix.insert(7, 2);
        ix.insert(7, 2);
        ix.insert(8, 3);
        assert_eq!(sorted(ix.candidates(7)), vec![1, 2, 2]);
        assert_eq!(ix.len(), 4);
        // Taking out the first promotes another; one occurrence at a time.
        ix.remove(7, 1);
        assert_eq!(sorted(ix.candidates(7)), vec![2, 2]);
        ix.remove(7, 2);
        assert_eq!(ix.candidates(7), vec![2]);
        ix.remove(7, 9); // not there: nothing happens
        assert_eq!(ix.candidates(7), vec![2]);
        ix.remove(7, 2);
        assert!(ix.candidates(7).is_empty());
        assert_eq!(ix.candidates(8), vec![3]);
        assert_eq!(ix.len(), 1);
        ix.remove(8, 4);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn removing_from_the_others_keeps_the_first() {
        let ix = KeyIndex::default();
        ix.extend([(5, 10), (5, 11), (5, 12)]);
        ix.remove(5, 11);
        assert_eq!(sorted(ix.candidates(5)), vec![10, 12]);
        ix.remove(5, 12);
        assert_eq!(ix.candidates(5), vec![10]);
    }

    #[test]
    fn a_journal_defers_removals_to_the_commit_and_undoes_a_rollback() {
        let ix = Arc::new(KeyIndex::default());
        ix.insert(1, 100);
        let mut j = KeyJournal::new(ix.clone());
        // Delete row 100 and insert a new row under the same key and ID (freed and reused).
        j.deleted(1, 100);
        j.inserted(1, 100);
        j.inserted(2, 101);
        // Until the commit both the deleted and the new entry are candidates.
        assert_eq!(ix.candidates(1), vec![100, 100]);
        assert_eq!(ix.candidates(2), vec![101]);
        j.committed();
        assert_eq!(ix.candidates(1), vec![100]);
        assert_eq!(ix.candidates(2), vec![101]);

        // A rolled-back group: its insert leaves, its delete never happened.
        j.inserted(3, 102);
        j.deleted(2, 101);
        j.rolled_back();
        assert!(ix.candidates(3).is_empty());
        assert_eq!(ix.candidates(2), vec![101]);
        // Nothing of the rolled-back group is applied by a later commit.
        j.committed();
        assert_eq!(ix.candidates(2), vec![101]);
        assert_eq!(ix.len(), 2);
    }
}
