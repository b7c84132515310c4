//! Operational behaviour: health, metrics, the OpenAPI document, unknown routes and
//! methods, the body limit, restarts and graceful shutdown.

use crate::helpers::{assert_error, spawn_app, spawn_settings, spawn_with, test_settings};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn health_and_liveness_report_up_with_version() {
    let app = spawn_app().await;
    for (path, want) in [
        (
            "/health",
            json!({"status": "UP", "version": env!("CARGO_PKG_VERSION"), "components": {"nats": "DISABLED", "auth": "DISABLED"}}),
        ),
        (
            "/health/live",
            json!({"status": "UP", "version": env!("CARGO_PKG_VERSION")}),
        ),
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body, want, "{path}");
    }
}

#[tokio::test]
async fn readiness_reports_up_with_checks() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut body: Value = r.json().await.unwrap();
    // Authentication is reported (its details are epr-auth's), and does not decide
    // readiness.
    let auth = body["components"]
        .as_object_mut()
        .unwrap()
        .remove("auth")
        .unwrap();
    assert_eq!(auth["status"], "DISABLED");
    assert_eq!(
        body,
        json!({
            "status": "UP",
            "checks": {"accepting": "UP", "store": "UP"},
            "components": {"nats": {
                "status": "DISABLED",
                "details": {"reason": "nats.url is not set: events are not published"}
            }}
        })
    );
}

