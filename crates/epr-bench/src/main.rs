//! `epr-bench`: closed-loop HTTP load generator for the EPR server.
//! See README.md for what it measures and how to run it.

mod auth;
mod client;
mod cpu;
mod ecap;
mod events;
mod filter_eval;
mod filters;
mod issue13;
mod keymix;
mod metalist;
mod metrics;
mod million;
mod outbox;
mod pgdb;
mod selfreg;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use client::Conn;
use cpu::{cpu_ticks, CpuSnap, TICKS_PER_S};
use events::{Counts, Events};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(version, about = "HTTP load generator for the EPR server")]
struct Args {
    /// Server binary to spawn on a free port with a temporary config/data dir.
    #[arg(long, conflicts_with = "url", required_unless_present = "url")]
    server_bin: Option<PathBuf>,
    /// Benchmark an already running server instead (must know --app-version).
    #[arg(long)]
    url: Option<String>,
    /// Concurrent keep-alive connections, one closed-loop task each.
    #[arg(long, short, default_value_t = 64)]
    connections: usize,
    /// Unrecorded seconds before each phase's measurement.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Recorded seconds per phase.
    #[arg(long, short, default_value_t = 10.0)]
    duration: f64,
    /// Comma-separated subset of: health,register,get,put,latency,drain,backfill,
    /// filter-update,filter-register,metalist,selfreg,ecap,mix,million (always run in that
    /// order; latency, drain and ecap need --nats-url). selfreg: operator registrations vs
    /// device self-registrations (and with claim tokens), side by side; ecap: 16/ECAP token
    /// validation over NATS (activation, then an open-loop load at --ecap-rate); mix: issue
    /// 13's sequence (health, register, get, register without then with 100 filters, health)
    /// on a fresh server; million: issue 13's footprint and listing run at
    /// --million-endpoints (needs --server-bin).
    #[arg(long, default_value = "health,register,get,put", value_delimiter = ',')]
    phases: Vec<String>,
    /// Run `health` again at the end of each round (the machine is noisy).
    #[arg(long)]
    health_again: bool,
    /// Run the whole phase sequence this many times.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Client runtime threads; 1 keeps the client to one core of a shared box.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Application version the endpoints are registered under.
    #[arg(long, default_value = "bench-v1")]
    app_version: String,
    /// Also write all results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// NATS server for events. With --server-bin, two servers are spawned, one with
    /// events off (`nats.url: ""`) and one with events on (this URL), and every
    /// health/register/get/put/latency phase runs against both (off then on in odd
    /// rounds, on then off in even ones); events of the "on" server are counted by a
    /// subscriber on `kaa.v1.events.{instance}.>`. Needed by the latency, drain and ecap
    /// phases (ecap runs on the events-on server).
    #[arg(long)]
    nats_url: Option<String>,
    /// PID of the nats-server process (e.g. `$(cat /tmp/epr-services/nats/pid)`): its CPU
    /// is then shown apart from the machine's other load.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// `service.instance_name` of the server: default `bench<run id>` for spawned servers
    /// (so nothing else publishing to the broker is counted), `epr` with --url.
    #[arg(long)]
    instance_name: Option<String>,
    /// Latency phase: registrations per second in total (open loop, spread evenly over
    /// --connections).
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Seconds to wait for outstanding events once a phase's writes are done; events
    /// still missing then are reported as lost.
    #[arg(long, default_value_t = 5.0)]
    event_timeout: f64,
    /// Drain phase: endpoints registered (without metadata: one event each) through
    /// `POST /api/v1/endpoints/batch`, in each of its two measurements.
    #[arg(long, default_value_t = 100_000)]
    drain_endpoints: usize,
    /// `register` without metadata: one event (`registered`) per registration instead of
    /// two (`registered` + `metadata.updated`); get/put then start from empty metadata.
    #[arg(long)]
    bare_register: bool,
    /// Drain and filter phases: endpoints per batch request (the server's limit is 1000).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Backfill phase: endpoints (10 metadata keys each) of application `fill`, registered
    /// once per run through the batch API; every new filter is back-filled over them.
    #[arg(long, default_value_t = 100_000)]
    backfill_endpoints: usize,
    /// Filter phases: how often a `pending` filter's status is polled, in ms.
    #[arg(long, default_value_t = 10)]
    poll_ms: u64,
    /// filter-update phase: active filters in application B (`updb`); A (`upda`) and the
    /// control C (`updc`) have none.
    #[arg(long, default_value_t = 1000)]
    update_filters: usize,
    /// filter-update phase: endpoints in each of A, B and C (10 metadata keys each).
    #[arg(long, default_value_t = 10_000)]
    update_endpoints: usize,
    /// filter-update phase: metadata PUTs per second in total, open loop over
    /// --connections, to A, B and C in turn. Keep it low enough that the store's writer
    /// is not saturated (mean group ≈ 1), or A, B and C share group commits and the
    /// difference disappears.
    #[arg(long, default_value_t = 100.0)]
    update_rate: f64,
    /// metalist phase: endpoints (5 metadata keys of issue 13's mix) of application `meta`,
    /// registered once per run through the batch API.
    #[arg(long, default_value_t = 100_000)]
    meta_endpoints: usize,
    /// filter-register phase: active filters in application `regb`; `rega` has none.
    #[arg(long, default_value_t = 100)]
    register_filters: usize,
    /// Filter phases: before each measurement, wait up to this many seconds until the rest
    /// of the machine (all but the server, the bench and nats-server) uses under 0.2 cores
    /// (the machine is shared; 0: do not wait).
    #[arg(long, default_value_t = 0.0)]
    quiet_wait: f64,
    /// Authentication off vs on (needs --server-bin, not --nats-url): two servers, one
    /// without authentication and one whose tenant's issuer is an in-process OpenID
    /// provider; requests to the latter carry `Authorization: Bearer <token>`, each
    /// connection its own token(s). Every closed-loop phase runs against both, in the
    /// alternating order of the events comparison.
    #[arg(long, conflicts_with = "nats_url", requires = "server_bin")]
    auth: bool,
    /// --auth: signature algorithm of the tokens.
    #[arg(long, value_enum, default_value = "RS256")]
    auth_alg: auth::Alg,
    /// --auth: distinct tokens per connection (distinct subjects), used in turn, one per
    /// request. 1 (the default) is what a client does: one token for many requests.
    #[arg(long, default_value_t = 1)]
    auth_fresh_tokens: usize,
    /// --auth: also a third server with the verified-token cache off
    /// (`auth.token_cache_entries: 0`): every request verifies its token's signature (the
    /// cost of cache misses, 100 % of them).
    #[arg(long, requires = "auth")]
    auth_miss: bool,
    /// --auth: the auth-off server gets the same `Authorization` headers too (it ignores
    /// them), so both sides move the same bytes and the difference is the token check
    /// alone.
    #[arg(long, requires = "auth")]
    auth_header_everywhere: bool,
    /// Embedded store vs PostgreSQL (needs --server-bin, not --auth): this
    /// URL names a PostgreSQL server (any database on it); the bench creates two fresh
    /// databases and spawns three targets: `embedded`, `pg` (one server on the first
    /// database) and `pg2` (two servers, two replicas, on the second; connections
    /// alternate between them). Every closed-loop phase runs against all three, in turn;
    /// metalist runs on `embedded` and `pg`.
    /// With --nats-url too, every target also publishes events and serves NATS requests,
    /// each under its own instance name (`{instance}-{target}`): what the ecap phase needs.
    #[arg(long, conflicts_with = "auth", requires = "server_bin")]
    pg_url: Option<String>,
    /// Application of the selfreg and ecap phases (its versions: --app-version).
    #[arg(long, default_value = "bench")]
    app_name: String,
    /// selfreg phase: at most this many claim tokens are minted before each claim-token
    /// measurement (the bench mints 1.5 × the best registration rate of the target so
    /// far × (warm-up + duration), up to this); 0 skips the claim-token measurement.
    #[arg(long, default_value_t = 200_000)]
    selfreg_claims: usize,
    /// selfreg phase: YAML appended to each spawned server's config (the device API's
    /// per-source rate limit would otherwise stop a bench that sends everything from one
    /// address); '' appends nothing.
    #[arg(long, default_value = selfreg::SERVER_YAML)]
    selfreg_yaml: String,
    /// ecap phase: endpoints registered (each with its own token) per target and round.
    #[arg(long, default_value_t = 20_000)]
    ecap_endpoints: usize,
    /// ecap phase: token validation requests per second (open loop: sent on schedule
    /// whatever the replies).
    #[arg(long, default_value_t = 5000.0)]
    ecap_rate: f64,
    /// ecap phase: validation requests in flight during the activation pass (closed loop).
    #[arg(long, default_value_t = 64)]
    ecap_window: usize,
    /// mix and million phases: saved filters of issue 13's mix ([`keymix::filter`]).
    #[arg(long, default_value_t = 100)]
    mix_filters: usize,
    /// mix phase, a control run: the filters are saved in another application (`bench`),
    /// so the step "with filters" measures what the store's growth alone costs.
    #[arg(long)]
    mix_filters_elsewhere: bool,
    /// million phase: endpoints (10 metadata keys each) loaded through the batch API.
    #[arg(long, default_value_t = 1_000_000)]
    million_endpoints: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Health,
    Register,
    Get,
    Put,
    /// Open-loop registrations; write response → `registered` event latency.
    Latency,
    /// Batch registrations; how fast the relay empties the outbox.
    Drain,
    /// New filters over `--backfill-endpoints` endpoints: time until each is `active`.
    Backfill,
    /// Metadata PUTs (open loop) into apps with and without `--update-filters` filters.
    FilterUpdate,
    /// Closed-loop registrations into apps with and without `--register-filters` filters.
    FilterRegister,
    /// Listing by a metadata value over `--meta-endpoints` endpoints ([`metalist`]).
    MetaList,
    /// Operator registration vs device self-registration ([`selfreg`]): runs the three
    /// phases below.
    SelfReg,
    /// 16/ECAP token validation over NATS ([`ecap`]).
    Ecap,
    /// `POST /api/v1/endpoints` with the selfreg key mix (part of `selfreg`).
    SrOperator,
    /// Issue 13's sequence on a fresh server ([`issue13`]).
    Mix,
    /// Issue 13's million-endpoint footprint, back-fill, listing and restart ([`million`]).
    Million,
    /// `POST /device/v1/applications/{app}/registrations` with the provisioning secret.
    SrDevice,
    /// The same with a pre-minted claim token instead.
    SrClaim,
}

