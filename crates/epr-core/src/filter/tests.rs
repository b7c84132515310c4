//! Table-driven tests of the criteria language: each operator, the type rules, paths,
//! arrays, and every rejection.

use super::Filter;
use serde_json::{json, Map, Value};

const APP: &str = "c8u2bklah5mkbalggie0-v1";

fn map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("metadata must be an object, got {other}"),
    }
}

fn parse(q: &Value) -> Filter {
    Filter::parse(q).unwrap_or_else(|e| panic!("{q} should parse: {e} ({})", e.rule))
}

/// Rows of (filter, metadata, expected) against the app version [`APP`].
fn table(rows: &[(Value, Value, bool)]) {
    for (q, md, expected) in rows {
        let got = parse(q).matches(APP, &map(md.clone()));
        assert_eq!(got, *expected, "filter {q} on metadata {md}");
    }
}

/// Rows of (condition, value, expected): the condition applied to one metadata value, where
/// `None` means the field is missing. Each row runs twice, through `$elemMatch` on the
/// metadata entry (the key lookup) and through the plain dotted path, which must agree.
fn values(rows: &[(Value, Option<Value>, bool)]) {
    for (cond, value, expected) in rows {
        let stored = match value {
            Some(v) => json!({"x": {"f": v}}),
            None => json!({"x": {}}),
        };
        let md = map(stored);
        let via_elem_match = json!({"metadata": {"$elemMatch": {"key": "x", "value.f": cond}}});
        let via_path = json!({"metadata.value.f": cond});
        for q in [via_elem_match, via_path] {
            let got = parse(&q).matches(APP, &md);
            assert_eq!(got, *expected, "{cond} on {value:?} (as {q})");
        }
    }
}

fn kaa_sample() -> Map<String, Value> {
    map(json!({
        "name": "Smart meter 1", "serial": "CNF-77C-Sk-B1200e-Xt7", "city": "Kyiv",
        "model": "Qubino Smart Meter 3-Phase", "type": "electric", "lat": 50.4504, "lon": 30.5245
    }))
}

#[test]
fn filter_is_a_plain_thread_safe_value() {
    fn check<T: Clone + std::fmt::Debug + Send + Sync + 'static>() {}
    check::<Filter>();
}

#[test]
fn kaa_documented_and_illustrative_examples() {
    let md = kaa_sample();
    let cases = [
        (
            json!({"application_version": "c8u2bklah5mkbalggie0-v1"}),
            true,
        ),
        (
            json!({"application_version": "c8u2bklah5mkbalggie0-v2"}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "value": "Lviv"}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "town", "value": "Kyiv"}}}),
            false,
        ),
        (
            json!({"$and": [{"application_version": "c8u2bklah5mkbalggie0-v1"},
                         {"metadata": {"$elemMatch": {"key": "type", "value": "electric"}}}]}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "lat", "value": {"$gt": 50, "$lt": 51}}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "lat", "value": {"$gt": 51}}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "serial", "value": {"$regex": "^CNF-"}}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "serial", "value": {"$regex": "^cnf-"}}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "serial", "value": {"$regex": "^cnf-", "$options": "i"}}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "value": {"$in": ["Kyiv", "Lviv"]}}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "model", "value": {"$exists": true}}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "color", "value": {"$exists": true}}}}),
            false,
        ),
        (
            json!({"$or": [{"application_version": "a-v1"}, {"application_version": "a-v2"}]}),
            false,
        ),
        (
            json!({"$or": [{"application_version": "a-v1"}, {"application_version": APP}]}),
            true,
        ),
        (json!({}), true),
        (json!({"$comment": "anything goes here"}), true),
    ];
    for (q, expected) in cases {
        assert_eq!(parse(&q).matches(APP, &md), expected, "{q}");
    }
}

#[test]
fn application_version_conditions() {
    let md = map(json!({}));
    let cases = [
        (json!({"application_version": {"$eq": APP}}), true),
        (json!({"application_version": {"$ne": APP}}), false),
        (json!({"application_version": {"$ne": "other"}}), true),
        (json!({"application_version": {"$in": ["x", APP]}}), true),
        (json!({"application_version": {"$nin": ["x", APP]}}), false),
        (json!({"application_version": {"$regex": "-v1$"}}), true),
        (
            json!({"application_version": {"$not": {"$regex": "-v1$"}}}),
            false,
        ),
        (json!({"application_version": {"$gt": "c"}}), true),
        (json!({"application_version": {"$gt": "d"}}), false),
        (json!({"application_version": {"$exists": true}}), true),
        (json!({"application_version": {"$type": "string"}}), true),
        (json!({"application_version": null}), false),
        (json!({"application_version": {"$size": 0}}), false),
    ];
    for (q, expected) in cases {
        assert_eq!(parse(&q).matches(APP, &md), expected, "{q}");
    }
}

#[test]
fn eq_and_implicit_equality() {
    values(&[
        (json!("Kyiv"), Some(json!("Kyiv")), true),
        (json!("Kyiv"), Some(json!("kyiv")), false),
        (json!({"$eq": "Kyiv"}), Some(json!("Kyiv")), true),
        (json!("Kyiv"), None, false),
        // Numbers compare numerically across integer and float.
        (json!(1), Some(json!(1.0)), true),
        (json!(1.0), Some(json!(1)), true),
        (json!({"$eq": 2.5}), Some(json!(2.5)), true),
        (json!(1), Some(json!(1.5)), false),
        (json!(-0.0), Some(json!(0)), true),
        // No cross-type equality.
        (json!(1), Some(json!("1")), false),
        (json!("1"), Some(json!(1)), false),
        (json!(true), Some(json!(1)), false),
        (json!(0), Some(json!(false)), false),
        (json!(false), Some(json!(false)), true),
        // null matches null and missing, nothing else.
        (json!(null), Some(json!(null)), true),
        (json!(null), None, true),
        (json!(null), Some(json!(0)), false),
        (json!(null), Some(json!("")), false),
        (json!({"$eq": null}), None, true),
        // Arrays: an element, or the whole array.
        (json!(2), Some(json!([1, 2, 3])), true),
        (json!(4), Some(json!([1, 2, 3])), false),
        (json!([1, 2]), Some(json!([1, 2])), true),
        (json!([1, 2]), Some(json!([2, 1])), false),
        (json!([1, 2]), Some(json!([[1, 2], 3])), true),
        (json!([1, 2]), Some(json!([1, 2, 3])), false),
        (json!([1.0, 2]), Some(json!([1, 2.0])), true),
        (json!(1), Some(json!([[1]])), false),
        (json!([1]), Some(json!([[1]])), true),
        (json!(null), Some(json!([1, null])), true),
        (json!(null), Some(json!([])), false),
        (json!([]), Some(json!([])), true),
        // Objects: same keys and values, in any order.
        (
            json!({"a": 1, "b": "x"}),
            Some(json!({"b": "x", "a": 1})),
            true,
        ),
        (json!({"a": 1}), Some(json!({"a": 1, "b": 2})), false),
        (json!({"a": 1.0}), Some(json!({"a": 1})), true),
        (
            json!({"a": {"b": [1]}}),
            Some(json!({"a": {"b": [1]}})),
            true,
        ),
        (json!({}), Some(json!({})), true),
        (json!({"a": 1}), Some(json!([{"a": 1}, 2])), true),
    ]);
}

