//! Authentication and authorization of the REST API, on a real loopback server with a
//! real store, behind a fake authenticator that maps fixed token strings to principals
//! (real tokens are checked end to end in the server's tests).

use async_trait::async_trait;
use epr_core::apps::AppCatalog;
use epr_core::auth::{AuthError, Authenticator, Principal, Scope, ScopeSet};
use epr_core::ids::{AppName, AppVersionName, TenantId};
use epr_core::ports::{Clock, IdSource, Store};
use epr_core::registry::{Registry, RegistrySettings};
use epr_core::Timestamp;
use epr_http::{AppState, HttpSettings, API_PREFIXES, API_ROUTES};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Tokens: `none` (valid, no scope), `all` / `all-beta` (every scope in acme / beta),
/// `reader` (endpoint:read tenant-wide), `e1-read` (endpoint:read on endpoint-e1 only), `demo` (every scope on application-demo
/// only), `expired` (invalid), `down` (cannot be checked).
struct FakeAuth {
    enabled: bool,
}

fn principal(tenant: &str, scopes: ScopeSet, on: &[(&str, ScopeSet)]) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).unwrap(),
        subject: Some("tester".into()),
        scopes,
        resource_scopes: on
            .iter()
            .map(|(r, s)| ((*r).to_owned(), *s))
            .collect::<BTreeMap<_, _>>(),
        expires_at_ms: Some(i64::MAX),
    }
}

#[async_trait]
impl Authenticator for FakeAuth {
    fn enabled(&self) -> bool {
        self.enabled
    }

    async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let read: ScopeSet = [Scope::EndpointRead].into_iter().collect();
        let p = match token {
            "none" => Ok(principal("acme", ScopeSet::EMPTY, &[])),
            "all" => Ok(principal("acme", ScopeSet::all(), &[])),
            "all-beta" => Ok(principal("beta", ScopeSet::all(), &[])),
            "reader" => Ok(principal("acme", read, &[])),
            "e1-read" => Ok(principal("acme", ScopeSet::EMPTY, &[("endpoint-e1", read)])),
            "demo" => Ok(principal(
                "acme",
                ScopeSet::EMPTY,
                &[("application-demo", ScopeSet::all())],
            )),
            "down" => Err(AuthError::Unavailable("issuer unreachable".into())),
            "expired" => Err(AuthError::Invalid("the token expired at \"12:00\"".into())),
            _ => Err(AuthError::Invalid("unknown token".into())),
        };
        p.map(Arc::new)
    }
}

struct TestClock;
impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        Timestamp(1_700_000_000_000)
    }
}

struct Ids(AtomicU64);
impl IdSource for Ids {
    fn endpoint_id(&self) -> String {
        format!("ep{}", self.0.fetch_add(1, Ordering::Relaxed))
    }
    fn token(&self) -> String {
        format!("tok{}", self.0.fetch_add(1, Ordering::Relaxed))
    }
    fn task_id(&self) -> String {
        format!("task{}", self.0.fetch_add(1, Ordering::Relaxed))
    }
    fn filter_id(&self) -> String {
        format!(
            "00000000-0000-4000-8000-{:012}",
            self.0.fetch_add(1, Ordering::Relaxed)
        )
    }
}

