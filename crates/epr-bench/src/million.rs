//! The `million` phase (issue 13): footprint and listing at `--million-endpoints`
//! (1,000,000) endpoints, on a server spawned for the round on a fresh data directory.
//!
//! 1. Load the endpoints into application `meta` through the batch API, with ten metadata
//!    keys: issue 13's five ([`keymix::write_md`]) and five more of mixed types
//!    ([`keymix::write_md10`]: `serial`, `temp`, `lat`, `lon`, `battery`). Record the
//!    server's VmRSS/VmHWM and the data directory's size (file sizes, allocated blocks).
//! 2. Create the `--mix-filters` (100) filters of the `mix` phase ([`keymix::filter`]),
//!    wait until all are active; footprint again.
//! 3. Back-fill rate of one more filter matching ~1 % ([`keymix::one_percent`]), measured as
//!    the `backfill` phase does.
//! 4. Listing by that saved filter (`GET /api/v1/endpoints?filterId=…&limit=100`: first
//!    page, random page by offset) and the first page of a ~25 % filter, 1 and
//!    `--connections` connections.
//! 5. Listing by `metadataFilter`: the `metalist` phase's measurements over these endpoints.
//! 6. SIGTERM, time to exit; start again on the same directory, time until `/health/live`
//!    answers 200; footprint after the restart.

use crate::client::Conn;
use crate::filters::{
    create_mix_filters, fmt_backfill_row, measure_backfill, settle_quiet, BackfillResult,
    BACKFILL_HEADER,
};
use crate::keymix::{self, Five};
use crate::metalist::{self, ListRow, MetaBench, MetaOut};
use crate::outbox::{batch_conns, batch_register, write_batch};
use crate::{settle, spawn_server, spawn_server_in, Args, EventsMode, Phase, Round, Target};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

const PAGE: u64 = 100;

/// Memory of the server and size of its data directory at one moment.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Footprint {
    /// `/proc/<pid>/status`, MiB.
    pub vm_rss_mib: Option<f64>,
    pub vm_hwm_mib: Option<f64>,
    /// Sum of the data directory's file sizes, and of their allocated blocks, MiB.
    pub disk_mib: f64,
    pub disk_alloc_mib: f64,
}

impl Footprint {
    fn take(pid: u32, data: &Path) -> Footprint {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|k| k / 1024.0)
        };
        let (size, alloc) = dir_size(data);
        Footprint {
            vm_rss_mib: kib("VmRSS:"),
            vm_hwm_mib: kib("VmHWM:"),
            disk_mib: size as f64 / (1 << 20) as f64,
            disk_alloc_mib: alloc as f64 / (1 << 20) as f64,
        }
    }
}

/// (Σ file sizes, Σ allocated bytes) under `dir`, recursively.
fn dir_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut size, mut alloc) = (0, 0);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            let (s, a) = dir_size(&e.path());
            size += s;
            alloc += a;
        } else {
            size += m.len();
            // `st_blocks` is in 512-byte units whatever the file system's block size.
            alloc += m.blocks() * 512;
        }
    }
    (size, alloc)
}

/// One round of the `million` phase.
#[derive(Serialize)]
pub struct MillionOut {
    pub round: usize,
    pub endpoints: u64,
    pub load_s: f64,
    pub load_endpoints_per_s: f64,
    pub after_load: Footprint,
    pub filters: usize,
    pub filters_create_s: f64,
    /// First filter POST → all active.
    pub filters_active_s: f64,
    /// Σ matchedEndpointsCount / endpoints, and the bench's expectation (over the first
    /// 20,000 endpoints).
    pub filters_per_endpoint: f64,
    pub filters_per_endpoint_expected: f64,
    pub after_filters: Footprint,
    pub backfill: BackfillResult,
    /// Listing by saved filter.
    pub filter_lists: Vec<ListRow>,
    /// Listing by metadataFilter.
    pub metalist: MetaOut,
    /// SIGTERM → exit, and spawn → first `/health/live` 200.
    pub stop_s: f64,
    pub start_s: f64,
    pub after_restart: Footprint,
}

