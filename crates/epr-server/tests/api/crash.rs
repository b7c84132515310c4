//! Durability under `kill -9`: a child server process under concurrent write load is killed
//! with SIGKILL; after a restart on the same data directory, every write that was
//! acknowledged with a 2xx is present and intact.

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

async fn start(data_dir: &Path) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_epr"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
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

    let server = start(dir.path()).await;
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
