//! Randomized tenant isolation: two tenants, `alpha` (the default tenant: NATS instance
//! `<name>`) and `beta` (`<name>-beta`), each with its own loopback OpenID issuer, hold
//! **overlapping** endpoint IDs, the same app versions, filter names and queries and metadata
//! keys. 600 random operations, each by a random tenant over REST (its admin
//! token) or NATS (19/EPMMP, 20/EFMP on its instance subject), are checked against a model
//! of the acting tenant only, so anything read from or written to the other tenant shows up
//! as a mismatch. Full listings of both tenants are compared with their models every 50
//! operations and at the end; events of both instance subjects are checked for the
//! other tenant's correlation IDs and against the model's expected events; and an attacker
//! with one tenant's token tries headers, parameters, paths and forged tokens to reach the
//! other, and compares the other tenant's 404s with 404s of IDs that exist nowhere.
//!
//! Seeded: `EPR_ISOLATION_SEED=<n>` replays a run; the seed is printed when the test fails.

use crate::helpers::{poll, TestApp};
use crate::nats_support::{
    decode, shared_client, shared_url, spawn_on_nats, unique_instance, wait_nats, Event,
};
use epr_auth::testkit::{TestIssuer, TestKey};
use epr_events::{efmp, epmmp};
use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OPS: usize = 600;
const POOL: usize = 8;
const VERSIONS: [&str; 3] = ["demo-v1", "demo-v2", "other-v1"];
const APPS: [&str; 2] = ["demo", "other"];
const FILTER_NAMES: [&str; 3] = ["near", "far", "all"];
const TOKENS: [&str; 3] = ["tok-0", "tok-1", "tok-2"];
const KEYS: [&str; 4] = ["city", "level", "owner", "note"];
const QUERIES: usize = 4;
/// `metadataFilter` parameter sets (repeated parameters are ANDed).
const MD_FILTERS: [&[&str]; 6] = [
    &["city=Kyiv"],
    &["level=3"],
    &["owner"],
    &["!city"],
    &[r#"{"city":"Lviv"}"#],
    &["owner", "city=Kyiv"],
];
const ROLES: [&str; 2] = ["endpoint-admin", "application-admin"];

/// xorshift64*: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Prints the seed when the test panics, so the run can be replayed.
struct SeedReport(u64);

impl Drop for SeedReport {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "tenant isolation test failed; replay with EPR_ISOLATION_SEED={}",
                self.0
            );
        }
    }
}

fn seed() -> u64 {
    match std::env::var("EPR_ISOLATION_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("EPR_ISOLATION_SEED must be a u64, got {s:?}")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            t | 1
        }
    }
}

fn app_of(version: &str) -> &str {
    version.split('-').next().unwrap()
}

fn query(i: usize) -> Value {
    match i {
        0 => json!({"application_version": "demo-v1"}),
        1 => json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}),
        2 => json!({"metadata": {"$elemMatch": {"key": "level", "value": {"$gte": 3}}}}),
        _ => json!({"metadata.key": "owner"}),
    }
}

#[derive(Clone, Debug)]
struct Ep {
    version: String,
    metadata: Map<String, Value>,
    token: String,
    /// Registration order within the tenant (the listing order).
    order: u64,
}

impl Ep {
    fn matches(&self, q: usize) -> bool {
        let md = &self.metadata;
        match q {
            0 => self.version == "demo-v1",
            1 => md.get("city") == Some(&json!("Kyiv")),
            2 => md
                .get("level")
                .and_then(Value::as_i64)
                .is_some_and(|l| l >= 3),
            _ => md.contains_key("owner"),
        }
    }
}

#[derive(Clone, Debug)]
struct Filt {
    app: String,
    name: String,
    description: String,
    query: usize,
    order: u64,
}

/// One tenant's expected state.
#[derive(Default)]
struct Model {
    eps: BTreeMap<String, Ep>,
    filters: BTreeMap<String, Filt>,
    next: u64,
    /// (application, task ID) of batch registrations.
    tasks: Vec<(String, String)>,
}

impl Model {
    fn order(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Active filters an endpoint matches, sorted.
    fn filters_of(&self, id: &str) -> Vec<String> {
        let ep = &self.eps[id];
        self.filters
            .iter()
            .filter(|(_, f)| f.app == app_of(&ep.version) && ep.matches(f.query))
            .map(|(fid, _)| fid.clone())
            .collect()
    }

    fn members(&self, fid: &str) -> Vec<&str> {
        let f = &self.filters[fid];
        self.sorted()
            .into_iter()
            .filter(|(_, ep)| app_of(&ep.version) == f.app && ep.matches(f.query))
            .map(|(id, _)| id)
            .collect()
    }

    fn sorted(&self) -> Vec<(&str, &Ep)> {
        let mut v: Vec<(&str, &Ep)> = self.eps.iter().map(|(k, e)| (k.as_str(), e)).collect();
        v.sort_by_key(|(_, e)| e.order);
        v
    }

    fn token_taken(&self, app: &str, token: &str) -> bool {
        self.eps
            .values()
            .any(|e| app_of(&e.version) == app && e.token == token)
    }

    /// `{id, version, metadata}` of the endpoints a `metadataFilter` set selects, in order.
    fn listing(&self, md_filter: &[&str]) -> Vec<Value> {
        self.sorted()
            .into_iter()
            .filter(|(_, ep)| md_filter.iter().all(|f| md_matches(f, &ep.metadata)))
            .map(|(id, ep)| row(id, &ep.version, &Value::Object(ep.metadata.clone())))
            .collect()
    }

    fn metadata_keys(&self, app: &str) -> Value {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for ep in self.eps.values().filter(|e| app_of(&e.version) == app) {
            for k in ep.metadata.keys() {
                out.entry(ep.version.clone()).or_default().insert(k.clone());
            }
        }
        serde_json::to_value(out).unwrap()
    }
}

fn row(id: &str, version: &str, metadata: &Value) -> Value {
    json!({"endpointId": id, "version": version, "metadata": metadata})
}

/// The `metadataFilter` language, for the expressions in [`MD_FILTERS`].
fn md_matches(f: &str, md: &Map<String, Value>) -> bool {
    if let Some(key) = f.strip_prefix('!') {
        return !md.contains_key(key);
    }
    if f.starts_with('{') {
        let want: Map<String, Value> = serde_json::from_str(f).unwrap();
        return want.iter().all(|(k, v)| md.get(k) == Some(v));
    }
    match f.split_once('=') {
        Some((k, v)) => md.get(k).is_some_and(|have| {
            have == &json!(v) || serde_json::from_str::<Value>(v).is_ok_and(|j| &j == have)
        }),
        None => md.contains_key(f),
    }
}

/// An endpoint event: (subject tail, correlation ID, endpoint ID).
type EvKey = (String, String, String);

/// Messages received on a subject: (subject, payload).
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

struct Tenant {
    name: &'static str,
    instance: String,
    token: String,
    issuer: TestIssuer,
    key: TestKey,
    model: Model,
    /// Every correlation ID this tenant used.
    issued: BTreeSet<String>,
    /// Every filter ID this tenant ever had.
    filter_ids: BTreeSet<String>,
    expected: BTreeSet<EvKey>,
    seen: Seen,
    n: u64,
}

impl Tenant {
    fn corr(&mut self, kind: &str) -> String {
        self.n += 1;
        let c = format!("{}-{kind}{}", self.name, self.n);
        self.issued.insert(c.clone());
        c
    }
    fn expect(&mut self, kind: &str, corr: &str, id: &str) {
        self.expected
            .insert((kind.to_owned(), corr.to_owned(), id.to_owned()));
    }
}

struct Resp {
    status: u16,
    body: Value,
    text: String,
    headers: HeaderMap,
}

struct World {
    app: TestApp,
    nats: async_nats::Client,
    rng: Rng,
    t: [Tenant; 2],
    /// Short description of the current operation, for failure messages.
    op: String,
    /// Answers per (operation word, status): shows what a run covered.
    tally: BTreeMap<(String, u16), usize>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

impl World {
    fn random_id(&mut self) -> String {
        format!("ep-{}", self.rng.below(POOL))
    }

