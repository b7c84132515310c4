//! In-process token-bucket rate limits, per key (a client address, a claim token's hash).
//!
//! Each replica limits on its own (no shared state): with N replicas behind a balancer a
//! client gets up to N times the rate. Buckets live in sharded maps (a std mutex each,
//! held for a lookup), bounded in size: a bucket idle long enough to be full again is the
//! same as no bucket and is dropped when room is needed; when a shard is still full of
//! active buckets, an arbitrary one goes (its key starts afresh: the bound on memory wins
//! over exactness under a flood of distinct keys).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// How often a full shard is swept for idle buckets (a sweep reads the whole shard).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A limit: `per_minute` requests a minute on average, `burst` at once. `per_minute` 0
/// turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Shard<K> {
    buckets: HashMap<K, Bucket>,
    last_sweep: Option<Instant>,
}

pub struct Limiter<K> {
    shards: Box<[Mutex<Shard<K>>]>,
    hasher: RandomState,
    /// Tokens per second; 0: no limit.
    rate: f64,
    burst: f64,
    per_shard: usize,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter keeping at most about `max_keys` buckets.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    last_sweep: None,
                })
            })
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
            rate: f64::from(rate.per_minute) / 60.0,
            burst: f64::from(rate.burst.max(1)),
            per_shard: (max_keys / SHARDS).max(1),
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token of `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        let mut shard = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
        if !shard.buckets.contains_key(key) && shard.buckets.len() >= self.per_shard {
            self.make_room(&mut shard, now);
        }
        let burst = self.burst;
        let rate = self.rate;
        let b = shard.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    fn make_room(&self, shard: &mut Shard<K>, now: Instant) {
        let sweep_due = shard
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if sweep_due {
            shard.last_sweep = Some(now);
            // Full again after this long idle: forgetting it changes nothing.
            let refill = Duration::from_secs_f64(self.burst / self.rate);
            shard
                .buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < refill);
        }
        if shard.buckets.len() >= self.per_shard {
            if let Some(k) = shard.buckets.keys().next().cloned() {
                shard.buckets.remove(&k);
            }
        }
    }

    /// Buckets held (tests and metrics).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).buckets.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whole seconds to announce in `Retry-After` (at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_steady_rate() {
        let l = Limiter::new(
            Rate {
                per_minute: 60,
                burst: 3,
            },
            1000,
        );
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(&"a", t0).is_ok());
        }
        let wait = l.check(&"a", t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert_eq!(retry_after_secs(wait), 1);
        // Other keys are not affected.
        assert!(l.check(&"b", t0).is_ok());
        // One token a second comes back; no more than the burst accumulates.
        assert!(l.check(&"a", t0 + Duration::from_millis(1000)).is_ok());
        assert!(l.check(&"a", t0 + Duration::from_millis(1001)).is_err());
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.check(&"a", later).is_ok());
        }
        assert!(l.check(&"a", later).is_err());
    }

    #[test]
    fn zero_rate_is_off() {
        let l = Limiter::new(
            Rate {
                per_minute: 0,
                burst: 1,
            },
            10,
        );
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(l.check(&1u32, t0).is_ok());
        }
        assert!(l.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_idle_buckets_go_first() {
        let l = Limiter::new(
            Rate {
                per_minute: 60,
                burst: 2,
            },
            SHARDS * 4,
        );
        let t0 = Instant::now();
        for k in 0..10_000u32 {
            let _ = l.check(&k, t0);
        }
        assert!(l.len() <= SHARDS * 4, "{}", l.len());
        // Long idle: every bucket is full again and may go; the new ones fit.
        let later = t0 + Duration::from_secs(10);
        for k in 20_000..20_010u32 {
            assert!(l.check(&k, later).is_ok());
        }
        assert!(l.len() <= SHARDS * 4);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(12_001)), 13);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