#[test]
fn ne_is_the_negation_of_eq_over_the_whole_path() {
    values(&[
        (json!({"$ne": "Kyiv"}), Some(json!("Lviv")), true),
        (json!({"$ne": "Kyiv"}), Some(json!("Kyiv")), false),
        (json!({"$ne": "Kyiv"}), None, true),
        (json!({"$ne": 1}), Some(json!(1.0)), false),
        (json!({"$ne": 1}), Some(json!("1")), true),
        (json!({"$ne": null}), None, false),
        (json!({"$ne": null}), Some(json!(null)), false),
        (json!({"$ne": null}), Some(json!(0)), true),
        // Any element equal means "equal", so $ne fails.
        (json!({"$ne": 2}), Some(json!([1, 2])), false),
        (json!({"$ne": 3}), Some(json!([1, 2])), true),
        (json!({"$ne": [1, 2]}), Some(json!([1, 2])), false),
    ]);
}

#[test]
fn ordering_operators_stay_within_a_type_bracket() {
    values(&[
        (json!({"$gt": 1}), Some(json!(2)), true),
        (json!({"$gt": 1}), Some(json!(1)), false),
        (json!({"$gte": 1}), Some(json!(1.0)), true),
        (json!({"$lt": 1}), Some(json!(0.5)), true),
        (json!({"$lte": 1.5}), Some(json!(1)), true),
        (json!({"$lt": 1.5}), Some(json!(2)), false),
        (json!({"$gt": 1.5}), Some(json!(1)), false),
        (json!({"$gt": -1}), Some(json!(-0.5)), true),
        // Integers beyond 2^53 compare exactly with each other and with floats.
        (
            json!({"$gt": 9_007_199_254_740_992_i64}),
            Some(json!(9_007_199_254_740_993_i64)),
            true,
        ),
        (
            json!({"$lt": 9_007_199_254_740_992.0}),
            Some(json!(9_007_199_254_740_993_i64)),
            false,
        ),
        (
            json!({"$gt": 9_223_372_036_854_775_807_i64}),
            Some(json!(18_446_744_073_709_551_615_u64)),
            true,
        ),
        (
            json!({"$gt": 1e300}),
            Some(json!(18_446_744_073_709_551_615_u64)),
            false,
        ),
        // Strings by UTF-8 byte order (binary collation).
        (json!({"$gt": "a"}), Some(json!("b")), true),
        (json!({"$lt": "a"}), Some(json!("B")), true),
        (json!({"$gt": "z"}), Some(json!("é")), true),
        (json!({"$gt": "ab"}), Some(json!("abc")), true),
        (json!({"$gte": ""}), Some(json!("")), true),
        // Never across brackets.
        (json!({"$gt": 5}), Some(json!("6")), false),
        (json!({"$lt": "5"}), Some(json!(4)), false),
        (json!({"$gt": 0}), Some(json!(true)), false),
        (json!({"$lt": true}), Some(json!(1)), false),
        (json!({"$gt": 0}), Some(json!(null)), false),
        (json!({"$gt": 0}), None, false),
        (json!({"$lt": 0}), None, false),
        (json!({"$gt": 0}), Some(json!({"a": 1})), false),
        // Booleans: false < true.
        (json!({"$gt": false}), Some(json!(true)), true),
        (json!({"$lt": false}), Some(json!(true)), false),
        // null: $gte/$lte behave as $eq, $gt/$lt match nothing.
        (json!({"$gte": null}), Some(json!(null)), true),
        (json!({"$gte": null}), None, true),
        (json!({"$lte": null}), None, true),
        (json!({"$gte": null}), Some(json!(0)), false),
        (json!({"$gt": null}), Some(json!(null)), false),
        (json!({"$lt": null}), None, false),
        // Arrays: each element, and the array itself against an array operand.
        (json!({"$gt": 2}), Some(json!([1, 3])), true),
        (json!({"$gt": 3}), Some(json!([1, 3])), false),
        (json!({"$gt": 1, "$lt": 2}), Some(json!([0, 3])), true),
        (json!({"$gt": [1, 2]}), Some(json!([1, 3])), true),
        (json!({"$gt": [1, 2]}), Some(json!([1, 2, 0])), true),
        (json!({"$lt": [1, 2]}), Some(json!([1])), true),
        (json!({"$lt": [1, 2]}), Some(json!([1, "a"])), false),
        (json!({"$gt": [1, 2]}), Some(json!([1, "a"])), true),
        (json!({"$gt": []}), Some(json!([])), false),
        (json!({"$gte": []}), Some(json!([])), true),
        // Objects: field by field, in key order: type bracket, then name, then value.
        (json!({"$gt": {"a": 1}}), Some(json!({"a": 2})), true),
        (json!({"$gt": {"a": 1}}), Some(json!({"b": 0})), true),
        (
            json!({"$gt": {"a": 1}}),
            Some(json!({"a": 1, "b": 0})),
            true,
        ),
        (json!({"$lt": {"a": 1}}), Some(json!({"a": "x"})), false),
        (json!({"$gt": {"a": 1}}), Some(json!({"a": "x"})), true),
        (
            json!({"$lte": {"b": 1, "a": 1}}),
            Some(json!({"a": 1, "b": 1})),
            true,
        ),
    ]);
}

