//! The 17/SCMP listener: Kaa's Tekton says that configuration changed, EPR re-reads it.
//!
//! - Broadcast `kaa.v1.events.*.service.configuration.{upsert|delete}` (any provider).
//! - Targeted `kaa.v1.service.{instance}.scmp.configuration.{upsert|delete}`, where
//!   `{instance}` is this service's instance name or the tenant's own instance name
//!   (`<instance>-<tenant>`, [`epr_core::auth::TenantNaming`]); messages to other instances
//!   are not ours and are skipped without a word.
//!
//! Subscribed **without** a queue group: every replica keeps its own catalogue, so every
//! replica must see every message. Messages are never acknowledged (17/SCMP forbids it).
//! `tenantID` is a Kaa tenant ID, i.e. our tenant ID; a message for a tenant this service
//! does not serve is ignored. Undecodable messages, forbidden null patterns, unknown tenants
//! and invalid names are dropped, counted (`epr_scmp_messages_dropped_total{reason}`) and
//! logged at most once per interval; accepted ones are counted
//! (`epr_scmp_messages_total{type,scope}`) and handed to the [`CatalogControl`], which
//! re-reads in the background (the listener never waits for Tekton).

use crate::connection::Nats;
use crate::tenancy::Tenancy;
use epr_core::apps::{CatalogControl, RefreshScope};
use epr_core::ids::{AppName, AppVersionName, TenantId};
use epr_core::log_gate::LogGate;
use epr_events::scmp::{
    decode_broadcast, decode_targeted, parse_subject, ConfigScope, ScmpSubject, BROADCAST_WILDCARD,
    TARGETED_WILDCARD,
};
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

static DROP_LOG: LogGate = LogGate::new(epr_core::log_gate::DEFAULT_LOG_INTERVAL);

fn dropped(reason: &'static str, subject: &str, why: &str) {
    metrics::counter!("epr_scmp_messages_dropped_total", "reason" => reason).increment(1);
    if let Some(suppressed) = DROP_LOG.admit(Instant::now()) {
        tracing::warn!(
            subject,
            reason,
            error = why,
            suppressed,
            "17/SCMP configuration update dropped"
        );
    }
}

/// What a message asks for, or why it is dropped (a reason label and a message).
pub fn interpret(
    subject: &str,
    payload: &[u8],
    tenancy: &Tenancy,
) -> Result<Option<(RefreshScope, String)>, (&'static str, String)> {
    let Some(parsed) = parse_subject(subject) else {
        return Ok(None);
    };
    let own = &tenancy.naming.instance_name;
    let update = match &parsed {
        ScmpSubject::Targeted { consumer, .. } => {
            // Cheap test before decoding: other services' messages are not ours at all.
            if consumer != own && !consumer.starts_with(&format!("{own}-")) {
                return Ok(None);
            }
            decode_targeted(payload)
        }
        ScmpSubject::Broadcast { .. } => decode_broadcast(payload),
    }
    .map_err(|e| ("undecodable", e.to_string()))?;
    let scope = update.scope().map_err(|e| ("invalid-pattern", e))?;
    let tenant = match scope.tenant() {
        None => None,
        Some(t) => {
            let id = TenantId::parse(t)
                .map_err(|e| ("unknown-tenant", format!("tenantID '{t}': {}", e.message)))?;
            if !tenancy.current().contains(&id) {
                return Err((
                    "unknown-tenant",
                    format!("tenantID '{t}' is not a tenant of this service"),
                ));
            }
            Some(id)
        }
    };
    if let ScmpSubject::Targeted { consumer, .. } = &parsed {
        // The tenant's own instance name, or the service's for any tenant it serves.
        let fits = consumer == own
            || tenant
                .as_ref()
                .is_some_and(|t| *consumer == tenancy.naming.instance_of(t));
        if !fits {
            return Err((
                "other-instance",
                format!("addressed to '{consumer}', not to this tenant's instance"),
            ));
        }
    }
    let app = |a: &str| {
        AppName::parse(a).map_err(|e| ("invalid-name", format!("appName '{a}': {}", e.message)))
    };
    let refresh = match (scope, tenant) {
        (ConfigScope::All, _) => RefreshScope::All,
        (ConfigScope::Tenant { .. }, Some(t)) => RefreshScope::Tenant(t),
        (ConfigScope::App { app: a, .. }, Some(t)) => RefreshScope::App(t, app(&a)?),
        (
            ConfigScope::Version {
                app: a, version, ..
            },
            Some(t),
        ) => {
            let v = AppVersionName::parse(&version).map_err(|e| {
                (
                    "invalid-name",
                    format!("appVerName '{version}': {}", e.message),
                )
            })?;
            RefreshScope::Version(t, app(&a)?, v)
        }
        (_, None) => unreachable!("a scope with a tenant has a tenant"),
    };
    Ok(Some((refresh, update.correlation_id)))
}

