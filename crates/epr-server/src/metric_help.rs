//! The `# HELP` text of every metric the service emits, whichever crate emits it. They are
//! described once, when the recorder is installed; a unit test scans the sources of all
//! crates so that a new metric without a description fails the build's tests.

/// How a metric is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

use Kind::{Counter, Gauge, Histogram};

/// (name, kind, help) of every metric emitted through the `metrics` facade.
pub const METRICS: &[(&str, Kind, &str)] = &[
    // epr-http
    (
        "epr_http_requests_total",
        Counter,
        "HTTP requests answered, by method, route template and status.",
    ),
    // epr-http::self_registration (device routes)
    (
        "epr_self_registrations_total",
        Counter,
        "Successful device self-registrations, by outcome (registered: a new endpoint; reregistered: a new token for an existing one).",
    ),
    (
        "epr_self_registration_refusals_total",
        Counter,
        "Refused device self-registrations, by reason (the refusal code the device is told, e.g. credential-invalid, rate-limited).",
    ),
    // epr-server::serve (the accept loop)
    ("epr_http_connections_open", Gauge, "HTTP connections being served."),
    (
        "epr_http_connections_max",
        Gauge,
        "Most HTTP connections served at once (server.max_connections, fitted to the open-files limit).",
    ),
    (
        "epr_http_connections_refused_total",
        Counter,
        "HTTP connections answered 503 (plain HTTP) or closed (TLS) at the connection limit.",
    ),
    (
        "epr_http_tls_handshake_failures_total",
        Counter,
        "TLS handshakes that failed (reason: error, e.g. a plain-HTTP client or an unknown CA; timeout: not done within the header timeout); the connection is closed.",
    ),
    (
        "epr_http_connections_reclaimed_total",
        Counter,
        "Idle HTTP connections closed to make room for new ones.",
    ),
    (
        "epr_http_connection_timeouts_total",
        Counter,
        "HTTP connections closed or requests answered 408 on a timeout, by kind (header, body, idle).",
    ),
    (
        "epr_http_accept_errors_total",
        Counter,
        "Failed accepts of HTTP connections (e.g. the open-files limit reached).",
    ),
    (
        "epr_http_request_duration_seconds",
        Histogram,
        "Time from a request's arrival to its response head, by method, route template and status.",
    ),
    // epr-store
    (
        "epr_store_commit_seconds",
        Histogram,
        "Duration of one group commit of the store's writer (embedded: the transaction; its fsync is epr_store_sync_seconds; PostgreSQL: the transaction and its COMMIT).",
    ),
    (
        "epr_store_sync_seconds",
        Histogram,
        "Duration of one fdatasync of the embedded store's write-ahead log; it makes every group committed before it durable, and only then are they answered.",
    ),
    (
        "epr_store_commit_group_size",
        Histogram,
        "Writes committed together in one transaction.",
    ),
    (
        "epr_store_corruption_detected",
        Gauge,
        "1 once the database file was found damaged (writes are then refused with 503), else 0.",
    ),
    (
        "epr_store_wal_frames",
        Gauge,
        "Frames in the SQLite write-ahead log at the last background checkpoint.",
    ),
    (
        "epr_store_checkpoint_seconds",
        Histogram,
        "Duration of background WAL checkpoints that copied frames.",
    ),
    // epr-store-pg
    (
        "epr_outbox_leader",
        Gauge,
        "1 while this process is the outbox relay leader of its PostgreSQL database, else 0.",
    ),
    (
        "epr_pg_errors_total",
        Counter,
        "PostgreSQL failures by kind (closed, connection, deadlock, serialization, timeout, unique, pool, other).",
    ),
    (
        "epr_filter_membership_changes_total",
        Counter,
        "Endpoints that entered or left a saved filter because of a write.",
    ),
    (
        "epr_filter_backfill_endpoints_total",
        Counter,
        "Endpoints read by filter back-fill steps.",
    ),
    (
        "epr_filter_backfill_seconds",
        Histogram,
        "Time from a filter's creation or query change to the end of its back-fill.",
    ),
    // epr-nats: connection and relay
    (
        "epr_nats_connected",
        Gauge,
        "1 while the NATS client is connected, else 0.",
    ),
    (
        "epr_nats_slow_consumer_total",
        Counter,
        "Messages the NATS client dropped because a subscription fell behind.",
    ),
    (
        "epr_outbox_depth",
        Gauge,
        "Events committed but not yet confirmed by NATS (sampled every 2 s).",
    ),
    (
        "epr_events_published_total",
        Counter,
        "Events confirmed by NATS.",
    ),
    (
        "epr_events_publish_lag_seconds",
        Histogram,
        "Time from an event's commit to its confirmation by NATS.",
    ),
    (
        "epr_events_publish_failures_total",
        Counter,
        "Publish batches that failed or were not confirmed in time (each is retried).",
    ),
    (
        "epr_events_undeliverable_total",
        Counter,
        "Events that could not be encoded (logged and skipped).",
    ),
    (
        "epr_events_discarded_total",
        Counter,
        "Events dropped because NATS is not configured.",
    ),
    // epr-nats: 9/ELCE connected listener
    (
        "epr_connected_endpoints_total",
        Counter,
        "9/ELCE connected endpoints handled, by outcome (unchanged, updated, unknown, removed-version, rejected, failed).",
    ),
    (
        "epr_connected_events_invalid_total",
        Counter,
        "9/ELCE connected events ignored because they did not decode or validate.",
    ),
    (
        "epr_connected_events_expired_total",
        Counter,
        "9/ELCE connected events ignored because they had expired.",
    ),
    (
        "epr_connected_events_ignored_total",
        Counter,
        "9/ELCE connected events ignored, by reason (unknown-tenant: their publisher maps to no current tenant, see nats.connected_tenants).",
    ),
    // epr-nats: 21/TLE listener
    (
        "epr_tenant_events_total",
        Counter,
        "21/TLE tenant lifecycle events applied, by type (updated, unregistered).",
    ),
    (
        "epr_tenant_events_dropped_total",
        Counter,
        "21/TLE tenant lifecycle events dropped, by type and reason (undecodable, expired).",
    ),
    // epr-nats::scmp, epr-server::{catalogue, tekton, reload}
    (
        "epr_scmp_messages_total",
        Counter,
        "17/SCMP configuration updates accepted, by type (upsert, delete) and scope (all, tenant, application, version).",
    ),
    (
        "epr_scmp_messages_dropped_total",
        Counter,
        "17/SCMP configuration updates ignored, by reason (undecodable, invalid-pattern, unknown-tenant, other-instance, invalid-name).",
    ),
    (
        "epr_config_versions",
        Gauge,
        "Application versions in effect, by origin (file, environment, tekton), summed over the shared and the per-tenant catalogues.",
    ),
    (
        "epr_config_source",
        Gauge,
        "Tenants whose Tekton entries come from a Tekton read (tekton), from the stored copy because Tekton has not answered since the start (stored), or from nowhere yet (none).",
    ),
    (
        "epr_config_last_refresh_timestamp_seconds",
        Gauge,
        "Unix time of the last successful configuration refresh, by source (tekton: a read of Tekton; local: a reload of the file and environment).",
    ),
    (
        "epr_config_refresh_failures_total",
        Counter,
        "Failed configuration refreshes, by source (tekton: a Tekton read failed; local: a reload found an invalid configuration).",
    ),
    (
        "epr_config_reloads_total",
        Counter,
        "Local configuration reloads, by trigger (sighup, file) and outcome (ok, error).",
    ),
    // epr-server: removed tenants' data
    (
        "epr_tenant_purge_deleted_total",
        Counter,
        "Records of removed tenants deleted by purges, by kind (filter, endpoint).",
    ),
    (
        "epr_tenant_purges_total",
        Counter,
        "Purges of removed tenants' data that finished.",
    ),
    // epr-nats: 19/EPMMP, 20/EFMP and 16/ECAP servers
    (
        "epr_epmmp_requests_total",
        Counter,
        "19/EPMMP requests answered, by request type and status code.",
    ),
    (
        "epr_epmmp_request_duration_seconds",
        Histogram,
        "19/EPMMP request handling time, by request type.",
    ),
    (
        "epr_epmmp_dropped_total",
        Counter,
        "19/EPMMP requests dropped unanswered, by request type and reason.",
    ),
    (
        "epr_efmp_requests_total",
        Counter,
        "20/EFMP requests answered, by request type and status code.",
    ),
    (
        "epr_efmp_request_duration_seconds",
        Histogram,
        "20/EFMP request handling time, by request type.",
    ),
    (
        "epr_efmp_dropped_total",
        Counter,
        "20/EFMP requests dropped unanswered, by request type and reason.",
    ),
    (
        "epr_ecap_requests_total",
        Counter,
        "16/ECAP endpoint token requests answered, by request type and status code.",
    ),
    (
        "epr_ecap_request_duration_seconds",
        Histogram,
        "16/ECAP endpoint token request handling time, by request type.",
    ),
    (
        "epr_ecap_dropped_total",
        Counter,
        "16/ECAP endpoint token requests dropped unanswered, by request type and reason.",
    ),
    // epr-server
    (
        "epr_build_info",
        Gauge,
        "Always 1; the labels name the version, git commit and compiler of this build.",
    ),
    // epr-auth
    (
        "epr_auth_tokens_total",
        Counter,
        "Bearer tokens checked, by outcome (ok, invalid, unavailable: the issuer's keys could not be fetched).",
    ),
    (
        "epr_auth_jwks_fetches_total",
        Counter,
        "Fetches of an issuer's signing keys (JWKS), by outcome (ok, error).",
    ),
    (
        "epr_auth_token_cache_entries",
        Gauge,
        "Verified tokens remembered (auth.token_cache_entries at most).",
    ),
    (
        "epr_auth_tenant_manager_reads_total",
        Counter,
        "Complete reads of the Tenant Manager's tenant list, by outcome (ok, error).",
    ),
    ("epr_auth_tenants", Gauge, "Tenants whose tokens are accepted."),
];

