//! The 21/TLE listener: `kaa.v1.events.*.tenant.lifecycle.updated` re-reads the tenant list,
//! `…unregistered` removes the tenant at once (its tokens stop working, its NATS subjects go
//! silent; with `auth.removed_tenant_data: purge`, its data is deleted).
//!
//! Subscribed **without** a queue group: every replica keeps its own tenant set, so every
//! replica must see every event. Expired and undecodable events are dropped, counted
//! (`epr_tenant_events_dropped_total{type,reason}`) and logged at most once per interval.

use crate::connection::{now_millis, Nats};
use epr_core::auth::TenantControl;
use epr_core::log_gate::LogGate;
use epr_events::tenant::{decode_tenant_event, TenantEventKind};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

static DROP_LOG: LogGate = LogGate::new(epr_core::log_gate::DEFAULT_LOG_INTERVAL);

fn dropped(kind: TenantEventKind, reason: &'static str, subject: &str, why: &str) {
    metrics::counter!("epr_tenant_events_dropped_total", "type" => kind.token(), "reason" => reason)
        .increment(1);
    if let Some(suppressed) = DROP_LOG.admit(Instant::now()) {
        tracing::warn!(
            subject,
            reason,
            error = why,
            suppressed,
            "21/TLE tenant event dropped"
        );
    }
}

/// Listens until `stop` turns true; `control` applies each event.
pub async fn listen(
    nats: Nats,
    control: Arc<dyn TenantControl>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), async_nats::SubscribeError> {
    let mut subs = Vec::new();
    for kind in TenantEventKind::ALL {
        let sub = nats
            .client
            .subscribe(kind.subject_wildcard().to_owned())
            .await?;
        subs.push(sub.map(move |m| (kind, m)));
    }
    let mut events = futures_util::stream::select_all(subs);
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some((kind, msg)) = next else { break };
        let event = match decode_tenant_event(kind, &msg.payload) {
            Ok(e) => e,
            Err(e) => {
                dropped(kind, "undecodable", &msg.subject, &e.to_string());
                continue;
            }
        };
        if event.expired(now_millis()) {
            let why = format!(
                "expired (timestamp {} + timeout {} ms)",
                event.timestamp, event.timeout
            );
            dropped(kind, "expired", &msg.subject, &why);
            continue;
        }
        metrics::counter!("epr_tenant_events_total", "type" => kind.token()).increment(1);
        tracing::info!(tenant = %event.tenant_id, correlation_id = %event.correlation_id,
            subject = %msg.subject, "21/TLE tenant {}", kind.token());
        match kind {
            TenantEventKind::Updated => control.tenant_updated(&event.tenant_id),
            TenantEventKind::Unregistered => control.tenant_unregistered(&event.tenant_id),
        }
    }
    Ok(())
}
