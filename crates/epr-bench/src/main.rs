//! `epr-bench`: closed-loop HTTP load generator for the EPR server.
//! See README.md for what it measures and how to run it.

mod client;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use client::Conn;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Comma-separated subset of: health,register,get,put (always run in that order).
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
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Health,
    Register,
    Get,
    Put,
}

impl Phase {
    const ALL: [Phase; 4] = [Phase::Health, Phase::Register, Phase::Get, Phase::Put];

    fn name(self) -> &'static str {
        match self {
            Phase::Health => "health",
            Phase::Register => "register",
            Phase::Get => "get-by-id",
            Phase::Put => "metadata-put",
        }
    }

    fn parse(s: &str) -> Result<Phase> {
        Ok(match s {
            "health" => Phase::Health,
            "register" => Phase::Register,
            "get" | "get-by-id" => Phase::Get,
            "put" | "metadata-put" => Phase::Put,
            _ => bail!("unknown phase {s:?} (use health,register,get,put)"),
        })
    }
}

#[derive(Serialize, Clone)]
struct PhaseResult {
    phase: &'static str,
    connections: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Round {
    round: usize,
    phases: Vec<PhaseResult>,
    /// Throughput of a phase as a percentage of mean `health` throughput.
    ratios_pct: Vec<(String, f64)>,
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
}

/// Shared, read-only per-run settings every worker needs.
struct Ctx {
    run_id: String,
    app_version: String,
}

impl Worker {
    /// xorshift64: a few ALU ops per pick, enough to spread reads over ids.
    fn next_rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
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
                write!(
                    self.body,
                    r#"{{"endpointId":"{id}","appVersion":{{"name":"{}"}},"metadata":{{"serial":"SN-{n}","city":"Kyiv","level":{},"lat":50.45,"active":true}}}}"#,
                    ctx.app_version,
                    n % 10
                )?;
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
        };
        let body = (!self.body.is_empty()).then_some(self.body.as_bytes());
        let r = self.conn.request(method, &self.path, body).await?;
        if let (Some(id), true) = (new_id, r.is_success()) {
            self.ids.push(id);
        }
        Ok(r)
    }
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
}

/// One connection's closed loop: requests back to back until `end`;
/// only requests that both start and finish inside `[measure_from, end]`
/// are recorded, so req/s is completions over exactly `--duration` seconds
/// and a straggler past `end` (or a slow connect) cannot skew it.
async fn run_task(
    mut w: Worker,
    ctx: std::sync::Arc<Ctx>,
    phase: Phase,
    measure_from: Instant,
    end: Instant,
) -> (Worker, TaskOut) {
    let mut out = TaskOut {
        hist: new_hist(),
        requests: 0,
        errors: 0,
    };
    // get/put need ids; if `register` was not selected, make a few untimed.
    while matches!(phase, Phase::Get | Phase::Put) && w.ids.len() < 16 && Instant::now() < end {
        if let Err(e) = w.one(Phase::Register, &ctx).await {
            report_error(Phase::Register, || format!("{e:#}"));
            tokio::time::sleep(Duration::from_millis(10)).await;
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
            Ok(r) if r.is_success() => {}
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

async fn run_phase(
    workers: Vec<Worker>,
    ctx: &std::sync::Arc<Ctx>,
    phase: Phase,
    args: &Args,
) -> Result<(Vec<Worker>, PhaseResult)> {
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(run_task(w, ctx.clone(), phase, measure_from, end)))
        .collect();
    let (mut hist, mut requests, mut errors, mut back) = (new_hist(), 0, 0, Vec::new());
    for h in handles {
        // A hung server would hang a task forever: give up 30 s past the end.
        let (w, out) = tokio::time::timeout_at((end + Duration::from_secs(30)).into(), h)
            .await
            .map_err(|_| anyhow!("phase {} did not finish: server stuck?", phase.name()))??;
        hist.add(&out.hist)?;
        requests += out.requests;
        errors += out.errors;
        back.push(w);
    }
    let seconds = args.duration;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let res = PhaseResult {
        phase: phase.name(),
        connections: args.connections,
        requests,
        errors,
        seconds,
        rps: requests as f64 / seconds,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
    };
    Ok((back, res))
}

/// A spawned server; killed (and its temp dirs removed) when dropped, so it
/// also goes away on errors and Ctrl-C.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(bin: &PathBuf) -> Result<(Server, String)> {
    // Bind :0 to learn a free port, then release it for the server.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let dir = tempfile::TempDir::new()?;
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "kaa:\n  applications:\n    bench:\n      versions:\n        bench-v1: {}\n        bench-v2: {}\nlog:\n  level: warn\n",
    )?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data)?;
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
    Ok((Server { child, _dir: dir }, addr))
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

