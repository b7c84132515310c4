//! A strict API: unknown query parameters, empty `endpointId`, malformed preconditions,
//! error messages in JSON terms, absolute batch `Location`, batch item indexes, JSON Patch
//! paths in errors, trailing slashes, `GET /applications`, CORS.

use crate::helpers::{assert_error, spawn_app, spawn_with, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const PREFIXES: [&str; 2] = ["/api/v1", "/epr/api/v1"];

/// `(index, endpointId)` of each item of a batch report list.
fn indexed(list: &Value) -> Vec<(u64, &str)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["index"].as_u64().unwrap(),
                i["endpointId"].as_str().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn empty_endpoint_id_is_400_not_every_endpoint() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({})).await;
    app.register("e2", "demo-v1", json!({})).await;
    for q in [
        "endpointId=",
        "endpointId=,",
        "endpointId=e1,",
        "endpointId=e1,,e2",
        "endpointId=e1&endpointId=",
    ] {
        let r = app.get(&format!("/endpoints?{q}")).await;
        assert_error(r, StatusCode::BAD_REQUEST, "endpointId", "required").await;
    }
    // Values are not trimmed: a space is not part of any endpoint ID.
    let r = app.get("/endpoints?endpointId=%20e1").await;
    assert_error(r, StatusCode::BAD_REQUEST, "endpointId", "pattern").await;
    assert_eq!(app.total("endpointId=e1,e2").await, 2);
    assert_eq!(app.total("endpointId=e1&endpointId=e2").await, 2);
    // The same for the other list parameters: an empty `include` is not "everything".
    for path in [
        "/endpoints?include=",
        "/endpoints/e1?include=metadata,",
        "/endpoints/e1/metadata?include=",
    ] {
        let r = app.get(path).await;
        assert_error(r, StatusCode::BAD_REQUEST, "include", "required").await;
    }
}

/// U+0000 cannot be stored as SQL text: refused in every query parameter, on both backends
/// (on PostgreSQL it reached the database and failed with 503).
#[tokio::test]
async fn nul_characters_in_query_parameters_are_400() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"k": 1})).await;
    for (path, field) in [
        ("/endpoints?metadataFilter=k%3D%00", "metadataFilter"),
        ("/endpoints?metadataFilter=%00k", "metadataFilter"),
        (
            "/endpoints/batch/status?appName=demo&taskId=a%00b",
            "taskId",
        ),
        ("/applications/demo/filters?name=a%00", "name"),
    ] {
        let r = app.get(path).await;
        let body = assert_error(r, StatusCode::BAD_REQUEST, field, "pattern").await;
        assert!(
            body["message"].as_str().unwrap().contains("U+0000"),
            "{path}: {body}"
        );
    }
    // Nothing else was affected: the endpoint is still listed.
    assert_eq!(app.total("metadataFilter=k%3D1").await, 1);
}

