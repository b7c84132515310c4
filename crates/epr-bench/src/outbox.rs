//! Phases that measure the transactional outbox → NATS path of the events-on server:
//!
//! - `latency`: open-loop registrations at `--rate`; for each write, the time from its
//!   HTTP 201 reaching the bench to its `registered` event reaching the bench's subscriber.
//! - `drain`: how fast the relay moves events from the outbox to NATS, measured twice:
//!   *live* (batch registrations while the relay runs) and *backlog* (a server whose NATS
//!   is unreachable takes the registrations, is killed, and restarts with NATS reachable:
//!   the relay then empties a full outbox with no HTTP load at all).

use crate::client::Conn;
use crate::events::{Counts, Events, LatencyTracker};
use crate::{
    free_addr, max_outbox_depth, new_hist, report_error, sample_window, signed_ms, spawn_server_in,
    wait_healthy, Args, Ctx, EventsMode, Phase, Worker, TICKS_PER_S,
};
use anyhow::{anyhow, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A write sent this long after its slot counts as late: its connection was still busy
/// with the previous write, or the client thread was saturated (the timer itself has
/// 1 ms granularity).
pub(crate) const LATE: Duration = Duration::from_millis(5);

#[derive(Serialize, Clone)]
pub struct LatencyResult {
    pub round: usize,
    /// "on" (events measured), "off" (the same load on the events-off server: HTTP and
    /// store figures only) or "" (the only server).
    pub target: &'static str,
    pub target_rate: f64,
    pub connections: usize,
    pub seconds: f64,
    /// Successful writes scheduled inside the recorded window.
    pub writes: u64,
    pub errors: u64,
    pub achieved_rate: f64,
    /// Recorded writes sent more than 5 ms after their slot.
    pub late_sends: u64,
    /// HTTP latency from each write's slot (not its actual send) to its response.
    pub http_p50_ms: f64,
    pub http_p99_ms: f64,
    /// Recorded writes whose event arrived.
    pub matched: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Recorded writes whose event arrived before their response (counted as 0 ms).
    pub event_first: u64,
    pub event_first_max_ms: f64,
    /// Recorded writes whose event did not arrive within --event-timeout.
    pub lost: u64,
    /// Events whose correlationId was not the write's X-Request-Id.
    pub correlation_mismatches: u64,
    /// Events that matched no write (duplicates).
    pub unmatched_events: u64,
    /// All successful writes of the phase (warm-up included) and the `registered` events
    /// received for them.
    pub writes_acked_total: u64,
    pub registered_events: u64,
    pub max_outbox_depth: Option<u64>,
    /// CPU in cores during the recorded window: the server (when spawned), the bench,
    /// nats-server (with --nats-pid) and the rest of the machine.
    pub server_cpu_cores: Option<f64>,
    pub bench_cpu_cores: Option<f64>,
    pub nats_cpu_cores: Option<f64>,
    pub other_cpu_cores: Option<f64>,
    /// The server's own metrics over the window (store commits, relay).
    pub server: Option<crate::metrics::ServerStats>,
    pub ok: bool,
}

pub const LATENCY_HEADER: &str = "| round | events | target writes/s | achieved writes/s | errors | late sends | HTTP p50 / p99 ms | events matched | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | event before response (max lead ms) | lost | correlationId mismatches | CPU cores server / bench / NATS / other | check |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|";

pub fn fmt_latency_row(r: &LatencyResult) -> String {
    if r.target == "off" {
        return format!(
            "| {} | off | {:.0} | {:.0} | {} | {} | {:.2} / {:.2} | - | - | - | - | - | - | - | - | - | {} / {} / {} / {} | {} |",
            r.round,
            r.target_rate,
            r.achieved_rate,
            r.errors,
            r.late_sends,
            r.http_p50_ms,
            r.http_p99_ms,
            cores(r.server_cpu_cores),
            cores(r.bench_cpu_cores),
            cores(r.nats_cpu_cores),
            cores(r.other_cpu_cores),
            if r.ok { "ok" } else { "**ERRORS**" }
        );
    }
    format!(
        "| {} | {} | {:.0} | {:.0} | {} | {} | {:.2} / {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} ({:.2}) | {} | {} | {} / {} / {} / {} | {} |",
        r.round,
        if r.target.is_empty() { "on" } else { r.target },
        r.target_rate,
        r.achieved_rate,
        r.errors,
        r.late_sends,
        r.http_p50_ms,
        r.http_p99_ms,
        r.matched,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms,
        r.event_first,
        r.event_first_max_ms,
        r.lost,
        r.correlation_mismatches,
        cores(r.server_cpu_cores),
        cores(r.bench_cpu_cores),
        cores(r.nats_cpu_cores),
        cores(r.other_cpu_cores),
        if r.ok { "ok" } else { "**MISMATCH**" }
    )
}

fn cores(c: Option<f64>) -> String {
    c.map_or_else(|| "-".into(), |c| format!("{c:.2}"))
}

struct OpenOut {
    http: Histogram<u64>,
    writes: u64,
    errors: u64,
    late: u64,
    acked: u64,
}

/// One connection's share of the open-loop load: a write every `period` from `first`
/// until `end`. A write whose slot passed while the previous one was in flight goes out
/// at once (the schedule is kept, so the total rate holds while the server keeps up).
async fn open_loop_task(
    mut w: Worker,
    ctx: Arc<Ctx>,
    ev: Option<Arc<Events>>,
    first: Instant,
    period: Duration,
    measure_from: Instant,
    end: Instant,
) -> (Worker, OpenOut) {
    let mut out = OpenOut {
        http: new_hist(),
        writes: 0,
        errors: 0,
        late: 0,
        acked: 0,
    };
    let mut header = String::with_capacity(96);
    for k in 0u32.. {
        let slot = first + period * k;
        if slot >= end {
            break;
        }
        tokio::time::sleep_until(slot.into()).await;
        let sent = Instant::now();
        let recorded = slot >= measure_from;
        w.seq += 1;
        let id = format!("l-{}-{}-{}", ctx.run_id, w.idx, w.seq);
        w.body.clear();
        header.clear();
        // Without metadata: exactly one event (`registered`) per write.
        let _ = write!(
            w.body,
            r#"{{"endpointId":"{id}","appVersion":{{"name":"{}"}}}}"#,
            ctx.app_version
        );
        let _ = write!(header, "X-Request-Id: {id}\r\n");
        let res = w
            .conn
            .request_with_headers(
                "POST",
                "/api/v1/endpoints",
                Some(w.body.as_bytes()),
                &header,
            )
            .await;
        let done = Instant::now();
        match res {
            Ok(r) if r.status == 201 => {
                out.acked += 1;
                if let Some(ev) = &ev {
                    ev.with_tracker(|t| t.on_response(id.clone(), done, recorded));
                }
                if recorded {
                    out.writes += 1;
                    out.http.saturating_record((done - slot).as_micros() as u64);
                    out.late += (sent - slot > LATE) as u64;
                }
                w.ids.push(id);
            }
            Ok(r) => {
                out.errors += recorded as u64;
                report_error(Phase::Latency, || {
                    format!("HTTP {} {}", r.status, String::from_utf8_lossy(&r.body))
                });
            }
            Err(e) => {
                out.errors += recorded as u64;
                report_error(Phase::Latency, || format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (w, out)
}

/// The `latency` phase against the server at `addr`: with `ev` (the events-on server)
/// write → event latency is measured; without, only the HTTP side and the store.
#[allow(clippy::too_many_arguments)]
pub async fn latency(
    workers: Vec<Worker>,
    ctx: &Arc<Ctx>,
    ev: Option<&Arc<Events>>,
    target: &'static str,
    addr: &str,
    server_pid: Option<u32>,
    round: usize,
    args: &Args,
) -> Result<(Vec<Worker>, LatencyResult)> {
    let before = ev.map(|e| e.counts()).unwrap_or_default();
    if let Some(ev) = ev {
        ev.arm();
    }
    let n = workers.len();
    let period = Duration::from_secs_f64(n as f64 / args.rate);
    let t0 = Instant::now() + Duration::from_millis(20);
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let depth = tokio::spawn(max_outbox_depth(addr.to_owned(), end));
    let cpu = sample_window(addr, server_pid, args, measure_from, end);
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| {
            // Connections' slots interleave evenly: connection i starts i/rate late.
            let first = t0 + Duration::from_secs_f64(w.idx as f64 / args.rate);
            tokio::spawn(open_loop_task(
                w,
                ctx.clone(),
                ev.cloned(),
                first,
                period,
                measure_from,
                end,
            ))
        })
        .collect();
    let mut http = new_hist();
    let (mut writes, mut errors, mut late, mut acked) = (0, 0, 0, 0);
    let mut back = Vec::with_capacity(n);
    for h in handles {
        let (w, out) = tokio::time::timeout_at((end + Duration::from_secs(30)).into(), h)
            .await
            .map_err(|_| anyhow!("latency phase did not finish: server stuck?"))??;
        http.add(&out.http)?;
        writes += out.writes;
        errors += out.errors;
        late += out.late;
        acked += out.acked;
        back.push(w);
    }
    let (t, got) = match ev {
        Some(ev) => {
            // Wait for the outstanding events: recorded ones matched, every write's in.
            let deadline = Instant::now() + Duration::from_secs_f64(args.event_timeout);
            while Instant::now() < deadline {
                let awaiting = ev.with_tracker(|t| t.awaiting).unwrap_or(0);
                if awaiting == 0 && ev.counts().since(&before).registered >= acked {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let t = ev
                .disarm()
                .ok_or_else(|| anyhow!("latency tracker vanished"))?;
            (t, ev.counts().since(&before))
        }
        None => (LatencyTracker::new(), Counts::default()),
    };
    let max_outbox_depth = depth.await?;
    let (cpu, server) = cpu.await?;
    let c = |ticks: Option<u64>| ticks.map(|t| t as f64 / TICKS_PER_S / args.duration);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let unmatched = t.unmatched_events();
    let r = LatencyResult {
        round,
        target,
        target_rate: args.rate,
        connections: n,
        seconds: args.duration,
        writes,
        errors,
        achieved_rate: writes as f64 / args.duration,
        late_sends: late,
        http_p50_ms: ms(&http, 0.5),
        http_p99_ms: ms(&http, 0.99),
        matched: t.hist.len(),
        p50_ms: ms(&t.hist, 0.5),
        p90_ms: ms(&t.hist, 0.9),
        p99_ms: ms(&t.hist, 0.99),
        p999_ms: ms(&t.hist, 0.999),
        max_ms: t.hist.max() as f64 / 1000.0,
        event_first: t.early,
        event_first_max_ms: t.early_max_us as f64 / 1000.0,
        lost: t.awaiting,
        correlation_mismatches: t.corr_mismatch,
        unmatched_events: unmatched,
        writes_acked_total: acked,
        registered_events: got.registered,
        max_outbox_depth,
        server_cpu_cores: c(cpu.server),
        bench_cpu_cores: c(cpu.bench),
        nats_cpu_cores: c(cpu.nats),
        other_cpu_cores: c(cpu.other()),
        server,
        ok: if ev.is_some() {
            t.awaiting == 0
                && t.corr_mismatch == 0
                && unmatched == 0
                && got.registered == acked
                && got.metadata == 0
                && got.other == 0
        } else {
            errors == 0
        },
    };
    if !r.ok && ev.is_some() {
        eprintln!(
            "EVENTS MISMATCH (latency round {round}): {acked} writes acked, {} registered \
             events ({} metadata, {} other); {} lost, {} correlationId mismatches, {} unmatched",
            got.registered, got.metadata, got.other, r.lost, r.correlation_mismatches, unmatched
        );
    }
    Ok((back, r))
}

#[derive(Serialize, Clone)]
pub struct DrainResult {
    pub round: usize,
    /// `live` (relay running during the writes) or `backlog` (full outbox at start).
    pub kind: &'static str,
    /// Endpoints acknowledged (202) through the batch API.
    pub endpoints: u64,
    pub batch_size: usize,
    pub connections: usize,
    /// First batch request → last 202, and the write rate over it.
    pub write_s: f64,
    pub write_rate: f64,
    /// `registered` events received.
    pub events: u64,
    /// First event after the first batch request (live) or after the restart (backlog).
    pub first_event_ms: f64,
    /// Last event after the last 202 (live only; negative: before it).
    pub tail_ms: Option<f64>,
    /// Events/s from the first to the last event: the relay's rate.
    pub relay_rate: f64,
    /// Live: events/s from the first request to the last event (write + drain).
    pub overall_rate: Option<f64>,
    /// Live: events still to come at the last 202, and their rate after it.
    pub backlog_at_last_ack: Option<u64>,
    pub post_ack_rate: Option<f64>,
    pub ok: bool,
}

pub const DRAIN_HEADER: &str = "| round | kind | endpoints | write s | writes/s | events | first event ms | tail ms (last event − last 202) | events left at last 202 | events/s after last 202 | relay events/s (first → last event) | overall events/s | check |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|";

pub fn fmt_drain_row(r: &DrainResult) -> String {
    let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"));
    format!(
        "| {} | {} | {} | {:.2} | {:.0} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} |",
        r.round,
        r.kind,
        r.endpoints,
        r.write_s,
        r.write_rate,
        r.events,
        r.first_event_ms,
        opt(r.tail_ms, 0),
        r.backlog_at_last_ack
            .map_or_else(|| "-".into(), |v| v.to_string()),
        opt(r.post_ack_rate, 0),
        r.relay_rate,
        opt(r.overall_rate, 0),
        if r.ok { "ok" } else { "**MISMATCH**" }
    )
}

/// What [`batch_register`] did.
pub(crate) struct Written {
    pub acked: u64,
    pub start: Instant,
    pub last_ack: Instant,
    /// `registered` events received when the last 202 arrived (0 without a subscriber).
    pub events_at_last_ack: u64,
}

/// Registers `n` endpoints through `POST /api/v1/endpoints/batch`, `batch` per request,
/// over `conns` connections in closed loop. `body(buf, lo, hi)` writes the request body
/// for endpoints `lo..hi` (the whole JSON object, app version included).
pub(crate) async fn batch_register(
    addr: &str,
    n: usize,
    batch: usize,
    conns: usize,
    phase: Phase,
    ev: Option<&Arc<Events>>,
    body: impl Fn(&mut String, usize, usize) + Send + Sync + 'static,
) -> Result<Written> {
    let batches = n.div_ceil(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let body = Arc::new(body);
    let start = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let (next, ev, body) = (next.clone(), ev.cloned(), body.clone());
            let mut conn = Conn::new(addr);
            tokio::spawn(async move {
                let mut buf = String::with_capacity(batch * 40 + 64);
                let (mut acked, mut last) = (0u64, None);
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        break;
                    }
                    let (lo, hi) = (b * batch, ((b + 1) * batch).min(n));
                    buf.clear();
                    body(&mut buf, lo, hi);
                    let req = conn.request("POST", "/api/v1/endpoints/batch", Some(buf.as_bytes()));
                    // A stuck server must not hang the bench; a healthy one commits a
                    // batch in well under a second.
                    match tokio::time::timeout(Duration::from_secs(120), req).await {
                        Ok(Ok(r)) if r.status == 202 => {
                            acked += (hi - lo) as u64;
                            let events = ev.as_ref().map_or(0, |e| e.counts().registered);
                            last = Some((Instant::now(), events));
                        }
                        Ok(Ok(r)) => report_error(phase, || {
                            format!("HTTP {} {}", r.status, String::from_utf8_lossy(&r.body))
                        }),
                        Ok(Err(e)) => report_error(phase, || format!("{e:#}")),
                        Err(_) => {
                            return Err(anyhow!("batch registration did not finish: server stuck?"))
                        }
                    }
                }
                Ok((acked, last))
            })
        })
        .collect();
    let (mut acked, mut last): (u64, Option<(Instant, u64)>) = (0, None);
    for h in handles {
        let (a, l) = h.await??;
        acked += a;
        if l.is_some_and(|l| last.is_none_or(|m| l.0 > m.0)) {
            last = l;
        }
    }
    let (last_ack, events_at_last_ack) = last.ok_or_else(|| anyhow!("no batch was accepted"))?;
    Ok(Written {
        acked,
        start,
        last_ack,
        events_at_last_ack,
    })
}

/// Writes one batch registration body: `{"appVersion":{"name":version},"endpoints":[..]}`
/// with `endpoint(buf, i)` writing the object of each endpoint `i` in `lo..hi`.
pub(crate) fn write_batch(
    buf: &mut String,
    version: &str,
    lo: usize,
    hi: usize,
    mut endpoint: impl FnMut(&mut String, usize),
) {
    let _ = write!(
        buf,
        r#"{{"appVersion":{{"name":"{version}"}},"endpoints":["#
    );
    for i in lo..hi {
        if i > lo {
            buf.push(',');
        }
        endpoint(buf, i);
    }
    buf.push_str("]}");
}

/// Batch registrations without metadata (one `registered` event each), IDs `{prefix}-{i}`.
fn bare_batches(
    app_version: String,
    prefix: String,
) -> impl Fn(&mut String, usize, usize) + Send + Sync + 'static {
    move |buf, lo, hi| {
        write_batch(buf, &app_version, lo, hi, |buf, i| {
            let _ = write!(buf, r#"{{"endpointId":"{prefix}-{i}"}}"#);
        });
    }
}

pub(crate) fn batch_conns(args: &Args) -> usize {
    args.connections.clamp(1, 4)
}

/// Drain with the relay running: batch registrations to the events-on server while the
/// subscriber counts. Batches reach the outbox faster than single registrations, so the
/// relay, not the HTTP front-end, sets the pace once a backlog forms.
pub async fn drain_live(
    ctx: &Ctx,
    ev: &Arc<Events>,
    addr: &str,
    round: usize,
    args: &Args,
) -> Result<DrainResult> {
    let before = ev.counts();
    ev.reset_first();
    let conns = batch_conns(args);
    let prefix = format!("d-{}-live{round}", ctx.run_id);
    let w = batch_register(
        addr,
        args.drain_endpoints,
        args.batch_size,
        conns,
        Phase::Drain,
        Some(ev),
        bare_batches(ctx.app_version.clone(), prefix),
    )
    .await?;
    let idle = Duration::from_secs_f64(args.event_timeout);
    ev.wait_for(idle, |c| c.since(&before).registered >= w.acked)
        .await;
    let got = ev.counts().since(&before);
    let (first, last) = (ev.first_arrival(), ev.last_arrival());
    let write_s = (w.last_ack - w.start).as_secs_f64();
    let mut r = DrainResult {
        round,
        kind: "live",
        endpoints: w.acked,
        batch_size: args.batch_size,
        connections: conns,
        write_s,
        write_rate: w.acked as f64 / write_s,
        events: got.registered,
        first_event_ms: first.map_or(f64::NAN, |f| signed_ms(f, w.start)),
        tail_ms: None,
        relay_rate: 0.0,
        overall_rate: None,
        backlog_at_last_ack: None,
        post_ack_rate: None,
        ok: got.registered == w.acked && got.metadata == 0 && got.other == 0,
    };
    if let (Some(first), Some(last)) = (first, last) {
        r.relay_rate = rate(got.registered.saturating_sub(1), last, first);
        r.overall_rate = Some(rate(got.registered, last, w.start));
        r.tail_ms = Some(signed_ms(last, w.last_ack));
        let at_ack = w.events_at_last_ack - before.registered;
        let left = got.registered.saturating_sub(at_ack);
        r.backlog_at_last_ack = Some(left);
        if last > w.last_ack && left > 0 {
            r.post_ack_rate = Some(rate(left, last, w.last_ack));
        }
    }
    report_mismatch(&r, &got);
    Ok(r)
}

/// Drain of a full outbox: a server whose NATS URL leads nowhere takes
/// `--drain-endpoints` registrations (so they all wait in its outbox), is killed, and
/// starts again on the same data with the real NATS URL. The rate from its first to its
/// last event is the relay's alone: no HTTP load, one outbox read and one delete commit
/// per batch of 1024.
pub async fn drain_backlog(
    bin: &Path,
    nats_url: &str,
    instance: &str,
    ctx: &Ctx,
    ev: &Arc<Events>,
    round: usize,
    args: &Args,
) -> Result<DrainResult> {
    let dir = tempfile::TempDir::new()?;
    let dead = format!("nats://{}", free_addr()?);
    let (mut first_run, addr) = spawn_server_in(
        bin,
        dir.path(),
        EventsMode::Nats {
            url: &dead,
            instance,
        },
    )?;
    wait_healthy(&addr, Some(&mut first_run)).await?;
    let conns = batch_conns(args);
    let prefix = format!("d-{}-backlog{round}", ctx.run_id);
    let before_writes = ev.counts();
    let w = batch_register(
        &addr,
        args.drain_endpoints,
        args.batch_size,
        conns,
        Phase::Drain,
        Some(ev),
        bare_batches(ctx.app_version.clone(), prefix),
    )
    .await?;
    let write_s = (w.last_ack - w.start).as_secs_f64();
    // SIGKILL: every 202 followed a durable commit, so the outbox holds all the events.
    drop(first_run);
    let leaked = ev.counts().since(&before_writes).total();
    let before = ev.counts();
    ev.reset_first();
    let restart = Instant::now();
    let (mut second_run, addr) = spawn_server_in(
        bin,
        dir.path(),
        EventsMode::Nats {
            url: nats_url,
            instance,
        },
    )?;
    wait_healthy(&addr, Some(&mut second_run)).await?;
    let idle = Duration::from_secs_f64(args.event_timeout.max(15.0));
    ev.wait_for(idle, |c| c.since(&before).registered >= w.acked)
        .await;
    let got = ev.counts().since(&before);
    let (first, last) = (ev.first_arrival(), ev.last_arrival());
    drop(second_run);
    let mut r = DrainResult {
        round,
        kind: "backlog",
        endpoints: w.acked,
        batch_size: args.batch_size,
        connections: conns,
        write_s,
        write_rate: w.acked as f64 / write_s,
        events: got.registered,
        first_event_ms: first.map_or(f64::NAN, |f| signed_ms(f, restart)),
        tail_ms: None,
        relay_rate: 0.0,
        overall_rate: None,
        backlog_at_last_ack: Some(w.acked),
        post_ack_rate: None,
        ok: leaked == 0 && got.registered == w.acked && got.metadata == 0 && got.other == 0,
    };
    if let (Some(first), Some(last)) = (first, last) {
        r.relay_rate = rate(got.registered.saturating_sub(1), last, first);
    }
    if leaked > 0 {
        eprintln!(
            "EVENTS MISMATCH (drain backlog): {leaked} events published with NATS unreachable?"
        );
    }
    report_mismatch(&r, &got);
    Ok(r)
}

fn rate(n: u64, to: Instant, from: Instant) -> f64 {
    let s = to.saturating_duration_since(from).as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

fn report_mismatch(r: &DrainResult, got: &crate::events::Counts) {
    if !r.ok {
        eprintln!(
            "EVENTS MISMATCH (drain {} round {}): {} endpoints acked, {} registered events \
             ({} metadata, {} other)",
            r.kind, r.round, r.endpoints, got.registered, got.metadata, got.other
        );
    }
}
