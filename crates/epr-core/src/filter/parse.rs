//! From a MongoDB query document to the compiled [`Expr`], rejecting everything this
//! document model cannot answer. Errors name the offending element by its path in the
//! query (`mongoQuery.$and[1].metadata.$elemMatch.value.$where`).

use super::eval::{
    ArrayTest, CmpOp, Cond, Expr, InSet, Known, Lit, Part, Path, Test, T_ARRAY, T_BOOL, T_DOUBLE,
    T_INT, T_LONG, T_NULL, T_OBJECT, T_STRING,
};
use super::{MAX_DEPTH, MAX_OPERATORS, MAX_REGEXES, MAX_REGEX_LEN, REGEX_SIZE_LIMIT};
use crate::ValidationError;
use regex::{Regex, RegexBuilder};
use serde_json::{Map, Value};

type Res<T> = Result<T, ValidationError>;

/// Where a query document applies: the endpoint document, one metadata entry (inside
/// `$elemMatch` on `metadata`), or arbitrary JSON (inside `$elemMatch` elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Root,
    Entry,
    Free,
}

/// What a path points at, as far as validation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The metadata array itself: its entries have no defined order.
    Entries,
    Other,
}

fn err(at: &str, rule: &'static str, message: impl Into<String>) -> ValidationError {
    ValidationError::new(at, rule, message)
}

/// Operators that take a query document's place rather than a field's.
fn is_pathless(op: &str) -> bool {
    matches!(
        op,
        "$and"
            | "$or"
            | "$nor"
            | "$comment"
            | "$where"
            | "$expr"
            | "$text"
            | "$jsonSchema"
            | "$sampleRate"
            | "$alwaysTrue"
            | "$alwaysFalse"
    )
}

fn is_field_op(op: &str) -> bool {
    matches!(
        op,
        "$eq"
            | "$ne"
            | "$gt"
            | "$gte"
            | "$lt"
            | "$lte"
            | "$in"
            | "$nin"
            | "$exists"
            | "$type"
            | "$regex"
            | "$options"
            | "$not"
            | "$elemMatch"
            | "$size"
            | "$all"
            | "$mod"
    )
}

fn unsupported(op: &str, at: &str, in_document: bool) -> ValidationError {
    let message = match op {
        "$where" | "$expr" | "$function" | "$accumulator" => format!(
            "{op} is not supported: a filter compares a field with a constant and cannot run \
             code or compare two fields"
        ),
        "$text" | "$search" => format!("{op} (full-text search) is not supported; use $regex"),
        "$near" | "$nearSphere" | "$geoWithin" | "$geoIntersects" | "$within" | "$geometry"
        | "$box" | "$center" | "$centerSphere" | "$polygon" | "$maxDistance" | "$minDistance" => {
            format!("the geospatial operator {op} is not supported")
        }
        "$bitsAllSet" | "$bitsAnySet" | "$bitsAllClear" | "$bitsAnyClear" => {
            format!("the bitwise operator {op} is not supported")
        }
        _ if in_document && is_field_op(op) => format!(
            "{op} is a field operator: put it in a field's condition, e.g. \
             {{\"application_version\": {{\"{op}\": ...}}}}"
        ),
        "$and" | "$or" | "$nor" | "$comment" if !in_document => {
            format!("{op} belongs at the level of a query document, not inside a field's condition")
        }
        "$jsonSchema" | "$sampleRate" | "$alwaysTrue" | "$alwaysFalse" | "$isolated"
        | "$atomic" => format!("{op} is not supported"),
        _ => format!("unknown operator {op}"),
    };
    err(at, "unsupported-operator", message)
}

/// An object of the form `{"$regex": .., "$options": ..}` (MongoDB extended JSON's regex).
fn is_regex_object(v: &Value) -> bool {
    matches!(v, Value::Object(m) if m.contains_key("$regex")
        && m.keys().all(|k| k == "$regex" || k == "$options"))
}

#[derive(Default)]
pub(super) struct Parser {
    operators: usize,
    regexes: usize,
}

impl Parser {
    fn count(&mut self, at: &str) -> Res<()> {
        self.operators += 1;
        if self.operators > MAX_OPERATORS {
            return Err(err(
                at,
                "max-operators",
                format!("a filter may hold at most {MAX_OPERATORS} conditions and operands"),
            ));
        }
        Ok(())
    }