#[tokio::test]
async fn unknown_query_parameters_are_400_naming_them() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"k": 1})).await;
    let f = app
        .send_json(
            Method::POST,
            "/applications/demo/filters",
            &json!({"name": "f", "mongoQuery": {}}),
        )
        .await;
    assert_eq!(f.status(), StatusCode::CREATED);
    let fid = f.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A typo must not widen a listing.
    let r = app.get("/endpoints?applicatonName=demo").await;
    let body = assert_error(
        r,
        StatusCode::BAD_REQUEST,
        "applicatonName",
        "unknown-parameter",
    )
    .await;
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("applicationName"));
    // Every route: those that take a query and those that take none.
    let routes: Vec<(Method, String)> = vec![
        (Method::GET, "/endpoints".into()),
        (Method::POST, "/endpoints".into()),
        (Method::GET, "/endpoints/e1".into()),
        (Method::DELETE, "/endpoints/e1".into()),
        (Method::GET, "/endpoints/e1/app-version".into()),
        (Method::PUT, "/endpoints/e1/app-version".into()),
        (Method::GET, "/endpoints/e1/metadata".into()),
        (Method::PUT, "/endpoints/e1/metadata".into()),
        (Method::PATCH, "/endpoints/e1/metadata".into()),
        (Method::GET, "/endpoints/e1/metadata/k".into()),
        (Method::PUT, "/endpoints/e1/metadata/k".into()),
        (Method::DELETE, "/endpoints/e1/metadata/k".into()),
        (Method::GET, "/endpoints/e1/metadata-keys".into()),
        (Method::POST, "/endpoints/batch".into()),
        (Method::GET, "/endpoints/batch/status".into()),
        (Method::GET, "/applications".into()),
        (Method::GET, "/applications/demo".into()),
        (Method::GET, "/applications/demo/metadata-keys".into()),
        (Method::GET, "/applications/demo/filters".into()),
        (Method::POST, "/applications/demo/filters".into()),
        (Method::GET, format!("/applications/demo/filters/{fid}")),
        (Method::PATCH, format!("/applications/demo/filters/{fid}")),
        (Method::DELETE, format!("/applications/demo/filters/{fid}")),
    ];
    for (method, path) in routes {
        let r = app
            .api(method.clone(), &format!("{path}?bogus=1"))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["field"], "bogus", "{method} {path}: {body}");
        assert_eq!(body["rule"], "unknown-parameter", "{method} {path}");
    }
    for path in ["/health", "/health/ready", "/metrics", "/openapi.json"] {
        let r = app
            .client
            .get(app.url(&format!("{path}?bogus")))
            .send()
            .await
            .unwrap();
        assert_error(r, StatusCode::BAD_REQUEST, "bogus", "unknown-parameter").await;
    }
    // Nothing was deleted or changed by the refused requests.
    assert_eq!(app.total("applicationName=demo").await, 1);
    let md: Value = app
        .get("/endpoints/e1/metadata")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(md, json!({"k": 1}));
    let r = app.get(&format!("/applications/demo/filters/{fid}?")).await;
    assert_eq!(r.status(), StatusCode::OK);
}

/// Messages that name Rust types instead of JSON ones.
fn assert_json_terms(body: &Value, ctx: &str) {
    let msg = body["message"].as_str().unwrap_or_default();
    for word in [
        "struct",
        "enum",
        "AppVersionRef",
        "BatchEndpoint",
        "PatchOperation",
        "sequence",
        "u64",
        "usize",
        "Option",
        "String",
        " map",
    ] {
        assert!(!msg.contains(word), "{ctx}: message names '{word}': {msg}");
    }
}

#[tokio::test]
async fn type_errors_speak_json_not_rust() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    let cases: Vec<(Method, &str, &str, Value, &str)> = vec![
        (
            Method::POST,
            "/endpoints",
            "application/json",
            json!({"appVersion": 5}),
            "appVersion",
        ),
        (
            Method::POST,
            "/endpoints",
            "application/json",
            json!({"appVersion": {"name": 5}}),
            "appVersion.name",
        ),
        (
            Method::POST,
            "/endpoints",
            "application/json",
            json!({"appVersion": {"name": "demo-v1"}, "endpointId": []}),
            "endpointId",
        ),
        (
            Method::POST,
            "/endpoints/batch",
            "application/json",
            json!({"appVersion": {"name": "demo-v1"}, "endpoints": {}}),
            "endpoints",
        ),
        (
            Method::POST,
            "/endpoints/batch",
            "application/json",
            json!({"appVersion": {"name": "demo-v1"}, "endpoints": [7]}),
            "endpoints[0]",
        ),
        (
            Method::PUT,
            "/endpoints/e1/app-version",
            "application/json",
            json!({"name": {}}),
            "name",
        ),
        (
            Method::PATCH,
            "/endpoints/e1/metadata",
            "application/json-patch+json",
            json!([5]),
            "[0]",
        ),
        (
            Method::PATCH,
            "/endpoints/e1/metadata",
            "application/json-patch+json",
            json!({"op": "add"}),
            "body",
        ),
        (
            Method::POST,
            "/applications/demo/filters",
            "application/json",
            json!({"name": ["x"], "mongoQuery": {}}),
            "name",
        ),
    ];
    for (method, path, ct, body, field) in cases {
        let r = app
            .api(method.clone(), path)
            .header("content-type", ct)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let ctx = format!("{method} {path} {body}");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{ctx}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["field"], field, "{ctx}: {answer}");
        assert_json_terms(&answer, &ctx);
    }
    // Path parameters that are not UTF-8 name the parameter too.
    let r = app.get("/endpoints/%FF").await;
    assert_error(r, StatusCode::BAD_REQUEST, "endpointId", "path-parameter").await;
    let r = app
        .send_json(Method::POST, "/endpoints", &json!({"appVersion": 5}))
        .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["message"],
        "appVersion must be a JSON object, not the number 5"
    );
}

