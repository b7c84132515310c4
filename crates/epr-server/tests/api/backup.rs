//! `epr backup` / `restore` / `export` / `import`, driven as child processes of the `epr`
//! binary against a server running in this process (backup and export must work beside it).

use crate::helpers::{
    poll, spawn_app, spawn_settings, test_settings, OnFailure, TestApp, WriteLoad,
};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// Runs `epr --data-dir DIR ARGS…` (async, so the server in this process keeps serving).
async fn epr(data_dir: &Path, args: &[&OsStr]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_epr"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("EPR_CONFIG")
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .expect("the epr binary runs")
}

fn ok(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "epr failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

const KYIV: fn() -> Value =
    || json!({"metadata": {"$elemMatch": {"key": "city", "value": "Kyiv"}}});

async fn create_filter(app: &TestApp, name: &str) -> String {
    let r = app
        .send_json(
            Method::POST,
            "/applications/demo/filters",
            &json!({"name": name, "mongoQuery": KYIV()}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn wait_active(app: &TestApp, id: &str) -> Value {
    poll(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let f = app
                .get(&format!("/applications/demo/filters/{id}"))
                .await
                .json::<Value>()
                .await
                .unwrap();
            if f["status"] == "active" {
                Ok(f)
            } else {
                Err(format!("filter {id} still pending: {f}"))
            }
        },
    )
    .await
}

/// Every endpoint of `demo` (paged), by ID, with metadata.
async fn all_endpoints(app: &TestApp, extra: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    loop {
        let page: Value = app
            .get(&format!(
                "/endpoints?applicationName=demo&include=metadata&limit=1000&offset={}{extra}",
                out.len()
            ))
            .await
            .json()
            .await
            .unwrap();
        let items = page["content"].as_array().unwrap();
        if items.is_empty() {
            return out;
        }
        for e in items {
            out.insert(e["endpointId"].as_str().unwrap().to_owned(), e.clone());
        }
    }
}

async fn members(app: &TestApp, filter: &str) -> BTreeSet<String> {
    all_endpoints(app, &format!("&filterId={filter}"))
        .await
        .into_keys()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_restores_every_write_acknowledged_before_it() {
    crate::helpers::embedded_only();
    let app = spawn_app().await;
    let filter = create_filter(&app, "kyiv").await;
    wait_active(&app, &filter).await;
    let load = WriteLoad::start(
        6,
        &app.client,
        &app.url("/api/v1"),
        "demo-v1",
        |n| json!({"n": n, "city": if n.is_multiple_of(2) { "Kyiv" } else { "Lviv" }}),
        OnFailure::Panic,
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (before, counters_before) = {
        let a = load.acked.lock().await;
        (a.registered.clone(), a.counters.clone())
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.sqlite3");
    let out = epr(&app.data_dir, &[os("backup"), os("--to"), file.as_os_str()]).await;
    let counters_after: Vec<u64> = load
        .acked
        .lock()
        .await
        .counters
        .iter()
        .map(|c| c.2)
        .collect();
    let during = load.acked.lock().await.registered.len() - before.len();
    // The load goes on after the backup too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.finish().await;
    let report = ok(&out);
    assert!(before.len() > 50, "the load ran ({} writes)", before.len());
    assert!(
        report["endpoints"].as_u64().unwrap() >= before.len() as u64,
        "{report}"
    );

    // The copy is an intact SQLite database.
    let conn = rusqlite::Connection::open(&file).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);

    let restored_dir = dir.path().join("restored");
    let out = epr(
        &restored_dir,
        &[os("restore"), os("--from"), file.as_os_str()],
    )
    .await;
    ok(&out);
    app.stop().await;
    let restored = spawn_settings(test_settings(&restored_dir)).await;
    let stored = all_endpoints(&restored, "").await;
    // Every write acknowledged before the backup started is there.
    for (id, n) in &before {
        let e = stored
            .get(id)
            .unwrap_or_else(|| panic!("{id}, acknowledged before the backup, is missing"));
        assert_eq!(e["metadata"]["n"], json!(n), "{id}");
    }
    // Writes acknowledged during the backup are whole or absent (one commit's state).
    for (id, e) in &stored {
        if let Some((_, n)) = id.strip_prefix('w').and_then(|r| r.split_once('-')) {
            let n: u64 = n.parse().unwrap();
            let city = if n.is_multiple_of(2) { "Kyiv" } else { "Lviv" };
            assert_eq!(e["metadata"], json!({"n": n, "city": city}), "{id}");
        }
    }
    for ((counter, acked_before, _), tried) in counters_before.iter().zip(&counters_after) {
        let seq = stored[counter]["metadata"]
            .get("seq")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        assert!(
            seq >= *acked_before && seq <= *tried,
            "{counter}: {seq} outside [{acked_before}, {tried}]"
        );
    }
    // Stored membership agrees with the restored endpoints.
    let f = wait_active(&restored, &filter).await;
    let expected: BTreeSet<String> = stored
        .iter()
        .filter(|(_, e)| e["metadata"]["city"] == "Kyiv")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(members(&restored, &filter).await, expected);
    assert_eq!(f["matchedEndpointsCount"], json!(expected.len()));
    eprintln!(
        "backup test: {} writes before, {during} during the backup ({:.3} s)",
        before.len(),
        report["seconds"].as_f64().unwrap()
    );
    // Restoring into the directory of a running server is refused, even with --force.
    let out = epr(
        &restored_dir,
        &[os("restore"), os("--force"), os("--from"), file.as_os_str()],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("in use by another EPR process"), "{stderr}");
    restored.stop().await;
    // Once stopped, a directory that holds a store is still refused without --force.
    let out = epr(
        &restored_dir,
        &[os("restore"), os("--from"), file.as_os_str()],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("is not empty"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_gives_the_same_endpoints_filters_and_memberships() {
    crate::helpers::embedded_only();
    let app = spawn_app().await;
    let mut tokens = Vec::new();
    for i in 0..30 {
        let city = ["Kyiv", "Lviv", "Odesa"][i % 3];
        let r = app
            .post_endpoint(&json!({"endpointId": format!("ep-{i}"),
                "appVersion": {"name": "demo-v1"}, "metadata": {"city": city, "i": i}}))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        tokens.push(r.json::<Value>().await.unwrap()["token"].clone());
    }
    app.register("other-1", "other-v1", json!({"x": 1})).await;
    // A metadata change and an application version change, so their dates differ.
    let r = app
        .send_json(Method::PUT, "/endpoints/ep-1/metadata/city", &json!("Kyiv"))
        .await;
    assert!(r.status().is_success(), "{}", r.status());
    let r = app
        .send_json(
            Method::PUT,
            "/endpoints/ep-2/app-version",
            &json!({"name": "demo-v2"}),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let filter = create_filter(&app, "kyiv").await;
    let source_filter = wait_active(&app, &filter).await;
    let source = all_endpoints(&app, "").await;
    let source_members = members(&app, &filter).await;

    // Exported while the server runs.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.ndjson");
    let report = ok(&epr(&app.data_dir, &[os("export"), os("--to"), file.as_os_str()]).await);
    assert_eq!(
        (&report["filters"], &report["endpoints"]),
        (&json!(1), &json!(31))
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "header");
    assert_eq!(lines[0]["version"], 2);
    assert_eq!(lines.last().unwrap()["type"], "end");
    assert_eq!(lines.len(), 1 + 1 + 31 + 1);
    // Each endpoint with its token row (the hash, never the token).
    for line in lines.iter().filter(|l| l["type"] == "endpoint") {
        let tokens = line["tokens"].as_array().expect("tokens listed");
        assert_eq!(tokens.len(), 1, "{line}");
        assert_eq!(tokens[0]["tokenHash"], line["tokenHash"], "{line}");
        assert_eq!(tokens[0]["status"], "Inactive", "{line}");
    }

    let target = dir.path().join("target");
    let report = ok(&epr(&target, &[os("import"), os("--from"), file.as_os_str()]).await);
    assert_eq!(report["endpoints"]["imported"], 31, "{report}");
    assert_eq!(report["filters"]["imported"], 1, "{report}");
    // A re-import (from stdin) changes nothing.
    let again = tokio::process::Command::new(env!("CARGO_BIN_EXE_epr"))
        .arg("--data-dir")
        .arg(&target)
        .arg("import")
        .env_remove("EPR_CONFIG")
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .await
        .unwrap();
    let report = ok(&again);
    assert_eq!(
        (
            &report["endpoints"]["imported"],
            &report["endpoints"]["existing"],
            &report["filters"]["existing"]
        ),
        (&json!(0), &json!(31), &json!(1)),
        "{report}"
    );

    let imported = spawn_settings(test_settings(&target)).await;
    assert_eq!(all_endpoints(&imported, "").await, source);
    assert_eq!(imported.total("applicationName=other").await, 1);
    let f = wait_active(&imported, &filter).await;
    for field in [
        "name",
        "mongoQuery",
        "createdDate",
        "updatedDate",
        "matchedEndpointsCount",
    ] {
        assert_eq!(f[field], source_filter[field], "{field}");
    }
    assert_eq!(members(&imported, &filter).await, source_members);
    // Token hashes came along: a token issued before is still taken by its endpoint.
    let r = imported
        .post_endpoint(&json!({"appVersion": {"name": "demo-v1"}, "endpointToken": tokens[5]}))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "endpointToken");
    // Exported again, the endpoints (tokens included) are the same lines.
    let file2 = dir.path().join("export-2.ndjson");
    ok(&epr(&target, &[os("export"), os("--to"), file2.as_os_str()]).await);
    let endpoint_lines = |text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["type"] == "endpoint")
            .collect()
    };
    assert_eq!(
        endpoint_lines(&std::fs::read_to_string(&file2).unwrap()),
        endpoint_lines(&text)
    );
    // And the store serves writes normally, with live membership.
    imported
        .register("new-1", "demo-v1", json!({"city": "Kyiv"}))
        .await;
    assert!(members(&imported, &filter).await.contains("new-1"));
    imported.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_export_still_imports() {
    crate::helpers::embedded_only();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v1.ndjson");
    let header = json!({"type": "header", "format": "epr-export", "version": 1,
                        "exportedAt": 0, "storeId": "x"});
    let hash = "ab".repeat(32);
    let endpoint = json!({"type": "endpoint", "tenant": "default", "endpointId": "ep-1",
        "applicationName": "demo", "appVersion": "demo-v1", "appVersionRegistered": 1,
        "created": 7, "metadata": {}, "metadataUpdated": null, "version": 1,
        "metadataVersion": 1, "tokenHash": hash});
    let end = json!({"type": "end", "filters": 0, "endpoints": 1});
    std::fs::write(&file, format!("{header}\n{endpoint}\n{end}\n")).unwrap();
    let target = dir.path().join("target");
    let report = ok(&epr(&target, &[os("import"), os("--from"), file.as_os_str()]).await);
    assert_eq!(report["endpoints"]["imported"], 1, "{report}");
    // One Inactive token from the hash, under an ID derived from it: a re-import is a no-op.
    let report = ok(&epr(&target, &[os("import"), os("--from"), file.as_os_str()]).await);
    assert_eq!(report["endpoints"]["existing"], 1, "{report}");
    let out = dir.path().join("out.ndjson");
    ok(&epr(&target, &[os("export"), os("--to"), out.as_os_str()]).await);
    let text = std::fs::read_to_string(&out).unwrap();
    let line: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["type"] == "endpoint")
        .unwrap();
    assert_eq!(
        line["tokens"],
        json!([{"tokenId": "abababab-abab-abab-abab-abababababab", "tokenHash": hash,
                "status": "Inactive", "created": 7, "updated": null}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_import_names_its_line_and_changes_nothing() {
    crate::helpers::embedded_only();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.ndjson");
    let header = json!({"type": "header", "format": "epr-export", "version": 1,
                        "exportedAt": 0, "storeId": "x"});
    let good = json!({"type": "endpoint", "tenant": "default", "endpointId": "ep-1",
        "applicationName": "demo", "appVersion": "demo-v1", "appVersionRegistered": 1,
        "created": 1, "metadata": {}, "metadataUpdated": null, "version": 1,
        "metadataVersion": 1, "tokenHash": "ab".repeat(32)});
    let mut bad = good.clone();
    bad["endpointId"] = json!("ep 2");
    let end = json!({"type": "end", "filters": 0, "endpoints": 2});
    let target = dir.path().join("target");
    let cases: [(String, &str); 4] = [
        (
            format!("{header}\n{good}\n{bad}\n{end}\n"),
            "line 3: field 'endpointId': must match ^[a-zA-Z0-9._~-]+$; ' ' is not allowed \
             (rule 'pattern')",
        ),
        (format!("{header}\n{good}\n{{not json\n"), "line 3:"),
        (format!("{header}\n{good}\n"), "truncated"),
        (
            format!(
                "{}\n{good}\n",
                json!({"type": "header", "format": "epr-export",
                "version": 9, "exportedAt": 0, "storeId": "x"})
            ),
            "line 1: export format version 9",
        ),
    ];
    for (content, expected) in cases {
        std::fs::write(&file, content).unwrap();
        let out = epr(&target, &[os("import"), os("--from"), file.as_os_str()]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        assert!(!target.exists(), "nothing was written");
    }
}

/// A source store with endpoints of two applications, tokens, a changed version, and an
/// active filter; returns the filter's ID and a token in use.
async fn fill_source(app: &TestApp) -> (String, Value) {
    let mut token = Value::Null;
    for i in 0..25 {
        let city = ["Kyiv", "Lviv"][i % 2];
        let r = app
            .post_endpoint(&json!({"endpointId": format!("ms-{i}"),
                "appVersion": {"name": "demo-v1"}, "metadata": {"city": city, "i": i}}))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        token = r.json::<Value>().await.unwrap()["token"].clone();
    }
    app.register("other-1", "other-v1", json!({"x": 1})).await;
    let r = app
        .send_json(
            Method::PUT,
            "/endpoints/ms-3/app-version",
            &json!({"name": "demo-v2"}),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.status());
    let filter = create_filter(app, "kyiv").await;
    wait_active(app, &filter).await;
    (filter, token)
}

/// `target` holds what `source` does: endpoints (with dates, versions, metadata), the
/// filter and its members, the token hashes.
async fn assert_same_store(source: &TestApp, target: &TestApp, filter: &str, token: &Value) {
    assert_eq!(
        all_endpoints(target, "").await,
        all_endpoints(source, "").await
    );
    assert_eq!(target.total("applicationName=other").await, 1);
    let (a, b) = (
        wait_active(source, filter).await,
        wait_active(target, filter).await,
    );
    for field in ["name", "mongoQuery", "createdDate", "matchedEndpointsCount"] {
        assert_eq!(a[field], b[field], "{field}");
    }
    assert_eq!(members(target, filter).await, members(source, filter).await);
    let r = target
        .post_endpoint(&json!({"appVersion": {"name": "demo-v1"}, "endpointToken": token}))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "the token hash came along"
    );
}

fn spec(kind: &str, place: impl std::fmt::Display) -> std::ffi::OsString {
    format!("{kind}:{place}").into()
}

/// `epr migrate-store` between two embedded stores (the command is backend-neutral: the
/// PostgreSQL directions are in `a_store_moves_to_postgres_and_back`): counts, a refused
/// non-empty target, an idempotent `--resume`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_copies_everything_and_resumes_idempotently() {
    crate::helpers::embedded_only();
    let source = spawn_app().await;
    let (filter, token) = fill_source(&source).await;
    let dir = tempfile::tempdir().unwrap();
    let target_dir = dir.path().join("target");
    let (from, to) = (
        spec("embedded", source.data_dir.display()),
        spec("embedded", target_dir.display()),
    );
    // Beside the running source server: it is read from a snapshot.
    let args = [os("migrate-store"), os("--from"), &from, os("--to"), &to];
    let report = ok(&epr(dir.path(), &args).await);
    assert_eq!(report["tenants"], 1, "{report}");
    assert_eq!(report["filters"]["imported"], 1, "{report}");
    assert_eq!(report["endpoints"]["imported"], 26, "{report}");
    let again = epr(dir.path(), &args).await;
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("not empty") && err.contains("--resume"),
        "{err}"
    );
    let mut resume = args.to_vec();
    resume.push(os("--resume"));
    let report = ok(&epr(dir.path(), &resume).await);
    assert_eq!(
        (
            &report["endpoints"]["imported"],
            &report["endpoints"]["existing"],
            &report["filters"]["existing"]
        ),
        (&json!(0), &json!(26), &json!(1)),
        "{report}"
    );
    let target = spawn_settings(test_settings(&target_dir)).await;
    assert_same_store(&source, &target, &filter, &token).await;
    target.stop().await;
    for bad in ["sqlite:/x", "embedded:", "postgres:"] {
        let out = epr(
            dir.path(),
            &[os("migrate-store"), os("--from"), os(bad), os("--to"), &to],
        )
        .await;
        assert!(!out.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("embedded:DIR or postgres:URL"), "{bad}: {err}");
    }
    source.stop().await;
}

/// Embedded → PostgreSQL → embedded with `epr migrate-store`, and `epr migrate` on the
/// database: always on PostgreSQL (needs `EPR_TEST_DATABASE_URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_moves_to_postgres_and_back() {
    crate::helpers::embedded_only();
    let source = spawn_app().await;
    let (filter, token) = fill_source(&source).await;
    let db = epr_store_pg::testing::TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();

    // `epr migrate` creates the schema (once: a second run applies nothing).
    let migrate = |url: String| {
        let dir = dir.path().to_path_buf();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_epr"))
                .args(["--data-dir"])
                .arg(&dir)
                .arg("migrate")
                .env_remove("EPR_CONFIG")
                .env("EPR__STORE__BACKEND", "postgres")
                .env("EPR_DATABASE_URL", url)
                .output()
                .await
                .unwrap();
            ok(&out)
        }
    };
    let first = migrate(db.url.clone()).await;
    assert_eq!(first["applied"], json!([1, 2]), "{first}");
    assert_eq!(first["version"], 2, "{first}");
    let second = migrate(db.url.clone()).await;
    assert_eq!(second["applied"], json!([]), "{second}");
    let embedded = ok(&epr(dir.path(), &[os("migrate")]).await);
    assert!(
        embedded["message"]
            .as_str()
            .unwrap()
            .contains("nothing to do"),
        "{embedded}"
    );

    let to_pg = [
        os("migrate-store"),
        os("--from"),
        &spec("embedded", source.data_dir.display()),
        os("--to"),
        &spec("postgres", &db.url),
    ];
    let report = ok(&epr(dir.path(), &to_pg).await);
    assert_eq!(report["endpoints"]["imported"], 26, "{report}");
    assert!(
        !report.to_string().contains("password"),
        "no secret in the report"
    );
    let mut s = test_settings(&dir.path().join("unused"));
    s.store.backend = "postgres".into();
    s.store.postgres.url = db.url.clone();
    let on_pg = spawn_settings(s).await;
    assert_same_store(&source, &on_pg, &filter, &token).await;

    let back_dir = dir.path().join("back");
    let back = [
        os("migrate-store"),
        os("--from"),
        &spec("postgres", &db.url),
        os("--to"),
        &spec("embedded", back_dir.display()),
    ];
    // The PostgreSQL source is read beside its running server.
    let report = ok(&epr(dir.path(), &back).await);
    assert_eq!(report["endpoints"]["imported"], 26, "{report}");
    on_pg.stop().await;
    let back = spawn_settings(test_settings(&back_dir)).await;
    assert_same_store(&source, &back, &filter, &token).await;
    back.stop().await;
    source.stop().await;
    db.drop_db().await;
}
