//! Batch registration: `POST /endpoints/batch` and `GET /endpoints/batch/status`.

use crate::helpers::{assert_error, spawn_app, TestApp};
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};

async fn post_batch(app: &TestApp, body: &Value) -> Response {
    app.send_json(Method::POST, "/endpoints/batch", body).await
}

/// Posts a batch, asserting 202; returns the task ID and the `Location` header.
async fn accepted(app: &TestApp, prefix: &str, body: &Value) -> (String, String) {
    let r = app
        .client
        .post(app.url(&format!("{prefix}/endpoints/batch")))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    let task_id = body["taskId"].as_str().expect("a taskId").to_owned();
    assert!(!task_id.is_empty());
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    (task_id, location)
}

async fn status(app: &TestApp, app_name: &str, task_id: &str) -> Response {
    app.get(&format!(
        "/endpoints/batch/status?appName={app_name}&taskId={task_id}"
    ))
    .await
}

async fn status_ok(app: &TestApp, app_name: &str, task_id: &str) -> Value {
    let r = status(app, app_name, task_id).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

/// The item of a status report list with the given endpoint ID.
fn item<'a>(list: &'a Value, id: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|i| i["endpointId"] == id)
        .unwrap_or_else(|| panic!("no item {id} in {list}"))
}

#[tokio::test]
async fn batch_with_mixed_items_reports_created_and_failed() {
    let app = spawn_app().await;
    app.register("pre-existing", "demo-v2", json!({"orig": true}))
        .await;
    let (task_id, location) = accepted(
        &app,
        "/api/v1",
        &json!({
            "appVersion": {"name": "demo-v1"},
            "endpoints": [
                {"endpointId": "given", "endpointToken": "tok-given", "metadata": {"k": 1, "n": {"x": [1]}}},
                {},
                {"endpointId": "bad id!", "metadata": {"m": 1}},
                {"endpointId": "pre-existing", "metadata": {"orig": false}},
                {"endpointId": "dup", "metadata": {"first": true}},
                {"endpointId": "dup", "metadata": {"second": true}},
                {"endpointId": "tok-a", "endpointToken": "shared-tok"},
                {"endpointId": "tok-b", "endpointToken": "shared-tok"},
                {"endpointId": "md-bad", "metadata": [1, 2]},
                {"endpointId": "md-null", "metadata": null}
            ]
        }),
    )
    .await;
    assert_eq!(
        location,
        // Absolute, like every Location header.
        app.url(&format!(
            "/api/v1/endpoints/batch/status?appName=demo&taskId={task_id}"
        ))
    );
    let report = status_ok(&app, "demo", &task_id).await;
    assert_eq!(report["taskId"], task_id);
    assert_eq!(report["createdCount"], 5, "{report}");
    assert_eq!(report["failedCount"], 5, "{report}");
    let created = &report["created"];
    let failed = &report["failed"];
    assert_eq!(created.as_array().unwrap().len(), 5);
    assert_eq!(failed.as_array().unwrap().len(), 5);

    // Created items: ID, token and metadata object.
    let given = item(created, "given");
    assert_eq!(given["endpointToken"], "tok-given");
    assert_eq!(given["metadata"], json!({"k": 1, "n": {"x": [1]}}));
    let generated: Vec<&Value> = created
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| {
            !["given", "dup", "tok-a", "md-null"].contains(&i["endpointId"].as_str().unwrap())
        })
        .collect();
    assert_eq!(generated.len(), 1, "{created}");
    let generated = generated[0];
    let generated_id = generated["endpointId"].as_str().unwrap().to_owned();
    assert!(!generated_id.is_empty());
    let generated_token = generated["endpointToken"]
        .as_str()
        .expect("a generated token");
    assert!(!generated_token.is_empty());
    assert_ne!(generated_token, generated_id);
    assert_eq!(generated["metadata"], json!({}));
    assert_eq!(item(created, "dup")["metadata"], json!({"first": true}));
    assert_eq!(item(created, "tok-a")["endpointToken"], "shared-tok");
    assert_eq!(item(created, "tok-a")["metadata"], json!({}));
    assert_eq!(item(created, "md-null")["metadata"], json!({}));
    assert!(item(created, "md-null")["endpointToken"].as_str().is_some());
    for c in created.as_array().unwrap() {
        assert!(c["metadata"].is_object(), "{c}");
        assert!(c.get("status").is_none(), "{c}");
    }

    // Failed items: status, a reason naming the problem, metadata as a string.
    for f in failed.as_array().unwrap() {
        assert_eq!(f["status"], "FAILED", "{f}");
        assert!(f["metadata"].is_string(), "{f}");
        assert!(!f["statusReason"].as_str().unwrap().is_empty(), "{f}");
    }
    for (id, reason, metadata) in [
        ("bad id!", "endpointId", r#"{"m":1}"#),
        ("pre-existing", "already exists", r#"{"orig":false}"#),
        ("dup", "already exists", r#"{"second":true}"#),
        ("tok-b", "token", "{}"),
        ("md-bad", "metadata", "[1,2]"),
    ] {
        let f = item(failed, id);
        let why = f["statusReason"].as_str().unwrap();
        assert!(why.contains(reason), "{f}");
        assert_eq!(f["metadata"], metadata, "{f}");
    }

    // Created endpoints are readable, in the batch's version.
    for id in ["given", "dup", "tok-a", "md-null", generated_id.as_str()] {
        let r = app.get(&format!("/endpoints/{id}?include=metadata")).await;
        assert_eq!(r.status(), StatusCode::OK, "{id}");
        let ep: Value = r.json().await.unwrap();
        assert_eq!(ep["appVersion"]["name"], "demo-v1", "{id}");
    }
    let r = app.get("/endpoints/given/metadata").await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"k": 1, "n": {"x": [1]}})
    );
    let r = app.get("/endpoints/dup/metadata").await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"first": true}));
    // Failed ones are not (and the pre-existing endpoint is untouched).
    for id in ["tok-b", "md-bad"] {
        assert_error(
            app.get(&format!("/endpoints/{id}")).await,
            StatusCode::NOT_FOUND,
            "endpointId",
            "exists",
        )
        .await;
    }
    let r = app.get("/endpoints/bad%20id!").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let pre: Value = app
        .get("/endpoints/pre-existing?include=metadata")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(pre["appVersion"]["name"], "demo-v2");
    assert_eq!(pre["metadata"], json!({"orig": true}));
    assert_eq!(app.total("applicationVersionName=demo-v1").await, 5);

    // A token given in a batch is now taken in the application, not in another one.
    let r = app
        .post_endpoint(&json!({"appVersion": {"name": "demo-v2"}, "endpointToken": "tok-given"}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = app
        .post_endpoint(&json!({"appVersion": {"name": "other-v1"}, "endpointToken": "tok-given"}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn batch_status_is_repeatable_and_follows_location() {
    let app = spawn_app().await;
    let (task_id, location) = accepted(
        &app,
        "/api/v1",
        &json!({"appVersion": {"name": "demo-v2"}, "endpoints": [{"endpointId": "s1"}, {"endpointId": "s2"}]}),
    )
    .await;
    let r = app.client.get(&location).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["createdCount"], 2);
    assert_eq!(first["failedCount"], 0);
    assert_eq!(first["failed"], json!([]));
    assert_eq!(status_ok(&app, "demo", &task_id).await, first);
}

#[tokio::test]
async fn batch_larger_than_max_items_is_400_and_registers_nothing() {
    let app = spawn_app().await;
    let endpoints: Vec<Value> = (0..1001)
        .map(|i| json!({"endpointId": format!("big-{i}")}))
        .collect();
    let r = post_batch(
        &app,
        &json!({"appVersion": {"name": "demo-v1"}, "endpoints": endpoints}),
    )
    .await;
    let body = assert_error(r, StatusCode::BAD_REQUEST, "endpoints", "batch-size").await;
    assert!(body["message"].as_str().unwrap().contains("1001"), "{body}");
    assert_eq!(app.total("").await, 0);
    assert_error(
        app.get("/endpoints/big-0").await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    // Exactly the maximum is fine.
    let endpoints: Vec<Value> = (0..1000).map(|_| json!({})).collect();
    let (task_id, _) = accepted(
        &app,
        "/api/v1",
        &json!({"appVersion": {"name": "demo-v1"}, "endpoints": endpoints}),
    )
    .await;
    assert_eq!(
        status_ok(&app, "demo", &task_id).await["createdCount"],
        1000
    );
    assert_eq!(app.total("").await, 1000);
}

#[tokio::test]
async fn batch_with_empty_list_is_400() {
    let app = spawn_app().await;
    let r = post_batch(
        &app,
        &json!({"appVersion": {"name": "demo-v1"}, "endpoints": []}),
    )
    .await;
    assert_error(r, StatusCode::BAD_REQUEST, "endpoints", "batch-size").await;
    let r = post_batch(&app, &json!({"appVersion": {"name": "demo-v1"}})).await;
    assert_error(r, StatusCode::BAD_REQUEST, "endpoints", "required").await;
    assert_eq!(app.total("").await, 0);
}

#[tokio::test]
async fn batch_with_unknown_or_missing_app_version_is_400() {
    let app = spawn_app().await;
    let endpoints = json!([{"endpointId": "x1"}, {"endpointId": "x2"}]);
    let r = post_batch(
        &app,
        &json!({"appVersion": {"name": "demo-v9"}, "endpoints": endpoints}),
    )
    .await;
    assert_error(
        r,
        StatusCode::BAD_REQUEST,
        "appVersion.name",
        "known-app-version",
    )
    .await;
    let r = post_batch(&app, &json!({"endpoints": endpoints})).await;
    assert_error(r, StatusCode::BAD_REQUEST, "appVersion.name", "required").await;
    let r = post_batch(&app, &json!({"appVersion": {}, "endpoints": endpoints})).await;
    assert_error(r, StatusCode::BAD_REQUEST, "appVersion.name", "required").await;
    let r = post_batch(
        &app,
        &json!({"appVersion": {"name": "Demo-V1"}, "endpoints": endpoints}),
    )
    .await;
    assert_error(r, StatusCode::BAD_REQUEST, "appVersion.name", "pattern").await;
    let r = app
        .api(Method::POST, "/endpoints/batch")
        .header("content-type", "application/json")
        .body("{\"endpoints\": [")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "body", "json").await;
    let r = app
        .api(Method::POST, "/endpoints/batch")
        .header("content-type", "text/plain")
        .body(json!({"appVersion": {"name": "demo-v1"}, "endpoints": endpoints}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(app.total("").await, 0);
}

#[tokio::test]
async fn batch_status_requires_task_id_and_app_name() {
    let app = spawn_app().await;
    let (task_id, _) = accepted(
        &app,
        "/api/v1",
        &json!({"appVersion": {"name": "demo-v1"}, "endpoints": [{}]}),
    )
    .await;
    let r = app.get("/endpoints/batch/status?appName=demo").await;
    assert_error(r, StatusCode::BAD_REQUEST, "taskId", "required").await;
    let r = app
        .get("/endpoints/batch/status?appName=demo&taskId=")
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "taskId", "required").await;
    let r = app
        .get(&format!("/endpoints/batch/status?taskId={task_id}"))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "appName", "required").await;
    let r = app.get("/endpoints/batch/status").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .get(&format!(
            "/endpoints/batch/status?appName=Demo&taskId={task_id}"
        ))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "appName", "pattern").await;
}

#[tokio::test]
async fn batch_status_of_unknown_task_or_wrong_app_is_404() {
    let app = spawn_app().await;
    let (task_id, _) = accepted(
        &app,
        "/api/v1",
        &json!({"appVersion": {"name": "demo-v1"}, "endpoints": [{}]}),
    )
    .await;
    let r = status(&app, "demo", "00000000-0000-0000-0000-000000000000").await;
    assert_error(r, StatusCode::NOT_FOUND, "taskId", "exists").await;
    let r = status(&app, "other", &task_id).await;
    assert_error(r, StatusCode::NOT_FOUND, "taskId", "exists").await;
    let r = status(&app, "nope", &task_id).await;
    assert_error(r, StatusCode::NOT_FOUND, "taskId", "exists").await;
    // The right pair still works.
    assert_eq!(status_ok(&app, "demo", &task_id).await["createdCount"], 1);
}

#[tokio::test]
async fn batch_works_under_both_prefixes() {
    let app = spawn_app().await;
    for (prefix, id) in [("/api/v1", "p1"), ("/epr/api/v1", "p2")] {
        let (task_id, location) = accepted(
            &app,
            prefix,
            &json!({"appVersion": {"name": "other-v1"}, "endpoints": [{"endpointId": id, "metadata": {"via": prefix}}]}),
        )
        .await;
        assert_eq!(
            location,
            app.url(&format!(
                "{prefix}/endpoints/batch/status?appName=other&taskId={task_id}"
            ))
        );
        for status_prefix in ["/api/v1", "/epr/api/v1"] {
            let r = app
                .client
                .get(app.url(&format!(
                    "{status_prefix}/endpoints/batch/status?appName=other&taskId={task_id}"
                )))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{prefix} {status_prefix}");
            let report: Value = r.json().await.unwrap();
            assert_eq!(report["createdCount"], 1);
            assert_eq!(report["created"][0]["endpointId"], id);
            assert_eq!(report["created"][0]["metadata"], json!({"via": prefix}));
        }
        let r = app
            .client
            .get(app.url(&format!("/epr/api/v1/endpoints/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(app.total("applicationName=other").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_with_overlapping_ids_create_each_id_once() {
    let app = std::sync::Arc::new(spawn_app().await);
    let tasks: Vec<_> = (0..4)
        .map(|n| {
            let app = app.clone();
            tokio::spawn(async move {
                let endpoints: Vec<Value> = (0..100)
                    .map(|i| json!({"endpointId": format!("c-{i}"), "metadata": {"batch": n}}))
                    .collect();
                let (task_id, _) = accepted(
                    &app,
                    "/api/v1",
                    &json!({"appVersion": {"name": "demo-v1"}, "endpoints": endpoints}),
                )
                .await;
                status_ok(&app, "demo", &task_id).await
            })
        })
        .collect();
    let mut created = 0;
    let mut failed = 0;
    for t in tasks {
        let report = t.await.unwrap();
        created += report["createdCount"].as_u64().unwrap();
        failed += report["failedCount"].as_u64().unwrap();
    }
    assert_eq!((created, failed), (100, 300));
    assert_eq!(app.total("").await, 100);
}
