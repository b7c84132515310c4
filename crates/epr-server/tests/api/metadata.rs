//! Metadata over HTTP: the whole document (GET/PUT/PATCH with JSON Patch and JSON Merge
//! Patch), single keys, key listings, preconditions, limits, and a property test that
//! checks patches against an independent model.

use crate::helpers::{assert_error, spawn_app, spawn_with, TestApp};
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Map, Value};

const JSON: &str = "application/json";
const JSON_PATCH: &str = "application/json-patch+json";
const MERGE_PATCH: &str = "application/merge-patch+json";

/// Percent-encodes a path segment (everything but RFC 3986 unreserved characters).
fn enc(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn md_path(id: &str) -> String {
    format!("/endpoints/{id}/metadata")
}

fn key_path(id: &str, key: &str) -> String {
    format!("/endpoints/{id}/metadata/{}", enc(key))
}

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: &str,
    body: impl Into<String>,
) -> Response {
    app.api(method, path)
        .header("content-type", content_type)
        .body(body.into())
        .send()
        .await
        .unwrap()
}

/// Like `send`, with an `If-Match` header.
async fn send_if_match(
    app: &TestApp,
    method: Method,
    path: &str,
    if_match: &str,
    body: &Value,
) -> Response {
    app.api(method, path)
        .header("content-type", JSON)
        .header("if-match", if_match)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn etag_of(r: &Response) -> String {
    r.headers()
        .get("etag")
        .expect("an ETag header")
        .to_str()
        .unwrap()
        .to_owned()
}

/// The metadata version `n` of a metadata tag `"<hex>-m<n>"`, asserting the format.
fn tag_version(tag: &str) -> u64 {
    let inner = tag
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a strong quoted tag: {tag}"));
    let (hex, n) = inner
        .split_once("-m")
        .unwrap_or_else(|| panic!("not a metadata tag: {tag}"));
    assert!(
        !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{tag}"
    );
    n.parse()
        .unwrap_or_else(|_| panic!("not a metadata tag: {tag}"))
}

/// The metadata document and its tag, asserting 200.
async fn metadata(app: &TestApp, id: &str) -> (Value, String) {
    let r = app.get(&md_path(id)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let tag = etag_of(&r);
    (r.json().await.unwrap(), tag)
}

async fn key_names(app: &TestApp, id: &str) -> Vec<String> {
    let r = app.get(&format!("/endpoints/{id}/metadata-keys")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut keys: Vec<String> = r.json().await.unwrap();
    keys.sort();
    keys
}

// ---------------------------------------------------------------------------------------
// GET /endpoints/{id}/metadata
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn get_metadata_returns_document_with_metadata_etag() {
    let app = spawn_app().await;
    let doc = json!({"level": 3, "room": "234", "nested": {"a": [1, 2]}, "none": null});
    app.register("e1", "demo-v1", doc.clone()).await;
    let (got, tag) = metadata(&app, "e1").await;
    assert_eq!(got, doc);
    assert_eq!(tag_version(&tag), 1);
    // The endpoint has its own tag, different from the metadata tag.
    let r = app.get("/endpoints/e1").await;
    assert_ne!(etag_of(&r), tag);
}

#[tokio::test]
async fn get_metadata_include_returns_only_named_keys() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"k1": 1, "k2": "two", "k3": true}))
        .await;
    let r = app.get(&format!("{}?include=k1,k2", md_path("e1"))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got, json!({"k1": 1, "k2": "two"}));
    // Repeated parameters and unknown keys.
    let r = app
        .get(&format!("{}?include=k3&include=nope", md_path("e1")))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"k3": true}));
}