#[test]
fn in_and_nin() {
    values(&[
        (json!({"$in": ["Kyiv", "Lviv"]}), Some(json!("Lviv")), true),
        (
            json!({"$in": ["Kyiv", "Lviv"]}),
            Some(json!("Odesa")),
            false,
        ),
        (json!({"$in": [1, "a"]}), Some(json!(1.0)), true),
        (json!({"$in": [1, "a"]}), Some(json!("a")), true),
        (json!({"$in": [1, "a", null]}), Some(json!("1")), false),
        (json!({"$in": ["a", null]}), None, true),
        (json!({"$in": ["a", "b"]}), None, false),
        (json!({"$in": ["x", "b"]}), Some(json!(["a", "b"])), true),
        (json!({"$in": ["1"]}), Some(json!(1)), false),
        (json!({"$in": []}), Some(json!(1)), false),
        (json!({"$in": [2]}), Some(json!([1, 2])), true),
        (json!({"$in": [[1, 2]]}), Some(json!([1, 2])), true),
        (json!({"$in": [{"a": 1}]}), Some(json!({"a": 1})), true),
        (json!({"$in": [null]}), None, true),
        (json!({"$in": [null]}), Some(json!(null)), true),
        (json!({"$in": [1]}), None, false),
        (
            json!({"$in": [{"$regex": "^K"}, 5]}),
            Some(json!("Kyiv")),
            true,
        ),
        (
            json!({"$in": [{"$regex": "^k", "$options": "i"}]}),
            Some(json!("Kyiv")),
            true,
        ),
        (json!({"$in": [{"$regex": "^K"}, 5]}), Some(json!(5)), true),
        (json!({"$in": [{"$regex": "5"}]}), Some(json!(5)), false),
        (
            json!({"$nin": ["Kyiv", "Lviv"]}),
            Some(json!("Odesa")),
            true,
        ),
        (
            json!({"$nin": ["Kyiv", "Lviv"]}),
            Some(json!("Kyiv")),
            false,
        ),
        (json!({"$nin": ["Kyiv"]}), None, true),
        (json!({"$nin": [null]}), None, false),
        (json!({"$nin": [2]}), Some(json!([1, 2])), false),
        (json!({"$nin": []}), None, true),
        (
            json!({"$nin": [{"$regex": "^K"}]}),
            Some(json!("Kyiv")),
            false,
        ),
    ]);
}

#[test]
fn exists() {
    values(&[
        (json!({"$exists": true}), Some(json!(null)), true),
        (json!({"$exists": true}), Some(json!(false)), true),
        (json!({"$exists": true}), Some(json!([])), true),
        (json!({"$exists": true}), None, false),
        (json!({"$exists": false}), None, true),
        (json!({"$exists": false}), Some(json!(0)), false),
        (json!({"$exists": 1}), Some(json!(0)), true),
        (json!({"$exists": 0}), None, true),
    ]);
}

#[test]
fn type_names_numbers_and_json_number_mapping() {
    values(&[
        (json!({"$type": "string"}), Some(json!("x")), true),
        (json!({"$type": 2}), Some(json!("x")), true),
        (json!({"$type": "string"}), Some(json!(1)), false),
        (json!({"$type": "int"}), Some(json!(1)), true),
        (json!({"$type": 16}), Some(json!(-2_147_483_648_i64)), true),
        (
            json!({"$type": "long"}),
            Some(json!(2_147_483_648_i64)),
            true,
        ),
        (
            json!({"$type": "int"}),
            Some(json!(2_147_483_648_i64)),
            false,
        ),
        (json!({"$type": 18}), Some(json!(i64::MIN)), true),
        (json!({"$type": "double"}), Some(json!(1.0)), true),
        (json!({"$type": "double"}), Some(json!(1.5)), true),
        (json!({"$type": "double"}), Some(json!(1)), false),
        (json!({"$type": "double"}), Some(json!(u64::MAX)), true),
        (json!({"$type": "number"}), Some(json!(1)), true),
        (json!({"$type": "number"}), Some(json!(1.5)), true),
        (
            json!({"$type": "number"}),
            Some(json!(5_000_000_000_i64)),
            true,
        ),
        (json!({"$type": "number"}), Some(json!("1")), false),
        (json!({"$type": "bool"}), Some(json!(true)), true),
        (json!({"$type": 8}), Some(json!(0)), false),
        (json!({"$type": "null"}), Some(json!(null)), true),
        (json!({"$type": 10}), None, false),
        (json!({"$type": "object"}), Some(json!({})), true),
        (json!({"$type": 3}), Some(json!([])), false),
        (json!({"$type": "array"}), Some(json!([])), true),
        (json!({"$type": 4}), Some(json!([[1]])), true),
        // An array offers its elements too.
        (json!({"$type": "string"}), Some(json!([1, "a"])), true),
        (json!({"$type": "array"}), Some(json!("a")), false),
        (json!({"$type": ["bool", "string"]}), Some(json!("a")), true),
        (json!({"$type": ["bool", 1]}), Some(json!(3)), false),
        (json!({"$type": 2.0}), Some(json!("a")), true),
        // Valid BSON types JSON cannot hold match nothing.
        (json!({"$type": "date"}), Some(json!("2024-01-01")), false),
        (
            json!({"$type": "objectId"}),
            Some(json!("65a1b2c3d4e5f6a7b8c9d0e1")),
            false,
        ),
        (json!({"$not": {"$type": "date"}}), Some(json!(1)), true),
        (json!({"$type": "minKey"}), None, false),
    ]);
}

#[test]
fn regex_and_options() {
    values(&[
        (json!({"$regex": "yi"}), Some(json!("Kyiv")), true),
        (json!({"$regex": "^yi"}), Some(json!("Kyiv")), false),
        (json!({"$regex": "KYIV"}), Some(json!("Kyiv")), false),
        (
            json!({"$regex": "KYIV", "$options": "i"}),
            Some(json!("Kyiv")),
            true,
        ),
        (json!({"$regex": "(?i)KYIV"}), Some(json!("Kyiv")), true),
        (json!({"$regex": "^b$"}), Some(json!("a\nb")), false),
        (
            json!({"$regex": "^b$", "$options": "m"}),
            Some(json!("a\nb")),
            true,
        ),
        (json!({"$regex": "a.b"}), Some(json!("a\nb")), false),
        (
            json!({"$regex": "a.b", "$options": "s"}),
            Some(json!("a\nb")),
            true,
        ),
        (
            json!({"$regex": "a b # comment", "$options": "x"}),
            Some(json!("ab")),
            true,
        ),
        (json!({"$regex": "a b"}), Some(json!("ab")), false),
        (
            json!({"$regex": "k", "$options": "iu"}),
            Some(json!("K")),
            true,
        ),
        (json!({"$regex": "1"}), Some(json!(1)), false),
        (json!({"$regex": "true"}), Some(json!(true)), false),
        (json!({"$regex": ".*"}), None, false),
        (json!({"$regex": "^b"}), Some(json!(["a", "bc"])), true),
        (json!({"$regex": "^d"}), Some(json!(["a", "bc"])), false),
        (json!({"$regex": "^Ky"}), Some(json!({"a": "Kyiv"})), false),
        (json!({"$not": {"$regex": "^K"}}), Some(json!("Lviv")), true),
        (
            json!({"$not": {"$regex": "^K"}}),
            Some(json!("Kyiv")),
            false,
        ),
        (json!({"$not": {"$regex": "^K"}}), None, true),
        (json!({"$not": {"$regex": "^K"}}), Some(json!(5)), true),
        (json!({"$regex": "é"}), Some(json!("café")), true),
    ]);
}

