//! An application's filters, indexed to evaluate one endpoint against all of them at once.
//!
//! A registration is matched against every filter of its application, and a saved filter
//! is mostly a conjunction of simple conditions on one metadata key each (Kaa's
//! `{"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}`, `$in`, numeric ranges,
//! `$and` of those). Each such condition is an *atom*: a test of the key's value that, for
//! a value that is not an array, gives exactly the answer of the filter's own evaluation.
//! The atoms are indexed by key and value (strings and booleans by hash, numbers by a short
//! list of ranges), so one endpoint costs a lookup per metadata key plus a count per filter
//! (the counting algorithm of publish/subscribe matching): a filter whose atoms do not all
//! hold cannot match. A filter that is nothing but atoms matches when they all hold; one
//! with other parts (`$or`, `$not`, a regex, dotted paths, ...) is evaluated in full, and
//! only when its atoms hold. An endpoint with an array value is evaluated in full by every
//! filter (MongoDB's array traversal makes atoms inexact there; arrays are rare in
//! metadata).

use super::eval::{cmp_num, ArrayTest, CmpOp, Cond, Expr, Known, Lit, Num, Test};
use super::Filter;
use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

/// Filters evaluated together against one endpoint at a time; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    filters: Vec<Arc<Filter>>,
    plans: Vec<Plan>,
    /// Atoms on metadata keys, by key.
    keys: HashMap<Box<str>, Atoms>,
    /// Atoms on the application version.
    version: Atoms,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    /// How many atoms the filter has; all of them must hold.
    needed: u16,
    /// The atoms are the whole filter: when they all hold it matches, without evaluation.
    exact: bool,
}

/// The atoms on one key. Each atom is stored under every value it accepts, with the
/// position of its filter; a value is a single scalar, so it meets each atom at most once.
#[derive(Debug, Clone, Default)]
struct Atoms {
    strings: HashMap<Box<str>, Vec<u32>>,
    bools: [Vec<u32>; 2],
    numbers: Vec<(NumTest, u32)>,
    /// Atoms every value passes (the key is present).
    present: Vec<u32>,
}

/// What one atom accepts.
#[derive(Debug, Clone, Default)]
struct Accepts {
    strings: Vec<Box<str>>,
    bools: [bool; 2],
    number: Option<NumTest>,
    present: bool,
}

/// A bound of a range, with whether it is inclusive.
type Bound = Option<(Num, bool)>;

#[derive(Debug, Clone)]
enum NumTest {
    Range {
        lo: Bound,
        hi: Bound,
    },
    /// One of these values (`$in` of numbers).
    Points(Box<[Num]>),
}

impl NumTest {
    fn accepts(&self, x: Num) -> bool {
        match self {
            NumTest::Range { lo, hi } => {
                lo.is_none_or(|(b, incl)| match cmp_num(x, b) {
                    Ordering::Greater => true,
                    Ordering::Equal => incl,
                    Ordering::Less => false,
                }) && hi.is_none_or(|(b, incl)| match cmp_num(x, b) {
                    Ordering::Less => true,
                    Ordering::Equal => incl,
                    Ordering::Greater => false,
                })
            }
            NumTest::Points(ps) => ps.iter().any(|p| cmp_num(x, *p) == Ordering::Equal),
        }
    }
}

/// The atoms of one filter, found while compiling it.
#[derive(Default)]
struct Found {
    /// `None` for the application version.
    atoms: Vec<(Option<Box<str>>, Accepts)>,
    /// A part of the filter is not an atom: evaluate it when the atoms hold.
    residual: bool,
}

impl Found {
    /// The conjuncts of the filter's top level.
    fn expr(&mut self, x: &Expr) {
        match x {
            Expr::Const(true) => {}
            Expr::And(xs) => xs.iter().for_each(|x| self.expr(x)),
            Expr::Field(path, cond) if path.len() == 1 => match path[0].known {
                Known::Metadata => self.metadata(cond),
                Known::AppVersion => {
                    let mut atoms = Vec::new();
                    self.residual |= !value_atoms(cond, &mut atoms);
                    self.atoms.extend(atoms.into_iter().map(|a| (None, a)));
                }
                _ => self.residual = true,
            },
            _ => self.residual = true,
        }
    }