#[tokio::test]
async fn get_metadata_if_none_match_current_tag_gives_304() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    let (_, tag) = metadata(&app, "e1").await;
    let r = app
        .api(Method::GET, &md_path("e1"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(etag_of(&r), tag);
    assert!(r.bytes().await.unwrap().is_empty());
    // A different tag gets the document.
    let r = app
        .api(Method::GET, &md_path("e1"))
        .header("if-none-match", "\"0-m0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn metadata_reads_of_unknown_endpoint_give_404() {
    let app = spawn_app().await;
    for path in [
        md_path("ghost"),
        key_path("ghost", "a"),
        "/endpoints/ghost/metadata-keys".to_owned(),
    ] {
        assert_error(
            app.get(&path).await,
            StatusCode::NOT_FOUND,
            "endpointId",
            "exists",
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// PUT /endpoints/{id}/metadata
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn put_metadata_replaces_document_and_returns_new_etag() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"old": 1, "keep": 2}))
        .await;
    let (_, tag1) = metadata(&app, "e1").await;
    let doc = json!({"keep": 2, "new": {"deep": [true]}});
    let r = app.send_json(Method::PUT, &md_path("e1"), &doc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let tag2 = etag_of(&r);
    assert_ne!(tag1, tag2);
    assert_eq!(tag_version(&tag2), tag_version(&tag1) + 1);
    let (got, tag) = metadata(&app, "e1").await;
    assert_eq!(got, doc);
    assert_eq!(tag, tag2);
    // Writing the same document again changes nothing, not even the tag.
    let r = app.send_json(Method::PUT, &md_path("e1"), &doc).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(etag_of(&r), tag2);
    // The endpoint shows when its metadata changed.
    let ep: Value = app.get("/endpoints/e1").await.json().await.unwrap();
    assert!(ep["metadataUpdatedDate"].as_str().is_some(), "{ep}");
    // An empty object is a document too.
    let r = app.send_json(Method::PUT, &md_path("e1"), &json!({})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(metadata(&app, "e1").await.0, json!({}));
}

#[tokio::test]
async fn put_metadata_non_object_is_400() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    for body in [json!([1, 2]), json!("text"), json!(3), json!(null)] {
        let r = app.send_json(Method::PUT, &md_path("e1"), &body).await;
        assert_error(r, StatusCode::BAD_REQUEST, "body", "type").await;
    }
    let r = send(&app, Method::PUT, &md_path("e1"), JSON, "{not json").await;
    assert_error(r, StatusCode::BAD_REQUEST, "body", "json").await;
    let r = send(&app, Method::PUT, &md_path("e1"), JSON, "").await;
    assert_error(r, StatusCode::BAD_REQUEST, "body", "required").await;
    let r = send(&app, Method::PUT, &md_path("e1"), "text/plain", "{}").await;
    assert_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Content-Type",
        "media-type",
    )
    .await;
    assert_eq!(metadata(&app, "e1").await.0, json!({"a": 1}));
}

#[tokio::test]
async fn put_metadata_if_match_current_tag_succeeds_stale_tag_is_412() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"v": 0})).await;
    let (_, tag1) = metadata(&app, "e1").await;
    let r = send_if_match(&app, Method::PUT, &md_path("e1"), &tag1, &json!({"v": 1})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let tag2 = etag_of(&r);
    // tag1 is stale now.
    let r = send_if_match(&app, Method::PUT, &md_path("e1"), &tag1, &json!({"v": 2})).await;
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    assert_eq!(metadata(&app, "e1").await, (json!({"v": 1}), tag2.clone()));
    // One of a list matches.
    let list = format!("{tag1}, {tag2}");
    let r = send_if_match(&app, Method::PUT, &md_path("e1"), &list, &json!({"v": 3})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // A weak tag never matches (strong comparison).
    let (_, tag3) = metadata(&app, "e1").await;
    let weak = format!("W/{tag3}");
    let r = send_if_match(&app, Method::PUT, &md_path("e1"), &weak, &json!({"v": 4})).await;
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    assert_eq!(metadata(&app, "e1").await.0, json!({"v": 3}));
}

#[tokio::test]
async fn if_match_star_matches_any_existing_metadata() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({})).await;
    let r = send_if_match(&app, Method::PUT, &md_path("e1"), "*", &json!({"a": 1})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = send_if_match(&app, Method::PATCH, &md_path("e1"), "*", &json!({"b": 2})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(metadata(&app, "e1").await.0, json!({"a": 1, "b": 2}));
    // ...but not a missing endpoint.
    let r = send_if_match(&app, Method::PUT, &md_path("ghost"), "*", &json!({"a": 1})).await;
    assert_error(r, StatusCode::NOT_FOUND, "endpointId", "exists").await;
}

#[tokio::test]
async fn endpoint_etag_is_not_accepted_as_metadata_tag() {
    let app = spawn_app().await;
    let r = app
        .post_endpoint(
            &json!({"endpointId": "e1", "appVersion": {"name": "demo-v1"}, "metadata": {"a": 1}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let endpoint_tag = etag_of(&r);
    assert_eq!(etag_of(&app.get("/endpoints/e1").await), endpoint_tag);
    let (_, md_tag) = metadata(&app, "e1").await;
    assert_ne!(endpoint_tag, md_tag);
    for method in [Method::PUT, Method::PATCH] {
        let r = send_if_match(
            &app,
            method,
            &md_path("e1"),
            &endpoint_tag,
            &json!({"a": 2}),
        )
        .await;
        assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    }
    let r = send_if_match(
        &app,
        Method::PUT,
        &key_path("e1", "a"),
        &endpoint_tag,
        &json!(2),
    )
    .await;
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    let r = app
        .api(Method::DELETE, &key_path("e1", "a"))
        .header("if-match", &endpoint_tag)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    assert_eq!(
        metadata(&app, "e1").await,
        (json!({"a": 1}), md_tag.clone())
    );
    // The metadata tag works on every metadata write.
    let r = send_if_match(&app, Method::PUT, &key_path("e1", "a"), &md_tag, &json!(2)).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let md_tag = etag_of(&r);
    let r = app
        .api(Method::DELETE, &key_path("e1", "a"))
        .header("if-match", &md_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(metadata(&app, "e1").await.0, json!({}));
}

// ---------------------------------------------------------------------------------------
// PATCH with JSON Patch (RFC 6902)
// ---------------------------------------------------------------------------------------

async fn json_patch(app: &TestApp, id: &str, ops: Value) -> Response {
    send(
        app,
        Method::PATCH,
        &md_path(id),
        JSON_PATCH,
        ops.to_string(),
    )
    .await
}

#[tokio::test]
async fn json_patch_applies_all_operation_kinds() {
    let app = spawn_app().await;
    app.register(
        "e1",
        "demo-v1",
        json!({"a": 1, "b": {"x": [1, 2]}, "c": "see", "gone": true}),
    )
    .await;
    let (_, tag1) = metadata(&app, "e1").await;
    let r = json_patch(
        &app,
        "e1",
        json!([
            {"op": "test", "path": "/a", "value": 1},
            {"op": "add", "path": "/new", "value": {"n": null}},
            {"op": "add", "path": "/b/x/-", "value": 3},
            {"op": "replace", "path": "/a", "value": "one"},
            {"op": "remove", "path": "/gone"},
            {"op": "move", "from": "/c", "path": "/moved"},
            {"op": "copy", "from": "/b", "path": "/b2"},
            {"op": "test", "path": "/b2/x/2", "value": 3}
        ]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let tag2 = etag_of(&r);
    assert_eq!(tag_version(&tag2), tag_version(&tag1) + 1);
    let (got, tag) = metadata(&app, "e1").await;
    assert_eq!(
        got,
        json!({"a": "one", "b": {"x": [1, 2, 3]}, "b2": {"x": [1, 2, 3]},
               "moved": "see", "new": {"n": null}})
    );
    assert_eq!(tag, tag2);
    // Keys with '/' and '~' are addressed with JSON Pointer escapes.
    let r = json_patch(
        &app,
        "e1",
        json!([{"op": "add", "path": "/x~1y", "value": 1}, {"op": "add", "path": "/t~0n", "value": 2}]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (got, _) = metadata(&app, "e1").await;
    assert_eq!(got["x/y"], 1);
    assert_eq!(got["t~n"], 2);
    // An empty patch is valid and changes nothing.
    let (_, before) = metadata(&app, "e1").await;
    let r = json_patch(&app, "e1", json!([])).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(etag_of(&r), before);
}

#[tokio::test]
async fn failing_json_patch_test_op_is_400_and_changes_nothing() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1, "b": 2})).await;
    let before = metadata(&app, "e1").await;
    let r = json_patch(
        &app,
        "e1",
        json!([
            {"op": "add", "path": "/c", "value": 3},
            {"op": "remove", "path": "/a"},
            {"op": "test", "path": "/b", "value": 999}
        ]),
    )
    .await;
    let body = assert_error(r, StatusCode::BAD_REQUEST, "[2]", "json-patch").await;
    assert!(body["message"].as_str().unwrap().contains('2'), "{body}");
    assert_eq!(metadata(&app, "e1").await, before, "the patch is atomic");
    // Other failing operations: remove/replace of an absent key, move from an absent key,
    // test of an absent key.
    for op in [
        json!({"op": "remove", "path": "/absent"}),
        json!({"op": "replace", "path": "/absent", "value": 1}),
        json!({"op": "move", "from": "/absent", "path": "/z"}),
        json!({"op": "copy", "from": "/absent", "path": "/z"}),
        json!({"op": "test", "path": "/absent", "value": null}),
        json!({"op": "add", "path": "/absent/deeper", "value": 1}),
    ] {
        let r = json_patch(
            &app,
            "e1",
            json!([{"op": "add", "path": "/c", "value": 3}, op]),
        )
        .await;
        assert_error(r, StatusCode::BAD_REQUEST, "[1]", "json-patch").await;
        assert_eq!(metadata(&app, "e1").await, before, "{op}");
    }
}

#[tokio::test]
async fn json_patch_making_metadata_non_object_is_400() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    let before = metadata(&app, "e1").await;
    for value in [json!([1]), json!("s"), json!(null), json!(5)] {
        let r = json_patch(
            &app,
            "e1",
            json!([{"op": "replace", "path": "", "value": value}]),
        )
        .await;
        assert_error(r, StatusCode::BAD_REQUEST, "metadata", "type").await;
    }
    let r = json_patch(&app, "e1", json!([{"op": "remove", "path": ""}])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(metadata(&app, "e1").await, before);
    // Replacing the root with another object is fine.
    let r = json_patch(
        &app,
        "e1",
        json!([{"op": "replace", "path": "", "value": {"z": 0}}]),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(metadata(&app, "e1").await.0, json!({"z": 0}));
}

#[tokio::test]
async fn malformed_json_patch_document_is_400() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    let before = metadata(&app, "e1").await;
    for doc in [
        json!([{"op": "frobnicate", "path": "/a"}]),
        json!([{"op": "add", "value": 1}]),
        json!([{"op": "add", "path": "/a"}]),
        json!([{"op": "move", "path": "/b"}]),
        json!([{"op": "add", "path": "no-slash", "value": 1}]),
        json!({"op": "add", "path": "/a", "value": 1}),
        json!([1, 2]),
    ] {
        let r = json_patch(&app, "e1", doc.clone()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{doc}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], 400, "{doc}: {body}");
        assert!(body["rule"].as_str().is_some(), "{doc}: {body}");
    }
    let r = json_patch(&app, "e1", json!([{"op": "frobnicate", "path": "/a"}])).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["rule"], "json-patch", "{body}");
    let r = send(&app, Method::PATCH, &md_path("e1"), JSON_PATCH, "[{").await;
    assert_error(r, StatusCode::BAD_REQUEST, "body", "json").await;
    assert_eq!(metadata(&app, "e1").await, before);
}

// ---------------------------------------------------------------------------------------
// PATCH with JSON Merge Patch (RFC 7396) and content negotiation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn merge_patch_deletes_nulls_and_merges_nested_objects() {
    let app = spawn_app().await;
    app.register(
        "e1",
        "demo-v1",
        json!({"a": 1, "b": {"x": 1, "y": {"deep": true, "gone": 0}}, "c": [1, 2], "d": "keep"}),
    )
    .await;
    let patch = json!({
        "a": null,
        "b": {"x": null, "y": {"gone": null, "added": "yes"}, "z": {"n": null, "m": 1}},
        "c": {"now": "object"},
        "absent": null,
        "e": [null, {"inside": null}]
    });
    let r = send(
        &app,
        Method::PATCH,
        &md_path("e1"),
        MERGE_PATCH,
        patch.to_string(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        metadata(&app, "e1").await.0,
        json!({
            "b": {"y": {"deep": true, "added": "yes"}, "z": {"m": 1}},
            "c": {"now": "object"},
            "d": "keep",
            "e": [null, {"inside": null}]
        })
    );
    // A merge patch must be an object.
    let before = metadata(&app, "e1").await;
    for bad in [json!([1]), json!("x"), json!(null)] {
        let r = send(
            &app,
            Method::PATCH,
            &md_path("e1"),
            MERGE_PATCH,
            bad.to_string(),
        )
        .await;
        assert_error(r, StatusCode::BAD_REQUEST, "body", "type").await;
    }
    assert_eq!(metadata(&app, "e1").await, before);
}

#[tokio::test]
async fn patch_with_plain_json_takes_arrays_as_json_patch_and_objects_as_merge_patch() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1, "b": 2})).await;
    let r = send(
        &app,
        Method::PATCH,
        &md_path("e1"),
        JSON,
        json!([{"op": "remove", "path": "/a"}]).to_string(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(metadata(&app, "e1").await.0, json!({"b": 2}));
    let r = send(
        &app,
        Method::PATCH,
        &md_path("e1"),
        "application/json; charset=utf-8",
        json!({"b": null, "c": {"d": 1}}).to_string(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(metadata(&app, "e1").await.0, json!({"c": {"d": 1}}));
    // An object with op/path keys is still a merge patch under application/json.
    let r = send(
        &app,
        Method::PATCH,
        &md_path("e1"),
        JSON,
        json!({"op": "add", "path": "/x"}).to_string(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        metadata(&app, "e1").await.0,
        json!({"c": {"d": 1}, "op": "add", "path": "/x"})
    );
    // A scalar under application/json is neither.
    let r = send(&app, Method::PATCH, &md_path("e1"), JSON, "3").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn patch_with_text_plain_is_415() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    let r = send(
        &app,
        Method::PATCH,
        &md_path("e1"),
        "text/plain",
        r#"{"a":2}"#,
    )
    .await;
    assert_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Content-Type",
        "media-type",
    )
    .await;
    assert_eq!(metadata(&app, "e1").await.0, json!({"a": 1}));
}

// ---------------------------------------------------------------------------------------
// Single keys
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn get_metadata_key_returns_raw_json_value() {
    let app = spawn_app().await;
    app.register(
        "e1",
        "demo-v1",
        json!({"city": "Kyiv", "floor": 3, "pos": {"lat": 50.45, "lon": 30.52}, "on": true, "n": null}),
    )
    .await;
    let (_, md_tag) = metadata(&app, "e1").await;
    for (key, want, raw) in [
        ("city", json!("Kyiv"), r#""Kyiv""#),
        ("floor", json!(3), "3"),
        ("on", json!(true), "true"),
        ("n", json!(null), "null"),
    ] {
        let r = app.get(&key_path("e1", key)).await;
        assert_eq!(r.status(), StatusCode::OK, "{key}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert_eq!(etag_of(&r), md_tag);
        let text = r.text().await.unwrap();
        assert_eq!(text, raw, "{key}");
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), want);
    }
    let r = app.get(&key_path("e1", "pos")).await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"lat": 50.45, "lon": 30.52})
    );
    let r = app
        .api(Method::GET, &key_path("e1", "city"))
        .header("if-none-match", &md_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = app.get(&key_path("e1", "absent")).await;
    assert_error(r, StatusCode::NOT_FOUND, "metadataKey", "exists").await;
}

#[tokio::test]
async fn put_metadata_key_sets_raw_json_value() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"floor": 1})).await;
    let (_, tag1) = metadata(&app, "e1").await;
    let r = send(
        &app,
        Method::PUT,
        &key_path("e1", "city"),
        JSON,
        r#""Kyiv""#,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let tag2 = etag_of(&r);
    assert_eq!(tag_version(&tag2), tag_version(&tag1) + 1);
    let r = send(&app, Method::PUT, &key_path("e1", "floor"), JSON, "3").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = send(
        &app,
        Method::PUT,
        &key_path("e1", "pos"),
        JSON,
        r#"{"lat": 1, "tags": ["a"]}"#,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = send(&app, Method::PUT, &key_path("e1", "nothing"), JSON, "null").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (got, tag) = metadata(&app, "e1").await;
    assert_eq!(
        got,
        json!({"city": "Kyiv", "floor": 3, "pos": {"lat": 1, "tags": ["a"]}, "nothing": null})
    );
    assert_eq!(r.headers().get("etag").unwrap().to_str().unwrap(), tag);
    assert_eq!(
        app.get(&key_path("e1", "city")).await.text().await.unwrap(),
        r#""Kyiv""#
    );
    // Same value again: no change, same tag.
    let r = send(&app, Method::PUT, &key_path("e1", "floor"), JSON, "3").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(etag_of(&r), tag);
    // The body must be JSON.
    let r = send(&app, Method::PUT, &key_path("e1", "city"), JSON, "Kyiv").await;
    assert_error(r, StatusCode::BAD_REQUEST, "body", "json").await;
    let r = send(&app, Method::PUT, &key_path("e1", "city"), JSON, "").await;
    assert_error(r, StatusCode::BAD_REQUEST, "body", "required").await;
    let r = send(
        &app,
        Method::PUT,
        &key_path("e1", "city"),
        "text/plain",
        "\"Lviv\"",
    )
    .await;
    assert_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Content-Type",
        "media-type",
    )
    .await;
    assert_eq!(metadata(&app, "e1").await, (got, tag));
}

