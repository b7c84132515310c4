//! Endpoint tokens over HTTP in Kaa CM's shape (`/endpoints/{endpointId}/tokens`): issue,
//! list (status filter, order, paging, strong ETag and `304`), read, every transition and
//! refusal of the life cycle, `If-Match`/`412`, and the tokens of an unregistered endpoint.
//! Authorization (401/403) is proven for these routes by the route-walking tests, which
//! cover every entry of `API_ROUTES`.

use crate::helpers::{assert_error, spawn_app, TestApp};
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

fn tokens_path(ep: &str) -> String {
    format!("/endpoints/{ep}/tokens")
}

async fn issue(app: &TestApp, ep: &str, body: Value) -> Response {
    app.send_json(Method::POST, &tokens_path(ep), &body).await
}

/// Issues a token to `ep` in `demo`, asserting `201`; returns (endpointTokenId, body).
async fn issue_ok(app: &TestApp, ep: &str, token: Option<&str>) -> (String, Value) {
    let mut body = json!({"applicationName": "demo"});
    if let Some(t) = token {
        body["token"] = json!(t);
    }
    let r = issue(app, ep, body).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: Value = r.json().await.unwrap();
    (body["endpointTokenId"].as_str().unwrap().to_owned(), body)
}

async fn set_status(app: &TestApp, ep: &str, id: &str, status: &str) -> Response {
    app.send_json(
        Method::PUT,
        &format!("/endpoints/{ep}/tokens/{id}/status"),
        &json!({ "status": status }),
    )
    .await
}

/// Sets `status`, asserting `200`; returns the token after and its ETag.
async fn set_status_ok(app: &TestApp, ep: &str, id: &str, status: &str) -> (Value, String) {
    let r = set_status(app, ep, id, status).await;
    assert_eq!(r.status(), StatusCode::OK, "{id} -> {status}");
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status);
    (body, etag)
}