#[test]
fn not_negates_the_whole_operator_expression() {
    values(&[
        (json!({"$not": {"$gt": 5}}), Some(json!(3)), true),
        (json!({"$not": {"$gt": 5}}), Some(json!(7)), false),
        (json!({"$not": {"$gt": 5}}), Some(json!("7")), true),
        (json!({"$not": {"$gt": 5}}), None, true),
        (json!({"$not": {"$gt": 5}}), Some(json!([1, 7])), false),
        (json!({"$not": {"$gt": 1, "$lt": 5}}), Some(json!(3)), false),
        (json!({"$not": {"$gt": 1, "$lt": 5}}), Some(json!(6)), true),
        (json!({"$not": {"$not": {"$eq": 1}}}), Some(json!(1)), true),
        (json!({"$not": {"$exists": true}}), None, true),
        (json!({"$not": {"$size": 2}}), Some(json!([1])), true),
        (
            json!({"$not": {"$elemMatch": {"$gt": 1}}}),
            Some(json!([0, 1])),
            true,
        ),
    ]);
}

#[test]
fn size_all_mod() {
    values(&[
        (json!({"$size": 2}), Some(json!([1, [2, 3]])), true),
        (json!({"$size": 3}), Some(json!([1, [2, 3]])), false),
        (json!({"$size": 0}), Some(json!([])), true),
        (json!({"$size": 0}), None, false),
        (json!({"$size": 1}), Some(json!("a")), false),
        (json!({"$size": 1}), Some(json!({"a": 1})), false),
        (json!({"$size": 2.0}), Some(json!([1, 2])), true),
        (json!({"$all": [1, 2]}), Some(json!([2, 3, 1])), true),
        (json!({"$all": [1, 4]}), Some(json!([2, 3, 1])), false),
        (json!({"$all": [1]}), Some(json!(1)), true),
        (json!({"$all": [[1, 2]]}), Some(json!([1, 2])), true),
        (json!({"$all": [[1, 2]]}), Some(json!([[1, 2], 3])), true),
        (json!({"$all": []}), Some(json!([])), false),
        (json!({"$all": []}), Some(json!([1])), false),
        (json!({"$all": [null]}), None, true),
        (
            json!({"$all": [{"$regex": "^a"}, "b"]}),
            Some(json!(["ax", "b"])),
            true,
        ),
        (
            json!({"$all": [{"$regex": "^a"}, "b"]}),
            Some(json!(["b"])),
            false,
        ),
        (
            json!({"$all": [{"$elemMatch": {"a": 1}}, {"$elemMatch": {"a": 2}}]}),
            Some(json!([{"a": 1}, {"a": 2}])),
            true,
        ),
        (
            json!({"$all": [{"$elemMatch": {"a": 1}}, {"$elemMatch": {"a": 3}}]}),
            Some(json!([{"a": 1}, {"a": 2}])),
            false,
        ),
        (json!({"$mod": [4, 1]}), Some(json!(9)), true),
        (json!({"$mod": [4, 1]}), Some(json!(10)), false),
        (json!({"$mod": [4, 1]}), Some(json!(9.9)), true),
        (json!({"$mod": [4, -1]}), Some(json!(-9)), true),
        (json!({"$mod": [4.7, 1]}), Some(json!(5)), true),
        (json!({"$mod": [4, 1]}), Some(json!("9")), false),
        (json!({"$mod": [4, 1]}), Some(json!([2, 5])), true),
        (json!({"$mod": [-1, 0]}), Some(json!(i64::MIN)), true),
    ]);
}

#[test]
fn elem_match_on_values() {
    values(&[
        // Operator form: one element must satisfy every operator.
        (
            json!({"$elemMatch": {"$gt": 1, "$lt": 3}}),
            Some(json!([0, 2])),
            true,
        ),
        (
            json!({"$elemMatch": {"$gt": 1, "$lt": 3}}),
            Some(json!([0, 4])),
            false,
        ),
        (json!({"$gt": 1, "$lt": 3}), Some(json!([0, 4])), true),
        (
            json!({"$elemMatch": {"$eq": [1]}}),
            Some(json!([[1], 2])),
            true,
        ),
        (
            json!({"$elemMatch": {"$size": 1}}),
            Some(json!([[1], 2])),
            true,
        ),
        (
            json!({"$elemMatch": {"$elemMatch": {"$eq": 1}}}),
            Some(json!([[1], 2])),
            true,
        ),
        (
            json!({"$elemMatch": {"$elemMatch": {"$eq": 2}}}),
            Some(json!([[1], 2])),
            false,
        ),
        (
            json!({"$elemMatch": {"$ne": 1}}),
            Some(json!([1, 1])),
            false,
        ),
        (json!({"$elemMatch": {"$ne": 1}}), Some(json!([1, 2])), true),
        (
            json!({"$elemMatch": {"$exists": true}}),
            Some(json!([])),
            false,
        ),
        (
            json!({"$elemMatch": {"$type": "string"}}),
            Some(json!([1, "a"])),
            true,
        ),
        (json!({"$elemMatch": {"$gt": 0}}), Some(json!(5)), false),
        (json!({"$elemMatch": {"$gt": 0}}), None, false),
        // Query form: one element document must satisfy the whole query.
        (
            json!({"$elemMatch": {"a": 1, "b": 2}}),
            Some(json!([{"a": 1, "b": 2}])),
            true,
        ),
        (
            json!({"$elemMatch": {"a": 1, "b": 2}}),
            Some(json!([{"a": 1}, {"b": 2}])),
            false,
        ),
        (
            json!({"$elemMatch": {"a": {"$gt": 1}}}),
            Some(json!([{"a": [0, 5]}])),
            true,
        ),
        (
            json!({"$elemMatch": {"a.b": "x"}}),
            Some(json!([{"a": {"b": "x"}}])),
            true,
        ),
        (
            json!({"$elemMatch": {"$or": [{"a": 1}, {"b": 1}]}}),
            Some(json!([{"b": 1}])),
            true,
        ),
        (
            json!({"$elemMatch": {"a": null}}),
            Some(json!([{"b": 1}])),
            true,
        ),
        (
            json!({"$elemMatch": {"a": null}}),
            Some(json!([1, "x"])),
            false,
        ),
        (json!({"$elemMatch": {}}), Some(json!([1, {}])), true),
        (json!({"$elemMatch": {}}), Some(json!([1, 2])), false),
        // Nested arrays are offered as documents with keys "0", "1", ...
        (json!({"$elemMatch": {"0": 1}}), Some(json!([[1, 2]])), true),
        (
            json!({"$elemMatch": {"1": 1}}),
            Some(json!([[1, 2]])),
            false,
        ),
        (json!({"$elemMatch": {}}), Some(json!([[]])), true),
    ]);
}