#[tokio::test]
async fn delete_metadata_key_then_get_is_404() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1, "b": 2})).await;
    let (_, tag1) = metadata(&app, "e1").await;
    let r = app
        .api(Method::DELETE, &key_path("e1", "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(tag_version(&etag_of(&r)), tag_version(&tag1) + 1);
    let r = app.get(&key_path("e1", "a")).await;
    assert_error(r, StatusCode::NOT_FOUND, "metadataKey", "exists").await;
    assert_eq!(metadata(&app, "e1").await.0, json!({"b": 2}));
}

#[tokio::test]
async fn delete_missing_metadata_key_is_404() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1})).await;
    let before = metadata(&app, "e1").await;
    let r = app
        .api(Method::DELETE, &key_path("e1", "absent"))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "metadataKey", "exists").await;
    assert_eq!(metadata(&app, "e1").await, before);
}

#[tokio::test]
async fn metadata_keys_with_spaces_dots_and_unicode_work_percent_encoded() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({})).await;
    let keys = [
        "room temp",
        "connectivity.ts",
        "місто",
        "温度",
        "100%",
        "a+b=c&d?e#f",
        "x/y",
        "emoji 🚀",
    ];
    for (i, key) in keys.iter().enumerate() {
        let r = send(&app, Method::PUT, &key_path("e1", key), JSON, i.to_string()).await;
        assert_eq!(
            r.status(),
            StatusCode::NO_CONTENT,
            "{key}: {}",
            r.text().await.unwrap()
        );
    }
    let (got, _) = metadata(&app, "e1").await;
    let want: Map<String, Value> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.to_string(), json!(i)))
        .collect();
    assert_eq!(got, Value::Object(want));
    for (i, key) in keys.iter().enumerate() {
        let r = app.get(&key_path("e1", key)).await;
        assert_eq!(r.status(), StatusCode::OK, "{key}");
        assert_eq!(r.json::<Value>().await.unwrap(), json!(i), "{key}");
    }
    let mut listed = key_names(&app, "e1").await;
    let mut want_keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want_keys.sort();
    listed.sort();
    assert_eq!(listed, want_keys);
    for key in keys {
        let r = app
            .api(Method::DELETE, &key_path("e1", key))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{key}");
    }
    assert_eq!(metadata(&app, "e1").await.0, json!({}));
    // ?include with a percent-encoded key.
    app.send_json(
        Method::PUT,
        &md_path("e1"),
        &json!({"room temp": 1, "b": 2}),
    )
    .await;
    let r = app
        .get(&format!("{}?include=room%20temp", md_path("e1")))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"room temp": 1}));
}

