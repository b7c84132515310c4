//! The compiled form of a filter and its evaluation against one endpoint.
//!
//! The endpoint's MongoDB document `{"application_version": .., "metadata": [{"key", "value"}, ..]}`
//! is never built: [`Elem`] views the app version and the metadata map as if it were, so an
//! evaluation allocates nothing (except when ordering objects, see [`Elem::sorted_fields`]).

use regex::Regex;
use serde_json::{Map, Number, Value};
use std::cmp::Ordering;

/// A node of the query: MongoDB's query-document level (`$and`, `$or`, `$nor`, fields).
#[derive(Debug, Clone)]
pub(super) enum Expr {
    Const(bool),
    And(Box<[Expr]>),
    Or(Box<[Expr]>),
    Nor(Box<[Expr]>),
    Field(Path, Cond),
}

/// A condition on the values found at one path.
#[derive(Debug, Clone)]
pub(super) enum Cond {
    Const(bool),
    /// Some value at the path passes the test; an array at the end of the path offers its
    /// elements and itself (MongoDB's leaf-array traversal).
    Leaf(Test),
    /// Some value at the path is an array passing the test; arrays are not expanded.
    Array(ArrayTest),
    /// `$not`, `$ne`, `$nin`, `$exists: false`: negation over the whole path, so a missing
    /// field passes.
    Not(Box<Cond>),
    And(Box<[Cond]>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmpOp {
    Eq,
    Gt,
    Gte,
    Lt,
    Lte,
}

/// A test of one value (MongoDB's `matchesSingleElement`).
#[derive(Debug, Clone)]
pub(super) enum Test {
    Cmp(CmpOp, Lit),
    In(Box<InSet>),
    Exists,
    /// Bit `n` set: BSON type number `n` matches.
    Type(u32),
    Regex(Box<Regex>),
    Mod {
        divisor: i64,
        remainder: i64,
    },
}

/// A constant to compare with; strings and numbers are unpacked once, at parse time.
#[derive(Debug, Clone)]
pub(super) enum Lit {
    Str(Box<str>),
    Num(Num),
    Json(Value),
}

impl Lit {
    pub(super) fn of(v: &Value) -> Self {
        match v {
            Value::String(s) => Lit::Str(s.as_str().into()),
            Value::Number(n) => Lit::Num(Num::of(n)),
            other => Lit::Json(other.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct InSet {
    /// The string values, hashed: a string only ever equals a string, and `$in` lists of
    /// tens of names are common (a registration tests every filter of its application).
    pub strings: std::collections::HashSet<Box<str>>,
    /// The other values (never a string).
    pub values: Box<[Value]>,
    pub regexes: Box<[Regex]>,
    /// `null` in `$in` also matches a missing field, as `{"$eq": null}` does.
    pub has_null: bool,
}

#[derive(Debug, Clone)]
pub(super) enum ArrayTest {
    Size(usize),
    /// `$elemMatch` with a query on the array's documents.
    ElemMatchDoc(Box<Expr>),
    /// `$elemMatch` with operators on the array's elements.
    ElemMatchValue(Box<Cond>),
    /// `$elemMatch` on the metadata array whose query fixes `key` to one string. Keys are
    /// unique, so only that entry can match: a map lookup instead of a scan. `rest` is the
    /// query without the key condition; `full` is the whole query, for any other array.
    ElemMatchKey {
        key: Box<str>,
        rest: Box<Expr>,
        full: Box<Expr>,
    },
}

/// A dotted path, split. `index` is set when the part reads as an array index.
pub(super) type Path = Box<[Part]>;

#[derive(Debug, Clone)]
pub(super) struct Part {
    pub name: Box<str>,
    pub index: Option<usize>,
    /// The name resolved once against the virtual document's own field names.
    pub known: Known,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    AppVersion,
    Metadata,
    Key,
    Value,
    Other,
}

impl Known {
    pub(super) fn of(name: &str) -> Self {
        match name {
            "application_version" => Known::AppVersion,
            "metadata" => Known::Metadata,
            "key" => Known::Key,
            "value" => Known::Value,
            _ => Known::Other,
        }
    }
}

/// One value of the virtual endpoint document.
#[derive(Debug, Clone, Copy)]
pub(super) enum Elem<'a> {
    /// A path that leads nowhere (MongoDB's EOO element).
    Missing,
    Str(&'a str),
    Json(&'a Value),
    /// The `metadata` array: one entry per map entry.
    Entries(&'a Map<String, Value>),
    /// One `{"key": k, "value": v}` entry of the metadata array.
    Entry(&'a str, &'a Value),
    /// The whole document; only ever the start of a path.
    Root(&'a str, &'a Map<String, Value>),
}

/// MongoDB's canonical type order; comparisons only match within one bracket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Bracket {
    Missing,
    Null,
    Number,
    String,
    Object,
    Array,
    Bool,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    pub(super) fn of(n: &Number) -> Self {
        if let Some(i) = n.as_i64() {
            Num::Int(i128::from(i))
        } else if let Some(u) = n.as_u64() {
            Num::Int(i128::from(u))
        } else {
            Num::Float(n.as_f64().unwrap_or(0.0))
        }
    }

    /// Truncated toward zero and saturated, as MongoDB's `$mod` reads its input.
    fn trunc_i64(self) -> i64 {
        match self {
            Num::Int(i) => i.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            Num::Float(f) => f as i64,
        }
    }
}

/// Exact numeric order across integers and floats (MongoDB compares long and double exactly).
pub(super) fn cmp_num(a: Num, b: Num) -> Ordering {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => x.cmp(&y),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        (Num::Int(x), Num::Float(y)) => cmp_int_float(x, y),
        (Num::Float(x), Num::Int(y)) => cmp_int_float(y, x).reverse(),
    }
}

fn cmp_int_float(i: i128, f: f64) -> Ordering {
    // JSON integers lie within ±2^64; beyond that any finite float is simply larger/smaller.
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if f >= TWO_64 {
        return Ordering::Less;
    }
    if f < -TWO_64 {
        return Ordering::Greater;
    }
    let t = f.trunc();
    match i.cmp(&(t as i128)) {
        Ordering::Equal => 0.0.partial_cmp(&(f - t)).unwrap_or(Ordering::Equal),
        o => o,
    }
}

pub(super) const T_DOUBLE: u32 = 1;
pub(super) const T_STRING: u32 = 2;
pub(super) const T_OBJECT: u32 = 3;
pub(super) const T_ARRAY: u32 = 4;
pub(super) const T_BOOL: u32 = 8;
pub(super) const T_NULL: u32 = 10;
pub(super) const T_INT: u32 = 16;
pub(super) const T_LONG: u32 = 18;

/// Iterates the elements of an array-like [`Elem`].
pub(super) enum Items<'a> {
    Json(std::slice::Iter<'a, Value>),
    Entries(serde_json::map::Iter<'a>),
    Empty,
}

impl<'a> Iterator for Items<'a> {
    type Item = Elem<'a>;

    fn next(&mut self) -> Option<Elem<'a>> {
        match self {
            Items::Json(it) => it.next().map(Elem::Json),
            Items::Entries(it) => it.next().map(|(k, v)| Elem::Entry(k, v)),
            Items::Empty => None,
        }
    }
}

impl<'a> Elem<'a> {
    pub(super) fn bracket(self) -> Bracket {
        match self {
            Elem::Missing => Bracket::Missing,
            Elem::Str(_) => Bracket::String,
            Elem::Entries(_) => Bracket::Array,
            Elem::Entry(..) | Elem::Root(..) => Bracket::Object,
            Elem::Json(v) => match v {
                Value::Null => Bracket::Null,
                Value::Bool(_) => Bracket::Bool,
                Value::Number(_) => Bracket::Number,
                Value::String(_) => Bracket::String,
                Value::Array(_) => Bracket::Array,
                Value::Object(_) => Bracket::Object,
            },
        }
    }

    fn as_str(self) -> Option<&'a str> {
        match self {
            Elem::Str(s) => Some(s),
            Elem::Json(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    fn as_num(self) -> Option<Num> {
        match self {
            Elem::Json(Value::Number(n)) => Some(Num::of(n)),
            _ => None,
        }
    }

    fn as_bool(self) -> bool {
        matches!(self, Elem::Json(Value::Bool(true)))
    }

    fn items(self) -> Items<'a> {
        match self {
            Elem::Json(Value::Array(a)) => Items::Json(a.iter()),
            Elem::Entries(m) => Items::Entries(m.iter()),
            _ => Items::Empty,
        }
    }

    fn array_len(self) -> usize {
        match self {
            Elem::Json(Value::Array(a)) => a.len(),
            Elem::Entries(m) => m.len(),
            _ => 0,
        }
    }

    /// A field of an object-like element.
    fn field(self, name: &str) -> Option<Elem<'a>> {
        match self {
            Elem::Json(Value::Object(m)) => m.get(name).map(Elem::Json),
            Elem::Entry(k, v) => match name {
                "key" => Some(Elem::Str(k)),
                "value" => Some(Elem::Json(v)),
                _ => None,
            },
            Elem::Root(app, md) => match name {
                "application_version" => Some(Elem::Str(app)),
                "metadata" => Some(Elem::Entries(md)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The first step of a path from a document. `$elemMatch` may use an array as the
    /// document (MongoDB treats it as an object with keys "0", "1", ..).
    fn doc_field(self, part: &Part) -> Option<Elem<'a>> {
        match (self, part.known) {
            (Elem::Json(Value::Object(m)), _) => m.get(&*part.name).map(Elem::Json),
            (Elem::Json(Value::Array(a)), _) => part.index.and_then(|i| a.get(i)).map(Elem::Json),
            (Elem::Entry(k, _), Known::Key) => Some(Elem::Str(k)),
            (Elem::Entry(_, v), Known::Value) => Some(Elem::Json(v)),
            (Elem::Root(app, _), Known::AppVersion) => Some(Elem::Str(app)),
            (Elem::Root(_, md), Known::Metadata) => Some(Elem::Entries(md)),
            _ => None,
        }
    }

    fn obj_len(self) -> usize {
        match self {
            Elem::Json(Value::Object(m)) => m.len(),
            Elem::Entry(..) | Elem::Root(..) => 2,
            _ => 0,
        }
    }

    fn obj_all(self, mut f: impl FnMut(&str, Elem<'a>) -> bool) -> bool {
        match self {
            Elem::Json(Value::Object(m)) => m.iter().all(|(k, v)| f(k, Elem::Json(v))),
            Elem::Entry(k, v) => f("key", Elem::Str(k)) && f("value", Elem::Json(v)),
            Elem::Root(app, md) => {
                f("application_version", Elem::Str(app)) && f("metadata", Elem::Entries(md))
            }
            _ => true,
        }
    }

    /// Fields in key order. Ordering objects needs a defined field order and a JSON object
    /// has none; sorting keeps the result independent of serde_json's map flavour.
    fn sorted_fields(self) -> Vec<(&'a str, Elem<'a>)> {
        let mut out: Vec<(&'a str, Elem<'a>)> = match self {
            Elem::Json(Value::Object(m)) => {
                m.iter().map(|(k, v)| (k.as_str(), Elem::Json(v))).collect()
            }
            Elem::Entry(k, v) => vec![("key", Elem::Str(k)), ("value", Elem::Json(v))],
            Elem::Root(app, md) => vec![
                ("application_version", Elem::Str(app)),
                ("metadata", Elem::Entries(md)),
            ],
            _ => Vec::new(),
        };
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out
    }

    /// The BSON type number this JSON value would be stored as.
    pub(super) fn type_code(self) -> Option<u32> {
        Some(match self.bracket() {
            Bracket::Missing => return None,
            Bracket::Null => T_NULL,
            Bracket::Bool => T_BOOL,
            Bracket::String => T_STRING,
            Bracket::Object => T_OBJECT,
            Bracket::Array => T_ARRAY,
            Bracket::Number => match self.as_num() {
                Some(Num::Int(i)) if i32::try_from(i).is_ok() => T_INT,
                Some(Num::Int(i)) if i64::try_from(i).is_ok() => T_LONG,
                _ => T_DOUBLE,
            },
        })
    }
}

/// Equality within MongoDB's rules: same bracket, numbers numerically, arrays element-wise,
/// objects with the same keys and equal values regardless of key order.
pub(super) fn equal(a: Elem<'_>, b: Elem<'_>) -> bool {
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        return x == y;
    }
    let bracket = a.bracket();
    if bracket != b.bracket() {
        return false;
    }
    match bracket {
        Bracket::Missing | Bracket::Null => true,
        Bracket::Bool => a.as_bool() == b.as_bool(),
        Bracket::String => a.as_str() == b.as_str(),
        Bracket::Number => match (a.as_num(), b.as_num()) {
            (Some(x), Some(y)) => cmp_num(x, y) == Ordering::Equal,
            _ => false,
        },
        Bracket::Array => {
            a.array_len() == b.array_len() && a.items().zip(b.items()).all(|(x, y)| equal(x, y))
        }
        Bracket::Object => {
            a.obj_len() == b.obj_len() && a.obj_all(|k, v| b.field(k).is_some_and(|w| equal(v, w)))
        }
    }
}

/// Order of two values of the same bracket.
fn cmp_same(a: Elem<'_>, b: Elem<'_>) -> Ordering {
    match a.bracket() {
        Bracket::Missing | Bracket::Null => Ordering::Equal,
        Bracket::Bool => a.as_bool().cmp(&b.as_bool()),
        Bracket::String => a.as_str().cmp(&b.as_str()),
        Bracket::Number => match (a.as_num(), b.as_num()) {
            (Some(x), Some(y)) => cmp_num(x, y),
            _ => Ordering::Equal,
        },
        Bracket::Array => {
            let (mut x, mut y) = (a.items(), b.items());
            loop {
                match (x.next(), y.next()) {
                    (None, None) => return Ordering::Equal,
                    (None, Some(_)) => return Ordering::Less,
                    (Some(_), None) => return Ordering::Greater,
                    (Some(p), Some(q)) => match cmp_total(p, q) {
                        Ordering::Equal => {}
                        o => return o,
                    },
                }
            }
        }
        Bracket::Object => {
            // BSON compares field by field: type bracket, then name, then value.
            let (x, y) = (a.sorted_fields(), b.sorted_fields());
            for ((kx, vx), (ky, vy)) in x.iter().zip(y.iter()) {
                let o = vx
                    .bracket()
                    .cmp(&vy.bracket())
                    .then_with(|| kx.cmp(ky))
                    .then_with(|| cmp_same(*vx, *vy));
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
    }
}

fn cmp_total(a: Elem<'_>, b: Elem<'_>) -> Ordering {
    a.bracket().cmp(&b.bracket()).then_with(|| cmp_same(a, b))
}

impl CmpOp {
    fn holds(self, o: Ordering) -> bool {
        match self {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Gte => o != Ordering::Less,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Lte => o != Ordering::Greater,
        }
    }
}

fn compare(op: CmpOp, e: Elem<'_>, lit: Elem<'_>) -> bool {
    let (be, bl) = (e.bracket(), lit.bracket());
    if be != bl {
        // Null and missing count as equal, for $eq, $gte and $lte only.
        return be == Bracket::Missing
            && bl == Bracket::Null
            && matches!(op, CmpOp::Eq | CmpOp::Gte | CmpOp::Lte);
    }
    match op {
        CmpOp::Eq => equal(e, lit),
        _ => op.holds(cmp_same(e, lit)),
    }
}

impl Test {
    fn test(&self, e: Elem<'_>) -> bool {
        match self {
            // Strings and numbers only ever match their own bracket, never a missing value.
            Test::Cmp(op, Lit::Str(s)) => e.as_str().is_some_and(|x| op.holds(x.cmp(s))),
            Test::Cmp(op, Lit::Num(n)) => e.as_num().is_some_and(|x| op.holds(cmp_num(x, *n))),
            Test::Cmp(op, Lit::Json(lit)) => compare(*op, e, Elem::Json(lit)),
            Test::In(set) => match e.as_str() {
                // A string equals only a string (`equal`), and only strings meet regexes.
                Some(s) => set.strings.contains(s) || set.regexes.iter().any(|r| r.is_match(s)),
                None => {
                    (set.has_null && matches!(e, Elem::Missing))
                        || set.values.iter().any(|v| equal(e, Elem::Json(v)))
                }
            },
            Test::Exists => !matches!(e, Elem::Missing),
            Test::Type(mask) => e.type_code().is_some_and(|c| mask & (1 << c) != 0),
            Test::Regex(r) => e.as_str().is_some_and(|s| r.is_match(s)),
            Test::Mod { divisor, remainder } => e
                .as_num()
                .is_some_and(|n| n.trunc_i64().wrapping_rem(*divisor) == *remainder),
        }
    }
}

impl ArrayTest {
    fn test(&self, e: Elem<'_>) -> bool {
        if e.bracket() != Bracket::Array {
            return false;
        }
        match self {
            ArrayTest::Size(n) => e.array_len() == *n,
            ArrayTest::ElemMatchDoc(x) => e.items().any(|it| elem_match_doc(x, it)),
            ArrayTest::ElemMatchValue(c) => e.items().any(|it| c.test_one(it)),
            ArrayTest::ElemMatchKey { key, rest, full } => match e {
                Elem::Entries(md) => md
                    .get_key_value(&**key)
                    .is_some_and(|(k, v)| rest.eval(Elem::Entry(k, v))),
                _ => e.items().any(|it| elem_match_doc(full, it)),
            },
        }
    }
}

impl Expr {
    /// Collects the metadata keys read (see [`super::Filter::metadata_keys`]); false when
    /// the metadata is read in any other way.
    pub(super) fn metadata_keys(&self, keys: &mut Vec<String>) -> bool {
        match self {
            Expr::Const(_) => true,
            Expr::And(xs) | Expr::Or(xs) | Expr::Nor(xs) => {
                xs.iter().all(|x| x.metadata_keys(keys))
            }
            Expr::Field(path, cond) => match path.first().map(|p| p.known) {
                Some(Known::AppVersion) => true,
                Some(Known::Metadata) if path.len() == 1 => cond.metadata_keys(keys),
                _ => false,
            },
        }
    }
}

impl Cond {
    fn metadata_keys(&self, keys: &mut Vec<String>) -> bool {
        match self {
            Cond::Const(_) => true,
            Cond::Not(c) => c.metadata_keys(keys),
            Cond::And(cs) => cs.iter().all(|c| c.metadata_keys(keys)),
            Cond::Array(ArrayTest::ElemMatchKey { key, .. }) => {
                keys.push(key.to_string());
                true
            }
            Cond::Leaf(_) | Cond::Array(_) => false,
        }
    }
}

/// MongoDB offers every element that is a document or an array to the query.
fn elem_match_doc(x: &Expr, it: Elem<'_>) -> bool {
    matches!(it.bracket(), Bracket::Object | Bracket::Array) && x.eval(it)
}

impl Cond {
    fn eval_at(&self, doc: Elem<'_>, path: &[Part]) -> bool {
        match self {
            Cond::Const(b) => *b,
            Cond::Leaf(t) => walk(doc, path, true, &mut |e| t.test(e)),
            Cond::Array(a) => walk(doc, path, false, &mut |e| a.test(e)),
            Cond::Not(c) => !c.eval_at(doc, path),
            Cond::And(cs) => cs.iter().all(|c| c.eval_at(doc, path)),
        }
    }

    /// The condition applied to one array element (`$elemMatch` with operators).
    fn test_one(&self, e: Elem<'_>) -> bool {
        match self {
            Cond::Const(b) => *b,
            Cond::Leaf(t) => t.test(e),
            Cond::Array(a) => a.test(e),
            Cond::Not(c) => !c.test_one(e),
            Cond::And(cs) => cs.iter().all(|c| c.test_one(e)),
        }
    }
}

impl Expr {
    pub(super) fn eval(&self, doc: Elem<'_>) -> bool {
        match self {
            Expr::Const(b) => *b,
            Expr::And(xs) => xs.iter().all(|x| x.eval(doc)),
            Expr::Or(xs) => xs.iter().any(|x| x.eval(doc)),
            Expr::Nor(xs) => !xs.iter().any(|x| x.eval(doc)),
            Expr::Field(path, cond) => cond.eval_at(doc, path),
        }
    }
}

/// Offers every value MongoDB finds at `path` in `doc` to `f` until it answers true.
/// Mirrors mongod's `BSONElementIterator`: objects are descended; the first array on the
/// path is walked into its document elements (and into the element a numeric part names);
/// a path that ends early yields one missing value; with `expand`, an array at the end
/// yields its elements and then itself.
fn walk<'a, F: FnMut(Elem<'a>) -> bool>(
    doc: Elem<'a>,
    path: &[Part],
    expand: bool,
    f: &mut F,
) -> bool {
    let mut cur = doc;
    let mut i = 0;
    loop {
        let Some(e) = cur.doc_field(&path[i]) else {
            return f(Elem::Missing);
        };
        if e.bracket() == Bracket::Array {
            return walk_array(e, &path[i + 1..], expand, f);
        }
        i += 1;
        if i == path.len() {
            return f(e);
        }
        if e.bracket() != Bracket::Object {
            return f(Elem::Missing);
        }
        cur = e;
    }
}

fn walk_array<'a, F: FnMut(Elem<'a>) -> bool>(
    arr: Elem<'a>,
    rest: &[Part],
    expand: bool,
    f: &mut F,
) -> bool {
    let Some(next) = rest.first() else {
        if !expand {
            return f(arr);
        }
        return arr.items().any(&mut *f) || f(arr);
    };
    for (j, item) in arr.items().enumerate() {
        let offset = next.index == Some(j);
        if item.bracket() == Bracket::Object {
            if walk(item, rest, expand, f) {
                return true;
            }
            if offset
                && (if rest.len() == 1 {
                    f(item)
                } else {
                    walk(item, &rest[1..], expand, f)
                })
            {
                return true;
            }
        } else if offset {
            if rest.len() == 1 {
                if f(item) {
                    return true;
                }
            } else if item.bracket() == Bracket::Array && walk_array(item, &rest[1..], expand, f) {
                return true;
            }
        }
    }
    false
}