#[test]
fn elem_match_on_metadata_entries() {
    let md = map(json!({"city": "Kyiv", "floor": 3, "tags": ["a", "b"], "geo": {"lat": 50.4}}));
    table(&[
        (
            json!({"metadata": {"$elemMatch": {"key": "floor", "value": {"$gte": 3}}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "floor", "value": {"$gt": 3}}}}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": {"$eq": "floor"}, "value": 3}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "tags", "value": "b"}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "tags", "value": {"$size": 2}}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "geo", "value.lat": {"$lt": 51}}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "geo", "value": {"lat": 50.4}}}}),
            md.clone().into(),
            true,
        ),
        // Without a key, any entry may match; with a key, only that entry.
        (
            json!({"metadata": {"$elemMatch": {"value": 3}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "value": 3}}}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": {"$in": ["city", "x"]}, "value": "Kyiv"}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": {"$regex": "^fl"}, "value": 3}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city"}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "town"}}}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "$or": [{"value": "Lviv"}, {"value": "Kyiv"}]}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "$and": [{"key": "floor"}]}}}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "value": {"$exists": false}}}}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$not": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$not": {"$elemMatch": {"key": "town", "value": "Kyiv"}}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"$nor": [{"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}}]}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$all": [{"$elemMatch": {"key": "city"}}, {"$elemMatch": {"key": "floor", "value": 3}}]}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$all": [{"$elemMatch": {"key": "city"}}, {"$elemMatch": {"key": "floor", "value": 4}}]}}),
            md.clone().into(),
            false,
        ),
        // Operator form on the entries themselves.
        (
            json!({"metadata": {"$elemMatch": {"$eq": {"key": "floor", "value": 3.0}}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"$type": "object"}}}),
            md.clone().into(),
            true,
        ),
        // Entries and the whole array.
        (
            json!({"metadata": {"key": "city", "value": "Kyiv"}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"value": "Kyiv", "key": "city"}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"key": "city"}}),
            md.clone().into(),
            false,
        ),
        (
            json!({"metadata": {"$in": [{"key": "floor", "value": 3}]}}),
            md.clone().into(),
            true,
        ),
        (json!({"metadata": {"$size": 4}}), md.clone().into(), true),
        (json!({"metadata": {"$size": 0}}), json!({}), true),
        (json!({"metadata": {"$type": "array"}}), json!({}), true),
        (json!({"metadata": {"$exists": true}}), json!({}), true),
        (json!({"metadata": {"$elemMatch": {}}}), json!({}), false),
        (
            json!({"metadata": {"$elemMatch": {}}}),
            json!({"a": 1}),
            true,
        ),
        (
            json!({"metadata": {"$gt": {"key": "city", "value": "A"}}}),
            md.clone().into(),
            true,
        ),
        (
            json!({"metadata": {"$gt": {"key": "tags", "value": ["b"]}}}),
            md.clone().into(),
            false,
        ),
    ]);
}

#[test]
fn dotted_paths_into_metadata() {
    let md = map(json!({
        "city": "Kyiv",
        "geo": {"lat": 50.4, "pos": {"floor": 3}},
        "rooms": [{"n": 1, "tags": ["a"]}, {"n": 2, "tags": ["b", "c"]}, 7],
        "grid": [[1, 2], [3, 4]],
        "nested": [[{"n": 9}]],
        "obj": {"0": "zero", "1": "one"},
        "scalar": 5
    }));
    let rows: Vec<(Value, bool)> = vec![
        // metadata.key and metadata.value test any entry.
        (json!({"metadata.key": "city"}), true),
        (json!({"metadata.key": "town"}), false),
        (json!({"metadata.key": {"$all": ["city", "geo"]}}), true),
        (json!({"metadata.value": "Kyiv"}), true),
        (json!({"metadata.value": 7}), true),
        (json!({"metadata.value": 8}), false),
        (json!({"metadata.value": 5}), true),
        // Into nested objects.
        (json!({"metadata.value.lat": 50.4}), true),
        (json!({"metadata.value.pos.floor": {"$gte": 3}}), true),
        (json!({"metadata.value.pos.floor": 4}), false),
        (
            json!({"metadata": {"$elemMatch": {"key": "geo", "value.pos.floor": 3}}}),
            true,
        ),
        // Through arrays of documents; scalars in the array are skipped.
        (json!({"metadata.value.n": 2}), true),
        (json!({"metadata.value.tags": "c"}), true),
        (json!({"metadata.value.tags": ["b", "c"]}), true),
        (
            json!({"metadata": {"$elemMatch": {"key": "rooms", "value.n": {"$gt": 1}}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "rooms", "value.n": {"$gt": 2}}}}),
            false,
        ),
        // Numeric parts index arrays, and name object keys.
        (
            json!({"metadata": {"$elemMatch": {"key": "rooms", "value.1.n": 2}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "rooms", "value.0.n": 2}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "rooms", "value.2": 7}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "rooms", "value.1.tags.0": "b"}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "rooms", "value.3": {"$exists": true}}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "grid", "value.1": [3, 4]}}}),
            true,
        ),
        // An element picked by position is not expanded further.
        (
            json!({"metadata": {"$elemMatch": {"key": "grid", "value.1": 4}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "grid", "value.1.0": 3}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "grid", "value": 1}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "obj", "value.1": "one"}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "obj", "value.01": "one"}}}),
            false,
        ),
        // Arrays nested in arrays are not walked into by a field name.
        (
            json!({"metadata": {"$elemMatch": {"key": "nested", "value.n": 9}}}),
            false,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "nested", "value.0.n": 9}}}),
            true,
        ),
        // Below a scalar there is nothing: null and $exists: false match.
        (
            json!({"metadata": {"$elemMatch": {"key": "scalar", "value.x": null}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "scalar", "value.x": {"$exists": false}}}}),
            true,
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "city", "value.x": {"$exists": true}}}}),
            false,
        ),
    ];
    for (q, expected) in rows {
        assert_eq!(parse(&q).matches(APP, &md), expected, "{q}");
    }
}

#[test]
fn null_and_missing_through_arrays() {
    // mongod: an array element without the field yields "missing" only if it is a document.
    let md = map(json!({
        "scalars": [1, 2], "empty": [], "blank": [{}], "mixed": [5, {"b": 5}],
        "some": [{"c": 1}, {"b": 5}], "all": [{"b": 5}]
    }));
    let b =
        |key: &str, cond: Value| json!({"metadata": {"$elemMatch": {"key": key, "value.b": cond}}});
    let cases = [
        (b("scalars", json!(null)), false),
        (b("scalars", json!({"$exists": false})), true),
        (b("scalars", json!({"$ne": null})), true),
        (b("empty", json!(null)), false),
        (b("blank", json!(null)), true),
        (b("blank", json!({"$in": [null]})), true),
        (b("mixed", json!(null)), false),
        (b("some", json!(null)), true),
        (b("all", json!(null)), false),
        (b("all", json!({"$gte": null})), false),
        (json!({"metadata.value.b": null}), true),
        (json!({"metadata.value.zzz": {"$exists": true}}), false),
    ];
    for (q, expected) in cases {
        assert_eq!(parse(&q).matches(APP, &md), expected, "{q}");
    }
}