    fn random_value(&mut self, key: &str) -> Value {
        match key {
            "city" => json!(self.rng.pick(&["Kyiv", "Lviv", "Odesa"])),
            "level" => json!(1 + self.rng.below(5)),
            "owner" => json!(self.rng.pick(&["alpha", "beta"])),
            _ if self.rng.chance(30) => json!({"n": self.rng.below(3)}),
            _ => json!(format!("x{}", self.rng.below(4))),
        }
    }

    fn random_metadata(&mut self) -> Map<String, Value> {
        let mut m = Map::new();
        for k in KEYS {
            if self.rng.chance(50) {
                m.insert(k.into(), self.random_value(k));
            }
        }
        m
    }

    /// A REST call by tenant `t` with its token and a fresh `X-Request-Id`; returns the
    /// answer and the request ID.
    async fn rest(
        &mut self,
        t: usize,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<(Value, &str)>,
    ) -> (Resp, String) {
        let corr = self.t[t].corr("r");
        let mut req = self
            .app
            .api(method, &with_query(path, query))
            .bearer_auth(&self.t[t].token)
            .header("x-request-id", &corr);
        if let Some((b, ct)) = body {
            req = req.header("content-type", ct).body(b.to_string());
        }
        let r = to_resp(req.send().await.unwrap()).await;
        self.count(r.status);
        (r, corr)
    }

    fn count(&mut self, status: u16) {
        let word = self.op.split(' ').next().unwrap_or_default().to_owned();
        *self.tally.entry((word, status)).or_default() += 1;
    }

    fn ctx(&self, t: usize, r: &Resp) -> String {
        format!("{} by {}: {} {}", self.op, self.t[t].name, r.status, r.text)
    }

    // ---- endpoints over REST -------------------------------------------------------------

    async fn register(
        &mut self,
        t: usize,
        id: &str,
        version: &str,
        md: Map<String, Value>,
        token: Option<&str>,
    ) {
        self.op = format!("register {id} {version} {md:?} token {token:?}");
        let mut body = json!({"endpointId": id, "appVersion": {"name": version}});
        if !md.is_empty() || self.rng.chance(50) {
            body["metadata"] = Value::Object(md.clone());
        }
        if let Some(tok) = token {
            body["endpointToken"] = json!(tok);
        }
        let (r, corr) = self
            .rest(
                t,
                Method::POST,
                "/endpoints",
                &[],
                Some((body, "application/json")),
            )
            .await;
        let m = &self.t[t].model;
        let conflict =
            m.eps.contains_key(id) || token.is_some_and(|k| m.token_taken(app_of(version), k));
        let want = if conflict { 409 } else { 201 };
        assert_eq!(r.status, want, "{}", self.ctx(t, &r));
        if conflict {
            return;
        }
        assert_eq!(r.body["endpointId"], id, "{}", self.ctx(t, &r));
        let tok = r.body["token"].as_str().unwrap().to_owned();
        if let Some(k) = token {
            assert_eq!(tok, k, "{}", self.ctx(t, &r));
        }
        let tn = &mut self.t[t];
        let order = tn.model.order();
        tn.model.eps.insert(
            id.into(),
            Ep {
                version: version.into(),
                metadata: md.clone(),
                token: tok,
                order,
            },
        );
        tn.expect("lifecycle.registered", &corr, id);
        if !md.is_empty() {
            tn.expect("metadata.updated", &corr, id);
        }
    }

    async fn op_register(&mut self, t: usize) {
        let id = self.random_id();
        let version = *self.rng.pick(&VERSIONS);
        let md = self.random_metadata();
        let token = self.rng.chance(40).then(|| *self.rng.pick(&TOKENS));
        self.register(t, &id, version, md, token).await;
    }

    async fn op_get(&mut self, t: usize) {
        let id = self.random_id();
        let include = self.rng.chance(70);
        self.op = format!("GET /endpoints/{id} include {include}");
        let q: Vec<(&str, String)> = if include {
            vec![("include", "metadata,filters".into())]
        } else {
            vec![]
        };
        let (r, _) = self
            .rest(t, Method::GET, &format!("/endpoints/{id}"), &q, None)
            .await;
        let m = &self.t[t].model;
        let Some(ep) = m.eps.get(&id) else {
            assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
            return;
        };
        assert_eq!(r.status, 200, "{}", self.ctx(t, &r));
        assert_eq!(r.body["endpointId"], id.as_str(), "{}", self.ctx(t, &r));
        assert_eq!(
            r.body["appVersion"]["name"],
            ep.version.as_str(),
            "{}",
            self.ctx(t, &r)
        );
        if include {
            assert_eq!(
                r.body["metadata"],
                Value::Object(ep.metadata.clone()),
                "{}",
                self.ctx(t, &r)
            );
            let mut got: Vec<String> = serde_json::from_value(r.body["filters"].clone()).unwrap();
            got.sort();
            assert_eq!(got, m.filters_of(&id), "{}", self.ctx(t, &r));
        }
    }

    /// `GET /endpoints` (all, or by `metadataFilter`) equals the model.
    async fn check_listing(&mut self, t: usize, md_filter: &[&str], extra: &[(&str, &str)]) {
        self.op = format!("list metadataFilter {md_filter:?} {extra:?}");
        let mut q: Vec<(&str, String)> =
            vec![("include", "metadata".into()), ("limit", "100".into())];
        q.extend(
            md_filter
                .iter()
                .map(|f| ("metadataFilter", (*f).to_owned())),
        );
        let mut req = self
            .app
            .api(Method::GET, &with_query("/endpoints", &q))
            .bearer_auth(&self.t[t].token);
        let corr = self.t[t].corr("r");
        req = req.header("x-request-id", corr);
        for (h, v) in extra {
            req = req.header(*h, *v);
        }
        let r = to_resp(req.send().await.unwrap()).await;
        assert_eq!(r.status, 200, "{}", self.ctx(t, &r));
        let want = self.t[t].model.listing(md_filter);
        assert_eq!(rows(&r.body), want, "{}", self.ctx(t, &r));
        assert_eq!(r.body["totalElements"], want.len(), "{}", self.ctx(t, &r));
    }

    async fn op_list(&mut self, t: usize) {
        match self.rng.below(3) {
            0 => self.check_listing(t, &[], &[]).await,
            1 => {
                let f = *self.rng.pick(&MD_FILTERS);
                self.check_listing(t, f, &[]).await
            }
            _ => {
                let (owner, fid) = self.some_filter(t);
                self.op = format!("list filterId {fid} (of {})", self.t[owner].name);
                let (r, _) = self
                    .rest(
                        t,
                        Method::GET,
                        "/endpoints",
                        &[("filterId", fid.clone()), ("limit", "100".into())],
                        None,
                    )
                    .await;
                let m = &self.t[t].model;
                if !m.filters.contains_key(&fid) {
                    assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
                    return;
                }
                assert_eq!(r.status, 200, "{}", self.ctx(t, &r));
                let got: Vec<&str> = r.body["content"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["endpointId"].as_str().unwrap())
                    .collect();
                assert_eq!(got, m.members(&fid), "{}", self.ctx(t, &r));
                assert_eq!(r.body["totalElements"], got.len(), "{}", self.ctx(t, &r));
            }
        }
    }