    fn depth(at: &str, depth: usize) -> Res<()> {
        if depth > MAX_DEPTH {
            return Err(err(
                at,
                "max-depth",
                format!("a filter may nest at most {MAX_DEPTH} levels deep"),
            ));
        }
        Ok(())
    }

    /// A query document: fields with conditions, `$and`, `$or`, `$nor`, `$comment`.
    pub(super) fn parse_query(&mut self, q: &Value, at: &str) -> Res<Expr> {
        self.doc(q, Ctx::Root, at, 1)
    }

    fn doc(&mut self, q: &Value, ctx: Ctx, at: &str, depth: usize) -> Res<Expr> {
        Self::depth(at, depth)?;
        let Value::Object(map) = q else {
            return Err(err(at, "type", "a query must be a JSON object"));
        };
        let mut parts = Vec::with_capacity(map.len());
        for (k, v) in map {
            let here = format!("{at}.{k}");
            if k.starts_with('$') {
                let combine: fn(Box<[Expr]>) -> Expr = match k.as_str() {
                    "$and" => Expr::And,
                    "$or" => Expr::Or,
                    "$nor" => Expr::Nor,
                    "$comment" => continue,
                    _ => return Err(unsupported(k, &here, true)),
                };
                self.count(&here)?;
                let Value::Array(items) = v else {
                    return Err(err(
                        &here,
                        "type",
                        format!("{k} needs an array of query documents"),
                    ));
                };
                if items.is_empty() {
                    return Err(err(
                        &here,
                        "invalid-operand",
                        format!("{k} needs at least one query document"),
                    ));
                }
                let subs = items
                    .iter()
                    .enumerate()
                    .map(|(i, it)| self.doc(it, ctx, &format!("{here}[{i}]"), depth + 2))
                    .collect::<Res<Vec<_>>>()?;
                parts.push(combine(subs.into()));
            } else {
                self.count(&here)?;
                let (path, kind) = parse_path(k, ctx, &here)?;
                let cond = self.cond(v, kind, &here, depth + 1)?;
                parts.push(Expr::Field(path, cond));
            }
        }
        Ok(match parts.len() {
            0 => Expr::Const(true),
            1 => parts.pop().expect("one part"),
            _ => Expr::And(parts.into()),
        })
    }

    /// A field's condition: an object of operators, or a value for implicit equality.
    fn cond(&mut self, v: &Value, kind: Kind, at: &str, depth: usize) -> Res<Cond> {
        Self::depth(at, depth)?;
        if let Value::Object(m) = v {
            if m.keys().any(|k| k.starts_with('$')) {
                return self.ops(m, kind, at, depth);
            }
        }
        Self::literal(v, kind, at)?;
        Ok(Cond::Leaf(Test::Cmp(CmpOp::Eq, Lit::of(v))))
    }