    /// A condition on the metadata array.
    fn metadata(&mut self, cond: &Cond) {
        match cond {
            Cond::Const(true) => {}
            Cond::And(cs) => cs.iter().for_each(|c| self.metadata(c)),
            // Keys are unique: the `$elemMatch` holds iff the key is present and its
            // entry passes `rest`, so each part of `rest` is a condition on that value.
            Cond::Array(ArrayTest::ElemMatchKey { key, rest, .. }) => {
                let mut atoms = Vec::new();
                self.residual |= !entry_atoms(rest, &mut atoms);
                if atoms.is_empty() {
                    atoms.push(Accepts {
                        present: true,
                        ..Accepts::default()
                    });
                }
                self.atoms
                    .extend(atoms.into_iter().map(|a| (Some(key.clone()), a)));
            }
            _ => self.residual = true,
        }
    }
}

/// Atoms of a query on one metadata entry; false when some part is not an atom.
fn entry_atoms(x: &Expr, out: &mut Vec<Accepts>) -> bool {
    match x {
        Expr::Const(true) => true,
        Expr::And(xs) => {
            // Every part, even after one that is not an atom: more atoms, fewer evaluations.
            let mut all = true;
            for x in xs.iter() {
                all &= entry_atoms(x, out);
            }
            all
        }
        Expr::Field(path, cond) if path.len() == 1 && path[0].known == Known::Value => {
            value_atoms(cond, out)
        }
        _ => false,
    }
}

