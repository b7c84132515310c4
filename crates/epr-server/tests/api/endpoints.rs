//! Registration, reads, listing, app version and unregistration over HTTP.

use crate::helpers::{assert_error, spawn_app, spawn_with};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn register_returns_201_with_location_token_and_etag() {
    let app = spawn_app().await;
    let r = app
        .post_endpoint(&json!({
            "appVersion": {"name": "demo-v1"},
            "metadata": {"level": 3, "room": 234},
            "endpointToken": "02226466-e744-48ac-8f0c-a57fe4e77de4",
            "endpointId": "67b27f9b-c4d1-41dc-b21f-2917b74c467a"
        }))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(
        location,
        format!(
            "http://{}/api/v1/endpoints/67b27f9b-c4d1-41dc-b21f-2917b74c467a",
            app.addr
        )
    );
    assert!(r.headers().contains_key("etag"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"endpointId": "67b27f9b-c4d1-41dc-b21f-2917b74c467a",
               "token": "02226466-e744-48ac-8f0c-a57fe4e77de4", "status": "Inactive"})
    );
    let got: Value = app
        .get("/endpoints/67b27f9b-c4d1-41dc-b21f-2917b74c467a?include=metadata")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["metadata"], json!({"level": 3, "room": 234}));
    assert_eq!(got["appVersion"]["name"], "demo-v1");
    assert!(got["createdDate"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn register_generates_id_and_token() {
    let app = spawn_app().await;
    let a = app
        .post_endpoint(&json!({"appVersion": {"name": "demo-v1"}}))
        .await;
    assert_eq!(a.status(), StatusCode::CREATED);
    let a: Value = a.json().await.unwrap();
    let b: Value = app
        .post_endpoint(&json!({"appVersion": {"name": "demo-v1"}}))
        .await
        .json()
        .await
        .unwrap();
    for body in [&a, &b] {
        assert_eq!(body["endpointId"].as_str().unwrap().len(), 36, "a UUID");
        assert_eq!(body["token"].as_str().unwrap().len(), 36);
    }
    assert_ne!(a["endpointId"], b["endpointId"]);
    assert_ne!(a["token"], b["token"]);
    let id = a["endpointId"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/endpoints/{id}")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn both_prefixes_serve_the_same_registry() {
    let app = spawn_app().await;
    let r = app
        .client
        .post(app.url("/epr/api/v1/endpoints"))
        .header("content-type", "application/json")
        .body(r#"{"endpointId":"via-ingress","appVersion":{"name":"demo-v1"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .ends_with("/epr/api/v1/endpoints/via-ingress"));
    assert_eq!(
        app.get("/endpoints/via-ingress").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn invalid_registrations_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let cases = [
        (json!({}), "appVersion.name", "required"),
        (json!({"appVersion": {}}), "appVersion.name", "required"),
        (
            json!({"appVersion": {"name": 5}}),
            "appVersion.name",
            "type",
        ),
        (
            json!({"appVersion": {"name": "Demo-V1"}}),
            "appVersion.name",
            "pattern",
        ),
        (
            json!({"appVersion": {"name": "ghost-v1"}}),
            "appVersion.name",
            "known-app-version",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "endpointId": "has space"}),
            "endpointId",
            "pattern",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "endpointId": ""}),
            "endpointId",
            "required",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "endpointId": "batch"}),
            "endpointId",
            "reserved",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "endpointId": "x".repeat(129)}),
            "endpointId",
            "max-length",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "endpointToken": "a/b"}),
            "endpointToken",
            "pattern",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "endpointToken": "a.b"}),
            "endpointToken",
            "pattern",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "metadata": [1, 2]}),
            "metadata",
            "type",
        ),
        (
            json!({"appVersion": {"name": "demo-v1"}, "metadata": {"": 1}}),
            "metadata.",
            "required",
        ),
        (json!([1]), "body", "type"),
    ];
    for (body, field, rule) in cases {
        let r = app.post_endpoint(&body).await;
        assert_error(r, StatusCode::BAD_REQUEST, field, rule).await;
    }
    let r = app
        .api(Method::POST, "/endpoints")
        .header("content-type", "application/json")
        .body("{\"appVersion\": ")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "body", "json").await;
    let r = app
        .api(Method::POST, "/endpoints")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Content-Type",
        "media-type",
    )
    .await;
    assert_eq!(app.total("").await, 0, "nothing was registered");
}