    async fn op_app_version(&mut self, t: usize) {
        let id = self.random_id();
        let version = *self.rng.pick(&VERSIONS);
        self.op = format!("PUT /endpoints/{id}/app-version {version}");
        let (r, corr) = self
            .rest(
                t,
                Method::PUT,
                &format!("/endpoints/{id}/app-version"),
                &[],
                Some((json!({"name": version}), "application/json")),
            )
            .await;
        let tn = &mut self.t[t];
        let Some(ep) = tn.model.eps.get_mut(&id) else {
            assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
            return;
        };
        if app_of(&ep.version) != app_of(version) {
            assert_eq!(r.status, 400, "{}", self.ctx(t, &r));
            assert_eq!(r.body["rule"], "same-application", "{}", self.ctx(t, &r));
            return;
        }
        let changed = ep.version != version;
        ep.version = version.into();
        if changed {
            tn.expect("lifecycle.appversion-updated", &corr, &id);
        }
        assert_eq!(r.status, 204, "{}", self.ctx(t, &r));
    }

    /// Applies a metadata change the server answered: 404 when the model has no such
    /// endpoint, else `ok` (and the change, with its event when it changes anything).
    fn metadata_change(
        &mut self,
        t: usize,
        id: &str,
        corr: &str,
        (status, what): (u16, &str),
        ok: u16,
        change: impl FnOnce(&mut Map<String, Value>) -> bool,
    ) {
        let tn = &mut self.t[t];
        let Some(ep) = tn.model.eps.get_mut(id) else {
            assert_eq!(status, 404, "{} by {}: {what}", self.op, tn.name);
            return;
        };
        let mut md = ep.metadata.clone();
        if !change(&mut md) {
            assert_eq!(status, 404, "{} by {}: {what}", self.op, tn.name);
            return;
        }
        assert_eq!(status, ok, "{} by {}: {what}", self.op, tn.name);
        if md != ep.metadata {
            ep.metadata = md;
            tn.expect("metadata.updated", corr, id);
        }
    }

    async fn op_metadata_write(&mut self, t: usize) {
        let id = self.random_id();
        let path = format!("/endpoints/{id}/metadata");
        match self.rng.below(4) {
            0 => {
                let md = self.random_metadata();
                self.op = format!("PUT {path} {md:?}");
                let (r, corr) = self
                    .rest(
                        t,
                        Method::PUT,
                        &path,
                        &[],
                        Some((Value::Object(md.clone()), "application/json")),
                    )
                    .await;
                self.metadata_change(t, &id, &corr, (r.status, &r.text), 204, |m| {
                    *m = md;
                    true
                });
            }
            1 => {
                let mut patch = Map::new();
                for k in KEYS {
                    if self.rng.chance(40) {
                        let v = if self.rng.chance(30) {
                            Value::Null
                        } else {
                            self.random_value(k)
                        };
                        patch.insert(k.into(), v);
                    }
                }
                self.op = format!("PATCH {path} {patch:?}");
                let (r, corr) = self
                    .rest(
                        t,
                        Method::PATCH,
                        &path,
                        &[],
                        Some((Value::Object(patch.clone()), "application/merge-patch+json")),
                    )
                    .await;
                self.metadata_change(t, &id, &corr, (r.status, &r.text), 204, |m| {
                    for (k, v) in patch {
                        if v.is_null() {
                            m.remove(&k);
                        } else {
                            m.insert(k, v);
                        }
                    }
                    true
                });
            }
            2 => {
                let key = *self.rng.pick(&KEYS);
                let v = self.random_value(key);
                self.op = format!("PUT {path}/{key} {v}");
                let (r, corr) = self
                    .rest(
                        t,
                        Method::PUT,
                        &format!("{path}/{key}"),
                        &[],
                        Some((v.clone(), "application/json")),
                    )
                    .await;
                self.metadata_change(t, &id, &corr, (r.status, &r.text), 204, |m| {
                    m.insert(key.into(), v);
                    true
                });
            }
            _ => {
                let key = *self.rng.pick(&KEYS);
                self.op = format!("DELETE {path}/{key}");
                let (r, corr) = self
                    .rest(t, Method::DELETE, &format!("{path}/{key}"), &[], None)
                    .await;
                self.metadata_change(t, &id, &corr, (r.status, &r.text), 204, |m| {
                    m.remove(key).is_some()
                });
            }
        }
    }

    async fn op_delete(&mut self, t: usize) {
        let id = self.random_id();
        self.op = format!("DELETE /endpoints/{id}");
        let (r, corr) = self
            .rest(t, Method::DELETE, &format!("/endpoints/{id}"), &[], None)
            .await;
        let tn = &mut self.t[t];
        if tn.model.eps.remove(&id).is_some() {
            assert_eq!(r.status, 204, "{}", self.ctx(t, &r));
            self.t[t].expect("lifecycle.unregistered", &corr, &id);
            // Its registration token (never revoked here) is announced revoked.
            self.t[t].expect("token.revoked", &corr, &id);
        } else {
            assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
        }
    }

