//! Durability under `kill -9`: a child server process under concurrent write load is killed
//! with SIGKILL; after a restart on the same data directory, every write that was
//! acknowledged with a 2xx is present and intact, and (with NATS) every event of every
//! acknowledged write is published. On either backend (`EPR_TEST_BACKEND`): on PostgreSQL
//! the child gets the data directory's test database through its environment.

use crate::child::{Epr, EprCommand};
use crate::helpers::{poll, Acked, OnFailure, WriteLoad};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

async fn start(data_dir: &Path, env: &[(&str, String)]) -> Epr {
    EprCommand::new(data_dir)
        .envs(crate::helpers::store_env(data_dir).await)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("EPR_APPLICATIONS", "crash:crash-v1")
        .env("EPR__LOG__LEVEL", "warn")
        .start()
        .await
}

/// Runs 16 writers against `server` (each: registrations with metadata, and a counter key
/// updated after each one), kills the server with SIGKILL after 1.5 s, and returns what was
/// acknowledged.
async fn load_then_kill(server: Epr) -> Acked {
    let load = WriteLoad::start(
        16,
        &reqwest::Client::new(),
        &server.url("/api/v1"),
        "crash-v1",
        |n| json!({"n": n, "pad": "x".repeat(64)}),
        OnFailure::Stop,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill(); // SIGKILL mid-load
    let acked = load.finish().await;
    assert!(
        acked.registered.len() > 100,
        "the load ran ({} acked)",
        acked.registered.len()
    );
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let acked = load_then_kill(start(dir.path(), &[]).await).await;
    let client = reqwest::Client::new();
    let server = start(dir.path(), &[]).await;
    for (id, n) in &acked.registered {
        let r = client
            .get(server.url(&format!("/api/v1/endpoints/{id}/metadata")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged registration {id} was lost");
        let md: Value = r.json().await.unwrap();
        assert_eq!(md["n"], json!(n), "{id} is intact");
    }
    for (counter, last_acked, last_tried) in &acked.counters {
        let r = client
            .get(server.url(&format!("/api/v1/endpoints/{counter}/metadata")))
            .send()
            .await
            .unwrap();
        let md: Value = r.json().await.unwrap();
        let stored = md.get("seq").and_then(Value::as_u64).unwrap_or(0);
        assert!(
            stored >= *last_acked && stored <= *last_tried,
            "{counter}: stored {stored}, acknowledged {last_acked}, attempted {last_tried}"
        );
    }
    eprintln!(
        "crash test: {} acknowledged registrations and {} counters verified after SIGKILL",
        acked.registered.len(),
        acked.counters.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_acknowledged_writes_are_published_after_sigkill() {
    use crate::nats_support::{
        capture_stream, stream_messages, unique_instance, Event, PrivateNats,
    };
    use std::collections::{HashMap, HashSet};
    let dir = tempfile::tempdir().unwrap();
    let nats_dir = tempfile::tempdir().unwrap();
    let nats = PrivateNats::start(nats_dir.path());
    let instance = unique_instance("crash");
    let observer = nats.client().await;
    let mut stream = capture_stream(&observer, "CRASH", &instance).await;
    let env = [
        ("EPR__NATS__URL", nats.url()),
        ("EPR__SERVICE__INSTANCE_NAME", instance.clone()),
    ];
    let acked = load_then_kill(start(dir.path(), &env).await).await;
    // Restart: the relay publishes whatever the killed process left in the outbox.
    let _server = start(dir.path(), &env).await;
    let wanted: HashSet<&str> = acked.registered.iter().map(|(id, _)| id.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (registered, seqs) = loop {
        let mut registered = HashSet::new();
        // counter → every `seq` value announced by a metadata.updated event
        let mut seqs: HashMap<String, HashSet<String>> = HashMap::new();
        for (subject, payload) in stream_messages(&mut stream).await {
            let e = Event::from_message(&subject, &payload);
            let id = e.str("endpointId");
            match e.kind().as_str() {
                "lifecycle.registered" => {
                    registered.insert(id);
                }
                "metadata.updated" => {
                    let mut values = e.json_map("added");
                    values.extend(e.updated().into_iter().map(|(k, (_, new))| (k, new)));
                    if let Some(Some(v)) = values.remove("seq") {
                        seqs.entry(id).or_default().insert(v);
                    }
                }
                _ => {}
            }
        }
        let complete = wanted.iter().all(|id| registered.contains(*id))
            && acked.counters.iter().all(|(c, last, _)| {
                *last == 0 || seqs.get(c).is_some_and(|s| s.contains(&last.to_string()))
            });
        if complete || Instant::now() > deadline {
            break (registered, seqs);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing: Vec<&&str> = wanted
        .iter()
        .filter(|id| !registered.contains(**id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged registrations have no `registered` event, e.g. {:?}",
        missing.len(),
        wanted.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    for (counter, last_acked, _) in &acked.counters {
        for n in 1..=*last_acked {
            assert!(
                seqs.get(counter)
                    .is_some_and(|s| s.contains(&n.to_string())),
                "{counter}: acknowledged seq={n} has no metadata.updated event"
            );
        }
    }
    eprintln!(
        "crash test: events of {} acknowledged registrations and {} counters verified after SIGKILL",
        acked.registered.len(),
        acked.counters.len()
    );
}

/// A filter back-fill killed with SIGKILL half-way resumes after the restart (the count never
/// goes back: PostgreSQL resumes from its stored cursor, the embedded store derives every
/// membership at open and the filter turns active right away), while writes race it, and
/// completes with exactly the endpoints that match their final state.
#[tokio::test]
async fn a_killed_back_fill_resumes_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    // One query of 5 endpoints per step, 20 ms apart: 600 endpoints take about 2.4 s.
    let slow = [
        ("EPR__STORE__BACKFILL_STEP_MS", "0".to_owned()),
        ("EPR__STORE__BACKFILL_BATCH", "5".to_owned()),
        ("EPR__STORE__BACKFILL_PAUSE_MS", "20".to_owned()),
        // PostgreSQL: the killed process's back-fill lease is taken over after 2 s.
        ("EPR__STORE__POSTGRES__BACKFILL_LEASE_SECS", "2".to_owned()),
    ];
    let client = reqwest::Client::new();
    let server = start(dir.path(), &slow).await;
    let base = server.base();
    for chunk in 0..3 {
        let endpoints: Vec<Value> = (0..200)
            .map(|i| {
                let n = chunk * 200 + i;
                json!({"endpointId": format!("bf-{n:03}"), "metadata": {"n": n}})
            })
            .collect();
        let r = client
            .post(format!("{base}/api/v1/endpoints/batch"))
            .json(&json!({"appVersion": {"name": "crash-v1"}, "endpoints": endpoints}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let query = json!({"metadata": {"$elemMatch": {"key": "n", "value": {"$mod": [2, 0]}}}});
    let r = client
        .post(format!("{base}/api/v1/applications/crash/filters"))
        .json(&json!({"name": "even", "mongoQuery": query}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let filter_url = format!("/api/v1/applications/crash/filters/{id}");
    let get = |base: String, path: String| {
        let client = client.clone();
        async move {
            let r = client.get(format!("{base}{path}")).send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.json::<Value>().await.unwrap()
        }
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = get(base.clone(), filter_url.clone()).await;
    assert_eq!(before["status"], "pending", "{before}");
    let seen = before["matchedEndpointsCount"].as_u64().unwrap();
    assert!(seen > 0 && seen < 300, "half-way: {before}");
    server.kill(); // SIGKILL mid-back-fill

    let server = start(dir.path(), &slow).await;
    let base = server.base();
    let after = get(base.clone(), filter_url.clone()).await;
    assert!(
        after["status"] == "pending" || after["status"] == "active",
        "{after}"
    );
    assert!(
        after["matchedEndpointsCount"].as_u64().unwrap() >= seen,
        "resumed, not restarted: {after} (had {seen})"
    );
    // Writes race the resumed back-fill: flip some endpoints both ways.
    for n in (0..600).step_by(7) {
        let r = client
            .put(format!("{base}/api/v1/endpoints/bf-{n:03}/metadata/n"))
            .json(&json!(n + 1))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let active = poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let f = get(base.clone(), filter_url.clone()).await;
            if f["status"] == "active" {
                Ok(f)
            } else {
                Err(format!("never turned active: {f}"))
            }
        },
    )
    .await;
    let all = get(
        base.clone(),
        "/api/v1/endpoints?applicationName=crash&include=metadata&limit=1000".into(),
    )
    .await;
    let want: std::collections::BTreeSet<String> = all["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["metadata"]["n"].as_u64().unwrap() % 2 == 0)
        .map(|e| e["endpointId"].as_str().unwrap().to_owned())
        .collect();
    let listed = get(
        base.clone(),
        format!("/api/v1/endpoints?filterId={id}&limit=1000"),
    )
    .await;
    let got: std::collections::BTreeSet<String> = listed["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpointId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, want);
    assert_eq!(active["matchedEndpointsCount"], want.len() as u64);
}