#[tokio::test]
async fn duplicates_conflict() {
    let app = spawn_app().await;
    let reg = |id: &str, token: &str, version: &str| json!({"endpointId": id, "endpointToken": token, "appVersion": {"name": version}});
    assert_eq!(
        app.post_endpoint(&reg("a", "t1", "demo-v1")).await.status(),
        StatusCode::CREATED
    );
    let r = app.post_endpoint(&reg("a", "t2", "demo-v1")).await;
    assert_error(r, StatusCode::CONFLICT, "endpointId", "unique").await;
    // The same token in the same application, even in another version.
    let r = app.post_endpoint(&reg("b", "t1", "demo-v2")).await;
    assert_error(r, StatusCode::CONFLICT, "endpointToken", "unique").await;
    assert_eq!(
        app.get("/endpoints/b").await.status(),
        StatusCode::NOT_FOUND
    );
    // Tokens are scoped to their application.
    assert_eq!(
        app.post_endpoint(&reg("c", "t1", "other-v1"))
            .await
            .status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn reads_honour_include_and_conditional_get() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({"k": "v"})).await;
    let r = app.get("/endpoints/e1").await;
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert!(body.get("metadata").is_none(), "metadata only on include");
    assert!(body.get("filters").is_none());
    let body: Value = app
        .get("/endpoints/e1?include=metadata,filters")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["metadata"], json!({"k": "v"}));
    assert_eq!(body["filters"], json!([]));
    let r = app.get("/endpoints/e1?include=secrets").await;
    assert_error(r, StatusCode::BAD_REQUEST, "include", "enum").await;
    let r = app
        .api(Method::GET, "/endpoints/e1")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = app.get("/endpoints/nope").await;
    assert_error(r, StatusCode::NOT_FOUND, "endpointId", "exists").await;
    let r = app.get("/endpoints/bad%20id").await;
    assert_error(r, StatusCode::BAD_REQUEST, "endpointId", "pattern").await;
}

#[tokio::test]
async fn unregister_with_preconditions() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({})).await;
    let etag = app.get("/endpoints/e1").await.headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let r = app
        .api(Method::DELETE, "/endpoints/e1")
        .header("if-match", "\"0-0\"")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    assert_eq!(app.get("/endpoints/e1").await.status(), StatusCode::OK);
    let r = app
        .api(Method::DELETE, "/endpoints/e1")
        .header("if-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.get("/endpoints/e1").await.status(),
        StatusCode::NOT_FOUND
    );
    let r = app
        .api(Method::DELETE, "/endpoints/e1")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "endpointId", "exists").await;
    // The ID and its token are free again; the old entity tag does not match the new one.
    app.register("e1", "demo-v1", json!({})).await;
    let r = app
        .api(Method::DELETE, "/endpoints/e1")
        .header("if-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn app_version_read_and_change() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({})).await;
    let r = app.get("/endpoints/e1/app-version").await;
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["name"], "demo-v1");
    assert!(body["registeredDate"].is_string());
    let put = |name: &str| json!({ "name": name });
    let r = app
        .send_json(Method::PUT, "/endpoints/e1/app-version", &put("demo-v2"))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    let body: Value = app
        .get("/endpoints/e1/app-version")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["name"], "demo-v2");
    let r = app
        .send_json(Method::PUT, "/endpoints/e1/app-version", &put("other-v1"))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "name", "same-application").await;
    let r = app
        .send_json(Method::PUT, "/endpoints/e1/app-version", &put("ghost-v1"))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "name", "known-app-version").await;
    let r = app
        .send_json(Method::PUT, "/endpoints/e1/app-version", &json!({}))
        .await;
    assert_error(r, StatusCode::BAD_REQUEST, "name", "required").await;
    let r = app
        .api(Method::PUT, "/endpoints/e1/app-version")
        .header("content-type", "application/json")
        .header("if-match", &etag)
        .body(put("demo-v1").to_string())
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    let r = app
        .send_json(Method::PUT, "/endpoints/zz/app-version", &put("demo-v1"))
        .await;
    assert_error(r, StatusCode::NOT_FOUND, "endpointId", "exists").await;
}