    async fn op_batch(&mut self, t: usize) {
        let version = *self.rng.pick(&VERSIONS);
        let app = app_of(version).to_owned();
        let mut items = Vec::new();
        for _ in 0..1 + self.rng.below(4) {
            let mut item = json!({"endpointId": self.random_id()});
            if self.rng.chance(40) {
                item["endpointToken"] = json!(self.rng.pick(&TOKENS));
            }
            if self.rng.chance(60) {
                item["metadata"] = Value::Object(self.random_metadata());
            }
            items.push(item);
        }
        self.op = format!("batch {version} {items:?}");
        let body = json!({"appVersion": {"name": version}, "endpoints": items});
        let (r, corr) = self
            .rest(
                t,
                Method::POST,
                "/endpoints/batch",
                &[],
                Some((body, "application/json")),
            )
            .await;
        assert_eq!(r.status, 202, "{}", self.ctx(t, &r));
        let task = r.body["taskId"].as_str().unwrap().to_owned();
        let (r, _) = self
            .rest(
                t,
                Method::GET,
                "/endpoints/batch/status",
                &[("appName", app.clone()), ("taskId", task.clone())],
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", self.ctx(t, &r));
        let created: BTreeMap<usize, Value> = r.body["created"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["index"].as_u64().unwrap() as usize, c.clone()))
            .collect();
        let failed: BTreeSet<usize> = r.body["failed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_u64().unwrap() as usize)
            .collect();
        let ctx = self.ctx(t, &r);
        let tn = &mut self.t[t];
        tn.model.tasks.push((app.clone(), task));
        for (i, item) in items.iter().enumerate() {
            let id = item["endpointId"].as_str().unwrap();
            let token = item["endpointToken"].as_str();
            let refused = tn.model.eps.contains_key(id)
                || token.is_some_and(|k| tn.model.token_taken(&app, k));
            if refused {
                assert!(
                    failed.contains(&i) && !created.contains_key(&i),
                    "item {i}: {ctx}"
                );
                continue;
            }
            let c = created
                .get(&i)
                .unwrap_or_else(|| panic!("item {i} not created: {ctx}"));
            assert_eq!(c["endpointId"], id, "{ctx}");
            let md = item["metadata"].as_object().cloned().unwrap_or_default();
            let order = tn.model.order();
            tn.model.eps.insert(
                id.into(),
                Ep {
                    version: version.into(),
                    metadata: md.clone(),
                    token: c["endpointToken"].as_str().unwrap().to_owned(),
                    order,
                },
            );
            tn.expect("lifecycle.registered", &corr, id);
            if !md.is_empty() {
                tn.expect("metadata.updated", &corr, id);
            }
        }
        assert_eq!(created.len() + failed.len(), items.len(), "{ctx}");
    }

    async fn op_app_metadata_keys(&mut self, t: usize) {
        let app = *self.rng.pick(&APPS);
        self.op = format!("GET /applications/{app}/metadata-keys");
        let (r, _) = self
            .rest(
                t,
                Method::GET,
                &format!("/applications/{app}/metadata-keys"),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", self.ctx(t, &r));
        assert_eq!(
            r.body,
            self.t[t].model.metadata_keys(app),
            "{}",
            self.ctx(t, &r)
        );
    }

    // ---- filters over REST ---------------------------------------------------------------

    /// A filter ID to act on: usually one of `t`'s, else the other tenant's or one that
    /// exists nowhere; with its owner (`t` for one that exists nowhere).
    fn some_filter(&mut self, t: usize) -> (usize, String) {
        let o = 1 - t;
        let own: Vec<String> = self.t[t].model.filters.keys().cloned().collect();
        let other: Vec<String> = self.t[o].model.filters.keys().cloned().collect();
        match self.rng.below(10) {
            0..=5 if !own.is_empty() => (t, self.rng.pick(&own).clone()),
            0..=8 if !other.is_empty() => (o, self.rng.pick(&other).clone()),
            _ => (
                t,
                format!(
                    "0000{:08x}-0000-4000-8000-000000000000",
                    self.rng.next() as u32
                ),
            ),
        }
    }

    fn filter_json(f: &Filt, id: &str, matched: usize) -> Value {
        json!({
            "id": id, "applicationName": f.app, "name": f.name, "description": f.description,
            "mongoQuery": query(f.query), "status": "active", "matchedEndpointsCount": matched,
        })
    }

    /// Polls a filter until it is active, then checks it against the model.
    async fn wait_active(&mut self, t: usize, fid: &str) {
        let f = self.t[t].model.filters[fid].clone();
        let path = format!("/applications/{}/filters/{fid}", f.app);
        let token = self.t[t].token.clone();
        let body = poll(Duration::from_secs(10), Duration::from_millis(10), || {
            let req = self.app.api(Method::GET, &path).bearer_auth(&token);
            async move {
                let r = to_resp(req.send().await.unwrap()).await;
                if r.status == 200 && r.body["status"] == "active" {
                    Ok(r.body)
                } else {
                    Err(format!("filter {fid} never became active: {}", r.text))
                }
            }
        })
        .await;
        let want = Self::filter_json(&f, fid, self.t[t].model.members(fid).len());
        assert_eq!(
            filter_fields(&body),
            want,
            "{} by {}",
            self.op,
            self.t[t].name
        );
    }

    async fn create_filter(&mut self, t: usize, app: &str, name: &str, q: usize) {
        let description = format!("d{}", self.rng.below(3));
        self.op = format!("create filter {app}/{name} query {q}");
        let body = json!({"name": name, "description": description, "mongoQuery": query(q)});
        let (r, _) = self
            .rest(
                t,
                Method::POST,
                &format!("/applications/{app}/filters"),
                &[],
                Some((body, "application/json")),
            )
            .await;
        let taken = self.t[t]
            .model
            .filters
            .values()
            .any(|f| f.app == app && f.name == name);
        if taken {
            assert_eq!(r.status, 409, "{}", self.ctx(t, &r));
            return;
        }
        assert_eq!(r.status, 201, "{}", self.ctx(t, &r));
        let fid = r.body["id"].as_str().unwrap().to_owned();
        let tn = &mut self.t[t];
        let order = tn.model.order();
        tn.model.filters.insert(
            fid.clone(),
            Filt {
                app: app.into(),
                name: name.into(),
                description,
                query: q,
                order,
            },
        );
        tn.filter_ids.insert(fid.clone());
        self.wait_active(t, &fid).await;
    }

    async fn op_filter(&mut self, t: usize) {
        match self.rng.below(4) {
            0 => {
                let app = *self.rng.pick(&APPS);
                let name = *self.rng.pick(&FILTER_NAMES);
                let q = self.rng.below(QUERIES);
                self.create_filter(t, app, name, q).await;
            }
            1 => {
                let (owner, fid) = self.some_filter(t);
                let app = self.t[owner]
                    .model
                    .filters
                    .get(&fid)
                    .map_or("demo".to_owned(), |f| f.app.clone());
                let mut body = Map::new();
                if self.rng.chance(50) {
                    body.insert("name".into(), json!(self.rng.pick(&FILTER_NAMES)));
                }
                if self.rng.chance(50) {
                    body.insert("mongoQuery".into(), query(self.rng.below(QUERIES)));
                }
                if body.is_empty() || self.rng.chance(30) {
                    body.insert(
                        "description".into(),
                        json!(format!("d{}", self.rng.below(3))),
                    );
                }
                self.op = format!(
                    "PATCH filter {app}/{fid} (of {}) {body:?}",
                    self.t[owner].name
                );
                let (r, _) = self
                    .rest(
                        t,
                        Method::PATCH,
                        &format!("/applications/{app}/filters/{fid}"),
                        &[],
                        Some((Value::Object(body.clone()), "application/merge-patch+json")),
                    )
                    .await;
                let m = &self.t[t].model;
                let Some(f) = m.filters.get(&fid).cloned() else {
                    assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
                    return;
                };
                let name = body.get("name").and_then(Value::as_str).unwrap_or(&f.name);
                let clash = m
                    .filters
                    .iter()
                    .any(|(id, g)| *id != fid && g.app == f.app && g.name == name);
                if clash {
                    assert_eq!(r.status, 409, "{}", self.ctx(t, &r));
                    return;
                }
                assert_eq!(r.status, 200, "{}", self.ctx(t, &r));
                let q = match body.get("mongoQuery") {
                    Some(v) => (0..QUERIES).find(|i| &query(*i) == v).unwrap(),
                    None => f.query,
                };
                let new = Filt {
                    name: name.to_owned(),
                    description: body
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or(&f.description)
                        .to_owned(),
                    query: q,
                    ..f.clone()
                };
                assert_eq!(r.body["name"], new.name.as_str(), "{}", self.ctx(t, &r));
                assert_eq!(
                    r.body["description"],
                    new.description.as_str(),
                    "{}",
                    self.ctx(t, &r)
                );
                assert_eq!(r.body["mongoQuery"], query(q), "{}", self.ctx(t, &r));
                self.t[t].model.filters.insert(fid.clone(), new);
                self.wait_active(t, &fid).await;
            }
            2 => {
                let (owner, fid) = self.some_filter(t);
                let app = self.t[owner]
                    .model
                    .filters
                    .get(&fid)
                    .map_or("demo".to_owned(), |f| f.app.clone());
                self.op = format!("DELETE filter {app}/{fid} (of {})", self.t[owner].name);
                let (r, _) = self
                    .rest(
                        t,
                        Method::DELETE,
                        &format!("/applications/{app}/filters/{fid}"),
                        &[],
                        None,
                    )
                    .await;
                if self.t[t].model.filters.remove(&fid).is_some() {
                    assert_eq!(r.status, 204, "{}", self.ctx(t, &r));
                } else {
                    assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
                }
            }
            _ => {
                let app = *self.rng.pick(&APPS);
                self.check_filter_list(t, app).await;
            }
        }
    }

    async fn check_filter_list(&mut self, t: usize, app: &str) {
        self.op = format!("list filters of {app}");
        let (r, _) = self
            .rest(
                t,
                Method::GET,
                &format!("/applications/{app}/filters"),
                &[("limit", "100".into())],
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", self.ctx(t, &r));
        let m = &self.t[t].model;
        let mut want: Vec<(&String, &Filt)> =
            m.filters.iter().filter(|(_, f)| f.app == app).collect();
        want.sort_by_key(|(_, f)| f.order);
        let want: Vec<Value> = want
            .into_iter()
            .map(|(id, f)| Self::filter_json(f, id, m.members(id).len()))
            .collect();
        let got: Vec<Value> = r.body["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(filter_fields)
            .collect();
        assert_eq!(got, want, "{}", self.ctx(t, &r));
        assert_eq!(r.body["totalElements"], want.len(), "{}", self.ctx(t, &r));
    }

    // ---- NATS ------------------------------------------------------------------------------

    fn envelope(&mut self, t: usize) -> (epmmp::Envelope, String) {
        let corr = self.t[t].corr("n");
        (
            epmmp::Envelope {
                correlation_id: corr.clone(),
                timestamp: now_ms(),
                timeout: 10_000,
            },
            corr,
        )
    }

    async fn epmmp(&mut self, t: usize, req: epmmp::Request) -> (i32, epmmp::Response, String) {
        let (env, corr) = self.envelope(t);
        let kind = req.request_type();
        let payload = epmmp::encode_request(&env, &req).unwrap();
        let subject = epmmp::request_subject(&self.t[t].instance, kind);
        let reply = self
            .nats
            .request(subject, payload.into())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.op));
        let (renv, status, body) = epmmp::decode_response(kind, &reply.payload).unwrap();
        assert_eq!(renv.correlation_id, corr, "{}", self.op);
        self.count(status.code as u16);
        (status.code, body, corr)
    }

    async fn efmp(&mut self, t: usize, req: efmp::Request) -> (i32, efmp::Response) {
        let (env, _) = self.envelope(t);
        let kind = req.request_type();
        let payload = efmp::encode_request(&env, &req).unwrap();
        let subject = efmp::request_subject(&self.t[t].instance, kind);
        let reply = self
            .nats
            .request(subject, payload.into())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.op));
        let (_, status, body) = efmp::decode_response(kind, &reply.payload).unwrap();
        self.count(status.code as u16);
        (status.code, body)
    }

