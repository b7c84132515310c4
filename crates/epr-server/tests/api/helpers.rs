//! `spawn_app()`, typed request helpers, polling, and a concurrent write load.
//!
//! The backend: `EPR_TEST_BACKEND=postgres` runs every spawned server on PostgreSQL, a fresh
//! database per data directory (so a restart on the same directory finds its data), dropped
//! with the `TestApp` that owns the directory, else once the directory is gone (what the
//! end of the test process cuts short, the next run's clean-up of databases older than an
//! hour removes). Tests that are inherently
//! embedded call [`embedded_only`] first.

use epr_server::{Application, Settings};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Mutex};

/// The backend the black-box tests run on (`EPR_TEST_BACKEND`: `embedded`, the default, or
/// `postgres`).
pub fn postgres_run() -> bool {
    match std::env::var("EPR_TEST_BACKEND").as_deref() {
        Ok("postgres") => true,
        Ok("embedded") | Err(_) => false,
        Ok(other) => panic!("EPR_TEST_BACKEND '{other}' is not embedded or postgres"),
    }
}

thread_local! {
    static EMBEDDED_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling test as inherently embedded (backup files, the SQLite integrity check,
/// the data-directory lock, a data directory's files): the servers it spawns run the
/// embedded backend whatever `EPR_TEST_BACKEND` says, and it says so on stderr (it is not
/// skipped). Call it first in the test body: it applies to the test's own thread, where
/// `#[tokio::test]` runs the body.
pub fn embedded_only() {
    EMBEDDED_ONLY.with(|e| e.set(true));
    if postgres_run() {
        let test = std::thread::current()
            .name()
            .unwrap_or("this test")
            .to_owned();
        eprintln!("{test}: inherently embedded, runs on the embedded backend");
    }
}

/// Whether servers spawned from this thread run on PostgreSQL.
pub fn on_postgres() -> bool {
    postgres_run() && !EMBEDDED_ONLY.with(|e| e.get())
}

/// Test databases by data directory (a restart on the directory reuses its database).
static DATABASES: std::sync::Mutex<Vec<(PathBuf, Arc<epr_store_pg::testing::TestDb>)>> =
    std::sync::Mutex::new(Vec::new());

/// The PostgreSQL database standing for `data_dir`: created at first use, the same after.
pub async fn database_for(data_dir: &Path) -> String {
    if let Some((_, db)) = DATABASES
        .lock()
        .unwrap()
        .iter()
        .find(|(d, _)| d == data_dir)
    {
        return db.url.clone();
    }
    let db = epr_store_pg::testing::TestDb::create().await;
    let url = db.url.clone();
    DATABASES
        .lock()
        .unwrap()
        .push((data_dir.to_path_buf(), Arc::new(db)));
    // The directory's owner may be a test rather than a `TestApp` (restarts, child
    // processes): the database goes when the directory does. A data directory the app has
    // not created yet is watched through its nearest existing ancestor (the test's
    // temporary directory), or it would count as gone at once.
    let dir = data_dir.to_path_buf();
    let watched = dir.ancestors().find(|p| p.exists()).map(Path::to_path_buf);
    std::thread::spawn(move || {
        let Some(watched) = watched else { return };
        while watched.exists() {
            std::thread::sleep(Duration::from_millis(200));
        }
        release_database(&dir);
    });
    url
}

/// Settings switched to PostgreSQL on the database of their data directory, with small
/// pools (tests run in parallel against one server).
pub async fn use_postgres(s: &mut Settings) {
    s.store.backend = "postgres".into();
    s.store.postgres.url = database_for(&s.store.data_dir).await;
    s.store.postgres.pool_size = 4;
    s.store.postgres.writers = 2;
}

/// The environment of an `epr` child on `data_dir` in this backend (empty on embedded).
pub async fn store_env(data_dir: &Path) -> Vec<(String, String)> {
    if !on_postgres() {
        return Vec::new();
    }
    vec![
        ("EPR__STORE__BACKEND".into(), "postgres".into()),
        (
            "EPR__STORE__POSTGRES__URL".into(),
            database_for(data_dir).await,
        ),
        ("EPR__STORE__POSTGRES__POOL_SIZE".into(), "4".into()),
        ("EPR__STORE__POSTGRES__WRITERS".into(), "2".into()),
    ]
}

/// Drops the database of `data_dir` (the directory's owner is done with it).
fn release_database(data_dir: &Path) {
    let mut dbs = DATABASES.lock().unwrap();
    let gone: Vec<_> = dbs
        .iter()
        .position(|(d, _)| d == data_dir)
        .map(|i| dbs.remove(i).1)
        .into_iter()
        .collect();
    drop(dbs);
    drop_databases(gone);
}

/// `Drop` cannot await: the databases are dropped on a thread with its own runtime, waited
/// for (so a finished test leaves nothing behind).
fn drop_databases(dbs: Vec<Arc<epr_store_pg::testing::TestDb>>) {
    let dbs: Vec<_> = dbs.into_iter().filter_map(Arc::into_inner).collect();
    if dbs.is_empty() {
        return;
    }
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for db in dbs {
                db.drop_db().await;
            }
        });
    })
    .join();
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    /// The app's use cases, to act in any tenant without a token.
    pub registry: Arc<epr_core::registry::Registry>,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Settings every test starts from: port 0, applications `demo` (demo-v1, demo-v2) and
