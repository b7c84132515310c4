//! Device self-registration end to end (docs/self-registration.md): the operator's policy,
//! claim tokens and rejections; the device routes with every rule and every refusal;
//! re-registration; races; rate limits; a SIGKILL under load. On either backend
//! (`EPR_TEST_BACKEND`).

use crate::helpers::{assert_error, spawn_settings, spawn_with, test_settings, TestApp};
use epr_core::credentials::{claim_hash, TokenListQuery, TokenStatus};
use epr_core::event::{OutboxEvent, TokenEventKind};
use epr_core::ids::{AppName, EndpointId, EndpointToken, TenantId};
use epr_core::query::PageRequest;
use epr_core::registry::TokenValidation;
use epr_server::Settings;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

const SECRET: &str = "provisioning-secret-0001";

fn kaa() -> TenantId {
    TenantId::parse("kaa").unwrap()
}

/// Rate limits off: tests that are not about them send many requests from one address.
fn unlimited(s: &mut Settings) {
    s.self_registration.rate_limit.per_source_per_minute = 0;
    s.self_registration.rate_limit.per_claim_per_minute = 0;
}

async fn spawn() -> TestApp {
    spawn_with(unlimited).await
}

fn device_url(app: &TestApp, application: &str) -> String {
    app.url(&format!(
        "/device/v1/applications/{application}/registrations"
    ))
}

async fn device(app: &TestApp, application: &str, body: &Value) -> Response {
    app.client
        .post(device_url(app, application))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn put_policy(app: &TestApp, application: &str, doc: &Value) -> Response {
    app.send_json(
        Method::PUT,
        &format!("/applications/{application}/self-registration"),
        doc,
    )
    .await
}

async fn set_policy(app: &TestApp, doc: Value) {
    let r = put_policy(app, "demo", &doc).await;
    assert!(
        r.status().is_success(),
        "{}: {}",
        r.status(),
        r.text().await.unwrap()
    );
}

/// Creates claim tokens in `demo`; returns the answer's items.
async fn claims(app: &TestApp, body: Value) -> Vec<Value> {
    let r = app
        .send_json(Method::POST, "/applications/demo/claim-tokens", &body)
        .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: Value = r.json().await.unwrap();
    v["content"].as_array().unwrap().clone()
}

async fn claim(app: &TestApp, body: Value) -> String {
    claims(app, body).await[0]["claimToken"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Asserts a refusal: status, `reason` (also `rule`) and `field` (when given).
async fn refused(r: Response, status: StatusCode, reason: &str, field: Option<&str>) -> Value {
    let got = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["reason"], reason, "{body}");
    assert_eq!(body["rule"], reason, "{body}");
    if let Some(f) = field {
        assert_eq!(body["field"], f, "{body}");
    }
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    body
}

async fn registered(r: Response, status: StatusCode) -> Value {
    let got = r.status();
    let no_store = r
        .headers()
        .get("cache-control")
        .is_some_and(|v| v == "no-store");
    let body: Value = r.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert!(no_store, "the answer holds a credential: not to be cached");
    body
}

async fn validate(app: &TestApp, token: &str) -> TokenValidation {
    app.registry
        .validate_token(&kaa(), "demo", token, "test")
        .await
        .unwrap()
}

#[tokio::test]
async fn policy_lifecycle_and_preconditions() {
    let app = spawn().await;
    let path = "/applications/demo/self-registration";
    assert_error(
        app.get(path).await,
        StatusCode::NOT_FOUND,
        "applicationName",
        "exists",
    )
    .await;
    let doc = json!({"mode": "open", "provisioningSecret": SECRET, "reregistration": "reissue",
                     "versions": {"demo-v2": {"mode": "closed"}}});
    let r = put_policy(&app, "demo", &doc).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let tag = r.headers()["etag"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["provisioningSecretSet"], true);
    assert!(!body.to_string().contains(SECRET), "{body}");
    assert_eq!(body["versions"]["demo-v2"]["mode"], "closed");

    let r = app.get(path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], tag.as_str());
    let read: Value = r.json().await.unwrap();
    assert_eq!(read, body);

    // GET → PUT round trip keeps the secret (absent: kept) and the tag.
    let r = put_policy(&app, "demo", &read).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], tag.as_str());

    // If-Match: a stale tag is refused, nothing changes.
    let r = app
        .api(Method::PUT, path)
        .header("if-match", "\"sr-stale\"")
        .json(&json!({"mode": "closed"}))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    assert_eq!(
        app.get_json(&format!("/api/v1{path}")).await["mode"],
        "open"
    );
    let r = app
        .api(Method::PUT, path)
        .header("if-match", &tag)
        .json(&json!({"mode": "closed", "provisioningSecret": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let new_tag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(new_tag, tag);
    assert_eq!(
        r.json::<Value>().await.unwrap()["provisioningSecretSet"],
        false
    );

    let r = app
        .api(Method::DELETE, path)
        .header("if-match", &tag)
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    let r = app
        .api(Method::DELETE, path)
        .header("if-match", &new_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.get(path).await.status(), StatusCode::NOT_FOUND);
    let r = app.api(Method::DELETE, path).send().await.unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "applicationName", "exists").await;
    // If-Match on a policy that does not exist fails.
    let r = app
        .api(Method::PUT, path)
        .header("if-match", "*")
        .json(&json!({"mode": "open"}))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::PRECONDITION_FAILED, "If-Match", "etag-match").await;
    // Removed: closed again.
    let r = device(
        &app,
        "demo",
        &json!({"appVersion": "demo-v1", "provisioningSecret": SECRET}),
    )
    .await;
    refused(r, StatusCode::FORBIDDEN, "self-registration-closed", None).await;
}

