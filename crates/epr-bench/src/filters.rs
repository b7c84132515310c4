//! Phases for saved endpoint filters (issue 4). Each runs on one server (the first one:
//! events off when there are two) and on applications of its own, so any combination of
//! them can run in one invocation:
//!
//! - `backfill`: application `fill` gets `--backfill-endpoints` endpoints with 10 metadata
//!   keys of mixed types ([`Md`]), once per run, through the batch API. Then, each round,
//!   one new filter of each shape of [`backfill_shapes`] is created, one at a time, and its
//!   status polled every `--poll-ms` until it is `active`. Figure: endpoints / (POST sent →
//!   first `active` answer), plus the server's own `epr_filter_backfill_*` metrics.
//! - `filter-update`: applications A (`upda`, no filter), B (`updb`, `--update-filters`
//!   filters of the shapes of [`varied_filter`]) and C (`updc`, no filter: the noise
//!   control), each with `--update-endpoints` endpoints. Metadata PUTs of the same shape,
//!   open loop at `--update-rate` to A, B and C in turn; latency percentiles per
//!   application. p99 of B − A is what the filters cost an update, C − A the noise.
//! - `filter-register`: closed-loop registrations with 10 metadata keys into `rega` (no
//!   filter) and `regb` (`--register-filters` filters), one after the other each round
//!   (order alternating), reported like the events on/off comparison.

use crate::client::{Conn, Response};
use crate::cpu::{CpuSnap, TICKS_PER_S};
use crate::metrics::{Scrape, ServerStats};
use crate::outbox::{batch_conns, batch_register, write_batch, LATE};
use crate::{
    fmt_row, new_hist, new_workers, report_error, run_phase, sample_window, settle, xorshift, Args,
    Ctx, Phase, PhaseResult, RegMetadata, Round, Target,
};
use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `PhaseResult::target` of the filter-register runs.
pub const NO_FILTERS: &str = "no-filters";
pub const FILTERS: &str = "filters";

/// Applications and versions of the filter phases: added to a spawned server's config (a
/// server given with --url must know them, or allow unknown versions).
pub const APPS: [(&str, &[&str]); 6] = [
    ("fill", &["fill-v1", "fill-v2"]),
    ("upda", &["upda-v1"]),
    ("updb", &["updb-v1"]),
    ("updc", &["updc-v1"]),
    ("rega", &["rega-v1"]),
    ("regb", &["regb-v1"]),
];

/// filter-update: A (no filter), B (filters), C (no filter, the control).
const UPDATE_APPS: [(&str, &str); 3] = [
    ("upda", "upda-v1"),
    ("updb", "updb-v1"),
    ("updc", "updc-v1"),
];
const UPDATE_LABELS: [&str; 3] = ["A", "B", "C"];
/// The order of filter-update's slots: A B C B A C, so that A and C each follow B (whose
/// PUT may still hold the writer) equally often, and B follows A and C equally often.
const UPDATE_ORDER: [usize; 6] = [0, 1, 2, 1, 0, 2];

/// Longest wait for one filter to become active, or for the setup's filters.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(900);

const CITIES: [&str; 10] = [
    "Kyiv",
    "Lviv",
    "Odesa",
    "Kharkiv",
    "Dnipro",
    "Vinnytsia",
    "Poltava",
    "Chernihiv",
    "Uzhhorod",
    "Rivne",
];