#[tokio::test]
async fn malformed_preconditions_are_400_and_change_nothing() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    for bad in [
        "abc",
        "\"unterminated",
        "W/abc",
        "\"a\" \"b\"",
        ",",
        "\"a\"b\"",
    ] {
        for (method, path, body) in [
            (Method::PUT, "/endpoints/e1/metadata", Some(json!({"b": 2}))),
            (
                Method::PUT,
                "/endpoints/e1/app-version",
                Some(json!({"name": "demo-v2"})),
            ),
            (Method::DELETE, "/endpoints/e1", None),
        ] {
            let mut req = app.api(method.clone(), path).header("if-match", bad);
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            let r = req.send().await.unwrap();
            assert_error(r, StatusCode::BAD_REQUEST, "If-Match", "etag-list").await;
        }
        for path in ["/endpoints/e1", "/endpoints/e1/metadata", "/endpoints"] {
            let r = app
                .api(Method::GET, path)
                .header("if-none-match", bad)
                .send()
                .await
                .unwrap();
            assert_error(r, StatusCode::BAD_REQUEST, "If-None-Match", "etag-list").await;
        }
    }
    let ep: Value = app
        .get("/endpoints/e1?include=metadata")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ep["metadata"], json!({"a": 1}));
    assert_eq!(ep["appVersion"]["name"], "demo-v1");
    // Well-formed tags that do not match are still 412.
    let r = app
        .api(Method::DELETE, "/endpoints/e1")
        .header("if-match", "\"nope\", W/\"weak\", \"a,b\"")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
}

#[tokio::test]
async fn batch_location_is_absolute_and_items_carry_their_index() {
    let app = spawn_app().await;
    let r = app
        .send_json(
            Method::POST,
            "/endpoints/batch",
            &json!({"appVersion": {"name": "demo-v1"}, "endpoints": [
                {"endpointId": "ok-0"},
                {"endpointId": "bad id!"},
                {"endpointId": "ok-2"},
                {"endpointId": "ok-0"}
            ]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let expected_prefix = app.url("/api/v1/endpoints/batch/status?appName=demo&taskId=");
    assert!(location.starts_with(&expected_prefix), "{location}");
    let report: Value = app
        .client
        .get(&location)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let failed = indexed(&report["failed"]);
    assert_eq!(failed, [(1, "bad id!"), (3, "ok-0")], "{report}");
    let created = indexed(&report["created"]);
    assert_eq!(created, [(0, "ok-0"), (2, "ok-2")], "{report}");
}

/// Sends a JSON Patch to the metadata of `e1`.
async fn patch_e1(app: &TestApp, patch: &Value) -> reqwest::Response {
    app.api(Method::PATCH, "/endpoints/e1/metadata")
        .header("content-type", "application/json-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn json_patch_errors_name_the_path() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": {"b": 1}})).await;
    for (patch, index, path) in [
        (
            json!([{"op": "remove", "path": "/missing"}]),
            "[0]",
            "/missing",
        ),
        (
            json!([{"op": "add", "path": "/x", "value": 1}, {"op": "replace", "path": "/a/nope", "value": 2}]),
            "[1]",
            "/a/nope",
        ),
        (
            json!([{"op": "test", "path": "/a/b", "value": 2}]),
            "[0]",
            "/a/b",
        ),
        (
            json!([{"op": "add", "path": "/no/parent", "value": 1}]),
            "[0]",
            "/no/parent",
        ),
        (
            json!([{"op": "move", "from": "/gone", "path": "/y"}]),
            "[0]",
            "/gone",
        ),
    ] {
        let r = patch_e1(&app, &patch).await;
        let body = assert_error(r, StatusCode::BAD_REQUEST, index, "json-patch").await;
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(&format!("'{path}'")), "{patch}: {msg}");
    }
    // The members each operation needs, as the OpenAPI document declares them.
    for (patch, field) in [
        (json!([{"op": "add", "path": "/x"}]), "[0].value"),
        (json!([{"op": "test", "path": "/a"}]), "[0].value"),
        (
            json!([{"op": "remove", "path": "/a"}, {"op": "copy", "path": "/y"}]),
            "[1].from",
        ),
    ] {
        let r = patch_e1(&app, &patch).await;
        let body = assert_error(r, StatusCode::BAD_REQUEST, field, "json-patch").await;
        assert!(
            body["message"].as_str().unwrap().contains("required"),
            "{body}"
        );
    }
    let md: Value = app
        .get("/endpoints/e1/metadata")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(md, json!({"a": {"b": 1}}));
}

