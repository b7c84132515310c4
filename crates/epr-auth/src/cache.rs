//! Verified tokens, remembered so that a token's signature is checked once, not on every
//! request. Keyed by the token's SHA-256 (the token itself is not kept); sharded
//! `RwLock`ed maps, no lock held across an await.

use epr_core::auth::Principal;
use epr_core::ids::TenantId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

const SHARDS: usize = 16;

pub type TokenKey = [u8; 32];

pub fn key_of(token: &str) -> TokenKey {
    Sha256::digest(token.as_bytes()).into()
}

/// What a verified token gave, and what must still hold for it to be reused.
pub struct Cached {
    pub principal: Arc<Principal>,
    /// `exp`, seconds since the epoch.
    pub exp: i64,
    pub tenant: TenantId,
    pub issuer: String,
    /// The key's id in the issuer's set ([`crate::jwks::KeyEntry::id`]).
    pub key_id: String,
}

pub struct TokenCache {
    shards: Vec<RwLock<HashMap<TokenKey, Arc<Cached>>>>,
    per_shard: usize,
    len: AtomicUsize,
}

impl TokenCache {
    /// `capacity` 0: nothing is remembered.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            len: AtomicUsize::new(0),
        }
    }

    fn shard(&self, k: &TokenKey) -> &RwLock<HashMap<TokenKey, Arc<Cached>>> {
        &self.shards[k[0] as usize % SHARDS]
    }

    pub fn get(&self, k: &TokenKey) -> Option<Arc<Cached>> {
        if self.per_shard == 0 {
            return None;
        }
        self.shard(k)
            .read()
            .expect("token cache lock")
            .get(k)
            .cloned()
    }

    pub fn remove(&self, k: &TokenKey) {
        if self
            .shard(k)
            .write()
            .expect("token cache lock")
            .remove(k)
            .is_some()
        {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Remember a verified token; a full shard first drops its expired entries, then (still
    /// full) the entry expiring first.
    pub fn insert(&self, k: TokenKey, v: Cached, now: i64) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(&k).write().expect("token cache lock");
        let before = shard.len();
        if shard.len() >= self.per_shard && !shard.contains_key(&k) {
            shard.retain(|_, c| c.exp >= now);
            if shard.len() >= self.per_shard {
                if let Some(victim) = shard.iter().min_by_key(|(_, c)| c.exp).map(|(k, _)| *k) {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(k, Arc::new(v));
        let after = shard.len();
        drop(shard);
        let len = if after >= before {
            self.len.fetch_add(after - before, Ordering::Relaxed) + (after - before)
        } else {
            self.len.fetch_sub(before - after, Ordering::Relaxed) - (before - after)
        };
        metrics::gauge!("epr_auth_token_cache_entries").set(len as f64);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(exp: i64) -> Cached {
        let t = TenantId::parse("t").unwrap();
        Cached {
            principal: Arc::new(Principal::anonymous(t.clone())),
            exp,
            tenant: t,
            issuer: "i".into(),
            key_id: "k".into(),
        }
    }

    #[test]
    fn bounded_and_expired_first() {
        let c = TokenCache::new(16); // one entry per shard
        let mut k1 = [0u8; 32];
        k1[1] = 1;
        let mut k2 = [0u8; 32];
        k2[1] = 2; // same shard as k1
        c.insert(k1, entry(100), 50);
        c.insert(k2, entry(200), 50);
        assert!(
            c.get(&k1).is_none(),
            "the shard holds one entry: the older goes"
        );
        assert!(c.get(&k2).is_some());
        assert_eq!(c.len(), 1);
        c.remove(&k2);
        assert_eq!(c.len(), 0);
        let off = TokenCache::new(0);
        off.insert(k1, entry(100), 0);
        assert!(off.get(&k1).is_none());
    }
}