impl Phase {
    const ALL: [Phase; 14] = [
        Phase::Health,
        Phase::Register,
        Phase::Get,
        Phase::Put,
        Phase::Latency,
        Phase::Drain,
        Phase::Backfill,
        Phase::FilterUpdate,
        Phase::FilterRegister,
        Phase::MetaList,
        Phase::SelfReg,
        Phase::Ecap,
        Phase::Mix,
        Phase::Million,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Health => "health",
            Phase::Register => "register",
            Phase::Get => "get-by-id",
            Phase::Put => "metadata-put",
            Phase::Latency => "latency",
            Phase::Drain => "drain",
            Phase::Backfill => "backfill",
            Phase::FilterUpdate => "filter-update",
            Phase::FilterRegister => "filter-register",
            Phase::MetaList => "metalist",
            Phase::SelfReg => "selfreg",
            Phase::Ecap => "ecap",
            Phase::Mix => "mix",
            Phase::Million => "million",
            Phase::SrOperator => "selfreg-operator",
            Phase::SrDevice => "selfreg-device",
            Phase::SrClaim => "selfreg-claim",
        }
    }

    fn parse(s: &str) -> Result<Phase> {
        Ok(match s {
            "health" => Phase::Health,
            "register" => Phase::Register,
            "get" | "get-by-id" => Phase::Get,
            "put" | "metadata-put" => Phase::Put,
            "latency" => Phase::Latency,
            "drain" => Phase::Drain,
            "backfill" => Phase::Backfill,
            "filter-update" => Phase::FilterUpdate,
            "filter-register" => Phase::FilterRegister,
            "metalist" => Phase::MetaList,
            "selfreg" => Phase::SelfReg,
            "ecap" => Phase::Ecap,
            "mix" | "issue13" => Phase::Mix,
            "million" => Phase::Million,
            _ => bail!(
                "unknown phase {s:?} (use health,register,get,put,latency,drain,backfill,\
                 filter-update,filter-register,metalist,selfreg,ecap,mix,million)"
            ),
        })
    }

    /// Closed-loop phases, run against every server (events off and on).
    fn closed_loop(self) -> bool {
        matches!(
            self,
            Phase::Health | Phase::Register | Phase::Get | Phase::Put
        )
    }

    /// Phases of saved filters ([`filters`]).
    fn filters(self) -> bool {
        matches!(
            self,
            Phase::Backfill | Phase::FilterUpdate | Phase::FilterRegister
        )
    }

    /// Phases that read the events of the events-on server.
    fn needs_nats(self) -> bool {
        matches!(self, Phase::Latency | Phase::Drain | Phase::Ecap)
    }

    /// Registrations: each success adds an endpoint (and its events).
    fn registers(self) -> bool {
        matches!(
            self,
            Phase::Register | Phase::SrOperator | Phase::SrDevice | Phase::SrClaim
        )
    }
}

#[derive(Serialize, Clone)]
struct PhaseResult {
    phase: &'static str,
    /// Which server: "" (the only one), "off" (events off) or "on" (events on).
    target: &'static str,
    connections: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Server process CPU (user + system, all threads) during the recorded window, in
    /// cores, and per recorded request in µs; spawned servers only.
    server_cpu_cores: Option<f64>,
    server_cpu_us_per_req: Option<f64>,
    /// The bench's own CPU, and the rest of the machine's busy CPU (NATS, kernel work
    /// not charged to a process, anything else running), in cores, same window.
    bench_cpu_cores: Option<f64>,
    /// nats-server's CPU (with --nats-pid).
    nats_cpu_cores: Option<f64>,
    other_cpu_cores: Option<f64>,
    /// CPU the hypervisor took from this VM, in cores, same window.
    steal_cores: Option<f64>,
    /// The server's own metrics over the window (store commits, relay).
    server: Option<metrics::ServerStats>,
}

#[derive(Serialize)]
struct Round {
    round: usize,
    phases: Vec<PhaseResult>,
    /// Throughput of a phase as a percentage of mean `health` throughput (of the same
    /// server), and events-on throughput as a percentage of events-off.
    ratios_pct: Vec<(String, f64)>,
    events: Vec<EventsCheck>,
    latency: Vec<outbox::LatencyResult>,
    drain: Vec<outbox::DrainResult>,
    /// Filter phases (their registrations are rows of `phases`).
    filters: filters::RoundOut,
    metalist: metalist::MetaOut,
    /// selfreg phase: per target, the rates side by side (the rows are in `phases`).
    selfreg: Vec<selfreg::SelfRegRow>,
    ecap: Vec<ecap::EcapResult>,
    mix: Vec<issue13::MixRound>,
    million: Vec<million::MillionOut>,
}

/// What the subscriber saw of one closed-loop phase against the events-on server.
#[derive(Serialize, Clone)]
struct EventsCheck {
    phase: &'static str,
    round: usize,
    /// Successful writes of the phase, warm-up and stragglers included.
    writes_acked: u64,
    /// Registrations among them (each publishes `registered` + `metadata.updated`).
    registrations: u64,
    registered_events: u64,
    metadata_events: u64,
    other_events: u64,
    /// Events that arrived inside the recorded window, per second.
    window_events_per_s: f64,
    /// Largest outbox depth `/health/ready` showed during the phase (sampled by the
    /// server every 2 s).
    max_outbox_depth: Option<u64>,
    /// Last event's arrival minus the last write's response, ms (negative: the last
    /// event came before the last response).
    tail_ms: Option<f64>,
    /// Every expected event arrived, and no unexpected one.
    ok: bool,
}

#[derive(Serialize)]
struct Report {
    command: String,
    server_version: Option<String>,
    date: String,
    nproc: usize,
    rounds: Vec<Round>,
}

/// Per-connection state that survives across phases: the connection itself
/// and the endpoint ids this connection registered (read by get/put).
struct Worker {
    idx: usize,
    conn: Conn,
    ids: Vec<String>,
    seq: u64,
    rng: u64,
    path: String,
    body: String,
    /// `Authorization` header lines this connection sends in turn (empty: none).
    auth: Vec<String>,
    auth_next: usize,
}

/// Shared, read-only per-run settings every worker needs.
struct Ctx {
    run_id: String,
    app_version: String,
    /// What a `register` request carries.
    metadata: RegMetadata,
    /// `POST /device/v1/applications/{app}/registrations` (selfreg).
    device_path: String,
    /// Unused claim tokens of the current selfreg-claim measurement, shared by its
    /// connections (one thread: the lock is never contended).
    claims: std::sync::Mutex<Vec<String>>,
}

/// The metadata of a `register` request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RegMetadata {
    /// None (--bare-register): one event per registration instead of two.
    Bare,
    /// The 5 keys of the earlier benches.
    Basic,
    /// The 10 keys of mixed types of the filter phases' endpoints ([`filters::Md`]).
    Mixed,
    /// The 5 keys of issue 13's mix ([`keymix::write_md`]).
    Five,
}

impl Ctx {
    fn new(run_id: String, app_version: String, metadata: RegMetadata, app: &str) -> Ctx {
        Ctx {
            run_id,
            app_version,
            metadata,
            device_path: format!("/device/v1/applications/{app}/registrations"),
            claims: Default::default(),
        }
    }
}

