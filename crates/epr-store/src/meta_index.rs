//! The listing index of the embedded store: for every (tenant, application), compressed
//! bitmaps of endpoint incarnations by application version, by metadata key (present) and by
//! metadata value (top-level values of every JSON type, keyed by a canonical JSON text).
//!
//! Why in memory rather than a SQLite table: a table keyed by value would add one B-tree
//! insert per metadata key to every registration, each on a different "last page" of its
//! value's range, so a commit group would write about twice the WAL pages it writes today;
//! bitmaps cost the writer a few microseconds and nothing on disk, answer `totalElements`
//! exactly (a bitmap's cardinality) and evaluate `!=`, `key` and `!key` as set algebra.
//! The price: the index is rebuilt from the `endpoints` table when the store opens (4.5 s
//! for a million endpoints on the 2-core test machine, BENCHMARKS.md) and it takes memory (a few bytes per
//! endpoint and key for low-cardinality keys, ~70 bytes per distinct value otherwise).
//!
//! It also holds every saved filter's membership (one bitmap of incarnations per filter):
//! the stored form of a membership is nothing but the endpoint rows and the filter's query,
//! since a member is exactly an endpoint the filter matches (see `sqlite_filters`). So a
//! membership change writes no page at all; the bitmaps are derived again when the store
//! opens, in the same scan that builds the listing index.
//!
//! The writer applies a group's changes after the group commits and before it answers, so a
//! listing that starts after a write was acknowledged sees it. A listing that runs beside a
//! write may read the index before and the row after it (or the reverse): rows are checked
//! again with the reference semantics ([`EndpointQuery::matches`]) and dropped if they no
//! longer match, so a page never holds a wrong endpoint.

use epr_core::endpoint::Endpoint;
use epr_core::endpoint_filter::FilterId;
use epr_core::ids::TenantId;
use epr_core::query::{EndpointQuery, MetadataCondition, PageRequest};
use roaring::RoaringTreemap;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::RwLock;

/// One endpoint's change, applied once its transaction committed.
#[derive(Debug, Clone)]
pub(crate) struct IndexChange {
    pub tenant: TenantId,
    pub old: Option<Endpoint>,
    pub new: Option<Endpoint>,
}

/// The incarnations holding one value: most values of a high-cardinality key (serial
/// numbers) belong to one endpoint, and a bitmap for one would cost hundreds of bytes.
#[derive(Debug, Clone)]
enum Posting {
    One(u64),
    Many(RoaringTreemap),
}

impl Posting {
    fn insert(&mut self, inc: u64) {
        match self {
            Self::One(one) if *one == inc => {}
            Self::One(one) => {
                let mut set = RoaringTreemap::new();
                set.insert(*one);
                set.insert(inc);
                *self = Self::Many(set);
            }
            Self::Many(set) => {
                set.insert(inc);
            }
        }
    }

    /// Removes `inc`; true when nothing is left.
    fn remove(&mut self, inc: u64) -> bool {
        match self {
            Self::One(one) => *one == inc,
            Self::Many(set) => {
                set.remove(inc);
                set.is_empty()
            }
        }
    }

    fn union_into(&self, out: &mut RoaringTreemap) {
        match self {
            Self::One(one) => {
                out.insert(*one);
            }
            Self::Many(set) => *out |= set,
        }
    }
}

#[derive(Debug, Default)]
struct KeyIndex {
    present: RoaringTreemap,
    values: HashMap<Box<str>, Posting>,
}

#[derive(Debug, Default)]
struct AppIndex {
    all: RoaringTreemap,
    versions: HashMap<String, RoaringTreemap>,
    keys: HashMap<String, KeyIndex>,
}

type Tenants = HashMap<String, HashMap<String, AppIndex>>;

/// Saved filters' memberships: tenant → filter ID → incarnations of its members.
type Memberships = HashMap<String, HashMap<String, RoaringTreemap>>;

#[derive(Debug, Default)]
struct State {
    tenants: Tenants,
    members: Memberships,
}

/// The index, shared by the writer (which updates it) and the readers.
#[derive(Debug, Default)]
pub(crate) struct MetaIndex {
    state: RwLock<State>,
}

/// A change of one saved filter's membership, staged by the writer during a transaction and
/// applied (in order) once it committed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MemberChange {
    /// The endpoint `inc` is (`member`) or is not a member of the filter.
    Set {
        tenant: TenantId,
        filter: FilterId,
        inc: u64,
        member: bool,
    },
    /// The filter's membership is empty (its query changed, or it was deleted).
    Clear { tenant: TenantId, filter: FilterId },
    /// Every endpoint of `incs` is a member (a back-fill step, or the evaluation at open:
    /// one bitmap per filter rather than one change per member).
    Add {
        tenant: TenantId,
        filter: FilterId,
        incs: RoaringTreemap,
    },
}