/// Registers the description of every metric with the installed recorder.
pub fn describe_all() {
    for &(name, kind, help) in METRICS {
        match kind {
            Counter => metrics::describe_counter!(name, help),
            Gauge => metrics::describe_gauge!(name, help),
            Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// Every metric name the crates emit: string literals in `counter!` / `gauge!` /
    /// `histogram!` calls, and the names the `rpc::wire!` macro builds per protocol module.
    fn emitted() -> BTreeSet<String> {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut files = Vec::new();
        for c in std::fs::read_dir(crates).unwrap() {
            let c = c.unwrap().path();
            // The load generator reads metrics; it emits none.
            if c.ends_with("epr-bench") || !c.join("src").is_dir() {
                continue;
            }
            rust_files(&c.join("src"), &mut files);
        }
        let mut names = BTreeSet::new();
        for f in files {
            if f.ends_with("metric_help.rs") {
                continue; // this scan's own patterns
            }
            let text = std::fs::read_to_string(&f).unwrap();
            for mac in ["counter!(", "gauge!(", "histogram!("] {
                for (i, _) in text.match_indices(mac) {
                    // A literal name, possibly on the next line (rustfmt); constants are
                    // the `wire!` names below.
                    let Some(rest) = text[i + mac.len()..].trim_start().strip_prefix('"') else {
                        continue;
                    };
                    names.insert(rest[..rest.find('"').unwrap()].to_owned());
                }
            }
            for (i, _) in text.match_indices("rpc::wire!(") {
                let rest = &text[i..];
                let args = &rest[rest.find('(').unwrap() + 1..rest.find(')').unwrap()];
                let module = args.rsplit(',').next().unwrap().trim();
                for suffix in [
                    "requests_total",
                    "request_duration_seconds",
                    "dropped_total",
                ] {
                    names.insert(format!("epr_{module}_{suffix}"));
                }
            }
        }
        names
    }

    #[test]
    fn every_emitted_metric_is_described() {
        let described: BTreeSet<&str> = METRICS.iter().map(|m| m.0).collect();
        let emitted = emitted();
        assert!(emitted.len() > 20, "the scan found too little: {emitted:?}");
        let missing: Vec<_> = emitted
            .iter()
            .filter(|n| !described.contains(n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "add these to metric_help::METRICS: {missing:?}"
        );
        let stale: Vec<_> = described
            .iter()
            .filter(|n| !emitted.contains(**n))
            .collect();
        assert!(stale.is_empty(), "no longer emitted: {stale:?}");
    }
}
