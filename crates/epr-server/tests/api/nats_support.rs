//! Real NATS for the tests: the shared test server (started by `scripts/services-up.sh`),
//! private nats-server processes that a test may stop and restart, and an Avro decoder that
//! parses the `.avsc` files on disk, independently of the crate that encodes them.

use crate::helpers::{poll, spawn_with, TestApp};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use epr_server::Settings;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared test NATS server: `EPR_TEST_NATS_URL`, else the address `services-up.sh` uses.
pub fn shared_url() -> String {
    std::env::var("EPR_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into())
}

/// A connected client to the shared server, with a clear failure if it is not running.
pub async fn shared_client() -> async_nats::Client {
    let url = shared_url();
    async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url.as_str())
        .await
        .unwrap_or_else(|e| {
            panic!("no NATS at {url} ({e}); start it with scripts/services-up.sh or set EPR_TEST_NATS_URL")
        })
}

/// A subscription on the shared server to every event of service instance `instance`,
/// in place when this returns; with the client, to be kept as long as the subscription.
pub async fn subscribe_events(instance: &str) -> (async_nats::Client, async_nats::Subscriber) {
    let nats = shared_client().await;
    let sub = nats
        .subscribe(format!("kaa.v1.events.{instance}.>"))
        .await
        .unwrap();
    nats.flush().await.unwrap();
    (nats, sub)
}

/// A unique service instance name, so that parallel tests never see each other's events.
pub fn unique_instance(prefix: &str) -> String {
    format!("{prefix}{}", &uuid_like()[..10])
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{:x}{:04x}{:x}",
        t & 0xffff_ffff,
        N.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    )
}

/// A nats-server process of the test's own, with JetStream, on a free port.
pub struct PrivateNats {
    child: Option<Child>,
    pub port: u16,
    store_dir: PathBuf,
    /// A configuration file passed with `-c` (the command-line flags still apply).
    config: Option<PathBuf>,
}

fn nats_bin() -> String {
    if let Ok(bin) = std::env::var("EPR_TEST_NATS_BIN") {
        return bin;
    }
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "nats-server".into()
}

impl PrivateNats {
    pub fn start(store_dir: &Path) -> Self {
        Self::start_inner(store_dir, None)
    }

    /// Like [`PrivateNats::start`], with nats-server configuration text (e.g.
    /// `max_payload: 4096`) written to a file in `store_dir` and passed with `-c`.
    pub fn start_with_config(store_dir: &Path, config: &str) -> Self {
        let file = store_dir.join("nats-server.conf");
        std::fs::write(&file, config).unwrap();
        Self::start_inner(store_dir, Some(file))
    }

    fn start_inner(store_dir: &Path, config: Option<PathBuf>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = Self {
            child: None,
            port,
            store_dir: store_dir.to_path_buf(),
            config,
        };
        n.restart();
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store directory (streams survive).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let bin = nats_bin();
        let mut cmd = Command::new(&bin);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let child = cmd
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.store_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} ({e}); scripts/services-up.sh installs it, or set EPR_TEST_NATS_BIN"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (no goodbye to clients: an outage as abrupt as a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.url().as_str())
            .await
            .unwrap()
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates a file-backed stream that captures every event of `instance`.
pub async fn capture_stream(
    client: &async_nats::Client,
    name: &str,
    instance: &str,
) -> async_nats::jetstream::stream::Stream {
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("kaa.v1.events.{instance}.>")],
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Every message a stream holds, in order: (subject, payload).
pub async fn stream_messages(
    stream: &mut async_nats::jetstream::stream::Stream,
) -> Vec<(String, Vec<u8>)> {
    let info = stream.info().await.unwrap().clone();
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if info.state.messages == 0 {
            break;
        }
        let m = stream.get_raw_message(seq).await.unwrap();
        out.push((m.subject.to_string(), m.payload.to_vec()));
    }
    out
}

/// Waits until the stream holds at least `n` messages.
pub async fn wait_for_stream(
    stream: &mut async_nats::jetstream::stream::Stream,
    n: u64,
    limit: Duration,
) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let have = stream.info().await.unwrap().state.messages;
        if have >= n || Instant::now() > deadline {
            return have;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The schema file for an event subject's last two tokens.
pub fn schema_for(subject: &str) -> &'static str {
    let tail: Vec<&str> = subject.rsplitn(3, '.').collect();
    match (tail[1], tail[0]) {
        ("lifecycle", "registered") => "0009-ep-registered.avsc",
        ("lifecycle", "unregistered") => "0009-ep-unregistered.avsc",
        ("lifecycle", "appversion-updated") => "0009-ep-appversion-updated.avsc",
        ("metadata", "updated") => "0015-ep-metadata-updated.avsc",
        ("token", "revoked") => "0016-endpoint-token-revoked.avsc",
        ("token", "status-changed") => "ext/epr-endpoint-token-status-changed.avsc",
        other => panic!("unexpected event subject {subject} ({other:?})"),
    }
}