    async fn op_nats(&mut self, t: usize) {
        let id = self.random_id();
        let who = self.t[t].name;
        match self.rng.below(7) {
            0 => {
                self.op = format!("EPMMP get {id}");
                let req = epmmp::Request::MetadataGet {
                    endpoint_id: id.clone(),
                    include: vec![],
                    include_metadata: true,
                };
                let (code, body, _) = self.epmmp(t, req).await;
                let Some(ep) = self.t[t].model.eps.get(&id) else {
                    assert_eq!(code, 404, "{} by {who}", self.op);
                    return;
                };
                assert_eq!(code, 200, "{} by {who}", self.op);
                let epmmp::Response::MetadataGet {
                    payload: Some(p),
                    app_version_name,
                    ..
                } = body
                else {
                    panic!("{} by {who}: {body:?}", self.op)
                };
                let md: Value = serde_json::from_slice(&p).unwrap();
                assert_eq!(
                    md,
                    Value::Object(ep.metadata.clone()),
                    "{} by {who}",
                    self.op
                );
                assert_eq!(
                    app_version_name.as_deref(),
                    Some(ep.version.as_str()),
                    "{} by {who}",
                    self.op
                );
            }
            1 => {
                // A JSON Patch of `add`s and `remove`s of keys the model holds.
                let mut ops = Vec::new();
                let mut md = self.t[t].model.eps.get(&id).map(|e| e.metadata.clone());
                for _ in 0..1 + self.rng.below(2) {
                    let present: Vec<String> = md
                        .as_ref()
                        .map(|m| m.keys().cloned().collect())
                        .unwrap_or_default();
                    if !present.is_empty() && self.rng.chance(30) {
                        let k = self.rng.pick(&present).clone();
                        ops.push(json!({"op": "remove", "path": format!("/{k}")}));
                        md.as_mut().unwrap().remove(&k);
                    } else {
                        let k = *self.rng.pick(&KEYS);
                        let v = self.random_value(k);
                        ops.push(json!({"op": "add", "path": format!("/{k}"), "value": v}));
                        if let Some(m) = md.as_mut() {
                            m.insert(k.into(), v);
                        }
                    }
                }
                self.op = format!("EPMMP patch {id} {ops:?}");
                let req = epmmp::Request::MetadataPatch {
                    endpoint_id: id.clone(),
                    if_match: None,
                    patch: serde_json::to_vec(&ops).unwrap(),
                };
                let (code, _, corr) = self.epmmp(t, req).await;
                self.metadata_change(t, &id, &corr, (code as u16, ""), 200, |m| {
                    *m = md.unwrap();
                    true
                });
            }
            2 => {
                let key = *self.rng.pick(&KEYS);
                let v = self.random_value(key);
                self.op = format!("EPMMP key-update {id} {key}={v}");
                let req = epmmp::Request::KeyUpdate {
                    endpoint_id: id.clone(),
                    key: key.into(),
                    value: v.to_string().into_bytes(),
                };
                let (code, _, corr) = self.epmmp(t, req).await;
                self.metadata_change(t, &id, &corr, (code as u16, ""), 200, |m| {
                    m.insert(key.into(), v);
                    true
                });
            }
            3 => {
                let ids: Vec<String> = (0..POOL)
                    .filter(|_| self.rng.chance(50))
                    .map(|i| format!("ep-{i}"))
                    .collect();
                self.op = format!("EPMMP app-versions {ids:?}");
                let req = epmmp::Request::AppVersionsGet {
                    endpoint_ids: ids.clone(),
                };
                let (code, body, _) = self.epmmp(t, req).await;
                assert_eq!(code, 200, "{} by {who}", self.op);
                let epmmp::Response::AppVersionsGet {
                    app_versions_to_endpoints: mut got,
                    ..
                } = body
                else {
                    panic!("{} by {who}: {body:?}", self.op)
                };
                got.values_mut().for_each(|v| v.sort());
                let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for id in &ids {
                    if let Some(ep) = self.t[t].model.eps.get(id) {
                        want.entry(ep.version.clone()).or_default().push(id.clone());
                    }
                }
                assert_eq!(got, want, "{} by {who}", self.op);
            }
            4 => {
                self.op = format!("EPMMP keys {id}");
                let req = epmmp::Request::KeysGet {
                    endpoint_id: id.clone(),
                };
                let (code, body, _) = self.epmmp(t, req).await;
                let Some(ep) = self.t[t].model.eps.get(&id) else {
                    assert_eq!(code, 404, "{} by {who}", self.op);
                    return;
                };
                assert_eq!(code, 200, "{} by {who}", self.op);
                let epmmp::Response::KeysGet { mut keys, .. } = body else {
                    panic!("{} by {who}: {body:?}", self.op)
                };
                keys.sort();
                let want: Vec<String> = ep.metadata.keys().cloned().collect();
                assert_eq!(keys, want, "{} by {who}", self.op);
            }
            5 => {
                self.op = format!("EFMP ep-filters {id}");
                let req = efmp::Request::EndpointFilters {
                    endpoint_id: id.clone(),
                };
                let (code, body) = self.efmp(t, req).await;
                if !self.t[t].model.eps.contains_key(&id) {
                    assert_eq!(code, 404, "{} by {who}", self.op);
                    return;
                }
                assert_eq!(code, 200, "{} by {who}", self.op);
                let efmp::Response::EndpointFilters { mut filter_ids, .. } = body else {
                    panic!("{} by {who}: {body:?}", self.op)
                };
                filter_ids.sort();
                assert_eq!(
                    filter_ids,
                    self.t[t].model.filters_of(&id),
                    "{} by {who}",
                    self.op
                );
            }
            _ => {
                let (owner, fid) = self.some_filter(t);
                self.op = format!("EFMP list-by-filter {fid} (of {})", self.t[owner].name);
                let req = efmp::Request::ListByFilter {
                    filter_id: fid.clone(),
                };
                let (code, body) = self.efmp(t, req).await;
                let m = &self.t[t].model;
                if !m.filters.contains_key(&fid) {
                    assert_eq!(code, 404, "{} by {who}", self.op);
                    return;
                }
                assert_eq!(code, 200, "{} by {who}", self.op);
                let efmp::Response::ListByFilter {
                    app_versions_to_endpoints: mut got,
                    ..
                } = body
                else {
                    panic!("{} by {who}: {body:?}", self.op)
                };
                got.values_mut().for_each(|v| v.sort());
                let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for id in m.members(&fid) {
                    want.entry(m.eps[id].version.clone())
                        .or_default()
                        .push(id.to_owned());
                }
                want.values_mut().for_each(|v| v.sort());
                assert_eq!(got, want, "{} by {who}", self.op);
            }
        }
    }

