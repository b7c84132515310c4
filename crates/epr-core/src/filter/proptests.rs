//! `Filter::matches` against a naive reference: build the endpoint's MongoDB document
//! (`{"application_version", "metadata": [{"key", "value"}, ..]}`) and interpret the query
//! JSON directly, collecting path values into vectors and comparing numbers as f64. The
//! random filters cover every supported operator and, often, the `$elemMatch`-by-key shape
//! that takes the map-lookup fast path.

use super::Filter;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Value};
use std::cmp::Ordering;

// ----- the reference evaluator -----

fn document(app: &str, md: &Map<String, Value>) -> Value {
    let entries: Vec<Value> = md
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
    json!({"application_version": app, "metadata": entries})
}

fn index(part: &str) -> Option<usize> {
    let canonical = part == "0"
        || (!part.is_empty() && !part.starts_with('0') && part.bytes().all(|b| b.is_ascii_digit()));
    canonical.then(|| part.parse().ok()).flatten()
}

/// A field of a document; an array used as a document has the fields "0", "1", ...
fn lookup<'a>(doc: &'a Value, part: &str) -> Option<&'a Value> {
    match doc {
        Value::Object(m) => m.get(part),
        Value::Array(a) => index(part).and_then(|i| a.get(i)),
        _ => None,
    }
}

/// Every value mongod's element iterator yields for `path`; `None` is a missing value.
fn values_at<'a>(doc: &'a Value, path: &[&str], expand: bool) -> Vec<Option<&'a Value>> {
    let mut out = Vec::new();
    from_doc(doc, path, expand, &mut out);
    out
}

fn from_doc<'a>(doc: &'a Value, path: &[&str], expand: bool, out: &mut Vec<Option<&'a Value>>) {
    let mut cur = doc;
    for (i, part) in path.iter().enumerate() {
        match lookup(cur, part) {
            None => return out.push(None),
            Some(v @ Value::Array(_)) => return from_array(v, &path[i + 1..], expand, out),
            Some(v) if i + 1 == path.len() => return out.push(Some(v)),
            Some(v @ Value::Object(_)) => cur = v,
            Some(_) => return out.push(None),
        }
    }
}

fn from_array<'a>(arr: &'a Value, rest: &[&str], expand: bool, out: &mut Vec<Option<&'a Value>>) {
    let items = arr.as_array().expect("an array");
    if rest.is_empty() {
        if expand {
            out.extend(items.iter().map(Some));
        }
        out.push(Some(arr));
        return;
    }
    for (j, item) in items.iter().enumerate() {
        let offset = index(rest[0]) == Some(j);
        match item {
            Value::Object(_) => {
                from_doc(item, rest, expand, out);
                if offset && rest.len() == 1 {
                    out.push(Some(item));
                } else if offset {
                    from_doc(item, &rest[1..], expand, out);
                }
            }
            Value::Array(_) if offset && rest.len() > 1 => {
                from_array(item, &rest[1..], expand, out)
            }
            _ if offset && rest.len() == 1 => out.push(Some(item)),
            _ => {}
        }
    }
}

fn rank(v: &Value) -> u8 {
    match v {
        Value::Null => 5,
        Value::Number(_) => 10,
        Value::String(_) => 15,
        Value::Object(_) => 20,
        Value::Array(_) => 25,
        Value::Bool(_) => 40,
    }
}

fn total(a: &Value, b: &Value) -> Ordering {
    rank(a).cmp(&rank(b)).then_with(|| match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_f64().partial_cmp(&y.as_f64()).expect("no NaN")
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .map(|(p, q)| total(p, q))
            .find(|o| o.is_ne())
            .unwrap_or(x.len().cmp(&y.len())),
        (Value::Object(x), Value::Object(y)) => {
            let mut xs: Vec<_> = x.iter().collect();
            let mut ys: Vec<_> = y.iter().collect();
            xs.sort_by(|p, q| p.0.cmp(q.0));
            ys.sort_by(|p, q| p.0.cmp(q.0));
            xs.iter()
                .zip(&ys)
                .map(|((kp, vp), (kq, vq))| {
                    rank(vp)
                        .cmp(&rank(vq))
                        .then(kp.cmp(kq))
                        .then_with(|| total(vp, vq))
                })
                .find(|o| o.is_ne())
                .unwrap_or(xs.len().cmp(&ys.len()))
        }
        _ => Ordering::Equal,
    })
}

