//! Regressions from fuzzing (`fuzz/`, `scripts/fuzz.sh`), at the level a client sees them.

use crate::helpers::{assert_error, spawn_app};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// A JSON Patch that moves a value to the root and then fails made json_patch's undo panic
/// on the store's writer thread; every later write then failed. Now the patch is refused
/// (400, naming the failed operation) and the next write works.
#[tokio::test]
async fn failed_json_patch_after_move_to_root_leaves_the_store_working() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": {}})).await;
    let patch = json!([
        {"op": "move", "from": "/a", "path": ""},
        {"op": "test", "path": "/x", "value": 1}
    ]);
    let r = app
        .api(Method::PATCH, "/endpoints/e1/metadata")
        .header("content-type", "application/json-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "[1]", "json-patch").await;
    assert_eq!(
        app.get_json("/api/v1/endpoints/e1/metadata").await,
        json!({"a": {}}),
        "nothing changed"
    );
    app.register("e2", "demo-v1", json!({})).await;
    app.stop().await;
}

/// A float that serde_json's default (fast, not correctly rounded) parser read as a value
/// whose own JSON text parses to a different value: the stored document then differed from
/// the written one, so writing the same document again was a change (new ETag, event).
#[tokio::test]
async fn rewriting_the_same_float_changes_nothing() {
    let app = spawn_app().await;
    let body = r#"{"k": 33333333333333333333333333333333}"#;
    app.register("e1", "demo-v1", json!({})).await;
    let put = || async {
        let r = app
            .api(Method::PUT, "/endpoints/e1/metadata")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        r.headers()["etag"].to_str().unwrap().to_owned()
    };
    let first = put().await;
    let second = put().await;
    assert_eq!(
        first, second,
        "the same document written twice is one change"
    );
    app.stop().await;
}

/// 100,000 copy/remove operations on a large value held the store's writer (every write)
/// for about a minute; a JSON Patch now holds at most 256 operations.
#[tokio::test]
async fn json_patch_operations_are_bounded() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"a": vec![0; 1_000]}))
        .await;
    let ops: Vec<_> = (0..10_000)
        .map(|i| match i % 2 {
            0 => json!({"op": "copy", "from": "/a", "path": "/b"}),
            _ => json!({"op": "remove", "path": "/b"}),
        })
        .collect();
    let r = app
        .send_json(Method::PATCH, "/endpoints/e1/metadata", &json!(ops))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "[256]", "max-operations").await;
    app.stop().await;
}
