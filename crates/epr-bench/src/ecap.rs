//! The `ecap` phase (issue 11): 16/ECAP endpoint token validation over NATS
//! (`kaa.v1.service.{instance}.ecap.ep-token-request`).
//!
//! Per target (every target that serves NATS) and round:
//! 1. `--ecap-endpoints` endpoints are registered through the batch API, each with its own
//!    token (given by the bench, so it knows every token without reading answers back);
//! 2. **activation**: each token is validated once, closed loop with `--ecap-window`
//!    requests in flight. A token's first validation moves it from `Inactive` to `Active`:
//!    a write (one store commit each), measured apart from the reads that follow;
//! 3. **load**: validations of random tokens of the set (now `Active`: reads) at
//!    `--ecap-rate` per second, open loop, for `--warmup` + `--duration` seconds. A
//!    dedicated sender thread sends on schedule whatever the replies (so a slow reply
//!    cannot delay the requests after it, and latency cannot hide behind it: coordinated
//!    omission); a thread because the runtime's timers tick in milliseconds, too coarse for
//!    a 0.2 ms period. Replies come back on one subscription (`{inbox}.*`; the request's
//!    slot number is the last subject token) and each latency is measured from the
//!    request's **scheduled** send time. Every reply is decoded and checked: status 200, the
//!    `correlationId` sent, and the `endpointId` the token belongs to.
//!
//! The bench encodes requests and decodes replies itself (the schemas are small and fixed;
//! see [`encode_request`]), so it checks the server's wire format independently and costs
//! little CPU per message. The target of issue 11: p99 ≤ 2 ms at 5,000 validations/s.