    fn ops(&mut self, m: &Map<String, Value>, kind: Kind, at: &str, depth: usize) -> Res<Cond> {
        Self::depth(at, depth)?;
        if let Some(k) = m.keys().find(|k| !k.starts_with('$')) {
            return Err(err(
                &format!("{at}.{k}"),
                "mixed-operators",
                format!(
                    "'{k}' is not an operator: an object of operators cannot also hold plain \
                     fields (to compare with a whole object, use $eq)"
                ),
            ));
        }
        if m.contains_key("$options") && !m.contains_key("$regex") {
            return Err(err(
                &format!("{at}.$options"),
                "invalid-operand",
                "$options needs a $regex in the same object",
            ));
        }
        let mut conds = Vec::with_capacity(m.len());
        for (op, arg) in m {
            let here = format!("{at}.{op}");
            if op == "$options" {
                continue;
            }
            self.count(&here)?;
            let cmp = |c| -> Res<Cond> {
                Self::literal(arg, kind, &here)?;
                Ok(Cond::Leaf(Test::Cmp(c, Lit::of(arg))))
            };
            let cond = match op.as_str() {
                "$eq" => cmp(CmpOp::Eq)?,
                "$ne" => Cond::Not(Box::new(cmp(CmpOp::Eq)?)),
                "$gt" => cmp(CmpOp::Gt)?,
                "$gte" => cmp(CmpOp::Gte)?,
                "$lt" => cmp(CmpOp::Lt)?,
                "$lte" => cmp(CmpOp::Lte)?,
                "$in" => Cond::Leaf(Test::In(Box::new(self.in_set(arg, kind, &here)?))),
                "$nin" => Cond::Not(Box::new(Cond::Leaf(Test::In(Box::new(
                    self.in_set(arg, kind, &here)?,
                ))))),
                "$exists" => {
                    let exists = match arg {
                        Value::Bool(b) => *b,
                        Value::Number(n) => n.as_f64() != Some(0.0),
                        _ => {
                            return Err(err(&here, "type", "$exists needs true or false"));
                        }
                    };
                    let c = Cond::Leaf(Test::Exists);
                    if exists {
                        c
                    } else {
                        Cond::Not(Box::new(c))
                    }
                }
                "$type" => Cond::Leaf(Test::Type(type_mask(arg, &here)?)),
                "$regex" => {
                    let re = self.regex(arg, m.get("$options"), at)?;
                    Cond::Leaf(Test::Regex(Box::new(re)))
                }
                "$not" => match arg {
                    Value::Object(inner) if inner.is_empty() => {
                        return Err(err(
                            &here,
                            "invalid-operand",
                            "$not needs at least one operator",
                        ));
                    }
                    Value::Object(inner) => {
                        Cond::Not(Box::new(self.ops(inner, kind, &here, depth + 1)?))
                    }
                    _ => {
                        return Err(err(
                            &here,
                            "type",
                            "$not needs an object of operators, e.g. {\"$not\": {\"$gt\": 5}}",
                        ));
                    }
                },
                "$elemMatch" => Cond::Array(self.elem_match(arg, kind, &here, depth + 1)?),
                "$size" => Cond::Array(ArrayTest::Size(size(arg, &here)?)),
                "$all" => self.all(arg, kind, &here, depth + 1)?,
                "$mod" => {
                    let (divisor, remainder) = modulo(arg, &here)?;
                    Cond::Leaf(Test::Mod { divisor, remainder })
                }
                _ => return Err(unsupported(op, &here, false)),
            };
            conds.push(cond);
        }
        Ok(if conds.len() == 1 {
            conds.pop().expect("one condition")
        } else {
            Cond::And(conds.into())
        })
    }

    fn elem_match(&mut self, arg: &Value, kind: Kind, at: &str, depth: usize) -> Res<ArrayTest> {
        Self::depth(at, depth)?;
        let Value::Object(m) = arg else {
            return Err(err(at, "type", "$elemMatch needs an object"));
        };
        // MongoDB: operators on the elements ({"$gt": 1}) or a query on element documents
        // ({"key": .., "$or": [..]}); field operators and fields cannot be mixed.
        let field_ops = m
            .keys()
            .filter(|k| k.starts_with('$') && !is_pathless(k))
            .count();
        if field_ops > 0 && field_ops == m.len() {
            let cond = self.ops(m, Kind::Other, at, depth)?;
            return Ok(ArrayTest::ElemMatchValue(Box::new(cond)));
        }
        if field_ops > 0 {
            return Err(err(
                at,
                "mixed-operators",
                "$elemMatch takes either operators on the elements ({\"$gt\": 1}) or a query \
                 on the elements' fields ({\"key\": \"city\"}), not both",
            ));
        }
        let ctx = if kind == Kind::Entries {
            Ctx::Entry
        } else {
            Ctx::Free
        };
        let full = self.doc(arg, ctx, at, depth)?;
        if kind == Kind::Entries {
            if let Some((key, rest)) = split_key_eq(&full) {
                return Ok(ArrayTest::ElemMatchKey {
                    key,
                    rest: Box::new(rest),
                    full: Box::new(full),
                });
            }
        }
        Ok(ArrayTest::ElemMatchDoc(Box::new(full)))
    }

