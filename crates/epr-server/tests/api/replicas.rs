//! Replicas: two `epr` processes on one PostgreSQL database and the shared test NATS
//! server, as in production. Always on PostgreSQL, whatever `EPR_TEST_BACKEND` says
//! (`EPR_TEST_DATABASE_URL` must be set): concurrent writes through both, every event of an
//! acknowledged write published in per-endpoint order, one back-fill per filter, a replica
//! killed mid-load (the other takes over the outbox and the back-fill), no lost update
//! across replicas, and a database restart under load.

use crate::child::{Epr, EprCommand};
use crate::helpers::{poll, spawn_settings, test_settings, Acked, OnFailure, WriteLoad};
use crate::nats_support::{shared_url, subscribe_events, unique_instance, Event};
use epr_store_pg::testing::{PrivatePg, TestDb};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const APP: &str = "rep";
const VERSION: &str = "rep-v1";

/// One database, one service instance name, and the replicas' (unused) data directories.
struct Cluster {
    db: Option<TestDb>,
    instance: String,
    dirs: tempfile::TempDir,
}

impl Cluster {
    async fn new() -> Self {
        Self {
            db: Some(TestDb::create().await),
            instance: unique_instance("rep"),
            dirs: tempfile::tempdir().unwrap(),
        }
    }

    /// A replica named `name` (its replica ID) on the cluster's database and NATS.
    fn replica(&self, name: &str, extra: &[(&str, &str)]) -> EprCommand {
        let dir = self.dirs.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        EprCommand::new(&dir)
            .env("EPR__STORE__BACKEND", "postgres")
            .env("EPR__STORE__POSTGRES__URL", &self.db.as_ref().unwrap().url)
            .env("EPR__STORE__POSTGRES__POOL_SIZE", "4")
            .env("EPR__STORE__POSTGRES__WRITERS", "2")
            // A killed replica's back-fill is taken over after 2 s.
            .env("EPR__STORE__POSTGRES__BACKFILL_LEASE_SECS", "2")
            .env("EPR__NATS__URL", shared_url())
            .env("EPR__SERVICE__INSTANCE_NAME", &self.instance)
            .env("EPR__SERVICE__REPLICA_ID", name)
            .env("EPR_APPLICATIONS", format!("{APP}:{VERSION}"))
            .env("EPR__LOG__LEVEL", "warn")
            .env("EPR__LOG__REQUESTS", "false")
            .envs(extra.iter().copied())
    }

    async fn finish(mut self) {
        if let Some(db) = self.db.take() {
            db.drop_db().await;
        }
    }
}

/// Messages as received: (subject, payload).
type Messages = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Every event of the cluster's instance, as it arrives (a core subscription in place
/// before the replicas start).
struct Feed {
    messages: Messages,
    task: tokio::task::JoinHandle<()>,
}