#[tokio::test]
async fn metadata_key_with_control_character_is_400() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({})).await;
    let r = send(&app, Method::PUT, &key_path("e1", "a\tb"), JSON, "1").await;
    assert_error(r, StatusCode::BAD_REQUEST, "metadataKey", "pattern").await;
    let r = app
        .send_json(Method::PUT, &md_path("e1"), &json!({"a\nb": 1}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .send_json(Method::PUT, &md_path("e1"), &json!({"": 1}))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(metadata(&app, "e1").await.0, json!({}));
}

// ---------------------------------------------------------------------------------------
// Key listings
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn endpoint_metadata_keys_lists_key_names() {
    let app = spawn_app().await;
    app.register(
        "e1",
        "demo-v1",
        json!({"b": 1, "a": {"nested": 2}, "c": null}),
    )
    .await;
    let r = app.get("/endpoints/e1/metadata-keys").await;
    assert_eq!(r.status(), StatusCode::OK);
    let (_, md_tag) = metadata(&app, "e1").await;
    assert_eq!(etag_of(&r), md_tag);
    let v: Value = r.json().await.unwrap();
    assert!(v.is_array(), "{v}");
    assert_eq!(key_names(&app, "e1").await, ["a", "b", "c"]);
    app.register("e2", "demo-v1", json!({})).await;
    assert!(key_names(&app, "e2").await.is_empty());
}

#[tokio::test]
async fn application_metadata_keys_are_grouped_per_version() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": 1, "b": 2})).await;
    app.register("e2", "demo-v1", json!({"b": 3, "c": 4})).await;
    app.register("e3", "demo-v2", json!({"z": 1})).await;
    app.register("e4", "demo-v2", json!({})).await;
    app.register("o1", "other-v1", json!({"secret": 1, "a": 1}))
        .await;
    let r = app.get("/applications/demo/metadata-keys").await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut got: Value = r.json().await.unwrap();
    for list in got.as_object_mut().unwrap().values_mut() {
        list.as_array_mut()
            .unwrap()
            .sort_by_key(|v| v.as_str().unwrap().to_owned());
    }
    assert_eq!(got, json!({"demo-v1": ["a", "b", "c"], "demo-v2": ["z"]}));
    let r = app.get("/applications/other/metadata-keys").await;
    let got: Value = r.json().await.unwrap();
    assert_eq!(got.as_object().unwrap().len(), 1, "{got}");
    // Under the ingress prefix too.
    let r = app
        .client
        .get(app.url("/epr/api/v1/applications/demo/metadata-keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn application_metadata_keys_of_unknown_or_invalid_application() {
    let app = spawn_app().await;
    let r = app.get("/applications/nope/metadata-keys").await;
    assert_error(r, StatusCode::NOT_FOUND, "applicationName", "exists").await;
    let r = app.get("/applications/Demo/metadata-keys").await;
    assert_error(r, StatusCode::BAD_REQUEST, "applicationName", "pattern").await;
    // A known application without endpoints has no keys.
    let r = app.get("/applications/other/metadata-keys").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn metadata_over_max_bytes_is_413_everywhere_and_changes_nothing() {
    let app = spawn_with(|s| s.limits.metadata_max_bytes = 200).await;
    let big = "x".repeat(250);
    // Registration.
    let r = app
        .post_endpoint(&json!({"endpointId": "big", "appVersion": {"name": "demo-v1"}, "metadata": {"k": big}}))
        .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "metadata", "max-bytes").await;
    assert_error(
        app.get("/endpoints/big").await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    // Exactly at the limit is fine: {"k":"…"} is 8 bytes plus the string.
    let fits = "y".repeat(200 - 8);
    assert_eq!(json!({"k": fits}).to_string().len(), 200);
    app.register("e1", "demo-v1", json!({"k": fits})).await;
    app.register("e2", "demo-v1", json!({"small": 1})).await;
    let before = metadata(&app, "e2").await;
    let r = app
        .send_json(Method::PUT, &md_path("e2"), &json!({"k": big}))
        .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "metadata", "max-bytes").await;
    let r = send(
        &app,
        Method::PATCH,
        &md_path("e2"),
        MERGE_PATCH,
        json!({"k": big}).to_string(),
    )
    .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "metadata", "max-bytes").await;
    let r = json_patch(
        &app,
        "e2",
        json!([{"op": "add", "path": "/k", "value": big}]),
    )
    .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "metadata", "max-bytes").await;
    let r = send(
        &app,
        Method::PUT,
        &key_path("e2", "k"),
        JSON,
        json!(big).to_string(),
    )
    .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "metadata", "max-bytes").await;
    assert_eq!(metadata(&app, "e2").await, before);
    // Growing e1 by one byte is refused too.
    let r = send(
        &app,
        Method::PUT,
        &key_path("e1", "k"),
        JSON,
        format!("\"{fits}z\""),
    )
    .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "metadata", "max-bytes").await;
    assert_eq!(metadata(&app, "e1").await.0, json!({"k": fits}));
}