#[test]
fn logical_operators_and_implicit_and() {
    let md = map(json!({"city": "Kyiv", "floor": 3}));
    let city = |c: &str| json!({"metadata": {"$elemMatch": {"key": "city", "value": c}}});
    let cases = [
        (
            json!({"$and": [city("Kyiv"), {"application_version": APP}]}),
            true,
        ),
        (
            json!({"$and": [city("Kyiv"), {"application_version": "x"}]}),
            false,
        ),
        (
            json!({"$or": [city("Lviv"), {"application_version": APP}]}),
            true,
        ),
        (
            json!({"$or": [city("Lviv"), {"application_version": "x"}]}),
            false,
        ),
        (
            json!({"$nor": [city("Lviv"), {"application_version": "x"}]}),
            true,
        ),
        (json!({"$nor": [city("Kyiv")]}), false),
        (json!({"$and": [{}]}), true),
        (json!({"$or": [{}]}), true),
        (json!({"$nor": [{}]}), false),
        // Implicit AND of fields and of operators on one field.
        (
            json!({"application_version": APP, "metadata.value": 3}),
            true,
        ),
        (
            json!({"application_version": APP, "metadata.value": 4}),
            false,
        ),
        (json!({"metadata.value": {"$gt": 2, "$lt": 4}}), true),
        (json!({"metadata.value": {"$gt": 3, "$lt": 4}}), false),
        (
            json!({"$or": [city("Lviv")], "application_version": APP}),
            false,
        ),
        (
            json!({"$and": [{"$or": [city("Lviv"), city("Kyiv")]}, {"$nor": [{"metadata.key": "x"}]}]}),
            true,
        ),
    ];
    for (q, expected) in cases {
        assert_eq!(parse(&q).matches(APP, &md), expected, "{q}");
    }
}

#[test]
fn metadata_order_never_changes_a_result() {
    // The same query over the same entries inserted in different orders.
    let q = parse(&json!({"$and": [
        {"metadata.key": {"$all": ["b", "a"]}},
        {"metadata": {"$elemMatch": {"value": {"$gt": 1}}}},
        {"metadata": {"$size": 2}}
    ]}));
    let mut ab = Map::new();
    ab.insert("a".into(), json!(1));
    ab.insert("b".into(), json!(2));
    let mut ba = Map::new();
    ba.insert("b".into(), json!(2));
    ba.insert("a".into(), json!(1));
    assert!(q.matches(APP, &ab));
    assert!(q.matches(APP, &ba));
}

/// (query, field of the error, rule); the message must name `needle`.
fn rejected(rows: &[(Value, &str, &str, &str)]) {
    for (q, field, rule, needle) in rows {
        let e = Filter::parse(q).expect_err(&format!("{q} should be rejected"));
        assert_eq!(
            (e.field.as_str(), e.rule),
            (*field, *rule),
            "{q}: {}",
            e.message
        );
        assert!(
            e.message.contains(needle),
            "{q}: message '{}' lacks '{needle}'",
            e.message
        );
    }
}

#[test]
fn rejects_code_and_field_comparisons() {
    rejected(&[
        (
            json!({"$where": "this.a > this.b"}),
            "mongoQuery.$where",
            "unsupported-operator",
            "$where",
        ),
        (
            json!({"$expr": {"$gt": ["$a", "$b"]}}),
            "mongoQuery.$expr",
            "unsupported-operator",
            "$expr",
        ),
        (
            json!({"$function": {}}),
            "mongoQuery.$function",
            "unsupported-operator",
            "$function",
        ),
        (
            json!({"application_version": {"$where": "x"}}),
            "mongoQuery.application_version.$where",
            "unsupported-operator",
            "$where",
        ),
        (
            json!({"$and": [{}, {"metadata": {"$elemMatch": {"key": "a", "value": {"$where": "x"}}}}]}),
            "mongoQuery.$and[1].metadata.$elemMatch.value.$where",
            "unsupported-operator",
            "$where",
        ),
        (
            json!({"metadata": {"$elemMatch": {"$expr": {"$eq": ["$key", "$value"]}}}}),
            "mongoQuery.metadata.$elemMatch.$expr",
            "unsupported-operator",
            "$expr",
        ),
        (
            json!({"application_version": {"$not": {"$where": "x"}}}),
            "mongoQuery.application_version.$not.$where",
            "unsupported-operator",
            "$where",
        ),
    ]);
}

#[test]
fn rejects_unsupported_and_unknown_operators() {
    rejected(&[
        (
            json!({"$text": {"$search": "x"}}),
            "mongoQuery.$text",
            "unsupported-operator",
            "$text",
        ),
        (
            json!({"$jsonSchema": {}}),
            "mongoQuery.$jsonSchema",
            "unsupported-operator",
            "$jsonSchema",
        ),
        (
            json!({"$sampleRate": 0.5}),
            "mongoQuery.$sampleRate",
            "unsupported-operator",
            "$sampleRate",
        ),
        (
            json!({"$foo": 1}),
            "mongoQuery.$foo",
            "unsupported-operator",
            "$foo",
        ),
        (
            json!({"$gt": 1}),
            "mongoQuery.$gt",
            "unsupported-operator",
            "$gt",
        ),
        (
            json!({"$elemMatch": {}}),
            "mongoQuery.$elemMatch",
            "unsupported-operator",
            "$elemMatch",
        ),
        (
            json!({"metadata.value": {"$near": [1, 2]}}),
            "mongoQuery.metadata.value.$near",
            "unsupported-operator",
            "$near",
        ),
        (
            json!({"metadata.value": {"$geoWithin": {}}}),
            "mongoQuery.metadata.value.$geoWithin",
            "unsupported-operator",
            "$geoWithin",
        ),
        (
            json!({"metadata.value": {"$bitsAllSet": 1}}),
            "mongoQuery.metadata.value.$bitsAllSet",
            "unsupported-operator",
            "$bitsAllSet",
        ),
        (
            json!({"metadata.value": {"$foo": 1}}),
            "mongoQuery.metadata.value.$foo",
            "unsupported-operator",
            "$foo",
        ),
        (
            json!({"metadata.value": {"$and": [{}]}}),
            "mongoQuery.metadata.value.$and",
            "unsupported-operator",
            "$and",
        ),
        (
            json!({"metadata.value": {"$comment": "x"}}),
            "mongoQuery.metadata.value.$comment",
            "unsupported-operator",
            "$comment",
        ),
        (
            json!({"metadata.value": {"$not": {"$and": [{}]}}}),
            "mongoQuery.metadata.value.$not.$and",
            "unsupported-operator",
            "$and",
        ),
        (
            json!({"metadata": {"$elemMatch": {"$foo": 1}}}),
            "mongoQuery.metadata.$elemMatch.$foo",
            "unsupported-operator",
            "$foo",
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "a", "$eq": 1}}}),
            "mongoQuery.metadata.$elemMatch",
            "mixed-operators",
            "$elemMatch",
        ),
    ]);
}