fn eq1(e: Option<&Value>, lit: &Value) -> bool {
    match e {
        None => lit.is_null(),
        Some(v) => total(v, lit).is_eq(),
    }
}

fn cmp1(op: &str, e: Option<&Value>, lit: &Value) -> bool {
    match e {
        None => lit.is_null() && (op == "$gte" || op == "$lte"),
        Some(v) if rank(v) != rank(lit) => false,
        Some(v) => {
            let o = total(v, lit);
            match op {
                "$gt" => o.is_gt(),
                "$gte" => o.is_ge(),
                "$lt" => o.is_lt(),
                "$lte" => o.is_le(),
                _ => unreachable!("{op}"),
            }
        }
    }
}

fn is_regex(v: &Value) -> bool {
    v.get("$regex").is_some()
}

fn regex1(e: Option<&Value>, pattern: &Value, options: Option<&Value>) -> bool {
    let options = options.and_then(Value::as_str).unwrap_or("");
    let re = regex::RegexBuilder::new(pattern.as_str().expect("a pattern"))
        .case_insensitive(options.contains('i'))
        .build()
        .expect("a valid regex");
    matches!(e, Some(Value::String(s)) if re.is_match(s))
}

fn in1(e: Option<&Value>, items: &Value) -> bool {
    items.as_array().expect("an array").iter().any(|it| {
        if is_regex(it) {
            regex1(e, &it["$regex"], it.get("$options"))
        } else {
            eq1(e, it)
        }
    })
}

fn type_codes(arg: &Value) -> Vec<i64> {
    match arg {
        Value::Array(a) => a.iter().flat_map(type_codes).collect(),
        Value::Number(n) => vec![n.as_i64().expect("integral")],
        Value::String(s) => match s.as_str() {
            "double" => vec![1],
            "string" => vec![2],
            "object" => vec![3],
            "array" => vec![4],
            "bool" => vec![8],
            "date" => vec![9],
            "null" => vec![10],
            "int" => vec![16],
            "long" => vec![18],
            "number" => vec![1, 16, 18],
            other => unreachable!("{other}"),
        },
        other => unreachable!("{other}"),
    }
}

fn type1(e: Option<&Value>, arg: &Value) -> bool {
    let Some(v) = e else { return false };
    let code = match v {
        Value::Null => 10,
        Value::Bool(_) => 8,
        Value::String(_) => 2,
        Value::Object(_) => 3,
        Value::Array(_) => 4,
        Value::Number(n) if n.is_f64() => 1,
        Value::Number(n) => match n.as_i64() {
            Some(i) if i32::try_from(i).is_ok() => 16,
            Some(_) => 18,
            None => 1,
        },
    };
    type_codes(arg).contains(&code)
}

fn size1(e: Option<&Value>, n: &Value) -> bool {
    matches!(e, Some(Value::Array(a)) if a.len() as u64 == n.as_u64().expect("a size"))
}

fn mod1(e: Option<&Value>, arg: &Value) -> bool {
    let (d, r) = (arg[0].as_i64().expect("d"), arg[1].as_i64().expect("r"));
    matches!(e, Some(Value::Number(n)) if (n.as_f64().expect("f64") as i64) % d == r)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        _ => unreachable!(),
    }
}

fn elem_match1(e: Option<&Value>, arg: &Value) -> bool {
    let Some(Value::Array(items)) = e else {
        return false;
    };
    let m = arg.as_object().expect("an object");
    let pathless = ["$and", "$or", "$nor", "$comment"];
    let value_form = !m.is_empty()
        && m.keys()
            .all(|k| k.starts_with('$') && !pathless.contains(&k.as_str()));
    if value_form {
        items.iter().any(|it| single(m, Some(it)))
    } else {
        items
            .iter()
            .any(|it| (it.is_object() || it.is_array()) && eval_query(m, it))
    }
}