/// splitmix64 of (`i`, `k`): the `k`-th pseudo-random number of endpoint `i` (`k` < 16).
fn mix(i: u64, k: u64) -> u64 {
    let mut z = (i << 4 | k).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The metadata of endpoint `i` of the filter phases: 10 keys (4 strings, 5 numbers, a
/// boolean) derived from `i` alone, so the bench knows which endpoints a filter matches.
#[derive(Clone, Copy, Debug)]
pub struct Md {
    i: u64,
    /// `model`: `"m-00"` … `"m-99"`.
    model: u64,
    /// `city`: an index into [`CITIES`].
    city: usize,
    /// `fw`: `"1.<0..20>.<0..10>"`.
    fw: (u64, u64),
    /// `temp` × 10: 0.0 … 999.9.
    temp10: u64,
    /// `level`: 0 … 9.
    level: u64,
    /// `lat`, `lon` × 100.
    lat100: u64,
    lon100: u64,
    /// `active`: true for 3 in 4.
    active: bool,
    /// `battery`: 0 … 100.
    battery: u64,
}

impl Md {
    pub fn of(i: u64) -> Md {
        let r = |k| mix(i, k);
        Md {
            i,
            model: r(0) % 100,
            city: (r(1) % CITIES.len() as u64) as usize,
            fw: (r(2) % 20, r(3) % 10),
            temp10: r(4) % 10_000,
            level: r(5) % 10,
            lat100: 4_400 + r(6) % 800,
            lon100: 2_200 + r(7) % 1_800,
            active: r(8) % 4 != 0,
            battery: r(9) % 101,
        }
    }

    /// Appends the metadata as a JSON object.
    pub fn write_json(&self, buf: &mut String) {
        let _ = write!(
            buf,
            r#"{{"serial":"SN-{:08}","model":"m-{:02}","city":"{}","fw":"1.{}.{}","temp":{}.{},"level":{},"lat":{}.{:02},"lon":{}.{:02},"active":{},"battery":{}}}"#,
            self.i,
            self.model,
            CITIES[self.city],
            self.fw.0,
            self.fw.1,
            self.temp10 / 10,
            self.temp10 % 10,
            self.level,
            self.lat100 / 100,
            self.lat100 % 100,
            self.lon100 / 100,
            self.lon100 % 100,
            self.active,
            self.battery
        );
    }
}

/// The application version of back-fill endpoint `i`: every tenth batch is `fill-v2`.
fn fill_version(i: usize, batch: usize) -> &'static str {
    if (i / batch) % 10 == 9 {
        "fill-v2"
    } else {
        "fill-v1"
    }
}

/// Does the endpoint with this metadata and app version match?
type Matcher = Box<dyn Fn(&Md, &str) -> bool>;

/// A filter of the back-fill phase and the endpoints it must match.
pub struct Shape {
    pub name: &'static str,
    pub query: Value,
    matches: Matcher,
}

/// The filters created in back-fill round `round`: a new filter each round, with values
/// that change from round to round where the share of matches allows.
pub fn backfill_shapes(round: usize) -> Vec<Shape> {
    let model = (round as u64 * 37 + 5) % 100;
    let city = round % CITIES.len();
    vec![
        Shape {
            name: "elemMatch key = value (~1 %)",
            query: json!({"metadata": {"$elemMatch": {"key": "model", "value": format!("m-{model:02}")}}}),
            matches: Box::new(move |m, _| m.model == model),
        },
        Shape {
            name: "elemMatch $gt (~50 %)",
            query: json!({"metadata": {"$elemMatch": {"key": "temp", "value": {"$gt": 500}}}}),
            matches: Box::new(|m, _| m.temp10 > 5_000),
        },
        Shape {
            name: "application_version (~10 %)",
            query: json!({"application_version": "fill-v2"}),
            matches: Box::new(|_, v| v == "fill-v2"),
        },
        Shape {
            name: "$or of two elemMatch (~28 %)",
            query: json!({"$or": [
                {"metadata": {"$elemMatch": {"key": "city", "value": CITIES[city]}}},
                {"metadata": {"$elemMatch": {"key": "level", "value": {"$gte": 8}}}}
            ]}),
            matches: Box::new(move |m, _| m.city == city || m.level >= 8),
        },
    ]
}

/// Filter `k` of the many that the filter-update and filter-register phases put in their
/// application B: eight shapes over the keys of [`Md`], matching from none to ~30 % of the
/// endpoints (~11 % on average: an endpoint is in about one filter in nine).
pub fn varied_filter(k: usize, version: &str) -> Value {
    let city = |j: usize| CITIES[(k + j) % CITIES.len()];
    let elem =
        |key: &str, value: Value| json!({"metadata": {"$elemMatch": {"key": key, "value": value}}});
    match k % 8 {
        0 => elem("model", json!(format!("m-{:02}", k % 100))),
        1 => {
            let lo = (k * 37) % 900;
            elem("temp", json!({"$gt": lo, "$lte": lo + 100}))
        }
        2 => {
            json!({"$and": [elem("city", json!(city(0))), elem("level", json!({"$lt": 1 + k % 9}))]})
        }
        3 => {
            json!({"$or": [elem("city", json!(city(0))), elem("battery", json!({"$lt": 5 + k % 10}))]})
        }
        4 => elem("city", json!({"$in": [city(0), city(3), city(6)]})),
        5 => elem("fw", json!({"$regex": format!("^1\\.{}\\.", k % 20)})),
        6 => json!({
            "application_version": version,
            "metadata": {"$elemMatch": {"key": "active", "value": false}}
        }),
        _ => elem("decommissioned", json!({"$exists": true})),
    }
}

/// What the filters REST API answers (the fields the bench reads).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FilterDto {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub matched_endpoints_count: Option<u64>,
}

fn parse_filter(r: Response, want: u16, what: &str) -> Result<FilterDto> {
    let body = || String::from_utf8_lossy(&r.body).into_owned();
    if r.status != want {
        bail!("{what}: HTTP {} {}", r.status, body());
    }
    serde_json::from_slice(&r.body).with_context(|| format!("{what}: {}", body()))
}

pub(crate) async fn post_filter(
    conn: &mut Conn,
    app: &str,
    name: &str,
    query: &Value,
) -> Result<FilterDto> {
    let body = json!({"name": name, "description": "epr-bench", "mongoQuery": query});
    let path = format!("/api/v1/applications/{app}/filters");
    let r = conn
        .request("POST", &path, Some(&serde_json::to_vec(&body)?))
        .await?;
    parse_filter(r, 201, &format!("POST {path} ({name})"))
}

async fn get_filter(conn: &mut Conn, app: &str, id: &str) -> Result<FilterDto> {
    let path = format!("/api/v1/applications/{app}/filters/{id}");
    parse_filter(conn.request("GET", &path, None).await?, 200, &path)
}

/// A filter polled until active.
struct Polled {
    filter: FilterDto,
    /// When the first `active` answer arrived.
    active_at: Instant,
    /// When the last `pending` answer arrived (none: the POST answered `active`).
    last_pending: Option<Instant>,
    polls: u64,
}

/// Polls `f` (as just created, answered at `at`) every `poll` until it is active.
async fn poll_active(
    conn: &mut Conn,
    app: &str,
    mut f: FilterDto,
    mut at: Instant,
    poll: Duration,
    deadline: Instant,
) -> Result<Polled> {
    let (mut last_pending, mut polls) = (None, 0);
    loop {
        match f.status.as_str() {
            "active" => {
                return Ok(Polled {
                    filter: f,
                    active_at: at,
                    last_pending,
                    polls,
                })
            }
            "pending" => last_pending = Some(at),
            other => bail!("filter {} of {app}: unexpected status {other:?}", f.id),
        }
        if Instant::now() > deadline {
            bail!(
                "filter {} of {app} still pending after {ACTIVE_TIMEOUT:?}",
                f.id
            );
        }
        tokio::time::sleep(poll).await;
        f = get_filter(conn, app, &f.id).await?;
        at = Instant::now();
        polls += 1;
    }
}