struct Server {
    addr: SocketAddr,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn serve(auth_enabled: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = epr_store::EmbeddedStore::open(epr_store::EmbeddedConfig::new(dir.path())).unwrap();
    let mut catalog = AppCatalog::new(false);
    for (app, v) in [("demo", "demo-v1"), ("other", "other-v1")] {
        catalog
            .add(
                AppName::parse(app).unwrap(),
                AppVersionName::parse(v).unwrap(),
            )
            .unwrap();
    }
    let registry = Arc::new(Registry::new(
        Arc::new(store) as Arc<dyn Store>,
        catalog,
        RegistrySettings::default(),
        Arc::new(TestClock),
        Arc::new(Ids(AtomicU64::new(1))),
    ));
    let state = AppState {
        registry,
        auth: Arc::new(FakeAuth {
            enabled: auth_enabled,
        }),
        anonymous: Arc::new(Principal::anonymous(TenantId::parse("kaa").unwrap())),
        open_routes: vec!["/health/live".to_owned(), "/openapi.json".to_owned()].into(),
        settings: HttpSettings {
            log_requests: false,
            ..HttpSettings::default()
        },
        ready: Arc::new(AtomicBool::new(true)),
        metrics: None,
        components: Arc::new([]),
        device: Default::default(),
    };
    let cors = epr_http::cors::CorsSettings {
        allowed_origins: vec!["https://console.example".into()],
        ..Default::default()
    };
    let router = epr_http::cors::with_cors(epr_http::router(state), &cors).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Server {
        addr,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Server {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .client
            .request(method, format!("http://{}{path}", self.addr));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }
}

/// A concrete request for a route template: parameters filled in, the query and body the
/// operation needs to get past validation.
fn request_for(method: &str, template: &str) -> (Method, String, Option<Value>) {
    let mut path = template
        .replace("{endpointId}", "e1")
        .replace("{metadataKey}", "k")
        .replace("{applicationName}", "demo")
        .replace("{filterId}", "00000000-0000-4000-8000-000000000001")
        .replace("{endpointTokenId}", "t1");
    if template == "/endpoints/batch/status" {
        path.push_str("?appName=demo&taskId=t1");
    }
    let body = match (method, template) {
        ("POST", "/endpoints") => Some(json!({"appVersion": {"name": "demo-v1"}})),
        ("POST", "/endpoints/batch") => {
            Some(json!({"appVersion": {"name": "demo-v1"}, "endpoints": [{}]}))
        }
        ("POST", _) => Some(json!({"name": "f", "mongoQuery": "{}"})),
        ("PUT", "/endpoints/{endpointId}/app-version") => Some(json!({"name": "demo-v1"})),
        ("PUT" | "PATCH", _) => Some(json!({"a": 1})),
        _ => None,
    };
    (Method::from_bytes(method.as_bytes()).unwrap(), path, body)
}

#[tokio::test]
async fn every_api_route_needs_a_token_and_a_scope() {
    let s = serve(true).await;
    for prefix in API_PREFIXES {
        for (method, template) in API_ROUTES {
            let (m, path, body) = request_for(method, template);
            let path = format!("{prefix}{path}");
            let what = format!("{method} {path}");

            let (status, headers, err) = s.call(m.clone(), &path, None, body.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {err}");
            assert_eq!(
                headers["www-authenticate"], "Bearer realm=\"epr\"",
                "{what}"
            );
            assert_eq!(err["status"], 401, "{what}");
            assert_eq!(err["rule"], "bearer-token", "{what}");

            let (status, _, err) = s.call(m.clone(), &path, Some("none"), body.clone()).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {err}");
            assert_eq!(err["status"], 403, "{what}");
            let rule = err["rule"].as_str().unwrap();
            let scope = Scope::parse(rule.strip_prefix("scope:").unwrap());
            assert!(scope.is_some(), "{what}: rule {rule}");
            assert!(
                err["message"].as_str().unwrap().contains(&rule[6..]),
                "{what}: {err}"
            );

            // With every scope the route is reached (whatever it then answers).
            let (status, _, err) = s.call(m, &path, Some("all"), body).await;
            assert!(
                status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                "{what}: {status} {err}"
            );
        }
    }
}

/// Devices have no bearer token: the device routes are reached without one (and a bearer
/// token changes nothing), answering what the self-registration rules say.
#[tokio::test]
async fn device_routes_need_no_token() {
    let s = serve(true).await;
    for (method, template) in epr_http::DEVICE_ROUTES {
        let path = template
            .replace("{tenant}", "kaa")
            .replace("{applicationName}", "demo");
        for token in [None, Some("none")] {
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let body = json!({"appVersion": "demo-v1", "provisioningSecret": "0123456789abcdef"});
            let (status, _, err) = s.call(m, &path, token, Some(body)).await;
            // No policy: closed, whoever asks.
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {err}");
            assert_eq!(err["reason"], "self-registration-closed", "{path}");
        }
    }
}

#[tokio::test]
async fn invalid_and_uncheckable_tokens() {
    let s = serve(true).await;
    let (status, headers, err) = s
        .call(Method::GET, "/api/v1/endpoints", Some("expired"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers["www-authenticate"],
        "Bearer realm=\"epr\", error=\"invalid_token\", error_description=\"the token expired at '12:00'\""
    );
    assert_eq!(err["rule"], "valid-token");
    assert!(
        err["message"].as_str().unwrap().contains("expired"),
        "{err}"
    );

    let (status, headers, err) = s
        .call(Method::GET, "/api/v1/endpoints", Some("down"), None)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(headers["retry-after"], "1");
    // 5xx bodies say nothing of the cause.
    assert!(
        !err["message"].as_str().unwrap().contains("issuer"),
        "{err}"
    );

    // Not a bearer token at all.
    let resp = s
        .client
        .get(format!("http://{}/api/v1/endpoints", s.addr))
        .header("Authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    // The scheme is case-insensitive.
    let resp = s
        .client
        .get(format!("http://{}/api/v1/applications", s.addr))
        .header("Authorization", "bEARer all")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn open_routes_and_preflights_need_no_token() {
    let s = serve(true).await;
    for path in ["/health/live", "/openapi.json"] {
        let (status, _, _) = s.call(Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // Not listed as open: needs a token like the API.
    let (status, _, _) = s.call(Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = s.call(Method::GET, "/health", Some("none"), None).await;
    assert_eq!(status, StatusCode::OK);

    let resp = s
        .client
        .request(
            Method::OPTIONS,
            format!("http://{}/api/v1/endpoints", s.addr),
        )
        .header("Origin", "https://console.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://console.example"
    );
    // A refusal still carries CORS headers, so the browser lets the script read it.
    let resp = s
        .client
        .get(format!("http://{}/api/v1/endpoints", s.addr))
        .header("Origin", "https://console.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn grants_on_single_resources() {
    let s = serve(true).await;
    // endpoint:read on endpoint-e1 only: e1 may be read (it does not exist: 404), e2 not,
    // and the tenant-wide listing not.
    let (status, _, err) = s
        .call(Method::GET, "/api/v1/endpoints/e1", Some("e1-read"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let (status, _, err) = s
        .call(Method::GET, "/api/v1/endpoints/e2", Some("e1-read"), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    assert_eq!(err["rule"], "scope:endpoint:read");
    assert!(
        err["message"].as_str().unwrap().contains("endpoint-e2"),
        "{err}"
    );
    let (status, _, _) = s
        .call(Method::GET, "/api/v1/endpoints", Some("e1-read"), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = s
        .call(
            Method::DELETE,
            "/api/v1/endpoints/e1",
            Some("e1-read"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Every scope on application-demo: registers into demo, not into other; lists only
    // demo among the applications.
    let (status, _, err) = s
        .call(
            Method::POST,
            "/api/v1/endpoints",
            Some("demo"),
            Some(json!({"appVersion": {"name": "demo-v1"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{err}");
    let (status, _, err) = s
        .call(
            Method::POST,
            "/api/v1/endpoints",
            Some("demo"),
            Some(json!({"appVersion": {"name": "other-v1"}})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    assert_eq!(err["rule"], "scope:application:endpoint:create");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("application-other"));
    let (status, _, list) = s
        .call(Method::GET, "/api/v1/applications", Some("demo"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["totalElements"], 1);
    assert_eq!(list["content"][0]["name"], "demo");
    let (status, _, list) = s
        .call(Method::GET, "/api/v1/applications", Some("all"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["totalElements"], 2);
    let (status, _, _) = s
        .call(
            Method::GET,
            "/api/v1/applications/other/filters",
            Some("demo"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = s
        .call(
            Method::GET,
            "/api/v1/applications/demo/filters",
            Some("demo"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn filter_membership_needs_filter_read() {
    let s = serve(true).await;
    let (status, _, created) = s
        .call(
            Method::POST,
            "/api/v1/endpoints",
            Some("all"),
            Some(json!({"appVersion": {"name": "demo-v1"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["endpointId"].as_str().unwrap();
    // `reader` holds endpoint:read tenant-wide, no filter scope.
    for ok in [
        "/api/v1/endpoints".to_owned(),
        format!("/api/v1/endpoints/{id}"),
    ] {
        let (status, _, body) = s.call(Method::GET, &ok, Some("reader"), None).await;
        assert_eq!(status, StatusCode::OK, "{ok}: {body}");
    }
    for refused in [
        "/api/v1/endpoints?include=filters".to_owned(),
        "/api/v1/endpoints?applicationName=demo&filterId=00000000-0000-4000-8000-000000000009"
            .to_owned(),
        format!("/api/v1/endpoints/{id}?include=filters"),
    ] {
        let (status, _, err) = s.call(Method::GET, &refused, Some("reader"), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{refused}: {err}");
        assert_eq!(
            err["rule"], "scope:application:endpoint-filter:read",
            "{refused}"
        );
    }
    let (status, _, body) = s
        .call(
            Method::GET,
            &format!("/api/v1/endpoints/{id}?include=filters"),
            Some("all"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn tenants_are_isolated() {
    let s = serve(true).await;
    let (status, _, created) = s
        .call(
            Method::POST,
            "/api/v1/endpoints",
            Some("all"),
            Some(json!({"appVersion": {"name": "demo-v1"}, "endpointId": "shared-id"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, _, _) = s
        .call(
            Method::GET,
            "/api/v1/endpoints/shared-id",
            Some("all"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Another tenant neither sees it nor is kept from using the same ID.
    let (status, _, _) = s
        .call(
            Method::GET,
            "/api/v1/endpoints/shared-id",
            Some("all-beta"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, _, list) = s
        .call(Method::GET, "/api/v1/endpoints", Some("all-beta"), None)
        .await;
    assert_eq!(list["totalElements"], 0);
    let (status, _, err) = s
        .call(
            Method::POST,
            "/api/v1/endpoints",
            Some("all-beta"),
            Some(json!({"appVersion": {"name": "demo-v1"}, "endpointId": "shared-id"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{err}");
}

#[tokio::test]
async fn without_authentication_every_caller_is_the_default_tenant() {
    let s = serve(false).await;
    let (status, _, created) = s
        .call(
            Method::POST,
            "/api/v1/endpoints",
            None,
            Some(json!({"appVersion": {"name": "demo-v1"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    // A token is not looked at, not even a malformed one.
    let resp = s
        .client
        .get(format!("http://{}/api/v1/endpoints", s.addr))
        .header("Authorization", "Basic !!")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let list: Value = resp.json().await.unwrap();
    assert_eq!(list["totalElements"], 1);
    // The served document describes this server: no token is asked for.
    let (_, _, doc) = s.call(Method::GET, "/openapi.json", None, None).await;
    assert!(doc["components"].get("securitySchemes").is_none());
    assert!(doc["paths"]["/endpoints"]["get"].get("security").is_none());
    assert!(doc["paths"]["/endpoints"]["get"]["responses"]
        .get("401")
        .is_none());
    let on = serve(true).await;
    let (_, _, doc) = on.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(
        doc["paths"]["/endpoints"]["get"]["security"][0]["bearerAuth"],
        json!([])
    );
}
