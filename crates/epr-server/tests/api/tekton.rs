//! Kaa's Tekton as the source of applications and versions: a loopback Tekton serving the
//! REST paths EPR reads, and 17/SCMP messages on the shared nats-server.

use crate::helpers::{poll, spawn_settings, test_settings, TestApp};
use crate::nats_support::{shared_client, shared_url, unique_instance, wait_nats, PrivateNats};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use epr_events::scmp::{
    broadcast_subject, encode_broadcast, encode_targeted, targeted_subject, ConfigUpdate,
    UpdateType,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Data {
    apps: BTreeMap<String, BTreeSet<String>>,
    down: bool,
    requests: usize,
    /// `Authorization` headers of full reads.
    authorizations: Vec<Option<String>>,
}

type Shared = Arc<Mutex<Data>>;

/// A Tekton of the test's own: `GET /api/v1/applications`, `/applications/{app}`,
/// `/applications/{app}/app-versions/{ver}`, with Tekton's JSON shapes.
pub struct TestTekton {
    pub url: String,
    data: Shared,
    task: tokio::task::JoinHandle<()>,
}

fn version_json(v: &str) -> Value {
    json!({"name": v, "displayName": v, "description": null,
           "createdDate": "2024-01-01T00:00:00Z", "updatedDate": "2024-01-01T00:00:00Z"})
}

fn app_json(app: &str, versions: &BTreeSet<String>) -> Value {
    json!({"name": app, "displayName": app,
           "createdDate": "2024-01-01T00:00:00Z", "updatedDate": "2024-01-01T00:00:00Z",
           "versions": versions.iter().map(|v| version_json(v)).collect::<Vec<_>>()})
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "down"})),
    )
        .into_response()
}

async fn list(State(d): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    let mut d = d.lock().unwrap();
    d.requests += 1;
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    d.authorizations.push(auth);
    if d.down {
        return unavailable();
    }
    let apps: Vec<Value> = d.apps.iter().map(|(a, vs)| app_json(a, vs)).collect();
    Json(Value::Array(apps)).into_response()
}