#[tokio::test]
async fn policy_validation_names_the_field_and_rule() {
    let app = spawn().await;
    for (doc, field, rule) in [
        (json!({}), "mode", "required"),
        (json!({"mode": "ajar"}), "mode", "enum"),
        (json!({"mode": "open", "typo": 1}), "typo", "unknown-field"),
        (
            json!({"mode": "open", "provisioningSecret": "short"}),
            "provisioningSecret",
            "length",
        ),
        (
            json!({"mode": "open", "reregistration": "sometimes"}),
            "reregistration",
            "enum",
        ),
        (
            json!({"mode": "open", "maxMetadataBytes": 64 * 1024 + 1}),
            "maxMetadataBytes",
            "range",
        ),
        (
            json!({"mode": "open", "requiredMetadataKeys": ["a", "a"]}),
            "requiredMetadataKeys[1]",
            "unique",
        ),
        (
            json!({"mode": "open", "allowedMetadataValues": {"k": {"min": 3, "max": 1}}}),
            "allowedMetadataValues.k.min",
            "range",
        ),
        (
            json!({"mode": "open", "versions": {"demo-v1": {"endpointIdPattern": "(("}}}),
            "versions.demo-v1.endpointIdPattern",
            "regex",
        ),
        (
            json!({"mode": "open", "versions": {"other-v1": {"mode": "open"}}}),
            "versions.other-v1",
            "same-application",
        ),
        (json!(["mode"]), "body", "type"),
    ] {
        let r = put_policy(&app, "demo", &doc).await;
        assert_error(r, StatusCode::BAD_REQUEST, field, rule).await;
    }
    assert_eq!(
        app.get("/applications/demo/self-registration")
            .await
            .status(),
        StatusCode::NOT_FOUND,
        "nothing was stored"
    );
    let r = put_policy(&app, "nope", &json!({"mode": "open"})).await;
    assert_error(r, StatusCode::NOT_FOUND, "applicationName", "exists").await;
}