impl Worker {
    fn next_rand(&mut self) -> u64 {
        xorshift(&mut self.rng)
    }

    fn random_idx(&mut self) -> usize {
        (self.next_rand() % self.ids.len() as u64) as usize
    }

    /// Issues one request of `phase`. Path and body are formatted into
    /// buffers reused across requests to keep the client's per-request work
    /// (and so its CPU share on the shared machine) small.
    async fn one(&mut self, phase: Phase, ctx: &Ctx) -> Result<client::Response> {
        self.path.clear();
        self.body.clear();
        let mut new_id = None;
        let method = match phase {
            Phase::Health => {
                self.path.push_str("/health/live");
                "GET"
            }
            Phase::Register => {
                self.seq += 1;
                let n = self.seq;
                let id = format!("b-{}-{}-{n}", ctx.run_id, self.idx);
                match ctx.metadata {
                    RegMetadata::Bare => write!(
                        self.body,
                        r#"{{"endpointId":"{id}","appVersion":{{"name":"{}"}}}}"#,
                        ctx.app_version
                    )?,
                    RegMetadata::Basic => write!(
                        self.body,
                        r#"{{"endpointId":"{id}","appVersion":{{"name":"{}"}},"metadata":{{"serial":"SN-{n}","city":"Kyiv","level":{},"lat":50.45,"active":true}}}}"#,
                        ctx.app_version,
                        n % 10
                    )?,
                    RegMetadata::Mixed => {
                        write!(
                            self.body,
                            r#"{{"endpointId":"{id}","appVersion":{{"name":"{}"}},"metadata":"#,
                            ctx.app_version
                        )?;
                        filters::Md::of(((self.idx as u64) << 40) | n).write_json(&mut self.body);
                        self.body.push('}');
                    }
                    RegMetadata::Five => {
                        write!(
                            self.body,
                            r#"{{"endpointId":"{id}","appVersion":{{"name":"{}"}},"metadata":"#,
                            ctx.app_version
                        )?;
                        keymix::write_md(&mut self.body, issue13::key(self.idx, n));
                        self.body.push('}');
                    }
                }
                self.path.push_str("/api/v1/endpoints");
                new_id = Some(id);
                "POST"
            }
            Phase::Get => {
                let i = self.random_idx();
                write!(self.path, "/api/v1/endpoints/{}", self.ids[i])?;
                "GET"
            }
            Phase::Put => {
                let (i, temp) = (self.random_idx(), self.next_rand() % 400);
                write!(self.path, "/api/v1/endpoints/{}/metadata/temp", self.ids[i])?;
                write!(self.body, "{}.{}", temp / 10, temp % 10)?;
                "PUT"
            }
            Phase::SrOperator | Phase::SrDevice | Phase::SrClaim => {
                self.seq += 1;
                let id = selfreg::write_request(self, phase, ctx)?;
                new_id = Some(id);
                if phase != Phase::SrOperator {
                    // Devices send no operator credentials.
                    let r = self
                        .conn
                        .request("POST", &self.path, Some(self.body.as_bytes()))
                        .await?;
                    if let (Some(id), true) = (new_id, r.is_success()) {
                        self.ids.push(id);
                    }
                    return Ok(r);
                }
                "POST"
            }
            _ => bail!("{} is not a closed-loop phase", phase.name()),
        };
        let body = (!self.body.is_empty()).then_some(self.body.as_bytes());
        let header = match self.auth.len() {
            0 => "",
            n => {
                self.auth_next = (self.auth_next + 1) % n;
                self.auth[self.auth_next].as_str()
            }
        };
        let r = self
            .conn
            .request_with_headers(method, &self.path, body, header)
            .await?;
        if let (Some(id), true) = (new_id, r.is_success()) {
            self.ids.push(id);
        }
        Ok(r)
    }
}

/// xorshift64: a few ALU ops per pick, enough to spread requests over ids. `state` must
/// not be 0.
fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Set once the first failure has been printed, so a broken server does not
/// flood stderr (and burn client CPU) with one line per request.
static FIRST_ERROR: AtomicBool = AtomicBool::new(false);

fn report_error(phase: Phase, what: impl FnOnce() -> String) {
    if !FIRST_ERROR.swap(true, Ordering::Relaxed) {
        eprintln!("first error ({}): {}", phase.name(), what());
    }
}

struct TaskOut {
    hist: Histogram<u64>,
    requests: u64,
    errors: u64,
    /// Successful requests, recorded or not (each write's events must arrive).
    acked: u64,
    /// Successful registrations, including the untimed ones get/put make.
    registrations: u64,
    /// When the last successful response arrived.
    last_ok: Option<Instant>,
}