/// Creates `n` filters (`query(k, version)`, e.g. [`varied_filter`]) in `app` over 4
/// connections; returns their IDs.
pub(crate) async fn create_filters(
    addr: &str,
    app: &'static str,
    version: &str,
    n: usize,
    tag: &str,
    query: fn(usize, &str) -> Value,
) -> Result<Vec<String>> {
    const CONNS: usize = 4;
    let handles: Vec<_> = (0..CONNS)
        .map(|c| {
            let mut conn = Conn::new(addr);
            let (version, tag) = (version.to_owned(), tag.to_owned());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for k in (c..n).step_by(CONNS) {
                    let query = query(k, &version);
                    ids.push(
                        post_filter(&mut conn, app, &format!("{tag}-{k}"), &query)
                            .await?
                            .id,
                    );
                }
                anyhow::Ok(ids)
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(n);
    for h in handles {
        ids.extend(h.await??);
    }
    Ok(ids)
}

/// The issue-13 mix of filters (`keymix::filter`) created in `app` and waited for until all
/// are active: their IDs, the seconds to create them and to see all active, and the sum of
/// their `matchedEndpointsCount`.
pub(crate) async fn create_mix_filters(
    addr: &str,
    app: &'static str,
    version: &str,
    n: usize,
    tag: &str,
) -> Result<(Vec<String>, f64, f64, u64)> {
    let started = std::time::Instant::now();
    let ids = create_filters(addr, app, version, n, tag, |k, _| crate::keymix::filter(k)).await?;
    let created = started.elapsed().as_secs_f64();
    let memberships = wait_all_active(addr, app, &ids).await?;
    Ok((ids, created, started.elapsed().as_secs_f64(), memberships))
}

/// Waits until every filter of `ids` is active; returns the sum of their matched counts.
pub(crate) async fn wait_all_active(addr: &str, app: &str, ids: &[String]) -> Result<u64> {
    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    let mut conn = Conn::new(addr);
    let (mut pending, mut matched): (Vec<&String>, u64) = (ids.iter().collect(), 0);
    loop {
        let mut still = Vec::new();
        for id in pending {
            let f = get_filter(&mut conn, app, id).await?;
            match f.status.as_str() {
                "active" => matched += f.matched_endpoints_count.unwrap_or(0),
                _ => still.push(id),
            }
        }
        if still.is_empty() {
            return Ok(matched);
        }
        if Instant::now() > deadline {
            bail!(
                "{} filters of {app} still pending after {ACTIVE_TIMEOUT:?}",
                still.len()
            );
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registration of an application's endpoints through the batch API.
#[derive(Serialize, Clone)]
pub struct PopulateResult {
    pub phase: &'static str,
    pub app: &'static str,
    /// Filters the application had (active or being back-filled) meanwhile.
    pub filters: usize,
    pub endpoints: u64,
    pub seconds: f64,
    pub endpoints_per_s: f64,
    #[serde(flatten)]
    pub cpu: Cores,
}

/// CPU used during a measurement, in cores: the server (spawned servers only), the bench,
/// and the rest of the machine.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Cores {
    pub server_cpu_cores: Option<f64>,
    pub bench_cpu_cores: Option<f64>,
    pub other_cpu_cores: Option<f64>,
}

impl Cores {
    fn over(cpu: &CpuSnap, seconds: f64) -> Cores {
        let c = |t: Option<u64>| t.map(|t| t as f64 / TICKS_PER_S / seconds);
        Cores {
            server_cpu_cores: c(cpu.server),
            bench_cpu_cores: c(cpu.bench),
            other_cpu_cores: c(cpu.other()),
        }
    }
}

impl std::fmt::Display for Cores {
    /// `server / bench / other`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [s, b, o] = [
            self.server_cpu_cores,
            self.bench_cpu_cores,
            self.other_cpu_cores,
        ];
        write!(f, "{} / {} / {}", opt(s, 2), opt(b, 2), opt(o, 2))
    }
}

/// With `--quiet-wait`, after the server is idle ([`settle`]): waits until the rest of the
/// machine has used under 0.2 cores over half a second, at most `--quiet-wait` seconds.
pub(crate) async fn settle_quiet(targets: &[Target], args: &Args) {
    let waited = settle(targets).await;
    if waited > Duration::from_secs(2) {
        eprintln!("settle: server busy for {:.1} s", waited.as_secs_f64());
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.quiet_wait);
    let pid = targets.first().and_then(Target::pid);
    let mut other = 0.0;
    while Instant::now() < deadline {
        let before = CpuSnap::take(pid, args.nats_pid);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cpu = CpuSnap::take(pid, args.nats_pid).since(&before);
        other = cpu.other().unwrap_or(0) as f64 / TICKS_PER_S / 0.5;
        if other < 0.2 {
            return;
        }
    }
    if args.quiet_wait > 0.0 {
        eprintln!("quiet-wait: the machine is still busy ({other:.2} other cores)");
    }
}

/// Registers endpoints `{prefix}-{i}`, `i` in `0..n`, with metadata [`Md::of`]`(i)` and
/// app version `version(first i of the batch)`, into `app` through the batch API.
#[allow(clippy::too_many_arguments)]
async fn populate(
    t: &Target,
    args: &Args,
    phase: Phase,
    app: &'static str,
    filters: usize,
    n: usize,
    prefix: String,
    version: impl Fn(usize) -> &'static str + Send + Sync + 'static,
) -> Result<PopulateResult> {
    eprintln!(
        "{}: registering {n} endpoints (10 metadata keys) into `{app}` ({filters} filters)",
        phase.name()
    );
    let cpu0 = CpuSnap::take(t.pid(), args.nats_pid);
    let w = batch_register(
        &t.addr,
        n,
        args.batch_size,
        batch_conns(args),
        phase,
        None,
        move |buf, lo, hi| {
            write_batch(buf, version(lo), lo, hi, |buf, i| {
                let _ = write!(buf, r#"{{"endpointId":"{prefix}-{i}","metadata":"#);
                Md::of(i as u64).write_json(buf);
                buf.push('}');
            });
        },
    )
    .await?;
    let cpu = CpuSnap::take(t.pid(), args.nats_pid).since(&cpu0);
    if w.acked != n as u64 {
        bail!("{app}: only {} of {n} endpoints were registered", w.acked);
    }
    let seconds = (w.last_ack - w.start).as_secs_f64();
    let cpu = Cores::over(&cpu, seconds);
    let r = PopulateResult {
        phase: phase.name(),
        app,
        filters,
        endpoints: w.acked,
        seconds,
        endpoints_per_s: w.acked as f64 / seconds,
        cpu,
    };
    eprintln!("{}", fmt_populate_row(&r));
    Ok(r)
}

const POPULATE_HEADER: &str = "| phase | application | its filters | endpoints | seconds | endpoints/s | CPU cores server / bench / other |\n|---|---|---:|---:|---:|---:|---:|";

fn fmt_populate_row(r: &PopulateResult) -> String {
    format!(
        "| {} | {} | {} | {} | {:.1} | {:.0} | {} |",
        r.phase, r.app, r.filters, r.endpoints, r.seconds, r.endpoints_per_s, r.cpu,
    )
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

/// The filters of a filter-update or filter-register application B, and how many of its
/// endpoints they hold.
#[derive(Serialize, Clone)]
pub struct Membership {
    pub phase: &'static str,
    pub round: usize,
    pub app: &'static str,
    pub filters: usize,
    /// Seconds to create them (POSTs over 4 connections; setup only).
    pub create_s: Option<f64>,
    pub endpoints: u64,
    /// Sum of the filters' `matchedEndpointsCount`, and per endpoint.
    pub memberships: u64,
    pub filters_per_endpoint: f64,
}

const MEMBERSHIP_HEADER: &str = "| phase | round | application | filters | creation s | endpoints | memberships (Σ matchedEndpointsCount) | filters per endpoint |\n|---|---:|---|---:|---:|---:|---:|---:|";

fn fmt_membership_row(m: &Membership) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.1} |",
        m.phase,
        m.round,
        m.app,
        m.filters,
        opt(m.create_s, 1),
        m.endpoints,
        m.memberships,
        m.filters_per_endpoint
    )
}

/// One new filter over the back-fill application.
#[derive(Serialize, Clone)]
pub struct BackfillResult {
    pub round: usize,
    pub shape: &'static str,
    pub filter_id: String,
    pub endpoints: u64,
    pub matched: Option<u64>,
    /// Endpoints the shape matches by the bench's own reckoning.
    pub expected: u64,
    /// POST sent → first `active` answer, ms (the primary figure), and → the last
    /// `pending` answer (the back-fill ended between the two, give or take a request).
    pub active_ms: f64,
    pub last_pending_ms: Option<f64>,
    pub polls: u64,
    /// endpoints / active_ms.
    pub endpoints_per_s: f64,
    /// From the server's `/metrics`, over the same time: `epr_filter_backfill_endpoints_total`
    /// and `epr_filter_backfill_seconds_sum` increases, and their ratio.
    pub metric_endpoints: Option<f64>,
    pub metric_seconds: Option<f64>,
    pub metric_endpoints_per_s: Option<f64>,
    #[serde(flatten)]
    pub cpu: Cores,
    /// The filter matched exactly the expected endpoints.
    pub ok: bool,
}

pub(crate) const BACKFILL_HEADER: &str = "| round | filter | endpoints | matched (expected) | POST → active ms | last pending ms | polls | **endpoints/s** | server metrics: back-fill ms, endpoints/s | CPU cores server / bench / other | check |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|";

pub(crate) fn fmt_backfill_row(r: &BackfillResult) -> String {
    let metric = match (r.metric_seconds, r.metric_endpoints_per_s) {
        (Some(s), Some(e)) => format!("{:.1}, {e:.0}", s * 1000.0),
        _ => "-".into(),
    };
    format!(
        "| {} | {} | {} | {} ({}) | {:.1} | {} | {} | **{:.0}** | {metric} | {} | {} |",
        r.round,
        r.shape,
        r.endpoints,
        r.matched.map_or_else(|| "-".into(), |m| m.to_string()),
        r.expected,
        r.active_ms,
        opt(r.last_pending_ms, 1),
        r.polls,
        r.endpoints_per_s,
        r.cpu,
        if r.ok { "ok" } else { "**MISMATCH**" }
    )
}

/// The back-fill metrics' increase since `m0` once the histogram has counted the filter
/// (it may be observed just after the status turns active): (endpoints, seconds). `None`
/// when the server does not export them.
async fn backfill_metrics(addr: &str, m0: &Scrape) -> Option<(f64, f64)> {
    const SECONDS: &str = "epr_filter_backfill_seconds";
    let since = |m1: &Scrape, name: &str| Some(m1.total(name)? - m0.total(name).unwrap_or(0.0));
    for _ in 0..25 {
        let m1 = Scrape::take(addr).await?;
        if since(&m1, &format!("{SECONDS}_count"))? >= 1.0 {
            return Some((
                since(&m1, "epr_filter_backfill_endpoints_total")?,
                since(&m1, &format!("{SECONDS}_sum"))?,
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Creates filter `query` (of shape `shape`) named `name` in `app`, whose `n` endpoints
/// hold `expected` matches, and waits until it is active.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn measure_backfill(
    conn: &mut Conn,
    t: &Target,
    app: &str,
    (shape, query): (&'static str, &Value),
    name: &str,
    (n, expected): (u64, u64),
    round: usize,
    args: &Args,
) -> Result<BackfillResult> {
    let m0 = Scrape::take(&t.addr).await;
    let cpu0 = CpuSnap::take(t.pid(), args.nats_pid);
    let start = Instant::now();
    let f = post_filter(conn, app, name, query).await?;
    let poll = Duration::from_millis(args.poll_ms);
    let p = poll_active(conn, app, f, Instant::now(), poll, start + ACTIVE_TIMEOUT).await?;
    let cpu = CpuSnap::take(t.pid(), args.nats_pid).since(&cpu0);
    let seconds = (p.active_at - start).as_secs_f64();
    let metric = match &m0 {
        Some(m0) => backfill_metrics(&t.addr, m0).await,
        None => None,
    };
    let cpu = Cores::over(&cpu, seconds);
    let matched = p.filter.matched_endpoints_count;
    Ok(BackfillResult {
        round,
        shape,
        filter_id: p.filter.id,
        endpoints: n,
        matched,
        expected,
        active_ms: seconds * 1000.0,
        last_pending_ms: p.last_pending.map(|l| (l - start).as_secs_f64() * 1000.0),
        polls: p.polls,
        endpoints_per_s: n as f64 / seconds,
        metric_endpoints: metric.map(|m| m.0),
        metric_seconds: metric.map(|m| m.1),
        metric_endpoints_per_s: metric.filter(|m| m.1 > 0.0).map(|m| m.0 / m.1),
        cpu,
        ok: matched == Some(expected),
    })
}

/// Latency of metadata PUTs into one application of the filter-update phase.
#[derive(Serialize, Clone)]
pub struct UpdateRow {
    /// A, B or C.
    pub label: &'static str,
    pub app: &'static str,
    pub filters: usize,
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl UpdateRow {
    fn new(i: usize, filters: usize, h: &Histogram<u64>, errors: u64) -> UpdateRow {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        UpdateRow {
            label: UPDATE_LABELS[i],
            app: UPDATE_APPS[i].0,
            filters: if i == 1 { filters } else { 0 },
            requests: h.len(),
            errors,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

/// One round of the filter-update phase.
#[derive(Serialize, Clone)]
pub struct UpdateRound {
    pub round: usize,
    pub target_rate: f64,
    pub achieved_rate: f64,
    /// PUTs sent more than 5 ms after their slot.
    pub late_sends: u64,
    /// A, B, C.
    pub rows: Vec<UpdateRow>,
    /// p99 of B − p99 of A: what the filters add; C − A: the noise of the measurement.
    pub p99_cost_ms: f64,
    pub p99_control_ms: f64,
    #[serde(flatten)]
    pub cpu: Cores,
    pub server: Option<ServerStats>,
}

const UPDATE_HEADER: &str = "| round | application | filters | PUTs | errors | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | p99 − A's p99 ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn fmt_update_rows(round: &str, rows: &[UpdateRow]) -> String {
    let base = rows.first().map_or(0.0, |r| r.p99_ms);
    rows.iter()
        .map(|r| {
            let diff = if r.label == "A" {
                "-".to_owned()
            } else {
                format!("{:+.3}", r.p99_ms - base)
            };
            format!(
                "| {round} | {} `{}` | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {diff} |",
                r.label, r.app, r.filters, r.requests, r.errors, r.p50_ms, r.p90_ms, r.p99_ms, r.p999_ms, r.max_ms
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct UpdateOut {
    hist: [Histogram<u64>; 3],
    errors: [u64; 3],
    late: u64,
}

/// What one connection of the filter-update load needs.
struct UpdateLoad {
    prefixes: [String; 3],
    endpoints: u64,
    conns: usize,
    period: Duration,
    measure_from: Instant,
    end: Instant,
}

/// One connection's share of the filter-update load: a PUT every `period` from `first`.
/// Slot `k` of connection `idx` is global slot `k·conns + idx`, and global slots go to the
/// applications in [`UPDATE_ORDER`]. Latency is measured from the actual send (a late send
/// is counted apart), so a slow answer does not charge its wait to the next PUT of this
/// connection.
async fn update_task(
    mut conn: Conn,
    idx: usize,
    first: Instant,
    mut rng: u64,
    load: Arc<UpdateLoad>,
) -> UpdateOut {
    let mut out = UpdateOut {
        hist: [new_hist(), new_hist(), new_hist()],
        errors: [0; 3],
        late: 0,
    };
    let (mut path, mut body) = (String::with_capacity(96), String::with_capacity(8));
    for k in 0u32.. {
        let slot = first + load.period * k;
        if slot >= load.end {
            break;
        }
        tokio::time::sleep_until(slot.into()).await;
        let app = UPDATE_ORDER[(k as usize * load.conns + idx) % UPDATE_ORDER.len()];
        let r = xorshift(&mut rng);
        let temp = (r >> 32) % 10_000;
        path.clear();
        body.clear();
        let _ = write!(
            path,
            "/api/v1/endpoints/{}-{}/metadata/temp",
            load.prefixes[app],
            r % load.endpoints
        );
        let _ = write!(body, "{}.{}", temp / 10, temp % 10);
        let sent = Instant::now();
        let res = conn.request("PUT", &path, Some(body.as_bytes())).await;
        let done = Instant::now();
        let recorded = slot >= load.measure_from && done <= load.end;
        match res {
            Ok(r) if r.is_success() => {
                if recorded {
                    out.hist[app].saturating_record((done - sent).as_micros() as u64);
                    out.late += (sent - slot > LATE) as u64;
                }
            }
            Ok(r) => {
                out.errors[app] += recorded as u64;
                report_error(Phase::FilterUpdate, || {
                    format!("HTTP {} {}", r.status, String::from_utf8_lossy(&r.body))
                });
            }
            Err(e) => {
                out.errors[app] += recorded as u64;
                report_error(Phase::FilterUpdate, || format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    out
}

struct UpdateSetup {
    prefixes: [String; 3],
    endpoints: usize,
    filters: usize,
    /// All rounds' latencies of A, B and C.
    pooled: [Histogram<u64>; 3],
    pooled_errors: [u64; 3],
}

struct RegisterSetup {
    /// `rega` (no filter) and `regb` (the filters), with their contexts.
    sides: [(Target, Arc<Ctx>); 2],
    filter_ids: Vec<String>,
}

/// What the filter phases produced in one round (their registrations are rows of
/// `Round::phases`).
#[derive(Serialize, Default)]
pub struct RoundOut {
    pub populate: Vec<PopulateResult>,
    pub memberships: Vec<Membership>,
    pub backfill: Vec<BackfillResult>,
    pub update: Vec<UpdateRound>,
}

/// State of the filter phases across rounds: each populates its applications once.
#[derive(Default)]
pub struct FilterBench {
    /// Endpoints registered into `fill`.
    fill: Option<usize>,
    update: Option<UpdateSetup>,
    register: Option<RegisterSetup>,
}

pub fn check_args(args: &Args) -> Result<()> {
    if !args.update_rate.is_finite()
        || args.update_rate <= 0.0
        || args.backfill_endpoints == 0
        || args.update_endpoints == 0
        || args.poll_ms == 0
    {
        bail!("--update-rate, --backfill-endpoints, --update-endpoints and --poll-ms must be positive");
    }
    Ok(())
}

impl FilterBench {
    /// Runs filter phase `phase` of round `round` on the first of `targets`; returns the
    /// rows for the main table (filter-register only).
    pub async fn run(
        &mut self,
        phase: Phase,
        targets: &[Target],
        ctx: &Ctx,
        round: usize,
        args: &Args,
        out: &mut RoundOut,
    ) -> Result<Vec<PhaseResult>> {
        let t = targets.first().ok_or_else(|| anyhow!("no server"))?;
        match phase {
            Phase::Backfill => self.backfill(t, targets, ctx, round, args, out).await?,
            Phase::FilterUpdate => self.update(t, targets, ctx, round, args, out).await?,
            Phase::FilterRegister => return self.register(t, targets, ctx, round, args, out).await,
            _ => bail!("{} is not a filter phase", phase.name()),
        }
        Ok(Vec::new())
    }

    async fn backfill(
        &mut self,
        t: &Target,
        targets: &[Target],
        ctx: &Ctx,
        round: usize,
        args: &Args,
        out: &mut RoundOut,
    ) -> Result<()> {
        let (n, batch) = (args.backfill_endpoints, args.batch_size);
        if self.fill.is_none() {
            settle(targets).await;
            let prefix = format!("f-{}", ctx.run_id);
            let p = populate(t, args, Phase::Backfill, "fill", 0, n, prefix, move |lo| {
                fill_version(lo, batch)
            })
            .await?;
            out.populate.push(p);
            self.fill = Some(n);
        }
        let mut conn = Conn::new(&t.addr);
        for (s, shape) in backfill_shapes(round).iter().enumerate() {
            let expected = (0..n)
                .filter(|&i| (shape.matches)(&Md::of(i as u64), fill_version(i, batch)))
                .count() as u64;
            settle_quiet(targets, args).await;
            let name = format!("bf-{}-{round}-{s}", ctx.run_id);
            let r = measure_backfill(
                &mut conn,
                t,
                "fill",
                (shape.name, &shape.query),
                &name,
                (n as u64, expected),
                round,
                args,
            )
            .await?;
            eprintln!("{}", fmt_backfill_row(&r));
            if !r.ok {
                eprintln!(
                    "FILTER MISMATCH (backfill round {round}, {}): matched {:?}, expected {expected}",
                    r.shape, r.matched
                );
            }
            out.backfill.push(r);
        }
        Ok(())
    }

    async fn update(
        &mut self,
        t: &Target,
        targets: &[Target],
        ctx: &Ctx,
        round: usize,
        args: &Args,
        out: &mut RoundOut,
    ) -> Result<()> {
        if self.update.is_none() {
            settle(targets).await;
            let n = args.update_endpoints;
            let (app, version) = UPDATE_APPS[1];
            let created = Instant::now();
            let ids = create_filters(
                &t.addr,
                app,
                version,
                args.update_filters,
                &format!("uf-{}", ctx.run_id),
                varied_filter,
            )
            .await?;
            let create_s = created.elapsed().as_secs_f64();
            let prefixes = UPDATE_APPS.map(|(a, _)| format!("u-{}-{a}", ctx.run_id));
            for (i, (app, version)) in UPDATE_APPS.into_iter().enumerate() {
                let filters = if i == 1 { ids.len() } else { 0 };
                let p = populate(
                    t,
                    args,
                    Phase::FilterUpdate,
                    app,
                    filters,
                    n,
                    prefixes[i].clone(),
                    move |_| version,
                )
                .await?;
                out.populate.push(p);
            }
            let memberships = wait_all_active(&t.addr, app, &ids).await?;
            out.memberships.push(Membership {
                phase: Phase::FilterUpdate.name(),
                round,
                app,
                filters: ids.len(),
                create_s: Some(create_s),
                endpoints: n as u64,
                memberships,
                filters_per_endpoint: memberships as f64 / n as f64,
            });
            eprintln!(
                "{}",
                fmt_membership_row(out.memberships.last().expect("pushed"))
            );
            self.update = Some(UpdateSetup {
                prefixes,
                endpoints: n,
                filters: ids.len(),
                pooled: [new_hist(), new_hist(), new_hist()],
                pooled_errors: [0; 3],
            });
        }
        let s = self.update.as_mut().expect("set up above");
        settle_quiet(targets, args).await;
        let conns = args.connections;
        let t0 = Instant::now() + Duration::from_millis(20);
        let measure_from = t0 + Duration::from_secs_f64(args.warmup);
        let load = Arc::new(UpdateLoad {
            prefixes: s.prefixes.clone(),
            endpoints: s.endpoints as u64,
            conns,
            period: Duration::from_secs_f64(conns as f64 / args.update_rate),
            measure_from,
            end: measure_from + Duration::from_secs_f64(args.duration),
        });
        let cpu = sample_window(&t.addr, t.pid(), args, measure_from, load.end);
        let handles: Vec<_> = (0..conns)
            .map(|c| {
                let first = t0 + Duration::from_secs_f64(c as f64 / args.update_rate);
                let seed = ((round * conns + c) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                tokio::spawn(update_task(
                    Conn::new(&t.addr),
                    c,
                    first,
                    seed,
                    load.clone(),
                ))
            })
            .collect();
        let mut hist = [new_hist(), new_hist(), new_hist()];
        let (mut errors, mut late) = ([0u64; 3], 0);
        for h in handles {
            let o = tokio::time::timeout_at((load.end + Duration::from_secs(30)).into(), h)
                .await
                .map_err(|_| anyhow!("filter-update phase did not finish: server stuck?"))??;
            for i in 0..3 {
                hist[i].add(&o.hist[i])?;
                s.pooled[i].add(&o.hist[i])?;
                errors[i] += o.errors[i];
                s.pooled_errors[i] += o.errors[i];
            }
            late += o.late;
        }
        let (cpu, server) = cpu.await?;
        let cpu = Cores::over(&cpu, args.duration);
        let rows: Vec<UpdateRow> = (0..3)
            .map(|i| UpdateRow::new(i, s.filters, &hist[i], errors[i]))
            .collect();
        let r = UpdateRound {
            round,
            target_rate: args.update_rate,
            achieved_rate: rows.iter().map(|r| r.requests).sum::<u64>() as f64 / args.duration,
            late_sends: late,
            p99_cost_ms: rows[1].p99_ms - rows[0].p99_ms,
            p99_control_ms: rows[2].p99_ms - rows[0].p99_ms,
            rows,
            cpu,
            server,
        };
        eprintln!("{}", fmt_update_rows(&round.to_string(), &r.rows));
        out.update.push(r);
        Ok(())
    }

    async fn register(
        &mut self,
        t: &Target,
        targets: &[Target],
        ctx: &Ctx,
        round: usize,
        args: &Args,
        out: &mut RoundOut,
    ) -> Result<Vec<PhaseResult>> {
        let [(a, a_version), (b, b_version)] = [("rega", "rega-v1"), ("regb", "regb-v1")];
        if self.register.is_none() {
            settle(targets).await;
            let created = Instant::now();
            let ids = create_filters(
                &t.addr,
                b,
                b_version,
                args.register_filters,
                &format!("rf-{}", ctx.run_id),
                varied_filter,
            )
            .await?;
            let create_s = created.elapsed().as_secs_f64();
            wait_all_active(&t.addr, b, &ids).await?;
            out.memberships.push(Membership {
                phase: Phase::FilterRegister.name(),
                round,
                app: b,
                filters: ids.len(),
                create_s: Some(create_s),
                endpoints: 0,
                memberships: 0,
                filters_per_endpoint: 0.0,
            });
            let side = |name: &'static str, tag: &str, version: &str| {
                let target = Target {
                    name,
                    addr: t.addr.clone(),
                    server: None,
                    pid: t.pid(),
                    events: None,
                    workers: new_workers(&t.addr, args.connections),
                    replicas: Vec::new(),
                    nats_instance: None,
                };
                let ctx = Arc::new(Ctx::new(
                    format!("{}-{tag}", ctx.run_id),
                    version.to_owned(),
                    RegMetadata::Mixed,
                    &args.app_name,
                ));
                (target, ctx)
            };
            self.register = Some(RegisterSetup {
                sides: [side(NO_FILTERS, a, a_version), side(FILTERS, b, b_version)],
                filter_ids: ids,
            });
        }
        let s = self.register.as_mut().expect("set up above");
        let mut order = [0, 1];
        if round.is_multiple_of(2) {
            order.reverse();
        }
        let mut results = Vec::new();
        for i in order {
            settle_quiet(targets, args).await;
            let (target, ctx) = &mut s.sides[i];
            let workers = std::mem::take(&mut target.workers);
            let (back, res, _) = run_phase(workers, ctx, Phase::Register, args, target).await?;
            target.workers = back;
            let mut label = format!("{} [{}]", res.phase, target.name);
            if args.repeat > 1 {
                write!(label, " #{round}")?;
            }
            println!("{}", fmt_row(&res, &label));
            results.push(res);
        }
        // How many of B's registrations its filters hold (outside the measured windows).
        let endpoints: u64 = s.sides[1]
            .0
            .workers
            .iter()
            .map(|w| w.ids.len() as u64)
            .sum();
        let memberships = wait_all_active(&t.addr, b, &s.filter_ids).await?;
        out.memberships.push(Membership {
            phase: Phase::FilterRegister.name(),
            round,
            app: b,
            filters: s.filter_ids.len(),
            create_s: None,
            endpoints,
            memberships,
            filters_per_endpoint: memberships as f64 / endpoints.max(1) as f64,
        });
        Ok(results)
    }
}

/// The filter phases' tables, at the end of the run.
pub fn print_tables(rounds: &[Round], fb: &FilterBench) {
    let outs: Vec<&RoundOut> = rounds.iter().map(|r| &r.filters).collect();
    let populate: Vec<&PopulateResult> = outs.iter().flat_map(|o| &o.populate).collect();
    if !populate.is_empty() {
        println!("\nEndpoints registered for the filter phases (batch API):\n");
        println!("{POPULATE_HEADER}");
        for p in populate {
            println!("{}", fmt_populate_row(p));
        }
    }
    let members: Vec<&Membership> = outs.iter().flat_map(|o| &o.memberships).collect();
    if !members.is_empty() {
        println!("\nFilters of the applications B:\n\n{MEMBERSHIP_HEADER}");
        for m in members {
            println!("{}", fmt_membership_row(m));
        }
    }
    let backfill: Vec<&BackfillResult> = outs.iter().flat_map(|o| &o.backfill).collect();
    if !backfill.is_empty() {
        println!("\nBack-fill: a new filter over the endpoints of `fill`, POST → `active` (polled):\n\n{BACKFILL_HEADER}");
        for r in &backfill {
            println!("{}", fmt_backfill_row(r));
        }
        println!("\n| filter | runs | endpoints/s median | min | max | server metrics endpoints/s median |\n|---|---:|---:|---:|---:|---:|");
        let mut shapes: Vec<&str> = Vec::new();
        for r in &backfill {
            if !shapes.contains(&r.shape) {
                shapes.push(r.shape);
            }
        }
        for shape in shapes {
            let of = |f: fn(&BackfillResult) -> Option<f64>| -> Vec<f64> {
                let mut v: Vec<f64> = backfill
                    .iter()
                    .filter(|r| r.shape == shape)
                    .filter_map(|r| f(r))
                    .collect();
                v.sort_by(f64::total_cmp);
                v
            };
            let rates = of(|r| Some(r.endpoints_per_s));
            let metric = of(|r| r.metric_endpoints_per_s);
            println!(
                "| {shape} | {} | {:.0} | {:.0} | {:.0} | {} |",
                rates.len(),
                median(&rates),
                rates.first().copied().unwrap_or(f64::NAN),
                rates.last().copied().unwrap_or(f64::NAN),
                if metric.is_empty() {
                    "-".into()
                } else {
                    format!("{:.0}", median(&metric))
                }
            );
        }
    }
    let update: Vec<&UpdateRound> = outs.iter().flat_map(|o| &o.update).collect();
    if !update.is_empty() {
        println!("\nMetadata PUT latency (send → answer), open loop, A / B / C in turn:\n\n{UPDATE_HEADER}");
        for r in &update {
            println!("{}", fmt_update_rows(&r.round.to_string(), &r.rows));
        }
        if let Some(s) = &fb.update {
            let rows: Vec<UpdateRow> = (0..3)
                .map(|i| UpdateRow::new(i, s.filters, &s.pooled[i], s.pooled_errors[i]))
                .collect();
            println!("{}", fmt_update_rows("all", &rows));
        }
        println!("\n| round | target PUT/s | achieved PUT/s | late sends | p99 B − A ms (filters) | p99 C − A ms (control) | CPU cores server / bench / other | store commits/s | mean group | mean commit ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &update {
            let st = |f: fn(&ServerStats) -> f64, prec: usize| opt(r.server.as_ref().map(f), prec);
            println!(
                "| {} | {:.0} | {:.0} | {} | {:+.3} | {:+.3} | {} | {} | {} | {} |",
                r.round,
                r.target_rate,
                r.achieved_rate,
                r.late_sends,
                r.p99_cost_ms,
                r.p99_control_ms,
                r.cpu,
                st(|s| s.commits_per_s, 0),
                st(|s| s.mean_group, 2),
                st(|s| s.mean_commit_ms, 2),
            );
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epr_core::filter::Filter;

    fn metadata(m: &Md) -> serde_json::Map<String, Value> {
        let mut s = String::new();
        m.write_json(&mut s);
        match serde_json::from_str(&s).unwrap() {
            Value::Object(o) => o,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn metadata_has_ten_keys_of_mixed_types() {
        let m = metadata(&Md::of(12_345));
        assert_eq!(m.len(), 10);
        let count = |f: fn(&Value) -> bool| m.values().filter(|v| f(v)).count();
        assert_eq!(count(Value::is_string), 4);
        assert_eq!(count(Value::is_number), 5);
        assert_eq!(count(Value::is_boolean), 1);
        assert_eq!(m["serial"], "SN-00012345");
    }

    /// The bench's expected matches agree with the server's filter language, and the
    /// shares are those the shapes' names announce.
    #[test]
    fn backfill_shapes_match_as_expected() {
        let (n, batch) = (20_000, 1000);
        for round in 1..=3 {
            for shape in backfill_shapes(round) {
                let filter = Filter::parse(&shape.query).unwrap();
                let mut hits = 0;
                for i in 0..n {
                    let (md, version) = (Md::of(i as u64), fill_version(i, batch));
                    let want = (shape.matches)(&md, version);
                    assert_eq!(
                        filter.matches(version, &metadata(&md)),
                        want,
                        "{} #{i}",
                        shape.name
                    );
                    hits += want as usize;
                }
                let pct = 100.0 * hits as f64 / n as f64;
                let announced: f64 = shape
                    .name
                    .split('~')
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    (pct - announced).abs() < announced * 0.1 + 0.3,
                    "{}: {pct:.2} %",
                    shape.name
                );
            }
        }
    }

    #[test]
    fn varied_filters_parse_and_some_match() {
        let mds: Vec<_> = (0..500u64).map(|i| metadata(&Md::of(i))).collect();
        let mut matched = 0;
        for k in 0..1000 {
            let filter = Filter::parse(&varied_filter(k, "updb-v1")).unwrap();
            matched += mds.iter().filter(|m| filter.matches("updb-v1", m)).count();
        }
        let per_endpoint = matched as f64 / mds.len() as f64;
        assert!(
            (80.0..150.0).contains(&per_endpoint),
            "{per_endpoint} filters per endpoint"
        );
    }
}