#[tokio::test]
async fn every_ops_route_answers_at_the_root_only() {
    let app = spawn_app().await;
    for (method, path) in epr_http::OPS_ROUTES {
        assert_eq!(*method, "GET");
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        // Not under the API prefix.
        let r = app.get(path).await;
        assert_error(r, StatusCode::NOT_FOUND, "path", "route").await;
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_and_time_commits() {
    let app = spawn_app().await;
    app.register("m1", "demo-v1", json!({"a": 1})).await;
    app.register("m2", "demo-v1", json!({})).await;
    assert_eq!(app.get("/endpoints/m1").await.status(), StatusCode::OK);
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = r.text().await.unwrap();
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("epr_http_requests_total{"))
        .collect();
    assert!(
        requests
            .iter()
            .any(|l| l.contains(r#"route="/api/v1/endpoints""#)
                && l.contains(r#"status="201""#)
                && l.contains(r#"method="POST""#)),
        "{text}"
    );
    assert!(
        requests
            .iter()
            .any(|l| l.contains(r#"route="/api/v1/endpoints/{endpointId}""#)
                && l.contains(r#"status="200""#)),
        "route templates, not concrete paths: {text}"
    );
    assert!(
        !text.contains("/endpoints/m1"),
        "concrete IDs must not become labels"
    );
    assert!(text.contains("epr_store_commit_seconds_bucket{"), "{text}");
    assert!(text.contains("epr_store_commit_seconds_count"), "{text}");
    assert!(text.contains("epr_store_commit_seconds_sum"), "{text}");
    assert!(
        text.contains("epr_http_request_duration_seconds_bucket{"),
        "{text}"
    );
}

#[tokio::test]
async fn openapi_document_is_json_and_describes_the_api() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let text = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).expect("the document is JSON");
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/endpoints/{endpointId}"));
    for (method, path) in epr_http::API_ROUTES {
        let op = &paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is missing"))[method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} is missing");
    }
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let app = spawn_app().await;
    for path in [
        "/api/v1/nope",
        "/nope",
        "/api/v2/endpoints",
        "/api/v1/endpoints/e1/metadata/a/b",
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        let body = assert_error(r, StatusCode::NOT_FOUND, "path", "route").await;
        assert!(body["message"].as_str().unwrap().contains(path), "{body}");
    }
    let r = app
        .client
        .post(app.url("/api/v1/nope"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "path", "route").await;
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::PATCH, "/api/v1/endpoints"),
        (Method::PUT, "/epr/api/v1/endpoints"),
        (Method::DELETE, "/api/v1/endpoints/batch/status"),
        (Method::POST, "/api/v1/endpoints/e1/metadata"),
        (Method::POST, "/health"),
    ] {
        let r = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        // RFC 9110 §15.5.6: a 405 names the allowed methods.
        let allow = r.headers()["allow"].to_str().unwrap().to_owned();
        assert!(allow.contains("GET") || allow.contains("POST"), "{allow}");
        assert!(!allow.contains(method.as_str()), "{allow}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("application/json"), "{method} {path}: {ct}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], 405, "{body}");
        assert_eq!(body["field"], "method", "{body}");
        assert_eq!(body["rule"], "allowed-method", "{body}");
    }
}

#[tokio::test]
async fn body_larger_than_max_body_bytes_is_413() {
    let app = spawn_with(|s| s.server.max_body_bytes = 1024).await;
    let big = "x".repeat(2000);
    let r = app
        .post_endpoint(&json!({"endpointId": "big", "appVersion": {"name": "demo-v1"}, "metadata": {"k": big}}))
        .await;
    assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "body", "max-bytes").await;
    assert_error(
        app.get("/endpoints/big").await,
        StatusCode::NOT_FOUND,
        "endpointId",
        "exists",
    )
    .await;
    app.register("small", "demo-v1", json!({"k": 1})).await;
    for (method, path) in [
        (Method::PUT, "/endpoints/small/metadata"),
        (Method::PATCH, "/endpoints/small/metadata"),
        (Method::PUT, "/endpoints/small/metadata/k"),
        (Method::POST, "/endpoints/batch"),
    ] {
        let r = app
            .send_json(method.clone(), path, &json!({"k": big}))
            .await;
        assert_error(r, StatusCode::PAYLOAD_TOO_LARGE, "body", "max-bytes").await;
    }
    // A body without a Content-Length (chunked) is limited too.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let mut request = format!(
        "PUT /api/v1/endpoints/small/metadata HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        app.addr
    );
    for chunk in ["{\"k\":\"", big.as_str(), "\"}"] {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let end = read_head(&mut stream, &mut buf).await;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let md: Value = app
        .get("/endpoints/small/metadata")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(md, json!({"k": 1}));
}

#[tokio::test]
async fn restart_keeps_endpoints_metadata_and_etags() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_settings(test_settings(dir.path())).await;
    app.register("r1", "demo-v1", json!({"a": 1})).await;
    app.register("r2", "demo-v1", json!({})).await;
    let r = app
        .send_json(
            Method::PATCH,
            "/endpoints/r1/metadata",
            &json!({"b": {"c": [1, 2]}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .api(Method::PUT, "/endpoints/r2/app-version")
        .header("content-type", "application/json")
        .body(r#"{"name":"demo-v2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .send_json(
            Method::POST,
            "/endpoints/batch",
            &json!({"appVersion": {"name": "demo-v2"}, "endpoints": [{"endpointId": "rb1"}, {"endpointId": "bad id"}]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let task_id = r.json::<Value>().await.unwrap()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let snapshot = |app: &crate::helpers::TestApp| {
        let app_client = app.client.clone();
        let base = app.url("/api/v1");
        async move {
            let mut out = Vec::new();
            for path in [
                "/endpoints/r1?include=metadata",
                "/endpoints/r1/metadata",
                "/endpoints/r2?include=metadata",
                "/endpoints/r2/metadata",
                "/endpoints/rb1?include=metadata",
            ] {
                let r = app_client
                    .get(format!("{base}{path}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK, "{path}");
                let tag = r.headers()["etag"].to_str().unwrap().to_owned();
                out.push((path, tag, r.json::<Value>().await.unwrap()));
            }
            out
        }
    };
    let before = snapshot(&app).await;
    assert_eq!(before[1].2, json!({"a": 1, "b": {"c": [1, 2]}}));
    let data_dir = app.data_dir.clone();
    assert_eq!(data_dir, dir.path());
    app.stop().await;

    let app = spawn_settings(test_settings(&data_dir)).await;
    let after = snapshot(&app).await;
    assert_eq!(after, before);
    assert_eq!(app.total("").await, 3);
    // The batch outcome survives too (tokens do not: they are never stored).
    let r = app
        .get(&format!(
            "/endpoints/batch/status?appName=demo&taskId={task_id}"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["createdCount"], 1);
    assert_eq!(report["failedCount"], 1);
    assert!(
        report["created"][0].get("endpointToken").is_none(),
        "{report}"
    );
    // Writes continue from the persisted versions.
    let old_tag = &before[1].1;
    let r = app
        .api(Method::PUT, "/endpoints/r1/metadata/a")
        .header("content-type", "application/json")
        .header("if-match", old_tag)
        .body("2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), old_tag);
    // A new registration gets a fresh incarnation, so tags of old endpoints never match it.
    let r = app
        .api(Method::DELETE, "/endpoints/r2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app
        .post_endpoint(&json!({"endpointId": "r2", "appVersion": {"name": "demo-v1"}}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let new_tag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert!(before.iter().all(|(_, tag, _)| *tag != new_tag));
    app.stop().await;
}

/// Waits until `addr` refuses connections: the server has begun shutting down and closed
/// its listener.
async fn wait_until_refused(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr).await {
            Err(_) => return,
            Ok(probe) => drop(probe),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener is still open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads from `stream` into `buf` until it holds `"\r\n\r\n"` (the end of a response head).
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let read = async {
        loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return pos + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("a response head")
}

/// A request that is in flight when shutdown begins is finished and answered, and what it
/// wrote is durable. Made deterministic with `Expect: 100-continue`: the server answers
/// `100 Continue` only once the handler reads the body, so the request is certainly in
/// flight; shutdown then begins (and is observed: new connections are refused) before the
/// body is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_in_flight_batch() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_settings(test_settings(dir.path())).await;
    let (addr, data_dir) = (app.addr, app.data_dir.clone());
    let endpoints: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"endpointId": format!("gs-{i}"),
                   "metadata": {"i": i, "label": "x".repeat(40), "tags": ["a", "b"]}})
        })
        .collect();
    let body = json!({"appVersion": {"name": "demo-v1"}, "endpoints": endpoints}).to_string();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/endpoints/batch HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let end = read_head(&mut stream, &mut buf).await;
    let interim = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    buf.drain(..end);

    let stopping = tokio::spawn(app.stop());
    wait_until_refused(addr).await;
    assert!(!stopping.is_finished(), "shutdown waits for the request");

    stream.write_all(body.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let end = read_head(&mut stream, &mut buf).await;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 202"), "{head}");
    let mut rest = buf[end..].to_vec();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let accepted: Value = serde_json::from_slice(&rest).unwrap();
    let task_id = accepted["taskId"].as_str().unwrap().to_owned();
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("shutdown completes")
        .unwrap();

    let app = spawn_settings(test_settings(&data_dir)).await;
    assert_eq!(app.total("applicationVersionName=demo-v1").await, 1000);
    let r = app
        .get(&format!(
            "/endpoints/batch/status?appName=demo&taskId={task_id}"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["createdCount"], 1000);
    for i in [0, 499, 999] {
        let md: Value = app
            .get(&format!("/endpoints/gs-{i}/metadata"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(md["i"], i);
    }
    app.stop().await;
}