async fn get_token(app: &TestApp, ep: &str, id: &str) -> (Value, String) {
    let r = app.get(&format!("/endpoints/{ep}/tokens/{id}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    (r.json().await.unwrap(), etag)
}

/// `GET …/tokens?{query}`, asserting `200`: (body, ETag).
async fn list(app: &TestApp, ep: &str, query: &str) -> (Value, String) {
    let r = app.get(&format!("{}?{query}", tokens_path(ep))).await;
    assert_eq!(r.status(), StatusCode::OK, "{query}");
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    (r.json().await.unwrap(), etag)
}

fn ids(page: &Value) -> Vec<String> {
    page["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["endpointTokenId"].as_str().unwrap().to_owned())
        .collect()
}

/// The ID of the token a registration issued (the endpoint's only token).
async fn initial_token_id(app: &TestApp, ep: &str) -> String {
    let (page, _) = list(app, ep, "").await;
    assert_eq!(page["totalElements"], 1, "{page}");
    ids(&page).remove(0)
}

#[tokio::test]
async fn issue_read_and_every_transition() {
    let app = spawn_app().await;
    app.register("ep-1", "demo-v1", json!({})).await;

    // The registration's token is listed, Inactive, never changed.
    let (page, _) = list(&app, "ep-1", "").await;
    assert_eq!(page["totalElements"], 1);
    let first = page["content"][0].clone();
    assert_eq!(first["status"], "Inactive");
    assert_eq!(first["applicationName"], "demo");
    assert!(first["createdDate"].as_str().unwrap().ends_with('Z'));
    assert!(first.get("updateDate").is_none(), "{first}");
    assert!(
        first.get("token").is_none(),
        "the token itself is never listed"
    );

    // A generated token.
    let r = issue(&app, "ep-1", json!({"applicationName": "demo"})).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let issued_tag = r.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    let id = body["endpointTokenId"].as_str().unwrap().to_owned();
    assert!(!body["token"].as_str().unwrap().is_empty());
    assert_eq!(body["status"], "Inactive");
    assert_eq!(body["applicationName"], "demo");
    assert!(body["createdDate"].is_string());
    assert!(
        location.ends_with(&format!("/api/v1/endpoints/ep-1/tokens/{id}")),
        "{location}"
    );
    // A given token is answered as given.
    let (_, given) = issue_ok(&app, "ep-1", Some("my-own-token")).await;
    assert_eq!(given["token"], "my-own-token");

    // Read: the token's tag, 304 on it; the same under the Kaa ingress prefix.
    let (token, etag) = get_token(&app, "ep-1", &id).await;
    assert_eq!(etag, issued_tag);
    assert!(!etag.starts_with("W/"), "{etag}");
    assert_eq!(token["status"], "Inactive");
    assert_eq!(token["endpointTokenId"], id.as_str());
    assert!(token.get("token").is_none());
    let r = app
        .api(Method::GET, &format!("/endpoints/ep-1/tokens/{id}"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = app
        .client
        .get(app.url(&format!("/epr/api/v1/endpoints/ep-1/tokens/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Inactive → Suspended → Active (reactivate) → Active again (no change) → Revoked.
    let (after, suspended_tag) = set_status_ok(&app, "ep-1", &id, "Suspended").await;
    assert_ne!(suspended_tag, etag, "a status change changes the tag");
    assert!(after["updateDate"].is_string(), "{after}");
    let (_, active_tag) = set_status_ok(&app, "ep-1", &id, "Active").await;
    let (_, again_tag) = set_status_ok(&app, "ep-1", &id, "Active").await;
    assert_eq!(
        again_tag, active_tag,
        "the same status again changes nothing"
    );
    // No token returns to Inactive.
    assert_error(
        set_status(&app, "ep-1", &id, "Inactive").await,
        StatusCode::CONFLICT,
        "status",
        "transition",
    )
    .await;
    set_status_ok(&app, "ep-1", &id, "Revoked").await;
    // Revocation is final: every other status is refused, Revoked again is answered as is.
    for to in ["Active", "Suspended", "Inactive"] {
        assert_error(
            set_status(&app, "ep-1", &id, to).await,
            StatusCode::CONFLICT,
            "status",
            "transition",
        )
        .await;
    }
    set_status_ok(&app, "ep-1", &id, "Revoked").await;
    assert_eq!(get_token(&app, "ep-1", &id).await.0["status"], "Revoked");

    // The other first steps: Inactive → Active (manual activation), Inactive → Revoked,
    // Active → Suspended → Revoked; an Inactive token set to Inactive stays as it is.
    let initial = first["endpointTokenId"].as_str().unwrap().to_owned();
    set_status_ok(&app, "ep-1", &initial, "Inactive").await;
    set_status_ok(&app, "ep-1", &initial, "Active").await;
    set_status_ok(&app, "ep-1", &initial, "Suspended").await;
    set_status_ok(&app, "ep-1", &initial, "Revoked").await;
    let given_id = given["endpointTokenId"].as_str().unwrap();
    set_status_ok(&app, "ep-1", given_id, "Revoked").await;
}

#[tokio::test]
async fn issue_refusals() {
    let app = spawn_app().await;
    let reg = app
        .post_endpoint(
            &json!({"endpointId": "ep-1", "appVersion": {"name": "demo-v1"},
            "endpointToken": "taken-1"}),
        )
        .await;
    assert_eq!(reg.status(), StatusCode::CREATED);
    app.register("ep-o", "other-v1", json!({})).await;

    assert_error(
        issue(&app, "ep-1", json!({})).await,
        StatusCode::BAD_REQUEST,
        "applicationName",
        "required",
    )
    .await;
    assert_error(
        issue(&app, "ep-1", json!({"applicationName": "other"})).await,
        StatusCode::BAD_REQUEST,
        "applicationName",
        "same-application",
    )
    .await;
    assert_error(
        issue(&app, "ep-1", json!({"applicationName": "Not An App"})).await,
        StatusCode::BAD_REQUEST,
        "applicationName",
        "pattern",
    )
    .await;
    assert_error(
        issue(
            &app,
            "ep-1",
            json!({"applicationName": "demo", "token": "a.b"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "token",
        "pattern",
    )
    .await;
    assert_error(
        issue(&app, "ep-1", json!({"applicationName": "demo", "token": 5})).await,
        StatusCode::BAD_REQUEST,
        "token",
        "type",
    )
    .await;
    assert_error(
        issue(&app, "ep-1", json!(["demo"])).await,
        StatusCode::BAD_REQUEST,
        "body",
        "type",
    )
    .await;
    let r = app
        .api(Method::POST, "/endpoints/ep-1/tokens")
        .header("content-type", "text/plain")
        .body("demo")
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
    // A token in use in the application: the registration's, or one issued later.
    assert_error(
        issue(
            &app,
            "ep-1",
            json!({"applicationName": "demo", "token": "taken-1"}),
        )
        .await,
        StatusCode::CONFLICT,
        "endpointToken",
        "unique",
    )
    .await;
    issue_ok(&app, "ep-1", Some("taken-2")).await;
    app.register("ep-2", "demo-v1", json!({})).await;
    assert_error(
        issue(
            &app,
            "ep-2",
            json!({"applicationName": "demo", "token": "taken-2"}),
        )
        .await,
        StatusCode::CONFLICT,
        "endpointToken",
        "unique",
    )
    .await;
    // Unique per application only: another application may use the same text.
    let r = issue(
        &app,
        "ep-o",
        json!({"applicationName": "other", "token": "taken-2"}),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // Nothing refused was stored.
    let (page, _) = list(&app, "ep-1", "").await;
    assert_eq!(page["totalElements"], 2, "{page}");
}

#[tokio::test]
async fn unknown_endpoints_tokens_and_malformed_paths() {
    let app = spawn_app().await;
    app.register("ep-1", "demo-v1", json!({})).await;
    let id = initial_token_id(&app, "ep-1").await;

    // Unknown endpoint, on every route.
    assert_error(
        app.get("/endpoints/nope/tokens").await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    assert_error(
        issue(&app, "nope", json!({"applicationName": "demo"})).await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    assert_error(
        app.get(&format!("/endpoints/nope/tokens/{id}")).await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    assert_error(
        set_status(&app, "nope", &id, "Active").await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    // A token of another endpoint is not found through this one.
    app.register("ep-2", "demo-v1", json!({})).await;
    assert_error(
        app.get(&format!("/endpoints/ep-2/tokens/{id}")).await,
        StatusCode::NOT_FOUND,
        "endpointTokenId",
        "exists",
    )
    .await;
    assert_error(
        set_status(&app, "ep-2", &id, "Suspended").await,
        StatusCode::NOT_FOUND,
        "endpointTokenId",
        "exists",
    )
    .await;
    assert_eq!(get_token(&app, "ep-1", &id).await.0["status"], "Inactive");
    // Malformed IDs.
    assert_error(
        app.get("/endpoints/ep-1/tokens/not_an_id").await,
        StatusCode::BAD_REQUEST,
        "endpointTokenId",
        "pattern",
    )
    .await;

    // Status bodies.
    let path = format!("/endpoints/ep-1/tokens/{id}/status");
    assert_error(
        app.send_json(Method::PUT, &path, &json!({})).await,
        StatusCode::BAD_REQUEST,
        "status",
        "required",
    )
    .await;
    for bad in ["active", "Deleted", ""] {
        assert_error(
            set_status(&app, "ep-1", &id, bad).await,
            StatusCode::BAD_REQUEST,
            "status",
            "enum",
        )
        .await;
    }
    assert_error(
        app.send_json(Method::PUT, &path, &json!({"status": 1}))
            .await,
        StatusCode::BAD_REQUEST,
        "status",
        "type",
    )
    .await;
    assert_eq!(get_token(&app, "ep-1", &id).await.0["status"], "Inactive");
}

#[tokio::test]
async fn listing_filters_orders_pages_and_tags() {
    let app = spawn_app().await;
    app.register("ep-1", "demo-v1", json!({})).await;
    let mut all = vec![initial_token_id(&app, "ep-1").await];
    for _ in 0..4 {
        // Distinct creation times, so the order is by time alone.
        tokio::time::sleep(Duration::from_millis(3)).await;
        all.push(issue_ok(&app, "ep-1", None).await.0);
    }
    // all = [t0 (oldest) .. t4 (newest)]
    set_status_ok(&app, "ep-1", &all[1], "Suspended").await;
    set_status_ok(&app, "ep-1", &all[2], "Revoked").await;
    set_status_ok(&app, "ep-1", &all[3], "Active").await;
    let newest_first: Vec<String> = all.iter().rev().cloned().collect();

    let (page, etag) = list(&app, "ep-1", "").await;
    assert_eq!(page["totalElements"], 5);
    assert_eq!(ids(&page), newest_first, "DESC by default");
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "a strong tag: {etag}"
    );
    assert_eq!(ids(&list(&app, "ep-1", "order=DESC").await.0), newest_first);
    assert_eq!(ids(&list(&app, "ep-1", "order=ASC").await.0), all);

    // Status filter: one, comma-separated, repeated.
    let only = |q: &'static str| {
        let app = &app;
        async move { ids(&list(app, "ep-1", q).await.0) }
    };
    assert_eq!(only("status=Suspended").await, vec![all[1].clone()]);
    assert_eq!(only("status=Revoked").await, vec![all[2].clone()]);
    assert_eq!(only("status=Active").await, vec![all[3].clone()]);
    assert_eq!(
        only("status=Inactive").await,
        vec![all[4].clone(), all[0].clone()]
    );
    assert_eq!(
        only("status=Suspended,Revoked").await,
        vec![all[2].clone(), all[1].clone()]
    );
    assert_eq!(
        only("status=Revoked&status=Suspended&order=ASC").await,
        vec![all[1].clone(), all[2].clone()]
    );
    let (page, _) = list(&app, "ep-1", "status=Inactive&limit=1").await;
    assert_eq!(
        page["totalElements"], 2,
        "total counts the filter's matches"
    );

    // Paging.
    let (page, _) = list(&app, "ep-1", "limit=2").await;
    assert_eq!(
        (page["totalElements"].as_u64(), ids(&page)),
        (Some(5), newest_first[..2].to_vec())
    );
    let (page, _) = list(&app, "ep-1", "offset=2&limit=2").await;
    assert_eq!(ids(&page), newest_first[2..4].to_vec());
    let (page, _) = list(&app, "ep-1", "offset=4&limit=2").await;
    assert_eq!(ids(&page), newest_first[4..].to_vec());
    let (page, _) = list(&app, "ep-1", "offset=10").await;
    assert_eq!(
        (page["totalElements"].as_u64(), ids(&page).len()),
        (Some(5), 0)
    );

    // The tag: 304 while the body is the same, a new tag once a token changes.
    let with = |tag: &str| {
        app.api(Method::GET, "/endpoints/ep-1/tokens")
            .header("if-none-match", tag)
            .send()
    };
    let r = with(&etag).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], etag.as_str());
    // Another page has another body, hence another tag.
    let (_, page_tag) = list(&app, "ep-1", "limit=2").await;
    assert_ne!(page_tag, etag);
    set_status_ok(&app, "ep-1", &all[4], "Suspended").await;
    let r = with(&etag).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(r.headers()["etag"], etag.as_str());

    // Refused parameters.
    for (q, field, rule) in [
        ("status=Bogus", "status", "enum"),
        ("status=active", "status", "enum"),
        ("status=", "status", "required"),
        ("status=Active,,Revoked", "status", "required"),
        ("order=asc", "order", "enum"),
        ("order=ASC&order=DESC", "order", "single"),
        ("limit=0", "limit", "range"),
        ("limit=1001", "limit", "range"),
        ("offset=-1", "offset", "integer"),
        ("size=3", "size", "unknown-parameter"),
    ] {
        assert_error(
            app.get(&format!("/endpoints/ep-1/tokens?{q}")).await,
            StatusCode::BAD_REQUEST,
            field,
            rule,
        )
        .await;
    }
}

#[tokio::test]
async fn status_changes_honour_if_match() {
    let app = spawn_app().await;
    app.register("ep-1", "demo-v1", json!({})).await;
    let id = initial_token_id(&app, "ep-1").await;
    let (_, tag) = get_token(&app, "ep-1", &id).await;
    let path = format!("/endpoints/ep-1/tokens/{id}/status");
    let put = |status: &str, if_match: &str| {
        app.api(Method::PUT, &path)
            .header("content-type", "application/json")
            .header("if-match", if_match)
            .body(json!({ "status": status }).to_string())
            .send()
    };
    assert_error(
        put("Suspended", "\"not-the-tag\"").await.unwrap(),
        StatusCode::PRECONDITION_FAILED,
        "If-Match",
        "etag-match",
    )
    .await;
    // A weak tag never matches.
    assert_error(
        put("Suspended", &format!("W/{tag}")).await.unwrap(),
        StatusCode::PRECONDITION_FAILED,
        "If-Match",
        "etag-match",
    )
    .await;
    assert_error(
        put("Suspended", "not quoted").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "If-Match",
        "etag-list",
    )
    .await;
    assert_eq!(get_token(&app, "ep-1", &id).await.0["status"], "Inactive");
    let r = put("Suspended", &tag).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let new_tag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(new_tag, get_token(&app, "ep-1", &id).await.1);
    // The old tag is stale now.
    assert_error(
        put("Active", &tag).await.unwrap(),
        StatusCode::PRECONDITION_FAILED,
        "If-Match",
        "etag-match",
    )
    .await;
    let r = put("Active", &format!("\"x\", {new_tag}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = put("Revoked", "*").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(get_token(&app, "ep-1", &id).await.0["status"], "Revoked");
}

#[tokio::test]
async fn tokens_of_an_unregistered_endpoint_are_gone() {
    let app = spawn_app().await;
    let r = app
        .post_endpoint(
            &json!({"endpointId": "ep-1", "appVersion": {"name": "demo-v1"},
            "endpointToken": "first-token"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let (id, _) = issue_ok(&app, "ep-1", Some("second-token")).await;
    let r = app
        .api(Method::DELETE, "/endpoints/ep-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    assert_error(
        app.get("/endpoints/ep-1/tokens").await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    assert_error(
        app.get(&format!("/endpoints/ep-1/tokens/{id}")).await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    // Registered again: only the new registration's token, and the old tokens' values are
    // free again (their rows, hashes included, were deleted).
    app.register("ep-1", "demo-v1", json!({})).await;
    let (page, _) = list(&app, "ep-1", "").await;
    assert_eq!(page["totalElements"], 1, "{page}");
    assert_ne!(ids(&page)[0], id);
    issue_ok(&app, "ep-1", Some("first-token")).await;
    issue_ok(&app, "ep-1", Some("second-token")).await;
}