pub async fn run(run_id: &str, round: usize, args: &Args) -> Result<MillionOut> {
    let bin = args
        .server_bin
        .as_ref()
        .ok_or_else(|| anyhow!("the million phase needs --server-bin"))?;
    let (app, version) = (metalist::APP.0, metalist::APP.1[0]);
    let n = args.million_endpoints as u64;
    let (server, addr) = spawn_server(bin, EventsMode::Default)?;
    let mut t = Target::spawned("million", (server, addr), None);
    crate::wait_healthy(&t.addr, t.server.as_mut()).await?;
    let data = t
        .server
        .as_ref()
        .and_then(|s| s._dir.as_ref())
        .map(|d| d.path().join("data"))
        .ok_or_else(|| anyhow!("spawned server without a directory"))?;
    let pid = t
        .pid
        .ok_or_else(|| anyhow!("spawned server without a pid"))?;

    eprintln!("million: registering {n} endpoints (10 metadata keys) into `{app}`");
    let prefix = format!("M{run_id}-{round}");
    let w = batch_register(
        &t.addr,
        n as usize,
        args.batch_size,
        batch_conns(args),
        Phase::Million,
        None,
        move |buf, lo, hi| {
            write_batch(buf, version, lo, hi, |buf, i| {
                let _ = write!(buf, r#"{{"endpointId":"{prefix}-{i}","metadata":"#);
                keymix::write_md10(buf, i as u64);
                buf.push('}');
            });
        },
    )
    .await?;
    if w.acked != n {
        bail!("million: only {} of {n} endpoints were registered", w.acked);
    }
    let load_s = (w.last_ack - w.start).as_secs_f64();
    eprintln!(
        "million: loaded in {load_s:.1} s ({:.0}/s)",
        n as f64 / load_s
    );
    settle(std::slice::from_ref(&t)).await;
    let after_load = Footprint::take(pid, &data);

    let tag = format!("mm-{run_id}-{round}");
    let (ids, filters_create_s, filters_active_s, memberships) =
        create_mix_filters(&t.addr, app, version, args.mix_filters, &tag).await?;
    eprintln!(
        "million: {} filters active after {filters_active_s:.1} s",
        ids.len()
    );
    let expected = {
        let parsed = keymix::parsed(args.mix_filters);
        let mut buf = String::new();
        let sample = n.min(20_000);
        (0..sample)
            .map(|i| keymix::matched(&parsed, version, i, keymix::write_md10, &mut buf) as f64)
            .sum::<f64>()
            / sample.max(1) as f64
    };
    settle(std::slice::from_ref(&t)).await;
    let after_filters = Footprint::take(pid, &data);

    settle_quiet(std::slice::from_ref(&t), args).await;
    let (query, test) = keymix::one_percent(round as u64 * 7 + 3);
    let one_pct = (0..n).filter(|&i| test(&Five::of(i))).count() as u64;
    let mut conn = Conn::new(&t.addr);
    let backfill = measure_backfill(
        &mut conn,
        &t,
        app,
        ("city = cN and level < 20 (~1 %)", &query),
        &format!("mb-{run_id}-{round}"),
        (n, one_pct),
        round,
        args,
    )
    .await?;
    eprintln!("{BACKFILL_HEADER}\n{}", fmt_backfill_row(&backfill));
    if !backfill.ok {
        eprintln!(
            "FILTER MISMATCH (million round {round}): matched {:?}, expected {one_pct}",
            backfill.matched
        );
    }

    println!("\nmillion: listing by saved filter (`filterId`), then by `metadataFilter`:\n");
    println!("{}", metalist::HEADER);
    let mut filter_lists = Vec::new();
    let pages = one_pct.div_ceil(PAGE).max(1);
    let quarter = ids
        .get(1)
        .cloned()
        .ok_or_else(|| anyhow!("--mix-filters must be at least 2"))?;
    type PathFn = Box<dyn Fn(u64) -> String + Send + Sync>;
    let cases: [(&'static str, String, bool); 3] = [
        ("filterId ~1 %: first", backfill.filter_id.clone(), false),
        ("filterId ~1 %: offset", backfill.filter_id.clone(), true),
        ("filterId ~24 %: first", quarter, false),
    ];
    for (label, id, offset) in cases {
        for conns in [1, args.connections] {
            settle_quiet(std::slice::from_ref(&t), args).await;
            let id = id.clone();
            let path: PathFn = Box::new(move |r| {
                let base = format!("/api/v1/endpoints?filterId={id}&limit={PAGE}");
                if offset {
                    format!("{base}&offset={}", (r % pages) * PAGE)
                } else {
                    base
                }
            });
            let row = metalist::measure_paths(&t, round, n, label, conns, args, path).await?;
            println!("{}", metalist::fmt_row(&row));
            filter_lists.push(row);
        }
    }
    let mut meta = MetaOut::default();
    settle_quiet(std::slice::from_ref(&t), args).await;
    MetaBench::preloaded(n)
        .run(&t, round, args, &mut meta)
        .await?;

    // Restart on the same directory.
    settle(std::slice::from_ref(&t)).await;
    let mut server = t.server.take().expect("spawned");
    let stopping = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("kill -TERM")?;
    if !st.success() {
        bail!("kill -TERM {} failed: {st}", pid);
    }
    while server.child.try_wait()?.is_none() {
        if stopping.elapsed() > Duration::from_secs(120) {
            bail!("the server did not exit within 120 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stop_s = stopping.elapsed().as_secs_f64();
    let dir = server._dir.take().expect("spawned with a directory");
    drop(server);
    let starting = Instant::now();
    let (mut server, addr) = spawn_server_in(bin, dir.path(), EventsMode::Default)?;
    server._dir = Some(dir);
    let new_pid = server.child.id();
    loop {
        if let Ok(r) = Conn::new(&addr).request("GET", "/health/live", None).await {
            if r.status == 200 {
                break;
            }
        }
        if let Some(st) = server.child.try_wait()? {
            bail!("the restarted server exited: {st}");
        }
        if starting.elapsed() > Duration::from_secs(600) {
            bail!("the restarted server was not live within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start_s = starting.elapsed().as_secs_f64();
    let after_restart = Footprint::take(new_pid, &data);
    eprintln!("million: SIGTERM → exit {stop_s:.2} s, start → live {start_s:.2} s");
    drop(server);

    Ok(MillionOut {
        round,
        endpoints: n,
        load_s,
        load_endpoints_per_s: n as f64 / load_s,
        after_load,
        filters: ids.len(),
        filters_create_s,
        filters_active_s,
        filters_per_endpoint: memberships as f64 / n as f64,
        filters_per_endpoint_expected: expected,
        after_filters,
        backfill,
        filter_lists,
        metalist: meta,
        stop_s,
        start_s,
        after_restart,
    })
}

fn mib(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn fp(f: &Footprint) -> String {
    format!(
        "{} ({}) | {:.0} ({:.0})",
        mib(f.vm_rss_mib),
        mib(f.vm_hwm_mib),
        f.disk_mib,
        f.disk_alloc_mib
    )
}

pub fn print_summary(rounds: &[Round]) {
    let all: Vec<&MillionOut> = rounds.iter().flat_map(|r| &r.million).collect();
    if all.is_empty() {
        return;
    }
    println!(
        "\nIssue 13 at scale (10 metadata keys, {} filters of the mix):\n",
        all[0].filters
    );
    println!("| round | stage | endpoints | RSS MiB (HWM) | disk MiB (allocated) | seconds | rate / note |");
    println!("|---:|---|---:|---:|---:|---:|---|");
    for m in &all {
        let r = m.round;
        println!(
            "| {r} | loaded (batch API) | {} | {} | {:.1} | {:.0} endpoints/s |",
            m.endpoints,
            fp(&m.after_load),
            m.load_s,
            m.load_endpoints_per_s
        );
        println!(
            "| {r} | + {} filters active | {} | {} | {:.1} | {:.1} filters per endpoint (expected {:.1}) |",
            m.filters,
            m.endpoints,
            fp(&m.after_filters),
            m.filters_active_s,
            m.filters_per_endpoint,
            m.filters_per_endpoint_expected
        );
        println!(
            "| {r} | back-fill of a ~1 % filter | {} | - | - | {:.2} | **{:.0} endpoints/s**, matched {} of {} expected{} |",
            m.backfill.endpoints,
            m.backfill.active_ms / 1e3,
            m.backfill.endpoints_per_s,
            m.backfill.matched.map_or_else(|| "-".into(), |v| v.to_string()),
            m.backfill.expected,
            if m.backfill.ok { "" } else { " **MISMATCH**" }
        );
        println!(
            "| {r} | SIGTERM → exit | {} | - | - | {:.2} | |",
            m.endpoints, m.stop_s
        );
        println!(
            "| {r} | restart → `/health/live` 200 | {} | {} | {:.2} | RSS just after the restart |",
            m.endpoints,
            fp(&m.after_restart),
            m.start_s
        );
    }
    println!(
        "\nListing at scale (100-row pages):\n\n{}",
        metalist::HEADER
    );
    for m in &all {
        for row in m.filter_lists.iter().chain(&m.metalist.rows) {
            println!("{}", metalist::fmt_row(row));
        }
    }
}