/// Decodes a raw Avro datum with the schema file parsed here; checks no byte is left over.
pub fn decode(file: &str, payload: &[u8]) -> BTreeMap<String, Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../epr-events/avro")
        .join(file);
    let schema = Schema::parse_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut rest = payload;
    let value = GenericDatumReader::builder(&schema)
        .build()
        .unwrap()
        .read_value(&mut rest)
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(rest.is_empty(), "{} bytes after the datum", rest.len());
    match value {
        Value::Record(fields) => fields.into_iter().collect(),
        other => panic!("not a record: {other:?}"),
    }
}

/// An event as a test reads it: subject tail and decoded fields.
#[derive(Debug, Clone)]
pub struct Event {
    pub subject: String,
    pub fields: BTreeMap<String, Value>,
}

impl Event {
    pub fn from_message(subject: &str, payload: &[u8]) -> Self {
        Self {
            subject: subject.to_owned(),
            fields: decode(schema_for(subject), payload),
        }
    }

    /// `lifecycle.registered`, `metadata.updated`, `token.revoked`, ...
    pub fn kind(&self) -> String {
        let mut t: Vec<&str> = self.subject.rsplitn(3, '.').take(2).collect();
        t.reverse();
        t.join(".")
    }

    pub fn str(&self, field: &str) -> String {
        match &self.fields[field] {
            Value::String(s) => s.clone(),
            other => panic!("{field} is not a string: {other:?}"),
        }
    }

    /// A `["null","string"]` field.
    pub fn opt_str(&self, field: &str) -> Option<String> {
        union_string(&self.fields[field])
    }

    /// An `array<string>` field.
    pub fn strings(&self, field: &str) -> Vec<String> {
        match &self.fields[field] {
            Value::Array(items) => items
                .iter()
                .map(|v| union_string(v).expect("a string"))
                .collect(),
            other => panic!("{field} is not an array: {other:?}"),
        }
    }

    pub fn long(&self, field: &str) -> i64 {
        match &self.fields[field] {
            Value::Long(n) => *n,
            other => panic!("{field} is not a long: {other:?}"),
        }
    }

    /// A 15/EME map of JSON texts: key → Some(text) or None (Avro null).
    pub fn json_map(&self, field: &str) -> BTreeMap<String, Option<String>> {
        let Value::Map(m) = &self.fields[field] else {
            panic!("{field} is not a map");
        };
        m.iter()
            .map(|(k, v)| (k.clone(), union_string(v)))
            .collect()
    }

    /// 15/EME `updated`: key → (old, new) JSON texts.
    pub fn updated(&self) -> BTreeMap<String, (Option<String>, Option<String>)> {
        let Value::Map(m) = &self.fields["updated"] else {
            panic!("updated is not a map");
        };
        m.iter()
            .map(|(k, v)| {
                let Value::Record(f) = v else {
                    panic!("not a record")
                };
                let get = |name: &str| {
                    f.iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| union_string(v))
                        .unwrap()
                };
                (k.clone(), (get("oldValue"), get("newValue")))
            })
            .collect()
    }
}

fn union_string(v: &Value) -> Option<String> {
    match v {
        Value::Union(_, inner) => union_string(inner),
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("not a string or null: {other:?}"),
    }
}

/// Collects events from a core subscription until `n` arrived or `limit` passed.
pub async fn collect(sub: &mut async_nats::Subscriber, n: usize, limit: Duration) -> Vec<Event> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Ok(Some(m)) => out.push(Event::from_message(&m.subject, &m.payload)),
            _ => break,
        }
    }
    out
}

/// Waits until `/health/ready` reports the NATS component as `status`; returns the body.
pub async fn wait_nats(app: &TestApp, status: &str) -> Json {
    poll(
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async {
            let body = app.get_json("/health/ready").await;
            if body["components"]["nats"]["status"] == status {
                Ok(body)
            } else {
                Err(format!("NATS never became {status}: {body}"))
            }
        },
    )
    .await
}

/// Spawns an app that uses NATS at `url` as service instance `instance` (replica
/// `replica-1`), with further settings from `adjust`.
pub async fn spawn_on_nats(
    url: &str,
    instance: &str,
    adjust: impl FnOnce(&mut Settings) + Send + 'static,
) -> TestApp {
    let (url, instance) = (url.to_owned(), instance.to_owned());
    spawn_with(move |s| {
        s.nats.url = url;
        s.service.instance_name = instance;
        s.service.replica_id = "replica-1".into();
        adjust(s);
    })
    .await
}
