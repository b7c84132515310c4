//! The `mix` phase (issue 13): the sequence against one server on a fresh data
//! directory (spawned each round with --server-bin; with --url, application `mix` of that
//! server, whose filters are deleted at the end of the round).
//!
//! Closed loop over `--connections`, with registrations carrying the five keys
//! ([`keymix::write_md`]) into application `mix`:
//! 1. `health`: `GET /health/live`, the ceiling;
//! 2. `register`;
//! 3. `get-by-id` on the endpoints registered so far;
//! 4. `register` again, just before the filters (the no-filter baseline);
//! 5. `--mix-filters` (100) filters of [`keymix::filter`] are created in `mix` and the bench
//!    waits until all are `active` (back-filled over the endpoints of 2 and 4);
//! 6. `register` with the filters active: each new endpoint joins about a quarter of them;
//! 7. `health` again.
//!
//! Then the filters' `matchedEndpointsCount` sum is checked against the bench's own count
//! (the server's filter language run client-side over every endpoint it registered).

use crate::filters::{create_mix_filters, settle_quiet, wait_all_active};
use crate::keymix;
use crate::{
    fmt_row, new_workers, run_phase, spawn_server, wait_healthy, Args, Ctx, EventsMode, Phase,
    PhaseResult, RegMetadata, Round, Target,
};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::sync::Arc;

/// The application of this phase (added to a spawned server's config).
pub const APP: (&str, &[&str]) = ("mix", &["mix-v1"]);

/// The key-mix number of registration `n` of connection `idx`.
pub fn key(idx: usize, n: u64) -> u64 {
    ((idx as u64) << 40) | n
}

/// One round of the `mix` phase.
#[derive(Serialize, Clone)]
pub struct MixRound {
    pub round: usize,
    /// health, register, get-by-id, register-before-filters, register-with-filters,
    /// health-end (`phase`).
    pub rows: Vec<PhaseResult>,
    pub filters: usize,
    /// First filter POST → last answer, and → all `active`.
    pub filters_create_s: f64,
    pub filters_active_s: f64,
    /// Endpoints in `mix` when the filters were created (back-filled).
    pub endpoints_before_filters: u64,
    /// Endpoints registered with the filters active (warm-up included).
    pub endpoints_with_filters: u64,
    /// Filters each of those matches, in % of the filters (client-side count).
    pub expected_share_pct: f64,
    /// Σ matchedEndpointsCount at the end, and the bench's count over all its endpoints.
    pub memberships_server: u64,
    pub memberships_expected: u64,
    pub register_pct_of_health: f64,
    pub get_pct_of_health: f64,
    /// register-with-filters / register-before-filters.
    pub filter_rps_ratio: f64,
    pub filter_p99_ratio: f64,
}

const STEPS: [(&str, Phase); 4] = [
    ("health", Phase::Health),
    ("register", Phase::Register),
    ("get-by-id", Phase::Get),
    ("register-before-filters", Phase::Register),
];
const WITH_FILTERS: &str = "register-with-filters";
const HEALTH_END: &str = "health-end";