/// Atoms of a condition on one value; false when some part is not an atom.
fn value_atoms(cond: &Cond, out: &mut Vec<Accepts>) -> bool {
    match cond {
        Cond::Const(true) => true,
        Cond::And(cs) => {
            // `{"$gte": 5, "$lt": 45}`: one range rather than two atoms.
            let mut all = true;
            let mut range: Option<(Bound, Bound)> = None;
            for c in cs.iter() {
                if let Cond::Leaf(Test::Cmp(
                    op @ (CmpOp::Gt | CmpOp::Gte | CmpOp::Lt | CmpOp::Lte),
                    Lit::Num(n),
                )) = c
                {
                    let (lo, hi) = range.get_or_insert((None, None));
                    let incl = matches!(op, CmpOp::Gte | CmpOp::Lte);
                    let side = if matches!(op, CmpOp::Gt | CmpOp::Gte) {
                        lo
                    } else {
                        hi
                    };
                    if side.is_none() {
                        *side = Some((*n, incl));
                        continue;
                    }
                }
                all = value_atoms(c, out) && all;
            }
            if let Some((lo, hi)) = range {
                out.push(Accepts {
                    number: Some(NumTest::Range { lo, hi }),
                    ..Accepts::default()
                });
            }
            all
        }
        Cond::Leaf(t) => match test_atom(t) {
            Some(a) => {
                out.push(a);
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// The atom of one test, when it is exact for a value that is not an array (see `Test::test`).
fn test_atom(t: &Test) -> Option<Accepts> {
    let mut a = Accepts::default();
    match t {
        Test::Cmp(CmpOp::Eq, Lit::Str(s)) => a.strings.push(s.clone()),
        Test::Cmp(CmpOp::Eq, Lit::Json(Value::Bool(b))) => a.bools[usize::from(*b)] = true,
        Test::Cmp(op, Lit::Num(n)) => {
            let b = Some((*n, !matches!(op, CmpOp::Gt | CmpOp::Lt)));
            let (lo, hi) = match op {
                CmpOp::Eq => (b, b),
                CmpOp::Gt | CmpOp::Gte => (b, None),
                CmpOp::Lt | CmpOp::Lte => (None, b),
            };
            a.number = Some(NumTest::Range { lo, hi });
        }
        // `null` also matches a missing value, and regexes need a scan: not atoms.
        Test::In(set) if set.regexes.is_empty() && !set.has_null => {
            a.strings.extend(set.strings.iter().cloned());
            let mut points = Vec::new();
            for v in set.values.iter() {
                match v {
                    Value::Bool(b) => a.bools[usize::from(*b)] = true,
                    Value::Number(n) => points.push(Num::of(n)),
                    _ => return None,
                }
            }
            if !points.is_empty() {
                a.number = Some(NumTest::Points(points.into()));
            }
        }
        Test::Exists => a.present = true,
        _ => return None,
    }
    Some(a)
}

impl Atoms {
    fn add(&mut self, a: Accepts, filter: u32) {
        for s in a.strings {
            self.strings.entry(s).or_default().push(filter);
        }
        for (b, on) in a.bools.into_iter().enumerate() {
            if on {
                self.bools[b].push(filter);
            }
        }
        if let Some(t) = a.number {
            self.numbers.push((t, filter));
        }
        if a.present {
            self.present.push(filter);
        }
    }

    /// Counts, for each filter, the atoms a value that is not an array passes.
    fn count(&self, v: &Value, counts: &mut [u16]) {
        let mut hit = |fs: &[u32]| fs.iter().for_each(|&f| counts[f as usize] += 1);
        hit(&self.present);
        match v {
            Value::String(s) => self.count_str(s, counts),
            Value::Bool(b) => hit(&self.bools[usize::from(*b)]),
            Value::Number(n) => {
                let x = Num::of(n);
                for (t, f) in &self.numbers {
                    if t.accepts(x) {
                        counts[*f as usize] += 1;
                    }
                }
            }
            _ => {}
        }
    }

    fn count_str(&self, s: &str, counts: &mut [u16]) {
        if let Some(fs) = self.strings.get(s) {
            fs.iter().for_each(|&f| counts[f as usize] += 1);
        }
    }
}

impl FilterSet {
    /// Indexes `filters`; answers come in this order.
    pub fn new(filters: Vec<Arc<Filter>>) -> Self {
        let mut set = FilterSet {
            plans: Vec::with_capacity(filters.len()),
            ..FilterSet::default()
        };
        for (i, f) in filters.iter().enumerate() {
            let mut found = Found::default();
            found.expr(&f.0);
            let i = i as u32;
            // More atoms than a counter holds (a query has at most `MAX_OPERATORS`, but be
            // safe): evaluate that filter in full.
            let Ok(needed) = u16::try_from(found.atoms.len()) else {
                set.plans.push(Plan {
                    needed: 0,
                    exact: false,
                });
                continue;
            };
            set.plans.push(Plan {
                needed,
                exact: !found.residual,
            });
            for (key, a) in found.atoms {
                match key {
                    Some(k) => set.keys.entry(k).or_default().add(a, i),
                    None => set.version.add(a, i),
                }
            }
        }
        set.filters = filters;
        set
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Which filters an endpoint matches, in the order given to [`Self::new`]: the same
    /// answers as [`Filter::matches`] on each.
    pub fn matches(&self, app_version: &str, metadata: &Map<String, Value>) -> Vec<bool> {
        if metadata.values().any(Value::is_array) {
            return self
                .filters
                .iter()
                .map(|f| f.matches(app_version, metadata))
                .collect();
        }
        let mut counts = vec![0u16; self.filters.len()];
        self.version.count_str(app_version, &mut counts);
        self.version
            .present
            .iter()
            .for_each(|&f| counts[f as usize] += 1);
        // Walk the smaller side: the endpoint's keys or the keys filters read.
        if self.keys.len() < metadata.len() {
            for (k, atoms) in &self.keys {
                if let Some(v) = metadata.get(&**k) {
                    atoms.count(v, &mut counts);
                }
            }
        } else {
            for (k, v) in metadata {
                if let Some(atoms) = self.keys.get(k.as_str()) {
                    atoms.count(v, &mut counts);
                }
            }
        }
        self.plans
            .iter()
            .zip(&self.filters)
            .zip(counts)
            .map(|((p, f), c)| c == p.needed && (p.exact || f.matches(app_version, metadata)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(queries: &[Value]) -> FilterSet {
        FilterSet::new(
            queries
                .iter()
                .map(|q| Arc::new(Filter::parse(q).expect("a valid query")))
                .collect(),
        )
    }

    fn elem(key: &str, value: Value) -> Value {
        json!({"metadata": {"$elemMatch": {"key": key, "value": value}}})
    }

    fn md(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("an object"),
        }
    }

    #[test]
    fn kaa_shaped_filters_are_answered_by_their_atoms_alone() {
        let s = set(&[
            elem("city", json!("c3")),
            elem("on", json!(true)),
            elem("level", json!({"$gte": 5, "$lt": 45})),
            elem("kind", json!({"$in": ["a", "b", 3, false]})),
            json!({"$and": [elem("on", json!(false)), elem("level", json!({"$lt": 25}))]}),
            json!({"metadata": {"$elemMatch": {"key": "serial"}}}),
            json!({"application_version": {"$in": ["v1", "v2"]}}),
            json!({}),
        ]);
        assert!(s.plans.iter().all(|p| p.exact), "{:?}", s.plans);
        assert_eq!(
            s.plans.iter().map(|p| p.needed).collect::<Vec<_>>(),
            [1, 1, 1, 1, 2, 1, 1, 0]
        );
        let m = md(json!({"city": "c3", "on": false, "level": 24.5, "kind": 3, "serial": null}));
        assert_eq!(
            s.matches("v2", &m),
            [true, false, true, true, true, true, true, true]
        );
        let m = md(json!({"city": "c4", "on": true, "level": 45, "kind": false}));
        assert_eq!(
            s.matches("v3", &m),
            [false, true, false, true, false, false, false, true]
        );
    }

    #[test]
    fn parts_that_are_not_atoms_are_evaluated_when_the_atoms_hold() {
        let s = set(&[
            json!({"$and": [
                elem("city", json!("c3")),
                {"$or": [elem("on", json!(true)), elem("level", json!(7))]}
            ]}),
            elem("city", json!({"$regex": "^c"})),
            elem("city", json!({"$in": ["c3", null]})),
            elem("level", json!({"$gt": 1, "$gte": 3})),
        ]);
        assert_eq!(
            s.plans
                .iter()
                .map(|p| (p.needed, p.exact))
                .collect::<Vec<_>>(),
            [(1, false), (1, false), (1, false), (2, true)]
        );
        let m = md(json!({"city": "c3", "level": 7}));
        assert_eq!(s.matches("v", &m), [true, true, true, true]);
        // The entry must exist: `null` in `$in` does not make a missing key match.
        let m = md(json!({"level": 2}));
        assert_eq!(s.matches("v", &m), [false; 4]);
    }

    #[test]
    fn numbers_compare_exactly_across_integers_and_decimals() {
        let s = set(&[
            elem("n", json!(3)),
            elem("n", json!({"$in": [1.5, 3]})),
            elem("n", json!({"$gt": 3})),
            elem("n", json!({"$lte": 9007199254740993_u64})),
        ]);
        assert_eq!(
            s.matches("v", &md(json!({"n": 3.0}))),
            [true, true, false, true]
        );
        assert_eq!(
            s.matches("v", &md(json!({"n": 1.5}))),
            [false, true, false, true]
        );
        assert_eq!(
            s.matches("v", &md(json!({"n": 9007199254740994_u64}))),
            [false, false, true, false]
        );
        // A string never passes a numeric test.
        assert_eq!(s.matches("v", &md(json!({"n": "3"}))), [false; 4]);
    }

    #[test]
    fn an_array_value_is_evaluated_in_full() {
        let s = set(&[elem("city", json!("c3")), elem("level", json!({"$gt": 5}))]);
        let m = md(json!({"city": ["c1", "c3"], "level": [1, 9]}));
        assert_eq!(s.matches("v", &m), [true, true]);
    }

    #[test]
    fn many_keys_on_either_side() {
        let queries: Vec<Value> = (0..20).map(|k| elem(&format!("k{k}"), json!(k))).collect();
        let s = set(&queries);
        let one = md(json!({"k7": 7}));
        let expected: Vec<bool> = (0..20).map(|k| k == 7).collect();
        assert_eq!(s.matches("v", &one), expected);
        let mut all = Map::new();
        for k in 0..40 {
            all.insert(format!("k{k}"), json!(if k == 7 { 0 } else { k }));
        }
        let expected: Vec<bool> = (0..20).map(|k| k != 7).collect();
        assert_eq!(s.matches("v", &all), expected);
    }
}