/// One connection's closed loop: requests back to back until `end`;
/// only requests that both start and finish inside `[measure_from, end]`
/// are recorded, so req/s is completions over exactly `--duration` seconds
/// and a straggler past `end` (or a slow connect) cannot skew it.
async fn run_task(
    mut w: Worker,
    ctx: Arc<Ctx>,
    phase: Phase,
    measure_from: Instant,
    end: Instant,
) -> (Worker, TaskOut) {
    let mut out = TaskOut {
        hist: new_hist(),
        requests: 0,
        errors: 0,
        acked: 0,
        registrations: 0,
        last_ok: None,
    };
    // get/put need ids; if `register` was not selected, make a few untimed.
    while matches!(phase, Phase::Get | Phase::Put) && w.ids.len() < 16 && Instant::now() < end {
        match w.one(Phase::Register, &ctx).await {
            Ok(r) if r.is_success() => {
                out.registrations += 1;
                out.last_ok = Some(Instant::now());
            }
            Ok(_) => {}
            Err(e) => {
                report_error(Phase::Register, || format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    loop {
        let start = Instant::now();
        if start >= end {
            break;
        }
        let res = w.one(phase, &ctx).await;
        let done = Instant::now();
        let recorded = start >= measure_from && done <= end;
        if recorded {
            out.requests += 1;
            out.hist
                .saturating_record((done - start).as_micros() as u64);
        }
        match res {
            Ok(r) if r.is_success() => {
                out.acked += 1;
                out.registrations += phase.registers() as u64;
                out.last_ok = Some(done);
            }
            Ok(r) => {
                out.errors += recorded as u64;
                report_error(phase, || {
                    format!("HTTP {} {}", r.status, String::from_utf8_lossy(&r.body))
                });
            }
            Err(e) => {
                out.errors += recorded as u64;
                report_error(phase, || format!("{e:#}"));
                // Don't spin at full speed against a dead server.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (w, out)
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits; values above are clamped.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What a closed-loop phase did beyond its table row: input for the events check.
struct PhaseExtra {
    acked: u64,
    registrations: u64,
    last_ok: Option<Instant>,
    /// Events received inside the recorded window (events-on server only).
    window_events: Option<u64>,
    /// Largest outbox depth seen during the phase (events-on server only).
    max_outbox_depth: Option<u64>,
}

async fn run_phase(
    workers: Vec<Worker>,
    ctx: &Arc<Ctx>,
    phase: Phase,
    args: &Args,
    target: &Target,
) -> Result<(Vec<Worker>, PhaseResult, PhaseExtra)> {
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    // Event counts at the edges of the recorded window, and the outbox depth meanwhile.
    let window = target.events.as_ref().map(|ev| {
        let ev = ev.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let from = ev.counts().total();
            tokio::time::sleep_until(end.into()).await;
            ev.counts().total() - from
        })
    });
    let depth = target
        .events
        .is_some()
        .then(|| tokio::spawn(max_outbox_depth(target.addr.clone(), end)));
    let cpu = sample_window(&target.addr, target.pid(), args, measure_from, end);
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(run_task(w, ctx.clone(), phase, measure_from, end)))
        .collect();
    let (mut hist, mut requests, mut errors, mut back) = (new_hist(), 0, 0, Vec::new());
    let mut extra = PhaseExtra {
        acked: 0,
        registrations: 0,
        last_ok: None,
        window_events: None,
        max_outbox_depth: None,
    };
    for h in handles {
        // A hung server would hang a task forever: give up 30 s past the end.
        let (w, out) = tokio::time::timeout_at((end + Duration::from_secs(30)).into(), h)
            .await
            .map_err(|_| anyhow!("phase {} did not finish: server stuck?", phase.name()))??;
        hist.add(&out.hist)?;
        requests += out.requests;
        errors += out.errors;
        extra.acked += out.acked;
        extra.registrations += out.registrations;
        extra.last_ok = extra.last_ok.max(out.last_ok);
        back.push(w);
    }
    if let Some(w) = window {
        extra.window_events = Some(w.await?);
    }
    if let Some(d) = depth {
        extra.max_outbox_depth = d.await?;
    }
    let (cpu, server) = cpu.await?;
    let cores = |ticks: Option<u64>| ticks.map(|t| t as f64 / TICKS_PER_S / args.duration);
    let cpu_s = cpu.server.map(|t| t as f64 / TICKS_PER_S);
    let seconds = args.duration;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let res = PhaseResult {
        phase: phase.name(),
        target: target.name,
        connections: args.connections,
        requests,
        errors,
        seconds,
        rps: requests as f64 / seconds,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        server_cpu_cores: cores(cpu.server),
        server_cpu_us_per_req: cpu_s
            .filter(|_| requests > 0)
            .map(|c| c * 1e6 / requests as f64),
        bench_cpu_cores: cores(cpu.bench),
        nats_cpu_cores: cores(cpu.nats),
        other_cpu_cores: cores(cpu.other()),
        steal_cores: cores(cpu.steal),
        server,
    };
    Ok((back, res, extra))
}

/// One closed-loop measurement of `phase` against `targets[i]`: lets the servers settle
/// (`settling`), checkpoints PostgreSQL (--pg-url), prints the table row and, on the
/// events-on server, checks the events the writes caused.
async fn measure_closed(
    targets: &mut [Target],
    i: usize,
    phase: Phase,
    round: usize,
    ctx: &Arc<Ctx>,
    args: &Args,
    settling: bool,
) -> Result<(PhaseResult, Option<EventsCheck>)> {
    if settling {
        let waited = settle(targets).await;
        if waited > Duration::from_secs(2) {
            eprintln!("settle: servers busy for {:.1} s", waited.as_secs_f64());
        }
    }
    if let Some(url) = &args.pg_url {
        // Every measurement starts with clean buffers (as pgbench does): the previous
        // phase's dirty pages would otherwise be written back during this one, and every
        // side would pay for the one before.
        pgdb::checkpoint(url).await?;
    }
    let t = &mut targets[i];
    let before = t.events.as_ref().map(|e| e.counts());
    let workers = std::mem::take(&mut t.workers);
    let (back, res, extra) = run_phase(workers, ctx, phase, args, t).await?;
    t.workers = back;
    let mut label = res.phase.to_owned();
    if !t.name.is_empty() {
        write!(label, " [{}]", t.name)?;
    }
    if args.repeat > 1 {
        write!(label, " #{round}")?;
    }
    println!("{}", fmt_row(&res, &label));
    let mut check = None;
    if let (Some(ev), Some(before)) = (&t.events, before) {
        let c = check_events(ev, before, phase, round, &extra, args).await;
        if !c.ok {
            eprintln!(
                "EVENTS MISMATCH ({} round {round}): {} registrations acked, \
                 {} writes acked; received {} registered, {} metadata.updated, \
                 {} other",
                c.phase,
                c.registrations,
                c.writes_acked,
                c.registered_events,
                c.metadata_events,
                c.other_events
            );
        }
        check = Some(c);
    }
    Ok((res, check))
}

/// Samples CPU counters and the server's `/metrics` at `from` and at `to`; yields the
/// differences.
fn sample_window(
    addr: &str,
    pid: Option<u32>,
    args: &Args,
    from: Instant,
    to: Instant,
) -> tokio::task::JoinHandle<(CpuSnap, Option<metrics::ServerStats>)> {
    let (addr, nats_pid, seconds) = (addr.to_owned(), args.nats_pid, args.duration);
    tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let cpu0 = CpuSnap::take(pid, nats_pid);
        let m0 = metrics::Scrape::take(&addr).await;
        tokio::time::sleep_until(to.into()).await;
        let cpu = CpuSnap::take(pid, nats_pid).since(&cpu0);
        let m1 = metrics::Scrape::take(&addr).await;
        let stats = m0
            .zip(m1)
            .map(|(a, b)| metrics::ServerStats::between(&a, &b, seconds));
        (cpu, stats)
    })
}

/// Waits until every spawned server is idle (under 10 % of a core over 300 ms), at most
/// 30 s, so a server's leftovers (WAL checkpoints, relay) do not run during the next
/// measurement of the other server. Returns how long it waited.
async fn settle(targets: &[Target]) -> Duration {
    let start = Instant::now();
    let pids: Vec<u32> = targets.iter().filter_map(Target::pid).collect();
    while start.elapsed() < Duration::from_secs(30) {
        let before: Vec<Option<u64>> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let busy = pids
            .iter()
            .zip(&before)
            .any(|(&p, b)| match (b, cpu_ticks(p)) {
                (Some(b), Some(a)) => a.saturating_sub(*b) > 3,
                _ => false,
            });
        if !busy {
            break;
        }
    }
    start.elapsed()
}

/// Polls `/health/ready` every 500 ms until `end`; returns the largest `outboxDepth`.
async fn max_outbox_depth(addr: String, end: Instant) -> Option<u64> {
    let mut conn = Conn::new(&addr);
    let mut max = None;
    while Instant::now() < end {
        if let Ok(r) = conn.request("GET", "/health/ready", None).await {
            if let Some(d) = serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| find_u64(&v, "outboxDepth"))
            {
                max = max.max(Some(d));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    max
}

/// The first number under `key` anywhere in `v`.
fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| m.values().find_map(|v| find_u64(v, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|v| find_u64(v, key)),
        _ => None,
    }
}

/// After a closed-loop phase against the events-on server: waits for the events its
/// writes must have caused and checks the counts.
async fn check_events(
    ev: &Events,
    before: Counts,
    phase: Phase,
    round: usize,
    extra: &PhaseExtra,
    args: &Args,
) -> EventsCheck {
    let regs = extra.registrations;
    // Every registration publishes `registered`, plus `metadata.updated` when it has
    // metadata (5 keys unless --bare-register); a metadata PUT publishes
    // `metadata.updated` only when the value changed.
    let md = if args.bare_register && phase == Phase::Register {
        0
    } else {
        regs
    };
    let put_max = if phase == Phase::Put { extra.acked } else { 0 };
    let idle = Duration::from_secs_f64(args.event_timeout);
    ev.wait_for(idle, |c| {
        let d = c.since(&before);
        d.registered >= regs && d.metadata >= md
    })
    .await;
    if put_max > 0 {
        // How many PUTs changed the value is unknown: wait until events stop coming.
        ev.wait_for(Duration::from_secs(1), |_| false).await;
    }
    let got = ev.counts().since(&before);
    let ok =
        got.registered == regs && (md..=md + put_max).contains(&got.metadata) && got.other == 0;
    let tail_ms = match (ev.last_arrival(), extra.last_ok) {
        (Some(last), Some(ack)) if got.total() > 0 => Some(signed_ms(last, ack)),
        _ => None,
    };
    EventsCheck {
        phase: phase.name(),
        round,
        writes_acked: extra.acked,
        registrations: regs,
        registered_events: got.registered,
        metadata_events: got.metadata,
        other_events: got.other,
        window_events_per_s: extra.window_events.unwrap_or(0) as f64 / args.duration,
        max_outbox_depth: extra.max_outbox_depth,
        tail_ms,
        ok,
    }
}

/// `a − b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64() * 1000.0
    } else {
        -((b - a).as_secs_f64() * 1000.0)
    }
}

/// A spawned server; killed (and its temp dirs removed) when dropped, so it
/// also goes away on errors and Ctrl-C.
struct Server {
    child: Child,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a spawned server publishes events.
#[derive(Clone, Copy)]
enum EventsMode<'a> {
    /// The config of the earlier benches: no `service`/`nats` sections.
    Default,
    /// `nats.url` set to this (empty: events off).
    Nats { url: &'a str, instance: &'a str },
    /// No events; this `auth` section (authentication on).
    Auth { yaml: &'a str },
    /// The PostgreSQL store on this database URL; events (and NATS requests) with `nats`.
    Postgres {
        url: &'a str,
        nats: Option<(&'a str, &'a str)>,
    },
}

/// Appended to every spawned server's config (set once, before the first spawn).
static SERVER_EXTRA_YAML: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Spawns `bin` on a free port with a fresh temporary config and data dir.
fn spawn_server(bin: &Path, events: EventsMode) -> Result<(Server, String)> {
    let dir = tempfile::TempDir::new()?;
    let (mut server, addr) = spawn_server_in(bin, dir.path(), events)?;
    server._dir = Some(dir);
    Ok((server, addr))
}

/// Spawns `bin` on a free port with config and data in `dir` (the data dir is reused
/// when it exists: the drain phase restarts a server on its data).
fn spawn_server_in(bin: &Path, dir: &Path, events: EventsMode) -> Result<(Server, String)> {
    // Bind :0 to learn a free port, then release it for the server.
    let addr = free_addr()?;
    let config = dir.join("config.yaml");
    let mut yaml = String::from("kaa:\n  applications:\n");
    // `bench` for the registry phases, the rest for the filter phases.
    for (app, versions) in [("bench", &["bench-v1", "bench-v2"][..])]
        .into_iter()
        .chain(filters::APPS.iter().copied())
        .chain([metalist::APP, issue13::APP])
    {
        write!(yaml, "    {app}:\n      versions:\n")?;
        for v in versions {
            writeln!(yaml, "        {v}: {{}}")?;
        }
    }
    yaml.push_str("log:\n  level: warn\n");
    if let EventsMode::Nats { url, instance } = events {
        write!(
            yaml,
            "service:\n  instance_name: {instance}\n  replica_id: bench\nnats:\n  url: {}\n",
            serde_json::to_string(url)?
        )?;
    }
    if let EventsMode::Auth { yaml: auth } = events {
        yaml.push_str(auth);
    }
    if let EventsMode::Postgres { url, nats } = events {
        write!(
            yaml,
            "store:\n  backend: postgres\n  postgres:\n    url: {}\n",
            serde_json::to_string(url)?
        )?;
        if let Some((url, instance)) = nats {
            write!(
                yaml,
                "service:\n  instance_name: {instance}\n  replica_id: bench\nnats:\n  url: {}\n",
                serde_json::to_string(url)?
            )?;
        }
    }
    if let Some(extra) = SERVER_EXTRA_YAML.get() {
        yaml.push_str(extra);
        if !extra.ends_with('\n') {
            yaml.push('\n');
        }
    }
    std::fs::write(&config, yaml)?;
    let data = dir.join("data");
    if !data.exists() {
        std::fs::create_dir(&data)?;
    }
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .args(["--listen", &addr, "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        // Keep our stdout a clean Markdown table; server output goes to stderr.
        .stdout(Stdio::from(std::io::stderr()))
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    Ok((Server { child, _dir: None }, addr))
}

/// A loopback address nothing listens on (right now).
fn free_addr() -> Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

/// Polls `GET /health` every 50 ms for up to 30 s; returns its JSON body.
async fn wait_healthy(addr: &str, server: Option<&mut Server>) -> Result<Vec<u8>> {
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = Conn::new(addr).request("GET", "/health", None).await {
            if r.status == 200 {
                return Ok(r.body.to_vec());
            }
        }
        if let Some(s) = server.as_deref_mut() {
            if let Some(st) = s.child.try_wait()? {
                bail!("server exited before becoming healthy: {st}");
            }
        }
        if Instant::now() > deadline {
            bail!("server at {addr} not healthy after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TABLE_HEADER: &str = "| phase | connections | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU cores | server CPU µs/req | bench CPU cores | NATS CPU cores | other CPU cores |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn fmt_row(r: &PhaseResult, label: &str) -> String {
    let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"));
    format!(
        "| {label} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |",
        r.connections,
        r.requests,
        r.errors,
        r.rps,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.max_ms,
        opt(r.server_cpu_cores, 2),
        opt(r.server_cpu_us_per_req, 1),
        opt(r.bench_cpu_cores, 2),
        opt(r.nats_cpu_cores, 2),
        opt(r.other_cpu_cores, 2)
    )
}

/// Throughput of each non-health phase relative to the mean health rate of the same
/// server; with two servers, also each phase's events-on rate relative to events-off.
fn ratios(phases: &[PhaseResult]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    for p in phases {
        if !targets.contains(&p.target) {
            targets.push(p.target);
        }
    }
    for t in &targets {
        let health: Vec<f64> = phases
            .iter()
            .filter(|p| p.phase == "health" && p.target == *t)
            .map(|p| p.rps)
            .collect();
        if health.is_empty() {
            continue;
        }
        let base = health.iter().sum::<f64>() / health.len() as f64;
        let suffix = if t.is_empty() {
            String::new()
        } else {
            format!(" [{t}]")
        };
        for name in ["get-by-id", "register", "metadata-put"] {
            if let Some(p) = phases.iter().find(|p| p.phase == name && p.target == *t) {
                out.push((format!("{name} / health{suffix}"), 100.0 * p.rps / base));
            }
        }
    }
    for pair in &PAIRS {
        for name in PAIR_PHASES {
            // Mean over the round (health runs twice with --health-again).
            let rate = |t: &str| {
                let r: Vec<f64> = phases
                    .iter()
                    .filter(|p| p.phase == name && p.target == t)
                    .map(|p| p.rps)
                    .collect();
                (!r.is_empty()).then(|| r.iter().sum::<f64>() / r.len() as f64)
            };
            if let (Some(a), Some(b)) = (rate(pair.a), rate(pair.b)) {
                out.push((format!("{name} {}", pair.ratio), 100.0 * b / a));
            }
        }
    }
    out
}

/// Two servers, or two applications of one server, measured side by side in every round.
struct Pair {
    /// The baseline's and the other's `PhaseResult::target`.
    a: &'static str,
    b: &'static str,
    /// How the per-round ratio b / a is named in `Round::ratios_pct`.
    ratio: &'static str,
    title: &'static str,
}

/// Closed-loop phases compared between the two sides of a [`Pair`].
const PAIR_PHASES: [&str; 7] = [
    "health",
    "register",
    "get-by-id",
    "metadata-put",
    "selfreg-operator",
    "selfreg-device",
    "selfreg-claim",
];

/// Target names of the `--auth` servers.
const AUTH_OFF: &str = "auth-off";
const AUTH_ON: &str = "auth-on";
const AUTH_MISS: &str = "auth-miss";

/// Target names of the `--pg-url` servers.
const PG_EMBEDDED: &str = "embedded";
const PG_ONE: &str = "pg";
const PG_TWO: &str = "pg2";

const PAIRS: [Pair; 6] = [
    Pair {
        a: "off",
        b: "on",
        ratio: "events on / off",
        title: "Events on vs off over all rounds",
    },
    Pair {
        a: filters::NO_FILTERS,
        b: filters::FILTERS,
        ratio: "with filters / without",
        title: "Registration into an application with filters vs one without, over all rounds",
    },
    Pair {
        a: AUTH_OFF,
        b: AUTH_ON,
        ratio: "auth on / off",
        title: "Authentication on (verified-token cache on) vs off, over all rounds",
    },
    Pair {
        a: AUTH_OFF,
        b: AUTH_MISS,
        ratio: "auth every token verified / off",
        title: "Authentication on with every token's signature verified (cache off) vs off, over all rounds",
    },
    Pair {
        a: PG_EMBEDDED,
        b: PG_ONE,
        ratio: "postgres / embedded",
        title: "PostgreSQL (one replica) vs the embedded store, over all rounds",
    },
    Pair {
        a: PG_ONE,
        b: PG_TWO,
        ratio: "two replicas / one",
        title: "PostgreSQL with two replicas vs one, over all rounds",
    },
];

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
    {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

impl Target {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn spawned(
        name: &'static str,
        (server, addr): (Server, String),
        events: Option<Arc<Events>>,
    ) -> Target {
        Target {
            name,
            addr,
            pid: Some(server.child.id()),
            server: Some(server),
            events,
            workers: Vec::new(),
            replicas: Vec::new(),
            nats_instance: None,
        }
    }

    /// Every server address of the target, `addr` first.
    fn addrs(&self) -> Vec<String> {
        std::iter::once(self.addr.clone())
            .chain(self.replicas.iter().map(|(_, a)| a.clone()))
            .collect()
    }
}

/// One server under test with its connections.
struct Target {
    /// "" (the only server), "off" (events off) or "on" (events on).
    name: &'static str,
    addr: String,
    server: Option<Server>,
    /// The server's process (spawned servers only; the filter phases' per-application
    /// targets share it).
    pid: Option<u32>,
    /// The subscriber counting this server's events (events-on server only).
    events: Option<Arc<Events>>,
    workers: Vec<Worker>,
    /// Further servers of the same target (replicas on one database): connections
    /// alternate between `addr` and theirs.
    replicas: Vec<(Server, String)>,
    /// The service instance name the target serves NATS requests on (targets with NATS).
    nats_instance: Option<String>,
}

fn new_workers(addr: &str, n: usize) -> Vec<Worker> {
    new_workers_over(&[addr.to_owned()], n)
}

/// `n` workers whose connections alternate between `addrs`.
fn new_workers_over(addrs: &[String], n: usize) -> Vec<Worker> {
    (0..n)
        .map(|idx| Worker {
            idx,
            conn: Conn::new(&addrs[idx % addrs.len()]),
            ids: Vec::new(),
            seq: 0,
            // Distinct non-zero xorshift seeds per connection.
            rng: (idx as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            path: String::with_capacity(128),
            body: String::with_capacity(256),
            auth: Vec::new(),
            auth_next: 0,
        })
        .collect()
}

async fn run(args: Args) -> Result<()> {
    let mut selected: Vec<Phase> = Vec::new();
    for s in &args.phases {
        selected.push(Phase::parse(s.trim())?);
    }
    let mut seq: Vec<Phase> = Phase::ALL
        .into_iter()
        .filter(|p| selected.contains(p))
        .collect();
    if args.health_again {
        // Closed-loop phases come first; `health` again goes after the last of them.
        let at = seq
            .iter()
            .rposition(|p| p.closed_loop())
            .map_or(0, |i| i + 1);
        seq.insert(at, Phase::Health);
    }
    if seq.is_empty() || args.connections == 0 || args.repeat == 0 {
        bail!("nothing to do: need at least one phase, connection and round");
    }
    if seq.iter().any(|p| p.needs_nats()) && args.nats_url.is_none() {
        bail!("the latency, drain and ecap phases need --nats-url");
    }
    if args.pg_url.is_some()
        && seq
            .iter()
            .any(|p| matches!(p, Phase::Latency | Phase::Drain))
    {
        bail!("the latency and drain phases do not run with --pg-url");
    }
    if !args.ecap_rate.is_finite()
        || args.ecap_rate <= 0.0
        || args.ecap_endpoints == 0
        || args.ecap_window == 0
    {
        bail!("--ecap-rate, --ecap-endpoints and --ecap-window must be positive");
    }
    if seq.contains(&Phase::SelfReg) {
        let _ = SERVER_EXTRA_YAML.set(args.selfreg_yaml.clone());
    }
    if !args.rate.is_finite()
        || args.rate <= 0.0
        || args.batch_size == 0
        || args.drain_endpoints == 0
    {
        bail!("--rate, --batch-size and --drain-endpoints must be positive");
    }
    filters::check_args(&args)?;
    if seq.contains(&Phase::Million) && args.server_bin.is_none() {
        bail!("the million phase needs --server-bin (it restarts the server)");
    }
    if seq.iter().any(|p| matches!(p, Phase::Mix | Phase::Million)) && args.mix_filters < 2 {
        bail!("--mix-filters must be at least 2");
    }

    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let instance = match (&args.instance_name, &args.server_bin) {
        (Some(i), _) => i.clone(),
        (None, Some(_)) => format!("bench{run_id}"),
        (None, None) => "epr".to_owned(),
    };
    let events = match &args.nats_url {
        Some(url) => Some(Events::subscribe(url, &instance).await?),
        None => None,
    };

    if args.auth_fresh_tokens == 0 {
        bail!("--auth-fresh-tokens must be at least 1");
    }
    let auth_bench = match args.auth {
        true => Some(auth::AuthBench::start(args.auth_alg).await),
        false => None,
    };
    let mut targets: Vec<Target> = Vec::new();
    // Kept for the run (dropped by the next one).
    let mut pg_dbs = Vec::new();
    match (&args.server_bin, &args.url) {
        (Some(bin), _) if args.pg_url.is_some() => {
            let admin = args.pg_url.as_deref().unwrap_or_default();
            // With NATS, each target under its own instance name: replicas of one target
            // share a queue group, different targets must not.
            let own = |name: &str| format!("{instance}-{name}");
            let embedded_instance = own(PG_EMBEDDED);
            let embedded = match &args.nats_url {
                Some(url) => EventsMode::Nats {
                    url,
                    instance: &embedded_instance,
                },
                None => EventsMode::Default,
            };
            let mut t = Target::spawned(PG_EMBEDDED, spawn_server(bin, embedded)?, None);
            t.nats_instance = args.nats_url.as_ref().map(|_| embedded_instance.clone());
            targets.push(t);
            for (name, replicas) in [(PG_ONE, 1), (PG_TWO, 2)] {
                let db = pgdb::create(admin, &format!("epr_bench_{run_id}_{name}")).await?;
                let inst = own(name);
                let nats = args.nats_url.as_deref().map(|u| (u, inst.as_str()));
                let mode = EventsMode::Postgres { url: &db, nats };
                let mut t = Target::spawned(name, spawn_server(bin, mode)?, None);
                t.nats_instance = nats.map(|_| inst.clone());
                for _ in 1..replicas {
                    // One at a time: the first has migrated the database when it is healthy.
                    wait_healthy(&t.addr, t.server.as_mut()).await?;
                    let (server, addr) = spawn_server(bin, mode)?;
                    t.replicas.push((server, addr));
                }
                targets.push(t);
                pg_dbs.push(db);
            }
        }
        (Some(bin), _) if args.auth => {
            let ab = auth_bench.as_ref().expect("auth bench");
            targets.push(Target::spawned(
                AUTH_OFF,
                spawn_server(bin, EventsMode::Default)?,
                None,
            ));
            let on = ab.yaml(100_000)?;
            let s = spawn_server(bin, EventsMode::Auth { yaml: &on })?;
            targets.push(Target::spawned(AUTH_ON, s, None));
            if args.auth_miss {
                let miss = ab.yaml(0)?;
                let s = spawn_server(bin, EventsMode::Auth { yaml: &miss })?;
                targets.push(Target::spawned(AUTH_MISS, s, None));
            }
        }
        (Some(bin), _) => match &args.nats_url {
            None => {
                let s = spawn_server(bin, EventsMode::Default)?;
                targets.push(Target::spawned("", s, None));
            }
            Some(url) => {
                if seq
                    .iter()
                    .any(|p| p.closed_loop() || matches!(p, Phase::Latency | Phase::SelfReg))
                {
                    let off = EventsMode::Nats {
                        url: "",
                        instance: &instance,
                    };
                    targets.push(Target::spawned("off", spawn_server(bin, off)?, None));
                }
                let on = EventsMode::Nats {
                    url,
                    instance: &instance,
                };
                let s = spawn_server(bin, on)?;
                let mut t = Target::spawned("on", s, events.clone());
                t.nats_instance = Some(instance.clone());
                targets.push(t);
            }
        },
        (None, Some(url)) => {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| anyhow!("--url must start with http://"))?;
            targets.push(Target {
                name: if events.is_some() { "on" } else { "" },
                addr: rest.split('/').next().unwrap_or_default().to_owned(),
                server: None,
                pid: None,
                events: events.clone(),
                workers: Vec::new(),
                replicas: Vec::new(),
                nats_instance: args.nats_url.as_ref().map(|_| instance.clone()),
            });
        }
        (None, None) => bail!("need --server-bin or --url"),
    }
    let mut server_version = None;
    for t in &mut targets {
        let health = wait_healthy(&t.addr, t.server.as_mut()).await?;
        server_version = server_version.or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&health)
                .ok()
                .and_then(|v| {
                    v.get("version")
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                })
        });
        for (server, addr) in &mut t.replicas {
            wait_healthy(addr, Some(server)).await?;
        }
        t.workers = new_workers_over(&t.addrs(), args.connections);
        if let (Some(ab), AUTH_ON | AUTH_MISS) = (&auth_bench, t.name) {
            // Minted before any measurement: RSA signing takes milliseconds.
            for w in &mut t.workers {
                w.auth = ab.header_lines(w.idx, args.auth_fresh_tokens);
            }
            auth::wait_accepts(&t.addr, &t.workers[0].auth[0]).await?;
        }
        if let (Some(ab), AUTH_OFF, true) = (&auth_bench, t.name, args.auth_header_everywhere) {
            for w in &mut t.workers {
                w.auth = ab.header_lines(w.idx, args.auth_fresh_tokens);
            }
        }
    }
    if let Some(ab) = &auth_bench {
        // The header is the only difference between the two sides' requests (none with
        // --auth-header-everywhere).
        let header = targets
            .iter()
            .find(|t| t.name == AUTH_ON)
            .map_or(0, |t| t.workers[0].auth[0].len());
        println!(
            "auth: {} tokens from {}, {} per connection; the Authorization header adds {header} bytes to every request  ",
            ab.alg.name(),
            ab.issuer.url(),
            args.auth_fresh_tokens,
        );
    }

    let command = std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let date = chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    println!("command: `{command}`  ");
    let servers = targets
        .iter()
        .map(|t| match t.name {
            "" => t.addr.clone(),
            "off" | "on" => format!("{} (events {})", t.addr, t.name),
            n => format!("{} ({n})", t.addr),
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "server: {servers}, version: {}  ",
        server_version.as_deref().unwrap_or("unknown")
    );
    if let Some(url) = &args.nats_url {
        println!("events: {url}, subjects kaa.v1.events.{instance}.>  ");
    }
    println!(
        "date: {date}, nproc: {nproc}, client threads: {}",
        args.threads
    );
    println!(
        "warmup: {} s, duration: {} s per phase\n",
        args.warmup, args.duration
    );
    if seq.iter().any(|p| {
        p.closed_loop() || matches!(p, Phase::FilterRegister | Phase::SelfReg | Phase::Mix)
    }) {
        println!("{TABLE_HEADER}");
    }
    // Two servers, or phases that wait on the relay: let the servers go idle between
    // measurements. A lone server without events runs back to back, as before.
    let settling = targets.len() > 1 || events.is_some();

    let ctx = Arc::new(Ctx::new(
        run_id.clone(),
        args.app_version.clone(),
        if args.bare_register {
            RegMetadata::Bare
        } else {
            RegMetadata::Basic
        },
        &args.app_name,
    ));

    let mut filter_bench = filters::FilterBench::default();
    let mut selfreg_bench = selfreg::SelfRegBench::default();
    // One per target: each loads its endpoints once.
    let mut meta_benches: Vec<metalist::MetaBench> =
        targets.iter().map(|_| Default::default()).collect();
    let mut rounds = Vec::new();
    for round in 1..=args.repeat {
        let mut results = Vec::new();
        let mut checks = Vec::new();
        let mut latency = Vec::new();
        let mut drain = Vec::new();
        let mut filter_out = filters::RoundOut::default();
        let mut meta_out = metalist::MetaOut::default();
        let mut selfreg_out = Vec::new();
        let mut ecap_out = Vec::new();
        let (mut mix_out, mut million_out) = (Vec::new(), Vec::new());
        for &phase in &seq {
            if phase == Phase::Mix {
                settle(&targets).await;
                mix_out.push(issue13::run(&targets, &run_id, round, &args).await?);
                continue;
            }
            if phase == Phase::Million {
                settle(&targets).await;
                million_out.push(million::run(&run_id, round, &args).await?);
                continue;
            }
            if phase == Phase::SelfReg {
                selfreg_bench
                    .run(
                        &mut targets,
                        &ctx,
                        round,
                        &args,
                        &mut results,
                        &mut checks,
                        &mut selfreg_out,
                    )
                    .await?;
                continue;
            }
            if phase == Phase::Ecap {
                let url = args.nats_url.as_deref().unwrap_or_default();
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if round % 2 == 0 {
                    order.reverse();
                }
                for i in order {
                    if targets[i].nats_instance.is_none() {
                        continue;
                    }
                    settle(&targets).await;
                    if let Some(pg) = &args.pg_url {
                        pgdb::checkpoint(pg).await?;
                    }
                    let r = ecap::run(&targets[i], url, &ctx, round, &args).await?;
                    ecap_out.push(r);
                }
                continue;
            }
            if phase == Phase::MetaList {
                // The first server; with --pg-url the embedded one and one PostgreSQL
                // replica (two replicas read the same database the same way).
                let n = if args.pg_url.is_some() { 2 } else { 1 };
                for (t, mb) in targets.iter().zip(meta_benches.iter_mut()).take(n) {
                    settle(&targets).await;
                    if !t.name.is_empty() {
                        println!("\nmetalist on `{}`:", t.name);
                    }
                    println!("\n{}", metalist::HEADER);
                    mb.run(t, round, &args, &mut meta_out).await?;
                }
                continue;
            }
            if phase.filters() {
                // On the first server (events off, when there are two).
                let r = filter_bench
                    .run(phase, &targets, &ctx, round, &args, &mut filter_out)
                    .await?;
                results.extend(r);
                continue;
            }
            if phase.closed_loop() {
                // Off then on in odd rounds, on then off in even ones (off on on off ...),
                // so drift and the position in the pair hit both alike.
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if round % 2 == 0 {
                    order.reverse();
                }
                for i in order {
                    let (res, check) =
                        measure_closed(&mut targets, i, phase, round, &ctx, &args, settling)
                            .await?;
                    results.push(res);
                    checks.extend(check);
                }
                continue;
            }
            if phase == Phase::Latency {
                // The same open-loop load on every server, in the closed-loop order;
                // events are measured on the events-on one.
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if round % 2 == 0 {
                    order.reverse();
                }
                for i in order {
                    settle(&targets).await;
                    let t = &mut targets[i];
                    let workers = std::mem::take(&mut t.workers);
                    let (pid, ev) = (t.pid(), t.events.clone());
                    let (back, r) = outbox::latency(
                        workers,
                        &ctx,
                        ev.as_ref(),
                        t.name,
                        &t.addr,
                        pid,
                        round,
                        &args,
                    )
                    .await?;
                    t.workers = back;
                    eprintln!("{}", outbox::fmt_latency_row(&r));
                    latency.push(r);
                }
                continue;
            }
            settle(&targets).await;
            let on = targets
                .iter_mut()
                .find(|t| t.events.is_some())
                .ok_or_else(|| anyhow!("no events-on server"))?;
            let ev = on.events.clone().expect("events-on server");
            match phase {
                Phase::Drain => {
                    let r = outbox::drain_live(&ctx, &ev, &on.addr, round, &args).await?;
                    eprintln!("{}", outbox::fmt_drain_row(&r));
                    drain.push(r);
                    if let Some(bin) = &args.server_bin {
                        let url = args.nats_url.as_deref().unwrap_or_default();
                        let r = outbox::drain_backlog(bin, url, &instance, &ctx, &ev, round, &args)
                            .await?;
                        eprintln!("{}", outbox::fmt_drain_row(&r));
                        drain.push(r);
                    }
                }
                _ => unreachable!("closed-loop and latency phases are handled above"),
            }
        }
        rounds.push(Round {
            round,
            ratios_pct: ratios(&results),
            phases: results,
            events: checks,
            latency,
            drain,
            filters: filter_out,
            metalist: meta_out,
            selfreg: selfreg_out,
            ecap: ecap_out,
            mix: mix_out,
            million: million_out,
        });
    }
    println!();
    for r in &rounds {
        let prefix = if args.repeat > 1 {
            format!("round {}: ", r.round)
        } else {
            String::new()
        };
        for (name, pct) in &r.ratios_pct {
            println!("{prefix}{name} = {pct:.1}%  ");
        }
    }
    for pair in &PAIRS {
        print_pair_summary(&rounds, pair);
    }
    print_event_tables(&rounds);
    filters::print_tables(&rounds, &filter_bench);
    selfreg::print_summary(&rounds);
    ecap::print_summary(&rounds, &args);
    issue13::print_summary(&rounds);
    million::print_summary(&rounds);
    if let Some(ev) = &events {
        let (slow, bad) = (ev.slow_consumer(), ev.malformed());
        if slow > 0 || bad > 0 {
            println!("\n**bench subscriber: {slow} slow-consumer drops, {bad} undecodable registered events**");
        }
    }
    for t in &targets {
        if t.events.is_some() {
            print_server_event_metrics(&t.addr).await;
        }
    }

    if let Some(path) = &args.json {
        let report = Report {
            command,
            server_version,
            date,
            nproc,
            rounds,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    for t in &mut targets {
        drop(t.server.take());
    }
    Ok(())
}

/// Across rounds, per phase run against both sides of `pair` (events off and on, or
/// applications without and with filters): throughput of b vs a (all requests pooled, and
/// the median of the per-round ratios) and server CPU per request.
fn print_pair_summary(rounds: &[Round], pair: &Pair) {
    let all: Vec<&PhaseResult> = rounds.iter().flat_map(|r| &r.phases).collect();
    let (a, b) = (pair.a, pair.b);
    let mut header = false;
    for name in PAIR_PHASES {
        let pick = |t: &str| -> Vec<&PhaseResult> {
            all.iter()
                .copied()
                .filter(|p| p.phase == name && p.target == t)
                .collect()
        };
        let (off, on) = (pick(a), pick(b));
        if off.is_empty() || on.is_empty() {
            continue;
        }
        if !header {
            header = true;
            println!("\n{}:\n", pair.title);
            println!("| phase | runs ({a}/{b}) | mean req/s {a} | mean req/s {b} | {b} / {a} (pooled) | {b} / {a} (median of rounds) | min–max of rounds | quiet rounds: n, {b} / {a} (pooled) | server CPU µs/req {a} → {b} | commits/s {a} → {b} | mean group {a} → {b} | mean commit ms {a} → {b} | writer busy {a} → {b} |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        let mean = |v: &[&PhaseResult], f: fn(&PhaseResult) -> Option<f64>| {
            let x: Vec<f64> = v.iter().filter_map(|p| f(p)).collect();
            (!x.is_empty()).then(|| x.iter().sum::<f64>() / x.len() as f64)
        };
        let (m_off, m_on) = (
            mean(&off, |p| Some(p.rps)).unwrap_or(0.0),
            mean(&on, |p| Some(p.rps)).unwrap_or(0.0),
        );
        let mut per_round: Vec<f64> = rounds
            .iter()
            .filter_map(|r| {
                r.ratios_pct
                    .iter()
                    .find(|(n, _)| *n == format!("{name} {}", pair.ratio))
                    .map(|(_, v)| *v)
            })
            .collect();
        per_round.sort_by(f64::total_cmp);
        let median = match per_round.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => per_round[n / 2],
            n => (per_round[n / 2 - 1] + per_round[n / 2]) / 2.0,
        };
        // Rounds where neither run shared the machine with foreign load (other CPU below
        // 0.15 cores; needs --nats-pid for the events-on run, whose broker is busy).
        let (mut quiet, mut q_off, mut q_on) = (0, 0.0, 0.0);
        for r in rounds {
            let get = |t: &str| r.phases.iter().find(|p| p.phase == name && p.target == t);
            if let (Some(x), Some(y)) = (get(a), get(b)) {
                let calm = |p: &PhaseResult| p.other_cpu_cores.is_some_and(|c| c < 0.15);
                if calm(x) && calm(y) {
                    quiet += 1;
                    q_off += x.rps;
                    q_on += y.rps;
                }
            }
        }
        let quiet_col = if quiet > 0 {
            format!("{quiet}, {:.1}%", 100.0 * q_on / q_off)
        } else {
            "0".to_owned()
        };
        let cpu = |v: &[&PhaseResult]| {
            mean(v, |p| p.server_cpu_us_per_req).map_or_else(|| "-".into(), |c| format!("{c:.0}"))
        };
        let st = |v: &[&PhaseResult], f: fn(&metrics::ServerStats) -> f64, prec: usize| {
            let x: Vec<f64> = v.iter().filter_map(|p| p.server.as_ref().map(f)).collect();
            if x.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.prec$}", x.iter().sum::<f64>() / x.len() as f64)
            }
        };
        println!(
            "| {name} | {}/{} | {m_off:.0} | {m_on:.0} | {:.1}% | {median:.1}% | {:.1}–{:.1}% | {quiet_col} | {} → {} | {} → {} | {} → {} | {} → {} | {} → {} |",
            off.len(),
            on.len(),
            100.0 * m_on / m_off,
            per_round.first().copied().unwrap_or(f64::NAN),
            per_round.last().copied().unwrap_or(f64::NAN),
            cpu(&off),
            cpu(&on),
            st(&off, |s| s.commits_per_s, 0),
            st(&on, |s| s.commits_per_s, 0),
            st(&off, |s| s.mean_group, 1),
            st(&on, |s| s.mean_group, 1),
            st(&off, |s| s.mean_commit_ms, 2),
            st(&on, |s| s.mean_commit_ms, 2),
            st(&off, |s| s.writer_busy, 2),
            st(&on, |s| s.writer_busy, 2),
        );
    }
}

fn print_event_tables(rounds: &[Round]) {
    let checks: Vec<&EventsCheck> = rounds.iter().flat_map(|r| &r.events).collect();
    if !checks.is_empty() {
        println!("\nEvents of the events-on server (registered + metadata.updated):\n");
        println!("| phase | round | writes acked | registrations | registered ev. | metadata ev. | other | events/s in window | max outbox depth | tail ms | check |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for c in checks {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                c.phase,
                c.round,
                c.writes_acked,
                c.registrations,
                c.registered_events,
                c.metadata_events,
                c.other_events,
                c.window_events_per_s,
                c.max_outbox_depth
                    .map_or_else(|| "-".to_owned(), |d| d.to_string()),
                c.tail_ms
                    .map_or_else(|| "-".to_owned(), |t| format!("{t:.1}")),
                if c.ok { "ok" } else { "**MISMATCH**" }
            );
        }
    }
    let lat: Vec<&outbox::LatencyResult> = rounds.iter().flat_map(|r| &r.latency).collect();
    if !lat.is_empty() {
        println!("\nWrite → event latency (HTTP 201 received → `registered` event received):\n");
        println!("{}", outbox::LATENCY_HEADER);
        for r in &lat {
            println!("{}", outbox::fmt_latency_row(r));
        }
        println!("\nThe server's view of the same windows (`/metrics`):\n");
        println!("| round | events | store commits/s | mean group | mean commit ms | writer busy | events published/s | relay lag mean ms (event timestamp → NATS confirmation) | relay lag p99 ≤ ms (bucket) |");
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &lat {
            let Some(s) = &r.server else { continue };
            let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} | {} | {} |",
                r.round,
                if r.target.is_empty() { "on" } else { r.target },
                s.commits_per_s,
                s.mean_group,
                s.mean_commit_ms,
                s.writer_busy,
                s.events_published_per_s,
                opt(s.publish_lag_mean_ms),
                opt(s.publish_lag_p99_le_ms)
            );
        }
    }
    let drain: Vec<&outbox::DrainResult> = rounds.iter().flat_map(|r| &r.drain).collect();
    if !drain.is_empty() {
        println!("\nOutbox drain (batch registrations, one `registered` event each):\n");
        println!("{}", outbox::DRAIN_HEADER);
        for r in drain {
            println!("{}", outbox::fmt_drain_row(r));
        }
    }
}

/// Prints the server's own event metrics (`/metrics`), as a cross-check of the bench's
/// counts.
async fn print_server_event_metrics(addr: &str) {
    let Ok(r) = Conn::new(addr).request("GET", "/metrics", None).await else {
        return;
    };
    let text = String::from_utf8_lossy(&r.body);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("epr_events_")
                    || l.starts_with("epr_outbox")
                    || l.starts_with("epr_nats"))
                && !l.contains("_bucket")
        })
        .collect();
    if !lines.is_empty() {
        println!("\nServer metrics (events on, {addr}):\n\n```");
        for l in lines {
            println!("{l}");
        }
        println!("```");
    }
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("filter-eval") {
        return filter_eval::run(filter_eval::Args::parse_from(std::env::args().skip(1)));
    }
    if std::env::args().nth(1).as_deref() == Some("auth-verify") {
        let args = auth::VerifyArgs::parse_from(std::env::args().skip(1));
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(auth::verify_cmd(args));
    }
    let args = Args::parse();
    // Single-threaded by default: the client must not compete with the
    // server for the (two) cores more than one event loop's worth.
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            // Dropping `run` drops the Server guard, which kills the child.
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs register → get → put against the in-test responder and checks
    /// that every phase made progress without errors and ids carried over.
    #[tokio::test]
    async fn phases_run_against_responder() {
        let addr = client::tests::spawn_responder(usize::MAX).await;
        let args = Args::parse_from([
            "epr-bench",
            "--url",
            "http://x",
            "-c",
            "4",
            "--warmup",
            "0.05",
            "-d",
            "0.2",
        ]);
        let ctx = Arc::new(Ctx::new(
            "t".into(),
            "bench-v1".into(),
            RegMetadata::Basic,
            "bench",
        ));
        let mut workers: Vec<Worker> = (0..4)
            .map(|idx| Worker {
                idx,
                conn: Conn::new(&addr),
                ids: Vec::new(),
                seq: 0,
                rng: idx as u64 + 1,
                path: String::new(),
                body: String::new(),
                auth: Vec::new(),
                auth_next: 0,
            })
            .collect();
        let target = Target {
            name: "",
            addr: addr.clone(),
            server: None,
            pid: None,
            events: None,
            workers: Vec::new(),
            replicas: Vec::new(),
            nats_instance: None,
        };
        let mut results = Vec::new();
        for phase in [Phase::Health, Phase::Register, Phase::Get, Phase::Put] {
            let (back, res, extra) = run_phase(workers, &ctx, phase, &args, &target)
                .await
                .unwrap();
            workers = back;
            assert!(extra.acked >= res.requests && extra.last_ok.is_some());
            assert_eq!(extra.registrations > 0, phase == Phase::Register);
            assert!(
                res.requests > 0 && res.errors == 0,
                "{}: {} req, {} err",
                res.phase,
                res.requests,
                res.errors
            );
            assert!(res.p50_ms <= res.max_ms);
            results.push(res);
        }
        assert!(workers
            .iter()
            .all(|w| !w.ids.is_empty() && w.ids[0] == format!("b-t-{}-1", w.idx)));
        let r = ratios(&results);
        assert_eq!(
            r.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            [
                "get-by-id / health",
                "register / health",
                "metadata-put / health"
            ]
        );
    }

    #[test]
    fn phase_names() {
        assert_eq!(Phase::parse("get").unwrap(), Phase::Get);
        assert_eq!(Phase::parse("metadata-put").unwrap(), Phase::Put);
        assert_eq!(Phase::parse("put").unwrap(), Phase::Put);
        assert_eq!(Phase::parse("latency").unwrap(), Phase::Latency);
        assert_eq!(Phase::parse("drain").unwrap(), Phase::Drain);
        for p in [Phase::Backfill, Phase::FilterUpdate, Phase::FilterRegister] {
            assert_eq!(Phase::parse(p.name()).unwrap(), p);
            assert!(p.filters() && !p.closed_loop() && !p.needs_nats());
        }
        assert_eq!(Phase::parse("issue13").unwrap(), Phase::Mix);
        for p in [Phase::Mix, Phase::Million] {
            assert_eq!(Phase::parse(p.name()).unwrap(), p);
            assert!(!p.filters() && !p.closed_loop() && !p.needs_nats());
        }
        assert!(Phase::parse("bogus").is_err());
    }
}