#[test]
fn rejects_fields_outside_the_document_model() {
    rejected(&[
        (
            json!({"name": "x"}),
            "mongoQuery.name",
            "unknown-field",
            "application_version and metadata",
        ),
        (
            json!({"_id": "x"}),
            "mongoQuery._id",
            "unknown-field",
            "_id",
        ),
        (
            json!({"$or": [{"endpointId": "x"}]}),
            "mongoQuery.$or[0].endpointId",
            "unknown-field",
            "endpointId",
        ),
        (
            json!({"metadata.city": "Kyiv"}),
            "mongoQuery.metadata.city",
            "unknown-field",
            "$elemMatch",
        ),
        (
            json!({"application_version.name": "x"}),
            "mongoQuery.application_version.name",
            "unknown-field",
            "string",
        ),
        (
            json!({"metadata.key.x": 1}),
            "mongoQuery.metadata.key.x",
            "unknown-field",
            "string",
        ),
        (
            json!({"metadata": {"$elemMatch": {"name": "x"}}}),
            "mongoQuery.metadata.$elemMatch.name",
            "unknown-field",
            "key and value",
        ),
        (
            json!({"metadata": {"$elemMatch": {"key.a": "x"}}}),
            "mongoQuery.metadata.$elemMatch.key.a",
            "unknown-field",
            "string",
        ),
        (
            json!({"metadata..key": 1}),
            "mongoQuery.metadata..key",
            "invalid-path",
            "metadata..key",
        ),
        (
            json!({"": 1}),
            "mongoQuery.",
            "invalid-path",
            "not a valid field path",
        ),
        (
            json!({"metadata.$": 1}),
            "mongoQuery.metadata.$",
            "invalid-path",
            "metadata.$",
        ),
        (
            json!({"metadata.value.": 1}),
            "mongoQuery.metadata.value.",
            "invalid-path",
            "metadata.value.",
        ),
    ]);
}

#[test]
fn rejects_order_dependent_comparisons_of_the_metadata_array() {
    rejected(&[
        (
            json!({"metadata.0.key": "a"}),
            "mongoQuery.metadata.0.key",
            "order-dependent",
            "position",
        ),
        (
            json!({"metadata.1": {"$exists": true}}),
            "mongoQuery.metadata.1",
            "order-dependent",
            "position",
        ),
        (
            json!({"metadata": []}),
            "mongoQuery.metadata",
            "order-dependent",
            "order",
        ),
        (
            json!({"metadata": {"$eq": [{"key": "a", "value": 1}]}}),
            "mongoQuery.metadata.$eq",
            "order-dependent",
            "order",
        ),
        (
            json!({"metadata": {"$ne": []}}),
            "mongoQuery.metadata.$ne",
            "order-dependent",
            "order",
        ),
        (
            json!({"metadata": {"$in": [{"key": "a", "value": 1}, []]}}),
            "mongoQuery.metadata.$in[1]",
            "order-dependent",
            "order",
        ),
        (
            json!({"metadata": {"$gt": []}}),
            "mongoQuery.metadata.$gt",
            "order-dependent",
            "order",
        ),
        (
            json!({"metadata": {"$all": [[]]}}),
            "mongoQuery.metadata.$all[0]",
            "order-dependent",
            "order",
        ),
        (
            json!({"metadata": {"$not": {"$lte": []}}}),
            "mongoQuery.metadata.$not.$lte",
            "order-dependent",
            "order",
        ),
    ]);
    // The same operands are fine on ordinary arrays inside metadata values.
    for q in [
        json!({"metadata.value": []}),
        json!({"metadata.value.0": 1}),
    ] {
        assert!(Filter::parse(&q).is_ok(), "{q}");
    }
}

#[test]
fn rejects_malformed_operator_objects_and_operands() {
    rejected(&[
        (json!([]), "mongoQuery", "type", "JSON object"),
        (json!("{\"a\": 1}"), "mongoQuery", "type", "JSON object"),
        (
            json!({"metadata.value": {"$gt": 1, "a": 2}}),
            "mongoQuery.metadata.value.a",
            "mixed-operators",
            "'a'",
        ),
        (
            json!({"$and": []}),
            "mongoQuery.$and",
            "invalid-operand",
            "$and",
        ),
        (json!({"$or": {}}), "mongoQuery.$or", "type", "$or"),
        (
            json!({"$nor": [1]}),
            "mongoQuery.$nor[0]",
            "type",
            "JSON object",
        ),
        (
            json!({"metadata.value": {"$in": "x"}}),
            "mongoQuery.metadata.value.$in",
            "type",
            "$in",
        ),
        (
            json!({"metadata.value": {"$nin": 1}}),
            "mongoQuery.metadata.value.$nin",
            "type",
            "$nin",
        ),
        (
            json!({"metadata.value": {"$all": {}}}),
            "mongoQuery.metadata.value.$all",
            "type",
            "$all",
        ),
        (
            json!({"metadata.value": {"$all": [{"$elemMatch": {}}, 1]}}),
            "mongoQuery.metadata.value.$all",
            "invalid-operand",
            "$elemMatch",
        ),
        (
            json!({"metadata.value": {"$size": -1}}),
            "mongoQuery.metadata.value.$size",
            "invalid-operand",
            "$size",
        ),
        (
            json!({"metadata.value": {"$size": 1.5}}),
            "mongoQuery.metadata.value.$size",
            "invalid-operand",
            "$size",
        ),
        (
            json!({"metadata.value": {"$size": "2"}}),
            "mongoQuery.metadata.value.$size",
            "type",
            "$size",
        ),
        (
            json!({"metadata.value": {"$exists": "yes"}}),
            "mongoQuery.metadata.value.$exists",
            "type",
            "$exists",
        ),
        (
            json!({"metadata.value": {"$exists": null}}),
            "mongoQuery.metadata.value.$exists",
            "type",
            "$exists",
        ),
        (
            json!({"metadata.value": {"$not": {}}}),
            "mongoQuery.metadata.value.$not",
            "invalid-operand",
            "$not",
        ),
        (
            json!({"metadata.value": {"$not": 5}}),
            "mongoQuery.metadata.value.$not",
            "type",
            "$not",
        ),
        (
            json!({"metadata.value": {"$not": {"a": 1}}}),
            "mongoQuery.metadata.value.$not.a",
            "mixed-operators",
            "'a'",
        ),
        (
            json!({"metadata.value": {"$elemMatch": []}}),
            "mongoQuery.metadata.value.$elemMatch",
            "type",
            "$elemMatch",
        ),
        (
            json!({"metadata.value": {"$type": "foo"}}),
            "mongoQuery.metadata.value.$type",
            "invalid-operand",
            "foo",
        ),
        (
            json!({"metadata.value": {"$type": 99}}),
            "mongoQuery.metadata.value.$type",
            "invalid-operand",
            "99",
        ),
        (
            json!({"metadata.value": {"$type": 2.5}}),
            "mongoQuery.metadata.value.$type",
            "invalid-operand",
            "2.5",
        ),
        (
            json!({"metadata.value": {"$type": []}}),
            "mongoQuery.metadata.value.$type",
            "invalid-operand",
            "$type",
        ),
        (
            json!({"metadata.value": {"$type": true}}),
            "mongoQuery.metadata.value.$type",
            "type",
            "$type",
        ),
        (
            json!({"metadata.value": {"$mod": [0, 1]}}),
            "mongoQuery.metadata.value.$mod",
            "invalid-operand",
            "$mod",
        ),
        (
            json!({"metadata.value": {"$mod": [1]}}),
            "mongoQuery.metadata.value.$mod",
            "invalid-operand",
            "$mod",
        ),
        (
            json!({"metadata.value": {"$mod": "x"}}),
            "mongoQuery.metadata.value.$mod",
            "type",
            "$mod",
        ),
        (
            json!({"metadata.value": {"$mod": [2, "1"]}}),
            "mongoQuery.metadata.value.$mod",
            "type",
            "$mod",
        ),
        (
            json!({"metadata.value": {"$mod": [1e19, 1]}}),
            "mongoQuery.metadata.value.$mod",
            "invalid-operand",
            "$mod",
        ),
        // Operators hidden in values.
        (
            json!({"metadata.value": {"$eq": {"$regex": "a"}}}),
            "mongoQuery.metadata.value.$eq",
            "invalid-operand",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$ne": {"$regex": "a"}}}),
            "mongoQuery.metadata.value.$ne",
            "invalid-operand",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$gt": {"$regex": "a"}}}),
            "mongoQuery.metadata.value.$gt",
            "invalid-operand",
            "$regex",
        ),
        (
            json!({"metadata": {"$elemMatch": {"key": "a", "value": {"x": {"$gt": 1}}}}}),
            "mongoQuery.metadata.$elemMatch.value",
            "invalid-operand",
            "$gt",
        ),
        (
            json!({"metadata.value": {"$in": [{"$gt": 1}]}}),
            "mongoQuery.metadata.value.$in[0]",
            "invalid-operand",
            "$gt",
        ),
        (
            json!({"metadata.value": {"$all": [[{"$exists": true}]]}}),
            "mongoQuery.metadata.value.$all[0]",
            "invalid-operand",
            "$exists",
        ),
    ]);
}