impl MemberChange {
    fn tenant(&self) -> &TenantId {
        match self {
            MemberChange::Set { tenant, .. }
            | MemberChange::Clear { tenant, .. }
            | MemberChange::Add { tenant, .. } => tenant,
        }
    }
}

/// A page picked from the index: the incarnations to read, in listing order.
#[derive(Debug, PartialEq)]
pub(crate) struct IndexPage {
    pub total: u64,
    pub incarnations: Vec<i64>,
    /// Whether matches remain after the page's last one.
    pub more: bool,
}

/// The canonical text of a JSON value: equal values (serde_json's `==`) give equal texts.
/// Object keys are sorted and `-0.0` is written as `0.0` (the two compare equal).
#[cfg(test)]
fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

/// Writes the canonical text of `v` (see `canonical` in the tests).
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => out.push_str("0.0"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::String(text) => write_string(text, out),
        Value::Number(n) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{n}");
        }
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Null => out.push_str("null"),
    }
}

/// A JSON string literal; the common case (nothing to escape) without an allocation.
fn write_string(text: &str, out: &mut String) {
    if text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(&Value::String(text.to_owned()).to_string());
    } else {
        out.push('"');
        out.push_str(text);
        out.push('"');
    }
}

thread_local! {
    /// The writer's (and readers') buffer for canonical texts: no allocation per key.
    static SCRATCH: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Runs `f` on the canonical text of `v`, written into a reused buffer.
fn with_canonical<T>(v: &Value, f: impl FnOnce(&str) -> T) -> T {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.clear();
        write_canonical(v, &mut buf);
        f(&buf)
    })
}

impl AppIndex {
    fn add(&mut self, ep: &Endpoint) {
        let inc = ep.incarnation as u64;
        self.all.insert(inc);
        self.versions
            .entry(ep.app_version.to_string())
            .or_default()
            .insert(inc);
        for (k, v) in ep.metadata.as_map() {
            self.add_value(k, v, inc);
        }
    }

    fn add_value(&mut self, k: &str, v: &Value, inc: u64) {
        let key = match self.keys.get_mut(k) {
            Some(key) => key,
            None => self.keys.entry(k.to_owned()).or_default(),
        };
        key.present.insert(inc);
        with_canonical(v, |text| match key.values.get_mut(text) {
            Some(p) => p.insert(inc),
            None => {
                key.values.insert(text.into(), Posting::One(inc));
            }
        });
    }

    fn remove_value(&mut self, k: &str, v: &Value, inc: u64) {
        let Some(key) = self.keys.get_mut(k) else {
            return;
        };
        key.present.remove(inc);
        with_canonical(v, |text| {
            if key.values.get_mut(text).is_some_and(|p| p.remove(inc)) {
                key.values.remove(text);
            }
        });
        if key.present.is_empty() {
            self.keys.remove(k);
        }
    }

    fn remove_version(&mut self, version: &str, inc: u64) {
        if let Some(set) = self.versions.get_mut(version) {
            set.remove(inc);
            if set.is_empty() {
                self.versions.remove(version);
            }
        }
    }

    fn remove(&mut self, ep: &Endpoint) {
        let inc = ep.incarnation as u64;
        self.all.remove(inc);
        self.remove_version(ep.app_version.as_str(), inc);
        for (k, v) in ep.metadata.as_map() {
            self.remove_value(k, v, inc);
        }
    }

    /// An endpoint changed within its application: only the keys whose value changed.
    fn update(&mut self, old: &Endpoint, new: &Endpoint) {
        let (inc_old, inc) = (old.incarnation as u64, new.incarnation as u64);
        if inc_old != inc {
            self.remove(old);
            self.add(new);
            return;
        }
        if old.app_version != new.app_version {
            self.remove_version(old.app_version.as_str(), inc);
            self.versions
                .entry(new.app_version.to_string())
                .or_default()
                .insert(inc);
        }
        let (before, after) = (old.metadata.as_map(), new.metadata.as_map());
        for (k, v) in before {
            if after.get(k) != Some(v) {
                self.remove_value(k, v, inc);
            }
        }
        for (k, v) in after {
            if before.get(k) != Some(v) {
                self.add_value(k, v, inc);
            }
        }
    }

