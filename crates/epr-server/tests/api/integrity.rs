//! Store integrity, with `epr` child processes: one process per data directory, a damaged
//! database refused at start and detected at run time, and a full disk answered with
//! `503` + `Retry-After` without flooding the log.

use crate::child::{Epr, EprCommand};
use crate::helpers::get_text;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `epr` on `data_dir`, its output (logs on stdout, the exit error on stderr) collected.
/// `file_size_kib` runs it with that largest file size (`RLIMIT_FSIZE`) and SIGXFSZ ignored,
/// so writes past it fail with EFBIG like on a full disk.
fn epr_on(data_dir: &Path, env: &[(&str, &str)], file_size_kib: Option<u64>) -> EprCommand {
    let mut cmd = EprCommand::new(data_dir);
    if let Some(kib) = file_size_kib {
        // Ignored signals stay ignored across exec; bash counts -f in KiB.
        cmd = cmd.shell_prelude(format!("trap '' XFSZ; ulimit -f {kib}"));
    }
    cmd.envs(env.iter().copied())
        .env("EPR_APPLICATIONS", "demo:demo-v1")
        .env("EPR__LOG__LEVEL", "warn")
        .env("NO_COLOR", "1")
        .capture_output()
}

/// Registers `endpoints` in `demo-v1` with one batch request.
async fn post_batch(
    client: &reqwest::Client,
    epr: &Epr,
    endpoints: Vec<Value>,
) -> reqwest::Response {
    client
        .post(epr.url("/api/v1/endpoints/batch"))
        .json(&json!({"appVersion": {"name": "demo-v1"}, "endpoints": endpoints}))
        .send()
        .await
        .unwrap()
}

fn db_file(dir: &Path) -> PathBuf {
    dir.join("epr.sqlite3")
}

/// Overwrites `len` bytes at `offset` with a byte no SQLite page starts with.
fn damage(file: &Path, offset: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![0xEE; len]).unwrap();
    f.sync_all().unwrap();
}