pub async fn run(targets: &[Target], run_id: &str, round: usize, args: &Args) -> Result<MixRound> {
    let mut t = match &args.server_bin {
        Some(bin) => {
            let mut t = Target::spawned("mix", spawn_server(bin, EventsMode::Default)?, None);
            wait_healthy(&t.addr, t.server.as_mut()).await?;
            t
        }
        None => {
            let first = targets.first().ok_or_else(|| anyhow!("no server"))?;
            Target {
                name: "mix",
                addr: first.addr.clone(),
                server: None,
                pid: first.pid(),
                events: None,
                workers: Vec::new(),
                replicas: Vec::new(),
                nats_instance: None,
            }
        }
    };
    let (app, version) = (APP.0, APP.1[0]);
    let ctx = Arc::new(Ctx::new(
        format!("{run_id}-x{round}"),
        version.to_owned(),
        RegMetadata::Five,
        &args.app_name,
    ));
    let label = |step: &str| {
        if args.repeat > 1 {
            format!("{step} [mix] #{round}")
        } else {
            format!("{step} [mix]")
        }
    };
    let mut workers = new_workers(&t.addr, args.connections);
    let mut rows = Vec::new();
    let measure = async |workers: Vec<_>, step: &'static str, phase: Phase, t: &Target| {
        settle_quiet(std::slice::from_ref(t), args).await;
        let (back, mut res, _) = run_phase(workers, &ctx, phase, args, t).await?;
        res.phase = step;
        println!("{}", fmt_row(&res, &label(step)));
        anyhow::Ok((back, res))
    };
    for (step, phase) in STEPS {
        let (back, res) = measure(workers, step, phase, &t).await?;
        workers = back;
        rows.push(res);
    }
    let before: Vec<usize> = workers.iter().map(|w| w.ids.len()).collect();
    settle_quiet(std::slice::from_ref(&t), args).await;
    let tag = format!("mx-{run_id}-{round}");
    let (filter_app, filter_version) = if args.mix_filters_elsewhere {
        ("bench", "bench-v1")
    } else {
        (app, version)
    };
    let (ids, filters_create_s, filters_active_s, _) =
        create_mix_filters(&t.addr, filter_app, filter_version, args.mix_filters, &tag).await?;
    eprintln!(
        "mix: {} filters created in {filters_create_s:.1} s, all active after {filters_active_s:.1} s",
        ids.len()
    );
    for (step, phase) in [(WITH_FILTERS, Phase::Register), (HEALTH_END, Phase::Health)] {
        let (back, res) = measure(workers, step, phase, &t).await?;
        workers = back;
        rows.push(res);
    }
    let memberships_server = wait_all_active(&t.addr, filter_app, &ids).await?;

    // The bench's own count, outside the measured windows.
    let parsed = keymix::parsed(args.mix_filters);
    let mut buf = String::new();
    let (mut all, mut new_matches, mut new_endpoints) = (0u64, 0u64, 0u64);
    for (w, &before) in workers.iter().zip(&before) {
        for (j, id) in w.ids.iter().enumerate() {
            let n: u64 = id
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow!("unexpected endpoint id {id}"))?;
            let m =
                keymix::matched(&parsed, version, key(w.idx, n), keymix::write_md, &mut buf) as u64;
            all += m;
            if j >= before {
                new_matches += m;
                new_endpoints += 1;
            }
        }
    }
    if args.mix_filters_elsewhere {
        // The filters see none of the mix's endpoints.
        all = 0;
    }
    if all != memberships_server {
        eprintln!(
            "FILTER MISMATCH (mix round {round}): the server counts {memberships_server} memberships, the bench {all}"
        );
    }
    if t.server.is_none() {
        // A server given with --url keeps its endpoints, but the next round must start
        // without filters.
        let mut conn = crate::client::Conn::new(&t.addr);
        for id in &ids {
            let path = format!("/api/v1/applications/{filter_app}/filters/{id}");
            let r = conn.request("DELETE", &path, None).await?;
            if r.status != 204 {
                bail!("DELETE {path}: HTTP {}", r.status);
            }
        }
    }
    drop(t.server.take());
    let health = (rows[0].rps + rows[5].rps) / 2.0;
    Ok(MixRound {
        round,
        filters: ids.len(),
        filters_create_s,
        filters_active_s,
        endpoints_before_filters: before.iter().sum::<usize>() as u64,
        endpoints_with_filters: new_endpoints,
        expected_share_pct: 100.0 * new_matches as f64
            / (new_endpoints.max(1) * args.mix_filters.max(1) as u64) as f64,
        memberships_server,
        memberships_expected: all,
        register_pct_of_health: 100.0 * rows[1].rps / health,
        get_pct_of_health: 100.0 * rows[2].rps / health,
        filter_rps_ratio: rows[4].rps / rows[3].rps,
        filter_p99_ratio: rows[4].p99_ms / rows[3].p99_ms,
        rows,
    })
}

/// The `mix` summary, one line per round.
pub fn print_summary(rounds: &[Round]) {
    let all: Vec<&MixRound> = rounds.iter().flat_map(|r| &r.mix).collect();
    if all.is_empty() {
        return;
    }
    println!("\nIssue 13 mix (five keys; `GET /health/live` as the ceiling = mean of the health runs before and after):\n");
    println!("| round | health req/s start, end | register req/s (p50 / p99 ms) | **register / health** | get req/s (p50 / p99 ms) | **get / health** | register before filters req/s (p50 / p99 ms) | register with filters req/s (p50 / p99 ms) | **with / without filters: req/s, p99** | filters: all active after s (endpoints back-filled) | filters per new endpoint (expected) | Σ matched: server / bench |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in all {
        let r = |i: usize| {
            let p = &m.rows[i];
            format!("{:.0} ({:.2} / {:.2})", p.rps, p.p50_ms, p.p99_ms)
        };
        println!(
            "| {} | {:.0}, {:.0} | {} | **{:.1} %** | {} | **{:.1} %** | {} | {} | **{:.1} %, {:.2}×** | {:.1} ({}) | {:.1} % of {} | {} / {}{} |",
            m.round,
            m.rows[0].rps,
            m.rows[5].rps,
            r(1),
            m.register_pct_of_health,
            r(2),
            m.get_pct_of_health,
            r(3),
            r(4),
            100.0 * m.filter_rps_ratio,
            m.filter_p99_ratio,
            m.filters_active_s,
            m.endpoints_before_filters,
            m.expected_share_pct,
            m.filters,
            m.memberships_server,
            m.memberships_expected,
            if m.memberships_server == m.memberships_expected {
                ""
            } else {
                " **MISMATCH**"
            }
        );
    }
}