fn is_elem_match(v: &Value) -> bool {
    v.get("$elemMatch").is_some()
}

/// An operator object applied to one value (`$elemMatch` with operators).
fn single(m: &Map<String, Value>, e: Option<&Value>) -> bool {
    m.iter().all(|(op, arg)| match op.as_str() {
        "$eq" => eq1(e, arg),
        "$ne" => !eq1(e, arg),
        "$gt" | "$gte" | "$lt" | "$lte" => cmp1(op, e, arg),
        "$in" => in1(e, arg),
        "$nin" => !in1(e, arg),
        "$exists" => e.is_some() == truthy(arg),
        "$type" => type1(e, arg),
        "$regex" => regex1(e, arg, m.get("$options")),
        "$options" => true,
        "$not" => !single(arg.as_object().expect("ops"), e),
        "$size" => size1(e, arg),
        "$mod" => mod1(e, arg),
        "$elemMatch" => elem_match1(e, arg),
        "$all" => {
            let items = arg.as_array().expect("an array");
            !items.is_empty()
                && items.iter().all(|it| {
                    if is_elem_match(it) {
                        elem_match1(e, &it["$elemMatch"])
                    } else if is_regex(it) {
                        regex1(e, &it["$regex"], it.get("$options"))
                    } else {
                        eq1(e, it)
                    }
                })
        }
        other => unreachable!("{other}"),
    })
}

fn any_at(doc: &Value, path: &[&str], expand: bool, f: impl Fn(Option<&Value>) -> bool) -> bool {
    values_at(doc, path, expand).into_iter().any(f)
}

/// An operator object at a path: each operator looks at every value there on its own.
fn ops_at(m: &Map<String, Value>, doc: &Value, path: &[&str]) -> bool {
    m.iter().all(|(op, arg)| match op.as_str() {
        "$eq" => any_at(doc, path, true, |e| eq1(e, arg)),
        "$ne" => !any_at(doc, path, true, |e| eq1(e, arg)),
        "$gt" | "$gte" | "$lt" | "$lte" => any_at(doc, path, true, |e| cmp1(op, e, arg)),
        "$in" => any_at(doc, path, true, |e| in1(e, arg)),
        "$nin" => !any_at(doc, path, true, |e| in1(e, arg)),
        "$exists" => any_at(doc, path, true, |e| e.is_some()) == truthy(arg),
        "$type" => any_at(doc, path, true, |e| type1(e, arg)),
        "$regex" => any_at(doc, path, true, |e| regex1(e, arg, m.get("$options"))),
        "$options" => true,
        "$not" => !ops_at(arg.as_object().expect("ops"), doc, path),
        "$size" => any_at(doc, path, false, |e| size1(e, arg)),
        "$mod" => any_at(doc, path, true, |e| mod1(e, arg)),
        "$elemMatch" => any_at(doc, path, false, |e| elem_match1(e, arg)),
        "$all" => {
            let items = arg.as_array().expect("an array");
            !items.is_empty()
                && items.iter().all(|it| {
                    if is_elem_match(it) {
                        any_at(doc, path, false, |e| elem_match1(e, &it["$elemMatch"]))
                    } else if is_regex(it) {
                        any_at(doc, path, true, |e| {
                            regex1(e, &it["$regex"], it.get("$options"))
                        })
                    } else {
                        any_at(doc, path, true, |e| eq1(e, it))
                    }
                })
        }
        other => unreachable!("{other}"),
    })
}

fn eval_query(q: &Map<String, Value>, doc: &Value) -> bool {
    let subs = |v: &Value| -> Vec<bool> {
        v.as_array()
            .expect("an array")
            .iter()
            .map(|s| eval_query(s.as_object().expect("a query"), doc))
            .collect()
    };
    q.iter().all(|(k, v)| match k.as_str() {
        "$and" => subs(v).iter().all(|b| *b),
        "$or" => subs(v).iter().any(|b| *b),
        "$nor" => !subs(v).iter().any(|b| *b),
        "$comment" => true,
        field => {
            let path: Vec<&str> = field.split('.').collect();
            match v {
                Value::Object(m) if m.keys().any(|k| k.starts_with('$')) => ops_at(m, doc, &path),
                lit => any_at(doc, &path, true, |e| eq1(e, lit)),
            }
        }
    })
}