#[tokio::test]
async fn metadata_key_longer_than_max_length_is_400() {
    let app = spawn_with(|s| s.limits.metadata_key_max_length = 16).await;
    let long = "k".repeat(17);
    let ok = "k".repeat(16);
    let r = app
        .post_endpoint(&json!({"endpointId": "e0", "appVersion": {"name": "demo-v1"}, "metadata": {long.clone(): 1}}))
        .await;
    let body = assert_error_status(r, StatusCode::BAD_REQUEST).await;
    assert_eq!(body["rule"], "max-length", "{body}");
    app.register("e1", "demo-v1", json!({ok.clone(): 1})).await;
    let before = metadata(&app, "e1").await;
    let r = send(&app, Method::PUT, &key_path("e1", &long), JSON, "1").await;
    assert_error(r, StatusCode::BAD_REQUEST, "metadataKey", "max-length").await;
    let r = app.get(&key_path("e1", &long)).await;
    assert_error(r, StatusCode::BAD_REQUEST, "metadataKey", "max-length").await;
    let r = app
        .api(Method::DELETE, &key_path("e1", &long))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "metadataKey", "max-length").await;
    for (ct, body) in [
        (JSON, json!({long.clone(): 1})),
        (MERGE_PATCH, json!({long.clone(): 1})),
        (
            JSON_PATCH,
            json!([{"op": "add", "path": format!("/{long}"), "value": 1}]),
        ),
    ] {
        let method = if ct == JSON {
            Method::PUT
        } else {
            Method::PATCH
        };
        let r = send(&app, method, &md_path("e1"), ct, body.to_string()).await;
        let body = assert_error_status(r, StatusCode::BAD_REQUEST).await;
        assert_eq!(body["rule"], "max-length", "{body}");
    }
    assert_eq!(metadata(&app, "e1").await, before);
    // A key of exactly the maximum length is fine.
    let r = send(&app, Method::PUT, &key_path("e1", &ok), JSON, "2").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