#[tokio::test]
async fn claim_tokens_operator_api() {
    let app = spawn().await;
    // Generated, bound to a pattern, several at once.
    let many = claims(
        &app,
        json!({"endpointIdPattern": "dev-[0-9]+", "ttlSeconds": 3600, "count": 3}),
    )
    .await;
    assert_eq!(many.len(), 3);
    let values: BTreeSet<&str> = many
        .iter()
        .map(|c| c["claimToken"].as_str().unwrap())
        .collect();
    assert_eq!(values.len(), 3);
    for v in &values {
        assert!(v.len() >= 32, "at least 128 bits: {v}");
    }
    assert_eq!(many[0]["endpointIdPattern"], "dev-[0-9]+");
    assert_eq!(many[0]["state"], "available");
    // Given, bound to one endpoint, with an absolute expiry.
    let in_two_days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + Duration::from_secs(2 * 86400);
    let at = epr_http::dto::iso(epr_core::Timestamp(in_two_days.as_millis() as i64));
    let one = claims(
        &app,
        json!({"claimToken": "given-claim-token-0001", "endpointId": "e1", "expiresAt": at}),
    )
    .await;
    assert_eq!(one[0]["claimToken"], "given-claim-token-0001");
    assert_eq!(one[0]["endpointId"], "e1");
    let id = one[0]["claimTokenId"].as_str().unwrap().to_owned();

    let list = app.get_json("/api/v1/applications/demo/claim-tokens").await;
    assert_eq!(list["totalElements"], 4);
    for c in list["content"].as_array().unwrap() {
        assert!(
            c.get("claimToken").is_none(),
            "values are never shown again: {c}"
        );
    }
    let page = app
        .get_json("/api/v1/applications/demo/claim-tokens?offset=1&limit=2")
        .await;
    assert_eq!(page["content"].as_array().unwrap().len(), 2);
    let got = app
        .get_json(&format!("/api/v1/applications/demo/claim-tokens/{id}"))
        .await;
    assert_eq!(got["endpointId"], "e1");
    assert!(got.get("claimToken").is_none());

    // The same value again: conflict, nothing created.
    let r = app
        .send_json(
            Method::POST,
            "/applications/demo/claim-tokens",
            &json!({"claimToken": "given-claim-token-0001"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    // Validation names the field and rule.
    for (body, field, rule) in [
        (json!({"count": 0}), "count", "range"),
        (json!({"count": 1001}), "count", "range"),
        (
            json!({"claimToken": "given-claim-token-0002", "count": 2}),
            "count",
            "exclusive",
        ),
        (json!({"claimToken": "short"}), "claimToken", "length"),
        (
            json!({"endpointId": "e1", "endpointIdPattern": "e.*"}),
            "endpointIdPattern",
            "exclusive",
        ),
        (json!({"endpointId": "bad id"}), "endpointId", "pattern"),
        (
            json!({"endpointIdPattern": "("}),
            "endpointIdPattern",
            "regex",
        ),
        (json!({"ttlSeconds": 0}), "ttlSeconds", "range"),
        (
            json!({"ttlSeconds": 365 * 86400 + 1}),
            "ttlSeconds",
            "range",
        ),
        (
            json!({"ttlSeconds": 5, "expiresAt": "2099-01-01T00:00:00Z"}),
            "ttlSeconds",
            "exclusive",
        ),
        (
            json!({"expiresAt": "2001-01-01T00:00:00Z"}),
            "expiresAt",
            "range",
        ),
        (json!({"expiresAt": "tomorrow"}), "expiresAt", "rfc3339"),
        (json!({"endpointID": "e1"}), "endpointID", "unknown-field"),
        (json!({"count": "3"}), "count", "type"),
        // Schemathesis found a `null` binding accepted as an unbound claim token.
        (json!({"endpointId": null}), "endpointId", "type"),
    ] {
        let r = app
            .send_json(Method::POST, "/applications/demo/claim-tokens", &body)
            .await;
        assert_error(r, StatusCode::BAD_REQUEST, field, rule).await;
    }
    let list = app.get_json("/api/v1/applications/demo/claim-tokens").await;
    assert_eq!(list["totalElements"], 4, "refused requests created nothing");

    let r = app
        .api(
            Method::DELETE,
            &format!("/applications/demo/claim-tokens/{id}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .get(&format!("/applications/demo/claim-tokens/{id}"))
        .await;
    assert_error(r, StatusCode::NOT_FOUND, "claimTokenId", "exists").await;
    let r = app
        .api(
            Method::DELETE,
            &format!("/applications/demo/claim-tokens/{id}"),
        )
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "claimTokenId", "exists").await;
    // A claim token of another application is not found through this one.
    let other = many[0]["claimTokenId"].as_str().unwrap();
    let r = app
        .get(&format!("/applications/other/claim-tokens/{other}"))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app.get("/applications/nope/claim-tokens").await;
    assert_error(r, StatusCode::NOT_FOUND, "applicationName", "exists").await;
}

#[tokio::test]
async fn open_mode_with_the_provisioning_secret() {
    let app = spawn().await;
    set_policy(&app, json!({"mode": "open", "provisioningSecret": SECRET})).await;
    let r = device(
        &app,
        "demo",
        &json!({"endpointId": "sr-1", "appVersion": "demo-v1", "metadata": {"a": 1},
                "provisioningSecret": SECRET}),
    )
    .await;
    let body = registered(r, StatusCode::CREATED).await;
    assert_eq!(body["endpointId"], "sr-1");
    assert_eq!(body["appVersion"], "demo-v1");
    assert_eq!(body["reregistered"], false);
    let token = body["endpointToken"].as_str().unwrap();
    assert!(body["endpointTokenId"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    // The endpoint is a normal endpoint, and its token identifies it.
    let ep = app
        .get_json("/api/v1/endpoints/sr-1?include=metadata")
        .await;
    assert_eq!(ep["metadata"]["a"], 1);
    assert!(
        matches!(validate(&app, token).await, TokenValidation::Valid(t) if t.endpoint_id.as_str() == "sr-1")
    );
    // No endpointId: one is generated.
    let r = device(
        &app,
        "demo",
        &json!({"appVersion": "demo-v1", "provisioningSecret": SECRET}),
    )
    .await;
    let body = registered(r, StatusCode::CREATED).await;
    let id = body["endpointId"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/endpoints/{id}")).await.status(),
        StatusCode::OK
    );
    // The tenant route of the default tenant is the same application.
    let r = app
        .client
        .post(app.url("/device/v1/tenants/kaa/applications/demo/registrations"))
        .json(&json!({"endpointId": "sr-2", "appVersion": "demo-v2", "provisioningSecret": SECRET}))
        .send()
        .await
        .unwrap();
    registered(r, StatusCode::CREATED).await;
    let m = app.metrics().await;
    assert!(
        m.contains("epr_self_registrations_total{outcome=\"registered\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn every_refusal_reason() {
    let app = spawn().await;
    let post = |body: Value| {
        let app = &app;
        async move { device(app, "demo", &body).await }
    };
    use StatusCode as S;
    // No policy: closed.
    refused(
        post(json!({"appVersion": "demo-v1", "provisioningSecret": SECRET})).await,
        S::FORBIDDEN,
        "self-registration-closed",
        None,
    )
    .await;
    set_policy(
        &app,
        json!({
            "mode": "open", "provisioningSecret": SECRET,
            "endpointIdPattern": "sr-[0-9]+",
            "maxMetadataBytes": 64,
            "requiredMetadataKeys": ["serial"],
            "allowedMetadataValues": {"serial": {"pattern": "SN[0-9]+"}},
            "versions": {"demo-v2": {"mode": "claim-token"}}
        }),
    )
    .await;
    let ok = |extra: Value| {
        let mut b = json!({"endpointId": "sr-1", "appVersion": "demo-v1",
                           "metadata": {"serial": "SN1"}, "provisioningSecret": SECRET});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                b.as_object_mut().unwrap().remove(k);
            } else {
                b[k] = v.clone();
            }
        }
        b
    };
    // invalid-request
    let r = app
        .client
        .post(device_url(&app, "demo"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    refused(r, S::BAD_REQUEST, "invalid-request", Some("body")).await;
    refused(
        post(ok(json!({"appVersion": null}))).await,
        S::BAD_REQUEST,
        "invalid-request",
        Some("appVersion"),
    )
    .await;
    refused(
        post(ok(json!({"endpointId": "no spaces"}))).await,
        S::BAD_REQUEST,
        "invalid-request",
        Some("endpointId"),
    )
    .await;
    refused(
        post(ok(json!({"metadata": [1]}))).await,
        S::BAD_REQUEST,
        "invalid-request",
        Some("metadata"),
    )
    .await;
    refused(
        post(ok(json!({"claimToken": "x"}))).await,
        S::BAD_REQUEST,
        "invalid-request",
        Some("claimToken"),
    )
    .await;
    // unknown-application
    refused(
        device(&app, "nope", &ok(json!({}))).await,
        S::NOT_FOUND,
        "unknown-application",
        Some("applicationName"),
    )
    .await;
    refused(
        post(ok(json!({"appVersion": "other-v1"}))).await,
        S::NOT_FOUND,
        "unknown-application",
        Some("appVersion"),
    )
    .await;
    refused(
        post(ok(json!({"appVersion": "demo-v9"}))).await,
        S::NOT_FOUND,
        "unknown-application",
        Some("appVersion"),
    )
    .await;
    let r = app
        .client
        .post(app.url("/device/v1/tenants/nobody/applications/demo/registrations"))
        .json(&ok(json!({})))
        .send()
        .await
        .unwrap();
    refused(r, S::NOT_FOUND, "unknown-application", None).await;
    // credential-missing, credential-invalid, claim-token-required
    let r = refused(
        post(ok(json!({"provisioningSecret": null}))).await,
        S::UNAUTHORIZED,
        "credential-missing",
        None,
    )
    .await;
    assert!(r.get("field").is_none() || r["field"].is_null());
    let r = post(ok(json!({"provisioningSecret": "wrong-secret-0000000"}))).await;
    assert_eq!(
        r.headers()["www-authenticate"],
        "Provisioning realm=\"epr-device\""
    );
    refused(
        r,
        S::UNAUTHORIZED,
        "credential-invalid",
        Some("provisioningSecret"),
    )
    .await;
    refused(
        post(ok(
            json!({"provisioningSecret": null, "claimToken": "never-issued-claim"}),
        ))
        .await,
        S::UNAUTHORIZED,
        "credential-invalid",
        Some("claimToken"),
    )
    .await;
    refused(
        post(ok(json!({"appVersion": "demo-v2"}))).await,
        S::UNAUTHORIZED,
        "claim-token-required",
        Some("provisioningSecret"),
    )
    .await;
    // A wrong credential learns nothing of the rules (the ID breaks the pattern here).
    refused(
        post(ok(
            json!({"endpointId": "x", "provisioningSecret": "wrong-secret-0000000"}),
        ))
        .await,
        S::UNAUTHORIZED,
        "credential-invalid",
        None,
    )
    .await;
    // endpoint-id-not-allowed, metadata rules
    refused(
        post(ok(json!({"endpointId": "other-1"}))).await,
        S::FORBIDDEN,
        "endpoint-id-not-allowed",
        Some("endpointId"),
    )
    .await;
    // Generated IDs must match the pattern too.
    refused(
        post(ok(json!({"endpointId": null}))).await,
        S::FORBIDDEN,
        "endpoint-id-not-allowed",
        Some("endpointId"),
    )
    .await;
    refused(
        post(ok(json!({"metadata": {"model": "m"}}))).await,
        S::UNPROCESSABLE_ENTITY,
        "metadata-key-missing",
        Some("metadata.serial"),
    )
    .await;
    refused(
        post(ok(json!({"metadata": {"serial": "XX1"}}))).await,
        S::UNPROCESSABLE_ENTITY,
        "metadata-value-not-allowed",
        Some("metadata.serial"),
    )
    .await;
    refused(
        post(ok(
            json!({"metadata": {"serial": "SN1", "pad": "x".repeat(64)}}),
        ))
        .await,
        S::UNPROCESSABLE_ENTITY,
        "metadata-too-large",
        Some("metadata"),
    )
    .await;
    // Above the global limit too (before any rule): metadata-too-large.
    refused(
        post(ok(
            json!({"metadata": {"serial": "SN1", "pad": "x".repeat(70_000)}}),
        ))
        .await,
        S::UNPROCESSABLE_ENTITY,
        "metadata-too-large",
        Some("metadata"),
    )
    .await;
    // already-registered (re-registration: refuse, the default)
    registered(post(ok(json!({}))).await, S::CREATED).await;
    refused(
        post(ok(json!({}))).await,
        S::CONFLICT,
        "already-registered",
        None,
    )
    .await;
    // The claim refusals.
    let used = claim(&app, json!({})).await;
    registered(
        post(ok(
            json!({"endpointId": "sr-2", "provisioningSecret": null, "claimToken": used}),
        ))
        .await,
        S::CREATED,
    )
    .await;
    refused(
        post(ok(
            json!({"endpointId": "sr-3", "provisioningSecret": null, "claimToken": used}),
        ))
        .await,
        S::UNAUTHORIZED,
        "claim-token-used",
        Some("claimToken"),
    )
    .await;
    let bound = claim(&app, json!({"endpointId": "sr-40"})).await;
    refused(
        post(ok(
            json!({"endpointId": "sr-41", "provisioningSecret": null, "claimToken": bound}),
        ))
        .await,
        S::FORBIDDEN,
        "claim-token-wrong-endpoint",
        Some("claimToken"),
    )
    .await;
    let pattern = claim(&app, json!({"endpointIdPattern": "sr-5[0-9]"})).await;
    refused(
        post(ok(
            json!({"endpointId": "sr-60", "provisioningSecret": null, "claimToken": pattern}),
        ))
        .await,
        S::FORBIDDEN,
        "claim-token-wrong-endpoint",
        Some("claimToken"),
    )
    .await;
    registered(
        post(ok(
            json!({"endpointId": "sr-55", "provisioningSecret": null, "claimToken": pattern}),
        ))
        .await,
        S::CREATED,
    )
    .await;
    // A claim bound to one ID names it: the device need not.
    let r = post(ok(
        json!({"endpointId": null, "provisioningSecret": null, "claimToken": bound}),
    ))
    .await;
    assert_eq!(registered(r, S::CREATED).await["endpointId"], "sr-40");
    let short = claim(&app, json!({"ttlSeconds": 1})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    refused(
        post(ok(
            json!({"endpointId": "sr-7", "provisioningSecret": null, "claimToken": short}),
        ))
        .await,
        S::UNAUTHORIZED,
        "claim-token-expired",
        Some("claimToken"),
    )
    .await;
    assert_eq!(
        app.get("/endpoints/sr-7").await.status(),
        StatusCode::NOT_FOUND
    );
    // A claim of the version's claim-token mode works where the secret does not.
    let v2 = claim(&app, json!({})).await;
    registered(
        post(ok(json!({"endpointId": "sr-8", "appVersion": "demo-v2",
                        "provisioningSecret": null, "claimToken": v2})))
        .await,
        S::CREATED,
    )
    .await;
    // Closed by the version entry / the mode.
    set_policy(
        &app,
        // Absent, the secret would be kept: null removes it.
        json!({"mode": "open", "provisioningSecret": null,
               "versions": {"demo-v2": {"mode": "closed"}}}),
    )
    .await;
    refused(
        post(ok(json!({"appVersion": "demo-v2"}))).await,
        S::FORBIDDEN,
        "self-registration-closed",
        None,
    )
    .await;
    // open without a secret set: claim tokens only.
    refused(
        post(ok(json!({"endpointId": "sr-9"}))).await,
        S::UNAUTHORIZED,
        "claim-token-required",
        Some("provisioningSecret"),
    )
    .await;

    // Rejections were recorded, newest first, with what the device sent.
    let rej = app
        .get_json("/api/v1/applications/demo/self-registration/rejections?limit=1000")
        .await;
    let reasons: BTreeSet<&str> = rej["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    for reason in [
        "invalid-request",
        "unknown-application",
        "self-registration-closed",
        "credential-missing",
        "credential-invalid",
        "claim-token-required",
        "claim-token-used",
        "claim-token-expired",
        "claim-token-wrong-endpoint",
        "endpoint-id-not-allowed",
        "metadata-key-missing",
        "metadata-value-not-allowed",
        "metadata-too-large",
        "already-registered",
    ] {
        assert!(reasons.contains(reason), "{reason} not recorded: {rej}");
    }
    let newest = &rej["content"][0];
    assert_eq!(newest["reason"], "claim-token-required");
    assert_eq!(newest["endpointId"], "sr-9");
    assert_eq!(newest["appVersion"], "demo-v1");
    assert_eq!(newest["source"], "127.0.0.1");
    assert!(newest["at"].as_str().unwrap().ends_with('Z'));
    // An application the catalogue does not declare records nothing.
    let r = app
        .get("/applications/nope/self-registration/rejections")
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let m = app.metrics().await;
    assert!(
        m.contains("epr_self_registration_refusals_total{reason=\"credential-invalid\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn rules_accept_what_they_allow() {
    let app = spawn().await;
    set_policy(
        &app,
        json!({
            "mode": "open", "provisioningSecret": SECRET,
            "endpointIdPattern": "m-[0-9]+",
            "requiredMetadataKeys": ["serial", "model"],
            "allowedMetadataValues": {
                "model": {"values": ["m1", 2, {"rev": "b"}]},
                "serial": {"pattern": "SN[0-9]+"},
                "temp": {"min": -20, "max": 60}
            },
            "maxMetadataBytes": 200,
            "versions": {"demo-v2": {"endpointIdPattern": null, "requiredMetadataKeys": [],
                                     "allowedMetadataValues": {}, "maxMetadataBytes": null}}
        }),
    )
    .await;
    for (i, md) in [
        json!({"serial": "SN1", "model": "m1"}),
        json!({"serial": "SN22", "model": 2.0, "temp": -20}),
        json!({"serial": "SN3", "model": {"rev": "b"}, "temp": 60, "other": [1, 2]}),
    ]
    .into_iter()
    .enumerate()
    {
        let r = device(
            &app,
            "demo",
            &json!({"endpointId": format!("m-{i}"), "appVersion": "demo-v1", "metadata": md,
                    "provisioningSecret": SECRET}),
        )
        .await;
        registered(r, StatusCode::CREATED).await;
    }
    for (md, field) in [
        (json!({"serial": "SN1", "model": "m3"}), "metadata.model"),
        (
            json!({"serial": "SN1", "model": "m1", "temp": 60.5}),
            "metadata.temp",
        ),
    ] {
        let r = device(
            &app,
            "demo",
            &json!({"endpointId": "m-9", "appVersion": "demo-v1", "metadata": md,
                    "provisioningSecret": SECRET}),
        )
        .await;
        refused(
            r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "metadata-value-not-allowed",
            Some(field),
        )
        .await;
    }
    // demo-v2 overrides every rule: anything goes.
    let r = device(
        &app,
        "demo",
        &json!({"endpointId": "free_form.id", "appVersion": "demo-v2",
                "metadata": {"pad": "x".repeat(500)}, "provisioningSecret": SECRET}),
    )
    .await;
    registered(r, StatusCode::CREATED).await;
}

#[tokio::test]
async fn reregistration_refuse_and_reissue() {
    // NATS configured but unreachable: events stay in the outbox, where the test reads them.
    let app = spawn_with(|s| {
        unlimited(s);
        s.nats.url = "nats://127.0.0.1:1".into();
    })
    .await;
    set_policy(&app, json!({"mode": "open", "provisioningSecret": SECRET})).await;
    let body = json!({"endpointId": "rr-1", "appVersion": "demo-v1", "metadata": {"v": 1},
                      "provisioningSecret": SECRET});
    let first = registered(device(&app, "demo", &body).await, StatusCode::CREATED).await;
    let old = first["endpointToken"].as_str().unwrap().to_owned();
    refused(
        device(&app, "demo", &body).await,
        StatusCode::CONFLICT,
        "already-registered",
        None,
    )
    .await;
    // A token issued by an operator's registration is revoked too.
    set_policy(&app, json!({"mode": "open", "reregistration": "reissue"})).await;
    assert!(matches!(
        validate(&app, &old).await,
        TokenValidation::Valid(_)
    ));
    let mut changed = body.clone();
    changed["appVersion"] = json!("demo-v2");
    changed["metadata"] = json!({"v": 2});
    let second = registered(device(&app, "demo", &changed).await, StatusCode::OK).await;
    assert_eq!(second["reregistered"], true);
    assert_eq!(second["endpointId"], "rr-1");
    // The record is left as it was.
    assert_eq!(second["appVersion"], "demo-v1");
    let ep = app
        .get_json("/api/v1/endpoints/rr-1?include=metadata")
        .await;
    assert_eq!(ep["metadata"]["v"], 1);
    assert_eq!(ep["appVersion"]["name"], "demo-v1");
    let new = second["endpointToken"].as_str().unwrap();
    assert_ne!(new, old);
    assert!(
        matches!(validate(&app, &old).await, TokenValidation::Refused(t) if t.status == TokenStatus::Revoked),
        "the old token is revoked"
    );
    assert!(
        matches!(validate(&app, new).await, TokenValidation::Valid(t) if t.endpoint_id.as_str() == "rr-1"),
        "the new token works"
    );
    // A `revoked` event names the old token, committed with the re-issue.
    let store = app.registry.store();
    let old_row = store
        .find_token(
            &kaa(),
            &AppName::parse("demo").unwrap(),
            &EndpointToken::parse(&old)
                .unwrap()
                .hash(&AppName::parse("demo").unwrap()),
        )
        .await
        .unwrap()
        .unwrap();
    let events = store.outbox_pending(0, 10_000).await.unwrap();
    let revoked: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            OutboxEvent::Token(t) if t.endpoint_id.as_str() == "rr-1" => match &t.kind {
                TokenEventKind::Revoked { token_ids } => Some(token_ids.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(revoked, vec![vec![old_row.id.clone()]], "{events:?}");
    // The metric says which outcome.
    let m = app.metrics().await;
    assert!(
        m.contains("epr_self_registrations_total{outcome=\"reregistered\"}"),
        "{m}"
    );
    // Another application's endpoint is never re-issued.
    app.register("oth-1", "other-v1", json!({})).await;
    let r = device(
        &app,
        "demo",
        &json!({"endpointId": "oth-1", "appVersion": "demo-v1", "claimToken":
                claim(&app, json!({})).await}),
    )
    .await;
    refused(r, StatusCode::CONFLICT, "already-registered", None).await;
}

/// Sends `n` self-registrations at once; returns their (status, body).
async fn burst(app: &TestApp, bodies: Vec<Value>) -> Vec<(StatusCode, Value)> {
    let url = Arc::new(device_url(app, "demo"));
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (client, url) = (app.client.clone(), url.clone());
            tokio::spawn(async move {
                let r = client.post(url.as_str()).json(&b).send().await.unwrap();
                let status = r.status();
                (status, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_self_registrations_of_one_id() {
    let app = spawn().await;
    set_policy(&app, json!({"mode": "open", "provisioningSecret": SECRET})).await;
    let body =
        json!({"endpointId": "race-1", "appVersion": "demo-v1", "provisioningSecret": SECRET});
    let results = burst(&app, vec![body; 64]).await;
    let created: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    for (s, b) in &results {
        if *s != StatusCode::CREATED {
            assert_eq!(*s, StatusCode::CONFLICT, "{b}");
            assert_eq!(b["reason"], "already-registered", "{b}");
        }
    }
    let tokens = app
        .registry
        .list_tokens(
            &kaa(),
            &EndpointId::parse("race-1").unwrap(),
            &TokenListQuery::default(),
            PageRequest {
                offset: 0,
                limit: 100,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(tokens.total, 1, "one token row for the one registration");
    let token = created[0].1["endpointToken"].as_str().unwrap();
    assert!(matches!(
        validate(&app, token).await,
        TokenValidation::Valid(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_self_registrations_with_one_claim_token() {
    let app = spawn().await;
    set_policy(&app, json!({"mode": "claim-token"})).await;
    let c = claim(&app, json!({})).await;
    let bodies = (0..64)
        .map(|i| json!({"endpointId": format!("cl-{i}"), "appVersion": "demo-v1", "claimToken": c}))
        .collect();
    let results = burst(&app, bodies).await;
    let created: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    for (s, b) in &results {
        if *s != StatusCode::CREATED {
            assert_eq!(*s, StatusCode::UNAUTHORIZED, "{b}");
            assert_eq!(b["reason"], "claim-token-used", "{b}");
        }
    }
    let winner = created[0].1["endpointId"].as_str().unwrap();
    assert_eq!(app.total("applicationName=demo").await, 1);
    let list = app.get_json("/api/v1/applications/demo/claim-tokens").await;
    assert_eq!(list["content"][0]["state"], "used");
    assert_eq!(list["content"][0]["usedByEndpointId"], winner);
}

#[tokio::test]
async fn rate_limits_engage_and_release() {
    // Per client address: 60 a minute (one a second), 3 at once.
    let app = spawn_with(|s| {
        let r = &mut s.self_registration.rate_limit;
        r.per_source_per_minute = 60;
        r.per_source_burst = 3;
        r.per_claim_per_minute = 0;
    })
    .await;
    let body = json!({"appVersion": "demo-v1", "provisioningSecret": SECRET});
    for _ in 0..3 {
        // Refused (closed), but counted: every device request is.
        assert_eq!(
            device(&app, "demo", &body).await.status(),
            StatusCode::FORBIDDEN
        );
    }
    let r = device(&app, "demo", &body).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    refused(r, StatusCode::TOO_MANY_REQUESTS, "rate-limited", None).await;
    // The operator's API is not limited.
    assert_eq!(
        app.get("/applications/demo/claim-tokens").await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        device(&app, "demo", &body).await.status(),
        StatusCode::FORBIDDEN
    );
    // Rate-limited requests are not recorded as rejections (a flood would fill the log).
    let rej = app
        .get_json("/api/v1/applications/demo/self-registration/rejections")
        .await;
    assert_eq!(rej["totalElements"], 4, "{rej}");
    assert!(app
        .metrics()
        .await
        .contains("epr_self_registration_refusals_total{reason=\"rate-limited\"}"));

    // Per claim token: 2 attempts at once, whoever sends them.
    let app = spawn_with(|s| {
        let r = &mut s.self_registration.rate_limit;
        r.per_source_per_minute = 0;
        r.per_claim_per_minute = 60;
        r.per_claim_burst = 2;
    })
    .await;
    set_policy(
        &app,
        json!({"mode": "claim-token", "endpointIdPattern": "ok-.*"}),
    )
    .await;
    let c = claim(&app, json!({})).await;
    let bad = json!({"endpointId": "bad", "appVersion": "demo-v1", "claimToken": c});
    for _ in 0..2 {
        refused(
            device(&app, "demo", &bad).await,
            StatusCode::FORBIDDEN,
            "endpoint-id-not-allowed",
            None,
        )
        .await;
    }
    let good = json!({"endpointId": "ok-1", "appVersion": "demo-v1", "claimToken": c});
    let r = device(&app, "demo", &good).await;
    assert!(r.headers().contains_key("retry-after"));
    refused(r, StatusCode::TOO_MANY_REQUESTS, "rate-limited", None).await;
    // Another claim token is not affected.
    let other = claim(&app, json!({})).await;
    let r = device(
        &app,
        "demo",
        &json!({"endpointId": "ok-2", "appVersion": "demo-v1", "claimToken": other}),
    )
    .await;
    registered(r, StatusCode::CREATED).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    registered(device(&app, "demo", &good).await, StatusCode::CREATED).await;
}

#[tokio::test]
async fn operator_scopes_are_enforced_and_device_tenants_follow_the_path() {
    use crate::auth_support::{assert_forbidden, spawn_auth};
    use epr_auth::testkit::{TestIssuer, TestKey};
    let issuer = TestIssuer::start(&[TestKey::Rsa1]).await;
    let app = spawn_auth(&[("acme", issuer.url())], unlimited).await;
    let read = issuer
        .token(TestKey::Rsa1)
        .scope("application:self-registration:read")
        .sign();
    let update = issuer
        .token(TestKey::Rsa1)
        .scope("application:self-registration:update")
        .sign();
    let nothing = issuer.token(TestKey::Rsa1).scope("endpoint:read").sign();
    let path = "/applications/demo/self-registration";
    let doc = json!({"mode": "open", "provisioningSecret": SECRET});
    assert_forbidden(
        app.send_as(&read, Method::PUT, path, &doc).await,
        "application:self-registration:update",
    )
    .await;
    assert_forbidden(
        app.get_as(&nothing, path).await,
        "application:self-registration:read",
    )
    .await;
    assert_forbidden(
        app.send_as(
            &read,
            Method::POST,
            "/applications/demo/claim-tokens",
            &json!({}),
        )
        .await,
        "application:self-registration:update",
    )
    .await;
    assert_forbidden(
        app.get_as(&update, "/applications/demo/claim-tokens").await,
        "application:self-registration:read",
    )
    .await;
    assert_forbidden(
        app.get_as(&nothing, "/applications/demo/self-registration/rejections")
            .await,
        "application:self-registration:read",
    )
    .await;
    let r = app.send_as(&update, Method::PUT, path, &doc).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(app.get_as(&read, path).await.status(), StatusCode::OK);

    // The device route of the tenant, without any bearer token.
    let body = json!({"endpointId": "t-1", "appVersion": "demo-v1", "provisioningSecret": SECRET});
    let r = app
        .client
        .post(app.url("/device/v1/tenants/acme/applications/demo/registrations"))
        .json(&body)
        .send()
        .await
        .unwrap();
    registered(r, StatusCode::CREATED).await;
    let ep = app
        .registry
        .get(
            &TenantId::parse("acme").unwrap(),
            &EndpointId::parse("t-1").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ep.app_version.as_str(), "demo-v1");
    // The default tenant (`kaa`) is not among the configured tenants here.
    let r = device(&app, "demo", &body).await;
    refused(r, StatusCode::NOT_FOUND, "unknown-application", None).await;
    let r = app
        .client
        .post(app.url("/device/v1/tenants/beta/applications/demo/registrations"))
        .json(&body)
        .send()
        .await
        .unwrap();
    refused(r, StatusCode::NOT_FOUND, "unknown-application", None).await;
    // The rejections are the tenant's.
    let rej = app
        .get_as(&read, "/applications/demo/self-registration/rejections")
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(rej["totalElements"], 0, "{rej}");
}

/// SIGKILL while devices register themselves (with the secret and with claim tokens):
/// after a restart every endpoint has a token row and every token row an endpoint, every
/// `201` the devices saw is registered with its token, and a claim token is used exactly
/// when the endpoint it was tried for exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_self_registration_loses_nothing_acknowledged() {
    use crate::child::EprCommand;
    use tokio::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_path_buf();
    let server = EprCommand::new(&data_dir)
        .envs(crate::helpers::store_env(&data_dir).await)
        .env("EPR_APPLICATIONS", "demo:demo-v1")
        .env("EPR__LOG__LEVEL", "warn")
        .env(
            "EPR__SELF_REGISTRATION__RATE_LIMIT__PER_SOURCE_PER_MINUTE",
            "0",
        )
        .env(
            "EPR__SELF_REGISTRATION__RATE_LIMIT__PER_CLAIM_PER_MINUTE",
            "0",
        )
        .start()
        .await;
    let client = reqwest::Client::new();
    let api = server.url("/api/v1");
    let r = client
        .put(format!("{api}/applications/demo/self-registration"))
        .json(&json!({"mode": "open", "provisioningSecret": SECRET}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .post(format!("{api}/applications/demo/claim-tokens"))
        .json(&json!({"count": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let pool: Vec<String> = r.json::<Value>().await.unwrap()["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["claimToken"].as_str().unwrap().to_owned())
        .collect();
    let pool = Arc::new(Mutex::new(pool));
    // (endpoint ID, claim token tried) of every attempt; (ID, token) of every 201.
    let attempts = Arc::new(Mutex::new(Vec::<(String, Option<String>)>::new()));
    let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let url = server.url("/device/v1/applications/demo/registrations");
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (client, url) = (client.clone(), url.clone());
        let (pool, attempts, acked) = (pool.clone(), attempts.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let id = format!("w{w}-{n}");
                let claim = if w % 2 == 0 {
                    pool.lock().await.pop()
                } else {
                    None
                };
                let body = match &claim {
                    Some(c) => json!({"endpointId": id, "appVersion": "demo-v1", "claimToken": c}),
                    None if w % 2 == 0 => return, // the pool is used up
                    None => json!({"endpointId": id, "appVersion": "demo-v1",
                                   "provisioningSecret": SECRET}),
                };
                attempts.lock().await.push((id.clone(), claim));
                let Ok(r) = client.post(&url).json(&body).send().await else {
                    return;
                };
                if r.status() != StatusCode::CREATED {
                    return;
                }
                let Ok(b) = r.json::<Value>().await else {
                    return;
                };
                acked
                    .lock()
                    .await
                    .push((id, b["endpointToken"].as_str().unwrap().to_owned()));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let attempts = attempts.lock().await.clone();
    let acked: BTreeMap<String, String> = acked.lock().await.iter().cloned().collect();
    assert!(
        acked.len() > 50,
        "the load ran ({} acknowledged)",
        acked.len()
    );

    // Restart on the same data (in process, to read the store through its port).
    let mut s = test_settings(&data_dir);
    s.add_applications("demo:demo-v1").unwrap();
    let app = spawn_settings(s).await;
    let store = app.registry.store();
    let (tenant, demo) = (kaa(), AppName::parse("demo").unwrap());
    let page = PageRequest {
        offset: 0,
        limit: 100,
        after: None,
    };
    let mut present = 0;
    for (id, claim) in &attempts {
        let eid = EndpointId::parse(id).unwrap();
        let exists = store.get(&tenant, &eid).await.unwrap().is_some();
        let tokens = store
            .list_tokens(&tenant, &eid, &TokenListQuery::default(), page)
            .await
            .unwrap();
        assert_eq!(
            tokens.total,
            u64::from(exists),
            "{id}: endpoint {exists}, {} token rows",
            tokens.total
        );
        if let Some(token) = acked.get(id) {
            assert!(exists, "acknowledged self-registration {id} was lost");
            let hash = EndpointToken::parse(token).unwrap().hash(&demo);
            let row = store.find_token(&tenant, &demo, &hash).await.unwrap();
            assert_eq!(
                row.map(|t| t.endpoint_id.to_string()).as_deref(),
                Some(id.as_str()),
                "{id}: its token"
            );
        }
        if let Some(c) = claim {
            let row = store
                .find_claim(&tenant, &demo, &claim_hash(&demo, c))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                row.used.as_ref().map(|u| u.endpoint_id.to_string()),
                exists.then(|| id.clone()),
                "{id}: claim token used exactly when the endpoint exists"
            );
        }
        present += usize::from(exists);
    }
    // Claims never tried are untouched.
    let tried: BTreeSet<&str> = attempts.iter().filter_map(|(_, c)| c.as_deref()).collect();
    for c in pool.lock().await.iter() {
        assert!(!tried.contains(c.as_str()));
        let row = store
            .find_claim(&tenant, &demo, &claim_hash(&demo, c))
            .await
            .unwrap()
            .unwrap();
        assert!(row.used.is_none());
    }
    assert_eq!(
        app.total("applicationName=demo").await as usize,
        present,
        "no endpoint besides those attempted"
    );
    eprintln!(
        "self-registration crash test: {} attempts, {} acknowledged, {present} present after SIGKILL",
        attempts.len(),
        acked.len()
    );
}
