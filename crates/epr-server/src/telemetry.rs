//! Logging and metrics set-up.

use crate::config::LogSettings;
use crate::log_writer::{batch_writer, BatchGuard};
use epr_http::MetricsRenderer;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};
use tracing_subscriber::EnvFilter;

/// This build: version, git commit (`unknown` outside a git checkout unless
/// `EPR_GIT_COMMIT` was set) and compiler.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("EPR_GIT_COMMIT");
pub const RUSTC_VERSION: &str = env!("EPR_RUSTC_VERSION");

/// Keeps the log writer thread running; dropping it writes out what is queued.
#[must_use = "log lines queued when the guard is dropped may be lost"]
pub struct LogGuard(#[allow(dead_code)] Option<BatchGuard>);

/// Installs the global tracing subscriber: human-readable or JSON lines on stdout, through
/// a batching writer thread so a request never waits for the terminal or pipe (nothing
/// is dropped; see `log_writer`). Colours only when stdout is a terminal and `NO_COLOR` is
/// unset. `RUST_LOG` overrides the configured level.
pub fn init_logging(log: &LogSettings) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let stdout = std::io::stdout();
    let ansi = log.format == "human"
        && stdout.is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let (writer, guard) = batch_writer(stdout);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    // The filter sits behind a reload handle so that a configuration reload can change the
    // level (`set_log_level`); the handle's type depends on the format, hence the closure.
    let result = if log.format == "json" {
        let builder = builder.json().flatten_event(true).with_filter_reloading();
        let handle = builder.reload_handle();
        builder.try_init().inspect(|_| {
            let _ = LEVEL.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
        })
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        builder.try_init().inspect(|_| {
            let _ = LEVEL.set(Box::new(move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            }));
        })
    };
    match result {
        Ok(()) => LogGuard(Some(guard)),
        // A second initialisation (tests start many servers in one process) is harmless.
        Err(_) => LogGuard(None),
    }
}

type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Replaces the installed subscriber's filter; set once the subscriber is installed.
static LEVEL: OnceLock<SetFilter> = OnceLock::new();

/// Applies a new `log.level` to the running process. `Ok(false)` when nothing changes:
/// `RUST_LOG` overrides the configured level, or this process installed no subscriber.
pub fn set_log_level(level: &str) -> Result<bool, String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(false);
    }
    let Some(set) = LEVEL.get() else {
        return Ok(false);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level '{level}': {e}"))?;
    set(filter).map(|()| true)
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use with the description of
/// every metric and `epr_build_info`. Each render appends the `process_*` metrics.
pub fn metrics_renderer() -> MetricsRenderer {
    let handle = HANDLE
        .get_or_init(|| {
            let latency = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5,
            ];
            let group = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &group))
                .expect("bucket lists are not empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (embedding process); render ours anyway.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            crate::metric_help::describe_all();
            metrics::gauge!(
                "epr_build_info",
                "version" => VERSION,
                "git_commit" => GIT_COMMIT,
                "rustc_version" => RUSTC_VERSION,
            )
            .set(1.0);
            handle
        })
        .clone();
    Arc::new(move || {
        let mut text = handle.render();
        crate::process_metrics::append(&mut text);
        text
    })
}