/// Asserts an error status with a JSON error body; returns the body.
async fn assert_error_status(r: Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["field"].as_str().is_some(), "{body}");
    body
}

#[tokio::test]
async fn metadata_writes_on_unknown_endpoint_are_404() {
    let app = spawn_app().await;
    let cases: Vec<(Method, String, &str, String)> = vec![
        (Method::PUT, md_path("ghost"), JSON, r#"{"a":1}"#.into()),
        (
            Method::PATCH,
            md_path("ghost"),
            MERGE_PATCH,
            r#"{"a":1}"#.into(),
        ),
        (
            Method::PATCH,
            md_path("ghost"),
            JSON_PATCH,
            r#"[{"op":"add","path":"/a","value":1}]"#.into(),
        ),
        (Method::PATCH, md_path("ghost"), JSON, r#"{"a":1}"#.into()),
        (Method::PUT, key_path("ghost", "a"), JSON, "1".into()),
    ];
    for (method, path, ct, body) in cases {
        let r = send(&app, method.clone(), &path, ct, body).await;
        assert_error(r, StatusCode::NOT_FOUND, "endpointId", "exists").await;
    }
    let r = app
        .api(Method::DELETE, &key_path("ghost", "a"))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "endpointId", "exists").await;
    // Nothing was created by the attempts.
    assert_eq!(app.total("").await, 0);
    // An unregistered endpoint is unknown as well.
    app.register("gone", "demo-v1", json!({"a": 1})).await;
    let r = app
        .api(Method::DELETE, "/endpoints/gone")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .send_json(Method::PUT, &md_path("gone"), &json!({"b": 1}))
        .await;
    assert_error(r, StatusCode::NOT_FOUND, "endpointId", "exists").await;
    // An invalid endpoint ID is a 400, not a 404.
    let r = app
        .send_json(Method::PUT, &md_path("bad%20id"), &json!({"b": 1}))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "endpointId", "pattern").await;
}

/// `n` nested arrays around `1`.
fn nested(n: usize) -> Value {
    (0..n).fold(json!(1), |v, _| json!([v]))
}