    /// The incarnations of this application that satisfy the query's version and metadata
    /// conditions (the application itself is the caller's choice).
    /// `members`: a saved filter's membership the result must also lie in.
    fn eval(&self, q: &EndpointQuery, members: Option<&RoaringTreemap>) -> RoaringTreemap {
        let empty = RoaringTreemap::new();
        // Sets the result must lie in, and sets it must avoid.
        let mut within: Vec<std::borrow::Cow<'_, RoaringTreemap>> = Vec::new();
        if let Some(m) = members {
            within.push(std::borrow::Cow::Borrowed(m));
        }
        let mut avoid: Vec<std::borrow::Cow<'_, RoaringTreemap>> = Vec::new();
        if let Some(v) = &q.app_version {
            within.push(std::borrow::Cow::Borrowed(
                self.versions.get(v.as_str()).unwrap_or(&empty),
            ));
        }
        let present = |k: &str| self.keys.get(k).map(|key| &key.present);
        let holding = |k: &str, vs: &[Value]| -> std::borrow::Cow<'_, RoaringTreemap> {
            let Some(key) = self.keys.get(k) else {
                return std::borrow::Cow::Owned(RoaringTreemap::new());
            };
            let mut found = vs
                .iter()
                .filter_map(|v| with_canonical(v, |text| key.values.get(text)))
                .collect::<Vec<_>>();
            match found.as_slice() {
                [Posting::Many(set)] => std::borrow::Cow::Borrowed(set),
                _ => {
                    let mut out = RoaringTreemap::new();
                    for p in found.drain(..) {
                        p.union_into(&mut out);
                    }
                    std::borrow::Cow::Owned(out)
                }
            }
        };
        for c in &q.metadata {
            match c {
                MetadataCondition::Exists(k) => {
                    within.push(std::borrow::Cow::Borrowed(present(k).unwrap_or(&empty)))
                }
                MetadataCondition::Absent(k) => {
                    if let Some(p) = present(k) {
                        avoid.push(std::borrow::Cow::Borrowed(p));
                    }
                }
                MetadataCondition::Equals(k, vs) => within.push(holding(k, vs)),
                MetadataCondition::NotEquals(k, vs) => avoid.push(holding(k, vs)),
            }
        }
        // Start from the smallest set: intersections then copy the least.
        within.sort_by_key(|s| s.len());
        let mut out = match within.first() {
            Some(smallest) => smallest.as_ref().clone(),
            None => self.all.clone(),
        };
        for s in within.iter().skip(1) {
            if out.is_empty() {
                break;
            }
            out &= s.as_ref();
        }
        for s in &avoid {
            if out.is_empty() {
                break;
            }
            out -= s.as_ref();
        }
        out
    }
}