/// `other` (other-v1), no environment variables read.
pub fn test_settings(data_dir: &Path) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".into();
    s.store.data_dir = data_dir.to_path_buf();
    s.add_applications("demo:demo-v1,demo-v2;other:other-v1")
        .unwrap();
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

/// Spawns with adjusted settings, in a fresh temporary data directory.
pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut s = test_settings(dir.path());
    adjust(&mut s);
    let mut app = spawn_settings(s).await;
    app._dir = Some(dir);
    app
}

/// Spawns on the given settings (the caller owns the data directory). In a PostgreSQL run
/// (see [`on_postgres`]), an embedded store becomes the data directory's test database.
pub async fn spawn_settings(mut s: Settings) -> TestApp {
    if on_postgres() && s.store.backend == "embedded" {
        use_postgres(&mut s).await;
    }
    if std::env::var_os("TEST_LOG").is_some() {
        // Kept for the whole test process: the log writer thread runs as long as it lives.
        static LOG: std::sync::OnceLock<epr_server::telemetry::LogGuard> =
            std::sync::OnceLock::new();
        LOG.get_or_init(|| epr_server::telemetry::init_logging(&s.log));
    }
    let app = Application::build(&s).await.expect("the app builds");
    spawn_application(app, &s)
}

/// Runs an application already built from `s` (e.g. with a reload source).
pub fn spawn_application(app: Application, s: &Settings) -> TestApp {
    let addr = app.addr();
    let registry = app.registry();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        data_dir: s.store.data_dir.clone(),
        registry,
        _dir: None,
        stop: Some(stop),
        handle: Some(handle),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Only a directory this app owns cannot be started on again.
        if self._dir.is_some() {
            release_database(&self.data_dir);
        }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request to an API path under `/api/v1`.
    pub fn api(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(&format!("/api/v1{path}")))
    }

    pub async fn get(&self, path: &str) -> Response {
        self.api(Method::GET, path).send().await.unwrap()
    }

    pub async fn send_json(&self, method: Method, path: &str, body: &Value) -> Response {
        self.api(method, path)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn post_endpoint(&self, body: &Value) -> Response {
        self.send_json(Method::POST, "/endpoints", body).await
    }

    /// Registers `id` in `version` with `metadata`, asserting success; returns the body.
    pub async fn register(&self, id: &str, version: &str, metadata: Value) -> Value {
        let r = self
            .post_endpoint(
                &json!({"endpointId": id, "appVersion": {"name": version}, "metadata": metadata}),
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        r.json().await.unwrap()
    }

    /// GETs a root path (e.g. `/health`) and returns its JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn total(&self, query: &str) -> u64 {
        let r = self.get(&format!("/endpoints?{query}")).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<Value>().await.unwrap()["totalElements"]
            .as_u64()
            .unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        get_text(&self.client, &self.url("/metrics")).await
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

/// Calls `probe` until it returns `Ok`, waiting `every` between calls; panics with the last
/// `Err` message once `limit` has passed.
pub async fn poll<T, F, Fut>(limit: Duration, every: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match probe().await {
            Ok(done) => return done,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// GETs `url` and returns the body as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Asserts an error response: status, JSON body naming `field` and `rule`.
pub async fn assert_error(r: Response, status: StatusCode, field: &str, rule: &str) -> Value {
    assert_eq!(r.status(), status);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/json"), "{ct}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["field"], field, "{body}");
    assert_eq!(body["rule"], rule, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    body
}

/// What the writers of a [`WriteLoad`] had acknowledged.
#[derive(Default)]
pub struct Acked {
    /// Registered endpoint → its `n`.
    pub registered: Vec<(String, u64)>,
    /// Per writer: (counter endpoint, last acknowledged `seq`, last attempted `seq`).
    pub counters: Vec<(String, u64, u64)>,
}

/// What a write that fails or is not acknowledged does to its writer.
#[derive(Clone, Copy)]
pub enum OnFailure {
    /// The writer ends (the server is expected to go away).
    Stop,
    /// The writer panics (every write must succeed).
    Panic,
}

/// Concurrent writers, each: registers `counter-{w}` in `version`, then for n = 1, 2, …
/// registers `w{w}-{n}` with `metadata(n)` and sets the counter's `seq` key to n, recording
/// what was acknowledged.
pub struct WriteLoad {
    pub acked: Arc<Mutex<Acked>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WriteLoad {
    /// Starts `writers` writers against `api` (the `…/api/v1` URL).
    pub fn start(
        writers: usize,
        client: &reqwest::Client,
        api: &str,
        version: &'static str,
        metadata: fn(u64) -> Value,
        on_failure: OnFailure,
    ) -> Self {
        Self::start_named("", writers, client, api, version, metadata, on_failure)
    }

    /// As [`WriteLoad::start`], with endpoint IDs prefixed by `prefix` (loads on several
    /// servers of one store).
    pub fn start_named(
        prefix: &str,
        writers: usize,
        client: &reqwest::Client,
        api: &str,
        version: &'static str,
        metadata: fn(u64) -> Value,
        on_failure: OnFailure,
    ) -> Self {
        let acked = Arc::new(Mutex::new(Acked::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (client, base, acked, stop) =
                (client.clone(), api.to_owned(), acked.clone(), stop.clone());
            let prefix = prefix.to_owned();
            tasks.push(tokio::spawn(async move {
                // Whether a write was acknowledged (with `OnFailure::Panic`: asserts it was).
                let acknowledged = |r: reqwest::Result<Response>, status: Option<StatusCode>| {
                    if let OnFailure::Stop = on_failure {
                        return r.is_ok_and(|r| r.status().is_success());
                    }
                    let r = r.unwrap();
                    match status {
                        Some(status) => assert_eq!(r.status(), status),
                        None => assert!(r.status().is_success(), "{}", r.status()),
                    }
                    true
                };
                let counter = format!("{prefix}counter-{w}");
                let r = client
                    .post(format!("{base}/endpoints"))
                    .json(&json!({"endpointId": counter, "appVersion": {"name": version}}))
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
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let id = format!("{prefix}w{w}-{n}");
                    let r = client
                        .post(format!("{base}/endpoints"))
                        .json(&json!({"endpointId": id, "appVersion": {"name": version},
                                      "metadata": metadata(n)}))
                        .send()
                        .await;
                    if !acknowledged(r, Some(StatusCode::CREATED)) {
                        return;
                    }
                    acked.lock().await.registered.push((id, n));
                    acked.lock().await.counters[slot].2 = n;
                    let r = client
                        .put(format!("{base}/endpoints/{counter}/metadata/seq"))
                        .json(&json!(n))
                        .send()
                        .await;
                    if !acknowledged(r, None) {
                        return;
                    }
                    acked.lock().await.counters[slot].1 = n;
                }
            }));
        }
        Self { acked, stop, tasks }
    }

    /// Stops the writers, waits for them, and returns what they had acknowledged.
    pub async fn finish(self) -> Acked {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.acked).ok().unwrap().into_inner()
    }
}