    fn all(&mut self, arg: &Value, kind: Kind, at: &str, depth: usize) -> Res<Cond> {
        let Value::Array(items) = arg else {
            return Err(err(at, "type", "$all needs an array"));
        };
        if items.is_empty() {
            // As in MongoDB, an empty $all matches nothing.
            return Ok(Cond::Const(false));
        }
        let is_em = |v: &Value| matches!(v, Value::Object(m) if m.len() == 1 && m.contains_key("$elemMatch"));
        let ems = items.iter().filter(|v| is_em(v)).count();
        if ems > 0 && ems < items.len() {
            return Err(err(
                at,
                "invalid-operand",
                "$all takes either only {\"$elemMatch\": ..} elements or only values",
            ));
        }
        let mut conds = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let here = format!("{at}[{i}]");
            self.count(&here)?;
            conds.push(if ems > 0 {
                Cond::Array(self.elem_match(
                    &it["$elemMatch"],
                    kind,
                    &format!("{here}.$elemMatch"),
                    depth + 2,
                )?)
            } else if is_regex_object(it) {
                Cond::Leaf(Test::Regex(Box::new(self.regex(
                    &it["$regex"],
                    it.get("$options"),
                    &here,
                )?)))
            } else {
                Self::literal(it, kind, &here)?;
                Cond::Leaf(Test::Cmp(CmpOp::Eq, Lit::of(it)))
            });
        }
        Ok(Cond::And(conds.into()))
    }

    fn in_set(&mut self, arg: &Value, kind: Kind, at: &str) -> Res<InSet> {
        let Value::Array(items) = arg else {
            return Err(err(at, "type", "$in and $nin need an array"));
        };
        let (mut values, mut regexes) = (Vec::new(), Vec::new());
        for (i, it) in items.iter().enumerate() {
            let here = format!("{at}[{i}]");
            self.count(&here)?;
            if is_regex_object(it) {
                regexes.push(self.regex(&it["$regex"], it.get("$options"), &here)?);
            } else {
                Self::literal(it, kind, &here)?;
                values.push(it.clone());
            }
        }
        let strings = values
            .iter()
            .filter_map(|v| v.as_str().map(Box::from))
            .collect();
        values.retain(|v| !v.is_string());
        Ok(InSet {
            has_null: values.iter().any(Value::is_null),
            strings,
            values: values.into(),
            regexes: regexes.into(),
        })
    }

    /// Compiles `$regex` (with `$options`) found in the object at `at`.
    fn regex(&mut self, pattern: &Value, options: Option<&Value>, at: &str) -> Res<Regex> {
        let Value::String(pattern) = pattern else {
            return Err(err(
                &format!("{at}.$regex"),
                "type",
                "$regex needs a string",
            ));
        };
        let options = match options {
            None => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(err(
                    &format!("{at}.$options"),
                    "type",
                    "$options needs a string",
                ));
            }
        };
        self.regexes += 1;
        if self.regexes > MAX_REGEXES {
            return Err(err(
                &format!("{at}.$regex"),
                "max-regexes",
                format!("a filter may hold at most {MAX_REGEXES} regular expressions"),
            ));
        }
        if pattern.len() > MAX_REGEX_LEN {
            return Err(err(
                &format!("{at}.$regex"),
                "invalid-regex",
                format!("$regex patterns may be at most {MAX_REGEX_LEN} bytes long"),
            ));
        }
        let mut b = RegexBuilder::new(pattern);
        for c in options.chars() {
            match c {
                'i' => b.case_insensitive(true),
                'm' => b.multi_line(true),
                's' => b.dot_matches_new_line(true),
                'x' => b.ignore_whitespace(true),
                'u' => &mut b, // Unicode is always on.
                _ => {
                    return Err(err(
                        &format!("{at}.$options"),
                        "invalid-operand",
                        format!("unknown $options flag '{c}' (supported: i, m, s, x, u)"),
                    ));
                }
            };
        }
        b.size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                let reason = match e {
                    regex::Error::CompiledTooBig(_) => {
                        format!("$regex compiles to more than {REGEX_SIZE_LIMIT} bytes")
                    }
                    other => format!("$regex is not a valid regular expression: {other}"),
                };
                err(&format!("{at}.$regex"), "invalid-regex", reason)
            })
    }

    /// Checks a value used as a constant. Keys starting with `$` are refused anywhere in
    /// it: MongoDB would compare them literally, which nearly always means a misplaced
    /// operator (`{"value": {"x": {"$gt": 1}}}`) that would silently match nothing.
    fn literal(v: &Value, kind: Kind, at: &str) -> Res<()> {
        if kind == Kind::Entries && v.is_array() {
            return Err(err(
                at,
                "order-dependent",
                "metadata is an array of {key, value} entries in no defined order; comparing \
                 it with an array depends on that order (use $elemMatch, $all or $size)",
            ));
        }
        if is_regex_object(v) {
            return Err(err(
                at,
                "invalid-operand",
                "a {\"$regex\": ..} value is only allowed as a field's operator or inside \
                 $in, $nin, $all",
            ));
        }
        fn find_dollar(v: &Value) -> Option<&str> {
            match v {
                Value::Object(m) => m.iter().find_map(|(k, v)| {
                    k.starts_with('$')
                        .then_some(k.as_str())
                        .or_else(|| find_dollar(v))
                }),
                Value::Array(a) => a.iter().find_map(find_dollar),
                _ => None,
            }
        }
        if let Some(k) = find_dollar(v) {
            return Err(err(
                at,
                "invalid-operand",
                format!(
                    "'{k}' inside a value: operators cannot be nested inside a value to compare \
                     with, and keys starting with '$' are not supported in values"
                ),
            ));
        }
        Ok(())
    }
}

