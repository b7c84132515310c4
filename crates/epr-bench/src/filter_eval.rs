//! `epr-bench filter-eval`: what matching one new endpoint against all of its
//! application's filters costs, on one core, with no server: each filter evaluated in turn
//! (`Filter::matches`, what the store did before) against the filters indexed together
//! (`FilterSet::matches`, what it does now). Filters are the mix (`keymix::filter`);
//! endpoints have its five metadata keys, or ten as in the `million` phase.

use crate::keymix;
use anyhow::{ensure, Result};
use clap::Parser;
use epr_core::filter::{Filter, FilterSet};
use serde_json::{Map, Value};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "epr-bench filter-eval",
    about = "Times matching one endpoint against N filters (no server involved)"
)]
pub struct Args {
    /// Filter counts to time (the first N of the mix).
    #[arg(long, value_delimiter = ',', default_values = ["10", "100", "1000"])]
    filters: Vec<usize>,
    /// Distinct endpoints evaluated in turn.
    #[arg(long, default_value_t = 10_000)]
    endpoints: u64,
    /// Seconds per measurement.
    #[arg(long, short, default_value_t = 2.0)]
    duration: f64,
}

/// Mean µs per endpoint of `f` over `eps`, run in turn for about `secs`.
fn time_per_endpoint(
    secs: f64,
    eps: &[Map<String, Value>],
    mut f: impl FnMut(&Map<String, Value>),
) -> f64 {
    let warm = Instant::now() + Duration::from_secs_f64(secs / 10.0);
    let mut i = 0;
    while Instant::now() < warm {
        f(&eps[i % eps.len()]);
        i += 1;
    }
    let (start, mut n) = (Instant::now(), 0usize);
    let end = start + Duration::from_secs_f64(secs);
    loop {
        for _ in 0..64 {
            f(&eps[n % eps.len()]);
            n += 1;
        }
        if Instant::now() >= end {
            return start.elapsed().as_secs_f64() * 1e6 / n as f64;
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    const VERSION: &str = "v1";
    let mut rows = Vec::new();
    for (keys, md) in [
        (5, keymix::write_md as fn(&mut String, u64)),
        (10, keymix::write_md10),
    ] {
        let mut buf = String::new();
        let eps: Vec<Map<String, Value>> = (0..args.endpoints)
            .map(|i| {
                buf.clear();
                md(&mut buf, i);
                match serde_json::from_str(&buf) {
                    Ok(Value::Object(m)) => m,
                    _ => unreachable!("the bench's metadata is an object"),
                }
            })
            .collect();
        for &n in &args.filters {
            let filters: Vec<Arc<Filter>> = keymix::parsed(n).into_iter().map(Arc::new).collect();
            let set = FilterSet::new(filters.clone());
            let mut matched = 0usize;
            for m in &eps {
                let each: Vec<bool> = filters.iter().map(|f| f.matches(VERSION, m)).collect();
                ensure!(
                    set.matches(VERSION, m) == each,
                    "FilterSet disagrees on {m:?}"
                );
                matched += each.iter().filter(|b| **b).count();
            }
            let each_us = time_per_endpoint(args.duration, &eps, |m| {
                black_box(
                    filters
                        .iter()
                        .map(|f| f.matches(VERSION, m))
                        .collect::<Vec<bool>>(),
                );
            });
            let set_us = time_per_endpoint(args.duration, &eps, |m| {
                black_box(set.matches(VERSION, m));
            });
            let share = 100.0 * matched as f64 / (eps.len() * n.max(1)) as f64;
            eprintln!("{keys} keys, {n} filters: each {each_us:.2} µs, set {set_us:.2} µs");
            rows.push((keys, n, share, each_us, set_us));
        }
    }
    println!(
        "filter-eval: {} endpoints, {} s per measurement, one thread, {}\n",
        args.endpoints,
        args.duration,
        chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
    );
    println!("| metadata keys | filters | matching | each filter in turn, µs/endpoint | FilterSet, µs/endpoint | speed-up |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (keys, n, share, each, set) in rows {
        println!(
            "| {keys} | {n} | {share:.1} % | {each:.2} | {set:.2} | {:.1}× |",
            each / set
        );
    }
    Ok(())
}