#[tokio::test]
async fn listing_pages_in_registration_order() {
    let app = spawn_with(|s| s.server.page_max = 50).await;
    for i in 0..30 {
        let version = if i < 20 { "demo-v1" } else { "demo-v2" };
        app.register(
            &format!("e{i:02}"),
            version,
            json!({"i": i, "even": i % 2 == 0}),
        )
        .await;
    }
    app.register("o1", "other-v1", json!({})).await;
    let page = |q: &str| {
        let app = &app;
        let q = q.to_owned();
        async move {
            let r = app.get(&format!("/endpoints?{q}")).await;
            assert_eq!(r.status(), StatusCode::OK, "{q}");
            r.json::<Value>().await.unwrap()
        }
    };
    let ids = |v: &Value| -> Vec<String> {
        v["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["endpointId"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = page("").await;
    assert_eq!(first["totalElements"], 31);
    assert_eq!(ids(&first).len(), 20, "default page size");
    assert_eq!(ids(&first)[0], "e00");
    // Pages tile the listing without gaps or repeats.
    let mut all = Vec::new();
    for offset in (0..31).step_by(7) {
        all.extend(ids(&page(&format!("limit=7&offset={offset}")).await));
    }
    assert_eq!(all.len(), 31);
    let mut dedup = all.clone();
    dedup.dedup();
    assert_eq!(all, dedup);
    let beyond = page("offset=1000").await;
    assert_eq!(beyond["totalElements"], 31);
    assert_eq!(beyond["content"], json!([]));
    assert_eq!(page("applicationName=demo").await["totalElements"], 30);
    assert_eq!(page("applicationName=other").await["totalElements"], 1);
    assert_eq!(
        page("applicationVersionName=demo-v2").await["totalElements"],
        10
    );
    assert_eq!(
        page("endpointId=e01,e02&endpointId=o1&endpointId=zz").await["totalElements"],
        3
    );
    let md =
        page("applicationName=demo&metadataFilter=even=true&metadataFilter=i!=0&limit=3").await;
    assert_eq!(md["totalElements"], 14, "15 even in demo, minus e00");
    assert_eq!(ids(&md), vec!["e02", "e04", "e06"]);
    assert!(md["content"][0].get("metadata").is_none());
    let with_md = page("endpointId=e03&include=metadata").await;
    assert_eq!(
        with_md["content"][0]["metadata"],
        json!({"i": 3, "even": false})
    );
    let json_filter = page("metadataFilter=%7B%22i%22%3A5%7D").await;
    assert_eq!(ids(&json_filter), vec!["e05"]);
    for (q, field, rule) in [
        ("limit=0", "limit", "range"),
        ("limit=51", "limit", "range"),
        ("limit=abc", "limit", "integer"),
        ("offset=-1", "offset", "integer"),
        ("limit=1&limit=2", "limit", "single"),
        ("applicationName=Bad", "applicationName", "pattern"),
        ("endpointId=a%20b", "endpointId", "pattern"),
        ("metadataFilter=%7Bbad", "metadataFilter", "json"),
        ("include=nope", "include", "enum"),
    ] {
        let r = app.get(&format!("/endpoints?{q}")).await;
        assert_error(r, StatusCode::BAD_REQUEST, field, rule).await;
    }
    let r = app.get("/endpoints?filterId=f1&applicationName=demo").await;
    assert_error(r, StatusCode::NOT_FOUND, "filterId", "exists").await;
}

#[tokio::test]
async fn listing_pages_by_cursor() {
    let app = spawn_app().await;
    for i in 0..10 {
        app.register(&format!("e{i}"), "demo-v1", json!({"even": i % 2 == 0}))
            .await;
    }
    let page = |q: String| {
        let app = &app;
        async move {
            let r = app.get(&format!("/endpoints?{q}")).await;
            assert_eq!(r.status(), StatusCode::OK, "{q}");
            r.json::<Value>().await.unwrap()
        }
    };
    // Walk the even ones three at a time by cursor; a removal behind the cursor does not
    // shift the next page (it would with offsets).
    let base = "applicationName=demo&metadataFilter=even=true&limit=3";
    let first = page(base.to_owned()).await;
    assert_eq!(first["totalElements"], 5);
    let cursor = first["nextCursor"]
        .as_str()
        .expect("more follow")
        .to_owned();
    let r = app
        .api(Method::DELETE, "/endpoints/e0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let second = page(format!("{base}&cursor={cursor}")).await;
    assert_eq!(
        second["totalElements"], 4,
        "every match, not only those after the cursor"
    );
    let ids: Vec<&str> = second["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpointId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["e6", "e8"]);
    assert!(second.get("nextCursor").is_none(), "the last page has none");
    // Also without metadata conditions, and by endpoint IDs (another store path).
    let by_ids = page("endpointId=e1,e2,e3&limit=2".to_owned()).await;
    let c = by_ids["nextCursor"].as_str().unwrap();
    let rest = page(format!("endpointId=e1,e2,e3&limit=2&cursor={c}")).await;
    assert_eq!(rest["content"][0]["endpointId"], "e3");
    assert!(rest.get("nextCursor").is_none());
    for (q, rule) in [
        ("cursor=abc", "format"),
        ("cursor=c1.", "format"),
        ("cursor=c1.zz", "format"),
        ("cursor=c1.ffffffffffffffff", "format"),
        ("cursor=c1.10&cursor=c1.11", "single"),
    ] {
        let r = app.get(&format!("/endpoints?{q}")).await;
        assert_error(r, StatusCode::BAD_REQUEST, "cursor", rule).await;
    }
    // offset=0 with a cursor is no offset at all; a larger one counts from the cursor.
    let ok = page(format!("{base}&offset=0&cursor={cursor}")).await;
    assert_eq!(ok["totalElements"], 4);
    let skipped = page(format!("{base}&offset=1&cursor={cursor}")).await;
    assert_eq!(skipped["totalElements"], 4);
    assert_eq!(skipped["content"][0]["endpointId"], "e8");
    let by_ids = page(format!("endpointId=e1,e2,e3&limit=1&offset=1&cursor={c}")).await;
    assert!(
        by_ids["content"].as_array().unwrap().is_empty(),
        "e3 skipped: none left"
    );
}

#[tokio::test]
async fn listing_supports_conditional_get() {
    let app = spawn_app().await;
    app.register("e1", "demo-v1", json!({})).await;
    let r = app.get("/endpoints").await;
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let again = app
        .api(Method::GET, "/endpoints")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    app.register("e2", "demo-v1", json!({})).await;
    let changed = app
        .api(Method::GET, "/endpoints")
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_versions_allowed_by_configuration() {
    let app = spawn_with(|s| s.registration.allow_unknown_app_versions = true).await;
    app.register("e1", "fleet-v7", json!({})).await;
    let body: Value = app
        .get("/endpoints?applicationName=fleet")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["totalElements"], 1);
    let r = app
        .post_endpoint(&json!({"appVersion": {"name": "nodash"}}))
        .await;
    assert_error(
        r,
        StatusCode::BAD_REQUEST,
        "appVersion.name",
        "app-version-format",
    )
    .await;
}
