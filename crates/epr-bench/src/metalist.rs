//! The `metalist` phase (issue 13): listing by a metadata value.
//!
//! Once per run, application `meta` gets `--meta-endpoints` endpoints through the batch API,
//! with the issue's key mix ([`crate::keymix::write_md`]): `city` (a string, 40 values), `level` (an
//! integer 0–49), `kind` (a string, 7 values), `on` (a boolean) and `fw` (a version string,
//! 13 values). Each round then walks `city=c3` with cursors once (checking that the pages
//! hold exactly the endpoints the bench knows match, and `totalElements`), and measures
//! `GET /api/v1/endpoints?applicationName=meta&metadataFilter=city=cN&limit=100` pages,
//! closed loop, with one connection and with `--connections`:
//! - `first`: the first page of a random city (1 in 40 of the endpoints match);
//! - `offset`: a random page of `city=c3` by `offset`;
//! - `cursor`: a random page of `city=c3` by `cursor` (collected by the walk).

use crate::client::Conn;
use crate::cpu::{CpuSnap, TICKS_PER_S};
use crate::keymix::{city, write_md};
use crate::outbox::{batch_conns, batch_register, write_batch};
use crate::{new_hist, report_error, xorshift, Args, Phase, Target};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The application of this phase (added to a spawned server's config).
pub const APP: (&str, &[&str]) = ("meta", &["meta-v1"]);
const PAGE: u64 = 100;

#[derive(Serialize, Clone, Debug)]
pub struct ListRow {
    /// The target's name ("" for the only server).
    pub target: &'static str,
    pub round: usize,
    pub endpoints: u64,
    pub pages: &'static str,
    pub connections: usize,
    pub requests: u64,
    pub pages_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub server_cpu_cores: Option<f64>,
    pub other_cpu_cores: Option<f64>,
}

#[derive(Serialize, Clone, Debug)]
pub struct LoadRow {
    pub endpoints: u64,
    pub seconds: f64,
    pub endpoints_per_s: f64,
}

#[derive(Serialize, Default)]
pub struct MetaOut {
    pub load: Option<LoadRow>,
    pub walk_ms: Vec<f64>,
    pub rows: Vec<ListRow>,
}

/// State across rounds: the endpoints are loaded once.
#[derive(Default)]
pub struct MetaBench {
    loaded: Option<u64>,
}

impl MetaBench {
    /// Endpoints `*-{i}`, `i` in `0..n`, with [`write_md`]'s keys (or more), are in `meta`
    /// already (the `million` phase loads them).
    pub fn preloaded(n: u64) -> MetaBench {
        MetaBench { loaded: Some(n) }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pages {
    First,
    Offset,
    Cursor,
}

impl Pages {
    fn name(self) -> &'static str {
        match self {
            Pages::First => "first",
            Pages::Offset => "offset",
            Pages::Cursor => "cursor",
        }
    }
}

fn list_path(city: u64, extra: &str) -> String {
    format!(
        "/api/v1/endpoints?applicationName={}&metadataFilter=city%3Dc{city}&limit={PAGE}{extra}",
        APP.0
    )
}

impl MetaBench {
    pub async fn run(
        &mut self,
        t: &Target,
        round: usize,
        args: &Args,
        out: &mut MetaOut,
    ) -> Result<()> {
        let n = self.loaded.unwrap_or(args.meta_endpoints as u64);
        if self.loaded.is_none() {
            eprintln!("metalist: registering {n} endpoints (5 metadata keys) into `meta`");
            let prefix = format!("m{}", std::process::id());
            let w = batch_register(
                &t.addr,
                n as usize,
                args.batch_size,
                batch_conns(args),
                Phase::MetaList,
                None,
                move |buf, lo, hi| {
                    write_batch(buf, APP.1[0], lo, hi, |buf, i| {
                        let _ = write!(buf, r#"{{"endpointId":"{prefix}-{i}","metadata":"#);
                        write_md(buf, i as u64);
                        buf.push('}');
                    });
                },
            )
            .await?;
            if w.acked != n {
                bail!(
                    "metalist: only {} of {n} endpoints were registered",
                    w.acked
                );
            }
            let seconds = (w.last_ack - w.start).as_secs_f64();
            let row = LoadRow {
                endpoints: n,
                seconds,
                endpoints_per_s: n as f64 / seconds,
            };
            eprintln!(
                "metalist: loaded {n} endpoints in {seconds:.1} s ({:.0}/s)",
                row.endpoints_per_s
            );
            out.load = Some(row);
            self.loaded = Some(n);
        }
        let expected = (0..n).filter(|&i| city(i) == 3).count() as u64;
        let started = Instant::now();
        let cursors = walk(&t.addr, expected).await?;
        out.walk_ms
            .push(started.elapsed().as_secs_f64() * 1e3 / (cursors.len() + 1) as f64);
        let cursors = Arc::new(cursors);
        for pages in [Pages::First, Pages::Offset, Pages::Cursor] {
            if pages == Pages::Cursor && cursors.is_empty() {
                continue;
            }
            for conns in [1, args.connections] {
                let row = measure(t, round, n, pages, conns, expected, &cursors, args).await?;
                println!("{}", fmt_row(&row));
                out.rows.push(row);
            }
        }
        Ok(())
    }
}

/// Walks `city=c3` with cursors: every page full but the last, no endpoint twice,
/// `totalElements` and the number of items as the bench computed. Returns the cursors.
async fn walk(addr: &str, expected: u64) -> Result<Vec<String>> {
    let mut conn = Conn::new(addr);
    let mut cursors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let extra = cursor
            .as_ref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let r = conn.request("GET", &list_path(3, &extra), None).await?;
        if !r.is_success() {
            bail!(
                "metalist walk: HTTP {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&r.body).context("page JSON")?;
        let total = v["totalElements"].as_u64().unwrap_or(u64::MAX);
        if total != expected {
            bail!("metalist walk: totalElements {total}, expected {expected}");
        }
        let content = v["content"].as_array().cloned().unwrap_or_default();
        for e in &content {
            let id = e["endpointId"].as_str().unwrap_or_default().to_owned();
            let i: u64 = id
                .rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX);
            if city(i) != 3 || !seen.insert(id.clone()) {
                bail!("metalist walk: {id} does not belong (or came twice)");
            }
        }
        if cursor.is_none() && v.get("nextCursor").is_none() && content.len() as u64 == PAGE {
            // A server without cursor paging (a build before it): no cursor pages.
            eprintln!("metalist: the server gives no nextCursor; cursor pages are skipped");
            return Ok(Vec::new());
        }
        match v["nextCursor"].as_str() {
            Some(next) => {
                if content.len() as u64 != PAGE {
                    bail!("metalist walk: a page of {} before the end", content.len());
                }
                cursors.push(next.to_owned());
                cursor = Some(next.to_owned());
            }
            None => break,
        }
    }
    if seen.len() as u64 != expected {
        bail!(
            "metalist walk: {} endpoints listed, expected {expected}",
            seen.len()
        );
    }
    Ok(cursors)
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    t: &Target,
    round: usize,
    n: u64,
    pages: Pages,
    conns: usize,
    expected: u64,
    cursors: &Arc<Vec<String>>,
    args: &Args,
) -> Result<ListRow> {
    let cursors = cursors.clone();
    let path = move |r: u64| match pages {
        Pages::First => list_path(r % 40, ""),
        Pages::Offset => {
            let pages = expected.div_ceil(PAGE).max(1);
            list_path(3, &format!("&offset={}", (r % pages) * PAGE))
        }
        Pages::Cursor if cursors.is_empty() => list_path(3, ""),
        Pages::Cursor => list_path(
            3,
            &format!("&cursor={}", cursors[(r % cursors.len() as u64) as usize]),
        ),
    };
    measure_paths(t, round, n, pages.name(), conns, args, path).await
}

/// Pages of `path(random)`, closed loop over `conns` connections for `--warmup` +
/// `--duration` (only the latter recorded).
pub async fn measure_paths(
    t: &Target,
    round: usize,
    n: u64,
    pages: &'static str,
    conns: usize,
    args: &Args,
    path: impl Fn(u64) -> String + Send + Sync + 'static,
) -> Result<ListRow> {
    let path = Arc::new(path);
    let warmup = Duration::from_secs_f64(args.warmup);
    let measured = Duration::from_secs_f64(args.duration);
    let start = Instant::now();
    let (from, end) = (start + warmup, start + warmup + measured);
    let cpu0 = CpuSnap::take(t.pid(), args.nats_pid);
    let cpu_mark = Arc::new(std::sync::Mutex::new(None::<CpuSnap>));
    let handles: Vec<_> = (0..conns)
        .map(|k| {
            let addr = t.addr.clone();
            let path = path.clone();
            let (pid, nats) = (t.pid(), args.nats_pid);
            let mark = cpu_mark.clone();
            tokio::spawn(async move {
                let mut conn = Conn::new(&addr);
                let mut rng = 0x2545_F491_4F6C_DD1Du64 ^ ((k as u64 + 1) << 17) ^ round as u64;
                let (mut hist, mut errors) = (new_hist(), 0u64);
                let mut marked = false;
                loop {
                    let path = path(xorshift(&mut rng));
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    if k == 0 && !marked && sent >= from {
                        marked = true;
                        *mark.lock().unwrap() = Some(CpuSnap::take(pid, nats));
                    }
                    let res = conn.request("GET", &path, None).await;
                    let done = Instant::now();
                    let recorded = sent >= from && done <= end;
                    match res {
                        Ok(r) if r.is_success() => {
                            if recorded {
                                hist.saturating_record((done - sent).as_micros() as u64);
                            }
                        }
                        Ok(r) => {
                            errors += recorded as u64;
                            report_error(Phase::MetaList, || {
                                format!("HTTP {} {}", r.status, String::from_utf8_lossy(&r.body))
                            });
                        }
                        Err(e) => {
                            errors += recorded as u64;
                            report_error(Phase::MetaList, || format!("{e:#}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (hist, errors)
            })
        })
        .collect();
    let mut hist = new_hist();
    let mut errors = 0;
    for h in handles {
        let (h, e) = h.await?;
        hist.add(&h)?;
        errors += e;
    }
    let cpu_from = cpu_mark.lock().unwrap().take().unwrap_or(cpu0);
    let cpu = CpuSnap::take(t.pid(), args.nats_pid).since(&cpu_from);
    let secs = measured.as_secs_f64();
    let cores = |x: Option<u64>| x.map(|x| x as f64 / TICKS_PER_S / secs);
    Ok(ListRow {
        target: t.name,
        round,
        endpoints: n,
        pages,
        connections: conns,
        requests: hist.len(),
        pages_per_s: hist.len() as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
        max_ms: hist.max() as f64 / 1e3,
        errors,
        server_cpu_cores: cores(cpu.server),
        other_cpu_cores: cores(cpu.other()),
    })
}

pub const HEADER: &str = "| round | endpoints | pages | connections | pages/s | p50 ms | p99 ms | max ms | errors | CPU server / other |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|";

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

pub fn fmt_row(r: &ListRow) -> String {
    format!(
        "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} / {} |",
        r.round,
        r.endpoints,
        r.pages,
        r.connections,
        r.pages_per_s,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.errors,
        opt(r.server_cpu_cores),
        opt(r.other_cpu_cores)
    )
}