    // ---- whole-state comparisons -----------------------------------------------------------

    async fn compare_all(&mut self) {
        for t in 0..2 {
            self.check_listing(t, &[], &[]).await;
            for app in APPS {
                self.check_filter_list(t, app).await;
                self.op = format!("metadata keys of {app}");
                let (r, _) = self
                    .rest(
                        t,
                        Method::GET,
                        &format!("/applications/{app}/metadata-keys"),
                        &[],
                        None,
                    )
                    .await;
                assert_eq!(
                    r.body,
                    self.t[t].model.metadata_keys(app),
                    "{}",
                    self.ctx(t, &r)
                );
            }
        }
    }

    // ---- what a curious caller with one tenant's token tries -------------------------------

    async fn attacks(&mut self) {
        for t in 0..2 {
            let o = 1 - t;
            let other = self.t[o].name;
            let other_instance = self.t[o].instance.clone();
            // Headers that might name a tenant: ignored, the caller's own data answers.
            let headers = [
                ("x-tenant", other.to_owned()),
                ("x-tenant-id", other.to_owned()),
                ("tenant", other.to_owned()),
                ("x-kaa-tenant", other.to_owned()),
                ("x-forwarded-host", other_instance.clone()),
                ("forwarded", format!("host={other_instance}")),
                ("host", format!("{other_instance}:80")),
                ("x-original-url", format!("/{other}/api/v1/endpoints")),
            ];
            for (h, v) in &headers {
                self.check_listing(t, &[], &[(h, v)]).await;
            }
            // Query parameters naming a tenant: refused, not obeyed.
            for p in ["tenant", "tenantId", "realm"] {
                self.op = format!("GET /endpoints?{p}={other}");
                let (r, _) = self
                    .rest(t, Method::GET, "/endpoints", &[(p, other.to_owned())], None)
                    .await;
                assert_eq!(r.status, 400, "{}", self.ctx(t, &r));
                assert_eq!(r.body["rule"], "unknown-parameter", "{}", self.ctx(t, &r));
            }
            // Paths naming a tenant: no such routes.
            for path in [
                format!("/{other}/api/v1/endpoints"),
                format!("/api/v1/{other}/endpoints"),
                format!("/api/v1/tenants/{other}/endpoints"),
                format!("/{other_instance}/api/v1/endpoints"),
            ] {
                self.op = format!("GET {path}");
                let r = self
                    .app
                    .client
                    .get(self.app.url(&path))
                    .bearer_auth(&self.t[t].token)
                    .send()
                    .await
                    .unwrap();
                let r = to_resp(r).await;
                assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
                assert!(r.body.get("content").is_none(), "{}", self.ctx(t, &r));
            }
            // Tokens claiming the other tenant without its key: refused.
            let (own_key, other_key) = (self.t[t].key, self.t[o].key);
            let other_iss = self.t[o].issuer.url().to_owned();
            let own_iss = self.t[t].issuer.url().to_owned();
            let forged = [
                (
                    "other iss, own key",
                    self.t[t]
                        .issuer
                        .token(own_key)
                        .iss(&other_iss)
                        .roles(&ROLES)
                        .sign(),
                ),
                (
                    "other iss, other kid, own key",
                    self.t[t]
                        .issuer
                        .token(own_key)
                        .iss(&other_iss)
                        .kid(Some(other_key.kid()))
                        .roles(&ROLES)
                        .sign(),
                ),
                (
                    "alg none",
                    self.t[o].issuer.token(other_key).roles(&ROLES).sign_none(),
                ),
                (
                    "HS256 with the other's public key",
                    self.t[o]
                        .issuer
                        .token(other_key)
                        .roles(&ROLES)
                        .sign_hs256(other_key.public_pem().as_bytes()),
                ),
                (
                    "other iss with a trailing slash",
                    self.t[t]
                        .issuer
                        .token(own_key)
                        .iss(&format!("{other_iss}/"))
                        .roles(&ROLES)
                        .sign(),
                ),
            ];
            for (what, token) in forged {
                self.op = format!("forged token: {what}");
                let r = self
                    .app
                    .api(Method::GET, "/endpoints")
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap();
                let r = to_resp(r).await;
                assert_eq!(r.status, 401, "{}", self.ctx(t, &r));
                assert_eq!(r.body["rule"], "valid-token", "{}", self.ctx(t, &r));
            }
            // Both tenants' tokens at once: refused, neither wins.
            for auth in [
                format!("Bearer {}, Bearer {}", self.t[t].token, self.t[o].token),
                format!("Bearer {} {}", self.t[t].token, self.t[o].token),
            ] {
                self.op = "two tokens in one header".into();
                let r = self
                    .app
                    .api(Method::GET, "/endpoints")
                    .header("authorization", auth)
                    .send()
                    .await
                    .unwrap();
                let r = to_resp(r).await;
                assert_eq!(r.status, 401, "{}", self.ctx(t, &r));
            }
            self.op = "two Authorization headers".into();
            let r = self
                .app
                .api(Method::GET, "/endpoints")
                .bearer_auth(&self.t[t].token)
                .header("authorization", format!("Bearer {}", self.t[o].token))
                .send()
                .await
                .unwrap();
            let r = to_resp(r).await;
            assert_eq!(r.status, 401, "{}", self.ctx(t, &r));
            // The caller's own valid token with claims naming the other tenant: still its own.
            let sneaky = self.t[t]
                .issuer
                .token(own_key)
                .roles(&ROLES)
                .claim("tenant", json!(other))
                .claim("tenant_id", json!(other))
                .claim("tenantId", json!(other))
                .claim("azp", json!(other))
                .claim("realm", json!(other))
                .aud(json!(["kaa-rest-api", other_iss.clone()]))
                .sign();
            assert_eq!(own_iss, self.t[t].issuer.url());
            let saved = std::mem::replace(&mut self.t[t].token, sneaky);
            self.check_listing(t, &[], &[]).await;
            self.t[t].token = saved;

            self.not_found_alike(t).await;
        }
        // NATS: the default tenant has no `<name>-<tenant>` instance, nor does an unknown one.
        let base = self.t[0].instance.clone();
        for instance in [
            format!("{base}-{}", self.t[0].name),
            format!("{base}-nobody"),
        ] {
            let req = epmmp::Request::KeysGet {
                endpoint_id: "ep-0".into(),
            };
            let (env, _) = self.envelope(0);
            let payload = epmmp::encode_request(&env, &req).unwrap();
            let subject = epmmp::request_subject(&instance, req.request_type());
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                self.nats.request(subject, payload.into()),
            )
            .await;
            assert!(
                matches!(&r, Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders),
                "instance {instance} must not be served: {r:?}"
            );
        }
    }