/// A data directory holding 2,000 endpoints, written by an `epr` that was then stopped
/// cleanly (so the database file alone holds them).
async fn filled_data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut epr = epr_on(dir.path(), &[], None).start().await;
    let client = reqwest::Client::new();
    for b in 0..2 {
        let endpoints: Vec<Value> = (0..1000)
            .map(|i| json!({"endpointId": format!("ep-{b}-{i}"), "metadata": {"i": i, "pad": "x".repeat(100)}}))
            .collect();
        let r = post_batch(&client, &epr, endpoints).await;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    assert!(epr.terminate().success(), "{}", epr.finish_output());
    // The damage below must hit the only copy of the pages: a clean stop folds the WAL in.
    let wal = dir.path().join("epr.sqlite3-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "a clean stop leaves an empty WAL");
    dir
}

fn retry_after(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_one_data_directory_exits_at_once() {
    crate::helpers::embedded_only();
    let dir = tempfile::tempdir().unwrap();
    let first = epr_on(dir.path(), &[], None).start().await;
    let started = Instant::now();
    let mut second = epr_on(dir.path(), &[], None).spawn();
    let status = second
        .wait_exit(Duration::from_secs(10))
        .expect("the second process exits instead of serving");
    assert!(!status.success());
    assert!(started.elapsed() < Duration::from_secs(5), "exits at once");
    let err = second.finish_output();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    // The first one goes on serving writes.
    let client = reqwest::Client::new();
    let r = client
        .post(first.url("/api/v1/endpoints"))
        .json(&json!({"endpointId": "after", "appVersion": {"name": "demo-v1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client.get(first.url("/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_refuses_to_start() {
    crate::helpers::embedded_only();
    let dir = filled_data_dir().await;
    let file = db_file(dir.path());
    let len = std::fs::metadata(&file).unwrap().len();
    // 16 KiB of garbage in the middle of the file.
    damage(&file, len / 2, 16 * 1024);
    // The default check, then the full one.
    let default: &[(&str, &str)] = &[];
    for (env, pragma) in [
        (default, "quick_check"),
        (
            &[("EPR__STORE__INTEGRITY_CHECK", "full")],
            "integrity_check",
        ),
    ] {
        let mut epr = epr_on(dir.path(), env, None).spawn();
        let status = epr
            .wait_exit(Duration::from_secs(20))
            .expect("a damaged database refuses the start");
        assert!(!status.success());
        let err = epr.finish_output();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains(&format!("{pragma} failed")), "{err}");
        assert!(err.contains("restore it from a backup"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_under_a_running_server_stops_writes_and_readiness() {
    crate::helpers::embedded_only();
    let dir = filled_data_dir().await;
    let mut epr = epr_on(dir.path(), &[], None).start().await;
    let client = reqwest::Client::new();
    // The middle half of the file: whichever pages a listing needs, some are damaged. No
    // reader has cached them (the server just started, and only the writer read them).
    let file = db_file(dir.path());
    let len = std::fs::metadata(&file).unwrap().len();
    damage(&file, len / 4, (len / 2) as usize);
    // A read of every endpoint row meets the damage: the application's metadata keys (a
    // listing by metadata is answered from the in-memory index, reading only its page).
    let listing = epr.url("/api/v1/applications/demo/metadata-keys");
    let r = client.get(&listing).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&r).as_deref(), Some("1"));
    // From now on: readiness DOWN naming the reason, writes refused.
    let r = client.get(epr.url("/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after(&r).as_deref(), Some("1"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "DOWN", "{body}");
    let store = body["checks"]["store"].as_str().unwrap();
    assert!(store.starts_with("DOWN"), "{body}");
    assert!(store.contains("is damaged"), "{body}");
    assert!(store.contains(&file.display().to_string()), "{body}");
    for i in 0..5 {
        let r = client
            .post(epr.url("/api/v1/endpoints"))
            .json(&json!({"endpointId": format!("new-{i}"), "appVersion": {"name": "demo-v1"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after(&r).as_deref(), Some("1"));
        let r = client.get(&listing).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let metrics = get_text(&client, &epr.url("/metrics")).await;
    assert!(
        metrics.contains("epr_store_corruption_detected 1"),
        "{metrics}"
    );
    epr.terminate();
    let err = epr.finish_output();
    let reports = err
        .lines()
        .filter(|l| l.contains("database corruption detected"))
        .count();
    assert_eq!(reports, 1, "one ERROR line for the corruption:\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_with_retry_after_and_logs_little() {
    crate::helpers::embedded_only();
    let dir = tempfile::tempdir().unwrap();
    // Files may not grow past 1 MiB: the WAL or the database file fills up after a few
    // batches, and every write after that fails with EFBIG, as on a full disk.
    let mut epr = epr_on(dir.path(), &[], Some(1024)).start().await;
    let client = reqwest::Client::new();
    let mut full = false;
    for b in 0..40 {
        let endpoints: Vec<Value> = (0..50)
            .map(|i| json!({"endpointId": format!("ep-{b}-{i}"), "metadata": {"pad": "x".repeat(4000)}}))
            .collect();
        let r = post_batch(&client, &epr, endpoints).await;
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(retry_after(&r).as_deref(), Some("1"));
            full = true;
            break;
        }
        assert_eq!(r.status(), StatusCode::ACCEPTED, "batch {b}");
    }
    assert!(full, "the file size limit was reached");
    // Hundreds of writes, 8 at a time. A smaller write may still fit in what is left, so
    // each one is either stored or refused with a hint.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (client, url) = (client.clone(), epr.url("/api/v1/endpoints"));
        tasks.push(tokio::spawn(async move {
            let mut refused = Vec::new();
            for i in 0..40 {
                let id = format!("late-{t}-{i}");
                let r = client
                    .post(&url)
                    .json(&json!({"endpointId": id, "appVersion": {"name": "demo-v1"}, "metadata": {"pad": "y".repeat(4000)}}))
                    .send()
                    .await
                    .unwrap();
                if r.status() == StatusCode::SERVICE_UNAVAILABLE {
                    assert_eq!(retry_after(&r).as_deref(), Some("1"));
                    refused.push(id);
                } else {
                    assert_eq!(r.status(), StatusCode::CREATED);
                }
            }
            refused
        }));
    }
    let mut refused = Vec::new();
    for t in tasks {
        refused.extend(t.await.unwrap());
    }
    assert!(refused.len() >= 100, "{} of 320 refused", refused.len());
    // Not acknowledged means not stored.
    for id in refused.iter().step_by(20) {
        let r = client
            .get(epr.url(&format!("/api/v1/endpoints/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{id}");
    }
    // Reads go on.
    let r = client
        .get(epr.url("/api/v1/endpoints/ep-0-0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client.get(epr.url("/health/live")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    epr.terminate();
    let err = epr.finish_output();
    let logged = err
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .count();
    assert!(
        (1..10).contains(&logged),
        "{logged} error lines for {} failed writes:\n{err}",
        refused.len() + 1
    );
}