/// A write the server accepts must leave a readable endpoint: metadata nested deeper than
/// the JSON parser reads back must be refused, not stored. (Currently stored: see the
/// report; the endpoint then answers 503 to every read, listing and even DELETE.)
#[tokio::test]
async fn deeply_nested_metadata_is_refused_and_the_endpoint_stays_readable() {
    // Regression: a 128-deep document used to be stored and then be unreadable (503).
    let app = spawn_app().await;
    app.register("deep1", "demo-v1", json!({})).await;
    let r = send(
        &app,
        Method::PUT,
        &key_path("deep1", "k"),
        JSON,
        nested(127).to_string(),
    )
    .await;
    assert_error(r, StatusCode::BAD_REQUEST, "metadata.k", "max-depth").await;
    assert_eq!(app.get(&md_path("deep1")).await.status(), StatusCode::OK);
    // Within the limit (32 by default) is accepted; a patch that pushes it past is not,
    // even though the request itself is shallow.
    app.register("deep2", "demo-v1", json!({"k": nested(31)}))
        .await;
    let pointer = format!("/k{}", "/0".repeat(30));
    let r = json_patch(
        &app,
        "deep2",
        json!([{"op": "add", "path": pointer, "value": nested(5)}]),
    )
    .await;
    assert_error(r, StatusCode::BAD_REQUEST, "metadata.k", "max-depth").await;
    let r = app
        .get("/endpoints?applicationName=demo&include=metadata")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .api(Method::DELETE, "/endpoints/deep2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conditional_writes_with_one_tag_let_exactly_one_win() {
    let app = std::sync::Arc::new(spawn_app().await);
    app.register("e1", "demo-v1", json!({"writer": null})).await;
    let (_, tag) = metadata(&app, "e1").await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (app, tag) = (app.clone(), tag.clone());
            tokio::spawn(async move {
                let r = send_if_match(
                    &app,
                    Method::PUT,
                    &md_path("e1"),
                    &tag,
                    &json!({"writer": i}),
                )
                .await;
                (i, r.status())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (i, status) = t.await.unwrap();
        match status {
            StatusCode::NO_CONTENT => winners.push(i),
            StatusCode::PRECONDITION_FAILED => {}
            other => panic!("writer {i}: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let (got, new_tag) = metadata(&app, "e1").await;
    assert_eq!(got, json!({"writer": winners[0]}));
    assert_eq!(tag_version(&new_tag), tag_version(&tag) + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_of_different_keys_lose_no_update() {
    let app = std::sync::Arc::new(spawn_app().await);
    app.register("e1", "demo-v1", json!({})).await;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let r = if i % 2 == 0 {
                    send(
                        &app,
                        Method::PUT,
                        &key_path("e1", &format!("k{i}")),
                        JSON,
                        i.to_string(),
                    )
                    .await
                } else {
                    let patch = json!({ format!("k{i}"): i });
                    send(
                        &app,
                        Method::PATCH,
                        &md_path("e1"),
                        MERGE_PATCH,
                        patch.to_string(),
                    )
                    .await
                };
                assert_eq!(r.status(), StatusCode::NO_CONTENT, "writer {i}");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let (got, tag) = metadata(&app, "e1").await;
    let want: Map<String, Value> = (0..32).map(|i| (format!("k{i}"), json!(i))).collect();
    assert_eq!(got, Value::Object(want));
    assert_eq!(tag_version(&tag), 1 + 32);
}

// ---------------------------------------------------------------------------------------
// Property test: patches against an independent model
// ---------------------------------------------------------------------------------------

mod model {
    //! The oracle: a `Map` manipulated by hand, following RFC 6902 (top-level paths only)
    //! and RFC 7396 directly.

    use serde_json::{json, Map, Value};

    /// One JSON Patch operation on a top-level key.
    #[derive(Debug, Clone)]
    pub enum Op {
        Add(String, Value),
        Remove(String),
        Replace(String, Value),
        /// `None`: test against the value the model holds at that point (passes when the
        /// key exists, fails otherwise).
        Test(String, Option<Value>),
        Move(String, String),
        Copy(String, String),
    }

    #[derive(Debug, Clone)]
    pub enum Step {
        /// Operations, and whether to send them as plain `application/json`.
        JsonPatch(Vec<Op>, bool),
        /// A merge patch document (an object), and whether to send it as plain JSON.
        Merge(Map<String, Value>, bool),
    }

    /// RFC 6901 reference token of a key.
    pub fn pointer(key: &str) -> String {
        format!("/{}", key.replace('~', "~0").replace('/', "~1"))
    }

    /// Applies `ops` to `doc`; returns the wire patch document and the result, `None` when
    /// an operation fails (the whole patch then has no effect).
    pub fn json_patch(doc: &Map<String, Value>, ops: &[Op]) -> (Value, Option<Map<String, Value>>) {
        let mut work = doc.clone();
        let mut ok = true;
        let mut wire = Vec::new();
        for op in ops {
            let applied = match op {
                Op::Add(k, v) => {
                    wire.push(json!({"op": "add", "path": pointer(k), "value": v}));
                    work.insert(k.clone(), v.clone());
                    true
                }
                Op::Remove(k) => {
                    wire.push(json!({"op": "remove", "path": pointer(k)}));
                    work.remove(k).is_some()
                }
                Op::Replace(k, v) => {
                    wire.push(json!({"op": "replace", "path": pointer(k), "value": v}));
                    match work.get_mut(k) {
                        Some(slot) => {
                            *slot = v.clone();
                            true
                        }
                        None => false,
                    }
                }
                Op::Test(k, v) => {
                    let expected = match v {
                        Some(v) => v.clone(),
                        None => work.get(k).cloned().unwrap_or(json!("<absent>")),
                    };
                    wire.push(json!({"op": "test", "path": pointer(k), "value": expected}));
                    work.get(k) == Some(&expected)
                }
                Op::Move(from, to) => {
                    wire.push(json!({"op": "move", "from": pointer(from), "path": pointer(to)}));
                    match work.remove(from) {
                        Some(v) => {
                            work.insert(to.clone(), v);
                            true
                        }
                        None => false,
                    }
                }
                Op::Copy(from, to) => {
                    wire.push(json!({"op": "copy", "from": pointer(from), "path": pointer(to)}));
                    match work.get(from).cloned() {
                        Some(v) => {
                            work.insert(to.clone(), v);
                            true
                        }
                        None => false,
                    }
                }
            };
            ok &= applied;
        }
        (Value::Array(wire), ok.then_some(work))
    }

    /// RFC 7396 §2, `MergePatch(Target, Patch)`.
    pub fn merge_patch(target: Option<&Value>, patch: &Value) -> Value {
        let Value::Object(patch) = patch else {
            return patch.clone();
        };
        let mut target = match target {
            Some(Value::Object(t)) => t.clone(),
            _ => Map::new(),
        };
        for (name, value) in patch {
            if value.is_null() {
                target.remove(name);
            } else {
                let merged = merge_patch(target.get(name), value);
                target.insert(name.clone(), merged);
            }
        }
        Value::Object(target)
    }
}

mod strategies {
    use super::model::{Op, Step};
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    /// Top-level keys: few, so operations collide; some need JSON Pointer escaping.
    const KEYS: &[&str] = &["a", "b", "c", "d e", "x/y", "t~n", "ключ", "a.b", "~1"];
    const INNER_KEYS: &[&str] = &["p", "q", "r/s"];

    pub fn key() -> impl Strategy<Value = String> {
        prop::sample::select(KEYS).prop_map(str::to_owned)
    }

    fn inner_key() -> impl Strategy<Value = String> {
        prop::sample::select(INNER_KEYS).prop_map(str::to_owned)
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-1000i64..1000).prop_map(|n| json!(n)),
            "[a-z ]{0,6}".prop_map(Value::String),
        ]
    }

    /// Any JSON value (integers only, so equality is exact), nested a few levels.
    pub fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map(inner_key(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    pub fn document() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(key(), value(), 0..6).prop_map(|m| m.into_iter().collect())
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (key(), value()).prop_map(|(k, v)| Op::Add(k, v)),
            2 => key().prop_map(Op::Remove),
            2 => (key(), value()).prop_map(|(k, v)| Op::Replace(k, v)),
            2 => key().prop_map(|k| Op::Test(k, None)),
            1 => (key(), value()).prop_map(|(k, v)| Op::Test(k, Some(v))),
            1 => (key(), key()).prop_map(|(a, b)| Op::Move(a, b)),
            1 => (key(), key()).prop_map(|(a, b)| Op::Copy(a, b)),
        ]
    }

    /// A merge patch value: nulls (deletions) are frequent, objects merge recursively.
    fn merge_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![2 => Just(Value::Null), 3 => value()];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop::collection::btree_map(inner_key(), inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (prop::collection::vec(op(), 0..5), any::<bool>())
                .prop_map(|(ops, plain)| Step::JsonPatch(ops, plain)),
            (
                prop::collection::btree_map(key(), merge_value(), 0..5),
                any::<bool>()
            )
                .prop_map(|(m, plain)| Step::Merge(m.into_iter().collect(), plain)),
        ]
    }

    pub fn case() -> impl Strategy<Value = (Map<String, Value>, Vec<Step>)> {
        (document(), prop::collection::vec(step(), 1..6))
    }
}

#[test]
fn model_agrees_with_rfc_examples() {
    // RFC 7396 Appendix A, a few rows, to keep the oracle honest.
    let rows = [
        (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
        (
            json!({"a": "b"}),
            json!({"b": "c"}),
            json!({"a": "b", "b": "c"}),
        ),
        (json!({"a": "b"}), json!({"a": null}), json!({})),
        (
            json!({"a": [{"b": "c"}]}),
            json!({"a": [1]}),
            json!({"a": [1]}),
        ),
        (
            json!({"e": null}),
            json!({"a": 1}),
            json!({"e": null, "a": 1}),
        ),
        (
            json!({}),
            json!({"a": {"bb": {"ccc": null}}}),
            json!({"a": {"bb": {}}}),
        ),
        (json!({"a": "foo"}), json!(null), json!(null)),
    ];
    for (target, patch, want) in rows {
        assert_eq!(model::merge_patch(Some(&target), &patch), want, "{patch}");
    }
    let doc: Map<String, Value> = serde_json::from_value(json!({"a": 1})).unwrap();
    let (_, out) = model::json_patch(&doc, &[model::Op::Remove("zz".into())]);
    assert!(out.is_none());
    assert_eq!(model::pointer("a/b~c"), "/a~1b~0c");
}

/// Random documents, random JSON Patches (including failing ones) and random merge
/// patches, applied over HTTP, must give what the model gives; a failing patch must give
/// 400 and change nothing; the metadata tag moves by one exactly when the document changes.
#[test]
fn property_patches_over_http_match_the_model() {
    use proptest::prop_assert_eq;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(spawn_app());
    let next_id = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    });
    let result = runner.run(&strategies::case(), |(initial, steps)| {
        rt.block_on(async {
            let id = format!("prop-{}", next_id.fetch_add(1, Ordering::Relaxed));
            let r = app
                .post_endpoint(&json!({"endpointId": id, "appVersion": {"name": "demo-v1"},
                                       "metadata": initial}))
                .await;
            prop_assert_eq!(r.status(), StatusCode::CREATED);
            let mut model = initial;
            let (got, mut tag) = metadata(&app, &id).await;
            prop_assert_eq!(&got, &Value::Object(model.clone()));
            for (i, step) in steps.iter().enumerate() {
                let (ct, wire, expected) = match step {
                    model::Step::JsonPatch(ops, plain) => {
                        let (wire, out) = model::json_patch(&model, ops);
                        (if *plain { JSON } else { JSON_PATCH }, wire, out)
                    }
                    model::Step::Merge(patch, plain) => {
                        let current = Value::Object(model.clone());
                        let patch = Value::Object(patch.clone());
                        let out = match model::merge_patch(Some(&current), &patch) {
                            Value::Object(m) => Some(m),
                            other => panic!("a merge of objects gave {other}"),
                        };
                        (if *plain { JSON } else { MERGE_PATCH }, patch, out)
                    }
                };
                let r = send(&app, Method::PATCH, &md_path(&id), ct, wire.to_string()).await;
                let status = r.status();
                let header_tag = r
                    .headers()
                    .get("etag")
                    .map(|v| v.to_str().unwrap().to_owned());
                let text = r.text().await.unwrap();
                let ctx = format!("step {i}: {ct} {wire} on {model:?}: {status} {text}");
                match &expected {
                    Some(_) => prop_assert_eq!(status, StatusCode::NO_CONTENT, "{}", ctx),
                    None => {
                        prop_assert_eq!(status, StatusCode::BAD_REQUEST, "{}", ctx);
                        let body: Value = serde_json::from_str(&text).unwrap();
                        prop_assert_eq!(&body["rule"], "json-patch", "{}", ctx);
                    }
                }
                let (got, new_tag) = metadata(&app, &id).await;
                let changed = match expected {
                    Some(m) => {
                        let changed = m != model;
                        model = m;
                        prop_assert_eq!(header_tag.as_deref(), Some(new_tag.as_str()), "{}", ctx);
                        changed
                    }
                    None => false,
                };
                prop_assert_eq!(&got, &Value::Object(model.clone()), "{}", ctx);
                let step_by = u64::from(changed);
                prop_assert_eq!(
                    tag_version(&new_tag),
                    tag_version(&tag) + step_by,
                    "{}",
                    ctx
                );
                tag = new_tag;
            }
            Ok::<(), TestCaseError>(())
        })
    });
    rt.block_on(app.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}