fn label(scope: &RefreshScope) -> &'static str {
    match scope {
        RefreshScope::All => "all",
        RefreshScope::Tenant(_) => "tenant",
        RefreshScope::App(..) => "application",
        RefreshScope::Version(..) => "version",
    }
}

/// Listens until `stop` turns true.
pub async fn listen(
    nats: Nats,
    control: Arc<dyn CatalogControl>,
    tenancy: Tenancy,
    mut stop: watch::Receiver<bool>,
) -> Result<(), async_nats::SubscribeError> {
    let broadcast = nats.client.subscribe(BROADCAST_WILDCARD).await?;
    let targeted = nats.client.subscribe(TARGETED_WILDCARD).await?;
    let mut messages = futures_util::stream::select(broadcast, targeted);
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(msg) = next else { break };
        match interpret(&msg.subject, &msg.payload, &tenancy) {
            Ok(None) => {}
            Ok(Some((scope, correlation_id))) => {
                let kind = msg.subject.rsplit('.').next().unwrap_or("");
                let kind = if kind == "delete" { "delete" } else { "upsert" };
                metrics::counter!("epr_scmp_messages_total", "type" => kind, "scope" => label(&scope))
                    .increment(1);
                tracing::info!(subject = %msg.subject, correlation_id = %correlation_id,
                    scope = ?scope, "17/SCMP configuration update");
                control.refresh(scope, &correlation_id);
            }
            Err((reason, why)) => dropped(reason, &msg.subject, &why),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use epr_events::scmp::{
        broadcast_subject, encode_broadcast, encode_targeted, targeted_subject, ConfigUpdate,
        UpdateType,
    };

    fn tenancy() -> Tenancy {
        Tenancy::fixed("epr", TenantId::parse("kaa").unwrap())
    }

    fn update(t: Option<&str>, a: Option<&str>, v: Option<&str>) -> ConfigUpdate {
        ConfigUpdate {
            correlation_id: "c".into(),
            timestamp: 1,
            originator_replica_id: Some("tekton-0".into()),
            tenant_id: t.map(Into::into),
            app_name: a.map(Into::into),
            app_version_name: v.map(Into::into),
        }
    }

    #[test]
    fn broadcast_scopes_and_tenants() {
        let t = tenancy();
        let subj = broadcast_subject("tekton", UpdateType::Upsert);
        let kaa = TenantId::parse("kaa").unwrap();
        let ok = |u: ConfigUpdate| {
            interpret(&subj, &encode_broadcast(&u).unwrap(), &t)
                .unwrap()
                .unwrap()
                .0
        };
        assert_eq!(ok(update(None, None, None)), RefreshScope::All);
        assert_eq!(
            ok(update(Some("kaa"), None, None)),
            RefreshScope::Tenant(kaa.clone())
        );
        assert_eq!(
            ok(update(Some("kaa"), Some("demo"), Some("demo-v3"))),
            RefreshScope::Version(
                kaa,
                AppName::parse("demo").unwrap(),
                AppVersionName::parse("demo-v3").unwrap()
            )
        );
        let err = |u: ConfigUpdate| {
            interpret(&subj, &encode_broadcast(&u).unwrap(), &t)
                .unwrap_err()
                .0
        };
        assert_eq!(err(update(Some("acme"), None, None)), "unknown-tenant");
        assert_eq!(err(update(None, Some("demo"), None)), "invalid-pattern");
        assert_eq!(
            err(update(Some("kaa"), Some("Bad App"), None)),
            "invalid-name"
        );
        assert_eq!(interpret(&subj, b"\x01", &t).unwrap_err().0, "undecodable");
    }

    #[test]
    fn targeted_needs_our_instance() {
        let t = tenancy();
        let mut u = update(Some("kaa"), Some("demo"), None);
        u.originator_replica_id = None;
        let payload = encode_targeted(&u).unwrap();
        let ours = targeted_subject("epr", UpdateType::Delete);
        assert!(interpret(&ours, &payload, &t).unwrap().is_some());
        // The default tenant's own instance name is the service's.
        let other = targeted_subject("cm", UpdateType::Delete);
        assert_eq!(interpret(&other, &payload, &t).unwrap(), None);
        let wrong_tenant = targeted_subject("epr-acme", UpdateType::Delete);
        assert_eq!(
            interpret(&wrong_tenant, &payload, &t).unwrap_err().0,
            "other-instance"
        );
        assert_eq!(interpret("kaa.v1.unrelated", &payload, &t).unwrap(), None);
    }
}