impl Feed {
    async fn start(instance: &str) -> Self {
        use futures_util::StreamExt;
        let (client, mut sub) = subscribe_events(instance).await;
        let messages: Messages = Arc::default();
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Some(m) = sub.next().await {
                sink.lock()
                    .unwrap()
                    .push((m.subject.to_string(), m.payload.to_vec()));
            }
        });
        Self { messages, task }
    }

    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        self.messages.lock().unwrap().clone()
    }

    /// How many 18/EFE `activated` events were published.
    fn activated(&self) -> usize {
        self.snapshot()
            .iter()
            .filter(|(s, _)| {
                let t: Vec<&str> = s.split('.').collect();
                t.get(4) == Some(&"endpoint-filter") && t.last() == Some(&"activated")
            })
            .count()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the endpoint events say: registered IDs, and per counter endpoint the `seq` values
/// of its metadata updates in arrival order (duplicates included: delivery is at least once).
#[derive(Default)]
struct Seen {
    registered: BTreeSet<String>,
    seqs: HashMap<String, Vec<u64>>,
}

fn read_events(messages: &[(String, Vec<u8>)]) -> Seen {
    let mut seen = Seen::default();
    for (subject, payload) in messages {
        if subject.split('.').nth(4) == Some("endpoint-filter") {
            continue;
        }
        let e = Event::from_message(subject, payload);
        let id = e.str("endpointId");
        match e.kind().as_str() {
            "lifecycle.registered" => {
                seen.registered.insert(id);
            }
            "metadata.updated" => {
                let mut values = e.json_map("added");
                values.extend(e.updated().into_iter().map(|(k, (_, new))| (k, new)));
                if let Some(Some(v)) = values.remove("seq") {
                    seen.seqs.entry(id).or_default().push(v.parse().unwrap());
                }
            }
            _ => {}
        }
    }
    seen
}

/// Waits (60 s at most) until every acknowledged write of `loads` has its event, then
/// checks the per-endpoint order: each counter's updates arrive in commit order (a value
/// seen again is a redelivery, never a step back to an older value first seen later).
async fn assert_events_of(feed: &Feed, loads: &[&Acked]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = |seen: &Seen| -> Vec<String> {
        let mut out = Vec::new();
        for acked in loads {
            for (id, _) in &acked.registered {
                if !seen.registered.contains(id) {
                    out.push(format!("{id}: registered"));
                }
            }
            for (counter, last, _) in &acked.counters {
                let got = seen.seqs.get(counter).cloned().unwrap_or_default();
                for n in 1..=*last {
                    if !got.contains(&n) {
                        out.push(format!("{counter}: seq={n}"));
                    }
                }
            }
        }
        out
    };
    let seen = loop {
        let seen = read_events(&feed.snapshot());
        let gaps = missing(&seen);
        if gaps.is_empty() {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "{} events of acknowledged writes were never published, e.g. {:?}",
            gaps.len(),
            &gaps[..gaps.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (counter, values) in &seen.seqs {
        let mut first_seen = Vec::new();
        for v in values {
            if !first_seen.contains(v) {
                first_seen.push(*v);
            }
        }
        assert!(
            first_seen.windows(2).all(|w| w[0] < w[1]),
            "{counter}: updates out of commit order: {values:?}"
        );
    }
}

async fn get_json(client: &reqwest::Client, url: String) -> Value {
    let r = client.get(&url).send().await.unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

/// Every endpoint ID a listing query gives on `server`, paged.
async fn list_ids(client: &reqwest::Client, server: &Epr, query: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    loop {
        let page = get_json(
            client,
            server.url(&format!(
                "/api/v1/endpoints?{query}&limit=1000&offset={}",
                out.len()
            )),
        )
        .await;
        let items = page["content"].as_array().unwrap();
        if items.is_empty() {
            return out;
        }
        out.extend(
            items
                .iter()
                .map(|e| e["endpointId"].as_str().unwrap().to_owned()),
        );
    }
}

/// The endpoints of the application whose metadata `n` is even, read on `server`.
async fn even_endpoints(client: &reqwest::Client, server: &Epr) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut offset = 0;
    loop {
        let page = get_json(
            client,
            server.url(&format!(
                "/api/v1/endpoints?applicationName={APP}&include=metadata&limit=1000&offset={offset}"
            )),
        )
        .await;
        let items = page["content"].as_array().unwrap();
        if items.is_empty() {
            return out;
        }
        offset += items.len();
        for e in items {
            if e["metadata"]["n"].as_u64().is_some_and(|n| n % 2 == 0) {
                out.insert(e["endpointId"].as_str().unwrap().to_owned());
            }
        }
    }
}

fn even_query() -> Value {
    json!({"metadata": {"$elemMatch": {"key": "n", "value": {"$mod": [2, 0]}}}})
}

async fn create_filter(client: &reqwest::Client, server: &Epr, name: &str) -> String {
    let r = client
        .post(server.url(&format!("/api/v1/applications/{APP}/filters")))
        .json(&json!({"name": name, "mongoQuery": even_query()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn wait_active(client: &reqwest::Client, server: &Epr, id: &str) -> Value {
    let url = server.url(&format!("/api/v1/applications/{APP}/filters/{id}"));
    poll(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            let f = get_json(client, url.clone()).await;
            if f["status"] == "active" {
                Ok(f)
            } else {
                Err(format!("the filter never turned active: {f}"))
            }
        },
    )
    .await
}

/// Every acknowledged registration of `acked` reads back on `server` with its metadata.
async fn assert_present(client: &reqwest::Client, server: &Epr, acked: &Acked) {
    for (id, n) in &acked.registered {
        let md = get_json(
            client,
            server.url(&format!("/api/v1/endpoints/{id}/metadata")),
        )
        .await;
        assert_eq!(md["n"], json!(n), "{id}");
    }
    for (counter, last_acked, last_tried) in &acked.counters {
        let md = get_json(
            client,
            server.url(&format!("/api/v1/endpoints/{counter}/metadata")),
        )
        .await;
        let stored = md.get("seq").and_then(Value::as_u64).unwrap_or(0);
        assert!(
            stored >= *last_acked && stored <= *last_tried,
            "{counter}: stored {stored}, acknowledged {last_acked}, attempted {last_tried}"
        );
    }
}

fn load(prefix: &str, server: &Epr, on_failure: OnFailure) -> WriteLoad {
    WriteLoad::start_named(
        prefix,
        4,
        &reqwest::Client::new(),
        &server.url("/api/v1"),
        VERSION,
        |n| json!({"n": n}),
        on_failure,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_writes_events_and_one_back_fill() {
    let cluster = Cluster::new().await;
    let feed = Feed::start(&cluster.instance).await;
    let r1 = cluster.replica("r1", &[]).start().await;
    let r2 = cluster.replica("r2", &[]).start().await;
    let client = reqwest::Client::new();
    let (l1, l2) = (
        load("a-", &r1, OnFailure::Panic),
        load("b-", &r2, OnFailure::Panic),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Created on one replica while both write: back-filled once, live-matched by both.
    let filter = create_filter(&client, &r1, "even").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (a1, a2) = (l1.finish().await, l2.finish().await);
    assert!(
        a1.registered.len() > 20 && a2.registered.len() > 20,
        "both replicas took writes ({} and {})",
        a1.registered.len(),
        a2.registered.len()
    );
    // Each replica reads what the other wrote.
    assert_present(&client, &r2, &a1).await;
    assert_present(&client, &r1, &a2).await;

    let f1 = wait_active(&client, &r1, &filter).await;
    let f2 = wait_active(&client, &r2, &filter).await;
    assert_eq!(f1, f2, "the filter reads the same on both");
    let want: BTreeSet<String> = a1
        .registered
        .iter()
        .chain(&a2.registered)
        .filter(|(_, n)| n % 2 == 0)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(even_endpoints(&client, &r2).await, want);
    for server in [&r1, &r2] {
        assert_eq!(
            list_ids(&client, server, &format!("filterId={filter}")).await,
            want,
            "the filter's members on replica {}",
            server.base()
        );
    }
    assert_eq!(f1["matchedEndpointsCount"], json!(want.len()));

    assert_events_of(&feed, &[&a1, &a2]).await;
    poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            match feed.activated() {
                0 => Err("no `activated` event".to_owned()),
                _ => Ok(()),
            }
        },
    )
    .await;
    // Whatever arrives late would have arrived by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(feed.activated(), 1, "the filter is back-filled once");
    drop((r1, r2));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_hands_over_the_outbox_and_the_back_fill() {
    let cluster = Cluster::new().await;
    let feed = Feed::start(&cluster.instance).await;
    // A slow back-fill (5 endpoints per step, 20 ms apart), so it is under way at the kill.
    let slow = [
        ("EPR__STORE__BACKFILL_STEP_MS", "0"),
        ("EPR__STORE__BACKFILL_BATCH", "5"),
        ("EPR__STORE__BACKFILL_PAUSE_MS", "20"),
    ];
    // Started first, r1 is likely the relay leader (and the back-fill's owner): the one
    // killed.
    let r1 = cluster.replica("r1", &slow).start().await;
    let r2 = cluster.replica("r2", &slow).start().await;
    let client = reqwest::Client::new();
    for chunk in 0..3 {
        let endpoints: Vec<Value> = (0..200)
            .map(|i| {
                let n = chunk * 200 + i;
                json!({"endpointId": format!("pre-{n:03}"), "metadata": {"n": n}})
            })
            .collect();
        let r = client
            .post(r2.url("/api/v1/endpoints/batch"))
            .json(&json!({"appVersion": {"name": VERSION}, "endpoints": endpoints}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let (l1, l2) = (
        load("a-", &r1, OnFailure::Stop),
        load("b-", &r2, OnFailure::Panic),
    );
    let filter = create_filter(&client, &r1, "even").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pending = get_json(
        &client,
        r2.url(&format!("/api/v1/applications/{APP}/filters/{filter}")),
    )
    .await;
    r1.kill(); // SIGKILL mid-load, mid-back-fill
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (a1, a2) = (l1.finish().await, l2.finish().await);
    assert!(
        a1.registered.len() > 20,
        "the killed replica took writes ({})",
        a1.registered.len()
    );
    assert_present(&client, &r2, &a1).await;
    assert_present(&client, &r2, &a2).await;

    let active = wait_active(&client, &r2, &filter).await;
    let want = even_endpoints(&client, &r2).await;
    assert_eq!(
        list_ids(&client, &r2, &format!("filterId={filter}")).await,
        want,
        "the back-fill completed on the survivor (it was {pending})"
    );
    assert_eq!(active["matchedEndpointsCount"], json!(want.len()));

    assert_events_of(&feed, &[&a1, &a2]).await;
    poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            match feed.activated() {
                0 => Err("no `activated` event".to_owned()),
                _ => Ok(()),
            }
        },
    )
    .await;
    eprintln!(
        "replicas: {} + {} acknowledged registrations verified after a replica's SIGKILL \
         (filter was {} at the kill)",
        a1.registered.len(),
        a2.registered.len(),
        pending["status"]
    );
    drop(r2);
    cluster.finish().await;
}

/// Read-modify-write with If-Match through both replicas at once: a write based on a stale
/// version is refused (412), so the counter ends at exactly the number of acknowledged
/// increments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_prevents_lost_updates_across_replicas() {
    const PER_REPLICA: usize = 8;
    const ATTEMPTS: usize = 6;
    let cluster = Cluster::new().await;
    let r1 = cluster.replica("r1", &[]).start().await;
    let r2 = cluster.replica("r2", &[]).start().await;
    let client = reqwest::Client::new();
    let r = client
        .post(r1.url("/api/v1/endpoints"))
        .json(
            &json!({"endpointId": "lu", "appVersion": {"name": VERSION}, "metadata": {"count": 0}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut tasks = Vec::new();
    for (k, server) in [&r1, &r2]
        .into_iter()
        .flat_map(|s| std::iter::repeat_n(s, PER_REPLICA))
        .enumerate()
    {
        let (client, url) = (client.clone(), server.url("/api/v1/endpoints/lu/metadata"));
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            for _ in 0..ATTEMPTS {
                let r = client.get(&url).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                let tag = r.headers()["etag"].to_str().unwrap().to_owned();
                let md: Value = r.json().await.unwrap();
                let count = md["count"].as_u64().unwrap();
                let r = client
                    .put(&url)
                    .header("if-match", &tag)
                    .json(&json!({"count": count + 1, "by": k}))
                    .send()
                    .await
                    .unwrap();
                match r.status() {
                    StatusCode::NO_CONTENT => ok += 1,
                    StatusCode::PRECONDITION_FAILED => refused += 1,
                    other => panic!("{other}: {}", r.text().await.unwrap()),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r) = t.await.unwrap();
        ok += o;
        refused += r;
    }
    assert_eq!(ok + refused, (2 * PER_REPLICA * ATTEMPTS) as u64);
    assert!(ok >= 1 && refused >= 1, "{ok} applied, {refused} refused");
    for server in [&r1, &r2] {
        let md = get_json(&client, server.url("/api/v1/endpoints/lu/metadata")).await;
        assert_eq!(
            md["count"],
            json!(ok),
            "every acknowledged increment applied, no other"
        );
    }
    drop((r1, r2));
    cluster.finish().await;
}

/// The database restarts under write load: writes during the outage get 503 with
/// `Retry-After`, readiness goes down and comes back, the service recovers by itself, and
/// every acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_is_survived() {
    let pg = Arc::new(tokio::task::spawn_blocking(PrivatePg::start).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.store.backend = "postgres".into();
    s.store.postgres.url = pg.url();
    s.store.postgres.pool_size = 4;
    s.store.postgres.writers = 2;
    s.store.postgres.connect_timeout_ms = 500;
    s.store.postgres.statement_timeout_ms = 2000;
    let app = spawn_settings(s).await;
    let ready = |app_url: String| {
        let client = reqwest::Client::new();
        async move {
            client
                .get(app_url)
                .send()
                .await
                .map(|r| r.status())
                .unwrap_or(StatusCode::BAD_GATEWAY)
        }
    };
    assert_eq!(ready(app.url("/health/ready")).await, StatusCode::OK);

    // Writers that go on through the outage: each registration is answered 201 or 503.
    #[derive(Default)]
    struct Tally {
        acked: Vec<(String, u64)>,
        unavailable: u64,
        acked_after_restart: u64,
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, url) = (reqwest::Client::new(), app.url("/api/v1/endpoints"));
        let (tally, stop, restarted) = (tally.clone(), stop.clone(), restarted.clone());
        writers.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            for n in 0u64.. {
                if stop.load(Relaxed) {
                    return;
                }
                let after = restarted.load(Relaxed);
                let id = format!("dr-{w}-{n}");
                let r = client
                    .post(&url)
                    .json(&json!({"endpointId": id, "appVersion": {"name": "demo-v1"},
                                  "metadata": {"n": n}}))
                    .send()
                    .await
                    .unwrap();
                match r.status() {
                    StatusCode::CREATED => {
                        let mut t = tally.lock().unwrap();
                        t.acked.push((id, n));
                        t.acked_after_restart += u64::from(after);
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert_eq!(
                            r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
                            Some("1")
                        );
                        let body: Value = r.json().await.unwrap();
                        assert_eq!(body["status"], 503, "{body}");
                        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
                        tally.lock().unwrap().unavailable += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    // A write cut by the restart may have committed or not: it was not
                    // acknowledged, and a retry of its ID may find it (409).
                    StatusCode::CONFLICT => {}
                    other => panic!("{id}: {other}: {}", r.text().await.unwrap()),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stopper = pg.clone();
    tokio::task::spawn_blocking(move || stopper.stop())
        .await
        .unwrap();
    let url = app.url("/health/ready");
    poll(Duration::from_secs(15), Duration::from_millis(50), || {
        let url = url.clone();
        async move {
            match ready(url).await {
                StatusCode::SERVICE_UNAVAILABLE => Ok(()),
                other => Err(format!("readiness stayed {other} with the database down")),
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let starter = pg.clone();
    tokio::task::spawn_blocking(move || starter.start_again())
        .await
        .unwrap();
    restarted.store(true, std::sync::atomic::Ordering::Relaxed);
    poll(Duration::from_secs(30), Duration::from_millis(50), || {
        let url = url.clone();
        async move {
            match ready(url).await {
                StatusCode::OK => Ok(()),
                other => Err(format!("readiness did not come back: {other}")),
            }
        }
    })
    .await;
    // Writes go through again without a restart of the service.
    poll(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            match tally.lock().unwrap().acked_after_restart {
                0..10 => Err("writes did not recover after the restart".to_owned()),
                _ => Ok(()),
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    assert!(tally.unavailable > 0, "writes met the outage");
    let by_id: BTreeMap<&str, u64> = tally.acked.iter().map(|(i, n)| (i.as_str(), *n)).collect();
    for (id, n) in &by_id {
        let md: Value = app
            .get(&format!("/endpoints/{id}/metadata"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(md["n"], json!(n), "acknowledged {id} is present");
    }
    eprintln!(
        "database restart: {} acknowledged writes present, {} answered 503 during the outage",
        by_id.len(),
        tally.unavailable
    );
    app.stop().await;
    drop(pg);
}

/// Readiness follows the database: `DOWN` (503, `Retry-After`, the store check naming the
/// failure) while it is stopped, `UP` again once it is back, without a restart of the
/// service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database() {
    let pg = Arc::new(tokio::task::spawn_blocking(PrivatePg::start).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    s.store.backend = "postgres".into();
    s.store.postgres.url = pg.url();
    s.store.postgres.pool_size = 2;
    s.store.postgres.writers = 1;
    s.store.postgres.connect_timeout_ms = 500;
    let app = spawn_settings(s).await;
    let probe = |want: StatusCode| {
        let (client, url) = (app.client.clone(), app.url("/health/ready"));
        async move {
            let r = client.get(&url).send().await.unwrap();
            let status = r.status();
            let retry = r.headers().get("retry-after").cloned();
            let body: Value = r.json().await.unwrap();
            if status == want {
                Ok((retry, body))
            } else {
                Err(format!("readiness is {status}, not {want}: {body}"))
            }
        }
    };
    probe(StatusCode::OK).await.unwrap();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.stop()).await.unwrap();
    let (retry, body) = poll(Duration::from_secs(15), Duration::from_millis(50), || {
        probe(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert_eq!(retry.unwrap(), "1");
    assert_eq!(body["status"], "DOWN", "{body}");
    assert!(
        body["checks"]["store"]
            .as_str()
            .unwrap()
            .starts_with("DOWN"),
        "{body}"
    );
    assert_eq!(body["checks"]["accepting"], "UP", "{body}");
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.start_again())
        .await
        .unwrap();
    let (_, body) = poll(Duration::from_secs(30), Duration::from_millis(50), || {
        probe(StatusCode::OK)
    })
    .await;
    assert_eq!(body["checks"]["store"], "UP", "{body}");
    app.stop().await;
    drop(pg);
}