// ----- generators -----

#[derive(Debug, Clone, Copy)]
enum Ctx {
    Root,
    Entry,
    Free,
}

const KEYS: [&str; 4] = ["a", "b", "city", "k.x"];

fn scalar() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-2i64..=3).prop_map(Value::from),
        select(vec![-1.5, 0.5, 1.0, 2.0, 2.5]).prop_map(Value::from),
        select(vec!["", "x", "Kyiv", "K", "a", "b", "v1"]).prop_map(Value::from),
    ]
    .boxed()
}

fn object_of(inner: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop::collection::btree_map(select(vec!["a", "b", "0"]), inner, 0..3)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
        .boxed()
}

fn json_value() -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                object_of(inner.boxed()),
            ]
        })
        .boxed()
}

/// A constant to compare with: mostly scalars, sometimes a small array or object.
fn lit() -> BoxedStrategy<Value> {
    prop_oneof![
        5 => scalar(),
        1 => prop::collection::vec(scalar(), 0..3).prop_map(Value::Array),
        1 => object_of(scalar()),
    ]
    .boxed()
}

fn metadata() -> BoxedStrategy<Map<String, Value>> {
    prop::collection::btree_map(select(KEYS.to_vec()), json_value(), 0..4)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        .boxed()
}

fn regex_obj() -> BoxedStrategy<Value> {
    (
        select(vec![
            "^K", "x", "a|b", "^$", "(?i)kyiv", "^v", "1", "^c", "\\.",
        ]),
        select(vec![None, Some(""), Some("i")]),
    )
        .prop_map(|(p, o)| match o {
            Some(o) => json!({"$regex": p, "$options": o}),
            None => json!({"$regex": p}),
        })
        .boxed()
}

fn type_arg() -> BoxedStrategy<Value> {
    select(vec![
        json!("string"),
        json!("double"),
        json!("int"),
        json!("long"),
        json!("number"),
        json!("array"),
        json!("object"),
        json!("bool"),
        json!("null"),
        json!("date"),
        json!(2),
        json!(16),
        json!(["string", "int"]),
    ])
    .boxed()
}

fn obj(k: &str, v: Value) -> Value {
    let mut m = Map::new();
    m.insert(k.to_owned(), v);
    Value::Object(m)
}

fn merge(a: Value, b: Value) -> Value {
    let (Value::Object(mut a), Value::Object(b)) = (a, b) else {
        unreachable!("objects")
    };
    a.extend(b);
    Value::Object(a)
}