    /// The other tenant's IDs answer exactly like IDs that exist nowhere.
    async fn not_found_alike(&mut self, t: usize) {
        let o = 1 - t;
        // An endpoint of the other tenant only (registered through the model), and an ID of
        // the same length that exists nowhere.
        let solo = format!("solo-{}", self.t[o].name);
        if !self.t[o].model.eps.contains_key(&solo) {
            let md = self.random_metadata();
            self.register(o, &solo, "demo-v1", md, None).await;
        }
        let nowhere = format!("zzzz-{}", self.t[o].name);
        let mut ep_routes = vec![
            (Method::GET, "/endpoints/{}".to_owned(), None),
            (Method::GET, "/endpoints/{}/metadata".into(), None),
            (Method::GET, "/endpoints/{}/metadata/city".into(), None),
            (Method::GET, "/endpoints/{}/metadata-keys".into(), None),
            (Method::GET, "/endpoints/{}/app-version".into(), None),
            (
                Method::PUT,
                "/endpoints/{}/metadata".into(),
                Some(json!({"city": "Kyiv"})),
            ),
            (
                Method::PATCH,
                "/endpoints/{}/metadata".into(),
                Some(json!({"city": "Kyiv"})),
            ),
            (
                Method::PUT,
                "/endpoints/{}/metadata/city".into(),
                Some(json!("Kyiv")),
            ),
            (Method::DELETE, "/endpoints/{}/metadata/city".into(), None),
            (
                Method::PUT,
                "/endpoints/{}/app-version".into(),
                Some(json!({"name": "demo-v2"})),
            ),
            (Method::DELETE, "/endpoints/{}".into(), None),
        ];
        // A filter of the other tenant only, and a filter ID that exists nowhere.
        let name = format!("solo-{}", self.t[o].name);
        if !self.t[o].model.filters.values().any(|f| f.name == name) {
            self.create_filter(o, "demo", &name, 0).await;
        }
        let fid = self.t[o]
            .model
            .filters
            .iter()
            .find(|(_, f)| f.name == name)
            .map(|(id, _)| id.clone())
            .unwrap();
        let no_fid = format!("{:08x}{}", self.rng.next() as u32, &fid[8..]);
        let mut filter_routes = vec![
            (
                Method::GET,
                "/applications/demo/filters/{}".to_owned(),
                None,
            ),
            (
                Method::PATCH,
                "/applications/demo/filters/{}".into(),
                Some(json!({"description": "mine now"})),
            ),
            (Method::DELETE, "/applications/demo/filters/{}".into(), None),
            (Method::GET, "/endpoints?filterId={}".into(), None),
        ];
        // A batch task of the other tenant, and a task ID that exists nowhere.
        let mut task_routes = Vec::new();
        let mut tasks = Vec::new();
        if let Some((app, task)) = self.t[o].model.tasks.last().cloned() {
            task_routes.push((
                Method::GET,
                format!("/endpoints/batch/status?appName={app}&taskId={{}}"),
                None,
            ));
            let no_task = format!("{:08x}{}", self.rng.next() as u32, &task[8..]);
            tasks = vec![(task, no_task)];
        }
        let mut groups = vec![(solo, nowhere, std::mem::take(&mut ep_routes))];
        groups.push((fid, no_fid, std::mem::take(&mut filter_routes)));
        for (task, no_task) in tasks {
            groups.push((task, no_task, std::mem::take(&mut task_routes)));
        }
        for (theirs, none, routes) in groups {
            for (method, template, body) in routes {
                let mut answers = Vec::new();
                for id in [&theirs, &none] {
                    let path = template.replace("{}", id);
                    self.op = format!("{method} {path} (404 alike)");
                    let mut req = self
                        .app
                        .api(method.clone(), &path)
                        .bearer_auth(&self.t[t].token)
                        .header("x-request-id", "probe");
                    if let Some(b) = &body {
                        req = req
                            .header("content-type", "application/json")
                            .body(b.to_string());
                    }
                    let r = to_resp(req.send().await.unwrap()).await;
                    assert_eq!(r.status, 404, "{}", self.ctx(t, &r));
                    let mut headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .filter(|(n, _)| !matches!(n.as_str(), "date" | "content-length"))
                        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                        .collect();
                    headers.sort();
                    answers.push((r.text.replace(id.as_str(), "<ID>"), headers));
                }
                assert_eq!(
                    answers[0], answers[1],
                    "{method} {template}: a 404 for {}'s ID differs from one for an ID that exists nowhere",
                    self.t[o].name
                );
            }
        }
    }

    /// Every event on each tenant's subject carries that tenant's operations only, and the
    /// endpoint events are exactly those its model expects (duplicates allowed).
    async fn check_events(&mut self) {
        for t in 0..2 {
            let o = 1 - t;
            let expected = self.t[t].expected.clone();
            let seen = self.t[t].seen.clone();
            let instance = self.t[t].instance.clone();
            let prefix = format!("kaa.v1.events.{instance}.");
            let endpoint_events = move || {
                let msgs = seen.lock().unwrap().clone();
                let mut keys = BTreeSet::new();
                let mut filter_events = Vec::new();
                for (subject, payload) in msgs {
                    assert!(subject.starts_with(&prefix), "{subject}");
                    if subject.contains(".endpoint-filter.") {
                        let tail = subject.rsplit('.').next().unwrap();
                        let fields = decode(&format!("0018-epf-{tail}.avsc"), &payload);
                        let s = |f: &str| match &fields[f] {
                            apache_avro::types::Value::String(s) => s.clone(),
                            other => panic!("{f}: {other:?}"),
                        };
                        filter_events.push((subject.clone(), s("correlationId"), s("filterId")));
                    } else {
                        let ev = Event::from_message(&subject, &payload);
                        keys.insert((ev.kind(), ev.str("correlationId"), ev.str("endpointId")));
                    }
                }
                (keys, filter_events)
            };
            let (keys, filter_events) =
                poll(Duration::from_secs(10), Duration::from_millis(50), || {
                    let got = endpoint_events();
                    let expected = &expected;
                    let instance = instance.clone();
                    async move {
                        if expected.is_subset(&got.0) {
                            Ok(got)
                        } else {
                            let missing: Vec<_> = expected.difference(&got.0).take(5).collect();
                            Err(format!("{instance}: events missing, e.g. {missing:?}"))
                        }
                    }
                })
                .await;
            // Late strays (a leak published after the expected ones) get a moment to arrive.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (keys2, filter_events2) = endpoint_events();
            assert!(keys2.len() >= keys.len() && filter_events2.len() >= filter_events.len());
            let (keys, filter_events) = (keys2, filter_events2);
            let name = self.t[t].name;
            for (kind, corr, id) in &keys {
                assert!(
                    !self.t[o].issued.contains(corr) && !corr.starts_with(self.t[o].name),
                    "{name}'s subject carries {} operation {corr} ({kind} {id})",
                    self.t[o].name
                );
            }
            let unexpected: Vec<_> = keys.difference(&self.t[t].expected).collect();
            assert!(
                unexpected.is_empty(),
                "{name}: unexpected events {unexpected:?}"
            );
            for (subject, corr, fid) in &filter_events {
                assert!(
                    !self.t[o].issued.contains(corr) && !corr.starts_with(self.t[o].name),
                    "{name}'s subject carries {} operation {corr} ({subject})",
                    self.t[o].name
                );
                assert!(
                    self.t[t].filter_ids.contains(fid),
                    "{name}'s subject carries a filter it never had: {subject}"
                );
            }
            // Per type, the counts follow from the model.
            let count =
                |set: &BTreeSet<EvKey>, kind: &str| set.iter().filter(|k| k.0 == kind).count();
            for kind in [
                "lifecycle.registered",
                "lifecycle.unregistered",
                "lifecycle.appversion-updated",
                "metadata.updated",
                "token.revoked",
            ] {
                assert_eq!(
                    count(&keys, kind),
                    count(&self.t[t].expected, kind),
                    "{name}: {kind} events"
                );
            }
        }
    }
}

/// The fields of a Filter the model knows (dates aside).
fn filter_fields(f: &Value) -> Value {
    json!({
        "id": f["id"], "applicationName": f["applicationName"], "name": f["name"],
        "description": f["description"], "mongoQuery": f["mongoQuery"], "status": f["status"],
        "matchedEndpointsCount": f["matchedEndpointsCount"],
    })
}

/// A listing's rows as the model writes them.
fn rows(body: &Value) -> Vec<Value> {
    body["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no content: {body}"))
        .iter()
        .map(|e| {
            row(
                e["endpointId"].as_str().unwrap(),
                e["appVersion"]["name"].as_str().unwrap(),
                &e["metadata"],
            )
        })
        .collect()
}