#[tokio::test]
async fn collection_routes_serve_a_trailing_slash() {
    let app = spawn_app().await;
    for prefix in PREFIXES {
        let id = format!("ts{}", prefix.len());
        let r = app
            .client
            .post(app.url(&format!("{prefix}/endpoints/")))
            .header("content-type", "application/json")
            .body(json!({"endpointId": id, "appVersion": {"name": "demo-v1"}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{prefix}");
        assert_eq!(
            r.headers()["location"],
            app.url(&format!("{prefix}/endpoints/{id}")).as_str()
        );
        for path in [
            "/endpoints/",
            "/applications/",
            "/applications/demo/filters/",
        ] {
            let r = app
                .client
                .get(app.url(&format!("{prefix}{path}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{prefix}{path}");
            let body: Value = r.json().await.unwrap();
            assert!(body["totalElements"].is_u64(), "{prefix}{path}: {body}");
        }
        let r = app
            .client
            .get(app.url(&format!("{prefix}/endpoints/?endpointId={id}")))
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["totalElements"], 1, "{body}");
        let r = app
            .client
            .post(app.url(&format!("{prefix}/applications/demo/filters/")))
            .header("content-type", "application/json")
            .body(json!({"name": format!("f{}", prefix.len()), "mongoQuery": {}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{prefix}");
    }
}

#[tokio::test]
async fn applications_are_listed_with_their_versions() {
    let app = spawn_app().await;
    for prefix in PREFIXES {
        let r = app
            .client
            .get(app.url(&format!("{prefix}/applications")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body,
            json!({"totalElements": 2, "content": [
                {"name": "demo", "origins": ["environment"], "removedVersions": [],
                 "versions": [{"name": "demo-v1", "origins": ["environment"]},
                              {"name": "demo-v2", "origins": ["environment"]}]},
                {"name": "other", "origins": ["environment"], "removedVersions": [],
                 "versions": [{"name": "other-v1", "origins": ["environment"]}]}
            ]})
        );
    }
    let one: Value = app.get("/applications/other").await.json().await.unwrap();
    assert_eq!(
        one,
        json!({"name": "other", "origins": ["environment"], "removedVersions": [],
               "versions": [{"name": "other-v1", "origins": ["environment"]}]})
    );
    let r = app.get("/applications/nope").await;
    assert_error(r, StatusCode::NOT_FOUND, "applicationName", "exists").await;
    let r = app.get("/applications/Bad%20Name").await;
    assert_error(r, StatusCode::BAD_REQUEST, "applicationName", "pattern").await;
}

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(Method::OPTIONS, app.url("/api/v1/endpoints/e1/metadata"))
        .header("origin", origin)
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "authorization, if-match, content-type, x-request-id",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let app = spawn_app().await;
    let r = preflight(&app, "https://console.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = app
        .api(Method::GET, "/endpoints")
        .header("origin", "https://console.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn cors_answers_configured_origins() {
    let app = spawn_with(|s| {
        s.server.cors.allowed_origins = vec!["https://console.example".into()];
    })
    .await;
    app.register("e1", "demo-v1", json!({})).await;
    let r = preflight(&app, "https://console.example").await;
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://console.example");
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("PUT") && methods.contains("PATCH"),
        "{methods}"
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for header in ["authorization", "if-match", "content-type", "x-request-id"] {
        assert!(allowed.contains(header), "{allowed}");
    }
    // The actual request: the script may read the tag, location and request ID.
    let r = app
        .api(Method::GET, "/endpoints/e1")
        .header("origin", "https://console.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://console.example"
    );
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for header in ["etag", "location", "x-request-id"] {
        assert!(exposed.contains(header), "{exposed}");
    }
    // Another origin gets no permission.
    let r = preflight(&app, "https://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let any = spawn_with(|s| s.server.cors.allowed_origins = vec!["*".into()]).await;
    let r = preflight(&any, "http://localhost:3000").await;
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}
