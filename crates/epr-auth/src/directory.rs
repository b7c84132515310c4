//! The tenant directory: configured tenants plus the Tenant Manager's, minus those
//! unregistered by a 21/TLE notice; each with its issuer's keys.
//!
//! The rule for unregistered tenants: `tenant_unregistered` removes the tenant at once and
//! stamps the notice with a sequence number. A Tenant Manager read remembers the sequence
//! number at its start; a tenant it lists is kept out while its notice is newer than the
//! read (the read may have started before the removal), and comes back only when a read
//! that started after the notice lists it again. A configured tenant stays out until a
//! `tenant_updated` notice names it or the service restarts.

use crate::jwks::IssuerKeys;
use epr_core::auth::{TenantInfo, TenantSnapshot};
use epr_core::ids::TenantId;
use jsonwebtoken::Algorithm;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// A tenant as configured or listed by the Tenant Manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSpec {
    pub id: TenantId,
    pub issuer: String,
    /// Accepted audiences (already resolved: the tenant's own, else `auth.audiences`).
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
}

/// A usable tenant.
pub struct TenantEntry {
    pub spec: TenantSpec,
    pub keys: Arc<IssuerKeys>,
}

/// What the hot path reads: swapped as a whole on every change.
#[derive(Default)]
pub struct DirState {
    pub by_issuer: HashMap<String, Arc<TenantEntry>>,
    pub by_id: HashMap<TenantId, Arc<TenantEntry>>,
    /// Issuers of unregistered tenants, so that their tokens are refused as such.
    pub removed_issuers: HashMap<String, TenantId>,
}

struct Removed {
    seq: u64,
    issuer: Option<String>,
}

struct Inner {
    tm: Vec<TenantSpec>,
    removed: HashMap<TenantId, Removed>,
    seq: u64,
    keys: HashMap<String, Arc<IssuerKeys>>,
}

pub struct Directory {
    config: Vec<TenantSpec>,
    accepted: Vec<Algorithm>,
    min_refetch: Duration,
    state: RwLock<Arc<DirState>>,
    inner: Mutex<Inner>,
}

impl Directory {
    pub fn new(config: Vec<TenantSpec>, accepted: Vec<Algorithm>, min_refetch: Duration) -> Self {
        let dir = Self {
            config,
            accepted,
            min_refetch,
            state: RwLock::default(),
            inner: Mutex::new(Inner {
                tm: Vec::new(),
                removed: HashMap::new(),
                seq: 0,
                keys: HashMap::new(),
            }),
        };
        let mut inner = dir.inner.lock().expect("directory lock");
        dir.rebuild(&mut inner);
        drop(inner);
        dir
    }

    /// The current state (cheap: an `Arc` clone under a read lock).
    pub fn state(&self) -> Arc<DirState> {
        self.state.read().expect("directory lock").clone()
    }

    /// The tenants as published to front-ends.
    pub fn snapshot(&self) -> TenantSnapshot {
        let st = self.state();
        let tenants: BTreeMap<TenantId, TenantInfo> = st
            .by_id
            .values()
            .map(|t| {
                (
                    t.spec.id.clone(),
                    TenantInfo {
                        id: t.spec.id.clone(),
                        issuer: Some(t.spec.issuer.clone()),
                    },
                )
            })
            .collect();
        TenantSnapshot { tenants }
    }

    /// Every issuer's keys, for the periodic refresh and health.
    pub fn issuers(&self) -> Vec<Arc<IssuerKeys>> {
        let mut v: Vec<_> = self
            .state()
            .by_issuer
            .values()
            .map(|t| t.keys.clone())
            .collect();
        v.sort_by(|a, b| a.issuer().cmp(b.issuer()));
        v
    }

    /// Call before a Tenant Manager read; pass the result to [`Directory::apply_tm`].
    pub fn read_started(&self) -> u64 {
        self.inner.lock().expect("directory lock").seq
    }

    /// A complete Tenant Manager list, read from a request that began at `started`.
    pub fn apply_tm(&self, mut list: Vec<TenantSpec>, started: u64) {
        let mut inner = self.inner.lock().expect("directory lock");
        let mut readmitted = Vec::new();
        list.retain(|t| match inner.removed.get(&t.id) {
            Some(r) if r.seq > started => false,
            Some(_) => {
                readmitted.push(t.id.clone());
                true
            }
            None => true,
        });
        for id in readmitted {
            tracing::info!(tenant = %id, "an unregistered tenant is listed again by the Tenant Manager");
            inner.removed.remove(&id);
        }
        inner.tm = list;
        self.rebuild(&mut inner);
    }

    /// 21/TLE `unregistered`: the tenant is out at once.
    pub fn unregister(&self, id: TenantId) {
        let mut inner = self.inner.lock().expect("directory lock");
        inner.seq += 1;
        let issuer = self.state().by_id.get(&id).map(|t| t.spec.issuer.clone());
        let issuer = issuer.or_else(|| inner.removed.get(&id).and_then(|r| r.issuer.clone()));
        let seq = inner.seq;
        inner.removed.insert(id, Removed { seq, issuer });
        self.rebuild(&mut inner);
    }

