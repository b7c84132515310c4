//! Configuration reload without a restart: SIGHUP under write load, a file change, what a
//! removed version means, and the settings that cannot change at run time.

use crate::helpers::{poll, spawn_application, OnFailure, TestApp, WriteLoad};
use epr_server::reload::ReloadSource;
use epr_server::{Application, Settings};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn config(versions: &[&str], extra: &str) -> String {
    let mut s = String::from("kaa:\n  applications:\n    rl:\n      versions:\n");
    for v in versions {
        s.push_str(&format!("        {v}: {{}}\n"));
    }
    s.push_str(extra);
    s
}

/// An app whose configuration comes from `file` (with the test overrides: port 0, `dir`).
async fn spawn_reloadable(file: &Path, dir: &Path) -> (TestApp, Settings) {
    let dir = dir.to_path_buf();
    let overrides = move |s: &mut Settings| {
        s.server.listen = "127.0.0.1:0".into();
        s.store.data_dir = dir.clone();
    };
    let mut s = Settings::load(Some(file)).unwrap();
    overrides(&mut s);
    let app = Application::build(&s)
        .await
        .unwrap()
        .with_reload(ReloadSource {
            file: Some(file.to_path_buf()),
            overrides: Arc::new(overrides),
        })
        .unwrap();
    let reloader = app.reloader();
    assert!(reloader.is_some());
    (spawn_application(app, &s), s)
}

async fn status_of(app: &TestApp, version: &str) -> StatusCode {
    let r = app
        .post_endpoint(&json!({"appVersion": {"name": version}}))
        .await;
    StatusCode::from_u16(r.status().as_u16()).unwrap()
}

#[tokio::test]
async fn sighup_under_write_load_drops_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("epr.yaml");
    std::fs::write(&file, config(&["rl-v1"], "")).unwrap();
    let (app, _) = spawn_reloadable(&file, &dir.path().join("data")).await;
    assert_eq!(status_of(&app, "rl-v2").await, StatusCode::BAD_REQUEST);
    let load = WriteLoad::start(
        4,
        &app.client,
        &app.url("/api/v1"),
        "rl-v1",
        |n| json!({"n": n}),
        OnFailure::Panic,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&file, config(&["rl-v1", "rl-v2"], "")).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Accepted right after the signal (the reload is a few file reads and a swap).
    poll(
        Duration::from_secs(2),
        Duration::from_millis(10),
        || async {
            match status_of(&app, "rl-v2").await {
                StatusCode::CREATED => Ok(()),
                s => Err(format!("rl-v2 still refused after SIGHUP: {s}")),
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every writer asserted each of its writes succeeded.
    let acked = load.finish().await;
    assert!(acked.registered.len() > 10, "{}", acked.registered.len());
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("epr_config_reloads_total{trigger=\"sighup\",outcome=\"ok\"}"),
        "{metrics}"
    );
    let rl = app.get_json("/api/v1/applications/rl").await;
    assert_eq!(rl["versions"][1]["origins"], json!(["file"]), "{rl}");
    app.stop().await;
}

#[tokio::test]
async fn file_change_reloads_and_removed_versions_follow_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("epr.yaml");
    std::fs::write(&file, config(&["rl-v1", "rl-v2"], "")).unwrap();
    let (app, _) = spawn_reloadable(&file, &dir.path().join("data")).await;
    app.register("on-v2", "rl-v2", json!({"m": 1})).await;
    app.register("on-v1", "rl-v1", json!({})).await;
    let r = app
        .send_json(
            Method::POST,
            "/applications/rl/filters",
            &json!({"name": "m", "mongoQuery": {"application_version": "rl-v2"}}),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let filter: Value = r.json().await.unwrap();

    // rl-v2 removed, rl-v3 added, a limit lowered and the listen address changed; picked up
    // by the file watch alone.
    std::fs::write(
        &file,
        config(
            &["rl-v1", "rl-v3"],
            "limits:\n  metadata_max_bytes: 64\nserver:\n  page_max: 50\n",
        ),
    )
    .unwrap();
    poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            match status_of(&app, "rl-v3").await {
                StatusCode::CREATED => Ok(()),
                s => Err(format!("rl-v3 still refused: {s}")),
            }
        },
    )
    .await;
    // The removed version: refused for new registrations and moves, with the usual 400.
    let r = app
        .post_endpoint(&json!({"appVersion": {"name": "rl-v2"}}))
        .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], 400, "{body}");
    assert_eq!(body["rule"], "known-app-version", "{body}");
    let r = app
        .send_json(
            Method::PUT,
            "/endpoints/on-v1/app-version",
            &json!({"name": "rl-v2"}),
        )
        .await;
    assert_eq!(r.status(), 400);
    // Its endpoints keep it and stay readable; the filter naming it still matches them.
    let ep = app.get_json("/api/v1/endpoints/on-v2").await;
    assert_eq!(ep["appVersion"]["name"], "rl-v2");
    let id = filter["id"].as_str().unwrap();
    poll(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let r = app.get(&format!("/endpoints?filterId={id}")).await;
            let body: Value = r.json().await.unwrap();
            if body["totalElements"] == 1 {
                Ok(())
            } else {
                Err(format!("filter does not list on-v2: {body}"))
            }
        },
    )
    .await;
    // The new limit applies at once.
    let r = app
        .post_endpoint(
            &json!({"appVersion": {"name": "rl-v1"}, "metadata": {"x": "y".repeat(100)}}),
        )
        .await;
    assert_eq!(r.status(), 413);
    let rl = app.get_json("/api/v1/applications/rl").await;
    assert_eq!(rl["removedVersions"], json!([{"name": "rl-v2"}]), "{rl}");
    app.stop().await;
}

#[tokio::test]
async fn fixed_settings_are_named_and_kept_and_an_invalid_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("epr.yaml");
    std::fs::write(&file, config(&["rl-v1"], "")).unwrap();
    let data = dir.path().join("data");
    let dirs = data.clone();
    let overrides = move |s: &mut Settings| {
        s.server.listen = "127.0.0.1:0".into();
        s.store.data_dir = dirs.clone();
    };
    let mut s = Settings::load(Some(&file)).unwrap();
    overrides(&mut s);
    let app = Application::build(&s)
        .await
        .unwrap()
        .with_reload(ReloadSource {
            file: Some(file.clone()),
            overrides: Arc::new(overrides),
        })
        .unwrap();
    let reloader = app.reloader().unwrap();
    let app = spawn_application(app, &s);
    std::fs::write(
        &file,
        config(
            &["rl-v1", "rl-v4"],
            "server:\n  page_max: 50\nstore:\n  readers: 3\nlog:\n  level: debug\n",
        ),
    )
    .unwrap();
    let outcome = reloader.reload("test").unwrap();
    assert_eq!(outcome.kept, ["server.page_max", "store.readers"]);
    assert_eq!(status_of(&app, "rl-v4").await, StatusCode::CREATED);
    // page_max kept at its running value.
    let r = app.get("/endpoints?limit=1000").await;
    assert_eq!(r.status(), 200);
    // An invalid file: the reload fails and nothing changes.
    std::fs::write(
        &file,
        "kaa:\n  applications:\n    Bad:\n      versions:\n        x: {}\n",
    )
    .unwrap();
    assert!(reloader.reload("test").is_err());
    assert_eq!(status_of(&app, "rl-v4").await, StatusCode::CREATED);
    app.stop().await;
}