/// Validates a dotted field name against the document model of the context.
fn parse_path(field: &str, ctx: Ctx, at: &str) -> Res<(Path, Kind)> {
    let mut parts = Vec::new();
    for name in field.split('.') {
        if name.is_empty() || name.starts_with('$') {
            return Err(err(
                at,
                "invalid-path",
                format!(
                    "'{field}' is not a valid field path: parts must be non-empty and must \
                     not start with '$'"
                ),
            ));
        }
        // Like mongod, only canonical numerals ("0", "12", not "01") index arrays.
        let index = (name == "0"
            || (!name.starts_with('0') && name.bytes().all(|b| b.is_ascii_digit())))
        .then(|| name.parse::<usize>().ok())
        .flatten();
        parts.push(Part {
            name: name.into(),
            index,
            known: Known::of(name),
        });
    }
    let names: Vec<&str> = parts.iter().map(|p| &*p.name).collect();
    let unknown = |message: String| Err(err(at, "unknown-field", message));
    let kind = match (ctx, names.as_slice()) {
        (Ctx::Free, _) => Kind::Other,
        (Ctx::Root, ["metadata"]) => Kind::Entries,
        (Ctx::Root, ["application_version"]) | (Ctx::Root, ["metadata", "key"]) => Kind::Other,
        (Ctx::Root, ["metadata", "value", ..]) => Kind::Other,
        (Ctx::Root, ["application_version", ..]) | (Ctx::Root, ["metadata", "key", ..]) => {
            return unknown(format!(
                "'{field}' goes below a string; application_version and the metadata keys \
                 are strings"
            ));
        }
        (Ctx::Root, ["metadata", n, ..])
            if parts[1].index.is_some() || n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            return Err(err(
                at,
                "order-dependent",
                format!(
                    "'{field}' picks a metadata entry by position, but metadata entries have \
                     no defined order; use {{\"metadata\": {{\"$elemMatch\": {{\"key\": .., \
                     \"value\": ..}}}}}}"
                ),
            ));
        }
        (Ctx::Root, ["metadata", k, ..]) => {
            return unknown(format!(
                "'{field}': metadata is an array of {{\"key\", \"value\"}} entries; to test \
                 the metadata key '{k}' use {{\"metadata\": {{\"$elemMatch\": {{\"key\": \
                 \"{k}\", \"value\": ..}}}}}}"
            ));
        }
        (Ctx::Root, _) => {
            return unknown(format!(
                "'{field}' is not a field of the filtered document; its fields are \
                 application_version and metadata"
            ));
        }
        (Ctx::Entry, ["key"]) | (Ctx::Entry, ["value", ..]) => Kind::Other,
        (Ctx::Entry, ["key", ..]) => {
            return unknown(format!(
                "'{field}' goes below a string; a metadata entry's key is a string"
            ));
        }
        (Ctx::Entry, _) => {
            return unknown(format!(
                "'{field}' is not a field of a metadata entry; its fields are key and value"
            ));
        }
    };
    Ok((parts.into(), kind))
}

/// `{"key": "<string>", ..}` at the top of an `$elemMatch` on metadata: the key to look up
/// and the rest of the query.
fn split_key_eq(full: &Expr) -> Option<(Box<str>, Expr)> {
    fn key_eq(x: &Expr) -> Option<&str> {
        match x {
            Expr::Field(path, Cond::Leaf(Test::Cmp(CmpOp::Eq, Lit::Str(s))))
                if path.len() == 1 && &*path[0].name == "key" =>
            {
                Some(s)
            }
            _ => None,
        }
    }
    match full {
        Expr::Field(..) => key_eq(full).map(|k| (k.into(), Expr::Const(true))),
        Expr::And(xs) => {
            let i = xs.iter().position(|x| key_eq(x).is_some())?;
            let key = key_eq(&xs[i])?.into();
            let mut rest: Vec<Expr> = xs.to_vec();
            rest.remove(i);
            let rest = if rest.len() == 1 {
                rest.pop().expect("one part")
            } else {
                Expr::And(rest.into())
            };
            Some((key, rest))
        }
        _ => None,
    }
}