    /// 21/TLE `updated`: a configured tenant unregistered before is back.
    pub fn updated(&self, id: &TenantId) {
        let mut inner = self.inner.lock().expect("directory lock");
        if self.config.iter().any(|t| &t.id == id) && inner.removed.remove(id).is_some() {
            tracing::info!(tenant = %id, "a configured tenant is back after a tenant update notice");
            self.rebuild(&mut inner);
        }
    }

    fn rebuild(&self, inner: &mut Inner) {
        let mut by_id: HashMap<TenantId, Arc<TenantEntry>> = HashMap::new();
        let mut by_issuer: HashMap<String, Arc<TenantEntry>> = HashMap::new();
        let mut keys: HashMap<String, Arc<IssuerKeys>> = HashMap::new();
        let config_ids: Vec<&TenantId> = self.config.iter().map(|t| &t.id).collect();
        let tm = inner.tm.iter().filter(|t| !config_ids.contains(&&t.id));
        for spec in self.config.iter().chain(tm) {
            if inner.removed.contains_key(&spec.id) {
                continue;
            }
            if let Some(other) = by_issuer.get(&spec.issuer) {
                tracing::error!(tenant = %spec.id, other = %other.spec.id, issuer = %spec.issuer,
                    "the Tenant Manager lists a configured tenant's issuer for another tenant; it is left out");
                continue;
            }
            // Keys survive list refreshes: a tenant re-read does not refetch its keys.
            let k = inner
                .keys
                .get(&spec.issuer)
                .filter(|k| k.jwks_uri_setting() == spec.jwks_uri.as_deref())
                .cloned()
                .unwrap_or_else(|| {
                    Arc::new(IssuerKeys::new(
                        spec.issuer.clone(),
                        spec.jwks_uri.clone(),
                        self.accepted.clone(),
                        self.min_refetch,
                    ))
                });
            keys.insert(spec.issuer.clone(), k.clone());
            let entry = Arc::new(TenantEntry {
                spec: spec.clone(),
                keys: k,
            });
            by_issuer.insert(spec.issuer.clone(), entry.clone());
            by_id.insert(spec.id.clone(), entry);
        }
        let removed_issuers = inner
            .removed
            .iter()
            .filter_map(|(id, r)| Some((r.issuer.clone()?, id.clone())))
            .filter(|(iss, _)| !by_issuer.contains_key(iss))
            .collect();
        inner.keys = keys;
        *self.state.write().expect("directory lock") = Arc::new(DirState {
            by_issuer,
            by_id,
            removed_issuers,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, iss: &str) -> TenantSpec {
        TenantSpec {
            id: TenantId::parse(id).unwrap(),
            issuer: iss.into(),
            audiences: vec!["a".into()],
            jwks_uri: None,
        }
    }

    fn dir() -> Directory {
        Directory::new(
            vec![spec("cfg", "http://i/cfg")],
            vec![Algorithm::RS256],
            Duration::from_secs(1),
        )
    }

    fn ids(d: &Directory) -> Vec<String> {
        d.snapshot()
            .tenants
            .keys()
            .map(|t| t.as_str().to_owned())
            .collect()
    }

    #[test]
    fn unregister_wins_over_an_older_read_and_yields_to_a_newer_one() {
        let d = dir();
        let started = d.read_started();
        d.unregister(TenantId::parse("t1").unwrap());
        d.apply_tm(
            vec![spec("t1", "http://i/t1"), spec("t2", "http://i/t2")],
            started,
        );
        assert_eq!(ids(&d), ["cfg", "t2"]);
        assert_eq!(
            d.state().removed_issuers.get("http://i/t1"),
            None,
            "t1 was not known when unregistered, so its issuer is not remembered"
        );
        let newer = d.read_started();
        d.apply_tm(
            vec![spec("t1", "http://i/t1"), spec("t2", "http://i/t2")],
            newer,
        );
        assert_eq!(ids(&d), ["cfg", "t1", "t2"]);
    }

    #[test]
    fn removed_issuers_are_remembered_and_config_tenants_return_on_update() {
        let d = dir();
        let cfg = TenantId::parse("cfg").unwrap();
        d.unregister(cfg.clone());
        assert!(ids(&d).is_empty());
        assert_eq!(d.state().removed_issuers.get("http://i/cfg"), Some(&cfg));
        d.apply_tm(vec![], d.read_started());
        assert!(
            ids(&d).is_empty(),
            "a TM read does not bring back a configured tenant"
        );
        d.updated(&cfg);
        assert_eq!(ids(&d), ["cfg"]);
        assert!(d.state().removed_issuers.is_empty());
    }

    #[test]
    fn keys_survive_refreshes_and_config_wins() {
        let d = dir();
        let k1 = d.state().by_issuer["http://i/cfg"].keys.clone();
        d.apply_tm(
            vec![spec("cfg", "http://other"), spec("t", "http://i/cfg")],
            d.read_started(),
        );
        let st = d.state();
        assert!(Arc::ptr_eq(&k1, &st.by_issuer["http://i/cfg"].keys));
        assert_eq!(
            ids(&d),
            ["cfg"],
            "same id or same issuer as a configured tenant: left out"
        );
    }
}