fn fmt_row(r: &PhaseResult, label: &str) -> String {
    format!(
        "| {label} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} |",
        r.connections, r.requests, r.errors, r.rps, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
    )
}

/// Throughput of each non-health phase relative to the mean health rate.
fn ratios(phases: &[PhaseResult]) -> Vec<(String, f64)> {
    let health: Vec<f64> = phases
        .iter()
        .filter(|p| p.phase == "health")
        .map(|p| p.rps)
        .collect();
    if health.is_empty() {
        return Vec::new();
    }
    let base = health.iter().sum::<f64>() / health.len() as f64;
    ["get-by-id", "register", "metadata-put"]
        .iter()
        .filter_map(|name| {
            phases
                .iter()
                .find(|p| p.phase == *name)
                .map(|p| (format!("{name} / health"), 100.0 * p.rps / base))
        })
        .collect()
}

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
        seq.push(Phase::Health);
    }
    if seq.is_empty() || args.connections == 0 || args.repeat == 0 {
        bail!("nothing to do: need at least one phase, connection and round");
    }

    let (mut server, addr) = match (&args.server_bin, &args.url) {
        (Some(bin), _) => {
            let (s, a) = spawn_server(bin)?;
            (Some(s), a)
        }
        (None, Some(url)) => {
            let rest = url
                .strip_prefix("http://")
                .ok_or_else(|| anyhow!("--url must start with http://"))?;
            (None, rest.split('/').next().unwrap_or_default().to_owned())
        }
        (None, None) => bail!("need --server-bin or --url"),
    };
    let health = wait_healthy(&addr, server.as_mut()).await?;
    let server_version = serde_json::from_slice::<serde_json::Value>(&health)
        .ok()
        .and_then(|v| {
            v.get("version")
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        });

    let command = std::env::args()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let date = chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    println!("command: `{command}`  ");
    println!(
        "server: {addr}, version: {}  ",
        server_version.as_deref().unwrap_or("unknown")
    );
    println!(
        "date: {date}, nproc: {nproc}, client threads: {}",
        args.threads
    );
    println!(
        "warmup: {} s, duration: {} s per phase\n",
        args.warmup, args.duration
    );
    println!(
        "| phase | connections | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");

    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let ctx = std::sync::Arc::new(Ctx {
        run_id,
        app_version: args.app_version.clone(),
    });
    let mut workers: Vec<Worker> = (0..args.connections)
        .map(|idx| Worker {
            idx,
            conn: Conn::new(&addr),
            ids: Vec::new(),
            seq: 0,
            // Distinct non-zero xorshift seeds per connection.
            rng: (idx as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            path: String::with_capacity(128),
            body: String::with_capacity(256),
        })
        .collect();

    let mut rounds = Vec::new();
    for round in 1..=args.repeat {
        let mut results = Vec::new();
        for &phase in &seq {
            let (back, res) = run_phase(workers, &ctx, phase, &args).await?;
            workers = back;
            let label = if args.repeat > 1 {
                format!("{} #{round}", res.phase)
            } else {
                res.phase.to_owned()
            };
            println!("{}", fmt_row(&res, &label));
            results.push(res);
        }
        rounds.push(Round {
            round,
            ratios_pct: ratios(&results),
            phases: results,
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
    drop(server.take());
    Ok(())
}

fn main() -> Result<()> {
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
        let ctx = std::sync::Arc::new(Ctx {
            run_id: "t".into(),
            app_version: "bench-v1".into(),
        });
        let mut workers: Vec<Worker> = (0..4)
            .map(|idx| Worker {
                idx,
                conn: Conn::new(&addr),
                ids: Vec::new(),
                seq: 0,
                rng: idx as u64 + 1,
                path: String::new(),
                body: String::new(),
            })
            .collect();
        let mut results = Vec::new();
        for phase in [Phase::Health, Phase::Register, Phase::Get, Phase::Put] {
            let (back, res) = run_phase(workers, &ctx, phase, &args).await.unwrap();
            workers = back;
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
        assert!(Phase::parse("bogus").is_err());
    }
}