/// BSON type names and numbers; those JSON cannot produce are accepted and match nothing.
fn type_mask(arg: &Value, at: &str) -> Res<u32> {
    const JSON_TYPES: [u32; 8] = [
        T_DOUBLE, T_STRING, T_OBJECT, T_ARRAY, T_BOOL, T_NULL, T_INT, T_LONG,
    ];
    let one = |v: &Value| -> Res<u32> {
        let code: i64 = match v {
            Value::String(s) => match s.as_str() {
                "number" => return Ok((1 << T_DOUBLE) | (1 << T_INT) | (1 << T_LONG)),
                "double" => 1,
                "string" => 2,
                "object" => 3,
                "array" => 4,
                "binData" => 5,
                "undefined" => 6,
                "objectId" => 7,
                "bool" => 8,
                "date" => 9,
                "null" => 10,
                "regex" => 11,
                "dbPointer" => 12,
                "javascript" => 13,
                "symbol" => 14,
                "javascriptWithScope" => 15,
                "int" => 16,
                "timestamp" => 17,
                "long" => 18,
                "decimal" => 19,
                "minKey" => -1,
                "maxKey" => 127,
                _ => {
                    return Err(err(
                        at,
                        "invalid-operand",
                        format!("unknown BSON type name '{s}' in $type"),
                    ));
                }
            },
            Value::Number(n) => match n.as_f64() {
                Some(f)
                    if f.fract() == 0.0
                        && (f == -1.0 || f == 127.0 || (1.0..=19.0).contains(&f)) =>
                {
                    f as i64
                }
                _ => {
                    return Err(err(
                        at,
                        "invalid-operand",
                        format!("{n} is not a BSON type number"),
                    ));
                }
            },
            _ => {
                return Err(err(
                    at,
                    "type",
                    "$type needs a BSON type name or number, or an array of them",
                ));
            }
        };
        Ok(JSON_TYPES
            .iter()
            .find(|&&t| i64::from(t) == code)
            .map_or(0, |&t| 1 << t))
    };
    match arg {
        Value::Array(items) if items.is_empty() => {
            Err(err(at, "invalid-operand", "$type needs at least one type"))
        }
        Value::Array(items) => items.iter().try_fold(0, |mask, v| Ok(mask | one(v)?)),
        v => one(v),
    }
}

fn size(arg: &Value, at: &str) -> Res<usize> {
    let Value::Number(n) = arg else {
        return Err(err(at, "type", "$size needs a non-negative integer"));
    };
    let n = if let Some(u) = n.as_u64() {
        u
    } else {
        match n.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 => f as u64,
            _ => {
                return Err(err(
                    at,
                    "invalid-operand",
                    format!("$size needs a non-negative integer, not {n}"),
                ));
            }
        }
    };
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn modulo(arg: &Value, at: &str) -> Res<(i64, i64)> {
    let Value::Array(items) = arg else {
        return Err(err(at, "type", "$mod needs an array [divisor, remainder]"));
    };
    let [d, r] = items.as_slice() else {
        return Err(err(
            at,
            "invalid-operand",
            "$mod needs exactly two numbers [divisor, remainder]",
        ));
    };
    // Operands are truncated toward zero, as MongoDB does.
    let int = |v: &Value, what: &str| -> Res<i64> {
        match v {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.abs() < 9.2e18).map(|f| f as i64))
                .ok_or_else(|| {
                    err(
                        at,
                        "invalid-operand",
                        format!("the $mod {what} must fit a 64-bit integer"),
                    )
                }),
            _ => Err(err(at, "type", format!("the $mod {what} must be a number"))),
        }
    };
    let (d, r) = (int(d, "divisor")?, int(r, "remainder")?);
    if d == 0 {
        return Err(err(at, "invalid-operand", "the $mod divisor must not be 0"));
    }
    Ok((d, r))
}