/// `path` with `query` percent-encoded.
fn with_query(path: &str, query: &[(&str, String)]) -> String {
    if query.is_empty() {
        return path.to_owned();
    }
    let mut url = reqwest::Url::parse("http://x/").unwrap();
    url.query_pairs_mut()
        .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    format!("{path}?{}", url.query().unwrap())
}

async fn to_resp(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        body,
        text,
        headers,
    }
}

async fn start_tenant(name: &'static str, key: TestKey, instance: String) -> Tenant {
    let issuer = TestIssuer::start(&[key]).await;
    let token = issuer.token(key).roles(&ROLES).sign();
    Tenant {
        name,
        instance,
        token,
        issuer,
        key,
        model: Model::default(),
        issued: BTreeSet::new(),
        filter_ids: BTreeSet::new(),
        expected: BTreeSet::new(),
        seen: Arc::new(Mutex::new(Vec::new())),
        n: 0,
    }
}

#[tokio::test]
async fn tenants_sharing_ids_never_see_or_change_each_other() {
    let seed = seed();
    let _report = SeedReport(seed);
    eprintln!("EPR_ISOLATION_SEED={seed}");
    let base = unique_instance("iso");
    let alpha = start_tenant("alpha", TestKey::Rsa1, base.clone()).await;
    let beta = start_tenant("beta", TestKey::Ec1, format!("{base}-beta")).await;

    // Both tenants' event subjects, recorded from before the first operation.
    let events = shared_client().await;
    for tn in [&alpha, &beta] {
        let mut sub = events
            .subscribe(format!("kaa.v1.events.{}.>", tn.instance))
            .await
            .unwrap();
        let seen = tn.seen.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                seen.lock()
                    .unwrap()
                    .push((m.subject.to_string(), m.payload.to_vec()));
            }
        });
    }
    events.flush().await.unwrap();

    let issuers = [
        ("alpha", alpha.issuer.url().to_owned()),
        ("beta", beta.issuer.url().to_owned()),
    ];
    let app = spawn_on_nats(&shared_url(), &base, move |s| {
        // alpha is the default tenant: its instance is `base`; beta's is `base-beta`.
        s.tenant.default = "alpha".into();
        for (id, issuer) in issuers {
            s.auth.tenants.push(epr_auth::TenantSettings {
                id: id.into(),
                issuer,
                ..Default::default()
            });
        }
    })
    .await;
    wait_nats(&app, "UP").await;
    let nats = shared_client().await;
    let mut w = World {
        app,
        nats,
        rng: Rng(seed),
        t: [alpha, beta],
        op: String::new(),
        tally: BTreeMap::new(),
    };
    // Ready: both tokens accepted (issuer keys fetched) and both instances served on NATS.
    for t in 0..2 {
        let (token, instance) = (w.t[t].token.clone(), w.t[t].instance.clone());
        let (app, nats) = (&w.app, &w.nats);
        poll(Duration::from_secs(10), Duration::from_millis(20), || {
            let req = app.api(Method::GET, "/endpoints").bearer_auth(&token);
            let nats = nats.clone();
            let instance = instance.clone();
            async move {
                let status = req.send().await.unwrap().status();
                if status != StatusCode::OK {
                    return Err(format!("{instance}: REST answers {status}"));
                }
                let env = efmp::Envelope {
                    correlation_id: "ready".into(),
                    timestamp: now_ms(),
                    timeout: 10_000,
                };
                let req = efmp::Request::EndpointFilters {
                    endpoint_id: "ep-0".into(),
                };
                let subject = efmp::request_subject(&instance, req.request_type());
                let payload = efmp::encode_request(&env, &req).unwrap();
                nats.request(subject, payload.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{instance}: {e}"))
            }
        })
        .await;
    }

    let started = std::time::Instant::now();
    for i in 0..OPS {
        let t = w.rng.below(2);
        // Deletions keep up with registrations, so the small ID pool does not stay full.
        match w.rng.below(22) {
            0..=2 => w.op_register(t).await,
            3 | 4 => w.op_get(t).await,
            5 | 6 => w.op_list(t).await,
            7 => w.op_app_version(t).await,
            8..=10 => w.op_metadata_write(t).await,
            11..=13 => w.op_delete(t).await,
            14 | 15 => w.op_filter(t).await,
            16 => w.op_batch(t).await,
            17 => w.op_app_metadata_keys(t).await,
            _ => w.op_nats(t).await,
        }
        if i % 50 == 49 {
            w.compare_all().await;
        }
        if i == OPS / 3 {
            w.attacks().await;
        }
    }
    w.attacks().await;
    w.compare_all().await;
    w.check_events().await;
    eprintln!(
        "{OPS} operations in {:?}: alpha {} endpoints, {} filters; beta {} endpoints, {} filters",
        started.elapsed(),
        w.t[0].model.eps.len(),
        w.t[0].model.filters.len(),
        w.t[1].model.eps.len(),
        w.t[1].model.filters.len(),
    );
    eprintln!("answers (operation, status) → count: {:?}", w.tally);
    // The run reached both sides of the model: successes and refusals, over REST and NATS.
    for (word, statuses) in [
        ("register", &[201, 409][..]),
        ("GET", &[200, 404]),
        ("DELETE", &[204, 404]),
        ("EPMMP", &[200, 404]),
        ("EFMP", &[200, 404]),
    ] {
        for status in statuses {
            assert!(
                w.tally.contains_key(&(word.to_owned(), *status)),
                "no {word} answered {status}: {:?}",
                w.tally
            );
        }
    }
    w.app.stop().await;
}