impl MetaIndex {
    /// Applies committed changes, in commit order.
    pub(crate) fn apply(&self, changes: &[IndexChange]) {
        if changes.is_empty() {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let tenants = &mut state.tenants;
        for c in changes {
            let t = c.tenant.as_str();
            match (&c.old, &c.new) {
                (Some(old), Some(new)) if old.app == new.app => {
                    app_mut(tenants, t, new.app.as_str()).update(old, new)
                }
                (old, new) => {
                    if let Some(old) = old {
                        app_mut(tenants, t, old.app.as_str()).remove(old);
                        drop_if_empty(tenants, t, old.app.as_str());
                    }
                    if let Some(new) = new {
                        app_mut(tenants, t, new.app.as_str()).add(new);
                    }
                }
            }
        }
    }

    /// Applies staged membership changes, in order.
    pub(crate) fn apply_members(&self, changes: &[MemberChange]) {
        if changes.is_empty() {
            return;
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut i = 0;
        while i < changes.len() {
            // A group's changes are mostly one tenant's: look it up once per run.
            let tenant = changes[i].tenant();
            let filters = match state.members.get_mut(tenant.as_str()) {
                Some(f) => f,
                None => state.members.entry(tenant.to_string()).or_default(),
            };
            while let Some(c) = changes.get(i).filter(|c| c.tenant() == tenant) {
                i += 1;
                match c {
                    MemberChange::Set {
                        filter,
                        inc,
                        member,
                        ..
                    } => with_members(filters, filter, |set| {
                        // Not `try_push` for new endpoints: a bitmap container finds its
                        // maximum by scanning its 1,024 words from the end.
                        if *member {
                            set.insert(*inc);
                        } else {
                            set.remove(*inc);
                        }
                    }),
                    MemberChange::Add { filter, incs, .. } => {
                        with_members(filters, filter, |set| *set |= incs)
                    }
                    MemberChange::Clear { filter, .. } => {
                        filters.remove(filter.as_str());
                    }
                }
            }
            if filters.is_empty() {
                state.members.remove(tenant.as_str());
            }
        }
    }

    /// How many endpoints a filter holds.
    pub(crate) fn members_count(&self, tenant: &str, filter: &str) -> u64 {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        members_of(&state.members, tenant, filter).map_or(0, |s| s.len())
    }

    /// Whether the endpoint `inc` is a member of the filter.
    pub(crate) fn is_member(&self, tenant: &str, filter: &str, inc: i64) -> bool {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        inc >= 0
            && members_of(&state.members, tenant, filter).is_some_and(|s| s.contains(inc as u64))
    }

    /// A copy of a filter's members (a bitmap: a few bytes per member at most).
    pub(crate) fn members(&self, tenant: &str, filter: &str) -> RoaringTreemap {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        members_of(&state.members, tenant, filter)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether [`Self::page`] answers this query: not when it restricts by endpoint IDs
    /// (SQL reads those few rows directly).
    pub(crate) fn serves(q: &EndpointQuery) -> bool {
        q.endpoint_ids.is_empty()
    }

    /// The matches of `q` in `tenant` (every application when `q.app` is `None`), their
    /// number, and the incarnations of the requested page.
    pub(crate) fn page(&self, tenant: &str, q: &EndpointQuery, page: PageRequest) -> IndexPage {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let apps = state.tenants.get(tenant);
        let empty = RoaringTreemap::new();
        let members = q
            .filter
            .as_ref()
            .map(|f| members_of(&state.members, tenant, f.as_str()).unwrap_or(&empty));
        let matches = match (&q.app, apps) {
            (_, None) => RoaringTreemap::new(),
            (Some(app), Some(apps)) => apps
                .get(app.as_str())
                .map(|a| a.eval(q, members))
                .unwrap_or_default(),
            (None, Some(apps)) => {
                let mut out = RoaringTreemap::new();
                for a in apps.values() {
                    out |= a.eval(q, members);
                }
                out
            }
        };
        drop(state);
        let total = matches.len();
        // Position of the page's first match: `offset` matches after the cursor (keyset).
        let start = match page.after {
            Some(after) if after >= 0 => matches.rank(after as u64),
            _ => 0,
        }
        .saturating_add(page.offset);
        let mut incarnations = Vec::with_capacity(page.limit.min(1024) as usize);
        if start < total {
            // `select` and `advance_to` skip whole containers: a deep page costs what the
            // first one does.
            let first = matches.select(start).unwrap_or(u64::MAX);
            let mut iter = matches.iter();
            iter.advance_to(first);
            incarnations.extend(iter.take(page.limit as usize).map(|i| i as i64));
        }
        let more = start.saturating_add(incarnations.len() as u64) < total;
        IndexPage {
            total,
            incarnations,
            more,
        }
    }
}

/// Applies `f` to a filter's members, created empty when it has none (one lookup, and no
/// allocation, when it exists).
fn with_members(
    filters: &mut HashMap<String, RoaringTreemap>,
    filter: &FilterId,
    f: impl FnOnce(&mut RoaringTreemap),
) {
    match filters.get_mut(filter.as_str()) {
        Some(set) => f(set),
        None => {
            let mut set = RoaringTreemap::new();
            f(&mut set);
            filters.insert(filter.to_string(), set);
        }
    }
}

fn members_of<'a>(
    members: &'a Memberships,
    tenant: &str,
    filter: &str,
) -> Option<&'a RoaringTreemap> {
    members.get(tenant).and_then(|f| f.get(filter))
}

fn app_mut<'a>(tenants: &'a mut Tenants, tenant: &str, app: &str) -> &'a mut AppIndex {
    let apps = match tenants.get_mut(tenant) {
        Some(_) => tenants.get_mut(tenant).expect("present"),
        None => tenants.entry(tenant.to_owned()).or_default(),
    };
    if !apps.contains_key(app) {
        apps.insert(app.to_owned(), AppIndex::default());
    }
    apps.get_mut(app).expect("inserted")
}

fn drop_if_empty(tenants: &mut Tenants, tenant: &str, app: &str) {
    if let Some(apps) = tenants.get_mut(tenant) {
        if apps.get(app).is_some_and(|a| a.all.is_empty()) {
            apps.remove(app);
        }
        if apps.is_empty() {
            tenants.remove(tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_text_is_equal_exactly_when_values_are() {
        let pairs = [
            (json!(0.0), json!(-0.0), true),
            (json!(3), json!(3.0), false),
            (json!(3), json!("3"), false),
            (json!(null), json!("null"), false),
            (
                json!({"a": 1, "b": [0.0]}),
                json!({"b": [-0.0], "a": 1}),
                true,
            ),
            (json!([1, 2]), json!([2, 1]), false),
            (json!("a\"b"), json!("a\"b"), true),
        ];
        for (a, b, equal) in pairs {
            assert_eq!(a == b, equal, "{a} vs {b}: serde_json equality");
            assert_eq!(canonical(&a) == canonical(&b), equal, "{a} vs {b}");
        }
    }

    #[test]
    fn a_value_of_one_endpoint_grows_into_a_bitmap_and_back() {
        let mut p = Posting::One(5);
        p.insert(5);
        assert!(matches!(p, Posting::One(5)));
        p.insert(9);
        assert!(matches!(&p, Posting::Many(s) if s.len() == 2));
        assert!(!p.remove(5));
        assert!(p.remove(9), "empty once the last one left");
        assert!(Posting::One(3).remove(3));
    }
}