use crate::cpu::TICKS_PER_S;
use crate::outbox::{batch_conns, batch_register, write_batch};
use crate::{new_hist, sample_window, Args, Ctx, Phase, Round, Target};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request sent this long after its slot counts as a late send (the bench's own delay;
/// its latency, measured from the slot, includes it).
const LATE: Duration = Duration::from_millis(1);
/// Issue 11's target.
const TARGET_P99_MS: f64 = 2.0;
const TARGET_RATE: f64 = 5000.0;

#[derive(Serialize, Clone, Debug, Default)]
pub struct Activation {
    pub requests: u64,
    pub window: usize,
    pub seconds: f64,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Replies with status 200 and the token's endpoint.
    pub ok: u64,
    /// Other replies, by status (or `mismatch` for a wrong endpoint / correlationId).
    pub failed: BTreeMap<String, u64>,
    pub lost: u64,
    /// `GET /api/v1/endpoints/{id}/tokens` of the first endpoint afterwards shows its token
    /// `Active` (None: the check could not run).
    pub rest_shows_active: Option<bool>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Load {
    pub target_rate: f64,
    pub seconds: f64,
    /// Requests whose slot lies in the recorded window, and how many of them were sent.
    pub scheduled: u64,
    pub sent: u64,
    pub sent_per_s: f64,
    /// Recorded requests answered 200 with the right endpoint, per second.
    pub ok: u64,
    pub ok_per_s: f64,
    /// Latency from the scheduled send to the reply, recorded requests (all replies).
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The same from the actual send (what the server and the broker took).
    pub sent_p99_ms: f64,
    /// Recorded requests sent more than 1 ms after their slot, and the largest lag.
    pub late_sends: u64,
    pub max_send_lag_ms: f64,
    /// Replies that were not 200 with the token's endpoint, by status or `mismatch`.
    pub failed: BTreeMap<String, u64>,
    /// Recorded requests without a reply within --event-timeout after the window.
    pub lost: u64,
    pub duplicates: u64,
    /// Publishes the NATS client refused.
    pub publish_errors: u64,
    pub server_cpu_cores: Option<f64>,
    pub bench_cpu_cores: Option<f64>,
    pub nats_cpu_cores: Option<f64>,
    pub other_cpu_cores: Option<f64>,
    pub server: Option<crate::metrics::ServerStats>,
}

#[derive(Serialize, Clone, Debug)]
pub struct EcapResult {
    pub target: &'static str,
    pub round: usize,
    pub endpoints: u64,
    pub register_per_s: f64,
    pub activation: Activation,
    pub load: Load,
    /// No failed, lost or duplicate reply anywhere.
    pub ok: bool,
}

/// The tokens and endpoints of one target's round: endpoint `i` is `{ids}-{i}` with token
/// `{tokens}-{i:08}-bench-token`.
struct Set {
    ids: String,
    tokens: String,
    n: usize,
}

impl Set {
    fn token(&self, i: usize) -> String {
        format!("{}-{i:08}-bench-token", self.tokens)
    }

    /// Whether `endpoint` is endpoint `i`.
    fn is_endpoint(&self, endpoint: &str, i: usize) -> bool {
        endpoint
            .strip_prefix(self.ids.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.parse::<usize>().ok())
            == Some(i)
    }
}

/// The endpoint whose token slot `k` of the load validates (spread over the set).
fn pick(k: usize, n: usize) -> usize {
    let mut z = (k as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % n as u64) as usize
}

pub async fn run(
    t: &Target,
    nats_url: &str,
    ctx: &Arc<Ctx>,
    round: usize,
    args: &Args,
) -> Result<EcapResult> {
    let instance = t
        .nats_instance
        .clone()
        .ok_or_else(|| anyhow!("ecap: target {:?} serves no NATS", t.name))?;
    let n = args.ecap_endpoints;
    let set = Arc::new(Set {
        ids: format!("e-{}-{round}", ctx.run_id),
        tokens: format!("{}-{round}", ctx.run_id),
        n,
    });
    let label = if t.name.is_empty() {
        String::new()
    } else {
        format!(" [{}]", t.name)
    };
    eprintln!("ecap{label}: registering {n} endpoints with tokens");
    let body_set = set.clone();
    let version = ctx.app_version.clone();
    let w = batch_register(
        &t.addr,
        n,
        args.batch_size,
        batch_conns(args),
        Phase::Ecap,
        None,
        move |buf, lo, hi| {
            write_batch(buf, &version, lo, hi, |buf, i| {
                let _ = write!(
                    buf,
                    r#"{{"endpointId":"{}-{i}","endpointToken":"{}"}}"#,
                    body_set.ids,
                    body_set.token(i)
                );
            });
        },
    )
    .await?;
    if w.acked != n as u64 {
        bail!("ecap: only {} of {n} endpoints were accepted", w.acked);
    }
    let register_per_s = n as f64 / (w.last_ack - w.start).as_secs_f64();

    let client = async_nats::ConnectOptions::new()
        .name("epr-bench-ecap")
        .subscription_capacity(1 << 20)
        .connect(nats_url)
        .await
        .with_context(|| format!("connect to NATS at {nats_url}"))?;
    let subject = format!("kaa.v1.service.{instance}.ecap.ep-token-request");
    let mut activation = activate(&client, &subject, &set, ctx, args).await?;
    activation.rest_shows_active = rest_shows_active(t, &set).await;
    eprintln!(
        "ecap{label}: activated {} tokens in {:.1} s ({:.0}/s, p99 {:.2} ms)",
        activation.ok, activation.seconds, activation.per_s, activation.p99_ms
    );
    if let Some(pg) = &args.pg_url {
        // As before every PostgreSQL measurement: the activation's dirty pages are written
        // now, not during the load.
        crate::pgdb::checkpoint(pg).await?;
    }
    let load = load(&client, &subject, &set, ctx, t, args).await?;
    let ok = activation.failed.is_empty()
        && activation.lost == 0
        && load.failed.is_empty()
        && load.lost == 0
        && load.duplicates == 0
        && load.publish_errors == 0;
    let r = EcapResult {
        target: t.name,
        round,
        endpoints: n as u64,
        register_per_s,
        activation,
        load,
        ok,
    };
    println!("\n{HEADER}\n{}", fmt_row(&r));
    Ok(r)
}

/// The verdict on a reply message: a status message of the broker itself (e.g. 503 "no
/// responders": nothing serves the subject) or [`verdict`] on its payload.
fn message_verdict(msg: &async_nats::Message, set: &Set, i: usize, corr: &str) -> Option<String> {
    match msg.status {
        Some(s) => Some(format!(
            "NATS {s}{}",
            msg.description
                .as_deref()
                .map_or_else(String::new, |d| format!(" ({d})"))
        )),
        None => verdict(&msg.payload, set, i, corr),
    }
}

/// The reply's verdict: `None` when it is 200 with the expected endpoint and correlationId,
/// else the key it is counted under.
fn verdict(payload: &[u8], set: &Set, i: usize, corr: &str) -> Option<String> {
    match decode_response(payload) {
        None => Some("undecodable".into()),
        Some(r) if r.status != 200 => Some(format!(
            "{} {}",
            r.status,
            r.reason
                .unwrap_or_default()
                .chars()
                .take(60)
                .collect::<String>()
        )),
        Some(r) if r.correlation_id != corr => Some("mismatch".into()),
        Some(r) if !r.endpoint_id.is_some_and(|e| set.is_endpoint(e, i)) => Some("mismatch".into()),
        Some(_) => None,
    }
}

/// The slot number of a reply: the last token of its subject.
fn slot_of(subject: &str) -> Option<usize> {
    subject.rsplit('.').next()?.parse().ok()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The first validation of every token, `--ecap-window` in flight.
async fn activate(
    client: &async_nats::Client,
    subject: &str,
    set: &Set,
    ctx: &Ctx,
    args: &Args,
) -> Result<Activation> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(format!("{inbox}.*")).await?;
    client.flush().await?;
    let n = set.n;
    let corr = format!("act-{}-", ctx.run_id);
    let mut sent_at: Vec<Option<Instant>> = vec![None; n];
    let mut buf = Vec::with_capacity(160);
    let mut hist = new_hist();
    let mut a = Activation {
        window: args.ecap_window,
        ..Default::default()
    };
    let start = Instant::now();
    let mut last = start;
    let mut next = 0;
    let mut done = 0;
    let idle = Duration::from_secs_f64(args.event_timeout);
    macro_rules! send {
        () => {{
            buf.clear();
            encode_request(
                &mut buf,
                &format!("{corr}{next}"),
                now_ms(),
                0,
                &args.app_name,
                &set.token(next),
            );
            sent_at[next] = Some(Instant::now());
            client
                .publish_with_reply(
                    subject.to_owned(),
                    format!("{inbox}.{next}"),
                    Bytes::copy_from_slice(&buf),
                )
                .await?;
            next += 1;
        }};
    }
    while next < n.min(args.ecap_window) {
        send!();
    }
    let mut seen = vec![false; n];
    while done < n {
        let Ok(Some(msg)) = tokio::time::timeout(idle, sub.next()).await else {
            break;
        };
        let now = Instant::now();
        let Some(k) = slot_of(msg.subject.as_str()).filter(|&k| k < n && !seen[k]) else {
            *a.failed.entry("mismatch".into()).or_default() += 1;
            continue;
        };
        seen[k] = true;
        done += 1;
        last = now;
        if let Some(s) = sent_at[k] {
            hist.saturating_record((now - s).as_micros() as u64);
        }
        match message_verdict(&msg, set, k, &format!("{corr}{k}")) {
            None => a.ok += 1,
            Some(key) => *a.failed.entry(key).or_default() += 1,
        }
        if next < n {
            send!();
        }
    }
    let _ = sub.unsubscribe().await;
    a.requests = next as u64;
    a.lost = (next - done) as u64;
    a.seconds = (last - start).as_secs_f64();
    a.per_s = if a.seconds > 0.0 {
        done as f64 / a.seconds
    } else {
        0.0
    };
    a.p50_ms = hist.value_at_quantile(0.5) as f64 / 1000.0;
    a.p99_ms = hist.value_at_quantile(0.99) as f64 / 1000.0;
    a.max_ms = hist.max() as f64 / 1000.0;
    Ok(a)
}

/// Whether the REST API shows the first endpoint's token `Active` after its validation.
async fn rest_shows_active(t: &Target, set: &Set) -> Option<bool> {
    let path = format!("/api/v1/endpoints/{}-0/tokens", set.ids);
    let header = crate::selfreg::operator_header(t);
    let r = crate::client::Conn::new(&t.addr)
        .request_with_headers("GET", &path, None, &header)
        .await
        .ok()?;
    let active = r.status == 200 && String::from_utf8_lossy(&r.body).contains("\"Active\"");
    if !active {
        eprintln!(
            "ecap: GET {path} after activation: HTTP {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    Some(active)
}

/// The open-loop load: see the module documentation.
async fn load(
    client: &async_nats::Client,
    subject: &str,
    set: &Arc<Set>,
    ctx: &Ctx,
    t: &Target,
    args: &Args,
) -> Result<Load> {
    let rate = args.ecap_rate;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(format!("{inbox}.*")).await?;
    client.flush().await?;
    let total = (rate * (args.warmup + args.duration)).ceil() as usize;
    let t0 = Instant::now() + Duration::from_millis(50);
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let slot = move |k: usize| t0 + Duration::from_secs_f64(k as f64 / rate);
    let recorded = |k: usize| {
        let s = slot(k);
        s >= measure_from && s < end
    };
    // When each slot's request went out: ns after t0, plus 1 (0: not sent).
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let publish_errors = Arc::new(AtomicU64::new(0));
    let corr = format!("load-{}-", ctx.run_id);
    let sender = {
        let (client, subject, inbox, set) = (
            client.clone(),
            subject.to_owned(),
            inbox.clone(),
            set.clone(),
        );
        let (sent, stop, finished, errors) = (
            sent.clone(),
            stop.clone(),
            finished.clone(),
            publish_errors.clone(),
        );
        let (app, corr) = (args.app_name.clone(), corr.clone());
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("ecap-sender".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(160);
                for k in 0..total {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let s = slot(k);
                    let now = Instant::now();
                    if now < s {
                        std::thread::sleep(s - now);
                    }
                    buf.clear();
                    encode_request(
                        &mut buf,
                        &format!("{corr}{k}"),
                        now_ms(),
                        0,
                        &app,
                        &set.token(pick(k, set.n)),
                    );
                    let at = Instant::now().saturating_duration_since(t0).as_nanos() as u64;
                    sent[k].store(at + 1, Ordering::Release);
                    // Only a channel send to the client's connection task: no runtime
                    // driver needed, so a handle of the one-thread runtime will do.
                    let r = rt.block_on(client.publish_with_reply(
                        subject.clone(),
                        format!("{inbox}.{k}"),
                        Bytes::copy_from_slice(&buf),
                    ));
                    if r.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                finished.store(true, Ordering::Release);
            })?
    };
    let cpu = sample_window(&t.addr, t.pid(), args, measure_from, end);
    let (mut from_slot, mut from_send) = (new_hist(), new_hist());
    let mut l = Load {
        target_rate: rate,
        seconds: args.duration,
        ..Default::default()
    };
    let mut seen = vec![false; total];
    let mut replies = 0usize;
    let deadline = end + Duration::from_secs_f64(args.event_timeout);
    while replies < total {
        let msg = match tokio::time::timeout_at(deadline.into(), sub.next()).await {
            Ok(Some(m)) => m,
            _ => break,
        };
        let now = Instant::now();
        let Some(k) = slot_of(msg.subject.as_str()).filter(|&k| k < total) else {
            *l.failed.entry("mismatch".into()).or_default() += 1;
            continue;
        };
        if seen[k] {
            l.duplicates += 1;
            continue;
        }
        seen[k] = true;
        replies += 1;
        if !recorded(k) {
            continue;
        }
        from_slot.saturating_record(now.saturating_duration_since(slot(k)).as_micros() as u64);
        let at = sent[k].load(Ordering::Acquire);
        if at > 0 {
            let sent_at = t0 + Duration::from_nanos(at - 1);
            from_send.saturating_record(now.saturating_duration_since(sent_at).as_micros() as u64);
        }
        match message_verdict(&msg, set, pick(k, set.n), &format!("{corr}{k}")) {
            None => l.ok += 1,
            Some(key) => *l.failed.entry(key).or_default() += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let give_up = Instant::now() + Duration::from_secs(30);
    while !finished.load(Ordering::Acquire) {
        if Instant::now() > give_up {
            bail!("ecap: the sender thread did not finish: NATS client stuck?");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sender
        .join()
        .map_err(|_| anyhow!("ecap: the sender thread panicked"))?;
    let _ = sub.unsubscribe().await;
    let (cpu, server) = cpu.await?;
    let mut max_lag = Duration::ZERO;
    for k in (0..total).filter(|&k| recorded(k)) {
        l.scheduled += 1;
        let at = sent[k].load(Ordering::Acquire);
        if at == 0 {
            continue;
        }
        l.sent += 1;
        let lag = (t0 + Duration::from_nanos(at - 1)).saturating_duration_since(slot(k));
        l.late_sends += (lag > LATE) as u64;
        max_lag = max_lag.max(lag);
        l.lost += !seen[k] as u64;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let cores = |ticks: Option<u64>| ticks.map(|t| t as f64 / TICKS_PER_S / args.duration);
    l.sent_per_s = l.sent as f64 / args.duration;
    l.ok_per_s = l.ok as f64 / args.duration;
    l.p50_ms = ms(&from_slot, 0.5);
    l.p90_ms = ms(&from_slot, 0.9);
    l.p99_ms = ms(&from_slot, 0.99);
    l.p999_ms = ms(&from_slot, 0.999);
    l.max_ms = from_slot.max() as f64 / 1000.0;
    l.sent_p99_ms = ms(&from_send, 0.99);
    l.max_send_lag_ms = max_lag.as_secs_f64() * 1000.0;
    l.publish_errors = publish_errors.load(Ordering::Relaxed);
    l.server_cpu_cores = cores(cpu.server);
    l.bench_cpu_cores = cores(cpu.bench);
    l.nats_cpu_cores = cores(cpu.nats);
    l.other_cpu_cores = cores(cpu.other());
    l.server = server;
    Ok(l)
}

pub const HEADER: &str = "| target | round | endpoints | registered/s | activations/s | activation p50 / p99 / max ms | target rate | sent/s | ok/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | p99 ms from actual send | late sends (max lag ms) | failed | lost | CPU cores server / bench / NATS / other | check |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|";

pub fn fmt_row(r: &EcapResult) -> String {
    let (a, l) = (&r.activation, &r.load);
    let cores = |c: Option<f64>| c.map_or_else(|| "-".into(), |c| format!("{c:.2}"));
    let failed = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "0".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let act_failed = match (a.failed.is_empty(), a.lost) {
        (true, 0) => String::new(),
        _ => format!(" (failed {}, lost {})", failed(&a.failed), a.lost),
    };
    format!(
        "| {} | {} | {} | {:.0} | {:.0}{act_failed} | {:.2} / {:.2} / {:.2} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} ({:.2}) | {} | {} | {} / {} / {} / {} | {} |",
        if r.target.is_empty() { "-" } else { r.target },
        r.round,
        r.endpoints,
        r.register_per_s,
        a.per_s,
        a.p50_ms,
        a.p99_ms,
        a.max_ms,
        l.target_rate,
        l.sent_per_s,
        l.ok_per_s,
        l.p50_ms,
        l.p90_ms,
        l.p99_ms,
        l.p999_ms,
        l.max_ms,
        l.sent_p99_ms,
        l.late_sends,
        l.max_send_lag_ms,
        failed(&l.failed),
        l.lost,
        cores(l.server_cpu_cores),
        cores(l.bench_cpu_cores),
        cores(l.nats_cpu_cores),
        cores(l.other_cpu_cores),
        if r.ok { "ok" } else { "**FAILED**" },
    )
}

/// All rounds' rows and the verdict on issue 11's target per target.
pub fn print_summary(rounds: &[Round], args: &Args) {
    let rows: Vec<&EcapResult> = rounds.iter().flat_map(|r| &r.ecap).collect();
    if rows.is_empty() {
        return;
    }
    println!("\n16/ECAP token validation over NATS (activation closed loop, then open loop at {:.0}/s; latency from the scheduled send):\n", args.ecap_rate);
    println!("{HEADER}");
    for r in &rows {
        println!("{}", fmt_row(r));
    }
    println!();
    for r in &rows {
        let l = &r.load;
        let at_rate = l.target_rate >= TARGET_RATE && l.ok_per_s >= 0.99 * TARGET_RATE;
        let verdict = match (at_rate, l.p99_ms <= TARGET_P99_MS, r.ok) {
            (true, true, true) => "met",
            (false, _, _) => "not measured at ≥ 5,000/s",
            (true, false, _) => "missed",
            (true, true, false) => "latency met, but with failed or lost replies",
        };
        println!(
            "ecap{} round {}: p99 {:.3} ms at {:.0} ok/s; target p99 ≤ {TARGET_P99_MS} ms at {TARGET_RATE:.0}/s: **{verdict}**  ",
            if r.target.is_empty() { String::new() } else { format!(" [{}]", r.target) },
            r.round,
            l.p99_ms,
            l.ok_per_s,
        );
    }
}

// --- 16/ECAP wire format (Avro binary datums, fields in schema order) ---

fn put_long(buf: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_long(buf, s.len() as i64);
    buf.extend_from_slice(s.as_bytes());
}

/// `EndpointTokenValidationRequest {correlationId, timestamp, timeout, appName, token}`.
pub fn encode_request(
    buf: &mut Vec<u8>,
    correlation_id: &str,
    timestamp_ms: i64,
    timeout_ms: i64,
    app: &str,
    token: &str,
) {
    put_str(buf, correlation_id);
    put_long(buf, timestamp_ms);
    put_long(buf, timeout_ms);
    put_str(buf, app);
    put_str(buf, token);
}

/// A decoded `EndpointTokenValidationResponse`.
#[derive(Debug, PartialEq)]
pub struct Reply<'a> {
    pub correlation_id: &'a str,
    pub timestamp: i64,
    pub timeout: i64,
    pub token_id: Option<&'a str>,
    pub endpoint_id: Option<&'a str>,
    pub status: i32,
    pub reason: Option<&'a str>,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn long(&mut self) -> Option<i64> {
        let mut z: u64 = 0;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first()?;
            self.b = rest;
            z |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        None
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.long()?).ok()?;
        if len > self.b.len() {
            return None;
        }
        let (s, rest) = self.b.split_at(len);
        self.b = rest;
        std::str::from_utf8(s).ok()
    }

    /// A union of a string and null; `string_at` is the string's branch index.
    fn opt_str(&mut self, string_at: i64) -> Option<Option<&'a str>> {
        match self.long()? {
            i if i == string_at => Some(Some(self.str()?)),
            i if i == 1 - string_at => Some(None),
            _ => None,
        }
    }
}

/// `EndpointTokenValidationResponse {correlationId, timestamp, timeout, tokenId
/// ["string","null"], endpointId ["string","null"], statusCode, reasonPhrase
/// ["null","string"]}`; `None` unless `b` is exactly one such datum.
pub fn decode_response(b: &[u8]) -> Option<Reply<'_>> {
    let mut r = Reader { b };
    let reply = Reply {
        correlation_id: r.str()?,
        timestamp: r.long()?,
        timeout: r.long()?,
        token_id: r.opt_str(0)?,
        endpoint_id: r.opt_str(0)?,
        status: i32::try_from(r.long()?).ok()?,
        reason: r.opt_str(1)?,
    };
    r.b.is_empty().then_some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::types::Value;
    use apache_avro::writer::datum::GenericDatumWriter;
    use apache_avro::Schema;

    /// 16/ECAP's schemas, as published (the bench's codec is checked against them).
    const REQUEST_AVSC: &str = r#"{"namespace":"org.kaaproject.ipc.ecap.gen.v1","name":"EndpointTokenValidationRequest","type":"record","fields":[
        {"name":"correlationId","type":"string"},{"name":"timestamp","type":"long"},
        {"name":"timeout","type":"long","default":0},{"name":"appName","type":"string"},
        {"name":"token","type":"string"}]}"#;
    const RESPONSE_AVSC: &str = r#"{"namespace":"org.kaaproject.ipc.ecap.gen.v1","name":"EndpointTokenValidationResponse","type":"record","fields":[
        {"name":"correlationId","type":"string"},{"name":"timestamp","type":"long"},
        {"name":"timeout","type":"long","default":0},{"name":"tokenId","type":["string","null"]},
        {"name":"endpointId","type":["string","null"]},{"name":"statusCode","type":"int"},
        {"name":"reasonPhrase","type":["null","string"],"default":null}]}"#;

    #[test]
    fn request_decodes_with_the_schema() {
        let schema = Schema::parse_str(REQUEST_AVSC).unwrap();
        for (corr, ts, timeout, app, token) in [
            ("load-ab12-0", 1_765_000_000_000i64, 0i64, "bench", "tok"),
            ("", -1, 5000, "a", &"x".repeat(300)[..]),
        ] {
            let mut buf = Vec::new();
            encode_request(&mut buf, corr, ts, timeout, app, token);
            let reader = GenericDatumReader::builder(&schema).build().unwrap();
            let mut rest = buf.as_slice();
            let v = reader.read_value(&mut rest).unwrap();
            assert!(rest.is_empty());
            assert_eq!(
                v,
                Value::Record(vec![
                    ("correlationId".into(), Value::String(corr.into())),
                    ("timestamp".into(), Value::Long(ts)),
                    ("timeout".into(), Value::Long(timeout)),
                    ("appName".into(), Value::String(app.into())),
                    ("token".into(), Value::String(token.into())),
                ])
            );
        }
    }

    #[test]
    fn response_encoded_with_the_schema_decodes() {
        let schema = Schema::parse_str(RESPONSE_AVSC).unwrap();
        let s = |v: &str| Value::String(v.into());
        let u = |i: u32, v: Value| Value::Union(i, Box::new(v));
        for (token_id, endpoint_id, status, reason) in [
            (Some("t-1"), Some("e-1"), 200, None),
            (None, None, 404, Some("unknown token")),
            (
                Some("t-2"),
                Some("e-2"),
                403,
                Some("the token is Suspended"),
            ),
        ] {
            let opt = |v: Option<&str>| match v {
                Some(v) => u(0, s(v)),
                None => u(1, Value::Null),
            };
            let record = Value::Record(vec![
                ("correlationId".into(), s("c-7")),
                ("timestamp".into(), Value::Long(1_765_000_000_123)),
                ("timeout".into(), Value::Long(0)),
                ("tokenId".into(), opt(token_id)),
                ("endpointId".into(), opt(endpoint_id)),
                ("statusCode".into(), Value::Int(status)),
                (
                    "reasonPhrase".into(),
                    match reason {
                        Some(r) => u(1, s(r)),
                        None => u(0, Value::Null),
                    },
                ),
            ]);
            let writer = GenericDatumWriter::builder(&schema).build().unwrap();
            let bytes = writer.write_value_to_vec(record).unwrap();
            let r = decode_response(&bytes).unwrap();
            assert_eq!(
                r,
                Reply {
                    correlation_id: "c-7",
                    timestamp: 1_765_000_000_123,
                    timeout: 0,
                    token_id,
                    endpoint_id,
                    status,
                    reason,
                }
            );
            // Truncated or padded: not one datum.
            assert!(decode_response(&bytes[..bytes.len() - 1]).is_none());
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode_response(&longer).is_none());
        }
    }

    /// The shared test NATS server (as the server's tests find it).
    fn nats_url() -> String {
        std::env::var("EPR_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into())
    }

    /// A stand-in 16/ECAP provider: answers 200 with the token's endpoint, except 403 for
    /// endpoints `i % 50 == 7` and no answer at all for `i % 50 == 9`.
    async fn fake_provider(url: &str, subject: String, set: Arc<Set>) -> async_nats::Client {
        let client = async_nats::connect(url)
            .await
            .unwrap_or_else(|e| panic!("no NATS at {url} ({e}); start scripts/services-up.sh"));
        let mut sub = client.subscribe(subject).await.unwrap();
        client.flush().await.unwrap();
        let c = client.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let mut r = Reader { b: &msg.payload };
                let corr = r.str().unwrap().to_owned();
                let (_ts, _timeout) = (r.long().unwrap(), r.long().unwrap());
                assert_eq!(r.str().unwrap(), "bench");
                let token = r.str().unwrap();
                let i: usize = token
                    .strip_prefix(&format!("{}-", set.tokens))
                    .and_then(|t| t.strip_suffix("-bench-token"))
                    .unwrap()
                    .parse()
                    .unwrap();
                if i % 50 == 9 {
                    continue;
                }
                let mut b = Vec::new();
                put_str(&mut b, &corr);
                put_long(&mut b, now_ms());
                put_long(&mut b, 0);
                put_long(&mut b, 0);
                put_str(&mut b, &format!("tid-{i}"));
                put_long(&mut b, 0);
                put_str(&mut b, &format!("{}-{i}", set.ids));
                put_long(&mut b, if i % 50 == 7 { 403 } else { 200 });
                put_long(&mut b, 0);
                c.publish(msg.reply.unwrap(), b.into()).await.unwrap();
            }
        });
        client
    }

    /// Activation and the open-loop load against the stand-in provider over a real
    /// nats-server: every request is answered, checked and counted where it belongs.
    #[tokio::test]
    async fn activation_and_load_count_every_reply() {
        let url = nats_url();
        let args = <crate::Args as clap::Parser>::parse_from([
            "epr-bench",
            "--url",
            "http://127.0.0.1:1",
            "--warmup",
            "0.2",
            "-d",
            "0.6",
            "--ecap-rate",
            "1000",
            "--ecap-window",
            "8",
            "--event-timeout",
            "0.5",
        ]);
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let ctx = Ctx::new(
            run.clone(),
            "bench-v1".into(),
            crate::RegMetadata::Basic,
            "bench",
        );
        let set = Arc::new(Set {
            ids: format!("e-{run}-1"),
            tokens: format!("{run}-1"),
            n: 200,
        });
        let subject = format!("kaa.v1.service.test{run}.ecap.ep-token-request");
        let _provider = fake_provider(&url, subject.clone(), set.clone()).await;
        let client = async_nats::connect(&url).await.unwrap();

        let a = activate(&client, &subject, &set, &ctx, &args)
            .await
            .unwrap();
        assert_eq!(a.requests, 200);
        assert_eq!(a.lost, 4, "{a:?}");
        assert_eq!(a.ok, 192, "{a:?}");
        assert_eq!(a.failed.values().sum::<u64>(), 4, "{a:?}");
        assert!(a.failed.keys().all(|k| k.starts_with("403")), "{a:?}");

        let t = Target {
            name: "",
            addr: "127.0.0.1:1".into(),
            server: None,
            pid: None,
            events: None,
            workers: Vec::new(),
            replicas: Vec::new(),
            nats_instance: Some(format!("test{run}")),
        };
        let l = load(&client, &subject, &set, &ctx, &t, &args)
            .await
            .unwrap();
        // Slots 200..800 of 1000/s lie in the window (0.2 s warm-up, 0.6 s measured).
        let recorded: Vec<usize> = (200..800).map(|k| pick(k, set.n)).collect();
        let refused = recorded.iter().filter(|&&i| i % 50 == 7).count() as u64;
        let silent = recorded.iter().filter(|&&i| i % 50 == 9).count() as u64;
        assert_eq!(l.scheduled, 600, "{l:?}");
        assert_eq!(l.sent, 600, "{l:?}");
        assert_eq!(l.lost, silent, "{l:?}");
        assert_eq!(l.failed.values().sum::<u64>(), refused, "{l:?}");
        assert_eq!(l.ok, 600 - refused - silent, "{l:?}");
        assert_eq!((l.duplicates, l.publish_errors), (0, 0));
        assert!(
            l.p50_ms > 0.0 && l.p50_ms <= l.p99_ms && l.p99_ms <= l.max_ms,
            "{l:?}"
        );
    }

    #[test]
    fn verdicts() {
        let set = Set {
            ids: "e-ab-1".into(),
            tokens: "ab-1".into(),
            n: 10,
        };
        let reply = |corr: &str, endpoint: Option<&str>, status: i64| {
            let mut b = Vec::new();
            put_str(&mut b, corr);
            put_long(&mut b, 1);
            put_long(&mut b, 0);
            put_long(&mut b, 0);
            put_str(&mut b, "tok-id");
            match endpoint {
                Some(e) => {
                    put_long(&mut b, 0);
                    put_str(&mut b, e);
                }
                None => put_long(&mut b, 1),
            }
            put_long(&mut b, status);
            put_long(&mut b, 0);
            b
        };
        assert_eq!(
            verdict(&reply("c3", Some("e-ab-1-3"), 200), &set, 3, "c3"),
            None
        );
        assert_eq!(
            verdict(&reply("c3", Some("e-ab-1-4"), 200), &set, 3, "c3").as_deref(),
            Some("mismatch")
        );
        assert_eq!(
            verdict(&reply("c4", Some("e-ab-1-3"), 200), &set, 3, "c3").as_deref(),
            Some("mismatch")
        );
        assert_eq!(
            verdict(&reply("c3", None, 404), &set, 3, "c3").as_deref(),
            Some("404 ")
        );
        assert_eq!(
            verdict(b"\x01", &set, 3, "c3").as_deref(),
            Some("undecodable")
        );
        assert_eq!(slot_of("_INBOX.abc.17"), Some(17));
        assert_eq!(slot_of("_INBOX.abc.x"), None);
        // The picks spread over the whole set.
        let mut hit = [false; 10];
        (0..1000).for_each(|k| hit[pick(k, 10)] = true);
        assert!(hit.iter().all(|&h| h));
    }
}
