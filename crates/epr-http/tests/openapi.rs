//! Checks the OpenAPI document (`openapi.json`) against the router's route lists.

use epr_http::{API_PREFIXES, API_ROUTES, DEVICE_ROUTES, OPENAPI, OPS_ROUTES};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON")
}

fn paths(doc: &Value) -> &serde_json::Map<String, Value> {
    doc["paths"].as_object().expect("`paths` is an object")
}

/// Every operation as ((METHOD, path), operation object).
fn operations(doc: &Value) -> Vec<((String, String), &Value)> {
    let mut out = Vec::new();
    for (path, item) in paths(doc) {
        let item = item.as_object().expect("a path item is an object");
        for (key, op) in item {
            if METHODS.contains(&key.as_str()) {
                out.push(((key.to_uppercase(), path.clone()), op));
            }
        }
    }
    out
}

fn route_set(routes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    routes
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

#[test]
fn is_openapi_3_0_3() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["info"]["title"].is_string());
    assert!(doc["info"]["version"].is_string());
}

#[test]
fn paths_match_the_routes_exactly() {
    let doc = doc();
    let documented: BTreeSet<_> = operations(&doc).into_iter().map(|(k, _)| k).collect();
    let mut expected = route_set(API_ROUTES);
    expected.extend(route_set(OPS_ROUTES));
    expected.extend(route_set(DEVICE_ROUTES));
    assert_eq!(
        expected.len(),
        API_ROUTES.len() + OPS_ROUTES.len() + DEVICE_ROUTES.len(),
        "API, ops and device routes overlap"
    );
    let missing: Vec<_> = expected.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "undocumented routes: {missing:?}; documented but not routed: {extra:?}"
    );
}

#[test]
fn ops_and_device_routes_override_servers_to_root() {
    let doc = doc();
    let ops: BTreeSet<&str> = OPS_ROUTES
        .iter()
        .chain(DEVICE_ROUTES)
        .map(|(_, p)| *p)
        .collect();
    for (path, item) in paths(&doc) {
        let servers = item.get("servers");
        if ops.contains(path.as_str()) {
            let urls: Vec<_> = servers
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("{path} has no servers override"))
                .iter()
                .map(|s| s["url"].as_str().unwrap_or_default())
                .collect();
            assert_eq!(urls, ["/"], "{path} must be served at the root only");
        } else {
            assert!(
                servers.is_none(),
                "API path {path} must use the top-level servers"
            );
        }
    }
}

#[test]
fn servers_are_the_api_prefixes() {
    let doc = doc();
    let urls: Vec<&str> = doc["servers"]
        .as_array()
        .expect("top-level `servers` is an array")
        .iter()
        .map(|s| s["url"].as_str().expect("a server has a url"))
        .collect();
    assert_eq!(urls, API_PREFIXES);
}

fn collect_refs<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "$ref" {
                    let target = child
                        .as_str()
                        .unwrap_or_else(|| panic!("$ref at {at} is not a string"));
                    out.push((at.clone(), target));
                } else {
                    collect_refs(child, format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_refs(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_ref_resolves_into_components() {
    let doc = doc();
    let mut refs = Vec::new();
    collect_refs(&doc, String::new(), &mut refs);
    assert!(!refs.is_empty(), "the document uses no $ref at all");
    for (at, target) in refs {
        assert!(
            target.starts_with("#/components/"),
            "$ref at {at} points outside #/components: {target}"
        );
        assert!(
            doc.pointer(&target[1..]).is_some(),
            "$ref at {at} does not resolve: {target}"
        );
    }
}

#[test]
fn operation_ids_are_present_and_unique() {
    let doc = doc();
    let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (route, op) in operations(&doc) {
        let id = op["operationId"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| panic!("{route:?} has no operationId"));
        if let Some(prev) = seen.insert(id.to_owned(), route.clone()) {
            panic!("operationId {id} is used by both {prev:?} and {route:?}");
        }
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{route:?} documents no responses"
        );
    }
}

/// Resolves a local `$ref` (one level) so parameters can be inspected.
fn deref<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(&r[1..]).expect("$ref resolves"),
        None => v,
    }
}