/// An object of field operators on ordinary JSON values.
fn ops(depth: u32) -> BoxedStrategy<Value> {
    let in_elem = prop_oneof![4 => lit(), 1 => regex_obj()];
    let leaf = prop_oneof![
        (
            select(vec!["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]),
            lit()
        )
            .prop_map(|(op, v)| obj(op, v)),
        (
            select(vec!["$gt", "$gte"]),
            scalar(),
            select(vec!["$lt", "$lte"]),
            scalar()
        )
            .prop_map(|(a, x, b, y)| merge(obj(a, x), obj(b, y))),
        (
            select(vec!["$in", "$nin"]),
            prop::collection::vec(in_elem, 0..4)
        )
            .prop_map(|(op, v)| obj(op, Value::Array(v))),
        any::<bool>().prop_map(|b| json!({"$exists": b})),
        type_arg().prop_map(|t| json!({"$type": t})),
        regex_obj(),
        (0u64..3).prop_map(|n| json!({"$size": n})),
        select(vec![json!([2, 0]), json!([3, 1]), json!([-2, 1])]).prop_map(|m| json!({"$mod": m})),
        prop::collection::vec(prop_oneof![4 => lit(), 1 => regex_obj()], 0..3)
            .prop_map(|v| json!({"$all": v})),
    ]
    .boxed();
    if depth == 0 {
        return leaf;
    }
    prop_oneof![
        6 => leaf,
        1 => ops(depth - 1).prop_map(|o| json!({"$not": o})),
        1 => ops(depth - 1).prop_map(|o| json!({"$elemMatch": o})),
        1 => query(depth - 1, Ctx::Free).prop_map(|q| json!({"$elemMatch": q})),
        1 => prop::collection::vec(query(depth - 1, Ctx::Free), 1..3).prop_map(|qs| {
            json!({"$all": qs.into_iter().map(|q| json!({"$elemMatch": q})).collect::<Vec<_>>()})
        }),
        1 => (ops(depth - 1), ops(depth - 1)).prop_map(|(a, b)| merge(a, b)),
    ]
    .boxed()
}

/// A field's condition on ordinary JSON values: implicit equality or operators.
fn cond(depth: u32) -> BoxedStrategy<Value> {
    prop_oneof![1 => lit(), 2 => ops(depth)].boxed()
}

fn key_cond() -> BoxedStrategy<Value> {
    let name = select(vec!["a", "b", "city", "k.x", "zz"]);
    prop_oneof![
        4 => name.clone().prop_map(Value::from),
        1 => name.clone().prop_map(|k| json!({"$eq": k})),
        1 => name.clone().prop_map(|k| json!({"$ne": k})),
        1 => prop::collection::vec(name, 0..3).prop_map(|ks| json!({"$in": ks})),
        1 => regex_obj(),
    ]
    .boxed()
}

/// A query on one metadata entry, often in Kaa's `{"key": .., "value": ..}` shape.
fn entry_query(depth: u32) -> BoxedStrategy<Value> {
    prop_oneof![
        2 => (select(KEYS.to_vec()), cond(depth))
            .prop_map(|(k, c)| json!({"key": k, "value": c})),
        1 => query(depth, Ctx::Entry),
    ]
    .boxed()
}

/// Operators on the metadata array itself; none depends on the order of its entries.
fn metadata_ops(depth: u32) -> BoxedStrategy<Value> {
    let entry_lit =
        (select(KEYS.to_vec()), scalar()).prop_map(|(k, v)| json!({"key": k, "value": v}));
    let leaf = prop_oneof![
        any::<bool>().prop_map(|b| json!({"$exists": b})),
        (0u64..4).prop_map(|n| json!({"$size": n})),
        type_arg().prop_map(|t| json!({"$type": t})),
        (select(vec!["$eq", "$ne", "$gt", "$lte"]), entry_lit.clone())
            .prop_map(|(op, v)| obj(op, v)),
        prop::collection::vec(entry_lit, 0..3).prop_map(|v| json!({"$in": v})),
    ]
    .boxed();
    if depth == 0 {
        return leaf;
    }
    prop_oneof![
        2 => leaf,
        6 => entry_query(depth - 1).prop_map(|q| json!({"$elemMatch": q})),
        1 => ops(depth - 1).prop_map(|o| json!({"$elemMatch": o})),
        1 => metadata_ops(depth - 1).prop_map(|o| json!({"$not": o})),
        1 => prop::collection::vec(entry_query(depth - 1), 1..3).prop_map(|qs| {
            json!({"$all": qs.into_iter().map(|q| json!({"$elemMatch": q})).collect::<Vec<_>>()})
        }),
    ]
    .boxed()
}

fn field(depth: u32, ctx: Ctx) -> BoxedStrategy<(String, Value)> {
    let named = |paths: Vec<&'static str>, c: BoxedStrategy<Value>| {
        (select(paths), c)
            .prop_map(|(p, c)| (p.to_owned(), c))
            .boxed()
    };
    match ctx {
        Ctx::Root => prop_oneof![
            1 => named(vec!["application_version"], prop_oneof![
                select(vec!["v1", "v2"]).prop_map(Value::from),
                ops(0),
            ].boxed()),
            4 => named(vec!["metadata"], metadata_ops(depth)),
            1 => named(vec!["metadata.key"], key_cond()),
            2 => named(
                vec![
                    "metadata.value", "metadata.value.a", "metadata.value.0", "metadata.value.a.b",
                    "metadata.value.0.a", "metadata.value.a.0", "metadata.value.b",
                ],
                cond(depth),
            ),
        ]
        .boxed(),
        Ctx::Entry => prop_oneof![
            1 => named(vec!["key"], key_cond()),
            2 => named(vec!["value", "value.a", "value.0", "value.a.b", "value.1"], cond(depth)),
        ]
        .boxed(),
        Ctx::Free => named(vec!["a", "b", "0", "a.b", "a.0", "0.a", "1"], cond(depth)),
    }
}

fn query_of(depth: u32, ctx: Ctx) -> BoxedStrategy<Value> {
    prop::collection::vec(field(depth, ctx), 0..3)
        .prop_map(|fields| Value::Object(fields.into_iter().collect()))
        .boxed()
}

fn query(depth: u32, ctx: Ctx) -> BoxedStrategy<Value> {
    if depth == 0 {
        return query_of(0, ctx);
    }
    prop_oneof![
        3 => query_of(depth, ctx),
        1 => (
            select(vec!["$and", "$or", "$nor"]),
            prop::collection::vec(query(depth - 1, ctx), 1..3),
            query_of(depth - 1, ctx),
        )
            .prop_map(|(op, subs, q)| merge(q, obj(op, Value::Array(subs)))),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn matches_agrees_with_a_naive_evaluator(
        q in query(2, Ctx::Root),
        endpoints in prop::collection::vec((select(vec!["v1", "v2"]), metadata()), 1..6),
    ) {
        let filter = Filter::parse(&q)
            .map_err(|e| TestCaseError::fail(format!("{q} was rejected: {e} ({})", e.rule)))?;
        for (app, md) in &endpoints {
            let doc = document(app, md);
            let expected = eval_query(q.as_object().expect("a query"), &doc);
            prop_assert_eq!(filter.matches(app, md), expected, "query {} on {}", q, doc);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// A filter with a closed set of metadata keys answers the same on the metadata
    /// restricted to those keys (what the back-fill relies on to parse less).
    #[test]
    fn restricted_metadata_gives_the_same_answer(
        q in query(2, Ctx::Root),
        endpoints in prop::collection::vec((select(vec!["v1", "v2"]), metadata()), 1..6),
    ) {
        let filter = Filter::parse(&q)
            .map_err(|e| TestCaseError::fail(format!("{q} was rejected: {e} ({})", e.rule)))?;
        if let Some(keys) = filter.metadata_keys() {
            for (app, md) in &endpoints {
                let restricted: Map<String, Value> = md
                    .iter()
                    .filter(|(k, _)| keys.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(
                    filter.matches(app, &restricted),
                    filter.matches(app, md),
                    "query {} keys {:?} on {:?}", q, keys, md
                );
            }
        }
    }
}

/// Deeper values, with arrays of documents and arrays of arrays, for path traversal.
fn deep_value() -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(4, 32, 3, |inner| {
            prop_oneof![
                2 => prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                2 => object_of(inner.boxed()),
            ]
        })
        .boxed()
}

fn path_cond() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        lit(),
        any::<bool>().prop_map(|b| json!({"$exists": b})),
        (0u64..3).prop_map(|n| json!({"$size": n})),
        Just(json!({"$type": "array"})),
        scalar().prop_map(|v| json!({"$gte": v})),
        lit().prop_map(|v| json!({"$elemMatch": {"a": v}})),
        lit().prop_map(|v| json!({"$not": {"$eq": v}})),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn dotted_paths_agree_with_a_naive_evaluator(
        value in deep_value(),
        path in prop::collection::vec(select(vec!["a", "b", "0", "1"]), 1..5),
        c in path_cond(),
    ) {
        let path = path.join(".");
        let md: Map<String, Value> = [("x".to_owned(), value)].into_iter().collect();
        let doc = document("v1", &md);
        for q in [
            obj(&format!("metadata.value.{path}"), c.clone()),
            json!({"metadata": {"$elemMatch": {"key": "x", format!("value.{path}"): c.clone()}}}),
        ] {
            let filter = Filter::parse(&q)
                .map_err(|e| TestCaseError::fail(format!("{q} was rejected: {e}")))?;
            let expected = eval_query(q.as_object().expect("a query"), &doc);
            prop_assert_eq!(filter.matches("v1", &md), expected, "query {} on {}", q, doc);
        }
    }
}

// ----- the index of an application's filters -----

/// A condition on one metadata value of the shapes `FilterSet` indexes (equality, numeric
/// comparisons and ranges, `$in`, `$exists`), with some it does not (`null`, string order).
fn atom_cond() -> BoxedStrategy<Value> {
    let op = |ops: Vec<&'static str>| (select(ops), scalar()).prop_map(|(op, v)| obj(op, v));
    prop_oneof![
        3 => scalar(),
        3 => op(vec!["$eq", "$gt", "$gte", "$lt", "$lte"]),
        2 => (op(vec!["$gt", "$gte"]), op(vec!["$lt", "$lte"])).prop_map(|(a, b)| merge(a, b)),
        1 => (op(vec!["$gt", "$gte", "$lt"]), op(vec!["$gte", "$lt", "$lte"]))
            .prop_map(|(a, b)| merge(a, b)),
        2 => prop::collection::vec(scalar(), 0..4).prop_map(|v| json!({"$in": v})),
        1 => Just(json!({"$exists": true})),
    ]
    .boxed()
}

/// A filter of Kaa's usual shape: `$elemMatch` on a key and its value (or the key alone),
/// conditions on the application version, under `$and`; sometimes with a part the index
/// cannot take, which it then evaluates.
fn indexed_query() -> BoxedStrategy<Value> {
    let keys = vec!["a", "b", "city", "k.x", "zz"];
    let part = prop_oneof![
        6 => (select(keys.clone()), atom_cond())
            .prop_map(|(k, c)| json!({"metadata": {"$elemMatch": {"key": k, "value": c}}})),
        1 => select(keys).prop_map(|k| json!({"metadata": {"$elemMatch": {"key": k}}})),
        1 => prop_oneof![
            select(vec!["v1", "v2"]).prop_map(Value::from),
            prop::collection::vec(select(vec!["v1", "v2", "v3"]), 0..3)
                .prop_map(|v| json!({"$in": v})),
            Just(json!({"$exists": true})),
        ]
        .prop_map(|c| json!({"application_version": c})),
        1 => query(1, Ctx::Root),
    ];
    prop::collection::vec(part, 0..4)
        .prop_map(|parts| match parts.len() {
            0 => json!({}),
            1 => parts.into_iter().next().expect("one part"),
            _ => json!({"$and": parts}),
        })
        .boxed()
}

/// Metadata of scalars (and the odd object), the values the index answers without
/// evaluating.
fn scalar_metadata() -> BoxedStrategy<Map<String, Value>> {
    let value = prop_oneof![6 => scalar(), 1 => object_of(scalar())];
    prop::collection::btree_map(select(vec!["a", "b", "city", "k.x"]), value, 0..4)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// `FilterSet::matches` gives each filter's own answer, in order.
    #[test]
    fn filter_set_agrees_with_each_filter(
        qs in prop::collection::vec(
            prop_oneof![4 => indexed_query(), 1 => query(2, Ctx::Root)], 1..10),
        endpoints in prop::collection::vec(
            (select(vec!["v1", "v2"]), prop_oneof![4 => scalar_metadata(), 1 => metadata()]),
            1..6),
    ) {
        let filters = qs
            .iter()
            .map(|q| Filter::parse(q).map(std::sync::Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TestCaseError::fail(format!("{qs:?} was rejected: {e} ({})", e.rule)))?;
        let set = super::FilterSet::new(filters.clone());
        for (app, md) in &endpoints {
            let each: Vec<bool> = filters.iter().map(|f| f.matches(app, md)).collect();
            prop_assert_eq!(set.matches(app, md), each, "queries {:?} on {} {:?}", qs, app, md);
        }
    }
}
