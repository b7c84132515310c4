//! Observability: `X-Request-Id` (echoed, replaced or generated, and the generated one is
//! the events' `correlationId`), the request log, no colour codes in a pipe, the start-up
//! summary, and `/metrics` (a `# HELP` for every metric, `process_*`, `epr_build_info`).

use crate::child::{free_port, Epr, EprCommand};
use crate::helpers::spawn_app;
use crate::nats_support::{collect, shared_url, spawn_on_nats, subscribe_events, unique_instance};
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

fn request_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-request-id")
        .expect("every response has an X-Request-Id")
        .to_str()
        .unwrap()
        .to_owned()
}

fn assert_generated(id: &str) {
    let u = uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("not a UUID: {id:?}"));
    assert_eq!(u.get_version_num(), 4, "{id}");
}

#[tokio::test]
async fn request_ids_are_echoed_replaced_or_generated() {
    let app = spawn_app().await;
    // Kept: a sane caller ID is echoed, on API, operational and unknown routes alike.
    for path in ["/api/v1/endpoints/nope", "/health", "/no/such/route"] {
        let r = app
            .client
            .get(app.url(path))
            .header("x-request-id", "caller-id_1.2:3")
            .send()
            .await
            .unwrap();
        assert_eq!(request_id(&r), "caller-id_1.2:3", "{path}");
    }
    let longest = "x".repeat(128);
    let r = app
        .api(Method::GET, "/endpoints/nope")
        .header("x-request-id", &longest)
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&r), longest);

    // Generated when absent: a fresh UUID per request.
    let a = request_id(&app.get("/endpoints/nope").await);
    let b = request_id(&app.get("/endpoints/nope").await);
    assert_generated(&a);
    assert_generated(&b);
    assert_ne!(a, b);

    // Replaced, never echoed: too long, spaces, control or non-ASCII bytes, empty.
    let bad: [HeaderValue; 5] = [
        HeaderValue::from_str(&"x".repeat(129)).unwrap(),
        HeaderValue::from_static("two words"),
        HeaderValue::from_static("tab\there"),
        HeaderValue::from_bytes("caf\u{e9}".as_bytes()).unwrap(),
        HeaderValue::from_static(""),
    ];
    for v in bad {
        let r = app
            .api(Method::GET, "/endpoints/nope")
            .header("x-request-id", v.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let id = request_id(&r);
        assert_ne!(id.as_bytes(), v.as_bytes());
        assert_generated(&id);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_generated_request_id_is_the_correlation_id_of_the_events() {
    let instance = unique_instance("obs");
    let (_nats, mut sub) = subscribe_events(&instance).await;
    let app = spawn_on_nats(&shared_url(), &instance, |_| {}).await;

    let r = app
        .post_endpoint(&json!({"endpointId": "ep-obs", "appVersion": {"name": "demo-v1"}, "metadata": {"k": 1}}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let registered = request_id(&r);
    assert_generated(&registered);
    // An invalid caller ID is replaced, and the replacement is what the events carry.
    let r = app
        .api(Method::DELETE, "/endpoints/ep-obs")
        .header("x-request-id", "not valid")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let unregistered = request_id(&r);
    assert_generated(&unregistered);

    let events = collect(&mut sub, 3, Duration::from_secs(10)).await;
    let got: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.kind(), e.str("correlationId")))
        .collect();
    assert_eq!(
        got,
        [
            ("lifecycle.registered".into(), registered.clone()),
            ("metadata.updated".into(), registered),
            ("lifecycle.unregistered".into(), unregistered),
        ]
    );
    app.stop().await;
}

/// `# TYPE` of each metric family, and the names that have a `# HELP`.
fn families(text: &str) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let (mut types, mut helps) = (BTreeMap::new(), BTreeSet::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.trim().is_empty(), "empty HELP for {name}");
            helps.insert(name.to_owned());
        }
    }
    (types, helps)
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Made-up HTTP methods share one `method="other"` label: each distinct label value would
/// be a series kept for the life of the process.
#[tokio::test]
async fn unknown_methods_do_not_grow_the_metrics() {
    let app = spawn_app().await;
    for i in 0..3 {
        let method = reqwest::Method::from_bytes(format!("XMETHOD{i}").as_bytes()).unwrap();
        let r = app
            .client
            .request(method, app.url("/api/v1/endpoints"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let text = app.metrics().await;
    assert!(!text.contains("XMETHOD"), "{text}");
    assert!(text.contains("method=\"other\""), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn metrics_describe_every_metric_and_report_process_and_build_info() {
    let app = spawn_app().await;
    // Emit HTTP and store metrics (a commit) before scraping.
    app.register("ep-m", "demo-v1", json!({"a": 1})).await;
    assert_eq!(app.get("/endpoints/ep-m").await.status(), StatusCode::OK);
    let text = app.metrics().await;
    let (types, helps) = families(&text);
    for name in [
        "epr_http_requests_total",
        "epr_http_request_duration_seconds",
        "epr_store_commit_seconds",
        "epr_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(types.contains_key(name), "{name} missing:\n{text}");
    }
    let undescribed: Vec<_> = types.keys().filter(|n| !helps.contains(*n)).collect();
    assert!(undescribed.is_empty(), "no # HELP for {undescribed:?}");
    assert_eq!(types["process_cpu_seconds_total"], "counter");

    assert!(sample(&text, "process_resident_memory_bytes ") > 1e6);
    assert!(sample(&text, "process_virtual_memory_bytes ") > 1e6);
    let (open, max) = (
        sample(&text, "process_open_fds "),
        sample(&text, "process_max_fds "),
    );
    assert!(open >= 3.0 && max >= open, "{open} / {max}");
    assert!(sample(&text, "process_cpu_seconds_total ") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = sample(&text, "process_start_time_seconds ");
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "{start} vs {now}"
    );

    let build = text
        .lines()
        .find(|l| l.starts_with("epr_build_info{"))
        .expect("epr_build_info sample");
    assert!(build.ends_with(" 1"), "{build}");
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    for label in [version.as_str(), "git_commit=\"", "rustc_version=\"rustc "] {
        assert!(build.contains(label), "{label} not in {build}");
    }
    app.stop().await;
}

/// An `epr` child process on `config`, with its output collected, once it is ready.
async fn start_child(config: &Path, data_dir: &Path) -> Epr {
    EprCommand::new(data_dir)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("EPR_APPLICATIONS")
        .capture_output()
        .start()
        .await
}

/// Stops the server with SIGTERM (a graceful stop writes out queued log lines) and returns
/// everything it printed.
fn stop(mut child: Epr) -> String {
    child.sigterm();
    let exit = child.wait();
    assert!(exit.success(), "{exit:?}");
    child.finish_output()
}

#[tokio::test]
async fn human_logs_in_a_pipe_have_a_startup_summary_request_lines_and_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("epr.yaml");
    std::fs::write(
        &config,
        "log:\n  level: info\n  format: human\nkaa:\n  applications:\n    obs:\n      versions:\n        obs-v1: {}\n        obs-v2: {}\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let child = start_child(&config, &data).await;
    let r = reqwest::Client::new()
        .get(child.url("/api/v1/endpoints/ep-log"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let id = request_id(&r);
    let base = child.base();
    let out = stop(child);

    assert!(
        !out.contains("\x1b["),
        "colour codes in piped output:\n{out}"
    );
    let summary = out
        .lines()
        .find(|l| l.contains("EPR starting"))
        .unwrap_or_else(|| panic!("no start-up summary in:\n{out}"));
    let store = std::fs::canonicalize(&data).unwrap();
    for part in [
        format!("version={}", env!("CARGO_PKG_VERSION")),
        format!("config={}", config.display()),
        format!("listen={}", base.trim_start_matches("http://")),
        format!("store={} (embedded)", store.display()),
        "nats=off".into(),
        "applications=obs: obs-v1, obs-v2".into(),
    ] {
        assert!(summary.contains(&part), "{part} not in: {summary}");
    }
    let line = out
        .lines()
        .find(|l| l.contains(&format!("request_id={id}")))
        .unwrap_or_else(|| panic!("no request line for {id} in:\n{out}"));
    assert!(line.contains(" INFO "), "{line}");
    for part in [
        "method=GET",
        "route=/api/v1/endpoints/{endpointId}",
        "status=404",
        "latency_us=",
        "endpoint_id=ep-log",
    ] {
        assert!(line.contains(part), "{part} not in: {line}");
    }
}

#[tokio::test]
async fn json_logs_can_leave_requests_out_and_hide_nats_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("epr.yaml");
    // NATS on a port nothing listens on: the service starts anyway and retries.
    let nats_port = free_port();
    std::fs::write(
        &config,
        format!("log:\n  level: info\n  format: json\n  requests: false\nnats:\n  url: nats://obs:s3cret@127.0.0.1:{nats_port}\n"),
    )
    .unwrap();
    let child = start_child(&config, &dir.path().join("data")).await;
    let r = reqwest::Client::new()
        .get(child.url("/api/v1/endpoints/ep-log"))
        .send()
        .await
        .unwrap();
    let id = request_id(&r);
    let out = stop(child);

    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let summary = lines
        .iter()
        .find(|l| l["message"] == "EPR starting")
        .unwrap_or_else(|| panic!("no start-up summary in:\n{out}"));
    assert_eq!(summary["level"], "INFO");
    assert_eq!(summary["nats"], format!("nats://***@127.0.0.1:{nats_port}"));
    assert_eq!(summary["applications"], "none");
    assert_eq!(summary["config"], config.display().to_string());
    assert!(!out.contains("s3cret"), "credentials logged:\n{out}");
    assert!(
        !out.contains(&id) && lines.iter().all(|l| l["message"] != "request"),
        "request lines although log.requests is false:\n{out}"
    );
}