#[test]
fn path_parameters_match_the_templates() {
    let doc = doc();
    for (path, item) in paths(&doc) {
        let template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        let path_level: Vec<&Value> = item
            .get("parameters")
            .and_then(Value::as_array)
            .map(|ps| ps.iter().map(|p| deref(&doc, p)).collect())
            .unwrap_or_default();
        for (method, op) in item.as_object().unwrap() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let mut declared = BTreeSet::new();
            let op_level = op
                .get("parameters")
                .and_then(Value::as_array)
                .map(|ps| ps.iter().map(|p| deref(&doc, p)).collect::<Vec<_>>())
                .unwrap_or_default();
            for p in path_level.iter().chain(op_level.iter()) {
                if p["in"] == "path" {
                    assert_eq!(
                        p["required"], true,
                        "{method} {path}: path params are required"
                    );
                    declared.insert(p["name"].as_str().expect("a parameter has a name"));
                }
            }
            assert_eq!(declared, template, "{method} {path}: path parameters");
        }
    }
}

/// The declared query parameters of each operation, path- and operation-level.
fn query_params(doc: &Value, item: &Value, op: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for list in [item.get("parameters"), op.get("parameters")] {
        for p in list.and_then(Value::as_array).into_iter().flatten() {
            let p = deref(doc, p);
            if p["in"] == "query" {
                out.insert(p["name"].as_str().expect("a name").to_owned());
            }
        }
    }
    out
}

#[test]
fn query_parameters_are_exactly_those_the_server_accepts() {
    // The server refuses any other query parameter (`strict::QUERY_PARAMS`), so the
    // document must declare exactly these, operation by operation.
    let doc = doc();
    for (path, item) in paths(&doc) {
        for (method, op) in item.as_object().unwrap() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let m = axum::http::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let accepted: BTreeSet<String> = epr_http::strict::allowed_params(&m, path)
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            assert_eq!(
                query_params(&doc, item, op),
                accepted,
                "{method} {path}: documented vs accepted query parameters"
            );
        }
    }
}

#[test]
fn every_response_documents_the_request_id_and_400() {
    let doc = doc();
    for ((method, path), op) in operations(&doc) {
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.contains_key("400"),
            "{method} {path}: undeclared query parameters are 400"
        );
        for (code, r) in responses {
            let r = deref(&doc, r);
            assert!(
                r["headers"]["X-Request-Id"].is_object(),
                "{method} {path} {code}: X-Request-Id response header"
            );
        }
    }
}

#[test]
fn json_patch_operations_require_their_members() {
    let doc = doc();
    let s = &doc["components"]["schemas"];
    let required = |name: &str| -> BTreeSet<String> {
        s[name]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    for (name, ops, members) in [
        (
            "JsonPatchValueOperation",
            vec!["add", "replace", "test"],
            vec!["op", "path", "value"],
        ),
        (
            "JsonPatchRemoveOperation",
            vec!["remove"],
            vec!["op", "path"],
        ),
        (
            "JsonPatchFromOperation",
            vec!["move", "copy"],
            vec!["op", "from", "path"],
        ),
    ] {
        assert_eq!(s[name]["properties"]["op"]["enum"], serde_json::json!(ops));
        assert_eq!(
            required(name),
            members.iter().map(|m| (*m).to_owned()).collect()
        );
    }
}

#[test]
fn api_operations_need_a_bearer_token_and_ops_routes_do_not() {
    let doc = doc();
    let scheme = &doc["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(scheme["bearerFormat"], "JWT");
    let api = route_set(API_ROUTES);
    for ((method, path), op) in operations(&doc) {
        let route = (method.clone(), path.clone());
        if api.contains(&route) {
            assert_eq!(
                op["security"],
                serde_json::json!([{"bearerAuth": []}]),
                "{route:?}"
            );
            for (status, target) in [
                ("401", "#/components/responses/Unauthorized"),
                ("403", "#/components/responses/Forbidden"),
            ] {
                assert_eq!(op["responses"][status]["$ref"], target, "{route:?}");
            }
            let desc = op["description"].as_str().unwrap_or_default();
            assert!(desc.contains("Scope: `"), "{route:?} names no scope");
        } else {
            assert!(op.get("security").is_none(), "{route:?} is open");
        }
    }
    let challenge = &doc["components"]["responses"]["Unauthorized"]["headers"];
    assert!(challenge.get("WWW-Authenticate").is_some());
}
