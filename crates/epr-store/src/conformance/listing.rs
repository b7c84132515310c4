//! Conformance of listings: pages by offset and by cursor agree with the reference
//! semantics ([`EndpointQuery::matches`]) after random registrations, metadata and version
//! changes and removals in two tenants and applications.

use super::{ctx, id, register};
use epr_core::command::{Command, MetadataChange};
use epr_core::endpoint::{Endpoint, Precondition};
use epr_core::ids::{AppName, AppVersionName, EndpointId, TenantId};
use epr_core::metadata::{Limits, Metadata, MetadataKey};
use epr_core::ports::Store;
use epr_core::query::{EndpointQuery, MetadataCondition, PageRequest};
use serde_json::{json, Value};
use std::sync::Arc;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Values that are equal or not in the ways `==` on JSON cares about: 3, 3.0 and "3";
/// 0.0 and -0.0; objects with keys in another order; arrays; null.
fn value(r: u64) -> Value {
    match r % 14 {
        0 => json!(3),
        1 => json!(3.0),
        2 => json!("3"),
        3 => json!(0.0),
        4 => json!(-0.0),
        5 => json!(true),
        6 => json!(false),
        7 => Value::Null,
        8 => json!({"a": 1, "b": [1, 2]}),
        9 => serde_json::from_str(r#"{"b": [1, 2], "a": 1}"#).unwrap(),
        10 => json!([1, "x"]),
        11 => json!("Kyiv"),
        12 => json!("Lviv"),
        _ => json!(r % 50),
    }
}

fn metadata(rng: &mut u64) -> Value {
    let mut m = serde_json::Map::new();
    for k in ["city", "level", "o", "n"] {
        let r = xorshift(rng);
        if !r.is_multiple_of(4) {
            m.insert(k.into(), value(r >> 8));
        }
    }
    Value::Object(m)
}

/// The metadataFilter parameters of the check (each a list of parameters, ANDed).
const QUERIES: &[&[&str]] = &[
    &["city=Kyiv"],
    &["level=3"],
    &[r#"{"level":3}"#],
    &[r#"{"level":3.0}"#],
    &["level=0.0"],
    &[r#"{"level":-0.0}"#],
    &[r#"{"o":{"b":[1,2],"a":1}}"#],
    &[r#"o=[1,"x"]"#],
    &["n=null"],
    &["n"],
    &["!city"],
    &["city!=Kyiv"],
    &["level!=3", "city"],
    &["city=Kyiv", "level=true"],
    &["city=Lviv", "!o", "n!=false"],
];

async fn all_endpoints(s: &dyn Store, t: &TenantId, ids: &[EndpointId]) -> Vec<Endpoint> {
    let q = EndpointQuery {
        endpoint_ids: ids.to_vec(),
        ..Default::default()
    };
    let page = PageRequest {
        offset: 0,
        limit: 100_000,
        after: None,
    };
    s.list(t, &q, page).await.unwrap().items
}

/// Every page of `q`, walked by offset and by cursor with small pages: both give `want`
/// (IDs in listing order) and its number as the total.
async fn check_walks(s: &dyn Store, t: &TenantId, q: &EndpointQuery, want: &[String], what: &str) {
    let limit = 3;
    let mut by_offset = Vec::new();
    loop {
        let page = PageRequest {
            offset: by_offset.len() as u64,
            limit,
            after: None,
        };
        let p = s.list(t, q, page).await.unwrap();
        assert_eq!(p.total, want.len() as u64, "{what}: total by offset");
        let n = p.items.len();
        by_offset.extend(p.items.iter().map(|e| e.id.to_string()));
        assert_eq!(
            p.next.is_some(),
            by_offset.len() < want.len(),
            "{what}: next when more follow"
        );
        if n < limit as usize {
            break;
        }
    }
    assert_eq!(by_offset, want, "{what}: pages by offset");
    let mut by_cursor = Vec::new();
    let mut after = None;
    loop {
        let page = PageRequest {
            offset: 0,
            limit,
            after,
        };
        let p = s.list(t, q, page).await.unwrap();
        assert_eq!(p.total, want.len() as u64, "{what}: total by cursor");
        by_cursor.extend(p.items.iter().map(|e| e.id.to_string()));
        match p.next {
            Some(next) => {
                assert_eq!(
                    p.items.len(),
                    limit as usize,
                    "{what}: a full page before next"
                );
                assert_eq!(Some(next), p.items.last().map(|e| e.incarnation));
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(by_cursor, want, "{what}: pages by cursor");
}

pub(super) async fn listing_agrees_with_reference(s: Arc<dyn Store>) {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let limits = Limits::default();
    let mut ids: Vec<(String, EndpointId)> = Vec::new();
    for round in 0..3 {
        for i in 0..40 {
            let r = xorshift(&mut rng);
            let t = if r.is_multiple_of(5) { "t2" } else { "t1" };
            let version = if r.is_multiple_of(3) {
                "zzz-v1"
            } else {
                "app-v1"
            };
            let name = format!("l{round}-{i}");
            register(&*s, t, &name, version, metadata(&mut rng)).await;
            ids.push((t.to_owned(), id(&name)));
        }
        // Changes of every kind on random endpoints.
        for _ in 0..60 {
            let r = xorshift(&mut rng);
            let (t, ep) = ids[(r % ids.len() as u64) as usize].clone();
            let cmd = match (r >> 8) % 6 {
                0 => Command::UpdateMetadata {
                    id: ep,
                    change: MetadataChange::Replace(
                        Metadata::parse(metadata(&mut rng), "metadata", &limits).unwrap(),
                    ),
                    precondition: Precondition::None,
                },
                1 | 2 => Command::UpdateMetadata {
                    id: ep,
                    change: MetadataChange::PutKey(
                        MetadataKey::parse(
                            ["city", "level", "o", "n"][(r >> 16) as usize % 4],
                            &limits,
                        )
                        .unwrap(),
                        value(r >> 20),
                    ),
                    precondition: Precondition::None,
                },
                3 => Command::UpdateMetadata {
                    id: ep,
                    change: MetadataChange::DeleteKey(
                        MetadataKey::parse(["city", "level"][(r >> 16) as usize % 2], &limits)
                            .unwrap(),
                    ),
                    precondition: Precondition::None,
                },
                4 => Command::SetAppVersion {
                    id: ep,
                    app: AppName::parse("app").unwrap(),
                    app_version: AppVersionName::parse("app-v2").unwrap(),
                    precondition: Precondition::None,
                },
                _ => Command::Unregister {
                    id: ep,
                    precondition: Precondition::None,
                },
            };
            // Some commands are refused (a removed endpoint, another application's
            // version, a key that is not there): that is part of the mix.
            let _ = s.execute(cmd, ctx(&t)).await;
        }
    }
    // The mix must exercise both outcomes (a third or more with matches: many combinations
    // of application and version hold nothing), or the agreement proves little.
    let (mut empty, mut non_empty) = (0, 0);
    for t in ["t1", "t2"] {
        let tenant = TenantId::parse(t).unwrap();
        let mine: Vec<EndpointId> = ids
            .iter()
            .filter(|(x, _)| x == t)
            .map(|(_, e)| e.clone())
            .collect();
        let everything = all_endpoints(&*s, &tenant, &mine).await;
        assert!(everything
            .windows(2)
            .all(|w| w[0].incarnation < w[1].incarnation));
        let apps = [None, Some("app"), Some("zzz")];
        let versions = [None, Some("app-v2")];
        for params in QUERIES {
            let mut metadata = Vec::new();
            for p in *params {
                metadata.extend(MetadataCondition::parse_param(p).unwrap());
            }
            for app in apps {
                for version in versions {
                    let q = EndpointQuery {
                        app: app.map(|a| AppName::parse(a).unwrap()),
                        app_version: version.map(|v| AppVersionName::parse(v).unwrap()),
                        metadata: metadata.clone(),
                        ..Default::default()
                    };
                    let want: Vec<String> = everything
                        .iter()
                        .filter(|e| q.matches(e))
                        .map(|e| e.id.to_string())
                        .collect();
                    if want.is_empty() {
                        empty += 1;
                    } else {
                        non_empty += 1;
                    }
                    let what = format!("{t} {params:?} app {app:?} version {version:?}");
                    check_walks(&*s, &tenant, &q, &want, &what).await;
                    // The same through the endpoint-ID path.
                    let by_ids = EndpointQuery {
                        endpoint_ids: mine.clone(),
                        ..q.clone()
                    };
                    check_walks(&*s, &tenant, &by_ids, &want, &format!("{what} by IDs")).await;
                }
            }
        }
        // Without metadata conditions too.
        let q = EndpointQuery {
            app: Some(AppName::parse("app").unwrap()),
            ..Default::default()
        };
        let want: Vec<String> = everything
            .iter()
            .filter(|e| q.matches(e))
            .map(|e| e.id.to_string())
            .collect();
        check_walks(&*s, &tenant, &q, &want, &format!("{t} app")).await;
    }
    assert!(
        non_empty * 3 >= non_empty + empty && empty > 0,
        "{non_empty} queries with matches, {empty} without"
    );
}