#[test]
fn rejects_bad_regexes() {
    rejected(&[
        (
            json!({"metadata.value": {"$regex": "("}}),
            "mongoQuery.metadata.value.$regex",
            "invalid-regex",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$regex": "(?<=a)b"}}),
            "mongoQuery.metadata.value.$regex",
            "invalid-regex",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$regex": "(a)\\1"}}),
            "mongoQuery.metadata.value.$regex",
            "invalid-regex",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$regex": 5}}),
            "mongoQuery.metadata.value.$regex",
            "type",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$regex": "a", "$options": 1}}),
            "mongoQuery.metadata.value.$options",
            "type",
            "$options",
        ),
        (
            json!({"metadata.value": {"$regex": "a", "$options": "q"}}),
            "mongoQuery.metadata.value.$options",
            "invalid-operand",
            "'q'",
        ),
        (
            json!({"metadata.value": {"$options": "i"}}),
            "mongoQuery.metadata.value.$options",
            "invalid-operand",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$in": ["a", {"$regex": "["}]}}),
            "mongoQuery.metadata.value.$in[1].$regex",
            "invalid-regex",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$nin": [{"$regex": "a", "$options": "z"}]}}),
            "mongoQuery.metadata.value.$nin[0].$options",
            "invalid-operand",
            "'z'",
        ),
        (
            json!({"metadata.value": {"$all": [{"$regex": ")"}]}}),
            "mongoQuery.metadata.value.$all[0].$regex",
            "invalid-regex",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$not": {"$regex": "*"}}}),
            "mongoQuery.metadata.value.$not.$regex",
            "invalid-regex",
            "$regex",
        ),
        (
            json!({"metadata.value": {"$regex": "\\w{100}"}}),
            "mongoQuery.metadata.value.$regex",
            "invalid-regex",
            "bytes",
        ),
        (
            json!({"metadata.value": {"$regex": "a".repeat(super::MAX_REGEX_LEN + 1)}}),
            "mongoQuery.metadata.value.$regex",
            "invalid-regex",
            "bytes",
        ),
    ]);
}

#[test]
fn rejects_oversized_queries() {
    let mut deep = json!({"application_version": "x"});
    for _ in 0..super::MAX_DEPTH {
        deep = json!({"$and": [deep]});
    }
    let e = Filter::parse(&deep).expect_err("too deep");
    assert_eq!(e.rule, "max-depth", "{}", e.message);
    assert!(
        e.field.starts_with("mongoQuery.$and[0].$and[0]"),
        "{}",
        e.field
    );

    let mut shallow = json!({"application_version": "x"});
    for _ in 0..(super::MAX_DEPTH / 2 - 1) {
        shallow = json!({"$and": [shallow]});
    }
    assert!(Filter::parse(&shallow).is_ok());

    let many: Vec<Value> = (0..super::MAX_OPERATORS).map(|i| json!(i)).collect();
    let e = Filter::parse(&json!({"metadata.value": {"$in": many}})).expect_err("too many");
    assert_eq!(
        (e.rule, e.field.as_str()),
        ("max-operators", "mongoQuery.metadata.value.$in[998]")
    );

    let regexes: Vec<Value> = (0..=super::MAX_REGEXES)
        .map(|i| json!({"$regex": format!("^{i}$")}))
        .collect();
    let e =
        Filter::parse(&json!({"metadata.value": {"$in": regexes}})).expect_err("too many regexes");
    assert_eq!(e.rule, "max-regexes");
    assert_eq!(
        e.field,
        format!(
            "mongoQuery.metadata.value.$in[{}].$regex",
            super::MAX_REGEXES
        )
    );
}

#[test]
fn metadata_keys_are_a_closed_set_only_for_keyed_elem_match() {
    let keys = |q: Value| parse(&q).metadata_keys();
    assert_eq!(keys(json!({"application_version": "a-v1"})), Some(vec![]));
    assert_eq!(
        keys(json!({"$or": [
            {"metadata": {"$elemMatch": {"key": "b", "value": 1}}},
            {"metadata": {"$not": {"$elemMatch": {"key": "a"}}}},
            {"application_version": "x"}
        ]})),
        Some(vec!["a".to_owned(), "b".to_owned()])
    );
    for whole in [
        json!({"metadata": {"$size": 0}}),
        json!({"metadata": {"$exists": true}}),
        json!({"metadata": {"$elemMatch": {"value": 1}}}),
        json!({"metadata.key": "a"}),
        json!({"metadata": {"key": "a", "value": 1}}),
    ] {
        assert_eq!(keys(whole.clone()), None, "{whole}");
    }
}