async fn one(State(d): State<Shared>, Path(app): Path<String>) -> Response {
    let mut d = d.lock().unwrap();
    d.requests += 1;
    if d.down {
        return unavailable();
    }
    match d.apps.get(&app) {
        Some(vs) => Json(app_json(&app, vs)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn version(State(d): State<Shared>, Path((app, ver)): Path<(String, String)>) -> Response {
    let mut d = d.lock().unwrap();
    d.requests += 1;
    if d.down {
        return unavailable();
    }
    match d.apps.get(&app).filter(|vs| vs.contains(&ver)) {
        Some(_) => Json(version_json(&ver)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

impl TestTekton {
    pub async fn start(apps: &[(&str, &[&str])]) -> Self {
        let data: Shared = Arc::default();
        for (a, vs) in apps {
            data.lock()
                .unwrap()
                .apps
                .insert(a.to_string(), vs.iter().map(|v| v.to_string()).collect());
        }
        let router = Router::new()
            .route("/api/v1/applications", get(list))
            .route("/api/v1/applications/{app}", get(one))
            .route(
                "/api/v1/applications/{app}/app-versions/{ver}",
                get(version),
            )
            .with_state(data.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self { url, data, task }
    }

    pub fn set(&self, app: &str, version: &str, present: bool) {
        let mut d = self.data.lock().unwrap();
        let vs = d.apps.entry(app.to_owned()).or_default();
        if present {
            vs.insert(version.to_owned());
        } else {
            vs.remove(version);
        }
    }

    pub fn set_down(&self, down: bool) {
        self.data.lock().unwrap().down = down;
    }

    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.data.lock().unwrap().authorizations.clone()
    }

    pub fn requests(&self) -> usize {
        self.data.lock().unwrap().requests
    }
}

impl Drop for TestTekton {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An app on NATS `nats` reading `tekton`, in `dir`.
async fn spawn_on_tekton(
    tekton: &TestTekton,
    nats: &str,
    instance: &str,
    dir: &std::path::Path,
) -> TestApp {
    let mut s = test_settings(dir);
    s.nats.url = nats.to_owned();
    s.service.instance_name = instance.to_owned();
    s.kaa.tekton.enabled = true;
    s.kaa.tekton.url = tekton.url.clone();
    s.kaa.tekton.timeout_ms = 1000;
    let app = spawn_settings(s).await;
    wait_nats(&app, "UP").await;
    app
}

fn update(tenant: Option<&str>, app: Option<&str>, ver: Option<&str>) -> ConfigUpdate {
    ConfigUpdate {
        correlation_id: "test-correlation".into(),
        timestamp: 0,
        originator_replica_id: Some("tekton-0".into()),
        tenant_id: tenant.map(Into::into),
        app_name: app.map(Into::into),
        app_version_name: ver.map(Into::into),
    }
}

async fn registration_status(app: &TestApp, version: &str) -> StatusCode {
    let r = app
        .post_endpoint(&json!({"appVersion": {"name": version}}))
        .await;
    StatusCode::from_u16(r.status().as_u16()).unwrap()
}

/// Publishes `payload` on `subject` until `ok` holds (the listener's subscription may not
/// be in place at the first message; repeating an update is harmless), within `limit`.
async fn publish_until<F, Fut>(
    nats: &async_nats::Client,
    subject: &str,
    payload: Vec<u8>,
    limit: Duration,
    ok: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    poll(limit, Duration::from_millis(20), || {
        let (nats, payload) = (nats.clone(), payload.clone());
        let probe = ok();
        async move {
            nats.publish(subject.to_owned(), payload.into())
                .await
                .unwrap();
            nats.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            probe.await
        }
    })
    .await
}

fn scmp_metric(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("epr_scmp_messages_dropped_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn versions_follow_tekton_upserts_and_deletes() {
    let tekton = TestTekton::start(&[("tk", &["tk-v1"])]).await;
    let dir = tempfile::tempdir().unwrap();
    let instance = unique_instance("eprtk");
    let app = spawn_on_tekton(&tekton, &shared_url(), &instance, dir.path()).await;
    let nats = shared_client().await;
    // Read at start: Tekton's version and the local ones are all accepted.
    assert_eq!(
        registration_status(&app, "tk-v1").await,
        StatusCode::CREATED
    );
    assert_eq!(
        registration_status(&app, "demo-v1").await,
        StatusCode::CREATED
    );
    assert_eq!(
        registration_status(&app, "tk-v2").await,
        StatusCode::BAD_REQUEST
    );
    let listed = app.get_json("/api/v1/applications/tk").await;
    assert_eq!(listed["origins"], json!(["tekton"]), "{listed}");
    assert_eq!(
        listed["versions"][0]["origins"],
        json!(["tekton"]),
        "{listed}"
    );
    let demo = app.get_json("/api/v1/applications/demo").await;
    assert_eq!(demo["origins"], json!(["environment"]), "{demo}");

    // Added in Tekton, announced by a broadcast upsert of that version: accepted within a
    // second of the message.
    tekton.set("tk", "tk-v2", true);
    let subject = broadcast_subject("tekton", UpdateType::Upsert);
    let payload = encode_broadcast(&update(Some("kaa"), Some("tk"), Some("tk-v2"))).unwrap();
    let started = std::time::Instant::now();
    publish_until(&nats, &subject, payload, Duration::from_secs(5), || async {
        match registration_status(&app, "tk-v2").await {
            StatusCode::CREATED => Ok(()),
            s => Err(format!("tk-v2 still refused: {s}")),
        }
    })
    .await;
    // Within a second of the first message (repeats only cover the subscription's start).
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    app.register("kept-tk-v2", "tk-v2", json!({"k": 1})).await;

    // Deleted in Tekton, announced by a targeted delete to this instance: refused, while
    // the endpoint that has it stays readable and keeps it.
    tekton.set("tk", "tk-v2", false);
    let mut u = update(Some("kaa"), Some("tk"), None);
    u.originator_replica_id = None;
    let subject = targeted_subject(&instance, UpdateType::Delete);
    publish_until(
        &nats,
        &subject,
        encode_targeted(&u).unwrap(),
        Duration::from_secs(5),
        || async {
            match registration_status(&app, "tk-v2").await {
                StatusCode::BAD_REQUEST => Ok(()),
                s => Err(format!("tk-v2 still accepted: {s}")),
            }
        },
    )
    .await;
    let r = app
        .post_endpoint(&json!({"appVersion": {"name": "tk-v2"}}))
        .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["rule"], "known-app-version", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("removed"),
        "{body}"
    );
    let ep = app.get_json("/api/v1/endpoints/kept-tk-v2").await;
    assert_eq!(ep["appVersion"]["name"], "tk-v2", "{ep}");
    // Moving an endpoint to the removed version: the usual 400.
    let r = app
        .send_json(
            reqwest::Method::PUT,
            "/endpoints/kept-tk-v2/app-version",
            &json!({"name": "tk-v2"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let listed = app.get_json("/api/v1/applications/tk").await;
    assert_eq!(
        listed["removedVersions"],
        json!([{"name": "tk-v2"}]),
        "{listed}"
    );
    // The application's filters keep working.
    let r = app
        .send_json(
            reqwest::Method::POST,
            "/applications/tk/filters",
            &json!({"name": "k", "mongoQuery": {"application_version": "tk-v2"}}),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Stored durably for the next start.
    let stored = app
        .registry
        .store()
        .get_setting("tekton.catalogue.kaa")
        .await
        .unwrap()
        .unwrap();
    let stored: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["applications"]["tk"], json!(["tk-v1"]), "{stored}");
    assert_eq!(stored["removed"]["tk-v2"], "tk", "{stored}");
    app.stop().await;
}

#[tokio::test]
async fn other_instances_tenants_and_malformed_messages_are_ignored() {
    let tekton = TestTekton::start(&[("tko", &["tko-v1"])]).await;
    let dir = tempfile::tempdir().unwrap();
    let instance = unique_instance("eprtko");
    // A NATS of its own: other tests' broadcasts would make this app read Tekton.
    let private = PrivateNats::start(dir.path());
    let app = spawn_on_tekton(&tekton, &private.url(), &instance, &dir.path().join("data")).await;
    tekton.set("tko", "tko-v2", true);
    let nats = private.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = app.metrics().await;
    // Another service instance's targeted message, and a broadcast for a tenant this
    // service does not serve: no re-read happens.
    let mut u = update(Some("kaa"), Some("tko"), Some("tko-v2"));
    u.originator_replica_id = None;
    let other = targeted_subject(&format!("{instance}x"), UpdateType::Upsert);
    let broadcast = broadcast_subject("tekton", UpdateType::Upsert);
    let foreign = encode_broadcast(&update(Some("acme"), Some("tko"), Some("tko-v2"))).unwrap();
    let requests = tekton.requests();
    for _ in 0..5 {
        nats.publish(other.clone(), encode_targeted(&u).unwrap().into())
            .await
            .unwrap();
        nats.publish(broadcast.clone(), foreign.clone().into())
            .await
            .unwrap();
        // Malformed: not a datum of the schema; and a forbidden null pattern.
        nats.publish(broadcast.clone(), vec![0xff, 0x01].into())
            .await
            .unwrap();
        nats.publish(
            broadcast.clone(),
            encode_broadcast(&update(None, Some("tko"), None))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
        nats.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = app.metrics().await;
    for reason in ["undecodable", "invalid-pattern", "unknown-tenant"] {
        assert!(
            scmp_metric(&after, reason) > scmp_metric(&before, reason),
            "{reason} not counted:\n{after}"
        );
    }
    assert_eq!(tekton.requests(), requests, "Tekton was read");
    assert_eq!(
        registration_status(&app, "tko-v2").await,
        StatusCode::BAD_REQUEST
    );
    // The service still follows messages meant for it.
    let payload = encode_broadcast(&update(Some("kaa"), None, None)).unwrap();
    publish_until(
        &nats,
        &broadcast,
        payload,
        Duration::from_secs(5),
        || async {
            match registration_status(&app, "tko-v2").await {
                StatusCode::CREATED => Ok(()),
                s => Err(format!("tko-v2 still refused: {s}")),
            }
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn tekton_down_at_start_uses_the_stored_catalogue() {
    let tekton = TestTekton::start(&[("tkd", &["tkd-v1"])]).await;
    let dir = tempfile::tempdir().unwrap();
    let instance = unique_instance("eprtkd");
    let app = spawn_on_tekton(&tekton, &shared_url(), &instance, dir.path()).await;
    assert_eq!(
        registration_status(&app, "tkd-v1").await,
        StatusCode::CREATED
    );
    app.stop().await;

    tekton.set_down(true);
    let app = spawn_on_tekton(&tekton, &shared_url(), &instance, dir.path()).await;
    // Started on the stored catalogue, and says so.
    assert_eq!(
        registration_status(&app, "tkd-v1").await,
        StatusCode::CREATED
    );
    assert_eq!(
        registration_status(&app, "tkd-v2").await,
        StatusCode::BAD_REQUEST
    );
    let health = app.get_json("/health/ready").await;
    let t = &health["components"]["tekton"];
    assert_eq!(t["status"], "DOWN", "{health}");
    assert_eq!(
        t["details"]["tenants"]["kaa"]["source"], "stored",
        "{health}"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("epr_config_refresh_failures_total{source=\"tekton\"}"),
        "{metrics}"
    );
    // Back up with a new version: the retry picks it up without any message.
    tekton.set("tkd", "tkd-v2", true);
    tekton.set_down(false);
    poll(
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            match registration_status(&app, "tkd-v2").await {
                StatusCode::CREATED => Ok(()),
                s => Err(format!("tkd-v2 still refused: {s}")),
            }
        },
    )
    .await;
    let health = app.get_json("/health/ready").await;
    assert_eq!(health["components"]["tekton"]["status"], "UP", "{health}");
    app.stop().await;
}

#[tokio::test]
async fn two_replicas_converge_after_one_broadcast() {
    let tekton = TestTekton::start(&[("tkr", &["tkr-v1"])]).await;
    let instance = unique_instance("eprtkr");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = spawn_on_tekton(&tekton, &shared_url(), &instance, d1.path()).await;
    let b = spawn_on_tekton(&tekton, &shared_url(), &instance, d2.path()).await;
    // Let both subscriptions settle, then send exactly one broadcast.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tekton.set("tkr", "tkr-v2", true);
    tekton.set("tkr2", "tkr2-v1", true);
    let nats = shared_client().await;
    nats.publish(
        broadcast_subject("tekton", UpdateType::Upsert),
        encode_broadcast(&update(None, None, None)).unwrap().into(),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    for app in [&a, &b] {
        poll(
            Duration::from_secs(2),
            Duration::from_millis(20),
            || async {
                let c = app.get_json("/api/v1/applications").await;
                let names: Vec<&str> = c["content"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|x| x["name"].as_str())
                    .collect();
                if names.contains(&"tkr2") {
                    Ok(())
                } else {
                    Err(format!("not converged: {c}"))
                }
            },
        )
        .await;
    }
    assert_eq!(
        a.get_json("/api/v1/applications").await,
        b.get_json("/api/v1/applications").await
    );
    assert_eq!(registration_status(&b, "tkr-v2").await, StatusCode::CREATED);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn with_authentication_tekton_is_called_with_the_service_token() {
    use epr_auth::testkit::{TestIssuer, TestKey};
    let issuer = TestIssuer::start(&[TestKey::Rsa1]).await;
    let tekton = TestTekton::start(&[("tka", &["tka-v1"])]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.add_tenants(&format!("acme={}", issuer.url())).unwrap();
    s.kaa.tekton.enabled = true;
    s.kaa.tekton.url = tekton.url.clone();
    s.kaa.tekton.client_id = "epr".into();
    s.kaa.tekton.client_secret = "secret".into();
    let app = spawn_settings(s).await;
    // Read at start with a client-credentials token of the tenant's issuer.
    let auths = tekton.authorizations();
    assert!(
        auths
            .iter()
            .any(|a| a.as_deref().is_some_and(|a| a.starts_with("Bearer svc-"))),
        "{auths:?}"
    );
    assert!(issuer.token_requests() >= 1);
    let acme = epr_core::ids::TenantId::parse("acme").unwrap();
    let catalog = app.registry.catalog(&acme);
    let v1 = epr_core::ids::AppVersionName::parse("tka-v1").unwrap();
    assert_eq!(catalog.resolve(&v1).unwrap().as_str(), "tka");
    // Tekton's entries are the tenant's own: another tenant does not see them.
    let other = epr_core::ids::TenantId::parse("kaa").unwrap();
    assert!(app.registry.catalog(&other).resolve(&v1).is_err());
    app.stop().await;
}
