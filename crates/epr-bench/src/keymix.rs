//! Issue 13's metadata key mix and its 100 saved filters, shared by the `metalist`,
//! `selfreg`, `mix` and `million` phases.
//!
//! Five keys, derived from the endpoint number alone: `city` (a string, 40 values), `level`
//! (an integer 0–49), `kind` (a string, 7 values), `on` (a boolean) and `fw` (a version
//! string, 13 values). The `million` phase adds five more of mixed types ([`write_md10`]).

use serde_json::{json, Value};
use std::fmt::Write as _;

pub(crate) const KINDS: [&str; 7] = [
    "sensor",
    "gateway",
    "meter",
    "camera",
    "lock",
    "thermostat",
    "tracker",
];

/// splitmix64 of (`i`, `k`), `k` < 8.
fn mix(i: u64, k: u64) -> u64 {
    let mut z = (i << 3 | k).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The city number (0..40) of endpoint `i`.
pub fn city(i: u64) -> u64 {
    mix(i, 0) % 40
}

/// The five values of endpoint `i`.
#[derive(Clone, Copy, Debug)]
pub struct Five {
    pub city: u64,
    pub level: u64,
    pub kind: usize,
    pub on: bool,
    /// `fw` is `"1.<fw>.0"`.
    pub fw: u64,
}

impl Five {
    pub fn of(i: u64) -> Five {
        Five {
            city: city(i),
            level: mix(i, 1) % 50,
            kind: (mix(i, 2) % 7) as usize,
            on: mix(i, 3).is_multiple_of(2),
            fw: mix(i, 4) % 13,
        }
    }

    fn write_keys(&self, buf: &mut String) {
        let _ = write!(
            buf,
            r#""city":"c{}","level":{},"kind":"{}","on":{},"fw":"1.{}.0""#,
            self.city, self.level, KINDS[self.kind], self.on, self.fw
        );
    }
}

/// The metadata of endpoint `i`: the five keys, as a JSON object.
pub fn write_md(buf: &mut String, i: u64) {
    buf.push('{');
    Five::of(i).write_keys(buf);
    buf.push('}');
}

/// The metadata of endpoint `i` of the `million` phase: the five keys plus `serial` (a
/// string), `temp`, `lat`, `lon` (decimals) and `battery` (an integer 0–100).
pub fn write_md10(buf: &mut String, i: u64) {
    buf.push('{');
    Five::of(i).write_keys(buf);
    let (r5, r6, r7) = (mix(i, 5), mix(i, 6), mix(i, 7));
    let temp = r5 % 10_000;
    let (lat, lon) = (4_400 + r6 % 800, 2_200 + r7 % 1_800);
    let _ = write!(
        buf,
        r#","serial":"SN-{i:08}","temp":{}.{},"lat":{}.{:02},"lon":{}.{:02},"battery":{}}}"#,
        temp / 10,
        temp % 10,
        lat / 100,
        lat % 100,
        lon / 100,
        lon % 100,
        (r5 >> 32) % 101
    );
}

fn elem(key: &str, value: Value) -> Value {
    json!({"metadata": {"$elemMatch": {"key": key, "value": value}}})
}

/// Filter `k` (0..100) of the issue's 100 saved filters: five shapes in turn, each new
/// endpoint in about a quarter of them (the test checks 20–30 %):
/// - equality on `on` (50 %), `kind` (14 %), `fw` (8 %) or `city` (2.5 %);
/// - a `level` range of 12–15 values (24–30 %);
/// - `$in` of 10 cities (25 %) or 2 kinds (29 %);
/// - `$and` of two keys: `on` and a `level` range (25 %), or `$in` of 3 kinds and `on`
///   (21 %);
/// - `$and` over all five keys (25 %).
pub fn filter(k: usize) -> Value {
    let j = k / 5;
    let on = j.is_multiple_of(2);
    match k % 5 {
        0 => match j % 4 {
            0 => elem("on", json!((j / 4).is_multiple_of(2))),
            1 => elem("kind", json!(KINDS[j % 7])),
            2 => elem("fw", json!(format!("1.{}.0", j % 13))),
            _ => elem("city", json!(format!("c{}", j % 40))),
        },
        1 => {
            let lo = (k * 7) % 36;
            elem("level", json!({"$gte": lo, "$lt": lo + 12 + j % 4}))
        }
        2 if on => {
            let cities: Vec<String> = (0..10).map(|c| format!("c{}", (j + 4 * c) % 40)).collect();
            elem("city", json!({"$in": cities}))
        }
        2 => elem("kind", json!({"$in": [KINDS[j % 7], KINDS[(j + 3) % 7]]})),
        3 if j % 4 < 2 => json!({"$and": [
            elem("on", json!(on)),
            elem("level", json!({"$lt": 25}))
        ]}),
        3 => json!({"$and": [
            elem("kind", json!({"$in": [KINDS[j % 7], KINDS[(j + 1) % 7], KINDS[(j + 2) % 7]]})),
            elem("on", json!(on))
        ]}),
        _ => {
            let cities: Vec<String> = (0..32).map(|c| format!("c{}", (j + c) % 40)).collect();
            let kinds: Vec<&str> = (0..6).map(|c| KINDS[(j + c) % 7]).collect();
            let fws: Vec<String> = (0..12).map(|c| format!("1.{}.0", (j + c) % 13)).collect();
            json!({"$and": [
                elem("on", json!(on)),
                elem("city", json!({"$in": cities})),
                elem("level", json!({"$gte": 5, "$lt": 45})),
                elem("kind", json!({"$in": kinds})),
                elem("fw", json!({"$in": fws}))
            ]})
        }
    }
}

/// A filter matching about 1 % of the endpoints (`city` = c`c` and `level` < 20), with the
/// bench's own test of it.
pub fn one_percent(c: u64) -> (Value, impl Fn(&Five) -> bool) {
    let c = c % 40;
    let q = json!({"$and": [
        elem("city", json!(format!("c{c}"))),
        elem("level", json!({"$lt": 20}))
    ]});
    (q, move |f: &Five| f.city == c && f.level < 20)
}

/// The parsed filters `0..n` of [`filter`], to count expected matches client-side.
pub fn parsed(n: usize) -> Vec<epr_core::filter::Filter> {
    (0..n)
        .map(|k| epr_core::filter::Filter::parse(&filter(k)).expect("the bench's filters parse"))
        .collect()
}

/// How many of `filters` match endpoint `i` (with metadata from `md`).
pub fn matched(
    filters: &[epr_core::filter::Filter],
    version: &str,
    i: u64,
    md: fn(&mut String, u64),
    buf: &mut String,
) -> usize {
    buf.clear();
    md(buf, i);
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(buf) else {
        return 0;
    };
    filters.iter().filter(|f| f.matches(version, &m)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_mix_has_the_issues_cardinalities() {
        let mut cities = std::collections::BTreeSet::new();
        let mut values: [std::collections::BTreeSet<String>; 5] = Default::default();
        for i in 0..20_000 {
            let mut buf = String::new();
            write_md(&mut buf, i);
            let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
            for (k, key) in ["city", "level", "kind", "on", "fw"].iter().enumerate() {
                values[k].insert(v[key].to_string());
            }
            cities.insert(city(i));
            assert_eq!(v["city"], format!("c{}", city(i)));
        }
        let counts: Vec<usize> = values.iter().map(|s| s.len()).collect();
        assert_eq!(counts, vec![40, 50, 7, 2, 13]);
        let c3 = (0..20_000).filter(|&i| city(i) == 3).count();
        assert!((400..600).contains(&c3), "about 1 in 40 match: {c3}");
    }

    #[test]
    fn ten_keys_extend_the_five() {
        let (mut five, mut ten) = (String::new(), String::new());
        write_md(&mut five, 77);
        write_md10(&mut ten, 77);
        let five: serde_json::Map<String, Value> = serde_json::from_str(&five).unwrap();
        let ten: serde_json::Map<String, Value> = serde_json::from_str(&ten).unwrap();
        assert_eq!(ten.len(), 10);
        assert!(five.iter().all(|(k, v)| ten[k] == *v));
        assert!(ten["temp"].is_f64() && ten["battery"].is_u64() && ten["serial"].is_string());
    }

    /// Issue 13: each new endpoint matches about a quarter of the 100 filters, by the
    /// server's own filter language; every filter matches someone and none matches all.
    #[test]
    fn hundred_filters_match_a_quarter() {
        let filters = parsed(100);
        let n = 10_000u64;
        let (mut buf, mut total) = (String::new(), 0usize);
        let mut per_filter = [0usize; 100];
        for i in 0..n {
            buf.clear();
            write_md(&mut buf, i);
            let m: serde_json::Map<String, Value> = serde_json::from_str(&buf).unwrap();
            for (k, f) in filters.iter().enumerate() {
                if f.matches("mix-v1", &m) {
                    per_filter[k] += 1;
                    total += 1;
                }
            }
            if i < 500 {
                // The five extra keys of the million phase change nothing.
                let mut b = String::new();
                assert_eq!(
                    matched(&filters, "mix-v1", i, write_md10, &mut b),
                    matched(&filters, "mix-v1", i, write_md, &mut b)
                );
            }
        }
        let pct = 100.0 * total as f64 / (n as f64 * 100.0);
        assert!(
            (20.0..=30.0).contains(&pct),
            "{pct:.1} % of the filters per endpoint"
        );
        assert!(
            per_filter.iter().all(|&c| c > 0 && c < n as usize),
            "{per_filter:?}"
        );
    }

    #[test]
    fn one_percent_filter_agrees_with_the_server_language() {
        let (q, test) = one_percent(7);
        let f = epr_core::filter::Filter::parse(&q).unwrap();
        let mut hits = 0;
        for i in 0..20_000 {
            let mut buf = String::new();
            write_md10(&mut buf, i);
            let m: serde_json::Map<String, Value> = serde_json::from_str(&buf).unwrap();
            let want = test(&Five::of(i));
            assert_eq!(f.matches("meta-v1", &m), want);
            hits += want as usize;
        }
        assert!((150..250).contains(&hits), "~1 %: {hits} of 20000");
    }
}
