//! Durability under `kill -9`: a child server process under concurrent write load is killed
//! with SIGKILL; after a restart on the same data directory, every write that was
//! acknowledged with a 2xx is present and intact, and (with NATS) every event of every
//! acknowledged write is published.

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(data_dir: &Path, env: &[(&str, String)]) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_epr"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("EPR_APPLICATIONS", "crash:crash-v1")
        .env("EPR__LOG__LEVEL", "warn")
        .env_remove("EPR_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the epr binary starts");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/health/ready")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server { child, base }
}

#[derive(Default)]
struct Acked {
    /// Registered endpoint → the metadata value it was registered with.
    registered: Vec<(String, u64)>,
    /// Per writer: (counter endpoint, last acknowledged value, last attempted value).
    counters: Vec<(String, u64, u64)>,
}

/// Runs 16 writers against `server` (each: registrations with metadata, and a counter key
/// updated after each one), kills the server with SIGKILL after 1.5 s, and returns what was
/// acknowledged.
async fn load_then_kill(server: Server) -> Acked {
    let acked = Arc::new(Mutex::new(Acked::default()));
    let client = reqwest::Client::new();
    let writers = 16;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (client, base, acked) = (client.clone(), server.base.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let counter = format!("counter-{w}");
            let r = client
                .post(format!("{base}/api/v1/endpoints"))
                .json(&json!({"endpointId": counter, "appVersion": {"name": "crash-v1"}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            let slot = {
                let mut a = acked.lock().await;
                a.counters.push((counter.clone(), 0, 0));
                a.counters.len() - 1
            };
            for n in 1u64.. {
                let id = format!("w{w}-{n}");
                let reg = client
                    .post(format!("{base}/api/v1/endpoints"))
                    .json(&json!({"endpointId": id, "appVersion": {"name": "crash-v1"}, "metadata": {"n": n, "pad": "x".repeat(64)}}))
                    .send()
                    .await;
                match reg {
                    Ok(r) if r.status().is_success() => acked.lock().await.registered.push((id, n)),
                    _ => return,
                }
                acked.lock().await.counters[slot].2 = n;
                let put = client
                    .put(format!("{base}/api/v1/endpoints/{counter}/metadata/seq"))
                    .json(&json!(n))
                    .send()
                    .await;
                match put {
                    Ok(r) if r.status().is_success() => acked.lock().await.counters[slot].1 = n,
                    _ => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(server); // SIGKILL mid-load
    for t in tasks {
        t.await.unwrap();
    }
    let acked = Arc::try_unwrap(acked).ok().unwrap().into_inner();
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
            .get(format!("{}/api/v1/endpoints/{id}/metadata", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged registration {id} was lost");
        let md: Value = r.json().await.unwrap();
        assert_eq!(md["n"], json!(n), "{id} is intact");
    }
    for (counter, last_acked, last_tried) in &acked.counters {
        let r = client
            .get(format!(
                "{}/api/v1/endpoints/{counter}/metadata",
                server.base
            ))
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
